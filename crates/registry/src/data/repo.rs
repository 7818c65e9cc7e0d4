//! Image data as snapshots of a backup repository, written by the same
//! chunker and blob saver as disk backups ([`strata_repo::stream`]): an image
//! of a disk that was backed up adds no data, and the reverse.
//!
//! An image is one snapshot tagged [`IMAGE_TAG`] and `image-id=ID`, holding
//! one file, `ID`, under the path `/images/ID`; `ID.snap` in the registry's
//! directory names it. Order of a commit: packs, index, snapshot (the
//! stream), the inspection of the data read back from the snapshot, then
//! `ID.snap` (written atomically), then the caller's record turns `active`.
//! A failure before `ID.snap` forgets the snapshot; a process killed there
//! leaves a tagged snapshot that recovery finds by its tag and forgets.
//! Deleting forgets the snapshot after the record is gone; `strata backup gc`
//! then frees the data no other snapshot shares.
//!
//! Forgetting (removing a snapshot file) takes no lock, as it cannot harm a
//! reader: a reader holds a shared lock, so no gc removes the blobs it reads,
//! and gc itself only keeps more than needed if a snapshot goes while it runs.
//! Uploads and downloads hold a shared lock while they run; when gc or prune
//! holds the exclusive one they wait up to [`LOCK_WAIT`], then fail with a
//! conflict to retry.

use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_format::BlockDevice;
use strata_repo::backend::{FileType, Handle};
use strata_repo::chunk::ChunkSize;
use strata_repo::device::SnapshotDevice;
use strata_repo::disk::BackupOptions;
use strata_repo::lock::Lock;
use strata_repo::stream::{DiskStream, Streamed};
use strata_repo::tree::{IMAGE_ID_TAG, IMAGE_TAG};
use strata_repo::writer::DEFAULT_PACK_SIZE;
use strata_repo::{Id, Repository};

use crate::error::{Error, Result};
use crate::inspect::inspect_device;

/// How long an upload or download waits for an exclusive lock (gc, prune) to go.
pub(crate) const LOCK_WAIT: Duration = Duration::from_secs(30);

pub(crate) struct RepoStore {
    dir: PathBuf,
    /// The handle downloads read with, and the index files its index holds.
    current: Mutex<(Vec<String>, Arc<Repository>)>,
}

/// An upload streaming into the repository.
pub(crate) struct Streaming {
    stream: DiskStream,
}

impl Streaming {
    pub(crate) fn write(&mut self, buf: &[u8]) -> Result<()> {
        self.stream
            .write(buf)
            .map_err(|e| Error::repo("store image data", e))
    }
}

/// The storage names of the repository's index files, sorted.
fn index_names(repo: &Repository) -> Result<Vec<String>> {
    let mut names: Vec<String> = repo
        .backend()
        .list(FileType::Index)
        .map_err(|e| Error::repo("list the repository's index", e))?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    Ok(names)
}

fn snapshot_handle(id: &Id) -> Handle {
    Handle::new(FileType::Snapshot, id.to_string())
}

impl RepoStore {
    /// Open the repository at `location` with `password`.
    pub(crate) fn open(dir: PathBuf, location: &str, password: &str) -> Result<RepoStore> {
        let op = || format!("open the image repository '{location}'");
        let backend = strata_repo::open_location(location).map_err(|e| Error::repo(op(), e))?;
        let mut repo = Repository::open(backend, password).map_err(|e| Error::repo(op(), e))?;
        repo.set_lock_wait(LOCK_WAIT);
        let names = index_names(&repo)?;
        Ok(RepoStore {
            dir,
            current: Mutex::new((names, Arc::new(repo))),
        })
    }

    pub(crate) fn owns_ext(ext: &str) -> bool {
        ext == "snap"
    }

    fn pointer(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.snap"))
    }

    fn handle(&self) -> Arc<Repository> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// A handle whose index holds every index file stored now (loaded again
    /// only when the files changed: a backup, an upload or gc ran).
    fn fresh(&self) -> Result<Arc<Repository>> {
        let base = self.handle();
        let names = index_names(&base)?;
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.0 == names {
            return Ok(cur.1.clone());
        }
        let mut repo = base.reopen();
        repo.reload_index()
            .map_err(|e| Error::repo("load the repository's index", e))?;
        *cur = (names, Arc::new(repo));
        Ok(cur.1.clone())
    }

    pub(crate) fn begin(&self, _id: &str) -> Result<Streaming> {
        let stream = DiskStream::start(&self.handle(), DEFAULT_PACK_SIZE)
            .map_err(|e| Error::repo("start storing image data", e))?;
        Ok(Streaming { stream })
    }

