//! [`VmdkImage`]: the guest view of a vmdk disk (its extents in order), with
//! QEMU's reads, writes, zero writes and block status.

use super::descriptor::{self, DESC_SIZE};
use super::extent::{Extent, Layout, Lookup, Sparse, GTE_ZEROED};
use super::header::{self, CowdHeader, SparseHeader, COWD_MAGIC, KDMV_MAGIC};
use crate::error::{request, Operation};
use crate::units::index;
use crate::{check_range, BlockDevice, Error, Extent as Run, Overlay, Result, Status};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use strata_storage::{sync, FileStorage, OpenOptions, Storage};

/// What `qemu-img info` shows of one extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentInfo {
    /// The extent file's name as opened.
    pub filename: PathBuf,
    /// The descriptor's type word (FLAT, SPARSE...), empty for the extent of
    /// a monolithic sparse file.
    pub format: String,
    /// Extent size in bytes.
    pub virtual_size: u64,
    /// Grain size in bytes (sparse extents only).
    pub cluster_size: Option<u64>,
    /// Whether grains are compressed (stream-optimized).
    pub compressed: bool,
}

struct State {
    extents: Vec<Extent>,
    cid: u32,
    /// Whether this session wrote a new CID already (QEMU's first write does).
    cid_updated: bool,
}

/// An open vmdk disk.
pub struct VmdkImage {
    storage: Arc<dyn Storage>,
    path: Option<PathBuf>,
    /// Where the descriptor text is in `storage` (0x200 in a sparse file).
    desc_offset: u64,
    create_type: String,
    parent_cid: u32,
    parent_hint: Option<String>,
    size: u64,
    /// Whether all extents live in `storage` (a monolithic sparse file).
    monolithic: bool,
    state: Mutex<State>,
    backing: RwLock<Option<Arc<dyn BlockDevice>>>,
    /// Whether closing syncs the files (see [`VmdkImage::set_write_barriers`]).
    barriers: std::sync::atomic::AtomicBool,
}

fn file_too_small() -> Error {
    Error::invalid("File is too small, not a valid image")
}

/// The first bytes of `storage` as QEMU's descriptor reader takes them (up
/// to 1 MiB - 1 from `offset`); a file under 4 bytes is refused.
fn read_head(storage: &dyn Storage, offset: u64) -> Result<Vec<u8>> {
    let len = storage.size()?;
    if len < 4 {
        return Err(file_too_small());
    }
    let mut buf = vec![0u8; index(len.min((1 << 20) - 1))];
    storage.read_at(&mut buf, offset)?;
    Ok(buf)
}

/// An extent from a file starting with a sparse header (`head`: its first bytes).
fn open_sparse(storage: Arc<dyn Storage>, head: &[u8], write: bool) -> Result<(Box<Sparse>, u64)> {
    match header::magic(head) {
        KDMV_MAGIC => {
            let h = SparseHeader::parse(&head[4..])?;
            let (s, sectors) = Sparse::open_kdmv(storage.as_ref(), h, write)?;
            Ok((Box::new(s), sectors))
        }
        COWD_MAGIC => {
            let h = CowdHeader::parse(&head[4..])?;
            let (s, sectors) = Sparse::open_cowd(storage.as_ref(), h)?;
            Ok((Box::new(s), sectors))
        }
        _ => Err(Error::invalid("Image not in VMDK format")),
    }
}

fn open_file(path: &Path, write: bool) -> Result<Arc<dyn Storage>> {
    let opts = if write {
        OpenOptions::write()
    } else {
        OpenOptions::read()
    };
    Ok(Arc::new(FileStorage::open(path, opts)?))
}

