//! The vmdk driver against QEMU: images QEMU writes read the same here,
//! images written here read the same in QEMU and pass its check, block
//! status agrees with `qemu-img map`, and malformed files are refused
//! without a panic.

mod foreign;

use foreign::*;
use std::path::Path;
use std::sync::Arc;
use strata_format::vmdk::{self, CreateOptions, VmdkImage};
use strata_format::{BlockDevice, Status};

const MIB: u64 = 1 << 20;

/// The tests of this file run one at a time: a qemu-img started by one test
/// holds copies of the others' open files (and their locks) until it execs.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn open(path: &Path, write: bool) -> Arc<dyn BlockDevice> {
    vmdk::open(storage(path, write), Some(path), write).expect("open vmdk")
}

/// A raw file of `size` bytes: patterned data with holes of zeroes.
fn patterned_raw(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut data = pattern(size, seed);
    // Zero runs: whole grains, a partial grain, and the disk's tail.
    for (start, len) in [
        (64 << 10, 128 << 10),
        (700 << 10, 3000),
        (size - (300 << 10), 300 << 10),
    ] {
        data[start..start + len].fill(0);
    }
    std::fs::write(path, &data).expect("write raw");
    data
}

/// `(start, len, present, zero, data)` runs of `qemu-img map --output=json`.
fn qemu_map(path: &Path) -> Vec<(u64, u64, bool, bool, bool)> {
    let out = qemu_img(&["map", "--output=json", "-f", "vmdk", p(path)]);
    let num = |line: &str, key: &str| -> u64 {
        let at = line.find(&format!("\"{key}\": ")).expect(key) + key.len() + 4;
        line[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .expect("number")
    };
    let flag = |line: &str, key: &str| line.contains(&format!("\"{key}\": true"));
    out.lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| {
            (
                num(l, "start"),
                num(l, "length"),
                flag(l, "present"),
                flag(l, "zero"),
                flag(l, "data"),
            )
        })
        .collect()
}

/// The driver's block status as the same runs, adjacent equal runs merged.
fn driver_map(dev: &dyn BlockDevice) -> Vec<(u64, u64, bool, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool, bool)> = Vec::new();
    let mut pos = 0;
    let size = dev.virtual_size();
    while pos < size {
        let e = dev.block_status(pos, size - pos).expect("block status");
        let (present, zero, data) = match e.status {
            Status::Unallocated => (false, true, false),
            Status::Zero { .. } => (true, true, false),
            Status::Data { .. } => (true, false, true),
        };
        match out.last_mut() {
            Some(l) if l.0 + l.1 == pos && (l.2, l.3, l.4) == (present, zero, data) => l.1 += e.len,
            _ => out.push((pos, e.len, present, zero, data)),
        }
        pos += e.len;
    }
    out
}

fn merged(runs: Vec<(u64, u64, bool, bool, bool)>) -> Vec<(u64, u64, bool, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool, bool)> = Vec::new();
    for r in runs {
        match out.last_mut() {
            Some(l) if l.0 + l.1 == r.0 && (l.2, l.3, l.4) == (r.2, r.3, r.4) => l.1 += r.1,
            _ => out.push(r),
        }
    }
    out
}

/// Block status agrees with `qemu-img map`; for flat extents (data, whose
/// holes QEMU finds by asking the extent's file, as the status walk of the
/// jobs layer does) presence and data are compared.
fn assert_same_map(path: &Path, flat: bool) {
    let dev = open(path, false);
    let mut ours = driver_map(dev.as_ref());
    let mut theirs = merged(qemu_map(path));
    if flat {
        for r in ours.iter_mut().chain(theirs.iter_mut()) {
            r.3 = false;
        }
        ours = merged(ours);
        theirs = merged(theirs);
    }
    assert_eq!(ours, theirs, "block status of {}", path.display());
}

const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

#[test]
fn probe_matches_qemu() {
    let _serial = serial();
    let dir = scratch();
    for sub in SUBFORMATS {
        let img = dir.path().join(format!("{sub}.vmdk"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            p(&img),
            "1M",
        ]);
        let head = std::fs::read(&img).unwrap();
        assert!(vmdk::probe(&head[..head.len().min(2048)]), "{sub}");
    }
    assert!(vmdk::probe(b"# comment\n   \nversion=1\r\n"));
    assert!(!vmdk::probe(b"version=4\n"));
    assert!(!vmdk::probe(b"x version=1\n"));
    assert!(!vmdk::probe(b"KDM"));
}