    pub(crate) fn commit(
        &self,
        id: &str,
        s: Streaming,
        disk_format: &str,
        size: u64,
    ) -> Result<Option<u64>> {
        let opts = BackupOptions {
            name: id.to_string(),
            path: format!("/images/{id}"),
            tags: vec![IMAGE_TAG.to_string(), format!("{IMAGE_ID_TAG}{id}")],
            parent: None,
            incremental: None,
            chunk_size: ChunkSize::DEFAULT,
            pack_size: DEFAULT_PACK_SIZE,
        };
        let Streamed {
            repo,
            lock,
            snapshot,
            ..
        } = s
            .stream
            .finish(&opts)
            .map_err(|e| Error::repo("store image data", e))?;
        let repo = Arc::new(repo);
        let r = (|| {
            let snap = repo
                .load_snapshot(&snapshot)
                .map_err(|e| Error::repo("read the image's snapshot back", e))?;
            let dev = SnapshotDevice::open(repo.clone(), &snap)
                .map_err(|e| Error::repo("read the image's snapshot back", e))?;
            let virtual_size = inspect_device(Arc::new(dev), disk_format, size)?;
            strata_vm::state::write_atomic(&self.pointer(id), format!("{snapshot}\n").as_bytes())?;
            Ok(virtual_size)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(self.pointer(id));
            let _ = self.forget(&repo, &snapshot);
        }
        let _ = lock.release();
        r
    }

    /// The snapshot `ID.snap` names, if there is one.
    fn named(&self, id: &str) -> Result<Option<Id>> {
        let p = self.pointer(id);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("read {}", p.display()), e)),
        };
        Id::parse(text.trim())
            .map(Some)
            .map_err(|e| Error::Corrupt(format!("{}: {e}", p.display())))
    }

    fn forget(&self, repo: &Repository, snapshot: &Id) -> Result<()> {
        match repo.backend().remove(&snapshot_handle(snapshot)) {
            Err(e) if e.kind() != strata_repo::ErrorKind::NotFound => Err(Error::repo(
                format!("forget image snapshot {}", snapshot.short()),
                e,
            )),
            _ => Ok(()),
        }
    }

    /// Forget the snapshot `ID.snap` names, then remove `ID.snap`.
    pub(crate) fn discard(&self, id: &str) -> Result<()> {
        if let Some(snap) = self.named(id)? {
            self.forget(&self.handle(), &snap)?;
        }
        let p = self.pointer(id);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("remove {}", p.display()), e))
            }
            _ => Ok(()),
        }
    }

    /// [`RepoStore::discard`], and every snapshot tagged as image `id`'s
    /// (one stored by a process killed before it wrote `ID.snap`).
    pub(crate) fn discard_unfinished(&self, id: &str) -> Result<()> {
        self.discard(id)?;
        let repo = self.handle();
        let tag = format!("{IMAGE_ID_TAG}{id}");
        let snapshots = repo
            .snapshots()
            .map_err(|e| Error::repo("list the repository's snapshots", e))?;
        for (sid, s) in snapshots {
            if s.is_image() && s.tags.contains(&tag) {
                self.forget(&repo, &sid)?;
            }
        }
        Ok(())
    }

    /// Read `len` bytes from `start` of image `id` (of `size` bytes), under a
    /// shared lock held until the reader is dropped: only the blobs the range
    /// covers are loaded, each authenticated and hash-checked.
    pub(crate) fn reader(
        &self,
        id: &str,
        size: u64,
        start: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>> {
        let lock = Lock::acquire(&self.handle(), false)
            .map_err(|e| Error::repo(format!("read image {id}"), e))?;
        let repo = self.fresh()?;
        let snap_id = self
            .named(id)?
            .ok_or_else(|| Error::Corrupt(format!("image {id} is active but names no snapshot")))?;
        let op = || format!("read image {id} (snapshot {})", snap_id.short());
        let snap = repo
            .load_snapshot(&snap_id)
            .map_err(|e| Error::repo(op(), e))?;
        let dev = SnapshotDevice::open(repo.clone(), &snap).map_err(|e| Error::repo(op(), e))?;
        if dev.virtual_size() != size {
            return Err(Error::Corrupt(format!(
                "image {id} holds {} bytes, its record says {size}",
                dev.virtual_size()
            )));
        }
        Ok(Box::new(SnapshotReader {
            dev,
            repo,
            lock,
            pos: start,
            end: start + len,
        }))
    }
}

/// Bytes of an image's snapshot, read in place.
struct SnapshotReader {
    dev: SnapshotDevice,
    repo: Arc<Repository>,
    lock: Lock,
    pos: u64,
    end: u64,
}

impl Read for SnapshotReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.end - self.pos) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.lock
            .refresh_if_due(&self.repo)
            .map_err(std::io::Error::other)?;
        self.dev
            .read(&mut buf[..n], self.pos)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        self.pos += n as u64;
        Ok(n)
    }
}
