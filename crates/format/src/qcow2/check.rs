//! Consistency check and repair, with qemu-img's counts and messages.
//!
//! The check counts every reference the image holds (header, L1/L2 tables, data and
//! compressed clusters, snapshots, refcount structures, bitmaps), compares the counts
//! with the stored refcounts, and verifies the COPIED flags. Repair fixes refcounts
//! (leaks only, or all) and COPIED flags; if refcount blocks are missing or unusable it
//! rebuilds the refcount structures in a fresh area and switches the header to them.

use super::entries::{decode_l1, L2Entry, OFFSET_MASK, OFLAG_COPIED};
use super::header::{self, MAX_HOST_OFFSET};
use super::image::Qcow2Image;
use super::meta::Meta;
use super::refcount::{rb_set, REFTABLE_RESERVED};
use crate::{BlockDevice, Result};

/// What `check -r` may fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    None,
    Leaks,
    All,
}

/// The result of a check, with the fields qemu-img reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// Lines qemu-img prints on stderr while checking ("Leaked cluster 5 refcount=1 reference=0").
    pub messages: Vec<String>,
}

struct Counter {
    refs: Vec<u32>,
    cs: u64,
    file_clusters: u64,
    corruptions: u64,
    messages: Vec<String>,
    /// References each [`Counter::add`] counts (snapshots sharing one L1 table are
    /// walked once, with their number as the weight).
    weight: u32,
}

impl Counter {
    /// Count one reference to each cluster of `[offset, offset+len)`.
    fn add(&mut self, offset: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let Some(end) = offset.checked_add(len).filter(|&e| e <= MAX_HOST_OFFSET) else {
            self.corruptions += 1;
            self.messages.push(format!(
                "ERROR: {what} at offset 0x{offset:x} is out of range"
            ));
            return;
        };
        let first = offset / self.cs;
        let last = (end - 1) / self.cs;
        // Allow references a little past the end of the file (preallocated images may
        // be shorter than their metadata says), but never grow without bound.
        let limit = self.file_clusters + 1024;
        for c in first..=last {
            if c >= limit {
                self.corruptions += 1;
                self.messages.push(format!(
                    "ERROR: {what} cluster at offset 0x{:x} lies beyond the end of the image file",
                    c * self.cs
                ));
                return;
            }
            if c as usize >= self.refs.len() {
                self.refs.resize(c as usize + 1, 0);
            }
            self.refs[c as usize] = self.refs[c as usize].saturating_add(self.weight);
        }
    }
}

struct Frag {
    allocated: u64,
    fragmented: u64,
    compressed: u64,
    next: u64,
}