#[test]
fn qemu_writes_driver_reads_every_subformat() {
    let _serial = serial();
    let dir = scratch();
    let raw = dir.path().join("src.raw");
    patterned_raw(&raw, (4 * MIB) as usize, 7);
    for (sub, zeroed) in SUBFORMATS
        .iter()
        .map(|s| (*s, false))
        .chain([("monolithicSparse", true), ("twoGbMaxExtentSparse", true)])
    {
        let img = dir.path().join(format!("{sub}-{zeroed}.vmdk"));
        let o = format!(
            "subformat={sub},zeroed_grain={}",
            if zeroed { "on" } else { "off" }
        );
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &o,
            p(&raw),
            p(&img),
        ]);
        if sub != "streamOptimized" {
            qemu_io(
                "vmdk",
                &img,
                &[
                    "write -P 0x5a 1000 70000",
                    "write -P 0x33 131071 3",
                    "write -z 196608 131072",
                    "write -z 3000 100",
                    "write -P 0x77 4193792 512",
                ],
            );
        }
        let dev = open(&img, false);
        assert_eq!(dev.virtual_size(), 4 * MIB);
        assert_same_contents(&read_all(dev.as_ref()), &qemu_contents("vmdk", &img), sub);
        assert_same_map(&img, sub.contains("Flat"));
        let cluster = if sub.contains("Flat") {
            None
        } else {
            Some(65536)
        };
        assert_eq!(dev.cluster_size(), cluster, "{sub}");
        let v = dev.as_any().downcast_ref::<VmdkImage>().unwrap();
        assert_eq!(v.create_type(), sub);
        let r = vmdk::check(v).unwrap();
        assert!(r.messages.is_empty() && r.failure.is_none() && r.corruptions == 0);
        let info = qemu_img(&["info", "-f", "vmdk", p(&img)]);
        assert!(info.contains(&format!("cid: {}\n", v.cid())), "{info}");
        assert!(info.contains(&format!("parent cid: {}\n", v.parent_cid())));
    }
}

fn opts(sub: &str) -> CreateOptions {
    CreateOptions {
        subformat: sub.into(),
        ..CreateOptions::default()
    }
}

fn create(path: &Path, size: u64, o: &CreateOptions) {
    vmdk::create(new_storage(path), Some(path), size, o).expect("create");
}

#[test]
fn driver_writes_qemu_reads_every_subformat() {
    let _serial = serial();
    let dir = scratch();
    for (sub, zeroed) in SUBFORMATS
        .iter()
        .filter(|s| **s != "streamOptimized")
        .map(|s| (*s, false))
        .chain([("monolithicSparse", true)])
    {
        let img = dir.path().join(format!("{sub}-{zeroed}.vmdk"));
        let mut o = opts(sub);
        o.zeroed_grain = zeroed;
        create(&img, 4 * MIB + 1000, &o);
        let dev = open(&img, true);
        let size = dev.virtual_size();
        assert_eq!(size, 4 * MIB + 1024);
        let mut want = vec![0u8; size as usize];
        let writes = [
            (1000u64, 70000usize, 1u64),
            (131071, 3, 2),
            (4 * MIB, 1024, 3),
            (300_000, 200_000, 4),
        ];
        for (off, len, seed) in writes {
            let d = pattern(len, seed);
            dev.write(&d, off).unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&d);
        }
        for (off, len) in [(327_680u64, 131_072u64), (1001, 5)] {
            dev.write_zeroes(off, len, true).unwrap();
            want[off as usize..(off + len) as usize].fill(0);
        }
        dev.flush().unwrap();
        assert_same_contents(&read_all(dev.as_ref()), &want, sub);
        drop(dev);
        if !sub.contains("Flat") {
            qemu_img(&["check", "-f", "vmdk", p(&img)]);
        }
        assert_same_contents(&qemu_contents("vmdk", &img), &want, sub);
        assert_same_map(&img, sub.contains("Flat"));
    }
}

