//! The VHDX metadata log: finding the active sequence of log entries (the
//! writes an interrupted session had journaled but maybe not applied), and
//! replaying it, as QEMU's `vhdx-log.c` does when it opens an image.
//!
//! The log is a circular buffer of 4 KiB sectors. An entry is a header
//! sector ("loge") with descriptors ("desc": one data sector each, "zero": a
//! run of zeroes), then its data sectors ("data"); a CRC-32C covers the
//! whole entry. Entries of one sequence have consecutive sequence numbers
//! and the log GUID of the current header.

use super::layout::{checksum, guid_at, le32, le64, Guid, MIB};
use crate::{Error, Result};
use strata_storage::Storage;

const SECTOR: u64 = 4096;
const SECTOR_LEN: usize = 4096;

/// One log entry's header fields.
#[derive(Debug, Clone, Copy)]
struct EntryHeader {
    entry_length: u32,
    sequence_number: u64,
    descriptor_count: u32,
    log_guid: Guid,
    flushed_file_offset: u64,
    last_file_offset: u64,
}

impl EntryHeader {
    fn decode(b: &[u8]) -> (bool, EntryHeader) {
        (
            &b[..4] == b"loge",
            EntryHeader {
                entry_length: le32(b, 8),
                sequence_number: le64(b, 16),
                descriptor_count: le32(b, 24),
                log_guid: guid_at(b, 32),
                flushed_file_offset: le64(b, 48),
                last_file_offset: le64(b, 56),
            },
        )
    }
}

/// A log descriptor: a data sector to write, or zeroes.
#[derive(Debug, Clone, Copy)]
enum Descriptor {
    Data {
        trailing: [u8; 4],
        leading: [u8; 8],
        file_offset: u64,
        sequence_number: u64,
    },
    Zero {
        length: u64,
        file_offset: u64,
    },
}

/// The log region and the cursor over it (byte indexes into the region).
struct Cursor<'a> {
    storage: &'a dyn Storage,
    offset: u64,
    length: u64,
    read: u64,
    write: u64,
}

impl Cursor<'_> {
    /// The longest entry taken as valid: the log's length, or the part of
    /// the log inside the file when the file ends sooner (a hostile header
    /// cannot make the driver read gigabytes of zeroes past the end; a log
    /// QEMU or Hyper-V wrote lies inside its file).
    fn entry_limit(&self) -> Result<u64> {
        let inside = self.storage.size()?.saturating_sub(self.offset);
        Ok(self.length.min(inside))
    }

    fn inc(&self, idx: u64) -> u64 {
        let n = idx + SECTOR;
        if n >= self.length {
            0
        } else {
            n
        }
    }

    /// The header sector at the read index, without moving it.
    fn peek(&self) -> Result<[u8; 64]> {
        let mut read = self.read;
        if read + 64 > self.length {
            read = 0;
        }
        if read == self.write {
            return Err(einval());
        }
        let mut b = [0u8; 64];
        self.storage.read_at(&mut b, self.offset + read)?;
        Ok(b)
    }

    /// Up to `n` sectors from the read index, moving it.
    fn read_sectors(&mut self, n: u64, out: &mut Vec<u8>) -> Result<u64> {
        let mut done = 0;
        while done < n && self.read != self.write {
            let mut s = [0u8; SECTOR_LEN];
            self.storage.read_at(&mut s, self.offset + self.read)?;
            out.extend_from_slice(&s);
            self.read = self.inc(self.read);
            done += 1;
        }
        Ok(done)
    }
}

fn einval() -> Error {
    Error::invalid("Invalid argument")
}

fn header_valid(len: u64, h: &EntryHeader, sig_ok: bool, log_guid: &Guid) -> bool {
    sig_ok
        && u64::from(h.entry_length) <= len
        && u64::from(h.entry_length).is_multiple_of(SECTOR)
        && h.sequence_number != 0
        && &h.log_guid == log_guid
        && u64::from(h.descriptor_count) * 32 <= u64::from(h.entry_length)
}

fn desc_sectors(count: u32) -> u64 {
    (u64::from(count) + 2).div_ceil(128)
}

