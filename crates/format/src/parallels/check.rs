//! `qemu-img check -f parallels` and its repairs, as QEMU's driver makes
//! them: the unclean mark, the data offset, clusters outside the file,
//! space leaked past the last cluster, clusters two BAT entries share.

use super::header::SECTOR;
use super::image::{ParallelsImage, State};
use super::used::{MarkError, UsedMap};
use crate::qcow2::CheckReport;
use crate::units::index;
use crate::{BlockDevice, Result};
use strata_storage::sync;

/// The most message lines a check keeps (a hostile BAT can make hundreds of
/// millions; the counts still count them all).
pub const MAX_KEPT_MESSAGES: usize = 1 << 20;

/// What a check may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fix {
    /// Corruptions (`-r all`).
    pub errors: bool,
    /// Leaks (`-r leaks` and `-r all`).
    pub leaks: bool,
}

/// One pass of the check: its counts and the lines QEMU prints.
#[derive(Debug, Default)]
struct Pass {
    r: CheckReport,
}

impl Pass {
    fn say(&mut self, fix: bool, what: std::fmt::Arguments) {
        if self.r.messages.len() < MAX_KEPT_MESSAGES {
            let verb = if fix { "Repairing" } else { "ERROR" };
            self.r.messages.push(format!("{verb} {what}"));
        }
    }
}

impl ParallelsImage {
    /// Check the image and repair what `fix` allows, as `qemu-img check
    /// [-r leaks|all]` does: a repair that fixed something is followed by a
    /// second pass that repairs nothing, whose counts the report gives (with
    /// the first pass's fixed counts, and both passes' lines).
    pub fn check(&self, fix: Fix) -> Result<CheckReport> {
        let fix = if self.read_only() {
            Fix::default()
        } else {
            fix
        };
        let first = self.check_pass(fix)?;
        if first.corruptions_fixed == 0 && first.leaks_fixed == 0 {
            return Ok(first);
        }
        let mut second = self.check_pass(Fix::default())?;
        let mut messages = first.messages;
        messages.append(&mut second.messages);
        second.messages = messages;
        second.corruptions_fixed = first.corruptions_fixed;
        second.leaks_fixed = first.leaks_fixed;
        Ok(second)
    }

    /// The repair QEMU makes when it opens for writing an image that needs
    /// one: every fix, its lines returned.
    pub(super) fn repair_at_open(&self) -> Result<Vec<String>> {
        let r = self.check_pass(Fix {
            errors: true,
            leaks: true,
        })?;
        Ok(r.messages)
    }

    /// One pass of QEMU's check.
    fn check_pass(&self, fix: Fix) -> Result<CheckReport> {
        let mut p = Pass::default();
        let mut st = sync::write(&self.state);
        // Not closed cleanly: closing will clear the mark.
        if st.unclean {
            p.say(fix.errors, format_args!("image was not closed correctly"));
            p.r.corruptions += 1;
            if fix.errors {
                p.r.corruptions_fixed += 1;
                st.unclean = false;
            }
        }
        // QEMU sizes the file in whole sectors.
        let file_len = self.storage.size()?.next_multiple_of(SECTOR);
        self.check_data_off(&mut st, &mut p, fix, file_len);
        self.check_outside(&mut st, &mut p, fix, file_len);
        self.check_leak(&mut st, &mut p, fix, true)?;
        self.check_duplicates(&mut st, &mut p, fix)?;
        self.statistics(&st, &mut p);
        if !self.read_only() {
            self.write_bat(&mut st)?;
            if fix.errors || fix.leaks {
                self.write_header(&st)?;
            }
        }
        drop(st);
        if !self.read_only() {
            self.storage.flush()?;
        }
        Ok(p.r)
    }

    fn check_data_off(&self, st: &mut State, p: &mut Pass, fix: Fix, file_len: u64) {
        let recorded = super::header::le32(&st.head, super::header::OFF_DATA_OFF);
        let (start, ok) = self
            .header
            .data_start_with(recorded, file_len.div_ceil(SECTOR));
        if ok {
            return;
        }
        p.r.corruptions += 1;
        if fix.errors {
            // Only the header changes: QEMU keeps placing clusters from the
            // data start it opened the image with.
            Self::set_data_off(st, start);
            self.fill_used(st, file_len);
            p.r.corruptions_fixed += 1;
        }
        p.say(
            fix.errors,
            format_args!("data_off field has incorrect value"),
        );
    }

