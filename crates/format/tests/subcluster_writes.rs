//! Writes into extended-L2 images leave the very bytes QEMU leaves: the same
//! writes go through qemu-io into one copy of an image and through strata's
//! engine into another, one request at a time, and the two files must be equal
//! (data, L2 entries and their subcluster bitmaps, refcounts, file length).
//! With an internal snapshot (whose time differs) the maps are compared.
//!
//! The writes cover subclusters in part and in whole, of unallocated clusters,
//! of clusters that are allocated with only some subclusters, of zero
//! subclusters with and without a host cluster, of clusters shared with an
//! internal snapshot, and across clusters; with and without a backing file
//! (whose data shows through the subclusters left unallocated), at cluster
//! sizes from 16 KiB (512-byte subclusters) to 2 MiB.
//! A missing qemu-img or qemu-io fails these tests.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use strata_format::qcow2::{Qcow2Image, Qcow2OpenOptions};
use strata_format::raw::RawImage;
use strata_format::BlockDevice;
use strata_storage::{FileStorage, OpenOptions, Storage};

fn tool(prog: &str, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog} must be installed (QEMU 10): {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One request of a sequence, given to both tools.
#[derive(Debug, Clone, Copy)]
enum Req {
    /// Write `len` bytes of `pattern` at `off`.
    Write(u64, u64, u8),
    /// Write zeroes (no unmapping) over `[off, off + len)`.
    Zero(u64, u64),
    /// Take the internal snapshot `s` (qemu-img on both copies).
    Snapshot,
}

/// Apply `reqs` to `ours` through strata (one open per run of writes, closed
/// before a snapshot is taken) and to `theirs` through qemu-io, one process per
/// request so that each request completes before the next starts.
fn apply(dir: &Path, ours: &str, theirs: &str, backing: Option<&str>, reqs: &[Req]) {
    let open = || {
        let st: Arc<dyn Storage> =
            Arc::new(FileStorage::open(dir.join(ours), OpenOptions::write()).unwrap());
        let img = Qcow2Image::open(st, Qcow2OpenOptions::default()).unwrap();
        if let Some(b) = backing {
            let bs: Arc<dyn Storage> =
                Arc::new(FileStorage::open(dir.join(b), OpenOptions::read()).unwrap());
            img.set_backing(Some(Arc::new(RawImage::open(bs).unwrap())));
        }
        img
    };
    let mut img = Some(open());
    for r in reqs {
        match *r {
            Req::Write(off, len, p) => {
                let i = img.get_or_insert_with(open);
                i.write(&vec![p; usize::try_from(len).unwrap()], off)
                    .unwrap();
                let cmd = format!("write -P {p} {off} {len}");
                tool("qemu-io", dir, &["-f", "qcow2", "-c", &cmd, theirs]);
            }
            Req::Zero(off, len) => {
                let i = img.get_or_insert_with(open);
                i.write_zeroes(off, len, false).unwrap();
                let cmd = format!("write -z {off} {len}");
                tool("qemu-io", dir, &["-f", "qcow2", "-c", &cmd, theirs]);
            }
            Req::Snapshot => {
                if let Some(i) = img.take() {
                    i.close().unwrap();
                }
                for f in [ours, theirs] {
                    tool("qemu-img", dir, &["snapshot", "-c", "s", f]);
                }
            }
        }
    }
    if let Some(i) = img.take() {
        i.close().unwrap();
    }
}

/// Run `reqs` on two copies of a new extended-L2 image of `cluster` bytes per
/// cluster (over a raw backing file of patterned data when `backed`) and require
/// the same files; a snapshot's time is the only thing allowed to differ, so
/// images with snapshots are compared by QEMU's views and maps instead.
fn same_after(cluster: u64, backed: bool, reqs: &[Req]) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = (cluster * 10).max(4 << 20);
    let mut create = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        format!("extended_l2=on,cluster_size={cluster}"),
    ];
    if backed {
        let data: Vec<u8> = (0..size).map(|i| (i / 512) as u8 | 1).collect();
        std::fs::write(d.join("base.raw"), data).unwrap();
        create.extend(["-b".into(), "base.raw".into(), "-F".into(), "raw".into()]);
    }
    create.extend(["img.qcow2".into(), size.to_string()]);
    let create: Vec<&str> = create.iter().map(String::as_str).collect();
    tool("qemu-img", d, &create);
    std::fs::copy(d.join("img.qcow2"), d.join("ours.qcow2")).unwrap();
    std::fs::copy(d.join("img.qcow2"), d.join("theirs.qcow2")).unwrap();
    let backing = backed.then_some("base.raw");
    apply(d, "ours.qcow2", "theirs.qcow2", backing, reqs);
    let what = format!("{cluster}-byte clusters, backed {backed}, {reqs:?}");
    let check = |f: &str| tool("qemu-img", d, &["check", "--output=json", f]);
    assert_eq!(
        check("ours.qcow2").replace("ours", "IMG"),
        check("theirs.qcow2").replace("theirs", "IMG"),
        "{what}: check"
    );
    tool("qemu-img", d, &["compare", "ours.qcow2", "theirs.qcow2"]);
    if reqs.iter().any(|r| matches!(r, Req::Snapshot)) {
        let map = |f: &str| tool("qemu-img", d, &["map", "--output=json", f]);
        assert_eq!(map("ours.qcow2"), map("theirs.qcow2"), "{what}: map");
    } else {
        // Equal bytes; the maps are not compared, as QEMU zeroes a copy-on-write
        // region that reads as zeroes by allocating it zeroed in the file (a
        // map then tells its sectors apart as zero data) where strata writes
        // the zero bytes.
        let read = |f: &str| std::fs::read(d.join(f)).unwrap();
        assert!(
            read("ours.qcow2") == read("theirs.qcow2"),
            "{what}: the files' bytes differ"
        );
    }
}

