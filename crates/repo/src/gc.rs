//! Garbage collection and pruning, under an exclusive lock (restic's protocol:
//! a backup, restore or verify holds a shared lock for its whole run and reads
//! the index only once it holds it, so no running job can reference a blob that
//! gc removes, and gc never starts while one runs).
//!
//! gc keeps one copy of every blob the snapshots reach. A pack whose blobs are
//! all kept stays; one with none is removed; a mixed one is repacked: its kept
//! blobs are read (and checked) and written to new packs. Packs no index names
//! (left by cut backups) are removed. The order makes every cut safe: new packs,
//! then their index, then an index of the packs that stay; then the old index
//! files are removed, and only then the packs nothing names any more. A cut
//! leaves duplicate index entries or unreferenced packs, never a referenced blob
//! without a copy.
//!
//! prune first forgets the snapshots a retention [`Policy`] does not keep
//! (removes their snapshot files), then collects like gc. Snapshots of the
//! image registry ([`crate::tree::IMAGE_TAG`]) are never pruned.

use crate::backend::{FileType, Handle};
use crate::error::{Error, ErrorKind, Result};
use crate::id::Id;
use crate::index::{IndexBlob, IndexPack};
use crate::lock::Lock;
use crate::policy::{self, Policy, Rule, SnapshotTime};
use crate::refs::{self, Referenced};
use crate::repository::Repository;
use crate::tree::Snapshot;
use crate::writer::{write_index, BlobSaver, DEFAULT_PACK_SIZE};
use std::collections::BTreeMap;
use strata_jobs::{Cancel, Progress};

/// How to collect.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Only count what would be done.
    pub dry_run: bool,
    /// Target size of the packs a repack writes.
    pub pack_size: usize,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            pack_size: DEFAULT_PACK_SIZE,
        }
    }
}

/// What gc did (or, dry, would do).
#[derive(Debug, Clone, Copy, Default)]
pub struct GcSummary {
    /// Packs the index named before.
    pub packs: usize,
    /// Packs left as they were.
    pub packs_kept: usize,
    /// Packs removed because no kept blob is in them.
    pub packs_removed: usize,
    /// Packs whose kept blobs were moved to new packs, then removed.
    pub packs_repacked: usize,
    /// Stored packs no index named, removed.
    pub unindexed_removed: usize,
    /// New packs written by the repack.
    pub packs_written: u64,
    /// Blobs dropped (unreferenced, or a second copy).
    pub blobs_removed: u64,
    /// Blobs moved to new packs.
    pub blobs_repacked: u64,
    /// Stored bytes of the packs removed, less those of the new packs.
    pub bytes_freed: i64,
}

