//! `convert`: copy the guest view of one or more sources (each with its chain, or an
//! internal snapshot) into a target image, as `qemu-img convert` does.
//!
//! The job is planned first: the sources' allocation status is walked once and the
//! address space is cut into target-cluster-aligned windows, each listing the runs
//! to copy, to zero, or to leave to the target's backing file. Windows are then
//! applied by a pool of workers (both cores, and more threads than cores to overlap
//! reads with writes): each reads its data runs, skips or zeroes all-zero blocks
//! (`-S`), compresses whole clusters in parallel for `-c`, and writes. Holes in the
//! sources are never read.

use crate::status::{ChainStatus, Walk};
use crate::{Cancel, Error, Progress, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use strata_format::qcow2::Qcow2Image;
use strata_format::BlockDevice;

/// Bytes per window of work (a multiple of every cluster size).
const WINDOW: u64 = 2 << 20;
/// The largest `-S` qemu-img accepts.
pub const MAX_SPARSE: u64 = 16 << 20;

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Write compressed clusters (qcow2 targets).
    pub compress: bool,
    /// Blocks of this many zero bytes (aligned) are not written; 0 writes every
    /// byte, zeroes included (a fully allocated output).
    pub sparse_size: u64,
    /// The target reads as zeroes before the copy (new image, or `--target-is-zero`).
    pub target_is_zero: bool,
    /// The target has a backing file that already holds the sources' backing data:
    /// only what each source's top layer stores is copied (`-B`).
    pub target_has_backing: bool,
    /// Producer threads (`-m`); one more thread writes.
    pub workers: usize,
    /// Make the target durable at the end (`flush`). qemu-img's default cache mode
    /// for convert (`unsafe`) does not; without it, a qcow2 target's metadata is
    /// written when the caller closes it.
    pub flush: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            compress: false,
            sparse_size: 4096,
            target_is_zero: true,
            target_has_backing: false,
            workers: default_workers(),
            flush: true,
        }
    }
}

/// One producer per core (reading, scanning and compressing), beside the writer.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 16)
}

/// What a run of a window holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Zero,
    /// Left to the target's backing file.
    Backing,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    /// Offset in the target.
    start: u64,
    len: u64,
    kind: Kind,
}

/// One unit of work: a window of the target and the source it reads from.
struct Window {
    source: usize,
    /// Offset of the source's first byte in the target.
    base: u64,
    runs: Vec<Run>,
}

/// What a conversion did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Bytes of data written (before compression).
    pub data_bytes: u64,
    /// Bytes explicitly zeroed in the target.
    pub zeroed_bytes: u64,
    /// Clusters written compressed.
    pub compressed_clusters: u64,
}

/// The plan: windows covering every source, back to back.
pub struct Plan {
    windows: Vec<Window>,
    total: u64,
    /// Bytes that will be read and written as data.
    pub data_bytes: u64,
}

impl Plan {
    /// Walk the sources' allocation once. `cluster` is the target's cluster size
    /// (windows never split a target cluster between workers).
    pub fn new(
        sources: &[ChainStatus],
        opts: &ConvertOptions,
        cluster: u64,
        cancel: &Cancel,
    ) -> Result<Plan> {
        let window = WINDOW.max(cluster);
        let mut windows = Vec::new();
        let mut base = 0u64;
        let mut data_bytes = 0;
        for (si, src) in sources.iter().enumerate() {
            let size = src.virtual_size();
            let mut off = 0u64;
            // Status runs are cut at window boundaries (in target offsets).
            let mut cur: Option<Window> = None;
            while off < size {
                cancel.check()?;
                let st = src.status(off, size - off, Walk::Allocated)?;
                let kind = if opts.target_has_backing {
                    if st.depth > 0 || !st.allocated {
                        Kind::Backing
                    } else if st.zero {
                        Kind::Zero
                    } else {
                        Kind::Data
                    }
                } else if st.zero {
                    Kind::Zero
                } else {
                    Kind::Data
                };
                let mut pos = off;
                let end = off + st.len;
                while pos < end {
                    let t = base + pos;
                    let wend = (t / window + 1) * window;
                    let n = (end - pos).min(wend - t);
                    let w = cur.get_or_insert_with(|| Window {
                        source: si,
                        base,
                        runs: Vec::new(),
                    });
                    match w.runs.last_mut() {
                        Some(r) if r.kind == kind && r.start + r.len == t => r.len += n,
                        _ => w.runs.push(Run {
                            start: t,
                            len: n,
                            kind,
                        }),
                    }
                    if kind == Kind::Data {
                        data_bytes += n;
                    }
                    pos += n;
                    if t + n == wend {
                        windows.push(cur.take().expect("set above"));
                    }
                }
                off = end;
            }
            if let Some(w) = cur.take() {
                windows.push(w);
            }
            base += size;
        }
        Ok(Plan {
            windows,
            total: base,
            data_bytes,
        })
    }

