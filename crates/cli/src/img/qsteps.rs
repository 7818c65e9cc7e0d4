//! `-p` for the byte-counting jobs (convert, compare, rebase, commit): qemu-img's
//! own lines when stdout is not a terminal, strata's bar on a terminal.
//!
//! qemu-img advances its figure per request of its own copy loop, not per byte, so
//! the figures it prints follow from how it splits the work. [`QemuSteps`] prints
//! the same figures: precomputed ones (convert, rebase: [`QemuSteps::milestones`]),
//! released once strata's job has done the bytes that come before them, or ones
//! accumulated per chunk of a job that splits the work as qemu-img does (compare:
//! [`QemuSteps::relative`]), or the plain fraction done (commit, whose figures
//! qemu-img takes from a block job at times that depend on timing).

use super::progress::Bar;
use super::qprogress::QemuProgress;
use std::io::IsTerminal;
use std::sync::Mutex;
use strata_format::qcow2::Qcow2Image;
use strata_format::{BlockDevice, Status};
use strata_jobs::Progress;

/// How advancing the job turns into qemu-img's figure.
enum Mode {
    /// `(done, figure)`: the figure once the job has done `done` bytes.
    Milestones {
        points: Vec<(u64, f32)>,
        next: usize,
    },
    /// Each step of `n` bytes adds `n / base` of 100 %, in single precision
    /// (`base`: the job's total).
    Relative { base: u64 },
    /// The figure is the share of the job's total done.
    Fraction { total: u64 },
}

struct State {
    printer: QemuProgress,
    mode: Mode,
    done: u64,
    /// A line printed once the job has done this many bytes (compare's size warning,
    /// which qemu-img prints between its two loops).
    notice: Option<(u64, String)>,
    ended: bool,
}

/// qemu-img's `-p` lines for one job. Dropped before [`QemuSteps::end`] (the job
/// failed), it leaves its closing newline for the command's exit, after the
/// error, where qemu-img ends its progress on errors.
pub struct QemuSteps {
    state: Mutex<State>,
}

/// Whether `-p` shows qemu-img's lines (stdout is not a terminal) rather than a bar.
pub fn qemu_style() -> bool {
    !std::io::stdout().is_terminal()
}

impl QemuSteps {
    fn new(enabled: bool, min_skip: f32, mode: Mode) -> Self {
        QemuSteps {
            state: Mutex::new(State {
                printer: QemuProgress::new(enabled, min_skip),
                mode,
                done: 0,
                notice: None,
                ended: !enabled,
            }),
        }
    }

    /// Figures known in advance: `(done, figure)` prints `figure` (subject to
    /// `min_skip`) once the job has done `done` bytes; `done` ascending.
    pub fn milestones(enabled: bool, min_skip: f32, points: Vec<(u64, f32)>) -> Self {
        Self::new(enabled, min_skip, Mode::Milestones { points, next: 0 })
    }

    /// Replace the figures of [`QemuSteps::milestones`] (known once the job is planned).
    pub fn set_milestones(&self, figures: Vec<(u64, f32)>) {
        lock(&self.state).mode = Mode::Milestones {
            points: figures,
            next: 0,
        };
    }

    /// The job is done: print the figures still due.
    pub fn complete(&self) {
        let mut s = lock(&self.state);
        let State { printer, mode, .. } = &mut *s;
        if let Mode::Milestones { points, next } = mode {
            for &(_, figure) in &points[*next..] {
                printer.set(figure);
            }
            *next = points.len();
        }
    }

    /// Whether the lines are printed.
    pub fn enabled(&self) -> bool {
        !lock(&self.state).ended
    }

    /// Each `advance(n)` adds `n / base` of the whole, as qemu-img's per-chunk
    /// `qemu_progress_print(chunk / base * 100, 100)` does; `base` is the total
    /// the job announces.
    pub fn relative(enabled: bool, min_skip: f32) -> Self {
        Self::new(enabled, min_skip, Mode::Relative { base: 0 })
    }

