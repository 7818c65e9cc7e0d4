//! One extent of a vmdk disk: a flat range of a file, or a sparse extent
//! (grain directory, grain tables, grains; compressed grains for
//! stream-optimized files) as QEMU's vmdk driver reads and writes it.

use super::header::{CowdHeader, SparseHeader, FLAG_MARKER, FLAG_RGD, FLAG_ZERO_GRAIN, GD_AT_END};
use crate::units::index;
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use strata_storage::Storage;

/// Largest grain QEMU accepts, in sectors (1 GiB).
const MAX_CLUSTER_SECTORS: u64 = 0x20_0000;
/// Largest grain directory QEMU accepts, in entries.
const MAX_L1_SIZE: u64 = 32 * 1024 * 1024;
/// A grain table entry saying "zeroed grain" (with [`FLAG_ZERO_GRAIN`]).
pub const GTE_ZEROED: u32 = 1;
/// Grain tables kept in memory per extent.
const L2_CACHE: usize = 64;
/// Sectors an extent file can address (grain table entries are 32-bit sectors).
const MAX_SECTORS: u64 = 1 << 32;

/// Where a guest range of an extent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Not stored in this extent.
    Unallocated,
    /// A zeroed grain.
    Zeroed,
    /// Stored at this byte offset of the extent file (a grain's start for a
    /// sparse extent, the extent's start for a flat one).
    At(u64),
}

/// The metadata of a sparse extent.
pub struct Sparse {
    /// Grain size in sectors.
    pub cluster_sectors: u64,
    /// Grain table entries per grain table.
    pub l2_size: u64,
    /// Sectors one grain directory entry covers.
    pub l1_entry_sectors: u64,
    /// Grain directory entries (QEMU's `l1_size`).
    pub l1_size: u64,
    /// The grain directory as read (entries past the file's end are 0 and
    /// not kept).
    pub l1: Vec<u32>,
    /// The redundant grain directory, when the header says it is kept.
    pub l1_backup: Option<Vec<u32>>,
    pub compressed: bool,
    pub has_marker: bool,
    pub zero_grain: bool,
    /// Header version (1-3; 0 for COWD).
    pub version: u32,
    /// Where the next grain is allocated, in sectors.
    pub next_cluster_sector: u64,
    /// How far (in bytes) this session has filled the grains it allocated
    /// for compressed writes with zeroes (see `write_compressed`).
    pub zeroed_to: u64,
    /// Flush after each grain table update (off for a new image nobody uses
    /// yet, flushed once at the end: what a copy into it needs).
    pub barriers: bool,
    cache: HashMap<u32, Vec<u32>>,
}

/// The layout of an extent.
pub enum Layout {
    /// `start`: the extent's first byte in its file.
    Flat {
        start: u64,
    },
    Sparse(Box<Sparse>),
}

/// One extent of the disk.
pub struct Extent {
    pub storage: Arc<dyn Storage>,
    /// The file name as QEMU shows it (the path it opened).
    pub filename: PathBuf,
    /// The descriptor's type word (FLAT, SPARSE...); `None` for a monolithic
    /// sparse file, which has no extent line of its own.
    pub kind: Option<String>,
    /// Size in sectors.
    pub sectors: u64,
    /// First guest byte of the extent.
    pub start: u64,
    pub layout: Layout,
}

fn bad_io() -> Error {
    Error::corrupt("Input/output error")
}

