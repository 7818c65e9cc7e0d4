//! Incremental backups of a qcow2 image at rest through one of its persistent
//! dirty bitmaps (the ones QEMU, libvirt or `qemu-img bitmap` keep in the
//! file): only the chunks the bitmap marks are read, the parent snapshot's
//! other chunks are reused unread, and once the new snapshot is stored the
//! bitmap is cleared, so from then on it marks the changes since that snapshot.
//!
//! The image is held with a write lock (QEMU's lock protocol) from the moment
//! its bitmap is read until the bitmap is cleared: a running QEMU refuses it,
//! and while strata holds it no QEMU opens the image for writing, so nothing
//! changes the disk in between. The bitmap is cleared only after the snapshot
//! is durable: a crash in between leaves a bitmap that marks more than the
//! changes since the new snapshot, never less.
//!
//! A bitmap that cannot stand for the changes means a full read with the
//! reason given: the image has no such bitmap (or is raw), the bitmap is in use
//! (a QEMU that had it loaded stopped without storing it), disabled, or of
//! another size than the disk; or the parent is not a disk of the image's size
//! in the chunks asked for, or is older than the snapshot at which the bitmap
//! was last cleared (the changes in between would be missing). A consistent,
//! enabled bitmap is cleared after any such backup, full or not: the snapshot
//! holds the whole disk as it is at that point.

use crate::chunk::{fixed_chunk_size, ChunkPlan, ChunkSize};
use crate::disk::{self, BackupOptions, BackupSummary, DiskSource, Incremental};
use crate::error::{Error, ErrorKind, Result};
use crate::export::TAG_BITMAP;
use crate::id::Id;
use crate::ops::ImageBackup;
use crate::repository::Repository;
use crate::restore::disk_node;
use std::collections::BTreeSet;
use strata_chain::{Chain, OpenSpec};
use strata_format::qcow2::bitmap_edit::Bitmap;
use strata_format::qcow2::{BitmapInfo, Qcow2Image};
use strata_format::BlockDevice;
use strata_jobs::{Cancel, Progress};

/// Why bitmap `name` of an image cannot stand for the changes since the
/// parent, or its bits when it can.
fn judge(img: &Qcow2Image, name: &str) -> Result<std::result::Result<Bitmap, String>> {
    let infos = img.bitmaps()?;
    let Some(info) = infos.iter().find(|b| b.name == name) else {
        return Ok(Err(format!(
            "the image has no persistent bitmap '{name}' (qemu-img bitmap --add starts one)"
        )));
    };
    let flags = info.flag_names();
    if flags.contains(&"in-use") {
        return Ok(Err(format!(
            "bitmap '{name}' is in use (inconsistent): a QEMU that had it loaded stopped \
             without storing it; remove it and add a new one (qemu-img bitmap --remove, --add)"
        )));
    }
    if !flags.contains(&"auto") {
        return Ok(Err(format!(
            "bitmap '{name}' is disabled, so it does not record every change (qemu-img bitmap --enable)"
        )));
    }
    let (size, cs) = (img.virtual_size(), img.header().cluster_size());
    if !info.sized_for(size, cs) {
        return Ok(Err(format!(
            "bitmap '{name}' is of another size than the {size}-byte disk"
        )));
    }
    // Opened for writing, an image with a bitmap strata cannot keep valid would
    // have them all marked stale; and the set is rewritten to clear one.
    let unkept = |b: &&BitmapInfo| b.flag_names().contains(&"in-use") || !b.sized_for(size, cs);
    if let Some(other) = infos.iter().find(unkept) {
        return Ok(Err(format!(
            "bitmap '{}' of the image is in use or of another size than the disk, so strata \
             cannot rewrite the image's bitmaps to clear '{name}'",
            other.name
        )));
    }
    let bits = img.read_bitmaps()?.into_iter().find(|b| b.name == name);
    Ok(bits.ok_or_else(|| format!("the image has no persistent bitmap '{name}'")))
}

