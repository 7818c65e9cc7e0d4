//! The parallels driver against QEMU's: images qemu-img and qemu-io write
//! read the same here; images written here read the same in QEMU and pass
//! its check, and come out byte for byte as QEMU's own after the same
//! writes (cluster placement, BAT, the file cut at close); created images
//! match qemu-img's; malformed headers are refused with QEMU's words; the
//! check and its repairs report what `qemu-img check` reports.

mod foreign;

use foreign::*;
use std::path::Path;
use strata_format::parallels::{self, CreateOptions, Fix, ParallelsImage};
use strata_format::{BlockDevice, Status};

const MIB: u64 = 1 << 20;

/// A change to an image's first bytes.
type HeaderEdit = Box<dyn Fn(&mut [u8])>;
/// A change to a whole image file.
type FileEdit = Box<dyn Fn(&mut Vec<u8>)>;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn open_prl(path: &Path, write: bool) -> std::sync::Arc<dyn BlockDevice> {
    parallels::open(storage(path, write), Some(path), write).expect("open parallels")
}

fn create_prl(path: &Path, size: u64, cluster_size: u64) {
    parallels::create(
        new_storage(path),
        Some(path),
        size,
        &CreateOptions { cluster_size },
    )
    .expect("create");
}

/// qemu-io writes at odd offsets and lengths, across cluster boundaries,
/// out of order.
const WRITES: &[(u64, u64, u8)] = &[
    (5 * MIB, MIB, 0xcd),
    (1000, 5000, 0xab),
    (2 * MIB - 33, 70000, 0x11),
    (9 * MIB + 512, 512, 0x22),
    (3 * MIB + 100, 2 * MIB, 0x33),
];

fn qemu_writes() -> Vec<String> {
    WRITES
        .iter()
        .map(|(o, l, b)| format!("write -P {b} {o} {l}"))
        .collect()
}

#[test]
fn qemu_written_images_read_the_same() {
    let dir = scratch();
    for cs in ["1M", "64K", "1536"] {
        let img = dir.path().join(format!("q{cs}.hds"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "parallels",
            "-o",
            &format!("cluster_size={cs}"),
            p(&img),
            "10M",
        ]);
        let w = qemu_writes();
        let w: Vec<&str> = w.iter().map(String::as_str).collect();
        qemu_io("parallels", &img, &w);
        let dev = open_prl(&img, false);
        assert_eq!(dev.virtual_size(), 10 * MIB);
        assert_same_contents(
            &read_all(dev.as_ref()),
            &qemu_contents("parallels", &img),
            &img.display().to_string(),
        );
    }
}

/// Power-of-two cluster sizes only: with others QEMU misplaces data (its
/// own reads of it fail), nothing to match.
#[test]
fn the_same_writes_leave_the_same_file_as_qemu() {
    let dir = scratch();
    for cs in [MIB, 64 << 10, 4096] {
        let ours = dir.path().join(format!("ours{cs}.hds"));
        let theirs = dir.path().join(format!("theirs{cs}.hds"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "parallels",
            "-o",
            &format!("cluster_size={cs}"),
            p(&theirs),
            "10M",
        ]);
        create_prl(&ours, 10 * MIB, cs);
        let w = qemu_writes();
        let w: Vec<&str> = w.iter().map(String::as_str).collect();
        qemu_io("parallels", &theirs, &w);
        let dev = open_prl(&ours, true);
        for &(o, l, b) in WRITES {
            dev.write(&vec![b; l as usize], o).unwrap();
        }
        dev.close().unwrap();
        drop(dev);
        let a = std::fs::read(&ours).unwrap();
        let b = std::fs::read(&theirs).unwrap();
        assert_eq!(a.len(), b.len(), "cluster {cs}: file lengths");
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(a == b, "cluster {cs}: files differ first at {first:?}");
        let out = qemu_img(&["check", "-f", "parallels", p(&ours)]);
        assert!(out.contains("No errors were found"), "{out}");
    }
}

