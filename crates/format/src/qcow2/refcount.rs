//! Reference counts: reading and writing entries of every width (1 to 64 bits),
//! cluster allocation, refcount-block creation and refcount-table growth.
//!
//! Write ordering (see DESIGN.md): a refcount block reaches the disk, and is flushed,
//! before the refcount table points at it; a grown refcount table is written and
//! flushed before the header switches to it in one write; decrements are applied only
//! after the mappings that dropped the references are on disk (`pending_frees`).

use super::meta::Meta;
use crate::units::{index, ClusterCount, ClusterIndex, HostOffset};
use crate::{Error, Result};
use strata_storage::DebugEvent;

/// Read entry `i` of a refcount block of `order` (bits = 2^order).
pub fn rb_get(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0 => u64::from((block[i / 8] >> (i % 8)) & 1),
        1 => u64::from((block[i / 4] >> (2 * (i % 4))) & 3),
        2 => u64::from((block[i / 2] >> (4 * (i % 2))) & 0xf),
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => u64::from(u32::from_be_bytes(
            block[4 * i..4 * i + 4].try_into().expect("4"),
        )),
        _ => u64::from_be_bytes(block[8 * i..8 * i + 8].try_into().expect("8")),
    }
}

/// Write entry `i`; `v` must fit the width.
pub fn rb_set(block: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let shift = bits * (i % per);
            let mask = low_byte((1u64 << bits) - 1) << shift;
            let b = &mut block[i / per];
            *b = (*b & !mask) | ((low_byte(v) << shift) & mask);
        }
        3 => block[i] = low_byte(v),
        4 => block[2 * i..2 * i + 2].copy_from_slice(&v.to_be_bytes()[6..]),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&v.to_be_bytes()[4..]),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

/// The lowest byte of `v` (refcount entries narrower than a byte are masked after).
#[inline]
fn low_byte(v: u64) -> u8 {
    v.to_le_bytes()[0]
}

/// Reserved bits of a refcount table entry (bits 0..=8).
pub const REFTABLE_RESERVED: u64 = 0x1ff;

