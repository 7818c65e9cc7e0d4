//! Overlays and external snapshots: a new qcow2 image whose backing file is an
//! existing image (qcow2 or raw), with the backing format recorded so the chain
//! opens later without probing.
//!
//! [`external_snapshot`] is the disk-only external snapshot libvirt takes: the disk's
//! current file becomes the (read-only from then on) backing file of a new, empty
//! overlay, which is where writes go afterwards.
//!
//! Crash safety: the overlay is written under a temporary name in its directory,
//! flushed, and published with a hard link, which never replaces an existing file.
//! A crash leaves either no overlay or a complete one (and perhaps a stray
//! temporary file); the backing image is never written.

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_format::qcow2::{self, CreateOptions};
use strata_format::Format;
use strata_storage::{FileStorage, Storage};

/// What overlay to create.
#[derive(Debug, Clone)]
pub struct OverlayRequest {
    /// The new overlay's path. It must not exist.
    pub overlay: PathBuf,
    /// The backing image's path (relative to the current directory).
    pub backing: PathBuf,
    /// The backing image's format. Required: it is recorded in the overlay, and a
    /// probed format must never be recorded (a raw guest disk could pose as qcow2).
    pub backing_format: Format,
    /// The overlay's virtual size; the backing image's size when `None`.
    pub size: Option<u64>,
    /// Cluster size; the backing image's when it is qcow2, else 64 KiB.
    pub cluster_size: Option<u64>,
}

/// A planned overlay: exactly what will be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayPlan {
    pub overlay: PathBuf,
    /// The backing name recorded in the overlay (see [`backing_name`]).
    pub backing_name: String,
    pub backing_format: Format,
    /// Virtual size (a multiple of 512).
    pub size: u64,
    pub cluster_size: u64,
    /// Depth of the chain the overlay starts (the overlay included).
    pub depth: usize,
}

/// The name an overlay at `overlay` records for its backing file at `backing`: the
/// bare file name when both sit in the same directory (so the pair can be moved
/// together), else the backing file's absolute path. Both paths must exist up to
/// their parent directories; symlinks are resolved.
pub fn backing_name(overlay: &Path, backing: &Path) -> Result<String> {
    let canon_backing = std::fs::canonicalize(backing).map_err(|e| {
        Error::Invalid(format!(
            "Could not open '{}': {}",
            backing.display(),
            strata_storage::os_message(&e)
        ))
    })?;
    let dir_of = |p: &Path| -> Option<PathBuf> {
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
        std::fs::canonicalize(parent.unwrap_or(Path::new("."))).ok()
    };
    let overlay_dir = dir_of(overlay).ok_or_else(|| {
        Error::Invalid(format!(
            "The directory of '{}' does not exist",
            overlay.display()
        ))
    })?;
    let name = if canon_backing.parent() == Some(overlay_dir.as_path()) {
        canon_backing
            .file_name()
            .map(PathBuf::from)
            .unwrap_or(canon_backing.clone())
    } else {
        canon_backing
    };
    name.to_str().map(String::from).ok_or_else(|| {
        Error::Invalid(format!(
            "The backing file name '{}' is not valid UTF-8",
            name.display()
        ))
    })
}

/// Plan an overlay: open the backing image and its whole chain through the gate
/// (read-only, with QEMU's read locks, so an image a QEMU is writing is refused),
/// and decide the recorded name, size and cluster size.
pub fn plan(req: &OverlayRequest) -> Result<OverlayPlan> {
    refuse_existing(&req.overlay)?;
    let spec = strata_chain::OpenSpec::new(&req.backing).format(Some(req.backing_format));
    let chain = strata_chain::open(&spec)?;
    plan_on(req, chain.top().as_ref(), chain.layers.len())
}

/// An overlay is never created over an existing file.
fn refuse_existing(overlay: &Path) -> Result<()> {
    if overlay.exists() {
        return Err(Error::Invalid(format!(
            "'{}' already exists; an overlay is never created over an existing file",
            overlay.display()
        )));
    }
    Ok(())
}

/// [`plan`] for a backing chain the caller already holds open (a live export, whose
/// top it holds for writing): `top` is the device of `req.backing`, the top of a
/// chain of `chain_len` images. The same rules: no existing file is replaced, the
/// depth limit holds, the size is rounded up to whole sectors.
pub fn plan_on(
    req: &OverlayRequest,
    top: &dyn strata_format::BlockDevice,
    chain_len: usize,
) -> Result<OverlayPlan> {
    refuse_existing(&req.overlay)?;
    let depth = chain_len
        .checked_add(1)
        .ok_or_else(|| Error::Invalid("chain too deep".into()))?;
    if depth > strata_chain::DEFAULT_MAX_DEPTH {
        return Err(Error::Invalid(format!(
            "An overlay on '{}' would make a chain of {depth} images, deeper than the limit of {}",
            req.backing.display(),
            strata_chain::DEFAULT_MAX_DEPTH
        )));
    }
    let size = req.size.unwrap_or(top.virtual_size());
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::Invalid(format!("Invalid image size {size}")))?;
    let cluster_size = match req.cluster_size {
        Some(c) => c,
        None => top.cluster_size().unwrap_or(65536),
    };
    Ok(OverlayPlan {
        overlay: req.overlay.clone(),
        backing_name: backing_name(&req.overlay, &req.backing)?,
        backing_format: req.backing_format,
        size,
        cluster_size,
        depth,
    })
}

/// Create the planned overlay: written under a temporary name, flushed, then
/// published with a hard link (which fails rather than replace a file that appeared
/// meanwhile), and the directory flushed.
pub fn apply(plan: &OverlayPlan) -> Result<()> {
    let opts = CreateOptions {
        size: plan.size,
        cluster_size: plan.cluster_size,
        backing_file: Some(plan.backing_name.clone()),
        backing_format: Some(plan.backing_format.name().to_string()),
        ..Default::default()
    };
    opts.validate()?;
    let file_name = plan.overlay.file_name().ok_or_else(|| {
        Error::Invalid(format!("'{}' is not a file name", plan.overlay.display()))
    })?;
    let dir = match plan.overlay.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.strata-new-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::create(&tmp)?);
        let img = qcow2::create(storage.clone(), &opts)?;
        img.close()?;
        drop(img);
        storage.flush()?;
        drop(storage);
        std::fs::hard_link(&tmp, &plan.overlay).map_err(|e| {
            Error::Invalid(format!(
                "Could not create '{}': {}",
                plan.overlay.display(),
                strata_storage::os_message(&e)
            ))
        })?;
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    result?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Plan and create an overlay on `req.backing`.
pub fn create_overlay(req: &OverlayRequest) -> Result<OverlayPlan> {
    let p = plan(req)?;
    apply(&p)?;
    Ok(p)
}

/// Take an external snapshot of `disk` (of format `disk_format`): a new empty
/// overlay at `new_overlay` with `disk` as its backing file. From now on the guest
/// writes go to the overlay and `disk` is only read; `disk` itself is not modified.
/// Refused when `disk` is being written by another process (QEMU's locks), when
/// `new_overlay` exists, or when `disk`'s own chain does not open.
pub fn external_snapshot(
    disk: &Path,
    disk_format: Format,
    new_overlay: &Path,
) -> Result<OverlayPlan> {
    create_overlay(&OverlayRequest {
        overlay: new_overlay.to_path_buf(),
        backing: disk.to_path_buf(),
        backing_format: disk_format,
        size: None,
        cluster_size: None,
    })
}