    /// The figure is the share done of the total the job announces.
    pub fn fraction(enabled: bool, min_skip: f32) -> Self {
        Self::new(enabled, min_skip, Mode::Fraction { total: 0 })
    }

    /// Print `text` on stdout when the job has done `at` bytes (or announces its
    /// total, if `at` is 0).
    pub fn notice(&self, at: u64, text: String) {
        lock(&self.state).notice = Some((at, text));
    }

    /// Set the figure to `percent`.
    pub fn set(&self, percent: f32) {
        lock(&self.state).printer.set(percent);
    }

    /// Set the figure to `done` of `total`.
    pub fn set_fraction(&self, done: u64, total: u64) {
        lock(&self.state).printer.set_fraction(done, total);
    }

    /// The closing newline (once).
    pub fn end(&self) {
        let mut s = lock(&self.state);
        if !s.ended {
            s.ended = true;
            s.printer.end();
        }
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn notice_due(&mut self) {
        if let Some((at, _)) = &self.notice {
            if self.done >= *at {
                let (_, text) = self.notice.take().expect("checked above");
                println!("{text}");
            }
        }
    }
}

impl Progress for QemuSteps {
    fn set_total(&self, total: u64) {
        let mut s = lock(&self.state);
        match &mut s.mode {
            Mode::Fraction { total: t } | Mode::Relative { base: t } => *t = total,
            Mode::Milestones { .. } => {}
        }
        s.notice_due();
    }

    fn advance(&self, n: u64) {
        let mut s = lock(&self.state);
        s.done = s.done.saturating_add(n);
        let done = s.done;
        let State { printer, mode, .. } = &mut *s;
        match mode {
            Mode::Milestones { points, next } => {
                while let Some(&(at, figure)) = points.get(*next) {
                    if at > done {
                        break;
                    }
                    printer.set(figure);
                    *next += 1;
                }
            }
            Mode::Relative { base } => {
                if *base > 0 {
                    let delta = (n as f32 / *base as f32) * 100.0;
                    printer.add(delta);
                }
            }
            Mode::Fraction { total } => printer.set_fraction(done, *total),
        }
        s.notice_due();
    }
}

impl Drop for QemuSteps {
    fn drop(&mut self) {
        let mut s = lock(&self.state);
        if !s.ended {
            s.ended = true;
            s.printer.end_at_exit();
        }
    }
}

/// `-p` as shown: strata's bar on a terminal, qemu-img's lines otherwise (the
/// steps also carry compare's notice when `-p` is off).
pub struct Shown {
    bar: Bar,
    pub steps: QemuSteps,
}

impl Shown {
    /// `make(enabled)` builds the qemu-img lines, enabled when `-p` is asked for
    /// and stdout is not a terminal.
    pub fn new(progress: bool, make: impl FnOnce(bool) -> QemuSteps) -> Self {
        let qemu = qemu_style();
        Shown {
            bar: Bar::new(progress && !qemu),
            steps: make(progress && qemu),
        }
    }