#[test]
fn created_images_match_qemu_layout() {
    let _serial = serial();
    let dir = scratch();
    let cases: [(&str, &str, u64); 7] = [
        ("monolithicSparse", "", 64 * MIB),
        (
            "monolithicSparse",
            "zeroed_grain=on,adapter_type=lsilogic",
            5 * MIB + 512,
        ),
        ("streamOptimized", "hwversion=7,toolsversion=11", 64 * MIB),
        ("monolithicFlat", "compat6=on", 3 * MIB),
        ("twoGbMaxExtentFlat", "adapter_type=buslogic", 4 * MIB),
        ("twoGbMaxExtentSparse", "adapter_type=legacyESX", 5 << 30),
        ("monolithicSparse", "", 100 << 30),
    ];
    for (i, (sub, extra, size)) in cases.into_iter().enumerate() {
        let q = dir.path().join(format!("q{i}"));
        let s = dir.path().join(format!("s{i}"));
        std::fs::create_dir_all(&q).unwrap();
        std::fs::create_dir_all(&s).unwrap();
        let mut o = opts(sub);
        let mut qo = format!("subformat={sub}");
        for kv in extra.split(',').filter(|x| !x.is_empty()) {
            qo.push(',');
            qo.push_str(kv);
            let (k, v) = kv.split_once('=').unwrap();
            match k {
                "zeroed_grain" => o.zeroed_grain = v == "on",
                "compat6" => o.compat6 = v == "on",
                "adapter_type" => o.adapter_type = v.into(),
                "hwversion" => o.hwversion = Some(v.into()),
                "toolsversion" => o.toolsversion = Some(v.into()),
                _ => unreachable!(),
            }
        }
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &qo,
            p(&q.join("d.vmdk")),
            &size.to_string(),
        ]);
        create(&s.join("d.vmdk"), size, &o);
        let mut names: Vec<_> = std::fs::read_dir(&q)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        let mut ours: Vec<_> = std::fs::read_dir(&s)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        ours.sort();
        assert_eq!(names, ours, "{sub} files");
        for n in names {
            let a = std::fs::read(q.join(&n)).unwrap();
            let b = std::fs::read(s.join(&n)).unwrap();
            assert_same_layout(&a, &b, &format!("{sub} {n:?}"));
        }
    }
}

/// The descriptor text with its CID value (random) taken out.
fn masked_text(d: &[u8]) -> String {
    let t = String::from_utf8_lossy(d.split(|&b| b == 0).next().unwrap_or(&[])).into_owned();
    match (t.find("\nCID="), t.find("\nparentCID")) {
        (Some(a), Some(b)) => format!("{}{}", &t[..a], &t[b..]),
        _ => t,
    }
}

/// Two files of a new image are the same but for the CID: a descriptor
/// file as text, a sparse extent byte for byte outside its descriptor.
fn assert_same_layout(a: &[u8], b: &[u8], what: &str) {
    if a.starts_with(b"# Disk") {
        assert_eq!(masked_text(a), masked_text(b), "{what}");
        return;
    }
    assert_eq!(a.len(), b.len(), "{what} length");
    let desc = 512..512 + 10240;
    if a.len() >= desc.end {
        assert_eq!(
            masked_text(&a[desc.clone()]),
            masked_text(&b[desc.clone()]),
            "{what} descriptor"
        );
    }
    let outside = |d: &[u8]| {
        let mut v = d.to_vec();
        if v.len() >= desc.end {
            v[desc.clone()].fill(0);
        }
        v
    };
    let (x, y) = (outside(a), outside(b));
    let first = x.iter().zip(&y).position(|(p, q)| p != q);
    assert!(first.is_none(), "{what} differs at byte {first:?}");
}

