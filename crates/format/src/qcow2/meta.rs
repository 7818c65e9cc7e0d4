//! The metadata state of an open qcow2 image and the ordered ways to change it.

use super::barrier::{skipped, Barrier};
use super::cache::TableCache;
use super::entries::{self, Geometry, L2Entry, OFLAG_COPIED};
use super::header::{self, Header};
use super::snapshot::Snapshot;
use crate::units::{index, ClusterCount, ClusterIndex, HostOffset};
use crate::{Error, Result};
use std::sync::Arc;
use strata_storage::{DebugEvent, Storage};

/// Bytes of L2 tables kept in memory (QEMU's default covers 32 MiB of guest data per
/// MiB; strata keeps enough to map a 1 TiB disk with 64 KiB clusters).
pub const L2_CACHE_BYTES: u64 = 32 << 20;
pub const REFBLOCK_CACHE_BYTES: u64 = 4 << 20;

pub struct Meta {
    pub storage: Arc<dyn Storage>,
    pub h: Header,
    pub geo: Geometry,
    /// Raw L1 entries.
    pub l1: Vec<u64>,
    /// Raw refcount table entries.
    pub reftable: Vec<u64>,
    /// L2 tables by host offset; entries as raw u64 (entry, bitmap pairs with extended L2).
    pub l2: TableCache<Vec<u64>>,
    /// Refcount blocks by host offset, as stored bytes.
    pub rb: TableCache<Vec<u8>>,
    /// No cluster below this index is free (a search starts here).
    pub free_hint: u64,
    /// Host clusters whose refcount drops once the current mappings are on disk.
    pub pending_frees: Vec<ClusterIndex>,
    /// Freed host clusters whose bytes go back to the file system (a punched hole)
    /// once their refcount is durable at zero (see [`super::shrink`]).
    pub pending_punches: Vec<ClusterIndex>,
    /// Clusters that zeroes written with unmap allowed, or a discard, free are
    /// punched once free too (QEMU's behaviour for an image opened with
    /// unmapping on, as `qemu-img commit` opens its base).
    pub punch_unmapped: bool,
    /// Offset of the next free byte for packing compressed clusters (0: none open).
    pub compressed_cursor: u64,
    pub snapshots: Vec<Snapshot>,
    /// Entries a check read with more than 1024 bytes of extra data, of which only
    /// the first 1024 are in `snapshots` (index, length on disk); their table's
    /// on-disk span is `snapshot_span`. Empty once the table is rewritten.
    pub snapshot_extra_dropped: Vec<(usize, u32)>,
    /// The snapshot table's length on disk when it differs from what
    /// `snapshots` serialises to (extra data a check skipped).
    pub snapshot_span: Option<u64>,
    /// Entries a check's read left out because the table would pass 64 MiB
    /// (the header still counts them).
    pub snapshot_overhang: u32,
    pub read_only: bool,
    /// Set once the dirty bit has been written for this session (lazy refcounts).
    pub dirty_written: bool,
    /// The dirty bit was set when the image was opened (a lazy-refcounts writer
    /// that did not close cleanly) and no repair has since made the refcounts
    /// whole: closing leaves the bit set, so the next writer repairs first.
    pub dirty_inherited: bool,
    /// A metadata operation ([`Meta::begin_metadata_op`]) runs and owes the dirty
    /// bit before its first write that could leave a COPIED flag disagreeing with
    /// its refcount ([`Meta::mark_op_dirty`]); until then it has written only
    /// what a crash leaves as leaks, so the bit (two flushes) is spared.
    pub(crate) dirty_deferred: bool,
    /// Flush the storage between ordered metadata writes (the default).
    pub barriers: bool,
    /// `fallocate` fresh data clusters before writing them (off by default).
    pub falloc_new_clusters: bool,
    /// Steps that failed without failing their operation (clusters leaked at
    /// worst), in the words QEMU prints for them on stderr; the caller shows
    /// them ([`super::Qcow2Image::take_notices`]).
    pub notices: Vec<String>,
    /// Persistent bitmaps kept valid while the image is open for writing.
    pub bitmaps: Option<super::bitmaps::Bitmaps>,
    /// The external data file, when guest data lives there: flushed at every
    /// ordering point before the qcow2 file, so data is durable before the L2 entry
    /// that maps it.
    pub data_storage: Option<Arc<dyn Storage>>,
}

