//! Snapshot create and delete as one header switch.
//!
//! Both change, for every table and cluster the active L1 reaches, a refcount
//! (in a refcount block) and the COPIED flag that must agree with it (in an L1 or
//! L2 table): no order of in-place writes keeps them in agreement in every durable
//! state. So the new metadata is prepared off to the side, unreferenced: the new
//! snapshot table; copies of the active L2 tables whose COPIED flags must change
//! (a table whose flags stay right is kept, shared if need be); a new active L1
//! table naming them; and fresh refcount structures counting everything the new
//! state references (and not the old refcount structures and snapshot table,
//! which become free). Everything is flushed, then one write of header bytes
//! 36..72 (L1 size and offset, refcount table offset and size, snapshot count and
//! offset, all in the first sector, which the disk writes whole) switches from
//! the old state to the new, and is flushed. A crash leaves one state or the
//! other, each consistent; clusters written for the new state leak at worst.
//! The fresh refcount structures take a run the old state leaves free, so the
//! file does not grow by them at every switch; a free tail is given back after.
//!
//! Only version 2 images take this path: a version 3 image runs create and delete in place, in QEMU's
//! order and layout, under its dirty bit (see `snapshot_walk`). Version 2 has no
//! dirty bit to cover the window in which an in-place refcount and its COPIED
//! flag disagree, so here strata keeps the switch, and its files end longer
//! than QEMU's: they also hold the L2 copies, the new active L1 and the fresh
//! refcount structures (a second snapshot reuses the clusters the first switch
//! freed).
//!
//! QEMU's in-place order is not taken for version 2 even where it would leave
//! only leaks: a cut between a refcount block write and the L2 table write of
//! its COPIED flags leaves an image `qemu-img check` reports as corrupt
//! (`ERROR OFLAG_COPIED ...`, exit code 2), not merely leaking; and an apply
//! cut after its commit point leaves the active L1 with the snapshot's stored
//! COPIED flags on tables the snapshot still shares, which a writer (QEMU
//! included: nothing makes it check a version 2 image first) would write in
//! place, changing the snapshot.
//!
//! On create, the old active L1 and L2 tables become the snapshot's unchanged:
//! their COPIED flags are no longer checked (only the active image's are), and
//! whoever makes them active again recomputes them (see `snapshot_apply`).

use super::entries::{L2Entry, OFLAG_COPIED};
use super::image::Qcow2Image;
use super::meta::Meta;
use super::snapshot::{self, Snapshot};
use crate::units::{header_u32, ClusterCount, ClusterIndex, HostOffset};
use crate::Result;

/// The header fields the switch writes, from byte [`SWITCH_AT`] on.
const SWITCH_AT: u64 = 36;