#[test]
fn refusals_have_qemu_words() {
    let _serial = serial();
    let dir = scratch();
    let img = dir.path().join("x.vmdk");
    let try_create = |o: CreateOptions| {
        vmdk::create(new_storage(&img), Some(&img), MIB, &o)
            .unwrap_err()
            .to_string()
    };
    let mut o = opts("monolithicFlat");
    o.zeroed_grain = true;
    assert_eq!(try_create(o), "Flat image can't enable zeroed grain");
    let mut o = opts("monolithicSparse");
    o.compat6 = true;
    o.hwversion = Some("7".into());
    assert_eq!(
        try_create(o),
        "compat6 cannot be enabled with hwversion set"
    );
    assert_eq!(try_create(opts("xyz")), "invalid parameter value: xyz");
    let mut o = opts("monolithicSparse");
    o.adapter_type = "scsi".into();
    assert_eq!(try_create(o), "invalid parameter value: scsi");
    // An empty sparse image reads as a descriptor-only file: QEMU refuses it.
    let z = dir.path().join("z.vmdk");
    vmdk::create(new_storage(&z), Some(&z), 0, &opts("monolithicSparse")).unwrap();
    let e = vmdk::open(storage(&z, false), Some(&z), false)
        .err()
        .unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["info", p(&z)])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(e.message()),
        "{e}"
    );
    assert_eq!(e.message(), "Unsupported image type 'monolithicSparse'");
    // Resizing is not supported, in QEMU's words.
    let r = dir.path().join("r.vmdk");
    create(&r, MIB, &opts("monolithicSparse"));
    let e = open(&r, true).resize(2 * MIB, false).unwrap_err();
    let out = std::process::Command::new("qemu-img")
        .args(["resize", p(&r), "2M"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(e.message()),
        "{e}"
    );
    // QEMU prints the same words.
    let out = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat,zeroed_grain=on",
            p(&img),
            "1M",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Flat image can't enable zeroed grain"));
}

#[test]
fn stream_optimized_writes_as_qemu_allows() {
    let _serial = serial();
    let dir = scratch();
    let img = dir.path().join("s.vmdk");
    create(&img, 2 * MIB + 4096, &opts("streamOptimized"));
    let dev = open(&img, true);
    let g = pattern(65536, 9);
    dev.write(&g, 65536).unwrap();
    let tail = pattern(4096, 10);
    dev.write(&tail, 2 * MIB).unwrap();
    // Partial grains and rewrites are refused, as QEMU refuses them.
    assert!(dev.write(&g[..512], 0).is_err());
    assert!(dev.write(&g, 65536).is_err());
    dev.flush().unwrap();
    drop(dev);
    let q = dir.path().join("q.vmdk");
    let raw = dir.path().join("q.raw");
    let mut want = vec![0u8; (2 * MIB + 4096) as usize];
    want[65536..131072].copy_from_slice(&g);
    want[(2 * MIB) as usize..].copy_from_slice(&tail);
    std::fs::write(&raw, &want).unwrap();
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        p(&raw),
        p(&q),
    ]);
    qemu_img(&["check", "-f", "vmdk", p(&img)]);
    assert_same_contents(&qemu_contents("vmdk", &img), &want, "stream");
    assert_same_map(&img, false);
    // QEMU's file ends at the sector after the last compressed grain too.
    assert_eq!(std::fs::metadata(&img).unwrap().len() % 512, 0);
}

