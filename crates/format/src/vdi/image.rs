//! An open vdi image: the guest view through the block map.

use super::bmap::{is_allocated, BlockMap};
use super::header::{Header, BLOCK_SIZE, DISCARDED, HEADER_SIZE};
use crate::error::{request, Operation};
use crate::units::index;
use crate::{check_range, BlockDevice, Error, Extent, Result, Status};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use strata_storage::{sync, Storage};

/// What a write changes: the header's allocated-block count and the map.
#[derive(Debug)]
pub(super) struct State {
    pub header: Header,
    pub bmap: BlockMap,
}

/// A vdi image (QEMU's `vdi` driver): a header, a block map, then 1 MiB
/// blocks in the order they were first written.
///
/// Reads of unallocated or discarded blocks give zeroes. A write to an
/// unallocated block appends a block at `offset_data + blocks_allocated *
/// 1 MiB` (written whole, zero-padded), then rewrites the header and the map
/// sectors that changed, as QEMU does (data before the map: a crash leaks a
/// block at worst). Discard does nothing and zero writes store zeroes, as in
/// QEMU, which has neither for this format.
pub struct VdiImage {
    storage: Arc<dyn Storage>,
    path: Option<PathBuf>,
    writable: bool,
    state: RwLock<State>,
    /// Whether closing syncs the file (see [`BlockDevice::set_write_barriers`]).
    barriers: std::sync::atomic::AtomicBool,
}

impl VdiImage {
    /// Open the image on `storage`: the header checked as QEMU checks it, then
    /// the block map read (a file shorter than either reads as zero-padded, as
    /// in QEMU). `write`: writes are allowed (if the storage allows them too).
    pub fn open(storage: Arc<dyn Storage>, path: Option<PathBuf>, write: bool) -> Result<VdiImage> {
        let mut raw = [0u8; HEADER_SIZE];
        storage.read_at(&mut raw, 0)?;
        let header = Header::parse(&raw)?;
        let len = header.bmap_len();
        let file_len = storage.size()?;
        let have = file_len.saturating_sub(header.offset_bmap).min(len);
        let mut bytes = vec![0u8; index(have)];
        storage.read_at(&mut bytes, header.offset_bmap)?;
        let bmap = BlockMap::new(bytes, len, header.blocks_in_image);
        Ok(VdiImage {
            storage,
            path,
            writable: write,
            state: RwLock::new(State { header, bmap }),
            barriers: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// The header as it is now (with the current allocated-block count).
    pub fn header(&self) -> Header {
        sync::read(&self.state).header.clone()
    }

    /// Whether the image is static (every block allocated at creation): QEMU
    /// then asks the file which of its data ranges read as zeroes (holes), so
    /// `map` shows them as data and zero.
    pub fn is_static(&self) -> bool {
        sync::read(&self.state).header.is_static()
    }

    /// Run `f` on the header and block map, as they are now.
    pub(super) fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&sync::read(&self.state))
    }

    fn err(&self, e: impl Into<Error>) -> Error {
        e.into().at(self.storage.path())
    }

    /// Where guest `offset` is stored in the file, given its block's map entry.
    fn host_offset(header: &Header, entry: u32, offset: u64) -> Result<u64> {
        u64::from(entry)
            .checked_mul(BLOCK_SIZE)
            .and_then(|b| b.checked_add(header.offset_data))
            .and_then(|b| b.checked_add(offset % BLOCK_SIZE))
            .ok_or_else(|| Error::corrupt("VDI block offset overflows"))
    }

    /// The guest block holding `offset` (below the map's size, since the
    /// virtual size fits the map).
    fn block_of(offset: u64) -> u32 {
        u32::try_from(offset / BLOCK_SIZE).unwrap_or(u32::MAX)
    }

    /// Write `buf` at guest `offset` under the state's write lock, allocating
    /// blocks as needed; then the header and the changed map sectors.
    fn write_allocating(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut st = sync::write(&self.state);
        let mut changed: Option<(u32, u32)> = None;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_block = index(pos % BLOCK_SIZE);
            let n = (buf.len() - done).min(index(BLOCK_SIZE) - in_block);
            let block = Self::block_of(pos);
            let mut entry = st.bmap.get(block);
            if is_allocated(entry) {
                let host = Self::host_offset(&st.header, entry, pos)?;
                self.storage.write_at(&buf[done..done + n], host)?;
            } else {
                entry = st.header.blocks_allocated;
                let next = entry
                    .checked_add(1)
                    .filter(|&e| e < DISCARDED)
                    .ok_or_else(|| Error::corrupt("VDI image has no room for another block"))?;
                let host = Self::host_offset(&st.header, entry, 0)?;
                let mut data = vec![0u8; index(BLOCK_SIZE)];
                data[in_block..in_block + n].copy_from_slice(&buf[done..done + n]);
                self.storage.write_at(&data, host)?;
                st.bmap.set(block, entry);
                st.header.blocks_allocated = next;
                changed = Some(match changed {
                    None => (block, block),
                    Some((first, _)) => (first, block),
                });
            }
            done += n;
        }
        if let Some((first, last)) = changed {
            self.storage.write_at(&st.header.to_bytes(), 0)?;
            let (at, sectors) = st.bmap.sectors(first, last);
            self.storage
                .write_at(&sectors, st.header.offset_bmap + at)?;
        }
        Ok(())
    }
}

