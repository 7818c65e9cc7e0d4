//! The storage layer: moves bytes and nothing else.
//!
//! Every backend implements [`Storage`]: positional reads and writes, write-zeroes,
//! discard, flush, size and resize. Backends:
//! - [`FileStorage`]: a host file or block device, honouring QEMU's byte-range lock
//!   protocol (see [`lock`]);
//! - [`MemStorage`]: an in-memory byte vector, for tests and models;
//! - [`FaultStorage`]: wraps another backend and fails one chosen operation with an errno (EIO,
//!   ENOSPC...), to prove error handling;
//! - [`CrashStorage`]: keeps unflushed changes apart from durable ones and, at a
//!   crash, lets a chosen subset of them (torn at 512-byte sectors) reach the disk,
//!   to prove that metadata is ordered by flushes.
//!
//! - [`BlkdebugStorage`]: QEMU's blkdebug driver: rules that fail operations
//!   once an event the format engine announces ([`DebugEvent`]) has fired.
//!
//! [`sync`] holds the one policy for poisoned locks that every crate follows.

mod blkdebug;
mod crash;
mod debug_event;
mod error;
mod fault;
mod file;
pub mod lock;
mod mem;
pub mod sync;

pub use blkdebug::{BlkdebugConfig, BlkdebugStorage, ConfigError};
pub use crash::{materialise, picks_for, CrashClock, CrashPick, CrashStorage, SECTOR};
pub use debug_event::DebugEvent;
pub use error::{os_message, Error, ErrorKind, Result};
pub use fault::{FaultClock, FaultMode, FaultPlan, FaultStorage};
pub use file::{remove_created, start_writeback, FileStorage, OpenOptions, OutputFile};
pub use lock::LockMode;
pub use mem::MemStorage;

use std::path::Path;

/// A byte-addressed backing store.
///
/// Contracts every backend keeps:
/// - `read_at` fills the whole buffer; bytes past the end of the store read as zeroes
///   (as QEMU's file driver does), so metadata near the end need not be special-cased.
/// - `write_at` writes the whole buffer, growing the store if the write ends past it.
/// - `write_zeroes` and `discard` never change the size; discarded ranges read as zeroes
///   (backends that cannot punch holes write zeroes).
/// - `flush` returns only when every write completed before it is durable.
/// - All methods take `&self`: backends are safe to share between threads.
pub trait Storage: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Zero the range as `write_zeroes` does, but only if the backend can do it
    /// without writing zero bytes (an allocation change such as `fallocate`).
    /// `Ok(false)` means it could not, and nothing was changed. The default never can.
    fn write_zeroes_fast(&self, offset: u64, len: u64) -> Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Zero the range by giving its blocks back to the host (a punched hole that
    /// reads as zeroes; the size is kept), as a write of zeroes that may unmap
    /// does in QEMU's file driver. `Ok(false)` means the backend cannot give
    /// blocks back: nothing was changed, and the caller zeroes the range another
    /// way ([`Storage::write_zeroes`]). Like every write, it is durable once
    /// [`Storage::flush`] returns. The default never can.
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }
    fn flush(&self) -> Result<()>;
    /// Current size in bytes.
    fn size(&self) -> Result<u64>;
    /// Truncate or extend to exactly `size` bytes.
    fn set_size(&self, size: u64) -> Result<()>;
    /// Extend to `size` bytes, allocating space (`fallocate`) where the backend can.
    fn preallocate(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or(Error::OutOfRange { offset, len })?;
        if end > self.size()? {
            self.set_size(end)?;
        }
        Ok(())
    }
    /// Bytes the store occupies on its host (for `actual-size`), if known.
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// The host path, for file-backed stores.
    fn path(&self) -> Option<&Path> {
        None
    }
    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// Whether the bytes at `offset` may hold data (`true`) or are a hole that reads
    /// as zeroes (`false`), and for how many bytes (at least 1, at most `max_len`) that
    /// answer holds. Backends that cannot tell answer `(true, max_len)`.
    fn probe_data(&self, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        let _ = offset;
        Ok((true, max_len))
    }
    /// The open file behind the store, for callers that map it read-only to copy in
    /// bulk without a copy through a buffer (convert). `None` for backends that are
    /// not a host file, and for wrappers that must see every access.
    fn file(&self) -> Option<&std::fs::File> {
        None
    }
    /// The format engine announces that it reached `event` (a metadata update, a
    /// data read...), as QEMU's drivers announce them to the node below. Only a
    /// debugging filter ([`BlkdebugStorage`]) acts on it; wrappers pass it down.
    fn debug_event(&self, event: DebugEvent) {
        let _ = event;
    }
    /// Whether the store acts on the requests it sees and the events announced
    /// to it (a debugging filter such as [`BlkdebugStorage`]), so a reader must
    /// send every guest read through the format engine above it, never around it
    /// (no shortcut that reads the file directly or skips ranges known to be
    /// zero). Wrappers pass it down.
    fn watches_requests(&self) -> bool {
        false
    }
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn write_zeroes_fast(&self, offset: u64, len: u64) -> Result<bool> {
        (**self).write_zeroes_fast(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<bool> {
        (**self).write_zeroes_unmap(offset, len)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn size(&self) -> Result<u64> {
        (**self).size()
    }
    fn set_size(&self, size: u64) -> Result<()> {
        (**self).set_size(size)
    }
    fn preallocate(&self, offset: u64, len: u64) -> Result<()> {
        (**self).preallocate(offset, len)
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        (**self).allocated_bytes()
    }
    fn path(&self) -> Option<&Path> {
        (**self).path()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn probe_data(&self, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        (**self).probe_data(offset, max_len)
    }
    fn file(&self) -> Option<&std::fs::File> {
        (**self).file()
    }
    fn debug_event(&self, event: DebugEvent) {
        (**self).debug_event(event)
    }
    fn watches_requests(&self) -> bool {
        (**self).watches_requests()
    }
}
