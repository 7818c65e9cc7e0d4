//! Read-only facts about an open qcow2 image that inspection tools need: the
//! persistent-bitmap directory, and whether the image looks metadata-preallocated.

use super::image::Qcow2Image;
use crate::units::index;
use crate::{Error, Result};
use std::sync::Arc;
use strata_storage::Storage;

/// The QEMU limit on the bitmap directory's size.
const MAX_BITMAP_DIRECTORY_SIZE: u64 = 64 << 20;
/// Fixed part of a bitmap directory entry.
const BITMAP_ENTRY_FIXED: usize = 24;

/// One persistent dirty bitmap, as its directory entry describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// The entry's flag bits (bit 0 in use, bit 1 auto).
    pub flags: u32,
    /// Length of the entry in the directory (name and extra data included, padded).
    pub entry_size: u64,
    /// Entries of its bitmap table (clusters of bitmap data it can name).
    pub table_size: u32,
}

impl BitmapInfo {
    /// Flag names as QEMU reports them ("in-use", "auto").
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.flags & 1 != 0 {
            v.push("in-use");
        }
        if self.flags & 2 != 0 {
            v.push("auto");
        }
        v
    }

    /// Whether its table has exactly the entries a disk of `disk_size` bytes
    /// needs in an image of `cluster_size` clusters (QEMU loads a consistent
    /// bitmap only then; a crash in the middle of a resize leaves one of another
    /// size).
    pub fn sized_for(&self, disk_size: u64, cluster_size: u64) -> bool {
        let bits = u8::try_from(self.granularity.trailing_zeros()).expect("9..31 granularity bits");
        u64::from(self.table_size)
            == super::bitmaps::table_entries_for(disk_size, bits, cluster_size).max(1)
    }
}

impl Qcow2Image {
    /// The storage the image lives on.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The persistent bitmaps listed in the bitmaps header extension. An image
    /// without the extension (or whose autoclear bit was cleared) has none.
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        let h = self.header();
        let Some(ext) = h.bitmaps else {
            return Ok(Vec::new());
        };
        if h.autoclear_features & 1 == 0 {
            return Ok(Vec::new());
        }
        if ext.directory_size > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(Error::corrupt(format!(
                "bitmap directory size {} exceeds the limit of {MAX_BITMAP_DIRECTORY_SIZE}",
                ext.directory_size
            )));
        }
        let file_size = self.storage.size()?;
        let end = ext.directory_offset.checked_add(ext.directory_size);
        if end.is_none_or(|e| e > file_size) {
            return Err(Error::corrupt("bitmap directory lies outside the file"));
        }
        let mut dir = vec![0u8; index(ext.directory_size)];
        self.storage.read_at(&mut dir, ext.directory_offset)?;
        let mut out = Vec::new();
        let mut pos = 0usize;
        for _ in 0..ext.nb_bitmaps {
            let fixed = dir
                .get(pos..pos + BITMAP_ENTRY_FIXED)
                .ok_or_else(|| Error::corrupt("bitmap directory entry runs past the directory"))?;
            let table_size = u32::from_be_bytes(fixed[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_be_bytes(fixed[12..16].try_into().expect("4 bytes"));
            let gran_bits = u32::from(fixed[17]);
            let name_size = usize::from(u16::from_be_bytes([fixed[18], fixed[19]]));
            let extra = u32::from_be_bytes(fixed[20..24].try_into().expect("4 bytes")) as usize;
            if !(9..=31).contains(&gran_bits) {
                return Err(Error::corrupt(format!(
                    "bitmap granularity bits {gran_bits} out of range 9..31"
                )));
            }
            let name_start = pos + BITMAP_ENTRY_FIXED + extra;
            let name = dir
                .get(name_start..name_start + name_size)
                .ok_or_else(|| Error::corrupt("bitmap name runs past the directory"))?;
            let raw = (BITMAP_ENTRY_FIXED + extra + name_size) as u64;
            let entry_size = raw.div_ceil(8) * 8;
            out.push(BitmapInfo {
                name: String::from_utf8_lossy(name).into_owned(),
                granularity: 1u64 << gran_bits,
                flags,
                entry_size,
                table_size,
            });
            pos += index(entry_size);
        }
        Ok(out)
    }

    /// Whether the image looks preallocated with `preallocation=metadata`: its
    /// refcounts claim clearly more clusters than the file has allocated on the host
    /// (the same heuristic QEMU applies before asking the file system where data
    /// really is). Used by `map` so that holes in such files read as zeroes.
    pub fn metadata_preallocated(&self) -> Result<bool> {
        let cs = self.cluster_size_bytes();
        let file_len = self.storage.size()?;
        let Some(alloc) = self.storage.allocated_bytes()? else {
            return Ok(false);
        };
        let real = alloc / cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let end_cluster = file_len.div_ceil(cs);
        let mut m = self.lock()?;
        let epb = m.rb_entries();
        let order = m.h.refcount_order;
        let mut count = 0u64;
        for b in 0..end_cluster.div_ceil(epb) {
            if count >= threshold {
                break;
            }
            let off = m.refblock_offset(b)?;
            if off.is_none() {
                continue;
            }
            m.load_refblock(off)?;
            let block = &m.rb.get(off.get()).expect("loaded").data;
            let n = index((end_cluster - b * epb).min(epb));
            count += (0..n)
                .filter(|&i| super::refcount::rb_get(block, order, i) != 0)
                .count() as u64;
        }
        Ok(count >= threshold)
    }

    fn cluster_size_bytes(&self) -> u64 {
        self.geometry().cluster_size()
    }
}

impl Qcow2Image {
    /// For a guest offset that reads as unallocated: the host offset reserved for it
    /// when its cluster is allocated but the subcluster is not (extended L2), and how
    /// many bytes to the end of that cluster. QEMU reports such ranges with an offset.
    pub fn reserved_host_offset(&self, offset: u64) -> Result<Option<(u64, u64)>> {
        if !self.geometry().extended_l2 || offset >= crate::BlockDevice::virtual_size(self) {
            return Ok(None);
        }
        let cs = self.cluster_size_bytes();
        let mut m = self.lock()?;
        Ok(match m.entry(offset / cs)? {
            super::entries::L2Entry::Normal { host, .. } if !host.is_none() => {
                Some(((host + offset % cs).get(), cs - offset % cs))
            }
            _ => None,
        })
    }
}
