//! `commit`: merge the data of the upper layers of a chain into a lower one (the
//! base), as `qemu-img commit` and libvirt's block commit do.
//!
//! Order of work, for crash safety: the base is grown if needed, the data is copied
//! and flushed, and only then is anything else changed (the top emptied, or the
//! layer above the merged range relinked to the base in one header write). A crash
//! before the relink leaves every image showing the same guest content as before;
//! after it, the content after.

use crate::layers::{apply, plan_band, CopyPlan, Zeroes};
use crate::{Cancel, Error, Progress, Result};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_chain::{Chain, OpenSpec};
use strata_format::{BlockDevice, Format};

/// Merge part of an image's backing chain into a lower image of it, as
/// `qemu-img commit` (`-b`, `-d`) and libvirt's intermediate block commit (`--top`)
/// do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRequest {
    /// The image whose chain is committed (the top of the chain).
    pub image: PathBuf,
    /// Its format; probed when `None` (backing files never are).
    #[serde(default, with = "crate::format_name")]
    pub format: Option<Format>,
    /// The image to commit into: a path, or the name a layer above records for
    /// it. Default: the layer just below `top`.
    #[serde(default)]
    pub base: Option<String>,
    /// The highest layer merged, named as `base` is. Default: the image itself.
    /// When it is below the image, the layer above it is relinked to the base and
    /// the merged layers leave the chain.
    #[serde(default)]
    pub top: Option<String>,
    /// Keep the image's own data after merging it. Otherwise a commit of the image
    /// into its own backing file empties it, as qemu-img does; naming `base` or
    /// `top` always keeps it.
    #[serde(default)]
    pub keep_top: bool,
}

impl CommitRequest {
    /// Commit `image` into its backing file, emptying it afterwards.
    pub fn new(image: impl Into<PathBuf>) -> Self {
        CommitRequest {
            image: image.into(),
            format: None,
            base: None,
            top: None,
            keep_top: false,
        }
    }
}

/// A commit resolved against the chain as it is on disk, before anything is
/// opened for writing: which layers merge, and who else would see the change.
#[derive(Debug, Clone)]
pub struct ResolvedCommit {
    req: CommitRequest,
    /// How the chain opens: the image's bytes when not its file (an NBD
    /// export), the driver options and secrets of its layers (an encrypted
    /// chain's `encrypt.key-secret` and `backing.encrypt.key-secret`).
    spec: OpenSpec,
    /// Index of the highest merged layer (0: the image).
    pub top: usize,
    /// Index of the layer written into.
    pub base: usize,
    /// The base image's path.
    pub base_path: PathBuf,
}

impl ResolvedCommit {
    /// The image is emptied after the merge.
    fn empties_top(&self) -> bool {
        self.top == 0 && self.req.base.is_none() && !self.req.keep_top
    }
    /// The layer above the merged range is relinked to the base.
    fn relinks(&self) -> bool {
        self.top > 0
    }
}

/// Find the layers `req` names, reading the chain only. Errors:
/// [`Error::NoBackingFile`] when there is nothing below the merged range,
/// [`Error::NotInChain`] when `base` or `top` names no layer (or `base` is not below
/// `top`), also when `base` is named for an image without a backing file.
pub fn resolve(req: &CommitRequest) -> Result<ResolvedCommit> {
    resolve_on(req, None)
}

/// [`resolve`] for an image whose bytes are `storage` rather than the file
/// `req.image` names (an NBD export: `req.image` only names it).
pub fn resolve_on(
    req: &CommitRequest,
    storage: Option<strata_chain::TopStorage>,
) -> Result<ResolvedCommit> {
    let mut spec = OpenSpec::new(&req.image);
    spec.storage = storage;
    resolve_spec(req, spec)
}

/// [`resolve`] for a chain that opens as `spec` says (its storage, its
/// layers' driver options and secrets); `req` names the image and format.
pub fn resolve_spec(req: &CommitRequest, mut spec: OpenSpec) -> Result<ResolvedCommit> {
    spec.path = req.image.clone();
    spec.format = req.format;
    // The image opens for writing first, as qemu-img opens it: an image that
    // cannot be written (marked corrupt, read-only) is refused before its
    // chain is looked at.
    let probe = strata_chain::open(&spec.clone().write(true))?;
    let n = probe.layers.len();
    let not_found = |what: &str| Error::NotInChain {
        what: what.to_string(),
        image: req.image.clone(),
    };
    if n < 2 {
        // A base named for an image without a backing file is looked for (and
        // not found) in its chain, as qemu-img looks for it.
        return Err(match (&req.base, &req.top) {
            (Some(b), None) => not_found(b),
            _ => Error::NoBackingFile,
        });
    }
    let find = |what: &str| probe.find(what).ok_or_else(|| not_found(what));
    let top = match &req.top {
        Some(t) => find(t)?,
        None => 0,
    };
    let base = match &req.base {
        Some(b) => find(b)?,
        None => top + 1,
    };
    if req.base.is_none() && base >= n {
        // `top` names the bottom of the chain: nothing below it to commit into.
        return Err(Error::NoBackingFile);
    }
    if base <= top || base >= n {
        return Err(not_found(req.base.as_deref().unwrap_or_default()));
    }
    Ok(ResolvedCommit {
        req: req.clone(),
        spec,
        top,
        base,
        base_path: probe.layers[base].path.clone(),
    })
}

