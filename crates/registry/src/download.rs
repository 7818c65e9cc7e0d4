//! Downloads: the data of an active image, whole (verified against its
//! SHA-512 on a thread of its own while it streams) or a byte range.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::chunks::{Chunk, HashThread, Pool, CHUNK};
use crate::digests::Sha512;
use crate::error::{Error, Result};
use crate::record::{hex, ImageRecord, Status};
use crate::store::{sync_dir, Registry};

/// A reader over an image's data, in chunks ([`Download::next_chunk`]) or
/// through [`Read`].
///
/// Contract of a whole-image reader: every chunk is hashed on a thread beside
/// the reader, so the hash costs the stream no time, but the last chunk is
/// handed out only once the SHA-512 of all the data equals the recorded
/// `os_hash_value`. On a mismatch (or data shorter than the record says) the
/// reader fails with `InvalidData` instead, so a consumer never receives all
/// of an image's bytes unless they are the image's bytes; an HTTP response
/// with the image's length ends short. A range is not verified (its hash is
/// not known).
pub struct Download {
    file: Box<dyn Read + Send>,
    verify: Option<(HashThread, String)>,
    len: u64,
    /// Bytes read from the data so far.
    done: u64,
    /// Why the reader failed, repeated to any later call.
    failed: Option<(std::io::ErrorKind, String)>,
    pool: Pool,
    /// The chunk [`Read`] is handing out, and how much of it it has.
    current: Option<(Chunk, usize)>,
}

impl Download {
    /// Bytes this reader returns.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The next chunk of the data (up to 256 KiB, shared, not copied), `None`
    /// after the last.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<Chunk>> {
        if let Some((kind, msg)) = &self.failed {
            return Err(std::io::Error::new(*kind, msg.clone()));
        }
        let r = self.advance();
        if let Err(e) = &r {
            self.failed = Some((e.kind(), e.to_string()));
        }
        r
    }

    fn advance(&mut self) -> std::io::Result<Option<Chunk>> {
        let left = self.len - self.done;
        if left == 0 {
            // Only an empty image ends without a last chunk.
            self.check()?;
            return Ok(None);
        }
        let want = left.min(CHUNK as u64) as usize;
        let mut buf = self.pool.take();
        let mut n = 0;
        while n < want {
            match self.file.read(&mut buf[n..want]) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "image data ends after {} of {} bytes",
                            self.done + n as u64,
                            self.len
                        ),
                    ))
                }
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.done += n as u64;
        let chunk = self.pool.share(buf, n);
        if let Some((sha, _)) = &self.verify {
            sha.feed(chunk.clone()).map_err(std::io::Error::other)?;
        }
        if self.done == self.len {
            self.check()?;
        }
        Ok(Some(chunk))
    }

    /// Compare the hash of all the data with the record's (whole images).
    fn check(&mut self) -> std::io::Result<()> {
        let Some((sha, want)) = self.verify.take() else {
            return Ok(());
        };
        let got = hex(&sha.finish().map_err(std::io::Error::other)?);
        if got != want {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("image data does not match its sha512 {want} (read {got})"),
            ));
        }
        Ok(())
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some((c, at)) = &mut self.current {
                if *at < c.len() {
                    let n = buf.len().min(c.len() - *at);
                    buf[..n].copy_from_slice(&c[*at..*at + n]);
                    *at += n;
                    return Ok(n);
                }
            }
            self.current = None;
            match self.next_chunk()? {
                Some(c) => self.current = Some((c, 0)),
                None => return Ok(0),
            }
        }
    }
}

impl Registry {
    /// Open the data of active image `id`: all of it, or `range` (first and
    /// last byte, inclusive, already checked by [`resolve_range`]).
    pub fn download(&self, id: &str, range: Option<(u64, u64)>) -> Result<(ImageRecord, Download)> {
        let rec = self.get(id)?;
        if rec.status != Status::Active {
            return Err(Error::NoData(format!(
                "The requested image {id} has no data: its status is {}",
                rec.status.as_str()
            )));
        }
        let size = rec.size.unwrap_or(0);
        let (start, len, want) = match range {
            None => (0, size, rec.os_hash_value.clone()),
            Some((a, b)) => (a, b - a + 1, None),
        };
        let file = self.data().reader(id, size, start, len)?;
        let verify = match want {
            Some(h) => Some((HashThread::spawn::<Sha512>("sha512")?, h)),
            None => None,
        };
        let download = Download {
            file,
            verify,
            len,
            done: 0,
            failed: None,
            pool: Pool::default(),
            current: None,
        };
        Ok((rec, download))
    }
}

