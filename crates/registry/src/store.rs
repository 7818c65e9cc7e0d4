//! The registry on disk: `images/ID.json` (the record, replaced atomically),
//! the image's data as its store keeps it ([`crate::data`]: `images/ID.data`
//! and `images/ID.partial` in the directory store), `images/ID.lock` (held
//! by the one upload of an image, across processes) and `images/ID.build`
//! (an image of a VM disk being made, see `from_vm`).
//!
//! Contract (crash safety): the record is the truth. The data file is renamed
//! into place only after it is complete and synced, and the record turns
//! `active` only after that rename; a deleted image's record goes first, its
//! files after. [`Registry::open`] returns every `saving` image whose upload
//! lock nobody holds to `queued` and removes files no record owns, so a
//! process killed at any point leaves no image stuck in `saving`.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;

use crate::data::{settle_store, DataStore, DirStore, RepoStore, StoreLocation};
use crate::error::{Error, Result};
use crate::index::{Index, Row};
use crate::record::{self, check_tag, is_valid_id, ImageRecord, Status};

/// Refuse uploads larger than this unless the registry is told otherwise.
pub const DEFAULT_MAX_IMAGE_SIZE: u64 = 1 << 40;

/// An image registry in a directory. Cheap to clone; clones share one lock
/// that serialises record updates within the process.
#[derive(Clone)]
pub struct Registry {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    pub(crate) max_size: u64,
    /// Where the bytes of the images are.
    pub(crate) data: Arc<DataStore>,
    records: Mutex<()>,
    /// The records in memory for lists (the files stay the truth).
    index: Arc<Index>,
}

/// One JSON patch operation (RFC 6902's `add`, `replace`, `remove` on
/// top-level attributes, as Glance accepts them).
#[derive(Debug, Clone, PartialEq)]
pub enum PatchOp {
    Add(String, Value),
    Replace(String, Value),
    Remove(String),
}

impl Registry {
    /// Open (creating if needed) the registry under `state_dir/images`, and
    /// recover what a killed process left: `saving` images without a live
    /// upload return to `queued`, files without a record are removed.
    ///
    /// A registry whose images are in a backup repository (see
    /// [`Registry::open_with_store`]) is refused: it needs the password.
    pub fn open(state_dir: &Path) -> Result<Registry> {
        Registry::open_with_store(state_dir, &StoreLocation::Directory, None)
    }

    /// [`Registry::open`] with the image data in `store`; a repository needs
    /// its `password`. The store is recorded in the state directory the first
    /// time a repository is chosen; a registry is refused a store other than
    /// the one its images are in.
    pub fn open_with_store(
        state_dir: &Path,
        store: &StoreLocation,
        password: Option<&str>,
    ) -> Result<Registry> {
        let dir = state_dir.join("images");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        settle_store(state_dir, &dir, store)?;
        let data = match store {
            StoreLocation::Directory => DataStore::Dir(DirStore::new(dir.clone())),
            StoreLocation::Repository(location) => {
                let password = password.ok_or_else(|| {
                    Error::Invalid(format!(
                        "the images are in the repository '{location}': its password is needed"
                    ))
                })?;
                DataStore::Repo(RepoStore::open(dir.clone(), location, password)?)
            }
        };
        let reg = Registry {
            inner: Arc::new(Inner {
                dir,
                max_size: DEFAULT_MAX_IMAGE_SIZE,
                data: Arc::new(data),
                records: Mutex::new(()),
                index: Arc::default(),
            }),
        };
        reg.recover()?;
        Ok(reg)
    }

    /// The same registry refusing uploads above `max` bytes.
    pub fn with_max_image_size(self, max: u64) -> Registry {
        Registry {
            inner: Arc::new(Inner {
                dir: self.inner.dir.clone(),
                max_size: max,
                data: self.inner.data.clone(),
                records: Mutex::new(()),
                index: self.inner.index.clone(),
            }),
        }
    }

    pub fn max_image_size(&self) -> u64 {
        self.inner.max_size
    }

    pub(crate) fn path(&self, id: &str, ext: &str) -> PathBuf {
        self.inner.dir.join(format!("{id}.{ext}"))
    }

    pub(crate) fn data(&self) -> &DataStore {
        &self.inner.data
    }

