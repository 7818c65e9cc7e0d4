//! An open qed image: the guest view through the L1 and L2 tables, with
//! allocation at the end of the file, copy from the backing file for partial
//! clusters, and the need-check flag QEMU keeps while allocating.

use super::header::{image_size_valid, Header, F_NEED_CHECK, HEADER_LEN};
use crate::error::{request, Operation};
use crate::units::index;
use crate::{check_range, BlockDevice, Error, ErrorKind, Extent, Overlay, Result, Status};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use strata_storage::{sync, Storage};

/// The largest L1/L2 table this driver holds in memory (QEMU's limit is
/// 16 clusters of 64 MiB); larger tables are refused as unsupported, so a
/// hostile header cannot make the driver allocate gigabytes.
pub const MAX_TABLE_BYTES: u64 = 32 * 1024 * 1024;
/// L2 tables kept in memory at most (and at most this many bytes of them).
const L2_CACHE_TABLES: usize = 64;
const L2_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// An L2 entry of a cluster that reads as zeroes without data.
pub const ZERO_CLUSTER: u64 = 1;

/// How a guest range is stored: QEMU's cluster lookup results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Found {
    /// Data at this host offset (of the range's start), contiguous.
    Data(u64),
    /// Zero clusters.
    Zero,
    /// Not in this image; `l2_missing`: no L2 table covers it yet.
    Unallocated { l2_missing: bool },
}

/// What writes change: the header, the L1 table, cached L2 tables and the
/// allocation point.
pub(super) struct State {
    pub header: Header,
    /// The backing file name as stored (bytes), when the image has one.
    pub backing_name: Option<Vec<u8>>,
    pub l1: Vec<u64>,
    /// Where the next cluster is allocated: the file's length rounded down to
    /// whole clusters at open, then grown by each allocation (as in QEMU).
    pub file_size: u64,
    l2: HashMap<u64, Vec<u64>>,
}

/// A qed image (QEMU's `qed` driver): a header cluster with the backing
/// file's name, a fixed L1 table, L2 tables allocated on demand, data
/// clusters appended at the end of the file.
///
/// Crash contract (QEMU's ordering): data (and the copy of the backing
/// file's bytes around a partial write) is written before the L2 entry that
/// points at it, a new L2 table before the L1 entry; with a backing file the
/// data is flushed before the L2 update, without one the need-check flag is
/// set in the header before the first allocating write and cleared by
/// [`BlockDevice::close`], so a crash leaves leaked clusters or a flagged
/// image that the next read-write open checks and repairs.
pub struct QedImage {
    storage: Arc<dyn Storage>,
    path: Option<PathBuf>,
    writable: bool,
    state: Mutex<State>,
    backing: RwLock<Option<Arc<dyn BlockDevice>>>,
    /// Flush after a copy from the backing file and at close (the default);
    /// see [`QedImage::set_write_barriers`].
    barriers: std::sync::atomic::AtomicBool,
}

fn le64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i * 8..i * 8 + 8]);
    u64::from_le_bytes(a)
}

fn table_from_bytes(b: &[u8]) -> Vec<u64> {
    (0..b.len() / 8).map(|i| le64_at(b, i)).collect()
}

fn table_to_bytes(t: &[u64]) -> Vec<u8> {
    t.iter().flat_map(|e| e.to_le_bytes()).collect()
}

impl State {
    /// The L2 table at `offset`, read through the cache.
    pub(super) fn l2_table(&mut self, storage: &dyn Storage, offset: u64) -> Result<&mut Vec<u64>> {
        if !self.l2.contains_key(&offset) {
            let bytes = self.header.table_bytes();
            if self.l2.len() >= L2_CACHE_TABLES
                || (self.l2.len() as u64 + 1).saturating_mul(bytes) > L2_CACHE_BYTES
            {
                self.l2.clear();
            }
            let mut raw = vec![0u8; index(bytes)];
            storage.read_at(&mut raw, offset)?;
            self.l2.insert(offset, table_from_bytes(&raw));
        }
        self.l2
            .get_mut(&offset)
            .ok_or_else(|| Error::corrupt("QED L2 table cache lost a table"))
    }

    /// Forget cached L2 tables (after a repair rewrote them).
    pub(super) fn drop_l2_cache(&mut self) {
        self.l2.clear();
    }

