//! `rebase`: give an image a new backing file. Safe mode first copies into the
//! image every range where the old and the new backing content differ (only where
//! the image itself stores nothing), so the guest view does not change; unsafe
//! mode (`-u`) only rewrites the pointer. The pointer changes last, in one header
//! write, after the copied data is flushed.
//!
//! The plan compares allocation first: a range both chains leave unallocated (or
//! report as zeroes), or that both chains serve from the same image, cannot differ
//! and is not read. The rest is read through both chains and compared.

use crate::status::{ChainStatus, Walk};
use crate::{Cancel, Progress, Result};
use std::sync::Arc;
use strata_format::qcow2::Qcow2Image;
use strata_format::{BlockDevice, Status};
use strata_storage::sync;

/// Bytes compared per step (and the alignment of the pieces workers take).
const CHUNK: u64 = 1 << 20;

/// Worker threads comparing and copying.
const WORKERS: usize = 4;

/// What a safe rebase copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebaseStats {
    /// Bytes compared (ranges the image does not store itself).
    pub compared: u64,
    /// Bytes copied into the image because old and new backing content differ.
    pub copied: u64,
}

/// A range the image does not store whose old and new backing content may differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompareRange {
    pub offset: u64,
    pub len: u64,
    /// The new backing content is known to be zeroes here (no new backing file,
    /// past its end, or a zero range): it need not be read.
    pub new_zero: bool,
    /// The image has no old backing file here (none at all, or past its end):
    /// zeroes of the old view are written as zero clusters. Where an old backing
    /// file serves the range, what it reads is copied as data, zeroes too, as
    /// qemu-img copies them.
    pub old_absent: bool,
}

/// The ranges a safe rebase must compare, and how much it could skip.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebasePlan {
    pub ranges: Vec<CompareRange>,
    /// Bytes the image does not store but that cannot differ (not read).
    pub skipped: u64,
}

impl RebasePlan {
    pub fn compare_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }
}

/// Where a backing chain's content comes from at a range.
#[derive(Clone)]
enum Source {
    /// Known zeroes.
    Zero,
    /// Data served by this image.
    Layer(Arc<dyn BlockDevice>),
}

