//! An open VHDX image: its parsed metadata, its BAT, and the guest view
//! ([`BlockDevice`]).

use super::layout::*;
use super::log;
use crate::error::{request, Operation};
use crate::{check_range, BlockDevice, Error, Extent, Result, Status};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use strata_storage::{sync, Storage};

/// What changes while the image is open: the BAT and the headers.
struct State {
    /// Every BAT entry (payload and sector bitmap entries interleaved).
    bat: Vec<u64>,
    headers: [Header; 2],
    current: usize,
    /// No guest-visible write yet in this session (the headers get new
    /// write GUIDs before the first).
    first_visible_write: bool,
    /// Where the next log entry goes.
    log: log::LogState,
}

/// A registered region of the file `[start, end)` that payload blocks must
/// not overlap.
#[derive(Debug, Clone, Copy)]
struct Region {
    start: u64,
    end: u64,
}

/// A VHDX image (dynamic or fixed; differencing images are refused).
///
/// Crash contract of writes: a write into a block not yet allocated puts the
/// data in a new block at the end of the file (rounded up to 1 MiB) and
/// flushes it; only then is the block's BAT entry changed, through the log as
/// QEMU does it: the headers get a log GUID, the entry is journaled and
/// flushed, the BAT sector is written from the journal and flushed, and the
/// headers drop the log GUID. A crash before the journal is durable leaves
/// the old entry (the guest sees the old contents; a block may be leaked at
/// the end of the file); after it, the next open for writing replays the
/// journal (a read-only open is refused until then, as QEMU refuses it).
/// Writes into allocated blocks are in place and durable at the next `flush`.
/// With write barriers off ([`VhdxImage::set_write_barriers`]) the same
/// writes happen in the same order, but nothing is durable before `flush`.
pub struct VhdxImage {
    storage: Arc<dyn Storage>,
    path: Option<PathBuf>,
    read_only: bool,
    virtual_size: u64,
    block_size: u64,
    logical_sector_size: u32,
    physical_sector_size: u32,
    chunk_ratio_bits: u32,
    bat_offset: u64,
    fixed: bool,
    page83: Guid,
    regions: Vec<Region>,
    session_guid: Guid,
    log_replayed: bool,
    /// Flush between the steps of a header or BAT update (the default); see
    /// [`VhdxImage::set_write_barriers`].
    barriers: AtomicBool,
    state: RwLock<State>,
}

/// QEMU's "Could not open 'PATH': Invalid argument" (an open failing with
/// EINVAL and no message of its own).
fn einval(path: Option<&Path>) -> Error {
    open_errno(path, "Invalid argument")
}

fn enotsup(path: Option<&Path>) -> Error {
    Error::new(
        crate::ErrorKind::Unsupported,
        match path {
            Some(p) => format!("Could not open '{}': Operation not supported", p.display()),
            None => "Operation not supported".to_string(),
        },
    )
}

fn open_errno(path: Option<&Path>, errno: &str) -> Error {
    Error::invalid(match path {
        Some(p) => format!("Could not open '{}': {errno}", p.display()),
        None => errno.to_string(),
    })
}

/// One problem `check` finds in the BAT, in qemu-img's words.
pub(crate) fn bat_problems(
    bat: &[u64],
    block_size: u64,
    virtual_size: u64,
    chunk_ratio: u64,
    file_size: u64,
    overlaps: impl Fn(u64, u64) -> bool,
    stop_at_first: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut payblocks = chunk_ratio;
    for (i, &e) in bat.iter().enumerate() {
        if e & BAT_STATE_MASK != PAYLOAD_BLOCK_FULLY_PRESENT {
            continue;
        }
        let i = i as u64;
        let offset = e & BAT_FILE_OFF_MASK;
        let block_length = block_size.min(virtual_size.wrapping_sub(i.wrapping_mul(block_size)));
        let mut push = |m: Option<String>| {
            out.push(m.unwrap_or_default());
        };
        if offset > (i64::MAX as u64) - block_size {
            push(Some(format!("VHDX BAT entry {i} offset overflow.")));
            if stop_at_first {
                break;
            }
        }
        if offset >= file_size {
            push(Some(format!(
                "VHDX BAT entry {i} start offset {offset} points after end of file ({file_size}). Image has probably been truncated."
            )));
            if stop_at_first {
                break;
            }
        } else if offset.wrapping_add(block_length) > file_size {
            push(Some(format!(
                "VHDX BAT entry {i} end offset {} points after end of file ({file_size}). Image has probably been truncated.",
                offset.wrapping_add(block_length).wrapping_sub(1)
            )));
            if stop_at_first {
                break;
            }
        }
        if payblocks > 0 {
            payblocks -= 1;
            if overlaps(offset, block_size) {
                // QEMU counts an overlap as an error without a message.
                push(None);
                if stop_at_first {
                    break;
                }
            }
        } else {
            payblocks = chunk_ratio;
        }
    }
    out
}

