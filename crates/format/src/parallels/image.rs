//! An open parallels image: the guest view through the BAT, allocation as
//! QEMU places clusters, and the `inuse` mark of an image open for writing.

use super::header::{
    le32, put32, Header, HEADER_SIZE, INUSE_MAGIC, OFF_DATA_OFF, OFF_INUSE, SECTOR,
};
use super::used::{MarkError, UsedMap};
use crate::error::{request, Operation};
use crate::units::index;
use crate::{check_range, BlockDevice, Error, ErrorKind, Extent, Result, Status};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use strata_storage::{sync, Storage};

/// Memory alignment QEMU's file driver asks for: the header area it keeps
/// (header and BAT) is this many bytes rounded up, and a header update
/// writes the first this-many bytes of it.
const MEM_ALIGN: u64 = 4096;

/// How an image grows its file when it runs out of room (QEMU's
/// `prealloc-mode` open option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreallocMode {
    /// Allocate the new space (zeroed) in the file: QEMU's default, `falloc`.
    #[default]
    Falloc,
    /// Only extend the file (sparse): `truncate`.
    Truncate,
}

/// Open options of the driver (QEMU's runtime options for parallels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Bytes added past the new clusters whenever the file grows
    /// (`prealloc-size`, 128 MiB by default); the excess is cut off at close.
    pub prealloc_size: u64,
    /// `prealloc-mode`.
    pub prealloc_mode: PreallocMode,
    /// Opened by `check`: an image that needs repair is left for the check
    /// to report and repair, not repaired at open.
    pub for_check: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            prealloc_size: 128 << 20,
            prealloc_mode: PreallocMode::Falloc,
            for_check: false,
        }
    }
}

/// What allocation and the check change.
#[derive(Debug)]
pub(super) struct State {
    /// The header and BAT bytes (as much of them as the file holds, then as
    /// many as writes needed), changed in memory, written back as QEMU does.
    pub head: Vec<u8>,
    /// How much of the header area QEMU keeps and writes back (the header and
    /// BAT rounded up to 4 KiB, unless that reaches into the data).
    pub header_size: u64,
    /// First data sector.
    pub data_start: u64,
    /// The sector after the last cluster stored (never below `data_start`):
    /// the file's length once the image is closed.
    pub data_end: u64,
    /// The image was not closed cleanly when it was opened.
    pub unclean: bool,
    /// Host clusters in use, counted from `data_start`.
    pub used: UsedMap,
    /// This session marked the image in use on disk; closing clears it.
    pub inuse_on_disk: bool,
    /// The first BAT entry and the one after the last changed since the BAT
    /// was last written.
    pub dirty: Option<(u32, u32)>,
    /// `prealloc-mode`; a truncation the file cannot do falls back to falloc.
    pub prealloc_mode: PreallocMode,
}

/// A parallels image (QEMU's `parallels` driver): a 64-byte header, the BAT
/// (one 32-bit entry per guest cluster, 0 when unallocated), then clusters in
/// the order they were first written (or in holes that discards left).
///
/// Opened for writing, the image is marked in use (`inuse`) at once; closing
/// clears the mark and cuts the file to the end of its last cluster, dropping
/// the space preallocated on growth, as QEMU does. A write stores the data
/// before the BAT entry that points at it.
pub struct ParallelsImage {
    pub(super) storage: Arc<dyn Storage>,
    path: Option<PathBuf>,
    writable: bool,
    pub(super) header: Header,
    /// `prealloc-size` in sectors (at least one cluster).
    prealloc_sectors: u64,
    /// Messages of the repair made at open (QEMU prints them on stderr).
    open_messages: Vec<String>,
    pub(super) state: RwLock<State>,
    /// Flush at close, around clearing `inuse` (the default); see
    /// [`ParallelsImage::set_write_barriers`].
    barriers: std::sync::atomic::AtomicBool,
}

/// The entry of the BAT (`head` holds header and BAT) at `i`, 0 past what is held.
pub(super) fn bat_get(head: &[u8], i: u32) -> u32 {
    let at = HEADER_SIZE + 4 * index(u64::from(i));
    if at + 4 <= head.len() {
        le32(head, at)
    } else {
        0
    }
}

