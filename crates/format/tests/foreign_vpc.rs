//! The vpc (VHD) driver against the real qemu-img and qemu-io: images QEMU
//! makes and writes read the same here; images made and written here read
//! the same in QEMU, and their files match qemu-img's field by field;
//! allocation status agrees with `qemu-img map`; hostile headers are refused
//! with QEMU's words.

mod foreign;

use foreign::*;
use std::path::Path;
use std::process::Command;
use strata_format::vpc::{self, CreateOptions, VpcImage};
use strata_format::{BlockDevice, Status};

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `qemu-img info -f vpc`'s virtual size.
fn qemu_virtual_size(path: &Path) -> u64 {
    let out = qemu_img(&["info", "-f", "vpc", "--output=json", p(path)]);
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("\"virtual-size\""))
        .expect("virtual-size in info");
    line.trim()
        .trim_start_matches("\"virtual-size\":")
        .trim_end_matches(',')
        .trim()
        .parse()
        .expect("a number")
}

/// What qemu-img says when it cannot open `path` as vpc (the reason alone).
fn qemu_open_error(path: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(["info", "-f", "vpc", p(path)])
        .output()
        .expect("qemu-img must be installed");
    assert!(!out.status.success(), "qemu-img opened {path:?}");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let prefix = format!("qemu-img: Could not open '{}': ", p(path));
    err.strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("unexpected qemu-img error: {err}"))
        .to_string()
}

fn open(path: &Path, write: bool) -> VpcImage {
    VpcImage::open(storage(path, write), write).expect("open vpc")
}

fn create(path: &Path, size: u64, fixed: bool, force_size: bool) {
    vpc::create(
        new_storage(path),
        Some(path),
        size,
        &CreateOptions { fixed, force_size },
    )
    .expect("create vpc");
}

fn qemu_create(path: &Path, size: u64, opts: &str) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "vpc"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p(path), size.as_str()]);
    qemu_img(&args);
}

/// Writes at odd offsets and lengths, across 2 MiB block boundaries, within
/// an image of at least 8 MiB: (offset, length, seed).
const WRITES: &[(u64, usize, u64)] = &[
    (0, 512, 1),
    (1000, 3000, 2),
    (2 * MIB - 700, 1500, 3),
    (5 * MIB + 3, 2 * MIB as usize + 11, 4),
    (4 * MIB, 4096, 5),
];

/// The same writes through qemu-io, with the patterns in files.
fn qemu_io_writes(fmt: &str, image: &Path, dir: &Path) {
    let mut cmds = Vec::new();
    for (i, &(off, len, seed)) in WRITES.iter().enumerate() {
        // `write -s FILE` writes FILE's bytes (patterns of one byte would
        // not catch misplaced data).
        let data = dir.join(format!("w{i}.bin"));
        std::fs::write(&data, pattern(len, seed)).expect("write pattern");
        cmds.push(format!("write -s {} {off} {len}", p(&data)));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(fmt, image, &refs);
}

fn driver_writes(dev: &dyn BlockDevice) {
    for &(off, len, seed) in WRITES {
        dev.write(&pattern(len, seed), off).expect("write");
    }
    dev.flush().expect("flush");
}

#[test]
fn probe_is_the_cookie_at_offset_zero() {
    assert!(vpc::probe(b"conectix\0\0\0\x02"));
    assert!(!vpc::probe(b"conecti"));
    assert!(!vpc::probe(&[0u8; 2048]));
}

#[test]
fn qemu_made_and_written_images_read_the_same() {
    let dir = scratch();
    for (name, opts, size) in [
        ("dyn.vhd", "", 9 * MIB),
        ("fixed.vhd", "subformat=fixed", 9 * MIB),
        ("force.vhd", "force_size=on", 9 * MIB + 512),
        ("forcefixed.vhd", "subformat=fixed,force_size=on", 9 * MIB),
    ] {
        let img = dir.path().join(name);
        qemu_create(&img, size, opts);
        qemu_io_writes("vpc", &img, dir.path());
        qemu_io(
            "vpc",
            &img,
            &["write -z 3145728 1048576", "write -z 7340032 1000"],
        );
        let dev = open(&img, false);
        assert_eq!(dev.virtual_size(), qemu_virtual_size(&img), "{name}");
        assert_same_contents(&read_all(&dev), &qemu_contents("vpc", &img), name);
    }
}

#[test]
fn converted_images_read_the_same() {
    let dir = scratch();
    let raw = dir.path().join("src.raw");
    let mut data = pattern(6 * MIB as usize, 9);
    data[2 * MIB as usize..4 * MIB as usize].fill(0); // a block qemu-img skips
    std::fs::write(&raw, &data).expect("write raw");
    for opts in ["subformat=dynamic", "subformat=fixed", "force_size=on"] {
        let img = dir.path().join("c.vhd");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            opts,
            p(&raw),
            p(&img),
        ]);
        let dev = open(&img, false);
        assert_eq!(dev.virtual_size(), qemu_virtual_size(&img), "{opts}");
        let got = read_all(&dev);
        assert_same_contents(&got, &qemu_contents("vpc", &img), opts);
        assert_same_contents(&got[..data.len()], &data, opts);
        std::fs::remove_file(&img).expect("remove");
    }
}

