//! Persistent dirty bitmaps (the bitmaps header extension), kept valid across the
//! changes strata makes to an image.
//!
//! They record changes as QEMU's do. Before the first change to the guest disk in
//! a session, every consistent bitmap is read whole into memory and marked in use
//! (inconsistent) on disk, in one directory write made durable before the change;
//! each change then sets the bits of its guest range in the enabled ones; closing
//! the image stores them anew (new data clusters, tables and directory, then the
//! header, then the old clusters freed), consistent again. A crash in between
//! leaves them in use: QEMU then disregards them (an incremental backup from one
//! starts over with a full one), never trusts wrong bits. Bitmaps already marked
//! in use when the image was opened are left as they are. Emptying an image (a
//! commit's top) changes no guest data and leaves the bits alone, as QEMU's does.
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
//! Crash safety: a table that moves is written, with its refcounts, before the
//! directory points at it, and old clusters are freed last (a crash leaks at
//! worst). Bitmaps held in memory (for changes or a resize) are in use on disk
//! from before the first change until they are stored at close, so a crash
//! anywhere in between leaves them inconsistent rather than wrong. A resize that
//! fails half way leaves them in use for good.

use super::bitmap_edit::Bitmap;
use super::entries::OFFSET_MASK;
use super::header::{be32, be64, BitmapsExt};
use super::meta::Meta;
use crate::units::index;
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
    /// The consistent bitmaps are held whole in `pending` and marked in use on
    /// disk: changes to the guest disk set their bits there.
    held: bool,
    /// The set was stored whole (as QEMU stores it when it closes an image)
    /// and has not changed since: closing the image writes nothing more.
    stored: bool,
    /// Bitmaps read whole and marked in use on disk (for changes to the guest
    /// disk or a resize), with their bits as they are to be stored (sized when
    /// stored, to the disk size then).
    pending: Vec<Bitmap>,
    /// A resize (by this thread) started and has not finished: `pending` must
    /// not be stored (the bitmaps stay in use on disk), nor changed by the
    /// resize's own writes.
    resize_open: Option<std::thread::ThreadId>,
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
            held: false,
            stored: false,
            pending: Vec::new(),
            resize_open: None,
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

    /// Mark every entry not yet in use in use, in the directory held here
    /// (the caller writes it); whether any changed.
    fn mark_all_in_use(&mut self) -> bool {
        let mut any = false;
        for i in 0..self.entries.len() {
            if self.entries[i].flags & FLAG_IN_USE == 0 {
                self.entries[i].flags |= FLAG_IN_USE;
                self.put_entry(i);
                any = true;
            }
        }
        any
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
    /// Before a change to the guest bytes `[offset, offset + len)`: the enabled
    /// bitmaps record it (held in memory, see the module; the first change of a
    /// session marks them in use on disk first). A resize's own writes (of the
    /// grown range, by the thread resizing) are not recorded, as QEMU's are not.
    pub(crate) fn dirty_bitmaps(&mut self, offset: u64, len: u64) -> Result<()> {
        let Some(b) = self.bitmaps.as_ref() else {
            return Ok(());
        };
        if len == 0 || matches!(&b.resize_open, Some(t) if *t == std::thread::current().id()) {
            return Ok(());
        }
        if !b.held {
            self.hold_bitmaps()?;
        }
        let b = self.bitmaps.as_mut().expect("checked");
        for p in b.pending.iter_mut().filter(|p| p.enabled) {
            p.mark(offset, len);
        }
        b.stored = false;
        Ok(())
    }

    /// Read every consistent bitmap whole into memory and mark it in use on
    /// disk (one directory write, made durable before anything else changes).
    fn hold_bitmaps(&mut self) -> Result<()> {
        let live = super::bitmap_edit::read_consistent_whole(self)?;
        let mut b = self.bitmaps.take().expect("checked");
        let marked = b.mark_all_in_use();
        b.pending = live;
        b.held = true;
        b.stored = false;
        let r = if marked {
            self.flush_metadata()
                .and_then(|_| Ok(self.storage.write_at(&b.dir, b.dir_offset)?))
                .and_then(|_| self.barrier())
        } else {
            Ok(())
        };
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
            b.mark_all_in_use();
            b.pending.clear();
            b.held = true;
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
        let any = b.mark_all_in_use();
        b.pending = pending;
        b.held = true;
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
    /// when the image closes; later changes to the guest disk are recorded in
    /// them.
    pub(crate) fn bitmaps_end_resize(&mut self) {
        if let Some(b) = self.bitmaps.as_mut() {
            if b.resize_open.take().is_some() {
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
