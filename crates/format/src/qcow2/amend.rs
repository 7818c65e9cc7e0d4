//! Changing an image's format options in place (`qemu-img amend`): the version
//! (2 for compat 0.10, 3 for compat 1.1), lazy refcounts, and the refcount width.
//!
//! Every step keeps the image valid at each durable state:
//! - an upgrade writes the v3 header in one write of the header area (the part
//!   past the first sector first, while the old header does not reach it);
//! - a new refcount width gets fresh refcount structures written off to the side,
//!   then one write of the header's first sector names them and the new width;
//! - a downgrade first turns every zero cluster into one version 2 can express
//!   (zeroes written and counted before the L2 entry changes), then writes the
//!   v2 header.
//!
//! The image is consumed: its cached geometry describes the old version.

use super::entries::{L2Entry, OFLAG_COPIED, OFLAG_ZERO};
use super::header::{self, Header};
use super::image::read_table;
use super::image::Qcow2Image;
use super::meta::Meta;
use crate::units::{index, ClusterCount, ClusterIndex};
use crate::{Error, Result};

/// What to change; `None` keeps the current setting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// 2 (compat 0.10) or 3 (compat 1.1).
    pub version: Option<u32>,
    pub lazy_refcounts: Option<bool>,
    /// 1, 2, 4, 8, 16, 32 or 64.
    pub refcount_bits: Option<u64>,
}

/// The steps of an amend that report progress, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmendStep {
    Upgrade,
    RefcountWidth,
    Downgrade,
}

impl AmendOptions {
    /// The steps that will report progress on an image now at `version` with
    /// refcount order `order`.
    pub fn steps(&self, version: u32, order: u32) -> Vec<AmendStep> {
        let new = self.version.unwrap_or(version);
        let mut steps = Vec::new();
        if new > version {
            steps.push(AmendStep::Upgrade);
        }
        if self.refcount_bits.is_some_and(|b| b != 1 << order) {
            steps.push(AmendStep::RefcountWidth);
        }
        if new < version {
            steps.push(AmendStep::Downgrade);
        }
        steps
    }
}

