//! QEMU's `parallels` format: Parallels Desktop / Virtuozzo (ploop) disks.
//!
//! The driver's contract (the same for every foreign format, see
//! [`crate::Format`]): [`probe`] decides from a file's first bytes as
//! QEMU's probe does, [`open`] gives the guest view, [`create`] writes a
//! new empty image as qemu-img's `create -f parallels` does.
//!
//! Layout: a 64-byte [`header`] (signature `WithoutFreeSpace`, whose BAT
//! entries count sectors, or `WithouFreSpacExt`, whose entries count
//! clusters), the BAT right after it, then the data clusters
//! ([`ParallelsImage`]). An optional format extension cluster holds dirty
//! bitmaps; QEMU checks it on a read-only open and ignores it otherwise, as
//! does this driver. [`ParallelsImage::check`] is `qemu-img check -f
//! parallels` with its repairs. QEMU cannot resize a parallels image, nor
//! create one over a backing file, nor can this driver.

mod check;
mod ext;
pub mod header;
mod image;
mod used;

pub use check::{Fix, MAX_KEPT_MESSAGES};
pub use header::Header;
pub use image::{OpenOptions, ParallelsImage, PreallocMode};

use crate::{BlockDevice, Error, Result};
use header::{check_create, new_image, DEFAULT_CLUSTER_SIZE, SECTOR};
use std::path::Path;
use std::sync::Arc;
use strata_storage::Storage;

/// Whether `head` (the first up to 2048 bytes of a file) is a parallels
/// image, as QEMU's probe would choose this driver.
pub fn probe(head: &[u8]) -> bool {
    header::probe(head)
}

/// The options of `create -f parallels -o ...`, parsed by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// `cluster_size` in bytes (1 MiB by default); rounded up to whole
    /// sectors, as QEMU rounds it.
    pub cluster_size: u64,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cluster_size: DEFAULT_CLUSTER_SIZE,
        }
    }
}

/// Open the image on `storage` (`path` its file name) with QEMU's default
/// open options. `write`: open for writing (the image is marked in use until
/// it is closed, and repaired first if it needs it).
pub fn open(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    write: bool,
) -> Result<Arc<dyn BlockDevice>> {
    open_with(storage, path, write, OpenOptions::default())
}

/// [`open`] with the driver's open options (preallocation; opened by check).
pub fn open_with(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    write: bool,
    opts: OpenOptions,
) -> Result<Arc<dyn BlockDevice>> {
    let image = ParallelsImage::open(storage, path.map(Path::to_path_buf), write, opts)?;
    Ok(Arc::new(image))
}

/// Open the image as `qemu-img check` does: not repaired at open (the
/// check reports and repairs).
pub fn open_for_check(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    write: bool,
) -> Result<Arc<dyn BlockDevice>> {
    open_with(
        storage,
        path,
        write,
        OpenOptions {
            for_check: true,
            ..OpenOptions::default()
        },
    )
}

/// `qemu-img check` of an image this driver opened, in qemu-img's report:
/// `fix` as `-r` asks.
pub fn check_report(dev: &dyn BlockDevice, fix: Fix) -> Result<crate::qcow2::CheckReport> {
    match dev.as_any().downcast_ref::<ParallelsImage>() {
        Some(img) => img.check(fix),
        None => Ok(crate::qcow2::CheckReport::default()),
    }
}

/// Write a new, empty image of `size` guest bytes on `storage` (an empty
/// file, `path` its name), as `qemu-img create -f parallels` lays it out:
/// the header in the first sector, then zeroes (allocated) up to the first
/// data cluster. Size and cluster size are rounded up to whole sectors and
/// checked with QEMU's messages.
pub fn create(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    size: u64,
    opts: &CreateOptions,
) -> Result<()> {
    let _ = path;
    let round = |n: u64| {
        n.checked_next_multiple_of(SECTOR)
            .ok_or_else(|| Error::invalid("Image size is too large for this cluster size"))
    };
    let cluster_size = round(opts.cluster_size)?;
    let size = round(size)?;
    check_create(size, cluster_size)?;
    let (first, data_sectors) = new_image(size, cluster_size);
    storage.write_at(&first, 0)?;
    let rest = data_sectors * SECTOR - SECTOR;
    if rest > 0 {
        storage
            .preallocate(SECTOR, rest)
            .map_err(|e| Error::from(e).in_step("Failed to create Parallels image"))?;
    }
    Ok(())
}
