//! Crash safety, proven by crashing the storage at every write and flush with the
//! unflushed writes lost.
//!
//! The model: the image lives on a [`CrashStorage`], whose writes stay volatile until
//! a flush. A sequence of guest operations (in-place and copy-on-write writes, L2
//! table and refcount block allocation, refcount-table growth, L1 growth by resize,
//! shrinking with and without snapshots, write-zeroes, discard, snapshot create,
//! apply and delete, persistent bitmaps kept valid; on clear and LUKS-encrypted
//! images) runs with a guest flush after
//! each operation, and the storage crashes at mutating operation `k`, for every `k`
//! until the sequence completes. For each cut the disk left behind is built for
//! several picks of the unflushed writes: none, all, only the newest (the pick that
//! exposes a missing barrier before the write just issued), `STRATA_CRASH_RANDOM`
//! (default 1) seeded random subsets and `STRATA_CRASH_TORN` (default 1) subsets with one write
//! torn into 512-byte sectors (picks that cannot differ from "none" are skipped;
//! equal images are checked once). Each image must then:
//! - pass `qemu-img check` and strata's check (clean or leaks only) as it lies on
//!   disk, before anything repairs it. An image whose dirty bit is set (lazy
//!   refcounts, or a snapshot operation of a version 3 image cut in the middle:
//!   those change refcounts and COPIED flags in place, as QEMU does, under the
//!   dirty bit) is opened read-write, and so repaired, first, by strata and
//!   separately by QEMU (`qemu-io`); QEMU's repaired image must then pass its
//!   check and read as one model state too;
//! - show the guest ONE whole model state: the one before the operation the crash
//!   interrupted or the one after it (every earlier operation was flushed). A guest
//!   write, write-zeroes or discard in flight may land in part, so for those each
//!   512-byte guest sector of its range may be old or new, and everything outside
//!   its range must be exactly the model's. A shrink discards the part past the new
//!   size before it records the size (as QEMU's does), so in flight the disk may
//!   keep its old length with sectors of that part reading as zeroes.
//!
//! The same points are then hit with a one-off EIO and ENOSPC on the fault backend:
//! the operation fails, the run stops, and the image must meet the same conditions.
//! The test prints the number of cut points and of images checked.

use std::process::Command;
use std::sync::Arc;
use strata_format::qcow2::barrier::{self, Barrier};
use strata_format::qcow2::{create, CreateOptions, Qcow2Image, Qcow2OpenOptions, Repair};
use strata_format::BlockDevice;
use strata_storage::{
    picks_for, CrashClock, CrashPick, CrashStorage, FaultMode, FaultPlan, FaultStorage, MemStorage,
    Storage,
};

const SIZE: u64 = 1 << 20;
/// The password of the encrypted configuration; every open gives it (a clear
/// image ignores it).
const PASSWORD: &str = "crash";

fn unlock() -> strata_format::qcow2::Unlock {
    strata_format::qcow2::Unlock::Secret(PASSWORD.as_bytes().into())
}

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
        // Into clusters that keep their allocation under a zero flag: rewritten in
        // place, then the flag cleared (the data must be durable first).
        Op::Write(SIZE * 5 + 6000, 3000, 12),
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

