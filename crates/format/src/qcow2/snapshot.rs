//! The internal-snapshot table: parsing within QEMU's limits, and serialisation.

use super::header::{be32, be64, check_table, MAX_L1_BYTES};
use crate::units::{header_u32, index};
use crate::{Error, ErrorKind, Result};
use strata_storage::Storage;

pub const MAX_EXTRA_DATA: u32 = 1024;
/// QEMU's refusal of a snapshot whose L1 table holds more than 32 MiB.
pub const L1_TOO_LARGE: &str = "Snapshot L1 table too large";
/// QEMU's refusal of a snapshot whose L1 table offset is not cluster-aligned.
pub const L1_OFFSET_INVALID: &str = "Snapshot L1 table offset invalid";
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One internal snapshot as QEMU records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// VM-state size (the 64-bit extra-data field when present, else the 32-bit one).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken (extra data), if recorded.
    pub disk_size: Option<u64>,
    /// Instruction count (extra data), if recorded; -1 means none.
    pub icount: Option<u64>,
    /// The whole extra-data area, kept so unknown fields survive a rewrite.
    pub extra: Vec<u8>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Read `count` snapshot entries at `offset`. Returns them and the table's byte size.
/// An entry's L1 table is not vetted here: as with QEMU, an image whose snapshot
/// L1 table is misplaced or too large opens, and only a use of that snapshot
/// (see [`Snapshot::usable_l1`]) is refused; a check reports the entry.
pub fn read_table(storage: &dyn Storage, offset: u64, count: u32) -> Result<(Vec<Snapshot>, u64)> {
    read_table_inner(storage, offset, count, false).map(|t| (t.snapshots, t.span))
}

/// The message and hint QEMU gives for an entry with more than 1024 bytes of
/// extra data (entry index `i`), at open and in a check that does not repair it.
pub fn too_much_extra(i: usize) -> String {
    format!(
        "Too much extra metadata in snapshot table entry {i}\nYou can force-remove this extra metadata with qemu-img check -r all"
    )
}

/// QEMU's refusal of a snapshot table longer than 64 MiB, with its hint
/// (`overhang`: the entries from the first one past the limit on).
pub fn too_big(overhang: u32) -> String {
    format!(
        "Snapshot table is too big\nYou can force-remove all {overhang} overhanging snapshots with qemu-img check -r all"
    )
}

/// A table read for a check.
#[derive(Debug, Default)]
pub struct CheckedTable {
    /// The entries read (those past the 64 MiB limit left out).
    pub snapshots: Vec<Snapshot>,
    /// The on-disk span of those entries, skipped extra data included.
    pub span: u64,
    /// The entries whose extra data was cut to 1024 bytes (index, original
    /// extra-data length); the first entry past the limit included.
    pub dropped: Vec<(usize, u32)>,
    /// Entries left out because the table would reach past 64 MiB.
    pub overhang: u32,
}

/// [`read_table`] for a check: an entry with more than 1024 bytes of extra data
/// keeps its first 1024 and the rest is skipped, and the read stops at the
/// first entry that takes the table past 64 MiB, as QEMU's repairing read does.
pub fn read_table_for_check(
    storage: &dyn Storage,
    offset: u64,
    count: u32,
) -> Result<CheckedTable> {
    read_table_inner(storage, offset, count, true)
}

/// Reads the table as QEMU does: an entry's length counts its extra data as
/// kept (at most 1024 bytes when `lenient`), and the table is too big when the
/// entries before one (each padded to 8 bytes) and that one (unpadded) exceed
/// 64 MiB, or when its on-disk span passes 2 GiB. Too much extra data in an
/// entry is judged before its length.
fn read_table_inner(
    storage: &dyn Storage,
    offset: u64,
    count: u32,
    lenient: bool,
) -> Result<CheckedTable> {
    let mut dropped = Vec::new();
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut at = offset;
    let mut table_length = 0u64;
    for i in 0..count {
        let mut fixed = [0u8; 40];
        storage.read_at(&mut fixed, at)?;
        let l1_table_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = u64::from(be16(&fixed, 12));
        let name_len = u64::from(be16(&fixed, 14));
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA_DATA && !lenient {
            return Err(Error::invalid(too_much_extra(index(u64::from(i)))));
        }
        // Past the first 1024 bytes (only when lenient), extra data is skipped.
        let kept = extra_len.min(MAX_EXTRA_DATA);
        if kept < extra_len {
            dropped.push((index(u64::from(i)), extra_len));
        }
        let var = u64::from(extra_len) + id_len + name_len;
        let end = at - offset + 40 + var;
        let length = table_length + 40 + u64::from(kept) + id_len + name_len;
        if length > MAX_TABLE_BYTES || end > i32::MAX as u64 {
            if !lenient {
                return Err(Error::new(ErrorKind::OutOfRange, too_big(count - i)));
            }
            return Ok(CheckedTable {
                snapshots: out,
                span: at - offset,
                dropped,
                overhang: count - i,
            });
        }
        table_length = length.next_multiple_of(8);
        let mut extra = vec![0u8; index(u64::from(kept))];
        storage.read_at(&mut extra, at + 40)?;
        let mut names = vec![0u8; index(id_len + name_len)];
        storage.read_at(&mut names, at + 40 + u64::from(extra_len))?;
        // QEMU keeps the ID and name as C strings: each ends at its first NUL.
        let (id, name) = names.split_at(index(id_len));
        let id = c_string(id);
        let name = c_string(name);
        let vm_state_size = if extra.len() >= 8 {
            be64(&extra, 0)
        } else {
            u64::from(be32(&fixed, 32))
        };
        let disk_size = (extra.len() >= 16).then(|| be64(&extra, 8));
        let icount = (extra.len() >= 24)
            .then(|| be64(&extra, 16))
            .filter(|&v| v != u64::MAX);
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size,
            disk_size,
            icount,
            extra,
        });
        at += (40 + var).next_multiple_of(8);
    }
    Ok(CheckedTable {
        snapshots: out,
        span: at - offset,
        dropped,
        overhang: 0,
    })
}

