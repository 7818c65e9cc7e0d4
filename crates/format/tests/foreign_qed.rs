//! The qed driver against QEMU's: images qemu-img and qemu-io write read the
//! same here; images written here read the same in QEMU, pass its check and
//! are laid out byte for byte as qemu-io lays them out; new images are
//! qemu-img's byte for byte; block status agrees with `qemu-img map`;
//! malformed headers are refused with QEMU's words; check and repair find
//! and fix what qemu-img's do; a crash at any write leaves the old or the new
//! contents.

mod foreign;

use foreign::*;
use std::path::Path;
use std::sync::Arc;
use strata_format::qed::{self, CreateOptions, QedImage};
use strata_format::{BlockDevice, ErrorKind, Status};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn open_qed(path: &Path, write: bool) -> Arc<dyn BlockDevice> {
    qed::open(storage(path, write), Some(path), write).expect("open qed")
}

fn qed_image(dev: &dyn BlockDevice) -> &QedImage {
    dev.as_any()
        .downcast_ref::<QedImage>()
        .expect("a qed image")
}

/// Writes at odd offsets and lengths, across cluster and L2 boundaries, and
/// zero writes (aligned and not), as qemu-io spells them.
const WRITES: &[(&str, u64, u64, u8)] = &[
    ("w", 1000, 5000, 0xab),
    ("w", 65000, 3000, 0x11),
    ("w", 3 * MIB, MIB, 0x22),
    ("z", 2 * MIB, 128 * KIB, 0),
    ("z", 2 * MIB + 256 * KIB + 100, 70000, 0),
    ("w", 5 * MIB - 1234, 1234, 0x33),
    ("w", 0, 512, 0x44),
    ("w", 3 * MIB + 4096, 4096, 0x55),
];

fn qemu_io_cmds() -> Vec<String> {
    WRITES
        .iter()
        .map(|&(k, off, len, pat)| match k {
            "w" => format!("write -P {pat:#x} {off} {len}"),
            _ => format!("write -z {off} {len}"),
        })
        .collect()
}

fn strata_writes(dev: &dyn BlockDevice) {
    for &(k, off, len, pat) in WRITES {
        match k {
            "w" => dev.write(&vec![pat; len as usize], off).expect("write"),
            _ => dev.write_zeroes(off, len, false).expect("zero"),
        }
    }
}

fn create_both(
    dir: &Path,
    name: &str,
    opts: &[&str],
    size: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let q = dir.join(format!("q-{name}"));
    let s = dir.join(format!("s-{name}"));
    let mut args = vec!["create", "-q", "-f", "qed"];
    args.extend_from_slice(opts);
    let qs = p(&q).to_string();
    args.push(&qs);
    args.push(size);
    qemu_img(&args);
    std::fs::copy(&q, &s).unwrap();
    (q, s)
}

