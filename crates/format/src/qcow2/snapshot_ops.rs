//! Internal snapshots: create, apply (revert), delete, read-only views, and the
//! VM-state area. On a version 3 image, create, delete and apply (but for an L1
//! table larger than a sector or a change of disk size) run in place in QEMU's
//! order and layout, under the header's dirty bit: see `snapshot_walk`. Otherwise
//! the write orders are (FACTS.md):
//! - create and delete: everything they change (snapshot table, active L1 and the
//!   L2 tables whose COPIED flags change, refcount structures) is written anew off
//!   to the side and switched in one header write (see `snapshot_switch`), so
//!   every durable state passes `qemu-img check` (leaks at worst). An image that
//!   is not fit for it (an empty active L1, or any corruption found while
//!   counting) takes the in-place path: create writes an L1 copy, clears the
//!   active COPIED flags, flush; raises the refcounts; writes the new snapshot
//!   table and switches `nb_snapshots` + `snapshots_offset` in one header write;
//!   delete rewrites the table first, then lowers the refcounts. There, a crash
//!   between a refcount change and its COPIED flag leaves the conservative side
//!   (refcount 1 with the flag clear: a writer copies instead of writing in
//!   place), never a shared cluster marked as owned;
//! - apply: raise the snapshot's refcounts, flush; make the COPIED flags of its
//!   L2 tables agree with them, flush; write the active L1 (its COPIED flags
//!   computed from the raised refcounts, so they are right in every durable
//!   state; in place when it fits in one sector, else written elsewhere with the
//!   header switching to it, and the size, in one write), flush; then lower the
//!   old active image's refcounts.
//!
//! A crash anywhere leaks clusters at worst.

use super::barrier::Barrier;
use super::entries::{decode_l1, L2Entry, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use super::header::{MAX_REFTABLE_BYTES, MAX_SNAPSHOTS};
use super::image::Qcow2Image;
use super::meta::Meta;
use super::snapshot::{self, Snapshot};
use crate::units::{header_u32, index, ClusterCount, ClusterIndex, HostOffset};
use crate::{BlockDevice, Error, Result};
use strata_storage::DebugEvent;

/// Which snapshot: by ID first, then by name (as qemu-img resolves its argument).
pub fn find<'a>(snaps: &'a [Snapshot], key: &str) -> Option<(usize, &'a Snapshot)> {
    snaps
        .iter()
        .enumerate()
        .find(|(_, s)| s.id == key)
        .or_else(|| snaps.iter().enumerate().find(|(_, s)| s.name == key))
}

impl Meta {
    /// Before apply or delete: write what the caches hold, so the operation starts
    /// from metadata on disk. With nothing cached to write, no flush either: each
    /// of their commit points is preceded by a flush of their own (which also
    /// makes durable any guest data written before), so one here would only sync
    /// a file nothing of this session changed.
    fn flush_caches_before_op(&mut self) -> Result<()> {
        if self.metadata_clean() {
            return Ok(());
        }
        self.flush_metadata()
    }

    /// Add `delta` to the refcount of every L2 table and data cluster `l1` reaches.
    pub(crate) fn update_l1_refcounts(&mut self, l1: &[u64], delta: i64) -> Result<()> {
        let cs = self.cluster_size();
        let n = self.l2_entries();
        for (i, &e) in l1.iter().enumerate() {
            let (l2off, _) = decode_l1(e, cs, i as u64)?;
            if l2off.is_none() {
                continue;
            }
            for j in 0..n {
                let (raw, bitmap) = self.raw_entry(l2off, j)?;
                match self.geo.decode_l2(raw, bitmap)? {
                    L2Entry::Normal { host, .. } if !host.is_none() => {
                        self.update_refcount(host.cluster(self.geo.cluster_bits), delta)?;
                    }
                    L2Entry::Normal { .. } => {}
                    L2Entry::Compressed { offset, size } => {
                        for c in offset.clusters(size, self.geo.cluster_bits) {
                            self.update_refcount(c, delta)?;
                        }
                    }
                }
            }
            self.update_refcount(l2off.cluster(self.geo.cluster_bits), delta)?;
        }
        Ok(())
    }

