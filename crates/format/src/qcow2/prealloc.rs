//! Preallocation of a range of the disk (`preallocation=` at create, and
//! `resize --preallocation=`), laid out as QEMU lays it out, so that both tools
//! leave files of the same length and disk usage.
//!
//! - `metadata`: each L2 table is allocated before the data clusters it maps,
//!   runs of data clusters follow it; the parts of a partial first or last
//!   cluster outside the range are written (what the guest reads there), as
//!   QEMU's copy-on-write writes them, and the file is extended over the last
//!   run.
//! - `falloc` / `full` (data in the image file): a new refcount table, with the
//!   refcount blocks the new clusters need, goes right after the last used
//!   cluster; the data clusters follow it as one run, given disk space
//!   (`fallocate`) or written with zeroes; L2 tables are allocated afterwards
//!   wherever the allocator finds room (the old refcount table's clusters first).
//!
//! Ordering: refcounts are raised (and flushed) before any L2 entry names the
//! clusters, the data (zeroes, copy-on-write) is written before its L2 entry,
//! and L2 tables before L1 entries ([`Meta::flush_metadata`]).

use super::create::Preallocation;
use super::entries::{ALL_ALLOCATED, OFLAG_COPIED};
use super::image::Qcow2Image;
use super::meta::Meta;
use crate::units::{index, ClusterIndex, HostOffset};
use crate::{check_range, BlockDevice, Result};
use std::sync::Arc;
use strata_storage::Storage;

/// Write zeroes over `[from, to)` of `storage`.
fn write_zeroes_through(storage: &dyn Storage, from: u64, to: u64) -> Result<()> {
    let zeros = vec![0u8; index((1 << 20).min(to.saturating_sub(from)))];
    let mut off = from;
    while off < to {
        let k = index((to - off).min(zeros.len() as u64));
        storage.write_at(&zeros[..k], off)?;
        off += k as u64;
    }
    Ok(())
}

/// Point the L2 entries of the `n` guest clusters from `gc` (all inside the
/// cached L2 table `l2`) at the host clusters from `host` on, in order.
fn map_run(m: &mut Meta, l2: HostOffset, gc: u64, n: u64, host: u64, bitmap: u64) -> Result<()> {
    let (cs, l2n) = (m.cluster_size(), m.l2_entries());
    for i in 0..n {
        m.set_raw_entry(l2, (gc + i) % l2n, (host + i * cs) | OFLAG_COPIED, bitmap)?;
    }
    Ok(())
}

impl Qcow2Image {
    /// Allocate every cluster of the disk (`preallocation=metadata` and up); with
    /// `falloc` the data clusters get disk space, with `full` they are written with zeroes.
    pub(crate) fn preallocate(&self, mode: Preallocation) -> Result<()> {
        self.preallocate_range(mode, 0, self.virtual_size())
    }

    /// Preallocate the clusters that hold guest bytes `[from, to)` (after a
    /// resize grew the disk from `from`, for example). Clusters already
    /// allocated are kept, except that `falloc` and `full` give a partial first
    /// cluster a new home too (its bytes are copied), as QEMU does. An empty
    /// range with `falloc` or `full` (data in the image file) still gets a new
    /// refcount table past the file's end, as QEMU's creation of an empty
    /// image has.
    pub fn preallocate_range(&self, mode: Preallocation, from: u64, to: u64) -> Result<()> {
        self.check_writable()?;
        // An empty range still moves the refcount table with `falloc` and
        // `full` (a new one, sized for one more L2 table, goes past the end), as
        // QEMU's creation of an empty image does.
        let in_place = mode == Preallocation::Metadata || self.data.is_external();
        if mode == Preallocation::Off || from > to || (from == to && in_place) {
            return Ok(());
        }
        check_range(from, to - from, self.virtual_size()).map_err(|e| self.err(e))?;
        let _excl = self.exclusive();
        let mut m = self.lock()?;
        if in_place {
            self.preallocate_in_place(&mut m, mode, from, to)?;
        } else {
            self.preallocate_after_end(&mut m, mode, from, to)?;
        }
        m.flush_metadata()
    }

    /// Grow the disk to `new_size` (which must be larger) and preallocate the
    /// grown range with `mode`, in QEMU's order: the size, then the clusters,
    /// then, where a longer backing file would show through the grown range,
    /// its zeroing.
    ///
    /// `falloc` and `full` with data in the image file map the grown range to
    /// new clusters past the file's end, which read as zeroes: nothing is left to
    /// zero (so a version 2 image grows over its backing file too), and a
    /// partial first cluster takes what the guest read before (its backing
    /// bytes included). `off` and `metadata` (and any mode with an external data
    /// file) zero the range with zero clusters, keeping the clusters allocated
    /// for it; a version 2 image is refused before it changes.
    ///
    /// Safety: as [`BlockDevice::resize`], the new size is recorded (and
    /// flushed) before the clusters are; each step orders its own writes.
    pub fn grow_preallocated(&self, new_size: u64, mode: Preallocation) -> Result<()> {
        let old_size = self.virtual_size();
        let fresh =
            matches!(mode, Preallocation::Falloc | Preallocation::Full) && !self.data.is_external();
        let hide_backing = self.grows_under_backing(new_size) && !fresh;
        if hide_backing {
            self.check_zeroable()?;
        }
        self.resize_metadata(new_size, false)?;
        crate::error::request(crate::error::Operation::Resize, None, || {
            self.resize_data_file(old_size, new_size)
        })?;
        self.preallocate_range(mode, old_size, new_size)?;
        if hide_backing {
            self.zero_grown(old_size, new_size)?;
        }
        self.end_bitmap_resize()
    }

