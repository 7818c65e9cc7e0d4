//! Disk backup: a disk image becomes one file node of a snapshot whose content is
//! fixed chunks at fixed offsets (the last one shorter; [`ChunkSize`], 4 MiB
//! unless the backup asks for another size or its parent has one), each a data
//! blob named by the SHA-256 of its plaintext. Ranges the image's block status
//! reports as zeroes are never read; an all-zero chunk is the one shared zero blob.
//! An incremental backup reuses the parent snapshot's blob of every chunk not
//! named as changed, without reading it.
//!
//! Where the bytes go, measured on the backup benchmark's 4 GiB image (40 %
//! random, 30 % text, 30 % zeroes) against restic 0.14: the full backups
//! reference the same 1.607 GiB (random data is stored as it is by both, the
//! zero chunks are one blob, the text compresses to about 7.5 MB at zstd level
//! 3; level 19 would save 2.6 MB of it at several times the time), so the
//! fixed chunks cost nothing there. The incremental after 81 scattered 1 MiB
//! runs of new random data (39 in the random part, 18 in the text, 24 in the
//! zeroes) adds 209 MB against restic's 166 MB: each run inside random data
//! makes a whole new 4 MiB chunk (incompressible, 4 MiB stored: 156 MiB for
//! the 39), where restic's content-defined chunks (about 1 MiB on average)
//! store about 3 MiB around a run (about 116 MiB); runs in text or zeroes
//! cost both about the MiB written. No encoding restic reads can store such a
//! chunk in less (a blob is compressed on its own, without reference to the
//! parent's blob), and index, tree and snapshot files are a few KB, smaller
//! than restic's; so strata's repository stays about 40 MiB (2 %) larger after
//! that incremental, and only smaller blobs would remove it. The choice is to
//! keep one 4 MiB blob per chunk: a disk offset maps to its blob without
//! reading others (range restores, `serve`), a dirty bitmap's chunk is one
//! blob, and the index stays small; changes in compressible or zero regions
//! cost nothing extra (their chunks shrink to the new data). At 1 GiB, whose
//! 20 runs fall 12 in random data, the two repositories are the same size.
//! Where changes are small runs in incompressible data, a backup can ask for
//! smaller chunks ([`BackupOptions::chunk_size`]): with 1 MiB chunks the same
//! 4 GiB benchmark's repository was 0.95 of restic's (1728 MiB against 1822),
//! with 4 MiB chunks 1.01, and the 1 MiB backups took no longer.
//!
//! Workers (twice the cores, at most four) read, hash, compress and seal chunks
//! at once, each with its own buffer and zstd context reused from chunk to
//! chunk; the chunks are stored in disk order, at most one per worker and two
//! more ahead of the next one stored.

use crate::chunk::{fixed_chunk_size, ChunkSize};
use crate::error::{Error, ErrorKind, Result};
use crate::id::Id;
use crate::index::IndexFile;
use crate::lock::Lock;
use crate::pack::BlobType;
use crate::repository::Repository;
use crate::time::Timestamp;
use crate::tree::{Node, Snapshot, Tree};
use crate::writer::{BlobSaver, PreparedBlob, Preparer, SaveStats, DEFAULT_PACK_SIZE};
use crate::{host, restore};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::{mpsc, Mutex};
use strata_format::{BlockDevice, Format};
use strata_jobs::status::{ChainStatus, Walk};
use strata_jobs::{Cancel, Progress};
use strata_storage::sync;

/// The default chunk size of disk backups ([`ChunkSize::DEFAULT`]), the one
/// disks streamed into a repository are cut in.
pub const CHUNK_SIZE: u64 = ChunkSize::DEFAULT.bytes();

/// Reads a disk's bytes at an offset: a source that is not an image chain
/// (a point-in-time export of a running VM read over NBD).
pub type ReadAt = dyn Fn(&mut [u8], u64) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>
    + Send
    + Sync;

/// A disk to back up: its guest view and the block status of its chain.
pub struct DiskSource {
    inner: Source,
}

