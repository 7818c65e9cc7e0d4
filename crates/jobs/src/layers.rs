//! Copy plans between the layers of a backing chain: the part shared by commit
//! (upper layers into a base) and stream (middle layers into the top).
//!
//! A plan lists the guest ranges whose visible content comes from a chosen band of
//! layers, each to be copied as data or written as zeroes. It is computed from
//! allocation status alone (nothing is read), so it also says how much a job will
//! write before it starts.

use crate::status::{ChainStatus, Walk};
use crate::{Cancel, Progress, Result};
use std::sync::Arc;
use strata_format::BlockDevice;
use strata_storage::sync;

/// Bytes moved per read/write (and the alignment of the pieces workers take).
const CHUNK: u64 = 1 << 20;

/// What to do with a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Copy the visible bytes.
    Copy,
    /// The visible bytes are zeroes: write zeroes.
    Zero,
}

/// One range of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    pub action: Action,
}

/// The ranges a job will write, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyPlan {
    pub ranges: Vec<Range>,
}

impl CopyPlan {
    /// Bytes of data to copy.
    pub fn copy_bytes(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.action == Action::Copy)
            .map(|r| r.len)
            .sum()
    }

    /// Bytes written in all (data and zeroes).
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    fn push(&mut self, offset: u64, len: u64, action: Action) {
        if let Some(last) = self.ranges.last_mut() {
            if last.action == action && last.offset + last.len == offset {
                last.len += len;
                return;
            }
        }
        self.ranges.push(Range {
            offset,
            len,
            action,
        });
    }
}

/// The ranges of `layers[0..end]`'s visible content (of `size` bytes) that are
/// stored in `layers[from..end]` - that is, served by those layers and not by a
/// layer above `from` nor by anything below `end`.
pub fn plan_band(
    layers: &[Arc<dyn BlockDevice>],
    from: usize,
    end: usize,
    size: u64,
    cancel: &Cancel,
) -> Result<CopyPlan> {
    let status = ChainStatus::from_devices(layers[..end].to_vec())?;
    let size = size.min(status.virtual_size());
    let mut plan = CopyPlan::default();
    let mut off = 0;
    while off < size {
        cancel.check()?;
        let st = status.status(off, size - off, Walk::Allocated)?;
        if st.allocated && st.depth >= from {
            let action = if st.zero && !st.data {
                Action::Zero
            } else {
                Action::Copy
            };
            plan.push(off, st.len, action);
        }
        off += st.len;
    }
    Ok(plan)
}

/// A bandwidth limit (`qemu-img commit -r`): wraps the progress a job reports to
/// and holds back the reporting thread (a copy worker) until the bytes done so far
/// fit within `rate` bytes per second since the start. Rate 0 means no limit.
pub struct RateLimit<'a> {
    inner: &'a dyn Progress,
    rate: u64,
    start: std::time::Instant,
    done: std::sync::atomic::AtomicU64,
}

impl<'a> RateLimit<'a> {
    pub fn new(inner: &'a dyn Progress, rate: u64) -> Self {
        RateLimit {
            inner,
            rate,
            start: std::time::Instant::now(),
            done: Default::default(),
        }
    }
}

