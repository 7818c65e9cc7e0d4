//! Restore a snapshot's disk (strata's fixed chunks, or any single file restic
//! backed up) to a sparse raw file or a qcow2 image. Every blob is authenticated
//! and checked against its hash before a byte of it is written; a failure stops
//! the restore, names the blob and the file offset, and removes the output.
//! Up to four workers read, check and write blobs at once.

use crate::disk::zero_id;
use crate::error::{Error, ErrorKind, Result};
use crate::id::Id;
use crate::pack::BlobType;
use crate::repository::Repository;
use crate::tree::{Node, Snapshot};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use strata_format::{BlockDevice, Format};
use strata_jobs::{Cancel, Progress};
use strata_storage::sync;

/// The single file a snapshot holds (a disk), found through its directories.
pub fn disk_node(repo: &Repository, snap: &Snapshot) -> Result<Node> {
    let mut files = Vec::new();
    let mut trees = vec![snap.tree];
    while let Some(t) = trees.pop() {
        for node in repo.load_tree(&t)?.nodes {
            match node.kind.as_str() {
                "file" => files.push(node),
                "dir" => trees.extend(node.subtree),
                _ => {}
            }
        }
    }
    match files.len() {
        1 => Ok(files.pop().expect("one file")),
        n => Err(Error::new(
            ErrorKind::Invalid,
            format!("the snapshot holds {n} files; a disk snapshot holds exactly one"),
        )),
    }
}

/// What a restore wrote.
#[derive(Debug, Clone, Copy)]
pub struct RestoreSummary {
    pub size: u64,
    /// Bytes written (the rest of the disk is holes or unallocated clusters).
    pub bytes_written: u64,
}

enum Target {
    Raw(File),
    Image(Arc<dyn BlockDevice>),
}

impl Target {
    fn create(path: &Path, format: Format, size: u64) -> Result<Target> {
        match format {
            Format::Raw => {
                let f = File::create(path)
                    .map_err(|e| Error::io(format!("could not create '{}'", path.display()), e))?;
                f.set_len(size)
                    .map_err(|e| Error::io(format!("could not size '{}'", path.display()), e))?;
                Ok(Target::Raw(f))
            }
            Format::Qcow2 => {
                strata_jobs::create::prepare(&strata_jobs::create::CreateRequest {
                    path: path.to_path_buf(),
                    format,
                    size: Some(size),
                    options: BTreeMap::new(),
                    unsafe_backing: false,
                })?
                .create()?;
                Ok(Target::Image(strata_chain::open_image(
                    path, format, true, false,
                )?))
            }
        }
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Target::Raw(f) => f
                .write_all_at(buf, offset)
                .map_err(|e| Error::io(format!("could not write at offset {offset}"), e)),
            Target::Image(d) => Ok(d.write(buf, offset)?),
        }
    }

    fn finish(self) -> Result<()> {
        match self {
            Target::Raw(f) => f
                .sync_all()
                .map_err(|e| Error::io("could not sync the output", e)),
            Target::Image(d) => Ok(d.flush()?),
        }
    }
}

/// Restore the disk of `snap` to `output` (created or truncated) as `format`,
/// under a shared lock.
pub fn restore(
    repo: &Repository,
    snap: &Snapshot,
    output: &Path,
    format: Format,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<RestoreSummary> {
    // A shared lock keeps a pruning process from removing packs being read.
    let lock = crate::lock::Lock::acquire(repo, false)?;
    let node = disk_node(repo, snap)?;
    let target = Target::create(output, format, node.size)?;
    let result = write_content(repo, &node, &target, progress, cancel)
        .and_then(|s| target.finish().map(|_| s));
    if result.is_err() {
        let _ = std::fs::remove_file(output);
    }
    lock.release()?;
    result
}

/// Blobs read, checked and written at once, at most.
const MAX_WORKERS: usize = 4;

fn write_content(
    repo: &Repository,
    node: &Node,
    target: &Target,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<RestoreSummary> {
    progress.set_total(node.size);
    let at = |offset: u64| format!("restoring '{}' at file offset {offset}", node.name);
    // Plan first: every blob located and the sizes adding up before a byte is written.
    let mut zeros = HashMap::new();
    let mut offset = 0u64;
    let mut jobs = Vec::new();
    for id in node.content.iter().flatten() {
        let loc = repo.index().get(BlobType::Data, id).ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("{}: blob {id} is missing from the repository", at(offset)),
            )
        })?;
        let len = loc.plain_length();
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= node.size)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "{}: blob {id} reaches past the file's size {}",
                    at(offset),
                    node.size
                ))
            })?;
        // A blob named by the hash of zeroes is zeroes: a hole, nothing to read.
        if *id == zero_id(&mut zeros, len) {
            progress.advance(len);
        } else {
            jobs.push((offset, *id, len));
        }
        offset = end;
    }
    if offset != node.size {
        return Err(Error::corrupt(format!(
            "'{}': its blobs hold {offset} bytes, the snapshot says {}",
            node.name, node.size
        )));
    }
    let next = AtomicUsize::new(0);
    let written = AtomicU64::new(0);
    // The failure at the lowest offset, if any; it stops every worker.
    let failed: Mutex<Option<(u64, Error)>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_WORKERS);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let Some(&(offset, id, len)) = jobs.get(next.fetch_add(1, Ordering::Relaxed))
                    else {
                        return;
                    };
                    let r = if cancel.is_cancelled() {
                        Err(Error::new(ErrorKind::Cancelled, "restore cancelled"))
                    } else {
                        restore_blob(repo, target, &id, offset).map_err(|e| e.wrap(at(offset)))
                    };
                    match r {
                        Ok(n) => {
                            written.fetch_add(n, Ordering::Relaxed);
                            progress.advance(len);
                        }
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            let mut f = sync::lock(&failed);
                            if f.as_ref().is_none_or(|(o, _)| offset < *o) {
                                *f = Some((offset, e));
                            }
                        }
                    }
                }
            });
        }
    });
    if let Some((_, e)) = sync::into_inner(failed) {
        return Err(e);
    }
    Ok(RestoreSummary {
        size: node.size,
        bytes_written: written.into_inner(),
    })
}

/// Load, authenticate and hash-check blob `id`, then write it at `offset` unless it
/// is all zeroes; the bytes written.
fn restore_blob(repo: &Repository, target: &Target, id: &Id, offset: u64) -> Result<u64> {
    let data = repo.load_blob(BlobType::Data, id)?;
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    target.write(&data, offset)?;
    Ok(data.len() as u64)
}
