//! The vdi driver against QEMU's: images qemu-img and qemu-io write read the
//! same here; images written here read the same in QEMU and pass its check;
//! block status agrees with `qemu-img map`; the header matches qemu-img's
//! field by field; malformed headers are refused with QEMU's words; the
//! block-map check finds what `qemu-img check` finds.

mod foreign;

use foreign::*;
use std::path::Path;
use std::process::Command;
use strata_format::vdi::{self, CreateOptions, VdiImage};
use strata_format::{BlockDevice, Status};

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// qemu-io writes at odd offsets and lengths, across block boundaries, zero
/// writes and whole blocks.
const QEMU_WRITES: &[&str] = &[
    "write -P 0xab 1000 5000",
    "write -P 0x11 1048000 3000",
    "write -P 0x22 3145728 1048576",
    "write -z 2100000 70000",
    "write -P 0x33 5242000 1234",
    "write -P 0x44 0 512",
];

fn open_vdi(path: &Path, write: bool) -> std::sync::Arc<dyn BlockDevice> {
    vdi::open(storage(path, write), Some(path), write).expect("open vdi")
}

#[test]
fn qemu_written_images_read_the_same() {
    let dir = scratch();
    for (name, opts) in [("dyn.vdi", "static=off"), ("static.vdi", "static=on")] {
        let img = dir.path().join(name);
        // Blocks 6 to 9 never written.
        qemu_img(&["create", "-q", "-f", "vdi", "-o", opts, p(&img), "10M"]);
        qemu_io("vdi", &img, QEMU_WRITES);
        let dev = open_vdi(&img, false);
        assert_eq!(dev.virtual_size(), 10 * MIB);
        assert_eq!(dev.cluster_size(), Some(MIB));
        assert_same_contents(&read_all(dev.as_ref()), &qemu_contents("vdi", &img), name);
    }
}

#[test]
fn qemu_converted_images_read_the_same() {
    let dir = scratch();
    let raw = dir.path().join("src.raw");
    let mut data = pattern(5 * MIB as usize + 4096, 7);
    // A zero block and a zero tail, which convert leaves unallocated.
    data[MIB as usize..2 * MIB as usize].fill(0);
    data[4 * MIB as usize..].fill(0);
    std::fs::write(&raw, &data).unwrap();
    for (name, opts) in [("dyn.vdi", "static=off"), ("static.vdi", "static=on")] {
        let img = dir.path().join(name);
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vdi",
            "-o",
            opts,
            p(&raw),
            p(&img),
        ]);
        let dev = open_vdi(&img, false);
        let got = read_all(dev.as_ref());
        assert_same_contents(&got, &data, name);
        assert_same_contents(&got, &qemu_contents("vdi", &img), name);
    }
}

