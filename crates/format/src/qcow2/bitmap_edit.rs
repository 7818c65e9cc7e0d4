//! Editing persistent dirty bitmaps (`qemu-img bitmap`): the bitmaps are read
//! whole into memory, changed there, and stored back as a new set.
//!
//! Storing is one switch: the new bitmap data clusters, tables and directory are
//! written and counted off to the side, then one write of the header area names
//! the new directory (and sets or clears the bitmaps autoclear bit), then what
//! the old set used is freed. A crash leaves the old set or the new one, and
//! leaks at worst.

use super::amend::write_header;
use super::entries::OFFSET_MASK;
use super::header::{autoclear, be32, be64, BitmapsExt};
use super::image::Qcow2Image;
use super::meta::Meta;
use crate::units::{index, ClusterCount, ClusterIndex};
use crate::{Error, Result};

/// Enabled: the bitmap records every change to the disk.
const FLAG_AUTO: u32 = 1 << 1;
/// Bitmap-table entry with no data cluster and bit 0 set: every bit is one.
const ALL_ONES: u64 = 1;
/// The only bitmap type the specification defines.
const TYPE_DIRTY_TRACKING: u8 = 1;

/// One persistent bitmap, read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    pub name: String,
    pub granularity_bits: u8,
    /// Recording changes (not disabled).
    pub enabled: bool,
    /// Bit `k` (bit `k % 8` of byte `k / 8`) is set when guest bytes
    /// `[k << granularity_bits, (k + 1) << granularity_bits)` changed.
    pub bits: Vec<u8>,
}

impl Bitmap {
    /// A new, empty bitmap for a disk of `size` bytes.
    pub fn new(name: &str, granularity_bits: u8, enabled: bool, size: u64) -> Self {
        Bitmap {
            name: name.to_string(),
            granularity_bits,
            enabled,
            bits: vec![0; index(bytes_for(size, granularity_bits))],
        }
    }

    /// Whether bit `k` is set.
    pub fn get(&self, k: u64) -> bool {
        self.bits
            .get((k / 8) as usize)
            .is_some_and(|b| b & (1 << (k % 8)) != 0)
    }

    fn set(&mut self, k: u64) {
        if let Some(b) = self.bits.get_mut((k / 8) as usize) {
            *b |= 1 << (k % 8);
        }
    }

    /// Set every bit whose range overlaps a range set in `other` (the two may
    /// have different granularities).
    pub fn merge_from(&mut self, other: &Bitmap) {
        let bits = self.bits.len() as u64 * 8;
        for k in 0..other.bits.len() as u64 * 8 {
            if !other.get(k) {
                continue;
            }
            let start = k << other.granularity_bits;
            let end = (k + 1) << other.granularity_bits;
            let first = start >> self.granularity_bits;
            let last = ((end - 1) >> self.granularity_bits).min(bits.saturating_sub(1));
            for j in first..=last {
                self.set(j);
            }
        }
    }
}

/// Bytes of bitmap data for `size` bytes of disk.
fn bytes_for(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1u64 << granularity_bits).div_ceil(8)
}

impl Qcow2Image {
    /// Every persistent bitmap with its bits (none when the image has no
    /// bitmaps, or its autoclear bit says they are stale). A bitmap marked in
    /// use (inconsistent) is refused, naming it.
    pub fn read_bitmaps(&self) -> Result<Vec<Bitmap>> {
        let (bitmaps, in_use) = self.read_consistent_bitmaps()?;
        match in_use.first() {
            Some(name) => Err(Error::invalid_argument(format!(
                "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
            ))),
            None => Ok(bitmaps),
        }
    }

    /// The persistent bitmaps that are consistent, with their bits, and the
    /// names of those marked in use (inconsistent: a writer that had them open
    /// never closed the image), both in directory order.
    pub fn read_consistent_bitmaps(&self) -> Result<(Vec<Bitmap>, Vec<String>)> {
        let mut in_use = Vec::new();
        let m = self.lock()?;
        let cs = m.cluster_size();
        let size = m.h.size;
        let Some(ext) = m.h.bitmaps else {
            return Ok((Vec::new(), in_use));
        };
        if m.h.autoclear_features & autoclear::BITMAPS == 0 {
            return Ok((Vec::new(), in_use));
        }
        let mut dir = vec![0u8; index(ext.directory_size)];
        m.storage.read_at(&mut dir, ext.directory_offset)?;
        let mut out = Vec::new();
        let mut at = 0usize;
        for _ in 0..ext.nb_bitmaps {
            let head = dir
                .get(at..at + 24)
                .ok_or_else(|| Error::corrupt("bitmap directory entry runs past the directory"))?;
            let (table_offset, table_size) = (be64(head, 0), be32(head, 8));
            let flags = be32(head, 12);
            let gran = head[17];
            let name_size = u16::from_be_bytes([head[18], head[19]]) as usize;
            let extra = be32(head, 20) as usize;
            let name = dir
                .get(at + 24 + extra..at + 24 + extra + name_size)
                .ok_or_else(|| Error::corrupt("bitmap name runs past the directory"))?;
            let name = String::from_utf8_lossy(name).into_owned();
            if flags & 1 != 0 {
                in_use.push(name);
                at += (24 + extra + name_size).next_multiple_of(8);
                continue;
            }
            if !(9..=31).contains(&gran) {
                return Err(Error::corrupt(format!(
                    "bitmap '{name}' has granularity bits {gran} (9..31 allowed)"
                )));
            }
            let mut b = Bitmap::new(&name, gran, flags & FLAG_AUTO != 0, size);
            let mut table = vec![0u8; table_size as usize * 8];
            m.storage.read_at(&mut table, table_offset)?;
            for (i, chunk) in b.bits.chunks_mut(index(cs)).enumerate() {
                let Some(raw) = table.get(i * 8..i * 8 + 8) else {
                    break;
                };
                let e = be64(raw, 0);
                let off = e & OFFSET_MASK;
                if off != 0 {
                    m.storage.read_at(chunk, off)?;
                } else if e & ALL_ONES != 0 {
                    chunk.fill(0xff);
                }
            }
            out.push(b);
            at += (24 + extra + name_size).next_multiple_of(8);
        }
        Ok((out, in_use))
    }