/// Snapshots of a disk whose L1 table spans several sectors (512-byte clusters,
/// 4 MiB: 128 entries), with data under both halves of the table, and one taken
/// at another disk size: an apply must switch tables (and size) all at once.
fn snapshot_ops_large_l1() -> Vec<Op> {
    vec![
        Op::Write(1000, 3000, 1),
        Op::Write(3 << 20, 5000, 2),
        Op::SnapCreate("a"),
        Op::Write(0, 2000, 3),
        Op::Write((3 << 20) + 512, 1000, 4),
        Op::Resize(5 << 20),
        Op::Write((4 << 20) + 100, 700, 5),
        Op::SnapCreate("b"),
        Op::SnapApply("a"),
        Op::Write(600, 600, 6),
        Op::SnapApply("b"),
        Op::Write(0, 1500, 7),
        Op::Write((3 << 20) + 2048, 900, 8),
        Op::SnapApply("b"), // the same size: only the tables switch
        Op::SnapDelete("a"),
        Op::Write(3 << 20, 1024, 9),
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
    // The secret is given for every image: a clear one ignores it.
    let out = Command::new("qemu-img")
        .args([
            "check",
            "--object",
            &format!("secret,id=s0,data={PASSWORD}"),
        ])
        .arg("--image-opts")
        .arg(format!(
            "driver=qcow2,encrypt.key-secret=s0,file.filename={}",
            p.to_str().unwrap()
        ))
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
/// The image options naming `p` (the secret is given for every image: a clear
/// one ignores it).
fn qemu_image_opts(p: &std::path::Path) -> [String; 4] {
    [
        "--object".into(),
        format!("secret,id=s0,data={PASSWORD}"),
        "--image-opts".into(),
        format!(
            "driver=qcow2,encrypt.key-secret=s0,file.filename={}",
            p.to_str().unwrap()
        ),
    ]
}

/// Let QEMU repair a dirty image the way any read-write open does (`qemu-io`),
/// require its check to be clean or leaks only, and return the guest disk
/// QEMU then reads.
fn qemu_repair_and_read(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dirty.qcow2");
    std::fs::write(&p, bytes).unwrap();
    let run = |cmd: &str, args: &[String]| {
        let out = Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{cmd} must be installed: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    };
    let opts = qemu_image_opts(&p);
    let mut io = vec!["-c".to_string(), "read 0 512".to_string()];
    io.extend(opts.iter().cloned());
    let (code, text) = run("qemu-io", &io);
    if code != 0 || text.contains("Failed") {
        return Err(format!("qemu-io exit {code}: {text}"));
    }
    let mut check = vec!["check".to_string()];
    check.extend(opts.iter().cloned());
    let (code, text) = run("qemu-img", &check);
    if code != 0 && code != 3 {
        return Err(format!(
            "qemu-img check after the repair exits {code}: {text}"
        ));
    }
    let raw = dir.path().join("disk.raw");
    let mut convert = vec!["convert".to_string()];
    convert.extend(opts.iter().cloned());
    convert.extend(["-O".into(), "raw".into(), raw.to_str().unwrap().into()]);
    let (code, text) = run("qemu-img", &convert);
    if code != 0 {
        return Err(format!("qemu-img convert exits {code}: {text}"));
    }
    Ok(std::fs::read(&raw).unwrap())
}

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
/// The guest contents before the sequence and after each of its operations:
/// `states[i]` is the disk after the first `i` operations.
fn model_states(base: &[u8], cs: u64, seq: &[Op]) -> Vec<Vec<u8>> {
    let img = Qcow2Image::open(
        Arc::new(MemStorage::from_vec(base.to_vec())),
        Qcow2OpenOptions {
            read_only: true,
            unlock: unlock(),
            ..Default::default()
        },
    )
    .unwrap();
    let mut m = vec![0u8; img.virtual_size() as usize];
    img.read(&mut m, 0).unwrap();
    let mut snaps = std::collections::HashMap::new();
    let mut states = vec![m.clone()];
    for op in seq {
        apply_model(&mut m, op, cs, &mut snaps);
        states.push(m.clone());
    }
    states
}

/// How far a run got: the operations that completed (and were flushed), and
/// whether the one after them was interrupted.
struct Reached {
    /// Operations completed and flushed.
    done: usize,
    /// Mutating storage operations issued (the cut points of an uncut run).
    storage_ops: u64,
}

/// Open the image on `s` and run the sequence, flushing after each operation,
/// until something fails. A crash does not close the image.
fn run_sequence(s: Arc<dyn Storage>, seq: &[Op], ops_of: impl Fn() -> u64) -> Reached {
    let mut done = 0;
    let opts = Qcow2OpenOptions {
        unlock: unlock(),
        ..Default::default()
    };
    let Ok(img) = Qcow2Image::open(s, opts) else {
        return Reached {
            done,
            storage_ops: ops_of(),
        };
    };
    for op in seq {
        if run_op(&img, op).is_err() || img.flush().is_err() {
            break;
        }
        done += 1;
    }
    if done == seq.len() {
        // The clean close clears the dirty bit; a crash there changes no guest data.
        let _ = img.close();
    }
    std::mem::forget(img);
    Reached {
        done,
        storage_ops: ops_of(),
    }
}

/// What an operation in flight may leave in part: a guest byte range, and the
/// disk with that range landed. A write, write-zeroes or discard lands its range
/// sector by sector. A shrink first discards everything past the new size, then
/// records the size: until then the disk keeps its length with the cut-off part
/// reading as zeroes, sector by sector.
fn partial_effect(op: &Op, before: &[u8], after: &[u8]) -> Option<(u64, u64, Vec<u8>)> {
    match *op {
        Op::Write(o, l, _) | Op::Zero(o, l, _) | Op::Discard(o, l) => Some((o, l, after.to_vec())),
        Op::Shrink(n) => {
            let mut cut = before.to_vec();
            cut[n as usize..].fill(0);
            Some((n, before.len() as u64 - n, cut))
        }
        _ => None,
    }
}

/// Whether `got` is the model state before `op` or after it, where an operation
/// in flight may have landed in whole 512-byte guest sectors of its range (see
/// [`partial_effect`]).
fn is_one_model_state(got: &[u8], before: &[u8], after: &[u8], op: Option<&Op>) -> bool {
    if got == before || got == after {
        return true;
    }
    let Some((o, l, landed)) = op.and_then(|op| partial_effect(op, before, after)) else {
        return false;
    };
    if got.len() != before.len() || before.len() != landed.len() {
        return false;
    }
    let (lo, hi) = (
        (o / 512 * 512) as usize,
        ((o + l).div_ceil(512) * 512) as usize,
    );
    let hi = hi.min(got.len());
    got[..lo] == before[..lo]
        && got[hi..] == before[hi..]
        && got[lo..hi]
            .chunks(512)
            .zip(before[lo..hi].chunks(512).zip(landed[lo..hi].chunks(512)))
            .all(|(g, (b, a))| g == b || g == a)
}

/// Checks the images a sweep produces, running `qemu-img check` once per distinct image.
#[derive(Default)]
struct Checker {
    qemu: std::collections::HashMap<u64, (i32, String)>,
    repaired: std::collections::HashMap<u64, Result<Vec<u8>, String>>,
    images: u64,
}

impl Checker {
    fn qemu_check_cached(&mut self, bytes: &[u8]) -> (i32, String) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        let key = h.finish();
        if let Some(r) = self.qemu.get(&key) {
            return r.clone();
        }
        self.images += 1;
        let r = qemu_check(bytes);
        self.qemu.insert(key, r.clone());
        r
    }

    /// What QEMU reads of a dirty image once its read-write open repaired it
    /// (checked clean or leaks only after the repair), once per distinct image.
    fn qemu_repaired_cached(&mut self, bytes: &[u8]) -> Result<Vec<u8>, String> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        let key = h.finish();
        if let Some(r) = self.repaired.get(&key) {
            return r.clone();
        }
        self.images += 1;
        let r = qemu_repair_and_read(bytes);
        self.repaired.insert(key, r.clone());
        r
    }

    /// Check one image left by a crash after `done` operations; `states` is the model.
    fn verify(
        &mut self,
        bytes: &[u8],
        states: &[Vec<u8>],
        seq: &[Op],
        done: usize,
        what: &str,
    ) -> Result<(), String> {
        let in_flight = seq.get(done);
        let lazy = strata_format::qcow2::Header::parse(
            &bytes[..bytes.len().min(65536)],
            bytes.len() as u64,
        )
        .map(|h| h.is_dirty())
        .unwrap_or(false);
        let mem = Arc::new(MemStorage::from_vec(bytes.to_vec()));
        let s: Arc<dyn Storage> = mem.clone();
        // Only a dirty image relies on the repair a read-write open does.
        let img = Qcow2Image::open(
            s,
            Qcow2OpenOptions {
                read_only: !lazy,
                unlock: unlock(),
                ..Default::default()
            },
        )
        .map_err(|e| format!("{what}: reopen failed: {e}"))?;
        let report = img.check(Repair::None).unwrap();
        if report.corruptions != 0 {
            let errors: Vec<&String> = report
                .messages
                .iter()
                .filter(|m| m.starts_with("ERROR"))
                .take(6)
                .collect();
            return Err(format!(
                "{what}: strata check found {} corruptions: {errors:?}",
                report.corruptions
            ));
        }
        let mut got = vec![0u8; img.virtual_size() as usize];
        img.read(&mut got, 0).unwrap();
        drop(img);
        let after = states.get(done + 1).unwrap_or(&states[done]);
        if !is_one_model_state(&got, &states[done], after, in_flight) {
            let first_diff = |m: &[u8]| {
                got.iter()
                    .zip(m)
                    .position(|(a, b)| a != b)
                    .map_or(format!("length {} vs {}", got.len(), m.len()), |i| {
                        format!("byte {i}: {} vs {}", got[i], m[i])
                    })
            };
            return Err(format!(
                "{what}: the guest sees neither the state before operation {done} ({in_flight:?}) ({}) nor the one after it ({})",
                first_diff(&states[done]),
                first_diff(after)
            ));
        }
        if lazy {
            let got = self.qemu_repaired_cached(bytes);
            let got = got.map_err(|e| format!("{what}: QEMU's repair: {e}"))?;
            if !is_one_model_state(&got, &states[done], after, in_flight) {
                return Err(format!(
                    "{what}: after QEMU's repair the guest sees neither the state before operation {done} ({in_flight:?}) nor the one after it"
                ));
            }
        }
        let (code, out) = self.qemu_check_cached(&mem.snapshot());
        if code != 0 && code != 3 {
            let head: Vec<&str> = out.lines().take(8).collect();
            return Err(format!(
                "{what}: qemu-img check exit {code}:\n{}",
                head.join("\n")
            ));
        }
        Ok(())
    }
}

fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The picks of unflushed writes tried at one cut.
fn picks(store: &CrashStorage) -> Vec<CrashPick> {
    picks_for(
        &[store],
        env_count("STRATA_CRASH_RANDOM", 1),
        env_count("STRATA_CRASH_TORN", 1),
    )
}

/// What a sweep covered, and the first failures it found.
#[derive(Default)]
struct Sweep {
    cut_points: u64,
    images: u64,
    failures: Vec<String>,
}

/// Crash at every point of the sequence on `base`, checking every pick's image.
/// With `stop_at_first` the sweep ends at its first failure.
fn sweep(
    opts: &CreateOptions,
    base: &[u8],
    seq: &[Op],
    checker: &mut Checker,
    stop_at_first: bool,
) -> Sweep {
    let cs = opts.cluster_size;
    let states = model_states(base, cs, seq);
    let uncut = Arc::new(CrashStorage::new(base.to_vec(), CrashClock::new(None)));
    let full = run_sequence(uncut.clone(), seq, || uncut.clock().ops());
    assert_eq!(
        full.done,
        seq.len(),
        "{opts:?}: the uncut sequence completes"
    );
    let mut out = Sweep::default();
    for k in 0..full.storage_ops {
        let store = Arc::new(CrashStorage::new(base.to_vec(), CrashClock::new(Some(k))));
        let reached = run_sequence(store.clone(), seq, || store.clock().ops());
        out.cut_points += 1;
        for pick in picks(&store) {
            let bytes = store.after_crash(pick);
            out.images += 1;
            let what = format!("{opts:?} crash at {k}/{} ({pick:?})", full.storage_ops);
            if let Err(e) = checker.verify(&bytes, &states, seq, reached.done, &what) {
                out.failures.push(e);
                if stop_at_first {
                    return out;
                }
            }
        }
    }
    out
}