/// A stream-optimized file as VMware writes it: grain directory at the end,
/// given by the footer; markers before grains, tables and the directory.
fn vmware_stream(path: &Path, grains: &[(u64, Vec<u8>)], capacity_sectors: u64) {
    use flate2::{write::ZlibEncoder, Compression};
    use std::io::Write;
    let mut f = vec![0u8; 512 * 128];
    let header = |gd: u64| -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(b"KDMV");
        h[4..8].copy_from_slice(&3u32.to_le_bytes());
        h[8..12].copy_from_slice(&(0x30001u32).to_le_bytes());
        h[12..20].copy_from_slice(&capacity_sectors.to_le_bytes());
        h[20..28].copy_from_slice(&128u64.to_le_bytes());
        h[28..36].copy_from_slice(&1u64.to_le_bytes());
        h[36..44].copy_from_slice(&20u64.to_le_bytes());
        h[44..48].copy_from_slice(&512u32.to_le_bytes());
        h[56..64].copy_from_slice(&gd.to_le_bytes());
        h[64..72].copy_from_slice(&128u64.to_le_bytes());
        h[73..77].copy_from_slice(&[0x0a, 0x20, 0x0d, 0x0a]);
        h[77..79].copy_from_slice(&1u16.to_le_bytes());
        h
    };
    f[..512].copy_from_slice(&header(u64::MAX));
    let desc = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\nRW 0 SPARSE \"x.vmdk\"\n";
    f[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
    let gts = capacity_sectors.div_ceil(128 * 512);
    let mut gt = vec![0u32; (gts * 512) as usize];
    for (lba, data) in grains {
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        let z = e.finish().unwrap();
        let at = f.len() as u64 / 512;
        gt[(*lba / 128) as usize] = at as u32;
        f.extend_from_slice(&lba.to_le_bytes());
        f.extend_from_slice(&(z.len() as u32).to_le_bytes());
        f.extend_from_slice(&z);
        f.resize(f.len().next_multiple_of(512), 0);
    }
    let marker = |f: &mut Vec<u8>, sectors: u64, kind: u32| {
        let mut m = vec![0u8; 512];
        m[0..8].copy_from_slice(&sectors.to_le_bytes());
        m[12..16].copy_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&m);
    };
    let mut gd = Vec::new();
    for t in gt.chunks(512) {
        marker(&mut f, 4, 1);
        gd.push(f.len() as u32 / 512);
        for e in t {
            f.extend_from_slice(&e.to_le_bytes());
        }
    }
    marker(&mut f, (gd.len() as u64 * 4).div_ceil(512), 2);
    let gd_at = f.len() as u64 / 512;
    for e in &gd {
        f.extend_from_slice(&e.to_le_bytes());
    }
    f.resize(f.len().next_multiple_of(512), 0);
    marker(&mut f, 1, 3);
    f.extend_from_slice(&header(gd_at));
    marker(&mut f, 0, 0);
    std::fs::write(path, f).unwrap();
}

#[test]
fn reads_vmware_stream_with_footer() {
    let _serial = serial();
    let dir = scratch();
    let img = dir.path().join("vmware.vmdk");
    let grains = vec![
        (0u64, pattern(65536, 1)),
        (128 * 20, pattern(65536, 2)),
        (128 * 600, vec![0u8; 65536]),
    ];
    vmware_stream(&img, &grains, 128 * 1024);
    let dev = open(&img, false);
    assert_eq!(dev.virtual_size(), 64 * MIB);
    assert_same_contents(
        &read_all(dev.as_ref()),
        &qemu_contents("vmdk", &img),
        "vmware stream",
    );
    assert_same_map(&img, false);
    // A broken footer is refused, by QEMU too.
    let mut f = std::fs::read(&img).unwrap();
    let n = f.len();
    f[n - 1024 + 16] ^= 1;
    f[n - 1024 + 12] = 7;
    f[n - 512 + 12] = 9;
    std::fs::write(&img, &f).unwrap();
    let e = vmdk::open(storage(&img, false), Some(&img), false)
        .err()
        .expect("refused");
    assert_eq!(e.message(), "Invalid footer");
    let out = std::process::Command::new("qemu-img")
        .args(["info", p(&img)])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Invalid footer"));
}

#[test]
fn split_extents_across_the_2g_boundary() {
    let _serial = serial();
    let dir = scratch();
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        // QEMU writes, the driver reads.
        let img = dir.path().join(format!("q-{sub}.vmdk"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            p(&img),
            "5G",
        ]);
        let edge = 2u64 << 30;
        qemu_io(
            "vmdk",
            &img,
            &[
                &format!("write -P 0x61 {} 70000", edge - 5000),
                &format!("write -P 0x62 {} 512", (5u64 << 30) - 512),
            ],
        );
        let dev = open(&img, false);
        let mut buf = vec![0u8; 80000];
        dev.read(&mut buf, edge - 10000).unwrap();
        assert!(buf[..5000].iter().all(|&b| b == 0));
        assert!(buf[5000..75000].iter().all(|&b| b == 0x61));
        assert!(buf[75000..].iter().all(|&b| b == 0));
        assert_same_map(&img, sub.contains("Flat"));
        drop(dev);
        // The driver writes, QEMU reads.
        let img = dir.path().join(format!("s-{sub}.vmdk"));
        create(&img, 5 << 30, &opts(sub));
        let dev = open(&img, true);
        dev.write(&vec![0x71u8; 70001], edge - 5001).unwrap();
        dev.write(&[0x72u8; 512], (5u64 << 30) - 512).unwrap();
        dev.flush().unwrap();
        drop(dev);
        qemu_io(
            "vmdk",
            &img,
            &[
                &format!("read -P 0x71 {} 70001", edge - 5001),
                &format!("read -P 0 {} 1", edge - 5002),
                &format!("read -P 0x72 {} 512", (5u64 << 30) - 512),
            ],
        );
        if sub.contains("Sparse") {
            qemu_img(&["check", "-f", "vmdk", p(&img)]);
        }
        assert_same_map(&img, sub.contains("Flat"));
    }
}