fn read_table(storage: &dyn Storage, offset: u64, entries: u64, file_len: u64) -> Result<Vec<u32>> {
    // Entries past the end of the file read as zero: keep only those inside.
    let inside = file_len.saturating_sub(offset).div_ceil(4).min(entries);
    let mut raw = vec![0u8; index(inside * 4)];
    storage.read_at(&mut raw, offset)?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

impl Sparse {
    fn new(
        storage: &dyn Storage,
        l1_offset: u64,
        l1_backup_offset: u64,
        l1_size: u64,
        l2_size: u64,
        cluster_sectors: u64,
    ) -> Result<Self> {
        if cluster_sectors > MAX_CLUSTER_SECTORS {
            return Err(Error::invalid("Invalid granularity, image may be corrupt"));
        }
        if l1_size > MAX_L1_SIZE {
            return Err(Error::invalid("L1 size too big"));
        }
        let file_len = storage.size()?;
        let l1 = read_table(storage, l1_offset, l1_size, file_len)?;
        let l1_backup = if l1_backup_offset != 0 {
            Some(read_table(storage, l1_backup_offset, l1_size, file_len)?)
        } else {
            None
        };
        let file_sectors = file_len.div_ceil(512);
        let next_cluster_sector = if cluster_sectors == 0 {
            file_sectors
        } else {
            file_sectors
                .checked_next_multiple_of(cluster_sectors)
                .ok_or_else(|| Error::invalid("Image too large"))?
        };
        Ok(Sparse {
            cluster_sectors,
            l2_size,
            l1_entry_sectors: l2_size.wrapping_mul(cluster_sectors) & 0xffff_ffff,
            l1_size,
            l1,
            l1_backup,
            compressed: false,
            has_marker: false,
            zero_grain: false,
            version: 0,
            next_cluster_sector,
            zeroed_to: 0,
            barriers: true,
            cache: HashMap::new(),
        })
    }

    /// Open a hosted sparse ("KDMV") extent whose header (after the magic)
    /// is `h`; `write`: opened for writing.
    pub fn open_kdmv(
        storage: &dyn Storage,
        mut h: SparseHeader,
        write: bool,
    ) -> Result<(Self, u64)> {
        let file_len = storage.size()?;
        if h.gd_offset == GD_AT_END {
            // The footer (with its markers) ends the file and takes precedence.
            let end = file_len.div_ceil(512) * 512;
            let at = end
                .checked_sub(1536)
                .ok_or_else(|| Error::invalid("Failed to read footer: Invalid argument"))?;
            let mut f = vec![0u8; 1536];
            storage.read_at(&mut f, at)?;
            h = SparseHeader::from_footer(&f)?;
        }
        let compressed = h.compress_algorithm == super::header::COMPRESSION_DEFLATE;
        if h.version > 3 {
            return Err(Error::unsupported(format!("VMDK version {}", h.version)));
        }
        if h.version == 3 && write && !compressed {
            return Err(Error::invalid("VMDK version 3 must be read only"));
        }
        if h.num_gtes_per_gt > 512 {
            return Err(Error::invalid("L2 table size too big"));
        }
        // QEMU keeps this product in 32 bits.
        let l1_entry_sectors =
            u64::from(h.num_gtes_per_gt).wrapping_mul(h.granularity) & 0xffff_ffff;
        if l1_entry_sectors == 0 {
            return Err(Error::invalid("L1 entry size is invalid"));
        }
        let l1_size =
            (h.capacity.wrapping_add(l1_entry_sectors - 1) / l1_entry_sectors) & 0xffff_ffff;
        let l1_backup_offset = if h.flags & FLAG_RGD != 0 {
            h.rgd_offset.wrapping_shl(9)
        } else {
            0
        };
        if file_len.div_ceil(512) < h.grain_offset {
            return Err(Error::invalid(format!(
                "File truncated, expecting at least {} bytes",
                h.grain_offset.wrapping_mul(512)
            )));
        }
        let mut s = Sparse::new(
            storage,
            h.gd_offset.wrapping_shl(9),
            l1_backup_offset,
            l1_size,
            u64::from(h.num_gtes_per_gt),
            h.granularity,
        )?;
        s.compressed = compressed;
        s.has_marker = h.flags & FLAG_MARKER != 0;
        s.zero_grain = h.flags & FLAG_ZERO_GRAIN != 0;
        s.version = h.version;
        Ok((s, h.capacity))
    }

    /// Open a VMFS sparse ("COWD") extent.
    pub fn open_cowd(storage: &dyn Storage, h: CowdHeader) -> Result<(Self, u64)> {
        let s = Sparse::new(
            storage,
            u64::from(h.l1dir_offset) << 9,
            0,
            u64::from(h.l1dir_size),
            4096,
            u64::from(h.granularity),
        )?;
        Ok((s, u64::from(h.disk_sectors)))
    }

    /// Grain size in bytes.
    pub fn grain(&self) -> u64 {
        self.cluster_sectors * 512
    }

    /// The grain table for guest byte `offset` (relative to the extent):
    /// its sector and index of the entry, or `None` when the directory has no
    /// table there.
    fn table(&self, offset: u64) -> Result<Option<(u32, u64, u64)>> {
        let sector = offset >> 9;
        let l1_index = sector / self.l1_entry_sectors;
        if l1_index >= self.l1_size {
            return Err(bad_io());
        }
        let l2_offset = self.l1.get(index(l1_index)).copied().unwrap_or(0);
        if l2_offset == 0 {
            return Ok(None);
        }
        let l2_index = (sector / self.cluster_sectors.max(1)) % self.l2_size.max(1);
        Ok(Some((l2_offset, l1_index, l2_index)))
    }

    fn load(&mut self, storage: &dyn Storage, l2_offset: u32) -> Result<&mut Vec<u32>> {
        if !self.cache.contains_key(&l2_offset) {
            if self.cache.len() >= L2_CACHE {
                self.cache.clear();
            }
            let mut raw = vec![0u8; index(self.l2_size * 4)];
            storage.read_at(&mut raw, u64::from(l2_offset) * 512)?;
            let t = raw
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            self.cache.insert(l2_offset, t);
        }
        Ok(self.cache.get_mut(&l2_offset).expect("just loaded"))
    }

    /// Where the grain holding extent-relative byte `offset` is.
    pub fn lookup(&mut self, storage: &dyn Storage, offset: u64) -> Result<Lookup> {
        let Some((l2_offset, _, l2_index)) = self.table(offset)? else {
            return Ok(Lookup::Unallocated);
        };
        let zero_grain = self.zero_grain;
        let t = self.load(storage, l2_offset)?;
        let gte = t.get(index(l2_index)).copied().unwrap_or(0);
        Ok(match gte {
            0 => Lookup::Unallocated,
            GTE_ZEROED if zero_grain => Lookup::Zeroed,
            s => Lookup::At(u64::from(s) << 9),
        })
    }

    /// Set the grain table entry for `offset` to `value` in the table and in
    /// the redundant one, then flush (QEMU's order: the grain is written first).
    pub fn set_entry(&mut self, storage: &dyn Storage, offset: u64, value: u32) -> Result<()> {
        let Some((l2_offset, l1_index, l2_index)) = self.table(offset)? else {
            return Err(Error::unsupported(
                "write to a vmdk grain without a grain table",
            ));
        };
        let bytes = value.to_le_bytes();
        storage.write_at(&bytes, u64::from(l2_offset) * 512 + l2_index * 4)?;
        if let Some(backup) = &self.l1_backup {
            let b = backup.get(index(l1_index)).copied().unwrap_or(0);
            storage.write_at(&bytes, u64::from(b) * 512 + l2_index * 4)?;
        }
        if self.barriers {
            storage.flush()?;
        }
        let t = self.load(storage, l2_offset)?;
        if let Some(e) = t.get_mut(index(l2_index)) {
            *e = value;
        }
        Ok(())
    }

    /// A new grain's sector, advancing the allocation point.
    pub fn allocate(&mut self) -> Result<u64> {
        if self.next_cluster_sector >= MAX_SECTORS {
            return Err(bad_io());
        }
        let s = self.next_cluster_sector;
        self.next_cluster_sector += self.cluster_sectors;
        Ok(s)
    }

    /// Read `buf.len()` bytes at `in_grain` of the compressed grain stored at
    /// byte `at`. As QEMU: the stream (after its marker, whose size field
    /// bounds it) must end within twice the grain size and inflate to at
    /// most a grain, covering the bytes asked for. Memory stays bounded by
    /// small buffers whatever the grain size.
    pub fn read_compressed(
        &self,
        storage: &dyn Storage,
        at: u64,
        in_grain: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        use flate2::{Decompress, FlushDecompress, Status};
        let bad = || Error::new(crate::ErrorKind::BadCompressedData, "Invalid argument");
        let grain = self.grain();
        let (data_at, len) = if self.has_marker {
            let mut m = [0u8; 12];
            storage.read_at(&mut m, at)?;
            let len = u64::from(u32::from_le_bytes([m[8], m[9], m[10], m[11]]));
            (at + 12, len)
        } else {
            (at, grain)
        };
        if len == 0 || len > grain * 2 {
            return Err(bad());
        }
        // The stream is read from a buffer of two grains that starts with the marker.
        let len = if self.has_marker {
            len.min(grain * 2 - 12)
        } else {
            len
        };
        const CHUNK: u64 = 64 << 10;
        let mut input = vec![0u8; index(len.min(CHUNK))];
        let mut out = vec![0u8; index(grain.min(CHUNK))];
        let (want_start, want_end) = (in_grain, in_grain + buf.len() as u64);
        let mut d = Decompress::new(true);
        let mut read = 0u64;
        let mut pending = 0..0;
        loop {
            if pending.is_empty() && read < len {
                let n = (len - read).min(CHUNK);
                storage.read_at(&mut input[..index(n)], data_at + read)?;
                read += n;
                pending = 0..index(n);
            }
            let flush = if read == len {
                FlushDecompress::Finish
            } else {
                FlushDecompress::None
            };
            let (in0, out0) = (d.total_in(), d.total_out());
            let st = d
                .decompress(&input[pending.clone()], &mut out, flush)
                .map_err(|_| bad())?;
            let used = index(d.total_in() - in0);
            let produced = d.total_out() - out0;
            pending.start += used;
            if d.total_out() > grain {
                return Err(bad());
            }
            // Copy the part of this output that falls in the window asked for.
            let (lo, hi) = (out0.max(want_start), d.total_out().min(want_end));
            if lo < hi {
                buf[index(lo - want_start)..index(hi - want_start)]
                    .copy_from_slice(&out[index(lo - out0)..index(hi - out0)]);
            }
            if st == Status::StreamEnd {
                break;
            }
            if used == 0 && produced == 0 && pending.is_empty() && read == len {
                return Err(bad());
            }
        }
        if want_end > d.total_out() {
            return Err(bad());
        }
        Ok(())
    }
}

impl Extent {
    /// Extent length in bytes.
    pub fn len(&self) -> u64 {
        self.sectors * 512
    }

    /// The unit QEMU walks the extent in: the grain, or the whole extent
    /// for a flat one.
    pub fn unit(&self) -> u64 {
        match &self.layout {
            Layout::Flat { .. } => self.len(),
            Layout::Sparse(s) => s.grain().max(512),
        }
    }

    /// Where extent-relative byte `offset` is stored.
    pub fn lookup(&mut self, offset: u64) -> Result<Lookup> {
        match &mut self.layout {
            Layout::Flat { start } => Ok(Lookup::At(*start)),
            Layout::Sparse(s) => s.lookup(self.storage.as_ref(), offset),
        }
    }

    pub fn sparse(&self) -> Option<&Sparse> {
        match &self.layout {
            Layout::Sparse(s) => Some(s),
            Layout::Flat { .. } => None,
        }
    }

    pub fn compressed(&self) -> bool {
        self.sparse().is_some_and(|s| s.compressed)
    }
}