#[test]
fn driver_written_images_read_the_same_in_qemu() {
    let dir = scratch();
    let img = dir.path().join("d.hds");
    create_prl(&img, 8 * MIB + 1000, 64 << 10);
    let dev = open_prl(&img, true);
    assert_eq!(dev.virtual_size(), 8 * MIB + 1024);
    let mut model = vec![0u8; dev.virtual_size() as usize];
    let mut put = |dev: &dyn BlockDevice, data: &[u8], off: u64| {
        dev.write(data, off).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    put(dev.as_ref(), &pattern(5000, 1), 1000);
    put(dev.as_ref(), &pattern(2 * MIB as usize + 77, 2), MIB - 33);
    put(dev.as_ref(), &pattern(1024, 3), 8 * MIB);
    // Cluster-aligned zeroing drops clusters; an unaligned one writes zeroes.
    dev.write_zeroes(MIB, 128 << 10, true).unwrap();
    dev.write_zeroes(2 * MIB + 5, 4096, false).unwrap();
    model[MIB as usize..(MIB + (128 << 10)) as usize].fill(0);
    model[(2 * MIB + 5) as usize..(2 * MIB + 5 + 4096) as usize].fill(0);
    assert_eq!(
        dev.block_status(MIB, 64 << 10).unwrap().status,
        Status::Unallocated
    );
    // A write reuses the dropped clusters' space.
    dev.write(&pattern(3000, 4), 6 * MIB).unwrap();
    model[(6 * MIB) as usize..(6 * MIB + 3000) as usize].copy_from_slice(&pattern(3000, 4));
    dev.flush().unwrap();
    assert_same_contents(&read_all(dev.as_ref()), &model, "driver reads its writes");
    drop(dev);
    let out = qemu_img(&["check", "-f", "parallels", p(&img)]);
    assert!(out.contains("No errors were found"), "{out}");
    assert_same_contents(&qemu_contents("parallels", &img), &model, "qemu reads");
    let dev = open_prl(&img, false);
    assert_same_contents(&read_all(dev.as_ref()), &model, "reopened");
}

#[test]
fn create_matches_qemu_byte_for_byte() {
    let dir = scratch();
    for (size, cs) in [
        (0u64, MIB),
        (1000, MIB),
        (64 * MIB, MIB),
        (3 * MIB, 1000),
        (3 * MIB, 512),
        (5 * MIB, 64 << 10),
        (1 << 40, MIB),
    ] {
        let ours = dir.path().join("ours.hds");
        let theirs = dir.path().join("theirs.hds");
        let _ = std::fs::remove_file(&ours);
        let _ = std::fs::remove_file(&theirs);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "parallels",
            "-o",
            &format!("cluster_size={cs}"),
            p(&theirs),
            &size.to_string(),
        ]);
        create_prl(&ours, size, cs);
        let a = std::fs::read(&ours).unwrap();
        let b = std::fs::read(&theirs).unwrap();
        assert!(a == b, "size {size} cluster {cs}: files differ");
    }
}

#[test]
fn create_refuses_sizes_qemu_refuses() {
    let dir = scratch();
    let img = dir.path().join("x.hds");
    for (size, cs, msg) in [
        (3 * MIB, 0, "Image size is too large for this cluster size"),
        (
            5 << 50,
            MIB,
            "Image size is too large for this cluster size",
        ),
        (MIB, 4 << 30, "Cluster size is too large"),
    ] {
        let e = parallels::create(
            new_storage(&img),
            Some(&img),
            size,
            &CreateOptions { cluster_size: cs },
        )
        .unwrap_err();
        assert_eq!(e.message(), msg);
    }
}

/// A header with `f` applied to a fresh image's first 64 bytes.
fn damaged(dir: &Path, name: &str, f: impl Fn(&mut [u8])) -> std::path::PathBuf {
    let img = dir.join(name);
    qemu_img(&["create", "-q", "-f", "parallels", p(&img), "4M"]);
    let mut b = std::fs::read(&img).unwrap();
    f(&mut b);
    std::fs::write(&img, b).unwrap();
    img
}

#[test]
fn malformed_headers_are_refused_in_qemus_words() {
    let dir = scratch();
    let cases: Vec<(&str, HeaderEdit)> = vec![
        ("version", Box::new(|b| b[16] = 3)),
        ("magic", Box::new(|b| b[0] = b'X')),
        ("tracks", Box::new(|b| b[28..32].fill(0))),
        (
            "bigcluster",
            Box::new(|b| b[28..32].copy_from_slice(&(5_000_000u32).to_le_bytes())),
        ),
        (
            "catalog",
            Box::new(|b| b[32..36].copy_from_slice(&(0x2000_0000u32).to_le_bytes())),
        ),
        (
            "ext",
            Box::new(|b| b[56..64].copy_from_slice(&(2048u64).to_le_bytes())),
        ),
    ];
    for (name, f) in cases {
        let img = damaged(dir.path(), name, f);
        // qemu-img's words after "Could not open '...': ".
        let qemu = std::process::Command::new("qemu-img")
            .args(["info", "-f", "parallels", p(&img)])
            .output()
            .unwrap();
        assert!(!qemu.status.success(), "{name}: qemu opened it");
        let qerr = String::from_utf8_lossy(&qemu.stderr);
        let e = match parallels::open(storage(&img, false), Some(&img), false) {
            Ok(_) => panic!("{name}: opened"),
            Err(e) => e,
        };
        assert!(
            qerr.trim_end().ends_with(e.message()),
            "{name}: qemu says {qerr:?}, strata {:?}",
            e.message()
        );
    }
}

