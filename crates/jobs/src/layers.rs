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

    /// The plan with every copied range widened to whole chunks of `g` bytes
    /// (within `size`), as a mirror job of that granularity copies: the chunks
    /// are copied whole (the zeroes planned inside them are copied as the
    /// zeroes they read as), the rest of the zero ranges stays as it was.
    pub fn widened_to_chunks(&self, g: u64, size: u64) -> CopyPlan {
        let mut copies: Vec<(u64, u64)> = Vec::new();
        for r in self.ranges.iter().filter(|r| r.action == Action::Copy) {
            let start = r.offset / g * g;
            let end = (r.offset + r.len)
                .checked_next_multiple_of(g)
                .map_or(size, |e| e.min(size));
            match copies.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ => copies.push((start, end)),
            }
        }
        let mut pieces: Vec<Range> = copies
            .iter()
            .map(|&(a, b)| Range {
                offset: a,
                len: b - a,
                action: Action::Copy,
            })
            .collect();
        for r in self.ranges.iter().filter(|r| r.action == Action::Zero) {
            // What of the zero range no widened copy covers.
            let mut at = r.offset;
            let end = r.offset + r.len;
            for &(a, b) in copies.iter().filter(|&&(a, b)| a < end && r.offset < b) {
                if a > at {
                    pieces.push(Range {
                        offset: at,
                        len: a - at,
                        action: Action::Zero,
                    });
                }
                at = at.max(b);
            }
            if at < end {
                pieces.push(Range {
                    offset: at,
                    len: end - at,
                    action: Action::Zero,
                });
            }
        }
        pieces.sort_by_key(|r| r.offset);
        let mut out = CopyPlan::default();
        for r in pieces {
            out.push(r.offset, r.len, r.action);
        }
        out
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

/// How [`apply`] writes zeroes, after the QEMU job it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zeroes {
    /// QEMU's commit job: Zero ranges are written as zeroes that may give their
    /// clusters back (the base's own allocation there is dropped), and Copy ranges
    /// are written as read, zero bytes included.
    Unmap,
    /// QEMU's copy-on-read (stream): Zero ranges, and Copy ranges that read as
    /// zeroes, are written as zeroes that keep what the destination allocated.
    Keep,
}

/// Pieces read ahead of the one being written, at most.
const WINDOW: usize = 2 * READERS;

/// Carry out `plan`: read each Copy range through `source` (the guest view) and
/// write it into `dest`; write zeroes for Zero ranges, as `zeroes` says (with
/// [`Zeroes::Unmap`], all of them first, then a flush). A few
/// reader threads read pieces ahead (at most [`WINDOW`] past the one being
/// written) and hand them to one writer, the calling thread, which writes them in
/// the plan's order, so `dest` allocates its clusters in the same order at every
/// run (QEMU's jobs walk the disk in that order too). `dest` is flushed at the
/// end, so the data is durable before the caller relinks anything. On error or
/// cancellation everything stops and the first error is returned; what was
/// written stays (it is invisible until the caller relinks, see the jobs'
/// crash-safety notes).
pub fn apply(
    plan: &CopyPlan,
    source: &dyn BlockDevice,
    dest: &dyn BlockDevice,
    zeroes: Zeroes,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<()> {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Condvar, Mutex};
    progress.set_total(plan.total_bytes());
    let mut items = pieces(plan);
    if zeroes == Zeroes::Unmap && items.iter().any(|r| r.action == Action::Zero) {
        // QEMU's commit job has its zeroes (which need no read) written ahead of
        // the data: the clusters they give back are free (after the flush) for
        // the data's allocations, as in QEMU's image.
        for r in items.iter().filter(|r| r.action == Action::Zero) {
            cancel.check()?;
            dest.write_zeroes(r.offset, r.len, true)?;
            progress.advance(r.len);
        }
        dest.flush()?;
        items.retain(|r| r.action == Action::Copy);
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    // Index of the piece the writer waits for; readers stay within WINDOW of it.
    let written = (Mutex::new(0usize), Condvar::new());
    // Buffers go back to the readers once written: no fresh allocation (and page
    // faults) per piece.
    let pool: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    let readers = READERS.min(items.len());
    // A piece read: its index, its range, and its bytes unless it is written as
    // zeroes.
    type Piece = Result<(usize, Range, Option<Vec<u8>>)>;
    let (tx, rx) = mpsc::sync_channel::<Piece>(WINDOW);
    let read = |tx: mpsc::SyncSender<Piece>| loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(&r) = items.get(i) else { return };
        {
            let (lock, cv) = &written;
            let mut w = sync::lock(lock);
            while i >= *w + WINDOW && !stop.load(Ordering::Relaxed) {
                w = cv.wait(w).unwrap_or_else(|e| e.into_inner());
            }
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let piece = (|| -> Result<Option<Vec<u8>>> {
            cancel.check()?;
            if r.action == Action::Zero {
                return Ok(None);
            }
            let mut buf = sync::lock(&pool).pop().unwrap_or_default();
            buf.resize(r.len as usize, 0);
            source.read(&mut buf, r.offset)?;
            if zeroes == Zeroes::Keep && crate::convert::is_zero(&buf) {
                sync::lock(&pool).push(buf);
                return Ok(None);
            }
            Ok(Some(buf))
        })();
        let failed = piece.is_err();
        if tx.send(piece.map(|b| (i, r, b))).is_err() || failed {
            return;
        }
    };
    let write = |rx: mpsc::Receiver<Piece>| -> Result<()> {
        let mut ahead = BTreeMap::new();
        let mut want = 0usize;
        for piece in rx {
            let (i, r, buf) = piece?;
            ahead.insert(i, (r, buf));
            while let Some((r, buf)) = ahead.remove(&want) {
                cancel.check()?;
                match buf {
                    Some(buf) => {
                        dest.write(&buf, r.offset)?;
                        sync::lock(&pool).push(buf);
                    }
                    None => dest.write_zeroes(r.offset, r.len, zeroes == Zeroes::Unmap)?,
                }
                progress.advance(r.len);
                want += 1;
                let (lock, cv) = &written;
                *sync::lock(lock) = want;
                cv.notify_all();
            }
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
        // wake up and stop; readers waiting for the window are woken here.
        let r = write(rx);
        stop.store(true, Ordering::Relaxed);
        let (lock, cv) = &written;
        drop(sync::lock(lock));
        cv.notify_all();
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
    fn widened_copies_cover_whole_chunks_and_the_zeroes_outside_them_stay() {
        use Action::*;
        let g = 65536;
        let plan = CopyPlan {
            ranges: vec![
                r(4096, 1024, Copy),
                r(5120, 200_000, Zero),
                r(205_120, 10, Copy),
                r(300_000, 5, Copy),
                r(400_000, 100, Copy),
            ],
        };
        let got = plan.widened_to_chunks(g, 400_050);
        assert_eq!(
            got.ranges,
            vec![
                r(0, g, Copy),
                r(g, 131_072, Zero),
                r(3 * g, 2 * g, Copy),
                r(6 * g, 400_050 - 6 * g, Copy),
            ]
        );
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
