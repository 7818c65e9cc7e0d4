//! Repair agrees with `qemu-img check -r`: images damaged in known ways are repaired
//! by strata and by qemu-img with the same counts and the same data afterwards; and
//! a repair crashed at any write, with any pick of its unflushed writes lost (the
//! crash backend), leaves an image that a second repair fixes.

use std::process::Command;
use std::sync::Arc;
use strata_format::qcow2::header::Header;
use strata_format::qcow2::{
    create, CreateOptions, Qcow2Image, Qcow2OpenOptions, Repair, SnapshotSpec,
};
use strata_format::BlockDevice;
use strata_storage::{picks_for, CrashClock, CrashStorage, FaultStorage, MemStorage, Storage};

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A clean image with data and one snapshot, as bytes.
fn sample() -> Vec<u8> {
    let mem = Arc::new(MemStorage::new());
    let s: Arc<dyn Storage> = mem.clone();
    let img = create(
        s,
        &CreateOptions {
            size: 4 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    img.write(&vec![0x11u8; 300_000], 0).unwrap();
    img.snapshot_create(&SnapshotSpec {
        name: "s".into(),
        ..Default::default()
    })
    .unwrap();
    img.write(&vec![0x22u8; 40_000], 100_000).unwrap();
    img.write(&vec![0x33u8; 50_000], 2 << 20).unwrap();
    img.close().unwrap();
    drop(img);
    mem.snapshot()
}

struct Layout {
    cs: u64,
    refblock0: u64,
    l2_0: u64,
}

fn layout(b: &[u8]) -> Layout {
    let h = Header::parse(b, b.len() as u64).unwrap();
    let cs = h.cluster_size();
    let refblock0 = be64(b, h.refcount_table_offset as usize) & !0x1ff;
    let l2_0 = be64(b, h.l1_table_offset as usize) & 0x00ff_ffff_ffff_fe00;
    Layout {
        cs,
        refblock0,
        l2_0,
    }
}

fn set_refcount16(b: &mut [u8], l: &Layout, cluster: u64, v: u16) {
    let at = (l.refblock0 + cluster * 2) as usize;
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn get_refcount16(b: &[u8], l: &Layout, cluster: u64) -> u16 {
    let at = (l.refblock0 + cluster * 2) as usize;
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The damages, applied to a copy of the sample.
fn damaged(kind: &str) -> Vec<u8> {
    let mut b = sample();
    let l = layout(&b);
    let clusters = b.len() as u64 / l.cs;
    match kind {
        "leak" => {
            // Two clusters past the end of the file counted as used.
            set_refcount16(&mut b, &l, clusters + 1, 1);
            set_refcount16(&mut b, &l, clusters + 2, 3);
        }
        "too-low" => {
            // A data cluster of the active image, only it uses it: refcount 1 -> 0.
            let e = be64(&b, (l.l2_0 + 8 * 25) as usize) & 0x00ff_ffff_ffff_fe00; // rewritten after the snapshot
            assert_ne!(e, 0);
            assert_eq!(get_refcount16(&b, &l, e / l.cs), 1);
            set_refcount16(&mut b, &l, e / l.cs, 0);
        }
        "copied" => {
            // Clear COPIED on an entry whose cluster only the active image uses.
            let at = (l.l2_0 + 8 * 25) as usize;
            let e = be64(&b, at) & !(1u64 << 63);
            b[at..at + 8].copy_from_slice(&e.to_be_bytes());
        }
        "corrupt-bit" => {
            b[79] |= 2;
        }
        _ => unreachable!(),
    }
    b
}

fn qemu_img(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
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

fn count(out: &str, what: &str) -> u64 {
    // "    N leaked clusters" / "    N corruptions" in qemu-img's repair summary.
    out.lines()
        .find(|l| l.trim_end().ends_with(what) && l.starts_with("    "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn strata_repair(bytes: &[u8], repair: Repair) -> (Vec<u8>, strata_format::qcow2::CheckReport) {
    let mem = Arc::new(MemStorage::from_vec(bytes.to_vec()));
    let s: Arc<dyn Storage> = mem.clone();
    let img = Qcow2Image::open(
        s,
        Qcow2OpenOptions {
            for_repair: true,
            ..Default::default()
        },
    )
    .unwrap();
    let r = img.check(repair).unwrap();
    img.close().unwrap();
    drop(img);
    (mem.snapshot(), r)
}

fn check_agreement(kind: &str, mode: &str, repair: Repair) {
    let dir = tempfile::tempdir().unwrap();
    let bytes = damaged(kind);
    let q = dir.path().join("q.qcow2");
    std::fs::write(&q, &bytes).unwrap();
    let (_, before) = qemu_img(&["check", q.to_str().unwrap()]);
    let (qcode, qout) = qemu_img(&["check", "-r", mode, q.to_str().unwrap()]);
    let (fixed, report) = strata_repair(&bytes, repair);
    let s = dir.path().join("s.qcow2");
    std::fs::write(&s, &fixed).unwrap();
    assert_eq!(
        (report.leaks_fixed, report.corruptions_fixed),
        (count(&qout, "leaked clusters"), count(&qout, "corruptions")),
        "{kind} -r {mode}: strata fixed {:?}, qemu-img said:\n{qout}\nbefore:\n{before}",
        report.messages
    );
    let (scode, sout) = qemu_img(&["check", s.to_str().unwrap()]);
    let (qcode2, _) = qemu_img(&["check", q.to_str().unwrap()]);
    assert_eq!(scode, qcode2, "{kind} -r {mode}: after repair strata's image checks {scode}, qemu-img's {qcode2}:\n{sout}");
    let _ = qcode;
    let (c, out) = qemu_img(&["compare", q.to_str().unwrap(), s.to_str().unwrap()]);
    assert_eq!(c, 0, "{kind}: repaired images differ: {out}");
}

#[test]
fn leaks_are_repaired_like_qemu_img() {
    check_agreement("leak", "leaks", Repair::Leaks);
    check_agreement("leak", "all", Repair::All);
}

#[test]
fn refcounts_too_low_are_repaired_like_qemu_img() {
    check_agreement("too-low", "all", Repair::All);
}

#[test]
fn wrong_copied_flags_are_repaired_like_qemu_img() {
    check_agreement("copied", "all", Repair::All);
}

#[test]
fn a_consistent_image_with_the_corrupt_bit_opens_again_after_repair() {
    let bytes = damaged("corrupt-bit");
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes.clone()));
    assert!(
        Qcow2Image::open(s, Qcow2OpenOptions::default()).is_err(),
        "a corrupt image must not open read-write"
    );
    let (fixed, report) = strata_repair(&bytes, Repair::All);
    assert_eq!(report.corruptions, 0);
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(fixed));
    let img =
        Qcow2Image::open(s, Qcow2OpenOptions::default()).expect("repaired image opens read-write");
    assert!(!img.header().is_corrupt());
}

#[test]
fn a_repair_crashed_at_any_write_is_finished_by_the_next_repair() {
    let bytes = damaged("too-low");
    let expect = {
        let (fixed, _) = strata_repair(&bytes, Repair::All);
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(fixed));
        let img = Qcow2Image::open(
            s,
            Qcow2OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut v = vec![0u8; img.virtual_size() as usize];
        img.read(&mut v, 0).unwrap();
        v
    };
    let counting = Arc::new(FaultStorage::new(MemStorage::from_vec(bytes.clone()), None));
    {
        let s: Arc<dyn Storage> = counting.clone();
        let img = Qcow2Image::open(
            s,
            Qcow2OpenOptions {
                for_repair: true,
                ..Default::default()
            },
        )
        .unwrap();
        img.check(Repair::All).unwrap();
        img.close().unwrap();
    }
    let total = counting.ops();
    assert!(total > 0);
    // A crash of the repair at every write and flush, with none, all, only the
    // newest or a random subset of its unflushed writes reaching the disk.
    let mut images = 0;
    for k in 0..total {
        let f = Arc::new(CrashStorage::new(bytes.clone(), CrashClock::new(Some(k))));
        {
            let s: Arc<dyn Storage> = f.clone();
            if let Ok(img) = Qcow2Image::open(
                s,
                Qcow2OpenOptions {
                    for_repair: true,
                    ..Default::default()
                },
            ) {
                let _ = img.check(Repair::All);
                std::mem::forget(img);
            }
        }
        for pick in picks_for(&[&f], 1, 1) {
            images += 1;
            let (fixed, report) = strata_repair(&f.after_crash(pick), Repair::All);
            assert_eq!(
                report.corruptions, 0,
                "crash at {k} ({pick:?}): {:?}",
                report.messages
            );
            let (again, second) = strata_repair(&fixed, Repair::None);
            assert!(
                second.corruptions == 0 && second.leaks == 0,
                "crash at {k} ({pick:?}): {:?}",
                second.messages
            );
            let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(again));
            let img = Qcow2Image::open(
                s,
                Qcow2OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .unwrap();
            let mut v = vec![0u8; img.virtual_size() as usize];
            img.read(&mut v, 0).unwrap();
            assert!(
                v == expect,
                "crash at {k} ({pick:?}): data differs after repair"
            );
        }
    }
    println!("repair cut: {total} crash points, {images} images repaired again");
}
