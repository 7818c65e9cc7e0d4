//! Internal snapshots: a model of every snapshot's contents under random
//! interleavings, VM state, and interop with qemu-img's snapshot commands.

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use strata_format::qcow2::{
    create, CreateOptions, Qcow2Image, Qcow2OpenOptions, Repair, SnapshotSpec,
};
use strata_format::BlockDevice;
use strata_storage::{FileStorage, MemStorage, OpenOptions, Storage};

const DISK: u64 = 2 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64),
    Create,
    Apply(usize),
    Delete(usize),
    Reopen,
}

fn ops() -> impl Strategy<Value = Op> {
    let range = (0..DISK, 1u64..150_000).prop_map(|(o, l)| (o, l.min(DISK - o)));
    prop_oneof![
        5 => (range.clone(), any::<u8>()).prop_map(|((o, l), s)| Op::Write(o, l, s)),
        1 => range.prop_map(|(o, l)| Op::Zero(o, l)),
        2 => Just(Op::Create),
        1 => any::<usize>().prop_map(Op::Apply),
        1 => any::<usize>().prop_map(Op::Delete),
        1 => Just(Op::Reopen),
    ]
}

fn pattern(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((off + i) as u8).wrapping_add(seed.wrapping_mul(13)) | 1)
        .collect()
}

fn read_all(img: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; img.virtual_size() as usize];
    img.read(&mut v, 0).unwrap();
    v
}

fn run(cluster_size: u64, refcount_bits: u32, ops: Vec<Op>) {
    let mem = Arc::new(MemStorage::new());
    let s: Arc<dyn Storage> = mem.clone();
    let mut img = create(
        s,
        &CreateOptions {
            size: DISK,
            cluster_size,
            refcount_bits,
            ..Default::default()
        },
    )
    .unwrap();
    let mut model = vec![0u8; DISK as usize];
    let mut snaps: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut n = 0;
    for op in ops {
        match op {
            Op::Write(o, l, s) => {
                let d = pattern(s, o, l);
                img.write(&d, o).unwrap();
                model[o as usize..(o + l) as usize].copy_from_slice(&d);
            }
            Op::Zero(o, l) => {
                img.write_zeroes(o, l, true).unwrap();
                model[o as usize..(o + l) as usize].fill(0);
            }
            Op::Create => {
                n += 1;
                let name = format!("s{n}");
                img.snapshot_create(&SnapshotSpec {
                    name: name.clone(),
                    ..Default::default()
                })
                .unwrap();
                snaps.insert(name, model.clone());
            }
            Op::Apply(i) if !snaps.is_empty() => {
                let (name, content) = snaps.iter().nth(i % snaps.len()).unwrap();
                img.snapshot_apply(name).unwrap();
                model = content.clone();
            }
            Op::Delete(i) if !snaps.is_empty() => {
                let name = snaps.keys().nth(i % snaps.len()).unwrap().clone();
                img.snapshot_delete(&name).unwrap();
                snaps.remove(&name);
            }
            Op::Apply(_) | Op::Delete(_) => {}
            Op::Reopen => {
                img.close().unwrap();
                drop(img);
                let s: Arc<dyn Storage> = mem.clone();
                img = Qcow2Image::open(s, Qcow2OpenOptions::default()).unwrap();
            }
        }
        assert!(
            read_all(&img) == model,
            "active disk differs from the model after {op:?}"
        );
        for (name, content) in &snaps {
            let view = img.snapshot_view(name).unwrap();
            assert!(
                &read_all(&view) == content,
                "snapshot {name} changed after {op:?}"
            );
        }
    }
    img.close().unwrap();
    let r = img.check(Repair::None).unwrap();
    assert!(r.corruptions == 0 && r.leaks == 0, "{:?}", r.messages);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn snapshots_keep_their_contents_through_random_interleavings(
        cs in prop_oneof![Just(512u64), Just(4096), Just(65536)],
        rb in prop_oneof![Just(8u32), Just(16), Just(64)],
        ops in prop::collection::vec(ops(), 1..30),
    ) {
        run(cs, rb, ops);
    }
}

