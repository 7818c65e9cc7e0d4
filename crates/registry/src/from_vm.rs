//! Images made from VM disks: the disk as it was at one of the VM's snapshots,
//! or as it is now (live, while the guest runs; see
//! `strata_vm::image_source`). strata's engine flattens the disk into a
//! standalone image (no backing file) in `images/ID.build`, which then streams
//! in through the ordinary upload, checksummed as every upload is; the image
//! turns `active`.
//!
//! Contract: the record is made first (`queued`, saying where it comes from)
//! and the image's upload lock is held from then to the end, so nothing else
//! uploads to it or deletes it meanwhile. A failure leaves the image `killed`,
//! never `saving`, and removes the build file. A process killed on the way
//! leaves the build file behind: the next open of the registry finds it with
//! its lock free, turns the image `killed` and removes the file.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use strata_chain::OpenSpec;
use strata_format::{BlockDevice, Format};
use strata_jobs::flatten::flatten;
use strata_jobs::status::ChainStatus;
use strata_jobs::{Cancel, Progress};
use strata_nbd::device::NbdDevice;
use strata_vm::image_source::DiskView;
use strata_vm::Manager;

use crate::error::{Error, Result};
use crate::record::{self, ImageRecord, Status};
use crate::store::{Registry, UploadLock};

/// What the image is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The disk as it was at this snapshot of the VM.
    Snapshot(String),
    /// The disk now; `quiesce` freezes the guest's filesystems for the instant.
    Live { quiesce: bool },
}

/// A request for an image of a VM's disk.
#[derive(Debug, Clone)]
pub struct FromVm {
    pub vm: String,
    pub source: Source,
    /// The disk, 0-based.
    pub disk: usize,
    /// The image's name (default: the VM's name and the snapshot's, or the time).
    pub name: Option<String>,
    /// `qcow2` or `raw`.
    pub disk_format: String,
}

/// The extension of a build file (the flattened disk before its upload).
const BUILD: &str = "build";

/// A VM manager error as the registry reports it: what the request named
/// that does not exist, or an option that cannot be, is the request's fault
/// (400); a VM in the wrong state or busy is a conflict (409).
fn vm_error(e: strata_vm::Error) -> Error {
    use strata_vm::Error as E;
    match e {
        E::Invalid(_) | E::NoSuchVm(_) | E::NoSuchSnapshot { .. } => Error::Invalid(e.to_string()),
        E::State(_) | E::Busy(_) => Error::Conflict(e.to_string()),
        other => Error::io(
            "read the VM's disk",
            std::io::Error::other(other.to_string()),
        ),
    }
}

fn flatten_error(e: impl std::fmt::Display) -> Error {
    Error::io("flatten the disk", std::io::Error::other(e.to_string()))
}

impl Registry {
    /// Make an active image of a VM's disk as `req` says; on failure the image
    /// made for it is left `killed` and the error says why. The VM keeps its
    /// run state and its snapshot tree.
    pub fn create_from_vm(
        &self,
        mgr: &Manager,
        req: &FromVm,
        progress: &dyn Progress,
        cancel: &Cancel,
    ) -> Result<ImageRecord> {
        let format = match req.disk_format.as_str() {
            "qcow2" => Format::Qcow2,
            "raw" => Format::Raw,
            other => {
                return Err(Error::Invalid(format!(
                    "Invalid disk format '{other}' for an image of a VM: qcow2 or raw"
                )))
            }
        };
        let mut body = serde_json::Map::new();
        let name = req.name.clone().unwrap_or_else(|| match &req.source {
            Source::Snapshot(s) => format!("{}-{s}", req.vm),
            Source::Live { .. } => format!("{}-{}", req.vm, record::now()),
        });
        body.insert("name".into(), name.into());
        body.insert("disk_format".into(), req.disk_format.clone().into());
        body.insert("container_format".into(), "bare".into());
        body.insert("image_type".into(), "snapshot".into());
        body.insert("strata_vm".into(), req.vm.clone().into());
        body.insert("strata_disk".into(), req.disk.to_string().into());
        if let Source::Snapshot(s) = &req.source {
            body.insert("strata_snapshot".into(), s.clone().into());
        }
        let rec = self.create(&body)?;
        let Some(lock) = UploadLock::try_take(&self.path(&rec.id, "lock"))? else {
            return Err(Error::Conflict(format!(
                "Image {} is already being uploaded",
                rec.id
            )));
        };
        // The build file exists from here on: a process killed at any later
        // point leaves it for recovery to find.
        let build = self.path(&rec.id, BUILD);
        let made = std::fs::File::create(&build)
            .map_err(|e| Error::io(format!("create {}", build.display()), e))
            .and_then(|_| self.build_from_vm(mgr, req, &build, format, progress, cancel))
            .and_then(|()| self.upload_build(&rec.id, &build, lock, cancel));
        let _ = std::fs::remove_file(&build);
        match made {
            Ok(rec) => Ok(rec),
            Err(e) => {
                let _ = self.modify(&rec.id, |r| {
                    r.status = Status::Killed;
                    Ok(())
                });
                Err(e)
            }
        }
    }

