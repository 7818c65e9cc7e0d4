//! Shrinking the active disk as QEMU shrinks it, so both tools leave the same
//! file: every guest cluster past the new end is discarded in full (its L2 entry
//! cleared, not made a zero cluster), each L2 table of that range is first made
//! the image's own (a missing one is allocated, as QEMU's discard allocates it),
//! and the clusters freed on the way (data clusters, then the L2 tables that
//! [`Meta::drop_l2_tables`] drops) have their bytes given back to the file
//! system (a hole is punched) once their refcount is durable at zero: freed
//! data clusters (and refcount blocks) as merged runs, L2 tables one by one,
//! as QEMU punches them.
//!
//! Refcount blocks that then count nothing but themselves are dropped wherever
//! they sit in the refcount table (not only at its end), and punched too.
//!
//! Ordering: the cleared entries are written before any refcount drops, and a
//! hole is punched only in a cluster whose zero refcount is on disk
//! ([`Meta::flush_metadata`]), so a crash leaks at worst.

use super::entries::L2Entry;
use super::meta::Meta;
use crate::units::{index, ClusterIndex};
use crate::Result;

impl Meta {
    /// Discard guest clusters `[first, end)` in full: each L2 table of the range
    /// is made this image's own, every entry that maps or zeroes a cluster is
    /// cleared and what it pointed at is freed and punched.
    pub(crate) fn discard_in_full(&mut self, first: u64, end: u64) -> Result<()> {
        let l2n = self.l2_entries();
        let mut gc = first;
        while gc < end {
            let l1i = gc / l2n;
            let stop = ((l1i + 1) * l2n).min(end);
            let l2 = self.l2_for_write(l1i)?;
            for g in gc..stop {
                let old = self.entry(g)?;
                let unallocated = matches!(
                    old,
                    L2Entry::Normal { host, zero: false, bitmap: 0, .. } if host.is_none()
                );
                if unallocated {
                    continue;
                }
                self.set_raw_entry(l2, g % l2n, 0, 0)?;
                self.release_entry_punching(old);
            }
            gc = stop;
        }
        Ok(())
    }

    /// [`Meta::release_entry`], and the clusters it frees are punched once free.
    pub(crate) fn release_entry_punching(&mut self, e: L2Entry) {
        let before = self.pending_frees.len();
        self.release_entry(e);
        let freed = self.pending_frees[before..].to_vec();
        self.pending_punches.extend(freed);
    }

    /// Punch a hole over each queued cluster whose refcount is now zero (call
    /// only once the dropped refcounts are on disk). Neighbouring clusters are
    /// punched as one range, as QEMU merges its discards: a file system frees
    /// only whole blocks, which small clusters fill together.
    pub(crate) fn punch_freed(&mut self) -> Result<()> {
        let cs = self.cluster_size();
        let mut free = Vec::new();
        for c in std::mem::take(&mut self.pending_punches) {
            if self.refcount(c)? == 0 {
                free.push(c.get());
            }
        }
        free.sort_unstable();
        free.dedup();
        let mut i = 0;
        while i < free.len() {
            let mut j = i + 1;
            while j < free.len() && free[j] == free[j - 1] + 1 {
                j += 1;
            }
            let n = (j - i) as u64;
            self.storage.discard(free[i] * cs, n * cs)?;
            i = j;
        }
        Ok(())
    }

    /// Punch a hole over each of `clusters` that is free, one at a time, as QEMU
    /// punches the L2 tables its shrink drops (small clusters then free no
    /// file-system block). Call once their refcounts are on disk.
    pub(crate) fn punch_each(&mut self, clusters: &[ClusterIndex]) -> Result<()> {
        let cs = self.cluster_size();
        for &c in clusters {
            if self.refcount(c)? == 0 {
                self.storage.discard(c.get() * cs, cs)?;
            }
        }
        Ok(())
    }

    /// Drop every refcount block that counts no cluster but (if it lies in its
    /// own range) itself: the refcount table is written with their entries
    /// cleared and flushed first, then each block described by another one
    /// loses its reference (flushed), and every dropped block is punched.
    /// Call with the metadata flushed.
    pub(crate) fn drop_unused_refblocks(&mut self) -> Result<()> {
        let mut dropped = Vec::new();
        for idx in 0..self.reftable.len() as u64 {
            if let Some((own, self_described)) = self.idle_refblock(idx)? {
                dropped.push((idx, own, self_described));
            }
        }
        if dropped.is_empty() {
            return Ok(());
        }
        let mut table = self.reftable.clone();
        for &(idx, _, _) in &dropped {
            table[index(idx)] = 0;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.storage
            .write_at(&bytes, self.h.refcount_table_offset)?;
        self.barrier()?;
        self.reftable = table;
        self.rb.clear();
        for &(_, own, self_described) in &dropped {
            if !self_described {
                self.update_refcount(own, -1)?;
            }
        }
        self.write_refblocks()?;
        self.barrier()?;
        self.pending_punches
            .extend(dropped.iter().map(|&(_, own, _)| own));
        self.punch_freed()?;
        self.free_hint = 1;
        Ok(())
    }
}