    /// Make `bitmaps` the image's whole set of persistent bitmaps (see the
    /// module for the order of the writes).
    pub fn store_bitmaps(&self, bitmaps: &[Bitmap]) -> Result<()> {
        self.check_writable()?;
        let old = self.read_bitmaps()?;
        let _excl = self.exclusive();
        let mut m = self.lock()?;
        store(&mut m, bitmaps, old.len()).map_err(|e| self.err(e))
    }
}

/// The clusters the current bitmap set uses: directory, tables, data.
fn used_clusters(m: &Meta) -> Result<Vec<u64>> {
    let cs = m.cluster_size();
    let Some(ext) = m.h.bitmaps else {
        return Ok(Vec::new());
    };
    let span = |off: u64, len: u64| (off / cs..(off + len).div_ceil(cs)).collect::<Vec<_>>();
    let mut out = span(ext.directory_offset, ext.directory_size);
    let mut dir = vec![0u8; index(ext.directory_size)];
    m.storage.read_at(&mut dir, ext.directory_offset)?;
    let mut at = 0usize;
    for _ in 0..ext.nb_bitmaps {
        let Some(head) = dir.get(at..at + 24) else {
            break;
        };
        let (table_offset, table_size) = (be64(head, 0), u64::from(be32(head, 8)));
        out.extend(span(table_offset, table_size * 8));
        let mut table = vec![0u8; index(table_size) * 8];
        m.storage.read_at(&mut table, table_offset)?;
        out.extend(
            table
                .chunks_exact(8)
                .map(|c| be64(c, 0) & OFFSET_MASK)
                .filter(|&o| o != 0)
                .map(|o| o / cs),
        );
        let (name_size, extra) = (u16::from_be_bytes([head[18], head[19]]), be32(head, 20));
        at += (24 + extra as usize + name_size as usize).next_multiple_of(8);
    }
    Ok(out)
}

/// Allocate, count and write `bytes` at new clusters; returns the offset.
fn put(m: &mut Meta, bytes: &[u8]) -> Result<u64> {
    let n = ClusterCount((bytes.len() as u64).div_ceil(m.cluster_size()));
    let off = m.alloc_clusters(n)?.get();
    m.write_dirty_refblocks()?;
    m.storage.write_at(bytes, off)?;
    Ok(off)
}

fn store(m: &mut Meta, bitmaps: &[Bitmap], old_count: usize) -> Result<()> {
    if bitmaps.is_empty() && old_count == 0 && m.h.bitmaps.is_none() {
        return Ok(());
    }
    let cs = index(m.cluster_size());
    let old = if m.h.autoclear_features & autoclear::BITMAPS != 0 {
        used_clusters(m)?
    } else {
        Vec::new()
    };
    m.flush_metadata()?;
    let mut dir = Vec::new();
    for b in bitmaps {
        let mut table = Vec::new();
        for chunk in b.bits.chunks(cs) {
            let e = if chunk.iter().all(|&x| x == 0) {
                0
            } else {
                let mut data = chunk.to_vec();
                data.resize(cs, 0);
                put(m, &data)?
            };
            table.extend_from_slice(&e.to_be_bytes());
        }
        if table.is_empty() {
            table.extend_from_slice(&0u64.to_be_bytes());
        }
        let table_offset = put(m, &table)?;
        dir.extend_from_slice(&table_offset.to_be_bytes());
        let entries = u32::try_from(table.len() / 8)
            .map_err(|_| Error::invalid("a bitmap table is too large"))?;
        dir.extend_from_slice(&entries.to_be_bytes());
        let flags = if b.enabled { FLAG_AUTO } else { 0 };
        dir.extend_from_slice(&flags.to_be_bytes());
        dir.push(TYPE_DIRTY_TRACKING);
        dir.push(b.granularity_bits);
        let name_len =
            u16::try_from(b.name.len()).map_err(|_| Error::invalid("a bitmap name is too long"))?;
        dir.extend_from_slice(&name_len.to_be_bytes());
        dir.extend_from_slice(&0u32.to_be_bytes());
        dir.extend_from_slice(b.name.as_bytes());
        dir.resize(dir.len().next_multiple_of(8), 0);
    }
    let mut h = m.h.clone();
    if bitmaps.is_empty() {
        h.bitmaps = None;
        h.autoclear_features &= !autoclear::BITMAPS;
    } else {
        let directory_offset = put(m, &dir)?;
        h.bitmaps = Some(BitmapsExt {
            nb_bitmaps: u32::try_from(bitmaps.len())
                .map_err(|_| Error::invalid("too many bitmaps"))?,
            directory_size: dir.len() as u64,
            directory_offset,
        });
        h.autoclear_features |= autoclear::BITMAPS;
    }
    m.storage.flush()?;
    write_header(m, h)?;
    for c in old {
        m.free_later(ClusterIndex(c));
    }
    m.flush_metadata()?;
    let file_size = m.storage.size()?;
    m.bitmaps = match m.h.bitmaps {
        Some(ext) => {
            super::bitmaps::Bitmaps::load(&*m.storage, ext, m.cluster_size(), m.h.size, file_size)?
        }
        None => None,
    };
    Ok(())
}
