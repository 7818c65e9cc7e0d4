//! An open qcow2 image: the guest view ([`BlockDevice`]) over the metadata in [`Meta`].

use super::compress::{self, CompressionType};
use super::data_file::{self, DataStore};
use super::encryption::{Encryption, EncryptionInfo, Unlock};
use super::entries::{
    Geometry, L2Entry, SubState, ALL_ALLOCATED, ALL_ZERO, OFLAG_COPIED, OFLAG_ZERO,
};
use super::header::{self, Header};
use super::meta::Meta;
use super::snapshot::{self, Snapshot};
use crate::error::{request, Offset, Operation};
use crate::units::{index, ClusterCount, ClusterIndex, GuestOffset, HostOffset};
use crate::{check_range, BlockDevice, Error, ErrorKind, Extent, Result, Status};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use strata_storage::sync;
use strata_storage::{DebugEvent, Storage};

/// How to open a qcow2 image.
#[derive(Debug, Clone, Default)]
pub struct Qcow2OpenOptions {
    pub read_only: bool,
    /// Open even if the corrupt bit is set (for `check -r`), read-write.
    pub for_repair: bool,
    /// Leave a dirty image alone instead of repairing it on a read-write open.
    pub no_auto_repair: bool,
    /// Open for `check`: tables that start past the end of the file (a truncated
    /// image) read as zeroes, as QEMU reads them, so that the check reports what is
    /// missing instead of refusing the image.
    pub for_check: bool,
    /// The secret of an encrypted image (see [`Unlock`]).
    pub unlock: Unlock,
    /// Open for the metadata only (`qemu-img info`): an external data file is not
    /// opened, an encrypted image needs no secret, and guest data can be neither
    /// read nor written.
    pub metadata_only: bool,
    /// How the external data file, when the image has one, is locked on a
    /// read-only open (see [`data_file::DataFileLock`]).
    pub data_file_lock: data_file::DataFileLock,
}

/// A qcow2 image.
pub struct Qcow2Image {
    pub(crate) meta: Mutex<Meta>,
    pub(crate) storage: Arc<dyn Storage>,
    /// Where guest clusters live (see [`super::data_file`]).
    pub(crate) data: DataStore,
    pub(crate) geo: Geometry,
    size: AtomicU64,
    backing: RwLock<Option<Arc<dyn BlockDevice>>>,
    read_only: bool,
    /// Fixed for the life of the open image; kept outside the metadata lock because
    /// copy-on-write decompresses while that lock is held.
    compression: CompressionType,
    /// The last decompressed cluster: (L2 compressed offset, bytes).
    zcache: Mutex<Option<(HostOffset, Vec<u8>)>>,
    /// Requests in flight, by guest cluster range.
    inflight: InFlight,
    /// Readers hold it shared while they read data outside the metadata lock;
    /// operations that can make freed clusters reusable hold it exclusively.
    reuse: RwLock<()>,
    /// The encryption of an encrypted image (shared with its snapshot views).
    pub(crate) crypt: Option<Arc<Encryption>>,
}

/// Where the bytes of a planned write come from.
enum SegData {
    /// A range of the caller's buffer.
    Buf(usize, usize),
    /// Bytes built while planning (copy-on-write merges).
    Owned(Vec<u8>),
}

/// One contiguous host write of a plan.
struct Seg {
    host: HostOffset,
    /// The guest offset of the segment's first byte (the legacy format's IVs).
    guest: u64,
    data: SegData,
    /// The clusters were allocated for this write (nothing of them is on disk yet).
    fresh: bool,
    /// The data carries a copy-on-write of the clusters' other bytes, written with
    /// it in one request (QEMU announces a COW write after the data write then).
    cow: bool,
}

/// An L2 entry to set once the data is written; `old` loses its reference then.
struct L2Update {
    gc: u64,
    entry: u64,
    bitmap: u64,
    old: Option<L2Entry>,
}

#[derive(Default)]
struct WritePlan {
    segs: Vec<Seg>,
    updates: Vec<L2Update>,
    /// Allocate the file space of fresh clusters before writing them.
    falloc: bool,
}

/// Guest cluster ranges with a request in flight: a request waits until no other
/// in-flight request overlaps its clusters, so allocations and copy-on-write of the
/// same cluster never race.
#[derive(Default)]
struct InFlight {
    ranges: Mutex<Vec<(u64, u64)>>,
    cv: std::sync::Condvar,
}

struct InFlightGuard<'a> {
    owner: &'a InFlight,
    range: (u64, u64),
}

impl InFlight {
    /// Reserve guest clusters `[start, end)`, waiting for overlapping requests.
    fn acquire(&self, start: u64, end: u64) -> InFlightGuard<'_> {
        let mut r = sync::lock(&self.ranges);
        while r.iter().any(|&(a, b)| a < end && start < b) {
            r = sync::wait(&self.cv, r);
        }
        r.push((start, end));
        InFlightGuard {
            owner: self,
            range: (start, end),
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let mut r = sync::lock(&self.owner.ranges);
        if let Some(i) = r.iter().position(|&x| x == self.range) {
            r.swap_remove(i);
        }
        self.owner.cv.notify_all();
    }
}

/// How a run of guest bytes is served, with offsets already adjusted to the run start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Run {
    Data {
        host: HostOffset,
    },
    Zero {
        host: HostOffset,
    },
    Unallocated,
    /// Bytes `skip..` of the cluster compressed at `offset` (`size` bytes).
    Compressed {
        offset: HostOffset,
        size: u64,
        skip: u64,
    },
}

impl Qcow2Image {
    /// Open and validate a qcow2 image. Backing files are not opened here: the chain
    /// layer attaches them with [`BlockDevice::set_backing`].
    pub fn open(storage: Arc<dyn Storage>, opts: Qcow2OpenOptions) -> Result<Self> {
        let path = storage.path().map(|p| p.to_path_buf());
        Self::open_inner(storage, None, opts)
            .map_err(|e| e.at(path.as_deref()).during(Operation::Open))
    }

    /// Open an image whose external data file is `data` (already open) instead of
    /// the file its header names.
    pub fn open_with_data_file(
        storage: Arc<dyn Storage>,
        data: Arc<dyn Storage>,
        opts: Qcow2OpenOptions,
    ) -> Result<Self> {
        let path = storage.path().map(|p| p.to_path_buf());
        Self::open_inner(storage, Some(data), opts)
            .map_err(|e| e.at(path.as_deref()).during(Operation::Open))
    }

