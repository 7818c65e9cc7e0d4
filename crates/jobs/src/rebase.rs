//! `rebase`: give an image a new backing file. Safe mode first copies into the
//! image every range where the old and the new backing content differ (only where
//! the image itself stores nothing), so the guest view does not change; unsafe
//! mode (`-u`) only rewrites the pointer. The pointer changes last, in one header
//! write, after the copied data is flushed.
//!
//! The plan compares allocation first: a range both chains leave unallocated (or
//! report as zeroes), or that both chains serve from the same image, cannot differ
//! and is not read. The rest is read through both chains and compared.

use crate::convert::is_zero;
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
/// chain) and as the new backing file serves it (`new`).
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
    image.read(old, r.offset)?;
    // New view: the new backing file, zeroes past its end or without one.
    new.fill(0);
    if let (false, Some(b)) = (r.new_zero, new_backing) {
        let new_size = b.virtual_size();
        if r.offset < new_size {
            let m = (new_size - r.offset).min(r.len) as usize;
            b.read(&mut new[..m], r.offset)?;
        }
    }
    Ok(())
}

/// Write into `image` the sectors of piece `r` where its old view (`old`) differs
/// from the new one (`new`).
fn write_differences(
    image: &dyn BlockDevice,
    r: &CompareRange,
    old: &[u8],
    new: &[u8],
    compress: bool,
) -> Result<u64> {
    let len = r.len as usize;
    if old == new {
        return Ok(0);
    }
    if compress {
        if let Some(q) = image.as_any().downcast_ref::<Qcow2Image>() {
            return write_compressed(q, r, old, new);
        }
    }
    // Copy only the sectors that differ, keeping the image sparse.
    let mut copied = 0;
    let mut i = 0;
    let differs = |j: usize| {
        let e = (j + 512).min(len);
        old[j..e] != new[j..e]
    };
    while i < len {
        if !differs(i) {
            i = (i + 512).min(len);
            continue;
        }
        let mut j = i;
        while j < len && differs(j) {
            j = (j + 512).min(len);
        }
        let at = r.offset + i as u64;
        if r.old_absent && is_zero(&old[i..j]) {
            image.write_zeroes(at, (j - i) as u64, false)?;
        } else {
            image.write(&old[i..j], at)?;
        }
        copied += (j - i) as u64;
        i = j;
    }
    Ok(copied)
}

/// Write, compressed, each whole cluster of piece `r` whose old view (`old`)
/// differs from the new one (`new`); a cluster of zeroes becomes a zero cluster,
/// one that does not shrink is written as it is, and a cluster the piece covers
/// only in part (subclusters the image stores) is copied sector by sector.
fn write_compressed(q: &Qcow2Image, r: &CompareRange, old: &[u8], new: &[u8]) -> Result<u64> {
    let cs = q.geometry().cluster_size();
    let size = q.virtual_size();
    let end = r.offset + r.len;
    let mut copied = 0;
    let mut c = r.offset / cs * cs;
    while c < end {
        let (from, to) = (c.max(r.offset), (c + cs).min(end));
        let (i, j) = ((from - r.offset) as usize, (to - r.offset) as usize);
        c += cs;
        if old[i..j] == new[i..j] {
            continue;
        }
        let whole = from == c - cs && (to == c || to == size);
        if !whole {
            q.write(&old[i..j], from)?;
        } else if is_zero(&old[i..j]) {
            q.write_zeroes(from, (j - i) as u64, false)?;
        } else if let Some(z) = q.compress_cluster(&old[i..j]) {
            q.write_compressed_cluster(from / cs, &z)?;
        } else {
            q.write(&old[i..j], from)?;
        }
        copied += (j - i) as u64;
    }
    Ok(copied)
}

/// Carry out a rebase plan with a few workers, then flush `image`. The caller then
/// rewrites the pointer.
pub fn apply(
    image: &Arc<dyn BlockDevice>,
    new_backing: Option<&Arc<dyn BlockDevice>>,
    plan: &RebasePlan,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<RebaseStats> {
    apply_with(image, new_backing, plan, false, progress, cancel)
}

/// [`apply`], writing the copied clusters compressed when `compress` is set.
fn apply_with(
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
            let res = res.and_then(|_| write_differences(image.as_ref(), r, &old, &new, compress));
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
    copy_differences_with(image, new_backing, false, progress, cancel)
}

/// [`copy_differences`], writing the copied clusters compressed when `compress`
/// is set (`rebase -c`).
pub fn copy_differences_with(
    image: &Arc<dyn BlockDevice>,
    new_backing: Option<&Arc<dyn BlockDevice>>,
    compress: bool,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<RebaseStats> {
    let p = plan(image, new_backing, cancel)?;
    apply_with(image, new_backing, &p, compress, progress, cancel)
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