    pub(crate) fn guard(&self) -> MutexGuard<'_, ()> {
        self.inner.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recover(&self) -> Result<()> {
        let _g = self.guard();
        let mut ids = std::collections::HashSet::new();
        for row in self.rows()? {
            let rec = row.rec.clone();
            ids.insert(rec.id.clone());
            if rec.status != Status::Saving {
                continue;
            }
            // A lock nobody holds means the uploading process is gone.
            if let Some(_lock) = UploadLock::try_take(&self.path(&rec.id, "lock"))? {
                let mut rec = rec;
                self.data().discard_unfinished(&rec.id)?;
                rec.status = Status::Queued;
                rec.updated_at = record::now();
                self.store(&rec)?;
            }
        }
        self.recover_builds()?;
        let rd = std::fs::read_dir(&self.inner.dir)
            .map_err(|e| Error::io(format!("read {}", self.inner.dir.display()), e))?;
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((id, ext)) = name.split_once('.') {
                if ids.contains(id) {
                    continue;
                }
                if self.data().owns_ext(ext) {
                    self.data().discard(id)?;
                } else if ext == "lock" {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    pub(crate) fn discard_file(&self, id: &str, ext: &str) -> Result<()> {
        let p = self.path(id, ext);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove {}", p.display()), e)),
        }
    }

    /// Write a record atomically (temporary file, fsync, rename, fsync dir).
    pub(crate) fn store(&self, rec: &ImageRecord) -> Result<()> {
        let data = serde_json::to_vec_pretty(rec)
            .map_err(|e| Error::io("encode image record", std::io::Error::other(e)))?;
        strata_vm::state::write_atomic(&self.path(&rec.id, "json"), &data)?;
        Ok(())
    }

    fn load(&self, id: &str) -> Result<ImageRecord> {
        if !is_valid_id(id) {
            return Err(Error::NotFound(id.to_string()));
        }
        let p = self.path(id, "json");
        let data = match std::fs::read(&p) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(id.to_string()))
            }
            Err(e) => return Err(Error::io(format!("read {}", p.display()), e)),
        };
        serde_json::from_slice(&data)
            .map_err(|e| Error::Corrupt(format!("image record {}: {e}", p.display())))
    }

    /// Every record, through the index (which reads only what changed).
    pub(crate) fn rows(&self) -> Result<Vec<Arc<Row>>> {
        self.inner
            .index
            .rows(&self.inner.dir, |id| match self.load(id) {
                Ok(r) => Ok(Some(r)),
                Err(Error::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            })
    }

    /// Create a `queued` image from the attributes in `body` (a JSON object;
    /// `id` may be given as a UUID). Read-only attributes are refused.
    pub fn create(&self, body: &serde_json::Map<String, Value>) -> Result<ImageRecord> {
        let id = match body.get("id") {
            None => record::new_id()?,
            Some(Value::String(s)) if is_valid_id(s) => s.clone(),
            Some(v) => {
                return Err(Error::Invalid(format!(
                    "Invalid image id {v}: expected a UUID such as 3fa85f64-5717-4562-b3fc-2c963f66afa6"
                )))
            }
        };
        let mut rec = ImageRecord::new(id, record::now());
        for (k, v) in body {
            if k != "id" {
                rec.set(k, v)?;
            }
        }
        self.store_new(&rec)?;
        Ok(rec)
    }

    /// Write the record of a new image: to a temporary file of this call's
    /// own, synced, then hard-linked to its name, which fails if the name
    /// exists. No process lock is needed (nothing else can act on an image
    /// before its record exists), so creations run in parallel.
    fn store_new(&self, rec: &ImageRecord) -> Result<()> {
        let data = serde_json::to_vec_pretty(rec)
            .map_err(|e| Error::io("encode image record", std::io::Error::other(e)))?;
        let path = self.path(&rec.id, "json");
        let tmp = self
            .inner
            .dir
            .join(format!(".{}.json.new-{}", rec.id, record::new_id()?));
        let linked = (|| {
            let mut f = File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &data)?;
            f.sync_all()?;
            std::fs::hard_link(&tmp, &path)
        })();
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => sync_dir(&self.inner.dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::Conflict(
                format!("An image with identifier {} already exists", rec.id),
            )),
            Err(e) => Err(Error::io(format!("write {}", path.display()), e)),
        }
    }

    /// The record of image `id`.
    pub fn get(&self, id: &str) -> Result<ImageRecord> {
        self.load(id)
    }

    /// Every image, in no particular order.
    pub fn all(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.rows()?.iter().map(|r| r.rec.clone()).collect())
    }

    /// Apply `f` to the record of `id` and store it, under the process lock.
    pub(crate) fn modify(
        &self,
        id: &str,
        f: impl FnOnce(&mut ImageRecord) -> Result<()>,
    ) -> Result<ImageRecord> {
        let _g = self.guard();
        let mut rec = self.load(id)?;
        f(&mut rec)?;
        rec.updated_at = record::now();
        self.store(&rec)?;
        Ok(rec)
    }

    /// Apply JSON patch operations, all or none.
    pub fn update(&self, id: &str, ops: &[PatchOp]) -> Result<ImageRecord> {
        self.modify(id, |rec| {
            for op in ops {
                match op {
                    PatchOp::Add(k, v) => rec.set(k, v)?,
                    PatchOp::Replace(k, v) => {
                        if !rec.has(k) {
                            return Err(Error::Conflict(format!("Property {k} does not exist.")));
                        }
                        rec.set(k, v)?
                    }
                    PatchOp::Remove(k) => rec.remove(k)?,
                }
            }
            Ok(())
        })
    }

    /// Add a tag (adding one it has is no change).
    pub fn add_tag(&self, id: &str, tag: &str) -> Result<ImageRecord> {
        check_tag(tag)?;
        self.modify(id, |rec| {
            if !rec.tags.iter().any(|t| t == tag) {
                if rec.tags.len() >= record::MAX_ITEMS {
                    return Err(Error::TooLarge(format!(
                        "Maximum number of tags ({}) exceeded",
                        record::MAX_ITEMS
                    )));
                }
                rec.tags.push(tag.to_string());
            }
            Ok(())
        })
    }

    /// Remove a tag; a tag the image does not have is `NotFound`.
    pub fn remove_tag(&self, id: &str, tag: &str) -> Result<ImageRecord> {
        let r = self.modify(id, |rec| {
            let before = rec.tags.len();
            rec.tags.retain(|t| t != tag);
            if rec.tags.len() == before {
                return Err(Error::Invalid(String::new()));
            }
            Ok(())
        });
        match r {
            Err(Error::Invalid(m)) if m.is_empty() => Err(Error::NotFound(format!(
                "{id} (the image has no tag '{tag}')"
            ))),
            other => other,
        }
    }

    /// Delete an image: refused when it is protected or an upload to it runs.
    /// The record goes first (the image is gone at that instant), the data after.
    /// Disks cloned from it and its cache copy are left to the callers
    /// ([`Registry::delete`], [`Registry::delete_forced`]).
    pub(crate) fn remove(&self, id: &str) -> Result<()> {
        let _g = self.guard();
        let rec = self.load(id)?;
        if rec.protected {
            return Err(Error::Forbidden(format!(
                "Image {id} is protected and cannot be deleted."
            )));
        }
        let Some(lock) = UploadLock::try_take(&self.path(id, "lock"))? else {
            return Err(Error::Conflict(format!(
                "Image {id} is being uploaded; try again when the upload ends."
            )));
        };
        let p = self.path(id, "json");
        std::fs::remove_file(&p).map_err(|e| Error::io(format!("remove {}", p.display()), e))?;
        sync_dir(&self.inner.dir)?;
        self.data().discard(id)?;
        drop(lock);
        self.discard_file(id, "lock")?;
        Ok(())
    }

    /// The record of an `active` image and its data file, for reading (a
    /// conflict when the data is in a backup repository: see
    /// [`Registry::download`]).
    pub fn open_data(&self, id: &str) -> Result<(ImageRecord, File)> {
        let rec = self.load(id)?;
        if rec.status != Status::Active {
            return Err(Error::no_data(id, rec.status));
        }
        let f = self.data().file(id)?;
        Ok((rec, f))
    }
}

/// fsync a directory so a rename or removal in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("sync {}", dir.display()), e))
}

/// An exclusive `flock` on an image's lock file: held by its one upload (and
/// briefly by delete and recovery). Released on drop, or when the process dies.
pub(crate) struct UploadLock {
    _file: File,
}

impl UploadLock {
    /// Take the lock if nobody holds it; `None` if someone does.
    pub(crate) fn try_take(path: &Path) -> Result<Option<UploadLock>> {
        Ok(flock(path, libc::LOCK_EX | libc::LOCK_NB)?.map(|f| UploadLock { _file: f }))
    }
}

/// Open (creating) the file at `path` and `flock` it with `how` (`LOCK_SH`
/// or `LOCK_EX`, with `LOCK_NB` or waiting); the open file holds the lock
/// until dropped. `None` when `LOCK_NB` was given and someone holds it.
pub(crate) fn flock(path: &Path, how: libc::c_int) -> Result<Option<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    loop {
        // SAFETY: flock on a descriptor this function owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), how) };
        if rc == 0 {
            return Ok(Some(file));
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if how & libc::LOCK_NB != 0 => return Ok(None),
            _ => return Err(Error::io(format!("lock {}", path.display()), err)),
        }
    }
}
