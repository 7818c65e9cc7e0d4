//! Where new refcount blocks and refcount tables go, placed as QEMU places them so
//! that both tools leave files of the same length after the same operations.
//!
//! A refcount block missing for a cluster being allocated takes the first free
//! cluster past the run the search just found; if the refcount table has no
//! entry for it, a self-describing area (the missing blocks, then a new table)
//! is laid out at the start of the next block range, and the caller searches
//! again. Growing an image by preallocation lays out such an area at the end of
//! the used clusters, sized for the clusters about to be added.
//!
//! Ordering (FACTS.md): new blocks are written and flushed before any table
//! names them; a new table is written and flushed before the header switches to
//! it in one write; the old table is freed only after the switch is durable. A
//! crash anywhere leaves at worst leaked clusters.

use super::meta::Meta;
use super::refcount::rb_set;
use crate::units::{index, ClusterIndex};
use crate::{Error, Result};
use strata_storage::DebugEvent;

/// Refcount blocks needed to count `clusters` clusters plus the refcount
/// structures themselves (the fixed point both tools compute), and the table
/// clusters that list them; `generous` first adds half the table again to the
/// clusters counted, so that the table need not grow again soon.
pub fn refcount_metadata(clusters: u64, cs: u64, order: u32, generous: bool) -> (u64, u64) {
    let per_table_cluster = cs / 8;
    let per_block = (cs * 8) >> order;
    let (mut clusters, mut generous) = (clusters, generous);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last && generous {
            clusters += table.div_ceil(2);
            n = 0;
            generous = false;
            continue;
        }
        if n == last {
            return (blocks, table);
        }
    }
}

fn too_large() -> Error {
    Error::invalid("refcount table would exceed 8 MiB: the image is too large for its cluster size")
}

impl Meta {
    /// Index of the last refcount table entry in use (0 when none is).
    fn last_reftable_index(&self) -> usize {
        let mut i = self.reftable.len().saturating_sub(1);
        while i > 0 && self.reftable[i] == 0 {
            i -= 1;
        }
        i
    }