enum Source {
    Chain {
        status: ChainStatus,
        reader: Arc<dyn BlockDevice>,
    },
    /// Every byte asked for is read but in the ranges known to read as zeroes
    /// (all-zero chunks still become the shared zero blob).
    Plain {
        size: u64,
        read: Box<ReadAt>,
        /// Sorted, disjoint (offset, length) ranges that read as zeroes.
        zeroes: Vec<(u64, u64)>,
    },
}

impl DiskSource {
    /// Open the image at `path` (format probed when `None`) with its backing chain,
    /// read-only; `force_share` reads an image another process holds for writing.
    /// Without it, nobody may write or resize the files while they are read, raw
    /// images included (a backup must not mix two states of a disk).
    pub fn open(path: &Path, format: Option<Format>, force_share: bool) -> Result<DiskSource> {
        let chain = strata_chain::open(
            &strata_chain::OpenSpec::new(path)
                .format(format)
                .force_share(force_share)
                .no_share(true),
        )?;
        Ok(DiskSource {
            inner: Source::Chain {
                status: ChainStatus::new(&chain)?,
                reader: chain.reader(),
            },
        })
    }

    /// A source from an already opened stack of devices, top first.
    pub fn from_devices(devices: Vec<Arc<dyn BlockDevice>>) -> Result<DiskSource> {
        let reader = devices[0].clone();
        Ok(DiskSource {
            inner: Source::Chain {
                status: ChainStatus::from_devices(devices)?,
                reader,
            },
        })
    }

    /// A source of `size` bytes read through `read`, which may be called from
    /// several threads at once.
    pub fn from_reader(size: u64, read: Box<ReadAt>) -> DiskSource {
        DiskSource {
            inner: Source::Plain {
                size,
                read,
                zeroes: Vec::new(),
            },
        }
    }

    /// [`DiskSource::from_reader`] that never reads the `zeroes` ranges
    /// ((offset, length), as a block status reports them: in any order,
    /// adjacent or overlapping ones allowed).
    pub fn from_reader_with_zeroes(
        size: u64,
        read: Box<ReadAt>,
        mut zeroes: Vec<(u64, u64)>,
    ) -> DiskSource {
        zeroes.retain(|&(_, len)| len > 0);
        zeroes.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(zeroes.len());
        for (o, l) in zeroes {
            let end = o.saturating_add(l).min(size);
            match merged.last_mut() {
                Some((mo, ml)) if *mo + *ml >= o => *ml = (*ml).max(end - *mo),
                _ if o < size => merged.push((o, end - o)),
                _ => {}
            }
        }
        DiskSource {
            inner: Source::Plain {
                size,
                read,
                zeroes: merged,
            },
        }
    }

    pub fn size(&self) -> u64 {
        match &self.inner {
            Source::Chain { status, .. } => status.virtual_size(),
            Source::Plain { size, .. } => *size,
        }
    }

    /// Fill `buf` with the disk's bytes at `offset`, reading only ranges that are
    /// not known to be zero; returns the bytes read (0: the range is all zeroes).
    fn read_chunk(&self, buf: &mut [u8], offset: u64) -> Result<u64> {
        let (status, reader) = match &self.inner {
            Source::Chain { status, reader } => (status, reader),
            Source::Plain { read, zeroes, .. } => return read_around(buf, offset, read, zeroes),
        };
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        let mut read = 0;
        while pos < end {
            let st = status.status(pos, end - pos, Walk::DataOrZero)?;
            let at = (pos - offset) as usize;
            let part = &mut buf[at..at + st.len as usize];
            if st.zero {
                part.fill(0);
            } else {
                reader.read(part, pos)?;
                read += st.len;
            }
            pos += st.len;
        }
        Ok(read)
    }
}