/// Collect garbage in `repo` under an exclusive lock.
pub fn gc(
    repo: &mut Repository,
    opts: &GcOptions,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<GcSummary> {
    let mut lock = Lock::acquire(repo, true)?;
    repo.reload_index()?;
    let snapshots = repo.snapshots()?;
    let r = collect(repo, &mut lock, &snapshots, opts, progress, cancel)?;
    lock.release()?;
    Ok(r)
}

/// One snapshot's verdict under a policy.
#[derive(Debug, Clone)]
pub struct Planned {
    pub id: Id,
    pub snapshot: Snapshot,
    pub keep: bool,
    pub reasons: Vec<Rule>,
}

/// The verdict of `policy` on each snapshot (oldest first), applied to each
/// group of snapshots with the same host and paths on its own, as restic's
/// `forget` groups by default.
pub fn plan(snapshots: &[(Id, Snapshot)], policy: &Policy) -> Vec<Planned> {
    let mut groups: BTreeMap<(String, Vec<String>), Vec<usize>> = BTreeMap::new();
    for (i, (_, s)) in snapshots.iter().enumerate() {
        groups
            .entry((s.hostname.clone(), s.paths.clone()))
            .or_default()
            .push(i);
    }
    let mut out: Vec<Option<Planned>> = vec![None; snapshots.len()];
    for members in groups.values() {
        let times: Vec<SnapshotTime> = members
            .iter()
            .map(|&i| SnapshotTime::parse(&snapshots[i].1.time))
            .collect();
        for (&i, d) in members.iter().zip(policy::apply(policy, &times)) {
            out[i] = Some(Planned {
                id: snapshots[i].0,
                snapshot: snapshots[i].1.clone(),
                keep: d.keep,
                reasons: d.reasons,
            });
        }
    }
    out.into_iter()
        .map(|p| p.expect("every snapshot is in a group"))
        .collect()
}

/// What prune decided and collected.
#[derive(Debug, Clone)]
pub struct PruneSummary {
    /// The verdict on every disk backup (image snapshots are not planned).
    pub plan: Vec<Planned>,
    /// Snapshots of the image registry, kept whatever the policy.
    pub images_kept: usize,
    pub gc: GcSummary,
}

/// Forget the snapshots `policy` does not keep, then collect, under one
/// exclusive lock. An empty policy is refused (it would keep everything, which
/// is never what a prune is run for).
pub fn prune(
    repo: &mut Repository,
    policy: &Policy,
    opts: &GcOptions,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<PruneSummary> {
    if policy.is_empty() {
        return Err(Error::new(
            ErrorKind::Invalid,
            "no keep rule given: name at least one of --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly",
        ));
    }
    let mut lock = Lock::acquire(repo, true)?;
    repo.reload_index()?;
    // Images of the registry are not backups: no retention rule applies to
    // them, they are kept until the registry deletes them.
    let (images, snapshots): (Vec<_>, Vec<_>) = repo
        .snapshots()?
        .into_iter()
        .partition(|(_, s)| s.is_image());
    let planned = plan(&snapshots, policy);
    if !opts.dry_run {
        for p in planned.iter().filter(|p| !p.keep) {
            repo.backend()
                .remove(&Handle::new(FileType::Snapshot, p.id.to_string()))?;
        }
    }
    let images_kept = images.len();
    let kept: Vec<(Id, Snapshot)> = snapshots
        .into_iter()
        .zip(&planned)
        .filter(|(_, p)| p.keep)
        .map(|(s, _)| s)
        .chain(images)
        .collect();
    let gc = collect(repo, &mut lock, &kept, opts, progress, cancel)?;
    lock.release()?;
    Ok(PruneSummary {
        plan: planned,
        images_kept,
        gc,
    })
}

/// What becomes of one pack.
enum Fate {
    Keep,
    Remove,
    Repack(Vec<IndexBlob>),
}

/// Keep what `snapshots` reference, remove the rest (the lock is held).
fn collect(
    repo: &mut Repository,
    lock: &mut Lock,
    snapshots: &[(Id, Snapshot)],
    opts: &GcOptions,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<GcSummary> {
    let used = refs::referenced(repo, snapshots)
        .map_err(|e| e.wrap("gc stopped before removing anything"))?;
    refs::require_indexed(repo, &used)
        .map_err(|e| e.wrap("gc stopped before removing anything"))?;
    let index_files = repo.index_files()?;
    let stored = repo.stored_packs()?;
    let mut packs: BTreeMap<Id, Vec<IndexBlob>> = BTreeMap::new();
    for (_, file) in &index_files {
        for p in &file.packs {
            packs.entry(p.id).or_insert_with(|| p.blobs.clone());
        }
    }
    let mut s = GcSummary {
        packs: packs.len(),
        ..GcSummary::default()
    };
    let mut fates: BTreeMap<Id, Fate> = BTreeMap::new();
    for (pack, blobs) in &packs {
        let (keep, drop): (Vec<&IndexBlob>, Vec<&IndexBlob>) =
            blobs.iter().partition(|b| is_kept(repo, &used, pack, b));
        if !stored.contains_key(pack) && !keep.is_empty() {
            return Err(Error::corrupt(format!(
                "gc stopped before removing anything: pack {pack} holds referenced blobs but is not stored (run 'strata backup verify')"
            )));
        }
        s.blobs_removed += drop.len() as u64;
        let fate = if drop.is_empty() {
            s.packs_kept += 1;
            Fate::Keep
        } else if keep.is_empty() {
            s.packs_removed += 1;
            Fate::Remove
        } else {
            s.packs_repacked += 1;
            s.blobs_repacked += keep.len() as u64;
            Fate::Repack(keep.into_iter().cloned().collect())
        };
        fates.insert(*pack, fate);
    }
    let unindexed: Vec<Id> = stored
        .keys()
        .filter(|p| !packs.contains_key(p))
        .copied()
        .collect();
    s.unindexed_removed = unindexed.len();
    let doomed: Vec<Id> = fates
        .iter()
        .filter(|(_, f)| !matches!(f, Fate::Keep))
        .map(|(p, _)| *p)
        .chain(unindexed.iter().copied())
        .collect();
    s.bytes_freed = doomed
        .iter()
        .map(|p| stored.get(p).copied().unwrap_or(0) as i64)
        .sum();
    let duplicate_listings = index_files
        .iter()
        .map(|(_, f)| f.packs.len())
        .sum::<usize>()
        != packs.len();
    if opts.dry_run || (doomed.is_empty() && !duplicate_listings) {
        return Ok(s);
    }

    // Repack: the kept blobs of mixed packs, read, checked and written anew.
    let repack_bytes: u64 = fates
        .iter()
        .filter(|(_, f)| matches!(f, Fate::Repack(_)))
        .map(|(p, _)| stored[p])
        .sum();
    progress.set_total(repack_bytes);
    let mut saver = BlobSaver::for_repack(repo, opts.pack_size);
    for (pack, fate) in &fates {
        let Fate::Repack(blobs) = fate else { continue };
        for b in blobs {
            if cancel.is_cancelled() {
                return Err(Error::new(ErrorKind::Cancelled, "gc cancelled"));
            }
            lock.refresh_if_due(repo)?;
            let plain = repo
                .load_blob(b.kind, &b.id)
                .map_err(|e| e.wrap("gc stopped before removing anything"))?;
            saver.save(b.kind, b.id, &plain)?;
        }
        progress.advance(stored[pack]);
    }
    let (_, saved) = saver.finish()?;
    s.packs_written = saved.packs;
    s.bytes_freed -= saved.new_stored_bytes as i64;

    // The packs that stay, in fresh index files; then the old ones go.
    let staying: Vec<IndexPack> = fates
        .iter()
        .filter(|(_, f)| matches!(f, Fate::Keep))
        .map(|(p, _)| IndexPack {
            id: *p,
            blobs: packs[p].clone(),
        })
        .collect();
    write_index(repo, staying)?;
    for (id, _) in &index_files {
        lock.refresh_if_due(repo)?;
        repo.backend()
            .remove(&Handle::new(FileType::Index, id.to_string()))?;
    }
    for p in &doomed {
        lock.refresh_if_due(repo)?;
        match repo
            .backend()
            .remove(&Handle::new(FileType::Data, p.to_string()))
        {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    repo.reload_index()?;
    Ok(s)
}

/// Whether `b` in `pack` is the copy of a referenced blob that gc keeps: the
/// one the in-memory index points at.
fn is_kept(repo: &Repository, used: &Referenced, pack: &Id, b: &IndexBlob) -> bool {
    used.contains(b.kind, &b.id)
        && repo
            .index()
            .get(b.kind, &b.id)
            .is_some_and(|l| l.pack == *pack && l.offset == b.offset)
}
