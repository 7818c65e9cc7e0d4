//! The repository operations as `strata backup` and `strata serve` run them:
//! typed arguments in, the library's summaries out, and the one JSON form of
//! each result (what `--output=json` prints and the HTTP API answers).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use strata_format::Format;
use strata_jobs::{Cancel, Progress};

use crate::chunk::{self, ChunkSize};
use crate::disk::{self, BackupOptions, BackupSummary, DiskSource, Incremental};
use crate::error::{Error, ErrorKind, Result};
use crate::gc::{GcSummary, Planned, PruneSummary};
use crate::id::Id;
use crate::image_bitmap;
use crate::repository::Repository;
use crate::restore::{self, RestoreOptions, RestoreSummary};
use crate::stats::Stats;
use crate::tree::Snapshot;
use crate::verify::{Problem, Subset, VerifyReport};

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::Invalid, msg)
}

/// A repository password from a file: its content with surrounding whitespace
/// (the newline) trimmed.
pub fn read_password_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Io,
                format!("could not read the password file '{}'", path.display()),
                e,
            )
        })
}

/// `0,5-9` → {0, 5, 6, 7, 8, 9}: chunk indexes and inclusive ranges.
pub fn parse_chunk_list(s: &str) -> Result<BTreeSet<u64>> {
    let mut out = BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || {
            invalid(format!(
                "invalid chunk list '{s}': expected indexes and ranges like 0,5-9"
            ))
        };
        let (a, b): (u64, u64) = match part.split_once('-') {
            Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
            None => {
                let v = part.parse().map_err(|_| bad())?;
                (v, v)
            }
        };
        if a > b {
            return Err(bad());
        }
        out.extend(a..=b);
    }
    Ok(out)
}

/// A backup of one disk image file.
#[derive(Debug, Clone, Default)]
pub struct ImageBackup {
    pub image: PathBuf,
    /// Its format; probed when `None`.
    pub format: Option<Format>,
    /// Read an image another process holds for writing.
    pub force_share: bool,
    /// The parent snapshot (an ID prefix or `latest`).
    pub parent: Option<String>,
    /// With `parent`: only these chunks (of the parent's chunk size) changed;
    /// the others reuse the parent's.
    pub changed_chunks: Option<BTreeSet<u64>>,
    pub tags: Vec<String>,
    /// The chunk size; the parent's, else the default, when `None`. Another
    /// size than the parent's reads everything, even with `changed_chunks`.
    pub chunk_size: Option<ChunkSize>,
    /// With `parent`: read only the chunks this persistent qcow2 bitmap of the
    /// image marks, and clear it once the snapshot is stored
    /// ([`crate::image_bitmap`]); not with `force_share` or `changed_chunks`.
    pub bitmap: Option<String>,
}

