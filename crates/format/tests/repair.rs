//! Repair agrees with `qemu-img check -r`: images damaged in known ways are repaired
//! by strata and by qemu-img with the same counts and the same data afterwards; and
//! a repair crashed at any write, with any pick of its unflushed writes lost (the
//! crash backend), leaves an image that a second repair fixes.

mod damage;

use damage::{
    be64, exit_class, put64, qemu_check, qemu_img, qemu_io, repaired_count, strata_check, Verdict,
};
use std::path::Path;
use std::sync::Arc;
use strata_format::qcow2::header::Header;
use strata_format::qcow2::{
    create, CreateOptions, Qcow2Image, Qcow2OpenOptions, Repair, SnapshotSpec,
};
use strata_format::BlockDevice;
use strata_storage::{picks_for, CrashClock, CrashStorage, FaultStorage, MemStorage, Storage};

/// A new image of `size` bytes and `cluster_size`, with `writes` (byte, offset,
/// length) done and a snapshot taken after the first `snap_after` of them; its
/// bytes once closed.
fn made(size: u64, cluster_size: u64, writes: &[(u8, u64, usize)], snap_after: usize) -> Vec<u8> {
    let mem = Arc::new(MemStorage::new());
    let s: Arc<dyn Storage> = mem.clone();
    let img = create(
        s,
        &CreateOptions {
            size,
            cluster_size,
            ..Default::default()
        },
    )
    .unwrap();
    for (i, &(byte, offset, len)) in writes.iter().enumerate() {
        if i == snap_after {
            img.snapshot_create(&SnapshotSpec {
                name: "s".into(),
                ..Default::default()
            })
            .unwrap();
        }
        img.write(&vec![byte; len], offset).unwrap();
    }
    img.close().unwrap();
    drop(img);
    mem.snapshot()
}

/// A clean image with data and one snapshot, as bytes.
fn sample() -> Vec<u8> {
    made(
        4 << 20,
        4096,
        &[
            (0x11, 0, 300_000),
            (0x22, 100_000, 40_000),
            (0x33, 2 << 20, 50_000),
        ],
        1,
    )
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
            // Two clusters at the end of the file counted as used by nothing (the
            // file grows over them: qemu-img compares no refcount past its end).
            b.resize(((clusters + 3) * l.cs) as usize, 0);
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

/// strata's `check -r` of `bytes`, which must complete.
fn strata_repair(bytes: &[u8], repair: Repair) -> (Vec<u8>, strata_format::qcow2::CheckReport) {
    let (fixed, r) = damage::strata_repair(bytes, repair);
    (fixed, r.expect("strata repairs"))
}

fn check_agreement(kind: &str, mode: &str, repair: Repair) {
    let dir = tempfile::tempdir().unwrap();
    let bytes = damaged(kind);
    let q = dir.path().join("q.qcow2");
    std::fs::write(&q, &bytes).unwrap();
    let (before, bout) = qemu_check(&q);
    let (seen, _) = strata_check(&bytes);
    assert!(
        before.code != 0 && seen == before.code,
        "{kind}: the damage must be seen before the repair: qemu-img exit {}, strata exit {seen}\n{bout}",
        before.code
    );
    let (qcode, qout) = qemu_img(&["check", "-r", mode, q.to_str().unwrap()]);
    let (fixed, report) = strata_repair(&bytes, repair);
    assert_eq!(
        exit_class(&report),
        qcode,
        "{kind} -r {mode}: strata's repair exits {:?}, qemu-img's {qcode}:\n{qout}",
        report.messages
    );
    let s = dir.path().join("s.qcow2");
    std::fs::write(&s, &fixed).unwrap();
    assert_eq!(
        (report.leaks_fixed, report.corruptions_fixed),
        (
            repaired_count(&qout, "leaked clusters"),
            repaired_count(&qout, "corruptions")
        ),
        "{kind} -r {mode}: strata fixed {:?}, qemu-img said:\n{qout}\nbefore:\n{bout}",
        report.messages
    );
    let (scode, sout) = qemu_img(&["check", s.to_str().unwrap()]);
    let (qcode2, _) = qemu_img(&["check", q.to_str().unwrap()]);
    assert_eq!(scode, qcode2, "{kind} -r {mode}: after repair strata's image checks {scode}, qemu-img's {qcode2}:\n{sout}");
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

/// What a guest reads from the image in `bytes`, opened read-only.
fn guest_view(bytes: Vec<u8>) -> Vec<u8> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes));
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
}