    fn open_inner(
        storage: Arc<dyn Storage>,
        given_data: Option<Arc<dyn Storage>>,
        opts: Qcow2OpenOptions,
    ) -> Result<Self> {
        let read_only = opts.read_only || storage.read_only();
        let file_size = storage.size()?;
        // The header and its extensions fill at most the first cluster.
        let first = Header::read_area(&*storage)?;
        let mut h = if opts.for_check {
            Header::parse_for_check(&first)?
        } else {
            Header::parse(&first, file_size)?
        };
        if h.is_corrupt() && !read_only && !opts.for_repair {
            return Err(Error::new(
                ErrorKind::MarkedCorrupt,
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        let crypt =
            Encryption::open(&*storage, &h, &opts.unlock, opts.metadata_only)?.map(Arc::new);
        let data = data_file::store_for(
            &h,
            given_data,
            read_only,
            opts.data_file_lock,
            opts.metadata_only,
        )?;
        // A failed read is worded as QEMU words it for these tables.
        let in_words = |what: &str| {
            let what = what.to_string();
            move |e: Error| match e.storage_error() {
                Some(s) if s.kind() == ErrorKind::Io => {
                    Error::new(ErrorKind::Io, format!("{what}: {s}"))
                }
                _ => e,
            }
        };
        let l1 = read_table(&*storage, h.l1_table_offset, u64::from(h.l1_size))
            .map_err(in_words("Could not read L1 table"))?;
        let rt_entries = u64::from(h.refcount_table_clusters) * h.cluster_size() / 8;
        storage.debug_event(DebugEvent::ReftableLoad);
        let reftable = read_table(&*storage, h.refcount_table_offset, rt_entries)
            .map_err(in_words("Could not initialize refcount handling"))?;
        // A check opens an image whose snapshot table is not where a table may
        // be, without reading it, and reports the fault itself.
        // A check reads the entries within the limit of 65536 when that is the
        // table's only fault: a full repair discards the rest.
        let readable = if h.snapshot_table_fault().is_none() {
            h.nb_snapshots
        } else if opts.for_check && h.snapshot_table_fault_within_limit().is_none() {
            header::MAX_SNAPSHOTS
        } else {
            0
        };
        let table = if opts.for_check {
            snapshot::read_table_for_check(&*storage, h.snapshots_offset, readable)?
        } else {
            let (snapshots, span) = snapshot::read_table(&*storage, h.snapshots_offset, readable)?;
            snapshot::CheckedTable {
                snapshots,
                span,
                ..Default::default()
            }
        };
        let (snaps, span, dropped) = (table.snapshots, table.span, table.dropped);
        if opts.for_check && h.autoclear_features & header::autoclear::BITMAPS != 0 {
            if let Some(ext) = h.bitmaps {
                super::bitmaps::Bitmaps::vet(&*storage, ext, h.cluster_size(), h.size, file_size)?;
            }
        }
        // Bitmaps a program without bitmap support may have changed are
        // warned about and, on a writable open, their extension dropped from
        // the header (the whole first cluster rewritten, as QEMU rewrites it);
        // their clusters stay, leaked, for a repair to free.
        if h.bitmaps.is_some() && h.autoclear_features & header::autoclear::BITMAPS == 0 {
            super::open_notice::report(if h.version < 3 {
                &super::open_notice::STALE_BITMAPS_V2
            } else {
                &super::open_notice::STALE_BITMAPS
            });
            if !read_only {
                h.bitmaps = None;
                let mut bytes = h.serialize()?;
                bytes.resize(index(h.cluster_size()), 0);
                storage.write_at(&bytes, 0)?;
                storage.flush()?;
            }
        }
        let mut bitmaps = None;
        if !read_only && h.autoclear_features != 0 {
            // Bitmaps strata can keep valid stay (see `bitmaps`); any other
            // autoclear feature, or bitmaps it cannot vouch for, are marked
            // inconsistent, as the specification asks of programs without them.
            // The raw-data bit stays with the data file it describes.
            let raw_bit = h.autoclear_features & header::autoclear::DATA_FILE_RAW;
            let raw_bit = if data.is_external() { raw_bit } else { 0 };
            if let (Some(ext), header::autoclear::BITMAPS) =
                (h.bitmaps, h.autoclear_features & !raw_bit)
            {
                bitmaps = super::bitmaps::Bitmaps::load(
                    &*storage,
                    ext,
                    h.cluster_size(),
                    h.size,
                    file_size,
                )?;
            }
            let keep = raw_bit
                | if bitmaps.is_some() {
                    header::autoclear::BITMAPS
                } else {
                    0
                };
            if keep != h.autoclear_features {
                h.autoclear_features = keep;
                if h.version >= 3 {
                    storage.write_at(&keep.to_be_bytes(), 88)?;
                    storage.flush()?;
                }
            }
        }
        let geo = Geometry {
            cluster_bits: h.cluster_bits,
            extended_l2: h.extended_l2(),
            version: h.version,
            data_file: data.is_external(),
        };
        let size = h.size;
        let dirty = h.is_dirty();
        let compression = h.compression_type;
        let mut meta = Meta::new(storage.clone(), h, l1, reftable, read_only);
        meta.snapshots = snaps;
        // An ID or name cut at a NUL, or skipped extra data, makes the entries
        // shorter than the table on disk, which is what the file holds.
        if span != snapshot::table_size(&meta.snapshots) {
            meta.snapshot_span = Some(span);
        }
        if !dropped.is_empty() {
            meta.snapshot_extra_dropped = dropped;
        }
        meta.snapshot_overhang = table.overhang;
        meta.dirty_inherited = dirty;
        meta.bitmaps = bitmaps;
        meta.data_storage = data.external().cloned();
        let img = Qcow2Image {
            meta: Mutex::new(meta),
            storage,
            data,
            geo,
            size: AtomicU64::new(size),
            backing: RwLock::new(None),
            read_only,
            compression,
            zcache: Mutex::new(None),
            inflight: InFlight::default(),
            reuse: RwLock::new(()),
            crypt,
        };
        if dirty && !read_only && !opts.no_auto_repair {
            // A dirty image (lazy refcounts, not closed cleanly) has refcounts that
            // may be too low: rebuild them before writing, as QEMU does, telling
            // what was repaired as QEMU tells it.
            let report = img.check(super::check::Repair::All)?;
            super::repair_notice::report(&report.messages);
        }
        Ok(img)
    }

    /// The metadata, for an operation that uses or changes it. The metadata lock
    /// is a whole-state lock (see [`strata_storage::sync`]): after a panic in the
    /// middle of an update it is `Poisoned`, and nothing of it is used or written
    /// again by this handle.
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Meta>> {
        strata_storage::sync::lock_whole(&self.meta, "image metadata").map_err(|e| self.err(e))
    }

    /// The metadata for inspection only (the header and snapshot list getters):
    /// what is in memory, even after a panic poisoned the lock. Never written.
    pub(crate) fn peek(&self) -> MutexGuard<'_, Meta> {
        strata_storage::sync::lock(&self.meta)
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.peek().h.clone()
    }

    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.peek().snapshots.clone()
    }

    /// The persistent bitmap a resize of this session made too large for
    /// QEMU's limits, if any: then no bitmap is stored at close and all stay
    /// marked in use on disk, as qemu-img leaves them (it warns naming this one).
    pub fn lost_bitmap(&self) -> Option<String> {
        self.peek()
            .bitmaps
            .as_ref()
            .and_then(|b| b.lost().map(str::to_string))
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    pub fn compression_type(&self) -> CompressionType {
        self.compression
    }

    /// Flush everything and clear the dirty bit this session set. Dropping an image
    /// does the same, ignoring errors; call this to see them.
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _gate = sync::write(&self.reuse);
        let mut m = self.lock()?;
        // Persistent bitmaps are stored anew first, as QEMU stores them.
        m.store_bitmaps_at_close().map_err(|e| self.err(e))?;
        m.flush_metadata().map_err(|e| self.err(e))?;
        m.clear_dirty().map_err(|e| self.err(e))
    }

    pub(crate) fn err(&self, e: impl Into<Error>) -> Error {
        e.into().at(self.storage.path())
    }

    /// Find how the bytes at `off` are served and for how long (at most `max`),
    /// staying inside one L2 table.
    pub(crate) fn lookup(&self, m: &mut Meta, off: u64, max: u64) -> Result<(Run, u64)> {
        let cs = self.geo.cluster_size();
        let scs = self.geo.subcluster_size();
        let nsub = u64::from(self.geo.subclusters());
        let l2n = m.l2_entries();
        let gc = off / cs;
        let table_end = (gc / l2n + 1) * l2n * cs;
        let limit = (off + max).min(table_end);
        // Every cluster of a lookup lies in one L2 table: find it once.
        let geo = self.geo;
        let words = if geo.extended_l2 { 2 } else { 1 };
        let (l2off, _) = m.l1_entry(gc / l2n)?;
        let table: Option<&[u64]> = if l2off.is_none() {
            None
        } else {
            m.load_l2(l2off)?;
            Some(&m.l2.get(l2off.get()).expect("loaded").data)
        };
        let entry_of = |g: u64| -> Result<L2Entry> {
            match table {
                None => Ok(L2Entry::Normal {
                    host: HostOffset::NONE,
                    copied: false,
                    zero: false,
                    bitmap: 0,
                }),
                Some(t) => {
                    let i = index(g % l2n) * words;
                    geo.decode_l2(t[i], if words == 2 { t[i + 1] } else { 0 })
                }
            }
        };
        let first_entry = entry_of(gc)?;
        let sc0 = self.geo.subcluster_in((off % cs) / scs);
        let first = self.geo.sub_state(first_entry, sc0);
        let within = off % scs;
        let run = match first {
            SubState::Data { host } => Run::Data {
                host: host + within,
            },
            SubState::Zero { host } => Run::Zero {
                host: if host.is_none() {
                    host
                } else {
                    host + off % cs
                },
            },
            SubState::Unallocated => Run::Unallocated,
            SubState::Compressed { offset, size } => {
                let end = ((gc + 1) * cs).min(limit);
                return Ok((
                    Run::Compressed {
                        offset,
                        size,
                        skip: off % cs,
                    },
                    end - off,
                ));
            }
        };
        // Extend over following subclusters while the state continues.
        let mut pos = off - within + scs; // start of the next subcluster
        let mut entry = first_entry;
        let mut cur_gc = gc;
        while pos < limit {
            let g = pos / cs;
            if g != cur_gc {
                cur_gc = g;
                entry = entry_of(g)?;
            }
            let sc = self.geo.subcluster_in((pos % cs) / scs);
            let st = self.geo.sub_state(entry, sc);
            let same = match (first, st) {
                (SubState::Data { host: h0 }, SubState::Data { host }) => {
                    host == h0 + (pos - (off - within))
                }
                (SubState::Zero { host: h0 }, SubState::Zero { host }) => {
                    (h0.is_none() && host.is_none())
                        || (!h0.is_none() && host == h0 + (pos - (off - within)))
                }
                (SubState::Unallocated, SubState::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            pos += scs;
            let _ = nsub;
        }
        Ok((run, pos.min(limit) - off))
    }

    /// Read a run's bytes into `buf` (without the metadata lock).
    fn read_run(&self, run: Run, buf: &mut [u8], off: u64) -> Result<()> {
        match run {
            Run::Data { host } => {
                let storage = self.data_storage()?;
                self.storage.debug_event(DebugEvent::ReadAio);
                match &self.crypt {
                    None => storage.read_at(buf, host.get()).map_err(Error::from),
                    Some(c) => c.read(&**storage, host.get(), off, buf),
                }
                .map_err(|e| self.err(e))
            }
            Run::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Run::Unallocated => self.read_backing(buf, off),
            Run::Compressed { .. } if self.data.is_external() => {
                Err(self.err(data_file::compressed_cluster(off)))
            }
            Run::Compressed { offset, size, skip } => {
                let mut zc = sync::lock(&self.zcache);
                if zc.as_ref().map(|(o, _)| *o) != Some(offset) {
                    // Data that does not decompress fails the guest read at this
                    // cluster's guest offset (the host offset is in the message):
                    // callers word it as the read error QEMU's EIO is there.
                    let data = self
                        .decompress_cluster(offset, size)
                        .map_err(|e| e.at_offset(Offset::Guest(GuestOffset(off))))?;
                    *zc = Some((offset, data));
                }
                let data = &zc.as_ref().expect("filled").1;
                let skip = index(skip);
                buf.copy_from_slice(&data[skip..skip + buf.len()]);
                Ok(())
            }
        }
    }

    fn decompress_cluster(&self, offset: HostOffset, size: u64) -> Result<Vec<u8>> {
        let cs = self.geo.cluster_size();
        let offset = offset.get();
        if offset
            .checked_add(size)
            .is_none_or(|e| e > header::MAX_HOST_OFFSET)
        {
            return Err(self.err(Error::corrupt(format!(
                "compressed cluster at 0x{offset:x} out of range"
            ))));
        }
        // The entry's sector count bounds `size` by two clusters.
        let mut input = vec![0u8; index(size)];
        self.storage.debug_event(DebugEvent::ReadCompressed);
        self.storage
            .read_at(&mut input, offset)
            .map_err(|e| self.err(e))?;
        let mut out = vec![0u8; index(cs)];
        let kind = self.compression_type();
        compress::decompress(kind, &input, &mut out).map_err(|msg| {
            self.err(Error::new(
                ErrorKind::BadCompressedData,
                format!("Could not decompress cluster: at host offset 0x{offset:x}: {msg}"),
            ))
        })?;
        Ok(out)
    }

    /// A write-zeroes request; with `only_by_metadata`, done only if no zero data
    /// must be written (checked and done under one lock, so the answer cannot go
    /// stale), else `Ok(false)` with nothing changed.
    fn zero_request(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        only_by_metadata: bool,
    ) -> Result<bool> {
        self.check_writable()?;
        check_range(offset, len, self.virtual_size()).map_err(|e| self.err(e))?;
        let cs = self.geo.cluster_size();
        let _busy = self
            .inflight
            .acquire(offset / cs, (offset + len).div_ceil(cs));
        let mut m = self.lock()?;
        if only_by_metadata {
            let fast = self
                .zeroes_by_metadata(&mut m, offset, len)
                .map_err(|e| self.fail_corrupt(&mut m, e))?;
            if !fast {
                return Ok(false);
            }
        }
        m.before_guest_change(offset, len)
            .map_err(|e| self.err(e))?;
        self.zero_locked(&mut m, offset, len, may_unmap, false)
            .map_err(|e| self.fail_corrupt(&mut m, e))?;
        Ok(true)
    }

    /// Whether a backing device is attached (unallocated ranges read from it).
    fn has_backing(&self) -> bool {
        sync::read(&self.backing).is_some()
    }

    /// Whether unallocated clusters may read as something other than zeroes: a
    /// backing device is attached, or the header names a backing file (the image
    /// was opened without it, but whoever opens it with its chain reads through).
    /// Zeroing must not leave clusters unallocated then.
    fn zero_needs_allocation(&self, m: &Meta) -> bool {
        self.has_backing() || m.h.backing_file.is_some()
    }

    /// Read guest bytes that this layer does not hold: from the backing device, or
    /// zeroes past its end or without one.
    fn read_backing(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let backing = sync::read(&self.backing).clone();
        match backing {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some(b) => {
                self.storage.debug_event(DebugEvent::ReadBackingAio);
                let bsize = b.virtual_size();
                let len = buf.len() as u64;
                if off >= bsize {
                    buf.fill(0);
                    return Ok(());
                }
                let n = index((bsize - off).min(len));
                b.read(&mut buf[..n], off)?;
                buf[n..].fill(0);
                Ok(())
            }
        }
    }

    /// Read with the metadata lock already held (for copy-on-write inside writes).
    pub(crate) fn read_locked(&self, m: &mut Meta, buf: &mut [u8], off: u64) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let (run, n) = self.lookup(m, off + pos as u64, (buf.len() - pos) as u64)?;
            let n = index(n);
            self.read_run(run, &mut buf[pos..pos + n], off + pos as u64)?;
            pos += n;
        }
        Ok(())
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(self.err(Error::read_only()))
        } else {
            Ok(())
        }
    }

