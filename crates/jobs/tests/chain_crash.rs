//! Chain operations are crash safe: commit (into the backing file, into a lower
//! base, intermediate with relink), stream (whole chain, down to a base) and rebase
//! (onto a lower image, flatten) run on a three-image chain whose files sit on
//! crash stores sharing one clock, so they all crash at the same write or flush,
//! for every such point. The unflushed writes of all three files form one pool;
//! for each crash the files are built for none of them, all, only the newest, a
//! seeded random subset and one torn write (`STRATA_CRASH_RANDOM` /
//! `STRATA_CRASH_TORN` for more). Every file must pass strata's check and
//! `qemu-img check` (clean or leaks only) as it lies on disk, before a read-write
//! open could repair it; then the files reopen, the chain is rebuilt from what
//! their headers say, and the top's guest view must be exactly what it was before
//! the operation (the one model state these operations may show). One-off EIO at
//! the same points makes the operation fail cleanly with the same guarantees. The
//! test prints the number of crash points and of chains checked.

use std::sync::Arc;
use strata_format::qcow2::{create, CreateOptions, Qcow2Image, Qcow2OpenOptions, Repair};
use strata_format::BlockDevice;
use strata_jobs::{commit, rebase, stream, Cancel, NoProgress};
use strata_storage::{
    materialise, picks_for, CrashClock, CrashStorage, FaultClock, FaultMode, FaultPlan,
    FaultStorage, MemStorage, Storage,
};

const SIZE: u64 = 1 << 20;
const NAMES: [&str; 3] = ["top", "mid", "base"];

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// base <- mid <- top, 4 KiB clusters, data and zeroes at every level.
fn build() -> Vec<Vec<u8>> {
    let mk = |backing: Option<&str>, writes: &dyn Fn(&Qcow2Image)| {
        let mem = Arc::new(MemStorage::new());
        let img = create(
            mem.clone(),
            &CreateOptions {
                size: SIZE,
                cluster_size: 4096,
                backing_file: backing.map(String::from),
                backing_format: backing.map(|_| "qcow2".to_string()),
                ..Default::default()
            },
        )
        .unwrap();
        writes(&img);
        img.close().unwrap();
        drop(img);
        mem.snapshot()
    };
    let base = mk(None, &|i| {
        i.write(&pattern(1, 300_000), 0).unwrap();
        i.write(&pattern(2, 50_000), 900_000).unwrap();
    });
    let mid = mk(Some("base"), &|i| {
        i.write(&pattern(3, 300_000), 100_000).unwrap();
        i.write_zeroes(204_800, 20_480, false).unwrap();
    });
    let top = mk(Some("mid"), &|i| {
        i.write(&pattern(4, 150_000), 350_000).unwrap();
        i.write_zeroes(49_152, 12_288, false).unwrap();
        i.write(&pattern(5, 7), 999_000).unwrap();
    });
    vec![top, mid, base]
}

struct Opened<S> {
    stores: Vec<Arc<S>>,
    layers: Vec<Arc<dyn BlockDevice>>,
}

/// Open every file on its store (read-write, as a user would after a crash) and
/// attach each to the backing file its header names.
fn attach<S: Storage + 'static>(stores: Vec<Arc<S>>) -> Opened<S> {
    let layers: Vec<Arc<dyn BlockDevice>> = stores
        .iter()
        .map(|s| {
            let s: Arc<dyn Storage> = s.clone();
            Arc::new(Qcow2Image::open(s, Qcow2OpenOptions::default()).unwrap())
                as Arc<dyn BlockDevice>
        })
        .collect();
    for l in &layers {
        if let Some(b) = l.overlay().unwrap().backing_name() {
            let i = NAMES.iter().position(|n| *n == b).unwrap();
            l.set_backing(Some(layers[i].clone()));
        }
    }
    Opened { stores, layers }
}

/// The chain on fault stores sharing one clock (counting, or failing by `plan`).
fn open(bytes: &[Vec<u8>], plan: Option<FaultPlan>) -> Opened<FaultStorage<MemStorage>> {
    let clock = Arc::new(FaultClock::default());
    attach(
        bytes
            .iter()
            .map(|b| {
                Arc::new(FaultStorage::with_clock(
                    MemStorage::from_vec(b.clone()),
                    plan,
                    clock.clone(),
                ))
            })
            .collect(),
    )
}