/// The guest bytes a model disk holds after the same writes as the driver.
fn write_both(dev: &dyn BlockDevice, model: &mut [u8], data: &[u8], offset: u64) {
    dev.write(data, offset).expect("write");
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

#[test]
fn driver_written_images_read_the_same_in_qemu() {
    let dir = scratch();
    for static_image in [false, true] {
        let img = dir.path().join(format!("d{static_image}.vdi"));
        let size = 6 * MIB + 1000; // rounded up to whole sectors
        vdi::create(
            new_storage(&img),
            Some(&img),
            size,
            &CreateOptions { static_image },
        )
        .expect("create");
        let dev = open_vdi(&img, true);
        assert_eq!(dev.virtual_size(), 6 * MIB + 1024);
        let mut model = vec![0u8; dev.virtual_size() as usize];
        write_both(dev.as_ref(), &mut model, &pattern(5000, 1), 1000);
        write_both(
            dev.as_ref(),
            &mut model,
            &pattern(2 * MIB as usize + 77, 2),
            MIB - 33,
        );
        write_both(dev.as_ref(), &mut model, &pattern(3000, 3), 1500);
        write_both(dev.as_ref(), &mut model, &pattern(1024, 4), 6 * MIB);
        dev.write_zeroes(1200, 100, true).unwrap();
        model[1200..1300].fill(0);
        dev.write_zeroes(4 * MIB + 5, 4096, false).unwrap();
        dev.discard(5 * MIB, MIB).unwrap();
        dev.flush().unwrap();
        let back = read_all(dev.as_ref());
        assert_same_contents(&back, &model, "driver reads its writes");
        drop(dev);
        qemu_img(&["check", "-f", "vdi", p(&img)]);
        assert_same_contents(&qemu_contents("vdi", &img), &model, "qemu reads the writes");
        // Reopened, the driver sees the same.
        let dev = open_vdi(&img, false);
        assert_same_contents(&read_all(dev.as_ref()), &model, "reopened");
    }
}

#[test]
fn driver_and_qemu_allocate_blocks_alike() {
    // The same writes through both: the files must be identical apart from
    // the UUIDs (blocks appended in write order, header count, map sectors).
    let dir = scratch();
    let ours = dir.path().join("ours.vdi");
    let theirs = dir.path().join("theirs.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", p(&theirs), "300M"]);
    vdi::create(
        new_storage(&ours),
        Some(&ours),
        300 * MIB,
        &Default::default(),
    )
    .unwrap();
    let writes: &[(u64, u64)] = &[(200 * MIB + 5, 1000), (3 * MIB - 10, 20), (299 * MIB, MIB)];
    for &(off, len) in writes {
        qemu_io("vdi", &theirs, &[&format!("write -P 0x5a {off} {len}")]);
    }
    let dev = open_vdi(&ours, true);
    for &(off, len) in writes {
        dev.write(&vec![0x5a; len as usize], off).unwrap();
    }
    dev.flush().unwrap();
    drop(dev);
    let mut a = std::fs::read(&ours).unwrap();
    let mut b = std::fs::read(&theirs).unwrap();
    assert_eq!(a.len(), b.len(), "file lengths");
    a[0x188..0x1a8].fill(0);
    b[0x188..0x1a8].fill(0);
    assert!(a == b, "files differ beyond the UUIDs");
}

#[test]
fn create_matches_qemu_header_length_and_allocation() {
    let dir = scratch();
    for (size, static_image) in [
        (0u64, false),
        (1000, false),
        (5 * MIB, false),
        (5 * MIB, true),
        (64 * MIB + 512, true),
        (200 * MIB, false),
    ] {
        let ours = dir.path().join("ours.vdi");
        let theirs = dir.path().join("theirs.vdi");
        let _ = std::fs::remove_file(&ours);
        let _ = std::fs::remove_file(&theirs);
        let opt = format!("static={}", if static_image { "on" } else { "off" });
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vdi",
            "-o",
            &opt,
            p(&theirs),
            &size.to_string(),
        ]);
        vdi::create(
            new_storage(&ours),
            Some(&ours),
            size,
            &CreateOptions { static_image },
        )
        .unwrap();
        let mut a = std::fs::read(&ours).unwrap();
        let mut b = std::fs::read(&theirs).unwrap();
        let what = format!("size {size} {opt}");
        assert_eq!(a.len(), b.len(), "{what}: file length");
        // The image and last-snapshot UUIDs are random, but set in both.
        assert_ne!(&a[0x188..0x1a8], &[0u8; 32][..], "{what}: UUIDs");
        a[0x188..0x1a8].fill(0);
        b[0x188..0x1a8].fill(0);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x, y, "{what}: byte {i:#x} differs");
        }
        let du = |f: &Path| storage(f, false).allocated_bytes().unwrap();
        assert_eq!(du(&ours), du(&theirs), "{what}: allocated bytes");
        qemu_img(&["check", "-f", "vdi", p(&ours)]);
    }
}