    /// Look up guest `pos` for at most `len` bytes: what stores it and for how
    /// many bytes (at least 1) the answer holds, within one L2 table and one
    /// contiguous run of the same kind, as QEMU's lookup answers.
    pub(super) fn find(
        &mut self,
        storage: &dyn Storage,
        pos: u64,
        len: u64,
    ) -> Result<(Found, u64)> {
        let h = self.header;
        let cs = u64::from(h.cluster_size);
        let span = h.l2_span();
        let len = len.min(span - pos % span);
        let l1i = index(pos / span);
        let l2_offset = self.l1.get(l1i).copied().unwrap_or(0);
        if l2_offset == 0 {
            return Ok((Found::Unallocated { l2_missing: true }, len));
        }
        if !h.table_offset_valid(l2_offset, self.file_size) {
            return Err(bad_offset(storage, "QED L2 table offset out of place"));
        }
        let entries = h.table_entries();
        let first = index((pos / cs) % entries);
        let n = (h.offset_in_cluster(pos) + len).div_ceil(cs);
        let end = (first + index(n)).min(index(entries));
        let file_size = self.file_size;
        let table = self.l2_table(storage, l2_offset)?;
        let head = table[first];
        let mut i = first + 1;
        let mut last = head;
        while i < end {
            let e = table[i];
            let same = match last {
                0 => e == 0,
                ZERO_CLUSTER => e == ZERO_CLUSTER,
                _ => Some(e) == last.checked_add(cs),
            };
            if !same {
                break;
            }
            last = e;
            i += 1;
        }
        let run = (i - first) as u64 * cs - h.offset_in_cluster(pos);
        let len = len.min(run);
        let found = match head {
            0 => Found::Unallocated { l2_missing: false },
            ZERO_CLUSTER => Found::Zero,
            off if h.cluster_offset_valid(off, file_size) => {
                Found::Data(off + h.offset_in_cluster(pos))
            }
            _ => return Err(bad_offset(storage, "QED cluster offset out of place")),
        };
        Ok((found, len))
    }

    /// Hand out `n` clusters at the allocation point.
    fn alloc(&mut self, n: u64) -> Result<u64> {
        let at = self.file_size;
        self.file_size = n
            .checked_mul(u64::from(self.header.cluster_size))
            .and_then(|b| at.checked_add(b))
            .ok_or_else(|| Error::corrupt("QED image file would grow past 2^64 bytes"))?;
        Ok(at)
    }
}

/// A table entry that points outside the file's clusters: the request fails
/// as in QEMU, with EINVAL ("Invalid argument"), which `check -r` repairs.
fn bad_offset(storage: &dyn Storage, what: &'static str) -> Error {
    Error::from(strata_storage::Error::Io {
        op: what,
        path: storage.path().map(|p| p.to_path_buf()).unwrap_or_default(),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })
}

/// Read the backing file's bytes at guest `pos` into `buf`: zeroes where it
/// has none (no backing file, or past its end).
fn read_backing(backing: Option<&dyn BlockDevice>, buf: &mut [u8], pos: u64) -> Result<()> {
    buf.fill(0);
    let Some(b) = backing else {
        return Ok(());
    };
    let blen = b.virtual_size();
    if pos >= blen {
        return Ok(());
    }
    let n = index((blen - pos).min(buf.len() as u64));
    b.read(&mut buf[..n], pos)
}

