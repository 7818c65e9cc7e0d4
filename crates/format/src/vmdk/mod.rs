//! QEMU's `vmdk` format: VMware disks (sparse, stream-optimized and flat extents, a text descriptor).
//!
//! The driver's contract (the same for every foreign format, see
//! [`crate::Format`]): [`probe`] decides from a file's first bytes as
//! QEMU's probe does, [`open`] gives the guest view, [`create`] writes a
//! new empty image as qemu-img's `create -f vmdk` does.

mod create;
mod descriptor;
mod extent;
mod header;
mod image;

pub use image::{ExtentInfo, VmdkImage};

use crate::qcow2::CheckReport;
use crate::{BlockDevice, Result};
use std::path::Path;
use std::sync::Arc;
use strata_storage::Storage;

/// Whether `head` (the first up to 2048 bytes of a file, fewer when it is
/// shorter) is a vmdk image, as QEMU's probe would choose this driver.
pub fn probe(head: &[u8]) -> bool {
    let m = header::magic(head);
    if head.len() < 4 {
        return false;
    }
    if m == header::KDMV_MAGIC || m == header::COWD_MAGIC {
        return true;
    }
    probe_descriptor(head)
}

/// Whether the vmdk file whose first bytes are `head` holds the whole disk
/// itself: a sparse extent (a `KDMV` or `COWD` header) with its own grains.
/// A text descriptor, or a sparse header that only carries a descriptor
/// (capacity 0), names extent files that [`open`] would read, by absolute
/// names too; such a file is not self-contained. A sparse file can still
/// name a parent ([`VmdkImage::parent_file_name`]).
pub fn is_self_contained(head: &[u8]) -> bool {
    let m = header::magic(head);
    if m == header::COWD_MAGIC {
        return true;
    }
    if m != header::KDMV_MAGIC || head.len() < 4 {
        return false;
    }
    // A header that does not parse is refused by the open itself.
    header::SparseHeader::parse(&head[4..])
        .map_or(true, |h| !(h.capacity == 0 && h.desc_offset != 0))
}

/// QEMU's test for a text descriptor: comment lines and blank lines (of
/// spaces) may come first; then the text must start with `version=1`, `2`
/// or `3` and a line end.
fn probe_descriptor(buf: &[u8]) -> bool {
    let mut p = 0usize;
    let end = buf.len();
    while p < end {
        if buf[p] == b'#' {
            while p < end && buf[p] != b'\n' {
                p += 1;
            }
            p += 1;
            continue;
        }
        if buf[p] == b' ' {
            while p < end && buf[p] == b' ' {
                p += 1;
            }
            if p < end && buf[p] == b'\r' {
                p += 1;
            }
            if p == end || buf[p] != b'\n' {
                return false;
            }
            p += 1;
            continue;
        }
        let rest = &buf[p..];
        for v in [b'1', b'2', b'3'] {
            let mut lf = b"version=X\n".to_vec();
            lf[8] = v;
            let mut crlf = b"version=X\r\n".to_vec();
            crlf[8] = v;
            if rest.starts_with(&lf) || rest.starts_with(&crlf) {
                return true;
            }
        }
        return false;
    }
    false
}

/// What QEMU's `check` of a vmdk image reports: nothing when every
/// allocated grain (and every flat extent) starts inside its file; else
/// the first that does not, as one corruption whose message QEMU prints on
/// stderr, and the failure ("Check failed: ...") it ends with. QEMU's
/// check repairs nothing.
pub fn check(image: &VmdkImage) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    if let Some((msg, failure)) = image.check()? {
        r.corruptions = 1;
        r.messages.push(msg);
        r.failure = Some(failure);
    }
    Ok(r)
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
    Ok(Arc::new(VmdkImage::open(storage, path, write)?))
}

/// Write a new, empty image of `size` guest bytes on `storage` (an empty
/// file, `path` its name), as `qemu-img create -f vmdk` lays it out.
pub fn create(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    size: u64,
    opts: &CreateOptions,
) -> Result<()> {
    create::create(storage, path, size, opts)
}
