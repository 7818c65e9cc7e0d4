//! A disk written as a stream of bytes (an image arriving over the network)
//! rather than read from a source: the bytes are cut into the same fixed
//! [`CHUNK_SIZE`] chunks at the same offsets as [`crate::disk::backup`] cuts a
//! disk, and each chunk is hashed, deduplicated and saved the same way, so the
//! stream of a disk that was backed up adds no data blob (and a backup of a
//! disk that was streamed adds none either).
//!
//! A worker thread holds a shared lock from [`DiskStream::start`] until the
//! caller releases [`Streamed::lock`], so no gc removes what the stream will
//! reference. Nothing is visible before [`DiskStream::finish`] stores the index
//! and the snapshot; a stream dropped (or failed) before that leaves only packs
//! no index names, which gc removes.

use crate::disk::{finish_disk, prepare_data, save_zero_chunk, BackupOptions, CHUNK_SIZE};
use crate::error::{Error, ErrorKind, Result};
use crate::id::Id;
use crate::lock::Lock;
use crate::pack::BlobType;
use crate::repository::Repository;
use crate::writer::{BlobSaver, SaveStats};
use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often an idle worker looks whether its lock is due for a refresh.
const IDLE_POLL: Duration = Duration::from_secs(30);

enum Msg {
    Chunk(Vec<u8>),
    Finish(BackupOptions),
}

/// A disk being streamed into a repository.
pub struct DiskStream {
    tx: Option<mpsc::SyncSender<Msg>>,
    buf: Vec<u8>,
    size: u64,
    worker: Option<JoinHandle<Result<Streamed>>>,
}

/// A finished stream.
pub struct Streamed {
    /// The repository handle the stream wrote with; its index has the new blobs.
    pub repo: Repository,
    /// The shared lock, still held: release it once the snapshot has been
    /// read back as needed.
    pub lock: Lock,
    pub snapshot: Id,
    pub size: u64,
    pub saved: SaveStats,
}

impl DiskStream {
    /// Take a shared lock on `repo`'s repository (waiting as long as its lock
    /// wait says), load the index and start the worker, which writes packs of
    /// about `pack_size` bytes.
    pub fn start(repo: &Repository, pack_size: usize) -> Result<DiskStream> {
        let mut repo = repo.reopen();
        let lock = Lock::acquire(&repo, false)?;
        repo.reload_index()?;
        // One chunk queued while the worker saves another: memory stays at a
        // few chunks and packs whatever the disk's size.
        let (tx, rx) = mpsc::sync_channel(1);
        let worker = std::thread::spawn(move || run(repo, lock, rx, pack_size));
        Ok(DiskStream {
            tx: Some(tx),
            buf: Vec::with_capacity(CHUNK_SIZE as usize),
            size: 0,
            worker: Some(worker),
        })
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Append `data` to the disk.
    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let n = data.len().min(CHUNK_SIZE as usize - self.buf.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            self.size += n as u64;
            if self.buf.len() == CHUNK_SIZE as usize {
                let full =
                    std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_SIZE as usize));
                self.send(Msg::Chunk(full))?;
            }
        }
        Ok(())
    }

    fn send(&mut self, msg: Msg) -> Result<()> {
        let sent = self.tx.as_ref().map(|tx| tx.send(msg).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        // The worker stopped: its error says why.
        self.tx = None;
        match self.join() {
            Err(e) => Err(e),
            Ok(_) => Err(Error::new(ErrorKind::Io, "the stream's writer stopped")),
        }
    }

    fn join(&mut self) -> Result<Streamed> {
        self.tx = None;
        let worker = self
            .worker
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Io, "the stream's writer stopped"))?;
        worker
            .join()
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "the stream's writer panicked")))
    }

    /// Store the last chunk, the tree, the index and the snapshot (named and
    /// tagged by `opts`; its incremental fields are ignored).
    pub fn finish(mut self, opts: &BackupOptions) -> Result<Streamed> {
        if !self.buf.is_empty() {
            let last = std::mem::take(&mut self.buf);
            self.send(Msg::Chunk(last))?;
        }
        self.send(Msg::Finish(opts.clone()))?;
        self.join()
    }
}

impl Drop for DiskStream {
    /// An unfinished stream stops its worker and waits for it, so its lock is
    /// gone when the drop returns; nothing it wrote is referenced.
    fn drop(&mut self) {
        if self.worker.is_some() {
            let _ = self.join();
        }
    }
}

/// The worker: saves each chunk as it comes, and on `Finish` the rest.
fn run(
    mut repo: Repository,
    mut lock: Lock,
    rx: mpsc::Receiver<Msg>,
    pack_size: usize,
) -> Result<Streamed> {
    let mut content = Vec::new();
    let mut size = 0u64;
    let (indexes, saved, snapshot) = {
        let mut saver = BlobSaver::new(&repo, pack_size);
        let mut zeros = HashMap::new();
        let mut preparer = None;
        let opts = loop {
            match rx.recv_timeout(IDLE_POLL) {
                Ok(Msg::Chunk(chunk)) => {
                    lock.refresh_if_due(&repo)?;
                    let len = chunk.len() as u64;
                    let id = if chunk.iter().all(|&b| b == 0) {
                        save_zero_chunk(&mut saver, &mut zeros, len)?
                    } else {
                        let (id, blob) = prepare_data(&repo, &chunk, &mut preparer)?;
                        if let Some(blob) = blob {
                            saver.add(BlobType::Data, blob)?;
                        }
                        id
                    };
                    content.push(id);
                    size += len;
                }
                Ok(Msg::Finish(opts)) => break opts,
                Err(RecvTimeoutError::Timeout) => lock.refresh_if_due(&repo)?,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::new(
                        ErrorKind::Cancelled,
                        "the stream ended before it was finished",
                    ))
                }
            }
        };
        let opts = BackupOptions {
            parent: None,
            incremental: None,
            ..opts
        };
        finish_disk(saver, &opts, size, content)?
    };
    for f in &indexes {
        repo.add_index(f);
    }
    let id = repo.save_snapshot(&snapshot)?;
    Ok(Streamed {
        repo,
        lock,
        snapshot: id,
        size,
        saved,
    })
}
