//! An NBD export as a read-only [`BlockDevice`], so the engine's jobs (convert,
//! compare) read a remote disk the way they read an image file: reads go to the
//! export, and allocation comes from its `base:allocation` context (ranges the
//! server reports as zeroes are never read). One connection serves every
//! caller in turn.

use crate::client::Client;
use crate::proto::{CONTEXT_BASE_ALLOCATION as BASE_ALLOCATION, STATE_ZERO};
use std::path::Path;
use std::sync::{Arc, Mutex};
use strata_format::{BlockDevice, Extent, Status};

/// A read-only disk served by an NBD export.
pub struct NbdDevice {
    client: Mutex<Client>,
    size: u64,
    allocation: bool,
}

impl NbdDevice {
    /// Connect to export `export` on the Unix socket `socket`, asking for
    /// `base:allocation` (without it every range counts as data).
    pub fn connect_unix(socket: &Path, export: &str) -> crate::Result<NbdDevice> {
        Ok(Self::new(Client::connect_unix(
            socket,
            export,
            &[BASE_ALLOCATION],
        )?))
    }

    /// The device over an open connection.
    pub fn new(client: Client) -> NbdDevice {
        NbdDevice {
            size: client.size(),
            allocation: client.has_context(BASE_ALLOCATION),
            client: Mutex::new(client),
        }
    }

    fn failed(e: crate::Error) -> strata_format::Error {
        strata_format::Error::new(strata_format::ErrorKind::Io, format!("NBD export: {e}"))
    }
}

impl BlockDevice for NbdDevice {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> strata_format::Result<()> {
        strata_format::check_range(offset, buf.len() as u64, self.size)?;
        strata_storage::sync::lock(&self.client)
            .read(buf, offset)
            .map_err(Self::failed)
    }

    fn write(&self, _: &[u8], _: u64) -> strata_format::Result<()> {
        Err(strata_format::Error::read_only())
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> strata_format::Result<()> {
        Err(strata_format::Error::read_only())
    }

    fn discard(&self, _: u64, _: u64) -> strata_format::Result<()> {
        Err(strata_format::Error::read_only())
    }

    fn flush(&self) -> strata_format::Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> strata_format::Result<Extent> {
        strata_format::check_range(offset, len.max(1), self.size)?;
        let data = Status::Data {
            host_offset: None,
            compressed: false,
        };
        if !self.allocation {
            return Ok(Extent {
                offset,
                len,
                status: data,
            });
        }
        let extents = strata_storage::sync::lock(&self.client)
            .block_status(BASE_ALLOCATION, offset, len)
            .map_err(Self::failed)?;
        let first = extents[0];
        let zero = first.flags & STATE_ZERO != 0;
        // Neighbours of the same kind are one extent.
        let mut reach = first.len;
        for e in &extents[1..] {
            if (e.flags & STATE_ZERO != 0) != zero {
                break;
            }
            reach = reach.saturating_add(e.len);
        }
        Ok(Extent {
            offset,
            len: reach.min(len),
            status: if zero {
                Status::Zero { host_offset: None }
            } else {
                data
            },
        })
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }

    fn set_backing(&self, _: Option<Arc<dyn BlockDevice>>) {}

    fn read_only(&self) -> bool {
        true
    }

    fn allocated_bytes(&self) -> strata_format::Result<Option<u64>> {
        Ok(None)
    }

    fn resize(&self, _: u64, _: bool) -> strata_format::Result<()> {
        Err(strata_format::Error::read_only())
    }

    fn path(&self) -> Option<std::path::PathBuf> {
        None
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
