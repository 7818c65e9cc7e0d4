use crate::lock::{self, LockMode};
use crate::{Error, Result, Storage};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// How to open a [`FileStorage`].
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    pub write: bool,
    pub create: bool,
    pub lock: LockMode,
}

impl OpenOptions {
    /// Read-only with QEMU's read locks.
    pub fn read() -> Self {
        OpenOptions {
            write: false,
            create: false,
            lock: LockMode::Read,
        }
    }
    /// Read-write with QEMU's write locks.
    pub fn write() -> Self {
        OpenOptions {
            write: true,
            create: false,
            lock: LockMode::Write,
        }
    }
    /// Lock as QEMU locks a raw image (`raw`) rather than one under a format
    /// driver: a raw reader shares everything, a raw writer holds no resize.
    /// Keeps `-U`'s no-locks.
    pub fn raw(mut self, raw: bool) -> Self {
        self.lock = self.lock.for_raw(raw);
        self
    }
    /// A raw image opened for writing by a subcommand that writes nothing to a
    /// raw image (it refuses one once open) shares writing, as qemu-img does
    /// (see [`LockMode::WriteRawShared`]).
    pub fn writes_no_raw_data(mut self, yes: bool) -> Self {
        if yes && self.lock == LockMode::WriteRaw {
            self.lock = LockMode::WriteRawShared;
        }
        self
    }
    /// A raw image an NBD server exports is locked as qemu-nbd locks it (see
    /// [`LockMode::ExportRaw`]).
    pub fn nbd_export(mut self, yes: bool) -> Self {
        self.lock = match (yes, self.lock) {
            (true, LockMode::ReadRaw) => LockMode::ExportRawRead,
            (true, LockMode::WriteRaw) => LockMode::ExportRaw,
            (_, m) => m,
        };
        self
    }
    /// A raw image opened to be resized also holds resize (qemu-img resize).
    pub fn resize(mut self, yes: bool) -> Self {
        if yes && self.lock == LockMode::WriteRaw {
            self.lock = LockMode::ResizeRaw;
        }
        self
    }
    /// With no locks: `-U` / `--force-share`. Read-only only: opening for writing
    /// with it is refused, as QEMU refuses it.
    pub fn force_share(mut self, yes: bool) -> Self {
        if yes {
            self.lock = LockMode::ForceShare;
        }
        self
    }
}