/// Bytes of a footer that differ between two creations: timestamp,
/// checksum, UUID.
fn footer_without_variable_fields(f: &[u8]) -> Vec<u8> {
    let mut f = f.to_vec();
    f[24..28].fill(0);
    f[64..84].fill(0);
    f
}

/// The file qemu-img creates and ours are the same but for the timestamp,
/// UUID and checksums: footers (both copies), dynamic header and BAT.
fn assert_same_layout(ours: &Path, qemus: &Path, what: &str) {
    let a = std::fs::read(ours).expect("read ours");
    let b = std::fs::read(qemus).expect("read qemu's");
    assert_eq!(a.len(), b.len(), "{what}: file lengths");
    let end = a.len() - 512;
    assert_eq!(
        footer_without_variable_fields(&a[end..]),
        footer_without_variable_fields(&b[end..]),
        "{what}: footer at the end"
    );
    if a[..8] == *b"conectix" || b[..8] == *b"conectix" {
        assert_eq!(
            footer_without_variable_fields(&a[..512]),
            footer_without_variable_fields(&b[..512]),
            "{what}: footer copy"
        );
        assert_eq!(a[512..end], b[512..end], "{what}: header and BAT");
    } else {
        assert!(
            a[..end].iter().all(|&x| x == 0),
            "{what}: fixed data is zero"
        );
    }
}

#[test]
fn created_images_match_qemu_img_create() {
    let dir = scratch();
    let cases: &[(u64, bool, bool)] = &[
        (0, false, false),
        (1_000_000, false, false),
        (9 * MIB, false, false),
        (9 * MIB + 1, false, false),
        (64 * MIB, false, false),
        (1 << 30, false, false),
        (136_365_211_648, false, false),
        (200 << 30, false, false),
        (9 * MIB + 1, false, true),
        (1 << 30, false, true),
        (9 * MIB, true, false),
        (9 * MIB + 1, true, true),
    ];
    for &(size, fixed, force) in cases {
        let what = format!("size {size} fixed {fixed} force_size {force}");
        let ours = dir.path().join("ours.vhd");
        let qemus = dir.path().join("qemu.vhd");
        create(&ours, size, fixed, force);
        let mut opts = vec![];
        if fixed {
            opts.push("subformat=fixed");
        }
        if force {
            opts.push("force_size=on");
        }
        qemu_create(&qemus, size, &opts.join(","));
        assert_same_layout(&ours, &qemus, &what);
        let dev = open(&ours, false);
        assert_eq!(dev.virtual_size(), qemu_virtual_size(&ours), "{what}");
        assert_eq!(dev.virtual_size(), qemu_virtual_size(&qemus), "{what}");
        assert_eq!(
            dev.cluster_size(),
            if fixed { None } else { Some(2 * MIB) },
            "{what}"
        );
        std::fs::remove_file(&ours).expect("remove");
        std::fs::remove_file(&qemus).expect("remove");
    }
}

