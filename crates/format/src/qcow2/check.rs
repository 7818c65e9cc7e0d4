//! Consistency check and repair, with qemu-img's counts and messages.
//!
//! The check counts every reference the image holds (header, L1/L2 tables, data and
//! compressed clusters, snapshots, refcount structures, bitmaps), compares the counts
//! with the stored refcounts, and verifies the COPIED flags.
//!
//! Entries are judged as qemu-img judges them: an entry with reserved bits, an
//! unaligned offset or a bad subcluster bitmap is a corruption, and the cluster it
//! names still counts as referenced, so a repair never frees a cluster that any entry
//! points to. A reference reaching a cluster or more past the end of the file is a
//! corruption that is not counted (nothing can make it valid). Repair fixes
//! refcounts (leaks only, or all), COPIED flags and incomplete snapshot entries; when
//! a referenced cluster has refcount 0 or the refcount blocks are unusable or shared,
//! it rebuilds the refcount structures in a fresh area, clear of every cluster any
//! entry names, and switches the header to them. Invalid entries are left as they
//! are, as qemu-img leaves them.

mod count;
mod rebuild;

use super::entries::{OFFSET_MASK, OFLAG_COPIED};
use super::header::{self, SnapshotTableFault};
use super::image::Qcow2Image;
use super::meta::Meta;
use super::refcount::REFTABLE_RESERVED;
use crate::units::{index, ClusterIndex, HostOffset};
use crate::{BlockDevice, Result};
use count::{classify, words, Counter, Kind};

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
    /// Set when qemu-img's check stops at this point with an error (its text, as
    /// `strerror` words it) after printing `messages`, and reports no counts: a
    /// repair of leaks only that finds the refcount structures need a rebuild.
    pub failure: Option<&'static str>,
    /// Indexes into `messages` of the lines qemu-img prints as errors of its
    /// own, with its name before them ("qemu-img: ERROR snapshot table too large").
    pub own_errors: Vec<usize>,
}

/// Whether qemu-img, when its repair replaces the snapshot table, fails to free
/// the old one (and says so): its check does not count a table reaching a
/// cluster or more past the end of the file, so a cluster of it keeps the
/// stored refcount of 0, which cannot drop. strata's repair reserves such
/// clusters (see [`reserved_beyond`]) and frees them without a failure, to the
/// same refcounts; only qemu-img's line is missing, which this predicts. A
/// refcount that cannot be read predicts nothing (the check reports it).
fn old_table_free_fails(m: &mut Meta) -> Result<bool> {
    let cs = m.cluster_size();
    let off = m.h.snapshots_offset;
    let size = m.snapshot_table_len();
    let file_len = m.storage.size()?;
    let Some(end) = off.checked_add(size) else {
        return Ok(false);
    };
    if off == 0 || size == 0 || end < file_len.saturating_add(cs) {
        return Ok(false);
    }
    for c in off / cs..end.div_ceil(cs) {
        match m.refcount(ClusterIndex(c)) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(_) => return Ok(false),
        }
    }
    Ok(false)
}

/// Bytes of snapshot extra data a version 3 image must record (the 64-bit VM-state
/// size and the disk size); shorter entries are incomplete.
const SNAPSHOT_EXTRA_V3: usize = 16;