impl Meta {
    /// Bytes the snapshot table takes on disk (its entries' serialised size, or
    /// the span a check read when it skipped extra data).
    pub fn snapshot_table_len(&self) -> u64 {
        self.snapshot_span
            .unwrap_or_else(|| super::snapshot::table_size(&self.snapshots))
    }

    pub fn new(
        storage: Arc<dyn Storage>,
        h: Header,
        l1: Vec<u64>,
        reftable: Vec<u64>,
        read_only: bool,
    ) -> Self {
        let geo = Geometry {
            cluster_bits: h.cluster_bits,
            extended_l2: h.extended_l2(),
            version: h.version,
            data_file: super::data_file::has_data_file(&h),
        };
        let cs = h.cluster_size();
        Meta {
            storage,
            geo,
            l1,
            reftable,
            l2: TableCache::new(index(L2_CACHE_BYTES / cs)),
            rb: TableCache::new(index((REFBLOCK_CACHE_BYTES / cs).max(8))),
            free_hint: 1,
            pending_frees: Vec::new(),
            pending_punches: Vec::new(),
            punch_unmapped: false,
            compressed_cursor: 0,
            snapshots: Vec::new(),
            snapshot_extra_dropped: Vec::new(),
            snapshot_span: None,
            snapshot_overhang: 0,
            read_only,
            dirty_written: false,
            dirty_inherited: false,
            dirty_deferred: false,
            barriers: true,
            falloc_new_clusters: false,
            notices: Vec::new(),
            bitmaps: None,
            data_storage: None,
            h,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        self.h.cluster_size()
    }
    pub fn l2_entries(&self) -> u64 {
        self.h.l2_entries()
    }
    /// u64 words per L2 entry in the cached tables.
    pub(crate) fn words(&self) -> usize {
        if self.geo.extended_l2 {
            2
        } else {
            1
        }
    }

    /// L2 table offset and COPIED flag for L1 index `i` (none if none).
    pub fn l1_entry(&self, i: u64) -> Result<(HostOffset, bool)> {
        match self.l1.get(index(i)) {
            None => Ok((HostOffset::NONE, false)),
            Some(&e) => entries::decode_l1(e, self.cluster_size(), i),
        }
    }

    fn decode_table(&self, buf: &[u8]) -> Vec<u64> {
        buf.chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
            .collect()
    }

    pub(crate) fn encode_table(t: &[u64]) -> Vec<u8> {
        let mut out = Vec::with_capacity(t.len() * 8);
        for e in t {
            out.extend_from_slice(&e.to_be_bytes());
        }
        out
    }

    /// Write every dirty refcount block (no flush).
    pub fn write_dirty_refblocks(&mut self) -> Result<bool> {
        self.write_refblocks()
    }

    pub(crate) fn write_refblocks(&mut self) -> Result<bool> {
        let offs = self.rb.dirty_offsets();
        for off in &offs {
            let slot = self.rb.get(*off).expect("dirty slot");
            self.storage.debug_event(DebugEvent::RefblockUpdatePart);
            self.storage.write_at(&slot.data, *off)?;
            // Clean only once written: a failed write is retried by the next flush.
            slot.dirty = false;
        }
        Ok(!offs.is_empty())
    }

    /// Write one L2 table that left the cache dirty, after the refcounts and the
    /// data it relies on are durable.
    fn write_evicted_l2(&mut self, off: u64, data: &[u64]) -> Result<()> {
        self.write_refblocks()?;
        self.barrier_named(Barrier::RefcountsBeforeL2)?;
        self.storage.debug_event(DebugEvent::L2Update);
        self.storage.write_at(&Self::encode_table(data), off)?;
        Ok(())
    }

    fn insert_l2(&mut self, off: u64, table: Vec<u64>, dirty: bool) -> Result<()> {
        if let Some((k, slot)) = self.l2.insert(off, table, dirty) {
            if slot.dirty {
                if let Err(e) = self.write_evicted_l2(k, &slot.data) {
                    // Keep the unwritten table (the cache may run one over its bound).
                    self.l2.put_back(k, slot);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The entries of the L2 table at `off`, from the cache or read (unannounced:
    /// QEMU announces the copy of a table, not a load).
    pub(super) fn l2_table_copy(&mut self, off: HostOffset) -> Result<Vec<u64>> {
        if let Some(slot) = self.l2.get(off.get()) {
            return Ok(slot.data.clone());
        }
        let mut buf = vec![0u8; index(self.cluster_size())];
        self.storage.read_at(&mut buf, off.get())?;
        Ok(self.decode_table(&buf))
    }

    /// Load the L2 table at `off` into the cache.
    pub fn load_l2(&mut self, off: HostOffset) -> Result<()> {
        let off = off.get();
        if self.l2.contains(off) {
            return Ok(());
        }
        let mut buf = vec![0u8; index(self.cluster_size())];
        self.storage.debug_event(DebugEvent::L2Load);
        self.storage.read_at(&mut buf, off)?;
        let t = self.decode_table(&buf);
        self.insert_l2(off, t, false)
    }

    /// The L2 entry (and bitmap) of guest cluster `gc`; unallocated if no L2 table.
    pub fn entry(&mut self, gc: u64) -> Result<L2Entry> {
        let n = self.l2_entries();
        let (l2off, _) = self.l1_entry(gc / n)?;
        if l2off.is_none() {
            return Ok(L2Entry::Normal {
                host: HostOffset::NONE,
                copied: false,
                zero: false,
                bitmap: 0,
            });
        }
        let (e, b) = self.raw_entry(l2off, gc % n)?;
        self.geo.decode_l2(e, b)
    }

    /// Raw (entry, bitmap) at index `i` of the L2 table at `l2off`.
    pub fn raw_entry(&mut self, l2off: HostOffset, i: u64) -> Result<(u64, u64)> {
        self.load_l2(l2off)?;
        let w = self.words();
        let t = &self.l2.get(l2off.get()).expect("loaded").data;
        let i = index(i) * w;
        Ok((t[i], if w == 2 { t[i + 1] } else { 0 }))
    }

    /// Set the raw entry at index `i` of the cached L2 table at `l2off`.
    pub fn set_raw_entry(&mut self, l2off: HostOffset, i: u64, e: u64, bitmap: u64) -> Result<()> {
        self.load_l2(l2off)?;
        let w = self.words();
        let slot = self.l2.get(l2off.get()).expect("loaded");
        let i = index(i) * w;
        slot.data[i] = e;
        if w == 2 {
            slot.data[i + 1] = bitmap;
        }
        slot.dirty = true;
        Ok(())
    }

    /// An L2 table for L1 index `l1i` that this image owns alone (COPIED), allocating
    /// a new one or copying a shared one. Returns its offset.
    ///
    /// Order: the new table's refcount and contents are written and flushed before the
    /// L1 entry points at it; a shared old table loses its reference afterwards.
    pub fn l2_for_write(&mut self, l1i: u64) -> Result<HostOffset> {
        if l1i >= self.l1.len() as u64 {
            return Err(Error::corrupt(format!("L1 index {l1i} past the L1 table")));
        }
        let (old, copied) = self.l1_entry(l1i)?;
        if !old.is_none() && copied {
            return Ok(old);
        }
        // QEMU's order: the new table's cluster first, then the old table's
        // contents, each step announced as QEMU announces it.
        let new = self.alloc_clusters(ClusterCount(1))?;
        self.write_refblocks()?;
        let table = if old.is_none() {
            vec![0u64; index(self.l2_entries()) * self.words()]
        } else {
            self.storage.debug_event(DebugEvent::L2AllocCowRead);
            self.l2_table_copy(old)?
        };
        self.storage.debug_event(DebugEvent::L2AllocWrite);
        self.storage
            .write_at(&Self::encode_table(&table), new.get())?;
        self.barrier_named(Barrier::L2BeforeL1)?;
        self.l1[index(l1i)] = new.get() | OFLAG_COPIED;
        self.write_l1_entry(l1i)?;
        self.insert_l2(new.get(), table, false)?;
        if !old.is_none() {
            self.free_later(old.cluster(self.geo.cluster_bits));
        }
        Ok(new)
    }

    /// Make `table` the active L1 table, written to new clusters: the header's
    /// `l1_size` and `l1_table_offset` (and, with `size`, the virtual size) switch
    /// in one write of the header's first sector, so a crash leaves the old table
    /// or the new one, never a mix; the old table is freed afterwards.
    pub(crate) fn relocate_l1(&mut self, table: Vec<u64>, size: Option<u64>) -> Result<()> {
        let cs = self.cluster_size();
        let entries = table.len() as u64;
        // The callers size the table for a virtual size the header accepts, whose L1
        // table QEMU bounds at 32 MiB: its entry count is far inside u32.
        let l1_size = u32::try_from(entries)
            .map_err(|_| Error::invalid(format!("L1 table of {entries} entries is too large")))?;
        // A larger table is QEMU's L1 growth, announced at its three steps.
        let grows = entries > self.l1.len() as u64;
        let announce = |m: &Self, e: DebugEvent| {
            if grows {
                m.storage.debug_event(e);
            }
        };
        announce(self, DebugEvent::L1GrowAllocTable);
        let new_off = self
            .alloc_clusters(
                ClusterCount::for_bytes(entries * 8, self.geo.cluster_bits).max(ClusterCount(1)),
            )?
            .get();
        // Only the table's bytes are written, as QEMU does: the rest of its last
        // cluster is never read (a new image ends right after its L1 table).
        self.flush_metadata()?;
        announce(self, DebugEvent::L1GrowWriteTable);
        self.storage
            .write_at(&Self::encode_table(&table), new_off)?;
        self.storage.flush()?;
        announce(self, DebugEvent::L1GrowActivateTable);
        // Bytes 24..48: size, encryption method, l1_size, l1_table_offset.
        let mut hdr = [0u8; 24];
        hdr[..8].copy_from_slice(&size.unwrap_or(self.h.size).to_be_bytes());
        hdr[8..12].copy_from_slice(&self.h.crypt_method.to_be_bytes());
        hdr[12..16].copy_from_slice(&l1_size.to_be_bytes());
        hdr[16..].copy_from_slice(&new_off.to_be_bytes());
        self.storage.write_at(&hdr, 24)?;
        self.storage.flush()?;
        let old_off = self.h.l1_table_offset;
        let old_clusters = (u64::from(self.h.l1_size) * 8).div_ceil(cs);
        self.h.l1_size = l1_size;
        self.h.l1_table_offset = new_off;
        if let Some(size) = size {
            self.h.size = size;
        }
        self.l1 = table;
        if old_off != 0 {
            for c in 0..old_clusters {
                self.update_refcount(ClusterIndex(old_off / cs + c), -1)?;
            }
        }
        self.flush_metadata()
    }

    pub fn write_l1_entry(&mut self, i: u64) -> Result<()> {
        let e = self.l1[index(i)];
        self.storage.debug_event(DebugEvent::L1Update);
        self.storage
            .write_at(&e.to_be_bytes(), self.h.l1_table_offset + i * 8)?;
        Ok(())
    }

    /// Drop one reference to everything a (former) L2 entry pointed at.
    pub fn release_entry(&mut self, e: L2Entry) {
        let bits = self.geo.cluster_bits;
        match e {
            // Clusters of an external data file are not refcounted.
            L2Entry::Normal { .. } if self.geo.data_file => {}
            L2Entry::Normal { host, .. } if !host.is_none() => self.free_later(host.cluster(bits)),
            L2Entry::Normal { .. } => {}
            L2Entry::Compressed { offset, size } => {
                for c in offset.clusters(size, bits) {
                    self.free_later(c);
                }
            }
        }
    }

    /// Write every dirty L2 table in the cache (no flush, no ordering: the caller
    /// orders them).
    pub(crate) fn write_dirty_l2_tables(&mut self) -> Result<()> {
        for off in self.l2.dirty_offsets() {
            let slot = self.l2.get(off).expect("dirty slot");
            let bytes = Self::encode_table(&slot.data);
            self.storage.write_at(&bytes, off)?;
            slot.dirty = false;
        }
        Ok(())
    }

    /// Make all metadata durable in the order crash safety needs:
    /// refcount blocks (and data already written), flush, L2 tables, flush; then apply queued frees and write
    /// those refcounts, flush.
    pub fn flush_metadata(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.write_refblocks()?;
        if self.l2.any_dirty() {
            // Even with no refcount changed, an entry may newly point at data just
            // written (a zero flag or subcluster bit cleared on an owned cluster):
            // that data is durable before the entry.
            self.barrier_named(Barrier::RefcountsBeforeL2)?;
            self.write_dirty_l2_tables()?;
        }
        self.barrier()?;
        if !self.pending_frees.is_empty() {
            let frees = std::mem::take(&mut self.pending_frees);
            for c in frees {
                self.update_refcount(c, -1)?;
            }
            self.write_refblocks()?;
            self.barrier()?;
        }
        if !self.pending_punches.is_empty() {
            self.punch_freed()?;
        }
        Ok(())
    }

    /// Whether no metadata waits to be written: no dirty L2 table or refcount
    /// block cached, no deferred free or punch.
    pub(crate) fn metadata_clean(&self) -> bool {
        !self.l2.any_dirty()
            && !self.rb.any_dirty()
            && self.pending_frees.is_empty()
            && self.pending_punches.is_empty()
    }

    /// An ordering point between metadata writes: a flush of the storage, unless
    /// barriers are off (see [`super::Qcow2Image::set_write_barriers`]).
    pub fn barrier(&self) -> Result<()> {
        if self.barriers {
            if let Some(d) = &self.data_storage {
                d.flush()?;
            }
            self.storage.flush()?;
        }
        Ok(())
    }

    /// The barrier named `b` (see [`super::barrier`]).
    pub fn barrier_named(&self, b: Barrier) -> Result<()> {
        if skipped(b) {
            return Ok(());
        }
        self.barrier()
    }

    /// Write the 8-byte incompatible-features field.
    pub fn write_incompat(&mut self) -> Result<()> {
        if self.h.version < 3 {
            return Ok(());
        }
        self.storage
            .write_at(&self.h.incompatible_features.to_be_bytes(), 72)?;
        Ok(())
    }

    /// Before a change to the guest bytes `[offset, offset + len)`: persistent
    /// bitmaps record it (see `bitmaps`), and [`Meta::mark_dirty_if_lazy`].
    pub fn before_guest_change(&mut self, offset: u64, len: u64) -> Result<()> {
        self.dirty_bitmaps(offset, len)?;
        self.mark_dirty_if_lazy()
    }

    /// Before a write: the first write of a lazy-refcounts session sets and
    /// flushes the dirty bit.
    pub fn mark_dirty_if_lazy(&mut self) -> Result<()> {
        if self.dirty_written || !self.h.lazy_refcounts() || self.h.version < 3 {
            return Ok(());
        }
        self.h.incompatible_features |= header::incompat::DIRTY;
        self.write_incompat()?;
        self.barrier()?;
        self.dirty_written = true;
        Ok(())
    }

    /// Before a multi-step metadata operation (snapshots): arrange for the dirty bit,
    /// so that a crash in the middle leaves an image that is checked and repaired
    /// before its next read-write use. The bit is written (and flushed) only by
    /// [`Meta::mark_op_dirty`], before the operation's first write that needs it:
    /// an operation that never calls it leaves leaks at worst, as QEMU's do.
    /// Returns whether this operation owns the bit (and clears it at the end).
    pub fn begin_metadata_op(&mut self) -> Result<bool> {
        if self.read_only || self.h.version < 3 || self.h.is_dirty() {
            return Ok(false);
        }
        self.dirty_deferred = true;
        Ok(true)
    }

    /// Write and flush the dirty bit a [`Meta::begin_metadata_op`] deferred, if not
    /// yet written. Call before any write whose durable state could hold a COPIED
    /// flag that disagrees with its refcount (or any write whose safety relies on
    /// the bit): every write made before it must leave leaks at worst.
    pub(crate) fn mark_op_dirty(&mut self) -> Result<()> {
        if !self.dirty_deferred {
            return Ok(());
        }
        if !self.h.is_dirty() {
            self.h.incompatible_features |= header::incompat::DIRTY;
            self.write_incompat()?;
            self.barrier()?;
        }
        self.dirty_deferred = false;
        Ok(())
    }

    /// End an operation begun with [`Meta::begin_metadata_op`]: flush, then clear
    /// the dirty bit if the operation wrote it.
    pub fn end_metadata_op(&mut self, set_here: bool) -> Result<()> {
        self.flush_metadata()?;
        self.dirty_deferred = false;
        if set_here {
            self.clear_dirty()?;
        }
        Ok(())
    }

    /// After everything is flushed: clear the dirty bit this session set. A bit
    /// the image was opened with stays until a repair settles the refcounts
    /// (clearing it would hide refcounts the lazy writer left too low from the
    /// next writer, which could then hand out a cluster still in use).
    pub fn clear_dirty(&mut self) -> Result<()> {
        if self.h.is_dirty() && !self.read_only && !self.dirty_inherited {
            self.h.incompatible_features &= !header::incompat::DIRTY;
            self.write_incompat()?;
            self.barrier()?;
            self.dirty_written = false;
        }
        Ok(())
    }

    /// Refuse guest data bound for host bytes `[off, off + len)` if they lie on
    /// metadata this image knows of: the header cluster, the active L1 table, the
    /// refcount table, the snapshot table and snapshot L1 tables, and the L2 tables
    /// and refcount blocks now cached. Only a corrupt L2 entry can point there, so
    /// the error is a corruption (the caller marks the image).
    pub fn check_data_write(&self, off: HostOffset, len: u64) -> Result<()> {
        let off = off.get();
        // Guest data bound for an external data file cannot hit this file's metadata.
        if len == 0 || self.geo.data_file {
            return Ok(());
        }
        let cs = self.cluster_size();
        let end = off.saturating_add(len);
        let hits =
            |start: u64, bytes: u64| bytes > 0 && start < end && off < start.saturating_add(bytes);
        let snap_bytes = self.snapshot_table_len();
        let mut what = None;
        if hits(0, cs) {
            what = Some("the image header");
        } else if hits(self.h.l1_table_offset, self.l1.len() as u64 * 8) {
            what = Some("the active L1 table");
        } else if hits(
            self.h.refcount_table_offset,
            u64::from(self.h.refcount_table_clusters) * cs,
        ) {
            what = Some("the refcount table");
        } else if self.h.crypto.is_some_and(|c| hits(c.offset, c.length)) {
            what = Some("the encryption header");
        } else if self.h.nb_snapshots > 0 && hits(self.h.snapshots_offset, snap_bytes) {
            what = Some("the snapshot table");
        } else if self
            .snapshots
            .iter()
            .any(|s| hits(s.l1_table_offset, u64::from(s.l1_size) * 8))
        {
            what = Some("a snapshot L1 table");
        } else {
            let mut c = off - off % cs;
            while c < end {
                if self.l2.contains(c) {
                    what = Some("an L2 table");
                    break;
                }
                if self.rb.contains(c) {
                    what = Some("a refcount block");
                    break;
                }
                c += cs;
            }
        }
        match what {
            None => Ok(()),
            Some(w) => Err(Error::corrupt(format!(
                "Refusing to write guest data at host offset 0x{off:x}: it would overwrite {w}; image marked as corrupt"
            ))
            .at_offset(crate::Offset::Host(HostOffset(off)))),
        }
    }

    /// Record that the image is corrupt (when writable), so no tool trusts it blindly.
    pub fn mark_corrupt(&mut self) {
        if self.read_only || self.h.version < 3 || self.h.is_corrupt() {
            return;
        }
        self.h.incompatible_features |= header::incompat::CORRUPT;
        let _ = self.write_incompat();
        let _ = self.storage.flush();
    }

    /// Clear the L1 entries from index `first` on: each L2 table there and the
    /// clusters it maps lose the active view's reference (snapshots keep theirs);
    /// then idle refcount blocks at the end and the file's free tail are given
    /// back. The L1 table is written and flushed before any refcount drops, so a
    /// crash leaks clusters at worst.
    ///
    /// With `punch`, the dropped tables and the clusters they map are punched
    /// once free, as QEMU's shrink discards them. `after_l1` are announced to
    /// the storage once the cleared L1 table is durable (or found with nothing
    /// to clear), before any refcount changes: a debugging filter failing what
    /// follows them leaves leaked clusters, never a lost reference.
    pub(crate) fn drop_l2_tables(
        &mut self,
        first: u64,
        punch: bool,
        after_l1: &[DebugEvent],
    ) -> Result<()> {
        // Settle the cache so no L2 table is written after its L1 entry goes.
        self.flush_metadata()?;
        let l2n = self.l2_entries();
        let mut dropped = false;
        let mut tables = Vec::new();
        for l1i in first..self.l1.len() as u64 {
            let (l2off, _) = self.l1_entry(l1i)?;
            if l2off.is_none() {
                continue;
            }
            for i in 0..l2n {
                let old = self.entry(l1i * l2n + i)?;
                if punch {
                    self.release_entry_punching(old);
                } else {
                    self.release_entry(old);
                }
            }
            let table = l2off.cluster(self.geo.cluster_bits);
            self.free_later(table);
            if punch {
                tables.push(table);
            }
            self.l1[index(l1i)] = 0;
            dropped = true;
        }
        if dropped {
            let mut table = Vec::with_capacity(self.l1.len() * 8);
            for e in &self.l1 {
                table.extend_from_slice(&e.to_be_bytes());
            }
            self.storage.write_at(&table, self.h.l1_table_offset)?;
            self.barrier()?;
        }
        for &event in after_l1 {
            self.storage.debug_event(event);
        }
        if dropped {
            self.l2.clear();
            self.compressed_cursor = 0;
            // Drops the references (refcount blocks written and flushed).
            self.flush_metadata()?;
            self.punch_each(&tables)?;
        }
        if punch {
            self.drop_unused_refblocks()?;
        } else {
            self.drop_idle_refblocks()?;
        }
        self.trim_free_tail()
    }
}