/// The extents a descriptor names, opened relative to `dir`.
fn open_extents(
    desc: &[u8],
    dir: Option<&Path>,
    main: Option<&Path>,
    write: bool,
) -> Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    for line in descriptor::extents(desc)? {
        let fname = Path::new(&line.file);
        let path = if fname.is_absolute() {
            fname.to_path_buf()
        } else {
            match dir {
                Some(d) => d.join(fname),
                None => {
                    return Err(Error::invalid(format!(
                        "Cannot use relative paths with VMDK descriptor file '{}'",
                        main.map(|p| p.display().to_string()).unwrap_or_default()
                    )))
                }
            }
        };
        let storage = open_file(&path, write)?;
        let (layout, sectors) = match line.kind.as_str() {
            "FLAT" | "VMFS" => {
                let start = line
                    .offset
                    .checked_mul(512)
                    .ok_or_else(|| Error::invalid("Invalid extent offset"))?;
                (Layout::Flat { start }, line.sectors)
            }
            "SPARSE" | "VMFSSPARSE" => {
                let head = read_head(storage.as_ref(), 0)?;
                let (s, sectors) = open_sparse(storage.clone(), &head, write)?;
                (Layout::Sparse(s), sectors)
            }
            other => {
                return Err(Error::unsupported(format!("extent type '{other}'")));
            }
        };
        let ext = Extent {
            storage,
            filename: path,
            kind: Some(line.kind.clone()),
            sectors,
            start,
            layout,
        };
        start = ext
            .len()
            .checked_add(start)
            .filter(|_| sectors <= u64::MAX / 512)
            .ok_or_else(|| Error::invalid("Image too large"))?;
        out.push(ext);
    }
    Ok(out)
}

