//! Verify a repository: every snapshot's trees load and every blob they reference
//! is indexed; then the packs (all, or a sample) are read again, their names
//! checked against the SHA-256 of their bytes, their headers against the index,
//! and every blob authenticated, decompressed and hashed. Each damaged blob is
//! reported with its pack, its offset in the pack, and the snapshots, files and
//! file offsets it breaks.

use crate::backend::{FileType, Handle};
use crate::error::{Error, ErrorKind, Result};
use crate::id::Id;
use crate::index::{BlobLocation, IndexBlob};
use crate::lock::Lock;
use crate::pack::{self, BlobType};
use crate::refs::{self, BlobUse};
use crate::repository::Repository;
use std::collections::{BTreeMap, HashSet};
use strata_jobs::{Cancel, Progress};

/// Which packs to read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Subset {
    /// Every pack.
    All,
    /// No pack data, only the snapshots, trees and index.
    None,
    /// Part `n` of `of` (1-based), as restic's `--read-data-subset n/t`: the packs
    /// whose ID's first byte is `n - 1` modulo `of`. Reading parts 1 to `of` in
    /// turn covers every pack once.
    Part { n: u32, of: u32 },
    /// About this percentage of the packs, chosen at random.
    Percent(f64),
}

impl Subset {
    /// `n/t` or `P%` as restic writes them.
    pub fn parse(s: &str) -> Result<Subset> {
        let bad = || {
            Error::new(
                ErrorKind::Invalid,
                format!(
                    "invalid subset '{s}': expected n/t (1 <= n <= t) or a percentage like 10%"
                ),
            )
        };
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad());
            }
            return Ok(Subset::Percent(p));
        }
        let (n, of) = s.split_once('/').ok_or_else(bad)?;
        let (n, of): (u32, u32) = (
            n.trim().parse().map_err(|_| bad())?,
            of.trim().parse().map_err(|_| bad())?,
        );
        if n == 0 || n > of {
            return Err(bad());
        }
        Ok(Subset::Part { n, of })
    }

    fn select(&self, packs: &[Id]) -> Result<Vec<Id>> {
        Ok(match *self {
            Subset::All => packs.to_vec(),
            Subset::None => Vec::new(),
            Subset::Part { n, of } => packs
                .iter()
                .filter(|p| u32::from(p.0[0]) % of == n - 1)
                .copied()
                .collect(),
            Subset::Percent(pct) => {
                let want = ((packs.len() as f64) * pct / 100.0).ceil() as usize;
                let mut keyed: Vec<(u64, Id)> = Vec::with_capacity(packs.len());
                for p in packs {
                    let mut r = [0u8; 8];
                    crate::crypto::fill_random(&mut r)?;
                    keyed.push((u64::from_le_bytes(r), *p));
                }
                keyed.sort();
                keyed.into_iter().take(want).map(|(_, p)| p).collect()
            }
        })
    }
}

/// One thing found wrong.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The pack it is in (`None` for a tree missing from the index).
    pub pack: Option<Id>,
    /// The damaged or missing blob, if the problem is one blob's.
    pub blob: Option<(BlobType, Id)>,
    /// Where the blob starts in its pack.
    pub pack_offset: Option<u64>,
    pub error: String,
    /// What it breaks: snapshots, files and file offsets using the blob.
    pub users: Vec<BlobUse>,
}

/// What a verify found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub snapshots: usize,
    /// Packs the index names.
    pub packs: usize,
    pub packs_read: usize,
    pub blobs_checked: u64,
    pub bytes_read: u64,
    /// Packs stored but named by no index (left by cut backups; gc removes them).
    pub unindexed_packs: usize,
    pub problems: Vec<Problem>,
}

