//! Check's rebuild of the refcount structures, laid out where qemu-img lays them.
//!
//! The rebuild starts from the counted references of every cluster, the old
//! refcount table and blocks included (they stay in use until the header names
//! the new ones). Each refcount block goes into the first cluster free of any
//! reference at or after the first cluster it describes (past the end of the
//! file when none is free); the refcount table goes into the first run of free
//! clusters long enough for it, and the blocks describing the table's clusters
//! are written again (more of them, and a longer table, when it lands past what
//! the blocks cover). The old structures then show up as leaks, which the check
//! frees. Nothing in use is written over: until the header names the new table,
//! every cluster written is referenced by nothing.

use super::super::fresh::FreshRefcounts;
use super::super::header::MAX_HOST_OFFSET;
use super::super::meta::Meta;
use super::super::refcount::rb_set;
use crate::units::index;
use crate::{Error, Result};

/// The in-memory refcounts a rebuild describes and allocates from.
struct Layout {
    refs: Vec<u64>,
    /// Refcount table entries written so far (host offsets, 0 for none).
    table: Vec<u64>,
    cs: u64,
    epb: u64,
}

impl Layout {
    /// The first run of `count` clusters with no reference, searched from
    /// `*first_free` (which moves to the first free cluster seen); the run may
    /// reach past the clusters known so far. The run is marked used.
    fn alloc(&mut self, count: u64, first_free: &mut u64) -> Result<u64> {
        let mut c = *first_free;
        let mut run = 0u64;
        let mut first_gap = true;
        while c < self.refs.len() as u64 && run < count {
            if self.refs[index(c)] == 0 {
                run += 1;
                if first_gap {
                    *first_free = c;
                    first_gap = false;
                }
            } else {
                run = 0;
            }
            c += 1;
        }
        let start = c - run;
        let end = start
            .checked_add(count)
            .filter(|&e| e.checked_mul(self.cs).is_some_and(|b| b <= MAX_HOST_OFFSET))
            .ok_or_else(|| {
                Error::corrupt("no room for new refcount structures below the 2^56 limit")
            })?;
        if end > self.refs.len() as u64 {
            self.refs.resize(index(end), 0);
        }
        self.refs[index(start)..index(end)].fill(1);
        Ok(start)
    }
}

impl Meta {
    /// Write refcount blocks for every cluster in `first..end` that has a
    /// reference, allocating the blocks not yet in `l.table`. Returns whether the
    /// table had to grow.
    fn write_rebuilt_blocks(&mut self, l: &mut Layout, first: u64, end: u64) -> Result<bool> {
        let order = self.h.refcount_order;
        let max = self.max_refcount();
        let mut first_free = 0u64;
        let mut end = end;
        let mut grown = false;
        let mut c = first;
        while c < end {
            if l.refs.get(index(c)).is_none_or(|&r| r == 0) {
                c += 1;
                continue;
            }
            let bi = c / l.epb;
            let start = bi * l.epb;
            let off = match l.table.get(index(bi)) {
                Some(&o) if o != 0 => o,
                _ => {
                    first_free = first_free.max(start);
                    let rc = l.alloc(1, &mut first_free)?;
                    end = end.max(rc + 1);
                    if l.table.len() as u64 <= bi {
                        let per_cluster = l.cs / 8;
                        l.table
                            .resize(index((bi + 1).next_multiple_of(per_cluster)), 0);
                        grown = true;
                    }
                    l.table[index(bi)] = rc * l.cs;
                    rc * l.cs
                }
            };
            let mut block = vec![0u8; index(l.cs)];
            for i in 0..l.epb {
                if let Some(&v) = l.refs.get(index(start + i)) {
                    rb_set(&mut block, order, index(i), v.min(max));
                }
            }
            self.storage.write_at(&block, off)?;
            c = start + l.epb;
        }
        Ok(grown)
    }

    /// Write refcount structures for `refs` (the references of every cluster,
    /// the old refcount structures' included) laid out as qemu-img's rebuild lays
    /// them, and return them for the header to name. Nothing is flushed.
    pub(crate) fn write_rebuilt_refcounts(&mut self, refs: Vec<u64>) -> Result<FreshRefcounts> {
        let cs = self.cluster_size();
        let mut l = Layout {
            refs,
            table: Vec::new(),
            cs,
            epb: self.rb_entries(),
        };
        let n = l.refs.len() as u64;
        self.write_rebuilt_blocks(&mut l, 0, n)?;
        if l.table.is_empty() {
            return Err(Error::corrupt("nothing to describe in a refcount rebuild"));
        }
        let (table_offset, table_clusters) = loop {
            let clusters = (l.table.len() as u64 * 8).div_ceil(cs);
            let mut first_free = 0u64;
            let at = l.alloc(clusters, &mut first_free)?;
            if !self.write_rebuilt_blocks(&mut l, at, at + clusters)? {
                break (at * cs, clusters);
            }
        };
        let table_clusters = u32::try_from(table_clusters)
            .map_err(|_| Error::corrupt("refcount table too large"))?;
        let bytes: Vec<u8> = l.table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.storage.write_at(&bytes, table_offset)?;
        Ok(FreshRefcounts {
            table_offset,
            table_clusters,
            table: l.table,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Layout;

    fn layout(refs: &[u64]) -> Layout {
        Layout {
            refs: refs.to_vec(),
            table: Vec::new(),
            cs: 512,
            epb: 256,
        }
    }

    #[test]
    fn alloc_takes_the_first_run_long_enough_and_marks_it() {
        let mut l = layout(&[1, 0, 1, 0, 0, 1]);
        let mut ff = 0;
        assert_eq!(l.alloc(2, &mut ff).unwrap(), 3);
        assert_eq!(ff, 1, "the first free cluster seen");
        assert_eq!(l.refs, vec![1, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn alloc_reaches_past_the_known_clusters_continuing_a_trailing_run() {
        let mut l = layout(&[1, 1, 0]);
        let mut ff = 0;
        assert_eq!(l.alloc(3, &mut ff).unwrap(), 2);
        assert_eq!(l.refs, vec![1, 1, 1, 1, 1]);
    }
}
