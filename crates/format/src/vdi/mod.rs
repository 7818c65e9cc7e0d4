//! QEMU's `vdi` format: VirtualBox disk images (dynamic and static).
//!
//! The driver's contract (the same for every foreign format, see
//! [`crate::Format`]): [`probe`] decides from a file's first bytes as
//! QEMU's probe does, [`open`] gives the guest view, [`create`] writes a
//! new empty image as qemu-img's `create -f vdi` does.
//!
//! Layout: a 512-byte [`header`], the block map (one 32-bit entry per 1 MiB
//! guest block, whole sectors), then the data blocks ([`image`]);
//! [`VdiImage::check`] is `qemu-img check -f vdi`. QEMU cannot resize a vdi
//! image, nor can this driver.

mod bmap;
mod check;
pub mod header;
mod image;

pub use check::{CheckReport, MAX_KEPT_ERRORS};
pub use header::Header;
pub use image::VdiImage;

use crate::units::index;
use crate::{BlockDevice, Error, Result};
use header::{bmap_bytes, size_too_large, BLOCK_SIZE, SECTOR_SIZE, UNALLOCATED};
use std::path::Path;
use std::sync::Arc;
use strata_storage::Storage;

/// Whether `head` (the first up to 2048 bytes of a file, fewer when it is
/// shorter) is a vdi image, as QEMU's probe would choose this driver.
pub fn probe(head: &[u8]) -> bool {
    header::probe(head)
}

/// The options of `create -f vdi -o ...`, parsed and checked by the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// `static=on`: every block allocated at creation.
    pub static_image: bool,
}

/// Open the image on `storage`; `path` is its file name (companion files are
/// found relative to it). `write`: open for writing.
///
/// The header is checked as QEMU checks it, with its messages
/// ("unsupported VDI image (...)", "Image not in VDI format (...)", ...).
pub fn open(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    write: bool,
) -> Result<Arc<dyn BlockDevice>> {
    let image = VdiImage::open(storage, path.map(Path::to_path_buf), write)?;
    Ok(Arc::new(image))
}

/// Write a new, empty image of `size` guest bytes on `storage` (an empty
/// file, `path` its name), as `qemu-img create -f vdi` lays it out.
///
/// The size is rounded up to whole sectors; above QEMU's limit it is refused
/// with QEMU's message. A dynamic image is its header and block map (every
/// entry unallocated); a static one maps block `i` to data block `i` and the
/// file is extended over all blocks without writing them (sparse), as QEMU
/// truncates it.
pub fn create(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    size: u64,
    opts: &CreateOptions,
) -> Result<()> {
    let _ = path;
    let size = size
        .checked_next_multiple_of(SECTOR_SIZE)
        .ok_or_else(|| size_too_large(size))?;
    let head = Header::new_image(size, opts.static_image)?;
    let blocks = head.blocks_in_image;
    storage.set_size(0)?;
    storage.write_at(&head.to_bytes(), 0)?;
    // The map, written a chunk at a time (a large disk's map is large).
    let map_len = bmap_bytes(blocks);
    let chunk_entries: u32 = 1 << 18;
    let mut first: u32 = 0;
    let mut at = head.offset_bmap;
    while u64::from(first) * 4 < map_len {
        let n = chunk_entries.min(blocks.saturating_sub(first));
        let end = (u64::from(first) * 4 + u64::from(chunk_entries) * 4).min(map_len);
        let mut bytes = vec![0u8; index(end - u64::from(first) * 4)];
        for (i, e) in bytes.chunks_exact_mut(4).take(index(n.into())).enumerate() {
            let block = first + u32::try_from(i).map_err(|_| size_too_large(size))?;
            let v = if opts.static_image {
                block
            } else {
                UNALLOCATED
            };
            e.copy_from_slice(&v.to_le_bytes());
        }
        storage.write_at(&bytes, at)?;
        at += bytes.len() as u64;
        first = first.saturating_add(chunk_entries);
    }
    if opts.static_image {
        let end = u64::from(blocks)
            .checked_mul(BLOCK_SIZE)
            .and_then(|d| d.checked_add(head.offset_data))
            .ok_or_else(|| size_too_large(size))?;
        storage
            .set_size(end)
            .map_err(|e| Error::from(e).in_step("Failed to statically allocate file"))?;
    }
    Ok(())
}
