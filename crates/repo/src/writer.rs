//! Saving blobs: deduplicated against the index and the blobs saved so far,
//! zstd-compressed when that makes them smaller, sealed, gathered into packs of
//! about the target size (data and trees in separate packs), and finally listed in
//! index files. Nothing becomes visible to readers until the caller stores a
//! snapshot after [`BlobSaver::finish`]: packs first, then indexes, then the
//! snapshot, so a cut backup leaves only unreferenced packs.

use crate::backend::{FileType, Handle};
use crate::error::{Error, ErrorKind, Result};
use crate::id::Id;
use crate::index::{IndexFile, IndexPack};
use crate::pack::{BlobType, PackWriter};
use crate::repository::{Repository, ZSTD_LEVEL};
use std::collections::HashSet;

/// restic's default pack size.
pub const DEFAULT_PACK_SIZE: usize = 16 << 20;
/// Room in a data pack's buffer past the target size: the largest chunk a disk
/// backup makes, sealed, and the pack's header.
const PACK_SLACK: usize = (4 << 20) + (64 << 10);
/// Blobs listed per index file, keeping each file well under restic's 8 MiB.
const BLOBS_PER_INDEX: usize = 50_000;

/// What a save added to the repository.
#[derive(Debug, Default, Clone, Copy)]
pub struct SaveStats {
    /// Blobs stored (not already present).
    pub new_blobs: u64,
    /// Their plaintext bytes.
    pub new_plain_bytes: u64,
    /// Their stored (compressed, sealed) bytes.
    pub new_stored_bytes: u64,
    pub packs: u64,
}

/// A blob ready for a pack: zstd-compressed when that makes it smaller, then sealed.
pub struct PreparedBlob {
    pub id: Id,
    sealed: Vec<u8>,
    uncompressed: Option<u32>,
    plain_len: u64,
}

impl PreparedBlob {
    /// Compress and seal `plain`, whose hash is `id`. Needs only the key, so it can
    /// run on any thread; a thread preparing many blobs keeps a [`Preparer`].
    pub fn new(key: &crate::crypto::Key, id: Id, plain: &[u8]) -> Result<PreparedBlob> {
        Preparer::new()?.prepare(key, id, plain)
    }
}

/// What one thread reuses from blob to blob: a zstd context (its tables are
/// set up once, not for every blob) and the buffer it compresses into.
pub struct Preparer {
    compressor: zstd::bulk::Compressor<'static>,
    compressed: Vec<u8>,
}

impl Preparer {
    pub fn new() -> Result<Preparer> {
        Ok(Preparer {
            compressor: zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(compression_failed)?,
            compressed: Vec::new(),
        })
    }

    /// Compress and seal `plain`, whose hash is `id`.
    pub fn prepare(
        &mut self,
        key: &crate::crypto::Key,
        id: Id,
        plain: &[u8],
    ) -> Result<PreparedBlob> {
        let len = u32::try_from(plain.len())
            .map_err(|_| Error::new(ErrorKind::Invalid, "blob larger than 4 GiB"))?;
        self.compressed.clear();
        self.compressed.reserve(plain.len());
        // Room for about the plaintext only: data that does not shrink fails
        // here (zstd stops when its output is full) and is stored as it is.
        let fits = self
            .compressor
            .compress_to_buffer(plain, &mut self.compressed)
            .is_ok();
        let (body, uncompressed) = if fits && self.compressed.len() < plain.len() {
            (self.compressed.as_slice(), Some(len))
        } else {
            (plain, None)
        };
        Ok(PreparedBlob {
            id,
            sealed: key.seal(body)?,
            uncompressed,
            plain_len: plain.len() as u64,
        })
    }
}

fn compression_failed(e: std::io::Error) -> Error {
    Error::with_source(ErrorKind::Io, "compression failed", e)
}

/// Gathers new blobs into packs.
pub struct BlobSaver<'r> {
    repo: &'r Repository,
    pack_size: usize,
    data: PackWriter,
    tree: PackWriter,
    pending: HashSet<(BlobType, Id)>,
    written: Vec<IndexPack>,
    uploader: Option<Uploader>,
    stats: SaveStats,
    /// Store blobs the index already has (a repack moves them to new packs).
    ignore_index: bool,
}

/// Writes finished packs on a thread of its own, so reading and compressing go on
/// while a pack is written and synced; at most [`PACKS_IN_FLIGHT`] wait. The
/// buffers of written packs come back for the next packs to fill, so a backup
/// does not map fresh memory (and fault in every page of it) for each pack.
struct Uploader {
    queue: std::sync::mpsc::SyncSender<(Handle, Vec<u8>)>,
    written: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: std::thread::JoinHandle<Result<()>>,
}

const PACKS_IN_FLIGHT: usize = 1;

impl Uploader {
    fn start(backend: std::sync::Arc<dyn crate::Backend>) -> Uploader {
        let (queue, rx) = std::sync::mpsc::sync_channel::<(Handle, Vec<u8>)>(PACKS_IN_FLIGHT);
        // One spare buffer is kept at most; memory stays at a few packs.
        let (done, written) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::spawn(move || {
            for (h, bytes) in rx {
                backend.write(&h, &bytes)?;
                // With a spare waiting already, or the saver gone, it is dropped.
                let _ = done.try_send(bytes);
            }
            Ok(())
        });
        Uploader {
            queue,
            written,
            thread,
        }
    }

    /// Wait for every queued pack; the first write error, if any.
    fn wait(self) -> Result<()> {
        drop(self.queue);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "the pack writer panicked")))
    }
}

