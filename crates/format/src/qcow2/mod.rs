//! The qcow2 driver (versions 2 and 3), byte-compatible with QEMU.
//!
//! Layout of the module: [`header`] parses and validates the header; [`entries`]
//! decodes L1/L2 entries; `meta` holds the open image's metadata and orders its
//! updates; `refcount` counts and allocates clusters; [`image`] serves the guest view;
//! [`create`] makes new images; [`check`] verifies and repairs; [`snapshot`] reads the
//! snapshot table; [`compress`] is the compressed-cluster codec.

pub mod amend;
#[doc(hidden)]
pub mod barrier;
pub mod bitmap_edit;
pub mod bitmaps;
mod cache;
mod capabilities;
pub mod check;
pub mod compress;
pub mod create;
pub mod data_file;
pub mod encryption;
pub mod entries;
mod fresh;
pub mod header;
pub mod image;
pub mod inspect;
pub mod key_slots;
mod meta;
pub mod open_notice;
mod prealloc;
mod refcount;
mod refcount_area;
pub mod repair_notice;
mod shrink;
pub mod snapshot;
pub mod snapshot_ops;
mod snapshot_switch;
mod snapshot_walk;

pub use check::{CheckReport, Repair};
pub use compress::CompressionType;
pub use create::{create, CreateOptions, Preallocation};
pub use encryption::{EncryptionInfo, Unlock};
pub use header::Header;
pub use image::{Qcow2Image, Qcow2OpenOptions};
pub use inspect::BitmapInfo;
pub use snapshot::Snapshot;
pub use snapshot_ops::SnapshotSpec;

/// Whether `buf` (the start of a file) looks like a qcow2 image.
pub fn probe(buf: &[u8]) -> bool {
    buf.len() >= 4 && u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) == header::MAGIC
}
