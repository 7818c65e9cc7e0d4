//! Internal snapshots laid out as QEMU lays them out, for version 3 images.
//!
//! Create, delete and apply change, for every cluster an L1 table reaches, a
//! refcount and the COPIED flag that must agree with it, in place and in QEMU's
//! order, so that both tools allocate the same clusters (the snapshot's L1 copy,
//! the new snapshot table, any refcount block) and leave files of the same
//! length (the table is not padded to a cluster, nor its last entry to 8 bytes):
//! - create: allocate and write the L1 copy (the active table as it is, flags
//!   included); walk the active tables raising each refcount and setting each
//!   COPIED flag from it; write the active L1 if a flag changed; write the new
//!   snapshot table and switch the header's count and offset in one write
//!   (the commit point); free the old table;
//! - delete: write the new table and switch to it (the commit point); walk the
//!   snapshot's tables lowering each refcount; free its L1 copy; walk the active
//!   tables again for their flags;
//! - apply: raise the snapshot's refcounts (its tables' flags follow); write its
//!   L1 as stored over the active one (the commit point, one sector); lower the
//!   old tables' refcounts; walk the active tables again for their flags.
//!
//! Between a refcount write and its flag write a durable state can hold a flag
//! that disagrees with a refcount, which `qemu-img check` calls corrupt. So from
//! the first such change on, the operation runs under the header's dirty bit,
//! set and flushed before any write of that change and cleared after the last
//! flush (`Meta::begin_metadata_op`, `Meta::mark_op_dirty`): an interrupted
//! operation leaves an image that QEMU and strata both check and repair (leaks
//! and COPIED flags) before they next write it, and the commit point alone
//! decides which state the guest sees. A walk that changes no flag (every
//! cluster it counts stays shared, or stays owned: a snapshot operation on an
//! image whose clusters other snapshots already share) writes only refcounts
//! that agree with the flags as they lie, in every mix of old and new blocks;
//! its crash leaves leaks at worst, as QEMU's does, and the bit with its two
//! flushes is spared. Refcounts only rise before
//! the commit point and only fall after it, so no referenced cluster is ever
//! counted 0. Flushes are spent on those orders only: after the dirty bit,
//! before and after each commit point, and before the bit is cleared (create
//! clears it in its commit write: past it only refcounts fall, leaks at worst);
//! writes between them (refcounts, flags, the L1 tables) are not ordered among
//! themselves. Version 2 images have no dirty bit and keep the header switch of
//! `snapshot_switch`; so do an apply whose L1 table is larger than one sector
//! (QEMU's single write of it could tear) and an apply that changes the disk
//! size.

use super::barrier::Barrier;
use super::entries::{decode_l1, L2Entry, OFLAG_COPIED};
use super::header;
use super::image::Qcow2Image;
use super::meta::Meta;
use super::snapshot::Snapshot;
use crate::units::{header_u32, ClusterCount, ClusterIndex, HostOffset};
use crate::{BlockDevice, Result};

/// An L1 table larger than this could be torn by a crash while written in place.
const SECTOR: usize = 512;

impl Meta {
    /// Whether snapshot operations take QEMU's in-place layout: a version 3 image
    /// whose dirty bit is set (left by a lazy writer) or owed by the operation
    /// (`begin_metadata_op`, written by `mark_op_dirty` when first needed).
    pub(crate) fn snapshots_in_place(&self) -> bool {
        self.h.version >= 3 && (self.h.is_dirty() || self.dirty_deferred) && !self.l1.is_empty()
    }

