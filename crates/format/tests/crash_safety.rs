//! Crash safety, proven by cutting the storage at every write and flush.
//!
//! A sequence of operations (in-place and copy-on-write writes, L2 table and refcount
//! block allocation, refcount-table growth, L1 growth by resize, shrinking (with
//! and without snapshots), write-zeroes, discard, flushes) runs on a fault-injecting backend that stops all writes from
//! operation `k` on, for every `k` until the sequence completes. After each cut the
//! image reopens; strata's check and `qemu-img check` must report it clean or with
//! leaks only; every byte flushed before the cut reads back, and bytes written after
//! the last flush read as either their old or their new value. The same points are
//! then hit with a one-off EIO and ENOSPC: the operation fails, later ones work, and
//! the image stays consistent.

use std::process::Command;
use std::sync::Arc;
use strata_format::qcow2::{create, CreateOptions, Qcow2Image, Qcow2OpenOptions, Repair};
use strata_format::BlockDevice;
use strata_storage::{FaultMode, FaultPlan, FaultStorage, MemStorage, Storage};

const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Resize(u64),
    Shrink(u64),
    Flush,
    SnapCreate(&'static str),
    SnapApply(&'static str),
    SnapDelete(&'static str),
}

fn ops() -> Vec<Op> {
    vec![
        Op::Write(0, 6000, 1),          // partial clusters: copy-on-write of zeroes
        Op::Write(100_000, 300_000, 2), // many clusters, new L2 table, refcount blocks
        Op::Flush,
        Op::Write(2000, 1000, 3), // in place
        Op::Zero(150_000, 50_000, true),
        Op::Discard(200_000, 40_000),
        Op::Flush,
        Op::Resize(SIZE * 6), // L1 growth
        Op::Write(SIZE * 5, 200_000, 4),
        Op::Write(SIZE * 2, 600_000, 5), // refcount table growth with 4 KiB clusters, 64-bit refcounts
        Op::Flush,
        Op::Zero(SIZE * 5 + 4096, 8192, false),
        Op::Write(50, 10, 6),
        Op::Flush,
        Op::SnapCreate("a"),
        Op::Write(0, 70_000, 7), // copy-on-write of clusters shared with the snapshot
        Op::Flush,
        Op::SnapCreate("b"),
        Op::Write(SIZE * 2, 9000, 8),
        Op::Flush,
        Op::SnapApply("a"),
        Op::SnapDelete("b"),
        Op::Write(3000, 100, 9),
        Op::Flush,
        // Shrink under snapshot "a" (its tables stay; the active ones are copied).
        Op::Shrink(SIZE * 3 + 4608),
        Op::Write(SIZE * 3, 4608, 10),
        Op::Flush,
        Op::SnapDelete("a"),
        // L2 tables, refcount blocks and the file's tail are given back.
        Op::Shrink(SIZE / 2),
        Op::Resize(SIZE * 2),
        Op::Write(SIZE, 5000, 11),
        Op::Flush,
    ]
}

fn base_image(opts: &CreateOptions) -> Vec<u8> {
    let mem = Arc::new(MemStorage::new());
    let s: Arc<dyn Storage> = mem.clone();
    let img = create(s, opts).unwrap();
    img.write(&vec![9u8; 20_000], 30_000).unwrap();
    img.close().unwrap();
    drop(img);
    mem.snapshot()
}

/// The same image with two persistent bitmaps added by qemu-img: `on` enabled and
/// `off` disabled, each with some bits set.
fn base_image_with_bitmaps(opts: &CreateOptions) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.qcow2");
    std::fs::write(&p, base_image(opts)).unwrap();
    let ps = p.to_str().unwrap();
    for args in [
        &["bitmap", "--add", ps, "on"][..],
        &["bitmap", "--add", ps, "off"],
    ] {
        let st = Command::new("qemu-img")
            .args(args)
            .status()
            .expect("qemu-img must be installed");
        assert!(st.success());
    }
    let st = Command::new("qemu-io")
        .args(["-c", "write -P 7 64k 4k", ps])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("qemu-io must be installed");
    assert!(st.success());
    let st = Command::new("qemu-img")
        .args(["bitmap", "--disable", ps, "off"])
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(&p).unwrap()
}

fn fill(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((off + i) as u8).wrapping_add(seed) | 0x80)
        .collect()
}