    /// Lay out a new refcount table, and the refcount blocks missing for it, at
    /// cluster `start` (only free clusters may lie at and past it), covering
    /// every cluster up to the area's end plus `additional` clusters beyond it.
    /// The table is exactly that large, or half as large again unless `exact`.
    /// `new_block` (table index, host offset) is a block already written that
    /// the new table lists. Returns the first cluster past the area.
    pub(crate) fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_block: Option<(u64, u64)>,
    ) -> Result<u64> {
        let cs = self.cluster_size();
        let epb = self.rb_entries();
        let order = self.h.refcount_order;
        let wanted = start.checked_add(additional).ok_or_else(too_large)?;
        let (total, _) = refcount_metadata(wanted, cs, order, !exact);
        let mut table_len = if exact {
            total
        } else {
            total + total.div_ceil(2)
        };
        table_len = table_len.div_ceil(cs / 8) * (cs / 8);
        if table_len * 8 > super::header::MAX_REFTABLE_BYTES {
            return Err(too_large());
        }
        let table_clusters = table_len * 8 / cs;
        let mut table = vec![0u64; index(table_len)];
        let keep = (self.last_reftable_index() + 1)
            .min(self.reftable.len())
            .min(table.len());
        table[..keep].copy_from_slice(&self.reftable[..keep]);
        if let Some((i, off)) = new_block {
            table[index(i)] = off;
        }
        let first = start / epb;
        let missing = (first..total).filter(|&i| table[index(i)] == 0).count() as u64;
        let table_at = start + missing;
        let end = table_at + table_clusters;
        if end
            .checked_mul(cs)
            .is_none_or(|o| o > super::header::MAX_HOST_OFFSET)
        {
            return Err(Error::invalid(
                "image would grow past the 2^56-byte host offset limit",
            ));
        }
        // Blocks: existing ones count the area's clusters they cover through the
        // cache; new ones are written whole.
        let mut next = start;
        let mut made = Vec::new();
        for i in first..total {
            let covered = i * epb..(i + 1) * epb;
            let from = covered.start.max(start);
            let to = covered.end.min(end);
            if table[index(i)] != 0 {
                for c in from..to {
                    self.set_refcount_in_block(ClusterIndex(c), 1)?;
                }
                continue;
            }
            let mut block = vec![0u8; index(cs)];
            for c in from..to {
                rb_set(&mut block, order, index(c - covered.start), 1);
            }
            table[index(i)] = next * cs;
            made.push((next * cs, block));
            next += 1;
        }
        self.storage
            .debug_event(DebugEvent::RefblockAllocWriteBlocks);
        self.write_refblocks()?;
        for (off, block) in &made {
            self.storage.write_at(block, *off)?;
        }
        self.barrier()?;
        self.storage
            .debug_event(DebugEvent::RefblockAllocWriteTable);
        self.storage
            .write_at(&Meta::encode_table(&table), table_at * cs)?;
        self.barrier()?;
        self.storage
            .debug_event(DebugEvent::RefblockAllocSwitchTable);
        // The header names the new table in one write (offset 48: the table's
        // offset, then its cluster count).
        let clusters32 = u32::try_from(table_clusters).map_err(|_| too_large())?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&(table_at * cs).to_be_bytes());
        hdr[8..].copy_from_slice(&clusters32.to_be_bytes());
        self.storage.write_at(&hdr, 48)?;
        self.barrier()?;
        let old_off = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        self.h.refcount_table_offset = table_at * cs;
        self.h.refcount_table_clusters = clusters32;
        self.reftable = table;
        for (off, block) in made {
            let evicted = self.rb.insert(off, block, false);
            self.write_evicted_refblock(evicted)?;
        }
        // The old table is no longer named anywhere.
        for c in 0..old_clusters {
            self.update_refcount(ClusterIndex(old_off / cs + c), -1)?;
        }
        Ok(end)
    }

    /// Create the refcount block that cluster `c` needs (it has none), where
    /// QEMU creates it: in the first free cluster from the search cursor. The
    /// caller then searches again, since the block may sit where it meant to
    /// allocate. A block for a cluster past the refcount table comes with a new
    /// table ([`Meta::refcount_area`] at the next block range).
    pub(crate) fn place_refblock(&mut self, c: u64) -> Result<()> {
        let cs = self.cluster_size();
        let epb = self.rb_entries();
        let order = self.h.refcount_order;
        let idx = c / epb;
        let nb = self.find_free_run(1)?;
        self.free_hint = nb + 1;
        let mut block = vec![0u8; index(cs)];
        if nb / epb == idx {
            rb_set(&mut block, order, index(nb % epb), 1);
        } else {
            // Counted by another block, which must exist first: if it does not,
            // that one is made instead and the caller starts over.
            if self.refblock_offset(nb / epb)?.is_none() {
                return self.place_refblock(nb);
            }
            self.set_refcount_in_block(ClusterIndex(nb), 1)?;
            self.write_refblocks()?;
            self.barrier()?;
        }
        self.storage.debug_event(DebugEvent::RefblockAllocWrite);
        self.storage.write_at(&block, nb * cs)?;
        self.barrier()?;
        if idx < self.reftable.len() as u64 {
            self.storage.debug_event(DebugEvent::RefblockAllocHookup);
            self.storage.write_at(
                &(nb * cs).to_be_bytes(),
                self.h.refcount_table_offset + idx * 8,
            )?;
            self.barrier()?;
            self.reftable[index(idx)] = nb * cs;
            let evicted = self.rb.insert(nb * cs, block, false);
            return self.write_evicted_refblock(evicted);
        }
        self.storage.debug_event(DebugEvent::ReftableGrow);
        let evicted = self.rb.insert(nb * cs, block, false);
        self.write_evicted_refblock(evicted)?;
        let used = (c + 1).max(nb + 1).div_ceil(epb);
        self.refcount_area(used * epb, 0, false, Some((idx, nb * cs)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::refcount_metadata;

    #[test]
    fn metadata_fixed_point_counts_its_own_blocks_and_table() {
        // 64 KiB clusters, 16-bit refcounts: one block counts 32768 clusters.
        assert_eq!(refcount_metadata(100, 65536, 4, false), (1, 1));
        assert_eq!(refcount_metadata(32767, 65536, 4, false), (2, 1));
        // 512-byte clusters: 256 per block, 64 blocks per table cluster; the
        // generous form adds half the table again before the fixed point.
        assert_eq!(refcount_metadata(16640, 512, 4, false), (66, 2));
        assert_eq!(refcount_metadata(16640, 512, 4, true), (66, 2));
    }
}
