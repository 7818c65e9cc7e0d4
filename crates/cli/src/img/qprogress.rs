//! qemu-img's own `-p` output: `    (NN.NN/100%)` followed by a carriage return on
//! stdout, printed at 0 and 100 and whenever the figure moved by more than a
//! minimum step since the last line, and a newline at the end. Scripts and logs
//! that read qemu-img's progress see the same bytes, terminal or not.
//!
//! A job that fails ends its progress only after its error is printed, as
//! qemu-img's commands report the error and then close the line on their way
//! out: [`QemuProgress::end_at_exit`] leaves the newline to [`print_end_due`],
//! which the command line calls once the command's last words are out.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// A closing newline left for [`print_end_due`].
static END_DUE: AtomicBool = AtomicBool::new(false);

/// Print the closing newline a progress left for the command's exit, if any.
pub fn print_end_due() {
    if END_DUE.swap(false, Ordering::SeqCst) {
        println!();
    }
}

/// A progress printer in qemu-img's format; silent when not enabled.
pub struct QemuProgress {
    enabled: bool,
    min_skip: f32,
    current: f32,
    last_print: f32,
}

impl QemuProgress {
    /// `min_skip`: the change in percent that makes a new line.
    pub fn new(enabled: bool, min_skip: f32) -> Self {
        QemuProgress {
            enabled,
            min_skip,
            current: 0.0,
            last_print: 0.0,
        }
    }

    /// Set the figure to `percent` (capped at 100), printing a line if it moved
    /// enough, or is 0 or 100.
    pub fn set(&mut self, percent: f32) {
        let current = percent.min(100.0);
        self.current = current;
        if current > self.last_print + self.min_skip
            || current < self.last_print - self.min_skip
            || current == 100.0
            || current == 0.0
        {
            self.last_print = current;
            if self.enabled {
                let mut out = std::io::stdout().lock();
                let _ = write!(out, "    ({:3.2}/100%)\r", current);
                let _ = out.flush();
            }
        }
    }

    /// `done` of `total` units, as a percentage computed in single precision.
    pub fn set_fraction(&mut self, done: u64, total: u64) {
        if total > 0 {
            self.set(100.0f32 * done as f32 / total as f32);
        }
    }

    /// Add `delta` percent, as qemu-img's relative steps do (`delta / 100 * 100`,
    /// in single precision like qemu-img's figure).
    pub fn add(&mut self, delta: f32) {
        self.set(self.current + delta / 100.0 * 100.0);
    }

    /// The closing newline.
    pub fn end(&self) {
        if self.enabled {
            println!();
        }
    }

    /// The closing newline, printed when the command exits (after its error).
    pub fn end_at_exit(&self) {
        if self.enabled {
            END_DUE.store(true, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_printed_only_past_the_minimum_step_and_at_the_ends() {
        let mut p = QemuProgress::new(false, 1.0);
        let mut printed = Vec::new();
        for v in [0.0, 0.5, 1.0, 1.01, 1.5, 2.2, 100.0, 100.0] {
            let before = p.last_print;
            p.set(v);
            if p.last_print != before || v == 0.0 || v == 100.0 {
                printed.push(v);
            }
        }
        assert_eq!(printed, vec![0.0, 1.01, 2.2, 100.0, 100.0]);
    }
}