/// Refuse what QEMU refuses before anything changes: a refcount width that
/// is not one, or that the resulting version cannot have.
fn vet(h: &Header, o: &AmendOptions) -> Result<()> {
    let version = o.version.unwrap_or(h.version);
    if let Some(bits) = o.refcount_bits {
        if bits == 0 || bits > 64 || !bits.is_power_of_two() {
            return Err(Error::invalid_argument(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if version < 3 && bits != 16 && bits != 1 << h.refcount_order {
            return Err(Error::invalid_argument(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            ));
        }
    }
    Ok(())
}

/// Refuse lazy refcounts on an image that stays at version 2. Asking for the
/// lazy refcounts an image already has changes nothing, so a downgrade in the
/// same amend goes ahead (and drops them), as in QEMU.
fn vet_lazy(h: &Header, o: &AmendOptions) -> Result<()> {
    let version = o.version.unwrap_or(h.version);
    if o.lazy_refcounts == Some(true) && version < 3 && !h.lazy_refcounts() {
        return Err(Error::invalid_argument(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
        ));
    }
    Ok(())
}

/// Refuse a downgrade to `version` of what version 2 cannot hold, judged on
/// the image as the earlier steps left it.
fn vet_downgrade(h: &Header, version: u32) -> Result<()> {
    if version >= h.version {
        return Ok(());
    }
    if h.refcount_order != 4 {
        return Err(Error::invalid_argument(
            "compat=0.10 requires refcount_bits=16",
        ));
    }
    if super::data_file::has_data_file(h) {
        return Err(Error::invalid_argument(
            "Cannot downgrade an image with a data file",
        ));
    }
    let left = h.incompatible_features & !(header::incompat::DIRTY | header::incompat::COMPRESSION);
    if left != 0 {
        return Err(Error::invalid_argument(format!(
            "Cannot downgrade an image with incompatible features 0x{left:x} set"
        )));
    }
    Ok(())
}

/// Where [`Qcow2Image::amend_with`] hands the image to its caller between its
/// own steps, in QEMU's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmendPoint {
    /// After the upgrade and the refcount width change, before lazy refcounts
    /// (QEMU changes the data file and judges the backing file here).
    AfterRefcounts,
    /// After lazy refcounts, before the downgrade (QEMU resizes here).
    BeforeDowngrade,
}

/// What [`Qcow2Image::amend_with`]'s caller does between the steps.
pub type AmendHook<'a, E> = dyn FnMut(AmendPoint, &Qcow2Image) -> std::result::Result<(), E> + 'a;

impl Qcow2Image {
    /// Apply `o` (see the module), reporting each step's progress as
    /// `progress(step, done, total)`, then close the image.
    pub fn amend(
        self,
        o: &AmendOptions,
        progress: &mut dyn FnMut(AmendStep, u64, u64),
    ) -> Result<()> {
        self.amend_with(o, progress, &mut |_, _| Ok(()))
    }

    /// [`Self::amend`] in QEMU's order, calling `between` at each
    /// [`AmendPoint`] (with no lock held) for the changes the caller makes
    /// itself: the upgrade, the refcount width, `between(AfterRefcounts)`,
    /// lazy refcounts, `between(BeforeDowngrade)`, the downgrade. A step that
    /// fails leaves the earlier ones done, as in QEMU.
    pub fn amend_with<E: From<Error>>(
        mut self,
        o: &AmendOptions,
        progress: &mut dyn FnMut(AmendStep, u64, u64),
        between: &mut AmendHook<'_, E>,
    ) -> std::result::Result<(), E> {
        self.check_writable()?;
        self.amend_step(|m| self.amend_upgrade(m, o, progress))?;
        // The caller's steps (a resize) work at the version the image now has.
        let version = self.lock()?.h.version;
        self.geo.version = version;
        between(AmendPoint::AfterRefcounts, &self)?;
        self.amend_step(|m| self.amend_lazy(m, o))?;
        between(AmendPoint::BeforeDowngrade, &self)?;
        self.amend_step(|m| self.amend_downgrade(m, o, progress))?;
        Ok(self.close()?)
    }

    /// Run one step of an amend with the image locked.
    fn amend_step(&self, f: impl FnOnce(&mut Meta) -> Result<()>) -> Result<()> {
        let r = {
            let _excl = self.exclusive();
            let mut m = self.lock()?;
            f(&mut m)
        };
        r.map_err(|e| self.err(e))
    }

    /// The upgrade and the refcount width change.
    fn amend_upgrade(
        &self,
        m: &mut Meta,
        o: &AmendOptions,
        progress: &mut dyn FnMut(AmendStep, u64, u64),
    ) -> Result<()> {
        vet(&m.h, o)?;
        let version = o.version.unwrap_or(m.h.version);
        // Every step starts from flushed metadata. With nothing of this session
        // waiting in the caches, no flush is needed for that: each step flushes
        // what it writes before the write that makes it live (the lazy-refcounts
        // toggle is one header field flushed after it is written; the version
        // and refcount-width changes write their new structures, flush, then
        // switch the header), so a flush here would only sync a file nothing of
        // this session changed (QEMU does none either).
        if !m.metadata_clean() {
            m.flush_metadata()?;
        }
        if version > m.h.version {
            progress(AmendStep::Upgrade, 0, 2);
            upgrade(m)?;
            progress(AmendStep::Upgrade, 1, 2);
            progress(AmendStep::Upgrade, 2, 2);
        }
        if let Some(bits) = o.refcount_bits {
            let order = bits.trailing_zeros();
            if order != m.h.refcount_order {
                change_refcount_order(m, order, &mut |d, t| {
                    progress(AmendStep::RefcountWidth, d, t)
                })?;
            }
        }
        Ok(())
    }

    /// Lazy refcounts on or off.
    fn amend_lazy(&self, m: &mut Meta, o: &AmendOptions) -> Result<()> {
        vet_lazy(&m.h, o)?;
        if let Some(lazy) = o.lazy_refcounts {
            if lazy != m.h.lazy_refcounts() {
                if !m.metadata_clean() {
                    m.flush_metadata()?;
                }
                m.clear_dirty()?;
                m.h.compatible_features ^= header::compat::LAZY_REFCOUNTS;
                m.storage
                    .write_at(&m.h.compatible_features.to_be_bytes(), 80)?;
                m.storage.flush()?;
            }
        }
        Ok(())
    }

    /// The downgrade, last (what version 2 cannot hold is refused first).
    fn amend_downgrade(
        &self,
        m: &mut Meta,
        o: &AmendOptions,
        progress: &mut dyn FnMut(AmendStep, u64, u64),
    ) -> Result<()> {
        let version = o.version.unwrap_or(m.h.version);
        vet_downgrade(&m.h, version)?;
        if version >= m.h.version {
            return Ok(());
        }
        if !m.metadata_clean() {
            m.flush_metadata()?;
        }
        if m.h.compression_type != super::CompressionType::Zlib && has_compressed_clusters(m)? {
            return Err(Error::invalid_argument(
                "Cannot downgrade an image with zstd compression type and existing compressed clusters",
            ));
        }
        expand_zero_clusters(m, &mut |d, t| progress(AmendStep::Downgrade, d, t))?;
        downgrade(m)
    }
}

/// Write `new` over the header area, which now holds `old`: the part past the
/// first sector first when `old` does not reach it, so that the first sector's
/// write switches from one whole header to the other. The part past the first
/// sector is flushed before the first sector is written only when `new` uses
/// it: where neither header reaches past the first sector, that part holds
/// nothing either names (it is only zeroed, as QEMU leaves it), and one flush
/// after both writes suffices.
pub(crate) fn write_header(m: &mut Meta, mut new: Header) -> Result<()> {
    let cs = index(m.cluster_size());
    let old_len = m.h.clone().serialize()?.len();
    // The whole first cluster, as QEMU writes it (a longer header the file held
    // leaves nothing behind).
    let mut bytes = new.serialize()?;
    let new_len = bytes.len();
    bytes.resize(cs, 0);
    if old_len <= 512 && bytes.len() > 512 {
        m.storage.write_at(&bytes[512..], 512)?;
        if new_len > 512 {
            m.storage.flush()?;
        }
        m.storage.write_at(&bytes[..512], 0)?;
    } else {
        m.storage.write_at(&bytes, 0)?;
    }
    m.storage.flush()?;
    m.h = new;
    Ok(())
}

/// `h` at `version`, with no feature bits (a version change starts them afresh).
fn at_version(h: &Header, version: u32) -> Header {
    Header {
        version,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        ..h.clone()
    }
}

/// Version 2 to 3. A snapshot table whose entries lack the extra data v3 requires
/// is rewritten to new clusters, named by the same header write.
fn upgrade(m: &mut Meta) -> Result<()> {
    let cs = m.cluster_size();
    let mut h = at_version(&m.h, 3);
    h.header_length = header::V3_HEADER_LEN_COMPRESSION;
    h.refcount_order = 4;
    h.feature_names = Header::default_feature_names();
    let old_table = (
        m.h.snapshots_offset,
        super::snapshot::table_size(&m.snapshots),
    );
    let rewrite = m.snapshots.iter().any(|s| s.extra.len() < 16);
    if rewrite {
        let size = m.h.size;
        super::snapshot::complete_disk_sizes(&mut m.snapshots, size);
        let bytes = super::snapshot::serialize_table(&m.snapshots)?;
        let off = m
            .alloc_clusters(ClusterCount((bytes.len() as u64).div_ceil(cs)))?
            .get();
        m.write_dirty_refblocks()?;
        m.storage.write_at(&bytes, off)?;
        m.storage.flush()?;
        h.snapshots_offset = off;
    }
    write_header(m, h)?;
    m.geo.version = 3;
    if rewrite {
        for s in &mut m.snapshots {
            s.extra = s.encode_extra();
        }
        let (off, len) = old_table;
        let freed: Vec<ClusterIndex> = (off / cs..(off + len).div_ceil(cs))
            .map(ClusterIndex)
            .collect();
        for &c in &freed {
            m.update_refcount(c, -1)?;
        }
        m.flush_metadata()?;
        // The old table's clusters go back to the file system once their
        // refcounts are durable at zero, as QEMU discards a snapshot table.
        let mut unused = Vec::new();
        for c in freed {
            if m.refcount(c)? == 0 {
                unused.push(c);
            }
        }
        m.discard_freed(&unused)?;
    }
    Ok(())
}

/// Version 3 to 2, once no zero cluster is left (see [`expand_zero_clusters`]).
fn downgrade(m: &mut Meta) -> Result<()> {
    let mut h = at_version(&m.h, 2);
    h.header_length = header::V2_HEADER_LEN;
    h.compression_type = super::CompressionType::Zlib;
    h.feature_names.clear();
    // The persistent bitmaps loaded when the image was opened are stored again
    // when it closes, as QEMU stores them, into the version 2 file too (whose
    // header has no autoclear field, so the bit stays in memory only).
    if m.bitmaps.is_some() {
        h.autoclear_features = m.h.autoclear_features & header::autoclear::BITMAPS;
    }
    write_header(m, h)?;
    m.geo.version = 2;
    Ok(())
}

/// The L1 tables of the active image and of every snapshot.
fn all_l1_tables(m: &Meta) -> Result<Vec<Vec<u64>>> {
    let mut l1s = vec![m.l1.clone()];
    for s in &m.snapshots {
        // Only read: a table past the end of the file reads as zeros.
        s.usable_l1(m.cluster_size(), u64::MAX)?;
        l1s.push(read_table(
            &*m.storage,
            s.l1_table_offset,
            u64::from(s.l1_size),
        )?);
    }
    Ok(l1s)
}

/// Whether any L2 table (active or a snapshot's) names a compressed cluster.
fn has_compressed_clusters(m: &mut Meta) -> Result<bool> {
    let cs = m.cluster_size();
    for l1 in all_l1_tables(m)? {
        for (i, &e) in l1.iter().enumerate() {
            let (l2off, _) = super::entries::decode_l1(e, cs, i as u64)?;
            if l2off.is_none() {
                continue;
            }
            for j in 0..m.l2_entries() {
                let (raw, bitmap) = m.raw_entry(l2off, j)?;
                if let L2Entry::Compressed { .. } = m.geo.decode_l2(raw, bitmap)? {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// Make every zero entry of every L2 table (active and snapshots') one version 2
/// can express: without a backing file a zero cluster with no host cluster reads
/// as zeroes unallocated; else it gets a cluster of zeroes (counted as many times
/// as its L2 table is shared); an allocated zero cluster gets its zeroes written
/// and keeps its host cluster. The zeroes and refcounts are durable before the
/// L2 table changes. `done(n)` reports the L1 tables finished.
fn expand_zero_clusters(m: &mut Meta, done: &mut dyn FnMut(u64, u64)) -> Result<()> {
    let cs = m.cluster_size();
    let l1s = all_l1_tables(m)?;
    let backed = m.h.backing_file.is_some();
    let zeroes = vec![0u8; index(cs)];
    // Progress counts L1 entries, of every table, as QEMU's does.
    let total: u64 = l1s.iter().map(|l1| l1.len() as u64).sum();
    let mut visited = 0;
    for l1 in &l1s {
        for (i, &e) in l1.iter().enumerate() {
            visited += 1;
            let (l2off, _) = super::entries::decode_l1(e, cs, i as u64)?;
            if l2off.is_none() {
                done(visited, total);
                continue;
            }
            let l2_refs = m.refcount(l2off.cluster(m.geo.cluster_bits))?;
            let mut changes = Vec::new();
            for j in 0..m.l2_entries() {
                let (raw, bitmap) = m.raw_entry(l2off, j)?;
                let L2Entry::Normal {
                    host, zero: true, ..
                } = m.geo.decode_l2(raw, bitmap)?
                else {
                    continue;
                };
                let new = if !host.is_none() {
                    m.storage.write_at(&zeroes, host.get())?;
                    raw & !OFLAG_ZERO
                } else if !backed {
                    0
                } else {
                    let c = m.alloc_clusters(ClusterCount(1))?;
                    if l2_refs > 1 {
                        m.update_refcount(c.cluster(m.geo.cluster_bits), l2_refs as i64 - 1)?;
                    }
                    m.write_dirty_refblocks()?;
                    m.storage.write_at(&zeroes, c.get())?;
                    if l2_refs == 1 {
                        c.get() | OFLAG_COPIED
                    } else {
                        c.get()
                    }
                };
                changes.push((j, new));
            }
            if !changes.is_empty() {
                m.storage.flush()?;
                for (j, new) in changes {
                    m.set_raw_entry(l2off, j, new, 0)?;
                }
                m.flush_metadata()?;
            }
            done(visited, total);
        }
    }
    Ok(())
}

/// Rewrite the refcount structures at width `2^order`: the current refcounts
/// (those of the old structures excepted, which become free) go into fresh
/// structures at the first free run, and one write of the first header sector
/// names them with the new width. Where [`qemu_placement`] can replay QEMU's
/// allocations, the new structures go where qemu-img puts them instead.
/// `progress(done, total)` runs three passes over the old refcount table:
/// reading, checking, writing (more when QEMU's walks are more).
fn change_refcount_order(
    m: &mut Meta,
    order: u32,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let cs = m.cluster_size();
    let entries = m.reftable.len() as u64;
    let total = 3 * entries;
    let epb = m.rb_entries();
    let file_clusters = m.storage.size()?.div_ceil(cs);
    let mut refs: Vec<u64> = Vec::new();
    let mut old_structures = Vec::new();
    progress(0, total);
    for i in 0..entries {
        let block = m.refblock_offset(i)?;
        if !block.is_none() {
            old_structures.push(block.get() / cs);
            let first = i * epb;
            for c in first..((i + 1) * epb).min(file_clusters.max(first)) {
                let r = m.refcount(ClusterIndex(c))?;
                if r != 0 {
                    if refs.len() <= index(c) {
                        refs.resize(index(c) + 1, 0);
                    }
                    refs[index(c)] = r;
                }
            }
        }
        progress(i + 1, total);
    }
    let table = m.h.refcount_table_offset / cs;
    old_structures.extend(table..table + u64::from(m.h.refcount_table_clusters));
    let counted = refs.clone();
    for &c in &old_structures {
        if let Some(r) = refs.get_mut(index(c)) {
            *r = r.saturating_sub(1);
        }
    }
    let max = if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    };
    for i in 0..entries {
        let first = index(i * epb);
        let last = index(((i + 1) * epb).min(refs.len() as u64));
        if let Some(c) = (first..last.max(first)).find(|&c| refs[c] > max) {
            return Err(Error::invalid_argument(format!(
                "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {}",
                1u32 << order,
                c as u64 * cs,
                refs[c]
            )));
        }
        progress(entries + i + 1, total);
    }
    if let Some(p) = replay_placement(m, order, &counted, &old_structures)? {
        return switch_to_placement(m, order, p, &counted, &old_structures, progress);
    }
    // Room for the new structures, taken at the first free run under the old
    // width (so nothing else lands there), sized for the new one.
    let old_order = m.h.refcount_order;
    let covered = (refs.len() as u64).max(file_clusters);
    m.h.refcount_order = order;
    let len = m.fresh_refcount_clusters(covered);
    m.h.refcount_order = old_order;
    let at = m.alloc_clusters(ClusterCount(len))?;
    m.write_dirty_refblocks()?;
    m.storage.flush()?;
    m.h.refcount_order = order;
    let fresh = m.write_fresh_refcounts(refs, &[], Some(at.cluster(m.geo.cluster_bits)));
    let fresh = match fresh {
        Ok(f) => f,
        Err(e) => {
            m.h.refcount_order = old_order;
            return Err(e);
        }
    };
    m.storage.flush()?;
    // Bytes 48..100: refcount table offset and clusters, then (unchanged) the
    // snapshot fields and feature bits, then the refcount order.
    let mut hdr = [0u8; 52];
    hdr[..8].copy_from_slice(&fresh.table_offset.to_be_bytes());
    hdr[8..12].copy_from_slice(&fresh.table_clusters.to_be_bytes());
    hdr[12..16].copy_from_slice(&m.h.nb_snapshots.to_be_bytes());
    hdr[16..24].copy_from_slice(&m.h.snapshots_offset.to_be_bytes());
    hdr[24..32].copy_from_slice(&m.h.incompatible_features.to_be_bytes());
    hdr[32..40].copy_from_slice(&m.h.compatible_features.to_be_bytes());
    hdr[40..48].copy_from_slice(&m.h.autoclear_features.to_be_bytes());
    hdr[48..].copy_from_slice(&order.to_be_bytes());
    if let Err(e) = m.storage.write_at(&hdr, 48).and_then(|_| m.storage.flush()) {
        m.h.refcount_order = old_order;
        return Err(e.into());
    }
    m.adopt_refcounts(fresh);
    for i in 0..entries {
        progress(2 * entries + i + 1, total);
    }
    Ok(())
}

/// [`qemu_placement`] for this image's old structures and the width
/// `2^order`; `refs` counts every cluster's references, the old structures'
/// included. `None` when the replay does not model the layout.
fn replay_placement(
    m: &mut Meta,
    order: u32,
    refs: &[u64],
    old_structures: &[u64],
) -> Result<Option<Placement>> {
    let cs = m.cluster_size();
    let entries = m.reftable.len() as u64;
    let epb = m.rb_entries();
    let present: Vec<bool> = (0..entries)
        .map(|i| m.refblock_offset(i).map(|b| !b.is_none()))
        .collect::<Result<_>>()?;
    let covered = |c: u64| {
        usize::try_from(c / epb)
            .ok()
            .and_then(|i| present.get(i))
            .copied()
            .unwrap_or(false)
    };
    let Some(positions) = entries.checked_mul(epb) else {
        return Ok(None);
    };
    let new_epb = (cs * 8) >> order;
    let p = qemu_placement(refs, &covered, positions, new_epb, cs / 8, m.max_refcount());
    // The old structures must all be counted, to be freed once unused.
    Ok(p.filter(|p| {
        old_structures.iter().all(|&c| {
            usize::try_from(c)
                .ok()
                .and_then(|c| p.refs.get(c))
                .is_some_and(|&r| r > 0)
        })
    }))
}

/// Write the new structures where `p` places them, with the refcounts the
/// image has once the header names them (the old structures free), then
/// name them and the width `2^order` in one write of the header's first
/// sector. The clusters the new structures take are counted in the old
/// structures first, as QEMU counts them; nothing names them until the
/// header write, so a crash before it leaks them at worst. `progress` goes on as QEMU's does after its first two walks:
/// one pass over the old table per further walk, then the writing one.
fn switch_to_placement(
    m: &mut Meta,
    order: u32,
    p: Placement,
    counted: &[u64],
    old_structures: &[u64],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let cs = m.cluster_size();
    let entries = m.reftable.len() as u64;
    let new_epb = (cs * 8) >> order;
    // As QEMU allocates them: counted in the old structures first (durable
    // before anything is written there; a crash leaks them at worst).
    for (c, &r) in p.refs.iter().enumerate() {
        if counted.get(c).copied().unwrap_or(0) != r {
            m.set_refcount_in_block(ClusterIndex(c as u64), r)?;
        }
    }
    m.write_dirty_refblocks()?;
    m.storage.flush()?;
    let mut refs = p.refs;
    for &c in old_structures {
        if let Some(r) = refs.get_mut(index(c)) {
            *r = r.saturating_sub(1);
        }
    }
    // The reading and checking passes already reported what QEMU's first
    // two walks report (a third of the work each).
    for w in 2..p.walks {
        let total = (w + 2).max(3) * entries;
        for i in 0..entries {
            progress(w * entries + i, total);
        }
        progress((w + 1) * entries, total);
    }
    for (j, &at) in p.blocks.iter().enumerate() {
        if at == 0 {
            continue;
        }
        let mut block = vec![0u8; index(cs)];
        let first = j as u64 * new_epb;
        for i in 0..new_epb {
            if let Some(&v) = refs.get(index(first + i)) {
                super::refcount::rb_set(&mut block, order, index(i), v);
            }
        }
        m.storage.write_at(&block, at * cs)?;
    }
    let table: Vec<u64> = p.blocks.iter().map(|&b| b * cs).collect();
    let mut bytes = Vec::with_capacity(table.len() * 8);
    for e in &table {
        bytes.extend_from_slice(&e.to_be_bytes());
    }
    let table_offset = p.table_at * cs;
    m.storage.write_at(&bytes, table_offset)?;
    m.storage.flush()?;
    let table_clusters = crate::units::header_u32(
        (table.len() as u64 * 8).div_ceil(cs),
        "refcount table clusters",
    )?;
    let w = p.walks;
    for i in 0..entries {
        progress(w * entries + i, (w + 1) * entries);
    }
    let mut hdr = [0u8; 52];
    hdr[..8].copy_from_slice(&table_offset.to_be_bytes());
    hdr[8..12].copy_from_slice(&table_clusters.to_be_bytes());
    hdr[12..16].copy_from_slice(&m.h.nb_snapshots.to_be_bytes());
    hdr[16..24].copy_from_slice(&m.h.snapshots_offset.to_be_bytes());
    hdr[24..32].copy_from_slice(&m.h.incompatible_features.to_be_bytes());
    hdr[32..40].copy_from_slice(&m.h.compatible_features.to_be_bytes());
    hdr[40..48].copy_from_slice(&m.h.autoclear_features.to_be_bytes());
    hdr[48..].copy_from_slice(&order.to_be_bytes());
    m.storage.write_at(&hdr, 48)?;
    m.storage.flush()?;
    m.h.refcount_order = order;
    m.adopt_refcounts(super::fresh::FreshRefcounts {
        table_offset,
        table_clusters,
        table,
    });
    progress((w + 1) * entries, (w + 1) * entries);
    Ok(())
}

/// Where QEMU's change of the refcount width puts the new structures, as
/// [`qemu_placement`] finds it.
struct Placement {
    /// The new refcount table: per new refcount block, the host cluster
    /// holding it (0: none, its clusters all free).
    blocks: Vec<u64>,
    /// The first cluster of the new refcount table.
    table_at: u64,
    /// Refcounts once the new structures are allocated (the old ones still
    /// counted).
    refs: Vec<u64>,
    /// Passes over the old table that allocated something, plus the last
    /// one, which found nothing more to allocate.
    walks: u64,
}

/// Replay the allocations QEMU makes when it changes the refcount width, on
/// the current refcounts `refs` (by cluster, the old structures included):
/// passes over every cluster the old table can describe (`positions`), in
/// blocks of `new_epb`; each block with a cluster in use that has no new
/// refcount block yet gets one cluster, first fit from the start of the
/// file (the search goes on from the last allocation, and moves back to a
/// cluster freed below it); after a pass that allocated, the new table
/// (`per_cluster` entries a cluster, grown to cover the last block in use)
/// is allocated anew, the previous one freed. Passes repeat until one
/// allocates nothing. `covered(c)` says whether an old refcount block
/// describes cluster `c`; `None` when an allocation would need one the old
/// structures lack (QEMU then grows them, which this does not replay) or
/// would pass `old_max`.
fn qemu_placement(
    refs: &[u64],
    covered: &dyn Fn(u64) -> bool,
    positions: u64,
    new_epb: u64,
    per_cluster: u64,
    old_max: u64,
) -> Option<Placement> {
    struct Alloc {
        refs: Vec<u64>,
        free: u64,
    }
    impl Alloc {
        fn get(&self, c: u64) -> u64 {
            usize::try_from(c)
                .ok()
                .and_then(|c| self.refs.get(c))
                .copied()
                .unwrap_or(0)
        }
        fn alloc(&mut self, n: u64, covered: &dyn Fn(u64) -> bool, max: u64) -> Option<u64> {
            let mut run = 0;
            while run < n {
                let c = self.free;
                self.free = c.checked_add(1)?;
                run = if self.get(c) == 0 { run + 1 } else { 0 };
            }
            let start = self.free - n;
            for c in start..self.free {
                if !covered(c) {
                    return None;
                }
                let i = usize::try_from(c).ok()?;
                if self.refs.len() <= i {
                    self.refs.resize(i + 1, 0);
                }
                self.refs[i] = self.refs[i].checked_add(1).filter(|&r| r <= max)?;
            }
            Some(start)
        }
        fn free(&mut self, start: u64, n: u64) -> Option<()> {
            for c in start..start.checked_add(n)? {
                let r = self.refs.get_mut(usize::try_from(c).ok()?)?;
                *r = r.checked_sub(1)?;
                if *r == 0 && c < self.free {
                    self.free = c;
                }
            }
            Some(())
        }
    }
    let mut a = Alloc {
        refs: refs.to_vec(),
        free: 0,
    };
    let mut blocks: Vec<u64> = Vec::new();
    let mut table: Option<(u64, u64)> = None;
    let mut walks = 0u64;
    loop {
        walks += 1;
        // Each pass allocates or ends the loop; a long run means a layout
        // this replay does not model.
        if walks > 64 {
            return None;
        }
        let mut allocated = false;
        for j in 0..positions.div_ceil(new_epb) {
            let lo = j * new_epb;
            let hi = (lo + new_epb).min(positions);
            if (lo..hi).all(|c| a.get(c) == 0) {
                continue;
            }
            let j = usize::try_from(j).ok()?;
            if j >= blocks.len() {
                let len = (j as u64 + 1).next_multiple_of(per_cluster);
                blocks.resize(usize::try_from(len).ok()?, 0);
            }
            if blocks[j] == 0 {
                blocks[j] = a.alloc(1, covered, old_max)?;
                allocated = true;
            }
        }
        if !allocated {
            break;
        }
        if let Some((at, n)) = table {
            a.free(at, n)?;
        }
        let n = (blocks.len() as u64).div_ceil(per_cluster);
        table = Some((a.alloc(n, covered, old_max)?, n));
    }
    let (table_at, _) = table?;
    Some(Placement {
        blocks,
        table_at,
        refs: a.refs,
        walks,
    })
}