/// Back up an image as [`ImageBackup`] says; returns the options used (the
/// snapshot's file name among them) and what the backup did (with the reason
/// when changed chunks were given but everything was read).
pub fn backup_image(
    repo: &mut Repository,
    args: &ImageBackup,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<(BackupOptions, BackupSummary)> {
    if args.changed_chunks.is_some() && args.parent.is_none() {
        return Err(invalid("a list of changed chunks needs a parent".into()));
    }
    if let Some(name) = &args.bitmap {
        bitmap_args_fit(args, name)?;
    }
    let mut opts = BackupOptions::for_image(&args.image);
    opts.tags = args.tags.clone();
    opts.parent = match &args.parent {
        Some(p) => Some(repo.find_snapshot(p)?.0),
        None => None,
    };
    let plan = chunk::plan(repo, opts.parent.as_ref(), args.chunk_size)?;
    opts.chunk_size = plan.size;
    if let Some(name) = &args.bitmap {
        return image_bitmap::backup(repo, args, name, opts, plan, progress, cancel);
    }
    let src = DiskSource::open(&args.image, args.format, args.force_share)?;
    let full_read = match (opts.parent, &args.changed_chunks) {
        (Some(parent), Some(changed)) if plan.full_read.is_none() => {
            opts.incremental = Some(Incremental {
                parent,
                changed: changed.clone(),
            });
            None
        }
        (_, Some(_)) => plan.full_read,
        (_, None) => None,
    };
    let mut s = disk::backup(repo, &src, &opts, progress, cancel)?;
    s.full_read = full_read;
    Ok((opts, s))
}

/// Refuse a bitmap backup without a parent, of an image another process may
/// write (`force_share`), or with a list of changed chunks besides.
fn bitmap_args_fit(args: &ImageBackup, name: &str) -> Result<()> {
    if args.parent.is_none() {
        return Err(invalid(format!(
            "bitmap '{name}' needs a parent snapshot: the one its changes are counted from (e.g. latest)"
        )));
    }
    if args.force_share {
        return Err(invalid(format!(
            "bitmap '{name}' cannot be used with force-share: strata must hold the image's write \
             lock from reading the bitmap to clearing it, and another process may be writing it"
        )));
    }
    if args.changed_chunks.is_some() {
        return Err(invalid(
            "a bitmap and a list of changed chunks exclude each other".into(),
        ));
    }
    Ok(())
}

/// A backup's result: the snapshot's file name and ID and the counts.
pub fn backup_json(name: &str, s: &BackupSummary) -> Value {
    json!({
        "name": name,
        "snapshot": s.snapshot.to_string(),
        "short_id": s.snapshot.short(),
        "size": s.size,
        "chunk_size": s.chunk_size.bytes(),
        "chunks": s.chunks,
        "zero_chunks": s.zero_chunks,
        "reused_chunks": s.reused_chunks,
        "bytes_read": s.bytes_read,
        "new_blobs": s.saved.new_blobs,
        "new_stored_bytes": s.saved.new_stored_bytes,
        "full_read": s.full_read,
        "bitmap_cleared": s.bitmap_cleared,
    })
}

/// The output format of a restore: `raw` (the default) or `qcow2`.
pub fn restore_format(name: Option<&str>) -> Result<Format> {
    match name.unwrap_or("raw") {
        "raw" => Ok(Format::Raw),
        "qcow2" => Ok(Format::Qcow2),
        o => Err(invalid(format!(
            "output format must be raw or qcow2, not '{o}'"
        ))),
    }
}

/// Restore the disk of snapshot `spec` (an ID prefix or `latest`) to `output`.
pub fn restore_snapshot(
    repo: &mut Repository,
    spec: &str,
    output: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<(Id, RestoreSummary)> {
    let (id, snap) = repo.find_snapshot(spec)?;
    let s = restore::restore_with(repo, &snap, output, opts, progress, cancel)?;
    Ok((id, s))
}

/// A restore's result.
pub fn restore_json(id: &Id, output: &Path, s: &RestoreSummary) -> Value {
    json!({
        "snapshot": id.to_string(),
        "short_id": id.short(),
        "output": output.display().to_string(),
        "size": s.size,
        "bytes_written": s.bytes_written,
    })
}

/// The snapshot list in restic's `snapshots --json` shape (with `id` and
/// `short_id`).
pub fn snapshots_json(snaps: &[(Id, Snapshot)]) -> Value {
    Value::Array(
        snaps
            .iter()
            .map(|(id, s)| {
                let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
                v["id"] = id.to_string().into();
                v["short_id"] = id.short().into();
                v
            })
            .collect(),
    )
}

/// What a verify reads: a subset (`n/t` or `P%`), nothing (`no_read_data`), or
/// every pack.
pub fn verify_subset(read_data_subset: Option<&str>, no_read_data: bool) -> Result<Subset> {
    match (read_data_subset, no_read_data) {
        (Some(_), true) => Err(invalid(
            "read_data_subset and no_read_data exclude each other".into(),
        )),
        (Some(s), false) => Subset::parse(s),
        (None, true) => Ok(Subset::None),
        (None, false) => Ok(Subset::All),
    }
}

fn problem_json(p: &Problem) -> Value {
    let users: Vec<Value> = p
        .users
        .iter()
        .map(|u| json!({"snapshot": u.snapshot.to_string(), "path": u.path, "offset": u.offset}))
        .collect();
    json!({
        "pack": p.pack.map(|id| id.to_string()),
        "blob": p.blob.map(|(_, id)| id.to_string()),
        "type": p.blob.map(|(k, _)| format!("{k:?}").to_lowercase()),
        "pack_offset": p.pack_offset,
        "error": p.error,
        "breaks": users,
    })
}

/// A verify's report.
pub fn verify_json(r: &VerifyReport) -> Value {
    let problems: Vec<Value> = r.problems.iter().map(problem_json).collect();
    json!({
        "snapshots": r.snapshots,
        "packs": r.packs,
        "packs_read": r.packs_read,
        "blobs_checked": r.blobs_checked,
        "bytes_read": r.bytes_read,
        "unindexed_packs": r.unindexed_packs,
        "problems": problems,
    })
}

/// What a gc did (or would do).
pub fn gc_json(s: &GcSummary) -> Value {
    json!({
        "packs": s.packs,
        "packs_kept": s.packs_kept,
        "packs_removed": s.packs_removed,
        "packs_repacked": s.packs_repacked,
        "unindexed_packs_removed": s.unindexed_removed,
        "packs_written": s.packs_written,
        "blobs_removed": s.blobs_removed,
        "blobs_repacked": s.blobs_repacked,
        "bytes_freed": s.bytes_freed,
    })
}

fn planned_json(p: &Planned) -> Value {
    let reasons: Vec<&str> = p.reasons.iter().map(|r| r.reason()).collect();
    json!({
        "id": p.id.to_string(),
        "short_id": p.id.short(),
        "time": p.snapshot.time,
        "hostname": p.snapshot.hostname,
        "paths": p.snapshot.paths,
        "keep": p.keep,
        "reasons": reasons,
    })
}

/// A prune's plan (each snapshot kept or removed, and why) and its gc.
pub fn prune_json(s: &PruneSummary, dry_run: bool) -> Value {
    let plan: Vec<Value> = s.plan.iter().map(planned_json).collect();
    json!({"dry_run": dry_run, "snapshots": plan, "images_kept": s.images_kept, "gc": gc_json(&s.gc)})
}

/// A repository's sizes.
pub fn stats_json(s: &Stats) -> Value {
    json!({
        "snapshots": s.snapshots,
        "logical_bytes": s.logical_bytes,
        "unique_blobs": s.unique_blobs,
        "unique_bytes": s.unique_bytes,
        "stored_bytes": s.stored_bytes,
        "repository_bytes": s.repository_bytes,
        "dedup_factor": s.dedup_factor,
        "compression_factor": s.compression_factor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_lists_take_indexes_and_ranges_and_refuse_reversed_ones() {
        let got: Vec<u64> = parse_chunk_list("0, 5-7,3").unwrap().into_iter().collect();
        assert_eq!(got, [0, 3, 5, 6, 7]);
        for bad in ["x", "3-1", "1-", "-1"] {
            let e = parse_chunk_list(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Invalid, "{bad}");
        }
    }

    #[test]
    fn a_verify_subset_and_no_read_data_exclude_each_other() {
        assert_eq!(verify_subset(None, false).unwrap(), Subset::All);
        assert_eq!(verify_subset(None, true).unwrap(), Subset::None);
        assert_eq!(
            verify_subset(Some("1/2"), false).unwrap(),
            Subset::Part { n: 1, of: 2 }
        );
        let e = verify_subset(Some("1/2"), true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
    }
}
