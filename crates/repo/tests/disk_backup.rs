//! Disk backup and restore through the library: deduplication, zero chunks,
//! incrementals that read only changed chunks (bytes counted at the storage),
//! typed errors for a wrong password and a held lock, and restores that refuse
//! damaged blobs. restic's own view of these repositories is tested in
//! `crates/cli/tests/backup_restic.rs`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use strata_format::raw::RawImage;
use strata_format::{BlockDevice, Format};
use strata_jobs::{Cancel, NoProgress};
use strata_repo::chunk::{self, ChunkSize};
use strata_repo::device::SnapshotDevice;
use strata_repo::disk::{self, BackupOptions, DiskSource, Incremental, CHUNK_SIZE};
use strata_repo::pack::BlobType;
use strata_repo::{ErrorKind, FileType, LocalBackend, Repository};
use strata_storage::{FileStorage, OpenOptions, Storage};

mod common;
use common::{new_repo, noise, MIB, PASSWORD};

/// Storage that counts the bytes read through it.
struct Counting {
    inner: FileStorage,
    read: Arc<AtomicU64>,
}

impl Storage for Counting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> strata_storage::Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> strata_storage::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> strata_storage::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> strata_storage::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> strata_storage::Result<()> {
        self.inner.flush()
    }
    fn size(&self) -> strata_storage::Result<u64> {
        self.inner.size()
    }
    fn set_size(&self, size: u64) -> strata_storage::Result<()> {
        self.inner.set_size(size)
    }
    fn read_only(&self) -> bool {
        true
    }
    fn probe_data(&self, offset: u64, max_len: u64) -> strata_storage::Result<(bool, u64)> {
        self.inner.probe_data(offset, max_len)
    }
}

/// A raw source whose file reads are counted.
fn counted_source(path: &Path) -> (DiskSource, Arc<AtomicU64>) {
    let read = Arc::new(AtomicU64::new(0));
    let storage = Counting {
        inner: FileStorage::open(path, OpenOptions::read()).unwrap(),
        read: read.clone(),
    };
    let dev: Arc<dyn BlockDevice> = Arc::new(RawImage::open(Arc::new(storage)).unwrap());
    (DiskSource::from_devices(vec![dev]).unwrap(), read)
}

fn back_up(
    repo: &mut Repository,
    image: &Path,
    opts: Option<BackupOptions>,
) -> disk::BackupSummary {
    let src = DiskSource::open(image, Some(Format::Raw), false).unwrap();
    let opts = opts.unwrap_or_else(|| BackupOptions::for_image(image));
    disk::backup(repo, &src, &opts, &NoProgress, &Cancel::default()).unwrap()
}

fn restore_to(repo: &mut Repository, snap: &str, out: &Path) -> strata_repo::Result<()> {
    let (_, s) = repo.find_snapshot(snap)?;
    strata_repo::restore::restore(repo, &s, out, Format::Raw, &NoProgress, &Cancel::default())
        .map(|_| ())
}

fn data_packs(repo: &Repository) -> usize {
    repo.backend().list(FileType::Data).unwrap().len()
}

/// 40 MiB: noise, a hole, noise, and a shorter last chunk.
fn mixed_image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.raw");
    let mut img = noise((9 * MIB) as usize, 1);
    img.resize((30 * MIB) as usize, 0);
    img.extend(noise((10 * MIB - 4096) as usize, 2));
    std::fs::write(&p, &img).unwrap();
    p
}

#[test]
fn a_second_backup_of_an_unchanged_image_adds_no_data_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let img = mixed_image(dir.path());
    let first = back_up(&mut repo, &img, None);
    let data_blobs = repo.index().count(BlobType::Data);
    let packs = data_packs(&repo);
    assert_eq!(first.chunks, 10);
    let second = back_up(&mut repo, &img, None);
    assert_eq!(repo.index().count(BlobType::Data), data_blobs);
    // Only the new tree (its node carries a new time) is stored: one blob, one pack.
    assert_eq!(second.saved.new_blobs, 1);
    assert_eq!(data_packs(&repo), packs + 1);
    assert_eq!(repo.snapshots().unwrap().len(), 2);
    let out = dir.path().join("out.raw");
    restore_to(&mut repo, &first.snapshot.to_string()[..8], &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
}

