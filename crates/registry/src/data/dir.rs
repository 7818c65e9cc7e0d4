//! Image data as files of the registry's directory: `ID.partial` while an
//! upload streams in, `ID.data` once it is complete, synced and inspected.
//!
//! While an upload streams in, the kernel is asked every [`WRITEBACK_EVERY`]
//! bytes to start writing what was just written back to the disk, without
//! waiting for it: the disk works while the hashes are computed, so the one
//! `fsync` at the end finds little left to write instead of all of it. This
//! changes no ordering: the data counts as durable only after that `fsync`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::inspect::inspect;
use crate::store::sync_dir;

pub(crate) struct DirStore {
    dir: PathBuf,
}

/// Bytes an upload writes between two requests to start their writeback.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// An upload's partial file.
pub(crate) struct Partial {
    id: String,
    file: File,
    /// Bytes written so far.
    written: u64,
    /// Bytes whose writeback was started (a prefix of the file).
    started: u64,
}

impl Partial {
    pub(crate) fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.file
            .write_all(buf)
            .map_err(|e| Error::io(format!("write image {}", self.id), e))?;
        self.written += buf.len() as u64;
        if self.written - self.started >= WRITEBACK_EVERY {
            start_writeback(&self.file, self.started, self.written - self.started);
            self.started = self.written;
        }
        Ok(())
    }
}

/// Ask the kernel to start writing `len` bytes of `file` from `offset` back
/// to the disk, without waiting for them. Only a hint: a failure here is left
/// for the `fsync` that makes the data durable to report.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range on a descriptor `file` owns for the call;
    // it reads no memory of this process.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

impl DirStore {
    pub(crate) fn new(dir: PathBuf) -> DirStore {
        DirStore { dir }
    }

    fn path(&self, id: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{id}.{ext}"))
    }

    pub(crate) fn owns_ext(ext: &str) -> bool {
        matches!(ext, "data" | "partial")
    }

    pub(crate) fn begin(&self, id: &str) -> Result<Partial> {
        let p = self.path(id, "partial");
        let file = File::create(&p).map_err(|e| Error::io(format!("create {}", p.display()), e))?;
        Ok(Partial {
            id: id.to_string(),
            file,
            written: 0,
            started: 0,
        })
    }

    /// Sync the partial file, check it against its disk format, and move it
    /// into place.
    pub(crate) fn commit(
        &self,
        id: &str,
        partial: Partial,
        disk_format: &str,
        size: u64,
    ) -> Result<Option<u64>> {
        let path = self.path(id, "partial");
        partial
            .file
            .sync_all()
            .map_err(|e| Error::io(format!("sync {}", path.display()), e))?;
        let virtual_size = inspect(&path, disk_format, size)?;
        let data = self.path(id, "data");
        std::fs::rename(&path, &data)
            .map_err(|e| Error::io(format!("rename to {}", data.display()), e))?;
        sync_dir(&self.dir)?;
        Ok(virtual_size)
    }

    pub(crate) fn discard(&self, id: &str) -> Result<()> {
        self.discard_file(id, "partial")?;
        self.discard_file(id, "data")
    }

    fn discard_file(&self, id: &str, ext: &str) -> Result<()> {
        let p = self.path(id, ext);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", p.display()), e)),
        }
    }

    pub(crate) fn file(&self, id: &str) -> Result<File> {
        let p = self.path(id, "data");
        File::open(&p).map_err(|e| Error::io(format!("open {}", p.display()), e))
    }

    pub(crate) fn reader(
        &self,
        id: &str,
        size: u64,
        start: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>> {
        let mut file = self.file(id)?;
        let actual = file
            .metadata()
            .map_err(|e| Error::io(format!("stat image {id}"), e))?
            .len();
        if actual != size {
            return Err(Error::Corrupt(format!(
                "image {id} holds {actual} bytes, its record says {size}"
            )));
        }
        file.seek(SeekFrom::Start(start))
            .map_err(|e| Error::io(format!("seek image {id}"), e))?;
        Ok(Box::new(file.take(len)))
    }
}