fn parse_desc(b: &[u8], hdr_seq: u64) -> Option<Descriptor> {
    let seq = le64(b, 24);
    let file_offset = le64(b, 16);
    if seq != hdr_seq || !file_offset.is_multiple_of(SECTOR) {
        return None;
    }
    match &b[..4] {
        b"zero" => {
            let length = le64(b, 8);
            length.is_multiple_of(SECTOR).then_some(Descriptor::Zero {
                length,
                file_offset,
            })
        }
        b"desc" => {
            let mut trailing = [0u8; 4];
            trailing.copy_from_slice(&b[4..8]);
            let mut leading = [0u8; 8];
            leading.copy_from_slice(&b[8..16]);
            Some(Descriptor::Data {
                trailing,
                leading,
                file_offset,
                sequence_number: seq,
            })
        }
        _ => None,
    }
}

/// Read the header and descriptors at the cursor (moving it past the
/// descriptor sectors); an invalid descriptor is an error, as in QEMU.
fn read_desc(
    c: &mut Cursor<'_>,
    log_guid: &Guid,
) -> Result<(EntryHeader, Vec<Descriptor>, Vec<u8>)> {
    let head = c.peek()?;
    let (sig, h) = EntryHeader::decode(&head);
    if !header_valid(c.entry_limit()?, &h, sig, log_guid) {
        return Err(einval());
    }
    let n = desc_sectors(h.descriptor_count);
    let mut buf = Vec::new();
    if c.read_sectors(n, &mut buf)? != n {
        return Err(einval());
    }
    let mut descs = Vec::new();
    for i in 0..crate::units::index(u64::from(h.descriptor_count)) {
        let at = 64 + i * 32;
        descs.push(parse_desc(&buf[at..at + 32], h.sequence_number).ok_or_else(einval)?);
    }
    Ok((h, descs, buf))
}

/// Validate the entry at the cursor: `Ok(Some(header))` when it is valid (the
/// cursor then stands past it), `Ok(None)` when not (the cursor moved on).
fn validate_entry(c: &mut Cursor<'_>, seq: u64, log_guid: &Guid) -> Result<Option<EntryHeader>> {
    let head = match c.peek() {
        Ok(h) => h,
        Err(e) => {
            c.read = c.inc(c.read);
            return Err(e);
        }
    };
    let (sig, h) = EntryHeader::decode(&head);
    if !header_valid(c.entry_limit()?, &h, sig, log_guid)
        || (seq > 0 && h.sequence_number != seq + 1)
    {
        c.read = c.inc(c.read);
        return Ok(None);
    }
    let n = desc_sectors(h.descriptor_count);
    let total = u64::from(h.entry_length) / SECTOR;
    let (_, _, mut buf) = read_desc(c, log_guid)?;
    let stored = le32(&buf, 4);
    if total > n {
        for _ in 0..total - n {
            if c.read_sectors(1, &mut buf)? != 1 {
                return Ok(None);
            }
        }
    }
    Ok((checksum(&buf, 4) == stored).then_some(h))
}

/// The active sequence found in a log: where it starts and ends, and how
/// many entries it has.
#[derive(Debug, Clone, Copy)]
pub struct Sequence {
    read: u64,
    write: u64,
    count: u64,
    first_seq: u64,
}

impl Sequence {
    /// The sequence number the next entry of this session takes.
    pub fn next_sequence(&self) -> u64 {
        self.first_seq + 1
    }
}

/// Search the log at `[offset, offset + length)` for its active sequence
/// (the valid run with the highest first sequence number), as QEMU does.
pub fn search(
    storage: &dyn Storage,
    offset: u64,
    length: u64,
    log_guid: &Guid,
) -> Result<Option<Sequence>> {
    let mut c = Cursor {
        storage,
        offset,
        length,
        read: 0,
        write: length,
    };
    let mut candidate: Option<Sequence> = None;
    loop {
        let mut curr_seq = 0;
        let tail = c.read;
        let mut current = None;
        if let Some(h) = validate_entry(&mut c, curr_seq, log_guid)? {
            let mut seq = Sequence {
                read: tail,
                write: c.read,
                count: 1,
                first_seq: h.sequence_number,
            };
            while let Some(h) = validate_entry(&mut c, curr_seq, log_guid)? {
                seq.write = c.read;
                seq.count += 1;
                curr_seq = h.sequence_number;
            }
            current = Some(seq);
        }
        if let Some(cur) = current {
            if candidate.is_none_or(|c| cur.first_seq > c.first_seq) {
                candidate = Some(cur);
            }
        }
        if c.read < tail {
            break;
        }
    }
    Ok(candidate)
}