impl Qcow2Image {
    /// Make `snaps` the snapshot table, with fresh active L2 copies, active L1 and
    /// refcount structures, in one header write (see the module). Everything but
    /// the header fields is unreferenced until that write. The metadata caches
    /// must be clean (flushed) on entry.
    ///
    /// Returns `Ok(false)` with nothing switched (and nothing but leaked-free
    /// clusters written) when the image is not fit for it: an empty active L1, or
    /// a count that finds any corruption (a structure built from it could free a
    /// cluster something names); the caller then takes the in-place path.
    pub(crate) fn switch_snapshots(&self, m: &mut Meta, snaps: Vec<Snapshot>) -> Result<bool> {
        if m.l1.is_empty() {
            return Ok(false);
        }
        let cs = m.cluster_size();
        let bits = m.geo.cluster_bits;
        // The snapshot table.
        let mut snaps = snaps;
        snapshot::complete_disk_sizes(&mut snaps, m.h.size);
        for s in &mut snaps {
            s.extra = s.encode_extra();
        }
        let nb_snapshots = header_u32(snaps.len() as u64, "snapshot count")?;
        let l1_size = header_u32(m.l1.len() as u64, "L1 table size")?;
        let bytes = snapshot::serialize_table(&snaps)?;
        let table_clusters = (bytes.len() as u64).div_ceil(cs);
        let snap_off = if bytes.is_empty() {
            0
        } else {
            let off = m.alloc_clusters(ClusterCount(table_clusters))?.get();
            m.write_dirty_refblocks()?;
            m.storage.write_at(&bytes, off)?;
            off
        };
        let old = (m.h.nb_snapshots, m.h.snapshots_offset);
        let old_snaps = std::mem::replace(&mut m.snapshots, snaps);
        m.h.nb_snapshots = nb_snapshots;
        m.h.snapshots_offset = snap_off;
        let counted = self.references_for_fresh_refcounts(m);
        let mut refs = match counted {
            Ok(Some(refs)) => refs,
            other => {
                m.snapshots = old_snaps;
                (m.h.nb_snapshots, m.h.snapshots_offset) = old;
                for c in HostOffset(snap_off).clusters(bytes.len() as u64, bits) {
                    m.update_refcount(c, -1)?;
                }
                return other.map(|_| false);
            }
        };
        let add = |refs: &mut Vec<u64>, c: ClusterIndex, delta: i64| {
            if c.slot() >= refs.len() {
                refs.resize(c.slot() + 1, 0);
            }
            let r = &mut refs[c.slot()];
            *r = r.saturating_add_signed(delta);
        };
        // The active L2 tables, copied where a COPIED flag must change.
        let w = m.words();
        let mut l1 = m.l1.clone();
        for (i, e) in l1.iter_mut().enumerate() {
            let (l2off, _) = m.l1_entry(i as u64)?;
            if l2off.is_none() {
                continue;
            }
            m.load_l2(l2off)?;
            let mut table = m.l2.get(l2off.get()).expect("loaded").data.clone();
            let mut changed = false;
            for j in 0..table.len() / w {
                let (raw, bitmap) = (table[j * w], if w == 2 { table[j * w + 1] } else { 0 });
                if let L2Entry::Normal { host, copied, .. } = m.geo.decode_l2(raw, bitmap)? {
                    let owned = !host.is_none() && refs.get(host.cluster(bits).slot()) == Some(&1);
                    if !host.is_none() && owned != copied {
                        table[j * w] = raw ^ OFLAG_COPIED;
                        changed = true;
                    }
                }
            }
            *e = if changed {
                let copy = m.alloc_clusters(ClusterCount(1))?;
                m.write_dirty_refblocks()?;
                m.storage
                    .write_at(&Meta::encode_table(&table), copy.get())?;
                add(&mut refs, l2off.cluster(bits), -1);
                add(&mut refs, copy.cluster(bits), 1);
                copy.get() | OFLAG_COPIED
            } else if refs.get(l2off.cluster(bits).slot()) == Some(&1) {
                l2off.get() | OFLAG_COPIED
            } else {
                l2off.get()
            };
        }
        // The active L1 table, in new clusters (the old one is now the snapshot's,
        // or free).
        let l1_bytes = l1.len() as u64 * 8;
        let l1_off = m.alloc_clusters(ClusterCount::for_bytes(l1_bytes, bits))?;
        m.write_dirty_refblocks()?;
        m.storage.write_at(&Meta::encode_table(&l1), l1_off.get())?;
        let old_l1 = HostOffset(m.h.l1_table_offset);
        for c in old_l1.clusters(u64::from(m.h.l1_size) * 8, bits) {
            add(&mut refs, c, -1);
        }
        for c in l1_off.clusters(l1_bytes, bits) {
            add(&mut refs, c, 1);
        }
        let l1_off = l1_off.get();
        // The fresh structures go where the old ones leave room (a run free now,
        // taken from the old structures, so nothing else lands there), not past
        // the end of the file: the file does not grow by them at every switch.
        let covered = (refs.len() as u64).max(m.storage.size()?.div_ceil(cs));
        let at = m.alloc_clusters(ClusterCount(m.fresh_refcount_clusters(covered)))?;
        m.write_dirty_refblocks()?;
        let fresh = m.write_fresh_refcounts(refs, &[], Some(at.cluster(bits)))?;
        m.storage.flush()?;
        // The switch: bytes 36..72 of the first sector.
        let mut hdr = [0u8; 36];
        hdr[..4].copy_from_slice(&l1_size.to_be_bytes());
        hdr[4..12].copy_from_slice(&l1_off.to_be_bytes());
        hdr[12..20].copy_from_slice(&fresh.table_offset.to_be_bytes());
        hdr[20..24].copy_from_slice(&fresh.table_clusters.to_be_bytes());
        hdr[24..28].copy_from_slice(&m.h.nb_snapshots.to_be_bytes());
        hdr[28..].copy_from_slice(&m.h.snapshots_offset.to_be_bytes());
        m.storage.write_at(&hdr, SWITCH_AT)?;
        m.storage.flush()?;
        m.h.l1_size = l1_size;
        m.h.l1_table_offset = l1_off;
        m.l1 = l1;
        m.adopt_refcounts(fresh);
        m.l2.clear();
        m.compressed_cursor = 0;
        // What the old state alone used may end the file: give it back.
        m.trim_free_tail()?;
        Ok(true)
    }
}
