//! Disk backup: a disk image becomes one file node of a snapshot whose content is
//! fixed [`CHUNK_SIZE`] chunks at fixed offsets (the last one shorter), each a data
//! blob named by the SHA-256 of its plaintext. Ranges the image's block status
//! reports as zeroes are never read; an all-zero chunk is the one shared zero blob.
//! An incremental backup reuses the parent snapshot's blob of every chunk not
//! named as changed, without reading it.

use crate::error::{Error, ErrorKind, Result};
use crate::id::Id;
use crate::lock::Lock;
use crate::pack::BlobType;
use crate::repository::Repository;
use crate::time::Timestamp;
use crate::tree::{Node, Snapshot, Tree};
use crate::writer::{BlobSaver, SaveStats, DEFAULT_PACK_SIZE};
use crate::{host, restore};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use strata_format::{BlockDevice, Format};
use strata_jobs::status::{ChainStatus, Walk};
use strata_jobs::{Cancel, Progress};

/// The fixed chunk size of disk backups.
pub const CHUNK_SIZE: u64 = 4 << 20;

/// A disk to back up: its guest view and the block status of its chain.
pub struct DiskSource {
    status: ChainStatus,
    reader: Arc<dyn BlockDevice>,
}

impl DiskSource {
    /// Open the image at `path` (format probed when `None`) with its backing chain,
    /// read-only; `force_share` reads an image another process holds for writing.
    pub fn open(path: &Path, format: Option<Format>, force_share: bool) -> Result<DiskSource> {
        let chain = strata_chain::open(
            &strata_chain::OpenSpec::new(path)
                .format(format)
                .force_share(force_share),
        )?;
        Ok(DiskSource {
            status: ChainStatus::new(&chain)?,
            reader: chain.reader(),
        })
    }

    /// A source from an already opened stack of devices, top first.
    pub fn from_devices(devices: Vec<Arc<dyn BlockDevice>>) -> Result<DiskSource> {
        let reader = devices[0].clone();
        Ok(DiskSource {
            status: ChainStatus::from_devices(devices)?,
            reader,
        })
    }

    pub fn size(&self) -> u64 {
        self.status.virtual_size()
    }

    /// Fill `buf` with the disk's bytes at `offset`, reading only ranges that are
    /// not known to be zero; returns the bytes read (0: the range is all zeroes).
    fn read_chunk(&self, buf: &mut [u8], offset: u64) -> Result<u64> {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        let mut read = 0;
        while pos < end {
            let st = self.status.status(pos, end - pos, Walk::DataOrZero)?;
            if !st.zero {
                let at = (pos - offset) as usize;
                self.reader.read(&mut buf[at..at + st.len as usize], pos)?;
                read += st.len;
            }
            pos += st.len;
        }
        Ok(read)
    }
}

/// The changed chunks an incremental backup must read; every other chunk reuses
/// the parent snapshot's blob.
#[derive(Debug, Clone)]
pub struct Incremental {
    /// The parent snapshot (its disk must have the same size).
    pub parent: Id,
    /// Indexes of the [`CHUNK_SIZE`] chunks that may have changed since the parent.
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
            pack_size: DEFAULT_PACK_SIZE,
        }
    }
}

/// What a backup did.
#[derive(Debug, Clone)]
pub struct BackupSummary {
    pub snapshot: Id,
    pub size: u64,
    pub chunks: u64,
    /// Chunks that read as zeroes (never read).
    pub zero_chunks: u64,
    /// Chunks taken from the parent without reading.
    pub reused_chunks: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    pub saved: SaveStats,
}

/// The blob ID of `len` zero bytes.
pub(crate) fn zero_id(cache: &mut HashMap<u64, Id>, len: u64) -> Id {
    *cache
        .entry(len)
        .or_insert_with(|| Id::hash(&vec![0u8; len as usize]))
}

/// Back up `src` into `repo` as a new snapshot, under a shared lock.
pub fn backup(
    repo: &mut Repository,
    src: &DiskSource,
    opts: &BackupOptions,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<BackupSummary> {
    let size = src.size();
    let nchunks = size.div_ceil(CHUNK_SIZE);
    let reuse = match &opts.incremental {
        Some(inc) => Some((
            parent_content(repo, &inc.parent, size, nchunks)?,
            &inc.changed,
        )),
        None => None,
    };
    let mut lock = Lock::acquire(repo, false)?;
    progress.set_total(size);
    let mut saver = BlobSaver::new(repo, opts.pack_size);
    let mut zeros = HashMap::new();
    let mut content = Vec::with_capacity(nchunks as usize);
    let mut buf = vec![0u8; CHUNK_SIZE.min(size) as usize];
    let (mut zero_chunks, mut reused_chunks, mut bytes_read) = (0, 0, 0);
    for i in 0..nchunks {
        if cancel.is_cancelled() {
            return Err(Error::new(ErrorKind::Cancelled, "backup cancelled"));
        }
        lock.refresh_if_due(repo)?;
        let offset = i * CHUNK_SIZE;
        let len = CHUNK_SIZE.min(size - offset);
        if let Some((parent, changed)) = &reuse {
            let id = parent[i as usize];
            if !changed.contains(&i) && saver.has(BlobType::Data, &id) {
                content.push(id);
                reused_chunks += 1;
                progress.advance(len);
                continue;
            }
        }
        let chunk = &mut buf[..len as usize];
        let read = src
            .read_chunk(chunk, offset)
            .map_err(|e| e.wrap(format_args!("reading the disk at offset {offset}")))?;
        bytes_read += read;
        let id = if read == 0 {
            zero_chunks += 1;
            zero_id(&mut zeros, len)
        } else {
            Id::hash(chunk)
        };
        saver.save(BlobType::Data, id, chunk)?;
        content.push(id);
        progress.advance(len);
    }
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
    for f in &indexes {
        repo.add_index(f);
    }
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
    let id = repo.save_snapshot(&snapshot)?;
    lock.release()?;
    Ok(BackupSummary {
        snapshot: id,
        size,
        chunks: nchunks,
        zero_chunks,
        reused_chunks,
        bytes_read,
        saved,
    })
}

/// The chunk blobs of the parent's disk, which must be a fixed-chunk disk of `size`.
fn parent_content(repo: &Repository, parent: &Id, size: u64, nchunks: u64) -> Result<Vec<Id>> {
    let snap = repo.load_snapshot(parent)?;
    let node = restore::disk_node(repo, &snap)?;
    let content = node.content.unwrap_or_default();
    let fixed = content.len() as u64 == nchunks
        && content.iter().enumerate().all(|(i, id)| {
            let expect = CHUNK_SIZE.min(size - i as u64 * CHUNK_SIZE);
            repo.index()
                .get(BlobType::Data, id)
                .is_some_and(|l| l.plain_length() == expect)
        });
    if node.size != size || !fixed {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "snapshot {} is not a {}-byte disk in {} MiB chunks; it cannot be the parent of an incremental backup",
                parent.short(),
                size,
                CHUNK_SIZE >> 20
            ),
        ));
    }
    Ok(content)
}