    /// Before a snapshot shares the clusters `l1` reaches: refuse, with nothing
    /// written, when one of them has no refcount block (a damaged L2 entry
    /// pointing far past the end of the file). Raising that refcount would make
    /// a block for it, and the file would grow to wherever the entry points.
    /// QEMU fails there too, after its first new block (EAGAIN, or EFBIG where
    /// the refcount table would pass 8 MiB), leaking clusters; strata fails
    /// with the same error number before changing anything. The entries are
    /// read as QEMU's refcount walk reads them: reserved bits are ignored.
    pub(crate) fn refuse_unrefcounted(&mut self, l1: &[u64]) -> Result<()> {
        let cs = self.cluster_size();
        let bits = self.geo.cluster_bits;
        let epb = self.rb_entries();
        let w = self.words();
        for (i, &e) in l1.iter().enumerate() {
            let (l2off, _) = decode_l1(e, cs, i as u64)?;
            if l2off.is_none() {
                continue;
            }
            // Read without announcing an L2 load or filling the cache: the
            // walk this check runs ahead of announces its own loads, where
            // QEMU's does (blkdebug rules keyed to them fire there).
            let table = self.l2_table_copy(l2off)?;
            // Consecutive entries mostly share a refcount block: each block
            // index is looked up once per run.
            let mut known = None;
            let mut check = |m: &Self, c: u64| -> Result<()> {
                let idx = c / epb;
                if known != Some(idx) {
                    m.refuse_without_refblock(idx)?;
                    known = Some(idx);
                }
                Ok(())
            };
            for &raw in table.iter().step_by(w) {
                if raw & OFLAG_COMPRESSED != 0 {
                    if let L2Entry::Compressed { offset, size } = self.geo.decode_l2(raw, 0)? {
                        for c in offset.clusters(size, bits) {
                            check(self, c.get())?;
                        }
                    }
                } else {
                    let host = raw & OFFSET_MASK;
                    if host != 0 {
                        check(self, host >> bits)?;
                    }
                }
            }
            self.refuse_without_refblock(l2off.get() / cs / epb)?;
        }
        Ok(())
    }

    /// The error QEMU's refcount update gives where refcount block `idx` is missing.
    fn refuse_without_refblock(&self, idx: u64) -> Result<()> {
        if !self.refblock_offset(idx)?.is_none() {
            return Ok(());
        }
        let table_bytes = idx.saturating_add(2).saturating_mul(8);
        let errno = if idx >= self.reftable.len() as u64 && table_bytes > MAX_REFTABLE_BYTES {
            libc::EFBIG
        } else {
            libc::EAGAIN
        };
        Err(strata_storage::Error::Io {
            op: "raise the refcount of",
            path: std::path::PathBuf::new(),
            source: std::io::Error::from_raw_os_error(errno),
        }
        .into())
    }

    /// Clear the COPIED flag of every active L1 entry and normal L2 entry (the L1
    /// entries are written, the L2 tables left dirty in the cache), before the
    /// refcounts are raised to share them.
    pub(crate) fn clear_copied_flags(&mut self) -> Result<()> {
        let cs = self.cluster_size();
        let n = self.l2_entries();
        for i in 0..self.l1.len() {
            let (l2off, copied) = decode_l1(self.l1[i], cs, i as u64)?;
            if l2off.is_none() {
                continue;
            }
            if copied {
                self.l1[i] &= !OFLAG_COPIED;
                self.write_l1_entry(i as u64)?;
            }
            for j in 0..n {
                let (raw, bitmap) = self.raw_entry(l2off, j)?;
                if let L2Entry::Normal { copied: true, .. } = self.geo.decode_l2(raw, bitmap)? {
                    self.set_raw_entry(l2off, j, raw & !OFLAG_COPIED, bitmap)?;
                }
            }
        }
        Ok(())
    }

