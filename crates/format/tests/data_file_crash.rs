//! A crash at any point while guest data is written to an image with an external
//! data file (plain, and raw) leaves a pair of files that opens, checks without
//! corruption (here and in qemu-img) and reads as the disk before or after the
//! operation in progress: the data file is durable before the L2 entry that maps
//! it, and a raw data file gets zeroes before the zero flag.

use std::sync::Arc;
use strata_format::qcow2::{create::create_with_data_file, CreateOptions, Qcow2Image};
use strata_format::qcow2::{Qcow2OpenOptions, Repair};
use strata_format::BlockDevice;
use strata_storage::{materialise, picks_for, CrashClock, CrashStorage, MemStorage};

const SIZE: u64 = 2 << 20;

#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64),
    Discard(u64, u64),
}

fn ops() -> Vec<Op> {
    vec![
        Op::Write(100, 5000, 1),         // cluster 0: host offset 0, partial
        Op::Write(64 << 10, 3 << 16, 2), // three fresh clusters
        Op::Write(70 << 10, 4096, 3),    // in place
        Op::Zero(128 << 10, 64 << 10),
        Op::Write(1 << 20, 100, 4), // partial, fresh
        Op::Discard(64 << 10, 64 << 10),
        Op::Write(0, 64 << 10, 5), // cluster 0 again, whole
    ]
}

fn apply(model: &mut [u8], op: Op) {
    match op {
        Op::Write(off, len, p) => model[off as usize..(off + len) as usize].fill(p),
        Op::Zero(off, len) | Op::Discard(off, len) => {
            model[off as usize..(off + len) as usize].fill(0)
        }
    }
}

fn run(img: &Qcow2Image, op: Op) -> strata_format::Result<()> {
    match op {
        Op::Write(off, len, p) => img.write(&vec![p; len as usize], off)?,
        Op::Zero(off, len) => img.write_zeroes(off, len, false)?,
        Op::Discard(off, len) => img.discard(off, len)?,
    }
    img.flush()
}

fn opts(raw: bool) -> CreateOptions {
    CreateOptions {
        size: SIZE,
        data_file: Some("d.raw".into()),
        data_file_raw: raw,
        ..Default::default()
    }
}

/// The pair `(image, data file)` after `ops` ran on stores crashing at `crash_at`,
/// with how many operations completed.
fn run_until(
    base: &(Vec<u8>, Vec<u8>),
    crash_at: Option<u64>,
) -> (Arc<CrashStorage>, Arc<CrashStorage>, usize, u64) {
    let clock = CrashClock::new(crash_at);
    let img_s = Arc::new(CrashStorage::new(base.0.clone(), clock.clone()));
    let data_s = Arc::new(CrashStorage::new(base.1.clone(), clock.clone()));
    let mut done = 0;
    if let Ok(img) =
        Qcow2Image::open_with_data_file(img_s.clone(), data_s.clone(), Default::default())
    {
        for op in ops() {
            if run(&img, op).is_err() {
                break;
            }
            done += 1;
        }
        // A crashed image must not write on drop either: its clock refuses.
        drop(img);
    }
    let n = clock.ops();
    (img_s, data_s, done, n)
}

fn qemu_check(img: &[u8], data: &[u8]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("i.qcow2"), img).unwrap();
    std::fs::write(dir.path().join("d.raw"), data).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", "i.qcow2"])
        .current_dir(dir.path())
        .output()
        .expect("qemu-img must be installed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn every_crash_point_leaves_a_consistent_pair_reading_as_one_model_state() {
    let random: u64 = std::env::var("STRATA_DATA_FILE_CRASH_PICKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let (mut points, mut images) = (0u64, 0u64);
    for raw in [false, true] {
        let (img_m, data_m) = (Arc::new(MemStorage::new()), Arc::new(MemStorage::new()));
        create_with_data_file(img_m.clone(), data_m.clone(), &opts(raw))
            .unwrap()
            .close()
            .unwrap();
        let base = (img_m.snapshot(), data_m.snapshot());
        let mut states = vec![vec![0u8; SIZE as usize]];
        for op in ops() {
            let mut next = states.last().unwrap().clone();
            apply(&mut next, op);
            states.push(next);
        }
        let (_, _, done, total) = run_until(&base, None);
        assert_eq!(done, ops().len(), "the uncut run completes");
        let mut qemu_seen = std::collections::HashSet::new();
        for k in 0..total {
            let (img_s, data_s, done, _) = run_until(&base, Some(k));
            points += 1;
            for pick in picks_for(&[&img_s, &data_s], random, random) {
                images += 1;
                let files = materialise(&[&img_s, &data_s], pick);
                let what = format!("raw={raw} crash at {k}/{total} ({pick:?})");
                let img = Qcow2Image::open_with_data_file(
                    Arc::new(MemStorage::from_vec(files[0].clone())),
                    Arc::new(MemStorage::from_vec(files[1].clone())),
                    Qcow2OpenOptions {
                        read_only: true,
                        ..Default::default()
                    },
                )
                .unwrap_or_else(|e| panic!("{what}: open: {e}"));
                let r = img.check(Repair::None).unwrap();
                assert_eq!(r.corruptions, 0, "{what}: {r:?}");
                let mut got = vec![0u8; SIZE as usize];
                img.read(&mut got, 0).unwrap();
                // The operation in progress may have landed in part (a torn
                // write in place): each byte is from the state before or after it.
                let before = &states[done];
                let after = states.get(done + 1).unwrap_or(before);
                let ok = got
                    .iter()
                    .zip(before.iter().zip(after))
                    .all(|(g, (b, a))| g == b || g == a);
                assert!(ok, "{what}: reads as neither state {done} nor {}", done + 1);
                if raw && states[done] == got {
                    // A raw data file is the disk itself once the operation is done.
                    assert!(
                        files[1].len() as u64 >= SIZE || got.iter().all(|&b| b == 0),
                        "{what}: the raw data file is short"
                    );
                }
                if qemu_seen.insert(files.clone()) {
                    let (code, out) = qemu_check(&files[0], &files[1]);
                    assert!(
                        code == 0 || code == 3,
                        "{what}: qemu-img check {code}\n{out}"
                    );
                }
            }
        }
    }
    eprintln!("data file crash sweep: {points} cut points, {images} images");
    assert!(points > 50, "{points} cut points");
}
