//! Backups read over NBD, as `strata backup create --nbd URL` / `--vm NAME`
//! and the HTTP API's backup of a running VM run them. Ranges the export's
//! `base:allocation` context reports as zeroes are never read; with a
//! `qemu:dirty-bitmap:NAME` context and a parent snapshot, only the chunks
//! (of the parent's size) the bitmap marks are read and the parent's other
//! chunks are reused. A missing context or parent, or a chunk size asked for
//! that is not the parent's, means a full read, and the caller is told why
//! through its `note` before the read starts.
//!
//! A running VM's disk is read at a point in time QEMU holds
//! (`strata_vm::backup`): the snapshot's tags name the VM, the disk and the
//! dirty bitmap that records from its point on, and the next backup of the
//! same disk takes the latest such snapshot as its parent and reads only the
//! chunks that bitmap marks.

use std::collections::BTreeSet;
use std::sync::Mutex;

use strata_jobs::{Cancel, Progress};
use strata_nbd::client::Client;
use strata_nbd::proto::{CONTEXT_BASE_ALLOCATION as BASE_ALLOCATION, STATE_ZERO};
use strata_vm::backup::BackupPoint;
use strata_vm::Manager;

use crate::chunk::{self, ChunkSize};
use crate::disk::{self, BackupOptions, BackupSummary, DiskSource, Incremental};
use crate::error::{Error, ErrorKind, Result};
use crate::id::Id;
use crate::repository::Repository;

/// The tag prefix naming an NBD export's URL.
pub const TAG_NBD: &str = "nbd:";
/// The tag prefix naming the dirty bitmap that records changes after a backup.
pub const TAG_BITMAP: &str = "bitmap:";
/// The tag prefixes of a VM disk backup.
pub const TAG_VM: &str = "vm:";
pub const TAG_DISK: &str = "disk:";

/// The context name of QEMU's dirty bitmap `name`.
pub fn bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// The contexts to ask for: allocation, and the bitmap's when there is one.
pub fn contexts(bitmap_context: Option<&str>) -> Vec<&str> {
    std::iter::once(BASE_ALLOCATION)
        .chain(bitmap_context)
        .collect()
}

/// An NBD failure as a repository error (the source's I/O failed).
fn nbd_error(what: &str, e: strata_nbd::Error) -> Error {
    Error::with_source(ErrorKind::Io, what.to_string(), e)
}

/// How an export is read.
pub struct ExportRead<'a> {
    /// The dirty bitmap context asked for, if any.
    pub bitmap_context: Option<&'a str>,
    /// The parent snapshot whose unmarked chunks are reused.
    pub parent: Option<Id>,
    /// Why everything is read even with a parent (no usable bitmap), if known.
    pub full_reason: Option<String>,
    /// What the parent's absence means, for the note.
    pub no_parent: &'a str,
    /// The chunk size asked for (else the parent's, else the default).
    pub chunk_size: Option<ChunkSize>,
}

/// Back up the export `client` is connected to: only the chunks the bitmap
/// marks when the parent and the bitmap allow it, else everything (`note`
/// is told which, and why a full read); never the ranges allocation reports
/// as zeroes.
pub fn back_up_export(
    repo: &mut Repository,
    mut client: Client,
    how: ExportRead<'_>,
    mut opts: BackupOptions,
    progress: &dyn Progress,
    cancel: &Cancel,
    note: &dyn Fn(String),
) -> Result<BackupSummary> {
    let plan = chunk::plan(repo, how.parent.as_ref(), how.chunk_size)?;
    opts.chunk_size = plan.size;
    let reason = match (how.parent, how.bitmap_context) {
        (None, _) => Some(how.no_parent.to_string()),
        (Some(_), _) if plan.full_read.is_some() => plan.full_read,
        (Some(_), Some(c)) if client.has_context(c) => None,
        (Some(_), Some(c)) => Some(format!("the server does not offer '{c}'")),
        (Some(_), None) => how.full_reason,
    };
    let size = client.size();
    match (reason, how.parent) {
        (None, Some(parent)) => {
            let context = how.bitmap_context.unwrap_or_default();
            let changed = changed_chunks(&mut client, context, plan.size)?;
            note(format!(
                "incremental: {} of {} chunks changed since snapshot {}",
                changed.len(),
                plan.size.count(size),
                parent.short()
            ));
            opts.incremental = Some(Incremental { parent, changed });
        }
        (reason, _) => {
            if let Some(r) = reason {
                note(format!("reading the whole disk: {r}"));
            }
        }
    }
    let zeroes = if client.has_context(BASE_ALLOCATION) {
        client
            .map(BASE_ALLOCATION)
            .map_err(|e| nbd_error("read the export's allocation", e))?
            .into_iter()
            .filter(|&(_, _, flags)| flags & STATE_ZERO != 0)
            .map(|(o, l, _)| (o, l))
            .collect()
    } else {
        Vec::new()
    };
    let client = Mutex::new(client);
    let src = DiskSource::from_reader_with_zeroes(
        size,
        Box::new(move |buf, offset| {
            let mut c = client.lock().map_err(|_| "the NBD connection failed")?;
            c.read(buf, offset).map_err(Into::into)
        }),
        zeroes,
    );
    disk::backup(repo, &src, &opts, progress, cancel)
}

