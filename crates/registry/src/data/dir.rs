//! Image data as files of the registry's directory: `ID.partial` while an
//! upload streams in, `ID.data` once it is complete, synced and inspected.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::inspect::inspect;
use crate::store::sync_dir;

pub(crate) struct DirStore {
    dir: PathBuf,
}

/// An upload's partial file.
pub(crate) struct Partial {
    id: String,
    file: File,
}

impl Partial {
    pub(crate) fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.file
            .write_all(buf)
            .map_err(|e| Error::io(format!("write image {}", self.id), e))
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