#[test]
fn sizes_past_2040_gib_are_refused_as_qemu_img_does() {
    let max = 2040u64 << 30;
    assert_eq!(vpc::created_size(max, false).unwrap(), max);
    for size in [max + 1, 3 << 40] {
        let dir = scratch();
        let img = dir.path().join("big.vhd");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "vpc", p(&img), &size.to_string()])
            .output()
            .expect("qemu-img");
        assert!(!out.status.success());
        let qemu = String::from_utf8_lossy(&out.stderr);
        let err = vpc::created_size(size, true).unwrap_err();
        assert_eq!(
            qemu.trim(),
            format!("qemu-img: {}: {}", p(&img), err.message())
        );
        assert!(vpc::created_size(size, false).is_err());
    }
}

#[test]
fn driver_writes_read_the_same_in_qemu_and_match_qemu_io_byte_for_byte() {
    let dir = scratch();
    for (fixed, force) in [(false, false), (true, false), (false, true)] {
        let ours = dir.path().join("ours.vhd");
        let theirs = dir.path().join("theirs.vhd");
        create(&ours, 9 * MIB, fixed, force);
        std::fs::copy(&ours, &theirs).expect("copy");
        let dev = open(&ours, true);
        driver_writes(&dev);
        let mine = read_all(&dev);
        drop(dev);
        qemu_io_writes("vpc", &theirs, dir.path());
        let what = format!("fixed {fixed} force_size {force}");
        assert_same_contents(&mine, &qemu_contents("vpc", &ours), &what);
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "{what}: files differ"
        );
        // Writes of a later session into blocks already there.
        let dev = open(&ours, true);
        dev.write(&pattern(5000, 77), 2 * MIB + 100).expect("write");
        dev.write_zeroes(7 * MIB, 2 * MIB, true).expect("zero");
        let mine = read_all(&dev);
        drop(dev);
        assert_same_contents(&mine, &qemu_contents("vpc", &ours), &what);
        std::fs::remove_file(&ours).expect("remove");
        std::fs::remove_file(&theirs).expect("remove");
    }
}

/// `qemu-img map --output=json -f vpc`'s runs: (start, length, zero, data, offset).
fn qemu_map(path: &Path) -> Vec<(u64, u64, bool, bool, Option<u64>)> {
    let out = qemu_img(&["map", "--output=json", "-f", "vpc", p(path)]);
    let field = |l: &str, k: &str| -> String {
        let at = l.find(&format!("\"{k}\": ")).map(|i| i + k.len() + 4);
        at.map(|i| {
            l[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect()
        })
        .unwrap_or_default()
    };
    out.lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| {
            (
                field(l, "start").parse().unwrap(),
                field(l, "length").parse().unwrap(),
                field(l, "zero") == "true",
                field(l, "data") == "true",
                field(l, "offset").parse().ok(),
            )
        })
        .collect()
}

#[test]
fn block_status_agrees_with_qemu_img_map() {
    let dir = scratch();
    let img = dir.path().join("map.vhd");
    qemu_create(&img, 16 * MIB, "");
    qemu_io_writes("vpc", &img, dir.path());
    qemu_io("vpc", &img, &["write -P 7 12m 512"]);
    let dev = open(&img, false);
    let mut ours = Vec::new();
    let mut pos = 0;
    while pos < dev.virtual_size() {
        let e = dev
            .block_status(pos, dev.virtual_size() - pos)
            .expect("status");
        let (zero, data, off) = match e.status {
            Status::Data { host_offset, .. } => (false, true, host_offset),
            Status::Zero { host_offset } => (true, false, host_offset),
            Status::Unallocated => panic!("vpc has no unallocated ranges"),
        };
        // qemu-img map merges runs that continue one another.
        match ours.last_mut() {
            Some((s, l, z, d, o))
                if *z == zero
                    && *d == data
                    && match (*o, off) {
                        (Some(a), Some(b)) => a + *l == b,
                        (None, None) => true,
                        _ => false,
                    }
                    && *s + *l == pos =>
            {
                *l += e.len
            }
            _ => ours.push((pos, e.len, zero, data, off)),
        }
        pos += e.len;
    }
    assert_eq!(ours, qemu_map(&img));
}

/// A copy of `src` with `bytes` at `at`; with `footer_at`, the footer there is
/// given a correct checksum again.
fn damaged(src: &[u8], at: usize, bytes: &[u8], footer_at: Option<usize>) -> Vec<u8> {
    let mut d = src.to_vec();
    d[at..at + bytes.len()].copy_from_slice(bytes);
    if let Some(f) = footer_at {
        d[f + 64..f + 68].fill(0);
        let sum = !d[f..f + 512]
            .iter()
            .fold(0u32, |a, &b| a.wrapping_add(b as u32));
        d[f + 64..f + 68].copy_from_slice(&sum.to_be_bytes());
    }
    d
}