/// The indexes of the chunks of size `cs` the dirty bitmap `context` marks anywhere.
fn changed_chunks(client: &mut Client, context: &str, cs: ChunkSize) -> Result<BTreeSet<u64>> {
    let mut out = BTreeSet::new();
    let map = client
        .map(context)
        .map_err(|e| nbd_error("read the dirty bitmap", e))?;
    for (pos, len, flags) in map {
        if flags & 1 != 0 {
            out.extend(cs.covering(pos, len));
        }
    }
    Ok(out)
}

/// A backup of one disk of a running VM.
#[derive(Debug, Clone, Default)]
pub struct VmBackup {
    pub vm: String,
    /// The disk (0 for the first).
    pub disk: usize,
    /// The parent snapshot (an ID prefix or `latest`); the latest backup of
    /// the same VM disk when `None`.
    pub parent: Option<String>,
    pub tags: Vec<String>,
    /// The chunk size asked for (else the parent's, else the default).
    pub chunk_size: Option<ChunkSize>,
}

/// Back up a disk of a running VM of `mgr` from a consistent point (see the
/// module's description); returns the options used (the snapshot's file name
/// among them) and what the backup did. A VM that is not running, is busy
/// or has no such disk fails before anything is read.
pub fn back_up_vm_disk(
    repo: &mut Repository,
    mgr: &Manager,
    args: &VmBackup,
    progress: &dyn Progress,
    cancel: &Cancel,
    note: &dyn Fn(String),
) -> Result<(BackupOptions, BackupSummary)> {
    let (vm_tag, disk_tag) = (
        format!("{TAG_VM}{}", args.vm),
        format!("{TAG_DISK}{}", args.disk),
    );
    let parent = match &args.parent {
        Some(p) => Some(repo.find_snapshot(p)?),
        None => repo
            .snapshots()?
            .into_iter()
            .rev()
            .find(|(_, s)| s.tags.contains(&vm_tag) && s.tags.contains(&disk_tag)),
    };
    let since = parent.as_ref().and_then(|(_, s)| {
        s.tags
            .iter()
            .find_map(|t| t.strip_prefix(TAG_BITMAP).map(str::to_string))
    });
    let parent_id = parent.map(|(id, _)| id);
    let read = mgr
        .backup_point(&args.vm, args.disk, since.as_deref(), |point| {
            back_up_point(repo, point, args, parent_id, progress, cancel, note)
        })
        .map_err(|e| {
            let kind = match &e {
                strata_vm::Error::Invalid(_) => ErrorKind::Invalid,
                strata_vm::Error::NoSuchVm(_) => ErrorKind::NotFound,
                strata_vm::Error::Busy(_) => ErrorKind::Locked,
                _ => ErrorKind::Io,
            };
            Error::with_source(kind, format!("back up VM '{}'", args.vm), e)
        })?;
    read
}

/// Read the point through its export: only the changed chunks when the
/// parent and the bitmap of changes allow it, else everything. The snapshot
/// is tagged with the VM, the disk and the bitmap recording from this point.
fn back_up_point(
    repo: &mut Repository,
    point: &BackupPoint,
    args: &VmBackup,
    parent: Option<Id>,
    progress: &dyn Progress,
    cancel: &Cancel,
    note: &dyn Fn(String),
) -> Result<(BackupOptions, BackupSummary)> {
    let context = point.changes.as_deref().map(bitmap_context);
    let client = Client::connect_unix(&point.socket, &point.export, &contexts(context.as_deref()))
        .map_err(|e| nbd_error("connect to the VM disk's export", e))?;
    if client.size() != point.size {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "the export shows {} bytes where the disk has {}",
                client.size(),
                point.size
            ),
        ));
    }
    let mut opts = BackupOptions::for_image(&point.disk_file);
    opts.tags = args.tags.clone();
    opts.tags.extend([
        format!("{TAG_VM}{}", args.vm),
        format!("{TAG_DISK}{}", args.disk),
    ]);
    if let Some(b) = &point.bitmap {
        opts.tags.push(format!("{TAG_BITMAP}{b}"));
    }
    opts.parent = parent;
    let how = ExportRead {
        bitmap_context: context.as_deref(),
        parent,
        full_reason: point.full_reason.clone(),
        no_parent: "there is no previous backup of this disk",
        chunk_size: args.chunk_size,
    };
    let s = back_up_export(repo, client, how, opts.clone(), progress, cancel, note)?;
    Ok((opts, s))
}
