//! `strata backup verify|prune|gc|stats`: the repository's upkeep, with human and
//! JSON output and a progress bar on the long parts.

use super::{bar, wants_json, GcArgs, PruneArgs, StatsArgs, VerifyArgs};
use anyhow::{bail, Result};
use strata_jobs::Cancel;
use strata_repo::gc::{self, GcOptions, GcSummary};
use strata_repo::ops;
use strata_repo::policy::Policy;
use strata_repo::stats as repo_stats;
use strata_repo::verify::{self, Problem};

pub(super) fn verify(a: VerifyArgs) -> Result<()> {
    let json = wants_json(&a.output)?;
    let subset = ops::verify_subset(a.read_data_subset.as_deref(), a.no_read_data)?;
    let mut repo = a.repo.open()?;
    let bar = bar();
    let r = verify::verify(&mut repo, subset, &bar, &Cancel::default())?;
    bar.finish();
    if json {
        println!("{}", ops::verify_json(&r));
    } else {
        for p in &r.problems {
            print_problem(p);
        }
        println!(
            "{} snapshots, {} packs: {} read ({} bytes, {} blobs checked); {} packs no index names",
            r.snapshots, r.packs, r.packs_read, r.bytes_read, r.blobs_checked, r.unindexed_packs
        );
    }
    if !r.problems.is_empty() {
        bail!(
            "the repository is damaged: {} problems found",
            r.problems.len()
        );
    }
    if !json {
        println!("no errors were found");
    }
    Ok(())
}

/// One problem: where it is (the blob, its pack and offset), unless the
/// error's own words already name them, then what is wrong and what it breaks.
fn print_problem(p: &Problem) {
    let named = |id: String| p.error.contains(&id);
    let mut place = Vec::new();
    if let Some((kind, id)) = p.blob.filter(|(_, id)| !named(id.to_string())) {
        place.push(format!("{} blob {id}", format!("{kind:?}").to_lowercase()));
    }
    if let Some(pack) = p.pack.filter(|pack| !named(pack.to_string())) {
        place.push(format!("in pack {pack}"));
        if let Some(o) = p.pack_offset {
            place.push(format!("at offset {o}"));
        }
    }
    if place.is_empty() {
        println!("error: {}", p.error);
    } else {
        println!("error: {}: {}", place.join(" "), p.error);
    }
    for u in &p.users {
        match u.offset {
            Some(o) => println!(
                "  breaks snapshot {} file {} at offset {o}",
                u.snapshot.short(),
                u.path
            ),
            None => println!("  breaks snapshot {} at {}", u.snapshot.short(), u.path),
        }
    }
}

fn print_gc(s: &GcSummary, dry_run: bool) {
    let did = |word: &str| {
        if dry_run {
            format!("would be {word}")
        } else {
            word.to_string()
        }
    };
    println!(
        "{} packs: {} kept, {} {}, {} {} into {} new; {} unindexed packs {}; {} blobs {}, {} moved; {} bytes {}",
        s.packs,
        s.packs_kept,
        s.packs_removed,
        did("removed"),
        s.packs_repacked,
        did("repacked"),
        s.packs_written,
        s.unindexed_removed,
        did("removed"),
        s.blobs_removed,
        did("dropped"),
        s.blobs_repacked,
        s.bytes_freed,
        did("freed"),
    );
}

pub(super) fn gc(a: GcArgs) -> Result<()> {
    let json = wants_json(&a.output)?;
    let mut repo = a.repo.open()?;
    let opts = GcOptions {
        dry_run: a.dry_run,
        ..GcOptions::default()
    };
    let bar = bar();
    let s = gc::gc(&mut repo, &opts, &bar, &Cancel::default())?;
    bar.finish();
    if json {
        println!("{}", ops::gc_json(&s));
    } else {
        print_gc(&s, a.dry_run);
    }
    Ok(())
}

pub(super) fn prune(a: PruneArgs) -> Result<()> {
    let json = wants_json(&a.output)?;
    let policy = Policy {
        last: a.last,
        hourly: a.hourly,
        daily: a.daily,
        weekly: a.weekly,
        monthly: a.monthly,
        yearly: a.yearly,
    };
    let mut repo = a.repo.open()?;
    let opts = GcOptions {
        dry_run: a.dry_run,
        ..GcOptions::default()
    };
    let bar = bar();
    let s = gc::prune(&mut repo, &policy, &opts, &bar, &Cancel::default())?;
    bar.finish();
    if json {
        println!("{}", ops::prune_json(&s, a.dry_run));
        return Ok(());
    }
    for p in &s.plan {
        let reasons: Vec<&str> = p.reasons.iter().map(|r| r.reason()).collect();
        println!(
            "{:<6}  {}  {}  {}  {}{}",
            if p.keep { "keep" } else { "remove" },
            p.id.short(),
            p.snapshot.timestamp().display(),
            p.snapshot.hostname,
            p.snapshot.paths.join(" "),
            if reasons.is_empty() {
                String::new()
            } else {
                format!("  ({})", reasons.join(", "))
            }
        );
    }
    let removed = s.plan.iter().filter(|p| !p.keep).count();
    println!(
        "{} snapshots {}removed, {} kept",
        removed,
        if a.dry_run { "would be " } else { "" },
        s.plan.len() - removed
    );
    if s.images_kept > 0 {
        println!(
            "{} image snapshots of the image registry kept (never pruned)",
            s.images_kept
        );
    }
    print_gc(&s.gc, a.dry_run);
    Ok(())
}

pub(super) fn stats(a: StatsArgs) -> Result<()> {
    let json = wants_json(&a.output)?;
    let mut repo = a.repo.open()?;
    let s = repo_stats::stats(&mut repo)?;
    if json {
        println!("{}", ops::stats_json(&s));
        return Ok(());
    }
    println!("snapshots:           {}", s.snapshots);
    println!("logical size:        {} bytes", s.logical_bytes);
    println!(
        "deduplicated size:   {} bytes in {} blobs",
        s.unique_bytes, s.unique_blobs
    );
    println!("stored size:         {} bytes", s.stored_bytes);
    println!("repository size:     {} bytes", s.repository_bytes);
    println!("deduplication:       {:.2}x", s.dedup_factor);
    println!("compression:         {:.2}x", s.compression_factor);
    Ok(())
}
