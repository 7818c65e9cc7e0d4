//! The guest view every image driver offers: [`BlockDevice`].

use crate::qcow2::{Snapshot, SnapshotSpec};
use crate::Result;
use std::ffi::{OsStr, OsString};
use std::sync::Arc;
use strata_storage::Storage;

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
    /// Switch the syncs between the steps of the device's own metadata
    /// updates off (`false`) or back on. Off, the same bytes land in the same
    /// order, but only [`BlockDevice::flush`] makes them durable: for an image
    /// nobody uses until a copy into it completes (a new convert target),
    /// whose crash leaves an unfinished copy either way. The default, for
    /// devices without such steps, does nothing.
    fn set_write_barriers(&self, on: bool) -> Result<()> {
        let _ = on;
        Ok(())
    }
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
    /// The smallest guest range whose allocation `block_status` tells apart (the
    /// subcluster size of a qcow2 image with extended L2 entries, else the cluster
    /// size); `None` when the format has no allocation unit of its own.
    fn allocation_unit(&self) -> Option<u64> {
        self.cluster_size()
    }
    /// Write everything out and leave the image file clean (for qcow2: metadata
    /// flushed and the dirty bit this session set cleared), reporting errors that
    /// dropping the device would swallow. The device stays usable. A read-only
    /// device has nothing to write: `Ok(())`. The default flushes.
    fn close(&self) -> Result<()> {
        if self.read_only() {
            Ok(())
        } else {
            self.flush()
        }
    }
    /// The host file whose offsets `block_status` reports (`Status::Data`'s
    /// `host_offset`), for callers that map or probe it directly; `None` when the
    /// device is not backed by one file in that way.
    fn host_file(&self) -> Option<&Arc<dyn Storage>> {
        None
    }
    /// Internal snapshots, when the format keeps them inside the image (qcow2).
    fn internal_snapshots(&self) -> Option<&dyn InternalSnapshots> {
        None
    }
    /// The backing-file link and the emptying an overlay format offers (qcow2).
    fn overlay(&self) -> Option<&dyn Overlay> {
        None
    }
    /// Downcast support for format-specific operations that have no capability
    /// trait (inspection of a format's own structures); prefer the capabilities.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Snapshots kept inside the image file (qcow2's snapshot table).
///
/// Contracts:
/// - a `key` names a snapshot by ID, or failing that by name (the first with it),
///   as qemu-img resolves its argument;
/// - `create`, `apply` and `delete` refuse a read-only image (`ReadOnly`) and an
///   unknown key (`InvalidArgument`), and order their writes so that a crash
///   leaves the image as before or as after (leaked clusters at worst);
/// - `create` takes the name as given: naming rules (unique, non-empty) belong to
///   the caller, since qemu-img itself accepts any name.
pub trait InternalSnapshots {
    /// The snapshot table, in table order.
    fn list(&self) -> Vec<Snapshot>;
    /// Snapshot the current disk (with `spec.vm_state`, if any).
    fn create(&self, spec: &SnapshotSpec) -> Result<Snapshot>;
    /// Revert the disk to snapshot `key`; the current state is lost.
    fn apply(&self, key: &str) -> Result<()>;
    /// Delete snapshot `key`, freeing what only it used; returns what it was.
    fn delete(&self, key: &str) -> Result<Snapshot>;
    /// A read-only device showing snapshot `key` as a disk, with no backing
    /// attached (the caller attaches this image's backing to read through it).
    fn view(&self, key: &str) -> Result<Arc<dyn BlockDevice>>;
}

/// What an overlay format records about its backing file, and the emptying that
/// makes it show only that file.
///
/// Contracts: `set_backing_file` changes only the pointer, in one write of the
/// header area, flushed before it returns: the caller makes the guest view right
/// first (copies data), so a crash shows the old chain or the new one. `make_empty`
/// writes the cleared mapping before any reference drops, so a crash leaks at worst.
pub trait Overlay {
    /// The backing file name exactly as recorded (not necessarily UTF-8), if any.
    fn backing_name(&self) -> Option<OsString>;
    /// The backing file format as recorded, if any.
    fn backing_format(&self) -> Option<String>;
    /// Whether the format defines a backing file whose format is not recorded
    /// as one to probe (qed: only a raw backing file's format is recorded).
    /// Formats that record their backing format, or should, say `false`: the
    /// chain then refuses to guess.
    fn backing_format_probed(&self) -> bool {
        false
    }
    /// Record a new backing file name and format, or none (`name` = `None`, which
    /// also drops the format).
    fn set_backing_file(&self, name: Option<&OsStr>, format: Option<&str>) -> Result<()>;
    /// Drop every guest range this image stores, so that all reads fall through to
    /// the backing file (what `qemu-img commit` leaves in the top image).
    fn make_empty(&self) -> Result<()>;
}

/// Check that `[offset, offset+len)` lies inside a disk of `size` bytes.
/// Whether `[offset, offset+len)` of `dev` reads as zeroes by what the chain's
/// metadata says, without reading any data: zero runs, holes, ranges no layer
/// stores and ranges past a backing device's end. Stored data, even of zero
/// bytes, is not known to be zeroes. (QEMU's "is zero, fast" test.)
pub fn reads_zero_by_status(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<bool> {
    let end = offset.saturating_add(len).min(dev.virtual_size());
    let mut pos = offset;
    while pos < end {
        let e = dev.block_status(pos, end - pos)?;
        match e.status {
            Status::Zero { .. } => {}
            Status::Unallocated => {
                let zero = match dev.backing() {
                    Some(b) => reads_zero_by_status(b.as_ref(), pos, e.len)?,
                    None => true,
                };
                if !zero {
                    return Ok(false);
                }
            }
            Status::Data { .. } => return Ok(false),
        }
        pos += e.len.max(1);
    }
    Ok(true)
}

pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::out_of_range(format!(
            "request at offset {offset} length {len} is outside the image size {size}"
        ))),
    }
}