    /// Report a corruption found while writing: set the corrupt bit, then fail.
    pub(crate) fn fail_corrupt(&self, m: &mut Meta, e: Error) -> Error {
        if e.kind() == ErrorKind::Corrupt {
            m.mark_corrupt();
        }
        self.err(e)
    }

    /// Write with the metadata lock held throughout (internal callers).
    fn write_locked(&self, m: &mut Meta, buf: &[u8], offset: u64) -> Result<()> {
        let plan = self.plan_write(m, buf, offset)?;
        self.write_segments(&plan, buf)?;
        self.commit_plan(m, plan)
    }

    /// Decide where each part of a guest write goes: in place into owned clusters, or
    /// into newly allocated clusters (with copy-on-write of partial clusters). Allocates
    /// and builds copy-on-write data; writes no data and changes no mapping.
    fn plan_write(&self, m: &mut Meta, buf: &[u8], offset: u64) -> Result<WritePlan> {
        if self.crypt.is_some() {
            if let Some((whole, start)) = self.sector_aligned(m, buf, offset)? {
                // Every segment of the plan then owns its bytes: `buf` is not used.
                let mut plan = self.plan_write(m, &whole, start)?;
                for seg in &mut plan.segs {
                    if let SegData::Buf(a, b) = seg.data {
                        seg.data = SegData::Owned(whole[a..b].to_vec());
                    }
                }
                return Ok(plan);
            }
        }
        let cs = self.geo.cluster_size();
        let l2n = m.l2_entries();
        let mut plan = WritePlan {
            falloc: m.falloc_new_clusters,
            ..WritePlan::default()
        };
        let mut pos = 0u64;
        let len = buf.len() as u64;
        while pos < len {
            let off = offset + pos;
            let gc = off / cs;
            let in_cl = off % cs;
            let n = (cs - in_cl).min(len - pos);
            let entry = m.entry(gc)?;
            if let Some(host) = self.in_place_target(entry, in_cl, n) {
                // Gather following in-place clusters that are contiguous on the host.
                let mut run = n;
                let mut g = gc + 1;
                while pos + run < len {
                    let e2 = m.entry(g)?;
                    let n2 = cs.min(len - pos - run);
                    match self.in_place_target(e2, 0, n2) {
                        Some(h2) if h2 == host + (g - gc) * cs => {}
                        _ => break,
                    }
                    run += n2;
                    g += 1;
                }
                m.check_data_write(host + in_cl, run)
                    .map_err(|e| self.fail_corrupt(m, e))?;
                plan.segs.push(Seg {
                    host: host + in_cl,
                    guest: off,
                    data: SegData::Buf(index(pos), index(pos + run)),
                    fresh: false,
                    cow: false,
                });
                pos += run;
                continue;
            }
            if let L2Entry::Normal {
                host, copied: true, ..
            } = entry
            {
                if !host.is_none() {
                    // An owned cluster whose written part is not all allocated (zero
                    // flag, or subclusters unallocated or zero): written in place,
                    // with copy-on-write only of the partly written subclusters that
                    // hold no data, and only those subclusters gain their bit.
                    let (from, to) = self.in_place_cow(entry, in_cl, n);
                    m.check_data_write(host + from, to - from)
                        .map_err(|e| self.fail_corrupt(m, e))?;
                    let data = self.cow_merge(
                        m,
                        gc * cs,
                        from,
                        to,
                        in_cl,
                        &buf[index(pos)..index(pos + n)],
                    )?;
                    plan.segs.push(Seg {
                        host: host + from,
                        guest: gc * cs + from,
                        cow: from < in_cl || to > in_cl + n,
                        data: SegData::Owned(data),
                        fresh: false,
                    });
                    plan.updates.push(L2Update {
                        gc,
                        entry: host.get() | OFLAG_COPIED,
                        bitmap: self.written_bitmap(entry, from, to),
                        old: None,
                    });
                    pos += n;
                    continue;
                }
            }
            // Allocate: a run of clusters that all need new host clusters, within one
            // L2 table, at most 32 MiB at a time.
            let table_end = (gc / l2n + 1) * l2n;
            let max_clusters = ((32u64 << 20) / cs).max(1);
            let mut k = 1u64;
            let mut olds = vec![entry];
            while k < max_clusters && gc + k < table_end && pos + (k * cs - in_cl) < len {
                let e2 = m.entry(gc + k)?;
                if matches!(e2, L2Entry::Normal { copied: true, host, .. } if !host.is_none()) {
                    break;
                }
                olds.push(e2);
                k += 1;
            }
            // The L2 table first, so a sequentially written image keeps QEMU's layout.
            m.l2_for_write(gc / l2n)?;
            let host = self.alloc_data(m, gc, k)?;
            let run_bytes = (k * cs - in_cl).min(len - pos);
            // Bytes used in the last cluster.
            let end_in_last = (in_cl + run_bytes) - (k - 1) * cs;
            // What of the new clusters gets written: the request, widened by
            // copy-on-write to what the old entries make necessary (whole clusters
            // without extended L2; with it, the partly written subclusters and
            // whatever the old host cluster holds).
            let from = self.fresh_cow_start(olds[0], in_cl);
            let last = *olds.last().expect("at least one cluster");
            let to = (k - 1) * cs + self.fresh_cow_end(last, end_in_last);
            if from == in_cl && to == in_cl + run_bytes {
                plan.segs.push(Seg {
                    host: host + in_cl,
                    guest: off,
                    data: SegData::Buf(index(pos), index(pos + run_bytes)),
                    fresh: true,
                    cow: false,
                });
            } else {
                // Copy-on-write: fill the head and tail from the current guest
                // view, then write it all at once.
                let data = self.cow_merge(
                    m,
                    gc * cs,
                    from,
                    to,
                    in_cl,
                    &buf[index(pos)..index(pos + run_bytes)],
                )?;
                plan.segs.push(Seg {
                    host: host + from,
                    guest: gc * cs + from,
                    data: SegData::Owned(data),
                    fresh: true,
                    cow: true,
                });
            }
            for (i, old) in olds.into_iter().enumerate() {
                let i = i as u64;
                // This cluster's part of the written range `[from, to)`.
                let c_from = from.saturating_sub(i * cs).min(cs);
                let c_to = (to - i * cs).min(cs);
                plan.updates.push(L2Update {
                    gc: gc + i,
                    entry: (host + i * cs).get() | OFLAG_COPIED,
                    bitmap: self.written_bitmap(old, c_from, c_to),
                    old: Some(old),
                });
            }
            pos += run_bytes;
        }
        Ok(plan)
    }