/// The qcow2 image on top of `chain`, if it is one.
fn top_qcow2(chain: &Chain) -> Option<&Qcow2Image> {
    chain.top().as_any().downcast_ref::<Qcow2Image>()
}

/// Why bitmap `name` of the top of `chain` cannot be used, or its bits.
fn judge_top(chain: &Chain, name: &str) -> Result<std::result::Result<Bitmap, String>> {
    match top_qcow2(chain) {
        Some(img) => judge(img, name),
        None => Ok(Err(format!(
            "the image is {}, which has no persistent bitmaps",
            chain.layers[0].format.name()
        ))),
    }
}

/// The chunks (of `cs` bytes, on a disk of `size` bytes) that hold a byte
/// the bitmap marks; a bit wider than a chunk marks every chunk it covers.
pub fn marked_chunks(b: &Bitmap, size: u64, cs: ChunkSize) -> BTreeSet<u64> {
    let g = u32::from(b.granularity_bits);
    let mut out = BTreeSet::new();
    for (i, &byte) in b.bits.iter().enumerate() {
        if byte == 0 {
            continue;
        }
        for bit in (0..8u64).filter(|bit| byte & (1 << bit) != 0) {
            let k = i as u64 * 8 + bit;
            let start = k.checked_shl(g).unwrap_or(u64::MAX);
            if start >= size {
                return out;
            }
            let end = (k + 1).checked_shl(g).unwrap_or(u64::MAX).min(size);
            out.extend(cs.covering(start, end - start));
        }
    }
    out
}

/// Why the parent cannot take the bitmap's changes: it is no disk of `size`
/// bytes in the planned chunks, or older than the latest snapshot of the same
/// image and bitmap (at which the bitmap was cleared).
fn parent_unfit(
    repo: &Repository,
    parent: &Id,
    plan: &ChunkPlan,
    size: u64,
    opts: &BackupOptions,
    tag: &str,
) -> Result<Option<String>> {
    if let Some(why) = &plan.full_read {
        return Ok(Some(why.clone()));
    }
    let snaps = repo.snapshots()?;
    let Some(at) = snaps.iter().position(|(id, _)| id == parent) else {
        return Ok(Some(format!(
            "the parent snapshot {} is gone",
            parent.short()
        )));
    };
    let node = match disk_node(repo, &snaps[at].1) {
        Ok(node) => node,
        Err(e) => return Ok(Some(format!("the parent snapshot {}: {e}", parent.short()))),
    };
    let theirs = node.size;
    if theirs != size {
        return Ok(Some(format!(
            "the parent snapshot {} is a {theirs}-byte disk and the image is {size} bytes",
            parent.short()
        )));
    }
    if fixed_chunk_size(repo, &node, plan.size) != Some(plan.size) {
        return Ok(Some(format!(
            "the parent snapshot {} is not cut in fixed {} chunks",
            parent.short(),
            plan.size
        )));
    }
    let cleared = snaps[at + 1..]
        .iter()
        .rev()
        .find(|(_, s)| s.paths == [opts.path.as_str()] && s.tags.iter().any(|t| t == tag));
    Ok(cleared.map(|(id, _)| {
        format!(
            "the bitmap was cleared at snapshot {}, after the parent snapshot {}: it lacks \
             the changes in between",
            id.short(),
            parent.short()
        )
    }))
}