#[test]
fn a_zero_filled_image_is_one_blob_and_its_holes_are_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    // Sparse: block status says zero, nothing is read.
    let sparse = dir.path().join("sparse.raw");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let (src, read) = counted_source(&sparse);
    let opts = BackupOptions::for_image(&sparse);
    let s = disk::backup(&mut repo, &src, &opts, &NoProgress, &Cancel::default()).unwrap();
    assert_eq!(read.load(Ordering::Relaxed), 0);
    assert_eq!((s.chunks, s.zero_chunks), (16, 16));
    assert_eq!(repo.index().count(BlobType::Data), 1);
    // Written zeroes: read, and still the same single blob.
    let written = dir.path().join("zeros.raw");
    std::fs::write(&written, vec![0u8; (64 * MIB) as usize]).unwrap();
    let s = back_up(&mut repo, &written, None);
    assert_eq!(s.bytes_read, 64 * MIB);
    assert_eq!(repo.index().count(BlobType::Data), 1);
    let out = dir.path().join("out.raw");
    restore_to(&mut repo, "latest", &out).unwrap();
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), 64 * MIB);
    assert_eq!(
        std::os::unix::fs::MetadataExt::blocks(&meta),
        0,
        "restored zeroes are holes"
    );
}

#[test]
fn an_incremental_backup_reads_only_the_changed_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let img = dir.path().join("disk.raw");
    let mut content = noise((32 * MIB) as usize, 3);
    std::fs::write(&img, &content).unwrap();
    let full = back_up(&mut repo, &img, None);
    // Change 100 bytes inside chunk 5.
    let at = (5 * CHUNK_SIZE + 12345) as usize;
    content[at..at + 100].copy_from_slice(&noise(100, 4));
    std::fs::write(&img, &content).unwrap();
    let (src, read) = counted_source(&img);
    let mut opts = BackupOptions::for_image(&img);
    opts.incremental = Some(Incremental {
        parent: full.snapshot,
        changed: [5].into(),
    });
    let inc = disk::backup(&mut repo, &src, &opts, &NoProgress, &Cancel::default()).unwrap();
    assert_eq!(read.load(Ordering::Relaxed), CHUNK_SIZE);
    assert_eq!(inc.reused_chunks, 7);
    assert_eq!(
        repo.load_snapshot(&inc.snapshot).unwrap().parent,
        Some(full.snapshot)
    );
    let out = dir.path().join("out.raw");
    restore_to(&mut repo, &inc.snapshot.to_string(), &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), content);
    // A parent of another size is refused, not silently mixed in.
    std::fs::write(&img, &content[..(20 * MIB) as usize]).unwrap();
    let src = DiskSource::open(&img, Some(Format::Raw), false).unwrap();
    let e = disk::backup(&mut repo, &src, &opts, &NoProgress, &Cancel::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
}

#[test]
fn a_disk_in_1_mib_chunks_keeps_its_chunk_size_through_incrementals_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let img = mixed_image(dir.path());
    let mut content = std::fs::read(&img).unwrap();
    let mut opts = BackupOptions::for_image(&img);
    opts.chunk_size = ChunkSize::MIN;
    let full = back_up(&mut repo, &img, Some(opts));
    assert_eq!(full.chunks, 40);
    // The chunk size is known from the index alone, and a new backup with
    // this parent keeps it unless another one is asked for.
    let snap = repo.load_snapshot(&full.snapshot).unwrap();
    let node = strata_repo::restore::disk_node(&repo, &snap).unwrap();
    assert_eq!(
        chunk::fixed_chunk_size(&repo, &node, ChunkSize::DEFAULT),
        Some(ChunkSize::MIN)
    );
    let kept = chunk::plan(&repo, Some(&full.snapshot), None).unwrap();
    assert_eq!((kept.size, kept.full_read), (ChunkSize::MIN, None));
    let other = chunk::plan(&repo, Some(&full.snapshot), Some(ChunkSize::DEFAULT)).unwrap();
    assert_eq!(other.size, ChunkSize::DEFAULT);
    assert!(other.full_read.unwrap().contains("1 MiB chunks"));

    // 100 bytes change in chunk 33: the incremental reads that 1 MiB only.
    let at = (33 * MIB + 777) as usize;
    content[at..at + 100].copy_from_slice(&noise(100, 9));
    std::fs::write(&img, &content).unwrap();
    let (src, read) = counted_source(&img);
    let mut opts = BackupOptions::for_image(&img);
    opts.chunk_size = kept.size;
    opts.incremental = Some(Incremental {
        parent: full.snapshot,
        changed: [33].into(),
    });
    let inc = disk::backup(&mut repo, &src, &opts, &NoProgress, &Cancel::default()).unwrap();
    assert_eq!(read.load(Ordering::Relaxed), MIB);
    assert_eq!((inc.chunks, inc.reused_chunks), (40, 39));
    let out = dir.path().join("out.raw");
    restore_to(&mut repo, &inc.snapshot.to_string(), &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), content);
    // Served in place, the disk reads the same through its 1 MiB blobs.
    let (_, snap) = repo.find_snapshot(&inc.snapshot.to_string()).unwrap();
    let mut served = repo.reopen();
    served.reload_index().unwrap();
    let dev = SnapshotDevice::open(Arc::new(served), &snap).unwrap();
    let mut back = vec![0u8; content.len()];
    dev.read(&mut back, 0).unwrap();
    assert!(back == content, "the served disk differs");
    // Reusing the parent's chunks under another chunk size is refused.
    opts.chunk_size = ChunkSize::DEFAULT;
    let e = disk::backup(&mut repo, &src, &opts, &NoProgress, &Cancel::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    assert!(e.to_string().contains("in 4 MiB chunks"), "{e}");
}