    /// The bytes `[from, to)` of the cluster run starting at guest offset `base`:
    /// `data` at `at`, the rest read from the current guest view (copy-on-write).
    fn cow_merge(
        &self,
        m: &mut Meta,
        base: u64,
        from: u64,
        to: u64,
        at: u64,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let end = at + data.len() as u64;
        let mut out = vec![0u8; index(to - from)];
        if from < at || end < to {
            self.storage.debug_event(DebugEvent::CowRead);
        }
        if from < at {
            self.read_locked(m, &mut out[..index(at - from)], base + from)?;
        }
        if end < to {
            self.read_locked(m, &mut out[index(end - from)..], base + end)?;
        }
        out[index(at - from)..index(end - from)].copy_from_slice(data);
        Ok(out)
    }

    /// Whether subcluster `sc` of `e` holds data of its own (without extended L2:
    /// the cluster is not zero-flagged).
    fn sub_has_data(&self, e: L2Entry, sc: u64) -> bool {
        match e {
            L2Entry::Normal { bitmap, zero, .. } => {
                if self.geo.extended_l2 {
                    bitmap & (1 << sc) != 0
                } else {
                    !zero
                }
            }
            L2Entry::Compressed { .. } => true,
        }
    }

    /// The range `[from, to)` of an owned cluster that a write of `[in_cl, in_cl+n)`
    /// into it writes, as QEMU widens it: a partly written subcluster that holds no
    /// data (unallocated or zero; without extended L2, a zero-flagged cluster)
    /// is filled to its bounds from the guest view, one holding data is not.
    fn in_place_cow(&self, e: L2Entry, in_cl: u64, n: u64) -> (u64, u64) {
        let scs = self.geo.subcluster_size();
        let end = in_cl + n;
        let from = if self.sub_has_data(e, in_cl / scs) {
            in_cl
        } else {
            in_cl / scs * scs
        };
        let to = if self.sub_has_data(e, (end - 1) / scs) {
            end
        } else {
            end.next_multiple_of(scs)
        };
        (from, to)
    }

    /// Whether an entry that a write replaces has a host cluster whose data the
    /// new cluster must take over (allocated but shared, or compressed).
    fn has_old_data(&self, e: L2Entry) -> bool {
        match e {
            L2Entry::Normal { host, copied, .. } => {
                !host.is_none() || (self.geo.data_file && copied)
            }
            L2Entry::Compressed { .. } => true,
        }
    }

    /// Where the write into a new cluster replacing `old` starts, the request
    /// starting at `in_cl`: at the cluster start without extended L2 or for a
    /// compressed cluster; at the first subcluster holding data of an old host
    /// cluster if that comes first; else at the written subcluster's start.
    fn fresh_cow_start(&self, old: L2Entry, in_cl: u64) -> u64 {
        let scs = self.geo.subcluster_size();
        let sc = in_cl / scs;
        match old {
            L2Entry::Compressed { .. } => 0,
            L2Entry::Normal { bitmap, .. } if self.has_old_data(old) => {
                let first = u64::from((bitmap & ALL_ALLOCATED).trailing_zeros());
                sc.min(first) * scs
            }
            L2Entry::Normal { .. } => sc * scs,
        }
    }

    /// Where the write into a new cluster replacing `old` ends, the request
    /// ending at `end` (in `1..=cluster size`): the mirror of [`Self::fresh_cow_start`].
    fn fresh_cow_end(&self, old: L2Entry, end: u64) -> u64 {
        let cs = self.geo.cluster_size();
        let scs = self.geo.subcluster_size();
        let nsub = u64::from(self.geo.subclusters());
        let sc = (end - 1) / scs;
        match old {
            L2Entry::Compressed { .. } => cs,
            L2Entry::Normal { bitmap, .. } if self.has_old_data(old) => {
                if !self.geo.extended_l2 {
                    return cs;
                }
                #[allow(clippy::cast_possible_truncation)] // the low 32 bits
                let alloc = (bitmap & ALL_ALLOCATED) as u32;
                let after = u64::from(alloc.leading_zeros());
                cs - (nsub - sc - 1).min(after) * scs
            }
            L2Entry::Normal { .. } => end.next_multiple_of(scs),
        }
    }

    /// The subcluster bitmap of a cluster after `[from, to)` of it was written
    /// (`old` the entry before): the written subclusters are allocated and not
    /// zero, the others keep their state. Without extended L2 it is not stored.
    fn written_bitmap(&self, old: L2Entry, from: u64, to: u64) -> u64 {
        if !self.geo.extended_l2 {
            return ALL_ALLOCATED;
        }
        let old_bitmap = match old {
            L2Entry::Normal { bitmap, .. } => bitmap,
            L2Entry::Compressed { .. } => 0,
        };
        let scs = self.geo.subcluster_size();
        let first = from / scs;
        let last = (to - 1) / scs;
        let range = ((1u64 << (last - first + 1)) - 1) << first;
        (old_bitmap | range) & !(range << 32)
    }

    /// An encrypted image's write of `buf` at `offset` widened to whole sectors
    /// (the sectors around it read back first), or `None` when it is aligned.
    fn sector_aligned(
        &self,
        m: &mut Meta,
        buf: &[u8],
        offset: u64,
    ) -> Result<Option<(Vec<u8>, u64)>> {
        let ss = crate::crypto::SECTOR_SIZE;
        let end = offset + buf.len() as u64;
        if offset.is_multiple_of(ss) && end.is_multiple_of(ss) {
            return Ok(None);
        }
        let start = offset - offset % ss;
        let stop = end.next_multiple_of(ss);
        let mut whole = vec![0u8; index(stop - start)];
        let head = index(offset - start);
        if head > 0 {
            self.read_locked(m, &mut whole[..index(ss)], start)?;
        }
        let tail = index(stop - end);
        if tail > 0 {
            let at = whole.len() - index(ss);
            self.read_locked(m, &mut whole[at..], stop - ss)?;
        }
        whole[head..head + buf.len()].copy_from_slice(buf);
        Ok(Some((whole, start)))
    }