/// Apply `op` to a model disk.
fn apply_model(
    model: &mut Vec<u8>,
    op: &Op,
    cs: u64,
    snaps: &mut std::collections::HashMap<&'static str, Vec<u8>>,
) {
    match *op {
        Op::SnapCreate(n) => {
            snaps.insert(n, model.clone());
        }
        Op::SnapApply(n) => {
            if let Some(m) = snaps.get(n) {
                *model = m.clone();
            }
        }
        Op::SnapDelete(n) => {
            snaps.remove(n);
        }
        Op::Write(o, l, s) => model[o as usize..(o + l) as usize].copy_from_slice(&fill(s, o, l)),
        Op::Zero(o, l, _) => model[o as usize..(o + l) as usize].fill(0),
        Op::Discard(o, l) => {
            let start = o.next_multiple_of(cs);
            let end = (o + l) / cs * cs;
            if end > start {
                model[start as usize..end as usize].fill(0);
            }
        }
        Op::Resize(n) | Op::Shrink(n) => model.resize(n as usize, 0),
        Op::Flush => {}
    }
}

fn run_op(img: &Qcow2Image, op: &Op) -> strata_format::Result<()> {
    match *op {
        Op::Write(o, l, s) => img.write(&fill(s, o, l), o),
        Op::Zero(o, l, u) => img.write_zeroes(o, l, u),
        Op::Discard(o, l) => img.discard(o, l),
        Op::Resize(n) => img.resize(n, false),
        Op::Shrink(n) => img.resize(n, true),
        Op::Flush => img.flush(),
        Op::SnapCreate(n) => img
            .snapshot_create(&strata_format::qcow2::SnapshotSpec {
                name: n.into(),
                ..Default::default()
            })
            .map(|_| ()),
        Op::SnapApply(n) => img.snapshot_apply(n),
        Op::SnapDelete(n) => img.snapshot_delete(n).map(|_| ()),
    }
}

