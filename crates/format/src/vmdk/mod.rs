//! QEMU's `vmdk` format: VMware disks (sparse, stream-optimized and flat extents, a text descriptor).
//!
//! The driver's contract (the same for every foreign format, see
//! [`crate::Format`]): [`probe`] decides from a file's first bytes as
//! QEMU's probe does, [`open`] gives the guest view, [`create`] writes a
//! new empty image as qemu-img's `create -f vmdk` does.

use crate::{BlockDevice, Error, Result};
use std::path::Path;
use std::sync::Arc;
use strata_storage::Storage;

/// Whether `head` (the first up to 2048 bytes of a file, fewer when it is
/// shorter) is a vmdk image, as QEMU's probe would choose this driver.
pub fn probe(head: &[u8]) -> bool {
    let _ = head;
    false
}

/// The options of `create -f vmdk -o ...`, parsed and checked by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// `subformat`: monolithicSparse (default), monolithicFlat,
    /// twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized.
    pub subformat: String,
    /// `adapter_type`: ide (default), lsilogic, buslogic, legacyESX.
    pub adapter_type: String,
    /// `compat6=on`: virtual hardware version 6.
    pub compat6: bool,
    /// `hwversion`, when given.
    pub hwversion: Option<String>,
    /// `toolsversion`, when given.
    pub toolsversion: Option<String>,
    /// `zeroed_grain=on`.
    pub zeroed_grain: bool,
    /// `backing_file`, when given (the parent's file name, as typed).
    pub backing_file: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            subformat: "monolithicSparse".into(),
            adapter_type: "ide".into(),
            compat6: false,
            hwversion: None,
            toolsversion: None,
            zeroed_grain: false,
            backing_file: None,
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
    let _ = (storage, path, write);
    Err(Error::unsupported("the vmdk driver is not built yet"))
}

/// Write a new, empty image of `size` guest bytes on `storage` (an empty
/// file, `path` its name), as `qemu-img create -f vmdk` lays it out.
pub fn create(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    size: u64,
    opts: &CreateOptions,
) -> Result<()> {
    let _ = (storage, path, size, opts);
    Err(Error::unsupported("the vmdk driver is not built yet"))
}
