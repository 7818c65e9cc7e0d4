//! The guest view every image driver offers: [`BlockDevice`].

use crate::Result;
use std::sync::Arc;

/// What one layer knows about a guest range (its own metadata only; the chain layer
/// resolves `Unallocated` through the backing file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Data stored in this layer. `host_offset` is where it starts in the layer's
    /// file when that is meaningful (not for compressed clusters).
    Data {
        host_offset: Option<u64>,
        compressed: bool,
    },
    /// Reads as zeroes because this layer says so (zero cluster, hole in a raw file).
    /// `host_offset` is set for preallocated zero clusters.
    Zero { host_offset: Option<u64> },
    /// Not stored in this layer: reads come from the backing file (or zeroes).
    Unallocated,
}

/// A run of guest bytes sharing one [`Status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub status: Status,
}

/// A virtual disk: the guest-visible bytes of an image (and its backing chain, once the
/// chain layer has attached it).
///
/// Contracts:
/// - ranges are checked: a request past `virtual_size` is an `OutOfRange` error;
/// - `read` returns exactly what the guest would see, including backing data;
/// - writes are visible to later reads at once and durable after `flush`;
/// - `block_status` describes this layer only and returns an extent that starts at
///   `offset`, is at least one byte and at most `len` long.
pub trait BlockDevice: Send + Sync {
    /// "qcow2", "raw"...
    fn format_name(&self) -> &'static str;
    fn virtual_size(&self) -> u64;
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Make `[offset, offset+len)` read as zeroes; `may_unmap` allows freeing storage.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;
    /// `write_zeroes`, but only if it can be done without writing zero data (by
    /// metadata or an allocation change): NBD's fast-zero request, QEMU's
    /// no-fallback zeroing. `Ok(false)` means it could not, and nothing changed.
    /// The default never can.
    fn write_zeroes_fast(&self, offset: u64, len: u64, may_unmap: bool) -> Result<bool> {
        let _ = (offset, len, may_unmap);
        Ok(false)
    }
    /// Drop data the guest no longer needs. Unlike write-zeroes, later reads may see
    /// backing data or zeroes.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    fn flush(&self) -> Result<()>;
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;
    /// The device reads fall through to for `Unallocated` ranges.
    fn backing(&self) -> Option<Arc<dyn BlockDevice>>;
    /// Attach (or detach) the backing device. Only the chain layer calls this.
    fn set_backing(&self, backing: Option<Arc<dyn BlockDevice>>);
    fn read_only(&self) -> bool;
    /// Bytes the image occupies on the host, if known.
    fn allocated_bytes(&self) -> Result<Option<u64>>;
    /// Change the virtual size. Shrinking must be asked for explicitly.
    fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()>;
    /// The image file's path, if it has one.
    fn path(&self) -> Option<std::path::PathBuf>;
    /// Preferred unit of allocation (the cluster size for qcow2).
    fn cluster_size(&self) -> Option<u64> {
        None
    }
    /// Downcast support for format-specific operations.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Check that `[offset, offset+len)` lies inside a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::out_of_range(format!(
            "request at offset {offset} length {len} is outside the image size {size}"
        ))),
    }
}
