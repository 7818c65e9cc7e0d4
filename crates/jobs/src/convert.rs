//! `convert`: copy the guest view of one or more sources (each with its chain, or an
//! internal snapshot) into a target image, as `qemu-img convert` does.
//!
//! The job is planned first: the sources' allocation status is walked once through
//! every layer and the address space is cut into target-cluster-aligned windows,
//! each listing the runs to copy, to zero, or to leave to the target's backing file.
//! Holes and zero clusters of the sources are never read.
//!
//! Windows are then applied by producer threads (one per core by default) and one
//! writer. Producers take the data of a run straight from a read-only map of the
//! layer's file that holds it (no copy through a buffer; compressed clusters and
//! devices without a file are read through the driver), leave out all-zero blocks
//! (`-S`) and compress whole clusters (`-c`). The writer applies their output in
//! window order (qemu-img's default; `-W` writes as output arrives): a single
//! writer keeps the target's allocation sequential and its file lock uncontended
//! (the kernel serialises buffered writes to one file anyway), while reading,
//! scanning and compressing run on every core.

mod mapped;

use crate::status::{ChainStatus, Walk};
use crate::{Cancel, Error, Progress, Result};
use mapped::{map_layer, Mapping};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use strata_format::qcow2::{CompressionType, Qcow2Image};
use strata_format::raw::RawImage;
use strata_format::BlockDevice;
use strata_storage::sync;