#[test]
fn backing_chain_reads_and_copies_on_write() {
    let _serial = serial();
    let dir = scratch();
    let base = dir.path().join("base.vmdk");
    let top = dir.path().join("top.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", p(&base), "4M"]);
    qemu_io(
        "vmdk",
        &base,
        &["write -P 0x11 0 1M", "write -P 0x12 3M 64k"],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "backing_file=base.vmdk,backing_fmt=vmdk",
        p(&top),
        "4M",
    ]);
    qemu_io("vmdk", &top, &["write -P 0x21 1000 2000"]);
    let dev = open(&top, true);
    let v = dev.as_any().downcast_ref::<VmdkImage>().unwrap();
    assert_eq!(v.parent_file_name(), Some("base.vmdk"));
    assert_eq!(
        dev.overlay().unwrap().backing_format().as_deref(),
        Some("vmdk")
    );
    dev.set_backing(Some(open(&base, false)));
    // A partial write to an unallocated grain copies the rest from the parent.
    dev.write(&[0x31; 100], 3 * MIB + 10).unwrap();
    dev.flush().unwrap();
    let ours = read_all(dev.as_ref());
    drop(dev);
    assert_same_contents(&ours, &qemu_contents("vmdk", &top), "chain");
    assert_eq!(ours[3 * MIB as usize], 0x12);
    // An overlay made by the driver is one QEMU follows.
    let top2 = dir.path().join("top2.vmdk");
    let mut o = opts("monolithicSparse");
    o.backing_file = Some("base.vmdk".into());
    create(&top2, 4 * MIB, &o);
    let info = qemu_img(&["info", "-f", "vmdk", p(&top2)]);
    assert!(info.contains("backing file: base.vmdk"), "{info}");
    assert_same_contents(
        &qemu_contents("vmdk", &top2),
        &qemu_contents("vmdk", &base),
        "new overlay",
    );
}

#[test]
fn check_reports_what_qemu_reports() {
    let _serial = serial();
    let dir = scratch();
    let img = dir.path().join("c.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", p(&img), "4M"]);
    qemu_io("vmdk", &img, &["write -P 1 0 64k"]);
    // Point the second grain table entry past the end of the file.
    let mut f = std::fs::read(&img).unwrap();
    let gd = u64::from_le_bytes(f[56..64].try_into().unwrap()) as usize * 512;
    let gt = u32::from_le_bytes(f[gd..gd + 4].try_into().unwrap()) as usize * 512;
    f[gt + 4..gt + 8].copy_from_slice(&0x100000u32.to_le_bytes());
    std::fs::write(&img, &f).unwrap();
    let dev = open(&img, false);
    let v = dev.as_any().downcast_ref::<VmdkImage>().unwrap();
    let r = vmdk::check(v).unwrap();
    assert_eq!((r.corruptions, r.failure), (1, Some("Invalid argument")));
    let ours = format!(
        "{}\nqemu-img: Check failed: {}\n",
        r.messages[0],
        r.failure.unwrap()
    );
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "vmdk", p(&img)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&ours),
        "{ours} vs {:?}",
        out
    );
}