#[test]
fn qemu_written_images_read_the_same() {
    let dir = scratch();
    for (name, opts) in [
        ("default.qed", "cluster_size=65536"),
        ("small.qed", "cluster_size=4096,table_size=2"),
    ] {
        let img = dir.path().join(name);
        qemu_img(&["create", "-q", "-f", "qed", "-o", opts, p(&img), "6M"]);
        let cmds = qemu_io_cmds();
        qemu_io(
            "qed",
            &img,
            &cmds.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let dev = open_qed(&img, false);
        assert_eq!(dev.virtual_size(), 6 * MIB);
        assert_same_contents(&read_all(dev.as_ref()), &qemu_contents("qed", &img), name);
    }
}

#[test]
fn strata_writes_lay_out_the_file_as_qemu_does_and_pass_its_check() {
    let dir = scratch();
    for (name, opts) in [
        ("default.qed", "cluster_size=65536"),
        ("small.qed", "cluster_size=4096,table_size=2"),
    ] {
        let (q, s) = create_both(dir.path(), name, &["-o", opts], "6M");
        let cmds = qemu_io_cmds();
        qemu_io(
            "qed",
            &q,
            &cmds.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        {
            let dev = open_qed(&s, true);
            strata_writes(dev.as_ref());
            // Set while allocating, cleared by the close.
            assert!(qed_image(dev.as_ref()).is_dirty());
            dev.close().unwrap();
            assert!(!qed_image(dev.as_ref()).is_dirty());
        }
        let out = qemu_img(&["check", "-f", "qed", p(&s)]);
        assert!(out.contains("No errors were found"), "{out}");
        assert_same_contents(&qemu_contents("qed", &s), &qemu_contents("qed", &q), name);
        assert!(
            std::fs::read(&s).unwrap() == std::fs::read(&q).unwrap(),
            "{name}: the files differ"
        );
    }
}

#[test]
fn new_images_are_qemu_imgs_byte_for_byte() {
    let dir = scratch();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; 3 * MIB as usize]).unwrap();
    let cases: &[(&str, CreateOptions, u64, &[&str])] = &[
        ("plain", CreateOptions::default(), 10 * MIB, &[]),
        ("odd", CreateOptions::default(), 1000, &[]),
        (
            "small",
            CreateOptions {
                cluster_size: 4096,
                table_size: 2,
                ..Default::default()
            },
            5 * MIB,
            &["-o", "cluster_size=4096,table_size=2"],
        ),
        (
            "over-raw",
            CreateOptions {
                backing_file: Some(b"base.raw".to_vec()),
                backing_fmt: Some("raw".into()),
                ..Default::default()
            },
            3 * MIB,
            &["-b", "base.raw", "-F", "raw"],
        ),
        (
            "over-qed",
            CreateOptions {
                backing_file: Some(b"plain-q.qed".to_vec()),
                backing_fmt: Some("qed".into()),
                ..Default::default()
            },
            10 * MIB,
            &["-b", "plain-q.qed", "-F", "qed"],
        ),
    ];
    for (name, opts, size, args) in cases {
        let q = dir.path().join(format!("{name}-q.qed"));
        let s = dir.path().join(format!("{name}-s.qed"));
        let mut a = vec!["create", "-q", "-f", "qed"];
        a.extend_from_slice(args);
        a.push(p(&q));
        let sz = size.to_string();
        if !name.starts_with("over") {
            a.push(&sz);
        }
        qemu_img(&a);
        qed::create(new_storage(&s), Some(&s), *size, opts).unwrap();
        assert!(
            std::fs::read(&s).unwrap() == std::fs::read(&q).unwrap(),
            "{name}: the new images differ"
        );
    }
}

#[test]
fn refused_create_options_say_what_qemu_says() {
    let dir = scratch();
    let s = dir.path().join("x.qed");
    let cases = [
        (
            CreateOptions {
                cluster_size: 1000,
                ..Default::default()
            },
            MIB,
            "QED cluster size must be within range [4096, 67108864] and power of 2",
        ),
        (
            CreateOptions {
                table_size: 3,
                ..Default::default()
            },
            MIB,
            "QED table size must be within range [1, 16] and power of 2",
        ),
        (
            CreateOptions {
                cluster_size: 4096,
                table_size: 1,
                ..Default::default()
            },
            1 << 40,
            "QED image size must be a non-zero multiple of cluster size and less than 1073741824 bytes",
        ),
    ];
    for (opts, size, want) in cases {
        let e = qed::create(new_storage(&s), Some(&s), size, &opts).unwrap_err();
        assert_eq!(e.to_string(), want);
    }
}