/// What the name of a temporary file of [`write_file`] holds after the
/// name of the file it becomes.
pub(crate) const PART_MARK: &str = ".part-";

/// Write all of `reader` to `dest` atomically: to a temporary file of this
/// call's own beside it (`.NAME.part-UNIQUE`), synced, given `mode` when
/// given, renamed to `dest`, the directory synced. Nothing is left at either
/// name on failure. A reader failing with `InvalidData` (a [`Download`] whose
/// bytes do not match the image's sha512) is `Corrupt`.
pub fn write_file(reader: &mut impl Read, dest: &Path, mode: Option<u32>) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}{PART_MARK}{}", crate::record::new_id()?));
    let r = (|| {
        let mut out =
            File::create(&tmp).map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Err(Error::Corrupt(e.to_string()))
                }
                Err(e) => return Err(Error::io("read the image data", e)),
            };
            out.write_all(&buf[..n])
                .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        }
        out.sync_all()
            .map_err(|e| Error::io(format!("sync {}", tmp.display()), e))?;
        if let Some(mode) = mode {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(format!("chmod {}", tmp.display()), e))?;
        }
        std::fs::rename(&tmp, dest)
            .map_err(|e| Error::io(format!("rename to {}", dest.display()), e))?;
        sync_dir(dir)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Resolve an HTTP `Range` header value (`bytes=A-B`, `bytes=A-`, `bytes=-N`;
/// one range) against a size: `Ok(Some((first, last)))`, `Ok(None)` for a
/// header to ignore, `Err` for an unsatisfiable range.
pub fn resolve_range(header: &str, size: u64) -> Result<Option<(u64, u64)>> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let unsatisfiable = || {
        Error::Range(format!(
            "Requested range {header} not satisfiable for {size} bytes"
        ))
    };
    let (a, b) = spec.split_once('-').ok_or_else(unsatisfiable)?;
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| unsatisfiable());
    let (first, last) = match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, true) => return Err(unsatisfiable()),
        (true, false) => {
            let n = num(b)?;
            if n == 0 || size == 0 {
                return Err(unsatisfiable());
            }
            (size.saturating_sub(n), size - 1)
        }
        (false, true) => (num(a)?, size.saturating_sub(1)),
        (false, false) => (num(a)?, num(b)?.min(size.saturating_sub(1))),
    };
    if first >= size || first > last {
        return Err(unsatisfiable());
    }
    Ok(Some((first, last)))
}

#[cfg(test)]
mod tests {
    use super::{resolve_range, write_file};
    use crate::error::ErrorKind;

    /// Gives `good` bytes, then fails with `InvalidData` (a download whose
    /// bytes do not match the image's sha512).
    struct Failing {
        good: usize,
    }

    impl std::io::Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.good == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "image data does not match its sha512",
                ));
            }
            let n = buf.len().min(self.good).min(4096);
            buf[..n].fill(0x42);
            self.good -= n;
            Ok(n)
        }
    }

    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_written_file_appears_whole_with_its_mode_and_a_failed_one_leaves_nothing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("image.qcow2");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        write_file(&mut &data[..], &dest, Some(0o444)).unwrap();
        assert!(std::fs::read(&dest).unwrap() == data);
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        assert_eq!(names(dir.path()), ["image.qcow2"]);

        let other = dir.path().join("other.raw");
        let err = write_file(&mut Failing { good: 2 << 20 }, &other, None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert!(err.to_string().contains("sha512"), "{err}");
        assert_eq!(names(dir.path()), ["image.qcow2"]);
    }

    #[test]
    fn ranges_resolve_like_rfc_9110() {
        let ok = |h: &str, size: u64| resolve_range(h, size).unwrap();
        assert_eq!(ok("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(ok("bytes=90-", 100), Some((90, 99)));
        assert_eq!(ok("bytes=-10", 100), Some((90, 99)));
        assert_eq!(ok("bytes=-1000", 100), Some((0, 99)));
        assert_eq!(ok("bytes=50-1000", 100), Some((50, 99)));
        assert_eq!(ok("items=0-1", 100), None);
        assert_eq!(ok("bytes=0-1,5-6", 100), None);
        for bad in [
            "bytes=100-",
            "bytes=5-4",
            "bytes=-0",
            "bytes=x-1",
            "bytes=-",
        ] {
            assert!(resolve_range(bad, 100).is_err(), "{bad}");
        }
        assert!(resolve_range("bytes=0-", 0).is_err());
    }
}