    /// QEMU's walk over the tables `l1` reaches: add `addend` (-1, 0 or 1) to the
    /// refcount of every data cluster, compressed run and L2 table, in table
    /// order, and set every COPIED flag from the refcount it then has (entries in
    /// the cached L2 tables, entries of `l1` in place). A table whose cluster
    /// becomes free leaves the cache unwritten. The refcounts and L2 tables are
    /// then written (no order among them: the dirty bit covers the window). The
    /// dirty bit an operation deferred is written at the first flag that changes,
    /// before the refcount change that calls for it can be written (it is still
    /// in the cache) and before any flag is. Nothing is
    /// flushed after these writes: a caller whose next write must not land
    /// before them (apply's commit point) places its own barrier. Clusters that
    /// became free are discarded at once, so call only where nothing durable
    /// references them any more (past the commit point). Returns whether an
    /// entry of `l1` changed.
    pub(crate) fn walk_snapshot_refcounts(&mut self, l1: &mut [u64], addend: i64) -> Result<bool> {
        let cs = self.cluster_size();
        let bits = self.geo.cluster_bits;
        let mut modified = false;
        let mut freed = Vec::new();
        for (i, slot) in l1.iter_mut().enumerate() {
            let raw_l1 = *slot;
            let (l2off, _) = decode_l1(raw_l1, cs, i as u64)?;
            if l2off.is_none() {
                continue;
            }
            for j in 0..self.l2_entries() {
                let (raw, bitmap) = self.raw_entry(l2off, j)?;
                let entry = raw & !OFLAG_COPIED;
                let rc = match self.geo.decode_l2(entry, bitmap)? {
                    L2Entry::Compressed { offset, size } => {
                        if addend != 0 {
                            for c in offset.clusters(size, bits) {
                                self.change_refcount(c, addend, &mut freed)?;
                            }
                        }
                        // Compressed clusters are never written in place.
                        2
                    }
                    L2Entry::Normal { host, .. } if !host.is_none() => {
                        let c = host.cluster(bits);
                        if addend != 0 {
                            self.change_refcount(c, addend, &mut freed)?;
                        }
                        self.refcount(c)?
                    }
                    L2Entry::Normal { .. } => 0,
                };
                let entry = if rc == 1 { entry | OFLAG_COPIED } else { entry };
                if entry != raw {
                    self.mark_op_dirty()?;
                    self.set_raw_entry(l2off, j, entry, bitmap)?;
                }
            }
            let c = l2off.cluster(bits);
            if addend != 0 {
                self.change_refcount(c, addend, &mut freed)?;
            }
            let e = if self.refcount(c)? == 1 {
                l2off.get() | OFLAG_COPIED
            } else {
                l2off.get()
            };
            if e != raw_l1 {
                self.mark_op_dirty()?;
                *slot = e;
                modified = true;
            }
        }
        self.write_dirty_refblocks()?;
        self.write_dirty_l2_tables()?;
        self.discard_freed(&freed)?;
        Ok(modified)
    }

    /// Add `delta` to a refcount; a cluster that becomes free is dropped from the
    /// L2 cache (QEMU's cache forgets a freed table the same way) and added to
    /// `freed`.
    fn change_refcount(
        &mut self,
        c: ClusterIndex,
        delta: i64,
        freed: &mut Vec<ClusterIndex>,
    ) -> Result<()> {
        if self.update_refcount(c, delta)? == 0 {
            self.l2.remove(c.get() << self.geo.cluster_bits);
            freed.push(c);
        }
        Ok(())
    }

    /// Give the file's space of clusters a snapshot operation freed back to the
    /// storage, as QEMU does (its snapshot discards pass through by default): a
    /// freed cluster then reads as zeroes in both tools' files. Call only once
    /// nothing durable references them.
    pub(crate) fn discard_freed(&mut self, freed: &[ClusterIndex]) -> Result<()> {
        let bits = self.geo.cluster_bits;
        let mut sorted = freed.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut i = 0;
        while i < sorted.len() {
            let start = sorted[i].get();
            let mut end = start + 1;
            i += 1;
            while i < sorted.len() && sorted[i].get() == end {
                end += 1;
                i += 1;
            }
            self.storage.discard(start << bits, (end - start) << bits)?;
        }
        Ok(())
    }

    /// Write the whole active L1 table `l1` over the current one (no flush).
    fn write_active_l1(&mut self, l1: &[u64]) -> Result<()> {
        self.storage
            .write_at(&Meta::encode_table(l1), self.h.l1_table_offset)?;
        Ok(())
    }

    /// The active tables' COPIED flags set from their refcounts (QEMU's walk with
    /// nothing added), the L1 table written if one changed (no flush: the flags
    /// change under the dirty bit, and the flush before it is cleared makes them
    /// durable).
    fn settle_active_flags(&mut self) -> Result<()> {
        let mut l1 = self.l1.clone();
        if self.walk_snapshot_refcounts(&mut l1, 0)? {
            self.write_active_l1(&l1)?;
        }
        self.l1 = l1;
        Ok(())
    }
}