impl VhdxImage {
    /// Open the image on `storage` (`path` names it in messages), as QEMU's
    /// vhdx driver opens it: every structure checked, the log replayed when
    /// opened for writing (refused read-only, in QEMU's words).
    pub fn open(storage: Arc<dyn Storage>, path: Option<&Path>, write: bool) -> Result<Self> {
        request(Operation::Open, None, || {
            Self::open_inner(storage, path, write, true)
        })
    }

    /// Open the image for `qemu-img check`: as [`Self::open`], but a BAT
    /// entry pointing outside the file does not refuse the open (QEMU skips
    /// that test when it opens an image to check it); [`Self::check`]
    /// reports it.
    pub fn open_for_check(
        storage: Arc<dyn Storage>,
        path: Option<&Path>,
        write: bool,
    ) -> Result<Self> {
        request(Operation::Open, None, || {
            Self::open_inner(storage, path, write, false)
        })
    }

    fn open_inner(
        storage: Arc<dyn Storage>,
        path: Option<&Path>,
        write: bool,
        check_bat: bool,
    ) -> Result<Self> {
        let mut sig = [0u8; 8];
        storage.read_at(&mut sig, 0)?;
        if &sig != b"vhdxfile" {
            return Err(einval(path));
        }
        let session_guid = random_guid();

        // The two headers: the valid one with the higher sequence number.
        let mut areas = [vec![0u8; HEADER_SIZE], vec![0u8; HEADER_SIZE]];
        storage.read_at(&mut areas[0], HEADER1_OFFSET)?;
        storage.read_at(&mut areas[1], HEADER2_OFFSET)?;
        let parsed = [Header::parse(&areas[0]), Header::parse(&areas[1])];
        let no_header = || Error::invalid("No valid VHDX header found");
        let current = match (&parsed[0], &parsed[1]) {
            (Some(_), None) => 0,
            (None, Some(_)) => 1,
            (None, None) => return Err(no_header()),
            (Some(a), Some(b)) => {
                if a.sequence_number > b.sequence_number {
                    0
                } else if b.sequence_number > a.sequence_number {
                    1
                } else if areas[0][..HEADER_STRUCT_LEN] == areas[1][..HEADER_STRUCT_LEN] {
                    // Identical headers (as Disk2VHD writes them) are fine.
                    0
                } else {
                    return Err(no_header());
                }
            }
        };
        let headers = [Header::decode(&areas[0]), Header::decode(&areas[1])];
        let hdr = headers[current].clone();
        let mut regions = vec![Region {
            start: hdr.log_offset,
            end: hdr.log_offset.wrapping_add(u64::from(hdr.log_length)),
        }];

        // The log.
        if hdr.log_offset < MIB || !hdr.log_offset.is_multiple_of(MIB) || hdr.log_version != 0 {
            return Err(einval(path));
        }
        let mut pending = None;
        if hdr.log_guid != [0u8; 16] && hdr.log_length != 0 {
            if !u64::from(hdr.log_length).is_multiple_of(MIB) {
                return Err(einval(path));
            }
            let seq = log::search(
                storage.as_ref(),
                hdr.log_offset,
                u64::from(hdr.log_length),
                &hdr.log_guid,
            )
            .map_err(|_| einval(path))?;
            if let Some(seq) = seq {
                if !write {
                    let p = path.map(|p| p.display().to_string()).unwrap_or_default();
                    return Err(Error::new(
                        crate::ErrorKind::ReadOnly,
                        format!(
                            "VHDX image file '{p}' opened read-only, but contains a log that needs to be replayed\nTo replay the log, run:\nqemu-img check -r all '{p}'"
                        ),
                    ));
                }
                pending = Some(seq);
            }
        }

        let mut state = State {
            bat: Vec::new(),
            headers,
            current,
            first_visible_write: true,
            log: log::LogState {
                offset: hdr.log_offset,
                length: u64::from(hdr.log_length),
                sequence: pending.map_or(0, |p| p.next_sequence()),
                ..Default::default()
            },
        };
        let mut log_replayed = false;
        if let Some(seq) = pending {
            // Replay, then mark the log empty (after a first-write header update).
            Self::update_headers(
                storage.as_ref(),
                &mut state,
                &session_guid,
                true,
                None,
                true,
            )?;
            log::replay(
                storage.as_ref(),
                hdr.log_offset,
                u64::from(hdr.log_length),
                &hdr.log_guid,
                seq,
            )
            .map_err(|e| match e.kind() {
                crate::ErrorKind::Io => e,
                _ => einval(path),
            })?;
            storage.flush()?;
            Self::update_headers(
                storage.as_ref(),
                &mut state,
                &session_guid,
                false,
                Some([0; 16]),
                true,
            )?;
            state.first_visible_write = false;
            log_replayed = true;
        }

        // The region table.
        let mut rt = vec![0u8; TABLE_SIZE];
        storage.read_at(&mut rt, REGION_TABLE_OFFSET)?;
        if !checksum_ok(&rt, 4) || &rt[..4] != REGION_SIGNATURE {
            return Err(einval(path));
        }
        let count = le32(&rt, 8);
        if count > 2047 {
            return Err(einval(path));
        }
        let mut bat_rt = None;
        let mut meta_rt = None;
        for i in 0..crate::units::index(u64::from(count)) {
            let e = RegionEntry::decode(&rt[16 + i * 32..16 + i * 32 + 32]);
            let (start, end) = (
                e.file_offset,
                e.file_offset.wrapping_add(u64::from(e.length)),
            );
            if regions.iter().any(|r| !(start >= r.end || end <= r.start)) {
                return Err(einval(path));
            }
            regions.push(Region { start, end });
            if e.guid == BAT_GUID {
                if bat_rt.replace(e).is_some() {
                    return Err(einval(path));
                }
            } else if e.guid == METADATA_GUID {
                if meta_rt.replace(e).is_some() {
                    return Err(einval(path));
                }
            } else if e.required {
                return Err(enotsup(path));
            }
        }
        let (Some(bat_rt), Some(meta_rt)) = (bat_rt, meta_rt) else {
            return Err(einval(path));
        };

        // The metadata table and its items.
        let mut mt = vec![0u8; TABLE_SIZE];
        storage.read_at(&mut mt, meta_rt.file_offset)?;
        if &mt[..8] != METADATA_SIGNATURE {
            return Err(einval(path));
        }
        let count = usize::from(le16(&mt, 10));
        if count * 32 > TABLE_SIZE - 32 {
            return Err(einval(path));
        }
        let known = [
            FILE_PARAM_GUID,
            VIRTUAL_SIZE_GUID,
            PAGE83_GUID,
            LOGICAL_SECTOR_GUID,
            PHYS_SECTOR_GUID,
            PARENT_LOCATOR_GUID,
        ];
        let mut found: [Option<MetadataEntry>; 6] = [None; 6];
        for i in 0..count {
            let e = MetadataEntry::decode(&mt[32 + i * 32..64 + i * 32]);
            match known.iter().position(|g| *g == e.item_id) {
                Some(k) if found[k].replace(e).is_some() => return Err(einval(path)),
                Some(_) => {}
                None if e.flags & META_IS_REQUIRED != 0 => return Err(enotsup(path)),
                None => {}
            }
        }
        if found[..5].iter().any(Option::is_none) || found[5].is_some() {
            // QEMU wants exactly the five items of a disk without a parent:
            // a differencing disk (with a parent locator) is not supported.
            return Err(enotsup(path));
        }
        let params = Self::read_item(storage.as_ref(), &meta_rt, found[0], 8)?;
        let block_size = u64::from(le32(&params, 0));
        let flags = le32(&params, 4);
        if flags & PARAMS_HAS_PARENT != 0 {
            // A parent locator would make the item set incomplete above.
            return Err(einval(path));
        }
        let vds = le64(
            &Self::read_item(storage.as_ref(), &meta_rt, found[1], 8)?,
            0,
        );
        let page83 = guid_at(
            &Self::read_item(storage.as_ref(), &meta_rt, found[2], 16)?,
            0,
        );
        let lss = le32(
            &Self::read_item(storage.as_ref(), &meta_rt, found[3], 4)?,
            0,
        );
        let pss = le32(
            &Self::read_item(storage.as_ref(), &meta_rt, found[4], 4)?,
            0,
        );
        if !(BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&block_size) {
            return Err(einval(path));
        }
        // QEMU reads only 512-byte logical sectors.
        if lss != 512 {
            return Err(enotsup(path));
        }
        if !block_size.is_power_of_two() {
            return Err(einval(path));
        }
        let ratio = chunk_ratio(u64::from(lss), block_size);
        if !ratio.is_power_of_two() || !(block_size / u64::from(lss)).is_power_of_two() {
            return Err(einval(path));
        }
        // QEMU counts the disk in 512-byte sectors of `size >> log2(lss)`.
        let virtual_size = (vds >> lss.trailing_zeros()) * 512;
        if vds > MAX_IMAGE_SIZE {
            // Past the specification's limit (QEMU refuses such a disk too
            // when its BAT region cannot hold the entries).
            return Err(einval(path));
        }

        // The BAT.
        let entries = bat_entries(vds, block_size, ratio);
        if entries > u64::from(bat_rt.length) / 8 {
            return Err(einval(path));
        }
        // A BAT reaching past the file's end is refused before it is read
        // (QEMU would read zeroes there; an image QEMU or Hyper-V wrote always
        // holds its whole BAT, and this bounds what a hostile header can make
        // us allocate).
        let file_size = storage.size()?;
        if bat_rt
            .file_offset
            .checked_add(entries * 8)
            .is_none_or(|end| end > file_size)
        {
            return Err(einval(path));
        }
        let mut raw = vec![0u8; crate::units::index(entries * 8)];
        storage.read_at(&mut raw, bat_rt.file_offset)?;
        state.bat = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();

        let img = VhdxImage {
            storage,
            path: path.map(Path::to_path_buf),
            read_only: !write,
            virtual_size,
            block_size,
            logical_sector_size: lss,
            physical_sector_size: pss,
            chunk_ratio_bits: ratio.trailing_zeros(),
            bat_offset: bat_rt.file_offset,
            fixed: flags & PARAMS_LEAVE_BLOCKS_ALLOCATED != 0,
            page83,
            regions,
            session_guid,
            log_replayed,
            barriers: AtomicBool::new(true),
            state: RwLock::new(state),
        };
        let first = if check_bat {
            img.bat_problems(true)?.into_iter().next()
        } else {
            None
        };
        if let Some(first) = first {
            return Err(Error::invalid(match path {
                Some(p) => format!("Could not open '{}': Invalid argument", p.display()),
                None => first,
            }));
        }
        Ok(img)
    }