    /// Write a plan's data (no lock needed: the clusters are reserved for it),
    /// encrypted first in an encrypted image.
    fn write_segments(&self, plan: &WritePlan, buf: &[u8]) -> Result<()> {
        let storage = self.data_storage()?;
        for seg in &plan.segs {
            let data = match &seg.data {
                SegData::Buf(a, b) => &buf[*a..*b],
                SegData::Owned(v) => v.as_slice(),
            };
            let sealed;
            let data = match &self.crypt {
                None => data,
                Some(c) => {
                    sealed = c
                        .seal(seg.host.get(), seg.guest, data)
                        .map_err(|e| self.err(e))?;
                    sealed.as_slice()
                }
            };
            if plan.falloc && seg.fresh {
                storage
                    .preallocate(seg.host.get(), data.len() as u64)
                    .map_err(|e| self.err(e))?;
            }
            self.storage.debug_event(DebugEvent::WriteAio);
            if seg.cow {
                self.storage.debug_event(DebugEvent::CowWrite);
            }
            storage
                .write_at(data, seg.host.get())
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Point the L2 entries at the data a plan wrote, and drop the old references.
    fn commit_plan(&self, m: &mut Meta, plan: WritePlan) -> Result<()> {
        let l2n = m.l2_entries();
        for u in plan.updates {
            let l2 = m.l2_for_write(u.gc / l2n)?;
            m.set_raw_entry(l2, u.gc % l2n, u.entry, u.bitmap)?;
            if let Some(old) = u.old {
                m.release_entry(old);
            }
        }
        Ok(())
    }

    /// Host offset of the cluster if `[in_cl, in_cl+n)` can be written in place:
    /// the cluster is owned (COPIED), reads its own data there, and no metadata change
    /// is needed.
    fn in_place_target(&self, e: L2Entry, in_cl: u64, n: u64) -> Option<HostOffset> {
        match e {
            L2Entry::Normal {
                host,
                copied: true,
                zero: false,
                bitmap,
            } if !host.is_none() => {
                if !self.geo.extended_l2 {
                    return Some(host);
                }
                let scs = self.geo.subcluster_size();
                let first = in_cl / scs;
                let last = (in_cl + n - 1) / scs;
                let mask = ((1u64 << (last - first + 1)) - 1) << first;
                (bitmap & mask == mask).then_some(host)
            }
            _ => None,
        }
    }

    /// Turn the flushes between ordered metadata writes off (or back on). With
    /// barriers off, metadata is still written in the safe order, but only
    /// [`BlockDevice::flush`] makes anything durable: for an image being filled from
    /// scratch (the target of a convert), where a crash midway leaves an unfinished
    /// copy whatever the ordering, and the flushes would force the page cache out
    /// synchronously again and again. Turning barriers back on flushes first.
    pub fn set_write_barriers(&self, on: bool) -> Result<()> {
        if on {
            crate::BlockDevice::flush(self)?;
        }
        self.lock()?.barriers = on;
        Ok(())
    }

    /// The notices of this session's operations so far (see [`Meta::notices`]),
    /// oldest first; each is returned once.
    pub fn take_notices(&self) -> Vec<String> {
        match self.lock() {
            Ok(mut m) => std::mem::take(&mut m.notices),
            Err(_) => Vec::new(),
        }
    }

    /// Allocate file space (`fallocate`) for newly allocated data clusters before
    /// writing them. Off by default; for bulk copies into a new image (convert),
    /// where it spares the file system per-page delayed-allocation work.
    pub fn set_falloc_new_clusters(&self, on: bool) {
        // A poisoned image writes nothing more: there is nothing to set then.
        if let Ok(mut m) = self.lock() {
            m.falloc_new_clusters = on;
        }
    }

    /// Punch the file's space of clusters that zeroes written with unmap allowed,
    /// or a discard, free (once their refcounts are durable at zero), as QEMU
    /// does for an image it opened with unmapping on (`qemu-img commit`'s base):
    /// a freed cluster then reads as zeroes in the file, not as stale data.
    /// Off by default.
    pub fn set_punch_unmapped(&self, on: bool) {
        // A poisoned image writes nothing more: there is nothing to set then.
        if let Ok(mut m) = self.lock() {
            m.punch_unmapped = on;
        }
    }

    /// Write one cluster's worth of already compressed bytes for guest cluster `gc`.
    pub fn write_compressed_cluster(&self, gc: u64, compressed: &[u8]) -> Result<()> {
        self.check_writable()?;
        if self.data.is_external() {
            return Err(self.err(data_file::compressed_write_refused()));
        }
        let mut m = self.lock()?;
        let cs = m.cluster_size();
        let start = gc.saturating_mul(cs);
        let len = cs.min(m.h.size.saturating_sub(start));
        m.before_guest_change(start, len)?;
        let l2n = m.l2_entries();
        let r = (|| {
            let old = m.entry(gc)?;
            let l2 = m.l2_for_write(gc / l2n)?;
            let off = self.alloc_bytes(&mut m, compressed.len() as u64)?;
            self.storage.debug_event(DebugEvent::WriteCompressed);
            self.storage.write_at(compressed, off.get())?;
            let e = self.geo.encode_compressed(off, compressed.len() as u64);
            m.set_raw_entry(l2, gc % l2n, e, 0)?;
            m.release_entry(old);
            Ok(())
        })();
        r.map_err(|e| self.fail_corrupt(&mut m, e))
    }

    /// Round the image file's length up to a multiple of 512 bytes, as qemu-img
    /// leaves a qcow2 image at the end of a compressed convert (the last
    /// compressed cluster may end mid-sector). The file only grows past every
    /// byte in use and no metadata changes, so a crash at any point leaves the
    /// image as consistent as it was.
    pub fn align_file_end_to_sector(&self) -> Result<()> {
        self.check_writable()?;
        let _m = self.lock()?;
        let len = self.storage.size()?;
        let aligned = len
            .checked_next_multiple_of(512)
            .ok_or_else(|| Error::invalid_argument("image file length overflows"))?;
        if aligned != len {
            self.storage.set_size(aligned)?;
        }
        Ok(())
    }

    /// Compress a whole guest cluster (or the zero-padded last one). `None` when it
    /// does not shrink, so it should be written uncompressed. Needs no lock: callers
    /// compress on several threads and write in order.
    pub fn compress_cluster(&self, data: &[u8]) -> Option<Vec<u8>> {
        let cs = index(self.geo.cluster_size());
        let kind = self.compression_type();
        if data.len() < cs {
            let mut padded = data.to_vec();
            padded.resize(cs, 0);
            return compress::compress(kind, &padded, cs - 1);
        }
        compress::compress(kind, data, cs - 1)
    }

    /// Allocate `size` bytes for compressed data, packing into the current partly
    /// used cluster when it fits or continues contiguously. Each host cluster the
    /// bytes touch gains one reference.
    fn alloc_bytes(&self, m: &mut Meta, size: u64) -> Result<HostOffset> {
        self.storage.debug_event(DebugEvent::ClusterAllocBytes);
        let bits = self.geo.cluster_bits;
        let cur = HostOffset(m.compressed_cursor);
        if !cur.is_none() && !cur.is_aligned(bits) {
            let first = cur.cluster(bits);
            let last = (cur + (size - 1)).cluster(bits);
            let mut ok = true;
            for c in first.get() + 1..=last.get() {
                if m.refcount(ClusterIndex(c))? != 0
                    || m.refblock_offset(c / m.rb_entries())?.is_none()
                {
                    ok = false;
                }
            }
            if ok {
                m.update_refcount(first, 1)?;
                for c in first.get() + 1..=last.get() {
                    m.update_refcount(ClusterIndex(c), 1)?;
                }
                m.compressed_cursor = (cur + size).get();
                return Ok(cur);
            }
        }
        let off = m.alloc_clusters(ClusterCount::for_bytes(size, bits))?;
        m.compressed_cursor = (off + size).get();
        Ok(off)
    }

    fn zero_locked(
        &self,
        m: &mut Meta,
        offset: u64,
        len: u64,
        may_unmap: bool,
        discard: bool,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let l2n = m.l2_entries();
        let has_backing = self.has_backing();
        let named_backing = self.zero_needs_allocation(m);
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos / cs;
            let cstart = gc * cs;
            let cend = (cstart + cs).min(self.virtual_size().max(cstart + cs));
            // A range ending at the disk's end covers its last cluster whole (the
            // bytes past the end are never read), as QEMU zeroes it; a raw data
            // file is the disk itself and ends there.
            let at_end = end == self.virtual_size() && !self.data.is_raw();
            let mut whole = pos == cstart && (end >= cstart + cs || at_end);
            let n = (cstart + cs).min(end) - pos;
            if !whole && !discard && self.zeroes_cluster_whole(m, gc, pos, n)? {
                // The whole cluster gets its zero flag, as QEMU gives it.
                whole = true;
                pos = cstart;
            }
            if !whole {
                if !discard && self.zero_subclusters(m, gc, pos, n, has_backing)? {
                    pos += n;
                    continue;
                }
                if !discard && !self.reads_zero(m, pos, n, has_backing)? {
                    let zeros = vec![0u8; index(n)];
                    self.write_locked(m, &zeros, pos)?;
                }
                pos += n;
                continue;
            }
            let _ = cend;
            let old = m.entry(gc)?;
            // A raw data file is the disk itself: it gets the zeroes (or the hole)
            // first, and zeroed clusters keep their place in it.
            let may_unmap = if self.data.is_raw() {
                let data = self.data_storage()?;
                if discard {
                    data.discard(cstart, cs)?;
                } else {
                    data.write_zeroes(cstart, cs)?;
                }
                false
            } else {
                may_unmap
            };
            let v3 = self.geo.version >= 3;
            let (new_e, new_b, release) = if !v3 {
                if named_backing && !discard {
                    // v2 has no zero flag: with a backing file, zeroes must be written.
                    let zeros = vec![0u8; index(cs)];
                    self.write_locked(m, &zeros, pos)?;
                    pos += cs;
                    continue;
                }
                (0, 0, true)
            } else {
                match old {
                    L2Entry::Normal {
                        host, copied: true, ..
                    } if !host.is_none() && !may_unmap && !discard => {
                        if self.geo.extended_l2 {
                            (host.get() | OFLAG_COPIED, ALL_ZERO, false)
                        } else {
                            (host.get() | OFLAG_COPIED | OFLAG_ZERO, 0, false)
                        }
                    }
                    _ => {
                        if self.geo.extended_l2 {
                            (0, ALL_ZERO, true)
                        } else {
                            (OFLAG_ZERO, 0, true)
                        }
                    }
                }
            };
            let unchanged = match old {
                L2Entry::Normal {
                    host: HostOffset::NONE,
                    zero,
                    bitmap,
                    ..
                } => {
                    (new_e == 0 && new_b == 0 && !zero && bitmap == 0)
                        || (new_e == OFLAG_ZERO && zero)
                        || (new_e == 0 && new_b == ALL_ZERO && bitmap == ALL_ZERO)
                }
                _ => false,
            };
            if !unchanged {
                let l2 = m.l2_for_write(gc / l2n)?;
                m.set_raw_entry(l2, gc % l2n, new_e, new_b)?;
                if release {
                    if m.punch_unmapped && (may_unmap || discard) {
                        m.release_entry_punching(old);
                    } else {
                        m.release_entry(old);
                    }
                }
            }
            pos += cs;
        }
        Ok(())
    }

    /// Zero `[pos, pos+n)`, part of guest cluster `gc` (not all of it), by its
    /// subclusters, as QEMU zeroes an image with extended L2 entries: whole
    /// subclusters get their zero bit (and lose their allocation bit; the host
    /// cluster stays); a subcluster the range covers in part does too where the
    /// rest of it reads as zeroes and it holds no data, else the range's part of
    /// it is written as zero data. Returns false, changing nothing, where this
    /// does not apply (no extended L2, v2, a raw data file, a compressed cluster).
    fn zero_subclusters(
        &self,
        m: &mut Meta,
        gc: u64,
        pos: u64,
        n: u64,
        has_backing: bool,
    ) -> Result<bool> {
        if !self.geo.extended_l2 || self.geo.version < 3 || self.data.is_raw() {
            return Ok(false);
        }
        if matches!(m.entry(gc)?, L2Entry::Compressed { .. }) {
            return Ok(false);
        }
        let cs = self.geo.cluster_size();
        let sc = self.geo.subcluster_size();
        let cstart = gc * cs;
        let end = pos + n;
        let mut mask = 0u64;
        let mut at = pos;
        while at < end {
            let first = at / sc * sc;
            let next = (first + sc).min(end);
            let sub = u32::try_from((first - cstart) / sc)
                .expect("a subcluster index is below the subcluster count");
            let part = at != first || next != first + sc;
            let by_bit = if part {
                let state = self.geo.sub_state(m.entry(gc)?, sub);
                let holds_no_data = matches!(state, SubState::Unallocated | SubState::Zero { .. });
                let head_zero =
                    at == first || self.reads_zero(m, first, at - first, has_backing)?;
                let tail_end = (first + sc).min(self.virtual_size());
                let tail_zero =
                    next >= tail_end || self.reads_zero(m, next, tail_end - next, has_backing)?;
                holds_no_data && head_zero && tail_zero
            } else {
                true
            };
            if by_bit {
                mask |= 1u64 << sub;
            } else {
                let zeros = vec![0u8; index(next - at)];
                self.write_locked(m, &zeros, at)?;
            }
            at = next;
        }
        if mask != 0 {
            // Read again: a write above may have allocated the cluster.
            if let L2Entry::Normal {
                host,
                copied,
                bitmap,
                ..
            } = m.entry(gc)?
            {
                let new_bitmap = (bitmap | (mask << 32)) & !mask;
                if new_bitmap != bitmap {
                    let e = host.get() | if copied { OFLAG_COPIED } else { 0 };
                    let l2n = m.l2_entries();
                    let l2 = m.l2_for_write(gc / l2n)?;
                    m.set_raw_entry(l2, gc % l2n, e, new_bitmap)?;
                }
            }
        }
        Ok(true)
    }

    /// Whether zeroing `[offset, offset+len)` (as `zero_locked` does it) changes
    /// metadata only: partial clusters must already read as zeroes, and a v2 image
    /// with a backing file has no way to zero a whole cluster without writing it.
    fn zeroes_by_metadata(&self, m: &mut Meta, offset: u64, len: u64) -> Result<bool> {
        if self.data.is_raw() {
            // The zeroes go into the raw data file too.
            return Ok(false);
        }
        let cs = self.geo.cluster_size();
        let has_backing = self.has_backing();
        let named_backing = self.zero_needs_allocation(m);
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let cstart = pos / cs * cs;
            if pos == cstart && end >= cstart + cs {
                if self.geo.version < 3 && named_backing {
                    return Ok(false);
                }
                pos = end / cs * cs;
                continue;
            }
            let n = (cstart + cs).min(end) - pos;
            if !self.reads_zero(m, pos, n, has_backing)?
                && !self.zeroes_cluster_whole(m, pos / cs, pos, n)?
            {
                return Ok(false);
            }
            pos += n;
        }
        Ok(true)
    }