    /// Make the COPIED flags of the active L1 and its L2 tables match the refcounts.
    ///
    /// The refcounts are made durable first: a COPIED flag on disk must never claim
    /// a cluster is exclusively owned while its stored refcount says otherwise.
    pub(crate) fn fix_copied_flags(&mut self) -> Result<()> {
        if self.write_dirty_refblocks()? {
            self.storage.flush()?;
        }
        let cs = self.cluster_size();
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let (l2off, copied) = decode_l1(e, cs, i as u64)?;
            if l2off.is_none() {
                continue;
            }
            let rc = self.refcount(l2off.cluster(self.geo.cluster_bits))?;
            if (rc == 1) != copied {
                self.l1[i] = if rc == 1 {
                    e | OFLAG_COPIED
                } else {
                    e & !OFLAG_COPIED
                };
                self.write_l1_entry(i as u64)?;
            }
            self.fix_table_flags(l2off)?;
        }
        Ok(())
    }

    /// Make the COPIED flags of the entries of the L2 table at `l2off` match the
    /// refcounts of their clusters (the table is left dirty in the cache).
    pub(crate) fn fix_table_flags(&mut self, l2off: HostOffset) -> Result<()> {
        for j in 0..self.l2_entries() {
            let (raw, bitmap) = self.raw_entry(l2off, j)?;
            if let L2Entry::Normal { host, copied, .. } = self.geo.decode_l2(raw, bitmap)? {
                if host.is_none() {
                    continue;
                }
                let rc = self.refcount(host.cluster(self.geo.cluster_bits))?;
                if (rc == 1) != copied {
                    let new = if rc == 1 {
                        raw | OFLAG_COPIED
                    } else {
                        raw & !OFLAG_COPIED
                    };
                    self.set_raw_entry(l2off, j, new, bitmap)?;
                }
            }
        }
        Ok(())
    }

    /// Refuse a use of `snap` whose L1 table [`Snapshot::usable_l1`] rejects,
    /// before anything is read or written for that use.
    pub(crate) fn usable_snapshot_l1(&self, snap: &Snapshot) -> Result<()> {
        snap.usable_l1(self.cluster_size(), self.storage.size()?)
    }

    /// The L1 table of `snap`, once [`Snapshot::usable_l1`] allows it to be
    /// read: for a change (`for_change`), only a table inside the file; else
    /// also one past its end, which reads as zeros.
    pub(crate) fn read_snapshot_l1(&self, snap: &Snapshot, for_change: bool) -> Result<Vec<u64>> {
        if for_change {
            self.usable_snapshot_l1(snap)?;
        } else {
            snap.usable_l1(self.cluster_size(), u64::MAX)?;
        }
        let mut buf = vec![0u8; index(u64::from(snap.l1_size) * 8)];
        self.storage.read_at(&mut buf, snap.l1_table_offset)?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
            .collect())
    }

    /// Write `snaps` as the new snapshot table and switch the header to it; then free
    /// the old table.
    pub(crate) fn replace_snapshot_table(&mut self, snaps: Vec<Snapshot>) -> Result<()> {
        self.replace_snapshot_table_with(snaps, None)
    }

    /// [`Meta::replace_snapshot_table`], with the header's incompatible-features
    /// field set to `incompat` (version 3 only) by the same write that switches the
    /// count and offset: bytes 60..80 lie in the first sector, which the disk
    /// writes whole, so the commit point and the features change become durable
    /// together. Only a caller for which either state of the field is safe on
    /// both sides of the commit point may pass one (see `create_in_place`).
    pub(crate) fn replace_snapshot_table_with(
        &mut self,
        mut snaps: Vec<Snapshot>,
        incompat: Option<u64>,
    ) -> Result<()> {
        let incompat = incompat.filter(|_| self.h.version >= 3);
        let cs = self.cluster_size();
        snapshot::complete_disk_sizes(&mut snaps, self.h.size);
        for s in &mut snaps {
            s.extra = s.encode_extra();
        }
        let mut bytes = snapshot::serialize_table(&snaps)?;
        // The last entry's padding is not written (see `snapshot::written_size`).
        bytes.truncate(index(snapshot::written_size(&snaps)));
        let nb_snapshots = header_u32(snaps.len() as u64, "snapshot count")?;
        let new_off = if bytes.is_empty() {
            0
        } else {
            let n = (bytes.len() as u64).div_ceil(cs);
            let off = self.alloc_clusters(ClusterCount(n))?.get();
            self.write_dirty_refblocks()?;
            self.storage.write_at(&bytes, off)?;
            off
        };
        self.storage.flush()?;
        let mut hdr = [0u8; 20];
        hdr[..4].copy_from_slice(&nb_snapshots.to_be_bytes());
        hdr[4..12].copy_from_slice(&new_off.to_be_bytes());
        let hdr = match incompat {
            Some(features) => {
                hdr[12..].copy_from_slice(&features.to_be_bytes());
                &hdr[..]
            }
            None => &hdr[..12],
        };
        self.storage.write_at(hdr, 60)?;
        self.storage.flush()?;
        if let Some(features) = incompat {
            self.h.incompatible_features = features;
        }
        let old_off = self.h.snapshots_offset;
        let old_len = self.snapshot_table_len();
        self.h.nb_snapshots = nb_snapshots;
        self.h.snapshots_offset = new_off;
        self.snapshots = snaps;
        self.snapshot_span = None;
        self.snapshot_overhang = 0;
        self.snapshot_extra_dropped.clear();
        if old_off != 0 && old_len > 0 {
            // QEMU's free of the old table announces `cluster_free`; a
            // failure to give the freed clusters back becomes a notice (in
            // QEMU's words) and does not fail the step: the header no longer
            // names the table, so the clusters leak at worst.
            self.storage.debug_event(DebugEvent::ClusterFree);
            let free = |m: &mut Self| -> Result<()> {
                let mut freed = Vec::new();
                for c in old_off / cs..(old_off + old_len).div_ceil(cs) {
                    if m.update_refcount(ClusterIndex(c), -1)? == 0 {
                        freed.push(ClusterIndex(c));
                    }
                }
                m.discard_freed(&freed)
            };
            if let Err(e) = free(self) {
                let why = e
                    .raw_os_error()
                    .map(|n| strata_storage::os_message(&std::io::Error::from_raw_os_error(n)))
                    .unwrap_or_else(|| e.message().to_string());
                self.notices
                    .push(format!("qcow2_free_clusters failed: {why}"));
            }
        }
        Ok(())
    }
}

