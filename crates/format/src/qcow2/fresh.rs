//! Fresh refcount structures: written in a new area past everything the image
//! references, so that one header write can switch to them (check's rebuild, and
//! snapshot create/delete, which switch their whole metadata at once).

use super::cache::TableCache;
use super::check::reserved_beyond;
use super::header::MAX_HOST_OFFSET;
use super::meta::{Meta, REFBLOCK_CACHE_BYTES};
use super::refcount::rb_set;
use crate::units::{index, ClusterIndex};
use crate::{Error, Result};

/// Refcount structures written but not yet named by the header.
pub(crate) struct FreshRefcounts {
    pub table_offset: u64,
    pub table_clusters: u32,
    pub table: Vec<u64>,
}

impl Meta {
    /// Clusters of refcount blocks and table that describe `covered` clusters
    /// when placed inside them.
    pub(crate) fn fresh_refcount_clusters(&self, covered: u64) -> u64 {
        let blocks = covered.div_ceil(self.rb_entries());
        blocks + blocks.div_ceil(self.cluster_size() / 8).max(1)
    }

    /// Write refcount blocks and a refcount table describing `refs` (references
    /// per cluster, those of any refcount structure excepted) plus the new
    /// structures themselves. They go at cluster `inside` when given, if they fit
    /// there below the end of the file and `refs` names none of those clusters
    /// (the caller holds them free in the old structures too); else past the end
    /// of the file and past every cluster `refs` or `beyond` (ranges named past
    /// the end) reach. Nothing is flushed and nothing in use is overwritten: until
    /// the header names the table, the clusters written are unreferenced.
    pub(crate) fn write_fresh_refcounts(
        &mut self,
        mut refs: Vec<u64>,
        beyond: &[(u64, u64, u32)],
        inside: Option<ClusterIndex>,
    ) -> Result<FreshRefcounts> {
        let cs = self.cluster_size();
        let epb = self.rb_entries();
        let per_cluster = cs / 8;
        let file_clusters = self.storage.size()?.div_ceil(cs);
        let n = (refs.len() as u64).max(file_clusters);
        for (c, want) in reserved_beyond(beyond, n, epb) {
            let c = index(c);
            if c >= refs.len() {
                refs.resize(c + 1, 0);
            }
            refs[c] = refs[c].max(want);
        }
        let end = refs
            .iter()
            .rposition(|&r| r > 0)
            .map_or(1, |i| i as u64 + 1);
        let mut start = end.max(file_clusters);
        let (mut blocks, mut table) = (0u64, 0u64);
        let mut placed = false;
        if let Some(ClusterIndex(at)) = inside {
            let covered = (refs.len() as u64).max(file_clusters);
            let len = self.fresh_refcount_clusters(covered);
            let unnamed =
                (at..at.saturating_add(len)).all(|c| refs.get(index(c)).is_none_or(|&r| r == 0));
            if beyond.is_empty() && at.saturating_add(len) <= covered && unnamed {
                start = at;
                blocks = covered.div_ceil(epb);
                table = len - blocks;
                placed = true;
            }
        }
        // Fixed point: blocks and table clusters placed at `start` must count
        // themselves; move past any cluster an entry names.
        if !placed {
            loop {
                let total = start + blocks + table;
                let b2 = total.div_ceil(epb);
                let t2 = b2.div_ceil(per_cluster).max(1);
                if b2 != blocks || t2 != table {
                    blocks = b2;
                    table = t2;
                    continue;
                }
                let last = start + blocks + table - 1;
                match beyond
                    .iter()
                    .filter(|&&(a, b, _)| a <= last && b >= start)
                    .map(|&(_, b, _)| b)
                    .max()
                {
                    Some(b) => start = b + 1,
                    None => break,
                }
            }
        }
        let table_clusters =
            u32::try_from(table).map_err(|_| Error::corrupt("refcount table too large"))?;
        if (start + blocks + table) * cs > MAX_HOST_OFFSET {
            return Err(Error::corrupt(
                "no room for new refcount structures below the 2^56 limit",
            ));
        }
        // Below 2^56 / cluster size, checked above.
        let stop = index(start + blocks + table);
        if refs.len() < stop {
            refs.resize(stop, 0);
        }
        refs[index(start)..stop].fill(1);
        let order = self.h.refcount_order;
        let max = self.max_refcount();
        let mut reftable = vec![0u64; index(table * per_cluster)];
        for b in 0..blocks {
            let mut block = vec![0u8; index(cs)];
            for i in 0..epb {
                let c = b * epb + i;
                if let Some(&v) = refs.get(index(c)) {
                    rb_set(&mut block, order, index(i), v.min(max));
                }
            }
            let off = (start + b) * cs;
            self.storage.write_at(&block, off)?;
            reftable[index(b)] = off;
        }
        let table_offset = (start + blocks) * cs;
        let mut bytes = Vec::with_capacity(index(table * cs));
        for e in &reftable {
            bytes.extend_from_slice(&e.to_be_bytes());
        }
        self.storage.write_at(&bytes, table_offset)?;
        Ok(FreshRefcounts {
            table_offset,
            table_clusters,
            table: reftable,
        })
    }

    /// Use `fresh` once the header names it: the cached refcount blocks belong to
    /// the old structures, and every cluster below the old end may now be free.
    pub(crate) fn adopt_refcounts(&mut self, fresh: FreshRefcounts) {
        let cs = self.cluster_size();
        self.h.refcount_table_offset = fresh.table_offset;
        self.h.refcount_table_clusters = fresh.table_clusters;
        self.reftable = fresh.table;
        self.rb = TableCache::new(index((REFBLOCK_CACHE_BYTES / cs).max(8)));
        self.free_hint = 1;
    }
}