#[test]
fn create_refuses_what_qemu_refuses() {
    let dir = scratch();
    let img = dir.path().join("big.vdi");
    let size = 0x2_0000_0000_0000u64;
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vdi", p(&img), &size.to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let qemu = String::from_utf8_lossy(&out.stderr);
    let ours = dir.path().join("ours.vdi");
    let err = vdi::create(new_storage(&ours), Some(&ours), size, &Default::default())
        .expect_err("too large");
    assert_eq!(
        qemu.trim_end(),
        format!("qemu-img: {}: {}", p(&img), err.message())
    );
    // The largest size QEMU accepts is accepted (a sparse 2 GiB map).
    let max = vdi::header::DISK_SIZE_MAX;
    assert!(vdi::header::Header::new_image(max, false).is_ok());
    assert!(vdi::header::Header::new_image(max + 1, false).is_err());
}

/// The extents of `qemu-img map --output=json`: (start, length, zero, data, offset).
fn qemu_map(path: &Path) -> Vec<(u64, u64, bool, bool, Option<u64>)> {
    let out = qemu_img(&["map", "--output=json", "-f", "vdi", p(path)]);
    let field = |line: &str, key: &str| -> Option<String> {
        let at = line.find(&format!("\"{key}\": "))? + key.len() + 4;
        let rest = &line[at..];
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim().to_string())
    };
    out.lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| {
            (
                field(l, "start").unwrap().parse().unwrap(),
                field(l, "length").unwrap().parse().unwrap(),
                field(l, "zero").unwrap() == "true",
                field(l, "data").unwrap() == "true",
                field(l, "offset").map(|o| o.parse().unwrap()),
            )
        })
        .collect()
}

#[test]
fn block_status_agrees_with_qemu_map() {
    let dir = scratch();
    for (name, opts) in [("dyn.vdi", "static=off"), ("static.vdi", "static=on")] {
        let img = dir.path().join(name);
        // Blocks 6, 7 and 9 never written.
        qemu_img(&["create", "-q", "-f", "vdi", "-o", opts, p(&img), "10M"]);
        qemu_io("vdi", &img, QEMU_WRITES);
        qemu_io("vdi", &img, &["write -P 0x77 8M 100k"]);
        let dev = open_vdi(&img, false);
        let size = dev.virtual_size();
        let mut seen = (0, 0);
        for (start, len, zero, data, offset) in qemu_map(&img) {
            let mut pos = start;
            while pos < start + len {
                let e = dev.block_status(pos, start + len - pos).unwrap();
                assert!(e.len > 0 && e.len <= start + len - pos);
                match e.status {
                    Status::Data { host_offset, .. } => {
                        seen.0 += 1;
                        assert!(data, "{name}: data at {pos}");
                        let want = offset.map(|o| o + (pos - start));
                        assert_eq!(host_offset, want, "{name}: host offset at {pos}");
                        // Only a static image's holes read as zeroes (QEMU asks the file).
                        assert!(!zero || opts == "static=on", "{name}: zero at {pos}");
                    }
                    Status::Zero { host_offset } => {
                        seen.1 += 1;
                        assert!(zero && !data && offset.is_none(), "{name}: zero at {pos}");
                        assert_eq!(host_offset, None);
                    }
                    Status::Unallocated => panic!("{name}: vdi ranges are never unallocated"),
                }
                pos += e.len;
            }
        }
        assert_eq!(qemu_map(&img).iter().map(|m| m.1).sum::<u64>(), size);
        // Extents of one block at most: a dynamic image's 7 data blocks and 3
        // zero ones; a static image's are all data (split where QEMU's are).
        if opts == "static=on" {
            assert!(seen.0 >= 10 && seen.1 == 0, "{name}: {seen:?}");
        } else {
            assert_eq!(seen, (7, 3), "{name}: data and zero blocks");
        }
    }
}

