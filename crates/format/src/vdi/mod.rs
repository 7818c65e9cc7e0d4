//! QEMU's `vdi` format: VirtualBox disk images (dynamic and static).
//!
//! The driver's contract (the same for every foreign format, see
//! [`crate::Format`]): [`probe`] decides from a file's first bytes as
//! QEMU's probe does, [`open`] gives the guest view, [`create`] writes a
//! new empty image as qemu-img's `create -f vdi` does.

use crate::{BlockDevice, Error, Result};
use std::path::Path;
use std::sync::Arc;
use strata_storage::Storage;

/// Whether `head` (the first up to 2048 bytes of a file, fewer when it is
/// shorter) is a vdi image, as QEMU's probe would choose this driver.
pub fn probe(head: &[u8]) -> bool {
    let _ = head;
    false
}

/// The options of `create -f vdi -o ...`, parsed and checked by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// `static=on`: every block allocated at creation.
    pub static_image: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            static_image: false,
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
    Err(Error::unsupported("the vdi driver is not built yet"))
}

/// Write a new, empty image of `size` guest bytes on `storage` (an empty
/// file, `path` its name), as `qemu-img create -f vdi` lays it out.
pub fn create(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    size: u64,
    opts: &CreateOptions,
) -> Result<()> {
    let _ = (storage, path, size, opts);
    Err(Error::unsupported("the vdi driver is not built yet"))
}
