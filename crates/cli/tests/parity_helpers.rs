//! The parity helpers themselves: a copy of a fixture is the fixture, holes
//! and preallocation included, and `same_in_dir_copies` still compares every
//! file a tool (or anything else) may have written, while it passes over
//! files neither tool touched.

mod common;

use common::fiemap::extent_bytes;
use common::{io, qcow2, same_in_dir_copies, same_in_dir_copies_planted, sh, take_failures};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// A fixture directory `imgs` under `root`: two qcow2 images with data and a
/// sparse raw file with data at 0 and 40 MiB.
fn fixture(root: &Path) -> std::path::PathBuf {
    let d = root.join("imgs");
    std::fs::create_dir(&d).unwrap();
    qcow2(&d, "a.qcow2", "64M", &[]);
    io(&d, "qcow2", "a.qcow2", &["write -P 0x11 0 1M"]);
    qcow2(&d, "b.qcow2", "64M", &[]);
    io(&d, "qcow2", "b.qcow2", &["write -P 0x22 8M 64k"]);
    sh(&d, "truncate", &["-s", "64M", "c.raw"]);
    io(
        &d,
        "raw",
        "c.raw",
        &["write -P 0x33 0 64k", "write -P 0x44 40M 4k"],
    );
    d
}

/// The differences recorded that name `file`.
fn reported(file: &str) -> Vec<String> {
    take_failures()
        .into_iter()
        .filter(|f| f.contains(file))
        .collect()
}

#[test]
fn sparse_copy_keeps_bytes_holes_preallocation_and_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(d, "truncate", &["-s", "64M", "f"]);
    io(
        d,
        "raw",
        "f",
        &["write -P 0x5a 1M 64k", "write -P 0x6b 63M 4k"],
    );
    // Room preallocated inside the file and past its end.
    sh(d, "fallocate", &["-n", "-o", "16M", "-l", "1M", "f"]);
    sh(d, "fallocate", &["-n", "-o", "64M", "-l", "1M", "f"]);
    std::fs::set_permissions(d.join("f"), std::fs::Permissions::from_mode(0o640)).unwrap();
    common::sparse_copy(&d.join("f"), &d.join("g"));
    assert_eq!(
        std::fs::read(d.join("f")).unwrap(),
        std::fs::read(d.join("g")).unwrap()
    );
    assert_eq!(extent_bytes(&d.join("f")), extent_bytes(&d.join("g")));
    assert_eq!(
        extent_bytes(&d.join("g")),
        (64 << 10) + (4 << 10) + (2 << 20),
        "only the data and the preallocated room take room"
    );
    let mode = |f: &str| std::fs::metadata(d.join(f)).unwrap().mode() & 0o7777;
    assert_eq!(mode("g"), 0o640);
    // A copy over an existing longer file leaves nothing of it.
    std::fs::write(d.join("h"), vec![0xffu8; 80 << 20]).unwrap();
    common::sparse_copy(&d.join("f"), &d.join("h"));
    assert_eq!(
        std::fs::read(d.join("f")).unwrap(),
        std::fs::read(d.join("h")).unwrap()
    );
}

#[test]
fn same_in_dir_copies_reports_nothing_when_the_tools_agree() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture(dir.path());
    same_in_dir_copies(&fx, 0, &["info", "a.qcow2"]);
    same_in_dir_copies(&fx, 1, &["resize", "a.qcow2", "+1M"]);
    assert_eq!(take_failures(), Vec::<String>::new());
}

#[test]
fn a_difference_planted_in_a_file_no_tool_wrote_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture(dir.path());
    same_in_dir_copies_planted(&fx, 0, &["info", "a.qcow2"], &|d| {
        io(d, "qcow2", "b.qcow2", &["write -P 0x99 8M 4k"]);
    });
    assert_eq!(reported("b.qcow2").len(), 1);
}

#[test]
fn a_difference_planted_in_a_file_a_tool_wrote_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture(dir.path());
    same_in_dir_copies_planted(&fx, 0, &["resize", "a.qcow2", "+1M"], &|d| {
        io(d, "qcow2", "a.qcow2", &["write -P 0x99 0 4k"]);
    });
    assert_eq!(reported("a.qcow2").len(), 1);
}

#[test]
fn a_planted_write_whose_modification_time_is_set_back_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture(dir.path());
    same_in_dir_copies_planted(&fx, 0, &["info", "a.qcow2"], &|d| {
        let f = std::fs::File::options()
            .write(true)
            .open(d.join("c.raw"))
            .unwrap();
        f.write_all_at(&[0x77; 512], 0).unwrap();
        let old = std::time::UNIX_EPOCH + common::Untouched::STAMP;
        f.set_times(
            std::fs::FileTimes::new()
                .set_modified(old)
                .set_accessed(old),
        )
        .unwrap();
    });
    assert_eq!(reported("c.raw").len(), 1);
}

#[test]
fn a_file_replaced_by_a_changed_copy_with_the_old_times_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture(dir.path());
    same_in_dir_copies_planted(&fx, 0, &["info", "a.qcow2"], &|d| {
        let mut bytes = std::fs::read(d.join("c.raw")).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(d.join("c.new"), bytes).unwrap();
        let old = std::time::UNIX_EPOCH + common::Untouched::STAMP;
        std::fs::File::open(d.join("c.new"))
            .unwrap()
            .set_times(
                std::fs::FileTimes::new()
                    .set_modified(old)
                    .set_accessed(old),
            )
            .unwrap();
        std::fs::rename(d.join("c.new"), d.join("c.raw")).unwrap();
    });
    assert_eq!(reported("c.raw").len(), 1);
}