/// Fill `buf` with the bytes at `offset` through `read`, skipping (zero-filling)
/// the parts inside `zeroes`; the bytes read.
fn read_around(buf: &mut [u8], offset: u64, read: &ReadAt, zeroes: &[(u64, u64)]) -> Result<u64> {
    let end = offset + buf.len() as u64;
    // The first zero range that ends after `offset`.
    let mut z = zeroes.partition_point(|&(o, l)| o + l <= offset);
    let mut pos = offset;
    let mut done = 0;
    while pos < end {
        let (zo, zl) = zeroes.get(z).copied().unwrap_or((end, 0));
        let at = (pos - offset) as usize;
        if zo <= pos {
            let stop = (zo + zl).min(end);
            buf[at..(stop - offset) as usize].fill(0);
            pos = stop;
            z += 1;
        } else {
            let stop = zo.min(end);
            read(&mut buf[at..(stop - offset) as usize], pos)
                .map_err(|e| Error::with_source(ErrorKind::Io, "reading the source", e))?;
            done += stop - pos;
            pos = stop;
        }
    }
    Ok(done)
}

/// The changed chunks an incremental backup must read; every other chunk reuses
/// the parent snapshot's blob.
#[derive(Debug, Clone)]
pub struct Incremental {
    /// The parent snapshot (its disk must have the same size).
    pub parent: Id,
    /// Indexes of the chunks that may have changed since the parent, in the
    /// parent's chunk size (which the backup's [`BackupOptions::chunk_size`]
    /// must be).
    pub changed: BTreeSet<u64>,
}

/// How to back up a disk.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The file name of the disk in the snapshot.
    pub name: String,
    /// The path recorded in the snapshot's `paths`.
    pub path: String,
    pub tags: Vec<String>,
    /// The parent recorded in the snapshot (without `incremental`, everything is read).
    pub parent: Option<Id>,
    pub incremental: Option<Incremental>,
    /// The size of the chunks the disk is cut into (an incremental's must be
    /// its parent's: [`crate::chunk::plan`] finds it). A stream
    /// ([`crate::stream`]) is always cut in [`CHUNK_SIZE`] chunks.
    pub chunk_size: ChunkSize,
    pub pack_size: usize,
}

impl BackupOptions {
    /// Options for the image at `path`: its file name and absolute path.
    pub fn for_image(path: &Path) -> Self {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        BackupOptions {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "disk".into()),
            path: abs.display().to_string(),
            tags: Vec::new(),
            parent: None,
            incremental: None,
            chunk_size: ChunkSize::DEFAULT,
            pack_size: DEFAULT_PACK_SIZE,
        }
    }
}

/// What a backup did.
#[derive(Debug, Clone)]
pub struct BackupSummary {
    pub snapshot: Id,
    pub size: u64,
    pub chunk_size: ChunkSize,
    pub chunks: u64,
    /// Chunks that read as zeroes (never read).
    pub zero_chunks: u64,
    /// Chunks taken from the parent without reading.
    pub reused_chunks: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    pub saved: SaveStats,
    /// Why a backup with a parent read everything, when its caller knows.
    pub full_read: Option<String>,
    /// The persistent bitmap of the image cleared once the snapshot was
    /// stored ([`crate::image_bitmap`]).
    pub bitmap_cleared: Option<String>,
}

/// The blob ID of `len` zero bytes.
pub(crate) fn zero_id(cache: &mut HashMap<u64, Id>, len: u64) -> Id {
    *cache
        .entry(len)
        .or_insert_with(|| Id::hash(&vec![0u8; len as usize]))
}

/// Save the zero blob of a `len`-byte chunk unless it is stored; its ID.
pub(crate) fn save_zero_chunk(
    saver: &mut BlobSaver,
    zeros: &mut HashMap<u64, Id>,
    len: u64,
) -> Result<Id> {
    let id = zero_id(zeros, len);
    if !saver.has(BlobType::Data, &id) {
        saver.save(BlobType::Data, id, &vec![0u8; len as usize])?;
    }
    Ok(id)
}

/// Hash the chunk `plain` and, if the repository lacks it, compress and seal
/// it (with the thread's `preparer`, made on first use).
pub(crate) fn prepare_data(
    repo: &Repository,
    plain: &[u8],
    preparer: &mut Option<Preparer>,
) -> Result<(Id, Option<PreparedBlob>)> {
    let id = Id::hash(plain);
    if repo.index().contains(BlobType::Data, &id) {
        return Ok((id, None));
    }
    let p = match preparer {
        Some(p) => p,
        None => preparer.insert(Preparer::new()?),
    };
    Ok((id, Some(p.prepare(repo.key(), id, plain)?)))
}