fn same(a: &Source, b: &Source) -> bool {
    match (a, b) {
        (Source::Zero, Source::Zero) => true,
        (Source::Layer(x), Source::Layer(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}

/// The devices of a chain, top first, following `backing()`.
fn chain_of(top: Option<Arc<dyn BlockDevice>>) -> Vec<Arc<dyn BlockDevice>> {
    let mut out = Vec::new();
    let mut cur = top;
    while let Some(d) = cur {
        cur = d.backing();
        out.push(d);
    }
    out
}

/// Status of one backing chain from `offset`: its source and how far it holds.
fn source_at(
    status: Option<&ChainStatus>,
    devs: &[Arc<dyn BlockDevice>],
    offset: u64,
    len: u64,
) -> Result<(Source, u64)> {
    let Some(st) = status else {
        return Ok((Source::Zero, len));
    };
    if offset >= st.virtual_size() {
        return Ok((Source::Zero, len));
    }
    let s = st.status(offset, len.min(st.virtual_size() - offset), Walk::Allocated)?;
    let src = if !s.allocated || (s.zero && !s.data) || s.depth >= devs.len() {
        Source::Zero
    } else {
        Source::Layer(devs[s.depth].clone())
    };
    Ok((src, s.len))
}

/// Plan a safe rebase of `image` (attached to its old backing chain) onto
/// `new_backing` (`None`: no backing file). Reads allocation status only.
pub fn plan(
    image: &Arc<dyn BlockDevice>,
    new_backing: Option<&Arc<dyn BlockDevice>>,
    cancel: &Cancel,
) -> Result<RebasePlan> {
    let size = image.virtual_size();
    let old_devs = chain_of(image.backing());
    let new_devs = chain_of(new_backing.cloned());
    let old_st = if old_devs.is_empty() {
        None
    } else {
        Some(ChainStatus::from_devices(old_devs.clone())?)
    };
    let new_st = if new_devs.is_empty() {
        None
    } else {
        Some(ChainStatus::from_devices(new_devs.clone())?)
    };
    let old_size = old_devs.first().map_or(0, |d| d.virtual_size());
    let mut plan = RebasePlan::default();
    let mut off = 0;
    while off < size {
        cancel.check()?;
        let ext = image.block_status(off, size - off)?;
        if ext.status != Status::Unallocated {
            off += ext.len;
            continue;
        }
        let end = off + ext.len;
        while off < end {
            let (old, n1) = source_at(old_st.as_ref(), &old_devs, off, end - off)?;
            let (new, n2) = source_at(new_st.as_ref(), &new_devs, off, end - off)?;
            let n = n1.min(n2).max(1).min(end - off);
            if same(&old, &new) {
                plan.skipped += n;
            } else {
                let new_zero = matches!(new, Source::Zero);
                let old_absent = off >= old_size;
                match plan.ranges.last_mut() {
                    Some(l)
                        if l.offset + l.len == off
                            && l.new_zero == new_zero
                            && l.old_absent == old_absent =>
                    {
                        l.len += n
                    }
                    _ => plan.ranges.push(CompareRange {
                        offset: off,
                        len: n,
                        new_zero,
                        old_absent,
                    }),
                }
            }
            off += n;
        }
    }
    Ok(plan)
}

/// Read piece `r` as the image reads it now (`old`, through its current backing
/// chain) and as the new backing file serves it (`new`). A failed read is a
/// [`crate::Error::RebaseRead`] naming the side that failed (the image does
/// not store the piece, so its old view is its old backing file's).
fn read_views(
    image: &dyn BlockDevice,
    new_backing: Option<&Arc<dyn BlockDevice>>,
    r: &CompareRange,
    old: &mut Vec<u8>,
    new: &mut Vec<u8>,
) -> Result<()> {
    let len = r.len as usize;
    old.resize(len, 0);
    new.resize(len, 0);
    let failed = |from| {
        move |e: strata_format::Error| crate::Error::RebaseRead {
            from,
            source: Box::new(e.into()),
        }
    };
    image
        .read(old, r.offset)
        .map_err(failed("old backing file"))?;
    // New view: the new backing file, zeroes past its end or without one.
    new.fill(0);
    if let (false, Some(b)) = (r.new_zero, new_backing) {
        let new_size = b.virtual_size();
        if r.offset < new_size {
            let m = (new_size - r.offset).min(r.len) as usize;
            b.read(&mut new[..m], r.offset)
                .map_err(failed("new backing file"))?;
        }
    }
    Ok(())
}

/// How qemu-img writes what a safe rebase copies: in whole units of `align`
/// bytes (the image's subcluster, or its cluster when compressing), zeroes
/// where the image has no old backing file (at or past `old_size`, its size),
/// data (compressed with `compress`) elsewhere.
#[derive(Debug, Clone, Copy)]
struct WriteRules {
    align: u64,
    old_size: u64,
    compress: bool,
}

impl WriteRules {
    fn of(image: &dyn BlockDevice, compress: bool) -> Self {
        let q = image.as_any().downcast_ref::<Qcow2Image>();
        let align = q.map_or(512, |q| {
            let g = q.geometry();
            if compress {
                g.cluster_size()
            } else {
                g.subcluster_size()
            }
        });
        let old_size = image.backing().map_or(0, |b| b.virtual_size());
        WriteRules {
            align: align.max(1),
            old_size,
            compress: compress && q.is_some(),
        }
    }
}

/// `[from, to)` widened to whole units of `rules.align` (not past the disk's
/// end), if the image stores nothing there: qemu-img writes such whole units
/// (any part of one that differs makes it write all of it). `None` where the
/// image stores some of it (the exact range is written then).
fn widened(
    image: &dyn BlockDevice,
    rules: &WriteRules,
    from: u64,
    to: u64,
) -> Result<Option<(u64, u64)>> {
    let size = image.virtual_size();
    let start = from / rules.align * rules.align;
    let end = to
        .checked_next_multiple_of(rules.align)
        .map_or(size, |e| e.min(size));
    if (start, end) == (from, to) {
        return Ok(Some((from, to)));
    }
    let ext = image.block_status(start, end - start)?;
    Ok((ext.status == Status::Unallocated && ext.len >= end - start).then_some((start, end)))
}

/// Write into `image` the units (see [`WriteRules`]) of piece `r` where its
/// old view (`old`) differs from the new one (`new`), runs of differing units
/// at once, as qemu-img compares and writes them.
fn write_differences(
    image: &dyn BlockDevice,
    r: &CompareRange,
    old: &[u8],
    new: &[u8],
    rules: &WriteRules,
) -> Result<u64> {
    if old == new {
        return Ok(0);
    }
    let end = r.offset + r.len;
    let differs = |from: u64, to: u64| {
        let (i, j) = ((from - r.offset) as usize, (to - r.offset) as usize);
        old[i..j] != new[i..j]
    };
    // Units of the piece, aligned to the disk: the first and the last may be
    // cut by the piece's ends.
    let unit_end = |at: u64| ((at / rules.align + 1) * rules.align).min(end);
    let mut copied = 0;
    let mut at = r.offset;
    while at < end {
        if !differs(at, unit_end(at)) {
            at = unit_end(at);
            continue;
        }
        // The plan holds only what the image stored none of: what it stores now
        // an earlier run wrote (a whole unit it shares with this piece), with
        // the old view this run would write.
        let ext = image.block_status(at, end - at)?;
        let free = at + ext.len.clamp(1, end - at);
        if ext.status != Status::Unallocated {
            at = free;
            continue;
        }
        let mut to = unit_end(at).min(free);
        while to < free && differs(to, unit_end(to)) {
            to = unit_end(to).min(free);
        }
        copied += write_run(image, r, old, rules, at, to)?;
        at = to;
    }
    Ok(copied)
}

/// Write the run `[from, to)` of piece `r` (its old view `old`) as
/// [`write_differences`] decided; the bytes it covers.
fn write_run(
    image: &dyn BlockDevice,
    r: &CompareRange,
    old: &[u8],
    rules: &WriteRules,
    from: u64,
    to: u64,
) -> Result<u64> {
    let slice = |a: u64, b: u64| &old[(a - r.offset) as usize..(b - r.offset) as usize];
    // Past the old backing file's end qemu-img writes zeroes (never
    // compressed): whole units where the image stores none of them.
    if r.old_absent && from >= rules.old_size {
        let (a, b) = match widened(image, rules, from, to)? {
            Some((a, b)) if a >= rules.old_size => (a, b),
            _ => (from, to),
        };
        image.write_zeroes(a, b - a, false)?;
        return Ok(to - from);
    }
    if rules.compress {
        if let Some(q) = image.as_any().downcast_ref::<Qcow2Image>() {
            return write_compressed(q, r, old, rules, from, to);
        }
    }
    image.write(slice(from, to), from)?;
    Ok(to - from)
}

/// Write, compressed, each cluster of the run `[from, to)` of piece `r` (its
/// old view `old`), as qemu-img's compressed writes do: every cluster the run
/// touches, zeroes too, is compressed whole (the last one of the disk padded
/// with zeroes), one that does not shrink is written as it is. A cluster the
/// piece covers only in part is read whole from the image (which stores none
/// of it: its old view); where the image stores some of it, the run's part is
/// written as it is.
fn write_compressed(
    q: &Qcow2Image,
    r: &CompareRange,
    old: &[u8],
    rules: &WriteRules,
    from: u64,
    to: u64,
) -> Result<u64> {
    let cs = q.geometry().cluster_size();
    let end = r.offset + r.len;
    let mut c = from / cs * cs;
    let mut whole = Vec::new();
    while c < to {
        let (a, b) = (c.max(from), (c + cs).min(to));
        let data: &[u8] = match widened(q, rules, a, b)? {
            Some((s, e)) if s >= r.offset && e <= end => {
                &old[(s - r.offset) as usize..(e - r.offset) as usize]
            }
            Some((s, e)) => {
                whole.resize((e - s) as usize, 0);
                q.read(&mut whole, s)?;
                &whole
            }
            None => {
                q.write(&old[(a - r.offset) as usize..(b - r.offset) as usize], a)?;
                c += cs;
                continue;
            }
        };
        match q.compress_cluster(data) {
            Some(z) => q.write_compressed_cluster(c / cs, &z)?,
            None => q.write(data, c)?,
        }
        c += cs;
    }
    Ok(to - from)
}

/// Carry out a rebase plan with a few workers, writing the copied clusters
/// compressed when `compress` is set (`rebase -c`), then flush `image`. The
/// caller then rewrites the pointer. The plan's ranges are done in their
/// order: `progress` has advanced past a range only once it and every range
/// before it are written.
pub fn apply(
    image: &Arc<dyn BlockDevice>,
    new_backing: Option<&Arc<dyn BlockDevice>>,
    plan: &RebasePlan,
    compress: bool,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<RebaseStats> {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    let mut pieces = Vec::new();
    for r in &plan.ranges {
        let end = r.offset + r.len;
        let mut off = r.offset;
        while off < end {
            let n = (off / CHUNK + 1) * CHUNK;
            let n = n.min(end) - off;
            pieces.push(CompareRange {
                offset: off,
                len: n,
                ..*r
            });
            off += n;
        }
    }
    progress.set_total(plan.compare_bytes());
    let rules = WriteRules::of(image.as_ref(), compress);
    let next = AtomicUsize::new(0);
    let copied = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: std::sync::Mutex<Option<crate::Error>> = std::sync::Mutex::new(None);
    // Pieces are read in parallel but written in their order, so clusters are
    // allocated at the offsets qemu-img's front-to-back copy gives them.
    let turn = std::sync::Mutex::new(0usize);
    let turned = std::sync::Condvar::new();
    let work = || {
        let (mut old, mut new) = (Vec::new(), Vec::new());
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(r) = pieces.get(i) else {
                return;
            };
            let res = cancel
                .check()
                .and_then(|_| read_views(image.as_ref(), new_backing, r, &mut old, &mut new));
            let mut t = sync::lock(&turn);
            while *t != i && !failed.load(Ordering::Relaxed) {
                t = turned.wait(t).unwrap_or_else(|p| p.into_inner());
            }
            if *t != i || failed.load(Ordering::Relaxed) {
                return; // another piece failed
            }
            let res = res.and_then(|_| write_differences(image.as_ref(), r, &old, &new, &rules));
            *t = i + 1;
            if res.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            drop(t);
            turned.notify_all();
            match res {
                Ok(n) => {
                    copied.fetch_add(n, Ordering::Relaxed);
                    progress.advance(r.len);
                }
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    let mut slot = sync::lock(&first_error);
                    slot.get_or_insert(e);
                    return;
                }
            }
        }
    };
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 1..WORKERS.min(pieces.len()) {
            scope.spawn(work);
        }
        if let (Some(path), false) = (image.path(), pieces.is_empty()) {
            let done = &done;
            scope.spawn(move || crate::layers::early_writeback(&path, done));
        }
        work();
        done.store(true, Ordering::Relaxed);
    });
    if let Some(e) = sync::into_inner(first_error) {
        return Err(e);
    }
    image.flush()?;
    Ok(RebaseStats {
        compared: plan.compare_bytes(),
        copied: copied.into_inner(),
    })
}

