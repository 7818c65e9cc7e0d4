//! `strata backup restore` over raw files that already exist: the whole disk or a
//! byte range written into a file full of other data reads back as the backup
//! (`cmp` and `qemu-img compare`), its zero ranges included, with an unaligned
//! tail; the data goes past the page cache (direct I/O) and the disk's zero
//! chunks become holes, as in a new file.

mod common;

use common::restic::{noise, qemu_img, run, s, strata, MIB};
use std::os::fd::AsRawFd;
use std::path::Path;

/// A disk whose 4 MiB chunks are: noise, noise then zeroes, zeroes only (a zero
/// chunk, stored as nothing), zeroes then text, text then noise, and an
/// unaligned tail of noise (21 MiB + 1 KiB in all: a multiple of 512 bytes, as a
/// raw disk is seen, but not of the 4 KiB direct I/O needs).
fn disk() -> Vec<u8> {
    let mut d = noise(6 * MIB);
    d.resize(13 * MIB, 0);
    d.extend(b"restored over other data ".iter().cycle().take(5 * MIB));
    d.extend(noise(21 * MIB + 1024 - d.len()));
    d
}

/// Pages of `path`'s first `len` bytes that are in the page cache.
fn cached_pages(path: &Path, len: usize) -> usize {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a read-only shared mapping of an open file, only passed to
    // mincore (never dereferenced) and unmapped before returning.
    unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED, "mmap of {}", path.display());
        let mut resident = vec![0u8; len.div_ceil(page)];
        let r = libc::mincore(map, len, resident.as_mut_ptr());
        libc::munmap(map, len);
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        resident.iter().filter(|&&b| b & 1 == 1).count()
    }
}

/// Restore the latest snapshot of `repo` into the existing `target`, with `extra` arguments.
fn restore_into(repo: &Path, target: &Path, extra: &[&str]) {
    let mut args = vec![
        "restore",
        "--repo",
        s(repo),
        "latest",
        s(target),
        "--existing",
    ];
    args.extend_from_slice(extra);
    run(strata(&args));
}

#[test]
fn restoring_into_an_existing_raw_file_writes_the_backup_past_the_page_cache_with_holes_for_zeroes()
{
    // On the build's own file system: direct I/O needs a real one, not tmpfs.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let repo = d.join("repo");
    let source = d.join("disk.raw");
    let want = disk();
    std::fs::write(&source, &want).unwrap();
    run(strata(&["init", "--repo", s(&repo)]));
    run(strata(&["create", "--repo", s(&repo), s(&source)]));

    // The whole disk over a file of noise, all of it written (and cached) first.
    let target = d.join("existing.raw");
    std::fs::write(&target, noise(want.len())).unwrap();
    let aligned = 20 * MIB;
    let page = 4096;
    assert!(cached_pages(&target, aligned) * page > aligned / 2);
    restore_into(&repo, &target, &[]);
    // The five whole chunks went to the disk, not through the cache (writing
    // them directly drops the cached pages they cover; a punched hole too).
    let cached = cached_pages(&target, aligned);
    assert!(
        cached * page <= aligned / 8,
        "{cached} pages of the direct-written chunks are cached"
    );
    assert!(
        std::fs::read(&target).unwrap() == want,
        "the restore differs"
    );
    qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&source), s(&target)]);
    // The zero chunk is a hole again (the file was fully allocated before).
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&target).unwrap().blocks() * 512;
    assert!(
        allocated + 3 * MIB as u64 <= want.len() as u64,
        "{allocated} bytes allocated: the zero chunk was written, not punched"
    );

    // Byte ranges over other data change only themselves: one from an
    // unaligned offset across the zero chunk, one through the unaligned tail.
    for (offset, length) in [(5 * MIB + 3, 9 * MIB), (19 * MIB - 5, 2 * MIB + 1029)] {
        let mut expect = noise(want.len());
        std::fs::write(&target, &expect).unwrap();
        restore_into(
            &repo,
            &target,
            &[
                "--offset",
                &offset.to_string(),
                "--length",
                &length.to_string(),
            ],
        );
        expect[offset..offset + length].copy_from_slice(&want[offset..offset + length]);
        assert!(
            std::fs::read(&target).unwrap() == expect,
            "range {offset}+{length}"
        );
    }

    // Without --existing, a larger file of other data is replaced by the disk.
    std::fs::write(&target, noise(want.len() + 3 * MIB)).unwrap();
    run(strata(&[
        "restore",
        "--repo",
        s(&repo),
        "latest",
        s(&target),
    ]));
    assert!(
        std::fs::read(&target).unwrap() == want,
        "the new file differs"
    );
}