/// A host file (or block device) used as storage.
///
/// A flush syncs the file only if something changed it through this storage
/// since the last successful flush (a write, a zeroing, a discard, a resize or
/// an allocation, whether it succeeded or not): the engine's commit points
/// often flush twice in a row, and each sync costs milliseconds on a real disk.
/// The first flush after opening always syncs, so that writes another process
/// left in the page cache are made durable before anything strata writes
/// depends on them. Writes made through [`Storage::file`] bypass this
/// bookkeeping: whoever makes them syncs them.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    read_only: bool,
    /// Set after every change made through this storage; cleared by a sync
    /// that succeeded.
    unflushed: AtomicBool,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl FileStorage {
    /// Open `path` with the locks `opts.lock` asks for.
    pub fn open(path: impl AsRef<Path>, opts: OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        if opts.write && opts.lock == LockMode::ForceShare {
            return Err(Error::ForceShareWrite);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(opts.write)
            .create(opts.create)
            .truncate(false)
            .open(path)
            .map_err(io("Could not open", path))?;
        lock::acquire(&file, path, opts.lock)?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            read_only: !opts.write,
            unflushed: AtomicBool::new(opts.write),
        })
    }

    /// Create (or truncate) `path` and open it for writing with write locks.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        OutputFile::open(path.as_ref())?.lock(true)
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Record that the file changed (or may have) since the last sync. Called
    /// after the change, so that a flush racing with it either sees the mark or
    /// started its sync after the change completed.
    fn changed(&self) {
        self.unflushed.store(true, Ordering::Release);
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
        let r = self.fallocate_once(mode, offset, len);
        self.changed();
        r
    }

    fn fallocate_once(&self, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: the descriptor is open; fallocate only reads its integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// `[offset, offset+len)` clipped to the file's end; `None` if nothing is left.
    fn clip(&self, offset: u64, len: u64) -> Result<Option<u64>> {
        self.check_writable()?;
        let end = offset
            .checked_add(len)
            .ok_or(Error::OutOfRange { offset, len })?;
        let size = self.size()?;
        if len == 0 || offset >= size {
            return Ok(None);
        }
        Ok(Some(end.min(size) - offset))
    }

    /// Punch a hole (reads as zeroes, size kept); false if the file system cannot.
    fn punch_hole(&self, offset: u64, len: u64) -> bool {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
        .is_ok()
    }

    /// Punch `[offset, offset+len)` where it lies in the file, whole even where it
    /// reaches past the end (the size is kept, and a last partial block inside the
    /// range is given back too: a punch clipped to the end would only zero it).
    /// `None` when done (or nothing lies in the file); the range clipped to the
    /// file's end when the file system cannot punch (nothing was changed).
    fn punch_range(&self, offset: u64, len: u64) -> Result<Option<u64>> {
        let Some(clipped) = self.clip(offset, len)? else {
            return Ok(None);
        };
        // `clip` checked that `offset + len` does not overflow.
        let whole = if offset + len <= i64::MAX as u64 {
            len
        } else {
            clipped
        };
        Ok((!self.punch_hole(offset, whole)).then_some(clipped))
    }

    /// Zero `[offset, offset+len)` (clipped to the file) by changing its allocation:
    /// `FALLOC_FL_ZERO_RANGE`, else punching a hole. Returns the clipped range when
    /// the file system can do neither (the caller writes zero bytes or gives up).
    fn zero_range(&self, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
        let Some(len) = self.clip(offset, len)? else {
            return Ok(None);
        };
        if self
            .fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
            .is_ok()
            || self.punch_hole(offset, len)
        {
            return Ok(None);
        }
        Ok(Some((offset, len)))
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let end = offset + len;
        while offset < end {
            let n = CHUNK.min(end - offset) as usize;
            self.write_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// A file about to become an output: open for writing (created if it did not
/// exist), neither locked nor truncated yet, so that its identity can be compared
/// with the files a job reads before anything about it changes.
#[derive(Debug)]
pub struct OutputFile {
    file: File,
    path: PathBuf,
    created: bool,
}

impl OutputFile {
    /// Open `path` for writing, creating it if it does not exist ([`Self::created`]
    /// tells which). Its contents are untouched.
    pub fn open(path: &Path) -> Result<Self> {
        let opts = |create_new: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(true);
            if create_new {
                o.create_new(true);
            } else {
                // A dangling symlink's target is created, as before.
                o.create(true).truncate(false);
            }
            o
        };
        let (file, created) = match opts(true).open(path) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => (
                opts(false)
                    .open(path)
                    .map_err(io("Could not create", path))?,
                false,
            ),
            Err(e) => return Err(io("Could not create", path)(e)),
        };
        Ok(OutputFile {
            file,
            path: path.to_path_buf(),
            created,
        })
    }

    /// Whether [`Self::open`] created the file (it did not exist before).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The open file's identity: (device, inode).
    pub fn identity(&self) -> Result<(u64, u64)> {
        let m = self
            .file
            .metadata()
            .map_err(io("Could not stat", &self.path))?;
        Ok((m.dev(), m.ino()))
    }

    /// Take QEMU's write locks and, if `truncate`, empty the file. A file this
    /// output created is removed again if the locks cannot be had.
    pub fn lock(self, truncate: bool) -> Result<FileStorage> {
        let locked = lock::acquire(&self.file, &self.path, LockMode::Write).and_then(|()| {
            if truncate {
                self.file
                    .set_len(0)
                    .map_err(io("Could not truncate", &self.path))?;
            }
            Ok(())
        });
        if let Err(e) = locked {
            self.abandon();
            return Err(e);
        }
        Ok(FileStorage {
            file: self.file,
            path: self.path,
            read_only: false,
            unflushed: AtomicBool::new(true),
        })
    }

    /// Give the output up: close it and, if this output created it, remove it.
    pub fn abandon(self) {
        if self.created {
            remove_created(&self.path, self.identity().ok());
        }
    }
}

/// Remove `path` if it still names the file of identity `id` (a file an output
/// created and then gave up); never anything else. Best effort.
pub fn remove_created(path: &Path, id: Option<(u64, u64)>) {
    let now = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    if id.is_some() && now == id {
        let _ = std::fs::remove_file(path);
    }
}

impl Drop for FileStorage {
    /// The locks go with the storage, even while a process forked elsewhere
    /// in this program still holds a copy of the descriptor (see
    /// [`lock::release`]).
    fn drop(&mut self) {
        lock::release(&self.file);
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("Could not read", &self.path)(e)),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let r = self.file.write_all_at(buf, offset);
        self.changed();
        r.map_err(io("Could not write", &self.path))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        match self.zero_range(offset, len)? {
            Some((offset, len)) => self.write_zero_bytes(offset, len),
            None => Ok(()),
        }
    }

    fn write_zeroes_fast(&self, offset: u64, len: u64) -> Result<bool> {
        Ok(self.zero_range(offset, len)?.is_none())
    }

    /// A range that reaches past the end is punched whole, as QEMU's discard
    /// punches it: the file keeps its length, and a last partial block inside
    /// the range is given back too (a punch clipped to the end would only zero
    /// it). Where nothing can be punched, the bytes up to the end are zeroed.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        match self.punch_range(offset, len)? {
            Some(clipped) => self.write_zero_bytes(offset, clipped),
            None => Ok(()),
        }
    }

    /// Punches the range as [`Storage::discard`] does (a range reaching past the
    /// end is punched whole); `Ok(false)` if the file system cannot punch.
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<bool> {
        Ok(self.punch_range(offset, len)?.is_none())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only || !self.unflushed.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let r = self.file.sync_data();
        if r.is_err() {
            self.changed();
        }
        r.map_err(io("Could not flush", &self.path))
    }

    fn size(&self) -> Result<u64> {
        let meta = self
            .file
            .metadata()
            .map_err(io("Could not stat", &self.path))?;
        if meta.file_type().is_file() {
            return Ok(meta.len());
        }
        // Block devices report their size through seek.
        use std::io::Seek;
        (&self.file)
            .seek(std::io::SeekFrom::End(0))
            .map_err(io("Could not get size of", &self.path))
    }

    fn set_size(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        let r = self.file.set_len(size);
        self.changed();
        r.map_err(io("Could not resize", &self.path))
    }

    fn preallocate(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        offset
            .checked_add(len)
            .ok_or(Error::OutOfRange { offset, len })?;
        match self.fallocate(0, offset, len) {
            Ok(()) => Ok(()),
            Err(_) => {
                let end = offset + len;
                if end > self.size()? {
                    self.set_size(end)?;
                }
                Ok(())
            }
        }
    }

    fn allocated_bytes(&self) -> Result<Option<u64>> {
        let meta = self
            .file
            .metadata()
            .map_err(io("Could not stat", &self.path))?;
        Ok(Some(meta.blocks() * 512))
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn file(&self) -> Option<&std::fs::File> {
        Some(&self.file)
    }

    fn probe_data(&self, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        let fd = self.file.as_raw_fd();
        let seek = |whence| {
            // SAFETY: lseek on an open descriptor.
            let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(r as u64)
            }
        };
        match seek(libc::SEEK_DATA) {
            Ok(d) if d > offset => Ok((false, (d - offset).min(max_len))),
            Ok(_) => match seek(libc::SEEK_HOLE) {
                Ok(h) if h > offset => Ok((true, (h - offset).min(max_len))),
                _ => Ok((true, max_len)),
            },
            // ENXIO: only a hole from here to the end.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok((false, max_len)),
            Err(_) => Ok((true, max_len)),
        }
    }
}

