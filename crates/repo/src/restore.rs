//! Restore a snapshot's disk (strata's fixed chunks, or any single file restic
//! backed up) to a sparse raw file or a qcow2 image. Every blob is authenticated
//! and checked against its hash before a byte of it is written; a failure stops
//! the restore, names the blob and the file offset, and removes the output.
//! Workers (twice the cores, at most eight) read, check and write blobs at once,
//! each into buffers of its own reused from blob to blob. A new raw output is
//! sized once (unwritten ranges stay holes: zero blobs are never written). A raw
//! output, new or existing (a file or a block device), is written where it can
//! be with direct I/O, so the page cache neither copies the data nor holds it
//! for writeback; one sync at the end makes it durable. In an existing raw
//! output the disk's zero ranges are discarded (a hole punched, or zeroes
//! written where the file system or device cannot punch one): they read as
//! zeroes and take no space, as in a new file.

use crate::disk::zero_id;
use crate::error::{Error, ErrorKind, Result};
use crate::id::Id;
use crate::pack::BlobType;
use crate::repository::Repository;
use crate::scratch::{BlobScratch, ALIGN};
use crate::tree::{Node, Snapshot};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use strata_format::qcow2::Qcow2Image;
use strata_format::{BlockDevice, Format};
use strata_jobs::{Cancel, Progress};
use strata_storage::{sync, Storage};

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
    /// A raw file or device, with a second descriptor for direct I/O when the
    /// file system allows it.
    Raw {
        file: File,
        direct: Option<File>,
        /// An existing output's storage as the engine opened it: it holds the
        /// image's lock and discards the disk's zero ranges. `None` for a new
        /// file, which reads as zeroes wherever nothing is written.
        existing: Option<Arc<dyn Storage>>,
    },
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
                Ok(Target::Raw {
                    file: f,
                    direct: open_direct(path),
                    existing: None,
                })
            }
            // A new encrypted image needs a secret a restore is not given.
            Format::Luks => Err(Error::new(
                ErrorKind::Unsupported,
                "a restore writes raw or qcow2 images, not luks",
            )),
            Format::Qcow2
            | Format::Vpc
            | Format::Vdi
            | Format::Vhdx
            | Format::Vmdk
            | Format::Qed
            | Format::Parallels => {
                strata_jobs::create::prepare(&strata_jobs::create::CreateRequest {
                    path: path.to_path_buf(),
                    format,
                    size: Some(size),
                    options: BTreeMap::new(),
                    unsafe_backing: false,
                })?
                .create()?;
                let dev = strata_chain::open_image(path, format, true, false)?;
                // A new output is removed when the restore fails, so a crash
                // midway leaves nothing anyone uses: its metadata writes keep
                // their order but are flushed once, by `finish` (not before
                // every L2 update), and its data clusters are allocated in
                // bulk, as convert does for a new target.
                if let Some(q) = dev.as_any().downcast_ref::<Qcow2Image>() {
                    q.set_write_barriers(false)?;
                    q.set_falloc_new_clusters(true);
                }
                Ok(Target::Image(dev))
            }
        }
    }

    /// The existing image at `path` (format probed), writable, at least `end`
    /// bytes. A raw image whose file the engine opened plainly is written
    /// through that file (direct I/O where allowed), under the engine's lock.
    fn open_existing(path: &Path, end: u64) -> Result<Target> {
        let chain = strata_chain::open(&strata_chain::OpenSpec::new(path).write(true))?;
        let dev = chain.top().clone();
        if dev.virtual_size() < end {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "'{}' is {} bytes, too small for the disk's bytes up to offset {end}",
                    path.display(),
                    dev.virtual_size()
                ),
            ));
        }
        if dev.format_name() == "raw" {
            if let Some(storage) = dev.host_file() {
                if let Some(f) = storage.file() {
                    let file = f.try_clone().map_err(|e| {
                        Error::io(format!("could not open '{}'", path.display()), e)
                    })?;
                    // The very file the engine locked, opened again.
                    let direct =
                        open_direct(Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())));
                    return Ok(Target::Raw {
                        file,
                        direct,
                        existing: Some(storage.clone()),
                    });
                }
            }
        }
        Ok(Target::Image(dev))
    }

    /// Make `len` bytes at `offset` read as zeroes, freeing their space where
    /// the output can.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            Target::Raw {
                existing: Some(s), ..
            } => Ok(s.discard(offset, len).map_err(strata_format::Error::from)?),
            Target::Raw { existing: None, .. } => Ok(()),
            Target::Image(d) => Ok(d.write_zeroes(offset, len, false)?),
        }
    }

    /// Write `buf` at `offset`: straight to the disk, past the page cache, when
    /// the output allows direct I/O and `buf` and `offset` are aligned for it
    /// (the 4 MiB chunks of strata's disks are), through the page cache otherwise.
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let err = |e| Error::io(format!("could not write at offset {offset}"), e);
        match self {
            Target::Raw { file, direct, .. } => {
                if let Some(d) = direct.as_ref().filter(|_| direct_aligned(buf, offset)) {
                    match d.write_all_at(buf, offset) {
                        // A file system may still refuse some direct write.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                        r => return r.map_err(err),
                    }
                }
                file.write_all_at(buf, offset).map_err(err)
            }
            Target::Image(d) => Ok(d.write(buf, offset)?),
        }
    }

    /// Make everything written durable: one sync of the file (direct writes
    /// included: they may still sit in the disk's cache, and the file's block
    /// map is metadata).
    fn finish(self) -> Result<()> {
        match self {
            Target::Raw { file, .. } => file
                .sync_all()
                .map_err(|e| Error::io("could not sync the output", e)),
            Target::Image(d) => Ok(d.flush()?),
        }
    }
}

