//! The image cache: `STATE/image-cache/ID.FMT`, one read-only local copy of
//! an image for every thin clone of it to rest on, and who reads it.
//!
//! Contracts:
//! - a copy is made on first use from a verified download (a temporary name,
//!   synced, made read-only, renamed into place, the directory synced) and
//!   hashed again against the image's recorded sha512 before every clone is
//!   put on it: bytes that no longer match are refused loudly and left in
//!   place for the operator to inspect (clones made before still read them);
//! - a copy goes when its image's record is gone and nothing reads it any
//!   more: no disk or snapshot file of a VM record, and no file in a VM's
//!   `disks` directory (a clone made before its VM is defined) has it in its
//!   chain. [`sweep_cache`] removes such copies, and the temporary files of
//!   downloads a killed process left; it runs after every image delete and VM
//!   undefine and before every thin clone, so a process killed between the
//!   delete and the sweep leaves a copy the next one removes (a leak, never
//!   a copy taken from under a clone);
//! - a file that cannot be read counts as reading every copy (kept, not lost);
//! - the directory's `.lock`: making a copy and a clone on it holds it
//!   shared, a sweep holds it exclusively, so a sweep never sees a clone half
//!   made.

use std::fs::File;
use std::path::{Path, PathBuf};

use strata_format::Format;
use strata_vm::{Disk, Manager, StateDir, VmRecord};

use crate::download::write_file;
use crate::error::{Error, Result};
use crate::record::{is_valid_id, ImageRecord};
use crate::store::{flock, sync_dir, Registry};

/// The lock file in the cache directory.
const LOCK: &str = ".lock";

/// A hold on the cache directory's lock, released when dropped.
pub(crate) struct CacheLock {
    _file: File,
}

impl CacheLock {
    /// Wait for the lock of the cache directory `dir` (made if missing):
    /// shared, or exclusive.
    fn take(dir: &Path, exclusive: bool) -> Result<CacheLock> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let how = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        let file = flock(&dir.join(LOCK), how)?.expect("a waiting flock always returns a lock");
        Ok(CacheLock { _file: file })
    }
}

/// The format of an image that can be a VM disk.
pub(crate) fn disk_format(rec: &ImageRecord) -> Result<Format> {
    match rec.disk_format.as_deref() {
        Some("qcow2") => Ok(Format::Qcow2),
        Some("raw") => Ok(Format::Raw),
        other => Err(Error::Invalid(format!(
            "Image {} has disk format {}: only qcow2 and raw images make VM disks",
            rec.id,
            other.unwrap_or("(none)")
        ))),
    }
}

/// The SHA-512 of the file at `path`, in hex.
fn sha512_of(path: &Path) -> Result<String> {
    use crate::digests::{Sha512, StreamDigest};
    let mut f = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let mut sha = Sha512::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        if n == 0 {
            return Ok(crate::record::hex(&sha.finish()));
        }
        sha.update(&buf[..n]);
    }
}

impl Registry {
    fn cache_dir(&self) -> PathBuf {
        StateDir::new(self.state_dir()).image_cache()
    }

    fn cache_path(&self, id: &str, format: Format) -> PathBuf {
        self.cache_dir().join(format!("{id}.{}", format.name()))
    }

    /// Hold the cache directory's lock shared (while a clone is made on a copy).
    pub(crate) fn cache_lock(&self) -> Result<CacheLock> {
        CacheLock::take(&self.cache_dir(), false)
    }

    /// The verified local copy of active image `rec`: made from a verified
    /// download if missing, else hashed again; refused (`Corrupt`) when its
    /// bytes no longer match the image's sha512. The caller holds
    /// [`Registry::cache_lock`] until the clone on it exists.
    pub(crate) fn cached_copy(&self, rec: &ImageRecord) -> Result<PathBuf> {
        let format = disk_format(rec)?;
        let want = rec.os_hash_value.clone().ok_or_else(|| {
            Error::NoData(format!(
                "Image {} has no data: its status is {}",
                rec.id,
                rec.status.as_str()
            ))
        })?;
        let path = self.cache_path(&rec.id, format);
        if path.exists() {
            let got = sha512_of(&path)?;
            if got != want {
                return Err(Error::Corrupt(format!(
                    "the cached copy {} of image {} does not match the image's sha512 \
                     (recorded {want}, found {got}): refusing to put a disk on it; \
                     remove the file to fetch the image again once no VM reads it",
                    path.display(),
                    rec.id
                )));
            }
            return Ok(path);
        }
        let (_, mut reader) = self.download(&rec.id, None)?;
        write_file(&mut reader, &path, Some(0o444))?;
        Ok(path)
    }

    /// The VM disks and snapshot files that read image `id` through its cache
    /// copy, as "VM 'NAME' (FILE)" (files that cannot be read are not named).
    pub fn clone_users(&self, id: &str) -> Result<Vec<String>> {
        let caches: Vec<PathBuf> = [Format::Qcow2, Format::Raw]
            .into_iter()
            .filter_map(|f| self.cache_path(id, f).canonicalize().ok())
            .collect();
        if caches.is_empty() {
            return Ok(Vec::new());
        }
        Ok(readers(self.state_dir())?
            .into_iter()
            .filter(|r| r.layers.as_ref().is_ok_and(|l| reads_one(l, &caches)))
            .map(|r| r.who)
            .collect())
    }

