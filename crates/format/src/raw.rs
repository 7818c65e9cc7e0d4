//! The raw driver: guest offset = host offset; holes in the file read as zeroes.

use crate::error::{request, Operation};
use crate::{check_range, BlockDevice, Error, Extent, Result, Status};
use std::sync::{Arc, RwLock};
use strata_storage::sync;
use strata_storage::{DebugEvent, Storage};

/// A raw image: the file is the disk.
pub struct RawImage {
    storage: Arc<dyn Storage>,
    size: RwLock<u64>,
}

impl RawImage {
    /// Open a raw image; its virtual size is the file's size rounded up to whole
    /// 512-byte sectors, as QEMU sees it (the tail past the file's end reads as zeroes).
    pub fn open(storage: Arc<dyn Storage>) -> Result<Self> {
        let size = storage.size()?.div_ceil(512) * 512;
        Ok(RawImage {
            storage,
            size: RwLock::new(size),
        })
    }

    /// Create a raw image of `size` bytes rounded up to whole 512-byte sectors
    /// (the file's length then, as QEMU's file driver creates it), preallocated
    /// as asked.
    pub fn create(
        storage: Arc<dyn Storage>,
        size: u64,
        prealloc: crate::qcow2::Preallocation,
    ) -> Result<Self> {
        use crate::qcow2::Preallocation as P;
        let size = size
            .checked_next_multiple_of(512)
            .ok_or_else(|| Error::out_of_range("The image size is too large"))?;
        storage.set_size(0)?;
        fill(storage.as_ref(), 0, size, prealloc)?;
        // As QEMU does, write the first block so that the file system reports it as
        // data (tools probe the alignment there).
        let first = crate::units::index(size.min(4096));
        if first > 0 && prealloc != P::Full {
            storage.write_at(&vec![0u8; first], 0)?;
        }
        Self::open(storage)
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Grow the disk to `new_size` (larger than the file), the new range
    /// preallocated as `mode` asks, as QEMU's file driver truncates: from the
    /// file's length, and a file that was empty gets its first block written
    /// (see [`first_block`]) unless `full` wrote it already.
    pub fn grow_preallocated(
        &self,
        new_size: u64,
        mode: crate::qcow2::Preallocation,
    ) -> Result<()> {
        request(Operation::Resize, None, || {
            let len = self.storage.size().map_err(|e| self.err(e))?;
            if new_size > len {
                fill(self.storage.as_ref(), len, new_size - len, mode).map_err(|e| self.err(e))?;
                if len == 0 && mode != crate::qcow2::Preallocation::Full {
                    first_block(self.storage.as_ref(), new_size).map_err(|e| self.err(e))?;
                }
            }
            *sync::write(&self.size) = new_size;
            Ok(())
        })
    }

    /// Zero `[offset, offset + len)` by giving its blocks back to the host;
    /// `false` if the storage cannot (nothing changed).
    fn unmap(&self, offset: u64, len: u64) -> Result<bool> {
        self.storage
            .write_zeroes_unmap(offset, len)
            .map_err(|e| self.err(e))
    }

    fn err(&self, e: impl Into<Error>) -> Error {
        e.into().at(self.storage.path())
    }
}

/// Write zeroes over the first block of an empty file grown to `size`, as
/// QEMU's file driver does so that the file system reports it as data (tools
/// probe the alignment there): a sector when `size` is below 4 KiB (which
/// makes a shorter file a sector long), else 4 KiB.
fn first_block(storage: &dyn Storage, size: u64) -> Result<()> {
    let n = if size < 4096 { 512 } else { 4096 };
    storage.write_at(&[0u8; 4096][..n], 0)?;
    Ok(())
}

/// Give `storage` the range `[offset, offset + len)` as `prealloc` asks, growing
/// it to `offset + len`: its size only (`off`, `metadata`), allocated space
/// (`falloc`), or zeroes written (`full`). Shared by the formats whose data
/// follows a fixed header (raw, luks).
pub(crate) fn fill(
    storage: &dyn Storage,
    offset: u64,
    len: u64,
    prealloc: crate::qcow2::Preallocation,
) -> Result<()> {
    use crate::qcow2::Preallocation as P;
    let end = offset
        .checked_add(len)
        .ok_or_else(|| Error::out_of_range("The image size is too large"))?;
    match prealloc {
        P::Off | P::Metadata => storage.set_size(end)?,
        P::Falloc => storage.preallocate(offset, len)?,
        P::Full => {
            let zeros = vec![0u8; 1 << 20];
            let mut off = offset;
            while off < end {
                let n = crate::units::index((end - off).min(zeros.len() as u64));
                storage.write_at(&zeros[..n], off)?;
                off += n as u64;
            }
            storage.set_size(end)?;
        }
    }
    Ok(())
}

impl BlockDevice for RawImage {
    fn format_name(&self) -> &'static str {
        "raw"
    }
    fn virtual_size(&self) -> u64 {
        *sync::read(&self.size)
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        request(Operation::Read, Some(offset), || {
            check_range(offset, buf.len() as u64, self.virtual_size())?;
            self.storage.debug_event(DebugEvent::ReadAio);
            self.storage.read_at(buf, offset).map_err(|e| self.err(e))
        })
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        request(Operation::Write, Some(offset), || {
            check_range(offset, buf.len() as u64, self.virtual_size())?;
            self.storage.debug_event(DebugEvent::WriteAio);
            self.storage.write_at(buf, offset).map_err(|e| self.err(e))
        })
    }
    /// With `may_unmap`, the range's blocks are given back to the host (a punched
    /// hole) where it can, else zeroed as without it (allocation kept, or zero
    /// bytes written), as QEMU's file driver does: either way the range reads
    /// as zeroes, and is durable at the next flush.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        request(Operation::WriteZeroes, Some(offset), || {
            check_range(offset, len, self.virtual_size())?;
            if may_unmap && self.unmap(offset, len)? {
                return Ok(());
            }
            self.storage
                .write_zeroes(offset, len)
                .map_err(|e| self.err(e))
        })
    }
    /// [`Self::write_zeroes`] done without writing zero bytes (a punched hole,
    /// or a zeroed allocation), or not at all (`Ok(false)`).
    fn write_zeroes_fast(&self, offset: u64, len: u64, may_unmap: bool) -> Result<bool> {
        request(Operation::WriteZeroes, Some(offset), || {
            check_range(offset, len, self.virtual_size())?;
            if may_unmap && self.unmap(offset, len)? {
                return Ok(true);
            }
            self.storage
                .write_zeroes_fast(offset, len)
                .map_err(|e| self.err(e))
        })
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        request(Operation::Discard, Some(offset), || {
            check_range(offset, len, self.virtual_size())?;
            self.storage.discard(offset, len).map_err(|e| self.err(e))
        })
    }
    fn flush(&self) -> Result<()> {
        request(Operation::Flush, None, || {
            self.storage.debug_event(DebugEvent::FlushToOs);
            self.storage.debug_event(DebugEvent::FlushToDisk);
            self.storage.flush().map_err(|e| self.err(e))
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        request(Operation::BlockStatus, Some(offset), || {
            check_range(offset, len, self.virtual_size())?;
            let file_len = self.storage.size().map_err(|e| self.err(e))?;
            if offset >= file_len {
                return Ok(Extent {
                    offset,
                    len,
                    status: Status::Zero {
                        host_offset: Some(offset),
                    },
                });
            }
            let (data, n) = self
                .storage
                .probe_data(offset, len.min(file_len - offset))
                .map_err(|e| self.err(e))?;
            let status = if data {
                Status::Data {
                    host_offset: Some(offset),
                    compressed: false,
                }
            } else {
                Status::Zero {
                    host_offset: Some(offset),
                }
            };
            Ok(Extent {
                offset,
                len: n.max(1).min(len),
                status,
            })
        })
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }
    fn set_backing(&self, _backing: Option<Arc<dyn BlockDevice>>) {}
    fn read_only(&self) -> bool {
        self.storage.read_only()
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.storage.allocated_bytes().map_err(|e| self.err(e))
    }
    fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        request(Operation::Resize, None, || {
            let cur = self.virtual_size();
            if new_size < cur && !allow_shrink {
                return Err(Error::invalid_argument(format!(
                    "Shrinking the image from {cur} to {new_size} bytes was not allowed"
                )));
            }
            let len = self.storage.size().map_err(|e| self.err(e))?;
            self.storage.set_size(new_size).map_err(|e| self.err(e))?;
            if len == 0 && new_size > 0 {
                first_block(self.storage.as_ref(), new_size).map_err(|e| self.err(e))?;
            }
            *sync::write(&self.size) = new_size;
            Ok(())
        })
    }
    fn path(&self) -> Option<std::path::PathBuf> {
        self.storage.path().map(|p| p.to_path_buf())
    }
    fn host_file(&self) -> Option<&Arc<dyn Storage>> {
        Some(&self.storage)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
