//! QEMU's `vpc` format: Microsoft's Virtual PC / Hyper-V VHD (fixed and dynamic disks).
//!
//! The driver's contract (the same for every foreign format, see
//! [`crate::Format`]): [`probe`] decides from a file's first bytes as
//! QEMU's probe does, [`open`] gives the guest view, [`create`] writes a
//! new empty image as qemu-img's `create -f vpc` does.
//!
//! Layout: a dynamic disk is a footer copy, the dynamic disk header, the
//! block allocation table (BAT), then blocks (a sector bitmap, then the
//! block's data) in allocation order, and the footer last; a fixed disk is
//! the disk's bytes, then the footer.

mod footer;
mod geometry;
mod image;

pub use footer::{DynHeader, Footer};
pub use geometry::{calculate as chs_geometry, rounded as rounded_size, Chs};
pub use image::VpcImage;

use crate::{BlockDevice, Error, Result};
use footer::{DYN_HEADER_SIZE, FOOTER_COOKIE, FOOTER_SIZE, TYPE_DYNAMIC, TYPE_FIXED, VHD_EPOCH};
use std::path::Path;
use std::sync::Arc;
use strata_storage::Storage;

/// The block size of the dynamic disks qemu-img creates.
pub const DEFAULT_BLOCK_SIZE: u32 = 0x20_0000;

/// Whether `head` (the first up to 2048 bytes of a file, fewer when it is
/// shorter) is a vpc image, as QEMU's probe would choose this driver: the
/// footer's cookie at offset 0. A fixed disk, whose footer is only at its
/// end, probes as raw (as in QEMU).
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(FOOTER_COOKIE)
}

/// The options of `create -f vpc -o ...`, parsed and checked by the caller.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateOptions {
    /// `subformat=fixed` (else dynamic).
    pub fixed: bool,
    /// `force_size=on`: the size as given, not rounded to a CHS geometry.
    pub force_size: bool,
}

/// Open the image on `storage`; `path` is its file name (companion files are
/// found relative to it). `write`: open for writing.
pub fn open(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    write: bool,
) -> Result<Arc<dyn BlockDevice>> {
    let _ = path;
    Ok(Arc::new(VpcImage::open(storage, write)?))
}

/// The size in bytes a new image of `size` bytes gets: rounded up to whole
/// sectors, then (without `force_size`) up to the smallest CHS geometry
/// that covers it, as qemu-img rounds it. Past 2040 GiB it is refused with
/// qemu-img's words.
pub fn created_size(size: u64, force_size: bool) -> Result<u64> {
    let too_large = || Error::invalid_argument("The image size is too large for file format 'vpc'");
    let size = size.checked_next_multiple_of(512).ok_or_else(too_large)?;
    if size / 512 > geometry::MAX_SECTORS {
        return Err(too_large());
    }
    Ok(geometry::rounded(size, force_size).1 * 512)
}

/// Write a new, empty image of `size` guest bytes on `storage` (an empty
/// file, `path` its name), as `qemu-img create -f vpc` lays it out: the
/// size rounded as [`created_size`] says; a dynamic disk of 2 MiB blocks
/// (footer, header, BAT of unallocated entries, footer) or a fixed disk (the
/// size's bytes, sparse, then the footer). The timestamp is now and the
/// UUID random, as in QEMU.
pub fn create(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    size: u64,
    opts: &CreateOptions,
) -> Result<()> {
    let size = created_size(size, opts.force_size)?;
    let (chs, sectors) = geometry::rounded(size, opts.force_size);
    let creator: &[u8; 4] = if opts.force_size { b"qem2" } else { b"qemu" };
    let disk_type = if opts.fixed { TYPE_FIXED } else { TYPE_DYNAMIC };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // The field is 32 bits wide; QEMU truncates likewise.
    #[allow(clippy::cast_possible_truncation)]
    let timestamp = now.wrapping_sub(VHD_EPOCH) as u32;
    let mut uuid = [0u8; 16];
    crate::crypto::random(&mut uuid)?;
    uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4
    uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
    let footer = Footer::new(creator, size, chs, disk_type, timestamp, uuid);
    let fail = |e: strata_storage::Error| Error::from(e).at(path);
    let write = |buf: &[u8], at: u64| storage.write_at(buf, at).map_err(fail);
    if opts.fixed {
        storage.set_size(size + FOOTER_SIZE as u64).map_err(fail)?;
        // QEMU's file driver writes the first block of a file it grows from
        // empty, so that the file system reports it as data.
        let first = crate::units::index(size.min(4096));
        if first > 0 {
            write(&vec![0u8; first], 0)?;
        }
        write(&footer.raw, size)?;
        return storage.flush().map_err(fail);
    }
    let entries = sectors.div_ceil(u64::from(DEFAULT_BLOCK_SIZE) / 512);
    let bat_len = (entries * 4).next_multiple_of(512);
    let bat_offset = (FOOTER_SIZE + DYN_HEADER_SIZE) as u64;
    let header = DynHeader {
        table_offset: bat_offset,
        // At most 2040 GiB / 2 MiB entries.
        max_table_entries: u32::try_from(entries).map_err(|_| {
            Error::invalid_argument("The image size is too large for file format 'vpc'")
        })?,
        block_size: DEFAULT_BLOCK_SIZE,
    };
    write(&footer.raw, 0)?;
    write(&footer.raw, bat_offset + bat_len)?;
    write(&vec![0xff; crate::units::index(bat_len)], bat_offset)?;
    write(&header.to_bytes(), FOOTER_SIZE as u64)?;
    storage.flush().map_err(fail)
}