fn qemu_check(bytes: &[u8]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.qcow2");
    std::fs::write(&p, bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", p.to_str().unwrap()])
        .output()
        .expect("qemu-img must be installed");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `qemu-img info --output=json` of an image held in memory.
fn qemu_info(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("done.qcow2");
    std::fs::write(&p, bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", p.to_str().unwrap()])
        .output()
        .expect("qemu-img must be installed");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run the sequence with `plan`; return the bytes left on storage, the model as of
/// the last successful flush, the set of models possible for bytes written since.
fn run_with(
    base: &[u8],
    plan: Option<FaultPlan>,
    cs: u64,
) -> (Vec<u8>, Vec<u8>, Vec<Vec<u8>>, bool, u64) {
    let fault = Arc::new(FaultStorage::new(MemStorage::from_vec(base.to_vec()), plan));
    let s: Arc<dyn Storage> = fault.clone();
    let mut acked = {
        let img = Qcow2Image::open(
            s.clone(),
            Qcow2OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut m = vec![0u8; img.virtual_size() as usize];
        img.read(&mut m, 0).unwrap();
        m
    };
    let mut since: Vec<Vec<u8>> = Vec::new();
    let mut completed = true;
    let img = match Qcow2Image::open(s, Qcow2OpenOptions::default()) {
        Ok(i) => i,
        Err(_) => return (fault.inner().snapshot(), acked, since, false, fault.ops()),
    };
    let mut current = acked.clone();
    let mut snaps = std::collections::HashMap::new();
    for op in ops() {
        let r = run_op(&img, &op);
        if r.is_err() {
            completed = false;
            // The op may have partly happened.
            let mut maybe = current.clone();
            apply_model(&mut maybe, &op, cs, &mut snaps.clone());
            since.push(maybe);
            break;
        }
        apply_model(&mut current, &op, cs, &mut snaps);
        if matches!(
            op,
            Op::Flush | Op::SnapCreate(_) | Op::SnapApply(_) | Op::SnapDelete(_)
        ) {
            acked = current.clone();
            since.clear();
        } else {
            since.push(current.clone());
        }
    }
    if completed && img.close().is_err() {
        // The fault hit the final flush or the dirty-bit clear.
        completed = false;
    }
    std::mem::forget(img); // a crash does not close the image
    (
        fault.inner().snapshot(),
        acked,
        since,
        completed,
        fault.ops(),
    )
}

fn verify(bytes: &[u8], acked: &[u8], since: &[Vec<u8>], what: &str) {
    // Reopen read-write (a dirty image gets repaired here, as QEMU does).
    let mem = Arc::new(MemStorage::from_vec(bytes.to_vec()));
    let s: Arc<dyn Storage> = mem.clone();
    let img = Qcow2Image::open(s, Qcow2OpenOptions::default())
        .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    let report = img.check(Repair::None).unwrap();
    assert_eq!(
        report.corruptions, 0,
        "{what}: strata check found corruption: {:?}",
        report.messages
    );
    let size = img.virtual_size() as usize;
    let mut got = vec![0u8; size];
    img.read(&mut got, 0).unwrap();
    drop(img);
    for (i, &b) in got.iter().enumerate() {
        let ok = acked.get(i).copied().unwrap_or(0) == b
            || since.iter().any(|m| m.get(i).copied().unwrap_or(0) == b);
        assert!(
            ok,
            "{what}: byte {i} reads {b}, neither its flushed value nor a later write"
        );
    }
    // QEMU checks the image as it stands after the reopen (which repaired it if the
    // crash left it dirty).
    let (code, out) = qemu_check(&mem.snapshot());
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check exit {code}:\n{out}"
    );
}

fn crash_at_every_point(opts: CreateOptions) -> u64 {
    let base = base_image(&opts);
    crash_at_every_point_from(&opts, base)
}

fn crash_at_every_point_from(opts: &CreateOptions, base: Vec<u8>) -> u64 {
    let cs = opts.cluster_size;
    let (_, _, _, completed, total) = run_with(&base, None, cs);
    assert!(completed);
    for k in 0..total {
        let plan = FaultPlan {
            at: k,
            mode: FaultMode::Cut,
        };
        let (bytes, acked, since, _, _) = run_with(&base, Some(plan), cs);
        verify(
            &bytes,
            &acked,
            &since,
            &format!("{opts:?} cut at {k}/{total}"),
        );
    }
    for errno in [libc_eio(), libc_enospc()] {
        for k in (0..total).step_by(3) {
            let plan = FaultPlan {
                at: k,
                mode: FaultMode::ErrorOnce(errno),
            };
            let (bytes, acked, since, _, _) = run_with(&base, Some(plan), cs);
            verify(
                &bytes,
                &acked,
                &since,
                &format!("{opts:?} errno {errno} at {k}/{total}"),
            );
        }
    }
    total
}

fn libc_eio() -> i32 {
    5
}
fn libc_enospc() -> i32 {
    28
}

#[test]
fn every_cut_point_leaves_a_consistent_image_with_flushed_data() {
    let mut points = 0;
    points += crash_at_every_point(CreateOptions {
        size: SIZE,
        cluster_size: 4096,
        refcount_bits: 64,
        ..Default::default()
    });
    points += crash_at_every_point(CreateOptions {
        size: SIZE,
        cluster_size: 65536,
        ..Default::default()
    });
    points += crash_at_every_point(CreateOptions {
        size: SIZE,
        cluster_size: 65536,
        extended_l2: true,
        ..Default::default()
    });
    points += crash_at_every_point(CreateOptions {
        size: SIZE,
        cluster_size: 4096,
        lazy_refcounts: true,
        ..Default::default()
    });
    // Persistent bitmaps kept valid through every operation (and every cut).
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: 65536,
        ..Default::default()
    };
    let base = base_image_with_bitmaps(&opts);
    points += crash_at_every_point_from(&opts, base.clone());
    // Uncut, the whole sequence leaves the bitmaps for QEMU to load: consistent,
    // none in use, and no cluster of theirs leaked.
    let (bytes, _, _, completed, _) = run_with(&base, None, opts.cluster_size);
    assert!(completed);
    let (code, out) = qemu_check(&bytes);
    assert_eq!(code, 0, "bitmaps after the sequence:\n{out}");
    let info = qemu_info(&bytes);
    assert!(
        info.contains("\"name\": \"on\"") && info.contains("\"name\": \"off\""),
        "{info}"
    );
    assert!(!info.contains("in-use"), "{info}");
    eprintln!("crash safety: {points} cut points tested");
    assert!(points > 100);
}
