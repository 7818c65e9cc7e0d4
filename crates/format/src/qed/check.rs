//! `check` of a qed image, as QEMU's qed driver checks it: every L2 table
//! and data cluster the tables point at must be a valid cluster of the file
//! and used once; clusters nothing points at are leaks. Repair drops the
//! entries that point outside the file (leaks are only counted) and, when no
//! corruption is left, clears the need-check flag.

use super::header::{Header, F_NEED_CHECK};
use super::image::{QedImage, State, ZERO_CLUSTER};
use crate::qcow2::CheckReport;
use crate::units::index;
use crate::Result;

/// The cluster index QEMU's check files an offset under: the offset rounded
/// up to a cluster, divided by one less than the cluster size (QEMU's
/// formula, exact below `cluster_size * (cluster_size - 1)` bytes and kept
/// beyond it so that the counts stay QEMU's).
fn cluster_index(h: &Header, bytes: u64) -> u64 {
    let cs = u64::from(h.cluster_size);
    bytes.saturating_add(cs - 1) / cs * cs / (cs - 1)
}

/// The clusters seen referenced, one bit each.
struct Used {
    bits: Vec<u64>,
    len: u64,
}

impl Used {
    fn new(len: u64) -> Used {
        Used {
            bits: vec![0; index(len.div_ceil(64))],
            len,
        }
    }
    /// Mark `n` clusters from index `first`; returns how many were marked already.
    fn mark(&mut self, first: u64, n: u64) -> u64 {
        let mut again = 0;
        for c in first..first.saturating_add(n) {
            if c >= self.len {
                break;
            }
            let (w, b) = (index(c / 64), c % 64);
            if self.bits[w] & (1 << b) != 0 {
                again += 1;
            }
            self.bits[w] |= 1 << b;
        }
        again
    }
    fn is_set(&self, c: u64) -> bool {
        c < self.len && self.bits[index(c / 64)] & (1 << (c % 64)) != 0
    }
}

/// One pass of the check over the state (`fix`: repair as it goes).
fn check_pass(img: &QedImage, st: &mut State, fix: bool) -> Result<CheckReport> {
    let h = st.header;
    let cs = u64::from(h.cluster_size);
    let file_size = st.file_size;
    let mut r = CheckReport {
        total_clusters: h.image_size.div_ceil(cs),
        ..CheckReport::default()
    };
    let nclusters = cluster_index(&h, file_size);
    let mut used = Used::new(nclusters);
    let table_clusters = u64::from(h.table_size);
    r.corruptions += used.mark(cluster_index(&h, h.l1_table_offset), table_clusters);
    let mut invalid_l1 = 0u64;
    let mut ok = true;
    for i in 0..st.l1.len() {
        let l2_offset = st.l1[i];
        if l2_offset == 0 {
            continue;
        }
        if !h.table_offset_valid(l2_offset, file_size) {
            if fix {
                st.l1[i] = 0;
                r.corruptions_fixed += 1;
            } else {
                r.corruptions += 1;
            }
            invalid_l1 += 1;
            continue;
        }
        let again = used.mark(cluster_index(&h, l2_offset), table_clusters);
        r.corruptions += again;
        if again > 0 {
            continue;
        }
        let table = match st.l2_table(img.storage().as_ref(), l2_offset) {
            Ok(t) => t,
            Err(_) => {
                r.check_errors += 1;
                ok = false;
                continue;
            }
        };
        let mut invalid_l2 = 0u64;
        let mut last = 0u64;
        for e in table.iter_mut() {
            let off = *e;
            if off == 0 || off == ZERO_CLUSTER {
                continue;
            }
            r.allocated_clusters += 1;
            if last != 0 && last.wrapping_add(cs) != off {
                r.fragmented_clusters += 1;
            }
            last = off;
            if !h.cluster_offset_valid(off, file_size) {
                if fix {
                    *e = 0;
                    r.corruptions_fixed += 1;
                } else {
                    r.corruptions += 1;
                }
                invalid_l2 += 1;
                continue;
            }
            r.corruptions += used.mark(cluster_index(&h, off), 1);
        }
        if invalid_l2 > 0 && fix {
            let t = table.clone();
            if img.write_entries(&t, 0, t.len(), l2_offset).is_err() {
                r.check_errors += 1;
                ok = false;
            }
        }
    }
    if invalid_l1 > 0 && fix {
        let l1 = st.l1.clone();
        if img
            .write_entries(&l1, 0, l1.len(), h.l1_table_offset)
            .is_err()
        {
            r.check_errors += 1;
            ok = false;
        }
    }
    if ok {
        r.leaks = (u64::from(h.header_size)..nclusters)
            .filter(|&c| !used.is_set(c))
            .count() as u64;
        if fix && r.corruptions == 0 && r.check_errors == 0 && st.header.needs_check() {
            img.storage().flush()?;
            st.header.features &= !F_NEED_CHECK;
            img.write_header(&st.header)?;
        }
    }
    Ok(r)
}

impl QedImage {
    /// Check the image as QEMU's qed check does; with `fix`, drop invalid
    /// table entries and, if nothing is left corrupt, clear the need-check
    /// flag. The counts are those of this one pass.
    pub fn check(&self, fix: bool) -> Result<CheckReport> {
        let mut st = self.lock();
        let r = check_pass(self, &mut st, fix).map_err(|e| self.err(e))?;
        if fix {
            st.drop_l2_cache();
        }
        Ok(r)
    }

    /// `qemu-img check [-r]`'s report: a repair (`repair`) that fixed
    /// something is followed by a second, read-only pass whose counts are
    /// reported with the first pass's fixes, as qemu-img reports them.
    pub fn check_report(&self, repair: bool) -> Result<CheckReport> {
        let first = self.check(repair)?;
        if first.corruptions_fixed == 0 && first.leaks_fixed == 0 {
            return Ok(first);
        }
        let mut again = self.check(false)?;
        again.corruptions_fixed = first.corruptions_fixed;
        again.leaks_fixed = first.leaks_fixed;
        Ok(again)
    }
}
