//! Uploads: the bytes stream into the registry's data store while MD5 and
//! SHA-512 are computed over them, each on a thread of its own fed the same
//! buffers ([`crate::chunks`]), so writing and both hashes overlap; only
//! complete, durable, inspected data is made reachable by the store, and only
//! then does the record turn `active`.

use crate::chunks::{HashThread, Pool, CHUNK};
use crate::data::Sink;
use crate::digests::{Md5, Sha512};
use crate::error::{Error, Result};
use crate::record::{hex, ImageRecord, Status, HASH_ALGO};
use crate::store::{Registry, UploadLock};

/// An upload in progress. The image is `saving` while it lives; [`finish`]
/// makes it `active`, and dropping it unfinished returns it to `queued`.
///
/// [`finish`]: Upload::finish
pub struct Upload {
    reg: Registry,
    id: String,
    sink: Option<Sink>,
    /// MD5 and SHA-512 threads, until the upload finishes.
    hashes: Option<(HashThread, HashThread)>,
    pool: Pool,
    /// Received bytes not yet written nor hashed: `buf[..filled]`.
    buf: Vec<u8>,
    filled: usize,
    size: u64,
    expected: Option<u64>,
    done: bool,
    _lock: UploadLock,
}

impl Registry {
    /// Start uploading the data of `id` (which must be `queued`, with its disk
    /// and container formats set). `expected` is the size the client announced,
    /// if any: more or fewer bytes fail the upload. Another upload to the same
    /// image, in any process, is refused with `Conflict`.
    pub fn begin_upload(&self, id: &str, expected: Option<u64>) -> Result<Upload> {
        self.get(id)?;
        let Some(lock) = UploadLock::try_take(&self.path(id, "lock"))? else {
            return Err(Error::Conflict(format!(
                "Image {id} is already being uploaded"
            )));
        };
        self.begin_upload_locked(id, expected, lock)
    }

    /// [`Registry::begin_upload`] by the holder of the image's upload lock.
    pub(crate) fn begin_upload_locked(
        &self,
        id: &str,
        expected: Option<u64>,
        lock: UploadLock,
    ) -> Result<Upload> {
        if let Some(n) = expected {
            if n > self.max_image_size() {
                return Err(too_large(self.max_image_size()));
            }
        }
        self.modify(id, |rec| {
            if rec.status != Status::Queued {
                return Err(Error::Conflict(format!(
                    "Image status transition from {} to saving is not allowed",
                    rec.status.as_str()
                )));
            }
            if rec.disk_format.is_none() || rec.container_format.is_none() {
                return Err(Error::Invalid(
                    "Properties disk_format, container_format must be set prior to saving data."
                        .into(),
                ));
            }
            rec.status = Status::Saving;
            Ok(())
        })?;
        let begun = self.data().begin(id).and_then(|sink| {
            let hashes = (
                HashThread::spawn::<Md5>("md5")?,
                HashThread::spawn::<Sha512>("sha512")?,
            );
            Ok((sink, hashes))
        });
        let (sink, hashes) = match begun {
            Ok(b) => b,
            Err(e) => {
                let _ = self.requeue(id);
                return Err(e);
            }
        };
        let mut pool = Pool::default();
        Ok(Upload {
            reg: self.clone(),
            id: id.to_string(),
            sink: Some(sink),
            hashes: Some(hashes),
            buf: pool.take(),
            pool,
            filled: 0,
            size: 0,
            expected,
            done: false,
            _lock: lock,
        })
    }

    /// Return a `saving` image to `queued` and drop its partial data.
    fn requeue(&self, id: &str) -> Result<()> {
        self.data().discard(id)?;
        self.modify(id, |rec| {
            if rec.status == Status::Saving {
                rec.status = Status::Queued;
            }
            Ok(())
        })
        .map(|_| ())
    }
}

fn too_large(max: u64) -> Error {
    Error::TooLarge(format!(
        "Image exceeds the storage quota: at most {max} bytes per image"
    ))
}

impl Upload {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Bytes received so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Append the next bytes. Exceeding the registry's limit or the announced
    /// size fails (the upload is then to be dropped). The bytes are collected
    /// into large buffers, each written and hashed once full, so a failure
    /// to store them may be reported by a later call or by [`Upload::finish`].
    pub fn write(&mut self, mut buf: &[u8]) -> Result<()> {
        let size = self
            .size
            .checked_add(buf.len() as u64)
            .ok_or_else(|| too_large(self.reg.max_image_size()))?;
        if size > self.reg.max_image_size() {
            return Err(too_large(self.reg.max_image_size()));
        }
        if let Some(n) = self.expected {
            if size > n {
                return Err(Error::Invalid(format!(
                    "More data than the announced size of {n} bytes"
                )));
            }
        }
        self.size = size;
        while !buf.is_empty() {
            let n = buf.len().min(CHUNK - self.filled);
            self.buf[self.filled..self.filled + n].copy_from_slice(&buf[..n]);
            self.filled += n;
            buf = &buf[n..];
            if self.filled == CHUNK {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Hand the collected bytes to both hash threads, then write them while
    /// the threads hash.
    fn flush(&mut self) -> Result<()> {
        if self.filled == 0 {
            return Ok(());
        }
        let ended = || Error::Conflict(format!("The upload of image {} ended", self.id));
        let (md5, sha) = self.hashes.as_ref().ok_or_else(ended)?;
        let buf = std::mem::replace(&mut self.buf, self.pool.take());
        let chunk = self.pool.share(buf, std::mem::take(&mut self.filled));
        md5.feed(chunk.clone())?;
        sha.feed(chunk.clone())?;
        self.sink.as_mut().ok_or_else(ended)?.write(&chunk)
    }

    /// Complete the upload: sync the data, check it against its disk format,
    /// move it into place and make the image `active` with its size, checksums
    /// and virtual size. On error the image is back to `queued`.
    pub fn finish(mut self) -> Result<ImageRecord> {
        let r = self.complete();
        self.done = true;
        if r.is_err() {
            let _ = self.reg.requeue(&self.id);
        }
        r
    }

    fn complete(&mut self) -> Result<ImageRecord> {
        if let Some(n) = self.expected {
            if self.size != n {
                return Err(Error::Invalid(format!(
                    "Received {} bytes of the announced {n}",
                    self.size
                )));
            }
        }
        self.flush()?;
        let ended = || Error::Conflict(format!("The upload of image {} ended", self.id));
        let sink = self.sink.take().ok_or_else(ended)?;
        let (md5, sha) = self.hashes.take().ok_or_else(ended)?;
        let format = self.reg.get(&self.id)?.disk_format.unwrap_or_default();
        // The hash threads finish their queues while the data is synced.
        let virtual_size = self.reg.data().commit(&self.id, sink, &format, self.size)?;
        let (md5, sha) = match (md5.finish(), sha.finish()) {
            (Ok(m), Ok(s)) => (hex(&m), hex(&s)),
            (Err(e), _) | (_, Err(e)) => {
                let _ = self.reg.data().discard(&self.id);
                return Err(e);
            }
        };
        let size = self.size;
        let r = self.reg.modify(&self.id, |rec| {
            rec.status = Status::Active;
            rec.size = Some(size);
            rec.virtual_size = virtual_size;
            rec.checksum = Some(md5);
            rec.os_hash_algo = Some(HASH_ALGO.to_string());
            rec.os_hash_value = Some(sha);
            Ok(())
        });
        if r.is_err() {
            // The record still says saving: take the data back out.
            let _ = self.reg.data().discard(&self.id);
        }
        r
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.reg.requeue(&self.id);
        }
    }
}