/// Options for a new snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotSpec {
    pub name: String,
    /// Seconds and nanoseconds since the epoch (now, when `None`).
    pub date: Option<(u32, u32)>,
    pub vm_clock_nsec: u64,
    /// The VM state to keep with the snapshot (a full system checkpoint), if any.
    pub vm_state: Vec<u8>,
    pub icount: Option<u64>,
}

impl Qcow2Image {
    /// Guest offset where the VM-state area starts: the first L1 entry past the disk.
    pub fn vm_state_offset(&self) -> u64 {
        // The geometry never changes: reading it is safe even from poisoned metadata.
        let m = self.peek();
        let per_l1 = m.cluster_size() * m.l2_entries();
        self.virtual_size().div_ceil(per_l1) * per_l1
    }

    /// Write `data` into the VM-state area at `pos` (the area QEMU's savevm uses).
    pub fn write_vm_state(&self, data: &[u8], pos: u64) -> Result<()> {
        let base = self.vm_state_offset();
        let mut m = self.lock()?;
        self.write_beyond_disk(&mut m, data, base + pos)
    }

    /// Read `buf.len()` bytes of the VM-state area of the active image at `pos`.
    pub fn read_vm_state(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        let base = self.vm_state_offset();
        let mut m = self.lock()?;
        self.read_beyond_disk(&mut m, buf, base + pos)
    }

    /// Read the VM state saved with snapshot `key`.
    pub fn snapshot_vm_state(&self, key: &str) -> Result<Vec<u8>> {
        let view = self.snapshot_view(key)?;
        let (size, base) = {
            let m = view.lock()?;
            let per_l1 = m.cluster_size() * m.l2_entries();
            (
                m.snapshots
                    .iter()
                    .find(|s| s.id == key || s.name == key)
                    .map(|s| s.vm_state_size),
                view.virtual_size().div_ceil(per_l1) * per_l1,
            )
        };
        let size = size.unwrap_or(0);
        let mut buf =
            vec![0u8; usize::try_from(size).map_err(|_| Error::invalid("VM state too large"))?];
        let mut m = view.lock()?;
        view.read_beyond_disk(&mut m, &mut buf, base)?;
        Ok(buf)
    }

    /// Create an internal snapshot of the current disk (and `spec.vm_state`).
    pub fn snapshot_create(&self, spec: &SnapshotSpec) -> Result<Snapshot> {
        if self.read_only() {
            return Err(self.err(Error::read_only()));
        }
        self.refuse_internal_snapshots()?;
        let vm_base = self.vm_state_offset();
        let _excl = self.exclusive();
        let mut m = self.lock()?;
        let m = &mut *m;
        let r = (|| {
            let set = m.begin_metadata_op()?;
            let r = self.snapshot_create_locked(m, spec, vm_base, set);
            if r.is_ok() {
                m.end_metadata_op(set)?;
            }
            r
        })();
        r.map_err(|e| self.err(e))
    }