/// Bytes per window of work (a multiple of every cluster size).
const WINDOW: u64 = 2 << 20;
/// The largest `-S` qemu-img accepts.
pub const MAX_SPARSE: u64 = 16 << 20;
/// Zeroes to write from when a zero range must be allocated (`-S 0`).
static ZEROES: [u8; WINDOW as usize] = [0; WINDOW as usize];

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
    /// Write output as it is produced instead of in guest order (`-W`).
    pub out_of_order: bool,
    /// Copy from read-only maps of the source files. A mapped file must not shrink
    /// during the copy (that raises SIGBUS), so only sources opened with locks that
    /// keep writers out should be mapped (not `-U`).
    pub map_sources: bool,
    /// Copy data runs as they are, zeroes included (`-C`, where qemu-img copies
    /// what a source stores as data without reading it); runs that read as
    /// zeroes are still left out as `sparse_size` says.
    pub whole_data: bool,
    /// The target takes only whole clusters of this size (a stream-optimized
    /// vmdk, which compresses each grain it is given): each cluster holding
    /// data is written whole in one request, zeroes around the data included,
    /// as for `compress`, but through the target's own write; clusters of
    /// zeroes are left out where the target reads as zeroes.
    pub whole_clusters: Option<u64>,
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
            out_of_order: false,
            map_sources: true,
            whole_data: false,
            whole_clusters: None,
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
    /// For data stored uncompressed in one layer's file: the layer (0 is the top)
    /// and the host offset of the run's first byte there.
    host: Option<(usize, u64)>,
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
                    // What a top layer without a backing file does not store reads
                    // as zeroes: such runs are zeroed in the target, whose own
                    // backing file would otherwise show through (qemu-img does the
                    // same). `sources` must hold whole chains for this.
                    let below_top = st.depth > 0 || !st.allocated;
                    if below_top && src.depth() == 1 {
                        Kind::Zero
                    } else if below_top {
                        Kind::Backing
                    } else if st.zero {
                        Kind::Zero
                    } else {
                        Kind::Data
                    }
                } else if st.zero && !(opts.compress && opts.sparse_size == 0) {
                    Kind::Zero
                } else {
                    // -c -S 0: zeroes too are written, compressed (a fully
                    // allocated output, as qemu-img makes it).
                    Kind::Data
                };
                let host0 = match (kind, st.compressed, st.host_offset) {
                    (Kind::Data, false, Some(h)) => Some((st.depth, h)),
                    _ => None,
                };
                let mut pos = off;
                let end = off + st.len;
                while pos < end {
                    let t = base + pos;
                    let wend = (t / window + 1) * window;
                    let n = (end - pos).min(wend - t);
                    let host = host0.map(|(d, h)| (d, h + (pos - off)));
                    let w = cur.get_or_insert_with(|| Window {
                        source: si,
                        base,
                        runs: Vec::new(),
                    });
                    match w.runs.last_mut() {
                        Some(r)
                            if r.kind == kind
                                && r.start + r.len == t
                                && r.host.map(|(d, h)| (d, h + r.len)) == host =>
                        {
                            r.len += n
                        }
                        _ => w.runs.push(Run {
                            start: t,
                            len: n,
                            kind,
                            host,
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
        if opts.compress || opts.whole_clusters.is_some() {
            let cluster = opts.whole_clusters.unwrap_or(cluster);
            for w in &mut windows {
                w.runs = whole_clusters(std::mem::take(&mut w.runs), cluster);
            }
            data_bytes = windows
                .iter()
                .flat_map(|w| &w.runs)
                .filter(|r| r.kind == Kind::Data)
                .map(|r| r.len)
                .sum();
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

/// Runs for a compressed target, which takes clusters whole: the zero parts of a
/// cluster that also holds data become data (read, as zeroes, with the rest), and
/// the data of each cluster comes in one run, so it can be compressed. Ranges left
/// to the backing file stay as they are (their cluster is written plain).
fn whole_clusters(runs: Vec<Run>, cluster: u64) -> Vec<Run> {
    let data_clusters: std::collections::HashSet<u64> = runs
        .iter()
        .filter(|r| r.kind == Kind::Data)
        .flat_map(|r| [r.start / cluster, (r.start + r.len - 1) / cluster])
        .collect();
    let mut out: Vec<Run> = Vec::with_capacity(runs.len());
    let mut push = |r: Run| match out.last_mut() {
        Some(last) if last.kind == r.kind && last.start + last.len == r.start => {
            // Merged data is read through the driver unless it stays contiguous
            // in one layer's file.
            if last.host.map(|(d, h)| (d, h + last.len)) != r.host {
                last.host = None;
            }
            last.len += r.len;
        }
        _ => out.push(r),
    };
    for r in runs {
        if r.kind != Kind::Zero {
            push(r);
            continue;
        }
        let end = r.start + r.len;
        let head_end = r.start.next_multiple_of(cluster).min(end);
        let tail_start = (end / cluster * cluster).max(head_end);
        let part = |start: u64, end: u64, kind: Kind| Run {
            start,
            len: end - start,
            kind,
            host: None,
        };
        for (a, b) in [
            (r.start, head_end),
            (head_end, tail_start),
            (tail_start, end),
        ] {
            if a < b {
                let shared = a % cluster != 0 || b % cluster != 0;
                let kind = if shared && data_clusters.contains(&(a / cluster)) {
                    Kind::Data
                } else {
                    Kind::Zero
                };
                push(part(a, b, kind));
            }
        }
    }
    out
}

/// Bytes a producer hands to the writer.
enum Bytes<'m> {
    /// Borrowed from a source map (or the static zeroes).
    Mapped(&'m [u8]),
    /// Read into a buffer, which goes back to the pool once written.
    Owned(Arc<Vec<u8>>),
}

impl Bytes<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(s) => s,
            Bytes::Owned(v) => v,
        }
    }

    fn share(&self) -> Self {
        match self {
            Bytes::Mapped(s) => Bytes::Mapped(s),
            Bytes::Owned(v) => Bytes::Owned(v.clone()),
        }
    }
}

/// A write the producers hand to the writer.
enum Out<'m> {
    /// Bytes `data[range]` at target offset `at`.
    Data {
        at: u64,
        data: Bytes<'m>,
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
    /// The window is done; its length (for progress).
    Done(u64),
}

/// Output of window `window`.
struct Msg<'m> {
    window: usize,
    out: Out<'m>,
}

/// How far the writer has got, so producers do not run too far ahead of it when
/// output is written in order (bounds the output held back).
#[derive(Default)]
struct Gate {
    written: Mutex<usize>,
    cv: Condvar,
}

/// Copy what `plan` lists from `sources` into `target` and, if `opts.flush`, flush
/// it. The target must be at least `plan.total()` bytes and, unless
/// `opts.target_is_zero` is false, read as zeroes.
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
    // Compressed clusters are written through qcow2's own cluster writer (the
    // codec and the compressed-cluster layout are that format's): no capability.
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
    // qemu-img opens the target with unmapping on unless -S 0: its zeroes then
    // free what a target (-n) had allocated, and the freed clusters of a qcow2
    // target are punched in its file.
    if let (true, Some(q)) = (opts.sparse_size != 0, qcow2) {
        q.set_punch_unmapped(true);
    }
    progress.set_total(plan.total);
    // Maps of every layer's file, by source then depth.
    let maps: Vec<Vec<Option<Mapping>>> = sources
        .iter()
        .map(|s| {
            (0..s.depth())
                .map(|d| opts.map_sources.then(|| map_layer(s.layer(d))).flatten())
                .collect()
        })
        .collect();
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let gate = Gate::default();
    let fail = |e: Error| {
        sync::lock(&failure).get_or_insert(e);
        gate.cv.notify_all();
    };
    let failed = || sync::lock(&failure).is_some();
    let producers = opts.workers.clamp(1, 16).min(plan.windows.len().max(1));
    let lookahead = producers * 4;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(producers * 8);
    let cluster = qcow2.map(|q| q.geometry().cluster_size());
    // Buffers go back to the producers once written: no page faults and no zeroing
    // of fresh memory per window.
    let pool: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    let mut writer = Writer {
        target,
        qcow2,
        // Only in a raw file are guest offsets host offsets, so that a range can be
        // preallocated in the file directly: the format itself is the question.
        raw: target.as_any().downcast_ref::<RawImage>(),
        unmap: opts.sparse_size != 0,
        progress,
        pool: &pool,
        stats: ConvertStats::default(),
    };
    std::thread::scope(|scope| {
        for _ in 0..producers {
            let tx = tx.clone();
            let (next, fail, failed, pool, gate, maps) =
                (&next, &fail, &failed, &pool, &gate, &maps);
            scope.spawn(move || {
                let mut p = Producer {
                    opts,
                    cluster,
                    qcow2,
                    size: target.virtual_size(),
                    tx,
                    pool,
                    window: 0,
                };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(w) = plan.windows.get(i) else { break };
                    if !opts.out_of_order {
                        let mut g = sync::lock(&gate.written);
                        while i >= *g + lookahead && !failed() {
                            g = sync::wait_timeout(&gate.cv, g, Duration::from_millis(50));
                        }
                    }
                    if failed() {
                        break;
                    }
                    p.window = i;
                    let r = cancel
                        .check()
                        .and_then(|()| p.produce(&sources[w.source], &maps[w.source], w));
                    if let Err(e) = r {
                        fail(e);
                        break;
                    }
                }
            });
        }
        drop(tx);
        // The writer: this thread. In order, output of later windows waits in
        // `pending` until every earlier window is written.
        let mut cur = 0usize;
        let mut pending: BTreeMap<usize, Vec<Out>> = BTreeMap::new();
        for Msg { window, out } in rx {
            if failed() {
                continue; // drain so producers can finish
            }
            if !opts.out_of_order && window != cur {
                pending.entry(window).or_default().push(out);
                continue;
            }
            let done = matches!(out, Out::Done(_));
            let mut r = writer.apply(out);
            if done && !opts.out_of_order {
                // Catch up with windows that finished while this one was written.
                cur += 1;
                while r.is_ok() {
                    let Some(outs) = pending.remove(&cur) else {
                        break;
                    };
                    let finished = matches!(outs.last(), Some(Out::Done(_)));
                    for o in outs {
                        r = r.and_then(|()| writer.apply(o));
                    }
                    if !finished {
                        break;
                    }
                    cur += 1;
                }
                *sync::lock(&gate.written) = cur;
                gate.cv.notify_all();
            }
            if let Err(e) = r {
                fail(e);
            }
        }
    });
    if let Some(e) = sync::into_inner(failure) {
        return Err(e);
    }
    if let (true, Some(q)) = (opts.compress, qcow2) {
        q.align_file_end_to_sector()?;
    }
    if opts.flush {
        target.flush()?;
    }
    Ok(writer.stats)
}

