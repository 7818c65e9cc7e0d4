//! A registry whose image data is in a backup repository, as a library: the
//! store is recorded and kept (a registry's images cannot move), uploads read
//! back whole and by ranges, a dropped upload and a delete leave no snapshot,
//! and recovery forgets a snapshot whose upload never finished.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use strata_registry::{recorded_store, ErrorKind, Registry, Status, StoreLocation};
use strata_repo::pack::BlobType;
use strata_repo::{Backend, FileType, Id, KdfParams, LocalBackend, Repository};

const PASSWORD: &str = "image store";

/// A new repository at `dir/repo`; its location.
fn new_repo(dir: &Path) -> StoreLocation {
    let path = dir.join("repo");
    let kdf = KdfParams {
        n: 1024,
        r: 8,
        p: 1,
    };
    Repository::init(Arc::new(LocalBackend::new(&path)), PASSWORD, kdf).unwrap();
    StoreLocation::Repository(path.to_str().unwrap().to_string())
}

/// The snapshot files of the repository in `dir`.
fn snapshots(dir: &Path) -> usize {
    LocalBackend::new(dir.join("repo"))
        .list(FileType::Snapshot)
        .unwrap()
        .len()
}

fn new_image(reg: &Registry, fmt: &str) -> String {
    let body = json!({"name": "x", "disk_format": fmt, "container_format": "bare"});
    reg.create(body.as_object().unwrap()).unwrap().id
}

fn read_all(reg: &Registry, id: &str, range: Option<(u64, u64)>) -> Vec<u8> {
    let (_, mut r) = reg.download(id, range).unwrap();
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn image_store_names_parse_and_bad_ones_are_refused() {
    assert_eq!(
        StoreLocation::parse("dir").unwrap(),
        StoreLocation::Directory
    );
    assert_eq!(
        StoreLocation::parse("repo:/srv/r").unwrap(),
        StoreLocation::Repository("/srv/r".into())
    );
    assert_eq!(
        StoreLocation::parse("s3:http://h:1/b").unwrap(),
        StoreLocation::Repository("s3:http://h:1/b".into())
    );
    for bad in ["", "repo:", "/srv/r", "files"] {
        assert_eq!(
            StoreLocation::parse(bad).unwrap_err().kind(),
            ErrorKind::Invalid,
            "{bad}"
        );
    }
}

#[test]
fn a_registry_keeps_the_store_its_images_are_in() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    // A directory registry that holds an image is refused a repository.
    let plain = dir.path().join("plain");
    new_image(&Registry::open(&plain).unwrap(), "raw");
    let e = Registry::open_with_store(&plain, &repo, Some(PASSWORD))
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("keeps its images in the state directory"),
        "{e}"
    );
    // A new one records the repository, and is refused anything else.
    let state = dir.path().join("state");
    Registry::open_with_store(&state, &repo, Some(PASSWORD)).unwrap();
    assert_eq!(recorded_store(&state).unwrap(), repo);
    let e = Registry::open(&state).err().unwrap();
    assert!(
        e.to_string().contains("keeps its images in the repository"),
        "{e}"
    );
    let other = StoreLocation::Repository(dir.path().join("other").display().to_string());
    assert!(Registry::open_with_store(&state, &other, Some(PASSWORD)).is_err());
    let e = Registry::open_with_store(&state, &repo, None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("password is needed"), "{e}");
    let e = Registry::open_with_store(&state, &repo, Some("wrong"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("wrong password"), "{e}");
}

#[test]
fn uploads_into_a_repository_read_back_and_leave_no_snapshot_when_dropped_or_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let state = dir.path().join("state");
    let reg = Registry::open_with_store(&state, &repo, Some(PASSWORD)).unwrap();
    let data: Vec<u8> = (0..9_437_189u32).map(|i| (i * 31 % 253) as u8).collect();

    // Dropped half way: queued again, nothing visible.
    let id = new_image(&reg, "iso");
    let mut up = reg.begin_upload(&id, None).unwrap();
    up.write(&data[..5 << 20]).unwrap();
    drop(up);
    assert_eq!(reg.get(&id).unwrap().status, Status::Queued);
    assert_eq!(snapshots(dir.path()), 0);

    // Whole: active, one snapshot, every byte and a range across chunks.
    let mut up = reg.begin_upload(&id, Some(data.len() as u64)).unwrap();
    for piece in data.chunks(999_983) {
        up.write(piece).unwrap();
    }
    let rec = up.finish().unwrap();
    assert_eq!(rec.status, Status::Active);
    assert_eq!(snapshots(dir.path()), 1);
    assert!(read_all(&reg, &id, None) == data);
    let (a, b) = ((4 << 20) - 7, (8 << 20) + 11);
    assert!(read_all(&reg, &id, Some((a, b))) == data[a as usize..=b as usize]);
    assert_eq!(
        reg.open_data(&id).err().unwrap().kind(),
        ErrorKind::Conflict,
        "there is no data file to hand out"
    );

    // Another process opening the registry reads it too.
    let again = Registry::open_with_store(&state, &repo, Some(PASSWORD)).unwrap();
    assert!(read_all(&again, &id, Some((0, 99))) == data[..100]);

    // Data declared raw that is a qcow2 image is refused, and its snapshot forgotten.
    let fake = new_image(&reg, "raw");
    let mut up = reg.begin_upload(&fake, None).unwrap();
    up.write(b"QFI\xfb\0\0\0\x03 and more").unwrap();
    assert_eq!(up.finish().err().unwrap().kind(), ErrorKind::Invalid);
    assert_eq!(reg.get(&fake).unwrap().status, Status::Queued);
    assert_eq!(snapshots(dir.path()), 1);

    reg.delete(&id).unwrap();
    assert_eq!(snapshots(dir.path()), 0);
    assert!(!state.join("images").join(format!("{id}.snap")).exists());
}