#[test]
fn a_repair_crashed_at_any_write_is_finished_by_the_next_repair() {
    let (total, images) = sweep_repair_crashes(damaged("too-low"));
    println!("repair cut: {total} crash points, {images} images repaired again");
}

/// The rebuild of an image whose refcounts span several refcount blocks (512-byte
/// clusters: 256 clusters a block), where new blocks land inside the ranges they
/// describe and the table moves: cut at every write, no worse than before.
#[test]
fn a_rebuild_over_several_refcount_blocks_crashed_at_any_write_is_finished_by_the_next_repair() {
    let mut b = made(
        8 << 20,
        512,
        &[(0x44, 0, 300_000), (0x55, 4 << 20, 100_000)],
        usize::MAX,
    );
    let h = Header::parse(&b, b.len() as u64).unwrap();
    let l2 = be64(&b, h.l1_table_offset as usize) & OFFSET_MASK;
    let cluster = l2 / 512;
    let rb = be64(&b, (h.refcount_table_offset + 8 * (cluster / 256)) as usize);
    let at = (rb + 2 * (cluster % 256)) as usize;
    b[at..at + 2].copy_from_slice(&0u16.to_be_bytes());
    let (total, images) = sweep_repair_crashes(b);
    println!("rebuild cut: {total} crash points, {images} images repaired again");
}

/// Cut a `check -r all` of `bytes` at every write and flush, with none, all, only
/// the newest or a random subset of its unflushed writes reaching the disk; each
/// crashed image must be repaired clean by a second repair, with the data the
/// uncut repair leaves. Returns the crash points and images tried.
fn sweep_repair_crashes(bytes: Vec<u8>) -> (u64, usize) {
    let expect = {
        let (fixed, report) = strata_repair(&bytes, Repair::All);
        assert!(
            report
                .messages
                .iter()
                .any(|m| m == "Rebuilding refcount structure"),
            "the damage must take a rebuild: {:?}",
            report.messages
        );
        guest_view(fixed)
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
            let v = guest_view(again);
            assert!(
                v == expect,
                "crash at {k} ({pick:?}): data differs after repair"
            );
        }
    }
    (total, images)
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// An image made by qemu-img (`create` options, `size`) and written by qemu-io.
fn qemu_made(dir: &Path, create: &str, size: &str, io: &[&str]) -> Vec<u8> {
    let p = dir.join("made.qcow2");
    let p = p.to_str().unwrap();
    let (c, out) = qemu_img(&["create", "-q", "-f", "qcow2", "-o", create, p, size]);
    assert_eq!(c, 0, "{out}");
    let mut args = Vec::new();
    for cmd in io {
        args.extend(["-c", cmd]);
    }
    args.push(p);
    let (c, out) = qemu_io(&args);
    assert_eq!(c, 0, "{out}");
    std::fs::read(p).unwrap()
}

/// The file offset of the active L2 entry that maps guest offset `guest`.
fn l2_entry_at(b: &[u8], guest: u64) -> usize {
    let h = Header::parse(b, b.len() as u64).unwrap();
    let cs = h.cluster_size();
    let stride = if h.extended_l2() { 16 } else { 8 };
    let per_table = cs / stride;
    let l2 = be64(b, (h.l1_table_offset + guest / cs / per_table * 8) as usize) & OFFSET_MASK;
    (l2 + guest / cs % per_table * stride) as usize
}

/// What qemu-img and strata make of a damaged image and of its repairs.
struct Judged {
    /// qemu-img's check of the damaged image, and strata's exit code for it.
    before: Verdict,
    strata_before: i32,
    strata_report: strata_format::qcow2::CheckReport,
    /// qemu-img's check after qemu-img's own `-r all`.
    after_qemu_repair: Verdict,
    /// qemu-img's check after strata's `-r all`, and the file it checked.
    after: Verdict,
    repaired: std::path::PathBuf,
}

