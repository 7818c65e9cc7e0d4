//! A backup cut at every repository write (packs, index, snapshot, lock) leaves no
//! visible snapshot, `restic check` still passes, and the next backup succeeds and
//! restores exactly: the write order (packs, then index, then snapshot) is what
//! makes a half-done backup invisible.

mod common;

use common::{new_repo, noise, MIB, PASSWORD};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use strata_format::Format;
use strata_jobs::{Cancel, NoProgress};
use strata_repo::disk::{self, BackupOptions, DiskSource};
use strata_repo::{Backend, Error, ErrorKind, FileType, Handle, LocalBackend, Repository};

/// A local backend whose writes fail once `left` runs out (nothing is written then).
struct CutBackend {
    inner: LocalBackend,
    left: AtomicI64,
}

impl Backend for CutBackend {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn create(&self) -> strata_repo::Result<()> {
        self.inner.create()
    }
    fn list(&self, kind: FileType) -> strata_repo::Result<Vec<(String, u64)>> {
        self.inner.list(kind)
    }
    fn read(&self, h: &Handle) -> strata_repo::Result<Vec<u8>> {
        self.inner.read(h)
    }
    fn read_range(&self, h: &Handle, offset: u64, len: usize) -> strata_repo::Result<Vec<u8>> {
        self.inner.read_range(h, offset, len)
    }
    fn write(&self, h: &Handle, data: &[u8]) -> strata_repo::Result<()> {
        if self.left.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(Error::new(ErrorKind::Io, format!("cut before writing {h}")));
        }
        self.inner.write(h, data)
    }
    fn remove(&self, h: &Handle) -> strata_repo::Result<()> {
        self.inner.remove(h)
    }
    fn stat(&self, h: &Handle) -> strata_repo::Result<u64> {
        self.inner.stat(h)
    }
}

fn restic_check(repo: &Path) {
    let out = Command::new("restic")
        .args(["--no-cache", "check", "--read-data", "-r"])
        .arg(repo)
        .env("RESTIC_PASSWORD", PASSWORD)
        .output()
        .expect("restic must be installed (scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "restic check failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

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
        let backend = Arc::new(CutBackend {
            inner: LocalBackend::new(&root),
            left: AtomicI64::new(cut),
        });
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
        strata_repo::restore::restore(
            &mut repo,
            &snap,
            &out,
            Format::Raw,
            &NoProgress,
            &Cancel::default(),
        )
        .unwrap();
        assert!(
            std::fs::read(&out).unwrap() == content,
            "cut {cut}: restore differs"
        );
    }
    eprintln!("{cuts} cut points");
    // The lock, the data packs, the tree pack, the index and the snapshot.
    assert!(cuts >= 7, "only {cuts} cut points");
}