/// Apply the sequence's entries to the file (data sectors and zero runs),
/// growing the file as the entries say, as QEMU's replay does. The caller
/// then flushes and marks the log empty in the headers.
pub fn replay(
    storage: &dyn Storage,
    offset: u64,
    length: u64,
    log_guid: &Guid,
    seq: Sequence,
) -> Result<u64> {
    replay_with(storage, offset, length, log_guid, seq, true)
}

/// [`replay`], flushing after each sector it writes only when `barriers`.
fn replay_with(
    storage: &dyn Storage,
    offset: u64,
    length: u64,
    log_guid: &Guid,
    seq: Sequence,
    barriers: bool,
) -> Result<u64> {
    let mut c = Cursor {
        storage,
        offset,
        length,
        read: seq.read,
        write: seq.write,
    };
    for _ in 0..seq.count {
        let head = c.peek()?;
        let (_, h) = EntryHeader::decode(&head);
        if h.flushed_file_offset > storage.size()? {
            return Err(einval());
        }
        let (h, descs, _) = read_desc(&mut c, log_guid)?;
        for d in descs {
            match d {
                Descriptor::Data {
                    trailing,
                    leading,
                    file_offset,
                    sequence_number,
                } => {
                    let mut data = Vec::new();
                    if c.read_sectors(1, &mut data)? != 1 {
                        return Err(einval());
                    }
                    let s = (u64::from(le32(&data, 0x4)) << 32) | u64::from(le32(&data, 4092));
                    if s != sequence_number {
                        return Err(einval());
                    }
                    let mut sector = [0u8; SECTOR_LEN];
                    sector[..8].copy_from_slice(&leading);
                    sector[8..4092].copy_from_slice(&data[8..4092]);
                    sector[4092..].copy_from_slice(&trailing);
                    storage.write_at(&sector, file_offset)?;
                    if barriers {
                        storage.flush()?;
                    }
                }
                Descriptor::Zero {
                    length,
                    file_offset,
                } => {
                    let zero = [0u8; SECTOR_LEN];
                    for i in 0..length / SECTOR {
                        let at = file_offset.checked_add(i * SECTOR).ok_or_else(einval)?;
                        storage.write_at(&zero, at)?;
                        if barriers {
                            storage.flush()?;
                        }
                    }
                }
            }
        }
        if storage.size()? < h.last_file_offset && !h.last_file_offset.is_multiple_of(MIB) {
            // QEMU grows the file only when the last offset is not a whole MiB.
            storage.set_size(h.last_file_offset.next_multiple_of(MIB))?;
        }
    }
    Ok(c.read)
}

/// Where this session writes log entries: the region, the read and write
/// indexes of the circular buffer, the tail of the current sequence and the
/// next sequence number (QEMU keeps them from entry to entry, so entries
/// march through the log).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogState {
    pub offset: u64,
    pub length: u64,
    pub read: u64,
    pub write: u64,
    pub tail: u64,
    pub sequence: u64,
}