/// Verify `repo` under a shared lock, reading the packs `subset` selects.
pub fn verify(
    repo: &mut Repository,
    subset: Subset,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<VerifyReport> {
    let mut lock = Lock::acquire(repo, false)?;
    repo.reload_index()?;
    let report = run(repo, &mut lock, subset, progress, cancel)?;
    lock.release()?;
    Ok(report)
}

fn run(
    repo: &Repository,
    lock: &mut Lock,
    subset: Subset,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<VerifyReport> {
    let snapshots = repo.snapshots()?;
    let mut report = VerifyReport {
        snapshots: snapshots.len(),
        ..VerifyReport::default()
    };
    // Structure: trees load, referenced data blobs are indexed.
    let (used, broken_trees) = refs::referenced_lenient(repo, &snapshots);
    for (tree, e) in broken_trees {
        report.problems.push(Problem {
            pack: repo.index().get(BlobType::Tree, &tree).map(|l| l.pack),
            blob: Some((BlobType::Tree, tree)),
            pack_offset: repo.index().get(BlobType::Tree, &tree).map(|l| l.offset),
            error: e.to_string(),
            users: Vec::new(),
        });
    }
    let mut missing: Vec<&Id> = used
        .data
        .iter()
        .filter(|id| !repo.index().contains(BlobType::Data, id))
        .collect();
    missing.sort();
    for id in missing {
        report.problems.push(Problem {
            pack: None,
            blob: Some((BlobType::Data, *id)),
            pack_offset: None,
            error: format!("data blob {id} is referenced but missing from the index"),
            users: Vec::new(),
        });
    }

    // Packs: the index's view of each, and what is stored.
    let mut indexed: BTreeMap<Id, Vec<IndexBlob>> = BTreeMap::new();
    for (_, file) in repo.index_files()? {
        for p in file.packs {
            indexed.entry(p.id).or_insert(p.blobs);
        }
    }
    let stored = repo.stored_packs()?;
    report.packs = indexed.len();
    report.unindexed_packs = stored.keys().filter(|p| !indexed.contains_key(p)).count();
    for (pack, blobs) in &indexed {
        if !stored.contains_key(pack) {
            for b in blobs {
                report.problems.push(Problem {
                    pack: Some(*pack),
                    blob: Some((b.kind, b.id)),
                    pack_offset: Some(b.offset),
                    error: format!("pack {pack} is in the index but not stored"),
                    users: Vec::new(),
                });
            }
        }
    }
    let present: Vec<Id> = indexed
        .keys()
        .filter(|p| stored.contains_key(p))
        .copied()
        .collect();
    let selected = subset.select(&present)?;
    progress.set_total(selected.iter().map(|p| stored[p]).sum());
    for pack in selected {
        if cancel.is_cancelled() {
            return Err(Error::new(ErrorKind::Cancelled, "verify cancelled"));
        }
        lock.refresh_if_due(repo)?;
        let size = stored[&pack];
        check_pack(repo, &pack, &indexed[&pack], &mut report)?;
        report.packs_read += 1;
        report.bytes_read += size;
        progress.advance(size);
    }

    // What the damaged blobs break.
    let bad: HashSet<Id> = report
        .problems
        .iter()
        .filter_map(|p| p.blob.map(|(_, id)| id))
        .collect();
    if !bad.is_empty() {
        let users = refs::users(repo, &snapshots, &bad);
        for p in &mut report.problems {
            if let Some((_, id)) = p.blob {
                p.users = users.get(&id).cloned().unwrap_or_default();
            }
        }
    }
    Ok(report)
}

/// Read one pack and check it against its name, its header and the index.
fn check_pack(
    repo: &Repository,
    pack: &Id,
    blobs: &[IndexBlob],
    report: &mut VerifyReport,
) -> Result<()> {
    let h = Handle::new(FileType::Data, pack.to_string());
    let bytes = match repo.backend().read(&h) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::Io => {
            report.problems.push(Problem {
                pack: Some(*pack),
                blob: None,
                pack_offset: None,
                error: format!("{h}: {e}"),
                users: Vec::new(),
            });
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let pack_problem = |error: String| Problem {
        pack: Some(*pack),
        blob: None,
        pack_offset: None,
        error,
        users: Vec::new(),
    };
    if Id::hash(&bytes) != *pack {
        report.problems.push(pack_problem(format!(
            "pack {pack}: its content does not match its name (the file was changed)"
        )));
    }
    match pack::parse_header(repo.key(), &bytes) {
        Ok(header) => {
            let mut listed: Vec<(Id, u64, u32)> =
                header.iter().map(|b| (b.id, b.offset, b.length)).collect();
            let mut want: Vec<(Id, u64, u32)> =
                blobs.iter().map(|b| (b.id, b.offset, b.length)).collect();
            listed.sort();
            want.sort();
            if listed != want {
                report.problems.push(pack_problem(format!(
                    "pack {pack}: its header lists other blobs than the index"
                )));
            }
        }
        Err(e) => report
            .problems
            .push(pack_problem(format!("pack {pack}: {e}"))),
    }
    for b in blobs {
        report.blobs_checked += 1;
        let loc = BlobLocation {
            pack: *pack,
            offset: b.offset,
            length: b.length,
            uncompressed_length: b.uncompressed_length,
        };
        let sealed = usize::try_from(b.offset)
            .ok()
            .and_then(|o| bytes.get(o..o.checked_add(b.length as usize)?));
        let r = match sealed {
            Some(sealed) => repo.open_blob(&b.id, &loc, sealed).map(drop),
            None => Err(Error::corrupt(format!(
                "blob {} (pack {pack}, offset {}): lies past the end of the pack",
                b.id, b.offset
            ))),
        };
        if let Err(e) = r {
            report.problems.push(Problem {
                pack: Some(*pack),
                blob: Some((b.kind, b.id)),
                pack_offset: Some(b.offset),
                error: e.to_string(),
                users: Vec::new(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_parse_as_restic_writes_them_and_parts_cover_every_pack_once() {
        assert_eq!(Subset::parse("2/5").unwrap(), Subset::Part { n: 2, of: 5 });
        assert_eq!(Subset::parse("10%").unwrap(), Subset::Percent(10.0));
        for bad in ["0/3", "4/3", "x/3", "3", "0%", "101%", ""] {
            assert!(Subset::parse(bad).is_err(), "{bad}");
        }
        let packs: Vec<Id> = (0..200u32).map(|i| Id::hash(&i.to_le_bytes())).collect();
        let mut seen = Vec::new();
        for n in 1..=3 {
            seen.extend(Subset::Part { n, of: 3 }.select(&packs).unwrap());
        }
        seen.sort();
        let mut all = packs.clone();
        all.sort();
        assert_eq!(seen, all);
        assert_eq!(Subset::Percent(10.0).select(&packs).unwrap().len(), 20);
    }
}