#[test]
fn recovery_forgets_the_snapshot_of_an_upload_that_never_finished() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let state = dir.path().join("state");
    let reg = Registry::open_with_store(&state, &repo, Some(PASSWORD)).unwrap();
    let id = new_image(&reg, "iso");
    let up = reg.begin_upload(&id, None).unwrap();
    let done = new_image(&reg, "iso");
    let mut d = reg.begin_upload(&done, None).unwrap();
    d.write(b"kept").unwrap();
    d.finish().unwrap();
    // A process that died after storing the snapshot of `id` but before
    // naming it: the record says saving, nobody holds the upload lock, a
    // snapshot carries its tag.
    let images = state.join("images");
    let done_snap = std::fs::read_to_string(images.join(format!("{done}.snap"))).unwrap();
    std::mem::forget(up);
    drop(reg);
    assert_eq!(snapshots(dir.path()), 1);
    // What the dead upload stored: a copy of the finished image's snapshot
    // tagged as image `id`'s.
    let r = Repository::open(
        Arc::new(LocalBackend::new(dir.path().join("repo"))),
        PASSWORD,
    )
    .unwrap();
    let (_, mut snap) = r.find_snapshot(done_snap.trim()).unwrap();
    snap.tags = vec!["strata-image".into(), format!("image-id={id}")];
    r.save_snapshot(&snap).unwrap();
    assert_eq!(snapshots(dir.path()), 2);
    let reg = reopen_without_lock(&state, &repo, &id);
    assert_eq!(reg.get(&id).unwrap().status, Status::Queued);
    assert_eq!(
        snapshots(dir.path()),
        1,
        "the unfinished upload's snapshot stayed"
    );
    assert_eq!(reg.get(&done).unwrap().status, Status::Active);
    assert!(read_all(&reg, &done, None) == b"kept");
}

/// Open the registry once the upload lock of `id` is free: its lock file is
/// replaced, so the lock this process still holds on the old file no longer
/// counts.
fn reopen_without_lock(state: &Path, repo: &StoreLocation, id: &str) -> Registry {
    let lock = state.join("images").join(format!("{id}.lock"));
    std::fs::remove_file(&lock).unwrap();
    Registry::open_with_store(state, repo, Some(PASSWORD)).unwrap()
}

#[test]
fn a_range_download_reads_only_the_blobs_it_covers() {
    let dir = tempfile::tempdir().unwrap();
    let repo = new_repo(dir.path());
    let state = dir.path().join("state");
    let reg = Registry::open_with_store(&state, &repo, Some(PASSWORD)).unwrap();
    // Three 4 MiB chunks of different content.
    let data: Vec<u8> = (0..12u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let id = new_image(&reg, "iso");
    let mut up = reg.begin_upload(&id, None).unwrap();
    up.write(&data).unwrap();
    up.finish().unwrap();
    // Damage the first chunk's blob where its pack holds it.
    let r = Repository::open(
        Arc::new(LocalBackend::new(dir.path().join("repo"))),
        PASSWORD,
    )
    .unwrap();
    let named = std::fs::read_to_string(state.join("images").join(format!("{id}.snap"))).unwrap();
    let snap = r.load_snapshot(&Id::parse(named.trim()).unwrap()).unwrap();
    let first = strata_repo::restore::disk_node(&r, &snap)
        .unwrap()
        .content
        .unwrap()[0];
    let loc = *r.index().get(BlobType::Data, &first).unwrap();
    let pack = std::fs::read_dir(dir.path().join("repo/data"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy() == loc.pack.to_string())
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[(loc.offset + u64::from(loc.length) / 2) as usize] ^= 0x40;
    std::fs::write(&pack, bytes).unwrap();
    // A range of the other chunks never loads it; one that touches it fails,
    // and so does the whole image.
    let (a, b) = ((4 << 20) + 5, (11 << 20) + 3);
    assert!(read_all(&reg, &id, Some((a, b))) == data[a as usize..=b as usize]);
    for range in [Some((0, 10)), None] {
        let (_, mut rd) = reg.download(&id, range).unwrap();
        let e = rd.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{range:?}: {e}");
    }
}