#[test]
fn a_wrong_password_is_a_typed_error_and_a_missing_repository_too() {
    let dir = tempfile::tempdir().unwrap();
    drop(new_repo(dir.path()));
    let backend = Arc::new(LocalBackend::new(dir.path().join("repo")));
    let e = Repository::open(backend.clone(), "not it").err().unwrap();
    assert_eq!(e.kind(), ErrorKind::WrongPassword);
    assert!(e.to_string().contains("wrong password"), "{e}");
    assert!(Repository::open(backend, PASSWORD).is_ok());
    let e = Repository::open(
        Arc::new(LocalBackend::new(dir.path().join("nope"))),
        PASSWORD,
    )
    .err()
    .unwrap();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

#[test]
fn a_flipped_byte_in_a_pack_fails_the_restore_naming_blob_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let img = mixed_image(dir.path());
    let s = back_up(&mut repo, &img, None);
    // Damage the blob of chunk 8 (file offset 32 MiB).
    let snap = repo.load_snapshot(&s.snapshot).unwrap();
    let node = strata_repo::restore::disk_node(&repo, &snap).unwrap();
    let blob = node.content.unwrap()[8];
    let loc = *repo.index().get(BlobType::Data, &blob).unwrap();
    let pack = dir
        .path()
        .join("repo/data")
        .join(&loc.pack.to_string()[..2])
        .join(loc.pack.to_string());
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[(loc.offset + 1000) as usize] ^= 0x40;
    std::fs::write(&pack, bytes).unwrap();
    let out = dir.path().join("out.raw");
    let e = restore_to(&mut repo, "latest", &out).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    let msg = e.to_string();
    assert!(msg.contains(&blob.to_string()), "{msg}");
    assert!(
        msg.contains(&format!("file offset {}", 8 * CHUNK_SIZE)),
        "{msg}"
    );
    assert!(!out.exists(), "a failed restore leaves no output");
}

#[test]
fn a_live_exclusive_lock_blocks_a_backup_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let img = mixed_image(dir.path());
    let lock = strata_repo::lock::Lock::acquire(&repo, true).unwrap();
    let src = DiskSource::open(&img, Some(Format::Raw), false).unwrap();
    let opts = BackupOptions::for_image(&img);
    let e = disk::backup(&mut repo, &src, &opts, &NoProgress, &Cancel::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    assert!(repo.snapshots().unwrap().is_empty());
    lock.release().unwrap();
    back_up(&mut repo, &img, None);
    assert!(
        repo.backend().list(FileType::Lock).unwrap().is_empty(),
        "the backup's lock is removed"
    );
}

#[test]
fn a_reader_source_reads_only_outside_its_zero_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let mut repo = new_repo(dir.path());
    let image = mixed_image(dir.path());
    let bytes = Arc::new(std::fs::read(&image).unwrap());
    let read = Arc::new(AtomicU64::new(0));
    let (b, r) = (bytes.clone(), read.clone());
    // The hole of the mixed image (9..30 MiB) as two overlapping reports, one
    // range past the end, as block status may give them.
    let zeroes = vec![(20 * MIB, 10 * MIB), (9 * MIB, 12 * MIB), (40 * MIB, MIB)];
    let src = DiskSource::from_reader_with_zeroes(
        bytes.len() as u64,
        Box::new(move |buf, offset| {
            r.fetch_add(buf.len() as u64, Ordering::Relaxed);
            buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }),
        zeroes,
    );
    let opts = BackupOptions::for_image(&image);
    let s = disk::backup(&mut repo, &src, &opts, &NoProgress, &Cancel::default()).unwrap();
    let data = bytes.len() as u64 - 21 * MIB;
    assert_eq!(read.load(Ordering::Relaxed), data);
    assert_eq!(s.bytes_read, data);
    // Chunks 3..6 (12..28 MiB) lie wholly in the hole: the zero blob, unread.
    assert_eq!(s.zero_chunks, 4);
    let out = dir.path().join("out.raw");
    restore_to(&mut repo, "latest", &out).unwrap();
    assert!(std::fs::read(&out).unwrap() == *bytes);
}