impl ParallelsImage {
    /// Open the image on `storage` as QEMU's driver opens it: the header
    /// checked (its messages), the format extension checked when opened
    /// read-only, the image marked in use when opened for writing (`write`),
    /// and an image that needs it (not closed cleanly, a wrong data offset,
    /// clusters past the file's end or used twice) repaired at once when
    /// opened for writing other than by `check`.
    pub fn open(
        storage: Arc<dyn Storage>,
        path: Option<PathBuf>,
        write: bool,
        opts: OpenOptions,
    ) -> Result<ParallelsImage> {
        let file_len = storage.size()?;
        let file_sectors = file_len.div_ceil(SECTOR);
        let mut raw = [0u8; HEADER_SIZE];
        storage.read_at(&mut raw, 0)?;
        let header = Header::parse(&raw)?;
        let bat_end = header.bat_end();
        let full_header_size = bat_end.next_multiple_of(MEM_ALIGN);
        let mut head = vec![0u8; index(full_header_size.min(file_len).max(HEADER_SIZE as u64))];
        storage.read_at(&mut head, 0)?;
        let unclean = header.inuse == INUSE_MAGIC;
        let mut need_check = unclean;
        let (data_start, ok) = header.data_start(file_sectors);
        need_check |= !ok;
        let header_size = if data_start < full_header_size / SECTOR {
            bat_end
        } else {
            full_header_size
        };
        if header.ext_off != 0 && !write {
            let at = header
                .ext_off
                .checked_mul(SECTOR)
                .ok_or_else(|| Error::invalid("Failed to read Format Extension cluster"))?;
            super::ext::check(
                storage.as_ref(),
                at,
                header.cluster_size(),
                header.nb_sectors,
            )?;
        }
        let prealloc_sectors = (opts.prealloc_size / SECTOR).max(u64::from(header.tracks));
        let mut img = ParallelsImage {
            storage,
            path,
            writable: write,
            prealloc_sectors,
            open_messages: Vec::new(),
            barriers: std::sync::atomic::AtomicBool::new(true),
            state: RwLock::new(State {
                head,
                header_size,
                data_start,
                data_end: data_start,
                unclean,
                used: UsedMap::default(),
                inuse_on_disk: false,
                dirty: None,
                prealloc_mode: opts.prealloc_mode,
            }),
            header,
        };
        if write {
            img.mark_in_use()?;
        }
        {
            let mut st = sync::write(&img.state);
            let tracks = u64::from(img.header.tracks);
            for i in 0..img.header.bat_entries {
                let end = img.header_bat_sector(&st.head, i)? + tracks;
                st.data_end = st.data_end.max(end);
            }
            need_check |= st.data_end > file_sectors;
            if !need_check {
                need_check |= !img.fill_used(&mut st, file_len);
            }
        }
        if opts.for_check || !write || !need_check {
            return Ok(img);
        }
        let report = img
            .repair_at_open()
            .map_err(|e| Error::new(e.kind(), format!("Could not repair corrupted image: {e}")))?;
        // QEMU prints the repair's lines as it opens the image.
        crate::qcow2::repair_notice::report(&report);
        img.open_messages = report;
        Ok(img)
    }

    /// The first sector of BAT entry `i`'s cluster (0 when unallocated).
    fn header_bat_sector(&self, head: &[u8], i: u32) -> Result<u64> {
        u64::from(bat_get(head, i))
            .checked_mul(self.header.off_multiplier())
            .ok_or_else(|| Error::corrupt("parallels BAT entry overflows"))
    }

    /// The first byte of BAT entry `i`'s cluster in the file (0: unallocated).
    pub(super) fn bat_offset(&self, st: &State, i: u32) -> u64 {
        // Entries are 32 bits and the multiplier below 2^23: no overflow.
        u64::from(bat_get(&st.head, i)) * self.header.off_multiplier() * SECTOR
    }

    /// The index in the used map of the host cluster at byte `off`, as QEMU
    /// computes it (a 32-bit index; an offset before the data area gives
    /// none).
    pub(super) fn host_cluster_index(&self, st: &State, off: u64) -> Option<u64> {
        let start = st.data_start * SECTOR;
        let rel = i128::from(off) - i128::from(start);
        let idx = rel / i128::from(self.header.cluster_size());
        u32::try_from(idx).ok().map(u64::from)
    }

