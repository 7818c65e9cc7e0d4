//! Downloads: the data of an active image, whole (verified against its
//! SHA-512 as it streams) or a byte range.

use std::io::Read;

use sha2::{Digest, Sha512};

use crate::error::{Error, Result};
use crate::record::{hex, ImageRecord, Status};
use crate::store::Registry;

/// A reader over an image's data. A whole-image reader hashes what it returns
/// and, at the end, fails with `InvalidData` instead of reporting EOF if the
/// bytes differ from the recorded `os_hash_value`, so a consumer that reads to
/// the end never takes damaged data for good data.
pub struct Download {
    file: Box<dyn Read + Send>,
    verify: Option<(Sha512, String)>,
    len: u64,
}

impl Download {
    /// Bytes this reader returns.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        if let Some((sha, want)) = &mut self.verify {
            if n > 0 {
                sha.update(&buf[..n]);
            } else if !buf.is_empty() {
                let got = hex(&std::mem::take(sha).finalize());
                if &got != want {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("image data does not match its sha512 {want} (read {got})"),
                    ));
                }
                self.verify = None;
            }
        }
        Ok(n)
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
        let (start, len, verify) = match range {
            None => (
                0,
                size,
                rec.os_hash_value.clone().map(|h| (Sha512::new(), h)),
            ),
            Some((a, b)) => (a, b - a + 1, None),
        };
        let file = self.data().reader(id, size, start, len)?;
        Ok((rec, Download { file, verify, len }))
    }
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
    use super::resolve_range;

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
