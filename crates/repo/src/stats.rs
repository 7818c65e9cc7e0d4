//! How much the repository holds and how well it deduplicates and compresses.

use crate::backend::FileType;
use crate::error::Result;
use crate::lock::Lock;
use crate::pack::BlobType;
use crate::refs;
use crate::repository::Repository;

/// Sizes of a repository.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub snapshots: usize,
    /// The sum of every snapshot's file sizes (what restoring them all writes).
    pub logical_bytes: u64,
    /// Distinct data blobs the snapshots reference.
    pub unique_blobs: u64,
    /// Their plaintext bytes.
    pub unique_bytes: u64,
    /// Their stored bytes (compressed and sealed).
    pub stored_bytes: u64,
    /// Every file of the repository (packs, indexes, snapshots, keys, locks),
    /// referenced or not.
    pub repository_bytes: u64,
    /// `logical_bytes / unique_bytes`.
    pub dedup_factor: f64,
    /// `unique_bytes / stored_bytes`.
    pub compression_factor: f64,
}

/// Measure `repo` under a shared lock.
pub fn stats(repo: &mut Repository) -> Result<Stats> {
    let lock = Lock::acquire(repo, false)?;
    repo.reload_index()?;
    let snapshots = repo.snapshots()?;
    let used = refs::referenced(repo, &snapshots)?;
    refs::require_indexed(repo, &used)?;
    let mut s = Stats {
        snapshots: snapshots.len(),
        logical_bytes: used.logical_bytes,
        unique_blobs: used.data.len() as u64,
        ..Stats::default()
    };
    for id in &used.data {
        let loc = repo
            .index()
            .get(BlobType::Data, id)
            .expect("require_indexed checked it");
        s.unique_bytes += loc.plain_length();
        s.stored_bytes += u64::from(loc.length);
    }
    for kind in [FileType::Config]
        .into_iter()
        .chain(FileType::DIRS.iter().copied())
    {
        s.repository_bytes += repo
            .backend()
            .list(kind)?
            .iter()
            .map(|(_, n)| n)
            .sum::<u64>();
    }
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    s.dedup_factor = ratio(s.logical_bytes, s.unique_bytes);
    s.compression_factor = ratio(s.unique_bytes, s.stored_bytes);
    lock.release()?;
    Ok(s)
}