const DESC_TYPES: [&str; 6] = [
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

impl VmdkImage {
    /// Open the vmdk disk whose main file (a sparse extent, or a descriptor)
    /// is `storage`, named `path`; companion extent files are opened
    /// relative to it.
    pub fn open(storage: Arc<dyn Storage>, path: Option<&Path>, write: bool) -> Result<Self> {
        let head = read_head(storage.as_ref(), 0)?;
        let magic = header::magic(&head);
        let dir = path.map(|p| p.parent().unwrap_or(Path::new("")).to_path_buf());
        let (extents, create_type, monolithic) = if magic == KDMV_MAGIC || magic == COWD_MAGIC {
            let embedded = (magic == KDMV_MAGIC)
                .then(|| SparseHeader::parse(&head[4..]))
                .transpose()?
                .filter(|h| h.capacity == 0 && h.desc_offset != 0);
            if let Some(h) = embedded {
                // A sparse file that holds only a descriptor.
                let at = h
                    .desc_offset
                    .checked_mul(512)
                    .ok_or_else(|| Error::invalid("Invalid descriptor offset"))?;
                let desc = read_head(storage.as_ref(), at)?;
                let (e, t) = Self::from_descriptor(&desc, dir.as_deref(), path, write)?;
                (e, t, false)
            } else {
                let (s, sectors) = open_sparse(storage.clone(), &head, write)?;
                let create_type = if s.compressed {
                    "streamOptimized"
                } else if magic == KDMV_MAGIC {
                    "monolithicSparse"
                } else {
                    ""
                };
                if sectors > u64::MAX / 512 {
                    return Err(Error::invalid("Image too large"));
                }
                let ext = Extent {
                    storage: storage.clone(),
                    filename: path.map(Path::to_path_buf).unwrap_or_default(),
                    kind: None,
                    sectors,
                    start: 0,
                    layout: Layout::Sparse(s),
                };
                (vec![ext], create_type.to_string(), true)
            }
        } else {
            let (e, t) = Self::from_descriptor(&head, dir.as_deref(), path, write)?;
            (e, t, false)
        };
        let desc_offset = if magic == KDMV_MAGIC || magic == COWD_MAGIC {
            0x200
        } else {
            0
        };
        let mut desc = vec![0u8; DESC_SIZE];
        storage.read_at(&mut desc, desc_offset)?;
        let desc = descriptor::c_str(&desc[..DESC_SIZE - 1]);
        let parent_hint = descriptor::parent_hint(desc)?;
        let cid = descriptor::cid(desc, false)?;
        let parent_cid = descriptor::cid(desc, true)?;
        let size = extents.last().map_or(0, |e| e.start + e.len());
        Ok(VmdkImage {
            storage,
            path: path.map(Path::to_path_buf),
            desc_offset,
            create_type,
            parent_cid,
            parent_hint,
            size,
            monolithic,
            state: Mutex::new(State {
                extents,
                cid,
                cid_updated: false,
            }),
            backing: RwLock::new(None),
            barriers: std::sync::atomic::AtomicBool::new(true),
        })
    }

    fn from_descriptor(
        desc: &[u8],
        dir: Option<&Path>,
        path: Option<&Path>,
        write: bool,
    ) -> Result<(Vec<Extent>, String)> {
        let desc = descriptor::c_str(desc);
        let Some(ct) = descriptor::quoted_value(desc, "createType").filter(|c| c.len() < 128)
        else {
            return Err(Error::invalid("invalid VMDK image descriptor"));
        };
        if !DESC_TYPES.contains(&ct.as_str()) {
            return Err(Error::unsupported(format!("image type '{ct}'")));
        }
        let extents = open_extents(desc, dir, path, write)?;
        Ok((extents, ct))
    }

    /// The disk's content ID (CID) as it was when opened (or last written).
    pub fn cid(&self) -> u32 {
        self.lock().cid
    }
    /// The parent's content ID recorded in the descriptor (0xffffffff: none).
    pub fn parent_cid(&self) -> u32 {
        self.parent_cid
    }
    /// The descriptor's `createType` (monolithicSparse for a sparse file,
    /// streamOptimized for a compressed one).
    pub fn create_type(&self) -> &str {
        &self.create_type
    }
    /// The `parentFileNameHint` of the descriptor, if any.
    pub fn parent_file_name(&self) -> Option<&str> {
        self.parent_hint.as_deref()
    }
    /// The extents as `qemu-img info` lists them.
    pub fn extents(&self) -> Vec<ExtentInfo> {
        self.lock()
            .extents
            .iter()
            .map(|e| ExtentInfo {
                filename: e.filename.clone(),
                format: e.kind.clone().unwrap_or_default(),
                virtual_size: e.len(),
                cluster_size: e.sparse().map(Sparse::grain),
                compressed: e.compressed(),
            })
            .collect()
    }
    /// Whether writes must come as whole grains (QEMU's
    /// `needs_compressed_writes`: the first extent is stream-optimized).
    pub fn needs_whole_grains(&self) -> bool {
        self.lock().extents.first().is_some_and(Extent::compressed)
    }

    /// The image's own file: the descriptor, or the monolithic sparse extent.
    pub fn main_file(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The length and allocated bytes of extent `i`'s file, when it is a
    /// file of its own (not the image's own file); `None` otherwise.
    pub fn extent_file_size(&self, i: usize) -> Result<Option<(u64, Option<u64>)>> {
        let st = self.lock();
        let Some(e) = st.extents.get(i) else {
            return Ok(None);
        };
        if Arc::ptr_eq(&e.storage, &self.storage) {
            return Ok(None);
        }
        let len = e.storage.size().map_err(|e| self.err(e))?;
        let actual = e.storage.allocated_bytes().map_err(|e| self.err(e))?;
        Ok(Some((len, actual)))
    }

    /// The extent file holding guest byte `offset` (what `Status::Data`'s
    /// host offset refers to there), when that is a file of its own rather
    /// than the image's own file.
    pub fn extent_file_at(&self, offset: u64) -> Option<PathBuf> {
        let st = self.lock();
        st.extents
            .iter()
            .find(|e| offset >= e.start && offset - e.start < e.len())
            .filter(|e| !Arc::ptr_eq(&e.storage, &self.storage))
            .map(|e| e.filename.clone())
    }

    /// The file of the flat extent holding guest byte `offset`, if that
    /// extent is flat: QEMU asks that file which of its ranges are holes
    /// (its block status recurses there), and so may a caller.
    pub fn flat_file_at(&self, offset: u64) -> Option<Arc<dyn Storage>> {
        let st = self.lock();
        st.extents
            .iter()
            .find(|e| offset >= e.start && offset - e.start < e.len())
            .filter(|e| matches!(e.layout, Layout::Flat { .. }))
            .map(|e| e.storage.clone())
    }

    /// QEMU's check: every grain (every flat extent) must start inside its
    /// file; the first that does not is reported with QEMU's words.
    /// The message and the `strerror` words of the failure, or `None`.
    pub(crate) fn check(&self) -> Result<Option<(String, &'static str)>> {
        let mut st = self.lock();
        let total = self.size / 512;
        let mut sector = 0u64;
        let mut i = 0usize;
        while sector < total {
            while i < st.extents.len()
                && sector >= (st.extents[i].start + st.extents[i].len()) / 512
            {
                i += 1;
            }
            let Some(e) = st.extents.get_mut(i) else {
                return Ok(Some((
                    format!("ERROR: could not find extent for sector {sector}"),
                    "Invalid argument",
                )));
            };
            let rel = sector * 512 - e.start;
            match e.lookup(rel) {
                Err(_) => {
                    // QEMU's VMDK_ERROR (-1) read as an errno.
                    return Ok(Some((
                        format!("ERROR: could not get cluster_offset for sector {sector}"),
                        "Operation not permitted",
                    )));
                }
                Ok(Lookup::At(at)) => {
                    if at >= e.storage.size().map_err(|e| self.err(e))? {
                        return Ok(Some((
                            format!("ERROR: cluster offset for sector {sector} points after EOF"),
                            "Invalid argument",
                        )));
                    }
                }
                Ok(_) => {}
            }
            sector += (e.unit() / 512).max(1);
        }
        Ok(None)
    }

    /// Whether each grain table update is flushed before the write returns
    /// (the default). A new image that nothing uses until a copy into it
    /// completes and is flushed can do without, as qemu-img's convert does
    /// (its target's cache mode makes those flushes no-ops). With barriers
    /// off, [`BlockDevice::close`] does not sync either; `flush` still does.
    pub fn set_write_barriers(&self, on: bool) {
        self.barriers
            .store(on, std::sync::atomic::Ordering::Relaxed);
        for e in &mut self.lock().extents {
            if let Layout::Sparse(s) = &mut e.layout {
                s.barriers = on;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self, e: impl Into<Error>) -> Error {
        e.into().at(self.storage.path())
    }

    /// The index of the extent holding `offset`.
    fn find(st: &State, offset: u64) -> Result<usize> {
        st.extents
            .iter()
            .position(|e| offset < e.start + e.len())
            .ok_or_else(|| Error::corrupt("Input/output error"))
    }

    /// Whether reads of unallocated grains may go to the backing disk: its
    /// CID must be the parent CID recorded here (QEMU refuses otherwise).
    fn backing_for_read(&self) -> Result<Option<Arc<dyn BlockDevice>>> {
        let b = sync::read(&self.backing).clone();
        if let Some(dev) = &b {
            let ok = dev
                .as_any()
                .downcast_ref::<VmdkImage>()
                .is_some_and(|p| p.cid() == self.parent_cid);
            if !ok {
                return Err(Error::invalid_argument("Invalid argument"));
            }
        }
        Ok(b)
    }

    fn read_locked(&self, st: &mut State, buf: &mut [u8], mut offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let i = Self::find(st, offset)?;
            let e = &mut st.extents[i];
            let rel = offset - e.start;
            let unit = e.unit();
            let in_unit = rel % unit;
            let n = index((unit - in_unit).min((buf.len() - done) as u64));
            let out = &mut buf[done..done + n];
            match e.lookup(rel)? {
                Lookup::Unallocated => match self.backing_for_read()? {
                    Some(b) => {
                        let bsize = b.virtual_size();
                        out.fill(0);
                        if offset < bsize {
                            let m = index((bsize - offset).min(n as u64));
                            b.read(&mut out[..m], offset)?;
                        }
                    }
                    None => out.fill(0),
                },
                Lookup::Zeroed => out.fill(0),
                Lookup::At(at) => match &e.layout {
                    Layout::Flat { start } => e.storage.read_at(out, start + rel)?,
                    Layout::Sparse(s) if s.compressed => {
                        s.read_compressed(e.storage.as_ref(), at, in_unit, out)?
                    }
                    Layout::Sparse(_) => e.storage.read_at(out, at + in_unit)?,
                },
            }
            done += n;
            offset += n as u64;
        }
        Ok(())
    }

    /// QEMU's first write of a session gives the disk a new random CID.
    fn update_cid(&self, st: &mut State) -> Result<()> {
        if st.cid_updated {
            return Ok(());
        }
        let mut buf = vec![0u8; DESC_SIZE];
        self.storage.read_at(&mut buf, self.desc_offset)?;
        let old = descriptor::c_str(&buf[..DESC_SIZE - 1]).to_vec();
        let mut r = [0u8; 4];
        getrandom::getrandom(&mut r).map_err(|e| Error::invalid(e.to_string()))?;
        let cid = u32::from_le_bytes(r);
        let Some(mut new) = descriptor::with_cid(&old, cid) else {
            return Err(Error::invalid_argument("Invalid argument"));
        };
        new.truncate(DESC_SIZE - 1);
        let file_len = self.storage.size()?;
        let len = file_len
            .div_ceil(512)
            .saturating_mul(512)
            .saturating_sub(self.desc_offset)
            .max(new.len() as u64)
            .min(DESC_SIZE as u64);
        new.resize(index(len), 0);
        self.storage.write_at(&new, self.desc_offset)?;
        self.storage.flush()?;
        st.cid = cid;
        st.cid_updated = true;
        Ok(())
    }

    fn write_locked(&self, st: &mut State, buf: &[u8], mut offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let i = Self::find(st, offset)?;
            let e = &mut st.extents[i];
            let rel = offset - e.start;
            let unit = e.unit();
            let in_unit = rel % unit;
            let n = index((unit - in_unit).min((buf.len() - done) as u64));
            let data = &buf[done..done + n];
            let storage = e.storage.clone();
            let ext_len = e.len();
            match &mut e.layout {
                Layout::Flat { start } => storage.write_at(data, *start + rel)?,
                Layout::Sparse(s) => {
                    let found = s.lookup(storage.as_ref(), rel)?;
                    if s.compressed {
                        if let Lookup::At(_) = found {
                            return Err(Error::invalid(
                                "Could not write to allocated cluster for streamOptimized",
                            ));
                        }
                        let whole = n as u64 == s.grain() || rel + n as u64 == ext_len;
                        if in_unit != 0 || !whole || !s.has_marker {
                            return Err(Error::invalid_argument("Invalid argument"));
                        }
                        write_compressed(s, storage.as_ref(), rel, data)?;
                    } else {
                        match found {
                            Lookup::At(at) => storage.write_at(data, at + in_unit)?,
                            Lookup::Unallocated | Lookup::Zeroed => {
                                let backing = if found == Lookup::Unallocated {
                                    self.backing_for_read()?
                                } else {
                                    None
                                };
                                let sector = s.allocate()?;
                                let grain_start = offset - in_unit;
                                fill_grain(
                                    storage.as_ref(),
                                    sector * 512,
                                    s.grain(),
                                    backing.as_deref(),
                                    grain_start,
                                    (in_unit, data),
                                )?;
                                let v = u32::try_from(sector)
                                    .map_err(|_| Error::corrupt("Input/output error"))?;
                                s.set_entry(storage.as_ref(), rel, v)?;
                            }
                        }
                    }
                }
            }
            done += n;
            offset += n as u64;
            self.update_cid(st)?;
        }
        Ok(())
    }

    /// Zero `[offset, offset+len)` by marking whole grains zeroed, if every
    /// grain of it can be (QEMU's zero write: only with the zeroed-grain
    /// feature, grain-aligned); `false` and nothing changed otherwise.
    fn zero_grains(&self, st: &mut State, offset: u64, len: u64) -> Result<bool> {
        let mut plan = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let i = Self::find(st, pos)?;
            let e = &mut st.extents[i];
            let rel = pos - e.start;
            let storage = e.storage.clone();
            let Layout::Sparse(s) = &mut e.layout else {
                return Ok(false);
            };
            let g = s.grain();
            if !s.zero_grain || !rel.is_multiple_of(g) || end - pos < g {
                return Ok(false);
            }
            let found = s.lookup(storage.as_ref(), rel)?;
            if s.compressed && matches!(found, Lookup::At(_)) {
                return Err(Error::invalid(
                    "Could not write to allocated cluster for streamOptimized",
                ));
            }
            if found != Lookup::Zeroed {
                plan.push((i, rel));
            }
            pos += g;
        }
        for (i, rel) in plan {
            let e = &mut st.extents[i];
            let storage = e.storage.clone();
            if let Layout::Sparse(s) = &mut e.layout {
                s.set_entry(storage.as_ref(), rel, GTE_ZEROED)?;
            }
        }
        if len > 0 {
            self.update_cid(st)?;
        }
        Ok(true)
    }

    /// The zero-write alignment QEMU uses: the largest grain of the sparse extents.
    fn zero_alignment(st: &State) -> u64 {
        st.extents
            .iter()
            .filter_map(|e| e.sparse().map(Sparse::grain))
            .max()
            .unwrap_or(512)
            .max(512)
    }

    fn write_zeroes_locked(&self, offset: u64, len: u64, fast: bool) -> Result<bool> {
        let mut st = self.lock();
        let align = Self::zero_alignment(&st);
        let end = offset + len;
        // QEMU splits the request at the alignment: head, aligned body, tail.
        let head_end = offset.next_multiple_of(align).min(end);
        let body_end = if head_end >= end {
            end
        } else {
            head_end + (end - head_end) / align * align
        };
        let pieces = [(offset, head_end), (head_end, body_end), (body_end, end)];
        if fast {
            for (a, b) in pieces {
                if b > a && !self.zero_grains_dry(&mut st, a, b - a)? {
                    return Ok(false);
                }
            }
        }
        for (a, b) in pieces {
            if b <= a {
                continue;
            }
            if !self.zero_grains(&mut st, a, b - a)? {
                let zeros = vec![0u8; index((b - a).min(1 << 20))];
                let mut p = a;
                while p < b {
                    let n = (b - p).min(zeros.len() as u64);
                    self.write_locked(&mut st, &zeros[..index(n)], p)?;
                    p += n;
                }
            }
        }
        Ok(true)
    }

    fn zero_grains_dry(&self, st: &mut State, offset: u64, len: u64) -> Result<bool> {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let i = Self::find(st, pos)?;
            let e = &st.extents[i];
            let rel = pos - e.start;
            let Some(s) = e.sparse() else {
                return Ok(false);
            };
            let g = s.grain();
            if !s.zero_grain || s.compressed || !rel.is_multiple_of(g) || end - pos < g {
                return Ok(false);
            }
            pos += g;
        }
        Ok(true)
    }
}