#[test]
fn malformed_images_are_refused_without_panic() {
    let _serial = serial();
    let dir = scratch();
    let img = dir.path().join("m.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", p(&img), "4M"]);
    let good = std::fs::read(&img).unwrap();
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Damage)> = vec![
        ("truncated", Box::new(|f: &mut Vec<u8>| f.truncate(3))),
        (
            "truncated header",
            Box::new(|f: &mut Vec<u8>| f.truncate(40)),
        ),
        (
            "grains past the end",
            Box::new(|f: &mut Vec<u8>| f.truncate(4096)),
        ),
        ("version", Box::new(|f: &mut Vec<u8>| f[4] = 9)),
        (
            "huge granularity",
            Box::new(|f: &mut Vec<u8>| f[20..28].copy_from_slice(&(1u64 << 40).to_le_bytes())),
        ),
        (
            "zero granularity",
            Box::new(|f: &mut Vec<u8>| f[20..28].fill(0)),
        ),
        (
            "huge gt",
            Box::new(|f: &mut Vec<u8>| f[44..48].copy_from_slice(&4096u32.to_le_bytes())),
        ),
        (
            "huge capacity",
            Box::new(|f: &mut Vec<u8>| f[12..20].copy_from_slice(&u64::MAX.to_le_bytes())),
        ),
        (
            "big l1",
            Box::new(|f: &mut Vec<u8>| {
                f[12..20].copy_from_slice(&(1u64 << 50).to_le_bytes());
                f[20..28].copy_from_slice(&1u64.to_le_bytes());
            }),
        ),
        (
            "gd at end",
            Box::new(|f: &mut Vec<u8>| f[56..64].copy_from_slice(&u64::MAX.to_le_bytes())),
        ),
        (
            "no cid",
            Box::new(|f: &mut Vec<u8>| f[512..2048].fill(b' ')),
        ),
        (
            "gd far away",
            Box::new(|f: &mut Vec<u8>| f[56..64].copy_from_slice(&(1u64 << 40).to_le_bytes())),
        ),
    ];
    for (what, damage) in cases {
        let mut f = good.clone();
        damage(&mut f);
        std::fs::write(&img, &f).unwrap();
        let qemu_ok = std::process::Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "vmdk",
                "-O",
                "raw",
                p(&img),
                p(&dir.path().join("out.raw")),
            ])
            .output()
            .unwrap()
            .status
            .success();
        let ours = vmdk::open(storage(&img, false), Some(&img), false).and_then(|d| {
            let mut buf = vec![0u8; d.virtual_size().min(4 * MIB) as usize];
            d.read(&mut buf, 0)?;
            d.block_status(0, d.virtual_size().min(MIB))?;
            Ok(buf)
        });
        assert_eq!(ours.is_ok(), qemu_ok, "{what}: {:?}", ours.err());
        if let Ok(buf) = ours {
            let q = std::fs::read(dir.path().join("out.raw")).unwrap();
            assert_eq!(
                buf[..q.len().min(buf.len())],
                q[..q.len().min(buf.len())],
                "{what}"
            );
        }
    }
    // Damaged compressed grains of a stream-optimized image.
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, pattern(256 << 10, 3)).unwrap();
    let s = dir.path().join("s.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        p(&raw),
        p(&s),
    ]);
    let good = std::fs::read(&s).unwrap();
    let grain0 = 128 * 512; // QEMU's first grain starts at the grain offset.
    let damages: [(&str, usize, &[u8]); 4] = [
        ("no size", grain0 + 8, &[0, 0, 0, 0]),
        ("huge size", grain0 + 8, &[0xff, 0xff, 0xff, 0x7f]),
        (
            "bad stream",
            grain0 + 12,
            &[0x78, 0x9c, 0xff, 0xff, 0xff, 0xff],
        ),
        ("short size", grain0 + 8, &[0x10, 0, 0, 0]),
    ];
    for (what, at, bytes) in damages {
        let mut f = good.clone();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&s, &f).unwrap();
        let qemu_ok = std::process::Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "vmdk",
                "-O",
                "raw",
                p(&s),
                p(&dir.path().join("out.raw")),
            ])
            .output()
            .unwrap()
            .status
            .success();
        let dev = open(&s, false);
        let mut buf = vec![0u8; 256 << 10];
        let ours = dev.read(&mut buf, 0);
        assert_eq!(ours.is_ok(), qemu_ok, "{what}: {ours:?}");
    }

    // A descriptor naming a missing extent, or an invalid extent line.
    let d = dir.path().join("d.vmdk");
    std::fs::write(&d, "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"nope.vmdk\" 0\n").unwrap();
    assert!(vmdk::open(storage(&d, false), Some(&d), false).is_err());
    std::fs::write(&d, "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 8 FLAT \"nope.vmdk\"\n").unwrap();
    let e = vmdk::open(storage(&d, false), Some(&d), false)
        .err()
        .unwrap();
    assert_eq!(e.message(), "Invalid extent line: RW 8 FLAT \"nope.vmdk\"");
}