/// A qemu-img-made dynamic image of 5 MiB with two blocks written (block 1
/// at data block 0, block 3 at data block 1), as bytes.
fn base_image(dir: &Path) -> Vec<u8> {
    let img = dir.join("base.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", p(&img), "5M"]);
    qemu_io("vdi", &img, &["write -P 0x61 1M 4k", "write -P 0x62 3M 4k"]);
    std::fs::read(img).unwrap()
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// qemu-img's stderr and exit status for `args` on `path` (after the args).
fn qemu_fails(args: &[&str], path: &Path) -> (String, Option<i32>) {
    let out = Command::new("qemu-img")
        .args(args)
        .arg(path)
        .output()
        .expect("qemu-img must be installed");
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

#[test]
fn malformed_headers_are_refused_with_qemus_words() {
    let dir = scratch();
    let base = base_image(dir.path());
    type Damage = fn(&mut Vec<u8>);
    let cases: &[(&str, Damage)] = &[
        ("version", |b| put32(b, 0x44, 0x0001_0002)),
        ("signature", |b| put32(b, 0x40, 0x1234_5678)),
        ("bmap offset", |b| put32(b, 0x154, 0x201)),
        ("data offset", |b| put32(b, 0x158, 0x401)),
        ("sector size", |b| put32(b, 0x168, 4096)),
        ("block size", |b| put32(b, 0x178, 2 << 20)),
        ("block size 0", |b| put32(b, 0x178, 0)),
        ("room", |b| put64(b, 0x170, 6 << 20)),
        ("link uuid", |b| b[0x1a8] = 1),
        ("parent uuid", |b| b[0x1c7] = 1),
        ("too many blocks", |b| {
            put32(b, 0x180, 0x2000_0000);
            put64(b, 0x170, 1 << 20);
        }),
        ("huge size", |b| put64(b, 0x170, 1 << 60)),
        ("huge size, bad signature", |b| {
            put64(b, 0x170, u64::MAX);
            put32(b, 0x40, 0);
        }),
        ("truncated in the header", |b| b.truncate(300)),
        ("empty", |b| b.truncate(0)),
    ];
    for (what, damage) in cases {
        let mut bytes = base.clone();
        damage(&mut bytes);
        let img = dir.path().join("bad.vdi");
        std::fs::write(&img, &bytes).unwrap();
        let (qemu, code) = qemu_fails(&["info", "-f", "vdi"], &img);
        assert_eq!(code, Some(1), "{what}: qemu-img refuses");
        let err = vdi::open(storage(&img, false), Some(&img), false)
            .err()
            .unwrap_or_else(|| panic!("{what}: must be refused"));
        assert_eq!(
            qemu.trim_end(),
            format!("qemu-img: Could not open '{}': {}", p(&img), err.message()),
            "{what}"
        );
    }
}

#[test]
fn odd_but_accepted_headers_read_as_qemu_reads_them() {
    let dir = scratch();
    let base = base_image(dir.path());
    type Damage = fn(&mut Vec<u8>);
    let cases: &[(&str, Damage)] = &[
        ("odd disk size", |b| put64(b, 0x170, (4 << 20) + 3)),
        ("unknown image type", |b| put32(b, 0x4c, 7)),
        ("header size", |b| put32(b, 0x48, 7)),
        ("discarded entries", |b| put32(b, 0x204, 0xffff_fffe)),
        ("map past the file's end", |b| b.truncate(512)),
        ("data past the file's end", |b| b.truncate(1024 + 4096)),
        ("entry past the data", |b| put32(b, 0x200, 40)),
    ];
    for (what, damage) in cases {
        let mut bytes = base.clone();
        damage(&mut bytes);
        let img = dir.path().join("odd.vdi");
        std::fs::write(&img, &bytes).unwrap();
        let dev = open_vdi(&img, false);
        assert_same_contents(&read_all(dev.as_ref()), &qemu_contents("vdi", &img), what);
    }
}

#[test]
fn hostile_maps_cost_no_memory() {
    // A 512-byte file claiming the most blocks QEMU allows: opens, reads
    // (the map past the file's end reads as zeroes: block 0), no 2 GiB map.
    let dir = scratch();
    let mut bytes = base_image(dir.path());
    bytes.truncate(512);
    put32(&mut bytes, 0x180, vdi::header::BLOCKS_MAX);
    put64(&mut bytes, 0x170, vdi::header::DISK_SIZE_MAX);
    let img = dir.path().join("hostile.vdi");
    std::fs::write(&img, &bytes).unwrap();
    let dev = open_vdi(&img, false);
    assert_eq!(dev.virtual_size(), vdi::header::DISK_SIZE_MAX);
    let mut buf = vec![1u8; 4096];
    dev.read(&mut buf, dev.virtual_size() - 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert!(dev.read(&mut buf, dev.virtual_size() - 4095).is_err());
    // Every entry names block 0: all but the first are duplicates, and the
    // count is off; the lines kept are bounded.
    let image = dev.as_any().downcast_ref::<VdiImage>().unwrap();
    let report = image.check(false).unwrap();
    assert_eq!(report.corruptions, u64::from(vdi::header::BLOCKS_MAX));
    assert_eq!(report.errors.len(), vdi::MAX_KEPT_ERRORS);
    assert_eq!(report.errors[0], "ERROR: block index 0 also used by 0");
}

#[test]
fn check_finds_what_qemu_check_finds() {
    let dir = scratch();
    let base = base_image(dir.path());
    type Damage = fn(&mut Vec<u8>);
    let cases: &[(&str, Damage)] = &[
        ("good", |_| {}),
        ("duplicate", |b| put32(b, 0x208, 1)),
        ("out of range", |b| put32(b, 0x208, 5)),
        ("count", |b| put32(b, 0x184, 7)),
        ("several", |b| {
            put32(b, 0x200, 1);
            put32(b, 0x208, 9);
            put32(b, 0x20c, 1);
        }),
        ("discarded", |b| put32(b, 0x200, 0xffff_fffe)),
    ];
    for (what, damage) in cases {
        let mut bytes = base.clone();
        damage(&mut bytes);
        let img = dir.path().join("c.vdi");
        std::fs::write(&img, &bytes).unwrap();
        let out = Command::new("qemu-img")
            .args(["check", "-f", "vdi", p(&img)])
            .output()
            .unwrap();
        let (qemu, code) = (String::from_utf8_lossy(&out.stderr), out.status.code());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dev = open_vdi(&img, false);
        let image = dev.as_any().downcast_ref::<VdiImage>().unwrap();
        let report = image.check(false).unwrap();
        let qemu_errors: Vec<&str> = qemu.lines().filter(|l| l.starts_with("ERROR")).collect();
        assert_eq!(report.errors, qemu_errors, "{what}: error lines");
        assert_eq!(report.corruptions, report.errors.len() as u64);
        assert_eq!(
            code,
            Some(if report.corruptions > 0 { 2 } else { 0 }),
            "{what}"
        );
        if report.corruptions > 0 {
            let summary = format!("{} errors were found on the image.", report.corruptions);
            assert!(stdout.contains(&summary), "{what}: {stdout}");
        } else {
            assert_eq!(stdout, "No errors were found on the image.\n");
        }
    }
    // Repair is refused, as by qemu-img.
    let img = dir.path().join("c.vdi");
    let (qemu, _) = qemu_fails(&["check", "-r", "all", "-f", "vdi"], &img);
    let dev = open_vdi(&img, true);
    let image = dev.as_any().downcast_ref::<VdiImage>().unwrap();
    let err = image.check(true).unwrap_err();
    assert_eq!(qemu.trim_end(), format!("qemu-img: {}", err.message()));
}

#[test]
fn probe_and_resize_as_qemu() {
    let dir = scratch();
    let base = base_image(dir.path());
    assert!(vdi::probe(&base[..2048]));
    assert!(vdi::probe(&base[..512]));
    assert!(!vdi::probe(&base[..511]));
    let mut other = base.clone();
    put32(&mut other, 0x40, 0);
    assert!(!vdi::probe(&other));
    // A wrong version still probes as vdi (QEMU looks at the signature only).
    put32(&mut other, 0x40, 0xbeda_107f);
    put32(&mut other, 0x44, 0x0002_0000);
    assert!(vdi::probe(&other));

    let img = dir.path().join("r.vdi");
    std::fs::write(&img, &base).unwrap();
    let out = Command::new("qemu-img")
        .args(["resize", "-f", "vdi", p(&img), "8M"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let dev = open_vdi(&img, true);
    let err = dev.resize(8 * MIB, false).unwrap_err();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!("qemu-img: {}", err.message())
    );
}
