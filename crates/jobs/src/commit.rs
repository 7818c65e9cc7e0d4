//! `commit`: merge the data of the upper layers of a chain into a lower one (the
//! base), as `qemu-img commit` and libvirt's block commit do.
//!
//! Order of work, for crash safety: the base is grown if needed, the data is copied
//! and flushed, and only then is anything else changed (the top emptied, or the
//! layer above the merged range relinked to the base in one header write). A crash
//! before the relink leaves every image showing the same guest content as before;
//! after it, the content after.

use crate::layers::{apply, plan_band, CopyPlan};
use crate::{Cancel, Error, Progress, Result};
use std::sync::Arc;
use strata_format::qcow2::Qcow2Image;
use strata_format::BlockDevice;

/// A planned commit: `layers[top..base]` merge into `layers[base]`.
#[derive(Debug, Clone)]
pub struct CommitPlan {
    /// Index of the highest layer merged (0 for the chain's top image).
    pub top: usize,
    /// Index of the layer written into.
    pub base: usize,
    /// The base's new size when it must grow to hold the top's guest view.
    pub grow_base_to: Option<u64>,
    pub copy: CopyPlan,
}

/// Plan merging `layers[top..base]` into `layers[base]` (`layers` is a whole chain,
/// top first, each layer attached to the next).
pub fn plan(
    layers: &[Arc<dyn BlockDevice>],
    top: usize,
    base: usize,
    cancel: &Cancel,
) -> Result<CommitPlan> {
    if base >= layers.len() || top >= base {
        return Err(Error::Invalid(format!(
            "Cannot commit layer {top} into layer {base} of a chain of {} images",
            layers.len()
        )));
    }
    let size = layers[top].virtual_size();
    let base_size = layers[base].virtual_size();
    // The data of layers top..base as the guest sees it through `top`: a plan over
    // layers[top..=base-1] (layers above `top` do not take part).
    let copy = plan_band(&layers[top..], 0, base - top, size, cancel)?;
    Ok(CommitPlan {
        top,
        base,
        grow_base_to: (size > base_size).then_some(size),
        copy,
    })
}

/// Copy the planned data into the base and flush it. Nothing else changes: the
/// caller then empties the top or relinks (see [`relink_above`]).
pub fn apply_plan(
    layers: &[Arc<dyn BlockDevice>],
    plan: &CommitPlan,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<()> {
    let base = &layers[plan.base];
    if base.read_only() {
        return Err(Error::Invalid(
            "The base image is not open for writing".into(),
        ));
    }
    if let Some(n) = plan.grow_base_to {
        base.resize(n, false)?;
    }
    apply(
        &plan.copy,
        layers[plan.top].as_ref(),
        base.as_ref(),
        progress,
        cancel,
    )
}

/// Make `image` empty (every cluster unallocated, so it shows its backing file), as
/// qemu-img does to the top after a commit.
pub fn make_empty(image: &dyn BlockDevice) -> Result<()> {
    match image.as_any().downcast_ref::<Qcow2Image>() {
        Some(q) => q.make_empty()?,
        None => return Err(Error::CannotEmpty(image.format_name())),
    }
    Ok(())
}

/// Point `above` (a qcow2 overlay) at a new backing file in one header write.
pub fn relink_above(
    above: &dyn BlockDevice,
    backing_name: Option<&str>,
    backing_format: Option<&str>,
) -> Result<()> {
    relink_above_to(
        above,
        backing_name.map(std::ffi::OsStr::new),
        backing_format,
    )
}

/// [`relink_above`] with the name as bytes (a name found in an image need not be
/// UTF-8, and is recorded again exactly as it was).
pub fn relink_above_to(
    above: &dyn BlockDevice,
    backing_name: Option<&std::ffi::OsStr>,
    backing_format: Option<&str>,
) -> Result<()> {
    let q = above.as_any().downcast_ref::<Qcow2Image>().ok_or_else(|| {
        Error::Invalid(format!(
            "A {} image has no backing file to change",
            above.format_name()
        ))
    })?;
    q.set_backing_file(backing_name, backing_format)?;
    Ok(())
}

/// Images known to use `chain.layers[base]` as their backing file besides the
/// chain's own layers: qcow2 files in the base's directory whose recorded backing
/// name resolves to it. A commit into the base changes what they show, so callers
/// warn before writing. (Overlays elsewhere cannot be found without a catalogue.)
pub fn other_users(chain: &strata_chain::Chain, base: usize) -> Vec<std::path::PathBuf> {
    let Ok(target) = std::fs::canonicalize(&chain.layers[base].path) else {
        return Vec::new();
    };
    let members: Vec<std::path::PathBuf> = chain
        .layers
        .iter()
        .filter_map(|l| std::fs::canonicalize(&l.path).ok())
        .collect();
    let dir = target
        .parent()
        .unwrap_or(std::path::Path::new("/"))
        .to_path_buf();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut users = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        let Ok(c) = std::fs::canonicalize(&p) else {
            continue;
        };
        if members.contains(&c) || !p.is_file() {
            continue;
        }
        let Ok(dev) = strata_chain::open_image(&p, strata_format::Format::Qcow2, false, true)
        else {
            continue;
        };
        let Some(q) = dev
            .as_any()
            .downcast_ref::<strata_format::qcow2::Qcow2Image>()
        else {
            continue;
        };
        if let Some(b) = q.header().backing_file {
            if std::fs::canonicalize(strata_chain::resolve_backing(&p, &b)).ok()
                == Some(target.clone())
            {
                users.push(p);
            }
        }
    }
    users.sort();
    users
}
