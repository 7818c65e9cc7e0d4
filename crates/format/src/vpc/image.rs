//! [`VpcImage`]: the guest view of a VHD file, fixed or dynamic, read and
//! written as QEMU's `vpc` driver does.

use super::footer::{DynHeader, Footer, BAT_UNALLOCATED, FOOTER_SIZE, TYPE_FIXED};
use super::geometry::{chs_sectors, MAX_GEOMETRY_SECTORS, MAX_SECTORS};
use crate::error::{request, Operation};
use crate::units::index;
use crate::{check_range, BlockDevice, Error, ErrorKind, Extent, Result, Status};
use std::sync::{Arc, Mutex};
use strata_storage::{sync, Storage};

/// The largest offset a read may reach in QEMU (its request limit); past it
/// a header read fails.
const MAX_REQUEST_END: u64 = i64::MAX as u64;

/// The mutable state of a dynamic disk: its block allocation table and where
/// the next block goes.
#[derive(Debug)]
struct Dynamic {
    block_size: u64,
    bitmap_size: u64,
    bat_offset: u64,
    /// The BAT, host sector numbers ([`BAT_UNALLOCATED`] for none).
    bat: Vec<u32>,
    /// Where the next block's bitmap goes (the footer sits there).
    free_offset: u64,
    /// The bitmap last set by a write in this session (QEMU rewrites a
    /// block's bitmap, all ones, before the first write to it).
    last_bitmap: Option<u64>,
}

impl Dynamic {
    /// The host offset of guest `offset`, if its block is stored, and the
    /// bitmap offset of that block.
    fn locate(&self, offset: u64) -> Option<(u64, u64)> {
        let i = offset / self.block_size;
        let e = *self.bat.get(index(i))?;
        if e == BAT_UNALLOCATED {
            return None;
        }
        let bitmap = u64::from(e) * 512;
        Some((bitmap + self.bitmap_size + offset % self.block_size, bitmap))
    }
}

/// A VHD image (QEMU's `vpc` format).
pub struct VpcImage {
    storage: Arc<dyn Storage>,
    /// The footer as read (at offset 0 for a dynamic disk, else at the end).
    footer: Footer,
    size: u64,
    layout: Layout,
    read_only: bool,
    /// Flush after each metadata step of a block allocation (the default);
    /// see [`VpcImage::set_write_barriers`].
    barriers: std::sync::atomic::AtomicBool,
}

/// How guest offsets map to the file.
enum Layout {
    /// The file is the disk (its footer follows).
    Fixed,
    /// Blocks found through the BAT.
    Dynamic(Mutex<Dynamic>),
}

impl VpcImage {
    /// Open the VHD image on `storage`, refusing what QEMU refuses with its
    /// words. `write`: the image will be written.
    pub fn open(storage: Arc<dyn Storage>, write: bool) -> Result<Self> {
        let path = storage.path().map(|p| p.to_path_buf());
        Self::open_inner(storage, write).map_err(|e| e.at(path.as_deref()).during(Operation::Open))
    }