#[test]
fn hostile_images_are_refused_with_qemus_words() {
    let dir = scratch();
    let img = dir.path().join("good.vhd");
    qemu_create(&img, 8 * MIB, "");
    qemu_io("vpc", &img, &["write -P 1 0 512"]);
    let good = std::fs::read(&img).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("one byte", vec![1]),
        ("no footer", vec![0; 4096]),
        ("truncated header", good[..300].to_vec()),
        ("truncated blocks", good[..4096].to_vec()),
        ("bad checksum", damaged(&good, 24, &[9], None)),
        ("bad magic", damaged(&good, 512, b"x", None)),
        (
            "block size 0",
            damaged(&good, 512 + 32, &0u32.to_be_bytes(), None),
        ),
        (
            "block size 3000",
            damaged(&good, 512 + 32, &3000u32.to_be_bytes(), None),
        ),
        (
            "few entries",
            damaged(&good, 512 + 28, &1u32.to_be_bytes(), None),
        ),
        (
            "many entries",
            damaged(&good, 512 + 28, &0x2000_0000u32.to_be_bytes(), None),
        ),
        (
            "huge entries",
            damaged(&good, 512 + 28, &0xffff_fff0u32.to_be_bytes(), None),
        ),
        (
            "BAT far away",
            damaged(&good, 512 + 16, &(1u64 << 62).to_be_bytes(), None),
        ),
        (
            "BAT past i64",
            damaged(&good, 512 + 16, &(u64::MAX - 8).to_be_bytes(), None),
        ),
        (
            "header past i64",
            damaged(&good, 16, &(u64::MAX - 8).to_be_bytes(), Some(0)),
        ),
        (
            "block past end",
            damaged(&good, 1536, &0x0100_0000u32.to_be_bytes(), None),
        ),
        ("huge size", {
            let d = damaged(&good, 28, b"win ", None);
            damaged(&d, 48, &(1u64 << 50).to_be_bytes(), Some(0))
        }),
    ];
    for (what, bytes) in cases {
        let path = dir.path().join("bad.vhd");
        std::fs::write(&path, &bytes).unwrap();
        let qemu = qemu_open_error(&path);
        let err = match VpcImage::open(storage(&path, false), false) {
            Ok(_) => panic!("{what}: opened"),
            Err(e) => e,
        };
        assert_eq!(err.message(), qemu, "{what}");
    }
}

#[test]
fn creator_apps_choose_geometry_or_current_size_as_qemu() {
    let dir = scratch();
    let img = dir.path().join("app.vhd");
    qemu_create(&img, 1_000_000, "");
    let good = std::fs::read(&img).unwrap();
    for app in [
        *b"vpc ", *b"qemu", *b"qem2", *b"win ", *b"d2v ", *b"tap\0", *b"wa\0\0", *b"xyz ",
    ] {
        let d = damaged(&good, 28, &app, None);
        let d = damaged(&d, 48, &(2 * MIB).to_be_bytes(), Some(0));
        std::fs::write(&img, &d).unwrap();
        let dev = open(&img, false);
        assert_eq!(dev.virtual_size(), qemu_virtual_size(&img), "{app:?}");
    }
}

#[test]
fn sector_bitmaps_are_not_consulted_on_reads_as_in_qemu() {
    let dir = scratch();
    let img = dir.path().join("bitmap.vhd");
    qemu_create(&img, 8 * MIB, "");
    qemu_io("vpc", &img, &["write -P 0x55 0 4k"]);
    let mut d = std::fs::read(&img).unwrap();
    let entry = u32::from_be_bytes(d[1536..1540].try_into().unwrap()) as usize;
    d[entry * 512..entry * 512 + 512].fill(0);
    std::fs::write(&img, &d).unwrap();
    let dev = open(&img, false);
    let got = read_all(&dev);
    assert!(got[..4096].iter().all(|&b| b == 0x55));
    assert_same_contents(&got, &qemu_contents("vpc", &img), "cleared bitmap");
}

