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

/// The bitmap is being changed (or was, when a program stopped): inconsistent.
const FLAG_IN_USE: u32 = 1 << 0;
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

impl Bitmap {
    /// Record a change to the guest bytes `[offset, offset + len)`: set every
    /// bit whose range they touch (the bits grow to cover them).
    pub(crate) fn mark(&mut self, offset: u64, len: u64) {
        let Some(last_byte) = offset.checked_add(len).and_then(|e| e.checked_sub(1)) else {
            return;
        };
        let first = offset >> self.granularity_bits;
        let last = last_byte >> self.granularity_bits;
        let need = index(last / 8 + 1);
        if self.bits.len() < need {
            self.bits.resize(need, 0);
        }
        let mut k = first;
        while k <= last {
            if k.is_multiple_of(8) && last - k >= 7 {
                // Whole bytes at once.
                let whole = (last - k + 1) / 8;
                let at = index(k / 8);
                self.bits[at..at + index(whole)].fill(0xff);
                k += whole * 8;
            } else {
                self.set(k);
                k += 1;
            }
        }
    }

    /// Clear the bits of the last byte that lie past a disk of `size` bytes
    /// (an all-ones table entry sets them too; QEMU stores them as zeroes).
    fn clear_past_end(&mut self, size: u64) {
        let nbits = size.div_ceil(1u64 << self.granularity_bits);
        let total = self.bits.len() as u64 * 8;
        for k in nbits..total {
            if let Some(b) = self.bits.get_mut((k / 8) as usize) {
                *b &= !(1 << (k % 8));
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
        let m = self.lock()?;
        let mut out = Vec::new();
        let mut in_use = Vec::new();
        for slot in read_slots(&m)? {
            match slot {
                Slot::Live(b) => out.push(b),
                Slot::Kept(k) => in_use.push(k.name),
            }
        }
        Ok((out, in_use))
    }

    /// Make `bitmaps` the image's whole set of persistent bitmaps (see the
    /// module for the order of the writes).
    pub fn store_bitmaps(&self, bitmaps: &[Bitmap]) -> Result<()> {
        self.check_writable()?;
        self.read_bitmaps()?;
        let _excl = self.exclusive();
        let mut m = self.lock()?;
        let slots: Vec<Slot> = bitmaps.iter().cloned().map(Slot::Live).collect();
        store(&mut m, &slots, false).map_err(|e| self.err(e))
    }

    /// [`Qcow2Image::store_bitmaps`] as `qemu-img bitmap` leaves the file: the
    /// directory the image had is first marked in use where it lies (QEMU marks
    /// the bitmaps it loads for writing so when it opens the image), then the new
    /// set is stored. A crash before the header names the new directory leaves
    /// the old bitmaps inconsistent, as QEMU would, never wrong.
    pub fn store_bitmaps_as_qemu(&self, bitmaps: &[Bitmap]) -> Result<()> {
        self.store_bitmaps_as_qemu_removing(bitmaps, &[])
    }

    /// [`Qcow2Image::store_bitmaps_as_qemu`] after the bitmaps named in
    /// `removed` were removed one by one, as `qemu-img bitmap --remove` removes
    /// them: the directory marked in use where it lies, then for each name
    /// found in it a new directory without it (written, counted and flushed
    /// before the header names it; the old directory and the removed bitmap's
    /// clusters freed after), then the new set stored. A crash leaves the
    /// bitmaps in use (inconsistent) or the new set, and leaks at worst.
    pub fn store_bitmaps_as_qemu_removing(
        &self,
        bitmaps: &[Bitmap],
        removed: &[String],
    ) -> Result<()> {
        self.check_writable()?;
        self.read_bitmaps()?;
        let _excl = self.exclusive();
        let mut m = self.lock()?;
        let slots: Vec<Slot> = bitmaps.iter().cloned().map(Slot::Live).collect();
        let r = (|| {
            if !removed.is_empty() {
                mark_in_use(&mut m)?;
                for name in removed {
                    remove_from_directory(&mut m, name)?;
                }
            }
            store(&mut m, &slots, true)
        })();
        r.map_err(|e| self.err(e))
    }
}

/// A directory entry as a store keeps it: a bitmap read whole, or one marked in
/// use (inconsistent), carried over with its table and flags untouched.
#[derive(Debug, Clone)]
enum Slot {
    Live(Bitmap),
    Kept(Kept),
}

/// A bitmap marked in use, as its directory entry describes it.
#[derive(Debug, Clone)]
struct Kept {
    name: String,
    table_offset: u64,
    table_size: u32,
    flags: u32,
    granularity_bits: u8,
}

/// Every bitmap of the image in directory order: the consistent ones read
/// whole, those marked in use as their entries say (none when the image has no
/// bitmaps, or its autoclear bit says they are stale).
fn read_slots(m: &Meta) -> Result<Vec<Slot>> {
    let cs = m.cluster_size();
    let size = m.h.size;
    let Some(ext) = m.h.bitmaps else {
        return Ok(Vec::new());
    };
    if m.h.autoclear_features & autoclear::BITMAPS == 0 {
        return Ok(Vec::new());
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
        at += (24 + extra + name_size).next_multiple_of(8);
        if flags & FLAG_IN_USE != 0 {
            // Marked in use by this session's resize, which holds it whole.
            if let Some(p) = m.pending_bitmap(&name) {
                let mut b = p.clone();
                b.bits.resize(index(bytes_for(size, b.granularity_bits)), 0);
                b.clear_past_end(size);
                out.push(Slot::Live(b));
                continue;
            }
            out.push(Slot::Kept(Kept {
                name,
                table_offset,
                table_size,
                flags,
                granularity_bits: gran,
            }));
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
        b.clear_past_end(size);
        out.push(Slot::Live(b));
    }
    Ok(out)
}

/// Every consistent bitmap of the image read whole (and those this session
/// holds), in directory order; those marked in use are left out.
pub(crate) fn read_consistent_whole(m: &Meta) -> Result<Vec<Bitmap>> {
    Ok(read_slots(m)?
        .into_iter()
        .filter_map(|s| match s {
            Slot::Live(b) => Some(b),
            Slot::Kept(_) => None,
        })
        .collect())
}

/// Every bitmap of the image read whole, in directory order; refused if one
/// is marked in use (but for those this session's resize holds).
pub(crate) fn read_whole(m: &Meta) -> Result<Vec<Bitmap>> {
    read_slots(m)?
        .into_iter()
        .map(|s| match s {
            Slot::Live(b) => Ok(b),
            Slot::Kept(k) => Err(Error::invalid_argument(format!(
                "Bitmap '{}' is inconsistent and cannot be used",
                k.name
            ))),
        })
        .collect()
}

impl Meta {
    /// At the close of an image opened for writing: store its persistent
    /// bitmaps anew, as QEMU does when it closes an image (the directory marked
    /// in use where it lies, then new data clusters and tables for every
    /// consistent bitmap, a new directory, the header naming it, and the old
    /// clusters freed). Bitmaps marked in use stay as they are; with none
    /// consistent, or once stored and unchanged since, nothing is written.
    pub(crate) fn store_bitmaps_at_close(&mut self) -> Result<()> {
        if self.read_only
            || self
                .bitmaps
                .as_ref()
                .is_none_or(|b| b.stored() || b.lost().is_some())
        {
            return Ok(());
        }
        let slots = read_slots(self)?;
        if !slots.iter().any(|s| matches!(s, Slot::Live(_))) {
            return Ok(());
        }
        store(self, &slots, true)
    }
}

/// The clusters the old set uses, but for the tables (and their data) of the
/// bitmaps `kept` carries over: the directory's, then per bitmap its data
/// clusters and table's, in directory order.
fn old_clusters(m: &Meta, kept: &[u64]) -> Result<(Vec<u64>, Vec<u64>)> {
    let cs = m.cluster_size();
    let Some(ext) = m.h.bitmaps else {
        return Ok((Vec::new(), Vec::new()));
    };
    let span = |off: u64, len: u64| (off / cs..(off + len).div_ceil(cs)).collect::<Vec<_>>();
    let mut out = span(ext.directory_offset, ext.directory_size);
    let mut data = Vec::new();
    let mut dir = vec![0u8; index(ext.directory_size)];
    m.storage.read_at(&mut dir, ext.directory_offset)?;
    let mut at = 0usize;
    for _ in 0..ext.nb_bitmaps {
        let Some(head) = dir.get(at..at + 24) else {
            break;
        };
        let (table_offset, table_size) = (be64(head, 0), u64::from(be32(head, 8)));
        let (name_size, extra) = (u16::from_be_bytes([head[18], head[19]]), be32(head, 20));
        at += (24 + extra as usize + name_size as usize).next_multiple_of(8);
        if kept.contains(&table_offset) {
            continue;
        }
        let mut table = vec![0u8; index(table_size) * 8];
        m.storage.read_at(&mut table, table_offset)?;
        let cl: Vec<u64> = table
            .chunks_exact(8)
            .map(|c| be64(c, 0) & OFFSET_MASK)
            .filter(|&o| o != 0)
            .map(|o| o / cs)
            .collect();
        out.extend(&cl);
        data.extend(cl);
        out.extend(span(table_offset, table_size * 8));
    }
    Ok((out, data))
}

/// Mark every entry of the directory the header names in use, where it lies
/// (each entry stays valid whether or not its write lands).
fn mark_in_use(m: &mut Meta) -> Result<()> {
    let Some(ext) = m.h.bitmaps else {
        return Ok(());
    };
    if m.h.autoclear_features & autoclear::BITMAPS == 0 {
        return Ok(());
    }
    let mut dir = vec![0u8; index(ext.directory_size)];
    m.storage.read_at(&mut dir, ext.directory_offset)?;
    let mut at = 0usize;
    let mut changed = false;
    for _ in 0..ext.nb_bitmaps {
        let Some(head) = dir.get_mut(at..at + 24) else {
            break;
        };
        let flags = be32(head, 12);
        if flags & FLAG_IN_USE == 0 {
            head[12..16].copy_from_slice(&(flags | FLAG_IN_USE).to_be_bytes());
            changed = true;
        }
        let (name_size, extra) = (u16::from_be_bytes([head[18], head[19]]), be32(head, 20));
        at += (24 + extra as usize + name_size as usize).next_multiple_of(8);
    }
    if changed {
        m.storage.write_at(&dir, ext.directory_offset)?;
        m.storage.flush()?;
    }
    Ok(())
}

/// Write a new directory without the entry named `name` (the others as they
/// are on disk), switch the header to it, then free the old directory and
/// the removed bitmap's table and data clusters (the data discarded, as QEMU
/// discards it). Nothing when no entry has that name.
fn remove_from_directory(m: &mut Meta, name: &str) -> Result<()> {
    let Some(ext) = m.h.bitmaps else {
        return Ok(());
    };
    if m.h.autoclear_features & autoclear::BITMAPS == 0 {
        return Ok(());
    }
    let cs = m.cluster_size();
    let mut dir = vec![0u8; index(ext.directory_size)];
    m.storage.read_at(&mut dir, ext.directory_offset)?;
    let mut kept = Vec::new();
    let mut gone = None;
    let mut at = 0usize;
    for _ in 0..ext.nb_bitmaps {
        let head = dir
            .get(at..at + 24)
            .ok_or_else(|| Error::corrupt("bitmap directory entry runs past the directory"))?;
        let name_size = usize::from(u16::from_be_bytes([head[18], head[19]]));
        let extra = index(u64::from(be32(head, 20)));
        let len = (24 + extra + name_size).next_multiple_of(8);
        let entry = dir
            .get(at..at + len)
            .ok_or_else(|| Error::corrupt("bitmap name runs past the directory"))?;
        if gone.is_none() && entry.get(24 + extra..24 + extra + name_size) == Some(name.as_bytes())
        {
            gone = Some((be64(head, 0), u64::from(be32(head, 8))));
        } else {
            kept.extend_from_slice(entry);
        }
        at += len;
    }
    let Some((table_offset, table_size)) = gone else {
        return Ok(());
    };
    let mut table = vec![0u8; index(table_size) * 8];
    m.storage.read_at(&mut table, table_offset)?;
    let data: Vec<u64> = table
        .chunks_exact(8)
        .map(|c| be64(c, 0) & OFFSET_MASK)
        .filter(|&o| o != 0)
        .map(|o| o / cs)
        .collect();
    m.flush_metadata()?;
    let mut h = m.h.clone();
    if kept.is_empty() {
        h.bitmaps = None;
        h.autoclear_features &= !autoclear::BITMAPS;
    } else {
        let directory_offset = put(m, &kept)?;
        h.bitmaps = Some(BitmapsExt {
            nb_bitmaps: ext.nb_bitmaps - 1,
            directory_size: kept.len() as u64,
            directory_offset,
        });
    }
    // The new directory and its refcounts are on disk before the header names it.
    m.flush_metadata()?;
    m.storage.flush()?;
    write_header(m, h)?;
    let span = |off: u64, len: u64| off / cs..(off + len).div_ceil(cs);
    for c in span(ext.directory_offset, ext.directory_size) {
        m.free_later(ClusterIndex(c));
    }
    for &c in &data {
        m.free_later(ClusterIndex(c));
    }
    for c in span(table_offset, table_size * 8) {
        m.free_later(ClusterIndex(c));
    }
    m.flush_metadata()?;
    for c in data {
        if m.refcount(ClusterIndex(c))? == 0 {
            m.storage.discard(c * cs, cs)?;
        }
    }
    Ok(())
}

/// Allocate, count and write `bytes` at new clusters; returns the offset.
fn put(m: &mut Meta, bytes: &[u8]) -> Result<u64> {
    let n = ClusterCount((bytes.len() as u64).div_ceil(m.cluster_size()));
    let off = m.alloc_clusters(n)?.get();
    m.write_dirty_refblocks()?;
    m.storage.write_at(bytes, off)?;
    Ok(off)
}

/// Store `slots` as the image's bitmap set; `mark` first marks the old
/// directory in use in place, as QEMU leaves it.
fn store(m: &mut Meta, slots: &[Slot], mark: bool) -> Result<()> {
    if slots.is_empty() && m.h.bitmaps.is_none() {
        return Ok(());
    }
    let cs = index(m.cluster_size());
    let kept: Vec<u64> = slots
        .iter()
        .filter_map(|s| match s {
            Slot::Kept(k) => Some(k.table_offset),
            Slot::Live(_) => None,
        })
        .collect();
    let (old, old_data) = if m.h.autoclear_features & autoclear::BITMAPS != 0 {
        old_clusters(m, &kept)?
    } else {
        (Vec::new(), Vec::new())
    };
    if mark {
        mark_in_use(m)?;
    }
    m.flush_metadata()?;
    let mut dir = Vec::new();
    for slot in slots {
        let (table_offset, entries, flags, gran, name) = match slot {
            Slot::Live(b) => {
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
                let entries = u32::try_from(table.len() / 8)
                    .map_err(|_| Error::invalid("a bitmap table is too large"))?;
                let flags = if b.enabled { FLAG_AUTO } else { 0 };
                (table_offset, entries, flags, b.granularity_bits, &b.name)
            }
            Slot::Kept(k) => (
                k.table_offset,
                k.table_size,
                k.flags,
                k.granularity_bits,
                &k.name,
            ),
        };
        dir.extend_from_slice(&table_offset.to_be_bytes());
        dir.extend_from_slice(&entries.to_be_bytes());
        dir.extend_from_slice(&flags.to_be_bytes());
        dir.push(TYPE_DIRTY_TRACKING);
        dir.push(gran);
        let name_len =
            u16::try_from(name.len()).map_err(|_| Error::invalid("a bitmap name is too long"))?;
        dir.extend_from_slice(&name_len.to_be_bytes());
        dir.extend_from_slice(&0u32.to_be_bytes());
        dir.extend_from_slice(name.as_bytes());
        dir.resize(dir.len().next_multiple_of(8), 0);
    }
    let mut h = m.h.clone();
    if slots.is_empty() {
        h.bitmaps = None;
        h.autoclear_features &= !autoclear::BITMAPS;
    } else {
        let directory_offset = put(m, &dir)?;
        h.bitmaps = Some(BitmapsExt {
            nb_bitmaps: u32::try_from(slots.len())
                .map_err(|_| Error::invalid("too many bitmaps"))?,
            directory_size: dir.len() as u64,
            directory_offset,
        });
        h.autoclear_features |= autoclear::BITMAPS;
    }
    // The new set and its refcounts are on disk before the header names it.
    m.flush_metadata()?;
    m.storage.flush()?;
    write_header(m, h)?;
    for c in old {
        m.free_later(ClusterIndex(c));
    }
    m.flush_metadata()?;
    // QEMU discards the freed bitmap data clusters (no longer referenced
    // anywhere, their refcounts now zero on disk).
    if mark {
        for c in old_data {
            let off = c * m.cluster_size();
            if m.refcount(ClusterIndex(c))? == 0 {
                m.storage.discard(off, m.cluster_size())?;
            }
        }
    }
    let file_size = m.storage.size()?;
    m.bitmaps = match m.h.bitmaps {
        Some(ext) => {
            super::bitmaps::Bitmaps::load(&*m.storage, ext, m.cluster_size(), m.h.size, file_size)?
        }
        None => None,
    };
    if let Some(b) = m.bitmaps.as_mut() {
        b.set_stored();
    }
    Ok(())
}