/// One-off EIO and ENOSPC at every third point: the run stops at the failed
/// operation and the image meets the same conditions as after a crash.
fn inject_errors(
    opts: &CreateOptions,
    base: &[u8],
    seq: &[Op],
    checker: &mut Checker,
    failures: &mut Vec<String>,
) -> u64 {
    let states = model_states(base, opts.cluster_size, seq);
    let counting = Arc::new(FaultStorage::new(MemStorage::from_vec(base.to_vec()), None));
    let total = run_sequence(counting.clone(), seq, || counting.ops()).storage_ops;
    let mut points = 0;
    for errno in [libc_eio(), libc_enospc()] {
        for k in (0..total).step_by(3) {
            let plan = FaultPlan {
                at: k,
                mode: FaultMode::ErrorOnce(errno),
            };
            let fault = Arc::new(FaultStorage::new(
                MemStorage::from_vec(base.to_vec()),
                Some(plan),
            ));
            let reached = run_sequence(fault.clone(), seq, || fault.ops());
            let what = format!("{opts:?} errno {errno} at {k}/{total}");
            if let Err(e) =
                checker.verify(&fault.inner().snapshot(), &states, seq, reached.done, &what)
            {
                failures.push(e);
            }
            points += 1;
        }
    }
    points
}

fn libc_eio() -> i32 {
    5
}
fn libc_enospc() -> i32 {
    28
}