    /// Build the used map from the BAT, as QEMU does at open: a map over the
    /// file's clusters past the data start; `false` when an entry is out of
    /// the map or shares its cluster (the image then needs a check).
    pub(super) fn fill_used(&self, st: &mut State, file_len: u64) -> bool {
        let file_len = file_len.next_multiple_of(SECTOR);
        let start = st.data_start * SECTOR;
        let Some(payload) = file_len.checked_sub(start) else {
            st.used = UsedMap::default();
            return false;
        };
        let cs = self.header.cluster_size();
        st.used = UsedMap::new(payload.div_ceil(cs));
        if st.used.len() == 0 {
            return true;
        }
        let mut ok = true;
        for i in 0..self.header.bat_entries {
            let off = self.bat_offset(st, i);
            if off == 0 {
                continue;
            }
            let marked = match self.host_cluster_index(st, off) {
                Some(c) => st.used.mark(c, 1),
                None => Err(MarkError::TooBig),
            };
            ok &= marked.is_ok();
        }
        ok
    }

    /// Set `inuse` and write the header, as QEMU does when it opens an image
    /// for writing.
    fn mark_in_use(&self) -> Result<()> {
        let mut st = sync::write(&self.state);
        put32(&mut st.head, OFF_INUSE, INUSE_MAGIC);
        self.write_header(&st)?;
        self.storage.flush()?;
        st.inuse_on_disk = true;
        Ok(())
    }

    /// Write the start of the header area (the header and the first BAT
    /// entries: 4 KiB at most), as QEMU's header update does.
    pub(super) fn write_header(&self, st: &State) -> Result<()> {
        let n = MEM_ALIGN.min(st.header_size).max(HEADER_SIZE as u64);
        let mut bytes = vec![0u8; index(n)];
        let have = st.head.len().min(bytes.len());
        bytes[..have].copy_from_slice(&st.head[..have]);
        self.storage.write_at(&bytes, 0)?;
        Ok(())
    }

    /// Record the new `data_off` of a repair in the header bytes.
    pub(super) fn set_data_off(st: &mut State, sectors: u64) {
        put32(&mut st.head, OFF_DATA_OFF, super::header::low32(sectors));
    }

    /// Set BAT entry `i` in memory (written by [`Self::write_bat`]).
    pub(super) fn set_bat(st: &mut State, i: u32, v: u32) {
        let at = HEADER_SIZE + 4 * index(u64::from(i));
        if st.head.len() < at + 4 {
            st.head.resize(at + 4, 0);
        }
        put32(&mut st.head, at, v);
        st.dirty = Some(match st.dirty {
            None => (i, i + 1),
            Some((a, b)) => (a.min(i), b.max(i + 1)),
        });
    }

    /// Write the BAT entries changed since the last write.
    pub(super) fn write_bat(&self, st: &mut State) -> Result<()> {
        if let Some((a, b)) = st.dirty.take() {
            let from = HEADER_SIZE + 4 * index(u64::from(a));
            let to = HEADER_SIZE + 4 * index(u64::from(b));
            self.storage.write_at(&st.head[from..to], from as u64)?;
        }
        Ok(())
    }

    /// The messages of the repair made when the image was opened (QEMU prints
    /// them on stderr as it repairs), empty when none was needed.
    pub fn open_messages(&self) -> &[String] {
        &self.open_messages
    }

    /// Whether the image was not closed cleanly when it was opened (and no
    /// check has repaired that since).
    pub fn unclean(&self) -> bool {
        sync::read(&self.state).unclean
    }