/// `path` opened again for direct I/O (`O_DIRECT`), or `None` where the file
/// system does not offer it.
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Whether a write of `buf` at `offset` meets direct I/O's alignment.
fn direct_aligned(buf: &[u8], offset: u64) -> bool {
    let a = ALIGN as u64;
    offset.is_multiple_of(a)
        && (buf.len() as u64).is_multiple_of(a)
        && (buf.as_ptr() as usize).is_multiple_of(ALIGN)
}

/// Where and what to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The format of a new output (ignored with `existing`).
    pub format: Format,
    /// Only this byte range of the disk (`offset..offset+length`); the whole disk
    /// when `None`.
    pub range: Option<(u64, u64)>,
    /// Write into the existing image at `output` (format probed, its chain left
    /// as is) at the disk's own offsets, zeroes included, instead of creating a
    /// new file. A new file holds just the range, from its offset 0.
    pub existing: bool,
}

impl RestoreOptions {
    /// The whole disk to a new image of `format`.
    pub fn new(format: Format) -> Self {
        RestoreOptions {
            format,
            range: None,
            existing: false,
        }
    }
}

/// Restore the disk of `snap` to `output` (created or truncated) as `format`,
/// under a shared lock.
pub fn restore(
    repo: &mut Repository,
    snap: &Snapshot,
    output: &Path,
    format: Format,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<RestoreSummary> {
    restore_with(
        repo,
        snap,
        output,
        &RestoreOptions::new(format),
        progress,
        cancel,
    )
}

/// Restore the disk of `snap`, or a range of it, to a new file or into an
/// existing image, under a shared lock (the index is read again once it is
/// held, so packs a gc rewrote before are found where they are now). A new
/// output is removed when the restore fails; an existing image is left with
/// whatever was written before the failure, and the error says so.
pub fn restore_with(
    repo: &mut Repository,
    snap: &Snapshot,
    output: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<RestoreSummary> {
    // A shared lock keeps a pruning process from removing packs being read.
    let lock = crate::lock::Lock::acquire(repo, false)?;
    repo.reload_index()?;
    let node = disk_node(repo, snap)?;
    let (start, len) = match opts.range {
        None => (0, node.size),
        Some((offset, length)) => {
            if offset.checked_add(length).is_none_or(|e| e > node.size) || length == 0 {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!(
                        "the range of {length} bytes at offset {offset} is empty or not inside the {}-byte disk",
                        node.size
                    ),
                ));
            }
            (offset, length)
        }
    };
    let window = Window {
        start,
        end: start + len,
        shift: if opts.existing { 0 } else { start },
        write_zeroes: opts.existing,
    };
    let target = if opts.existing {
        Target::open_existing(output, window.end)?
    } else {
        Target::create(output, opts.format, len)?
    };
    let result = write_content(repo, &node, &target, &window, progress, cancel)
        .and_then(|s| target.finish().map(|_| s));
    match &result {
        Err(_) if !opts.existing => {
            let _ = std::fs::remove_file(output);
        }
        _ => {}
    }
    lock.release()?;
    result.map_err(|e| {
        if opts.existing {
            e.wrap(format_args!(
                "'{}' was only partly restored",
                output.display()
            ))
        } else {
            e
        }
    })
}