    /// Whether a request to zero `[pos, pos+n)`, part of guest cluster `gc`,
    /// zeroes the cluster whole, as QEMU's qcow2 driver does: a v3 image without
    /// extended L2 entries or a raw data file, a cluster that stores no data
    /// (unallocated, or a zero cluster), and the rest of the cluster reading as
    /// zeroes through the whole chain by its metadata. The cluster reads as
    /// zeroes in full then, and its zero flag keeps a backing file from showing
    /// through (instead of a cluster allocated and written with zero bytes).
    /// With a backing file named but not attached the rest cannot be known:
    /// false.
    fn zeroes_cluster_whole(&self, m: &mut Meta, gc: u64, pos: u64, n: u64) -> Result<bool> {
        if self.geo.version < 3 || self.geo.extended_l2 || self.data.is_raw() {
            return Ok(false);
        }
        let stores_nothing = match m.entry(gc)? {
            L2Entry::Normal { host, zero, .. } => zero || host.is_none(),
            _ => false,
        };
        if !stores_nothing {
            return Ok(false);
        }
        let cs = self.geo.cluster_size();
        let cstart = gc * cs;
        let cend = (cstart + cs).min(self.virtual_size());
        let rest = [(cstart, pos), (pos + n, cend)];
        for (from, to) in rest {
            if from < to && !self.chain_reads_zero(m, from, to - from)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether `[off, off+n)` reads as zeroes through the whole chain by the
    /// metadata of this layer and its backing devices (no data is read).
    fn chain_reads_zero(&self, m: &mut Meta, off: u64, n: u64) -> Result<bool> {
        let backing = sync::read(&self.backing).clone();
        let end = off + n;
        let mut pos = off;
        while pos < end {
            let (run, len) = self.lookup(m, pos, end - pos)?;
            match run {
                Run::Zero { .. } => {}
                Run::Unallocated => {
                    let zero = match &backing {
                        Some(b) => crate::reads_zero_by_status(b.as_ref(), pos, len)?,
                        None => m.h.backing_file.is_none(),
                    };
                    if !zero {
                        return Ok(false);
                    }
                }
                _ => return Ok(false),
            }
            pos += len.max(1);
        }
        Ok(true)
    }

    /// Whether `[off, off+n)` (inside one cluster) already reads as zeroes from its
    /// metadata alone.
    fn reads_zero(&self, m: &mut Meta, off: u64, n: u64, has_backing: bool) -> Result<bool> {
        let (run, len) = self.lookup(m, off, n)?;
        Ok(len >= n
            && (matches!(run, Run::Zero { .. }) || (run == Run::Unallocated && !has_backing)))
    }

    /// Grow the L1 table to at least `entries` entries (new table, header switch in one
    /// write, then the old table is freed).
    fn grow_l1(&self, m: &mut Meta, entries: u64) -> Result<()> {
        if entries <= m.l1.len() as u64 {
            return Ok(());
        }
        if entries * 8 > header::MAX_L1_BYTES {
            // QEMU's words: its L1 growth fails with EFBIG past 32 MiB.
            return Err(Error::invalid_argument(
                "Failed to grow the L1 table: File too large",
            ));
        }
        let mut table = m.l1.clone();
        table.resize(index(entries), 0);
        m.relocate_l1(table, None)
    }
}

impl Qcow2Image {
    /// Build an image from already validated parts (snapshot views share the file).
    pub(crate) fn from_parts(
        storage: Arc<dyn Storage>,
        h: Header,
        l1: Vec<u64>,
        reftable: Vec<u64>,
        snapshots: Vec<Snapshot>,
        read_only: bool,
    ) -> Qcow2Image {
        let geo = Geometry {
            cluster_bits: h.cluster_bits,
            extended_l2: h.extended_l2(),
            version: h.version,
            data_file: false,
        };
        let size = h.size;
        let compression = h.compression_type;
        let mut meta = Meta::new(storage.clone(), h, l1, reftable, read_only);
        meta.snapshots = snapshots;
        Qcow2Image {
            meta: Mutex::new(meta),
            storage,
            data: DataStore::Image,
            geo,
            size: AtomicU64::new(size),
            backing: RwLock::new(None),
            read_only,
            compression,
            zcache: Mutex::new(None),
            inflight: InFlight::default(),
            reuse: RwLock::new(()),
            crypt: None,
        }
    }

    /// The same image's encryption, for a view of it (a snapshot).
    pub(crate) fn sharing_encryption_of(mut self, other: &Qcow2Image) -> Qcow2Image {
        self.crypt = other.crypt.clone();
        self
    }

    /// The encryption the image records (`None` for a clear image).
    pub fn encryption(&self) -> Option<EncryptionInfo> {
        self.crypt.as_ref().map(|c| c.info.clone())
    }

    /// Hold off every reader and writer: for operations that remap or free clusters
    /// anywhere (snapshots, repair).
    pub(crate) fn exclusive(&self) -> (std::sync::RwLockWriteGuard<'_, ()>, impl Drop + '_) {
        let gate = sync::write(&self.reuse);
        let busy = self.inflight.acquire(0, u64::MAX);
        (gate, busy)
    }

    pub(crate) fn set_virtual_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    /// Grow the L1 table to `entries` entries (snapshot apply, VM state).
    pub(crate) fn grow_l1_for(&self, m: &mut Meta, entries: u64) -> Result<()> {
        self.grow_l1(m, entries)
    }

    /// Write guest bytes that may lie past the virtual disk (the VM-state area).
    pub(crate) fn write_beyond_disk(&self, m: &mut Meta, data: &[u8], off: u64) -> Result<()> {
        let end = off
            .checked_add(data.len() as u64)
            .ok_or_else(|| Error::invalid_argument("VM state offset overflows"))?;
        let entries = m.h.l1_entries_for(end);
        self.grow_l1(m, entries)?;
        m.mark_dirty_if_lazy()?;
        self.write_locked(m, data, off)
    }

    /// Read guest bytes that may lie past the virtual disk (the VM-state area).
    pub(crate) fn read_beyond_disk(&self, m: &mut Meta, buf: &mut [u8], off: u64) -> Result<()> {
        self.read_locked(m, buf, off)
    }

    /// Drop whole clusters past the virtual disk (the VM-state area).
    pub(crate) fn discard_beyond_disk(&self, m: &mut Meta, off: u64, len: u64) -> Result<()> {
        self.zero_locked(m, off, len, true, true)
    }
}

pub(crate) fn read_table(storage: &dyn Storage, offset: u64, entries: u64) -> Result<Vec<u64>> {
    if entries == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; index(entries * 8)];
    storage.read_at(&mut buf, offset)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8")))
        .collect())
}