/// `bytes` up to its first NUL, as text.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Byte size of the table holding `snaps`.
pub fn table_size(snaps: &[Snapshot]) -> u64 {
    snaps
        .iter()
        .map(|s| (40 + s.extra.len() + s.id.len() + s.name.len()).next_multiple_of(8) as u64)
        .sum()
}

/// Byte size of the table holding `snaps` as QEMU writes it: every entry starts
/// 8-byte aligned, and the last one is not padded (so a table written at the end
/// of the file leaves the file unaligned, as QEMU leaves it).
pub fn written_size(snaps: &[Snapshot]) -> u64 {
    let entry = |s: &Snapshot| (40 + s.extra.len() + s.id.len() + s.name.len()) as u64;
    match snaps.split_last() {
        None => 0,
        Some((last, rest)) => table_size(rest) + entry(last),
    }
}

/// Give every snapshot that does not record its disk size the size `size`
/// (the image's current one), as QEMU does when it reads such an entry: a
/// rewritten table then records that size, never 0.
pub fn complete_disk_sizes(snaps: &mut [Snapshot], size: u64) {
    for s in snaps {
        s.disk_size.get_or_insert(size);
    }
}

impl Snapshot {
    /// Whether this snapshot's L1 table may be read (and its clusters freed or
    /// shared) in an image of `cluster_size` clusters and `file_size` bytes.
    ///
    /// The first two refusals are QEMU's, in its words and order: a table of
    /// more than 32 MiB ("Snapshot L1 table too large", [`ErrorKind::OutOfRange`],
    /// QEMU's EFBIG) and an offset that is not cluster-aligned or whose table
    /// would end past 2^63 ("Snapshot L1 table offset invalid",
    /// [`ErrorKind::Invalid`], QEMU's EINVAL). A non-empty table QEMU would still
    /// read (over the header, past the end of the file, past the 2^56 offset
    /// limit) is refused too, in strata's words: nothing is ever read or written
    /// through it. Readers that only look at the table (a snapshot's view, the
    /// search for zero clusters) pass `u64::MAX` as `file_size`: a table past the
    /// end of the file reads as zeros, an empty table, as QEMU reads it.
    pub fn usable_l1(&self, cluster_size: u64, file_size: u64) -> Result<()> {
        let bytes = u64::from(self.l1_size) * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Error::new(ErrorKind::OutOfRange, L1_TOO_LARGE));
        }
        let past_i64 = self.l1_table_offset > (i64::MAX as u64) - bytes;
        if past_i64 || !self.l1_table_offset.is_multiple_of(cluster_size) {
            return Err(Error::invalid(L1_OFFSET_INVALID));
        }
        if self.l1_size > 0 {
            check_table(
                self.l1_table_offset,
                bytes,
                cluster_size,
                file_size,
                "Snapshot L1 table",
            )?;
        }
        Ok(())
    }

    /// The extra-data area QEMU writes: 64-bit VM-state size, disk size and
    /// instruction count (-1 when not recorded), keeping any longer unknown tail.
    pub fn encode_extra(&self) -> Vec<u8> {
        let mut e = Vec::with_capacity(self.extra.len().max(24));
        e.extend_from_slice(&self.vm_state_size.to_be_bytes());
        e.extend_from_slice(&self.disk_size.unwrap_or(0).to_be_bytes());
        e.extend_from_slice(&self.icount.unwrap_or(u64::MAX).to_be_bytes());
        if self.extra.len() > 24 {
            e.extend_from_slice(&self.extra[24..]);
        }
        e
    }
}

/// Serialise a snapshot table (entries padded to 8 bytes, as read by [`read_table`]).
/// An ID or name longer than its 16-bit length field is an `InvalidArgument` error.
pub fn serialize_table(snaps: &[Snapshot]) -> Result<Vec<u8>> {
    let len16 = |s: &str, what: &str| {
        u16::try_from(s.len())
            .map_err(|_| Error::invalid_argument(format!("Snapshot {what} too long")))
    };
    let mut out = Vec::new();
    for s in snaps {
        let extra = s.encode_extra();
        out.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&s.l1_size.to_be_bytes());
        out.extend_from_slice(&len16(&s.id, "ID")?.to_be_bytes());
        out.extend_from_slice(&len16(&s.name, "name")?.to_be_bytes());
        out.extend_from_slice(&s.date_sec.to_be_bytes());
        out.extend_from_slice(&s.date_nsec.to_be_bytes());
        out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        // The 32-bit VM-state field saturates; the 64-bit one in extra data is exact.
        let vm_state_32 = u32::try_from(s.vm_state_size).unwrap_or(u32::MAX);
        out.extend_from_slice(&vm_state_32.to_be_bytes());
        out.extend_from_slice(
            &header_u32(extra.len() as u64, "snapshot extra data")?.to_be_bytes(),
        );
        out.extend_from_slice(&extra);
        out.extend_from_slice(s.id.as_bytes());
        out.extend_from_slice(s.name.as_bytes());
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
    }
    Ok(out)
}