    fn snapshot_create_locked(
        &self,
        m: &mut Meta,
        spec: &SnapshotSpec,
        vm_base: u64,
        owns_dirty: bool,
    ) -> Result<Snapshot> {
        if m.snapshots.len() as u64 >= u64::from(MAX_SNAPSHOTS) {
            return Err(Error::invalid_argument(
                "Too many snapshots (the limit is 65536)",
            ));
        }
        if spec.name.len() > 65535 {
            return Err(Error::invalid_argument("Snapshot name too long"));
        }
        let cs = m.cluster_size();
        let l1 = m.l1.clone();
        m.refuse_unrefcounted(&l1)?;
        if !spec.vm_state.is_empty() || !m.snapshots_in_place() {
            // Only the in-place walk defers the dirty bit to its first flag change.
            m.mark_op_dirty()?;
        }
        if !spec.vm_state.is_empty() {
            self.write_beyond_disk(m, &spec.vm_state, vm_base)?;
        }
        if m.snapshots_in_place() {
            // The in-place create flushes before its commit point, which makes
            // everything written before it durable first (the VM state, and
            // anything cached now): a flush here would only sync a file nothing
            // of this operation changed yet (as QEMU, which does none).
            m.flush_caches_before_op()?;
        } else {
            m.flush_metadata()?;
        }
        let next_id = m
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let (sec, nsec) = spec.date.unwrap_or_else(|| {
            let d = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            // The 32-bit field holds dates up to 2106; later ones saturate.
            (
                u32::try_from(d.as_secs()).unwrap_or(u32::MAX),
                d.subsec_nanos(),
            )
        });
        // The snapshot takes the active L1 table as it is (see `switch_snapshots`).
        let snap = Snapshot {
            l1_table_offset: m.h.l1_table_offset,
            l1_size: header_u32(m.l1.len() as u64, "L1 table size")?,
            id: next_id.to_string(),
            name: spec.name.clone(),
            date_sec: sec,
            date_nsec: nsec,
            vm_clock_nsec: spec.vm_clock_nsec,
            vm_state_size: spec.vm_state.len() as u64,
            disk_size: Some(self.virtual_size()),
            icount: spec.icount,
            extra: Vec::new(),
        };
        let mut snaps = m.snapshots.clone();
        snaps.push(snap.clone());
        if m.snapshots_in_place() {
            self.create_in_place(m, snap, owns_dirty)?;
        } else if !self.switch_snapshots(m, snaps)? {
            let l1_table_offset = self.share_active_l1(m)?;
            let mut snaps = m.snapshots.clone();
            snaps.push(Snapshot {
                l1_table_offset,
                ..snap
            });
            m.replace_snapshot_table(snaps)?;
        }
        if !spec.vm_state.is_empty() {
            // The state now lives in the snapshot; the active image no longer needs it.
            let len = (spec.vm_state.len() as u64).next_multiple_of(cs);
            self.discard_beyond_disk(m, vm_base, len)?;
        }
        m.flush_metadata()?;
        Ok(m.snapshots.last().expect("just added").clone())
    }

    /// The in-place way to share the active image with a new snapshot, for images
    /// [`Qcow2Image::switch_snapshots`] declines: write a copy of the active L1,
    /// clear the active COPIED flags, flush; raise the refcounts. Returns the copy's
    /// offset. A crash in between leaves flags that are only conservative (a
    /// refcount of 1 with the flag clear: a writer copies a cluster it owns), which
    /// `qemu-img check` still reports.
    fn share_active_l1(&self, m: &mut Meta) -> Result<u64> {
        let cs = m.cluster_size();
        let l1 = m.l1.clone();
        let l1_off = if l1.is_empty() {
            0
        } else {
            let n = (l1.len() as u64 * 8).div_ceil(cs);
            let off = m.alloc_clusters(ClusterCount(n))?.get();
            m.write_dirty_refblocks()?;
            // The copy claims no table as its own: whoever makes it active again
            // shares every table with it.
            let mut bytes = Vec::with_capacity(l1.len() * 8);
            for e in &l1 {
                bytes.extend_from_slice(&(e & !OFLAG_COPIED).to_be_bytes());
            }
            m.storage.write_at(&bytes, off)?;
            off
        };
        m.clear_copied_flags()?;
        m.flush_metadata()?;
        m.update_l1_refcounts(&l1, 1)?;
        m.fix_copied_flags()?;
        m.flush_metadata()?;
        Ok(l1_off)
    }