/// Write a newly allocated grain at byte `at` of `storage`: `data` at
/// `in_grain`, the rest copied from `backing` (guest offset `guest` on) or
/// zeroes, in bounded pieces (QEMU's copy-on-write of a new grain).
fn fill_grain(
    storage: &dyn Storage,
    at: u64,
    grain: u64,
    backing: Option<&dyn BlockDevice>,
    guest: u64,
    (in_grain, data): (u64, &[u8]),
) -> Result<()> {
    const PIECE: u64 = 1 << 20;
    let mut buf = vec![0u8; index(grain.min(PIECE))];
    let mut pos = 0u64;
    while pos < grain {
        let n = (grain - pos).min(PIECE);
        let piece = &mut buf[..index(n)];
        piece.fill(0);
        if let Some(b) = backing {
            let bsize = b.virtual_size();
            let g = guest + pos;
            if g < bsize {
                let m = index((bsize - g).min(n));
                b.read(&mut piece[..m], g)?;
            }
        }
        let (lo, hi) = (
            pos.max(in_grain),
            (pos + n).min(in_grain + data.len() as u64),
        );
        if lo < hi {
            piece[index(lo - pos)..index(hi - pos)]
                .copy_from_slice(&data[index(lo - in_grain)..index(hi - in_grain)]);
        }
        storage.write_at(piece, at + pos)?;
        pos += n;
    }
    Ok(())
}