/// The last steps of every disk backup: store the tree of a disk of `size`
/// bytes whose chunks are the blobs `content`, write the packs and then their
/// index files. Returns the index documents, the totals and the snapshot
/// document, which the caller stores once it has added the documents to its
/// index.
pub(crate) fn finish_disk(
    mut saver: BlobSaver,
    opts: &BackupOptions,
    size: u64,
    content: Vec<Id>,
) -> Result<(Vec<IndexFile>, SaveStats, Snapshot)> {
    let now = Timestamp::now().rfc3339();
    let tree = Tree {
        nodes: vec![Node {
            name: opts.name.clone(),
            kind: "file".into(),
            mode: 0o644,
            mtime: now.clone(),
            atime: now.clone(),
            ctime: now.clone(),
            uid: host::uid(),
            gid: host::gid(),
            user: host::username(),
            group: String::new(),
            inode: 0,
            size,
            links: 1,
            content: Some(content),
            subtree: None,
        }],
    };
    let tree_bytes = tree.to_bytes();
    let tree_id = Id::hash(&tree_bytes);
    saver.save(BlobType::Tree, tree_id, &tree_bytes)?;
    let (indexes, saved) = saver.finish()?;
    let snapshot = Snapshot {
        time: now,
        parent: opts
            .parent
            .or_else(|| opts.incremental.as_ref().map(|i| i.parent)),
        tree: tree_id,
        paths: vec![opts.path.clone()],
        hostname: host::hostname(),
        username: host::username(),
        uid: host::uid(),
        gid: host::gid(),
        tags: opts.tags.clone(),
        original: None,
    };
    Ok((indexes, saved, snapshot))
}

