//! New VM disks from images: a thin clone (a qcow2 overlay whose backing file
//! is the image's local, read-only cache copy, shared by every clone of it;
//! see [`crate::cache`]) or a full copy (a verified download of the image to
//! the new disk's file).
//!
//! Deleting an image that some VM disk or snapshot file still reads through
//! its cache copy is refused (`Conflict`, 409) unless forced; the cache copy
//! stays while anything reads it.

use std::path::{Path, PathBuf};

use strata_format::Format;
use strata_jobs::create::{create, CreateRequest};

use crate::cache::{disk_format, sweep_quietly};
use crate::download::write_file;
use crate::error::{Error, Result};
use crate::record::{is_valid_id, ImageRecord, Status};
use crate::store::Registry;
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

impl Registry {
    /// The state directory the registry lives in.
    pub fn state_dir(&self) -> &Path {
        self.inner.dir.parent().unwrap_or(Path::new("."))
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

    /// Make a new disk at `dest` (which must not exist) from image `image`
    /// (ID or unique name): a qcow2 overlay on the verified cache copy
    /// (`Thin`), or a verified copy of its data in its own format (`Copy`).
    /// A thin clone first sweeps the cache ([`crate::cache::sweep_cache`]);
    /// a cache copy counts as read by a clone made outside a VM's `disks`
    /// directory only once a VM record names it.
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
                sweep_quietly(self.state_dir());
                let _lock = self.cache_lock()?;
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
}