    /// `len` bytes of a metadata item (zeroes past the end of the file).
    fn read_item(
        storage: &dyn Storage,
        meta_rt: &RegionEntry,
        e: Option<MetadataEntry>,
        len: usize,
    ) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        if let Some(e) = e {
            let at = meta_rt
                .file_offset
                .checked_add(u64::from(e.offset))
                .ok_or_else(|| Error::invalid("Invalid argument"))?;
            storage.read_at(&mut b, at)?;
        }
        Ok(b)
    }

    /// Update the non-current header from the current one and make it
    /// current, twice (so both headers end up valid), as QEMU does before the
    /// first write of a session: new file write GUID (`session`), a new data
    /// write GUID when `new_data_guid`, and `log_guid` when given. Each
    /// header write is flushed before the next when `barriers`.
    fn update_headers(
        storage: &dyn Storage,
        st: &mut State,
        session: &Guid,
        new_data_guid: bool,
        log_guid: Option<Guid>,
        barriers: bool,
    ) -> Result<()> {
        for _ in 0..2 {
            let idx = 1 - st.current;
            let offset = if idx == 0 {
                HEADER1_OFFSET
            } else {
                HEADER2_OFFSET
            };
            let seq = st.headers[st.current].sequence_number.wrapping_add(1);
            let h = &mut st.headers[idx];
            h.sequence_number = seq;
            h.file_write_guid = *session;
            if new_data_guid {
                h.data_write_guid = random_guid();
            }
            if let Some(g) = log_guid {
                h.log_guid = g;
            }
            let mut area = vec![0u8; HEADER_SIZE];
            storage.read_at(&mut area, offset)?;
            h.encode_into(&mut area);
            storage.write_at(&area[..HEADER_STRUCT_LEN], offset)?;
            if barriers {
                storage.flush()?;
            }
            st.current = idx;
        }
        Ok(())
    }

    /// What `qemu-img check` reports about the BAT: each problem's message
    /// (an empty string for a problem QEMU counts without a message).
    fn bat_problems(&self, stop_at_first: bool) -> Result<Vec<String>> {
        let file_size = self.storage.size()?;
        let st = sync::read(&self.state);
        Ok(bat_problems(
            &st.bat,
            self.block_size,
            self.virtual_size,
            1 << self.chunk_ratio_bits,
            file_size,
            |start, len| {
                let end = start.wrapping_add(len);
                self.regions
                    .iter()
                    .any(|r| !(start >= r.end || end <= r.start))
            },
            stop_at_first,
        ))
    }

    /// What QEMU's vhdx check reports: the problems found (one message each,
    /// empty for one QEMU counts silently) and whether a log was replayed
    /// when the image was opened (a fixed corruption in qemu-img's count).
    pub fn check(&self) -> Result<super::CheckReport> {
        Ok(super::CheckReport {
            problems: self.bat_problems(false)?,
            log_replayed: self.log_replayed,
        })
    }

    /// Whether each step of a header or BAT update (the data before the BAT
    /// entry's journal, each header, the journal, the BAT sector) is flushed
    /// before the next (the default, which the crash contract above needs).
    /// A new image that nothing uses until a copy into it completes and is
    /// flushed can do without, as qemu-img's convert does (its target's cache
    /// mode makes those flushes no-ops): the same bytes are written in the
    /// same order, and only [`BlockDevice::flush`] makes them durable
    /// ([`BlockDevice::close`] does not flush then either). Turning barriers
    /// back on flushes first.
    pub fn set_write_barriers(&self, on: bool) -> Result<()> {
        if on && !self.read_only {
            let _st = sync::write(&self.state);
            self.storage.flush().map_err(|e| self.err(e))?;
        }
        self.barriers.store(on, Ordering::Relaxed);
        Ok(())
    }

    fn barriers(&self) -> bool {
        self.barriers.load(Ordering::Relaxed)
    }

    /// The payload block size (what `qemu-img info` shows as cluster_size).
    pub fn block_size(&self) -> u64 {
        self.block_size
    }
    /// The logical sector size (512 or 4096).
    pub fn logical_sector_size(&self) -> u32 {
        self.logical_sector_size
    }
    /// The physical sector size as recorded.
    pub fn physical_sector_size(&self) -> u32 {
        self.physical_sector_size
    }
    /// Whether the file parameters ask to leave blocks allocated (a fixed image).
    pub fn is_fixed(&self) -> bool {
        self.fixed
    }
    /// The SCSI page 83 identifier recorded for the disk.
    pub fn page83(&self) -> Guid {
        self.page83
    }
    /// The BAT entry of guest payload block `block` (state in the low 3 bits).
    pub fn bat_entry(&self, block: u64) -> Option<u64> {
        let idx = self.bat_index(block);
        sync::read(&self.state)
            .bat
            .get(crate::units::index(idx))
            .copied()
    }

    fn bat_index(&self, block: u64) -> u64 {
        block + (block >> self.chunk_ratio_bits)
    }

    fn io_error(&self) -> Error {
        Error::new(crate::ErrorKind::Io, "Input/output error")
    }

    fn err(&self, e: impl Into<Error>) -> Error {
        e.into().at(self.storage.path())
    }

    /// Write `buf` at guest `offset` (inside one block), allocating the
    /// block if needed. `zeroes`: the write only zeroes, so a block that
    /// reads as zeroes is left as it is.
    fn write_in_block(&self, st: &mut State, buf: &[u8], offset: u64, zeroes: bool) -> Result<()> {
        let block = offset / self.block_size;
        let in_block = offset % self.block_size;
        let idx = crate::units::index(self.bat_index(block));
        let entry = *st.bat.get(idx).ok_or_else(|| self.io_error())?;
        match entry & BAT_STATE_MASK {
            PAYLOAD_BLOCK_FULLY_PRESENT => {
                let base = entry & BAT_FILE_OFF_MASK;
                if base < MIB {
                    return Err(Error::corrupt("Bad address"));
                }
                self.storage.write_at(buf, base + in_block)?;
            }
            PAYLOAD_BLOCK_NOT_PRESENT
            | PAYLOAD_BLOCK_UNDEFINED
            | PAYLOAD_BLOCK_ZERO
            | PAYLOAD_BLOCK_UNMAPPED
            | PAYLOAD_BLOCK_UNMAPPED_V095 => {
                if zeroes {
                    return Ok(());
                }
                let len = self.storage.size()?;
                let base = len
                    .checked_next_multiple_of(MIB)
                    .filter(|b| *b <= i64::MAX as u64 - self.block_size)
                    .ok_or_else(|| Error::invalid("Invalid argument"))?;
                self.storage.set_size(base + self.block_size)?;
                self.storage.write_at(buf, base + in_block)?;
                let new = base | PAYLOAD_BLOCK_FULLY_PRESENT;
                self.journal_bat_entry(st, idx, new)?;
                st.bat[idx] = new;
            }
            _ => return Err(self.io_error()),
        }
        Ok(())
    }

    /// Set BAT entry `idx` to `entry` through the log, as QEMU does: the
    /// data flushed; the headers given a log GUID; the entry journaled and
    /// flushed; the BAT sector written from the journal and flushed; the log
    /// GUID cleared in the headers (without the flushes when barriers are
    /// off).
    fn journal_bat_entry(&self, st: &mut State, idx: usize, entry: u64) -> Result<()> {
        let storage = self.storage.as_ref();
        let barriers = self.barriers();
        if barriers {
            storage.flush()?;
        }
        if st.headers[st.current].log_length < 8 {
            return Err(Error::invalid("Invalid argument"));
        }
        if st.headers[st.current].log_guid != [0; 16] {
            return Err(Error::unsupported("log state: a log that was not flushed"));
        }
        let guid = random_guid();
        Self::update_headers(storage, st, &self.session_guid, false, Some(guid), barriers)?;
        let at = self.bat_offset + idx as u64 * 8;
        let data = entry.to_le_bytes();
        log::write_and_replay(storage, &mut st.log, &guid, &data, at, barriers)?;
        if barriers {
            storage.flush()?;
        }
        Self::update_headers(
            storage,
            st,
            &self.session_guid,
            false,
            Some([0; 16]),
            barriers,
        )
    }

    fn write_impl(&self, buf: Option<&[u8]>, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only());
        }
        check_range(offset, len, self.virtual_size)?;
        let mut st = sync::write(&self.state);
        if st.first_visible_write {
            st.first_visible_write = false;
            Self::update_headers(
                self.storage.as_ref(),
                &mut st,
                &self.session_guid,
                true,
                None,
                self.barriers(),
            )?;
        }
        let zeros = match buf {
            Some(_) => Vec::new(),
            None => vec![0u8; crate::units::index(self.block_size.min(len))],
        };
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (self.block_size - pos % self.block_size).min(end - pos);
            let at = crate::units::index(pos - offset);
            let chunk = match buf {
                Some(b) => &b[at..at + crate::units::index(n)],
                None => &zeros[..crate::units::index(n)],
            };
            self.write_in_block(&mut st, chunk, pos, buf.is_none())?;
            pos += n;
        }
        Ok(())
    }
}