impl BlockDevice for VdiImage {
    fn format_name(&self) -> &'static str {
        "vdi"
    }
    fn virtual_size(&self) -> u64 {
        sync::read(&self.state).header.disk_size
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        request(Operation::Read, Some(offset), || {
            check_range(offset, buf.len() as u64, self.virtual_size())?;
            let st = sync::read(&self.state);
            let mut done = 0usize;
            while done < buf.len() {
                let pos = offset + done as u64;
                let n = (buf.len() - done).min(index(BLOCK_SIZE - pos % BLOCK_SIZE));
                let entry = st.bmap.get(Self::block_of(pos));
                let chunk = &mut buf[done..done + n];
                if is_allocated(entry) {
                    let host = Self::host_offset(&st.header, entry, pos)?;
                    self.storage.read_at(chunk, host).map_err(|e| self.err(e))?;
                } else {
                    chunk.fill(0);
                }
                done += n;
            }
            Ok(())
        })
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        request(Operation::Write, Some(offset), || {
            if self.read_only() {
                return Err(Error::read_only());
            }
            check_range(offset, buf.len() as u64, self.virtual_size())?;
            {
                // The common case: every block already stored, so only data is
                // written, under the shared lock.
                let st = sync::read(&self.state);
                let end = offset + buf.len() as u64;
                let first = Self::block_of(offset);
                let last = Self::block_of(end.saturating_sub(1).max(offset));
                if (first..=last).all(|b| is_allocated(st.bmap.get(b))) {
                    let mut done = 0usize;
                    while done < buf.len() {
                        let pos = offset + done as u64;
                        let n = (buf.len() - done).min(index(BLOCK_SIZE - pos % BLOCK_SIZE));
                        let entry = st.bmap.get(Self::block_of(pos));
                        let host = Self::host_offset(&st.header, entry, pos)?;
                        self.storage
                            .write_at(&buf[done..done + n], host)
                            .map_err(|e| self.err(e))?;
                        done += n;
                    }
                    return Ok(());
                }
            }
            self.write_allocating(buf, offset).map_err(|e| self.err(e))
        })
    }
    /// Stores zeroes (allocating blocks), as QEMU does for this format.
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        request(Operation::WriteZeroes, Some(offset), || {
            check_range(offset, len, self.virtual_size())?;
            let zeros = vec![0u8; index(BLOCK_SIZE)];
            let mut pos = offset;
            let end = offset + len;
            while pos < end {
                let n = (end - pos).min(BLOCK_SIZE - pos % BLOCK_SIZE);
                self.write(&zeros[..index(n)], pos)?;
                pos += n;
            }
            Ok(())
        })
    }
    /// Does nothing: QEMU's vdi driver has no discard.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        request(Operation::Discard, Some(offset), || {
            check_range(offset, len, self.virtual_size())
        })
    }
    fn flush(&self) -> Result<()> {
        request(Operation::Flush, None, || {
            self.storage.flush().map_err(|e| self.err(e))
        })
    }
    /// The block map and header are written as they change, with no syncs
    /// between: off, only the close's sync goes (a new convert target).
    fn set_write_barriers(&self, on: bool) -> Result<()> {
        self.barriers
            .store(on, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    /// Syncs the file, unless write barriers are off.
    fn close(&self) -> Result<()> {
        if self.read_only() || !self.barriers.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        self.flush()
    }
    /// As QEMU's vdi reports: one block at most per extent; a stored block is
    /// data at its host offset, an unallocated or discarded one reads as zeroes.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        request(Operation::BlockStatus, Some(offset), || {
            check_range(offset, len, self.virtual_size())?;
            let st = sync::read(&self.state);
            let entry = st.bmap.get(Self::block_of(offset));
            let n = len.min(BLOCK_SIZE - offset % BLOCK_SIZE);
            let status = if is_allocated(entry) {
                Status::Data {
                    host_offset: Some(Self::host_offset(&st.header, entry, offset)?),
                    compressed: false,
                }
            } else {
                Status::Zero { host_offset: None }
            };
            Ok(Extent {
                offset,
                len: n,
                status,
            })
        })
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }
    fn set_backing(&self, _backing: Option<Arc<dyn BlockDevice>>) {}
    fn read_only(&self) -> bool {
        !self.writable || self.storage.read_only()
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.storage.allocated_bytes().map_err(|e| self.err(e))
    }
    /// QEMU's vdi driver cannot resize.
    fn resize(&self, _new_size: u64, _allow_shrink: bool) -> Result<()> {
        Err(Error::new(
            crate::ErrorKind::Unsupported,
            "Image format driver does not support resize",
        ))
    }
    fn path(&self) -> Option<PathBuf> {
        self.path
            .clone()
            .or_else(|| self.storage.path().map(|p| p.to_path_buf()))
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(BLOCK_SIZE)
    }
    fn host_file(&self) -> Option<&Arc<dyn Storage>> {
        Some(&self.storage)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
