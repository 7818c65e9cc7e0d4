//! QEMU's `vhdx` format: Hyper-V's VHDX (dynamic and fixed disks).
//!
//! The driver's contract (the same for every foreign format, see
//! [`crate::Format`]): [`probe`] decides from a file's first bytes as
//! QEMU's probe does, [`open`] gives the guest view, [`create`] writes a
//! new empty image as qemu-img's `create -f vhdx` does.

mod create;
mod image;
mod layout;
mod log;

pub use create::{plan, Plan};
pub use image::VhdxImage;

use crate::{BlockDevice, Result};
use std::path::Path;
use std::sync::Arc;
use strata_storage::Storage;

/// Whether `head` (the first up to 2048 bytes of a file, fewer when it is
/// shorter) is a vhdx image, as QEMU's probe would choose this driver.
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(b"vhdxfile")
}

/// What `qemu-img check -f vhdx` finds ([`VhdxImage::check`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// One entry per corruption QEMU counts: the line it prints (without
    /// the `qemu-img: ` prefix), or empty for one it counts silently (a
    /// payload block overlapping the log, the BAT or the metadata region).
    pub problems: Vec<String>,
    /// A log was replayed when the image was opened for writing (QEMU
    /// counts it as one fixed corruption).
    pub log_replayed: bool,
}

/// The options of `create -f vhdx -o ...`, parsed and checked by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// `log_size` in bytes (default 1 MiB).
    pub log_size: u64,
    /// `block_size` in bytes; 0 chooses from the image size as QEMU does.
    pub block_size: u64,
    /// `subformat=fixed` (else dynamic).
    pub fixed: bool,
    /// `block_state_zero` (default on).
    pub block_state_zero: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            log_size: 1 << 20,
            block_size: 0,
            fixed: false,
            block_state_zero: true,
        }
    }
}

/// Open the image on `storage`; `path` is its file name (companion files are
/// found relative to it). `write`: open for writing.
pub fn open(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    write: bool,
) -> Result<Arc<dyn BlockDevice>> {
    Ok(Arc::new(VhdxImage::open(storage, path, write)?))
}

/// Open the image for `qemu-img check` (see [`VhdxImage::open_for_check`]):
/// BAT entries pointing outside the file are left for the check to report.
pub fn open_for_check(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    write: bool,
) -> Result<Arc<dyn BlockDevice>> {
    Ok(Arc::new(VhdxImage::open_for_check(storage, path, write)?))
}

/// What qemu-img's check prints and counts for the image: each BAT problem
/// one corruption (its line printed as qemu-img's own error), a log replayed
/// when the image was opened one fixed corruption.
pub fn check_report(img: &VhdxImage) -> Result<crate::qcow2::CheckReport> {
    let r = img.check()?;
    let mut out = crate::qcow2::CheckReport {
        corruptions: r.problems.len() as u64,
        corruptions_fixed: u64::from(r.log_replayed),
        ..Default::default()
    };
    for m in r.problems.into_iter().filter(|m| !m.is_empty()) {
        out.own_errors.push(out.messages.len());
        out.messages.push(m);
    }
    Ok(out)
}

/// Write a new, empty image of `size` guest bytes on `storage` (an empty
/// file, `path` its name), as `qemu-img create -f vhdx` lays it out
/// (`size`, `log_size` and `block_size` rounded and checked as QEMU does:
/// see [`plan`]).
pub fn create(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    size: u64,
    opts: &CreateOptions,
) -> Result<()> {
    let _ = path;
    create::create(storage.as_ref(), size, opts)
}
