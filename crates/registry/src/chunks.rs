//! Hashing an image's bytes beside the thread that moves them. The bytes go
//! in large buffers ([`Chunk`]) that the mover and each hash thread share
//! without copying; a buffer goes back to its [`Pool`] once nobody holds it,
//! and each hash thread takes at most [`QUEUED`] buffers ahead of its work,
//! so a stream of any size uses a bounded number of buffers.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::digests::StreamDigest;
use crate::error::{Error, Result};

/// Bytes per buffer: large enough that files and hashes see few calls, small
/// enough that many streams at once hold little memory.
pub(crate) const CHUNK: usize = 256 << 10;
/// Buffers a hash thread may have queued before the mover waits for it: a
/// few, so a mover held up by a write (or a hash by the other hash) does not
/// leave a hash thread idle.
pub(crate) const QUEUED: usize = 4;
/// Buffers a pool keeps for reuse (more may be in use at once; those are
/// freed when dropped).
const POOLED: usize = 16;

/// Filled bytes of a shared buffer. Cloning shares the buffer.
#[derive(Clone)]
pub struct Chunk {
    buf: Arc<Vec<u8>>,
    len: usize,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::ops::Deref for Chunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_ref()
    }
}

/// Buffers of [`CHUNK`] bytes to fill, reusing those nobody holds any more.
#[derive(Default)]
pub(crate) struct Pool {
    shared: Vec<Arc<Vec<u8>>>,
}

impl Pool {
    /// A buffer of [`CHUNK`] bytes (their values are left over: fill before
    /// sharing).
    pub(crate) fn take(&mut self) -> Vec<u8> {
        if let Some(i) = self.shared.iter().position(|b| Arc::strong_count(b) == 1) {
            // Only the pool holds it, so nobody can take another reference.
            if let Ok(v) = Arc::try_unwrap(self.shared.swap_remove(i)) {
                return v;
            }
        }
        vec![0; CHUNK]
    }

    /// Share the first `len` bytes of `buf` (a buffer from [`Pool::take`]).
    pub(crate) fn share(&mut self, buf: Vec<u8>, len: usize) -> Chunk {
        let buf = Arc::new(buf);
        if self.shared.len() < POOLED {
            self.shared.push(buf.clone());
        }
        Chunk { buf, len }
    }
}

/// A digest computed on a thread of its own over the chunks fed to it, in
/// order.
pub(crate) struct HashThread {
    tx: SyncSender<Chunk>,
    handle: JoinHandle<Vec<u8>>,
}

impl HashThread {
    pub(crate) fn spawn<H: StreamDigest>(name: &str) -> Result<HashThread> {
        let (tx, rx) = sync_channel::<Chunk>(QUEUED);
        let handle = std::thread::Builder::new()
            .name(format!("strata-{name}"))
            .spawn(move || {
                let mut h = H::new();
                for c in rx {
                    h.update(&c);
                }
                h.finish()
            })
            .map_err(|e| Error::io(format!("start the {name} thread"), e))?;
        Ok(HashThread { tx, handle })
    }

    /// Queue the next chunk, waiting while [`QUEUED`] are.
    pub(crate) fn feed(&self, c: Chunk) -> Result<()> {
        self.tx
            .send(c)
            .map_err(|_| Error::io("hash", std::io::Error::other("the hash thread ended")))
    }

    /// The digest of everything fed, once the thread has hashed it.
    pub(crate) fn finish(self) -> Result<Vec<u8>> {
        drop(self.tx);
        self.handle
            .join()
            .map_err(|_| Error::io("hash", std::io::Error::other("the hash thread panicked")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_thread_digests_its_chunks_in_order_and_buffers_are_reused() {
        let mut pool = Pool::default();
        let t = HashThread::spawn::<crate::digests::Sha512>("sha512").unwrap();
        let mut whole = Vec::new();
        for i in 0..3 * QUEUED {
            let mut b = pool.take();
            b.fill(i as u8);
            let len = CHUNK - i;
            whole.extend_from_slice(&b[..len]);
            t.feed(pool.share(b, len)).unwrap();
        }
        use sha2::Digest;
        assert_eq!(t.finish().unwrap(), sha2::Sha512::digest(&whole).to_vec());
        assert!(pool.shared.len() <= POOLED);
        let before = pool.shared.len();
        let _b = pool.take();
        assert_eq!(pool.shared.len(), before - 1, "a free buffer is reused");
    }
}