fn judge(dir: &Path, bytes: &[u8]) -> Judged {
    let q = dir.join("damaged.qcow2");
    std::fs::write(&q, bytes).unwrap();
    let (before, _) = qemu_check(&q);
    let (strata_before, report) = strata_check(bytes);
    let (_, out) = qemu_img(&["check", "-r", "all", q.to_str().unwrap()]);
    let (after_qemu_repair, _) = qemu_check(&q);
    let (fixed, _) = strata_repair(bytes, Repair::All);
    let repaired = dir.join("repaired.qcow2");
    std::fs::write(&repaired, fixed).unwrap();
    let (after, _) = qemu_check(&repaired);
    assert!(
        after.corruptions + after.leaks <= before.corruptions + before.leaks,
        "strata's repair made the image worse: {before:?} -> {after:?} (qemu-img's repair: {out})"
    );
    Judged {
        before,
        strata_before,
        strata_report: report.expect("strata checks the damaged image"),
        after_qemu_repair,
        after,
        repaired,
    }
}

/// The damage is seen by both tools before the repair, and after strata's
/// repair qemu-img gives the exit code it gives after its own.
fn assert_seen_and_repaired_like_qemu_img(j: &Judged, what: &str) {
    assert!(
        j.before.code != 0 && j.strata_before == j.before.code,
        "{what}: before the repair qemu-img exits {}, strata {}: {:?}",
        j.before.code,
        j.strata_before,
        j.strata_report.messages
    );
    assert_eq!(
        j.after.code, j.after_qemu_repair.code,
        "{what}: after strata's repair qemu-img exits {:?}, after its own {:?}",
        j.after, j.after_qemu_repair
    );
}

/// An entry made invalid by `damage` keeps its cluster through strata's repair:
/// qemu-img still reports the entry (repair leaves it alone, as qemu-img's does),
/// and an allocating write elsewhere does not land on the cluster it names.
fn invalid_entry_keeps_its_cluster(
    create: &str,
    io: &[&str],
    guest: u64,
    damage: impl Fn(&mut [u8], usize),
) {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = qemu_made(dir.path(), create, "4M", io);
    let at = l2_entry_at(&bytes, guest);
    let host = (be64(&bytes, at) & OFFSET_MASK) as usize;
    let cs = Header::parse(&bytes, bytes.len() as u64)
        .unwrap()
        .cluster_size() as usize;
    let data = bytes[host..host + cs].to_vec();
    damage(&mut bytes, at);
    let j = judge(dir.path(), &bytes);
    assert_seen_and_repaired_like_qemu_img(&j, create);
    assert_eq!(j.after.code, 2, "the invalid entry is still reported");
    let p = j.repaired.to_str().unwrap();
    let (c, out) = qemu_io(&["-c", "write -P 0xee 3M 64k", p]);
    assert_eq!(c, 0, "{out}");
    let after = std::fs::read(p).unwrap();
    assert!(
        after[host..host + cs] == data[..],
        "the allocating write landed on the cluster the invalid entry names"
    );
}

#[test]
fn an_entry_with_a_reserved_bit_keeps_its_cluster_through_repair() {
    invalid_entry_keeps_its_cluster(
        "cluster_size=65536",
        &["write -P 0x11 0 64k", "write -P 0x22 1M 64k"],
        0,
        |b, at| put64(b, at, be64(b, at) | 1 << 56),
    );
}

#[test]
fn an_entry_with_an_unaligned_offset_keeps_its_cluster_through_repair() {
    invalid_entry_keeps_its_cluster(
        "cluster_size=65536",
        &["write -P 0x11 0 64k", "write -P 0x22 1M 64k"],
        0,
        |b, at| put64(b, at, be64(b, at) | 0x200),
    );
}

#[test]
fn an_entry_with_a_bad_subcluster_bitmap_keeps_its_cluster_through_repair() {
    invalid_entry_keeps_its_cluster(
        "cluster_size=65536,extended_l2=on",
        &["write -P 0x11 0 64k", "write -P 0x22 1M 64k"],
        0,
        // Subcluster 0 both allocated and zero.
        |b, at| put64(b, at + 8, be64(b, at + 8) | 1 << 32),
    );
}