    /// Revert the disk to snapshot `key` (ID or name). The current state is lost.
    pub fn snapshot_apply(&self, key: &str) -> Result<()> {
        if self.read_only() {
            return Err(self.err(Error::read_only()));
        }
        self.refuse_internal_snapshots()?;
        let _excl = self.exclusive();
        let mut m = self.lock()?;
        let m = &mut *m;
        let r = (|| {
            let set = m.begin_metadata_op()?;
            let r = self.snapshot_apply_locked(m, key);
            if r.is_ok() {
                m.end_metadata_op(set)?;
            }
            r
        })();
        r.map_err(|e| self.err(e))
    }

    fn snapshot_apply_locked(&self, m: &mut Meta, key: &str) -> Result<()> {
        let snap = find(&m.snapshots, key)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| Error::not_found(format!("Can't find snapshot '{key}'")))?;
        // A bad table is refused before the bitmaps or the dirty bit change.
        m.usable_snapshot_l1(&snap)?;
        m.flush_caches_before_op()?;
        // The guest disk changes wholesale: bitmaps record it first.
        let size = m.h.size;
        m.dirty_bitmaps(0, size)?;
        if m.snapshots_in_place() && self.apply_in_place(m, &snap)? {
            m.l2.clear();
            return Ok(());
        }
        // Only the in-place walk defers the dirty bit to its first flag change.
        m.mark_op_dirty()?;
        let sl1 = m.read_snapshot_l1(&snap, true)?;
        if sl1.len() > m.l1.len() {
            self.grow_l1_for(m, sl1.len() as u64)?;
        }
        // Raise the snapshot's refcounts first.
        m.update_l1_refcounts(&sl1, 1)?;
        // The snapshot's tables may still carry the flags they had while active
        // (a snapshot takes the active tables as they are): make them agree with
        // the raised refcounts before the tables become active. Only flags of
        // shared clusters change (to clear), so no order among these writes
        // matters; the L1 switch waits for all of them.
        let cs = m.cluster_size();
        for (i, &e) in sl1.iter().enumerate() {
            let (l2off, _) = decode_l1(e, cs, i as u64)?;
            if !l2off.is_none() {
                m.fix_table_flags(l2off)?;
            }
        }
        m.write_dirty_refblocks()?;
        m.write_dirty_l2_tables()?;
        m.barrier_named(Barrier::SnapshotRefcountsBeforeL1)?;
        // Switch the active L1 in one write. Every table it now names is shared
        // with the snapshot, so no entry may claim it (COPIED): the flags are right
        // in the same write that switches the tables.
        let old = std::mem::take(&mut m.l1);
        let mut new = sl1;
        new.resize(old.len(), 0);
        let cs = m.cluster_size();
        for (i, e) in new.iter_mut().enumerate() {
            let (l2off, _) = decode_l1(*e, cs, i as u64)?;
            if !l2off.is_none() {
                let owned = m.refcount(l2off.cluster(m.geo.cluster_bits))? == 1;
                *e = if owned {
                    *e | OFLAG_COPIED
                } else {
                    *e & !OFLAG_COPIED
                };
            }
        }
        let new_size = snap.disk_size.filter(|&s| s != self.virtual_size());
        if new.len() * 8 <= 512 && new_size.is_none() {
            // The table fits in one sector, which the disk writes whole.
            let mut bytes = Vec::with_capacity(new.len() * 8);
            for e in &new {
                bytes.extend_from_slice(&e.to_be_bytes());
            }
            m.storage.write_at(&bytes, m.h.l1_table_offset)?;
            m.storage.flush()?;
            m.l1 = new;
        } else {
            // A larger table could be torn, and a size change is a second write:
            // write the table elsewhere and switch the header (size included) at once.
            m.relocate_l1(new, new_size)?;
            if let Some(size) = new_size {
                self.set_virtual_size(size);
            }
        }
        // Then lower the old state's.
        m.update_l1_refcounts(&old, -1)?;
        m.fix_copied_flags()?;
        m.flush_metadata()?;
        m.l2.clear();
        Ok(())
    }

    /// Delete snapshot `key` (ID or name), freeing the clusters only it used.
    pub fn snapshot_delete(&self, key: &str) -> Result<Snapshot> {
        if self.read_only() {
            return Err(self.err(Error::read_only()));
        }
        let _excl = self.exclusive();
        let mut m = self.lock()?;
        let m = &mut *m;
        let r = (|| {
            let set = m.begin_metadata_op()?;
            let r = self.snapshot_delete_locked(m, key);
            if r.is_ok() {
                m.end_metadata_op(set)?;
            }
            r
        })();
        r.map_err(|e| self.err(e))
    }

    fn snapshot_delete_locked(&self, m: &mut Meta, key: &str) -> Result<Snapshot> {
        let (idx, snap) = find(&m.snapshots, key)
            .map(|(i, s)| (i, s.clone()))
            .ok_or_else(|| Error::not_found(format!("Can't find the snapshot '{key}'")))?;
        // A bad table is refused before the snapshot table changes.
        m.usable_snapshot_l1(&snap)?;
        m.flush_caches_before_op()?;
        if m.snapshots_in_place() {
            self.delete_in_place(m, idx)?;
            m.l2.clear();
            return Ok(snap);
        }
        // Only the in-place walk defers the dirty bit to its first flag change.
        m.mark_op_dirty()?;
        let mut snaps = m.snapshots.clone();
        snaps.remove(idx);
        if self.switch_snapshots(m, snaps.clone())? {
            return Ok(snap);
        }
        let sl1 = m.read_snapshot_l1(&snap, true)?;
        m.replace_snapshot_table(snaps)?;
        // The table no longer names it: now drop its references.
        m.update_l1_refcounts(&sl1, -1)?;
        let cs = m.cluster_size();
        if snap.l1_size > 0 {
            let end = (snap.l1_table_offset + u64::from(snap.l1_size) * 8).div_ceil(cs);
            for c in snap.l1_table_offset / cs..end {
                m.update_refcount(ClusterIndex(c), -1)?;
            }
        }
        m.fix_copied_flags()?;
        m.flush_metadata()?;
        m.l2.clear();
        Ok(snap)
    }

    /// A read-only view of snapshot `key` as a disk (for `convert -l`).
    pub fn snapshot_view(&self, key: &str) -> Result<Qcow2Image> {
        let m = self.lock()?;
        let snap = find(&m.snapshots, key)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| self.err(Error::not_found(format!("Can't find snapshot '{key}'"))))?;
        let l1 = m.read_snapshot_l1(&snap, false).map_err(|e| self.err(e))?;
        let mut h = m.h.clone();
        h.size = snap.disk_size.unwrap_or(h.size);
        h.l1_size = snap.l1_size;
        h.l1_table_offset = snap.l1_table_offset;
        let reftable = m.reftable.clone();
        let snaps = m.snapshots.clone();
        drop(m);
        Ok(
            Qcow2Image::from_parts(self.storage.clone(), h, l1, reftable, snaps, true)
                .sharing_encryption_of(self),
        )
    }
}

