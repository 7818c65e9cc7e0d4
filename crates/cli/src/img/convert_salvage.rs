//! `convert --salvage`: a source read that fails is retried one 512-byte
//! sector at a time; each sector that still fails is copied as zeroes, with a
//! warning naming its offset in that source ("error while reading offset N:
//! Input/output error", left out with `-q`), and the copy goes on. The exit
//! code stays 0, as with qemu-img.
//!
//! A failed allocation query is salvaged too, as qemu-img does: the sector
//! it asked about is taken as data (the next query starts at the next
//! sector), with a warning "error while reading block status at offset N:
//! Input/output error". qemu-img asks twice, once to count the work and once
//! while copying (then right before reading the sector); strata asks once,
//! remembers each such sector and, when the copy reads it, says the warning
//! again before the read's own, so the warnings come in qemu-img's order
//! (with one copy request at a time, as strata's salvage runs).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use strata_format::{BlockDevice, Extent, InternalSnapshots, Overlay, Result, Status};
use strata_storage::Storage;

/// The sector a failed read is retried in.
const SECTOR: u64 = 512;

/// A source device whose failed reads are salvaged (see the module's doc).
pub struct Salvaging {
    inner: Arc<dyn BlockDevice>,
    /// `PROG: warning: ` before each warning; `None`: quiet.
    warn: Option<String>,
    /// Sectors (offsets of their first byte) whose allocation query failed.
    unknown: Mutex<BTreeSet<u64>>,
}

impl Salvaging {
    /// `inner`, read with salvage; `warn` is the program's name, or `None` for
    /// no warnings (`-q`).
    pub fn wrap(inner: Arc<dyn BlockDevice>, warn: Option<&str>) -> Arc<dyn BlockDevice> {
        Arc::new(Salvaging {
            inner,
            warn: warn.map(|p| format!("{p}: warning: ")),
            unknown: Mutex::new(BTreeSet::new()),
        })
    }

    /// Say `what` as a warning (unless quiet).
    fn warn(&self, what: std::fmt::Arguments) {
        if let Some(p) = &self.warn {
            eprintln!("{p}{what}");
        }
    }

    /// The sectors in `[offset, offset + len)` whose allocation query failed.
    fn unknown_in(&self, offset: u64, len: u64) -> Vec<u64> {
        let set = self.unknown.lock().unwrap_or_else(|p| p.into_inner());
        let first = offset - offset % SECTOR;
        set.range(first..offset.saturating_add(len))
            .copied()
            .collect()
    }

    /// The words qemu-img gives a failed read: the OS's, or EIO's for a failure
    /// the format found (a compressed cluster that does not decompress).
    fn words(e: strata_format::Error) -> String {
        super::ioerr::os_words(&anyhow::Error::new(e))
            .unwrap_or_else(|| "Input/output error".to_string())
    }
}

impl BlockDevice for Salvaging {
    fn format_name(&self) -> &'static str {
        self.inner.format_name()
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    /// Never fails for a range inside the device: what cannot be read reads as
    /// zeroes, sector by sector. A range past the device's end fails as the
    /// device fails it.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let unknown = self.unknown_in(offset, buf.len() as u64);
        if unknown.is_empty() {
            match self.inner.read(buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // A range outside the device is the caller's mistake, not a
                    // bad sector.
                    let end = offset.checked_add(buf.len() as u64);
                    if end.is_none_or(|end| end > self.inner.virtual_size()) {
                        return Err(e);
                    }
                }
            }
        }
        let mut at = 0usize;
        while at < buf.len() {
            let pos = offset + at as u64;
            // Sectors are counted from the source's start, as qemu-img does.
            let n = ((SECTOR - pos % SECTOR) as usize).min(buf.len() - at);
            let piece = &mut buf[at..at + n];
            let sector = pos - pos % SECTOR;
            if unknown.binary_search(&sector).is_ok() {
                self.warn(format_args!(
                    "error while reading block status at offset {sector}: Input/output error"
                ));
            }
            if let Err(e) = self.inner.read(piece, pos) {
                self.warn(format_args!(
                    "error while reading offset {pos}: {}",
                    Self::words(e)
                ));
                piece.fill(0);
            }
            at += n;
        }
        Ok(())
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.inner.write(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn write_zeroes_fast(&self, offset: u64, len: u64, may_unmap: bool) -> Result<bool> {
        self.inner.write_zeroes_fast(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    /// Never fails for a range inside the device: a failed query takes the
    /// rest of the sector at `offset` as data (warned of the first time).
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let failed = match self.inner.block_status(offset, len) {
            Ok(e) => return Ok(e),
            Err(e) => e,
        };
        if len == 0 || offset >= self.inner.virtual_size() {
            return Err(failed);
        }
        let sector = offset - offset % SECTOR;
        let fresh = {
            let mut set = self.unknown.lock().unwrap_or_else(|p| p.into_inner());
            set.insert(sector)
        };
        if fresh {
            self.warn(format_args!(
                "error while reading block status at offset {sector}: {}",
                Self::words(failed)
            ));
        }
        Ok(Extent {
            offset,
            len: (SECTOR - offset % SECTOR).min(len),
            status: Status::Data {
                host_offset: None,
                compressed: false,
            },
        })
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.inner.backing()
    }
    fn set_backing(&self, backing: Option<Arc<dyn BlockDevice>>) {
        self.inner.set_backing(backing)
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.inner.allocated_bytes()
    }
    fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        self.inner.resize(new_size, allow_shrink)
    }
    fn path(&self) -> Option<PathBuf> {
        self.inner.path()
    }
    fn cluster_size(&self) -> Option<u64> {
        self.inner.cluster_size()
    }
    fn allocation_unit(&self) -> Option<u64> {
        self.inner.allocation_unit()
    }
    fn close(&self) -> Result<()> {
        self.inner.close()
    }
    fn host_file(&self) -> Option<&Arc<dyn Storage>> {
        self.inner.host_file()
    }
    fn internal_snapshots(&self) -> Option<&dyn InternalSnapshots> {
        self.inner.internal_snapshots()
    }
    fn overlay(&self) -> Option<&dyn Overlay> {
        self.inner.overlay()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