#[test]
fn overlays_read_through_and_copy_their_backing_file_into_partial_clusters() {
    let dir = scratch();
    let base = dir.path().join("base.raw");
    let data = pattern(4 * MIB as usize, 3);
    std::fs::write(&base, &data).unwrap();
    for (name, bfmt) in [("over-raw.qed", "raw"), ("over-qcow2.qed", "qcow2")] {
        let backing = if bfmt == "raw" {
            base.clone()
        } else {
            let b = dir.path().join("base.qcow2");
            qemu_img(&["convert", "-f", "raw", "-O", "qcow2", p(&base), p(&b)]);
            b
        };
        let bname = backing.file_name().unwrap().to_str().unwrap().to_string();
        let (q, s) = create_both(dir.path(), name, &["-b", &bname, "-F", bfmt], "5M");
        let cmds = qemu_io_cmds();
        qemu_io(
            "qed",
            &q,
            &cmds.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        {
            let dev = open_qed(&s, true);
            let link = dev.overlay().unwrap();
            assert_eq!(link.backing_name().unwrap(), bname.as_str());
            let want_fmt = (bfmt == "raw").then(|| "raw".to_string());
            assert_eq!(link.backing_format(), want_fmt);
            let b = strata_format::raw::RawImage::open(storage(&base, false)).unwrap();
            dev.set_backing(Some(Arc::new(b)));
            strata_writes(dev.as_ref());
            // No need-check flag over a backing file: data is flushed first.
            assert!(!qed_image(dev.as_ref()).is_dirty());
        }
        let out = qemu_img(&["check", "-f", "qed", p(&s)]);
        assert!(out.contains("No errors were found"), "{out}");
        assert_same_contents(&qemu_contents("qed", &s), &qemu_contents("qed", &q), name);
        assert!(
            std::fs::read(&s).unwrap() == std::fs::read(&q).unwrap(),
            "{name}: the files differ"
        );
    }
}

/// The value of `"key": value` in one line of `qemu-img map --output=json`.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line.find(&format!("\"{key}\": ")).expect("key in map line") + key.len() + 4;
    let rest = &line[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim()
}

#[test]
fn block_status_agrees_with_qemu_img_map() {
    let dir = scratch();
    let img = dir.path().join("m.qed");
    qemu_img(&["create", "-q", "-f", "qed", p(&img), "6M"]);
    let cmds = qemu_io_cmds();
    qemu_io(
        "qed",
        &img,
        &cmds.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let map = qemu_img(&["map", "--output=json", "-f", "qed", p(&img)]);
    let dev = open_qed(&img, false);
    let mut want = Vec::new();
    for line in map.lines().filter(|l| l.contains("\"start\"")) {
        let st: u64 = field(line, "start").parse().unwrap();
        let len: u64 = field(line, "length").parse().unwrap();
        let kind = match (field(line, "data"), field(line, "present")) {
            ("true", _) => Some(field(line, "offset").parse().unwrap()),
            (_, "true") => Some(1),
            _ => None,
        };
        want.push((st, len, kind));
    }
    // Merge the driver's extents as qemu-img map merges them.
    let mut got: Vec<(u64, u64, Option<u64>)> = Vec::new();
    let mut pos = 0;
    while pos < dev.virtual_size() {
        let e = dev.block_status(pos, dev.virtual_size() - pos).unwrap();
        let kind = match e.status {
            Status::Data { host_offset, .. } => host_offset,
            Status::Zero { .. } => Some(1),
            Status::Unallocated => None,
        };
        match got.last_mut() {
            Some((s0, l0, Some(k0)))
                if kind.is_some_and(|k| k > 1 && *k0 > 1 && k == *k0 + *l0) =>
            {
                let _ = s0;
                *l0 += e.len
            }
            Some((_, l0, k0)) if *k0 == kind && kind.is_none_or(|k| k == 1) => *l0 += e.len,
            _ => got.push((pos, e.len, kind)),
        }
        pos += e.len;
    }
    assert_eq!(got, want);
}

/// Write `bytes` at `at` of a copy of `src` named `name`.
fn damaged(dir: &Path, src: &Path, name: &str, at: u64, bytes: &[u8]) -> std::path::PathBuf {
    let dst = dir.join(name);
    let mut data = std::fs::read(src).unwrap();
    let at = at as usize;
    data[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(&dst, data).unwrap();
    dst
}

#[test]
fn malformed_headers_are_refused_in_qemus_words() {
    let dir = scratch();
    let good = dir.path().join("good.qed");
    qemu_img(&["create", "-q", "-f", "qed", p(&good), "1M"]);
    let cases: &[(&str, u64, &[u8])] = &[
        ("magic", 0, b"X"),
        ("features", 16, &[0x10]),
        ("cluster", 4, &[0, 0, 3]),
        ("table", 8, &[3]),
        ("table1", 8, &[1]),
        ("imgsize", 48, &[1, 2]),
        ("l1", 40, &[0, 0, 0x20]),
        ("l1zero", 40, &[0, 0, 0]),
        ("headersize", 12, &[0, 0, 1, 0]),
        ("backing-offset", 16, &[1]),
    ];
    for (name, at, bytes) in cases {
        let mut img = damaged(dir.path(), &good, name, *at, bytes);
        if *name == "backing-offset" {
            img = damaged(dir.path(), &img, name, 56, &[0, 0, 1, 0, 0x10]);
        }
        let qemu = std::process::Command::new("qemu-img")
            .args(["info", "-f", "qed", p(&img)])
            .output()
            .unwrap();
        assert!(!qemu.status.success(), "{name}: qemu-img opened it");
        let err = String::from_utf8_lossy(&qemu.stderr);
        let e = qed::open(storage(&img, false), Some(&img), false)
            .err()
            .unwrap_or_else(|| panic!("{name}: opened"));
        assert!(
            err.trim_end().ends_with(&e.to_string()),
            "{name}: qemu says {err:?}, strata {e}"
        );
    }
    // Truncated files and garbage: refused, never a panic.
    let data = std::fs::read(&good).unwrap();
    for len in [0usize, 10, 63, 64, 4096, 65536] {
        let img = dir.path().join(format!("short{len}.qed"));
        std::fs::write(&img, &data[..len.min(data.len())]).unwrap();
        assert!(qed::open(storage(&img, false), Some(&img), false).is_err());
    }
}

#[test]
fn check_and_repair_find_and_fix_what_qemu_img_does() {
    let dir = scratch();
    let img = dir.path().join("c.qed");
    qemu_img(&["create", "-q", "-f", "qed", p(&img), "4M"]);
    qemu_io(
        "qed",
        &img,
        &[
            "write -P 0xaa 0 4k",
            "write -P 0xbb 1M 128k",
            "write -z 2M 64k",
        ],
    );
    // The L2 table follows the first data cluster (0x50000) at 0x60000; its
    // first entry now points past the file, and two clusters are leaked.
    let bad = damaged(dir.path(), &img, "bad.qed", 0x60000, &[0, 0, 0, 0, 1]);
    let mut data = std::fs::read(&bad).unwrap();
    data.extend_from_slice(&vec![0u8; 2 * 65536]);
    std::fs::write(&bad, &data).unwrap();
    let q = dir.path().join("bad-q.qed");
    std::fs::copy(&bad, &q).unwrap();

    let dev = qed::open_for_check(storage(&bad, false), Some(&bad), false).unwrap();
    let r = qed_image(dev.as_ref()).check_report(false).unwrap();
    assert_eq!(
        (
            r.corruptions,
            r.leaks,
            r.total_clusters,
            r.allocated_clusters,
            r.fragmented_clusters
        ),
        (1, 3, 64, 3, 1)
    );
    drop(dev);
    let dev = qed::open_for_check(storage(&bad, true), Some(&bad), true).unwrap();
    let r = qed_image(dev.as_ref()).check_report(true).unwrap();
    assert_eq!(
        (
            r.corruptions,
            r.corruptions_fixed,
            r.leaks,
            r.allocated_clusters
        ),
        (0, 1, 3, 2)
    );
    drop(dev);
    let _ = std::process::Command::new("qemu-img")
        .args(["check", "-q", "-r", "all", "-f", "qed", p(&q)])
        .output()
        .unwrap();
    assert!(
        std::fs::read(&bad).unwrap() == std::fs::read(&q).unwrap(),
        "repaired images differ"
    );
}

#[test]
fn a_flagged_image_is_repaired_by_a_writable_open_and_left_alone_read_only() {
    let dir = scratch();
    let img = dir.path().join("d.qed");
    qemu_img(&["create", "-q", "-f", "qed", p(&img), "4M"]);
    qemu_io("qed", &img, &["write -P 0xaa 0 64k"]);
    let flagged = damaged(dir.path(), &img, "flagged.qed", 16, &[2]);
    let bytes = std::fs::read(&flagged).unwrap();
    {
        let dev = open_qed(&flagged, false);
        assert!(qed_image(dev.as_ref()).is_dirty());
    }
    assert_eq!(std::fs::read(&flagged).unwrap(), bytes);
    {
        let dev = open_qed(&flagged, true);
        assert!(!qed_image(dev.as_ref()).is_dirty());
    }
    assert_eq!(std::fs::read(&flagged).unwrap()[16], 0);
}

#[test]
fn resize_grows_and_refuses_to_shrink_as_qemu_does() {
    let dir = scratch();
    let (q, s) = create_both(dir.path(), "r.qed", &[], "4M");
    qemu_img(&["resize", "-q", "-f", "qed", p(&q), "9M"]);
    {
        let dev = open_qed(&s, true);
        dev.resize(9 * MIB, false).unwrap();
        let e = dev.resize(MIB, true).unwrap_err();
        assert_eq!(e.to_string(), "Shrinking images is currently not supported");
        let e = dev.resize(9 * MIB + 1000, false).unwrap_err();
        assert_eq!(e.to_string(), "Invalid image size specified");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }
    assert!(std::fs::read(&s).unwrap() == std::fs::read(&q).unwrap());
}

#[test]
fn a_new_backing_link_is_written_as_qemu_img_rebase_writes_it() {
    let dir = scratch();
    std::fs::write(dir.path().join("b.raw"), vec![0u8; MIB as usize]).unwrap();
    let (q, s) = create_both(dir.path(), "l.qed", &[], "1M");
    for (name, fmt) in [("b.raw", "raw"), ("a-much-longer-name.qcow2", "qcow2")] {
        qemu_img(&[
            "rebase",
            "-q",
            "-u",
            "-f",
            "qed",
            "-b",
            name,
            "-F",
            fmt,
            p(&q),
        ]);
        let dev = open_qed(&s, true);
        dev.overlay()
            .unwrap()
            .set_backing_file(Some(std::ffi::OsStr::new(name)), Some(fmt))
            .unwrap();
        drop(dev);
        assert!(
            std::fs::read(&s).unwrap() == std::fs::read(&q).unwrap(),
            "{name}: the headers differ"
        );
    }
}

/// One guest operation of the crash sequence.
#[derive(Clone, Copy)]
enum Op {
    Write(u64, usize, u64),
    Zero(u64, u64),
}

impl Op {
    fn range(self) -> (usize, usize) {
        match self {
            Op::Write(o, n, _) => (o as usize, o as usize + n),
            Op::Zero(o, n) => (o as usize, (o + n) as usize),
        }
    }
    fn apply_model(self, m: &mut [u8]) {
        let (a, b) = self.range();
        match self {
            Op::Write(_, n, seed) => m[a..b].copy_from_slice(&pattern(n, seed)),
            Op::Zero(..) => m[a..b].fill(0),
        }
    }
    fn run(self, dev: &dyn BlockDevice) -> strata_format::Result<()> {
        match self {
            Op::Write(o, n, seed) => dev.write(&pattern(n, seed), o),
            Op::Zero(o, n) => dev.write_zeroes(o, n, false),
        }
    }
}

#[test]
fn a_crash_at_any_write_leaves_the_old_or_the_new_contents() {
    use strata_storage::{picks_for, CrashClock, CrashStorage, MemStorage};
    let dir = scratch();
    let size = 4 * MIB;
    let base = {
        let m = Arc::new(MemStorage::new());
        let o = CreateOptions {
            cluster_size: 4096,
            table_size: 2,
            ..Default::default()
        };
        qed::create(m.clone(), None, size, &o).unwrap();
        m.snapshot()
    };
    let ops = [
        Op::Write(5000, 10000, 1),
        Op::Write(3 * MIB, 4096, 2),
        Op::Zero(4096, 8192),
        Op::Write(6000, 100, 3),
    ];
    let mut states = vec![vec![0u8; size as usize]];
    for op in ops {
        let mut next = states.last().unwrap().clone();
        op.apply_model(&mut next);
        states.push(next);
    }
    let mut images = 0;
    let mut seen = std::collections::HashSet::new();
    for k in 0.. {
        let clock = CrashClock::new(Some(k));
        let store = Arc::new(CrashStorage::new(base.clone(), clock.clone()));
        let mut at = 0;
        if let Ok(dev) = qed::open(store.clone(), None, true) {
            while at < ops.len() {
                if ops[at].run(dev.as_ref()).is_err() || dev.flush().is_err() {
                    break;
                }
                at += 1;
            }
        }
        if !clock.crashed() {
            assert_eq!(at, ops.len());
            break;
        }
        for pick in picks_for(&[&store], 0, 1) {
            let disk = store.after_crash(pick);
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&(&disk, at), &mut h);
            if !seen.insert(std::hash::Hasher::finish(&h)) {
                continue;
            }
            let img = dir.path().join("crash.qed");
            std::fs::write(&img, &disk).unwrap();
            // QEMU's check -r all (what its read-write open runs on a
            // flagged image) must leave no corruption; the driver's
            // writable open repairs the same way.
            let out = std::process::Command::new("qemu-img")
                .args(["check", "-r", "all", "-f", "qed", p(&img)])
                .output()
                .unwrap();
            assert!(
                matches!(out.status.code(), Some(0 | 3)),
                "crash at write {k}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            let got = read_all(open_qed(&img, true).as_ref());
            let before = &states[at];
            let after = &states[(at + 1).min(ops.len())];
            let (a, b) = ops.get(at).map(|o| o.range()).unwrap_or((0, 0));
            for (i, sector) in got.chunks(512).enumerate() {
                let r = i * 512..i * 512 + 512;
                let inside = r.start < b && r.end > a;
                let old = sector == &before[r.clone()];
                assert!(
                    old || inside && sector == &after[r],
                    "crash at write {k}, {pick:?}: sector {i} is neither old nor new"
                );
            }
            images += 1;
        }
    }
    assert!(images > 10, "{images} images checked");
}