    /// The job succeeded: the bar shows 100 %.
    pub fn finish_bar(&self) {
        self.bar.finish();
    }
}

impl Progress for Shown {
    fn set_total(&self, total: u64) {
        self.bar.set_total(total);
        self.steps.set_total(total);
    }
    fn advance(&self, n: u64) {
        self.bar.advance(n);
        self.steps.advance(n);
    }
}

/// The figures `qemu-img rebase -p` prints in safe mode: one step of
/// `100 / (size / min(size, 2 MiB))` per range the image does not store, taken
/// 2 MiB at most at a time from wherever the last one ended (and widened to the
/// image's (sub)clusters, or clusters when compressing). When the new backing
/// file `new_backing` (a path) is in the image's old backing chain, a range no
/// layer above it stores needs no work and shows no step, as in qemu-img.
/// Each figure comes with the offset where its range ends: qemu-img prints it
/// once everything before that offset is copied.
pub fn rebase_figures(
    image: &dyn BlockDevice,
    compress: bool,
    new_backing: Option<&std::path::Path>,
) -> strata_format::Result<Vec<(u64, f32)>> {
    const BUF: u64 = 2 << 20;
    let size = image.virtual_size();
    let step = if size == 0 {
        0.0
    } else {
        100.0f32 / (size / size.min(BUF)) as f32
    };
    let q = image.as_any().downcast_ref::<Qcow2Image>();
    let align = q.map_or(1, |q| {
        let g = q.geometry();
        if compress {
            g.cluster_size()
        } else {
            g.subcluster_size()
        }
    });
    let table = q.map(|q| {
        let g = q.geometry();
        let entry = if g.extended_l2 { 16 } else { 8 };
        g.cluster_size() * (g.cluster_size() / entry)
    });
    let prefix = layers_above(image, new_backing);
    let mut figures = Vec::new();
    let mut current = 0.0f32;
    let mut offset = 0u64;
    while offset < size {
        let mut n = BUF.min(size - offset);
        if let Some(t) = table {
            n = n.min(t - offset % t);
        }
        let ext = image.block_status(offset, n)?;
        n = ext.len;
        if !matches!(ext.status, Status::Unallocated) {
            offset += n;
            continue;
        }
        if let Some(q) = q {
            n = unallocated_run(q, offset, n)?;
        }
        if let Some(layers) = &prefix {
            let (allocated, m) = allocated_in(layers, offset, n)?;
            if !allocated {
                offset += m;
                continue;
            }
            n = m;
        }
        let start = offset / align * align;
        let end = (offset + n).next_multiple_of(align).min(size);
        offset = end.max(start + 1);
        current = (current + step / 100.0 * 100.0).min(100.0);
        figures.push((offset, current));
    }
    Ok(figures)
}

/// How much of the unallocated `offset..offset + n` of `q` QEMU reports as
/// one run: with extended L2 entries, unallocated subclusters of a cluster that
/// has a host cluster are a kind apart from those of one that has none, so a
/// run ends where the kind changes (at a cluster boundary).
fn unallocated_run(q: &Qcow2Image, offset: u64, n: u64) -> strata_format::Result<u64> {
    let g = q.geometry();
    if !g.extended_l2 {
        return Ok(n);
    }
    let cs = g.cluster_size();
    let reserved = |at: u64| q.reserved_host_offset(at).map(|r| r.is_some());
    let first = reserved(offset)?;
    let end = offset.saturating_add(n);
    let mut c = (offset / cs + 1) * cs;
    while c < end {
        if reserved(c)? != first {
            return Ok(c - offset);
        }
        c += cs;
    }
    Ok(n)
}

/// The layers of `image`'s backing chain above the one whose file is
/// `new_backing`, if that file is in the chain.
fn layers_above(
    image: &dyn BlockDevice,
    new_backing: Option<&std::path::Path>,
) -> Option<Vec<std::sync::Arc<dyn BlockDevice>>> {
    let target = std::fs::canonicalize(new_backing?).ok()?;
    let mut layers = Vec::new();
    let mut cur = image.backing();
    while let Some(d) = cur {
        let here = d.path().and_then(|p| std::fs::canonicalize(p).ok());
        if here.as_deref() == Some(target.as_path()) {
            return Some(layers);
        }
        cur = d.backing();
        layers.push(d);
    }
    None
}

/// Whether any of `layers` stores the start of `offset..offset + n`, and how far
/// that answer holds.
fn allocated_in(
    layers: &[std::sync::Arc<dyn BlockDevice>],
    offset: u64,
    mut n: u64,
) -> strata_format::Result<(bool, u64)> {
    for layer in layers {
        let size = layer.virtual_size();
        if offset >= size {
            continue;
        }
        let ext = layer.block_status(offset, n.min(size - offset))?;
        if !matches!(ext.status, Status::Unallocated) {
            return Ok((true, ext.len));
        }
        n = n.min(ext.len);
    }
    Ok((false, n))
}