/// Append the compressed grain for extent byte `rel` (a grain's start) at
/// the allocation point, with its marker, padded to a sector; point the
/// grain table at it.
///
/// As QEMU allocates it, the grain's whole uncompressed size is first
/// filled with zeroes, and the next grain goes right after this one's
/// record, over those zeroes: the file ends one grain past the last
/// record's start, zero-filled. Only the part no earlier record or fill
/// covers is written, which leaves the same bytes and the same allocation.
fn write_compressed(s: &mut Sparse, storage: &dyn Storage, rel: u64, data: &[u8]) -> Result<()> {
    use flate2::{write::ZlibEncoder, Compression};
    use std::io::Write;
    let mut enc = ZlibEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        Compression::default(),
    );
    enc.write_all(data)
        .and_then(|_| enc.flush())
        .map_err(|e| Error::invalid(e.to_string()))?;
    let z = enc.finish().map_err(|e| Error::invalid(e.to_string()))?;
    let mut rec = Vec::with_capacity(z.len() + 512);
    rec.extend_from_slice(&(rel >> 9).to_le_bytes());
    rec.extend_from_slice(&u32::try_from(z.len()).unwrap_or(u32::MAX).to_le_bytes());
    rec.extend_from_slice(&z);
    rec.resize(rec.len().next_multiple_of(512), 0);
    let sector = s.next_cluster_sector;
    if sector >= 1 << 32 {
        return Err(Error::corrupt("Input/output error"));
    }
    let start = sector * 512;
    storage.write_at(&rec, start)?;
    let grain_end = start + s.cluster_sectors * 512;
    let fill_from = (start + rec.len() as u64).max(s.zeroed_to);
    if fill_from < grain_end {
        storage.write_at(
            &vec![0u8; crate::units::index(grain_end - fill_from)],
            fill_from,
        )?;
    }
    s.zeroed_to = s.zeroed_to.max(grain_end);
    s.next_cluster_sector = sector + rec.len() as u64 / 512;
    let v = u32::try_from(sector).map_err(|_| Error::corrupt("Input/output error"))?;
    s.set_entry(storage, rel, v)
}

