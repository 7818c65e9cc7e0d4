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
    /// Worker threads (`-m`).
    pub workers: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            compress: false,
            sparse_size: 4096,
            target_is_zero: true,
            target_has_backing: false,
            workers: default_workers(),
        }
    }
}

/// Enough threads to keep both cores busy and reads overlapping writes.
pub fn default_workers() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cpus * 2).clamp(2, 16)
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

/// Copy what `plan` lists from `sources` into `target`, then flush it.
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
    let stats = Mutex::new(ConvertStats::default());
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let workers = opts.workers.clamp(1, 16).min(plan.windows.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut worker = Worker {
                    target,
                    qcow2,
                    opts,
                    buf: Vec::new(),
                    stats: ConvertStats::default(),
                };
                loop {
                    if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(w) = plan.windows.get(i) else { break };
                    let r = cancel
                        .check()
                        .and_then(|()| worker.apply(&sources[w.source], w));
                    match r {
                        Ok(n) => progress.advance(n),
                        Err(e) => {
                            let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                            f.get_or_insert(e);
                            break;
                        }
                    }
                }
                let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
                s.data_bytes += worker.stats.data_bytes;
                s.zeroed_bytes += worker.stats.zeroed_bytes;
                s.compressed_clusters += worker.stats.compressed_clusters;
            });
        }
    });
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    target.flush()?;
    Ok(stats.into_inner().unwrap_or_else(|p| p.into_inner()))
}

struct Worker<'a> {
    target: &'a Arc<dyn BlockDevice>,
    qcow2: Option<&'a Qcow2Image>,
    opts: &'a ConvertOptions,
    buf: Vec<u8>,
    stats: ConvertStats,
}

impl Worker<'_> {
    /// Apply one window; returns its length for progress.
    fn apply(&mut self, src: &ChainStatus, w: &Window) -> Result<u64> {
        let mut done = 0;
        for r in &w.runs {
            match r.kind {
                Kind::Backing => {}
                Kind::Zero if self.opts.sparse_size == 0 && !self.opts.compress => {
                    // -S 0 allocates everything: zeroes are written as data.
                    let n = r.len as usize;
                    if self.buf.len() < n {
                        self.buf.resize(n, 0);
                    }
                    self.buf[..n].fill(0);
                    self.target.write(&self.buf[..n], r.start)?;
                    self.stats.data_bytes += r.len;
                }
                Kind::Zero => {
                    if !self.opts.target_is_zero || self.opts.target_has_backing {
                        self.target.write_zeroes(r.start, r.len, true)?;
                        self.stats.zeroed_bytes += r.len;
                    }
                }
                Kind::Data => {
                    let n = r.len as usize;
                    if self.buf.len() < n {
                        self.buf.resize(n, 0);
                    }
                    let mut buf = std::mem::take(&mut self.buf);
                    src.layer(0).read(&mut buf[..n], r.start - w.base)?;
                    let res = if self.opts.compress {
                        self.write_compressed(&buf[..n], r.start)
                    } else {
                        self.write_sparse(&buf[..n], r.start)
                    };
                    self.buf = buf;
                    res?;
                }
            }
            done += r.len;
        }
        Ok(done)
    }

    /// Write `data` at `off`, leaving out aligned all-zero blocks of `-S` bytes.
    fn write_sparse(&mut self, data: &[u8], off: u64) -> Result<()> {
        let ss = self.opts.sparse_size as usize;
        if ss == 0 {
            self.target.write(data, off)?;
            self.stats.data_bytes += data.len() as u64;
            return Ok(());
        }
        // Runs of blocks, each block aligned to ss in target offsets.
        let mut i = 0usize;
        let mut pending: Option<(usize, bool)> = None; // (start, is_zero)
        while i < data.len() {
            let abs = off + i as u64;
            let next = ((abs / ss as u64 + 1) * ss as u64 - off) as usize;
            let end = next.min(data.len());
            let zero = end - i == ss && is_zero(&data[i..end]);
            match pending {
                Some((_, z)) if z == zero => {}
                Some((s, z)) => {
                    self.flush_run(data, off, s, i, z)?;
                    pending = Some((i, zero));
                }
                None => pending = Some((i, zero)),
            }
            i = end;
        }
        if let Some((s, z)) = pending {
            self.flush_run(data, off, s, data.len(), z)?;
        }
        Ok(())
    }

    fn flush_run(&mut self, data: &[u8], off: u64, s: usize, e: usize, zero: bool) -> Result<()> {
        let at = off + s as u64;
        let len = (e - s) as u64;
        if zero {
            if !self.opts.target_is_zero || self.opts.target_has_backing {
                self.target.write_zeroes(at, len, true)?;
                self.stats.zeroed_bytes += len;
            }
        } else {
            self.target.write(&data[s..e], at)?;
            self.stats.data_bytes += len;
        }
        Ok(())
    }

    /// Write whole clusters compressed (clusters that do not shrink go plain;
    /// all-zero clusters are left out when the target reads as zeroes).
    fn write_compressed(&mut self, data: &[u8], off: u64) -> Result<()> {
        let q = self.qcow2.expect("checked by convert()");
        let cs = q.geometry().cluster_size();
        let size = self.target.virtual_size();
        let mut i = 0usize;
        while i < data.len() {
            let abs = off + i as u64;
            let cend = ((abs / cs + 1) * cs).min(size);
            let end = ((cend - off) as usize).min(data.len());
            let chunk = &data[i..end];
            let whole = abs.is_multiple_of(cs) && (abs + chunk.len() as u64 == cend);
            if is_zero(chunk) {
                if !self.opts.target_is_zero || self.opts.target_has_backing {
                    self.target.write_zeroes(abs, chunk.len() as u64, true)?;
                    self.stats.zeroed_bytes += chunk.len() as u64;
                }
            } else if let (true, Some(z)) =
                (whole, whole.then(|| q.compress_cluster(chunk)).flatten())
            {
                q.write_compressed_cluster(abs / cs, &z)?;
                self.stats.compressed_clusters += 1;
                self.stats.data_bytes += chunk.len() as u64;
            } else {
                self.target.write(chunk, abs)?;
                self.stats.data_bytes += chunk.len() as u64;
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