    /// Allocate the unallocated clusters of `[from, to)`, L2 table first, runs
    /// of data after it (the `metadata` layout; with a data file, every mode).
    fn preallocate_in_place(
        &self,
        m: &mut Meta,
        mode: Preallocation,
        from: u64,
        to: u64,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let l2n = m.l2_entries();
        let end = to.div_ceil(cs);
        let mut gc = from / cs;
        let storage = self.data_storage()?.clone();
        while gc < end {
            let table_end = (gc / l2n + 1) * l2n;
            let l2 = m.l2_for_write(gc / l2n)?;
            // The run of unallocated clusters starting at gc, inside this L2 table.
            let mut n = 0;
            while gc + n < end.min(table_end) && m.raw_entry(l2, (gc + n) % l2n)?.0 == 0 {
                n += 1;
            }
            if n == 0 {
                gc += 1;
                continue;
            }
            let host = self.alloc_data(m, gc, n)?.get();
            // With subclusters, as in QEMU, the clusters are only reserved: their
            // subclusters stay unallocated (nothing is copied in), and the data
            // reaches the end of the subcluster holding the range's last byte.
            let extended = self.geo.extended_l2;
            let bytes = if extended {
                let sc = self.geo.subcluster_size();
                (((gc + n) * cs).min(to) - gc * cs).next_multiple_of(sc)
            } else {
                n * cs
            };
            match mode {
                Preallocation::Off => {}
                // Subclustered clusters are written only where QEMU copies on
                // write: the subclusters the range starts and ends inside.
                _ if extended => {
                    let sc = self.geo.subcluster_size();
                    self.copy_on_write(m, &storage, gc * cs, host, from, to, bytes, sc)?;
                    if host + bytes > storage.size()? {
                        storage.set_size(host + bytes)?;
                    }
                }
                Preallocation::Metadata => {
                    self.copy_on_write(m, &storage, gc * cs, host, from, to, bytes, cs)?;
                    if host + bytes > storage.size()? {
                        storage.set_size(host + bytes)?;
                    }
                }
                Preallocation::Falloc => storage.preallocate(host, bytes)?,
                Preallocation::Full => write_zeroes_through(storage.as_ref(), host, host + bytes)?,
            }
            let bitmap = if extended { 0 } else { ALL_ALLOCATED };
            map_run(m, l2, gc, n, host, bitmap)?;
            gc += n;
        }
        Ok(())
    }

    /// Write what the guest reads in the parts of the run at guest `g0` (host
    /// `host`, `bytes` long) that lie outside `[from, to)`: its head before
    /// `from` from the start of the `grain` (cluster or subcluster) holding
    /// `from`, and its tail from `to` to the run's end.
    #[allow(clippy::too_many_arguments)]
    fn copy_on_write(
        &self,
        m: &mut Meta,
        storage: &Arc<dyn Storage>,
        g0: u64,
        host: u64,
        from: u64,
        to: u64,
        bytes: u64,
        grain: u64,
    ) -> Result<()> {
        let head = from.saturating_sub(g0).min(bytes);
        let head_at = head / grain * grain;
        let tail_at = to.saturating_sub(g0).min(bytes);
        for (start, len) in [(head_at, head - head_at), (tail_at, bytes - tail_at)] {
            if len == 0 {
                continue;
            }
            let mut buf = vec![0u8; index(len)];
            self.read_locked(m, &mut buf, g0 + start)?;
            storage.write_at(&buf, host + start)?;
        }
        Ok(())
    }

    /// The `falloc` / `full` layout for data in the image file (see the module
    /// documentation).
    fn preallocate_after_end(
        &self,
        m: &mut Meta,
        mode: Preallocation,
        from: u64,
        to: u64,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let l2n = m.l2_entries();
        let file_clusters = self.storage.size()?.div_ceil(cs);
        let mut used = file_clusters;
        while used > 0 && m.refcount(ClusterIndex(used - 1))? == 0 {
            used -= 1;
        }
        let first = from / cs;
        let count = to.div_ceil(cs) - first;
        let tables = count.div_ceil(l2n) + 1;
        let at = m.refcount_area(used, count + tables, true, None)?;
        for c in at..at + count {
            m.set_refcount_in_block(ClusterIndex(c), 1)?;
        }
        m.write_refblocks()?;
        m.barrier()?;
        let (start, end) = (self.storage.size()?, (at + count) * cs);
        if end > start {
            match mode {
                // The file grows first, then its zeroes are written: a storage
                // that cannot grow refuses the resize (as QEMU's does), not
                // a write past its end.
                Preallocation::Full => {
                    self.storage.set_size(end)?;
                    write_zeroes_through(self.storage.as_ref(), start, end)?
                }
                _ => self.storage.preallocate(start, end - start)?,
            }
        }
        let mut gc = first;
        let mut host = at * cs;
        while gc < first + count {
            let n = (first + count - gc).min(l2n - gc % l2n);
            let l2 = m.l2_for_write(gc / l2n)?;
            if gc * cs < from {
                // The partial first cluster moves: its bytes before `from` come along.
                self.copy_on_write(m, &self.storage, gc * cs, host, from, u64::MAX, cs, cs)?;
                let old = m.entry(gc)?;
                m.release_entry(old);
            }
            map_run(m, l2, gc, n, host, ALL_ALLOCATED)?;
            gc += n;
            host += n * cs;
        }
        Ok(())
    }
}