    fn build_from_vm(
        &self,
        mgr: &Manager,
        req: &FromVm,
        out: &Path,
        format: Format,
        progress: &dyn Progress,
        cancel: &Cancel,
    ) -> Result<()> {
        let read = |view: &DiskView<'_>| flatten_view(view, out, format, progress, cancel);
        match &req.source {
            Source::Snapshot(s) => mgr.read_snapshot_disk(&req.vm, s, req.disk, read),
            Source::Live { quiesce } => mgr.read_vm_disk(&req.vm, req.disk, *quiesce, read),
        }
        .map_err(vm_error)?
    }

    /// Stream the build file in as the image's data (the upload lock is held).
    fn upload_build(
        &self,
        id: &str,
        build: &Path,
        lock: UploadLock,
        cancel: &Cancel,
    ) -> Result<ImageRecord> {
        let mut src = std::fs::File::open(build)
            .map_err(|e| Error::io(format!("open {}", build.display()), e))?;
        let mut up = self.begin_upload_locked(id, None, lock)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            if cancel.is_cancelled() {
                return Err(flatten_error(strata_jobs::Error::Cancelled));
            }
            let n = src
                .read(&mut buf)
                .map_err(|e| Error::io(format!("read {}", build.display()), e))?;
            if n == 0 {
                break;
            }
            up.write(&buf[..n])?;
        }
        up.finish()
    }

    /// Turn images whose build a killed process left (its file there, its
    /// lock free) `killed`, and remove their build files. Called by recovery,
    /// under the record lock.
    pub(crate) fn recover_builds(&self) -> Result<()> {
        let rd = std::fs::read_dir(&self.inner.dir)
            .map_err(|e| Error::io(format!("read {}", self.inner.dir.display()), e))?;
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".build") else {
                continue;
            };
            let Some(_lock) = UploadLock::try_take(&self.path(id, "lock"))? else {
                continue;
            };
            if let Ok(mut rec) = self.get(id) {
                if rec.status != Status::Active {
                    rec.status = Status::Killed;
                    rec.updated_at = record::now();
                    self.store(&rec)?;
                }
            }
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(())
    }
}

/// Flatten what `view` shows into a new `format` image at `out`.
fn flatten_view(
    view: &DiskView<'_>,
    out: &Path,
    format: Format,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<()> {
    let (status, map) = match view {
        DiskView::File {
            file,
            format: f,
            snapshot,
            in_use,
        } => {
            let spec = OpenSpec::new(file).format(Some(*f)).force_share(*in_use);
            let chain = strata_chain::open(&spec).map_err(flatten_error)?;
            let status = match snapshot {
                None => ChainStatus::new(&chain),
                Some(key) => strata_jobs::snapshot::view_chain(&chain.devices(), key)
                    .and_then(ChainStatus::from_devices),
            }
            .map_err(flatten_error)?;
            (status, !*in_use)
        }
        DiskView::Point(p) => {
            let dev = NbdDevice::connect_unix(&p.socket, &p.export).map_err(flatten_error)?;
            if dev.virtual_size() != p.size {
                return Err(flatten_error(format!(
                    "the export shows {} bytes where the disk has {}",
                    dev.virtual_size(),
                    p.size
                )));
            }
            let dev: Arc<dyn BlockDevice> = Arc::new(dev);
            (
                ChainStatus::from_devices(vec![dev]).map_err(flatten_error)?,
                false,
            )
        }
    };
    flatten(&status, out, format, map, progress, cancel).map_err(flatten_error)?;
    Ok(())
}