/// Applies output to the target.
struct Writer<'a> {
    target: &'a Arc<dyn BlockDevice>,
    qcow2: Option<&'a Qcow2Image>,
    raw: Option<&'a RawImage>,
    /// Whether zeroes may free what the target allocated (qemu-img opens the
    /// target with unmapping on unless -S 0).
    unmap: bool,
    progress: &'a dyn Progress,
    pool: &'a Mutex<Vec<Vec<u8>>>,
    stats: ConvertStats,
}

impl Writer<'_> {
    fn apply(&mut self, out: Out) -> Result<()> {
        match out {
            Out::Data { at, data, range } => {
                self.stats.data_bytes += range.len() as u64;
                if let Some(raw) = self.raw {
                    // Allocating the blocks first spares the file system its
                    // per-page delayed-allocation work in the write (holes stay).
                    raw.storage().preallocate(at, range.len() as u64)?;
                }
                let r = self.write(at, &data.as_slice()[range]);
                if let Bytes::Owned(v) = data {
                    if let Ok(v) = Arc::try_unwrap(v) {
                        sync::lock(self.pool).push(v);
                    }
                }
                r?;
            }
            Out::Zero { at, len } => {
                self.stats.zeroed_bytes += len;
                self.target.write_zeroes(at, len, self.unmap)?;
            }
            Out::Compressed {
                cluster,
                bytes,
                len,
            } => {
                self.stats.compressed_clusters += 1;
                self.stats.data_bytes += len;
                let q = self.qcow2.expect("compression needs qcow2");
                q.write_compressed_cluster(cluster, &bytes).map_err(|e| {
                    // A refused compressed write (an image with an external data
                    // file) is worded as qemu-img words a failed write.
                    if e.kind() == strata_format::ErrorKind::Unsupported {
                        let at = cluster.saturating_mul(q.geometry().cluster_size());
                        Error::Invalid(format!("error while writing at byte {at}: {}", e.message()))
                    } else {
                        e.into()
                    }
                })?;
            }
            Out::Done(n) => self.progress.advance(n),
        }
        Ok(())
    }
}

