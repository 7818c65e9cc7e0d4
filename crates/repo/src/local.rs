//! The local-directory [`Backend`], in restic's default layout: `config`, `keys/`,
//! `data/XX/` (by the first two hex digits), `index/`, `snapshots/`, `locks/`,
//! and `tmp/` for files being written.

use crate::backend::{Backend, FileType, Handle};
use crate::error::{Error, ErrorKind, Result};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A repository in a local directory.
pub struct LocalBackend {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

impl LocalBackend {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBackend {
            root: root.into(),
            tmp_seq: AtomicU64::new(0),
        }
    }

    fn path(&self, h: &Handle) -> PathBuf {
        match h.kind {
            FileType::Config => self.root.join("config"),
            FileType::Data => {
                let prefix = h.name.get(..2).unwrap_or("00");
                self.root.join("data").join(prefix).join(&h.name)
            }
            k => self.root.join(k.dir()).join(&h.name),
        }
    }

    fn ctx(&self, what: &str, p: &Path) -> String {
        format!("could not {what} '{}'", p.display())
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn is_hex_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|c| c.is_ascii_hexdigit())
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn create(&self) -> Result<()> {
        let config = self.path(&Handle::config());
        if config.exists() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "a repository already exists at '{}' (it has a config file)",
                    self.root.display()
                ),
            ));
        }
        let mut dirs = vec![self.root.join("tmp")];
        dirs.extend(FileType::DIRS.iter().map(|k| self.root.join(k.dir())));
        dirs.extend((0..=255u8).map(|i| self.root.join("data").join(format!("{i:02x}"))));
        for d in &dirs {
            fs::create_dir_all(d).map_err(|e| Error::io(self.ctx("create", d), e))?;
        }
        sync_dir(&self.root).map_err(|e| Error::io(self.ctx("sync", &self.root), e))?;
        Ok(())
    }

    fn list(&self, kind: FileType) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        let mut dirs = vec![self.root.join(kind.dir())];
        if kind == FileType::Config {
            let p = self.path(&Handle::config());
            return Ok(match fs::metadata(&p) {
                Ok(m) => vec![("config".to_string(), m.len())],
                Err(_) => Vec::new(),
            });
        }
        while let Some(dir) = dirs.pop() {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && dir != self.root.join(kind.dir()) =>
                {
                    continue
                }
                Err(e) => return Err(Error::io(self.ctx("list", &dir), e)),
            };
            for entry in rd {
                let entry = entry.map_err(|e| Error::io(self.ctx("list", &dir), e))?;
                let meta = entry
                    .metadata()
                    .map_err(|e| Error::io(self.ctx("stat", &entry.path()), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if meta.is_dir() {
                    if kind == FileType::Data {
                        dirs.push(entry.path());
                    }
                } else if is_hex_name(&name) {
                    out.push((name, meta.len()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn read(&self, h: &Handle) -> Result<Vec<u8>> {
        let p = self.path(h);
        fs::read(&p).map_err(|e| Error::io(self.ctx("read", &p), e))
    }

    fn read_range(&self, h: &Handle, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_range_into(h, offset, &mut buf)?;
        Ok(buf)
    }

    fn read_range_into(&self, h: &Handle, offset: u64, buf: &mut [u8]) -> Result<()> {
        let p = self.path(h);
        let f = File::open(&p).map_err(|e| Error::io(self.ctx("open", &p), e))?;
        f.read_exact_at(buf, offset).map_err(|e| {
            Error::io(
                format!(
                    "could not read {} bytes at offset {offset} of '{}'",
                    buf.len(),
                    p.display()
                ),
                e,
            )
        })
    }

    fn write(&self, h: &Handle, data: &[u8]) -> Result<()> {
        let dest = self.path(h);
        let dir = dest.parent().expect("repository files live in a directory");
        fs::create_dir_all(dir).map_err(|e| Error::io(self.ctx("create", dir), e))?;
        // restic does not always create tmp/; make it on first use.
        let tmp_dir = self.root.join("tmp");
        fs::create_dir_all(&tmp_dir).map_err(|e| Error::io(self.ctx("create", &tmp_dir), e))?;
        let tmp = tmp_dir.join(format!(
            "{}-{}-{}",
            h.name,
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &dest)?;
            sync_dir(dir)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(self.ctx("write", &dest), e));
        }
        Ok(())
    }

    fn remove(&self, h: &Handle) -> Result<()> {
        let p = self.path(h);
        fs::remove_file(&p).map_err(|e| Error::io(self.ctx("remove", &p), e))?;
        if let Some(dir) = p.parent() {
            sync_dir(dir).map_err(|e| Error::io(self.ctx("sync", dir), e))?;
        }
        Ok(())
    }

    fn stat(&self, h: &Handle) -> Result<u64> {
        let p = self.path(h);
        Ok(fs::metadata(&p)
            .map_err(|e| Error::io(self.ctx("stat", &p), e))?
            .len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_are_listed_read_and_removed_and_temporaries_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path());
        b.create().unwrap();
        let name = "ab".repeat(32);
        let h = Handle::new(FileType::Data, name.clone());
        b.write(&h, b"0123456789").unwrap();
        assert!(dir.path().join("data/ab").join(&name).exists());
        assert_eq!(b.list(FileType::Data).unwrap(), vec![(name.clone(), 10)]);
        assert_eq!(b.read_range(&h, 3, 4).unwrap(), b"3456");
        assert!(b.read_range(&h, 8, 4).is_err());
        assert_eq!(b.stat(&h).unwrap(), 10);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        b.remove(&h).unwrap();
        let e = b.read(&h).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        fs::write(dir.path().join("config"), b"x").unwrap();
        assert_eq!(b.create().unwrap_err().kind(), ErrorKind::AlreadyExists);
    }
}
