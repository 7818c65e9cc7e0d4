//! A prune cut at every one of its repository writes and removals (snapshot
//! files forgotten, packs repacked, index rewritten, old index and packs
//! removed) leaves a repository `restic check --read-data` passes, in which every
//! snapshot still listed restores exactly, and which a second prune completes:
//! the order (new packs, new index, old index, old packs) is what makes every
//! cut safe.

mod common;

use common::{new_repo, noise, restic_check, restored, CutBackend, MIB, PASSWORD};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use strata_format::Format;
use strata_jobs::{Cancel, NoProgress};
use strata_repo::disk::{self, BackupOptions, DiskSource};
use strata_repo::gc::{self, GcOptions};
use strata_repo::policy::Policy;
use strata_repo::{Id, LocalBackend, Repository};

fn copy_dir(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Every listed snapshot restores to the bytes recorded for it.
fn all_restore(root: &Path, made: &HashMap<Id, Vec<u8>>, cut: i64) {
    let mut repo = Repository::open(Arc::new(LocalBackend::new(root)), PASSWORD).unwrap();
    let snaps = repo.snapshots().unwrap();
    assert!(!snaps.is_empty(), "cut {cut}: no snapshot left");
    let out = root.with_extension("out.raw");
    for (id, snap) in snaps {
        let bytes = restored(&mut repo, &snap, &out)
            .unwrap_or_else(|e| panic!("cut {cut}: snapshot {id:?} does not restore: {e}"));
        assert!(
            bytes == made[&id],
            "cut {cut}: snapshot {id:?} restores other bytes"
        );
    }
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn a_prune_cut_at_any_write_or_removal_leaves_a_sound_repository() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("disk.raw");
    let pristine = d.join("pristine");
    let mut repo = new_repo(&pristine);
    let mut content = noise((16 * MIB) as usize, 1);
    let mut made = HashMap::new();
    // Three versions, each rewriting one chunk; packs of two chunks, so pruning
    // the oldest two removes some packs and repacks others.
    for v in 0..3u64 {
        let at = (v * 5 * MIB) as usize;
        content[at..at + MIB as usize].copy_from_slice(&noise(MIB as usize, 10 + v));
        std::fs::write(&img, &content).unwrap();
        let mut opts = BackupOptions::for_image(&img);
        opts.pack_size = 8 << 20;
        let src = DiskSource::open(&img, Some(Format::Raw), false).unwrap();
        let s = disk::backup(&mut repo, &src, &opts, &NoProgress, &Cancel::default()).unwrap();
        made.insert(s.snapshot, content.clone());
    }
    drop(repo);
    let policy = Policy {
        last: 1,
        ..Policy::default()
    };
    let gc_opts = GcOptions {
        pack_size: 8 << 20,
        ..GcOptions::default()
    };
    let mut cuts = 0;
    for cut in 0.. {
        let work = d.join(format!("cut{cut}"));
        copy_dir(&pristine, &work);
        let root = work.join("repo");
        let backend = Arc::new(CutBackend::writes_and_removes(&root, cut));
        let mut repo = Repository::open(backend.clone(), PASSWORD).unwrap();
        let r = gc::prune(
            &mut repo,
            &policy,
            &gc_opts,
            &NoProgress,
            &Cancel::default(),
        );
        drop(repo);
        restic_check(&root);
        all_restore(&root, &made, cut);
        if let Ok(s) = r {
            assert_eq!(s.plan.iter().filter(|p| p.keep).count(), 1);
            assert!(
                s.gc.packs_repacked > 0 && s.gc.packs_removed > 0,
                "{:?}",
                s.gc
            );
            break;
        }
        cuts += 1;
        // A second prune finishes the job.
        let mut repo = Repository::open(Arc::new(LocalBackend::new(&root)), PASSWORD).unwrap();
        gc::prune(
            &mut repo,
            &policy,
            &gc_opts,
            &NoProgress,
            &Cancel::default(),
        )
        .unwrap();
        assert_eq!(repo.snapshots().unwrap().len(), 1, "cut {cut}");
        let again = gc::gc(
            &mut repo,
            &GcOptions {
                dry_run: true,
                ..gc_opts
            },
            &NoProgress,
            &Cancel::default(),
        )
        .unwrap();
        assert_eq!(
            again.blobs_removed + again.unindexed_removed as u64,
            0,
            "cut {cut}: {again:?}"
        );
        drop(repo);
        restic_check(&root);
        all_restore(&root, &made, cut);
        std::fs::remove_dir_all(&work).unwrap();
    }
    eprintln!("{cuts} cut points");
    // The lock, two snapshot removals, the new pack, two index files, the old
    // index files and the old packs.
    assert!(cuts >= 8, "only {cuts} cut points");
}
