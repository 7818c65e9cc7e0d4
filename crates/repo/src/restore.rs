//! Restore a snapshot's disk (strata's fixed chunks, or any single file restic
//! backed up) to a sparse raw file or a qcow2 image. Every blob is authenticated
//! and checked against its hash before a byte of it is written; a failure stops
//! the restore, names the blob and the file offset, and removes the output.

use crate::disk::zero_id;
use crate::error::{Error, ErrorKind, Result};
use crate::pack::BlobType;
use crate::repository::Repository;
use crate::tree::{Node, Snapshot};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use strata_format::{BlockDevice, Format};
use strata_jobs::{Cancel, Progress};

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

fn write_content(
    repo: &Repository,
    node: &Node,
    target: &Target,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<RestoreSummary> {
    progress.set_total(node.size);
    let mut zeros = HashMap::new();
    let mut offset = 0u64;
    let mut written = 0u64;
    let at = |offset: u64| format!("restoring '{}' at file offset {offset}", node.name);
    for id in node.content.iter().flatten() {
        if cancel.is_cancelled() {
            return Err(Error::new(ErrorKind::Cancelled, "restore cancelled"));
        }
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
        if *id != zero_id(&mut zeros, len) {
            let data = repo
                .load_blob(BlobType::Data, id)
                .map_err(|e| e.wrap(at(offset)))?;
            if data.iter().any(|&b| b != 0) {
                target.write(&data, offset)?;
                written += len;
            }
        }
        progress.advance(len);
        offset = end;
    }
    if offset != node.size {
        return Err(Error::corrupt(format!(
            "'{}': its blobs hold {offset} bytes, the snapshot says {}",
            node.name, node.size
        )));
    }
    Ok(RestoreSummary {
        size: node.size,
        bytes_written: written,
    })
}