    /// The target's size: all sources back to back.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// A page-aligned run of bytes inside a reusable allocation (the kernel copies
/// aligned buffers into the page cache faster).
struct Block {
    data: Vec<u8>,
    start: usize,
    len: usize,
}

impl Block {
    fn new(mut data: Vec<u8>, len: usize) -> Block {
        data.resize(len + PAGE, 0);
        let start = data.as_ptr().align_offset(PAGE).min(PAGE);
        Block { data, start, len }
    }
    fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.start + self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.start + self.len]
    }
}

const PAGE: usize = 4096;

/// A write the producers hand to the writer.
enum Out {
    /// Bytes `buf[range]` at target offset `at`.
    Data {
        at: u64,
        buf: Arc<Block>,
        range: std::ops::Range<usize>,
    },
    /// Zeroes at `[at, at+len)`.
    Zero { at: u64, len: u64 },
    /// An already compressed cluster.
    Compressed {
        cluster: u64,
        bytes: Vec<u8>,
        len: u64,
    },
    /// A window is done (for progress).
    Done(u64),
}

/// Copy what `plan` lists from `sources` into `target`, then flush it.
///
/// Producers (several threads) read windows, find zero blocks and compress; one
/// writer applies their output. A single writer keeps the target file's lock
/// uncontended, which is what makes buffered writes fast; the reading, scanning
/// and compressing run in parallel on every core.
pub fn convert(
    sources: &[ChainStatus],
    plan: &Plan,
    target: &Arc<dyn BlockDevice>,
    opts: &ConvertOptions,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<ConvertStats> {
    if target.virtual_size() < plan.total {
        return Err(Error::Invalid(format!(
            "The target is smaller ({} bytes) than the sources ({} bytes)",
            target.virtual_size(),
            plan.total
        )));
    }
    let qcow2 = target.as_any().downcast_ref::<Qcow2Image>();
    if opts.compress && qcow2.is_none() {
        return Err(Error::Invalid(format!(
            "Compression is not supported for the '{}' format",
            target.format_name()
        )));
    }
    if !opts.sparse_size.is_multiple_of(512) || opts.sparse_size > MAX_SPARSE {
        return Err(Error::Invalid(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216".into(),
        ));
    }
    progress.set_total(plan.total);
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    };
    let failed = || failure.lock().map(|f| f.is_some()).unwrap_or(true);
    let producers = opts.workers.clamp(1, 16).min(plan.windows.len().max(1));
    let (tx, rx) = std::sync::mpsc::sync_channel::<Out>(producers * 4);
    let cluster = qcow2.map(|q| q.geometry().cluster_size());
    let mut stats = ConvertStats::default();
    // Buffers go back to the producers once written: no page faults and no zeroing
    // of fresh memory per window.
    let pool: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..producers {
            let tx = tx.clone();
            let (next, fail, failed, pool) = (&next, &fail, &failed, &pool);
            scope.spawn(move || {
                let mut p = Producer {
                    opts,
                    cluster,
                    qcow2,
                    size: target.virtual_size(),
                    tx,
                    pool,
                };
                loop {
                    if failed() {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(w) = plan.windows.get(i) else { break };
                    if let Err(e) = cancel
                        .check()
                        .and_then(|()| p.produce(&sources[w.source], w))
                    {
                        fail(e);
                        break;
                    }
                }
            });
        }
        drop(tx);
        // The writer: this thread.
        for out in rx {
            if failed() {
                continue; // drain so producers can finish
            }
            let r = match out {
                Out::Data { at, buf, range } => {
                    stats.data_bytes += range.len() as u64;
                    let r = target.write(&buf.bytes()[range], at);
                    if let Ok(b) = Arc::try_unwrap(buf) {
                        pool.lock().unwrap_or_else(|p| p.into_inner()).push(b.data);
                    }
                    r
                }
                Out::Zero { at, len } => {
                    stats.zeroed_bytes += len;
                    target.write_zeroes(at, len, true)
                }
                Out::Compressed {
                    cluster,
                    bytes,
                    len,
                } => {
                    stats.compressed_clusters += 1;
                    stats.data_bytes += len;
                    qcow2
                        .expect("compression needs qcow2")
                        .write_compressed_cluster(cluster, &bytes)
                }
                Out::Done(n) => {
                    progress.advance(n);
                    Ok(())
                }
            };
            if let Err(e) = r {
                fail(e.into());
            }
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if opts.flush {
        target.flush()?;
    }
    Ok(stats)
}

/// Reads windows and turns them into writes for the writer.
struct Producer<'a> {
    opts: &'a ConvertOptions,
    cluster: Option<u64>,
    qcow2: Option<&'a Qcow2Image>,
    size: u64,
    tx: std::sync::mpsc::SyncSender<Out>,
    pool: &'a Mutex<Vec<Vec<u8>>>,
}

impl Producer<'_> {
    fn send(&self, o: Out) -> Result<()> {
        self.tx
            .send(o)
            .map_err(|_| Error::Invalid("the writer stopped".into()))
    }

    /// Whether zero ranges must be written (the target does not read as zeroes).
    fn write_zeroes(&self) -> bool {
        !self.opts.target_is_zero || self.opts.target_has_backing
    }

    fn produce(&mut self, src: &ChainStatus, w: &Window) -> Result<()> {
        let mut done = 0;
        for r in &w.runs {
            match r.kind {
                Kind::Backing => {}
                Kind::Zero if self.opts.sparse_size == 0 && !self.opts.compress => {
                    // -S 0 allocates everything: zeroes are written as data.
                    let buf = Arc::new(Block::new(Vec::new(), r.len as usize));
                    self.send(Out::Data {
                        at: r.start,
                        range: 0..buf.len,
                        buf,
                    })?;
                }
                Kind::Zero => {
                    if self.write_zeroes() {
                        self.send(Out::Zero {
                            at: r.start,
                            len: r.len,
                        })?;
                    }
                }
                Kind::Data => {
                    let spare = self
                        .pool
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pop()
                        .unwrap_or_default();
                    let mut buf = Block::new(spare, r.len as usize);
                    src.layer(0).read(buf.bytes_mut(), r.start - w.base)?;
                    let buf = Arc::new(buf);
                    if self.opts.compress {
                        self.compressed(&buf, r.start)?;
                    } else {
                        self.sparse(&buf, r.start)?;
                    }
                }
            }
            done += r.len;
        }
        self.send(Out::Done(done))
    }

    /// Hand over `buf` (at target offset `off`) leaving out aligned all-zero blocks
    /// of `-S` bytes.
    fn sparse(&self, buf: &Arc<Block>, off: u64) -> Result<()> {
        let ss = self.opts.sparse_size as usize;
        if ss == 0 {
            return self.send(Out::Data {
                at: off,
                buf: buf.clone(),
                range: 0..buf.len,
            });
        }
        let mut i = 0usize;
        let mut run: Option<(usize, bool)> = None;
        while i < buf.len {
            let abs = off + i as u64;
            let end = (((abs / ss as u64 + 1) * ss as u64 - off) as usize).min(buf.len);
            let zero = end - i == ss && is_zero(&buf.bytes()[i..end]);
            match run {
                Some((_, z)) if z == zero => {}
                Some((s, z)) => {
                    self.emit(buf, off, s..i, z)?;
                    run = Some((i, zero));
                }
                None => run = Some((i, zero)),
            }
            i = end;
        }
        if let Some((s, z)) = run {
            self.emit(buf, off, s..buf.len, z)?;
        }
        Ok(())
    }

    fn emit(
        &self,
        buf: &Arc<Block>,
        off: u64,
        range: std::ops::Range<usize>,
        zero: bool,
    ) -> Result<()> {
        let at = off + range.start as u64;
        if !zero {
            self.send(Out::Data {
                at,
                buf: buf.clone(),
                range,
            })
        } else if self.write_zeroes() {
            self.send(Out::Zero {
                at,
                len: range.len() as u64,
            })
        } else {
            Ok(())
        }
    }

    /// Compress whole clusters (clusters that do not shrink go plain; all-zero
    /// clusters are left out when the target reads as zeroes).
    fn compressed(&self, buf: &Arc<Block>, off: u64) -> Result<()> {
        let q = self.qcow2.expect("checked by convert()");
        let cs = self.cluster.expect("qcow2 has clusters");
        let mut i = 0usize;
        while i < buf.len {
            let abs = off + i as u64;
            let cend = ((abs / cs + 1) * cs).min(self.size);
            let end = ((cend - off) as usize).min(buf.len);
            let chunk = &buf.bytes()[i..end];
            let whole = abs.is_multiple_of(cs) && abs + chunk.len() as u64 == cend;
            if is_zero(chunk) {
                if self.write_zeroes() {
                    self.send(Out::Zero {
                        at: abs,
                        len: chunk.len() as u64,
                    })?;
                }
            } else if let Some(z) = whole.then(|| q.compress_cluster(chunk)).flatten() {
                self.send(Out::Compressed {
                    cluster: abs / cs,
                    bytes: z,
                    len: chunk.len() as u64,
                })?;
            } else {
                self.send(Out::Data {
                    at: abs,
                    buf: buf.clone(),
                    range: i..end,
                })?;
            }
            i = end;
        }
        Ok(())
    }
}

/// Whether every byte is zero. OR-folding a block vectorises well; blocks of 4 KiB
/// let a non-zero buffer stop early.
pub fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_sees_every_byte() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        for i in [0, 7, 8, 4095, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            v[i] = 0;
        }
    }
}