impl Qcow2Image {
    /// Create `snap` (its L1 offset is filled in) the way QEMU does; see the module.
    ///
    /// Flushes: the L1 copy and the new snapshot table are written with the
    /// walk's refcounts and flags (under the dirty bit where a flag changes),
    /// one flush, then the commit point. Where this operation set the dirty bit
    /// (`owns_dirty`), the commit's header write clears it in the same sector:
    /// every flag and refcount change is durable before it, and what follows
    /// (the old table's refcounts falling) leaks clusters at worst, which needs
    /// no bit; a torn outcome cannot arise (one sector), and either order of the
    /// two fields would be safe anyway (before the commit only raised refcounts
    /// and agreeing flags are durable: leaks).
    pub(crate) fn create_in_place(
        &self,
        m: &mut Meta,
        snap: Snapshot,
        owns_dirty: bool,
    ) -> Result<()> {
        let bits = m.geo.cluster_bits;
        let l1 = m.l1.clone();
        let bytes = l1.len() as u64 * 8;
        let off = m.alloc_clusters(ClusterCount::for_bytes(bytes, bits))?;
        m.write_dirty_refblocks()?;
        m.storage.write_at(&Meta::encode_table(&l1), off.get())?;
        let mut active = l1;
        if m.walk_snapshot_refcounts(&mut active, 1)? {
            m.write_active_l1(&active)?;
        }
        m.l1 = active;
        let mut snaps = m.snapshots.clone();
        snaps.push(Snapshot {
            l1_table_offset: off.get(),
            l1_size: header_u32(m.l1.len() as u64, "L1 table size")?,
            ..snap
        });
        // The bit was written only if a flag changed (else it is still deferred).
        let clear = (owns_dirty && !m.dirty_deferred && m.h.is_dirty())
            .then_some(m.h.incompatible_features & !header::incompat::DIRTY);
        m.replace_snapshot_table_with(snaps, clear)?;
        m.flush_metadata()
    }

    /// Delete the snapshot at `idx` the way QEMU does; see the module.
    pub(crate) fn delete_in_place(&self, m: &mut Meta, idx: usize) -> Result<()> {
        let bits = m.geo.cluster_bits;
        let snap = m.snapshots[idx].clone();
        let mut sl1 = m.read_snapshot_l1(&snap, true)?;
        let mut snaps = m.snapshots.clone();
        snaps.remove(idx);
        m.replace_snapshot_table(snaps)?;
        // The table no longer names it: drop its references, then its L1 copy
        // (QEMU announces `cluster_free` for the copy).
        m.walk_snapshot_refcounts(&mut sl1, -1)
            .map_err(|e| e.in_step("Failed to free the cluster and L1 table"))?;
        m.storage
            .debug_event(strata_storage::DebugEvent::ClusterFree);
        let l1_bytes = u64::from(snap.l1_size) * 8;
        let mut freed = Vec::new();
        for c in HostOffset(snap.l1_table_offset).clusters(l1_bytes, bits) {
            m.change_refcount(c, -1, &mut freed)?;
        }
        m.discard_freed(&freed)?;
        m.settle_active_flags()?;
        m.flush_metadata()
    }

    /// Apply `snap` the way QEMU does; see the module. Returns `Ok(false)`, with
    /// nothing written, for an apply this layout does not take (the caller then
    /// takes the header switch): a disk size change or an L1 table larger than
    /// a sector.
    pub(crate) fn apply_in_place(&self, m: &mut Meta, snap: &Snapshot) -> Result<bool> {
        let cur = m.l1.len().max(snap.l1_size as usize);
        if snap.disk_size.is_some_and(|s| s != self.virtual_size()) || cur * 8 > SECTOR {
            return Ok(false);
        }
        let sl1 = m.read_snapshot_l1(snap, true)?;
        if sl1.len() > m.l1.len() {
            m.mark_op_dirty()?;
            self.grow_l1_for(m, sl1.len() as u64)?;
        }
        // Raise the snapshot's refcounts; its own tables' flags follow them.
        let mut walked = sl1.clone();
        let relabelled = m.walk_snapshot_refcounts(&mut walked, 1)?;
        // The raised refcounts are durable before the commit point.
        m.barrier_named(Barrier::SnapshotRefcountsBeforeL1)?;
        if relabelled {
            // Flags only, under the dirty bit (a flag changed): no flush of
            // its own; the commit's flush follows.
            m.storage
                .write_at(&Meta::encode_table(&walked), snap.l1_table_offset)?;
        }
        // The commit point: the snapshot's L1 as it was stored, in one sector
        // (its flags may disagree with the refcounts until the settling walk:
        // the dirty bit covers that). Durable before any refcount falls.
        let mut new = sl1;
        new.resize(m.l1.len(), 0);
        m.write_active_l1(&new)?;
        m.storage.flush()?;
        // Then lower the old tables' refcounts and settle the active flags,
        // made durable by one flush before the bit is cleared.
        let mut old = std::mem::replace(&mut m.l1, new);
        m.walk_snapshot_refcounts(&mut old, -1)?;
        m.settle_active_flags()?;
        m.flush_metadata()?;
        Ok(true)
    }
}
