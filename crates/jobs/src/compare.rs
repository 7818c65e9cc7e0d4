//! `compare`: whether two images (with their chains) show the guest the same bytes,
//! with qemu-img's rules: a size difference is only a warning unless strict, the
//! longer image's tail must read as zeroes, and strict mode also requires the same
//! allocation status everywhere.

use crate::status::{ChainStatus, Walk};
use crate::{Cancel, Progress, Result};

/// Bytes compared per read.
const CHUNK: u64 = 2 << 20;
/// Mismatches are reported at this granularity, as qemu-img reports them.
const SECTOR: u64 = 512;

/// The answer of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Identical {
        /// The sizes differ (the tail of the longer image reads as zeroes).
        size_mismatch: bool,
    },
    /// Strict mode: the sizes differ.
    StrictSizeMismatch,
    /// Strict mode: allocation status differs at this offset.
    StrictStatusMismatch { offset: u64 },
    /// The contents differ first in the 512-byte sector at this offset.
    /// `size_mismatch`: the difference is in the longer image's tail (qemu-img
    /// warns about the sizes first).
    ContentMismatch { offset: u64, size_mismatch: bool },
}

/// Compare the guest view of `a` and `b`.
pub fn compare(
    a: &ChainStatus,
    b: &ChainStatus,
    strict: bool,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<Outcome> {
    let (sa, sb) = (a.virtual_size(), b.virtual_size());
    let size_mismatch = sa != sb;
    if size_mismatch && strict {
        return Ok(Outcome::StrictSizeMismatch);
    }
    let min = sa.min(sb);
    progress.set_total(sa.max(sb));
    let mut buf_a = vec![0u8; CHUNK as usize];
    let mut buf_b = vec![0u8; CHUNK as usize];
    // The size warning comes with a mismatch only when it lies in the tail.
    let mismatch = |offset| Outcome::ContentMismatch {
        offset,
        size_mismatch: false,
    };
    let tail_mismatch = |offset| Outcome::ContentMismatch {
        offset,
        size_mismatch: true,
    };
    let mut off = 0;
    while off < min {
        cancel.check()?;
        let s1 = a.status(off, min - off, Walk::Allocated)?;
        let s2 = b.status(off, min - off, Walk::Allocated)?;
        let mut chunk = s1.len.min(s2.len);
        if strict && s1.flags() != s2.flags() {
            return Ok(Outcome::StrictStatusMismatch { offset: off });
        }
        if s1.zero && s2.zero {
            // Both read as zeroes.
        } else if s1.allocated == s2.allocated {
            if s1.allocated {
                chunk = chunk.min(CHUNK);
                let n = chunk as usize;
                a.reader().read(&mut buf_a[..n], off)?;
                b.reader().read(&mut buf_b[..n], off)?;
                if let Some(i) = first_difference(&buf_a[..n], &buf_b[..n]) {
                    return Ok(mismatch(off + i / SECTOR * SECTOR));
                }
            }
        } else {
            chunk = chunk.min(CHUNK);
            let side = if s1.allocated { a } else { b };
            if let Some(i) = first_nonzero(side, off, chunk, &mut buf_a)? {
                return Ok(mismatch(off + i / SECTOR * SECTOR));
            }
        }
        off += chunk;
        progress.advance(chunk);
    }
    // The longer image's tail must read as zeroes.
    let (longer, max) = if sa > sb { (a, sa) } else { (b, sb) };
    while off < max {
        cancel.check()?;
        let s = longer.status(off, max - off, Walk::Allocated)?;
        let mut chunk = s.len;
        if s.allocated && !s.zero {
            chunk = chunk.min(CHUNK);
            if let Some(i) = first_nonzero(longer, off, chunk, &mut buf_a)? {
                return Ok(tail_mismatch(off + i / SECTOR * SECTOR));
            }
        }
        off += chunk;
        progress.advance(chunk);
    }
    Ok(Outcome::Identical { size_mismatch })
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    if a == b {
        return None;
    }
    a.iter().zip(b).position(|(x, y)| x != y).map(|i| i as u64)
}

fn first_nonzero(c: &ChainStatus, off: u64, len: u64, buf: &mut [u8]) -> Result<Option<u64>> {
    let n = len as usize;
    c.reader().read(&mut buf[..n], off)?;
    Ok(buf[..n].iter().position(|&x| x != 0).map(|i| i as u64))
}