impl BlockDevice for VhdxImage {
    fn format_name(&self) -> &'static str {
        "vhdx"
    }
    fn set_write_barriers(&self, on: bool) -> Result<()> {
        VhdxImage::set_write_barriers(self, on)
    }
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        request(Operation::Read, Some(offset), || {
            check_range(offset, buf.len() as u64, self.virtual_size)?;
            let st = sync::read(&self.state);
            let mut done = 0usize;
            while done < buf.len() {
                let pos = offset + done as u64;
                let in_block = pos % self.block_size;
                let n = crate::units::index(
                    (self.block_size - in_block).min((buf.len() - done) as u64),
                );
                let idx = crate::units::index(self.bat_index(pos / self.block_size));
                let entry = *st.bat.get(idx).ok_or_else(|| self.io_error())?;
                let out = &mut buf[done..done + n];
                match entry & BAT_STATE_MASK {
                    PAYLOAD_BLOCK_NOT_PRESENT
                    | PAYLOAD_BLOCK_UNDEFINED
                    | PAYLOAD_BLOCK_ZERO
                    | PAYLOAD_BLOCK_UNMAPPED
                    | PAYLOAD_BLOCK_UNMAPPED_V095 => out.fill(0),
                    PAYLOAD_BLOCK_FULLY_PRESENT => {
                        let base = entry & BAT_FILE_OFF_MASK;
                        if base == 0 {
                            // QEMU reads from the file's start when the
                            // entry has no offset.
                            self.storage.read_at(out, 0).map_err(|e| self.err(e))?;
                        } else {
                            self.storage
                                .read_at(out, base + in_block)
                                .map_err(|e| self.err(e))?;
                        }
                    }
                    _ => return Err(self.io_error()),
                }
                done += n;
            }
            Ok(())
        })
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        request(Operation::Write, Some(offset), || {
            self.write_impl(Some(buf), offset, buf.len() as u64)
                .map_err(|e| self.err(e))
        })
    }
    /// Blocks that already read as zeroes stay as they are; allocated blocks
    /// get zero bytes written (QEMU's vhdx has no zeroing of its own, and
    /// writes zeroes, allocating; the guest view is the same).
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        request(Operation::WriteZeroes, Some(offset), || {
            self.write_impl(None, offset, len).map_err(|e| self.err(e))
        })
    }
    /// QEMU's vhdx ignores discards: nothing changes.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.virtual_size)
    }
    fn flush(&self) -> Result<()> {
        request(Operation::Flush, None, || {
            self.storage.flush().map_err(|e| self.err(e))
        })
    }
    /// Every write is in the file already (nothing is held back in memory),
    /// so closing only makes it durable: a flush, unless write barriers are
    /// off ([`VhdxImage::set_write_barriers`]).
    fn close(&self) -> Result<()> {
        if self.read_only || !self.barriers() {
            return Ok(());
        }
        self.flush()
    }
    /// As QEMU's vhdx reports it (it has no block status of its own): the
    /// whole range is data, without a host offset.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.virtual_size)?;
        Ok(Extent {
            offset,
            len,
            status: Status::Data {
                host_offset: None,
                compressed: false,
            },
        })
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }
    fn set_backing(&self, _backing: Option<Arc<dyn BlockDevice>>) {}
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.storage.allocated_bytes().map_err(|e| self.err(e))
    }
    fn resize(&self, _new_size: u64, _allow_shrink: bool) -> Result<()> {
        Err(Error::new(
            crate::ErrorKind::Unsupported,
            "Image format driver does not support resize",
        ))
    }
    fn path(&self) -> Option<PathBuf> {
        self.path.clone()
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.block_size)
    }
    fn host_file(&self) -> Option<&Arc<dyn Storage>> {
        Some(&self.storage)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