    fn open_inner(storage: Arc<dyn Storage>, write: bool) -> Result<Self> {
        let mut buf = [0u8; FOOTER_SIZE];
        storage.read_at(&mut buf, 0)?;
        let mut footer = Footer::from_bytes(&buf);
        let mut at_start = true;
        // QEMU sees a file's length in whole sectors.
        let file_len = storage.size()?.div_ceil(512) * 512;
        if !footer.has_cookie() {
            if file_len < FOOTER_SIZE as u64 {
                return Err(Error::invalid("File too small for a VHD header"));
            }
            // A fixed disk has its footer only at the end.
            storage.read_at(&mut buf, file_len - FOOTER_SIZE as u64)?;
            footer = Footer::from_bytes(&buf);
            // Only a fixed disk may lack the copy at the start.
            if !footer.has_cookie() || footer.disk_type() != TYPE_FIXED {
                return Err(Error::invalid("invalid VPC image"));
            }
            at_start = false;
        }
        if !footer.checksum_ok() {
            return Err(Error::invalid("Incorrect header checksum"));
        }

        // Virtual PC sizes a disk by its geometry, Hyper-V and the others by
        // the footer's current size; QEMU trusts the geometry only for the
        // creators known to use it, and never when it is the largest one.
        let geometry = chs_sectors(footer.geometry());
        let by_geometry = matches!(&footer.creator_app(), b"vpc " | b"qemu");
        let sectors = if by_geometry && geometry != MAX_GEOMETRY_SECTORS {
            geometry
        } else {
            footer.current_size() / 512
        };
        if sectors > MAX_SECTORS {
            // QEMU's generic wording for an open failing with EFBIG.
            let name = storage
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("Could not open '{name}': File too large"),
            ));
        }
        let size = sectors * 512;

        // A footer at the start means a dynamic disk's header and BAT follow
        // (checked even when the footer then says fixed, as QEMU does).
        let dynamic = if at_start {
            Some(read_dynamic(storage.as_ref(), &footer, size, file_len)?)
        } else {
            None
        };
        let layout = match dynamic {
            _ if footer.disk_type() == TYPE_FIXED => Layout::Fixed,
            Some(d) => Layout::Dynamic(Mutex::new(d)),
            // Ruled out above: a footer only at the end is a fixed disk's.
            None => return Err(Error::invalid("invalid VPC image")),
        };
        let read_only = !write || storage.read_only();
        Ok(VpcImage {
            storage,
            footer,
            size,
            layout,
            read_only,
            barriers: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Whether each metadata step of a block allocation (bitmap, moved
    /// footer, BAT entry) is flushed before the next (the default). A new
    /// image that nothing uses until a copy into it completes and is flushed
    /// can do without, as qemu-img's convert does (its target's cache mode
    /// makes those flushes no-ops). With barriers off, [`BlockDevice::close`]
    /// does not flush either: only [`BlockDevice::flush`] makes the writes
    /// durable.
    pub fn set_write_barriers(&self, on: bool) {
        self.barriers
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// A flush between allocation steps, when barriers are on.
    fn barrier(&self) -> Result<()> {
        if self.barriers.load(std::sync::atomic::Ordering::Relaxed) {
            self.storage.flush()?;
        }
        Ok(())
    }

    /// Whether this is a fixed disk (the data, then the footer).
    pub fn is_fixed(&self) -> bool {
        matches!(self.layout, Layout::Fixed)
    }

    /// The block size of a dynamic disk (QEMU's cluster size), `None` for a
    /// fixed one.
    pub fn block_size(&self) -> Option<u64> {
        match &self.layout {
            Layout::Fixed => None,
            Layout::Dynamic(d) => Some(sync::lock(d).block_size),
        }
    }

    /// The footer's fields, as read.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn err(&self, e: impl Into<Error>) -> Error {
        e.into().at(self.storage.path())
    }

    /// Write `buf` at guest `offset` of a dynamic disk, allocating blocks at
    /// the end of the file as QEMU does: the block's bitmap (all ones), then
    /// the footer moved past the block, then the BAT entry, each flushed,
    /// then the data.
    fn write_dynamic(&self, d: &Mutex<Dynamic>, buf: &[u8], offset: u64) -> Result<()> {
        let mut d = sync::lock(d);
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let n = index((d.block_size - off % d.block_size).min((buf.len() - done) as u64));
            let host = match d.locate(off) {
                Some((host, bitmap)) => {
                    if d.last_bitmap != Some(bitmap) {
                        d.last_bitmap = Some(bitmap);
                        self.write_bitmap(&d, bitmap)?;
                    }
                    host
                }
                None => self.alloc_block(&mut d, off)?,
            };
            self.storage.write_at(&buf[done..done + n], host)?;
            done += n;
        }
        Ok(())
    }

    fn write_bitmap(&self, d: &Dynamic, at: u64) -> Result<()> {
        self.storage
            .write_at(&vec![0xff; index(d.bitmap_size)], at)?;
        self.barrier()?;
        Ok(())
    }

    /// Allocate the block holding guest `offset`; returns the host offset of
    /// `offset` in it.
    fn alloc_block(&self, d: &mut Dynamic, offset: u64) -> Result<u64> {
        let i = index(offset / d.block_size);
        let at = d.free_offset;
        let entry = u32::try_from(at / 512)
            .ok()
            .filter(|&e| e != BAT_UNALLOCATED && i < d.bat.len())
            .ok_or_else(|| Error::invalid("Invalid argument"))?;
        self.write_bitmap(d, at)?;
        let next = at + d.bitmap_size + d.block_size;
        self.storage.write_at(&self.footer.raw, next)?;
        self.barrier()?;
        self.storage
            .write_at(&entry.to_be_bytes(), d.bat_offset + 4 * i as u64)?;
        self.barrier()?;
        d.bat[i] = entry;
        d.free_offset = next;
        Ok(at + d.bitmap_size + offset % d.block_size)
    }
}

/// Read a dynamic disk's header and BAT, checked as QEMU checks them.
fn read_dynamic(
    storage: &dyn Storage,
    footer: &Footer,
    size: u64,
    file_len: u64,
) -> Result<Dynamic> {
    let at = footer.data_offset();
    if at.checked_add(512).is_none_or(|e| e > MAX_REQUEST_END) {
        return Err(Error::invalid("Error reading dynamic VHD header"));
    }
    let mut buf = [0u8; 512];
    storage.read_at(&mut buf, at)?;
    let h = DynHeader::parse(&buf).ok_or_else(|| Error::invalid("Invalid header magic"))?;
    let block_size = u64::from(h.block_size);
    if !h.block_size.is_power_of_two() || block_size < 512 {
        return Err(Error::invalid(format!(
            "Invalid block size {}",
            h.block_size
        )));
    }
    let bitmap_size = (block_size / (8 * 512)).next_multiple_of(512);
    if size / block_size > 0xffff_ffff {
        return Err(Error::invalid("Too many blocks"));
    }
    // QEMU keeps the entry count in a signed int.
    let entries = h.max_table_entries as i32;
    let computed = (i64::from(entries) as u64).wrapping_mul(block_size);
    if computed < size {
        return Err(Error::invalid("Page table too small"));
    }
    if h.max_table_entries > i32::MAX as u32 / 4 {
        return Err(Error::invalid(format!(
            "Max Table Entries too large ({entries})"
        )));
    }
    let table_len = u64::from(h.max_table_entries) * 4;
    let table_end = h.table_offset.checked_add(table_len);
    if table_end.is_none_or(|e| e > MAX_REQUEST_END) {
        return Err(Error::invalid("Error reading pagetable"));
    }
    let truncated = || {
        Error::invalid(
            "block-vpc: free_data_block_offset points after the end of file. \
             The image has been truncated.",
        )
    };
    // The blocks start past the BAT, so a BAT reaching past the file's end
    // means truncation (checked before reading it, so a hostile count never
    // makes a large allocation).
    let mut free = table_end.unwrap_or(u64::MAX).next_multiple_of(512);
    if free > file_len {
        return Err(truncated());
    }
    let mut raw = vec![0u8; index(table_len)];
    storage.read_at(&mut raw, h.table_offset)?;
    let bat: Vec<u32> = raw
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    for &e in &bat {
        if e != BAT_UNALLOCATED {
            free = free.max(u64::from(e) * 512 + bitmap_size + block_size);
        }
    }
    if free > file_len {
        return Err(truncated());
    }
    Ok(Dynamic {
        block_size,
        bitmap_size,
        bat_offset: h.table_offset,
        bat,
        free_offset: free,
        last_bitmap: None,
    })
}

impl BlockDevice for VpcImage {
    fn format_name(&self) -> &'static str {
        "vpc"
    }
    fn set_write_barriers(&self, on: bool) -> Result<()> {
        VpcImage::set_write_barriers(self, on);
        Ok(())
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    /// A fixed disk reads the file as is; a dynamic one reads its stored
    /// blocks whole (QEMU does not consult the sector bitmaps) and zeroes
    /// elsewhere.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        request(Operation::Read, Some(offset), || {
            check_range(offset, buf.len() as u64, self.size)?;
            let d = match &self.layout {
                Layout::Fixed => return self.storage.read_at(buf, offset).map_err(|e| self.err(e)),
                Layout::Dynamic(d) => sync::lock(d),
            };
            let mut done = 0usize;
            while done < buf.len() {
                let off = offset + done as u64;
                let n = index((d.block_size - off % d.block_size).min((buf.len() - done) as u64));
                let chunk = &mut buf[done..done + n];
                match d.locate(off) {
                    Some((host, _)) => {
                        self.storage.read_at(chunk, host).map_err(|e| self.err(e))?
                    }
                    None => chunk.fill(0),
                }
                done += n;
            }
            Ok(())
        })
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        request(Operation::Write, Some(offset), || {
            if self.read_only {
                return Err(Error::read_only());
            }
            check_range(offset, buf.len() as u64, self.size)?;
            match &self.layout {
                Layout::Fixed => self.storage.write_at(buf, offset).map_err(|e| self.err(e)),
                Layout::Dynamic(d) => self.write_dynamic(d, buf, offset).map_err(|e| self.err(e)),
            }
        })
    }
    /// vpc has no way to record zeroes: zero bytes are written (allocating
    /// blocks), as QEMU's generic fallback does.
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        check_range(offset, len, self.size)?;
        let zeros = vec![0u8; index(len.min(1 << 20))];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64);
            self.write(&zeros[..index(n)], pos)?;
            pos += n;
        }
        Ok(())
    }
    /// QEMU's vpc driver has no discard: nothing happens.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)
    }
    fn flush(&self) -> Result<()> {
        request(Operation::Flush, None, || {
            self.storage.flush().map_err(|e| self.err(e))
        })
    }
    /// Every write is in the file already (nothing is held back in memory),
    /// so closing only makes it durable: a flush, unless write barriers are
    /// off ([`VpcImage::set_write_barriers`]), where durability is left to an
    /// explicit [`BlockDevice::flush`], as a qcow2 image without barriers
    /// leaves it.
    fn close(&self) -> Result<()> {
        if self.read_only || !self.barriers.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        self.flush()
    }
    /// A fixed disk is data throughout (its file's holes read as zeroes,
    /// which the caller may ask the file about). In a dynamic disk a stored
    /// block is data, one block at a time; a run of blocks not stored reads
    /// as zeroes (QEMU's vpc has no backing file).
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        request(Operation::BlockStatus, Some(offset), || {
            check_range(offset, len, self.size)?;
            if len == 0 {
                return Err(Error::out_of_range("empty block status request"));
            }
            let d = match &self.layout {
                Layout::Fixed => {
                    return Ok(Extent {
                        offset,
                        len,
                        status: Status::Data {
                            host_offset: Some(offset),
                            compressed: false,
                        },
                    })
                }
                Layout::Dynamic(d) => sync::lock(d),
            };
            let end = offset + len;
            let block_end = |o: u64| (o / d.block_size + 1).saturating_mul(d.block_size).min(end);
            if let Some((host, _)) = d.locate(offset) {
                return Ok(Extent {
                    offset,
                    len: block_end(offset) - offset,
                    status: Status::Data {
                        host_offset: Some(host),
                        compressed: false,
                    },
                });
            }
            let mut pos = block_end(offset);
            while pos < end && d.locate(pos).is_none() {
                pos = block_end(pos);
            }
            Ok(Extent {
                offset,
                len: pos - offset,
                status: Status::Zero { host_offset: None },
            })
        })
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }
    fn set_backing(&self, _backing: Option<Arc<dyn BlockDevice>>) {}
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.storage.allocated_bytes().map_err(|e| self.err(e))
    }
    fn resize(&self, _new_size: u64, _allow_shrink: bool) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "Image format driver does not support resize",
        ))
    }
    fn path(&self) -> Option<std::path::PathBuf> {
        self.storage.path().map(|p| p.to_path_buf())
    }
    fn cluster_size(&self) -> Option<u64> {
        self.block_size()
    }
    fn host_file(&self) -> Option<&Arc<dyn Storage>> {
        Some(&self.storage)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