impl Qcow2Image {
    /// Check the image and, if asked, repair it. Returns the report of the final state
    /// (after repair, the image is checked again, as qemu-img does).
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        let _excl = self.exclusive();
        let mut m = self.lock()?;
        let repairing = repair != Repair::None && !m.read_only;
        let repair_all = repairing && repair == Repair::All;
        // What a full repair discards as it reads the snapshot table, named
        // before anything is counted: the entries past the limit of 65536,
        // extra data past 1024 bytes, and the entries past 64 MiB.
        let mut head = Vec::new();
        let mut reduced = 0u32;
        let fault = m.h.snapshot_table_fault();
        if !fault.is_none() {
            let cut_only =
                fault.overhanging > 0 && m.h.snapshot_table_fault_within_limit().is_none();
            if !(repair_all && cut_only) {
                return Ok(snapshot_table_failure(fault, repair_all));
            }
            head.push(format!(
                "Discarding {} overhanging snapshots",
                fault.overhanging
            ));
            reduced += fault.overhanging;
        }
        let dropped = m.snapshot_extra_dropped.clone();
        if let Some(&(first, _)) = dropped.first() {
            if !repair_all {
                return Ok(table_read_failure(super::snapshot::too_much_extra(first)));
            }
            // Discarded when the table is rewritten below.
            head.extend(dropped.iter().map(|(i, len)| {
                format!(
                    "Discarding too much extra metadata in snapshot table entry {i} ({len} > {})",
                    super::snapshot::MAX_EXTRA_DATA
                )
            }));
        }
        let overhang = m.snapshot_overhang;
        if overhang > 0 {
            if !repair_all {
                return Ok(table_read_failure(super::snapshot::too_big(overhang)));
            }
            head.push(format!(
                "Discarding {overhang} overhanging snapshots (snapshot table is too big)"
            ));
            reduced += overhang;
        }
        if reduced > 0 {
            // The header counts only the entries kept before the refcounts are
            // counted: the table's tail and the discarded entries' tables leak,
            // and the count below frees them.
            let kept = m.h.nb_snapshots.min(header::MAX_SNAPSHOTS) - overhang;
            m.storage
                .write_at(&kept.to_be_bytes(), 60)
                .and_then(|()| m.storage.flush())
                .map_err(|e| self.err(e))?;
            m.h.nb_snapshots = kept;
            m.snapshot_overhang = 0;
        }
        if !m.read_only {
            m.flush_metadata().map_err(|e| self.err(e))?;
        }
        let free_fails = old_table_free_fails(&mut m).map_err(|e| self.err(e))?;
        let mut report =
            self.check_locked(&mut m, if repairing { repair } else { Repair::None })?;
        report.corruptions_fixed += u64::from(reduced);
        if !head.is_empty() {
            let n = head.len();
            report.messages.splice(0..0, head);
            report.own_errors.iter_mut().for_each(|i| *i += n);
        }
        if report.failure.is_some() {
            return Ok(report);
        }
        if repairing && repair == Repair::All && report.check_errors == 0 {
            let completed = self.complete_snapshots(&mut m)?;
            if completed > 0 && free_fails {
                report
                    .messages
                    .push("qcow2_free_clusters failed: Invalid argument".into());
            }
            if completed > 0 {
                // The new table may lie past the old end of the file and bring
                // clusters there into view (a truncated image): count again and
                // fix what they show.
                let again = self.check_locked(&mut m, repair)?;
                report.corruptions_fixed += completed + again.corruptions_fixed;
                report.leaks_fixed += again.leaks_fixed;
                report.check_errors += again.check_errors;
                report.messages.extend(again.messages);
            }
        }
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
        // Refcounts are whole after a full repair that completed, or after any
        // repair that left nothing wrong: the dirty bit has done its work.
        let settled =
            report.check_errors == 0 && (repair == Repair::All || report.corruptions == 0);
        if repairing && settled {
            m.dirty_inherited = false;
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

    /// Indexes of the snapshot entries that lack the extra data a version 3 image
    /// must record.
    fn incomplete_snapshots(&self, m: &Meta) -> Vec<usize> {
        if m.h.version < 3 {
            return Vec::new();
        }
        (0..m.snapshots.len())
            .filter(|&i| m.snapshots[i].extra.len() < SNAPSHOT_EXTRA_V3)
            .collect()
    }

    /// Rewrite the snapshot table with complete entries (a missing disk size is the
    /// current one, as qemu-img records it). Returns the number of entries fixed.
    fn complete_snapshots(&self, m: &mut Meta) -> Result<u64> {
        let bad = self.incomplete_snapshots(m);
        // Entries whose extra data was cut to its first 1024 bytes when read.
        let cut = m.snapshot_extra_dropped.len() as u64;
        if bad.is_empty() && cut == 0 {
            return Ok(0);
        }
        let mut snaps = m.snapshots.clone();
        for &i in &bad {
            snaps[i].disk_size.get_or_insert(self.virtual_size());
        }
        m.replace_snapshot_table(snaps).map_err(|e| self.err(e))?;
        m.flush_metadata().map_err(|e| self.err(e))?;
        Ok(bad.len() as u64 + cut)
    }

    fn check_locked(&self, m: &mut Meta, repair: Repair) -> Result<CheckReport> {
        let cs = m.cluster_size();
        let mut report = CheckReport {
            total_clusters: self.virtual_size().div_ceil(cs),
            ..Default::default()
        };
        let mut messages = Vec::new();
        for i in self.incomplete_snapshots(m) {
            if repair == Repair::All {
                messages.push(format!("Repairing snapshot table entry {i} is incomplete"));
            } else {
                messages.push(format!("ERROR snapshot table entry {i} is incomplete"));
                report.corruptions += 1;
            }
        }
        let mut count = self.count_refs(m, repair)?;
        report.corruptions_fixed += count.ctr.fixed;
        let file_clusters = m.storage.size().map_err(|e| self.err(e))?.div_ceil(cs);
        let n = (count.ctr.refs.len() as u64).max(file_clusters);
        let mut stored = self.stored_refcounts(m, n)?;
        let reserve = reserved_beyond(&count.ctr.beyond, n, m.rb_entries());
        // A referenced cluster with refcount 0 is fixed by a rebuild, as qemu-img
        // does; so are unusable refcount blocks, and clusters past the end that
        // entries name but no refcount block describes.
        let rebuild = count.bad_blocks
            || (0..n).any(|c| stored[index(c)] == Some(0) && count.ctr.refs_of(c) > 0)
            || (repair == Repair::All
                && reserve.iter().any(|&(c, _)| {
                    m.refblock_offset(c / m.rb_entries())
                        .is_ok_and(HostOffset::is_none)
                }));
        if rebuild && repair == Repair::All {
            let (before, _) = self.compare(m, &mut count.ctr, &stored, Repair::None)?;
            let (old_corruptions, old_leaks) = (count.ctr.corruptions, before.leaks);
            messages.append(&mut count.ctr.messages);
            messages.push("Rebuilding refcount structure".into());
            let mut refs: Vec<u64> = count.ctr.refs.iter().map(|&r| u64::from(r)).collect();
            refs.resize(index(n).max(refs.len()), 0);
            // Clusters past the end that entries name stay out of the new
            // structures' way (they are counted as used).
            for &(c, want) in &reserve {
                if index(c) >= refs.len() {
                    refs.resize(index(c) + 1, 0);
                }
                refs[index(c)] = refs[index(c)].max(want.min(m.max_refcount()));
            }
            self.rebuild_refcounts(m, refs)?;
            // The old structures are referenced no more: the count finds them
            // leaked and frees them, as qemu-img does (its output names them).
            count = self.count_refs(m, Repair::None)?;
            let recounted = count.ctr.corruptions;
            let file_clusters = m.storage.size().map_err(|e| self.err(e))?.div_ceil(cs);
            let n = (count.ctr.refs.len() as u64).max(file_clusters);
            stored = self.stored_refcounts(m, n)?;
            let broken = (0..n).any(|c| stored[index(c)] == Some(0) && count.ctr.refs_of(c) > 0);
            let (after, fixed) = self.compare(m, &mut count.ctr, &stored, Repair::Leaks)?;
            for (c, v) in fixed {
                stored[index(c)] = Some(v);
            }
            if broken {
                count
                    .ctr
                    .messages
                    .push("ERROR rebuilt refcount structure is still broken".into());
            }
            count.ctr.corruptions = recounted;
            report.corruptions_fixed += old_corruptions.saturating_sub(recounted);
            report.leaks_fixed += old_leaks;
            report.leaks += after.leaks;
            report.check_errors += after.check_errors;
            report.image_end_offset = after.image_end_offset;
        } else {
            if rebuild && repair == Repair::Leaks {
                // qemu-img compares first, then gives up with an I/O error.
                self.compare(m, &mut count.ctr, &stored, Repair::None)?;
                messages.append(&mut count.ctr.messages);
                messages.push("ERROR need to rebuild refcount structures".into());
                report.check_errors += 1;
                report.messages = messages;
                report.failure = Some("Input/output error");
                return Ok(report);
            }
            let fix = if report.check_errors > 0 {
                Repair::None
            } else {
                repair
            };
            // qemu-img compares once without fixing (its lines are printed),
            // and again, fixing, when that found anything wrong.
            let counted = count.ctr.corruptions;
            let (mut r, mut fixed) = self.compare(m, &mut count.ctr, &stored, Repair::None)?;
            if fix != Repair::None && (r.leaks > 0 || count.ctr.corruptions > 0) {
                count.ctr.corruptions = counted;
                (r, fixed) = self.compare(m, &mut count.ctr, &stored, fix)?;
            }
            for (c, v) in fixed {
                stored[index(c)] = Some(v);
            }
            if fix == Repair::All {
                for &(c, want) in &reserve {
                    let want = want.min(m.max_refcount());
                    let have = m.refcount(ClusterIndex(c)).map_err(|e| self.err(e))?;
                    if have < want {
                        m.update_refcount(ClusterIndex(c), (want - have) as i64)
                            .map_err(|e| self.err(e))?;
                    }
                }
            }
            report.leaks += r.leaks;
            report.check_errors += r.check_errors;
            report.leaks_fixed += r.leaks_fixed;
            report.corruptions_fixed += r.corruptions_fixed;
            report.image_end_offset = r.image_end_offset;
        }
        report.allocated_clusters = count.frag.allocated;
        report.fragmented_clusters = count.frag.fragmented;
        report.compressed_clusters = count.frag.compressed;
        // COPIED flags (after refcount repair, against the now-stored counts). With
        // `-r leaks` they are fixed only when the refcounts are now right.
        let fix_copied = match repair {
            Repair::All => true,
            Repair::Leaks => {
                report.check_errors == 0 && count.ctr.corruptions == 0 && report.leaks == 0
            }
            Repair::None => false,
        };
        let copied = self.check_copied(m, fix_copied, &stored)?;
        if copied.failed {
            messages.append(&mut count.ctr.messages);
            messages.extend(copied.messages);
            report.messages = messages;
            report.check_errors += 1;
            report.failure = Some("Input/output error");
            return Ok(report);
        }
        report.corruptions_fixed += copied.fixed;
        report.check_errors += copied.check_errors;
        count.ctr.corruptions += copied.found - copied.fixed;
        count.ctr.messages.extend(copied.messages);
        report.corruptions += count.ctr.corruptions;
        messages.append(&mut count.ctr.messages);
        report.messages = messages;
        Ok(report)
    }

    /// Compare the counted references with the stored refcounts; with `fix`, fix
    /// in place what may be fixed (never a refcount of 0: that needs a rebuild),
    /// discarding the clusters a fix frees.
    /// Returns the leaks and fixed counts, and the refcounts written.
    fn compare(
        &self,
        m: &mut Meta,
        ctr: &mut Counter,
        stored: &[Option<u64>],
        fix: Repair,
    ) -> Result<(CheckReport, Vec<(u64, u64)>)> {
        let mut r = CheckReport::default();
        let mut highest = 0u64;
        let mut fixes = Vec::new();
        for c in 0..stored.len() as u64 {
            let Some(have) = stored[index(c)] else {
                if !ctr.signaled && ctr.repair != Repair::All {
                    ctr.signaled = true;
                    self.signal_unaligned_refblock(m, c, &mut ctr.messages)?;
                }
                ctr.messages.push(format!(
                    "Can't get refcount for cluster {c}: Input/output error"
                ));
                r.check_errors += 1;
                continue;
            };
            let want = ctr.refs_of(c);
            if have > 0 || want > 0 {
                highest = c + 1;
            }
            if have == want {
                continue;
            }
            let fixing = have != 0
                && match fix {
                    Repair::All => true,
                    Repair::Leaks => have > want,
                    Repair::None => false,
                };
            let label = if fixing {
                "Repairing"
            } else if have < want {
                "ERROR"
            } else {
                "Leaked"
            };
            ctr.messages.push(format!(
                "{label} cluster {c} refcount={have} reference={want}"
            ));
            if fixing {
                let cur = m.refcount(ClusterIndex(c)).map_err(|e| self.err(e))?;
                m.update_refcount(ClusterIndex(c), want as i64 - cur as i64)
                    .map_err(|e| self.err(e))?;
                if want == 0 {
                    // A freed cluster is given back to the file system, as
                    // qemu-img's repair does (nothing references it).
                    let cs = m.cluster_size();
                    m.storage.discard(c * cs, cs).map_err(|e| self.err(e))?;
                }
                fixes.push((c, want));
                if have < want {
                    r.corruptions_fixed += 1;
                } else {
                    r.leaks_fixed += 1;
                }
            } else if have < want {
                ctr.corruptions += 1;
            } else {
                r.leaks += 1;
            }
        }
        // qemu-img's end is one cluster at least, even when no refcount
        // could be read.
        r.image_end_offset = highest.max(1) * m.cluster_size();
        Ok((r, fixes))
    }

    /// qemu-img's corruption event for the refcount block of cluster `c`, whose
    /// offset is not cluster aligned, raised when the comparison first fails to
    /// read it. A read-only check only reports it; a repair of leaks (which then
    /// gives up: the structures need a rebuild) also marks the image corrupt, as
    /// qemu-img does. A full repair rebuilds the structures instead, where
    /// qemu-img marks the image and fails its rebuild's first write: strata's
    /// repair is kept there.
    fn signal_unaligned_refblock(&self, m: &mut Meta, c: u64, out: &mut Vec<String>) -> Result<()> {
        let b = c / m.rb_entries();
        let off = m
            .reftable
            .get(index(b))
            .map_or(0, |e| e & !REFTABLE_RESERVED);
        // C's `%#x`: no prefix for zero.
        let b = if b == 0 {
            "0".to_string()
        } else {
            format!("{b:#x}")
        };
        let what = format!("Refblock offset {off:#x} unaligned (reftable index: {b})");
        if m.read_only {
            out.push(format!(
                "qcow2: Image is corrupt: {what}; further non-fatal corruption events will be suppressed"
            ));
            return Ok(());
        }
        out.push(format!(
            "qcow2: Marking image as corrupt: {what}; further corruption events will be suppressed"
        ));
        m.h.incompatible_features |= header::incompat::CORRUPT;
        m.write_incompat().map_err(|er| self.err(er))?;
        m.storage.flush().map_err(|er| self.err(er))
    }

    /// The stored refcounts of clusters `0..n`, each refcount block read once, as
    /// qemu-img reads them: a table entry's reserved bits are ignored, a block past
    /// the end of the file holds zeroes, and the clusters of a block whose offset is
    /// not cluster aligned cannot be read (`None`).
    fn stored_refcounts(&self, m: &mut Meta, n: u64) -> Result<Vec<Option<u64>>> {
        let epb = m.rb_entries();
        let cs = m.cluster_size();
        let order = m.h.refcount_order;
        let file_size = m.storage.size().map_err(|er| self.err(er))?;
        let mut out = vec![Some(0u64); index(n)];
        for b in 0..n.div_ceil(epb) {
            let Some(&e) = m.reftable.get(index(b)) else {
                break;
            };
            let e = e & !REFTABLE_RESERVED;
            let first = b * epb;
            if !e.is_multiple_of(cs) {
                out[index(first)..index((first + epb).min(n))].fill(None);
                continue;
            }
            if e == 0 || e >= file_size {
                continue;
            }
            m.load_refblock(HostOffset(e)).map_err(|er| self.err(er))?;
            let block = &m.rb.get(e).expect("loaded").data;
            for c in first..(first + epb).min(n) {
                out[index(c)] = Some(super::refcount::rb_get(block, order, index(c - first)));
            }
        }
        Ok(out)
    }

    /// Whether the cluster at `off` holds metadata an L2 table must not be written
    /// over (header, active L1 table, refcount table and blocks, snapshot table).
    fn overlaps_metadata(&self, m: &Meta, off: u64) -> bool {
        let cs = m.cluster_size();
        let c = off / cs;
        let within =
            |start: u64, len: u64| len > 0 && c >= start / cs && c <= (start + len - 1) / cs;
        c == 0
            || within(m.h.l1_table_offset, m.l1.len() as u64 * 8)
            || within(
                m.h.refcount_table_offset,
                u64::from(m.h.refcount_table_clusters) * cs,
            )
            || m.reftable.iter().any(|&e| e != 0 && e / cs == c)
            || within(m.h.snapshots_offset, m.snapshot_table_len())
            || m.h.crypto.is_some_and(|x| within(x.offset, x.length))
    }

    /// Verify (and with `fix`, correct) the COPIED flags of the active L1 and L2
    /// tables against `stored`, the refcounts now on disk. An L2 table that is not
    /// cluster aligned, or lies on other metadata, is reported and not written.
    fn check_copied(&self, m: &mut Meta, fix: bool, stored: &[Option<u64>]) -> Result<Copied> {
        let cs = m.cluster_size();
        let mut out = Copied::default();
        let geo = m.geo;
        let stride = if geo.extended_l2 { 2 } else { 1 };
        let file_size = m.storage.size().map_err(|er| self.err(er))?;
        let label = if fix { "Repairing" } else { "ERROR" };
        // Entries this repair has rewritten, by L2 table: an L2 table that several
        // L1 entries name is judged with its fixes on a later visit, as qemu-img
        // (which writes each table back at once) sees it.
        let mut rewritten = std::collections::HashMap::<u64, Vec<(usize, u64)>>::new();
        for i in 0..m.l1.len() {
            let e = m.l1[i];
            let l2off = e & OFFSET_MASK;
            if l2off == 0 {
                continue;
            }
            if let Some(rc) = self.stored_refcount(m, stored, l2off / cs) {
                if (rc == 1) != (e & OFLAG_COPIED != 0) {
                    out.found += 1;
                    out.messages.push(format!(
                        "{label} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                    ));
                    if fix && self.l1_overlaps_active_l2(m) {
                        // The L1 table is also named as an L2 table: writing it
                        // would damage that table. qemu-img marks the image corrupt
                        // and gives up.
                        out.messages.push("qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with active L2 table); further corruption events will be suppressed".into());
                        m.h.incompatible_features |= header::incompat::CORRUPT;
                        m.write_incompat().map_err(|er| self.err(er))?;
                        m.storage.flush().map_err(|er| self.err(er))?;
                        out.failed = true;
                        return Ok(out);
                    }
                    if fix {
                        m.l1[i] = if rc == 1 {
                            e | OFLAG_COPIED
                        } else {
                            e & !OFLAG_COPIED
                        };
                        m.write_l1_entry(i as u64).map_err(|er| self.err(er))?;
                        out.fixed += 1;
                    }
                }
            }
            if l2off >= file_size {
                continue;
            }
            let writable = l2off.is_multiple_of(cs) && !self.overlaps_metadata(m, l2off);
            let mut table = words(&self.read_padded(m, l2off, cs)?);
            for &(j, raw) in rewritten.get(&l2off).into_iter().flatten() {
                table[j * stride] = raw;
            }
            let mut wrong = Vec::new();
            for (j, w) in table.chunks_exact(stride).enumerate() {
                let (raw, bitmap) = (w[0], if stride == 2 { w[1] } else { 0 });
                let Kind::Host(host) = classify(&geo, raw) else {
                    continue;
                };
                // Every cluster of an external data file counts as referenced once.
                let rc = if geo.data_file {
                    Some(1)
                } else {
                    self.stored_refcount(m, stored, host / cs)
                };
                let Some(rc) = rc else {
                    continue;
                };
                if (rc == 1) != (raw & OFLAG_COPIED != 0) {
                    out.found += 1;
                    out.messages.push(format!(
                        "{label} OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={rc}"
                    ));
                    let new = if rc == 1 {
                        raw | OFLAG_COPIED
                    } else {
                        raw & !OFLAG_COPIED
                    };
                    wrong.push((j as u64, new, bitmap));
                }
            }
            if !fix || wrong.is_empty() {
                continue;
            }
            if !writable {
                out.messages.push(
                    "ERROR: Could not write L2 table; metadata overlap check failed: Input/output error"
                        .into(),
                );
                out.check_errors += 1;
                break;
            }
            for (j, new, bitmap) in wrong {
                m.set_raw_entry(HostOffset(l2off), j, new, bitmap)
                    .map_err(|er| self.err(er))?;
                rewritten.entry(l2off).or_default().push((index(j), new));
                out.fixed += 1;
            }
        }
        if fix && out.fixed > 0 {
            m.flush_metadata().map_err(|er| self.err(er))?;
        }
        Ok(out)
    }

    /// Whether an entry of the active L1 table names a cluster of the table
    /// itself as its L2 table.
    fn l1_overlaps_active_l2(&self, m: &Meta) -> bool {
        let cs = m.cluster_size();
        let start = m.h.l1_table_offset / cs;
        let end = (m.h.l1_table_offset + m.l1.len() as u64 * 8).div_ceil(cs);
        m.l1.iter()
            .map(|e| (e & OFFSET_MASK) / cs)
            .any(|c| c != 0 && (start..end).contains(&c))
    }

    /// The stored refcount of `cluster`: from `stored` when it covers the cluster,
    /// else read; `None` when it cannot be read (qemu-img then skips the entry).
    fn stored_refcount(&self, m: &mut Meta, stored: &[Option<u64>], cluster: u64) -> Option<u64> {
        match stored.get(index(cluster)) {
            Some(&v) => v,
            None => m.refcount(ClusterIndex(cluster)).ok(),
        }
    }

    /// Write new refcount structures for `refs` (every reference, those of the
    /// old refcount structures included) where qemu-img's rebuild puts them, in
    /// clusters no reference names, make them durable, then switch the header to
    /// them in one write. Until that write the old structures are in force and
    /// untouched, so a crash at any point leaves the image as it was.
    fn rebuild_refcounts(&self, m: &mut Meta, refs: Vec<u64>) -> Result<()> {
        let fresh = m.write_rebuilt_refcounts(refs).map_err(|e| self.err(e))?;
        m.storage.flush().map_err(|e| self.err(e))?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&fresh.table_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&fresh.table_clusters.to_be_bytes());
        m.storage.write_at(&hdr, 48).map_err(|e| self.err(e))?;
        m.storage.flush().map_err(|e| self.err(e))?;
        m.adopt_refcounts(fresh);
        Ok(())
    }

    /// The references the image holds, refcount structures excepted (what a fresh
    /// refcount structure must describe), counted from what is on disk under the
    /// in-memory header, L1 table and snapshot list; `None` when the count finds
    /// any corruption (then no fresh structure may be built from it).
    pub(crate) fn references_for_fresh_refcounts(&self, m: &mut Meta) -> Result<Option<Vec<u64>>> {
        let count = self.count_refs(m, Repair::None)?;
        if count.ctr.corruptions > 0 || !count.ctr.beyond.is_empty() {
            return Ok(None);
        }
        Ok(Some(count.base.iter().map(|&r| u64::from(r)).collect()))
    }

    /// End of the last cluster with a non-zero refcount.
    pub fn image_end_offset(&self) -> Result<u64> {
        let mut m = self.lock()?;
        let cs = m.cluster_size();
        let epb = m.rb_entries();
        let mut highest = 0u64;
        for idx in 0..m.reftable.len() as u64 {
            if m.refblock_offset(idx).map_err(|e| self.err(e))?.is_none() {
                continue;
            }
            for i in 0..epb {
                let c = idx * epb + i;
                if m.refcount(ClusterIndex(c)).map_err(|e| self.err(e))? > 0 {
                    highest = c + 1;
                }
            }
        }
        Ok(highest * cs)
    }
}

/// The check of an image whose snapshot table cannot be read where the header
/// puts it: qemu-img's lines, and its failure, before anything else is counted.
/// Entries past the limit are named (a full repair names them discarded) ahead
/// of an offset that is invalid, or a table that cannot be read. Nothing is
/// changed. (A full repair of a table whose only fault is its length goes on:
/// see [`Qcow2Image::check`].)
fn snapshot_table_failure(fault: SnapshotTableFault, repair_all: bool) -> CheckReport {
    let mut r = CheckReport {
        check_errors: 1,
        ..Default::default()
    };
    let n = fault.overhanging;
    if n > 0 && !repair_all {
        r.own_errors.push(r.messages.len());
        r.messages.push("ERROR snapshot table too large".into());
        r.messages.push(format!(
            "You can force-remove all {n} overhanging snapshots with qemu-img check -r all"
        ));
        r.failure = Some("File too large");
        return r;
    }
    if n > 0 {
        r.messages
            .push(format!("Discarding {n} overhanging snapshots"));
    }
    r.own_errors.push(r.messages.len());
    if fault.offset_invalid {
        r.messages
            .push("ERROR snapshot table offset invalid".into());
        r.failure = Some("Invalid argument");
    } else {
        r.messages.push("ERROR failed to read the snapshot table: Failed to read snapshot table: Input/output error".into());
        r.failure = Some("Input/output error");
    }
    r
}

/// The check of an image whose snapshot table a check may read only to
/// repair it (anything but `-r all`): more than 1024 bytes of extra data in an
/// entry, or a table past 64 MiB. qemu-img's error (`why`, with its hint) and
/// its failure, with nothing counted.
fn table_read_failure(why: String) -> CheckReport {
    CheckReport {
        check_errors: 1,
        messages: vec![format!("ERROR failed to read the snapshot table: {why}")],
        own_errors: vec![0],
        failure: Some("File too large"),
        ..Default::default()
    }
}

/// What the COPIED check found.
#[derive(Default)]
struct Copied {
    messages: Vec<String>,
    found: u64,
    fixed: u64,
    check_errors: u64,
    /// A fix would have written metadata over other metadata: the image was
    /// marked corrupt instead and the check fails.
    failed: bool,
}

/// The clusters past the end of the file (`n` clusters are checked) that entries
/// name, up to two refcount blocks' reach (`per_block` clusters each) past it,
/// with the number of references to each. A repair gives them that refcount so
/// that no allocation hands them out while entries still point there (a write
/// elsewhere must not show up in them), and so that they are right once the file
/// grows over them. qemu-img does not compare refcounts past the end of the file.
pub(crate) fn reserved_beyond(
    beyond: &[(u64, u64, u32)],
    n: u64,
    per_block: u64,
) -> Vec<(u64, u64)> {
    let limit = n.saturating_add(2 * per_block);
    let mut counts = std::collections::BTreeMap::<u64, u64>::new();
    for &(first, last, weight) in beyond.iter().filter(|&&(first, _, _)| first < limit) {
        for c in first.max(n)..=last.min(limit - 1) {
            *counts.entry(c).or_default() += u64::from(weight);
        }
    }
    counts.into_iter().collect()
}