/// Back up `src` into `repo` as a new snapshot, under a shared lock (the index is
/// read again once the lock is held).
pub fn backup(
    repo: &mut Repository,
    src: &DiskSource,
    opts: &BackupOptions,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<BackupSummary> {
    let size = src.size();
    let cs = opts.chunk_size;
    let nchunks = cs.count(size);
    // The lock first, then the index: a gc that finished before the lock was
    // taken may have removed blobs the index loaded at open still names, and the
    // backup must not take such a blob as stored.
    let mut lock = Lock::acquire(repo, false)?;
    repo.reload_index()?;
    let reuse = match &opts.incremental {
        Some(inc) => Some((parent_content(repo, &inc.parent, size, cs)?, &inc.changed)),
        None => None,
    };
    progress.set_total(size);
    let repo_ro: &Repository = repo;
    let mut saver = BlobSaver::new(repo_ro, opts.pack_size);
    let mut zeros = HashMap::new();
    let mut content = Vec::with_capacity(nchunks as usize);
    let (mut zero_chunks, mut reused_chunks, mut bytes_read) = (0, 0, 0);
    // More workers than cores, so one waiting for the source keeps no core idle.
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get() * 2)
        .clamp(2, MAX_WORKERS);
    let (job_tx, job_rx) = mpsc::channel::<u64>();
    let job_rx = Mutex::new(job_rx);
    std::thread::scope(|scope| -> Result<()> {
        // Owned here, so leaving this closure (also on an error) stops the workers.
        let job_tx = job_tx;
        let (res_tx, res_rx) = mpsc::channel::<(u64, Result<Chunk>)>();
        for _ in 0..workers {
            let (job_rx, res_tx) = (&job_rx, res_tx.clone());
            let reuse = &reuse;
            scope.spawn(move || {
                let mut buf = Vec::new();
                let mut preparer = None;
                loop {
                    let Ok(i) = sync::lock(job_rx).recv() else {
                        return;
                    };
                    let reused = reuse
                        .as_ref()
                        .filter(|(_, changed)| !changed.contains(&i))
                        .map(|(parent, _)| parent[i as usize]);
                    let r = match reused {
                        Some(id) => Ok(Chunk::Reused(id)),
                        None => prepare_chunk(repo_ro, src, cs, i, &mut buf, &mut preparer),
                    };
                    if res_tx.send((i, r)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(res_tx);
        // Chunks go out at most `in_flight` ahead of the next one stored, so memory
        // stays bounded however slow one chunk is.
        let in_flight = workers as u64 + 2;
        let mut dispatched = 0u64;
        let mut done = BTreeMap::new();
        for i in 0..nchunks {
            while dispatched < nchunks && dispatched < i + in_flight {
                job_tx.send(dispatched).expect("workers outlive the queue");
                dispatched += 1;
            }
            let chunk = loop {
                if let Some(c) = done.remove(&i) {
                    break c;
                }
                let (j, c) = res_rx
                    .recv()
                    .map_err(|_| Error::new(ErrorKind::Io, "the chunk readers stopped"))?;
                done.insert(j, c);
            };
            if cancel.is_cancelled() {
                return Err(Error::new(ErrorKind::Cancelled, "backup cancelled"));
            }
            lock.refresh_if_due(repo_ro)?;
            let len = cs.len(size, i);
            let id = match chunk? {
                Chunk::Reused(id) => {
                    reused_chunks += 1;
                    id
                }
                Chunk::Zero => {
                    zero_chunks += 1;
                    save_zero_chunk(&mut saver, &mut zeros, len)?
                }
                Chunk::Read { id, read, blob } => {
                    bytes_read += read;
                    if let Some(blob) = blob {
                        saver.add(BlobType::Data, blob)?;
                    }
                    id
                }
            };
            content.push(id);
            progress.advance(len);
        }
        Ok(())
    })?;
    let (indexes, saved, snapshot) = finish_disk(saver, opts, size, content)?;
    for f in &indexes {
        repo.add_index(f);
    }
    let id = repo.save_snapshot(&snapshot)?;
    lock.release()?;
    Ok(BackupSummary {
        snapshot: id,
        size,
        chunk_size: cs,
        chunks: nchunks,
        zero_chunks,
        reused_chunks,
        bytes_read,
        saved,
        full_read: None,
        bitmap_cleared: None,
    })
}

/// Chunks read and prepared at once, at most.
const MAX_WORKERS: usize = 4;

/// What a worker made of one chunk.
enum Chunk {
    /// Unchanged since the parent: its blob, not read.
    Reused(Id),
    /// Reads as zeroes: nothing was read.
    Zero,
    /// Read and hashed; prepared for a pack unless the repository has it.
    Read {
        id: Id,
        read: u64,
        blob: Option<PreparedBlob>,
    },
}

/// Read chunk `i` (of size `cs`) of `src` into `buf` and prepare it ([`prepare_data`]).
fn prepare_chunk(
    repo: &Repository,
    src: &DiskSource,
    cs: ChunkSize,
    i: u64,
    buf: &mut Vec<u8>,
    preparer: &mut Option<Preparer>,
) -> Result<Chunk> {
    let offset = cs.offset(i);
    let len = cs.len(src.size(), i) as usize;
    buf.resize(len, 0);
    let read = src
        .read_chunk(buf, offset)
        .map_err(|e| e.wrap(format_args!("reading the disk at offset {offset}")))?;
    if read == 0 {
        return Ok(Chunk::Zero);
    }
    let (id, blob) = prepare_data(repo, buf, preparer)?;
    Ok(Chunk::Read { id, read, blob })
}

/// The chunk blobs of the parent's disk, which must be a fixed-chunk disk of
/// `size` bytes in chunks of `cs`.
fn parent_content(repo: &Repository, parent: &Id, size: u64, cs: ChunkSize) -> Result<Vec<Id>> {
    let snap = repo.load_snapshot(parent)?;
    let node = restore::disk_node(repo, &snap)?;
    if node.size != size || fixed_chunk_size(repo, &node, cs) != Some(cs) {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "snapshot {} is not a {size}-byte disk in {cs} chunks; it cannot be the parent of an incremental backup",
                parent.short(),
            ),
        ));
    }
    Ok(node.content.unwrap_or_default())
}