/// Ask the kernel to start writing `file`'s dirty pages back now, without waiting
/// for them, so that a later flush (which someone waits for) finds little left to
/// do. Durability still comes only from a flush. Best effort: errors are ignored.
pub fn start_writeback(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor the caller owns; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unflushed(s: &FileStorage) -> bool {
        s.unflushed.load(Ordering::Acquire)
    }

    #[test]
    fn flush_syncs_only_after_a_change_through_this_storage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let s = FileStorage::open(&path, OpenOptions::write()).unwrap();
        // Opened for writing: the first flush syncs whatever is in the page cache.
        assert!(unflushed(&s));
        s.flush().unwrap();
        assert!(!unflushed(&s));
        s.flush().unwrap();
        assert!(!unflushed(&s));
        let changes: [&dyn Fn(&FileStorage); 5] = [
            &|s| s.write_at(b"x", 10).unwrap(),
            &|s| s.write_zeroes(0, 512).unwrap(),
            &|s| s.discard(0, 4096).unwrap(),
            &|s| s.set_size(8192).unwrap(),
            &|s| s.preallocate(8192, 4096).unwrap(),
        ];
        for change in changes {
            change(&s);
            assert!(unflushed(&s));
            s.flush().unwrap();
            assert!(!unflushed(&s));
        }
        // Reads change nothing.
        let mut buf = [0u8; 16];
        s.read_at(&mut buf, 0).unwrap();
        assert!(!unflushed(&s));
    }

    #[test]
    fn read_only_storage_never_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let s = FileStorage::open(&path, OpenOptions::read()).unwrap();
        assert!(!unflushed(&s));
        assert!(s.write_at(b"x", 0).is_err());
        assert!(!unflushed(&s));
    }

    /// A discard of whole clusters over a file whose last cluster is partial (a
    /// qcow2 snapshot table at the end) leaves that last block a hole, the
    /// length unchanged: the file takes the blocks QEMU's file takes.
    #[test]
    fn a_discard_past_the_end_frees_the_last_partial_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 65536 + 139]).unwrap();
        let s = FileStorage::open(&path, OpenOptions::write()).unwrap();
        s.discard(65536, 65536).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 65536 + 139);
        // 64 KiB of data in 512-byte units; the tail block is given back.
        assert_eq!(meta.blocks(), 128);
        let mut tail = [1u8; 139];
        s.read_at(&mut tail, 65536).unwrap();
        assert_eq!(tail, [0u8; 139]);
    }
}