/// The chain on crash stores sharing one clock that crashes at operation `at`.
fn open_crashing(bytes: &[Vec<u8>], at: u64) -> Opened<CrashStorage> {
    let clock = CrashClock::new(Some(at));
    attach(
        bytes
            .iter()
            .map(|b| Arc::new(CrashStorage::new(b.clone(), clock.clone())))
            .collect(),
    )
}

fn visible(d: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read(&mut v, 0).unwrap();
    v
}

type Op = fn(&[Arc<dyn BlockDevice>], &Cancel) -> strata_jobs::Result<()>;

fn commit_into_backing(l: &[Arc<dyn BlockDevice>], c: &Cancel) -> strata_jobs::Result<()> {
    let p = commit::plan(l, 0, 1, c)?;
    commit::apply_plan(l, &p, &NoProgress, c)?;
    commit::make_empty(l[0].as_ref())
}
fn commit_into_base(l: &[Arc<dyn BlockDevice>], c: &Cancel) -> strata_jobs::Result<()> {
    let p = commit::plan(l, 0, 2, c)?;
    commit::apply_plan(l, &p, &NoProgress, c)
}
fn commit_intermediate(l: &[Arc<dyn BlockDevice>], c: &Cancel) -> strata_jobs::Result<()> {
    let p = commit::plan(l, 1, 2, c)?;
    commit::apply_plan(l, &p, &NoProgress, c)?;
    commit::relink_above(l[0].as_ref(), Some("base"), Some("qcow2"))
}
fn stream_all(l: &[Arc<dyn BlockDevice>], c: &Cancel) -> strata_jobs::Result<()> {
    let p = stream::plan(l, 3, c)?;
    stream::apply_plan(l, &p, &NoProgress, c)?;
    commit::relink_above(l[0].as_ref(), None, None)
}
fn stream_to_base(l: &[Arc<dyn BlockDevice>], c: &Cancel) -> strata_jobs::Result<()> {
    let p = stream::plan(l, 2, c)?;
    stream::apply_plan(l, &p, &NoProgress, c)?;
    commit::relink_above(l[0].as_ref(), Some("base"), Some("qcow2"))
}
fn rebase_onto_base(l: &[Arc<dyn BlockDevice>], c: &Cancel) -> strata_jobs::Result<()> {
    rebase::copy_differences(&l[0], Some(&l[2]), &NoProgress, c)?;
    commit::relink_above(l[0].as_ref(), Some("base"), Some("qcow2"))
}
fn flatten(l: &[Arc<dyn BlockDevice>], c: &Cancel) -> strata_jobs::Result<()> {
    rebase::copy_differences(&l[0], None, &NoProgress, c)?;
    commit::relink_above(l[0].as_ref(), None, None)
}

const OPS: [(&str, Op); 7] = [
    ("commit into the backing file", commit_into_backing),
    ("commit into the base", commit_into_base),
    ("intermediate commit with relink", commit_intermediate),
    ("stream the whole chain", stream_all),
    ("stream down to the base", stream_to_base),
    ("rebase onto the base", rebase_onto_base),
    ("rebase -b '' (flatten)", flatten),
];