#[test]
fn vm_state_is_kept_with_the_snapshot_and_leaves_the_active_image() {
    let mem = Arc::new(MemStorage::new());
    let s: Arc<dyn Storage> = mem.clone();
    let img = create(
        s,
        &CreateOptions {
            size: DISK,
            ..Default::default()
        },
    )
    .unwrap();
    img.write(&[7u8; 5000], 0).unwrap();
    let state: Vec<u8> = (0..300_000u32).map(|i| (i % 199) as u8).collect();
    let snap = img
        .snapshot_create(&SnapshotSpec {
            name: "full".into(),
            vm_state: state.clone(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(snap.vm_state_size, state.len() as u64);
    assert_eq!(img.snapshot_vm_state("full").unwrap(), state);
    let mut active = vec![1u8; 4096];
    img.read_vm_state(&mut active, 0).unwrap();
    assert!(
        active.iter().all(|&b| b == 0),
        "the active image keeps no VM state"
    );
    img.close().unwrap();
    let r = img.check(Repair::None).unwrap();
    assert!(r.corruptions == 0 && r.leaks == 0, "{:?}", r.messages);
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A new qcow2 image at `ps` with 4 KiB clusters, made by qemu-img.
fn create_4k(ps: &str, size: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        ps,
        size,
    ]);
}

fn open_rw(p: &Path) -> Qcow2Image {
    let s: Arc<dyn Storage> = Arc::new(FileStorage::open(p, OpenOptions::write()).unwrap());
    Qcow2Image::open(s, Qcow2OpenOptions::default()).unwrap()
}

#[test]
fn snapshots_made_by_strata_are_listed_read_applied_and_deleted_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "4M"]);
    let img = open_rw(&p);
    img.write(&[1u8; 100_000], 0).unwrap();
    img.snapshot_create(&SnapshotSpec {
        name: "one".into(),
        ..Default::default()
    })
    .unwrap();
    img.write(&[2u8; 50_000], 20_000).unwrap();
    img.snapshot_create(&SnapshotSpec {
        name: "two".into(),
        vm_state: vec![9u8; 70_000],
        ..Default::default()
    })
    .unwrap();
    img.write(&[3u8; 10_000], 0).unwrap();
    img.close().unwrap();
    drop(img);
    qemu_img(&["check", ps]);
    let list = qemu_img(&["snapshot", "-l", ps]);
    assert!(list.contains(" one ") && list.contains(" two "), "{list}");
    assert!(list.contains("68.4 KiB"), "VM state size listed: {list}");
    // qemu-img reads the snapshots as strata wrote them.
    let one = dir.path().join("one.raw");
    qemu_img(&[
        "convert",
        "-l",
        "snapshot.name=one",
        "-O",
        "raw",
        ps,
        one.to_str().unwrap(),
    ]);
    let got = std::fs::read(&one).unwrap();
    assert!(got[..100_000].iter().all(|&b| b == 1) && got[100_000..].iter().all(|&b| b == 0));
    // qemu-img applies and deletes them; the image stays clean.
    qemu_img(&["snapshot", "-a", "one", ps]);
    qemu_img(&["snapshot", "-d", "two", ps]);
    qemu_img(&["check", ps]);
    let img = open_rw(&p);
    let mut buf = vec![0u8; 100_001];
    img.read(&mut buf, 0).unwrap();
    assert!(buf[..100_000].iter().all(|&b| b == 1) && buf[100_000] == 0);
    assert_eq!(img.snapshots().len(), 1);
}

#[test]
fn snapshots_made_by_qemu_img_are_listed_read_applied_and_deleted_by_strata() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    let ps = p.to_str().unwrap();
    create_4k(ps, "4M");
    let io = |cmd: &str| {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd, ps])
            .output()
            .expect("qemu-io must be installed");
        assert!(out.status.success());
    };
    io("write -P 1 0 100k");
    qemu_img(&["snapshot", "-c", "a", ps]);
    io("write -P 2 50k 100k");
    qemu_img(&["snapshot", "-c", "b", ps]);
    io("write -P 3 0 10k");
    let img = open_rw(&p);
    let names: Vec<String> = img.snapshots().iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["a", "b"]);
    let a = img.snapshot_view("a").unwrap();
    let mut buf = vec![0u8; 200 << 10];
    a.read(&mut buf, 0).unwrap();
    assert!(buf[..100 << 10].iter().all(|&b| b == 1) && buf[100 << 10..].iter().all(|&b| b == 0));
    drop(a);
    img.snapshot_apply("b").unwrap();
    img.read(&mut buf, 0).unwrap();
    assert!(
        buf[..50 << 10].iter().all(|&b| b == 1) && buf[50 << 10..150 << 10].iter().all(|&b| b == 2)
    );
    img.snapshot_delete("a").unwrap();
    img.close().unwrap();
    drop(img);
    qemu_img(&["check", ps]);
    let list = qemu_img(&["snapshot", "-l", ps]);
    assert!(list.contains(" b ") && !list.contains(" a "), "{list}");
    let out = dir.path().join("b.raw");
    qemu_img(&["convert", "-O", "raw", ps, out.to_str().unwrap()]);
    let got = std::fs::read(&out).unwrap();
    assert!(
        got[..50 << 10].iter().all(|&b| b == 1) && got[50 << 10..150 << 10].iter().all(|&b| b == 2)
    );
}

/// Create and delete write fresh refcount structures at every switch: they take
/// the room the old ones leave, so a cycle leaves the file as long as it found it
/// (and `qemu-img check` clean, no leak).
#[test]
fn repeated_snapshot_create_and_delete_do_not_grow_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.qcow2");
    let ps = p.to_str().unwrap();
    create_4k(ps, "64M");
    let img = open_rw(&p);
    img.write(&vec![5u8; 20 << 20], 0).unwrap();
    let cycle = |img: &Qcow2Image| {
        img.snapshot_create(&SnapshotSpec {
            name: "s".into(),
            ..Default::default()
        })
        .unwrap();
        img.snapshot_delete("s").unwrap();
    };
    cycle(&img);
    let len = std::fs::metadata(&p).unwrap().len();
    for _ in 0..20 {
        cycle(&img);
    }
    assert!(
        std::fs::metadata(&p).unwrap().len() <= len,
        "the file grew from {len}"
    );
    img.close().unwrap();
    drop(img);
    let out = Command::new("qemu-img")
        .args(["check", ps])
        .output()
        .expect("qemu-img must be installed");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