fn configs() -> Vec<CreateOptions> {
    vec![
        CreateOptions {
            size: SIZE,
            cluster_size: 4096,
            refcount_bits: 64,
            ..Default::default()
        },
        CreateOptions {
            size: SIZE,
            cluster_size: 65536,
            ..Default::default()
        },
        CreateOptions {
            size: SIZE,
            cluster_size: 65536,
            extended_l2: true,
            ..Default::default()
        },
        CreateOptions {
            size: SIZE,
            cluster_size: 4096,
            lazy_refcounts: true,
            ..Default::default()
        },
        // LUKS: every data write is sealed at its host offset.
        CreateOptions {
            size: SIZE,
            cluster_size: 65536,
            encrypt: Some(strata_format::qcow2::encryption::LuksEncrypt {
                options: strata_format::crypto::luks::LuksCreateOptions {
                    iter_time_ms: 1,
                    ..Default::default()
                },
                password: PASSWORD.as_bytes().into(),
            }),
            ..Default::default()
        },
    ]
}

#[test]
fn every_crash_point_with_unflushed_writes_lost_leaves_a_consistent_image_and_one_model_state() {
    let mut checker = Checker::default();
    let mut total = Sweep::default();
    let mut errors = 0;
    let mut bases: Vec<(CreateOptions, Vec<u8>)> = configs()
        .into_iter()
        .map(|o| {
            let b = base_image(&o);
            (o, b)
        })
        .collect();
    // Persistent bitmaps kept valid through every operation (and every cut).
    let bopts = CreateOptions {
        size: SIZE,
        cluster_size: 65536,
        ..Default::default()
    };
    let bbase = base_image_with_bitmaps(&bopts);
    bases.push((bopts.clone(), bbase.clone()));
    for (opts, base) in &bases {
        let s = sweep(opts, base, &ops(), &mut checker, false);
        total.cut_points += s.cut_points;
        total.images += s.images;
        total.failures.extend(s.failures);
        errors += inject_errors(opts, base, &ops(), &mut checker, &mut total.failures);
    }
    // Version 2 (snapshot create, apply and delete switch the same header fields),
    // up to the shrink, which a version 2 image with snapshots refuses.
    let v2 = CreateOptions {
        size: SIZE,
        cluster_size: 4096,
        version: 2,
        ..Default::default()
    };
    let v2_ops: Vec<Op> = ops()
        .into_iter()
        .take_while(|op| !matches!(op, Op::Shrink(_)))
        .collect();
    let s = sweep(&v2, &base_image(&v2), &v2_ops, &mut checker, false);
    total.cut_points += s.cut_points;
    total.images += s.images;
    total.failures.extend(s.failures);
    eprintln!(
        "crash safety: {} crash points x picks = {} images, {} error injections; {} distinct images checked by qemu-img",
        total.cut_points, total.images, errors, checker.images
    );
    assert!(
        total.failures.is_empty(),
        "{} bad crash images; the first ones:\n{}",
        total.failures.len(),
        total.failures[..total.failures.len().min(5)].join("\n")
    );
    assert!(total.cut_points > 500);
    // Uncut, the whole sequence leaves the bitmaps for QEMU to load: consistent,
    // none in use, and no cluster of theirs leaked.
    let store = Arc::new(CrashStorage::new(bbase, CrashClock::new(None)));
    let r = run_sequence(store.clone(), &ops(), || store.clock().ops());
    assert_eq!(r.done, ops().len());
    let bytes = store.after_crash(CrashPick::None);
    let (code, out) = qemu_check(&bytes);
    assert_eq!(code, 0, "bitmaps after the sequence:\n{out}");
    let info = qemu_info(&bytes);
    assert!(
        info.contains("\"name\": \"on\"") && info.contains("\"name\": \"off\""),
        "{info}"
    );
    assert!(!info.contains("in-use"), "{info}");
}

