//! The counting half of the check: every reference the image holds, each entry
//! judged as qemu-img's check judges it (see the parent module).

use super::super::entries::{Geometry, L2Entry, ALL_ALLOCATED, L1_RESERVED, L2_STD_RESERVED};
use super::super::entries::{OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use super::super::header::{self, MAX_HOST_OFFSET, MAX_L1_BYTES};
use super::super::image::Qcow2Image;
use super::super::meta::Meta;
use super::super::refcount::REFTABLE_RESERVED;
use super::Repair;
use crate::units::{index, HostOffset};
use crate::Result;

/// Reserved bits of a bitmap table entry.
const BITMAP_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// The "all ones" flag of a bitmap table entry.
const BITMAP_ENTRY_ALL_ONES: u64 = 1;

/// How qemu-img's check classifies an L2 entry before judging it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    Unallocated,
    /// A zero cluster without a host cluster.
    ZeroPlain,
    /// A host cluster: data, or a zero cluster keeping its preallocated cluster.
    /// The offset may be unaligned (a corruption, still counted).
    Host(u64),
    Compressed {
        offset: u64,
        size: u64,
    },
}

pub(super) fn classify(geo: &Geometry, e: u64) -> Kind {
    if e & OFLAG_COMPRESSED != 0 {
        return match geo.decode_l2(e, 0) {
            Ok(L2Entry::Compressed { offset, size }) => Kind::Compressed {
                offset: offset.get(),
                size,
            },
            _ => unreachable!("a compressed entry decodes as compressed"),
        };
    }
    let offset = e & OFFSET_MASK;
    // In an external data file, offset 0 with COPIED is guest cluster 0.
    let data_file_zero = geo.data_file && e & OFLAG_COPIED != 0;
    if offset == 0 && !data_file_zero {
        if !geo.extended_l2 && e & OFLAG_ZERO != 0 {
            Kind::ZeroPlain
        } else {
            Kind::Unallocated
        }
    } else {
        Kind::Host(offset)
    }
}

/// References counted per cluster, with the corruptions found while counting.
pub(super) struct Counter {
    pub(super) refs: Vec<u32>,
    pub(super) cs: u64,
    pub(super) file_size: u64,
    pub(super) max_refcount: u32,
    pub(super) corruptions: u64,
    pub(super) messages: Vec<String>,
    /// References each [`Counter::add`] counts (snapshots sharing one L1 table are
    /// walked once, with their number as the weight).
    pub(super) weight: u32,
    /// Cluster ranges some entry names at or past the end of the file (not
    /// counted), with the references to them: a repair reserves them.
    pub(super) beyond: Vec<(u64, u64, u32)>,
    /// The repair asked for: with [`Repair::All`], an L2 entry naming an
    /// unaligned preallocated cluster is made a plain zero cluster as it is found.
    pub(super) repair: Repair,
    /// The L2 entries so repaired.
    pub(super) fixed: u64,
    /// Whether the corruption event of an unreadable refcount block has been
    /// raised (qemu-img raises it once, and suppresses the later ones).
    pub(super) signaled: bool,
}

impl Counter {
    fn corrupt(&mut self, msg: String) {
        self.corruptions += u64::from(self.weight);
        self.messages.push(msg);
    }

    /// Count one reference to each cluster of `[offset, offset+len)`. A range that
    /// reaches a cluster or more past the end of the file is a corruption and is
    /// not counted; the last cluster may be partly past the end.
    fn add(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = offset.checked_add(len).filter(|&e| e <= MAX_HOST_OFFSET);
        let inside = match end {
            Some(e) => e < self.file_size.saturating_add(self.cs),
            None => false,
        };
        if !inside {
            self.corrupt(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{len:x}"
            ));
            if let Some(e) = end {
                self.beyond
                    .push((offset / self.cs, (e - 1) / self.cs, self.weight));
            }
            return;
        }
        let end = end.expect("inside");
        for c in offset / self.cs..=(end - 1) / self.cs {
            let c = index(c);
            if c >= self.refs.len() {
                self.refs.resize(c + 1, 0);
            }
            let cur = self.refs[c];
            match cur
                .checked_add(self.weight)
                .filter(|&v| v <= self.max_refcount)
            {
                Some(v) => self.refs[c] = v,
                None => {
                    self.refs[c] = self.max_refcount;
                    self.corrupt(format!(
                        "ERROR: overflow cluster offset=0x{:x}",
                        c as u64 * self.cs
                    ));
                    self.messages.push("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing".into());
                }
            }
        }
    }

    pub(super) fn refs_of(&self, cluster: u64) -> u64 {
        u64::from(self.refs.get(index(cluster)).copied().unwrap_or(0))
    }
}