#[test]
fn a_huge_catalog_in_a_small_file_costs_no_huge_allocation() {
    let dir = scratch();
    // The largest catalog QEMU accepts: 2 GiB of BAT the 4 MiB file lacks.
    let img = damaged(dir.path(), "huge", |b| {
        b[32..36].copy_from_slice(&(0x1fff_ffffu32).to_le_bytes());
        b[48..52].fill(0);
    });
    let dev = ParallelsImage::open(storage(&img, false), None, false, Default::default()).unwrap();
    let mut buf = vec![1u8; 4096];
    dev.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn check_reports_and_repairs_as_qemu() {
    let dir = scratch();
    let base = dir.path().join("base.hds");
    qemu_img(&["create", "-q", "-f", "parallels", p(&base), "8M"]);
    qemu_io(
        "parallels",
        &base,
        &["write -P 1 0 1M", "write -P 2 3M 1M", "write -P 3 6M 1M"],
    );
    let bat = 64;
    let cases: Vec<(&str, FileEdit)> = vec![
        (
            "unclean",
            Box::new(|b| b[44..48].copy_from_slice(&0x746f_6e59u32.to_le_bytes())),
        ),
        (
            "leak",
            Box::new(|b| b.extend_from_slice(&vec![7u8; 3 * MIB as usize + 5])),
        ),
        (
            "outside",
            Box::new(move |b| b[bat + 4..bat + 8].copy_from_slice(&40u32.to_le_bytes())),
        ),
        (
            "duplicate",
            Box::new(move |b| {
                let e = b[bat..bat + 4].to_vec();
                b[bat + 12..bat + 16].copy_from_slice(&e);
            }),
        ),
        (
            "data_off",
            Box::new(|b| b[48..52].copy_from_slice(&3u32.to_le_bytes())),
        ),
    ];
    for (name, f) in cases {
        // QEMU's check of a cluster past the end fails an assertion (and
        // dies) unless it repairs everything.
        let repairs: &[Option<&str>] = if name == "outside" {
            &[Some("all")]
        } else {
            &[None, Some("leaks"), Some("all")]
        };
        for &repair in repairs {
            let ours = dir.path().join(format!("o-{name}.hds"));
            let theirs = dir.path().join(format!("t-{name}.hds"));
            let mut b = std::fs::read(&base).unwrap();
            f(&mut b);
            std::fs::write(&ours, &b).unwrap();
            std::fs::write(&theirs, &b).unwrap();
            let mut args = vec!["check", "-f", "parallels", "--output=json"];
            if let Some(r) = repair {
                args.extend(["-r", r]);
            }
            args.push(p(&theirs));
            let q = std::process::Command::new("qemu-img")
                .args(&args)
                .output()
                .unwrap();
            let qerr = String::from_utf8_lossy(&q.stderr).to_string();
            let qjson: serde_json::Value =
                serde_json::from_slice(&q.stdout).expect("qemu's JSON report");
            let write = repair.is_some();
            let dev = parallels::open_for_check(storage(&ours, write), Some(&ours), write).unwrap();
            let fix = Fix {
                errors: repair == Some("all"),
                leaks: repair.is_some(),
            };
            let r = parallels::check_report(dev.as_ref(), fix).unwrap();
            dev.close().unwrap();
            drop(dev);
            let what = format!("{name} -r {repair:?}");
            let lines: Vec<&str> = qerr.lines().collect();
            assert_eq!(r.messages, lines, "{what}: messages");
            let num = |k: &str| qjson.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            assert_eq!(r.corruptions, num("corruptions"), "{what}: corruptions");
            assert_eq!(r.leaks, num("leaks"), "{what}: leaks");
            assert_eq!(r.corruptions_fixed, num("corruptions-fixed"), "{what}");
            assert_eq!(r.leaks_fixed, num("leaks-fixed"), "{what}");
            assert_eq!(r.allocated_clusters, num("allocated-clusters"), "{what}");
            assert_eq!(r.fragmented_clusters, num("fragmented-clusters"), "{what}");
            assert_eq!(r.image_end_offset, num("image-end-offset"), "{what}");
            let a = std::fs::read(&ours).unwrap();
            let b = std::fs::read(&theirs).unwrap();
            assert_eq!(a.len(), b.len(), "{what}: file lengths");
            assert!(a == b, "{what}: files differ");
        }
    }
}

#[test]
fn an_image_opened_for_writing_is_marked_in_use_until_closed() {
    let dir = scratch();
    let img = dir.path().join("u.hds");
    create_prl(&img, 4 * MIB, MIB);
    let dev = open_prl(&img, true);
    let b = std::fs::read(&img).unwrap();
    assert_eq!(&b[44..48], &0x746f_6e59u32.to_le_bytes());
    dev.write(&[9u8; 512], 0).unwrap();
    // The preallocated space past the cluster is there while open...
    assert!(std::fs::metadata(&img).unwrap().len() > 2 * MIB);
    dev.close().unwrap();
    // ... and cut off at close, with the mark cleared.
    let b = std::fs::read(&img).unwrap();
    assert_eq!(b.len() as u64, 2 * MIB);
    assert_eq!(&b[44..48], &[0u8; 4]);
}
