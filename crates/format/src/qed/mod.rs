//! QEMU's `qed` format (QEMU Enhanced Disk).
//!
//! The driver's contract (the same for every foreign format, see
//! [`crate::Format`]): [`probe`] decides from a file's first bytes as
//! QEMU's probe does, [`open`] gives the guest view, [`create`] writes a
//! new empty image as qemu-img's `create -f qed` does.
//!
//! Layout: a [`header`] cluster (the 64-byte header, then the backing file
//! name), the L1 table (`table_size` clusters), then L2 tables and data
//! clusters in the order they were allocated, each appended at the end of
//! the file ([`image`]). An L2 entry is 0 (not allocated: read from the
//! backing file), 1 (a zero cluster) or a cluster's file offset.
//! [`QedImage::check`] is `qemu-img check -f qed` (and `-r`). Unlike the
//! other foreign formats, qed has a backing file (its format recorded only
//! when raw, else probed) and grows; it cannot shrink.

mod check;
pub mod header;
mod image;
mod link;

pub use header::Header;
pub use image::{QedImage, MAX_TABLE_BYTES};

use crate::units::index;
use crate::{BlockDevice, Error, Result};
use header::{
    cluster_size_valid, image_size_valid, max_image_size, table_size_valid, F_BACKING_FILE,
    F_BACKING_FORMAT_NO_PROBE, HEADER_LEN, MAX_CLUSTER_SIZE, MAX_TABLE_SIZE, MIN_CLUSTER_SIZE,
    MIN_TABLE_SIZE, SECTOR_SIZE,
};
use std::path::Path;
use std::sync::Arc;
use strata_storage::Storage;

/// Whether `head` (the first up to 2048 bytes of a file, zero-padded when it
/// is shorter) is a qed image, as QEMU's probe would choose this driver.
pub fn probe(head: &[u8]) -> bool {
    header::probe(head)
}

/// The options of `create -f qed -o ...`, parsed by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// `cluster_size=` (a power of two, 4 KiB to 64 MiB).
    pub cluster_size: u64,
    /// `table_size=`, in clusters (a power of two, 1 to 16).
    pub table_size: u64,
    /// `backing_file=`, recorded as given.
    pub backing_file: Option<Vec<u8>>,
    /// `backing_fmt=`: only `raw` is recorded (as the no-probe feature).
    pub backing_fmt: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cluster_size: header::DEFAULT_CLUSTER_SIZE.into(),
            table_size: header::DEFAULT_TABLE_SIZE.into(),
            backing_file: None,
            backing_fmt: None,
        }
    }
}

/// Open the image on `storage`; `path` is its file name. `write`: open for
/// writing (an image flagged as needing a check is then checked and
/// repaired first, as QEMU does; read-only it opens as it is).
///
/// The header is checked as QEMU checks it, with its messages ("Image not in
/// QED format", "QED table offset is invalid", ...).
pub fn open(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    write: bool,
) -> Result<Arc<dyn BlockDevice>> {
    Ok(Arc::new(QedImage::open(
        storage,
        path.map(Path::to_path_buf),
        write,
        true,
    )?))
}

/// Open the image as QEMU's check opens it: no automatic check and repair
/// of a flagged image (the check itself reports and repairs).
pub fn open_for_check(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    write: bool,
) -> Result<Arc<dyn BlockDevice>> {
    Ok(Arc::new(QedImage::open(
        storage,
        path.map(Path::to_path_buf),
        write,
        false,
    )?))
}

/// The check report of an image this driver opened (see
/// [`QedImage::check_report`]); `None` for any other device.
pub fn check_report(
    dev: &dyn BlockDevice,
    repair: bool,
) -> Option<Result<crate::qcow2::CheckReport>> {
    dev.as_any()
        .downcast_ref::<QedImage>()
        .map(|img| img.check_report(repair))
}

/// Write a new, empty image of `size` guest bytes on `storage` (an empty
/// file, `path` its name), as `qemu-img create -f qed` lays it out: the
/// header (and backing file name) in the first cluster, a zeroed L1 table in
/// the next `table_size` clusters.
///
/// The size is rounded up to whole sectors. Option values QEMU refuses are
/// refused with its messages, in its order (cluster size, table size, image
/// size).
pub fn create(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    size: u64,
    opts: &CreateOptions,
) -> Result<()> {
    let _ = path;
    let cluster_size = u32::try_from(opts.cluster_size)
        .ok()
        .filter(|&c| cluster_size_valid(c))
        .ok_or_else(|| {
            Error::invalid_argument(format!(
                "QED cluster size must be within range [{MIN_CLUSTER_SIZE}, {MAX_CLUSTER_SIZE}] and power of 2"
            ))
        })?;
    let table_size = u32::try_from(opts.table_size)
        .ok()
        .filter(|&t| table_size_valid(t))
        .ok_or_else(|| {
            Error::invalid_argument(format!(
                "QED table size must be within range [{MIN_TABLE_SIZE}, {MAX_TABLE_SIZE}] and power of 2"
            ))
        })?;
    let max = max_image_size(cluster_size, table_size);
    let size = size
        .checked_next_multiple_of(SECTOR_SIZE)
        .filter(|&s| image_size_valid(s, cluster_size, table_size))
        .ok_or_else(|| {
            Error::invalid_argument(format!(
                "QED image size must be a non-zero multiple of cluster size and less than {max} bytes"
            ))
        })?;
    let mut h = Header::new_image(cluster_size, table_size, size);
    let name = opts.backing_file.as_deref().unwrap_or_default();
    if opts.backing_file.is_some() {
        h.features |= F_BACKING_FILE;
        h.backing_filename_offset = header::NAME_OFFSET;
        h.backing_filename_size = u32::try_from(name.len())
            .map_err(|_| Error::invalid_argument("backing file name too long"))?;
        if opts.backing_fmt.as_deref() == Some("raw") {
            h.features |= F_BACKING_FORMAT_NO_PROBE;
        }
    }
    storage.set_size(0)?;
    storage.write_at(&h.to_bytes(), 0)?;
    if !name.is_empty() {
        storage.write_at(name, HEADER_LEN as u64)?;
    }
    let l1 = vec![0u8; index(h.table_bytes())];
    storage.write_at(&l1, h.l1_table_offset)?;
    Ok(())
}