/// The part of the disk restored and where it goes in the output.
struct Window {
    start: u64,
    end: u64,
    /// Subtracted from a disk offset to give the output offset.
    shift: u64,
    /// Write zero ranges (the output holds other data there) rather than leave holes.
    write_zeroes: bool,
}

/// One blob of a file: where it lies in the file and whether it is zeroes.
#[derive(Debug, Clone, Copy)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
    pub id: Id,
    /// Named by the hash of zeroes: a hole, nothing to read.
    pub zero: bool,
}

impl Piece {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Where each blob of `node` lies in the file, with every blob located in the
/// index and the lengths adding up to the file's size (else a `Corrupt` error
/// naming the blob and the offset).
pub fn layout(repo: &Repository, node: &Node) -> Result<Vec<Piece>> {
    let at = |offset: u64| format!("'{}' at file offset {offset}", node.name);
    let mut zeros = HashMap::new();
    let mut offset = 0u64;
    let mut out = Vec::new();
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
        out.push(Piece {
            offset,
            len,
            id: *id,
            zero: *id == zero_id(&mut zeros, len),
        });
        offset = end;
    }
    if offset != node.size {
        return Err(Error::corrupt(format!(
            "'{}': its blobs hold {offset} bytes, the snapshot says {}",
            node.name, node.size
        )));
    }
    Ok(out)
}

/// Blobs read, checked and written at once, at most.
const MAX_WORKERS: usize = 8;

fn write_content(
    repo: &Repository,
    node: &Node,
    target: &Target,
    window: &Window,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<RestoreSummary> {
    progress.set_total(window.end - window.start);
    let at = |offset: u64| format!("restoring '{}' at file offset {offset}", node.name);
    // Plan first: every blob located and the sizes adding up before a byte is written.
    let mut jobs = Vec::new();
    let mut zero_ranges = Vec::new();
    for piece in layout(repo, node)? {
        let (a, b) = (piece.offset.max(window.start), piece.end().min(window.end));
        if a < b {
            if piece.zero {
                zero_ranges.push((a, b));
            } else {
                jobs.push(Job {
                    blob_offset: piece.offset,
                    id: piece.id,
                    from: a,
                    to: b,
                });
            }
        }
    }
    for (a, b) in zero_ranges {
        if window.write_zeroes {
            target
                .write_zeroes(a - window.shift, b - a)
                .map_err(|e| e.wrap(at(a)))?;
        }
        progress.advance(b - a);
    }
    let next = AtomicUsize::new(0);
    let written = AtomicU64::new(0);
    // The failure at the lowest offset, if any; it stops every worker.
    let failed: Mutex<Option<(u64, Error)>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    // Twice the cores: a worker waiting for its direct write leaves its core
    // to another one's decryption.
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get() * 2)
        .clamp(2, MAX_WORKERS);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut scratch = BlobScratch::new();
                while !stop.load(Ordering::Relaxed) {
                    let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
                    let offset = job.blob_offset;
                    let r = if cancel.is_cancelled() {
                        Err(Error::new(ErrorKind::Cancelled, "restore cancelled"))
                    } else {
                        restore_blob(repo, target, job, window, &mut scratch)
                            .map_err(|e| e.wrap(at(offset)))
                    };
                    match r {
                        Ok(n) => {
                            written.fetch_add(n, Ordering::Relaxed);
                            progress.advance(job.to - job.from);
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
        size: window.end - window.start,
        bytes_written: written.into_inner(),
    })
}

/// One blob to restore: where it starts in the disk and the part of it wanted.
struct Job {
    blob_offset: u64,
    id: Id,
    from: u64,
    to: u64,
}

/// Load, authenticate and hash-check the job's blob, then write the wanted part
/// of it (zeroes only when the window asks for them); the bytes written.
fn restore_blob(
    repo: &Repository,
    target: &Target,
    job: &Job,
    window: &Window,
    scratch: &mut BlobScratch,
) -> Result<u64> {
    let data = repo.load_blob_into(BlobType::Data, &job.id, scratch)?;
    let part = data
        .get((job.from - job.blob_offset) as usize..(job.to - job.blob_offset) as usize)
        .ok_or_else(|| {
            Error::corrupt(format!(
                "blob {}: holds {} bytes, fewer than the index says",
                job.id,
                data.len()
            ))
        })?;
    let out = job.from - window.shift;
    if part.iter().all(|&b| b == 0) {
        if window.write_zeroes {
            target.write_zeroes(out, part.len() as u64)?;
        }
        return Ok(0);
    }
    target.write(part, out)?;
    Ok(part.len() as u64)
}