    /// The header as read at open.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn err(&self, e: impl Into<Error>) -> Error {
        e.into().at(self.storage.path())
    }

    /// The host sector of guest `sector`, or `None` when its cluster is not
    /// allocated (QEMU's `seek_to_sector`).
    fn seek(&self, st: &State, sector: u64) -> Option<u64> {
        let tracks = u64::from(self.header.tracks);
        let i = sector / tracks;
        if i >= u64::from(self.header.bat_entries) {
            return None;
        }
        let i = u32::try_from(i).ok()?;
        let entry = bat_get(&st.head, i);
        (entry != 0).then(|| u64::from(entry) * self.header.off_multiplier() + sector % tracks)
    }

    /// The run of sectors from `sector` (at most `count`) that is either
    /// unallocated throughout or stored contiguously in the file: its first
    /// host sector (`None`: unallocated) and its length in sectors.
    pub(super) fn run(&self, st: &State, mut sector: u64, mut count: u64) -> (Option<u64>, u64) {
        let tracks = u64::from(self.header.tracks);
        let start = self.seek(st, sector);
        let mut next = start;
        let mut n = 0;
        let mut first = true;
        while count > 0 || first {
            let here = self.seek(st, sector);
            if !first && here != next {
                break;
            }
            first = false;
            let step = count.min(tracks - sector % tracks);
            count -= step;
            sector += step;
            n += step;
            next = here.map(|h| h + step);
            if step == 0 {
                break;
            }
        }
        (start, n)
    }

    /// Find or make room for guest `sector` and up to `count` sectors after
    /// it, as QEMU's allocation does: its host sector and how many sectors
    /// from it are stored there contiguously.
    pub(super) fn allocate(&self, st: &mut State, sector: u64, count: u64) -> Result<(u64, u64)> {
        let (pos, mut n) = self.run(st, sector, count);
        if let Some(p) = pos {
            return Ok((p, n));
        }
        let tracks = u64::from(self.header.tracks);
        let cs = self.header.cluster_size();
        let idx = sector / tracks;
        let mut to_allocate = (sector + n).div_ceil(tracks) - idx;
        if idx + to_allocate > u64::from(self.header.bat_entries) {
            return Err(Error::corrupt(
                "parallels image is larger than its BAT covers",
            ));
        }
        let first_free = st.used.next_free(0);
        let host_off;
        if first_free == st.used.len() {
            let bytes = to_allocate * cs + self.prealloc_sectors * SECTOR;
            host_off = st.data_end * SECTOR;
            let end = host_off
                .checked_add(bytes)
                .ok_or_else(|| Error::corrupt("parallels image file too large"))?;
            if st.prealloc_mode == PreallocMode::Truncate {
                if end > self.storage.size()? {
                    self.storage.set_size(end)?;
                }
            } else {
                self.zero_host(host_off, bytes)?;
            }
            let grown = st.used.len() + bytes / cs;
            st.used.resize(grown);
        } else {
            let next_used = st.used.next_used(first_free);
            if next_used - first_free < to_allocate {
                to_allocate = next_used - first_free;
                n = (idx + to_allocate) * tracks - sector;
            }
            host_off = st.data_start * SECTOR + first_free * cs;
            if st.prealloc_mode == PreallocMode::Falloc && host_off < st.data_end * SECTOR {
                self.zero_host(host_off, cs * to_allocate)?;
            }
        }
        let marked = match self.host_cluster_index(st, host_off) {
            Some(c) => st.used.mark(c, to_allocate),
            None => Err(MarkError::TooBig),
        };
        match marked {
            Ok(()) => {}
            Err(MarkError::TooBig) => {
                return Err(Error::new(ErrorKind::Corrupt, "Argument list too long"))
            }
            Err(MarkError::Busy) => {
                return Err(Error::new(ErrorKind::Corrupt, "Device or resource busy"))
            }
        }
        let mult = self.header.off_multiplier();
        let mut off = host_off;
        for k in 0..to_allocate {
            let entry = u32::try_from(off / SECTOR / mult)
                .map_err(|_| Error::corrupt("parallels image file too large for its BAT"))?;
            let i = u32::try_from(idx + k).map_err(|_| Error::corrupt("parallels BAT index"))?;
            Self::set_bat(st, i, entry);
            off += cs;
        }
        if off > st.data_end * SECTOR {
            st.data_end = off / SECTOR;
        }
        let i = u32::try_from(idx).map_err(|_| Error::corrupt("parallels BAT index"))?;
        let host = self.header_bat_sector(&st.head, i)? + sector % tracks;
        Ok((host, n))
    }

    /// Zero `len` bytes of the file at `off`, allocating them, extending the
    /// file where they reach past its end (QEMU's zero write on its file).
    fn zero_host(&self, off: u64, len: u64) -> Result<()> {
        let size = self.storage.size()?;
        if off < size {
            self.storage.write_zeroes(off, len.min(size - off))?;
        }
        let end = off + len;
        if end > size {
            let from = off.max(size);
            self.storage.preallocate(from, end - from)?;
        }
        Ok(())
    }

    /// Write `buf` at guest `offset`, allocating clusters as needed, then the
    /// BAT entries that changed.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut st = sync::write(&self.state);
        if !st.inuse_on_disk {
            drop(st);
            self.mark_in_use()?;
            st = sync::write(&self.state);
        }
        let mut done = 0usize;
        let end = offset + buf.len() as u64;
        while done < buf.len() {
            let pos = offset + done as u64;
            let sector = pos / SECTOR;
            let count = end.div_ceil(SECTOR) - sector;
            let (host, n) = self.allocate(&mut st, sector, count)?;
            let avail = n * SECTOR - pos % SECTOR;
            let len = index(avail.min((buf.len() - done) as u64));
            let at = host * SECTOR + pos % SECTOR;
            self.storage.write_at(&buf[done..done + len], at)?;
            done += len;
        }
        self.write_bat(&mut st)
    }

    /// Drop the clusters of `[offset, offset+len)` (cluster-aligned): their
    /// file space is given back and their BAT entries cleared, as QEMU's
    /// discard does.
    fn drop_clusters(&self, offset: u64, len: u64) -> Result<()> {
        let mut st = sync::write(&self.state);
        if !st.inuse_on_disk {
            drop(st);
            self.mark_in_use()?;
            st = sync::write(&self.state);
        }
        let cs = self.header.cluster_size();
        let first = offset / cs;
        for c in first..first + len / cs {
            let Ok(i) = u32::try_from(c) else { break };
            if i >= self.header.bat_entries {
                break;
            }
            let host = self.bat_offset(&st, i);
            if host == 0 {
                continue;
            }
            self.storage.discard(host, cs)?;
            Self::set_bat(&mut st, i, 0);
            if let Some(h) = self.host_cluster_index(&st, host) {
                st.used.clear(h);
            }
        }
        self.write_bat(&mut st)
    }

    /// Whether closing flushes before and after it clears `inuse` (the
    /// default). A new convert target that nothing uses until the copy
    /// completes can do without, as qemu-img's target cache mode makes those
    /// flushes no-ops: the same bytes are written in the same order, and only
    /// [`BlockDevice::flush`] makes them durable. Turning barriers back on
    /// flushes first.
    pub fn set_write_barriers(&self, on: bool) -> Result<()> {
        if on && self.writable {
            self.storage.flush()?;
        }
        self.barriers
            .store(on, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Clear `inuse`, write the header and cut the file to the end of the
    /// last cluster, as QEMU closes an image it opened for writing. The image
    /// stays usable (a later write marks it in use again).
    pub fn close_image(&self) -> Result<()> {
        let mut st = sync::write(&self.state);
        if !self.writable || !st.inuse_on_disk {
            return Ok(());
        }
        let barriers = self.barriers.load(std::sync::atomic::Ordering::Relaxed);
        self.write_bat(&mut st)?;
        put32(&mut st.head, OFF_INUSE, 0);
        self.write_header(&st)?;
        if barriers {
            self.storage.flush()?;
        }
        st.inuse_on_disk = false;
        let end = st.data_end * SECTOR;
        self.storage.set_size(end)?;
        if barriers {
            self.storage.flush()?;
        }
        let cs = self.header.cluster_size();
        let room = end.saturating_sub(st.data_start * SECTOR).div_ceil(cs);
        if st.used.len() > room {
            st.used.resize(room);
        }
        Ok(())
    }
}

impl BlockDevice for ParallelsImage {
    fn format_name(&self) -> &'static str {
        "parallels"
    }
    fn set_write_barriers(&self, on: bool) -> Result<()> {
        ParallelsImage::set_write_barriers(self, on)
    }
    fn virtual_size(&self) -> u64 {
        self.header.disk_size()
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        request(Operation::Read, Some(offset), || {
            check_range(offset, buf.len() as u64, self.virtual_size())?;
            let st = sync::read(&self.state);
            let end = offset + buf.len() as u64;
            let mut done = 0usize;
            while done < buf.len() {
                let pos = offset + done as u64;
                let sector = pos / SECTOR;
                let (host, n) = self.run(&st, sector, end.div_ceil(SECTOR) - sector);
                let avail = n * SECTOR - pos % SECTOR;
                let len = index(avail.min((buf.len() - done) as u64));
                let chunk = &mut buf[done..done + len];
                match host {
                    Some(h) => self
                        .storage
                        .read_at(chunk, h * SECTOR + pos % SECTOR)
                        .map_err(|e| self.err(e))?,
                    None => chunk.fill(0),
                }
                done += len;
            }
            Ok(())
        })
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        request(Operation::Write, Some(offset), || {
            if self.read_only() {
                return Err(Error::read_only());
            }
            check_range(offset, buf.len() as u64, self.virtual_size())?;
            self.write_at(buf, offset).map_err(|e| self.err(e))
        })
    }
    /// As QEMU does: a range whose ends are both cluster-aligned (inside
    /// its whole sectors) drops its clusters; any other is written with
    /// zeroes, allocating.
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        request(Operation::WriteZeroes, Some(offset), || {
            if self.read_only() {
                return Err(Error::read_only());
            }
            check_range(offset, len, self.virtual_size())?;
            let end = offset + len;
            let mid_start = offset.next_multiple_of(SECTOR).min(end);
            let mid_end = (end / SECTOR * SECTOR).max(mid_start);
            let cs = self.header.cluster_size();
            let zero = |from: u64, to: u64| -> Result<()> {
                let chunk = vec![0u8; index((to - from).min(1 << 20))];
                let mut at = from;
                while at < to {
                    let n = (to - at).min(chunk.len() as u64);
                    self.write_at(&chunk[..index(n)], at)?;
                    at += n;
                }
                Ok(())
            };
            zero(offset, mid_start).map_err(|e| self.err(e))?;
            if mid_start < mid_end {
                if mid_start.is_multiple_of(cs) && (mid_end - mid_start).is_multiple_of(cs) {
                    self.drop_clusters(mid_start, mid_end - mid_start)
                        .map_err(|e| self.err(e))?;
                } else {
                    zero(mid_start, mid_end).map_err(|e| self.err(e))?;
                }
            }
            zero(mid_end, end).map_err(|e| self.err(e))
        })
    }
    /// Drops whole clusters only, as QEMU's discard for this format does:
    /// a range not aligned to clusters at both ends does nothing.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        request(Operation::Discard, Some(offset), || {
            check_range(offset, len, self.virtual_size())?;
            if self.read_only() {
                return Err(Error::read_only());
            }
            let cs = self.header.cluster_size();
            if !offset.is_multiple_of(cs) || !len.is_multiple_of(cs) || len == 0 {
                return Ok(());
            }
            self.drop_clusters(offset, len).map_err(|e| self.err(e))
        })
    }
    fn flush(&self) -> Result<()> {
        request(Operation::Flush, None, || {
            let mut st = sync::write(&self.state);
            self.write_bat(&mut st).map_err(|e| self.err(e))?;
            self.storage.flush().map_err(|e| self.err(e))
        })
    }
    /// As QEMU's parallels reports: a stored run is data at its host offset
    /// (following clusters joined while they are contiguous in the file), an
    /// unallocated run is not stored in this layer.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        request(Operation::BlockStatus, Some(offset), || {
            check_range(offset, len, self.virtual_size())?;
            let st = sync::read(&self.state);
            let sector = offset / SECTOR;
            let end = offset + len;
            let (host, n) = self.run(&st, sector, end.div_ceil(SECTOR) - sector);
            let n = (n * SECTOR - offset % SECTOR).min(len).max(1);
            let status = match host {
                Some(h) => Status::Data {
                    host_offset: Some(h * SECTOR + offset % SECTOR),
                    compressed: false,
                },
                None => Status::Unallocated,
            };
            Ok(Extent {
                offset,
                len: n,
                status,
            })
        })
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }
    fn set_backing(&self, _backing: Option<Arc<dyn BlockDevice>>) {}
    fn read_only(&self) -> bool {
        !self.writable || self.storage.read_only()
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.storage.allocated_bytes().map_err(|e| self.err(e))
    }
    /// QEMU's parallels driver cannot resize.
    fn resize(&self, _new_size: u64, _allow_shrink: bool) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "Image format driver does not support resize",
        ))
    }
    fn path(&self) -> Option<PathBuf> {
        self.path
            .clone()
            .or_else(|| self.storage.path().map(|p| p.to_path_buf()))
    }
    fn close(&self) -> Result<()> {
        self.close_image().map_err(|e| self.err(e))
    }
    fn host_file(&self) -> Option<&Arc<dyn Storage>> {
        Some(&self.storage)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for ParallelsImage {
    /// Close the image (see [`ParallelsImage::close_image`]) unless a panic
    /// is unwinding.
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let _ = self.close_image();
    }
}
