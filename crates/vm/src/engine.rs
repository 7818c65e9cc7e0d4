//! Snapshot work on the image files themselves, with strata's engine, for a
//! stopped VM (and to create the overlays of external snapshots, which may be
//! written while QEMU holds their backing files).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use strata_format::{BlockDevice, Format};
use strata_jobs::create::{create, CreateRequest};
use strata_jobs::{commit, snapshot, Cancel, NoProgress};

use crate::error::{Error, Result};
use crate::record::Disk;

fn format_of(d: &Disk) -> Result<Format> {
    d.format.parse().map_err(|_| {
        Error::Invalid(format!(
            "disk '{}': unknown format '{}'",
            d.file.display(),
            d.format
        ))
    })
}

/// Create an empty qcow2 overlay at `path` whose backing file is `backing`
/// (its absolute path and format recorded).
pub fn create_overlay(path: &Path, backing: &Disk) -> Result<()> {
    let mut options = BTreeMap::new();
    options.insert(
        "backing_file".to_string(),
        backing.file.display().to_string(),
    );
    options.insert("backing_fmt".to_string(), backing.format.clone());
    create(&CreateRequest {
        path: path.to_path_buf(),
        format: Format::Qcow2,
        size: None,
        options,
        unsafe_backing: false,
    })?;
    Ok(())
}

/// Run `f` on disk `d` opened read-write, then close it. Internal snapshots
/// need qcow2: any other format is refused before the file is opened.
fn with_disk<T>(d: &Disk, f: impl FnOnce(&dyn BlockDevice) -> Result<T>) -> Result<T> {
    if format_of(d)? != Format::Qcow2 {
        return Err(Error::Invalid(format!(
            "disk '{}' is {}: internal snapshots need qcow2",
            d.file.display(),
            d.format
        )));
    }
    let dev = strata_chain::open_image(&d.file, Format::Qcow2, true, false)?;
    let out = f(dev.as_ref())?;
    dev.close()?;
    Ok(out)
}

/// True when the internal snapshot `tag` exists in disk `d`.
pub fn has_internal(d: &Disk, tag: &str) -> Result<bool> {
    let dev = strata_chain::open_image(&d.file, Format::Qcow2, false, true)?;
    Ok(snapshot::list(dev.as_ref()).iter().any(|s| s.name == tag))
}

/// Create internal snapshot `tag` in every disk, or in none: on a failure the
/// ones already made are deleted again. Each disk follows
/// [`snapshot::create`]'s rules with unique names (the manager finds them by name).
pub fn internal_create(disks: &[Disk], tag: &str) -> Result<()> {
    for d in disks {
        if has_internal(d, tag)? {
            return Err(Error::Invalid(format!(
                "disk '{}' already has an internal snapshot '{tag}'",
                d.file.display()
            )));
        }
    }
    let req = snapshot::CreateRequest {
        name: tag.to_string(),
        names: snapshot::NameRule::Unique,
    };
    for (i, d) in disks.iter().enumerate() {
        let made = with_disk(d, |dev| Ok(snapshot::create(dev, &req).map(|_| ())?));
        if let Err(e) = made {
            for done in &disks[..i] {
                let _ = with_disk(done, |dev| {
                    Ok(snapshot::delete(dev, &delete_req(tag)).map(|_| ())?)
                });
            }
            return Err(e);
        }
    }
    Ok(())
}

fn delete_req(tag: &str) -> snapshot::DeleteRequest {
    snapshot::DeleteRequest {
        snapshot: tag.to_string(),
    }
}

/// Apply (revert to) internal snapshot `tag` in every disk.
pub fn internal_apply(disks: &[Disk], tag: &str) -> Result<()> {
    for d in disks {
        if !has_internal(d, tag)? {
            return Err(Error::Invalid(format!(
                "disk '{}' has no internal snapshot '{tag}'",
                d.file.display()
            )));
        }
    }
    let req = snapshot::ApplyRequest {
        snapshot: tag.to_string(),
    };
    disks
        .iter()
        .try_for_each(|d| with_disk(d, |dev| Ok(snapshot::apply(dev, &req)?)))
}

