//! Where the bytes of images live: files in the registry's directory
//! ([`dir`], the default) or snapshots in a backup repository ([`repo`], so
//! images and disk backups share chunks). The records, locks and statuses are
//! the registry's own ([`crate::store`]) whichever holds the bytes.
//!
//! Each store keeps the registry's contract: the data of an image becomes
//! reachable (`ID.data` renamed into place, or `ID.snap` naming its
//! snapshot) only once it is complete and durable, before the record turns
//! `active`; [`DataStore::discard`] removes every trace of an image's data and
//! is what recovery, delete and a failed upload call.
//!
//! Which store a registry uses is recorded in the state directory
//! (`image-store.json`) the first time a repository is chosen: a registry's
//! images cannot move, so opening it with another store is refused.

mod dir;
mod repo;

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub(crate) use dir::DirStore;
pub(crate) use repo::RepoStore;

/// Where a registry keeps image data, as a user names it (`--image-store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// Files in the state directory.
    Directory,
    /// A backup repository: a directory or `s3:http://HOST:PORT/BUCKET[/PREFIX]`,
    /// as `strata backup --repo` takes it.
    Repository(String),
}

impl StoreLocation {
    /// `dir`, `repo:LOCATION` or `s3:...` (a repository in a bucket).
    pub fn parse(s: &str) -> Result<StoreLocation> {
        if s == "dir" {
            return Ok(StoreLocation::Directory);
        }
        let location = if s.starts_with("s3:") {
            s
        } else if let Some(rest) = s.strip_prefix("repo:") {
            rest
        } else {
            return Err(Error::Invalid(format!(
                "invalid image store '{s}': expected dir, repo:PATH or s3:http://HOST:PORT/BUCKET[/PREFIX]"
            )));
        };
        if location.is_empty() {
            return Err(Error::Invalid(format!(
                "invalid image store '{s}': the repository location is empty"
            )));
        }
        Ok(StoreLocation::Repository(location.to_string()))
    }

    fn describe(&self) -> String {
        match self {
            StoreLocation::Directory => "the state directory".into(),
            StoreLocation::Repository(l) => format!("the repository '{l}'"),
        }
    }
}

/// What `image-store.json` records.
#[derive(Serialize, Deserialize)]
struct Recorded {
    repository: String,
}

fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("image-store.json")
}

/// The store recorded for the registry of `state_dir` (the directory when
/// none is).
pub fn recorded_store(state_dir: &Path) -> Result<StoreLocation> {
    let p = record_path(state_dir);
    match std::fs::read(&p) {
        Ok(b) => {
            let r: Recorded = serde_json::from_slice(&b)
                .map_err(|e| Error::Corrupt(format!("{}: {e}", p.display())))?;
            Ok(StoreLocation::Repository(r.repository))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoreLocation::Directory),
        Err(e) => Err(Error::io(format!("read {}", p.display()), e)),
    }
}

/// Check `want` against what `state_dir` records, recording a repository the
/// first time one is chosen for a registry that holds no image yet.
pub(crate) fn settle_store(state_dir: &Path, images: &Path, want: &StoreLocation) -> Result<()> {
    let have = recorded_store(state_dir)?;
    if have == *want {
        return Ok(());
    }
    let refuse = || {
        Error::Invalid(format!(
            "the image registry in {} keeps its images in {}, not {}",
            state_dir.display(),
            have.describe(),
            want.describe()
        ))
    };
    let StoreLocation::Repository(location) = want else {
        return Err(refuse());
    };
    if have != StoreLocation::Directory || holds_images(images)? {
        return Err(refuse());
    }
    let data = serde_json::to_vec_pretty(&Recorded {
        repository: location.clone(),
    })
    .map_err(|e| Error::io("encode the image store", std::io::Error::other(e)))?;
    strata_vm::state::write_atomic(&record_path(state_dir), &data)?;
    Ok(())
}

fn holds_images(images: &Path) -> Result<bool> {
    let rd = std::fs::read_dir(images)
        .map_err(|e| Error::io(format!("read {}", images.display()), e))?;
    Ok(rd
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".json")))
}

/// The store of an open registry.
pub(crate) enum DataStore {
    Dir(DirStore),
    Repo(RepoStore),
}

/// Where an upload's bytes go until it is committed.
pub(crate) enum Sink {
    Dir(dir::Partial),
    Repo(repo::Streaming),
}

impl Sink {
    pub(crate) fn write(&mut self, buf: &[u8]) -> Result<()> {
        match self {
            Sink::Dir(p) => p.write(buf),
            Sink::Repo(s) => s.write(buf),
        }
    }
}

impl DataStore {
    /// Start receiving the data of image `id`.
    pub(crate) fn begin(&self, id: &str) -> Result<Sink> {
        match self {
            DataStore::Dir(d) => d.begin(id).map(Sink::Dir),
            DataStore::Repo(r) => r.begin(id).map(Sink::Repo),
        }
    }

    /// Make the complete data of `id` (`size` bytes) durable and reachable,
    /// after checking it against `disk_format`; its virtual size. On error
    /// nothing of it is reachable.
    pub(crate) fn commit(
        &self,
        id: &str,
        sink: Sink,
        disk_format: &str,
        size: u64,
    ) -> Result<Option<u64>> {
        match (self, sink) {
            (DataStore::Dir(d), Sink::Dir(p)) => d.commit(id, p, disk_format, size),
            (DataStore::Repo(r), Sink::Repo(s)) => r.commit(id, s, disk_format, size),
            _ => unreachable!("a sink is committed to the store that made it"),
        }
    }

    /// Remove every trace of the data of `id` (nothing there is no error).
    pub(crate) fn discard(&self, id: &str) -> Result<()> {
        match self {
            DataStore::Dir(d) => d.discard(id),
            DataStore::Repo(r) => r.discard(id),
        }
    }

    /// Recovery of an upload whose process died: [`DataStore::discard`], and
    /// also what it may have stored before naming it.
    pub(crate) fn discard_unfinished(&self, id: &str) -> Result<()> {
        match self {
            DataStore::Dir(d) => d.discard(id),
            DataStore::Repo(r) => r.discard_unfinished(id),
        }
    }

    /// Whether a file with this extension in the registry's directory holds
    /// the data of an image (and so goes with its record).
    pub(crate) fn owns_ext(&self, ext: &str) -> bool {
        match self {
            DataStore::Dir(_) => DirStore::owns_ext(ext),
            DataStore::Repo(_) => RepoStore::owns_ext(ext),
        }
    }

    /// The data of active image `id`, whose record says `size` bytes, from
    /// `start` for `len` bytes.
    pub(crate) fn reader(
        &self,
        id: &str,
        size: u64,
        start: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>> {
        match self {
            DataStore::Dir(d) => d.reader(id, size, start, len),
            DataStore::Repo(r) => r.reader(id, size, start, len),
        }
    }

    /// The data file of `id`, for stores that have one.
    pub(crate) fn file(&self, id: &str) -> Result<std::fs::File> {
        match self {
            DataStore::Dir(d) => d.file(id),
            DataStore::Repo(_) => Err(Error::Conflict(format!(
                "The data of image {id} is in a backup repository, not in a file: download it"
            ))),
        }
    }
}
