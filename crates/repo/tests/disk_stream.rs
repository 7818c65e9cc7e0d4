//! Disks streamed into a repository (how the image registry stores uploads):
//! the same chunks as a backup of the same bytes, so neither adds data for
//! the other; a stream dropped unfinished leaves nothing referenced and no
//! lock; image snapshots are passed over by `latest` and kept by prune.

use std::path::{Path, PathBuf};
use strata_format::Format;
use strata_jobs::{Cancel, NoProgress};
use strata_repo::disk::{self, BackupOptions, DiskSource};
use strata_repo::gc::{self, GcOptions};
use strata_repo::policy::Policy;
use strata_repo::stream::DiskStream;
use strata_repo::tree::{IMAGE_ID_TAG, IMAGE_TAG};
use strata_repo::writer::DEFAULT_PACK_SIZE;
use strata_repo::{restore, FileType, Id, Repository};

mod common;
use common::{new_repo, noise, MIB};

/// Noise, a zero run, noise, and a tail that ends inside a chunk (on a sector).
fn disk(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut d = noise(9 * MIB as usize, 1);
    d.resize(14 * MIB as usize, 0);
    d.extend(noise(MIB as usize + 3 * 512, 2));
    let p = dir.join("disk.raw");
    std::fs::write(&p, &d).unwrap();
    (p, d)
}

fn image_opts(id: &str) -> BackupOptions {
    BackupOptions {
        name: id.into(),
        path: format!("/images/{id}"),
        tags: vec![IMAGE_TAG.into(), format!("{IMAGE_ID_TAG}{id}")],
        ..BackupOptions::for_image(Path::new(id))
    }
}

/// Stream `data` in pieces of `piece` bytes and finish it as image `id`
/// (`repo`'s index is loaded again after).
fn stream(repo: &mut Repository, data: &[u8], piece: usize, id: &str) -> (Id, u64) {
    let mut s = DiskStream::start(repo, DEFAULT_PACK_SIZE).unwrap();
    for part in data.chunks(piece) {
        s.write(part).unwrap();
    }
    assert_eq!(s.size(), data.len() as u64);
    let done = s.finish(&image_opts(id)).unwrap();
    done.lock.release().unwrap();
    repo.reload_index().unwrap();
    (done.snapshot, done.saved.new_blobs)
}

fn back_up(repo: &mut Repository, path: &Path) -> (Id, u64) {
    let src = DiskSource::open(path, Some(Format::Raw), false).unwrap();
    let s = disk::backup(
        repo,
        &src,
        &BackupOptions::for_image(path),
        &NoProgress,
        &Cancel::default(),
    )
    .unwrap();
    (s.snapshot, s.saved.new_blobs)
}

fn content(repo: &Repository, snap: &Id) -> Vec<Id> {
    let snap = repo.load_snapshot(snap).unwrap();
    restore::disk_node(repo, &snap).unwrap().content.unwrap()
}

#[test]
fn a_streamed_disk_has_the_chunks_of_a_backup_of_the_same_bytes_and_adds_no_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let (path, data) = disk(dir.path());
    let (backup, _) = back_up(&mut repo, &path);
    // Pieces that straddle every chunk boundary.
    let (image, new_blobs) = stream(&mut repo, &data, 1_000_003, "a");
    assert_eq!(
        new_blobs, 1,
        "the stream stored data blobs (only its tree is new)"
    );
    assert_eq!(content(&repo, &image), content(&repo, &backup));
    let (latest, _) = repo.find_snapshot("latest").unwrap();
    assert_eq!(latest, backup, "latest is the disk backup, not the image");

    // And the other way round, in a new repository.
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let (path, data) = disk(dir.path());
    let (image, _) = stream(&mut repo, &data, 65536, "b");
    let (backup, new_blobs) = back_up(&mut repo, &path);
    assert_eq!(new_blobs, 1, "the backup stored data blobs the image has");
    assert_eq!(content(&repo, &image), content(&repo, &backup));
}

#[test]
fn a_dropped_stream_leaves_no_snapshot_index_or_lock_and_gc_removes_its_packs() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let mut s = DiskStream::start(&repo, 4 * MIB as usize).unwrap();
    s.write(&noise(24 * MIB as usize, 3)).unwrap();
    assert_eq!(repo.backend().list(FileType::Lock).unwrap().len(), 1);
    drop(s);
    let backend = repo.backend().clone();
    assert!(backend.list(FileType::Snapshot).unwrap().is_empty());
    assert!(backend.list(FileType::Index).unwrap().is_empty());
    assert!(backend.list(FileType::Lock).unwrap().is_empty());
    let packs = backend.list(FileType::Data).unwrap().len();
    assert!(packs >= 1, "the stream wrote no pack before it was dropped");
    let g = gc::gc(
        &mut repo,
        &GcOptions::default(),
        &NoProgress,
        &Cancel::default(),
    )
    .unwrap();
    assert_eq!(g.unindexed_removed, packs);
    assert!(backend.list(FileType::Data).unwrap().is_empty());
}

#[test]
fn prune_keeps_image_snapshots_whatever_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let (path, data) = disk(dir.path());
    let (image, _) = stream(&mut repo, &data, 1 << 20, "c");
    back_up(&mut repo, &path);
    let (kept, _) = back_up(&mut repo, &path);
    let policy = Policy {
        last: 1,
        ..Policy::default()
    };
    let s = gc::prune(
        &mut repo,
        &policy,
        &GcOptions::default(),
        &NoProgress,
        &Cancel::default(),
    )
    .unwrap();
    assert_eq!(s.plan.len(), 2, "the image was planned with the backups");
    assert_eq!(s.images_kept, 1);
    let mut left: Vec<Id> = repo
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    left.sort();
    let mut want = vec![image, kept];
    want.sort();
    assert_eq!(left, want);
    assert_eq!(content(&repo, &image).len(), 4);
}