impl Meta {
    /// Refcount entries per refcount block.
    pub fn rb_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.h.refcount_order
    }

    pub fn max_refcount(&self) -> u64 {
        if self.h.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.h.refcount_order)) - 1
        }
    }

    /// Host offset of refcount block `idx`, or none if there is none.
    pub fn refblock_offset(&self, idx: u64) -> Result<HostOffset> {
        let Some(&e) = self.reftable.get(index(idx)) else {
            return Ok(HostOffset::NONE);
        };
        if e & REFTABLE_RESERVED != 0 {
            return Err(Error::corrupt(format!(
                "refcount table entry {idx} has reserved bits set (0x{e:x})"
            )));
        }
        if !e.is_multiple_of(self.cluster_size()) {
            return Err(Error::corrupt(format!(
                "refcount block {idx} offset 0x{e:x} is not cluster-aligned"
            )));
        }
        Ok(HostOffset(e))
    }

    pub(crate) fn load_refblock(&mut self, off: HostOffset) -> Result<()> {
        let off = off.get();
        if self.rb.contains(off) {
            return Ok(());
        }
        let mut buf = vec![0u8; index(self.cluster_size())];
        self.storage.read_at(&mut buf, off)?;
        let evicted = self.rb.insert(off, buf, false);
        self.write_evicted_refblock(evicted)
    }

    /// Write a refcount block the cache pushed out; on failure keep it cached and dirty.
    pub(crate) fn write_evicted_refblock(
        &mut self,
        evicted: Option<(u64, super::cache::Slot<Vec<u8>>)>,
    ) -> Result<()> {
        if let Some((k, slot)) = evicted {
            if slot.dirty {
                self.storage.debug_event(DebugEvent::RefblockUpdatePart);
                if let Err(e) = self.storage.write_at(&slot.data, k) {
                    self.rb.put_back(k, slot);
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    /// The refcount block of table entry `idx`, when it counts no cluster but
    /// (if it lies in its own range) itself, once: its cluster and whether it
    /// describes itself. `None` for an empty entry or a block in use.
    pub(crate) fn idle_refblock(&mut self, idx: u64) -> Result<Option<(ClusterIndex, bool)>> {
        let off = self.refblock_offset(idx)?;
        if off.is_none() {
            return Ok(None);
        }
        let epb = self.rb_entries();
        let order = self.h.refcount_order;
        let own = off.cluster(self.geo.cluster_bits);
        let self_described = own.get() / epb == idx;
        self.load_refblock(off)?;
        let data = &self.rb.get(off.get()).expect("loaded").data;
        let idle = (0..epb).all(|i| {
            let v = rb_get(data, order, index(i));
            v == 0 || (self_described && idx * epb + i == own.get() && v == 1)
        });
        Ok(idle.then_some((own, self_described)))
    }

    /// Drop the refcount blocks at the end of the refcount table that count no
    /// cluster but their own (what a shrink leaves past the new end), so the file
    /// can be shortened past them, as QEMU does. Only that tail is read: the scan
    /// stops at the last block still in use. Their table entries are cleared and
    /// written first, and only then does a block described by another one lose
    /// its reference, so a crash leaks at worst. Call with the metadata flushed.
    pub(crate) fn drop_idle_refblocks(&mut self) -> Result<()> {
        let mut dropped = Vec::new();
        for idx in (0..self.reftable.len() as u64).rev() {
            if self.refblock_offset(idx)?.is_none() {
                continue;
            }
            let Some((own, self_described)) = self.idle_refblock(idx)? else {
                break;
            };
            dropped.push((idx, own, self_described));
        }
        if dropped.is_empty() {
            return Ok(());
        }
        for &(idx, _, _) in &dropped {
            self.reftable[index(idx)] = 0;
            self.storage
                .write_at(&0u64.to_be_bytes(), self.h.refcount_table_offset + idx * 8)?;
        }
        self.barrier()?;
        self.rb.clear();
        for &(_, own, self_described) in &dropped {
            if !self_described {
                self.update_refcount(own, -1)?;
            }
        }
        self.write_refblocks()?;
        self.barrier()?;
        self.free_hint = 1;
        Ok(())
    }

    /// Give back the file's free tail: shorten the file to just past the last
    /// cluster with a reference. Call only once the references dropped are
    /// flushed, so no structure on disk points past the new end.
    pub(crate) fn trim_free_tail(&mut self) -> Result<()> {
        let cs = self.geo.cluster_size();
        let end = self.storage.size()?.div_ceil(cs);
        let mut keep = end;
        while keep > 0 && self.refcount(ClusterIndex(keep - 1))? == 0 {
            keep -= 1;
        }
        if keep < end {
            self.storage.set_size(keep * cs)?;
            self.storage.flush()?;
        }
        Ok(())
    }

    /// The stored refcount of host cluster `cluster`.
    pub fn refcount(&mut self, cluster: ClusterIndex) -> Result<u64> {
        let epb = self.rb_entries();
        let off = self.refblock_offset(cluster.get() / epb)?;
        if off.is_none() {
            return Ok(0);
        }
        self.load_refblock(off)?;
        let order = self.h.refcount_order;
        let slot = self.rb.get(off.get()).expect("loaded");
        Ok(rb_get(&slot.data, order, index(cluster.get() % epb)))
    }

    /// Set the refcount of `cluster` (its refcount block must exist).
    pub(crate) fn set_refcount_in_block(&mut self, cluster: ClusterIndex, v: u64) -> Result<()> {
        let epb = self.rb_entries();
        let off = self.refblock_offset(cluster.get() / epb)?;
        debug_assert!(!off.is_none(), "refcount block must exist");
        self.load_refblock(off)?;
        let order = self.h.refcount_order;
        let slot = self.rb.get(off.get()).expect("loaded");
        rb_set(&mut slot.data, order, index(cluster.get() % epb), v);
        slot.dirty = true;
        Ok(())
    }

    /// Add `delta` to the refcount of `cluster`, creating its refcount block if needed.
    /// Underflow is a corruption error; overflow (a count the refcount width cannot
    /// hold, as a snapshot of a 1-bit image asks) an invalid argument, QEMU's
    /// EINVAL; neither wraps around.
    pub fn update_refcount(&mut self, cluster: ClusterIndex, delta: i64) -> Result<u64> {
        let idx = cluster.get() / self.rb_entries();
        // Announced where QEMU announces them: a block looked up (and created if
        // missing) for a change, then loaded if not cached (plain lookups, as a
        // check's, go unannounced).
        self.storage.debug_event(DebugEvent::RefblockAlloc);
        self.ensure_refblock(idx)?;
        let off = self.refblock_offset(idx)?;
        if !self.rb.contains(off.get()) {
            self.storage.debug_event(DebugEvent::RefblockLoad);
        }
        let cur = self.refcount(cluster)?;
        let new = if delta >= 0 {
            cur.checked_add(delta as u64)
                .filter(|&v| v <= self.max_refcount())
                .ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "refcount of cluster {} would overflow",
                        cluster.0
                    ))
                })?
        } else {
            cur.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                Error::corrupt(format!(
                    "refcount of cluster {} would drop below zero",
                    cluster.0
                ))
            })?
        };
        self.set_refcount_in_block(cluster, new)?;
        if new == 0 && cluster.get() < self.free_hint {
            self.free_hint = cluster.get();
        }
        Ok(new)
    }

    /// Make sure refcount block `idx` exists, creating it (and growing the refcount
    /// table) as needed. A new block is self-describing: it lives in the first cluster
    /// of the range it covers, which is free because the range has no block yet.
    pub fn ensure_refblock(&mut self, idx: u64) -> Result<()> {
        if !self.refblock_offset(idx)?.is_none() {
            return Ok(());
        }
        if idx >= self.reftable.len() as u64 {
            // Growth places block `idx` itself, with the new table.
            return self.grow_reftable(idx);
        }
        let cs = self.cluster_size();
        let epb = self.rb_entries();
        let c0 = idx * epb;
        let off = c0
            .checked_mul(cs)
            .filter(|&o| o < super::header::MAX_HOST_OFFSET)
            .ok_or_else(|| {
                Error::invalid("image would grow past the 2^56-byte host offset limit")
            })?;
        let mut block = vec![0u8; index(cs)];
        rb_set(&mut block, self.h.refcount_order, 0, 1);
        self.storage.debug_event(DebugEvent::RefblockAllocWrite);
        self.storage.write_at(&block, off)?;
        self.barrier()?;
        self.storage.debug_event(DebugEvent::RefblockAllocHookup);
        self.reftable[index(idx)] = off;
        self.storage
            .write_at(&off.to_be_bytes(), self.h.refcount_table_offset + idx * 8)?;
        self.barrier()?;
        let evicted = self.rb.insert(off, block, false);
        self.write_evicted_refblock(evicted)
    }

    /// Grow the refcount table so that block `need` fits: a new area (block
    /// `need` and any others it needs, then the table) starts at the first
    /// cluster block `need` covers, which is free since it has no block.
    fn grow_reftable(&mut self, need: u64) -> Result<()> {
        self.storage.debug_event(DebugEvent::ReftableGrow);
        let at = need.checked_mul(self.rb_entries()).ok_or_else(|| {
            Error::invalid("image would grow past the 2^56-byte host offset limit")
        })?;
        self.refcount_area(at, 0, false, None)?;
        Ok(())
    }

    /// Allocate `n` contiguous free clusters, set their refcounts to 1 (in the cache),
    /// and return the host offset of the first. The caller must not let any L2 entry
    /// pointing there reach the disk before the refcount blocks are flushed
    /// ([`Meta::flush_metadata`] keeps that order).
    ///
    /// A refcount block missing for the run is created as QEMU creates it (see
    /// [`Meta::place_refblock`]), and the search starts over from the run's
    /// start (or from lower, where a grown table freed the old one), as QEMU
    /// retries the same clusters first; the new block, placed past the run,
    /// then only moves the run when it landed inside it.
    ///
    /// The search follows QEMU's: first fit from a cursor that every search leaves
    /// just past the run it returns (so a hole a search stepped over, too short
    /// for it, stays unused by later searches too), and that a cluster freed below
    /// it pulls back. Both tools then place the same requests at the same clusters.
    pub fn alloc_clusters(&mut self, n: ClusterCount) -> Result<HostOffset> {
        let n = n.get();
        debug_assert!(n > 0);
        self.storage.debug_event(DebugEvent::ClusterAlloc);
        let epb = self.rb_entries();
        'search: loop {
            let start = self.find_free_run(n)?;
            self.free_hint = start + n;
            for b in start / epb..=(start + n - 1) / epb {
                if self.refblock_offset(b)?.is_none() {
                    self.place_refblock((b * epb).max(start))?;
                    // QEMU tries the same clusters first: the cursor goes back
                    // to the run's start (or stays lower, where growing the
                    // table freed the old one).
                    self.free_hint = self.free_hint.min(start);
                    continue 'search;
                }
            }
            // QEMU raises the new run's refcounts through the same lookup.
            self.storage.debug_event(DebugEvent::RefblockAlloc);
            for c in start..start + n {
                self.set_refcount_in_block(ClusterIndex(c), 1)?;
            }
            // find_free_run stopped below the host offset limit.
            return Ok(HostOffset(start << self.geo.cluster_bits));
        }
    }

    /// First run of `n` clusters with refcount 0, searching from the hint.
    pub(crate) fn find_free_run(&mut self, n: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let mut c = self.free_hint.max(1);
        let mut start = c;
        let mut run = 0u64;
        while run < n {
            if c.checked_mul(cs)
                .is_none_or(|o| o >= super::header::MAX_HOST_OFFSET)
            {
                return Err(Error::invalid(
                    "image would grow past the 2^56-byte host offset limit",
                ));
            }
            if self.refcount(ClusterIndex(c))? == 0 {
                if run == 0 {
                    start = c;
                }
                run += 1;
            } else {
                run = 0;
            }
            c += 1;
        }
        Ok(start)
    }

    /// Queue one reference of host cluster `cluster` to be dropped once the mapping
    /// change that dropped it is on disk.
    pub fn free_later(&mut self, cluster: ClusterIndex) {
        self.pending_frees.push(cluster);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refcount_width_round_trips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                rb_set(&mut block, order, i, (i as u64 * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    rb_get(&block, order, i),
                    (i as u64 * 7 + 3) & max,
                    "order {order} i {i}"
                );
            }
        }
    }

    #[test]
    fn sub_byte_refcounts_are_lsb_first_like_qemu() {
        let mut block = vec![0u8; 1];
        rb_set(&mut block, 0, 0, 1);
        assert_eq!(block[0], 0b0000_0001);
        rb_set(&mut block, 1, 1, 3);
        assert_eq!(block[0], 0b0000_1101);
    }
}