    /// Delete image `id` (see [`Registry::delete`]) whatever VM disks read it
    /// through its cache copy: the copy stays until none does.
    pub fn delete_forced(&self, id: &str) -> Result<()> {
        self.remove(id)?;
        strata_vm::snapshot::crash_point("image-deleted");
        sweep_quietly(self.state_dir());
        Ok(())
    }

    /// Delete image `id` (refused when it is protected or an upload to it
    /// runs), also refused with `Conflict` while a VM disk reads it through
    /// its cache copy; the cache copy goes with it.
    pub fn delete(&self, id: &str) -> Result<()> {
        let users = self.clone_users(id)?;
        if !users.is_empty() {
            return Err(Error::Conflict(format!(
                "Image {id} is in use by {} disk(s) cloned from it: {}; \
                 delete those VMs first, or force the delete (the clones keep the cached copy)",
                users.len(),
                users.join(", ")
            )));
        }
        self.delete_forced(id)
    }
}

/// A file that may read a cache copy, and the files of its chain (or why
/// they could not be read).
struct Reader {
    who: String,
    layers: std::result::Result<Vec<PathBuf>, String>,
}

fn reads_one(layers: &[PathBuf], caches: &[PathBuf]) -> bool {
    layers.iter().any(|l| caches.contains(l))
}

/// Every disk and snapshot file of a VM record, and every file in a VM's
/// `disks` directory, with its chain. Files that do not exist are left out.
fn readers(state_dir: &Path) -> Result<Vec<Reader>> {
    let state = StateDir::new(state_dir);
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();
    let mut add = |who: String, disk: Disk| {
        if seen.contains(&disk.file) || !disk.file.exists() {
            return;
        }
        seen.push(disk.file.clone());
        let layers = disk.layer_files().map_err(|e| e.to_string());
        out.push(Reader {
            who: format!("{who} ({})", disk.file.display()),
            layers,
        });
    };
    for name in state.list()? {
        let dir = state.vm_dir(&name);
        let who = format!("VM '{name}'");
        if let Ok(rec) = VmRecord::load(&dir) {
            let files = rec
                .def
                .disks
                .iter()
                .chain(rec.snapshots.iter().flat_map(|s| &s.disks));
            for d in files {
                add(who.clone(), d.clone());
            }
        }
        let disks = dir.join("disks");
        for entry in std::fs::read_dir(&disks).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                let file = entry.path();
                let format = match file.extension().and_then(|e| e.to_str()) {
                    Some("raw") => "raw",
                    _ => "qcow2",
                };
                add(
                    who.clone(),
                    Disk {
                        file,
                        format: format.into(),
                    },
                );
            }
        }
    }
    Ok(out)
}

/// Remove the cache copies whose image is gone and that nothing reads any
/// more, and the temporary files of downloads a killed process left; the
/// files removed. See the module's contract.
pub fn sweep_cache(state_dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = StateDir::new(state_dir).image_cache();
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let _lock = CacheLock::take(&dir, true)?;
    let images = state_dir.join("images");
    let mut removed = Vec::new();
    let mut orphans = Vec::new();
    let rd =
        std::fs::read_dir(&dir).map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            // Nobody writes a temporary file while the lock is exclusive.
            if name.contains(crate::download::PART_MARK) {
                removed.push(entry.path());
            }
            continue;
        }
        let Some((id, _)) = name.split_once('.') else {
            continue;
        };
        if is_valid_id(id) && !images.join(format!("{id}.json")).exists() {
            orphans.push(entry.path().canonicalize().unwrap_or(entry.path()));
        }
    }
    if !orphans.is_empty() {
        let readers = readers(state_dir)?;
        if readers.iter().all(|r| r.layers.is_ok()) {
            let read: Vec<&PathBuf> = readers
                .iter()
                .flat_map(|r| r.layers.iter().flatten())
                .collect();
            removed.extend(orphans.into_iter().filter(|o| !read.contains(&o)));
        }
    }
    for f in &removed {
        match std::fs::remove_file(f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(format!("remove {}", f.display()), e))
            }
            _ => {}
        }
    }
    if !removed.is_empty() {
        sync_dir(&dir)?;
    }
    Ok(removed)
}

/// [`sweep_cache`] after an operation that succeeded: a failure only leaves
/// copies for the next sweep, so it does not turn the operation into one.
pub(crate) fn sweep_quietly(state_dir: &Path) {
    let _ = sweep_cache(state_dir);
}

/// Undefine VM `name` ([`Manager::undefine`]: its disks made from images go
/// with it), then let go of the cache copies only it read.
pub fn undefine_vm(mgr: &Manager, name: &str) -> strata_vm::Result<()> {
    mgr.undefine(name)?;
    strata_vm::snapshot::crash_point("vm-undefined");
    sweep_quietly(mgr.state_dir().root());
    Ok(())
}