pub(super) struct Frag {
    pub(super) allocated: u64,
    pub(super) fragmented: u64,
    pub(super) compressed: u64,
    pub(super) next: u64,
}

/// Everything one counting pass found.
pub(super) struct Count {
    pub(super) ctr: Counter,
    /// The references without those of the refcount structures: what a rebuild
    /// must describe.
    pub(super) base: Vec<u32>,
    pub(super) frag: Frag,
    /// The refcount structures are unusable (bad table entries, blocks outside the
    /// file or shared): only a rebuild fixes them.
    pub(super) bad_blocks: bool,
}

impl Qcow2Image {
    /// Count every reference the image holds, judging each entry as qemu-img does.
    pub(super) fn count_refs(&self, m: &mut Meta, repair: Repair) -> Result<Count> {
        let cs = m.cluster_size();
        let file_size = m.storage.size().map_err(|e| self.err(e))?;
        let mut ctr = Counter {
            refs: Vec::new(),
            cs,
            file_size,
            max_refcount: u32::try_from(m.max_refcount()).unwrap_or(u32::MAX),
            corruptions: 0,
            messages: Vec::new(),
            weight: 1,
            beyond: Vec::new(),
            repair,
            fixed: 0,
            signaled: false,
        };
        // Header cluster.
        ctr.add(0, cs);
        // Active L1 and everything under it (with fragmentation statistics).
        let mut frag = Frag {
            allocated: 0,
            fragmented: 0,
            compressed: 0,
            next: 0,
        };
        let l1 = m.l1.clone();
        ctr.add(m.h.l1_table_offset, l1.len() as u64 * 8);
        self.count_l1(m, &l1, &mut ctr, Some(&mut frag))?;
        // Snapshots sharing an L1 table are walked once, counted as many times as
        // they share it: a table of thousands of snapshots naming one 32 MiB L1
        // table must not cost thousands of walks.
        let snaps = m.snapshots.clone();
        let mut tables: Vec<((u64, u32), u32)> = Vec::new();
        let mut index: std::collections::HashMap<(u64, u32), usize> = Default::default();
        for s in &snaps {
            let bytes = u64::from(s.l1_size) * 8;
            if !s.l1_table_offset.is_multiple_of(cs) {
                ctr.corrupt(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    s.id, s.name, s.l1_table_offset
                ));
                continue;
            }
            if bytes > MAX_L1_BYTES {
                ctr.corrupt(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    s.id, s.name, s.l1_size
                ));
                continue;
            }
            let key = (s.l1_table_offset, s.l1_size);
            match index.get(&key) {
                Some(&i) => tables[i].1 = tables[i].1.saturating_add(1),
                None => {
                    index.insert(key, tables.len());
                    tables.push((key, 1));
                }
            }
        }
        // Likewise an L2 table that several snapshots' L1 tables name (every table a
        // snapshot took over unchanged) is walked once, with the number of times it
        // is named as the weight: a hundred snapshots of one disk cost one walk of
        // their shared tables, not a hundred.
        let mut l2_tables: Vec<(u64, u32)> = Vec::new();
        let mut l2_index: std::collections::HashMap<u64, usize> = Default::default();
        for ((offset, size), n) in tables {
            ctr.weight = n;
            let bytes = u64::from(size) * 8;
            ctr.add(offset, bytes);
            let sl1: Vec<u64> = words(&self.read_padded(m, offset, bytes)?);
            for &e in &sl1 {
                let Some(l2off) = count_l1_entry(e, cs, &mut ctr) else {
                    continue;
                };
                match l2_index.get(&l2off) {
                    Some(&i) => l2_tables[i].1 = l2_tables[i].1.saturating_add(n),
                    None => {
                        l2_index.insert(l2off, l2_tables.len());
                        l2_tables.push((l2off, n));
                    }
                }
            }
        }
        for (l2off, n) in l2_tables {
            ctr.weight = n;
            self.count_l2(m, l2off, &mut ctr, None)?;
        }
        ctr.weight = 1;
        if !snaps.is_empty() {
            ctr.add(m.h.snapshots_offset, m.snapshot_table_len());
        }
        // Bitmaps.
        if let Some(b) = m.h.bitmaps {
            if m.h.autoclear_features & header::autoclear::BITMAPS != 0 {
                self.count_bitmaps(m, b, &mut ctr)?;
            }
        }
        // The LUKS area of an encrypted image.
        if let Some(c) = m.h.crypto {
            ctr.add(c.offset, c.length);
        }
        if ctr.fixed > 0 {
            m.flush_metadata().map_err(|e| self.err(e))?;
        }
        let base = ctr.refs.clone();
        // Refcount structures.
        ctr.add(
            m.h.refcount_table_offset,
            u64::from(m.h.refcount_table_clusters) * cs,
        );
        let mut file_clusters = file_size.div_ceil(cs);
        let mut bad_blocks = false;
        for (i, &e) in m.reftable.clone().iter().enumerate() {
            let off = e & !REFTABLE_RESERVED;
            if e & REFTABLE_RESERVED != 0 {
                ctr.corrupt(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                bad_blocks = true;
                continue;
            }
            if !off.is_multiple_of(cs) {
                ctr.corrupt(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                bad_blocks = true;
                continue;
            }
            if off / cs >= file_clusters {
                if repair != Repair::All {
                    // Its clusters read as refcount 0 where the file has any;
                    // the comparison finds what that breaks.
                    ctr.corrupt(format!("ERROR refcount block {i} is outside image"));
                    continue;
                }
                // The file grows over the block (which then holds zeroes), as
                // qemu-img's repair grows it, and the block is counted; a
                // successful grow is a corruption fixed, as qemu-img reports it.
                let msg = format!("Repairing refcount block {i} is outside image");
                match self.grow_over(m, off) {
                    Ok(size) => {
                        ctr.messages.push(msg);
                        ctr.fixed += 1;
                        ctr.file_size = size;
                        file_clusters = size.div_ceil(cs);
                        // Its cluster was just added to the file: nothing else
                        // can count it, so its count is 1.
                        ctr.add(off, cs);
                        continue;
                    }
                    Err(words) => {
                        ctr.corrupt(msg);
                        ctr.messages
                            .push(format!("ERROR could not resize image: {words}"));
                        bad_blocks = true;
                        continue;
                    }
                }
            }
            if off == 0 {
                continue;
            }
            ctr.add(off, cs);
            let r = ctr.refs_of(off / cs);
            if r != 1 {
                ctr.corrupt(format!("ERROR refcount block {i} refcount={r}"));
                bad_blocks = true;
            }
        }
        Ok(Count {
            ctr,
            base,
            frag,
            bad_blocks,
        })
    }

    /// Grow the file to end with the cluster at `off`; returns its new size, or
    /// the failure in `strerror`'s words.
    fn grow_over(&self, m: &Meta, off: u64) -> std::result::Result<u64, String> {
        let words = |e: strata_storage::Error| match e {
            strata_storage::Error::Io { source, .. } => strata_storage::os_message(&source),
            other => other.to_string(),
        };
        let end = off
            .checked_add(m.cluster_size())
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| "Invalid argument".to_string())?;
        m.storage.set_size(end).map_err(words)?;
        m.storage.size().map_err(words)
    }

    /// `len` bytes at `offset`; what lies past the end of the file reads as zeroes.
    pub(super) fn read_padded(&self, m: &Meta, offset: u64, len: u64) -> Result<Vec<u8>> {
        let file_size = m.storage.size().map_err(|e| self.err(e))?;
        let mut buf = vec![0u8; index(len)];
        let inside = index(len.min(file_size.saturating_sub(offset)));
        if inside > 0 {
            m.storage
                .read_at(&mut buf[..inside], offset)
                .map_err(|e| self.err(e))?;
        }
        Ok(buf)
    }

    /// Count an L1 table and its L2 tables, judging each entry as qemu-img does.
    fn count_l1(
        &self,
        m: &mut Meta,
        l1: &[u64],
        ctr: &mut Counter,
        mut frag: Option<&mut Frag>,
    ) -> Result<()> {
        let cs = m.cluster_size();
        for &e in l1 {
            if let Some(l2off) = count_l1_entry(e, cs, ctr) {
                self.count_l2(m, l2off, ctr, frag.as_deref_mut())?;
            }
        }
        Ok(())
    }

    /// Count the entries of the L2 table at `l2off` (the table itself is counted
    /// with its L1 entry), judging each as qemu-img does.
    fn count_l2(
        &self,
        m: &mut Meta,
        l2off: u64,
        ctr: &mut Counter,
        mut frag: Option<&mut Frag>,
    ) -> Result<()> {
        let cs = m.cluster_size();
        let geo = m.geo;
        let ext = geo.extended_l2;
        let stride = if ext { 2 } else { 1 };
        let table = words(&self.read_padded(m, l2off, cs)?);
        // Contiguity is judged within one L2 table, as qemu-img counts it.
        if let Some(f) = frag.as_deref_mut() {
            f.next = 0;
        }
        for (i, w) in table.chunks_exact(stride).enumerate() {
            let raw = w[0];
            let bitmap = if ext { w[1] } else { 0 };
            let kind = classify(&geo, raw);
            if !matches!(kind, Kind::Compressed { .. }) && raw & L2_STD_RESERVED != 0 {
                ctr.corrupt(format!(
                    "ERROR found l2 entry with reserved bits set: {raw:x}"
                ));
            }
            match kind {
                Kind::Compressed { offset, size } => {
                    if raw & OFLAG_COPIED != 0 {
                        ctr.corrupt(format!("ERROR: coffset=0x{offset:x}: copied flag must never be set for compressed clusters"));
                    }
                    if bitmap != 0 {
                        ctr.corrupt(format!("ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{raw:x}"));
                        continue;
                    }
                    ctr.add(offset, size);
                    if let Some(f) = frag.as_deref_mut() {
                        f.allocated += 1;
                        f.compressed += 1;
                        f.fragmented += 1;
                    }
                }
                Kind::Host(offset) => {
                    if (bitmap >> 32) & bitmap != 0 {
                        ctr.corrupt(format!("ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"));
                    }
                    if !offset.is_multiple_of(cs) {
                        let has_data = if ext {
                            bitmap & ALL_ALLOCATED != 0
                        } else {
                            raw & OFLAG_ZERO == 0
                        };
                        if !has_data && ctr.repair == Repair::All {
                            // As qemu-img repairs it: the entry becomes a zero
                            // cluster without a host cluster (the cluster it named
                            // is no longer counted; at worst it leaks).
                            ctr.messages.push(format!("Repairing offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."));
                            let zero = if ext { 0 } else { OFLAG_ZERO };
                            m.set_raw_entry(HostOffset(l2off), i as u64, zero, bitmap)
                                .map_err(|e| self.err(e))?;
                            ctr.fixed += u64::from(ctr.weight);
                            continue;
                        }
                        let what = if has_data {
                            "Data cluster"
                        } else {
                            "Preallocated cluster"
                        };
                        ctr.corrupt(format!("ERROR offset={offset:x}: {what} is not properly aligned; L2 entry corrupted."));
                    }
                    if let Some(f) = frag.as_deref_mut() {
                        f.allocated += 1;
                        if f.next != 0 && offset != f.next {
                            f.fragmented += 1;
                        }
                        f.next = offset + cs;
                    }
                    // Clusters of an external data file are not refcounted.
                    if !geo.data_file {
                        ctr.add(offset, cs);
                    }
                }
                Kind::ZeroPlain => {}
                Kind::Unallocated => {
                    if bitmap & ALL_ALLOCATED != 0 {
                        ctr.corrupt(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn count_bitmaps(&self, m: &mut Meta, b: header::BitmapsExt, ctr: &mut Counter) -> Result<()> {
        let cs = m.cluster_size();
        ctr.add(b.directory_offset, b.directory_size);
        let size = b.directory_size.min(1024 * 65535);
        let dir = self.read_padded(m, b.directory_offset, size)?;
        let mut at = 0usize;
        for _ in 0..b.nb_bitmaps {
            if at + 24 > dir.len() {
                ctr.corrupt("ERROR: bitmap directory is truncated".into());
                break;
            }
            let table_off = u64::from_be_bytes(dir[at..at + 8].try_into().expect("8"));
            let table_size = u32::from_be_bytes(dir[at + 8..at + 12].try_into().expect("4"));
            let name_size = u16::from_be_bytes([dir[at + 18], dir[at + 19]]) as usize;
            let extra = u32::from_be_bytes(dir[at + 20..at + 24].try_into().expect("4")) as usize;
            let bytes = u64::from(table_size) * 8;
            ctr.add(table_off, bytes);
            if bytes <= 64 << 20 {
                for e in words(&self.read_padded(m, table_off, bytes)?) {
                    let off = e & OFFSET_MASK;
                    if e & BITMAP_ENTRY_RESERVED != 0
                        || !off.is_multiple_of(cs)
                        || (e & BITMAP_ENTRY_ALL_ONES != 0 && off != 0)
                    {
                        ctr.corruptions += 1;
                        continue;
                    }
                    if off != 0 {
                        ctr.add(off, cs);
                    }
                }
            }
            at += (24 + extra + name_size).next_multiple_of(8);
        }
        Ok(())
    }
}

/// Big-endian 64-bit words of `buf`.
/// Judge one L1 entry and count the L2 table it names; the table's offset, unless
/// the entry is empty.
fn count_l1_entry(e: u64, cs: u64, ctr: &mut Counter) -> Option<u64> {
    if e == 0 {
        return None;
    }
    if e & L1_RESERVED != 0 {
        ctr.corrupt(format!(
            "ERROR found L1 entry with reserved bits set: {e:x}"
        ));
    }
    let l2off = e & OFFSET_MASK;
    ctr.add(l2off, cs);
    if !l2off.is_multiple_of(cs) {
        ctr.corrupt(format!(
            "ERROR l2_offset={l2off:x}: Table is not cluster aligned; L1 entry corrupted"
        ));
    }
    Some(l2off)
}

pub(super) fn words(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
        .collect()
}