impl Progress for RateLimit<'_> {
    fn set_total(&self, total: u64) {
        self.inner.set_total(total);
    }
    fn advance(&self, n: u64) {
        self.inner.advance(n);
        if self.rate == 0 {
            return;
        }
        let done = self
            .done
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed)
            .saturating_add(n);
        let due = std::time::Duration::from_secs_f64(done as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// Threads reading the source while one thread writes the destination. Reads run
/// in parallel; writes do not, because buffered writes to one file serialize on
/// its inode lock, and writers waiting for it spin on the CPU the readers need.
const READERS: usize = 3;

/// Split `plan` into pieces of at most [`CHUNK`] bytes that do not cross a
/// [`CHUNK`]-aligned boundary (so no two workers share a cluster of up to that size).
fn pieces(plan: &CopyPlan) -> Vec<Range> {
    let mut out = Vec::new();
    for r in &plan.ranges {
        let end = r.offset + r.len;
        let mut off = r.offset;
        while off < end {
            let next = ((off / CHUNK) + 1) * CHUNK;
            let n = next.min(end) - off;
            out.push(Range {
                offset: off,
                len: n,
                action: r.action,
            });
            off += n;
        }
    }
    out
}

/// Carry out `plan`: read each Copy range through `source` (the guest view) and
/// write it into `dest` (zeroes where the data reads as zeroes, keeping `dest`
/// sparse); write zeroes for Zero ranges. A few reader threads read pieces ahead
/// (in any order: pieces never overlap) and hand them to one writer, the calling
/// thread. `dest` is flushed at the end, so the data is durable before the caller
/// relinks anything. On error or cancellation everything stops and the first error
/// is returned; what was written stays (it is invisible until the caller relinks,
/// see the jobs' crash-safety notes).
pub fn apply(
    plan: &CopyPlan,
    source: &dyn BlockDevice,
    dest: &dyn BlockDevice,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Mutex};
    progress.set_total(plan.total_bytes());
    let items = pieces(plan);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    // Buffers go back to the readers once written: no fresh allocation (and page
    // faults) per piece.
    let pool: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    let readers = READERS.min(items.len());
    // A piece read: its range, and its bytes unless it reads as zeroes.
    type Piece = Result<(Range, Option<Vec<u8>>)>;
    let (tx, rx) = mpsc::sync_channel::<Piece>(2 * READERS);
    let read = |tx: mpsc::SyncSender<Piece>| loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(&r) = items.get(i) else { return };
        let piece = (|| -> Result<Option<Vec<u8>>> {
            cancel.check()?;
            if r.action == Action::Zero {
                return Ok(None);
            }
            let mut buf = sync::lock(&pool).pop().unwrap_or_default();
            buf.resize(r.len as usize, 0);
            source.read(&mut buf, r.offset)?;
            if crate::convert::is_zero(&buf) {
                sync::lock(&pool).push(buf);
                return Ok(None);
            }
            Ok(Some(buf))
        })();
        let failed = piece.is_err();
        if tx.send(piece.map(|b| (r, b))).is_err() || failed {
            return;
        }
    };
    let write = |rx: mpsc::Receiver<Piece>| -> Result<()> {
        for piece in rx {
            let (r, buf) = piece?;
            cancel.check()?;
            match buf {
                Some(buf) => {
                    dest.write(&buf, r.offset)?;
                    sync::lock(&pool).push(buf);
                }
                None => dest.write_zeroes(r.offset, r.len, false)?,
            }
            progress.advance(r.len);
        }
        Ok(())
    };
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        for _ in 0..readers {
            let tx = tx.clone();
            scope.spawn(|| read(tx));
        }
        drop(tx);
        if let (Some(path), false) = (dest.path(), items.is_empty()) {
            let done = &done;
            scope.spawn(move || early_writeback(&path, done));
        }
        // Returning drops the receiver, so readers blocked on a full channel
        // wake up and stop.
        let r = write(rx);
        stop.store(true, Ordering::Relaxed);
        done.store(true, Ordering::Relaxed);
        r
    });
    result?;
    dest.flush()?;
    Ok(())
}

/// While a copy runs, ask the kernel every so often to start writing the
/// destination's dirty pages back, so the final flush (which the relink must wait
/// for) finds little left to do. Only starts writeback: durability still comes from
/// the flush. Uses its own read-only descriptor (open-file-description locks are
/// not affected by it). Best effort: errors are ignored.
pub(crate) fn early_writeback(path: &std::path::Path, done: &std::sync::atomic::AtomicBool) {
    let Ok(f) = std::fs::File::open(path) else {
        return;
    };
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        strata_storage::start_writeback(&f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, len: u64, action: Action) -> Range {
        Range {
            offset,
            len,
            action,
        }
    }

    #[test]
    fn pieces_split_at_chunk_boundaries_and_keep_the_action() {
        use Action::*;
        let m = CHUNK / 4;
        let cases: Vec<(Vec<Range>, Vec<Range>)> = vec![
            (vec![], vec![]),
            (vec![r(0, 4096, Copy)], vec![r(0, 4096, Copy)]),
            (vec![r(0, CHUNK, Zero)], vec![r(0, CHUNK, Zero)]),
            (
                vec![r(CHUNK - m, 2 * m, Copy)],
                vec![r(CHUNK - m, m, Copy), r(CHUNK, m, Copy)],
            ),
            (
                vec![r(m, 2 * CHUNK, Copy), r(3 * CHUNK, 5, Zero)],
                vec![
                    r(m, CHUNK - m, Copy),
                    r(CHUNK, CHUNK, Copy),
                    r(2 * CHUNK, m, Copy),
                    r(3 * CHUNK, 5, Zero),
                ],
            ),
        ];
        for (input, want) in cases {
            let plan = CopyPlan {
                ranges: input.clone(),
            };
            let got = pieces(&plan);
            assert_eq!(got, want, "{input:?}");
            assert_eq!(got.iter().map(|r| r.len).sum::<u64>(), plan.total_bytes());
        }
    }
}