/// Use every part of `dev` a damaged header could make go wrong: status,
/// reads at both ends, across a block boundary and in the middle, a write.
fn exercise(dev: &VpcImage) {
    let size = dev.virtual_size();
    let mut pos = 0;
    let mut runs = 0;
    while pos < size && runs < 64 {
        let e = dev.block_status(pos, size - pos).expect("status");
        assert!(e.len >= 1 && e.offset == pos);
        pos += e.len;
        runs += 1;
    }
    let mut buf = vec![0u8; 100_000];
    for at in [0, 2 * MIB - 50_000, size / 2, size.saturating_sub(100_000)] {
        let n = buf.len().min((size.saturating_sub(at)) as usize);
        let _ = dev.read(&mut buf[..n], at);
    }
    let _ = dev.write(&[1u8; 700], size.saturating_sub(700));
}

#[test]
fn damaged_headers_give_errors_not_panics() {
    // Hundreds of small writes with flushes: on tmpfs where there is one.
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| scratch());
    let img = dir.path().join("good.vhd");
    qemu_create(&img, 8 * MIB, "");
    qemu_io("vpc", &img, &["write -P 1 0 512", "write -P 2 5m 512"]);
    let good = std::fs::read(&img).unwrap();
    let fixed = dir.path().join("fixed.vhd");
    qemu_create(&fixed, 4 * MIB, "subformat=fixed");
    let good_fixed = std::fs::read(&fixed).unwrap();
    let end = good_fixed.len() - 512;
    let positions = (0..100)
        .map(|i| (i, Some(0), &good))
        .chain((512..600).map(|i| (i, None, &good)))
        .chain((1536..1560).map(|i| (i, None, &good)))
        .chain((0..100).map(|i| (end + i, Some(end), &good_fixed)));
    for (n, (at, footer, src)) in positions.enumerate() {
        for v in [0x00u8, 0xff] {
            // A new file each time: a process another test forks may hold
            // the last one's lock for a moment.
            let path = dir.path().join(format!("bad{n}-{v}.vhd"));
            std::fs::write(&path, damaged(src, at, &[v], footer)).unwrap();
            if let Ok(dev) = VpcImage::open(storage(&path, true), true) {
                exercise(&dev);
            }
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn a_dynamic_disk_without_its_first_footer_is_refused_as_in_qemu() {
    let dir = scratch();
    let img = dir.path().join("dyn.vhd");
    qemu_create(&img, 8 * MIB, "");
    qemu_io("vpc", &img, &["write -P 3 0 4k"]);
    let d = damaged(&std::fs::read(&img).unwrap(), 0, b"X", None);
    std::fs::write(&img, d).unwrap();
    let err = VpcImage::open(storage(&img, false), false)
        .err()
        .expect("refused");
    assert_eq!(err.message(), qemu_open_error(&img));
}

#[test]
fn without_write_barriers_the_same_writes_land_and_only_flush_makes_them_durable() {
    use std::sync::Arc;
    use strata_storage::{CrashClock, CrashPick, CrashStorage, MemStorage};
    let base = {
        let m = Arc::new(MemStorage::new());
        let o = CreateOptions {
            fixed: false,
            force_size: false,
        };
        vpc::create(m.clone(), None, 9 * MIB, &o).expect("create vpc");
        m.snapshot()
    };
    let write = |barriers: bool| {
        let store = Arc::new(CrashStorage::new(base.clone(), CrashClock::new(None)));
        let dev = VpcImage::open(store.clone(), true).expect("open vpc");
        dev.set_write_barriers(barriers);
        for &(off, len, seed) in WRITES {
            dev.write(&pattern(len, seed), off).expect("write");
        }
        dev.close().expect("close");
        (store, dev)
    };
    let (ordered, _) = write(true);
    let (store, dev) = write(false);
    // The same bytes in the same places, whatever the barriers.
    assert_eq!(store.volatile(), ordered.volatile(), "files differ");
    // With barriers, each allocation step was made durable (and close
    // flushed); without, nothing was, close included.
    assert_eq!(ordered.pending(), 0);
    assert_eq!(store.after_crash(CrashPick::None), base);
    assert!(store.pending() > 0);
    dev.flush().expect("flush");
    assert_eq!(store.pending(), 0);
    assert_eq!(store.after_crash(CrashPick::None), ordered.volatile());
}