impl BlockDevice for Qcow2Image {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }
    fn set_write_barriers(&self, on: bool) -> Result<()> {
        Qcow2Image::set_write_barriers(self, on)
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        request(Operation::Read, Some(offset), || {
            check_range(offset, buf.len() as u64, self.virtual_size()).map_err(|e| self.err(e))?;
            let _reading = sync::read(&self.reuse);
            let mut pos = 0usize;
            while pos < buf.len() {
                let off = offset + pos as u64;
                let (run, n) = {
                    let mut m = self.lock()?;
                    self.lookup(&mut m, off, (buf.len() - pos) as u64)
                        .map_err(|e| self.err(e))?
                };
                let n = index(n);
                self.read_run(run, &mut buf[pos..pos + n], off)?;
                pos += n;
            }
            Ok(())
        })
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        request(Operation::Write, Some(offset), || {
            self.check_writable()?;
            check_range(offset, buf.len() as u64, self.virtual_size()).map_err(|e| self.err(e))?;
            if buf.is_empty() {
                return Ok(());
            }
            let cs = self.geo.cluster_size();
            let _busy = self
                .inflight
                .acquire(offset / cs, (offset + buf.len() as u64).div_ceil(cs));
            let plan = {
                let mut m = self.lock()?;
                m.before_guest_change(offset, buf.len() as u64)
                    .map_err(|e| self.err(e))?;
                self.plan_write(&mut m, buf, offset)
                    .map_err(|e| self.fail_corrupt(&mut m, e))?
            };
            // The data goes out without the metadata lock, so writes run in parallel.
            self.write_segments(&plan, buf)?;
            let mut m = self.lock()?;
            self.commit_plan(&mut m, plan)
                .map_err(|e| self.fail_corrupt(&mut m, e))
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        request(Operation::WriteZeroes, Some(offset), || {
            self.zero_request(offset, len, may_unmap, false).map(|_| ())
        })
    }

    fn write_zeroes_fast(&self, offset: u64, len: u64, may_unmap: bool) -> Result<bool> {
        request(Operation::WriteZeroes, Some(offset), || {
            self.zero_request(offset, len, may_unmap, true)
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        request(Operation::Discard, Some(offset), || {
            self.check_writable()?;
            check_range(offset, len, self.virtual_size()).map_err(|e| self.err(e))?;
            let cs = self.geo.cluster_size();
            // Only whole clusters are discarded (the last one may end at the disk's end).
            let start = offset.next_multiple_of(cs);
            let mut end = (offset + len) / cs * cs;
            if offset + len == self.virtual_size() {
                end = offset + len;
            }
            if end <= start {
                // Nothing to discard, yet bitmaps record the request, as QEMU's do.
                let mut m = self.lock()?;
                return m.dirty_bitmaps(offset, len).map_err(|e| self.err(e));
            }
            let _busy = self.inflight.acquire(start / cs, end.div_ceil(cs));
            let mut m = self.lock()?;
            m.before_guest_change(offset, len)
                .map_err(|e| self.err(e))?;
            let padded_end = end.next_multiple_of(cs);
            self.zero_locked(&mut m, start, padded_end - start, true, true)
                .map_err(|e| self.fail_corrupt(&mut m, e))
        })
    }

    fn flush(&self) -> Result<()> {
        request(Operation::Flush, None, || {
            if self.read_only {
                return Ok(());
            }
            // Queued frees become reusable clusters here: no reader may still be reading
            // them.
            let _gate = sync::write(&self.reuse);
            let mut m = self.lock()?;
            m.compressed_cursor = 0;
            m.storage.debug_event(DebugEvent::FlushToOs);
            m.flush_metadata().map_err(|e| self.err(e))?;
            m.storage.debug_event(DebugEvent::FlushToDisk);
            if !m.barriers {
                if let Some(d) = &m.data_storage {
                    d.flush().map_err(|e| self.err(e))?;
                }
                m.storage.flush().map_err(|e| self.err(e))?;
            }
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        request(Operation::BlockStatus, Some(offset), || {
            check_range(offset, len, self.virtual_size()).map_err(|e| self.err(e))?;
            let mut m = self.lock()?;
            let (run, n) = self.lookup(&mut m, offset, len).map_err(|e| self.err(e))?;
            // As QEMU: an encrypted image's host offsets are not offered (its
            // file holds ciphertext, useless to whoever would read it there).
            let clear = self.crypt.is_none();
            let status = match run {
                Run::Data { host } => Status::Data {
                    host_offset: clear.then_some(host.get()),
                    compressed: false,
                },
                Run::Zero { host } => Status::Zero {
                    host_offset: (clear && !host.is_none()).then_some(host.get()),
                },
                Run::Unallocated => Status::Unallocated,
                Run::Compressed { .. } => Status::Data {
                    host_offset: None,
                    compressed: true,
                },
            };
            Ok(Extent {
                offset,
                len: n,
                status,
            })
        })
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        sync::read(&self.backing).clone()
    }

    fn set_backing(&self, backing: Option<Arc<dyn BlockDevice>>) {
        *sync::write(&self.backing) = backing;
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.storage.allocated_bytes().map_err(|e| self.err(e))
    }

    fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        let old_size = self.virtual_size();
        // A backing file longer than the image would show through the range the
        // image grows over: QEMU zeroes that range, which takes zero clusters
        // (version 3); a version 2 image is refused before it changes.
        let hide_backing = self.grows_under_backing(new_size);
        if hide_backing {
            self.check_zeroable()?;
        }
        self.resize_metadata(new_size, allow_shrink)?;
        request(Operation::Resize, None, || {
            self.resize_data_file(old_size, new_size)
        })?;
        if hide_backing {
            self.zero_grown(old_size, new_size)?;
        }
        self.end_bitmap_resize()
    }

    fn path(&self) -> Option<PathBuf> {
        self.storage.path().map(|p| p.to_path_buf())
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.geo.cluster_size())
    }

    fn allocation_unit(&self) -> Option<u64> {
        Some(self.geo.subcluster_size())
    }

    fn close(&self) -> Result<()> {
        Qcow2Image::close(self)
    }

    fn host_file(&self) -> Option<&Arc<dyn Storage>> {
        // Host offsets of data are offsets in the external data file, if any.
        match &self.data {
            DataStore::Image => Some(&self.storage),
            DataStore::External { storage, .. } => Some(storage),
            DataStore::Unopened => None,
        }
    }

    fn internal_snapshots(&self) -> Option<&dyn crate::InternalSnapshots> {
        // Images with an external data file cannot have internal snapshots.
        (!self.data.is_external()).then_some(self as &dyn crate::InternalSnapshots)
    }

    fn overlay(&self) -> Option<&dyn crate::Overlay> {
        Some(self)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for Qcow2Image {
    /// Close the image, unless a panic is unwinding through its owner or left its
    /// metadata poisoned: an update may then be half made in memory, and the file
    /// keeps what the last completed write left (see [`strata_storage::sync`]).
    fn drop(&mut self) {
        if std::thread::panicking() || self.meta.is_poisoned() {
            return;
        }
        let _ = self.close();
    }
}

impl Qcow2Image {
    /// Record a new backing file name and format (or none) in the header, in one
    /// write of the first cluster, then flush. Only the pointer changes: the caller
    /// (rebase, commit, stream) makes the guest view right first.
    pub fn set_backing_file(
        &self,
        name: Option<&std::ffi::OsStr>,
        format: Option<&str>,
    ) -> Result<()> {
        if self.read_only {
            return Err(self.err(Error::read_only()));
        }
        let _excl = self.exclusive();
        let mut m = self.lock()?;
        let mut h = m.h.clone();
        h.backing_file = name.map(std::ffi::OsStr::to_os_string);
        h.backing_format = name.and(format).map(str::to_string);
        // The whole first cluster, as QEMU writes it: what an older, longer
        // header left past the new one's end is zeroed.
        let mut bytes = h.serialize().map_err(|e| self.err(e))?;
        bytes.resize(index(m.cluster_size()), 0);
        let r = (|| -> Result<()> {
            m.flush_metadata()?;
            m.storage.write_at(&bytes, 0)?;
            m.storage.flush()?;
            Ok(())
        })();
        r.map_err(|e| self.err(e))?;
        m.h = h;
        Ok(())
    }

    /// Whether growing to `new_size` reaches over the end of the image into a
    /// longer backing file, whose bytes there must not show through.
    pub(crate) fn grows_under_backing(&self, new_size: u64) -> bool {
        let old_size = self.virtual_size();
        let below = sync::read(&self.backing).as_ref().map(|b| b.virtual_size());
        new_size > old_size && below.is_some_and(|b| b > old_size)
    }

    /// Refuse, before anything changes, to zero a grown range with zero
    /// clusters on a version 2 image, which has none (QEMU's error).
    pub(crate) fn check_zeroable(&self) -> Result<()> {
        if self.geo.version < 3 {
            return Err(self.err(Error::new(
                ErrorKind::Unsupported,
                "Failed to zero out new clusters: Operation not supported",
            )));
        }
        Ok(())
    }

    /// Zero the range `[from, to)` an image grew over, as QEMU does when its
    /// backing file is longer: the subcluster holding the old end is written (its
    /// bytes from `from` on as zeroes, those before copied from the backing file),
    /// the subclusters after it become zero subclusters, keeping any clusters
    /// allocated for them.
    pub(crate) fn zero_grown(&self, from: u64, to: u64) -> Result<()> {
        let sub = self.geo.subcluster_size();
        let aligned = from.next_multiple_of(sub).min(to);
        if aligned > from {
            self.write(&vec![0u8; index(aligned - from)], from)?;
        }
        if to > aligned {
            self.write_zeroes(aligned, to - aligned, false)?;
        }
        Ok(())
    }

    /// The resize's own writes are done: persistent bitmaps it holds record
    /// later changes again (see [`Meta::bitmaps_end_resize`]).
    pub(crate) fn end_bitmap_resize(&self) -> Result<()> {
        self.lock()?.bitmaps_end_resize();
        Ok(())
    }

    /// Change the virtual size in the metadata (the guest view's part of a resize).
    /// Persistent bitmaps are held whole in memory from here until
    /// [`Qcow2Image::end_bitmap_resize`] (see [`Meta::bitmaps_begin_resize`]).
    pub(crate) fn resize_metadata(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        request(Operation::Resize, None, || {
            self.check_writable()?;
            let cur = self.virtual_size();
            if !new_size.is_multiple_of(512) {
                return Err(Error::invalid_argument(
                    "The new size must be a multiple of 512",
                ));
            }
            let _gate = sync::write(&self.reuse);
            let _busy = self.inflight.acquire(0, u64::MAX);
            let mut m = self.lock()?;
            // Each v3 snapshot records its own disk size, so the active disk may change
            // size under snapshots; v2 did not require that field (QEMU's rule).
            if !m.snapshots.is_empty() && self.geo.version < 3 {
                return Err(Error::invalid_argument(
                    "Can't resize a v2 image which has snapshots",
                ));
            }
            if new_size < cur && !allow_shrink {
                return Err(Error::invalid_argument(format!(
                    "Shrinking the image from {cur} to {new_size} bytes was not allowed"
                )));
            }
            // Checked even when the size stays (QEMU refuses an inconsistent
            // bitmap then too).
            m.bitmaps_begin_resize(new_size).map_err(|e| self.err(e))?;
            if new_size < cur {
                let cs = self.geo.cluster_size();
                let from = new_size.next_multiple_of(cs);
                let to = cur.next_multiple_of(cs);
                if to > from {
                    // QEMU discards the range in full; an external data file keeps
                    // the engine's own discard, which also reaches that file.
                    if self.data.is_external() {
                        self.zero_locked(&mut m, from, to - from, true, true)
                    } else {
                        m.discard_in_full(from / cs, to / cs)
                    }
                    .map_err(|e| self.err(e))?;
                }
                if !new_size.is_multiple_of(cs) {
                    // The tail of the last cluster must read as zeroes if the disk grows again.
                    let tail_end = (new_size.next_multiple_of(cs)).min(cur);
                    // Zeroed only where this image's own cluster holds data: an
                    // unallocated tail shows the backing file, which a later growth
                    // hides itself (the range it grows over is zeroed when the backing
                    // file is longer), so it stays unallocated as QEMU leaves it.
                    if tail_end > new_size
                        && !self.reads_zero(&mut m, new_size, tail_end - new_size, false)?
                    {
                        self.zero_locked(&mut m, new_size, tail_end - new_size, false, false)
                            .map_err(|e| self.err(e))?;
                    }
                }
                // L2 tables wholly past the new end go too, and the file gives back its
                // free tail (as QEMU's shrink does), before the header records the size.
                let first = new_size.div_ceil(m.l2_entries() * cs);
                m.drop_l2_tables(first, true, &[])
                    .map_err(|e| self.err(e))?;
            } else {
                let entries = m.h.l1_entries_for(new_size);
                // QEMU words a failed write of the growth as its own step.
                self.grow_l1(&mut m, entries)
                    .map_err(|e| match e.storage_error() {
                        Some(_) => e.in_step("Failed to grow the L1 table"),
                        None => e,
                    })
                    .map_err(|e| self.err(e))?;
            }
            m.flush_metadata().map_err(|e| self.err(e))?;
            m.storage
                .write_at(&new_size.to_be_bytes(), 24)
                .map_err(|e| self.err(e))?;
            m.storage.flush().map_err(|e| self.err(e))?;
            m.h.size = new_size;
            self.size.store(new_size, Ordering::Release);
            Ok(())
        })
    }
}