impl BlockDevice for VmdkImage {
    fn format_name(&self) -> &'static str {
        "vmdk"
    }
    fn set_write_barriers(&self, on: bool) -> Result<()> {
        VmdkImage::set_write_barriers(self, on);
        Ok(())
    }
    /// Syncs the files, unless write barriers are off (a new convert target
    /// that qemu-img would not sync either): its grain tables and data are
    /// written as they change, so there is nothing else to write out.
    fn close(&self) -> Result<()> {
        if self.read_only() || !self.barriers.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        self.flush()
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        request(Operation::Read, Some(offset), || {
            check_range(offset, buf.len() as u64, self.size)?;
            let mut st = self.lock();
            self.read_locked(&mut st, buf, offset)
                .map_err(|e| self.err(e))
        })
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        request(Operation::Write, Some(offset), || {
            check_range(offset, buf.len() as u64, self.size)?;
            if self.read_only() {
                return Err(Error::read_only());
            }
            let mut st = self.lock();
            self.write_locked(&mut st, buf, offset)
                .map_err(|e| self.err(e))
        })
    }
    /// QEMU's zero write: whole grains of a sparse extent with the
    /// zeroed-grain feature are marked zeroed; the rest (unaligned head and
    /// tail, flat extents, images without the feature) is written as zero bytes.
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        request(Operation::WriteZeroes, Some(offset), || {
            check_range(offset, len, self.size)?;
            if self.read_only() {
                return Err(Error::read_only());
            }
            self.write_zeroes_locked(offset, len, false)
                .map(|_| ())
                .map_err(|e| self.err(e))
        })
    }
    fn write_zeroes_fast(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<bool> {
        request(Operation::WriteZeroes, Some(offset), || {
            check_range(offset, len, self.size)?;
            if self.read_only() {
                return Err(Error::read_only());
            }
            self.write_zeroes_locked(offset, len, true)
                .map_err(|e| self.err(e))
        })
    }
    /// QEMU's vmdk driver ignores discards.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)
    }
    fn flush(&self) -> Result<()> {
        request(Operation::Flush, None, || {
            if self.read_only() {
                return Ok(());
            }
            let st = self.lock();
            for e in &st.extents {
                e.storage.flush().map_err(|e| self.err(e))?;
            }
            self.storage.flush().map_err(|e| self.err(e))
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Run> {
        request(Operation::BlockStatus, Some(offset), || {
            check_range(offset, len, self.size)?;
            let mut st = self.lock();
            let i = Self::find(&st, offset)?;
            let e = &mut st.extents[i];
            let rel = offset - e.start;
            let unit = e.unit();
            let in_unit = rel % unit;
            let n = (unit - in_unit).min(len);
            let found = e.lookup(rel).map_err(|e| self.err(e))?;
            let (status, n) = match found {
                Lookup::Unallocated => (Status::Unallocated, n),
                Lookup::Zeroed => (Status::Zero { host_offset: None }, n),
                Lookup::At(at) => match &e.layout {
                    // As QEMU: data at its place in the file, up to the
                    // extent's end; which of it is a hole the file tells
                    // (see `flat_file_at`).
                    Layout::Flat { start } => (
                        Status::Data {
                            host_offset: Some(start + rel),
                            compressed: false,
                        },
                        n,
                    ),
                    Layout::Sparse(s) if s.compressed => (
                        Status::Data {
                            host_offset: None,
                            compressed: true,
                        },
                        n,
                    ),
                    Layout::Sparse(_) => (
                        Status::Data {
                            host_offset: Some(at + in_unit),
                            compressed: false,
                        },
                        n,
                    ),
                },
            };
            Ok(Run {
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
        self.storage.read_only()
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        let mut total = match self.storage.allocated_bytes().map_err(|e| self.err(e))? {
            Some(n) => n,
            None => return Ok(None),
        };
        let st = self.lock();
        for e in &st.extents {
            if Arc::ptr_eq(&e.storage, &self.storage) {
                continue;
            }
            match e.storage.allocated_bytes().map_err(|e| self.err(e))? {
                Some(n) => total += n,
                None => return Ok(None),
            }
        }
        Ok(Some(total))
    }
    fn resize(&self, _new_size: u64, _allow_shrink: bool) -> Result<()> {
        Err(Error::new(
            crate::ErrorKind::Unsupported,
            "Image format driver does not support resize",
        )
        .during(Operation::Resize))
    }
    fn path(&self) -> Option<PathBuf> {
        self.path.clone()
    }
    /// The grain size, when all extents are sparse alike (QEMU's
    /// `cluster_size`); none for flat or mixed extents.
    fn cluster_size(&self) -> Option<u64> {
        let st = self.lock();
        let first = st.extents.first()?;
        let same = st.extents.iter().all(|e| {
            e.sparse().is_some() == first.sparse().is_some()
                && e.compressed() == first.compressed()
                && (e.sparse().is_none()
                    || e.sparse().map(Sparse::grain) == first.sparse().map(Sparse::grain))
        });
        if !same {
            return None;
        }
        first.sparse().map(Sparse::grain)
    }
    fn host_file(&self) -> Option<&Arc<dyn Storage>> {
        self.monolithic.then_some(&self.storage)
    }
    fn overlay(&self) -> Option<&dyn Overlay> {
        self.parent_hint.as_ref().map(|_| self as &dyn Overlay)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A vmdk disk names its parent in `parentFileNameHint` (always a vmdk);
/// changing the link is not supported.
impl Overlay for VmdkImage {
    fn backing_name(&self) -> Option<OsString> {
        self.parent_hint.as_ref().map(OsString::from)
    }
    fn backing_format(&self) -> Option<String> {
        self.parent_hint.as_ref().map(|_| "vmdk".to_string())
    }
    fn set_backing_file(&self, _name: Option<&OsStr>, _format: Option<&str>) -> Result<()> {
        Err(Error::unsupported(
            "changing the backing file of a vmdk image",
        ))
    }
    fn make_empty(&self) -> Result<()> {
        Err(Error::unsupported("emptying a vmdk image"))
    }
}
