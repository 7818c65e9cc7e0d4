//! An NBD export as a [`Storage`] backend: the engine opens a disk served by any
//! NBD server as it opens a file (raw or qcow2 bytes alike). Reads, writes,
//! write-zeroes, discard and flush go to the server; the size is the export's and
//! cannot change; holes come from a block-status context.

use crate::client::{Client, StatusExtent};
use crate::proto::{CONTEXT_BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};
use std::path::PathBuf;
use std::sync::Mutex;
use strata_storage::{sync, Error, Result, Storage};

/// One connection to one export, shared by the engine's threads (requests are
/// sent one at a time).
pub struct NbdStorage {
    client: Mutex<Client>,
    size: u64,
    read_only: bool,
    /// The block-status context holes are read from, when the server agreed to it.
    context: Option<String>,
    /// The export's name in error messages (its canonical URL).
    name: PathBuf,
    /// Whether [`Storage::set_size`] to a size within the export succeeds
    /// without effect (see [`NbdStorage::device_like`]).
    device_like: bool,
}

/// How the flags of one block-status extent read as allocation, QEMU's way for
/// any context: a hole bit set means no data; a zero bit, reads as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub data: bool,
    pub zero: bool,
}

impl From<StatusExtent> for Allocation {
    fn from(e: StatusExtent) -> Self {
        Allocation {
            data: e.flags & STATE_HOLE == 0,
            zero: e.flags & STATE_ZERO != 0,
        }
    }
}

impl NbdStorage {
    /// Wrap a connected client; holes are read from `context` (`base:allocation`
    /// when `None`) if the server agreed to it, else every byte may hold data.
    /// `name` names the export in messages.
    pub fn new(client: Client, context: Option<&str>, name: impl Into<PathBuf>) -> Self {
        let context = context.unwrap_or(CONTEXT_BASE_ALLOCATION);
        NbdStorage {
            size: client.size(),
            read_only: client.read_only(),
            context: client.has_context(context).then(|| context.to_string()),
            client: Mutex::new(client),
            name: name.into(),
            device_like: false,
        }
    }

    /// Make resizing to any size up to the export's succeed without effect, as
    /// for a block device: the size stays the export's. This is how an image is
    /// formatted onto an export (QEMU's NBD driver takes an inexact truncation
    /// alike); growing past the export still fails.
    pub fn device_like(mut self) -> Self {
        self.device_like = true;
        self
    }

    /// The context holes are read from, if the server agreed to one.
    pub fn context(&self) -> Option<&str> {
        self.context.as_deref()
    }

    /// The allocation of the bytes at `offset`, and for how many bytes (at least
    /// 1, at most `max_len`) it holds; data everywhere without a context.
    pub fn allocation(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64)> {
        let all_data = Allocation {
            data: true,
            zero: false,
        };
        let (Some(ctx), true) = (&self.context, max_len > 0) else {
            return Ok((all_data, max_len.max(1)));
        };
        let extents = sync::lock(&self.client)
            .block_status(ctx, offset, max_len)
            .map_err(|e| self.err("Could not read the block status of", e))?;
        let first = extents[0];
        Ok((first.into(), first.len.clamp(1, max_len)))
    }

    /// A failed request as a storage error naming the export. A connection the
    /// server dropped (it exited, say) is EIO, as QEMU's NBD driver reports it.
    fn err(&self, op: &'static str, e: crate::Error) -> Error {
        use std::io::ErrorKind as K;
        let source = match e {
            crate::Error::Io(io)
                if matches!(
                    io.kind(),
                    K::UnexpectedEof | K::BrokenPipe | K::ConnectionReset | K::ConnectionAborted
                ) =>
            {
                std::io::Error::from_raw_os_error(libc::EIO)
            }
            crate::Error::Io(io) => io,
            other => std::io::Error::other(other.to_string()),
        };
        Error::Io {
            op,
            path: self.name.clone(),
            source,
        }
    }

    fn check_write(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }
}

impl Storage for NbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // Past the export's end reads as zeroes, as the Storage contract says.
        let inside = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        sync::lock(&self.client)
            .read(head, offset)
            .map_err(|e| self.err("Could not read", e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write()?;
        self.check_inside(offset, buf.len() as u64)?;
        sync::lock(&self.client)
            .write(buf, offset)
            .map_err(|e| self.err("Could not write", e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write()?;
        self.check_inside(offset, len)?;
        sync::lock(&self.client)
            .write_zeroes(offset, len, false)
            .map_err(|e| self.err("Could not write zeroes to", e))
    }

    /// Zeroes the server may punch (no NO_HOLE flag), as QEMU's NBD client sends
    /// a write of zeroes that may unmap; the server decides what it frees. A
    /// server without write-zeroes cannot (`Ok(false)`, nothing sent).
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<bool> {
        self.check_write()?;
        self.check_inside(offset, len)?;
        let mut client = sync::lock(&self.client);
        if !client.can_write_zeroes() {
            return Ok(false);
        }
        client
            .write_zeroes(offset, len, true)
            .map_err(|e| self.err("Could not write zeroes to", e))?;
        Ok(true)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // Discarded ranges must read as zeroes: zeroes the server may punch.
        self.check_write()?;
        self.check_inside(offset, len)?;
        sync::lock(&self.client)
            .write_zeroes(offset, len, true)
            .map_err(|e| self.err("Could not discard", e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        sync::lock(&self.client)
            .flush()
            .map_err(|e| self.err("Could not flush", e))
    }

    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn set_size(&self, size: u64) -> Result<()> {
        if size == self.size || (self.device_like && size < self.size) {
            return Ok(());
        }
        Err(Error::Io {
            op: "Could not resize",
            path: self.name.clone(),
            source: std::io::Error::from_raw_os_error(libc::ENOTSUP),
        })
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn probe_data(&self, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        let (a, n) = self.allocation(offset, max_len)?;
        Ok((a.data, n))
    }
}

impl NbdStorage {
    /// An export cannot grow: a write past its end is refused, not sent.
    fn check_inside(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len }),
        }
    }
}