    fn check_outside(&self, st: &mut State, p: &mut Pass, fix: Fix, file_len: u64) {
        let cs = self.header.cluster_size();
        let mut high = 0u64;
        for i in 0..self.header.bat_entries {
            let off = self.bat_offset(st, i);
            if off + cs > file_len {
                p.say(fix.errors, format_args!("cluster {i} is outside image"));
                p.r.corruptions += 1;
                if fix.errors {
                    Self::set_bat(st, i, 0);
                    p.r.corruptions_fixed += 1;
                }
                continue;
            }
            high = high.max(off);
        }
        if high == 0 {
            p.r.image_end_offset = st.data_end * SECTOR;
        } else {
            p.r.image_end_offset = high + cs;
            st.data_end = p.r.image_end_offset / SECTOR;
        }
    }

    fn check_leak(&self, st: &mut State, p: &mut Pass, fix: Fix, explicit: bool) -> Result<()> {
        let _ = st;
        let size = self.storage.size()?.next_multiple_of(SECTOR);
        let end = p.r.image_end_offset;
        if size <= end {
            return Ok(());
        }
        let count = (size - end).div_ceil(self.header.cluster_size());
        if explicit {
            p.say(
                fix.leaks,
                format_args!("space leaked at the end of the image {}", size - end),
            );
            p.r.leaks += count;
        }
        if fix.leaks {
            self.storage.set_size(end)?;
            if explicit {
                p.r.leaks_fixed += count;
            }
        }
        Ok(())
    }

    fn check_duplicates(&self, st: &mut State, p: &mut Pass, fix: Fix) -> Result<()> {
        let cs = self.header.cluster_size();
        let Some(mut size) = self.host_cluster_index(st, p.r.image_end_offset) else {
            return Ok(());
        };
        if size == 0 {
            return Ok(());
        }
        if !p.r.image_end_offset.is_multiple_of(cs) {
            size += 1;
        }
        let mut seen = UsedMap::new(size);
        let mut fixed = false;
        let mut buf: Vec<u8> = Vec::new();
        for i in 0..self.header.bat_entries {
            let off = self.bat_offset(st, i);
            if off == 0 {
                continue;
            }
            let marked = match self.host_cluster_index(st, off) {
                Some(c) => seen.mark(c, 1),
                None => Err(MarkError::TooBig),
            };
            if marked != Err(MarkError::Busy) {
                continue;
            }
            p.say(
                fix.errors,
                format_args!("duplicate offset in BAT entry {i}"),
            );
            p.r.corruptions += 1;
            if !fix.errors {
                continue;
            }
            // A copy of the shared cluster in a new one for this entry.
            let saved = super::image::bat_get(&st.head, i);
            Self::set_bat(st, i, 0);
            if buf.is_empty() {
                buf = vec![0u8; index(cs)];
            }
            let restore = |st: &mut State| Self::set_bat(st, i, saved);
            if self.storage.read_at(&mut buf, off).is_err() {
                p.r.check_errors += 1;
                restore(st);
                break;
            }
            let tracks = u64::from(self.header.tracks);
            let host = match self.allocate(st, u64::from(i) * tracks, tracks) {
                Ok((h, _)) => h * SECTOR,
                Err(_) => {
                    p.r.check_errors += 1;
                    restore(st);
                    break;
                }
            };
            if self.storage.write_at(&buf, host).is_err() {
                p.r.check_errors += 1;
                restore(st);
                break;
            }
            p.r.image_end_offset = p.r.image_end_offset.max(host + cs);
            if let Some(c) = self.host_cluster_index(st, host) {
                if seen.mark(c, 1) == Err(MarkError::Busy) {
                    p.r.check_errors += 1;
                    restore(st);
                    break;
                }
            }
            fixed = true;
            p.r.corruptions_fixed += 1;
        }
        if fixed {
            self.check_leak(st, p, fix, false)?;
        }
        Ok(())
    }

    fn statistics(&self, st: &State, p: &mut Pass) {
        let cs = self.header.cluster_size();
        p.r.total_clusters = u64::from(self.header.bat_entries);
        let mut prev = 0u64;
        for i in 0..self.header.bat_entries {
            let off = self.bat_offset(st, i);
            if off == 0 || off + cs > p.r.image_end_offset {
                prev = 0;
                continue;
            }
            if prev != 0 && prev + cs != off {
                p.r.fragmented_clusters += 1;
            }
            prev = off;
            p.r.allocated_clusters += 1;
        }
    }
}
