//! Persistent dirty bitmaps (the bitmaps header extension), kept valid across the
//! changes strata makes to an image.
//!
//! strata does not record which clusters each write touches. It keeps bitmaps valid
//! the conservative way instead: before the first change to the guest disk in a
//! session, every enabled ("auto") bitmap is set to all ones (each bitmap-table entry
//! becomes the all-ones marker and the bitmap's data clusters are freed). An
//! incremental backup from such a bitmap copies the whole disk: more work, nothing
//! missed. Bitmaps already marked in use (inconsistent) are left as they are.
//!
//! A resize keeps the bits, as QEMU does: a shrink drops those past the new end,
//! a growth adds clean ones for the new range (which reads as zeroes). An image
//! with a bitmap marked in use is not resized at all (QEMU's refusal).
//!
//! A directory strata cannot vouch for (reserved flags, unknown types, extra data
//! not marked compatible, fields out of range) is not touched: the image falls back
//! to the specification's rule for programs without bitmap support (the autoclear
//! bit is cleared, and QEMU then ignores the bitmaps).
//!
//! Crash safety: a table rewritten in place changes entry by entry, and every entry
//! is valid before and after; a table that moves is written, with its refcounts,
//! before the directory points at it, and old clusters are freed last (a crash leaks
//! at worst). A resize reads the bitmaps into memory and marks them in use before
//! it starts; they are stored anew at the new size only when the image is closed
//! (as QEMU stores them), so a crash anywhere in between leaves them inconsistent
//! (QEMU then disregards them) rather than wrong. A resize that fails half way
//! leaves them in use for good.

use super::bitmap_edit::Bitmap;
use super::entries::OFFSET_MASK;
use super::header::{be32, be64, BitmapsExt};
use super::meta::Meta;
use crate::units::{header_u32, index, ClusterCount, HostOffset};
use crate::{Error, Result};
use strata_storage::Storage;

/// The bitmap is being changed (or was, when a program stopped): inconsistent.
const FLAG_IN_USE: u32 = 1 << 0;
/// Enabled: it must record every change to the disk.
const FLAG_AUTO: u32 = 1 << 1;
/// Its extra data may be ignored by programs that do not know it.
const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// Bitmap-table entry with no data cluster and bit 0 set: every bit is one.
const ALL_ONES: u64 = 1;
/// Reserved bits of a bitmap table entry.
const TABLE_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// QEMU's limits for a bitmap: table entries, bytes of bitmap data, granularity
/// bits, name length.
const MAX_TABLE_SIZE: u32 = 0x0800_0000;
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;
const MAX_NAME_SIZE: usize = 1023;
/// The only bitmap type the specification defines.
const TYPE_DIRTY_TRACKING: u8 = 1;

/// One directory entry: where it sits in the directory and what it says.
#[derive(Debug, Clone)]
struct Entry {
    at: usize,
    name: String,
    table_offset: u64,
    table_size: u32,
    flags: u32,
    granularity_bits: u8,
}

/// The bitmap directory of an image open for writing.
#[derive(Debug, Clone)]
pub struct Bitmaps {
    dir_offset: u64,
    dir: Vec<u8>,
    entries: Vec<Entry>,
    /// Enabled bitmaps were set to all ones in this session.
    dirtied: bool,
    /// The set was stored whole (as QEMU stores it when it closes an image)
    /// and has not changed since: closing the image writes nothing more.
    stored: bool,
    /// Bitmaps a resize read whole and marked in use on disk, with their bits
    /// as they are to be stored (sized when stored, to the disk size then).
    pending: Vec<Bitmap>,
    /// A resize (by this thread) started and has not finished: `pending` must
    /// not be stored (the bitmaps stay in use on disk), nor changed by the
    /// resize's own writes.
    resize_open: Option<std::thread::ThreadId>,
    /// The enabled `pending` bitmaps were set to all ones for a change to the
    /// guest disk since the last resize.
    pending_dirtied: bool,
    /// A resize made a bitmap outgrow QEMU's limits: the bitmap QEMU names
    /// when it then fails to store them. Every bitmap stays in use on disk;
    /// none is stored again.
    lost: Option<String>,
}