/// Snapshot create, apply (goto) and delete on an image whose L1 table is larger
/// than a sector, including an apply back to another disk size.
#[test]
fn snapshot_operations_on_a_multi_sector_l1_survive_every_crash_as_one_model_state() {
    let opts = CreateOptions {
        size: 4 << 20,
        cluster_size: 512,
        ..Default::default()
    };
    prove_every_crash(
        "snapshots on a multi-sector L1",
        &opts,
        &snapshot_ops_large_l1(),
        50,
    );
}

/// Sweep `seq` on a fresh image made with `opts` through every crash point and
/// the error injections, and fail on any crash image that a check rejects or
/// that shows the guest no single model state; `label` names the run in its
/// summary line. The sweep must reach more than `min_cut_points` crash points,
/// so a sequence that stops writing cannot pass unseen.
fn prove_every_crash(label: &str, opts: &CreateOptions, seq: &[Op], min_cut_points: u64) {
    let base = base_image(opts);
    let mut checker = Checker::default();
    let mut s = sweep(opts, &base, seq, &mut checker, false);
    let errors = inject_errors(opts, &base, seq, &mut checker, &mut s.failures);
    eprintln!(
        "{label}: {} crash points x picks = {} images, {errors} error injections; {} distinct images checked by qemu-img",
        s.cut_points, s.images, checker.images
    );
    assert!(
        s.failures.is_empty(),
        "{} bad crash images; the first ones:\n{}",
        s.failures.len(),
        s.failures[..s.failures.len().min(5)].join("\n")
    );
    assert!(s.cut_points > min_cut_points);
}

/// Writes that cover subclusters of an extended-L2 image only in part (64 KiB
/// clusters, 2 KiB subclusters; the base image's cluster 0 has subclusters 14
/// to 24 allocated): into an unallocated cluster (a new cluster of which only
/// the written subclusters are written and marked), into unallocated and zero
/// subclusters of an owned cluster (written in place, then their bits set: the
/// data must be durable first), into zero subclusters of a cluster without a
/// host cluster, over a cluster shared with a snapshot, and across clusters.
fn subcluster_ops() -> Vec<Op> {
    vec![
        Op::Write(70_000, 100, 1),
        Op::Write(1000, 3000, 2),
        Op::Flush,
        Op::Zero(140_000, 8192, false),
        Op::Write(143_000, 2000, 3),
        Op::Zero(34_816, 4096, false),
        Op::Write(35_000, 700, 4),
        Op::Flush,
        Op::SnapCreate("a"),
        Op::Write(40_000, 500, 5),
        Op::Write(60_000, 80_000, 6),
        Op::Flush,
        Op::SnapDelete("a"),
        Op::Write(200_000, 5000, 7),
        Op::Write(196_000, 1000, 8),
    ]
}

