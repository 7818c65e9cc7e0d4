//! A backup cut at every repository write (packs, index, snapshot, lock) leaves no
//! visible snapshot, `restic check` still passes, and the next backup succeeds and
//! restores exactly: the write order (packs, then index, then snapshot) is what
//! makes a half-done backup invisible.

mod common;

use common::{new_repo, noise, restic_check, restored, CutBackend, MIB, PASSWORD};
use std::sync::Arc;
use strata_format::Format;
use strata_jobs::{Cancel, NoProgress};
use strata_repo::disk::{self, BackupOptions, DiskSource};
use strata_repo::{LocalBackend, Repository};

#[test]
fn a_backup_cut_at_any_write_leaves_no_snapshot_and_a_sound_repository() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let mut content = noise((14 * MIB) as usize, 5);
    content.resize((20 * MIB) as usize, 0);
    content.extend(noise((4 * MIB) as usize, 6));
    std::fs::write(&img, &content).unwrap();
    let mut opts = BackupOptions::for_image(&img);
    // Small packs, so the cuts land between several pack writes.
    opts.pack_size = 4 << 20;
    let mut cuts = 0;
    for cut in 0.. {
        let d = dir.path().join(format!("cut{cut}"));
        drop(new_repo(&d));
        let root = d.join("repo");
        let backend = Arc::new(CutBackend::writes(&root, cut));
        let mut repo = Repository::open(backend, PASSWORD).unwrap();
        let src = DiskSource::open(&img, Some(Format::Raw), false).unwrap();
        let r = disk::backup(&mut repo, &src, &opts, &NoProgress, &Cancel::default());
        let plain = Arc::new(LocalBackend::new(&root));
        let mut repo = Repository::open(plain, PASSWORD).unwrap();
        if r.is_ok() {
            assert_eq!(repo.snapshots().unwrap().len(), 1);
            restic_check(&root);
            break;
        }
        cuts += 1;
        assert!(
            repo.snapshots().unwrap().is_empty(),
            "cut {cut}: a snapshot is visible"
        );
        restic_check(&root);
        // The next backup works and restores the disk exactly.
        let src = DiskSource::open(&img, Some(Format::Raw), false).unwrap();
        disk::backup(&mut repo, &src, &opts, &NoProgress, &Cancel::default()).unwrap();
        let (_, snap) = repo.find_snapshot("latest").unwrap();
        let out = d.join("out.raw");
        assert!(
            restored(&mut repo, &snap, &out).unwrap() == content,
            "cut {cut}: restore differs"
        );
    }
    eprintln!("{cuts} cut points");
    // The lock, the data packs, the tree pack, the index and the snapshot.
    assert!(cuts >= 7, "only {cuts} cut points");
}