/// Bitmap-table entries a bitmap of `granularity_bits` needs for `size` bytes.
pub(crate) fn table_entries_for(size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    size.div_ceil(1u64 << granularity_bits)
        .div_ceil(8)
        .div_ceil(cluster_size)
}

/// Bytes QEMU allocates at once to hold a bitmap of `granularity_bits` over
/// `size` bytes in memory (one bit per granule), as it does to load or resize one.
fn in_memory_bytes(size: u64, granularity_bits: u8) -> u64 {
    size.div_ceil(1u64 << granularity_bits).div_ceil(8)
}

/// The largest single allocation this machine's kernel grants, as its default
/// overcommit rule judges one (RAM plus swap); `None` when it cannot be read.
fn largest_allocation() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    kib("MemTotal:")?
        .checked_add(kib("SwapTotal:").unwrap_or(0))?
        .checked_mul(1024)
}

impl Bitmaps {
    /// Read and vet the directory. `Ok(None)` when strata cannot keep these bitmaps
    /// valid (the caller then clears the autoclear bit); errors are I/O errors.
    pub fn load(
        storage: &dyn Storage,
        ext: BitmapsExt,
        cluster_size: u64,
        disk_size: u64,
        file_size: u64,
    ) -> Result<Option<Bitmaps>> {
        let in_file = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= file_size);
        // The header parser bounds the directory size (64 KiB entries at most).
        if ext.nb_bitmaps == 0 || !in_file(ext.directory_offset, ext.directory_size) {
            return Ok(None);
        }
        let mut dir = vec![0u8; index(ext.directory_size)];
        storage.read_at(&mut dir, ext.directory_offset)?;
        let mut entries = Vec::new();
        let mut at = 0usize;
        for _ in 0..ext.nb_bitmaps {
            let Some(head) = dir.get(at..at + 24) else {
                return Ok(None);
            };
            let table_offset = be64(head, 0);
            let table_size = be32(head, 8);
            let flags = be32(head, 12);
            let kind = head[16];
            let granularity_bits = head[17];
            let name_size = u16::from_be_bytes([head[18], head[19]]) as usize;
            let extra = be32(head, 20) as usize;
            let fits = table_offset != 0
                && table_offset.is_multiple_of(cluster_size)
                && table_size != 0
                && table_size <= MAX_TABLE_SIZE
                && u64::from(table_size) * cluster_size <= MAX_PHYS_SIZE
                && in_file(table_offset, u64::from(table_size) * 8)
                && flags & !KNOWN_FLAGS == 0
                && kind == TYPE_DIRTY_TRACKING
                && (MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits)
                && name_size <= MAX_NAME_SIZE
                && (extra == 0 || flags & FLAG_EXTRA_DATA_COMPATIBLE != 0)
                && (flags & FLAG_IN_USE != 0
                    || u64::from(table_size)
                        == table_entries_for(disk_size, granularity_bits, cluster_size).max(1));
            let len = (24 + extra + name_size).next_multiple_of(8);
            if !fits || at + len > dir.len() {
                return Ok(None);
            }
            let name = &dir[at + 24 + extra..at + 24 + extra + name_size];
            entries.push(Entry {
                at,
                name: String::from_utf8_lossy(name).into_owned(),
                table_offset,
                table_size,
                flags,
                granularity_bits,
            });
            at += len;
        }
        Ok(Some(Bitmaps {
            dir_offset: ext.directory_offset,
            dir,
            entries,
            dirtied: false,
            stored: false,
            pending: Vec::new(),
            resize_open: None,
            pending_dirtied: false,
            lost: None,
        }))
    }

    /// Refuse, as QEMU refuses when it opens the image, a bitmap directory whose
    /// entries break the constraints, or a bitmap (not in use) whose table has an
    /// entry with reserved bits, an unaligned offset, or an offset together with
    /// the all-ones flag. Used when opening for a check, so that strata's check
    /// fails where qemu-img's cannot start.
    pub fn vet(
        storage: &dyn Storage,
        ext: BitmapsExt,
        cluster_size: u64,
        disk_size: u64,
        file_size: u64,
    ) -> Result<()> {
        let Some(b) = Self::load(storage, ext, cluster_size, disk_size, file_size)? else {
            return Err(Error::invalid(
                "Bitmap directory doesn't satisfy the constraints",
            ));
        };
        for e in b.entries.iter().filter(|e| e.flags & FLAG_IN_USE == 0) {
            let mut table = vec![0u8; e.table_size as usize * 8];
            storage.read_at(&mut table, e.table_offset)?;
            for entry in table.chunks_exact(8).map(|c| be64(c, 0)) {
                let off = entry & OFFSET_MASK;
                if entry & TABLE_ENTRY_RESERVED != 0
                    || !off.is_multiple_of(cluster_size)
                    || (entry & ALL_ONES != 0 && off != 0)
                {
                    return Err(Error::invalid(format!(
                        "Bitmap '{}' has an invalid bitmap table entry 0x{entry:x}",
                        e.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// The bitmap a resize made too large to store (see
    /// [`Meta::bitmaps_begin_resize`]), if any.
    pub(crate) fn lost(&self) -> Option<&str> {
        self.lost.as_deref()
    }

    /// Whether the set was stored whole and is unchanged since.
    pub(crate) fn stored(&self) -> bool {
        self.stored
    }

    /// Record that the set was just stored whole.
    pub(crate) fn set_stored(&mut self) {
        self.stored = true;
    }

    fn put_entry(&mut self, i: usize) {
        let e = &self.entries[i];
        let at = e.at;
        self.dir[at..at + 8].copy_from_slice(&e.table_offset.to_be_bytes());
        self.dir[at + 8..at + 12].copy_from_slice(&e.table_size.to_be_bytes());
        self.dir[at + 12..at + 16].copy_from_slice(&e.flags.to_be_bytes());
    }
}

impl Meta {
    /// Before the first change to the guest disk in this session: set every
    /// enabled bitmap to all ones (a no-op after that, or without bitmaps).
    /// Bitmaps a resize holds in memory are set to all ones in memory, once per
    /// resize; during a resize, by a change another thread makes (the resize's
    /// own writes of the grown range leave them clean, as QEMU's do).
    pub(crate) fn dirty_bitmaps(&mut self) -> Result<()> {
        if let Some(b) = self.bitmaps.as_mut() {
            if !b.pending.is_empty() && !b.pending_dirtied {
                match &b.resize_open {
                    Some(t) if *t == std::thread::current().id() => {}
                    _ => {
                        for p in b.pending.iter_mut().filter(|p| p.enabled) {
                            p.bits.fill(0xff);
                        }
                        b.pending_dirtied = true;
                        b.stored = false;
                    }
                }
            }
        }
        match &self.bitmaps {
            Some(b) if !b.dirtied => {}
            _ => return Ok(()),
        }
        let mut b = self.bitmaps.take().expect("checked");
        let size = self.h.size;
        let enabled = |e: &Entry| e.flags & FLAG_AUTO != 0 && e.flags & FLAG_IN_USE == 0;
        let r = self.fill(&mut b, size, enabled);
        if r.is_ok() {
            b.dirtied = true;
        }
        self.bitmaps = Some(b);
        r
    }

    /// Before a resize to `size` (also to the same size): refuse, as QEMU
    /// does, if a bitmap is marked in use (inconsistent); else read every
    /// bitmap whole into memory and mark it in use on disk (one directory
    /// write, flushed), so that the image is safe from here until
    /// [`Meta::store_bitmaps_at_close`] stores them at the size the image then
    /// has. [`Meta::bitmaps_end_resize`] says the resize finished; without it
    /// the bitmaps stay in use.
    ///
    /// A bitmap that would outgrow QEMU's limits at `size` does not stop the
    /// resize, as it does not stop qemu-img's: every bitmap is marked in use
    /// on disk (before the resize changes anything) and none is stored again,
    /// which is what qemu-img leaves when it fails to store them at close.
    /// [`Bitmaps::lost`] names the bitmap qemu-img's warning names (the last
    /// one too large, in directory order: QEMU tries them newest first).
    /// A bitmap that would not even fit in this machine's memory at `size`
    /// (where qemu-img aborts) refuses the resize, with nothing changed.
    pub(crate) fn bitmaps_begin_resize(&mut self, size: u64) -> Result<()> {
        let cs = self.cluster_size();
        let Some(b) = self.bitmaps.as_ref() else {
            return Ok(());
        };
        // Bitmaps this session's own earlier resize holds are whole in memory;
        // those of a resize that failed half way are not.
        let held =
            |e: &Entry| b.resize_open.is_none() && b.pending.iter().any(|p| p.name == e.name);
        if let Some(e) = b
            .entries
            .iter()
            .find(|e| e.flags & FLAG_IN_USE != 0 && !held(e))
        {
            return Err(Error::invalid_argument(format!(
                "Bitmap '{}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk",
                e.name
            )));
        }
        // qemu-img aborts, failing to allocate, where a bitmap at the new size
        // does not fit in memory, leaving the image as it was; QEMU could not
        // load that bitmap afterwards either. Refused before anything changes.
        if let Some(limit) = largest_allocation() {
            if let Some(e) = b
                .entries
                .iter()
                .find(|e| in_memory_bytes(size, e.granularity_bits) > limit)
            {
                return Err(Error::invalid_argument(format!(
                    "Cannot resize to {size} bytes: persistent bitmap '{}' would need {} \
                     bytes of memory, more than this machine has (QEMU could not load it); \
                     remove it first with 'qemu-img bitmap --remove'",
                    e.name,
                    in_memory_bytes(size, e.granularity_bits)
                )));
            }
        }
        let too_big = |e: &&Entry| {
            let need = table_entries_for(size, e.granularity_bits, cs);
            need > u64::from(MAX_TABLE_SIZE)
                || need.checked_mul(cs).is_none_or(|n| n > MAX_PHYS_SIZE)
        };
        if let Some(lost) = b.entries.iter().rev().find(too_big).map(|e| e.name.clone()) {
            let mut b = self.bitmaps.take().expect("checked");
            for i in 0..b.entries.len() {
                if b.entries[i].flags & FLAG_IN_USE == 0 {
                    b.entries[i].flags |= FLAG_IN_USE;
                    b.put_entry(i);
                }
            }
            b.pending.clear();
            b.lost = Some(lost);
            let r = self
                .flush_metadata()
                .and_then(|_| Ok(self.storage.write_at(&b.dir, b.dir_offset)?))
                .and_then(|_| self.barrier());
            self.bitmaps = Some(b);
            return r;
        }
        if size == self.h.size {
            return Ok(());
        }
        let pending = super::bitmap_edit::read_whole(self)?;
        let mut b = self.bitmaps.take().expect("checked");
        let mut any = false;
        for i in 0..b.entries.len() {
            if b.entries[i].flags & FLAG_IN_USE == 0 {
                b.entries[i].flags |= FLAG_IN_USE;
                b.put_entry(i);
                any = true;
            }
        }
        b.pending = pending;
        b.stored = false;
        b.resize_open = Some(std::thread::current().id());
        let r = if any {
            self.flush_metadata()
                .and_then(|_| Ok(self.storage.write_at(&b.dir, b.dir_offset)?))
                .and_then(|_| self.barrier())
        } else {
            Ok(())
        };
        self.bitmaps = Some(b);
        r
    }

    /// After a resize (its own writes of the grown range included): the
    /// bitmaps [`Meta::bitmaps_begin_resize`] holds in memory are to be stored
    /// when the image closes; a later change to the guest disk sets the enabled
    /// ones to all ones.
    pub(crate) fn bitmaps_end_resize(&mut self) {
        if let Some(b) = self.bitmaps.as_mut() {
            if b.resize_open.take().is_some() {
                b.pending_dirtied = false;
                b.stored = false;
            }
        }
    }

    /// The bitmap a finished resize holds in memory under `name`, if any.
    pub(crate) fn pending_bitmap(&self, name: &str) -> Option<&Bitmap> {
        let b = self.bitmaps.as_ref()?;
        if b.resize_open.is_some() {
            return None;
        }
        b.pending.iter().find(|p| p.name == name)
    }

    /// Set the bitmaps `chosen` picks to all ones for a disk of `size` bytes (tables
    /// of the right size, moved if their size changes), then write the directory
    /// and free what the old tables held.
    fn fill(&mut self, b: &mut Bitmaps, size: u64, chosen: impl Fn(&Entry) -> bool) -> Result<()> {
        b.stored = false;
        let cs = self.cluster_size();
        let bits = self.geo.cluster_bits;
        let mut frees = Vec::new();
        let mut dir_changed = false;
        for i in 0..b.entries.len() {
            if !chosen(&b.entries[i]) {
                continue;
            }
            let e = &mut b.entries[i];
            let need = table_entries_for(size, e.granularity_bits, cs).max(1);
            let mut raw = vec![0u8; e.table_size as usize * 8];
            self.storage.read_at(&mut raw, e.table_offset)?;
            let old: Vec<u64> = (0..raw.len()).step_by(8).map(|at| be64(&raw, at)).collect();
            let unchanged = need == u64::from(e.table_size) && old.iter().all(|&x| x == ALL_ONES);
            if unchanged {
                continue;
            }
            let table_size = header_u32(need, "bitmap table size")?;
            let ones: Vec<u8> = std::iter::repeat_n(ALL_ONES.to_be_bytes(), index(need))
                .flatten()
                .collect();
            if need == u64::from(e.table_size) {
                // In place: every entry is valid before and after its own write.
                self.storage.write_at(&ones, e.table_offset)?;
            } else {
                let at = self
                    .alloc_clusters(ClusterCount::for_bytes(need * 8, bits))?
                    .get();
                self.storage.write_at(&ones, at)?;
                frees
                    .extend(HostOffset(e.table_offset).clusters(u64::from(e.table_size) * 8, bits));
                e.table_offset = at;
                e.table_size = table_size;
            }
            frees.extend(
                old.iter()
                    .map(|&x| HostOffset(x & OFFSET_MASK))
                    .filter(|o| !o.is_none())
                    .map(|o| o.cluster(bits)),
            );
            b.put_entry(i);
            dir_changed = true;
        }
        // New tables and their refcounts are on disk before the directory points
        // at them; old clusters are freed only once it no longer does.
        self.flush_metadata()?;
        if dir_changed {
            self.storage.write_at(&b.dir, b.dir_offset)?;
            self.barrier()?;
        }
        for c in frees {
            self.free_later(c);
        }
        self.flush_metadata()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_size_follows_disk_size_granularity_and_cluster_size() {
        // 1 GiB at 64 KiB granularity: 16384 bits = 2 KiB, one 64 KiB cluster.
        assert_eq!(table_entries_for(1 << 30, 16, 65536), 1);
        // 1 TiB at 64 KiB granularity: 2 MiB of bits, 32 clusters of 64 KiB.
        assert_eq!(table_entries_for(1 << 40, 16, 65536), 32);
        // One bit past a cluster's worth needs a second cluster.
        let per_cluster = 512u64 * 8 * 512;
        assert_eq!(table_entries_for(per_cluster, 9, 512), 1);
        assert_eq!(table_entries_for(per_cluster + 512, 9, 512), 2);
        assert_eq!(table_entries_for(0, 16, 65536), 0);
    }
}