#[test]
fn partial_subcluster_writes_on_extended_l2_survive_every_crash_as_one_model_state() {
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: 65536,
        extended_l2: true,
        ..Default::default()
    };
    prove_every_crash("partial subcluster writes", &opts, &subcluster_ops(), 30);
}

/// The sweep can fail: with one metadata barrier removed, some crash leaves an
/// image that a check rejects or that shows the guest no single model state.
fn sweep_without(barrier: Barrier) -> Sweep {
    sweep_version_without(3, barrier)
}

/// [`sweep_without`] on an image of `version` (up to the shrink for version 2).
fn sweep_version_without(version: u32, barrier: Barrier) -> Sweep {
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: 4096,
        version,
        ..Default::default()
    };
    let base = base_image(&opts);
    let seq: Vec<Op> = ops()
        .into_iter()
        .take_while(|op| version >= 3 || !matches!(op, Op::Shrink(_)))
        .collect();
    barrier::skip(Some(barrier));
    let s = sweep(&opts, &base, &seq, &mut Checker::default(), true);
    barrier::skip(None);
    eprintln!(
        "without {barrier:?}: first bad image after {} crash points, {} images:\n{}",
        s.cut_points,
        s.images,
        s.failures.first().map_or("none", String::as_str)
    );
    s
}

#[test]
fn the_sweep_fails_without_the_barrier_between_refcounts_and_l2_tables() {
    assert!(!sweep_without(Barrier::RefcountsBeforeL2)
        .failures
        .is_empty());
}

#[test]
fn the_sweep_fails_without_the_barrier_between_a_new_l2_table_and_its_l1_entry() {
    assert!(!sweep_without(Barrier::L2BeforeL1).failures.is_empty());
}

/// On version 2 images, whose snapshot operations have no dirty bit to lean on
/// (a version 3 image's interrupted operation is repaired on open instead).
#[test]
fn the_sweep_fails_without_the_barrier_between_a_snapshots_refcounts_and_the_active_l1() {
    assert!(
        !sweep_version_without(2, Barrier::SnapshotRefcountsBeforeL1)
            .failures
            .is_empty()
    );
}

/// `qemu-img info -f qcow2` opens the bytes as a qcow2 image.
fn qemu_opens_as_qcow2(bytes: &[u8]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("made.qcow2");
    std::fs::write(&p, bytes).unwrap();
    Command::new("qemu-img")
        .args(["info", "-f", "qcow2", p.to_str().unwrap()])
        .output()
        .expect("qemu-img must be installed")
        .status
        .success()
}

#[test]
fn a_crash_while_an_image_is_created_leaves_no_image_or_a_consistent_one() {
    let (mut cut_points, mut images, mut opened) = (0, 0, 0);
    for opts in configs() {
        // Created over an empty file, and over an old image that is truncated first.
        for old in [Vec::new(), base_image(&configs()[1])] {
            let uncut = Arc::new(CrashStorage::new(old.clone(), CrashClock::new(None)));
            create(uncut.clone(), &opts).unwrap();
            for k in 0..uncut.clock().ops() {
                let store = Arc::new(CrashStorage::new(old.clone(), CrashClock::new(Some(k))));
                // The image is dropped at once: a crash may also hit its close.
                let _ = create(store.clone(), &opts);
                cut_points += 1;
                for pick in picks(&store) {
                    let bytes = store.after_crash(pick);
                    images += 1;
                    if !qemu_opens_as_qcow2(&bytes) {
                        continue;
                    }
                    opened += 1;
                    let (code, text) = qemu_check(&bytes);
                    assert!(
                        code == 0 || code == 3,
                        "{opts:?} over {} bytes, crash at {k} ({pick:?}): qemu-img check exits {code}:\n{text}",
                        old.len()
                    );
                }
            }
        }
    }
    println!(
        "create: {cut_points} cut points, {images} images, {opened} opened as qcow2 and checked"
    );
    assert!(opened > 0 && opened < images);
}