impl Writer<'_> {
    /// Write `buf` at `at`. For qcow2, a partial first or last cluster goes in its
    /// own request, so only that cluster is merged with the target's current
    /// content and the whole clusters are written straight from `buf`.
    fn write(&self, at: u64, buf: &[u8]) -> strata_format::Result<()> {
        let Some(cs) = self.qcow2.map(|q| q.geometry().cluster_size()) else {
            return self.target.write(buf, at);
        };
        let end = at + buf.len() as u64;
        let body_start = at.next_multiple_of(cs).min(end);
        let body_end = (end / cs * cs).max(body_start);
        for (a, b) in [(at, body_start), (body_start, body_end), (body_end, end)] {
            if a < b {
                self.target
                    .write(&buf[(a - at) as usize..(b - at) as usize], a)?;
            }
        }
        Ok(())
    }
}

/// Reads windows and turns them into writes for the writer.
struct Producer<'a, 'm> {
    opts: &'a ConvertOptions,
    cluster: Option<u64>,
    qcow2: Option<&'a Qcow2Image>,
    size: u64,
    tx: std::sync::mpsc::SyncSender<Msg<'m>>,
    pool: &'a Mutex<Vec<Vec<u8>>>,
    /// The window being produced.
    window: usize,
}

impl<'m> Producer<'_, 'm> {
    fn send(&self, out: Out<'m>) -> Result<()> {
        self.tx
            .send(Msg {
                window: self.window,
                out,
            })
            .map_err(|_| Error::Invalid("the writer stopped".into()))
    }

    /// Whether zero ranges must be written (the target does not read as zeroes).
    fn write_zeroes(&self) -> bool {
        !self.opts.target_is_zero || self.opts.target_has_backing
    }

    fn produce(
        &mut self,
        src: &ChainStatus,
        maps: &'m [Option<Mapping>],
        w: &Window,
    ) -> Result<()> {
        let mut done = 0;
        for r in &w.runs {
            match r.kind {
                Kind::Backing => {}
                Kind::Zero if self.opts.sparse_size == 0 && !self.opts.compress => {
                    // -S 0 allocates everything: zeroes are written as data.
                    let mut at = r.start;
                    let end = r.start + r.len;
                    while at < end {
                        let n = (end - at).min(WINDOW) as usize;
                        self.send(Out::Data {
                            at,
                            data: Bytes::Mapped(&ZEROES[..n]),
                            range: 0..n,
                        })?;
                        at += n as u64;
                    }
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
                    let len = usize::try_from(r.len).expect("a run fits in a window");
                    let mapped = r.host.and_then(|(d, h)| maps.get(d)?.as_ref()?.get(h, len));
                    let data = match mapped {
                        Some(s) => Bytes::Mapped(s),
                        None => {
                            let mut buf = sync::lock(self.pool).pop().unwrap_or_default();
                            buf.resize(len, 0);
                            src.layer(0).read(&mut buf, r.start - w.base)?;
                            Bytes::Owned(Arc::new(buf))
                        }
                    };
                    if self.opts.compress {
                        self.compressed(data, r.start)?;
                    } else if let Some(cs) = self.opts.whole_clusters {
                        self.whole(data, r.start, cs)?;
                    } else {
                        self.sparse(data, r.start)?;
                    }
                }
            }
            done += r.len;
        }
        self.send(Out::Done(done))
    }

    /// Hand over `data` (at target offset `off`, one read request of a data run)
    /// leaving out the zero ranges [`sparse_split`] finds in it.
    fn sparse(&self, data: Bytes<'m>, off: u64) -> Result<()> {
        let len = data.as_slice().len();
        if self.opts.sparse_size == 0 || self.opts.whole_data {
            return self.send(Out::Data {
                at: off,
                data,
                range: 0..len,
            });
        }
        for (range, zero) in sparse_split(data.as_slice(), off, self.opts.sparse_size) {
            self.emit(&data, off, range, zero)?;
        }
        Ok(())
    }

    /// Hand over `data` (at target offset `off`, cluster-aligned) one whole
    /// cluster of `cs` bytes per request (the last one may end the disk),
    /// leaving out clusters of zeroes where the target reads as zeroes.
    fn whole(&self, data: Bytes<'m>, off: u64, cs: u64) -> Result<()> {
        let buf = data.as_slice();
        let mut i = 0usize;
        while i < buf.len() {
            let at = off + i as u64;
            let room = usize::try_from((at / cs + 1) * cs - at).unwrap_or(usize::MAX);
            let n = room.min(buf.len() - i);
            let zero = buf[i..i + n].iter().all(|&b| b == 0);
            if !zero || self.write_zeroes() {
                self.send(Out::Data {
                    at,
                    data: data.share(),
                    range: i..i + n,
                })?;
            }
            i += n;
        }
        Ok(())
    }

    fn emit(
        &self,
        data: &Bytes<'m>,
        off: u64,
        range: std::ops::Range<usize>,
        zero: bool,
    ) -> Result<()> {
        let at = off + range.start as u64;
        if !zero {
            self.send(Out::Data {
                at,
                data: data.share(),
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
    fn compressed(&self, data: Bytes<'m>, off: u64) -> Result<()> {
        let q = self.qcow2.expect("checked by convert()");
        let cs = self.cluster.expect("qcow2 has clusters");
        let buf = data.as_slice();
        let mut i = 0usize;
        while i < buf.len() {
            let abs = off + i as u64;
            let cend = ((abs / cs + 1) * cs).min(self.size);
            let end = ((cend - off) as usize).min(buf.len());
            let chunk = &buf[i..end];
            let whole = abs.is_multiple_of(cs) && abs + chunk.len() as u64 == cend;
            // -S 0 allocates everything: zero clusters are compressed too.
            if self.opts.sparse_size != 0 && is_zero(chunk) {
                if self.write_zeroes() {
                    self.send(Out::Zero {
                        at: abs,
                        len: chunk.len() as u64,
                    })?;
                }
            } else if let Some(z) = whole
                .then(|| self.may_shrink(chunk).then(|| q.compress_cluster(chunk)))
                .flatten()
                .flatten()
            {
                self.send(Out::Compressed {
                    cluster: abs / cs,
                    bytes: z,
                    len: chunk.len() as u64,
                })?;
            } else {
                self.send(Out::Data {
                    at: abs,
                    data: data.share(),
                    range: i..end,
                })?;
            }
            i = end;
        }
        Ok(())
    }
}

impl Producer<'_, '_> {
    /// Whether a zlib target may compress `cluster` below its size. Deflate spends
    /// most of its time on data it cannot shrink (random or already compressed),
    /// where it ends up storing the cluster plain anyway. Such data has a flat byte
    /// histogram: with an order-0 entropy near 8 bits per byte every Huffman code
    /// is 8 bits long, so the cluster is written plain without trying. zstd gives
    /// up on such data quickly itself.
    fn may_shrink(&self, cluster: &[u8]) -> bool {
        match self.qcow2 {
            Some(q) if q.compression_type() == CompressionType::Zlib => {
                entropy_bits(cluster) < INCOMPRESSIBLE_ENTROPY
            }
            _ => true,
        }
    }
}

/// Order-0 entropy (bits per byte) above which deflate is not tried. Random data
/// measures 7.997 over 64 KiB; data Huffman coding can shrink is well below.
const INCOMPRESSIBLE_ENTROPY: f64 = 7.97;

/// The order-0 (byte histogram) entropy of `data` in bits per byte.
fn entropy_bits(data: &[u8]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    // Four histograms, so consecutive equal bytes do not wait on each other.
    let mut h = [[0u32; 256]; 4];
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        h[0][c[0] as usize] += 1;
        h[1][c[1] as usize] += 1;
        h[2][c[2] as usize] += 1;
        h[3][c[3] as usize] += 1;
    }
    for &b in chunks.remainder() {
        h[0][b as usize] += 1;
    }
    let n = data.len() as f64;
    let sum: f64 = (0..256)
        .map(|i| f64::from(h[0][i] + h[1][i] + h[2][i] + h[3][i]))
        .filter(|&c| c > 0.0)
        .map(|c| c * c.log2())
        .sum();
    n.log2() - sum / n
}

/// The ranges of `buf` (one read request of a data run, at target offset `off`)
/// to write as data and to leave out as zeroes (`true`) with a sparse size of
/// `min_sparse` bytes (not 0), judged as qemu-img judges a request, in 512-byte
/// sectors: a request starting with zero sectors leaves them out up to the last
/// boundary of the alignment (the sparse size rounded down to a power of two)
/// before its data, unless that leaves nothing; a request starting with data
/// writes every zero run shorter than the sparse size, or than the request
/// where that is shorter (qemu-img shrinks the minimum to the request), with
/// the data around it, the data's end rounded up to the alignment. The ranges
/// are in order and cover `buf`; the last sector may be partial.
pub fn sparse_split(buf: &[u8], off: u64, min_sparse: u64) -> Vec<(std::ops::Range<usize>, bool)> {
    const SECTOR: usize = 512;
    let sectors = buf.len().div_ceil(SECTOR);
    let zero_at = |i: usize| is_zero(&buf[i * SECTOR..((i + 1) * SECTOR).min(buf.len())]);
    let min_sectors = usize::try_from(min_sparse / SECTOR as u64)
        .unwrap_or(usize::MAX)
        .max(1);
    // A power of two: the largest not above the sparse size, in sectors.
    let align = 1u64 << (usize::BITS - 1 - min_sectors.leading_zeros());
    let first_sector = off / SECTOR as u64;
    // One same-status run from sector `at` of `n`: (data, sectors).
    let run = |at: usize, n: usize| -> (bool, usize) {
        let zero = zero_at(at);
        let mut i = 1;
        while i < n && zero_at(at + i) == zero {
            i += 1;
        }
        if i == n {
            return (!zero, i);
        }
        let tail = ((first_sector + (at + i) as u64) & (align - 1)) as usize;
        if tail == 0 {
            return (!zero, i);
        }
        if !zero || i <= tail {
            (true, (i + (align as usize - tail)).min(n))
        } else {
            (false, i - tail)
        }
    };
    let mut out: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
    let mut at = 0;
    while at < sectors {
        let n = sectors - at;
        let min = min_sectors.min(n);
        let (data, first) = run(at, n);
        let used = if data {
            let (mut checked, mut used) = (first, first);
            while checked < n {
                let (d, k) = run(at + checked, n - checked);
                checked += k;
                if d {
                    used = checked;
                } else if k >= min {
                    break;
                }
            }
            used
        } else {
            first
        };
        let range = at * SECTOR..((at + used) * SECTOR).min(buf.len());
        match out.last_mut() {
            Some((r, z)) if *z != data => r.end = range.end,
            _ => out.push((range, !data)),
        }
        at += used;
    }
    out
}

/// Whether every byte is zero. Data rarely starts with zeroes, so the first word
/// decides most blocks at once; the rest is OR-folded in blocks of 256 bytes
/// (which vectorises) and stops at the first block that is not zero.
pub fn is_zero(b: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64; align_to only splits the slice.
    let (head, words, tail) = unsafe { b.align_to::<u64>() };
    if !head.iter().all(|&x| x == 0) || !tail.iter().all(|&x| x == 0) {
        return false;
    }
    if words.first().is_some_and(|&w| w != 0) {
        return false;
    }
    words
        .chunks(32)
        .all(|c| c.iter().fold(0u64, |acc, &x| acc | x) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_size_past_the_request_keeps_a_request_starting_with_zeroes_whole() {
        // -S 4M over a 2 MiB request at 4 MiB: the zeroes before the data end
        // off the 4 MiB grid, so the whole request is data.
        let mut buf = vec![0u8; 2 << 20];
        buf[1 << 20] = 1;
        assert_eq!(
            sparse_split(&buf, 4 << 20, 4 << 20),
            vec![(0..2 << 20, false)]
        );
        // A request of zeroes alone is left out whatever its alignment.
        let zeroes = vec![0u8; 2 << 20];
        assert_eq!(
            sparse_split(&zeroes, 6 << 20, 4 << 20),
            vec![(0..2 << 20, true)]
        );
    }

    #[test]
    fn zeroes_around_data_are_left_out_on_the_alignment_grid() {
        // -S 8k: 12 KiB of zeroes, 1 KiB of data, zeroes to 64 KiB.
        let mut buf = vec![0u8; 64 << 10];
        buf[12 << 10..13 << 10].fill(7);
        assert_eq!(
            sparse_split(&buf, 0, 8 << 10),
            vec![
                (0..8 << 10, true),
                (8 << 10..16 << 10, false),
                (16 << 10..64 << 10, true)
            ]
        );
    }

    #[test]
    fn random_data_is_judged_incompressible_and_text_or_sparse_data_is_not() {
        // A simple generator: xorshift bytes are as flat as random ones.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(entropy_bits(&random) >= INCOMPRESSIBLE_ENTROPY);
        let text: Vec<u8> = b"guest data block\n"
            .iter()
            .copied()
            .cycle()
            .take(65536)
            .collect();
        assert!(entropy_bits(&text) < 4.0);
        // Random data with a tenth of zeroes still compresses: it is tried.
        let mut sparse = random.clone();
        sparse[..6554].fill(0);
        assert!(entropy_bits(&sparse) < INCOMPRESSIBLE_ENTROPY);
        assert_eq!(entropy_bits(&[7u8; 100]), 0.0);
        assert_eq!(entropy_bits(&[]), 0.0);
    }

    #[test]
    fn zero_detection_sees_every_byte() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        for i in [0, 7, 8, 4095, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            v[i] = 0;
        }
        // Unaligned starts and ends go through the head and tail paths.
        for s in 0..9 {
            let mut v = [0u8; 100];
            assert!(is_zero(&v[s..]));
            v[99] = 1;
            assert!(!is_zero(&v[s..]), "start {s}");
            v[99] = 0;
            v[s] = 1;
            assert!(!is_zero(&v[s..]), "start {s} first byte");
        }
    }
}