/// Copy into `image` (attached to its old backing chain) every range it does not
/// store whose content differs between the old chain and `new_backing` (`None`: no
/// backing file, zeroes). Flushes `image`; the caller then rewrites the pointer.
pub fn copy_differences(
    image: &Arc<dyn BlockDevice>,
    new_backing: Option<&Arc<dyn BlockDevice>>,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<RebaseStats> {
    let p = plan(image, new_backing, cancel)?;
    apply(image, new_backing, &p, false, progress, cancel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_format::qcow2::{create, CreateOptions};
    use strata_storage::MemStorage;

    fn image(backing: Option<&Arc<dyn BlockDevice>>, data: &[(u64, u64)]) -> Arc<dyn BlockDevice> {
        let d: Arc<dyn BlockDevice> = Arc::new(
            create(
                Arc::new(MemStorage::new()),
                &CreateOptions {
                    size: 1 << 20,
                    cluster_size: 4096,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        for &(off, len) in data {
            d.write(&vec![7u8; len as usize], off).unwrap();
        }
        d.set_backing(backing.cloned());
        d
    }

    fn r(offset: u64, len: u64, new_zero: bool, old_absent: bool) -> CompareRange {
        CompareRange {
            offset,
            len,
            new_zero,
            old_absent,
        }
    }

    #[test]
    fn plan_compares_only_what_the_two_chains_serve_differently() {
        let base = image(None, &[(0, 65536), (512 << 10, 8192)]);
        let mid = image(Some(&base), &[(32768, 65536)]);
        let top = image(Some(&mid), &[(0, 4096)]);
        let c = Cancel::default();
        // Onto base: only what mid serves differs (the top's own cluster is skipped).
        let p = plan(&top, Some(&base), &c).unwrap();
        assert_eq!(
            p.ranges,
            vec![r(32768, 32768, false, false), r(65536, 32768, true, false)]
        );
        assert_eq!(p.skipped, (1 << 20) - 4096 - 65536);
        // Flatten: everything the old chain stores, against known zeroes.
        let p = plan(&top, None, &c).unwrap();
        assert_eq!(
            p.ranges,
            vec![
                r(4096, 98304 - 4096, true, false),
                r(512 << 10, 8192, true, false)
            ]
        );
        // Onto the same chain: nothing to compare.
        let p = plan(&top, Some(&mid), &c).unwrap();
        assert_eq!(p.ranges, vec![]);
        assert_eq!(p.compare_bytes(), 0);
    }
}