impl<'r> BlobSaver<'r> {
    pub fn new(repo: &'r Repository, pack_size: usize) -> Self {
        BlobSaver {
            repo,
            pack_size: pack_size.max(1),
            data: PackWriter::with_buffer(
                BlobType::Data,
                new_pack_buffer(BlobType::Data, pack_size),
            ),
            tree: PackWriter::new(BlobType::Tree),
            pending: HashSet::new(),
            written: Vec::new(),
            uploader: None,
            stats: SaveStats::default(),
            ignore_index: false,
        }
    }

    /// A saver that stores every blob given once, even those the index has: the
    /// new packs of a repack.
    pub fn for_repack(repo: &'r Repository, pack_size: usize) -> Self {
        let mut saver = BlobSaver::new(repo, pack_size);
        saver.ignore_index = true;
        saver
    }

    /// Whether the blob is stored already or saved in this session.
    pub fn has(&self, kind: BlobType, id: &Id) -> bool {
        (!self.ignore_index && self.repo.index().contains(kind, id))
            || self.pending.contains(&(kind, *id))
    }

    /// Save `plain` as blob `id` (the caller computed `Id::hash(plain)`) unless it is
    /// present; returns whether it was new.
    pub fn save(&mut self, kind: BlobType, id: Id, plain: &[u8]) -> Result<bool> {
        if self.has(kind, &id) {
            return Ok(false);
        }
        let blob = PreparedBlob::new(self.repo.key(), id, plain)?;
        self.add(kind, blob)
    }

    /// Add a blob prepared (possibly on another thread) unless it is present;
    /// returns whether it was new.
    pub fn add(&mut self, kind: BlobType, blob: PreparedBlob) -> Result<bool> {
        let PreparedBlob {
            id,
            sealed,
            uncompressed,
            plain_len,
        } = blob;
        if self.has(kind, &id) {
            return Ok(false);
        }
        if self.repo.config().version < 2 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "writing to a version 1 repository is not supported (run 'restic migrate upgrade_repo_v2')",
            ));
        }
        self.packer(kind).add(id, &sealed, uncompressed)?;
        self.pending.insert((kind, id));
        self.stats.new_blobs += 1;
        self.stats.new_plain_bytes += plain_len;
        self.stats.new_stored_bytes += sealed.len() as u64;
        if self.packer(kind).len() >= self.pack_size {
            self.flush(kind)?;
        }
        Ok(true)
    }

    fn packer(&mut self, kind: BlobType) -> &mut PackWriter {
        match kind {
            BlobType::Data => &mut self.data,
            BlobType::Tree => &mut self.tree,
        }
    }

    /// Queue the current pack of `kind` (if it holds anything) for writing.
    fn flush(&mut self, kind: BlobType) -> Result<()> {
        if self.packer(kind).is_empty() {
            return Ok(());
        }
        let recycled = match (&self.uploader, kind) {
            (Some(u), BlobType::Data) => u.written.try_recv().ok(),
            _ => None,
        };
        let buffer = recycled.unwrap_or_else(|| new_pack_buffer(kind, self.pack_size));
        let full = std::mem::replace(self.packer(kind), PackWriter::with_buffer(kind, buffer));
        let (bytes, id, blobs) = full.finish(self.repo.key())?;
        let uploader = self
            .uploader
            .get_or_insert_with(|| Uploader::start(self.repo.backend().clone()));
        let h = Handle::new(FileType::Data, id.to_string());
        if uploader.queue.send((h, bytes)).is_err() {
            // The writer stopped at an error: report it.
            self.uploader.take().expect("started").wait()?;
            return Err(Error::new(ErrorKind::Io, "the pack writer stopped"));
        }
        self.written.push(IndexPack::new(id, &blobs));
        self.stats.packs += 1;
        Ok(())
    }

    /// Write the open packs, then index files for every pack written; returns the
    /// index documents (for the in-memory index) and the totals.
    pub fn finish(mut self) -> Result<(Vec<IndexFile>, SaveStats)> {
        self.flush(BlobType::Data)?;
        self.flush(BlobType::Tree)?;
        // Every pack is durable before an index names it.
        if let Some(u) = self.uploader.take() {
            u.wait()?;
        }
        let files = write_index(self.repo, std::mem::take(&mut self.written))?;
        Ok((files, self.stats))
    }
}

impl Drop for BlobSaver<'_> {
    /// A saver given up (an error, a cancel) waits for the packs already
    /// queued, so none is written after its owner has let go of its lock.
    fn drop(&mut self) {
        if let Some(u) = self.uploader.take() {
            let _ = u.wait();
        }
    }
}

/// An empty buffer for a pack of `kind`: a data pack's has room for the whole
/// pack and the blob that passes `pack_size`, so it is never moved as it grows.
fn new_pack_buffer(kind: BlobType, pack_size: usize) -> Vec<u8> {
    match kind {
        BlobType::Data => Vec::with_capacity(pack_size.saturating_add(PACK_SLACK)),
        BlobType::Tree => Vec::new(),
    }
}

/// Store index files listing `packs` (as many files as keep each well under
/// restic's size limit); returns the documents written.
pub fn write_index(repo: &Repository, packs: Vec<IndexPack>) -> Result<Vec<IndexFile>> {
    let mut files = Vec::new();
    let mut current = IndexFile::default();
    let mut count = 0;
    for pack in packs {
        count += pack.blobs.len();
        current.packs.push(pack);
        if count >= BLOBS_PER_INDEX {
            files.push(std::mem::take(&mut current));
            count = 0;
        }
    }
    if !current.packs.is_empty() {
        files.push(current);
    }
    for f in &files {
        repo.save_unpacked(FileType::Index, &serde_json::to_vec(f).expect("json"))?;
    }
    Ok(files)
}