#[test]
fn bit_0_of_an_extended_l2_entry_is_ignored_and_repair_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let io = ["write -P 0x33 0x3b000 56k"];
    let mut bytes = qemu_made(dir.path(), "extended_l2=on,cluster_size=128k", "4M", &io);
    let at = l2_entry_at(&bytes, 0x3b000);
    let e = be64(&bytes, at);
    put64(&mut bytes, at, e | 1);
    let q = dir.path().join("damaged.qcow2");
    std::fs::write(&q, &bytes).unwrap();
    assert_eq!(qemu_check(&q).0.code, 0, "qemu-img calls it clean");
    assert_eq!(strata_check(&bytes).0, 0, "so does strata");
    let (fixed, report) = strata_repair(&bytes, Repair::All);
    assert_eq!((report.corruptions_fixed, report.leaks_fixed), (0, 0));
    std::fs::write(&q, fixed).unwrap();
    let p = q.to_str().unwrap();
    let (c, out) = qemu_io(&["-c", "write -P 0xee 2M 256k", p]);
    assert_eq!(c, 0, "{out}");
    let (c, out) = qemu_io(&[
        "-c",
        "read -P 0x33 0x3b000 56k",
        "-c",
        "read -P 0xee 2M 256k",
        p,
    ]);
    assert!(c == 0 && !out.contains("failed"), "{out}");
    assert_eq!(qemu_check(&q).0.code, 0);
}

#[test]
fn a_truncated_image_is_corrupt_for_both_and_stays_so_after_repair() {
    let dir = tempfile::tempdir().unwrap();
    let writes: Vec<String> = (0..40)
        .map(|i| format!("write -P {i} {}k 64k", i * 1600))
        .collect();
    let io: Vec<&str> = writes.iter().map(String::as_str).collect();
    let mut bytes = qemu_made(dir.path(), "cluster_size=65536", "64M", &io);
    bytes.truncate(bytes.len() / 2);
    let j = judge(dir.path(), &bytes);
    assert_seen_and_repaired_like_qemu_img(&j, "truncated");
    assert_eq!(
        j.strata_report.corruptions, j.before.corruptions,
        "strata counts what qemu-img counts: {:?}",
        j.strata_report.messages
    );
    assert_eq!(j.after.code, 2, "references past the end stay corrupt");
    assert_eq!(j.after.corruptions, j.before.corruptions);
}

#[test]
fn a_compressed_entry_with_copied_is_corrupt_and_repair_leaves_it() {
    let dir = tempfile::tempdir().unwrap();
    let io = ["write -c -P 0x44 0 64k", "write -P 0x55 1M 64k"];
    let mut bytes = qemu_made(dir.path(), "cluster_size=65536", "4M", &io);
    let at = l2_entry_at(&bytes, 0);
    assert_ne!(be64(&bytes, at) & 1 << 62, 0, "compressed");
    let e = be64(&bytes, at);
    put64(&mut bytes, at, e | 1 << 63);
    let j = judge(dir.path(), &bytes);
    assert_seen_and_repaired_like_qemu_img(&j, "compressed with COPIED");
    assert_eq!(j.after.code, 2, "qemu-img cannot fix it either");
}

#[test]
fn a_snapshot_count_past_the_table_is_corrupt_and_repaired_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    qemu_made(
        dir.path(),
        "cluster_size=65536",
        "4M",
        &["write -P 1 0 64k"],
    );
    let p = dir.path().join("made.qcow2");
    let (c, out) = qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
    assert_eq!(c, 0, "{out}");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = u32::from_be_bytes(bytes[60..64].try_into().unwrap());
    bytes[60..64].copy_from_slice(&(n + 1).to_be_bytes());
    let j = judge(dir.path(), &bytes);
    assert_seen_and_repaired_like_qemu_img(&j, "nb_snapshots + 1");
    assert!(j
        .strata_report
        .messages
        .contains(&"ERROR snapshot table entry 1 is incomplete".to_string()));
    assert_eq!(j.after.code, 0);
}

#[test]
fn an_l1_entry_aliasing_the_refcount_table_is_corrupt_and_repaired_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let io = ["write -P 1 0 64k", "write -P 2 1M 64k"];
    let mut bytes = qemu_made(dir.path(), "cluster_size=65536", "4M", &io);
    let h = Header::parse(&bytes, bytes.len() as u64).unwrap();
    put64(
        &mut bytes,
        h.l1_table_offset as usize,
        h.refcount_table_offset | 1 << 63,
    );
    let j = judge(dir.path(), &bytes);
    assert_seen_and_repaired_like_qemu_img(&j, "L1 on the refcount table");
    assert!(j
        .strata_report
        .messages
        .contains(&"ERROR refcount block 0 refcount=2".to_string()));
    assert_eq!(j.after.code, 0);
}
