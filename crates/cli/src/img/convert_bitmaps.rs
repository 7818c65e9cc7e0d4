//! `convert --bitmaps`: the persistent bitmaps of the source's own layer are
//! copied into the target (names, granularity, enabled or not, bits), as
//! qemu-img copies them. An inconsistent bitmap (one a writer left in use) is
//! refused before the target is made, or with `--skip-broken-bitmaps` left out
//! with a warning; a target that cannot hold bitmaps is refused once it is open.

use anyhow::{bail, Result};
use std::sync::Arc;
use strata_format::qcow2::bitmap_edit::Bitmap;
use strata_format::qcow2::Qcow2Image;
use strata_format::BlockDevice;

/// The bitmaps to copy, read from the source before the target is made.
pub struct Copied {
    bitmaps: Vec<Bitmap>,
    /// Inconsistent bitmaps left out, in directory order.
    skipped: Vec<String>,
}

/// Read the bitmaps of `top` (the source's own layer; an image that cannot
/// hold persistent bitmaps, not qcow2 v3, is refused). An inconsistent one is refused unless `skip_broken`.
pub fn read(top: &Arc<dyn BlockDevice>, skip_broken: bool) -> Result<Copied> {
    // Only a qcow2 v3 source can hold persistent bitmaps; qemu-img refuses any
    // other before it creates the target.
    let Some(q) = top
        .as_any()
        .downcast_ref::<Qcow2Image>()
        .filter(|q| q.header().version >= 3)
    else {
        bail!("Source lacks bitmap support");
    };
    let (bitmaps, skipped) = q.read_consistent_bitmaps()?;
    // qemu-img walks the bitmaps from the last one in the directory.
    if let (false, Some(name)) = (skip_broken, skipped.last()) {
        bail!(
            "Cannot copy inconsistent bitmap '{name}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it"
        );
    }
    Ok(Copied { bitmaps, skipped })
}

/// Refuse a target that cannot store persistent bitmaps (not qcow2, or a
/// version 2 qcow2).
pub fn check_target(target: &Arc<dyn BlockDevice>) -> Result<()> {
    match target.as_any().downcast_ref::<Qcow2Image>() {
        Some(q) if q.header().version >= 3 => Ok(()),
        _ => bail!(
            "Format driver '{}' does not support bitmaps",
            target.format_name()
        ),
    }
}

/// Add the copied bitmaps to the target's own (after the data is copied),
/// warning of each one left out; a name the target already has fails the copy.
pub fn store(target: &Arc<dyn BlockDevice>, copied: &Copied, prog: &str) -> Result<()> {
    let Some(q) = target.as_any().downcast_ref::<Qcow2Image>() else {
        return Ok(());
    };
    for name in copied.skipped.iter().rev() {
        eprintln!("{prog}: warning: Skipping inconsistent bitmap '{name}'");
    }
    if copied.bitmaps.is_empty() {
        return Ok(());
    }
    let mut set = q.read_bitmaps()?;
    let size = q.virtual_size();
    for b in copied.bitmaps.iter().rev() {
        if set.iter().any(|t| t.name == b.name) {
            bail!(
                "Failed to create bitmap {}: Bitmap already exists: {}",
                b.name,
                b.name
            );
        }
    }
    for b in &copied.bitmaps {
        let mut copy = Bitmap::new(&b.name, b.granularity_bits, b.enabled, size);
        copy.merge_from(b);
        set.push(copy);
    }
    q.store_bitmaps(&set)?;
    Ok(())
}