/// Carry out a resolved commit: open what it writes (the base; the image when it
/// is emptied; the layer above a merged middle range, relinked), merge, then empty
/// or relink, and close the written images. See the module for the order of work.
pub fn commit(c: &ResolvedCommit, progress: &dyn Progress, cancel: &Cancel) -> Result<()> {
    let (top, base) = (c.top, c.base);
    let mut spec = c
        .spec
        .clone()
        .write(c.empties_top() || (c.relinks() && top == 1))
        .write_layer(base);
    if c.relinks() && top > 1 {
        spec = spec.write_layer(top - 1);
    }
    let chain = strata_chain::open(&spec)?;
    let layers = chain.devices();
    let plan = plan(&layers, top, base, cancel)?;
    apply_plan(&layers, &plan, progress, cancel)?;
    if c.relinks() {
        let new_name = backing_name_for(&chain, top - 1, base);
        relink_above_to(
            layers[top - 1].as_ref(),
            Some(&new_name),
            Some(chain.layers[base].format.name()),
        )?;
    } else if c.empties_top() && !cannot_empty(layers[0].as_ref()) {
        make_empty(layers[0].as_ref()).map_err(|e| match e {
            Error::Format(f) => Error::EmptyFailed(f),
            e => e,
        })?;
    }
    for l in &layers {
        l.close()?;
    }
    Ok(())
}

/// The name to record in `chain.layers[above]` for `chain.layers[base]`: the name
/// the chain already records for it when that resolves to the same file from
/// `above`'s directory, else its full path.
pub fn backing_name_for(chain: &Chain, above: usize, base: usize) -> OsString {
    let recorded = chain.layers[base - 1]
        .backing_name
        .clone()
        .unwrap_or_default();
    let from_above = strata_chain::resolve_backing(&chain.layers[above].path, &recorded);
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if !recorded.is_empty() && same(&from_above, &chain.layers[base].path) {
        recorded
    } else {
        std::fs::canonicalize(&chain.layers[base].path)
            .unwrap_or_else(|_| chain.layers[base].path.clone())
            .into_os_string()
    }
}

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
    // qemu-img opens the base with unmapping on: the clusters its zeroes free
    // are punched, and read as zeroes in the file afterwards.
    if let Some(q) = base
        .as_any()
        .downcast_ref::<strata_format::qcow2::Qcow2Image>()
    {
        q.set_punch_unmapped(true);
    }
    // qemu-img commits through a mirror job, which copies whole chunks of its
    // granularity (the base's cluster size, within 4 KiB to 64 KiB). Into a base
    // with extended L2 entries only the subclusters written are allocated, so
    // the chunks are copied whole as qemu-img copies them; elsewhere a partial
    // write fills its cluster the same either way.
    let widened;
    let copy = match base
        .as_any()
        .downcast_ref::<strata_format::qcow2::Qcow2Image>()
    {
        Some(q) if q.geometry().extended_l2 => {
            let g = q.geometry().cluster_size().clamp(4096, 65536);
            widened = plan
                .copy
                .widened_to_chunks(g, layers[plan.top].virtual_size());
            &widened
        }
        _ => &plan.copy,
    };
    apply(
        copy,
        layers[plan.top].as_ref(),
        base.as_ref(),
        Zeroes::Unmap,
        progress,
        cancel,
    )
}

/// Whether `image` is of a format whose QEMU driver has no emptying (vmdk):
/// qemu-img's commit then leaves the top as it is, and so does strata's.
fn cannot_empty(image: &dyn BlockDevice) -> bool {
    image
        .format_name()
        .parse::<strata_format::Format>()
        .is_ok_and(strata_format::Format::is_foreign)
}

/// Make `image` empty (every cluster unallocated, so it shows its backing file), as
/// qemu-img does to the top after a commit.
pub fn make_empty(image: &dyn BlockDevice) -> Result<()> {
    let overlay = image
        .overlay()
        .ok_or_else(|| Error::CannotEmpty(image.format_name()))?;
    Ok(overlay.make_empty()?)
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
    let overlay = above.overlay().ok_or_else(|| {
        Error::Invalid(format!(
            "A {} image has no backing file to change",
            above.format_name()
        ))
    })?;
    Ok(overlay.set_backing_file(backing_name, backing_format)?)
}
