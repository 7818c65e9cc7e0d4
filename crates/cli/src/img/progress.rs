//! Progress display for long `strata img` jobs (`-p`), as a [`strata_jobs::Progress`].
//!
//! With `-p` qemu-img prints `    (NN.NN/100%)` updates; strata draws a bar with the
//! percentage, throughput and time left on stderr (stdout stays clean for scripts).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use strata_jobs::Progress;

/// A progress bar when `enabled`, nothing otherwise.
pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    pub fn new(enabled: bool) -> Self {
        let bar = enabled.then(|| {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "    ({percent:>3}/100%) [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b
        });
        Bar { bar }
    }

    /// Finish the bar at 100% (call when the job succeeded).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            if let Some(len) = b.length() {
                b.set_position(len);
            }
            b.finish();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            if !b.is_finished() {
                b.abandon();
            }
        }
    }
}

impl Progress for Bar {
    fn set_total(&self, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
        }
    }
    fn advance(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }
}