impl Qcow2Image {
    /// Check the image and, if asked, repair it. Returns the report of the final state
    /// (after repair, the image is checked again, as qemu-img does).
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        let _excl = self.exclusive();
        let mut m = self.lock();
        let repairing = repair != Repair::None && !m.read_only;
        if !m.read_only {
            m.flush_metadata().map_err(|e| self.err(e))?;
        }
        let mut report =
            self.check_locked(&mut m, if repairing { repair } else { Repair::None })?;
        if repairing && (report.corruptions_fixed > 0 || report.leaks_fixed > 0) {
            let fixed = (
                report.corruptions_fixed,
                report.leaks_fixed,
                report.messages.clone(),
            );
            m.flush_metadata().map_err(|e| self.err(e))?;
            let mut again = self.check_locked(&mut m, Repair::None)?;
            again.corruptions_fixed = fixed.0;
            again.leaks_fixed = fixed.1;
            let mut msgs = fixed.2;
            msgs.extend(again.messages);
            again.messages = msgs;
            report = again;
        }
        if repairing && report.corruptions == 0 && report.check_errors == 0 {
            let h = &mut m.h;
            let bits = header::incompat::CORRUPT | header::incompat::DIRTY;
            if h.incompatible_features & bits != 0 {
                h.incompatible_features &= !bits;
                m.write_incompat().map_err(|e| self.err(e))?;
                m.storage.flush().map_err(|e| self.err(e))?;
            }
        }
        Ok(report)
    }

    fn check_locked(&self, m: &mut Meta, repair: Repair) -> Result<CheckReport> {
        let cs = m.cluster_size();
        let file_size = m.storage.size().map_err(|e| self.err(e))?;
        let mut ctr = Counter {
            refs: Vec::new(),
            cs,
            file_clusters: file_size.div_ceil(cs),
            corruptions: 0,
            messages: Vec::new(),
            weight: 1,
        };
        let mut report = CheckReport {
            total_clusters: self.virtual_size().div_ceil(cs),
            ..Default::default()
        };
        // Header cluster.
        ctr.add(0, cs, "header");
        // Active L1 and everything under it (with fragmentation statistics).
        let mut frag = Frag {
            allocated: 0,
            fragmented: 0,
            compressed: 0,
            next: 0,
        };
        let l1 = m.l1.clone();
        let l1_off = m.h.l1_table_offset;
        ctr.add(l1_off, l1.len() as u64 * 8, "L1 table");
        self.count_l1(m, &l1, &mut ctr, Some(&mut frag))?;
        report.allocated_clusters = frag.allocated;
        report.fragmented_clusters = frag.fragmented;
        report.compressed_clusters = frag.compressed;
        // Snapshots.
        let snaps = m.snapshots.clone();
        if !snaps.is_empty() {
            ctr.add(
                m.h.snapshots_offset,
                super::snapshot::table_size(&snaps),
                "snapshot table",
            );
        }
        // Snapshots sharing an L1 table are walked once, counted as many times as
        // they share it: a table of thousands of snapshots naming one 32 MiB L1
        // table must not cost thousands of walks. Entries past the end of the
        // file read as zeroes, so only the part inside the file is read.
        let mut tables: Vec<((u64, u32), u32)> = Vec::new();
        let mut index: std::collections::HashMap<(u64, u32), usize> = Default::default();
        for s in &snaps {
            let key = (s.l1_table_offset, s.l1_size);
            match index.get(&key) {
                Some(&i) => tables[i].1 = tables[i].1.saturating_add(1),
                None => {
                    index.insert(key, tables.len());
                    tables.push((key, 1));
                }
            }
        }
        for ((offset, size), n) in tables {
            ctr.weight = n;
            let bytes = u64::from(size) * 8;
            ctr.add(offset, bytes, "snapshot L1 table");
            let inside = bytes.min(file_size.saturating_sub(offset));
            let mut buf = vec![0u8; inside as usize];
            m.storage
                .read_at(&mut buf, offset)
                .map_err(|e| self.err(e))?;
            let sl1: Vec<u64> = buf
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
                .collect();
            self.count_l1(m, &sl1, &mut ctr, None)?;
        }
        ctr.weight = 1;
        // Bitmaps.
        if let Some(b) = m.h.bitmaps {
            if m.h.autoclear_features & header::autoclear::BITMAPS != 0 {
                self.count_bitmaps(m, b, &mut ctr)?;
            }
        }
        // Refcount structures.
        let rt_off = m.h.refcount_table_offset;
        ctr.add(
            rt_off,
            u64::from(m.h.refcount_table_clusters) * cs,
            "refcount table",
        );
        let reftable = m.reftable.clone();
        let mut bad_blocks = false;
        for (i, &e) in reftable.iter().enumerate() {
            let off = e & !REFTABLE_RESERVED;
            if e & REFTABLE_RESERVED != 0 || !off.is_multiple_of(cs) {
                ctr.corruptions += 1;
                ctr.messages.push(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                bad_blocks = true;
                continue;
            }
            if off == 0 {
                continue;
            }
            if off >= file_size.next_multiple_of(cs) {
                ctr.corruptions += 1;
                ctr.messages
                    .push(format!("ERROR refcount block {i} is outside image"));
                bad_blocks = true;
                continue;
            }
            ctr.add(off, cs, "refcount block");
        }
        report.check_errors = 0;
        // Compare.
        let epb = m.rb_entries();
        let n = (ctr.refs.len() as u64).max(ctr.file_clusters);
        let mut highest = 0u64;
        let mut need_rebuild = bad_blocks && repair == Repair::All;
        let mut fixes: Vec<(u64, u64)> = Vec::new();
        let mut stored_all = self.stored_refcounts(m, n)?;
        for c in 0..n {
            let stored = stored_all[c as usize];
            let computed = u64::from(*ctr.refs.get(c as usize).unwrap_or(&0));
            if stored > 0 || computed > 0 {
                highest = c + 1;
            }
            if stored == computed {
                continue;
            }
            let fix = match repair {
                Repair::All => true,
                Repair::Leaks => stored > computed,
                Repair::None => false,
            };
            if fix {
                if m.refblock_offset(c / epb).unwrap_or(0) == 0 {
                    need_rebuild = true;
                }
                fixes.push((c, computed));
            }
            let label = if fix {
                "Repairing"
            } else if stored < computed {
                "ERROR"
            } else {
                "Leaked"
            };
            ctr.messages.push(format!(
                "{label} cluster {c} refcount={stored} reference={computed}"
            ));
            if fix {
                if stored < computed {
                    report.corruptions_fixed += 1;
                } else {
                    report.leaks_fixed += 1;
                }
            } else if stored < computed {
                ctr.corruptions += 1;
            } else {
                report.leaks += 1;
            }
        }
        report.image_end_offset = highest * cs;
        if need_rebuild {
            self.rebuild_refcounts(m, &ctr.refs)?;
            stored_all = self.stored_refcounts(m, n)?;
        } else {
            for (c, v) in fixes {
                let cur = m.refcount(c).map_err(|e| self.err(e))?;
                m.update_refcount(c, v as i64 - cur as i64)
                    .map_err(|e| self.err(e))?;
                stored_all[c as usize] = v;
            }
        }
        // COPIED flags (after refcount repair, against the now-stored counts).
        let copied_errors = self.check_copied(m, repair == Repair::All, &stored_all)?;
        if repair == Repair::All {
            report.corruptions_fixed += copied_errors.1;
        } else {
            ctr.corruptions += copied_errors.1;
        }
        ctr.messages.extend(copied_errors.0);
        report.corruptions += ctr.corruptions;
        report.messages = ctr.messages;
        Ok(report)
    }

    /// The stored refcounts of clusters `0..n`, each refcount block read once.
    /// Unusable blocks (reserved bits, misaligned, past the end of the file) count
    /// as holding zeroes.
    fn stored_refcounts(&self, m: &mut Meta, n: u64) -> Result<Vec<u64>> {
        let epb = m.rb_entries();
        let cs = m.cluster_size();
        let order = m.h.refcount_order;
        let file_size = m.storage.size().map_err(|er| self.err(er))?;
        let mut out = vec![0u64; n as usize];
        for b in 0..n.div_ceil(epb) {
            let Some(&e) = m.reftable.get(b as usize) else {
                break;
            };
            if e == 0 || e & REFTABLE_RESERVED != 0 || !e.is_multiple_of(cs) || e >= file_size {
                continue;
            }
            m.load_refblock(e).map_err(|er| self.err(er))?;
            let block = &m.rb.get(e).expect("loaded").data;
            let first = b * epb;
            for c in first..(first + epb).min(n) {
                out[c as usize] = super::refcount::rb_get(block, order, (c - first) as usize);
            }
        }
        Ok(out)
    }

    fn count_l1(
        &self,
        m: &mut Meta,
        l1: &[u64],
        ctr: &mut Counter,
        mut frag: Option<&mut Frag>,
    ) -> Result<()> {
        let cs = m.cluster_size();
        let geo = m.geo;
        let words = if geo.extended_l2 { 2 } else { 1 };
        for (i, &e) in l1.iter().enumerate() {
            let (l2off, _) = match decode_l1(e, cs, i) {
                Ok(v) => v,
                Err(err) => {
                    ctr.corruptions += 1;
                    ctr.messages.push(format!("ERROR: {}", err.kind));
                    continue;
                }
            };
            if l2off == 0 {
                continue;
            }
            ctr.add(l2off, cs, "L2 table");
            if l2off >= ctr.file_clusters * cs {
                continue;
            }
            let mut buf = vec![0u8; cs as usize];
            m.storage
                .read_at(&mut buf, l2off)
                .map_err(|er| self.err(er))?;
            let words_v: Vec<u64> = buf
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
                .collect();
            // Contiguity is judged within one L2 table, as qemu-img counts it.
            if let Some(f) = frag.as_deref_mut() {
                f.next = 0;
            }
            for j in (0..words_v.len()).step_by(words) {
                let raw = words_v[j];
                let bitmap = if words == 2 { words_v[j + 1] } else { 0 };
                let entry = match geo.decode_l2(raw, bitmap) {
                    Ok(v) => v,
                    Err(err) => {
                        ctr.corruptions += 1;
                        ctr.messages
                            .push(format!("ERROR: {} (L2 table at 0x{l2off:x})", err.kind));
                        continue;
                    }
                };
                match entry {
                    L2Entry::Compressed { offset, size } => {
                        ctr.add(offset, size, "compressed cluster");
                        if let Some(f) = frag.as_deref_mut() {
                            f.allocated += 1;
                            f.compressed += 1;
                            f.fragmented += 1;
                        }
                    }
                    L2Entry::Normal { host, .. } if host != 0 => {
                        ctr.add(host, cs, "data cluster");
                        if let Some(f) = frag.as_deref_mut() {
                            f.allocated += 1;
                            if f.next != 0 && host != f.next {
                                f.fragmented += 1;
                            }
                            f.next = host + cs;
                        }
                    }
                    L2Entry::Normal { .. } => {}
                }
            }
        }
        Ok(())
    }

    fn count_bitmaps(&self, m: &mut Meta, b: header::BitmapsExt, ctr: &mut Counter) -> Result<()> {
        let cs = m.cluster_size();
        ctr.add(b.directory_offset, b.directory_size, "bitmap directory");
        let size = b.directory_size.min(1024 * 65535) as usize;
        let mut dir = vec![0u8; size];
        m.storage
            .read_at(&mut dir, b.directory_offset)
            .map_err(|e| self.err(e))?;
        let mut at = 0usize;
        for _ in 0..b.nb_bitmaps {
            if at + 24 > dir.len() {
                ctr.corruptions += 1;
                ctr.messages
                    .push("ERROR: bitmap directory is truncated".into());
                break;
            }
            let table_off = u64::from_be_bytes(dir[at..at + 8].try_into().expect("8"));
            let table_size = u32::from_be_bytes(dir[at + 8..at + 12].try_into().expect("4"));
            let name_size = u16::from_be_bytes([dir[at + 18], dir[at + 19]]) as usize;
            let extra = u32::from_be_bytes(dir[at + 20..at + 24].try_into().expect("4")) as usize;
            ctr.add(table_off, u64::from(table_size) * 8, "bitmap table");
            if u64::from(table_size) * 8 <= 64 << 20 {
                let mut t = vec![0u8; table_size as usize * 8];
                m.storage
                    .read_at(&mut t, table_off)
                    .map_err(|e| self.err(e))?;
                for c in t.chunks_exact(8) {
                    let e = u64::from_be_bytes(c.try_into().expect("8")) & OFFSET_MASK;
                    if e != 0 {
                        ctr.add(e, cs, "bitmap data");
                    }
                }
            }
            at += (24 + extra + name_size).next_multiple_of(8);
        }
        Ok(())
    }

    /// Verify COPIED flags on the active L1 and its L2 tables; fix them if asked.
    /// Returns the messages and the number of wrong flags.
    /// Verify (and with `fix`, correct) the COPIED flags of the active L1 and L2
    /// tables against `stored`, the refcounts now on disk.
    fn check_copied(&self, m: &mut Meta, fix: bool, stored: &[u64]) -> Result<(Vec<String>, u64)> {
        let cs = m.cluster_size();
        let mut msgs = Vec::new();
        let mut count = 0u64;
        let geo = m.geo;
        let words = if geo.extended_l2 { 2 } else { 1 };
        let file_size = m.storage.size().map_err(|er| self.err(er))?;
        let rc_of = |off: u64| stored.get((off / cs) as usize).copied().unwrap_or(0);
        for i in 0..m.l1.len() {
            let e = m.l1[i];
            let Ok((l2off, copied)) = decode_l1(e, cs, i) else {
                continue;
            };
            if l2off == 0 || l2off >= file_size {
                continue;
            }
            let rc = rc_of(l2off);
            if (rc == 1) != copied {
                count += 1;
                let label = if fix { "Repairing" } else { "ERROR" };
                msgs.push(format!(
                    "{label} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
                if fix {
                    m.l1[i] = if rc == 1 {
                        e | OFLAG_COPIED
                    } else {
                        e & !OFLAG_COPIED
                    };
                    m.write_l1_entry(i as u64).map_err(|er| self.err(er))?;
                }
            }
            m.load_l2(l2off).map_err(|er| self.err(er))?;
            let table = m.l2.get(l2off).expect("loaded").data.clone();
            for (j, w) in table.chunks_exact(words).enumerate() {
                let (raw, bitmap) = (w[0], if words == 2 { w[1] } else { 0 });
                let Ok(L2Entry::Normal { host, copied, .. }) = geo.decode_l2(raw, bitmap) else {
                    continue;
                };
                if host == 0 {
                    continue;
                }
                let rc = rc_of(host);
                if (rc == 1) != copied {
                    count += 1;
                    let label = if fix { "Repairing" } else { "ERROR" };
                    msgs.push(format!(
                        "{label} OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={rc}"
                    ));
                    if fix {
                        let new = if rc == 1 {
                            raw | OFLAG_COPIED
                        } else {
                            raw & !OFLAG_COPIED
                        };
                        m.set_raw_entry(l2off, j as u64, new, bitmap)
                            .map_err(|er| self.err(er))?;
                    }
                }
            }
        }
        if fix && count > 0 {
            m.flush_metadata().map_err(|er| self.err(er))?;
        }
        Ok((msgs, count))
    }

    /// Write fresh refcount structures for `refs` (which counts the old refcount table
    /// and blocks; those are dropped) after the last used cluster, then switch the
    /// header to them in one write.
    fn rebuild_refcounts(&self, m: &mut Meta, refs: &[u32]) -> Result<()> {
        let cs = m.cluster_size();
        let epb = m.rb_entries();
        let per_cluster = cs / 8;
        let mut refs: Vec<u64> = refs.iter().map(|&r| u64::from(r)).collect();
        // Drop the old refcount structures' own references.
        let old_rt = m.h.refcount_table_offset / cs;
        for c in old_rt..old_rt + u64::from(m.h.refcount_table_clusters) {
            if let Some(r) = refs.get_mut(c as usize) {
                *r = r.saturating_sub(1);
            }
        }
        for &e in &m.reftable {
            let off = e & !REFTABLE_RESERVED;
            if off != 0 && off.is_multiple_of(cs) {
                if let Some(r) = refs.get_mut((off / cs) as usize) {
                    *r = r.saturating_sub(1);
                }
            }
        }
        let end = refs
            .iter()
            .rposition(|&r| r > 0)
            .map_or(1, |i| i as u64 + 1);
        let start = end.max(m.storage.size().map_err(|e| self.err(e))?.div_ceil(cs));
        // Fixed point: blocks and table clusters placed at `start` must count themselves.
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let total = start + blocks + table;
            let b2 = total.div_ceil(epb);
            let t2 = b2.div_ceil(per_cluster).max(1);
            if b2 == blocks && t2 == table {
                break;
            }
            blocks = b2;
            table = t2;
        }
        refs.resize((start + blocks + table) as usize, 0);
        for c in start..start + blocks + table {
            refs[c as usize] = 1;
        }
        let order = m.h.refcount_order;
        let max = m.max_refcount();
        let mut reftable = vec![0u64; (table * per_cluster) as usize];
        for b in 0..blocks {
            let mut block = vec![0u8; cs as usize];
            for i in 0..epb {
                let c = b * epb + i;
                if let Some(&v) = refs.get(c as usize) {
                    rb_set(&mut block, order, i as usize, v.min(max));
                }
            }
            let off = (start + b) * cs;
            m.storage.write_at(&block, off).map_err(|e| self.err(e))?;
            reftable[b as usize] = off;
        }
        let table_off = (start + blocks) * cs;
        let mut bytes = Vec::with_capacity((table * cs) as usize);
        for e in &reftable {
            bytes.extend_from_slice(&e.to_be_bytes());
        }
        m.storage
            .write_at(&bytes, table_off)
            .map_err(|e| self.err(e))?;
        m.storage.flush().map_err(|e| self.err(e))?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(table as u32).to_be_bytes());
        m.storage.write_at(&hdr, 48).map_err(|e| self.err(e))?;
        m.storage.flush().map_err(|e| self.err(e))?;
        m.h.refcount_table_offset = table_off;
        m.h.refcount_table_clusters = table as u32;
        m.reftable = reftable;
        m.rb =
            super::cache::TableCache::new((super::meta::REFBLOCK_CACHE_BYTES / cs).max(8) as usize);
        m.free_hint = 1;
        Ok(())
    }

    /// End of the last cluster with a non-zero refcount.
    pub fn image_end_offset(&self) -> Result<u64> {
        let mut m = self.lock();
        let cs = m.cluster_size();
        let epb = m.rb_entries();
        let mut highest = 0u64;
        for idx in 0..m.reftable.len() as u64 {
            if m.refblock_offset(idx).map_err(|e| self.err(e))? == 0 {
                continue;
            }
            for i in 0..epb {
                let c = idx * epb + i;
                if m.refcount(c).map_err(|e| self.err(e))? > 0 {
                    highest = c + 1;
                }
            }
        }
        Ok(highest * cs)
    }
}