/// Every file is consistent for strata and for qemu-img (clean or leaks only).
fn consistent(bytes: &[Vec<u8>], dir: &std::path::Path, label: &str) {
    for (i, b) in bytes.iter().enumerate() {
        std::fs::write(dir.join(NAMES[i]), b).unwrap();
    }
    for (i, b) in bytes.iter().enumerate() {
        let img = Qcow2Image::open(
            Arc::new(MemStorage::from_vec(b.clone())),
            Qcow2OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let r = img.check(Repair::None).unwrap();
        assert_eq!(
            r.corruptions, 0,
            "{label}: {} corrupt: {:?}",
            NAMES[i], r.messages
        );
        let p = dir.join(NAMES[i]);
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-q", "-f", "qcow2", "-U"])
            .arg(&p)
            .output()
            .expect("qemu-img must be installed");
        let code = out.status.code();
        assert!(
            code == Some(0) || code == Some(3),
            "{label}: qemu-img check {}: {code:?} {}",
            NAMES[i],
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn after_cut(o: &Opened<FaultStorage<MemStorage>>) -> Vec<Vec<u8>> {
    o.stores.iter().map(|s| s.inner().snapshot()).collect()
}

fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Files left by a crash: consistent as they lie, and the top's view unchanged.
fn verify_chain(bytes: &[Vec<u8>], before: &[u8], dir: &std::path::Path, label: &str) {
    consistent(bytes, dir, label);
    let again = open(bytes, None);
    assert!(
        visible(again.layers[0].as_ref()) == before,
        "{label}: guest view changed"
    );
}

/// Run each operation to the end, then again crash at every write/flush (for each
/// pick of the unflushed writes) and fail with one-off EIO at every third,
/// checking the guest view and every file each time. Returns the crash points
/// and the chains checked.
fn cut_everywhere(before_bytes: &[Vec<u8>], ops: &[(&str, Op)]) -> (usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let before = visible(open(before_bytes, None).layers[0].as_ref());
    let (random, torn) = (
        env_count("STRATA_CRASH_RANDOM", 1),
        env_count("STRATA_CRASH_TORN", 1),
    );
    let mut seen = std::collections::HashSet::new();
    let (mut points, mut chains) = (0, 0);
    for &(name, op) in ops {
        // Count the fault points, and check the finished operation.
        let full = open(before_bytes, None);
        op(&full.layers, &Cancel::default()).unwrap();
        let n = full.stores[0].ops();
        let done = after_cut(&full);
        assert_eq!(
            visible(open(&done, None).layers[0].as_ref()),
            before,
            "{name}: result"
        );
        consistent(&done, dir.path(), name);
        for k in 0..n {
            let o = open_crashing(before_bytes, k);
            let r = op(&o.layers, &Cancel::default());
            assert!(r.is_err(), "{name}: crash at {k} went unnoticed");
            drop(r);
            let stores: Vec<&CrashStorage> = o.stores.iter().map(|s| s.as_ref()).collect();
            for pick in picks_for(&stores, random, torn) {
                let bytes = materialise(&stores, pick);
                if seen.insert(bytes.clone()) {
                    let label = format!("{name}, crash at {k} of {n} ({pick:?})");
                    verify_chain(&bytes, &before, dir.path(), &label);
                    chains += 1;
                }
            }
            points += 1;
            if k % 3 == 0 {
                let mode = FaultMode::ErrorOnce(libc::EIO);
                let o = open(before_bytes, Some(FaultPlan { at: k, mode }));
                let r = op(&o.layers, &Cancel::default());
                assert!(r.is_err(), "{name}: EIO at {k} went unnoticed");
                drop(r);
                let bytes = after_cut(&o);
                drop(o);
                verify_chain(
                    &bytes,
                    &before,
                    dir.path(),
                    &format!("{name}, EIO at {k} of {n}"),
                );
            }
        }
    }
    (points, chains)
}

#[test]
fn chain_operations_survive_a_crash_at_every_write() {
    let (points, chains) = cut_everywhere(&build(), &OPS);
    println!("chain operations: {points} crash points, {chains} distinct crashed chains checked");
    assert!(points > 60 && chains > points);
}

/// Emptying a top that shares clusters with an internal snapshot drops only the
/// active view's references: at every cut the snapshot and the guest view survive.
#[test]
fn commit_of_a_top_with_an_internal_snapshot_survives_a_crash_at_every_write() {
    let mut bytes = build();
    let mem = Arc::new(MemStorage::from_vec(bytes[0].clone()));
    let top = Qcow2Image::open(mem.clone(), Qcow2OpenOptions::default()).unwrap();
    top.snapshot_create(&strata_format::qcow2::SnapshotSpec {
        name: "s1".into(),
        date: Some((1, 0)),
        vm_clock_nsec: 0,
        vm_state: Vec::new(),
        icount: None,
    })
    .unwrap();
    top.write(&pattern(6, 20_000), 360_000).unwrap();
    top.close().unwrap();
    drop(top);
    bytes[0] = mem.snapshot();
    let (points, chains) = cut_everywhere(&bytes, &OPS[..1]);
    println!(
        "commit with a snapshot: {points} crash points, {chains} distinct crashed chains checked"
    );
    assert!(points > 10);
    // The snapshot still reads what the top showed when it was taken.
    let full = open(&bytes, None);
    commit_into_backing(&full.layers, &Cancel::default()).unwrap();
    let view = full.layers[0]
        .internal_snapshots()
        .unwrap()
        .view("s1")
        .unwrap();
    let mut got = vec![0u8; 400_000];
    view.read(&mut got, 0).unwrap();
    let orig = open(&build(), None);
    let oq = &orig.layers[0];
    let mut want = vec![0u8; 400_000];
    // The snapshot view has no backing attached: compare what the top stored.
    let st = oq.block_status(350_000, 4096).unwrap();
    assert!(!matches!(st.status, strata_format::Status::Unallocated));
    oq.set_backing(None);
    oq.read(&mut want, 0).unwrap();
    assert!(got == want, "snapshot content changed");
}

/// Cancels the job once some progress has been reported.
struct CancelAfter<'a> {
    cancel: &'a Cancel,
    after: u64,
    seen: std::sync::atomic::AtomicU64,
}

impl strata_jobs::Progress for CancelAfter<'_> {
    fn set_total(&self, _total: u64) {}
    fn advance(&self, n: u64) {
        let s = self.seen.fetch_add(n, std::sync::atomic::Ordering::SeqCst) + n;
        if s >= self.after {
            self.cancel.cancel();
        }
    }
}

#[test]
fn a_cancelled_job_stops_with_the_chain_unchanged_and_can_run_again() {
    let before_bytes = build();
    let before = visible(open(&before_bytes, None).layers[0].as_ref());
    type Job =
        fn(&[Arc<dyn BlockDevice>], &dyn strata_jobs::Progress, &Cancel) -> strata_jobs::Result<()>;
    let jobs: [(&str, Job); 3] = [
        ("commit", |l, p, c| {
            let plan = commit::plan(l, 1, 2, c)?;
            commit::apply_plan(l, &plan, p, c)?;
            commit::relink_above(l[0].as_ref(), Some("base"), Some("qcow2"))
        }),
        ("stream", |l, p, c| {
            let plan = stream::plan(l, 3, c)?;
            stream::apply_plan(l, &plan, p, c)?;
            commit::relink_above(l[0].as_ref(), None, None)
        }),
        ("rebase", |l, p, c| {
            rebase::copy_differences(&l[0], None, p, c)?;
            commit::relink_above(l[0].as_ref(), None, None)
        }),
    ];
    for (name, job) in jobs {
        // The cancel is raised from a progress report, which the job's workers
        // see at their next check: a short job may finish first. Only a job that
        // ended cancelled is checked; one must, within a bounded number of tries.
        let mut tries = 0;
        let o = loop {
            tries += 1;
            let o = open(&before_bytes, None);
            let cancel = Cancel::default();
            let p = CancelAfter {
                cancel: &cancel,
                after: 1,
                seen: Default::default(),
            };
            match job(&o.layers, &p, &cancel) {
                Err(strata_jobs::Error::Cancelled) => break o,
                Ok(()) if tries < 50 => continue,
                r => panic!("{name}: {:?} after {tries} tries", r.err()),
            }
        };
        let bytes = after_cut(&o);
        drop(o);
        let again = open(&bytes, None);
        assert_eq!(
            visible(again.layers[0].as_ref()),
            before,
            "{name}: view after cancel"
        );
        // The top still has its old backing file: the relink never happened.
        assert_eq!(
            again.layers[0].overlay().unwrap().backing_name().as_deref(),
            Some("mid".as_ref()),
            "{name}"
        );
        // Running it again to the end works and keeps the view.
        job(&again.layers, &NoProgress, &Cancel::default()).unwrap();
        let done = after_cut(&again);
        drop(again);
        assert_eq!(
            visible(open(&done, None).layers[0].as_ref()),
            before,
            "{name}: rerun"
        );
    }
}
