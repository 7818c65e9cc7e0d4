//! The chunk size of a disk backup: a power of two from 1 MiB to 8 MiB, chosen
//! per backup (4 MiB by default). It is not written anywhere of its own: a
//! disk's chunk size is the length of its first content blob, and a disk is a
//! fixed-chunk disk of that size when every blob but the last has it and the
//! last is no longer. Those lengths are in the index, so a restore, a served
//! backup, a verify and the next incremental all know the chunk size without
//! reading a pack, and restic, which ignores how a file was cut, reads such a
//! disk like any other file.

use crate::error::{Error, ErrorKind, Result};
use crate::id::Id;
use crate::pack::BlobType;
use crate::repository::Repository;
use crate::restore::disk_node;
use crate::tree::Node;
use std::fmt;

/// The size of the fixed chunks a disk is cut into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkSize(u64);

impl ChunkSize {
    /// The smallest chunk size (more blobs, a larger index and tree per disk).
    pub const MIN: ChunkSize = ChunkSize(1 << 20);
    /// The largest: restic's own chunker never makes a larger blob.
    pub const MAX: ChunkSize = ChunkSize(8 << 20);
    /// The chunk size of a backup that asks for none and has no parent.
    pub const DEFAULT: ChunkSize = ChunkSize(4 << 20);

    /// `bytes` as a chunk size: a power of two from [`ChunkSize::MIN`] to
    /// [`ChunkSize::MAX`].
    pub fn new(bytes: u64) -> Result<ChunkSize> {
        if bytes.is_power_of_two() && (Self::MIN.0..=Self::MAX.0).contains(&bytes) {
            Ok(ChunkSize(bytes))
        } else {
            Err(Error::new(
                ErrorKind::Invalid,
                format!("invalid chunk size {bytes}: it must be 1M, 2M, 4M or 8M"),
            ))
        }
    }

    /// `1M`, `2MiB`, `4m`, `8388608` (bytes without a suffix; `K`/`M` suffixes
    /// are binary).
    pub fn parse(s: &str) -> Result<ChunkSize> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        let digits = lower.trim_end_matches("ib").trim_end_matches('b');
        let (num, shift) = match digits.strip_suffix('m') {
            Some(n) => (n, 20),
            None => match digits.strip_suffix('k') {
                Some(n) => (n, 10),
                None => (digits, 0),
            },
        };
        let bytes = num
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(1 << shift))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Invalid,
                    format!("invalid chunk size '{s}': expected 1M, 2M, 4M or 8M"),
                )
            })?;
        Self::new(bytes)
    }

    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// The number of chunks of a disk of `size` bytes.
    pub fn count(self, size: u64) -> u64 {
        size.div_ceil(self.0)
    }

    /// The disk offset of chunk `i`.
    pub fn offset(self, i: u64) -> u64 {
        i * self.0
    }

    /// The length of chunk `i` of a disk of `size` bytes (the last one shorter).
    pub fn len(self, size: u64, i: u64) -> u64 {
        self.0.min(size - self.offset(i))
    }

    /// The chunks that hold any byte of `len` bytes at `offset`.
    pub fn covering(self, offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / self.0..offset.saturating_add(len).div_ceil(self.0)
    }

    /// Every chunk size, smallest first.
    fn all() -> impl Iterator<Item = ChunkSize> {
        (Self::MIN.0.trailing_zeros()..=Self::MAX.0.trailing_zeros()).map(|b| ChunkSize(1 << b))
    }
}

impl fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.0 >> 20)
    }
}

/// The chunk size under which `node` is a fixed-chunk disk, read from its
/// blobs' lengths in the index (no pack is read). A disk of one chunk fits
/// every chunk size at least as long as it: then `prefer` when it fits, else
/// the smallest that does. `None` for any other file (content-defined chunks,
/// as restic cuts them, or a blob the index does not name).
pub fn fixed_chunk_size(repo: &Repository, node: &Node, prefer: ChunkSize) -> Option<ChunkSize> {
    let content = node.content.as_deref().unwrap_or_default();
    let len_of = |id: &Id| {
        repo.index()
            .get(BlobType::Data, id)
            .map(|l| l.plain_length())
    };
    let fits = |c: ChunkSize| {
        content.len() as u64 == c.count(node.size)
            && content
                .iter()
                .enumerate()
                .all(|(i, id)| len_of(id) == Some(c.len(node.size, i as u64)))
    };
    match content.first() {
        Some(first) if content.len() > 1 => {
            ChunkSize::new(len_of(first)?).ok().filter(|&c| fits(c))
        }
        _ => std::iter::once(prefer)
            .chain(ChunkSize::all())
            .find(|&c| fits(c)),
    }
}

/// The chunk size a new backup uses, and whether it may reuse its parent's
/// chunks unread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkPlan {
    pub size: ChunkSize,
    /// Why the parent's chunks cannot stand for unchanged ones (it was cut in
    /// other chunks than the ones asked for), so everything must be read.
    pub full_read: Option<String>,
}

/// The chunks of a backup whose parent is `parent`: the size `requested`,
/// else the parent's (so its unchanged chunks are reused or deduplicated),
/// else [`ChunkSize::DEFAULT`]. A parent that is no fixed-chunk disk (one
/// restic backed up) only gives no size.
pub fn plan(
    repo: &Repository,
    parent: Option<&Id>,
    requested: Option<ChunkSize>,
) -> Result<ChunkPlan> {
    let wanted = requested.unwrap_or(ChunkSize::DEFAULT);
    let Some(parent) = parent else {
        return Ok(ChunkPlan {
            size: wanted,
            full_read: None,
        });
    };
    let snap = repo.load_snapshot(parent)?;
    let theirs = disk_node(repo, &snap)
        .ok()
        .and_then(|node| fixed_chunk_size(repo, &node, wanted));
    Ok(match (theirs, requested) {
        (Some(p), Some(r)) if p != r => ChunkPlan {
            size: r,
            full_read: Some(format!(
                "the parent snapshot {} is in {p} chunks and {r} chunks were asked for",
                parent.short()
            )),
        },
        (Some(p), _) => ChunkPlan {
            size: p,
            full_read: None,
        },
        (None, _) => ChunkPlan {
            size: wanted,
            full_read: None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_powers_of_two_from_1_to_8_mib() {
        for (text, mib) in [
            ("1M", 1),
            ("2MiB", 2),
            ("4m", 4),
            ("8388608", 8),
            ("1024K", 1),
        ] {
            assert_eq!(ChunkSize::parse(text).unwrap().bytes(), mib << 20, "{text}");
        }
        for bad in [
            "3M",
            "512K",
            "16M",
            "0",
            "",
            "M",
            "x",
            "99999999999999999999M",
        ] {
            let e = ChunkSize::parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Invalid, "{bad}");
        }
        let all: Vec<u64> = ChunkSize::all().map(|c| c.bytes() >> 20).collect();
        assert_eq!(all, [1, 2, 4, 8]);
        assert_eq!(ChunkSize::DEFAULT.to_string(), "4 MiB");
    }

    #[test]
    fn chunks_cover_a_disk_with_a_shorter_last_one() {
        let c = ChunkSize::MIN;
        let size = 5 * c.bytes() + 7;
        assert_eq!(c.count(size), 6);
        assert_eq!(c.len(size, 4), c.bytes());
        assert_eq!(c.len(size, 5), 7);
        assert_eq!(c.covering(c.bytes() - 1, 2), 0..2);
        assert_eq!(c.covering(2 * c.bytes(), c.bytes()), 2..3);
        assert_eq!(c.covering(0, 0), 0..0);
    }
}