/// Journal `data` for file `offset` as one log entry (data descriptors for
/// each 4 KiB sector it touches, partial sectors merged with the file's
/// bytes), write it at the log's write index, and replay it, as QEMU's
/// `vhdx_log_write_and_flush` does between its flushes (made only when
/// `barriers`). The headers must already carry `log_guid`; the caller
/// flushes and clears it after.
pub fn write_and_replay(
    storage: &dyn Storage,
    st: &mut LogState,
    log_guid: &Guid,
    data: &[u8],
    offset: u64,
    barriers: bool,
) -> Result<()> {
    if st.sequence == 0 {
        st.sequence = 1;
    }
    let length = data.len() as u64;
    let sector_offset = offset % SECTOR;
    let mut file_offset = offset - sector_offset;
    let mut aligned = length;
    let mut leading = 0;
    let mut partial = 0;
    if sector_offset != 0 {
        leading = (SECTOR - sector_offset).min(length);
        aligned -= leading;
        partial += 1;
    }
    let mut sectors = aligned / SECTOR;
    let trailing = aligned - sectors * SECTOR;
    if trailing != 0 {
        partial += 1;
    }
    sectors += partial;
    let count = u32::try_from(sectors).map_err(|_| einval())?;
    let dsect = desc_sectors(count);
    let total = (dsect + sectors) * SECTOR;
    let file_len = storage.size()?;
    let mut e = vec![0u8; crate::units::index(total)];
    e[..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&u32::try_from(total).map_err(|_| einval())?.to_le_bytes());
    e[12..16].copy_from_slice(&u32::try_from(st.tail).map_err(|_| einval())?.to_le_bytes());
    e[16..24].copy_from_slice(&st.sequence.to_le_bytes());
    e[24..28].copy_from_slice(&count.to_le_bytes());
    e[32..48].copy_from_slice(log_guid);
    e[48..56].copy_from_slice(&file_len.to_le_bytes());
    e[56..64].copy_from_slice(&file_len.to_le_bytes());
    let mut at = 0usize;
    for i in 0..sectors {
        let mut sector = [0u8; SECTOR_LEN];
        let used;
        if i == 0 && leading != 0 {
            storage.read_at(&mut sector, file_offset)?;
            let so = crate::units::index(sector_offset);
            let n = crate::units::index(leading);
            sector[so..so + n].copy_from_slice(&data[at..at + n]);
            used = n;
        } else if i == sectors - 1 && trailing != 0 {
            let t = crate::units::index(trailing);
            storage.read_at(&mut sector[t..], file_offset + trailing)?;
            sector[..t].copy_from_slice(&data[at..at + t]);
            used = t;
        } else {
            sector.copy_from_slice(&data[at..at + SECTOR_LEN]);
            used = SECTOR_LEN;
        }
        at += used;
        let d = 64 + crate::units::index(i) * 32;
        e[d..d + 4].copy_from_slice(b"desc");
        e[d + 4..d + 8].copy_from_slice(&sector[4092..]);
        e[d + 8..d + 16].copy_from_slice(&sector[..8]);
        e[d + 16..d + 24].copy_from_slice(&file_offset.to_le_bytes());
        e[d + 24..d + 32].copy_from_slice(&st.sequence.to_le_bytes());
        let ds = crate::units::index((dsect + i) * SECTOR);
        e[ds..ds + 4].copy_from_slice(b"data");
        e[ds + 4..ds + 8].copy_from_slice(&((st.sequence >> 32) as u32).to_le_bytes());
        e[ds + 8..ds + 4092].copy_from_slice(&sector[8..4092]);
        e[ds + 4092..ds + 4096]
            .copy_from_slice(&((st.sequence & 0xffff_ffff) as u32).to_le_bytes());
        file_offset += SECTOR;
    }
    let crc = checksum(&e, 4);
    e[4..8].copy_from_slice(&crc.to_le_bytes());

    // Into the circular buffer at the write index.
    let start = st.read;
    let mut write = st.write;
    for chunk in e.chunks(SECTOR_LEN) {
        let at = st.offset + write;
        let next = if write + SECTOR >= st.length {
            0
        } else {
            write + SECTOR
        };
        if next == st.read {
            // Full: QEMU does not flush the log to make room.
            return Err(einval());
        }
        storage.write_at(chunk, at)?;
        write = next;
        st.write = write;
    }
    st.sequence += 1;
    st.tail = st.write;
    if barriers {
        storage.flush()?;
    }
    st.read = replay_with(
        storage,
        st.offset,
        st.length,
        log_guid,
        Sequence {
            read: start,
            write: st.write,
            count: 1,
            first_seq: 0,
        },
        barriers,
    )?;
    Ok(())
}