impl QedImage {
    /// Whether the image flushes after copying backing data into a new
    /// cluster and at close, before and after clearing the need-check flag
    /// (the default). A new convert target that nothing uses until the copy
    /// completes can do without, as qemu-img's target cache mode makes those
    /// flushes no-ops: the same bytes are written in the same order, and only
    /// [`BlockDevice::flush`] makes them durable. Turning barriers back on
    /// flushes first.
    pub fn set_write_barriers(&self, on: bool) -> Result<()> {
        if on && self.writable {
            self.storage.flush().map_err(|e| self.err(e))?;
        }
        self.barriers
            .store(on, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn barriers(&self) -> bool {
        self.barriers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Open the image on `storage`, its header checked as QEMU checks it.
    /// `write`: writes allowed. `auto_check`: a writable image flagged as
    /// needing a check is checked and repaired first, as QEMU's open does
    /// (the check command opens without it).
    pub fn open(
        storage: Arc<dyn Storage>,
        path: Option<PathBuf>,
        write: bool,
        auto_check: bool,
    ) -> Result<QedImage> {
        let mut raw = [0u8; HEADER_LEN];
        storage.read_at(&mut raw, 0)?;
        let file_len = storage.size()?;
        let mut header = Header::parse(&raw, file_len)?;
        if header.table_bytes() > MAX_TABLE_BYTES {
            return Err(Error::unsupported(format!(
                "QED table size of {} bytes (strata holds tables of at most {MAX_TABLE_BYTES})",
                header.table_bytes()
            )));
        }
        let backing_name = if header.has_backing_file() {
            let mut name = vec![0u8; index(header.backing_filename_size.into())];
            storage.read_at(&mut name, header.backing_filename_offset.into())?;
            Some(name)
        } else {
            None
        };
        let writable = write && !storage.read_only();
        if header.autoclear_features != 0 && writable {
            header.autoclear_features = 0;
            storage.write_at(&header.to_bytes(), 0)?;
            storage.flush()?;
        }
        let mut l1_raw = vec![0u8; index(header.table_bytes())];
        storage.read_at(&mut l1_raw, header.l1_table_offset)?;
        let img = QedImage {
            storage,
            path,
            writable: write,
            barriers: std::sync::atomic::AtomicBool::new(true),
            state: Mutex::new(State {
                header,
                backing_name,
                l1: table_from_bytes(&l1_raw),
                file_size: header.start_of_cluster(file_len),
                l2: HashMap::new(),
            }),
            backing: RwLock::new(None),
        };
        if auto_check && writable && header.needs_check() {
            img.check(true)?;
        }
        Ok(img)
    }

    /// The header as it is now.
    pub fn header(&self) -> Header {
        sync::lock(&self.state).header
    }

    /// Whether the need-check flag is set (QEMU's "dirty-flag").
    pub fn is_dirty(&self) -> bool {
        self.header().needs_check()
    }

    pub(super) fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        sync::lock(&self.state)
    }

    pub(super) fn err(&self, e: impl Into<Error>) -> Error {
        e.into().at(self.storage.path())
    }

    fn backing_dev(&self) -> Option<Arc<dyn BlockDevice>> {
        sync::read(&self.backing).clone()
    }

    /// Write the header fields (not the backing name after them).
    pub(super) fn write_header(&self, h: &Header) -> Result<()> {
        self.storage.write_at(&h.to_bytes(), 0)?;
        Ok(())
    }

    /// Write `n` entries of table `t` from entry `first`, at table `offset`.
    pub(super) fn write_entries(
        &self,
        t: &[u64],
        first: usize,
        n: usize,
        offset: u64,
    ) -> Result<()> {
        let bytes = table_to_bytes(&t[first..first + n]);
        self.storage.write_at(&bytes, offset + first as u64 * 8)?;
        Ok(())
    }

    /// Write (or, with `buf` = `None`, zero) `len` guest bytes at `offset`
    /// under the state lock, allocating as QEMU allocates.
    fn write_locked(&self, buf: Option<&[u8]>, offset: u64, len: u64) -> Result<()> {
        let mut st = self.lock();
        let backing = self.backing_dev();
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let (found, n) = st.find(self.storage.as_ref(), pos, len - done)?;
            let part = buf.map(|b| &b[index(done)..index(done + n)]);
            match (found, part) {
                (Found::Data(host), Some(data)) => self.storage.write_at(data, host)?,
                (Found::Data(host), None) => {
                    // Zero bytes written in place, as QEMU writes them.
                    let chunk = n.min(1 << 20);
                    let zeros = vec![0u8; index(chunk)];
                    let mut at = 0;
                    while at < n {
                        let k = (n - at).min(chunk);
                        self.storage.write_at(&zeros[..index(k)], host + at)?;
                        at += k;
                    }
                }
                (Found::Zero, None) => {}
                (Found::Zero | Found::Unallocated { .. }, _) => {
                    self.write_new_clusters(&mut st, backing.as_deref(), found, part, pos, n)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The allocating write of `n` bytes at `pos` (one run of one L2 table):
    /// new clusters at the end of the file holding `data` and, around it, the
    /// bytes the guest saw there; or, for a zero write (`data` = `None`,
    /// cluster-aligned), zero entries. Then the L2 entries (and a new L2
    /// table with its L1 entry).
    fn write_new_clusters(
        &self,
        st: &mut State,
        backing: Option<&dyn BlockDevice>,
        found: Found,
        data: Option<&[u8]>,
        pos: u64,
        n: u64,
    ) -> Result<()> {
        let h = st.header;
        let cs = u64::from(h.cluster_size);
        let in_cluster = h.offset_in_cluster(pos);
        let nclusters = (in_cluster + n).div_ceil(cs);
        let cluster = match data {
            Some(_) => st.alloc(nclusters)?,
            None => ZERO_CLUSTER,
        };
        if backing.is_none() && !st.header.needs_check() {
            st.header.features |= F_NEED_CHECK;
            self.write_header(&st.header)?;
        }
        if let Some(data) = data {
            // The untouched head and tail of the new clusters keep what the
            // guest saw: the backing file's bytes (zeroes over a zero cluster).
            let start = h.start_of_cluster(pos);
            let tail_from = pos + n;
            let tail_len = (start + nclusters * cs) - tail_from;
            let from = if found == Found::Zero { None } else { backing };
            if in_cluster > 0 {
                let mut head = vec![0u8; index(in_cluster)];
                read_backing(from, &mut head, start)?;
                self.storage.write_at(&head, cluster)?;
            }
            if tail_len > 0 {
                let mut tail = vec![0u8; index(tail_len)];
                read_backing(from, &mut tail, tail_from)?;
                self.storage.write_at(&tail, cluster + in_cluster + n)?;
            }
            self.storage.write_at(data, cluster + in_cluster)?;
            if backing.is_some() && self.barriers() {
                self.storage.flush()?;
            }
        }
        // The L2 update.
        let span = h.l2_span();
        let l1i = index(pos / span);
        let first = index((pos / cs) % h.table_entries());
        let count = index(nclusters);
        let entry = |i: usize| match data {
            Some(_) => cluster + i as u64 * cs,
            None => ZERO_CLUSTER,
        };
        if matches!(found, Found::Unallocated { l2_missing: true }) {
            let table_off = st.alloc(u64::from(h.table_size))?;
            let mut table = vec![0u64; index(h.table_entries())];
            for i in 0..count {
                table[first + i] = entry(i);
            }
            self.storage.write_at(&table_to_bytes(&table), table_off)?;
            st.l2.insert(table_off, table);
            st.l1[l1i] = table_off;
            let l1 = st.l1.clone();
            self.write_entries(&l1, l1i, 1, h.l1_table_offset)?;
        } else {
            let l2_offset = st.l1[l1i];
            let table = st.l2_table(self.storage.as_ref(), l2_offset)?;
            for i in 0..count {
                table[first + i] = entry(i);
            }
            let bytes = table_to_bytes(&table[first..first + count]);
            self.storage
                .write_at(&bytes, l2_offset + first as u64 * 8)?;
        }
        Ok(())
    }

    /// The backing file name as stored, if the image has one.
    pub fn backing_file_name(&self) -> Option<Vec<u8>> {
        self.lock().backing_name.clone()
    }

    /// Writes refused (by the open or by the storage).
    pub(super) fn is_read_only(&self) -> bool {
        !self.writable || self.storage.read_only()
    }
}

impl BlockDevice for QedImage {
    fn format_name(&self) -> &'static str {
        "qed"
    }
    fn set_write_barriers(&self, on: bool) -> Result<()> {
        QedImage::set_write_barriers(self, on)
    }
    fn virtual_size(&self) -> u64 {
        self.header().image_size
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        request(Operation::Read, Some(offset), || {
            check_range(offset, buf.len() as u64, self.virtual_size())?;
            let backing = self.backing_dev();
            let mut done = 0usize;
            while done < buf.len() {
                let pos = offset + done as u64;
                let (found, n) = self
                    .lock()
                    .find(self.storage.as_ref(), pos, (buf.len() - done) as u64)
                    .map_err(|e| self.err(e))?;
                let chunk = &mut buf[done..done + index(n)];
                match found {
                    Found::Data(host) => {
                        self.storage.read_at(chunk, host).map_err(|e| self.err(e))?
                    }
                    Found::Zero => chunk.fill(0),
                    Found::Unallocated { .. } => read_backing(backing.as_deref(), chunk, pos)?,
                }
                done += index(n);
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
            self.write_locked(Some(buf), offset, buf.len() as u64)
                .map_err(|e| self.err(e))
        })
    }
    /// As QEMU zeroes: whole clusters become zero clusters (stored ones are
    /// overwritten with zeroes in place); the unaligned head and tail are
    /// written as zero data.
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        request(Operation::WriteZeroes, Some(offset), || {
            if self.read_only() {
                return Err(Error::read_only());
            }
            check_range(offset, len, self.virtual_size())?;
            let cs = u64::from(self.header().cluster_size);
            let end = offset + len;
            let a = offset.next_multiple_of(cs).min(end);
            let b = (end / cs * cs).max(a);
            let zeros = |from: u64, to: u64| -> Result<()> {
                let mut pos = from;
                while pos < to {
                    let n = (to - pos).min(cs);
                    self.write_locked(Some(&vec![0u8; index(n)]), pos, n)?;
                    pos += n;
                }
                Ok(())
            };
            zeros(offset, a).map_err(|e| self.err(e))?;
            if b > a {
                self.write_locked(None, a, b - a).map_err(|e| self.err(e))?;
            }
            zeros(b.max(a), end).map_err(|e| self.err(e))
        })
    }
    /// Does nothing: QEMU's qed driver has no discard.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        request(Operation::Discard, Some(offset), || {
            check_range(offset, len, self.virtual_size())
        })
    }
    fn flush(&self) -> Result<()> {
        request(Operation::Flush, None, || {
            self.storage.flush().map_err(|e| self.err(e))
        })
    }
    /// Flush, then clear the need-check flag (set by an allocating write, or
    /// found set), as QEMU's close does.
    fn close(&self) -> Result<()> {
        if self.read_only() {
            return Ok(());
        }
        let barriers = self.barriers();
        if barriers {
            self.storage.flush().map_err(|e| self.err(e))?;
        }
        let mut st = self.lock();
        if st.header.needs_check() {
            st.header.features &= !F_NEED_CHECK;
            self.write_header(&st.header).map_err(|e| self.err(e))?;
            if barriers {
                self.storage.flush().map_err(|e| self.err(e))?;
            }
        }
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        request(Operation::BlockStatus, Some(offset), || {
            check_range(offset, len, self.virtual_size())?;
            let (found, n) = self
                .lock()
                .find(self.storage.as_ref(), offset, len)
                .map_err(|e| self.err(e))?;
            let status = match found {
                Found::Data(host) => Status::Data {
                    host_offset: Some(host),
                    compressed: false,
                },
                Found::Zero => Status::Zero { host_offset: None },
                Found::Unallocated { .. } => Status::Unallocated,
            };
            Ok(Extent {
                offset,
                len: n,
                status,
            })
        })
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.backing_dev()
    }
    fn set_backing(&self, backing: Option<Arc<dyn BlockDevice>>) {
        *sync::write(&self.backing) = backing;
    }
    fn read_only(&self) -> bool {
        !self.writable || self.storage.read_only()
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.storage.allocated_bytes().map_err(|e| self.err(e))
    }
    /// Grows the image (a header write); shrinking is refused, as QEMU does.
    fn resize(&self, new_size: u64, _allow_shrink: bool) -> Result<()> {
        if self.read_only() {
            return Err(self.err(Error::read_only()));
        }
        let mut st = self.lock();
        let h = st.header;
        if !image_size_valid(new_size, h.cluster_size, h.table_size) {
            return Err(Error::invalid_argument("Invalid image size specified"));
        }
        if new_size < h.image_size {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "Shrinking images is currently not supported",
            ));
        }
        let mut new = h;
        new.image_size = new_size;
        self.write_header(&new)
            .map_err(|e| self.err(e).in_step("Failed to update the image size"))?;
        st.header = new;
        Ok(())
    }
    fn path(&self) -> Option<PathBuf> {
        self.path
            .clone()
            .or_else(|| self.storage.path().map(|p| p.to_path_buf()))
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(u64::from(self.header().cluster_size))
    }
    fn host_file(&self) -> Option<&Arc<dyn Storage>> {
        Some(&self.storage)
    }
    fn overlay(&self) -> Option<&dyn Overlay> {
        Some(self)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for QedImage {
    /// Close the image (clearing the need-check flag), unless a panic is
    /// unwinding: the flag then stays, for the next open to check.
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let _ = BlockDevice::close(self);
    }
}