impl Qcow2Image {
    /// Make the active disk empty: every guest cluster unallocated, so all reads
    /// fall through to the backing file (what an overlay looks like after
    /// `qemu-img commit`).
    ///
    /// An image qemu-img 10 rebuilds (version 3 without snapshots, bitmaps or
    /// encryption) has every L1 entry cleared: each L2 table and the clusters
    /// it maps lose the active view's reference, and the file's free tail is
    /// given back, so it shrinks to its header, refcount structures and L1
    /// table. Any other image (but one with an external data file) is emptied
    /// as qemu-img's fallback empties it: every L2 entry is cleared in place
    /// (a table shared with a snapshot copied first), the clusters freed are
    /// punched, and the file keeps its length; what internal snapshots share
    /// stays with them.
    ///
    /// Crash safety: the cleared L1 table is written and flushed before any
    /// refcount drops, and the file is shortened only past the last cluster whose
    /// refcount is durable at zero, so a crash leaks clusters at worst.
    ///
    /// A v3 image qemu-img rebuilds announces the events QEMU's emptying of
    /// such an image announces (`l1_update` before the L1 table is cleared;
    /// `empty_image_prepare`, `l1_update`, `reftable_update` and
    /// `refblock_alloc` once it is), so blkdebug rules fail the same step. A
    /// failure after the L1 table is cleared leaves the image marked dirty
    /// with its clusters leaked (QEMU's next writable open repairs it); QEMU
    /// zeroes its refcount structures there instead, which strata never does.
    pub fn make_empty(&self) -> Result<()> {
        self.check_writable()?;
        let _excl = self.exclusive();
        let mut m = self.lock()?;
        let set_here = m.begin_metadata_op().map_err(|e| self.err(e))?;
        // The dirty bit goes first, before the events that announce the
        // emptying's writes (a rule failing them must not fail the bit).
        let marked = m.mark_op_dirty();
        let external = self.data.is_external();
        // What qemu-img cannot rebuild (version 2, snapshots, bitmaps,
        // encryption) it empties by discarding every guest cluster in full:
        // each L2 table stays (made the image's own), its entries cleared, and
        // only the freed clusters are punched; the file keeps its length.
        let discards = !external
            && (m.h.version < 3
                || m.h.nb_snapshots != 0
                || m.h.bitmaps.is_some()
                || m.h.crypt_method == super::header::crypt::LUKS);
        // Only the rebuild announces the rebuild's events.
        let after_l1: &[DebugEvent] =
            if marked.is_ok() && !discards && m.h.version >= 3 && m.snapshots.is_empty() {
                m.storage.debug_event(DebugEvent::L1Update);
                &[
                    DebugEvent::EmptyImagePrepare,
                    DebugEvent::L1Update,
                    DebugEvent::ReftableUpdate,
                    DebugEvent::RefblockAlloc,
                ]
            } else {
                &[]
            };
        if discards {
            let cs = m.geo.cluster_size();
            let clusters = m.h.size.div_ceil(cs);
            let r = marked
                .and_then(|_| m.discard_in_full(0, clusters))
                .and_then(|_| m.flush_metadata());
            r.map_err(|e| self.fail_corrupt(&mut m, e))?;
            return m.end_metadata_op(set_here).map_err(|e| self.err(e));
        }
        let r = marked
            .and_then(|_| m.drop_l2_tables(0, false, after_l1))
            .and_then(|_| {
                // qemu-img lays an image it may rebuild (version 3 without
                // snapshots, bitmaps, encryption or a data file) out anew,
                // ending on a cluster boundary: grow a shorter file to it (only
                // zeroes past every byte in use). It zeroes the clusters after
                // the header by allocation, so its file system keeps them all
                // allocated: they are allocated here too (contents unchanged).
                let h = &m.h;
                if h.version >= 3
                    && h.nb_snapshots == 0
                    && h.bitmaps.is_none()
                    && h.crypt_method == 0
                    && !external
                {
                    let len = m.storage.size()?;
                    let cs = m.geo.cluster_size();
                    let aligned = len
                        .checked_next_multiple_of(cs)
                        .ok_or_else(|| Error::invalid_argument("image file length overflows"))?;
                    if aligned > cs {
                        m.storage.preallocate(cs, aligned - cs)?;
                    }
                    if m.storage.size()? != aligned {
                        m.storage.set_size(aligned)?;
                    }
                    m.storage.flush()?;
                    // The new layout's L1 table starts after the header, the
                    // refcount table and one refcount block; an empty L1
                    // table (a zero-sized image) is named there too, as
                    // qemu-img names it. With no entries nothing reads it.
                    let l1_at = m
                        .geo
                        .cluster_size()
                        .checked_mul(3)
                        .ok_or_else(|| Error::invalid_argument("cluster size overflows"))?;
                    if m.h.l1_size == 0 && m.h.l1_table_offset != l1_at {
                        m.storage.write_at(&l1_at.to_be_bytes(), 40)?;
                        m.storage.flush()?;
                        m.h.l1_table_offset = l1_at;
                    }
                }
                Ok(())
            });
        r.map_err(|e| self.fail_corrupt(&mut m, e))?;
        m.end_metadata_op(set_here).map_err(|e| self.err(e))
    }
}