/// Requests for one cluster size `c` (subcluster `c / 32`).
fn partial_writes(c: u64) -> Vec<Req> {
    let sc = c / 32;
    vec![
        // Inside one subcluster of an unallocated cluster.
        Req::Write(c + 100, 200, 1),
        // Whole subclusters, aligned, of another unallocated cluster.
        Req::Write(3 * c + 2 * sc, 3 * sc, 2),
        // Unallocated subclusters of an allocated cluster, in part.
        Req::Write(c + 5 * sc + 7, sc, 3),
        // Allocated and unallocated subclusters together.
        Req::Write(c + 50, 6 * sc, 4),
        // Zero subclusters of an allocated cluster, then data into part of them.
        Req::Zero(3 * c + 8 * sc, 4 * sc),
        Req::Write(3 * c + 9 * sc + 3, 10, 5),
        // Zero subclusters of a cluster without a host cluster, then data.
        Req::Zero(5 * c + sc, 3 * sc),
        Req::Write(5 * c + 2 * sc + 1, sc, 6),
        // Across a cluster boundary, both ends partial.
        Req::Write(6 * c - sc / 2 - 5, sc + 11, 7),
        // A whole cluster and parts of its neighbours.
        Req::Write(7 * c - 3, c + 9, 8),
        // The last subcluster of an allocated cluster.
        Req::Write(2 * c - 20, 20, 9),
    ]
}

#[test]
fn partial_subcluster_writes_leave_the_bytes_qemu_io_leaves_at_every_cluster_size() {
    for c in [16 << 10, 64 << 10, 512 << 10, 2 << 20] {
        for backed in [false, true] {
            same_after(c, backed, &partial_writes(c));
        }
    }
}

#[test]
fn writes_into_clusters_shared_with_a_snapshot_copy_only_their_allocated_subclusters() {
    for c in [16 << 10, 64 << 10] {
        let sc = c / 32;
        for backed in [false, true] {
            same_after(
                c,
                backed,
                &[
                    Req::Write(c + 4 * sc, 3 * sc, 1),
                    Req::Write(c + 20 * sc + 9, 100, 2),
                    Req::Write(3 * c + 10, 10, 3),
                    Req::Snapshot,
                    // Between, before and after the allocated subclusters.
                    Req::Write(c + 10 * sc + 1, 10, 4),
                    Req::Write(3 * c + 30 * sc, 5, 5),
                    Req::Write(3 * c - 1, 2, 6),
                ],
            );
        }
    }
}