/// Back up the image `args` names through its bitmap `name` (see the module),
/// as [`crate::ops::backup_image`] planned: `opts` with the parent, `plan` the
/// chunks. The summary's `full_read` says why everything was read, if it was;
/// `bitmap_cleared` names the bitmap once it is cleared.
pub(crate) fn backup(
    repo: &mut Repository,
    args: &ImageBackup,
    name: &str,
    mut opts: BackupOptions,
    plan: ChunkPlan,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<(BackupOptions, BackupSummary)> {
    let parent = opts.parent.ok_or_else(|| {
        Error::new(
            ErrorKind::Invalid,
            "a backup through a bitmap needs a parent: the snapshot the bitmap's changes are counted from",
        )
    })?;
    let tag = format!("{TAG_BITMAP}{name}");
    opts.tags.push(tag.clone());
    let spec = OpenSpec::new(&args.image).format(args.format);
    // A look without the write lock first: an image whose bitmaps strata cannot
    // keep is never opened for writing (that would mark them all stale).
    let look = strata_chain::open(&spec.clone().open_backing(false))?;
    let format = look.layers[0].format;
    let seen = judge_top(&look, name)?;
    drop(look);
    let (chain, bitmap) = match seen {
        Err(why) => (strata_chain::open(&spec)?, Err(why)),
        Ok(_) => {
            let chain = strata_chain::open(&spec.format(Some(format)).write(true))?;
            // Read again under the write lock: this is the bitmap that is cleared.
            let bitmap = judge_top(&chain, name)?;
            (chain, bitmap)
        }
    };
    let src = DiskSource::from_devices(chain.devices())?;
    let size = src.size();
    let full_read = match &bitmap {
        Err(why) => Some(why.clone()),
        Ok(b) => match parent_unfit(repo, &parent, &plan, size, &opts, &tag)? {
            Some(why) => Some(why),
            None => {
                opts.incremental = Some(Incremental {
                    parent,
                    changed: marked_chunks(b, size, plan.size),
                });
                None
            }
        },
    };
    let mut s = disk::backup(repo, &src, &opts, progress, cancel)?;
    s.full_read = full_read;
    if bitmap.is_ok() {
        let img = top_qcow2(&chain).expect("a usable bitmap is in a qcow2 image");
        clear(img, name).map_err(|e| {
            e.wrap(format_args!(
                "snapshot {} is saved, but bitmap '{name}' was not cleared (it still marks \
                 the changes, so the next backup reads them again)",
                s.snapshot.short()
            ))
        })?;
        s.bitmap_cleared = Some(name.to_string());
    }
    Ok((opts, s))
}

/// Clear bitmap `name` of `img`, keeping the others as they are.
fn clear(img: &Qcow2Image, name: &str) -> Result<()> {
    let mut set = img.read_bitmaps()?;
    for b in set.iter_mut().filter(|b| b.name == name) {
        b.bits.fill(0);
    }
    img.store_bitmaps(&set)?;
    img.close()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(granularity_bits: u8, size: u64, set: &[u64]) -> Bitmap {
        let mut b = Bitmap::new("b", granularity_bits, true, size);
        for &k in set {
            b.bits[(k / 8) as usize] |= 1 << (k % 8);
        }
        b
    }

    #[test]
    fn marked_chunks_are_the_chunks_holding_a_marked_byte() {
        let mib = 1u64 << 20;
        let cs = ChunkSize::new(4 * mib).unwrap();
        let size = 40 * mib + 512;
        // 64 KiB bits: bit 0 is chunk 0, bit 64 (4 MiB) chunk 1, bit 63 the end of chunk 0.
        let b = bitmap(16, size, &[0, 63, 64, 640]);
        assert_eq!(
            marked_chunks(&b, size, cs).into_iter().collect::<Vec<_>>(),
            [0, 1, 10]
        );
        assert!(marked_chunks(&bitmap(16, size, &[]), size, cs).is_empty());
    }

    #[test]
    fn a_bit_wider_than_a_chunk_marks_every_chunk_it_covers() {
        let mib = 1u64 << 20;
        let cs = ChunkSize::new(mib).unwrap();
        let size = 20 * mib;
        // 8 MiB bits: bit 1 is chunks 8..16, bit 2 the last 4 MiB (chunks 16..20).
        let b = bitmap(23, size, &[1, 2]);
        assert_eq!(
            marked_chunks(&b, size, cs).into_iter().collect::<Vec<_>>(),
            (8..20).collect::<Vec<_>>()
        );
    }
}