/// Delete internal snapshot `tag` from every disk that has it.
pub fn internal_delete(disks: &[Disk], tag: &str) -> Result<()> {
    for d in disks {
        if has_internal(d, tag)? {
            with_disk(d, |dev| {
                Ok(snapshot::delete(dev, &delete_req(tag)).map(|_| ())?)
            })?;
        }
    }
    Ok(())
}

/// Merge the overlay `top` (qcow2) into its backing file: afterwards the backing
/// file shows what `top` showed. `top` keeps its data (its caller removes it).
pub fn commit_into_backing(top: &Disk) -> Result<()> {
    let req = commit::CommitRequest {
        format: Some(format_of(top)?),
        keep_top: true,
        ..commit::CommitRequest::new(&top.file)
    };
    let resolved = commit::resolve(&req)?;
    commit::commit(&resolved, &NoProgress, &Cancel::default())?;
    Ok(())
}

impl Disk {
    /// The files this disk's chain names, top first, each canonical where it
    /// resolves; the last one may not exist (the chain names a file that is
    /// gone). Each layer is opened alone, read-only without locks (a running
    /// VM may write the disk).
    pub fn layer_files(&self) -> Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = Vec::new();
        let mut next = Some((self.file.clone(), Some(format_of(self)?)));
        while let Some((file, format)) = next.take() {
            let name = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
            if files.contains(&name) || files.len() > MAX_CHAIN {
                return Err(Error::Invalid(format!(
                    "disk '{}': its chain loops or is deeper than {MAX_CHAIN}",
                    self.file.display()
                )));
            }
            files.push(name);
            if !file.exists() {
                break;
            }
            let chain = strata_chain::open(
                &strata_chain::OpenSpec::new(&file)
                    .format(format)
                    .open_backing(false)
                    .force_share(true),
            )?;
            let top = &chain.layers[0];
            next = top.backing_path.clone().map(|p| {
                let f = top.backing_format.as_deref().and_then(|f| f.parse().ok());
                (p, f)
            });
        }
        Ok(files)
    }
}

/// The deepest chain [`Disk::layer_files`] follows.
const MAX_CHAIN: usize = 64;

/// The qcow2 image `x` alone, its backing file not opened (read without
/// locks: `x` may be a disk the running VM writes).
fn probe(x: &Path) -> Result<strata_chain::Chain> {
    Ok(strata_chain::open(
        &strata_chain::OpenSpec::new(x)
            .format(Some(Format::Qcow2))
            .open_backing(false)
            .force_share(true),
    )?)
}

/// True when the qcow2 image `x` names a backing file (of any kind).
pub fn has_backing(x: &Path) -> Result<bool> {
    Ok(probe(x)?.layers[0].backing_name.is_some())
}

/// True when the qcow2 image `x` has `backing` as its backing file (read
/// without locks: `x` may be a disk the running VM writes).
pub fn is_on(x: &Path, backing: &Path) -> Result<bool> {
    Ok(probe(x)?.layers[0]
        .backing_path
        .as_ref()
        .is_some_and(|b| std::fs::canonicalize(b).ok() == std::fs::canonicalize(backing).ok()))
}

/// When the qcow2 image `x` has `skipped` as its backing file, make it skip it:
/// copy into `x` what `skipped` provided (where `skipped`'s content differs from
/// what lies below it), then point `x` at `skipped`'s own backing file (or at
/// none). `x` shows the same content afterwards. Returns whether `x` was on
/// `skipped`. Running it again after an interruption finishes the job.
pub fn rebase_past(x: &Path, skipped: &Path) -> Result<bool> {
    if !is_on(x, skipped)? {
        return Ok(false);
    }
    let chain = strata_chain::open(
        &strata_chain::OpenSpec::new(x)
            .format(Some(Format::Qcow2))
            .write(true),
    )?;
    let image = chain.top().clone();
    let below = chain.layers.get(2);
    let cancel = strata_jobs::Cancel::default();
    strata_jobs::rebase::copy_differences(
        &image,
        below.map(|l| &l.device),
        &strata_jobs::NoProgress,
        &cancel,
    )?;
    let name = below.map(|l| {
        std::fs::canonicalize(&l.path)
            .unwrap_or_else(|_| l.path.clone())
            .display()
            .to_string()
    });
    strata_jobs::commit::relink_above(
        image.as_ref(),
        name.as_deref(),
        below.map(|l| l.format.name()),
    )?;
    image.close()?;
    Ok(true)
}
