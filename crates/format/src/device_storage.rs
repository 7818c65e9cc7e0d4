//! A guest view as a store: [`DeviceStorage`] serves the bytes of an opened
//! image (and its chain) to whatever is layered on top, as QEMU lets a filter
//! or a format node sit over another format node (`blkdebug` over a qcow2
//! image, a raw image above that). Requests go through the image's engine:
//! reads see its guest data, writes allocate in it, its size is the virtual size.

use crate::{BlockDevice, Status};
use std::path::PathBuf;
use std::sync::Arc;
use strata_storage::{Error, Result, Storage};

/// The guest data of `device` as a [`Storage`].
pub struct DeviceStorage {
    device: Arc<dyn BlockDevice>,
    /// The image's name in error messages.
    name: PathBuf,
}

impl DeviceStorage {
    /// Serve `device`'s guest data; `name` names it in messages.
    pub fn new(device: Arc<dyn BlockDevice>, name: impl Into<PathBuf>) -> Self {
        DeviceStorage {
            device,
            name: name.into(),
        }
    }

    /// The image whose guest data this serves.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// A failure of the image's engine as a storage failure: the storage error
    /// that caused it when there is one (the OS's words survive), else the
    /// engine's message as an I/O error of the operation `op`.
    fn err(&self, op: &'static str, e: crate::Error) -> Error {
        match e.into_storage_error() {
            Ok(s) => s,
            Err(e) => Error::Io {
                op,
                path: self.name.clone(),
                source: match e.raw_os_error() {
                    Some(n) => std::io::Error::from_raw_os_error(n),
                    None => std::io::Error::other(e.to_string()),
                },
            },
        }
    }

    /// The part of `[offset, offset + len)` inside the guest disk.
    fn inside(&self, offset: u64, len: u64) -> u64 {
        self.device.virtual_size().saturating_sub(offset).min(len)
    }
}

impl Storage for DeviceStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // Past the end reads as zeroes, as the Storage contract says.
        let n = crate::units::index(self.inside(offset, buf.len() as u64));
        let (head, tail) = buf.split_at_mut(n);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        self.device
            .read(head, offset)
            .map_err(|e| self.err("Could not read", e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.device
            .write(buf, offset)
            .map_err(|e| self.err("Could not write", e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.device
            .write_zeroes(offset, len, false)
            .map_err(|e| self.err("Could not write zeroes to", e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // Discarded ranges must read as zeroes: zeroes the image may unmap.
        self.device
            .write_zeroes(offset, len, true)
            .map_err(|e| self.err("Could not discard", e))
    }

    fn flush(&self) -> Result<()> {
        self.device
            .flush()
            .map_err(|e| self.err("Could not flush", e))
    }

    fn size(&self) -> Result<u64> {
        Ok(self.device.virtual_size())
    }

    fn set_size(&self, size: u64) -> Result<()> {
        if size == self.device.virtual_size() {
            return Ok(());
        }
        self.device
            .resize(size, true)
            .map_err(|e| self.err("Could not resize", e))
    }

    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.device
            .allocated_bytes()
            .map_err(|e| self.err("Could not stat", e))
    }

    fn read_only(&self) -> bool {
        self.device.read_only()
    }

    /// The image's name (its file's path), naming it in errors.
    fn path(&self) -> Option<&std::path::Path> {
        Some(&self.name)
    }

    /// A range the image (this layer) stores as zeroes is a hole; anything
    /// else (data, or unallocated here and read from a backing file) may hold data.
    fn probe_data(&self, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        let len = self.inside(offset, max_len);
        if len == 0 {
            return Ok((false, max_len.max(1)));
        }
        let ext = self
            .device
            .block_status(offset, len)
            .map_err(|e| self.err("Could not read the block status of", e))?;
        let data = !matches!(ext.status, Status::Zero { .. });
        Ok((data, ext.len.clamp(1, max_len)))
    }
}
