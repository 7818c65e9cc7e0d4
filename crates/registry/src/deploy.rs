//! New VM disks from images: a thin clone (a qcow2 overlay whose backing file
//! is a local, read-only copy of the image shared by every clone of it) or a
//! full copy.
//!
//! Contracts:
//! - the cache copy of image ID is `STATE/image-cache/ID.FMT`, one per image,
//!   made on first use from a verified download (a temporary name, synced,
//!   made read-only, renamed into place, the directory synced), and hashed
//!   again against the image's recorded sha512 before every clone is put on
//!   it: bytes that no longer match are refused loudly and left in place for
//!   the operator to inspect (clones made before still read them);
//! - a full copy is a verified download of the image to the new disk's file;
//! - deleting an image that some VM disk or snapshot file still reads through
//!   its cache copy is refused (`Conflict`, 409) unless forced; a forced
//!   delete leaves the cache copy for the clones, an unforced one removes it.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha512};
use strata_chain::OpenSpec;
use strata_format::Format;
use strata_jobs::create::{create, CreateRequest};
use strata_vm::{StateDir, VmRecord};

use crate::download::write_file;
use crate::error::{Error, Result};
use crate::record::{hex, is_valid_id, ImageRecord, Status};
use crate::store::Registry;

/// The cache directory under the state directory.
const CACHE_DIR: &str = "image-cache";

/// How a new disk is made from an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMode {
    /// A qcow2 overlay on the image's cache copy.
    Thin,
    /// A full copy of the image's data.
    Copy,
}

impl std::str::FromStr for CloneMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<CloneMode> {
        match s {
            "thin" => Ok(CloneMode::Thin),
            "copy" => Ok(CloneMode::Copy),
            _ => Err(Error::Invalid(format!(
                "invalid clone mode '{s}': thin or copy"
            ))),
        }
    }
}

/// A disk made from an image: its file and format (`qcow2` or `raw`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClonedDisk {
    pub file: PathBuf,
    pub format: String,
}

/// The format of an image that can be a VM disk.
fn disk_format(rec: &ImageRecord) -> Result<Format> {
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
    let mut f = File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let mut sha = Sha512::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        if n == 0 {
            return Ok(hex(&sha.finalize()));
        }
        sha.update(&buf[..n]);
    }
}

impl Registry {
    /// The state directory the registry lives in.
    pub fn state_dir(&self) -> &Path {
        self.inner.dir.parent().unwrap_or(Path::new("."))
    }

    fn cache_path(&self, id: &str, format: Format) -> PathBuf {
        self.state_dir()
            .join(CACHE_DIR)
            .join(format!("{id}.{}", format.name()))
    }

    /// The active image `image` names: its ID, or a name exactly one active
    /// image has.
    pub fn resolve(&self, image: &str) -> Result<ImageRecord> {
        if is_valid_id(image) {
            return self.get(image);
        }
        let mut found = self
            .all()?
            .into_iter()
            .filter(|r| r.status == Status::Active && r.name.as_deref() == Some(image));
        match (found.next(), found.next()) {
            (Some(r), None) => Ok(r),
            (None, _) => Err(Error::Invalid(format!(
                "No active image has the ID or name '{image}'"
            ))),
            (Some(_), Some(_)) => Err(Error::Invalid(format!(
                "Several active images are named '{image}': give its ID"
            ))),
        }
    }

    /// The verified local copy of active image `rec`: made from a verified
    /// download if missing, else hashed again; refused (`Corrupt`) when its
    /// bytes no longer match the image's sha512.
    pub fn cached_copy(&self, rec: &ImageRecord) -> Result<PathBuf> {
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
        let dir = self.state_dir().join(CACHE_DIR);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let (_, mut reader) = self.download(&rec.id, None)?;
        write_file(&mut reader, &path, Some(0o444))?;
        Ok(path)
    }

    /// Make a new disk at `dest` (which must not exist) from image `image`
    /// (ID or unique name): a qcow2 overlay on the verified cache copy
    /// (`Thin`), or a verified copy of its data in its own format (`Copy`).
    pub fn clone_disk(&self, image: &str, dest: &Path, mode: CloneMode) -> Result<ClonedDisk> {
        let rec = self.resolve(image)?;
        let format = disk_format(&rec)?;
        if dest.exists() {
            return Err(Error::Conflict(format!(
                "{} already exists",
                dest.display()
            )));
        }
        match mode {
            CloneMode::Thin => {
                let base = self.cached_copy(&rec)?;
                let base = base
                    .canonicalize()
                    .map_err(|e| Error::io(format!("resolve {}", base.display()), e))?;
                let options = [
                    (
                        "backing_file".to_string(),
                        base.to_string_lossy().into_owned(),
                    ),
                    ("backing_fmt".to_string(), format.name().to_string()),
                ]
                .into();
                let made = create(&CreateRequest {
                    path: dest.to_path_buf(),
                    format: Format::Qcow2,
                    size: rec.virtual_size,
                    options,
                    unsafe_backing: false,
                });
                if let Err(e) = made {
                    let _ = std::fs::remove_file(dest);
                    return Err(Error::io(
                        format!("create {}", dest.display()),
                        std::io::Error::other(e.to_string()),
                    ));
                }
                Ok(ClonedDisk {
                    file: dest.to_path_buf(),
                    format: "qcow2".into(),
                })
            }
            CloneMode::Copy => {
                let (_, mut reader) = self.download(&rec.id, None)?;
                write_file(&mut reader, dest, Some(0o644))?;
                Ok(ClonedDisk {
                    file: dest.to_path_buf(),
                    format: format.name().into(),
                })
            }
        }
    }

    /// The VM disks and snapshot files that read image `id` through its cache
    /// copy, as "VM 'NAME' (FILE)".
    pub fn clone_users(&self, id: &str) -> Result<Vec<String>> {
        let caches: Vec<PathBuf> = [Format::Qcow2, Format::Raw]
            .into_iter()
            .filter_map(|f| self.cache_path(id, f).canonicalize().ok())
            .collect();
        if caches.is_empty() {
            return Ok(Vec::new());
        }
        let state = StateDir::new(self.state_dir());
        let mut users = Vec::new();
        for name in state.list()? {
            let Ok(rec) = VmRecord::load(&state.vm_dir(&name)) else {
                continue;
            };
            let files = rec
                .def
                .disks
                .iter()
                .chain(rec.snapshots.iter().flat_map(|s| &s.disks));
            let mut seen = Vec::new();
            for d in files {
                if seen.contains(&&d.file) {
                    continue;
                }
                seen.push(&d.file);
                if reads_any(&d.file, &d.format, &caches) {
                    users.push(format!("VM '{name}' ({})", d.file.display()));
                }
            }
        }
        Ok(users)
    }

    /// Delete image `id` (see [`Registry::delete_forced`]), refused with
    /// `Conflict` while a VM disk reads it through its cache copy; the cache
    /// copy goes with it.
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
        self.delete_forced(id)?;
        for f in [Format::Qcow2, Format::Raw] {
            let _ = std::fs::remove_file(self.cache_path(id, f));
        }
        Ok(())
    }
}

/// Whether the chain of `file` has one of `caches` as a layer (files that
/// cannot be opened read nothing).
fn reads_any(file: &Path, format: &str, caches: &[PathBuf]) -> bool {
    let spec = OpenSpec::new(file)
        .format(format.parse().ok())
        .force_share(true);
    let Ok(chain) = strata_chain::open(&spec) else {
        return false;
    };
    chain
        .layers
        .iter()
        .filter_map(|l| l.path.canonicalize().ok())
        .any(|p| caches.contains(&p))
}
