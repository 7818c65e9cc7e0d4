//! The vhdx driver against the real qemu-img and qemu-io: images QEMU
//! creates and writes read the same through the driver; images the driver
//! creates and writes pass `qemu-img check` and read the same in QEMU; the
//! layout matches QEMU's; malformed images are refused without a panic.

mod foreign;

use foreign::*;
use std::path::Path;
use std::process::Command;
use strata_format::vhdx::{self, CreateOptions, VhdxImage};
use strata_format::{BlockDevice, Status};

const MIB: u64 = 1 << 20;

/// The tests of this file run one at a time: a qemu-img child forked while
/// another test's image file is open holds that file's lock until it execs,
/// which makes a parallel test's reopen fail at random.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A patterned raw file of `size` bytes with zero runs, at `path`.
fn patterned_raw(path: &Path, size: usize) {
    let mut data = pattern(size, 7);
    // Whole zero blocks and a zero run across a block boundary.
    data[2 << 20..3 << 20].fill(0);
    data[(8 << 20) - 5000..(8 << 20) + 7000].fill(0);
    std::fs::write(path, data).expect("write raw");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The `-o` options of each subformat and option set the tests cover.
const OPTION_SETS: &[&str] = &[
    "subformat=dynamic",
    "subformat=fixed",
    "subformat=dynamic,block_state_zero=off",
    "subformat=fixed,block_state_zero=off",
    "block_size=1M",
    "block_size=2M,log_size=2M",
];

/// The same options as [`CreateOptions`].
fn options(set: &str) -> CreateOptions {
    let mut o = CreateOptions::default();
    for kv in set.split(',') {
        let (k, v) = kv.split_once('=').expect("k=v");
        match k {
            "subformat" => o.fixed = v == "fixed",
            "block_state_zero" => o.block_state_zero = v == "on",
            "block_size" => o.block_size = v.trim_end_matches('M').parse::<u64>().unwrap() * MIB,
            "log_size" => o.log_size = v.trim_end_matches('M').parse::<u64>().unwrap() * MIB,
            _ => panic!("unknown option {k}"),
        }
    }
    o
}

fn open(path: &Path, write: bool) -> std::sync::Arc<dyn BlockDevice> {
    vhdx::open(storage(path, write), Some(path), write).expect("open vhdx")
}

#[test]
fn probe_takes_the_signature() {
    let _serial = serial();
    assert!(vhdx::probe(b"vhdxfile\0\0"));
    assert!(!vhdx::probe(b"vhdxfil"));
    assert!(!vhdx::probe(b"QFI\xfb"));
}

#[test]
fn qemu_written_images_read_the_same() {
    let _serial = serial();
    let dir = scratch();
    let raw = dir.path().join("src.raw");
    patterned_raw(&raw, 20 << 20);
    for set in OPTION_SETS {
        let img = dir.path().join("q.vhdx");
        let _ = std::fs::remove_file(&img);
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            set,
            s(&raw),
            s(&img),
        ]);
        qemu_io(
            "vhdx",
            &img,
            &[
                "write -P 0x5a 1234567 100000",
                "write -P 0x11 8388000 9000",
                "write -z 3000000 70000",
                "write -P 0x22 19000000 1971520",
                "write -z 12582912 1048576",
            ],
        );
        let dev = open(&img, false);
        assert_eq!(dev.virtual_size(), 20 << 20, "{set}");
        assert_same_contents(&read_all(dev.as_ref()), &qemu_contents("vhdx", &img), set);
    }
}

#[test]
fn driver_written_images_pass_check_and_read_the_same_in_qemu() {
    let _serial = serial();
    let dir = scratch();
    for set in OPTION_SETS {
        let img = dir.path().join("d.vhdx");
        let _ = std::fs::remove_file(&img);
        let size = (20 << 20) + 512;
        vhdx::create(new_storage(&img), Some(&img), size, &options(set)).expect("create");
        {
            let dev = open(&img, true);
            dev.write(&pattern(100_000, 1), 1_234_567).unwrap();
            dev.write(&pattern(9000, 2), 8_388_000).unwrap();
            dev.write(&pattern(4 << 20, 3), 16 << 20).unwrap();
            dev.write_zeroes(1_300_000, 10_000, false).unwrap();
            dev.write_zeroes(5 << 20, 1 << 20, true).unwrap();
            dev.write(&pattern(512, 4), size - 512).unwrap();
            dev.flush().unwrap();
            dev.close().unwrap();
        }
        qemu_img(&["check", "-f", "vhdx", s(&img)]);
        let dev = open(&img, false);
        assert_same_contents(&read_all(dev.as_ref()), &qemu_contents("vhdx", &img), set);
        drop(dev);
        // And QEMU writes on top of what the driver wrote.
        qemu_io("vhdx", &img, &["write -P 0x77 4000000 3000000"]);
        let dev = open(&img, false);
        assert_same_contents(&read_all(dev.as_ref()), &qemu_contents("vhdx", &img), set);
    }
}

/// `len` bytes of the file at `offset`.
fn bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let data = std::fs::read(path).expect("read");
    let o = usize::try_from(offset).unwrap();
    data[o..o + len].to_vec()
}

#[test]
fn created_layout_matches_qemu() {
    let _serial = serial();
    let dir = scratch();
    for (size, set) in [
        (64 << 20, "subformat=dynamic"),
        (10 << 20, "subformat=fixed"),
        (10 << 20, "subformat=fixed,block_state_zero=off"),
        (3 << 30, "subformat=dynamic,block_state_zero=off"),
        ((5 << 20) + 1000, "block_size=1M,log_size=3M"),
        (200 << 20, "block_size=0"),
    ] {
        let q = dir.path().join("q.vhdx");
        let d = dir.path().join("d.vhdx");
        let _ = std::fs::remove_file(&q);
        let _ = std::fs::remove_file(&d);
        let size_arg = size.to_string();
        qemu_img(&["create", "-q", "-f", "vhdx", "-o", set, s(&q), &size_arg]);
        let mut o = if set == "block_size=0" {
            CreateOptions::default()
        } else {
            options(set)
        };
        if set.contains("block_size=0") {
            o.block_size = 0;
        }
        vhdx::create(new_storage(&d), Some(&d), size, &o).expect("create");
        let what = format!("{size} {set}");
        let ql = std::fs::metadata(&q).unwrap().len();
        assert_eq!(
            ql,
            std::fs::metadata(&d).unwrap().len(),
            "{what}: file length"
        );
        assert_eq!(bytes(&q, 0, 8), bytes(&d, 0, 8), "{what}");
        // Region tables: same regions (the GUIDs there are fixed), so the same bytes.
        for off in [192 << 10, 256 << 10] {
            assert_eq!(
                bytes(&q, off, 64 << 10),
                bytes(&d, off, 64 << 10),
                "{what}: region table"
            );
        }
        // Headers: the same fields but the GUIDs and the sequence number.
        for off in [64 << 10, 128 << 10] {
            let (a, b) = (bytes(&q, off, 80), bytes(&d, off, 80));
            assert_eq!(a[..4], b[..4], "{what}");
            assert_eq!(a[48..80], b[48..80], "{what}: header log fields");
        }
        // Metadata: table and items the same, but the page 83 GUID.
        let rt = bytes(&q, 192 << 10, 80);
        let meta = u64::from_le_bytes(rt[64..72].try_into().unwrap());
        let bat = u64::from_le_bytes(rt[32..40].try_into().unwrap());
        let bat_len = u32::from_le_bytes(rt[40..44].try_into().unwrap());
        assert_eq!(
            bytes(&q, meta, 64 << 10),
            bytes(&d, meta, 64 << 10),
            "{what}: metadata table"
        );
        let (a, b) = (
            bytes(&q, meta + (64 << 10), 40),
            bytes(&d, meta + (64 << 10), 40),
        );
        assert_eq!(a[..16], b[..16], "{what}: metadata items");
        assert_eq!(a[32..], b[32..], "{what}: metadata items");
        let n = usize::try_from(bat_len).unwrap();
        assert_eq!(bytes(&q, bat, n), bytes(&d, bat, n), "{what}: BAT");
        // Both read the same (zeroes), and QEMU checks the driver's image.
        qemu_img(&["check", "-f", "vhdx", s(&d)]);
        let dev = open(&d, false);
        let info = qemu_img(&["info", "--output=json", "-f", "vhdx", s(&q)]);
        let cluster = format!("\"cluster-size\": {}", dev.cluster_size().unwrap());
        assert!(info.contains(&cluster), "{what}: {info}");
        assert!(
            info.contains(&format!("\"virtual-size\": {}", dev.virtual_size())),
            "{what}"
        );
    }
}

#[test]
fn block_status_agrees_with_qemu_map() {
    let _serial = serial();
    let dir = scratch();
    let img = dir.path().join("m.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", s(&img), "24M"]);
    qemu_io("vhdx", &img, &["write -P 1 9M 4k", "write -z 17M 1M"]);
    let map = qemu_img(&["map", "--output=json", "-f", "vhdx", s(&img)]);
    let dev = open(&img, false);
    let mut pos = 0;
    let mut strata = Vec::new();
    while pos < dev.virtual_size() {
        let e = dev.block_status(pos, dev.virtual_size() - pos).unwrap();
        let (data, zero) = match e.status {
            Status::Data { .. } => (true, false),
            Status::Zero { .. } => (false, true),
            Status::Unallocated => (false, false),
        };
        strata.push(format!(
            "{{ \"start\": {pos}, \"length\": {}, \"depth\": 0, \"present\": true, \"zero\": {zero}, \"data\": {data}, \"compressed\": false}}",
            e.len
        ));
        pos += e.len;
    }
    assert_eq!(map.trim(), format!("[{}]", strata.join(",\n")));
}

#[test]
fn check_reports_what_qemu_reports() {
    let _serial = serial();
    let dir = scratch();
    let img = dir.path().join("c.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", s(&img), "24M"]);
    qemu_io("vhdx", &img, &["write -P 1 1M 4k", "write -P 2 17M 4k"]);
    let dev = VhdxImage::open_for_check(storage(&img, false), Some(&img), false).unwrap();
    assert_eq!(dev.check().unwrap(), vhdx::CheckReport::default());

    // Cut the file inside the first data block: QEMU refuses to open it, and
    // check lists both blocks.
    let cut = dir.path().join("cut.vhdx");
    let data = std::fs::read(&img).unwrap();
    std::fs::write(&cut, &data[..12 << 20]).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "-f", "vhdx", s(&cut)])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected: Vec<String> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("qemu-img: "))
        .map(str::to_owned)
        .collect();
    assert_eq!(out.status.code(), Some(2));
    let dev = VhdxImage::open_for_check(storage(&cut, false), Some(&cut), false).unwrap();
    assert_eq!(dev.check().unwrap().problems, expected);
    let err = vhdx::open(storage(&cut, false), Some(&cut), false)
        .err()
        .expect("refused");
    let info = Command::new("qemu-img")
        .args(["info", "-f", "vhdx", s(&cut)])
        .output()
        .unwrap();
    let last = String::from_utf8_lossy(&info.stderr)
        .lines()
        .last()
        .unwrap()
        .to_owned();
    assert_eq!(
        last,
        format!("qemu-img: Could not open '{}': {err}", s(&cut))
    );
}

/// The guest contents as qemu-img reads them, or `None` if it fails to.
fn try_qemu_contents(path: &Path) -> Option<Vec<u8>> {
    let dir = scratch();
    let raw = dir.path().join("out.raw");
    let ok = Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw", s(path), s(&raw)])
        .output()
        .unwrap()
        .status
        .success();
    ok.then(|| std::fs::read(&raw).unwrap())
}

/// The guest contents through the driver, or `None` if a read fails.
fn try_read_all(dev: &dyn BlockDevice) -> Option<Vec<u8>> {
    let mut out = vec![0u8; usize::try_from(dev.virtual_size()).unwrap()];
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        dev.read(chunk, (i as u64) << 20).ok()?;
    }
    Some(out)
}

/// QEMU's last stderr line for `qemu-img info -f vhdx PATH`, and whether it failed.
fn qemu_open_error(path: &Path) -> Option<String> {
    let out = Command::new("qemu-img")
        .args(["info", "-f", "vhdx", s(path)])
        .output()
        .unwrap();
    (!out.status.success()).then(|| {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned()
    })
}

#[test]
fn malformed_images_are_refused_as_qemu_refuses_them() {
    let _serial = serial();
    let dir = scratch();
    let good = dir.path().join("good.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", s(&good), "16M"]);
    qemu_io("vhdx", &good, &["write -P 3 0 64k"]);
    let base = std::fs::read(&good).unwrap();
    let le32 = |v: u32| v.to_le_bytes().to_vec();
    let le64 = |v: u64| v.to_le_bytes().to_vec();
    // (what, offset, bytes) patches, or a truncation length.
    type Patch = Option<(usize, Vec<u8>)>;
    let cases: Vec<(&str, Patch, Option<usize>)> = vec![
        ("signature", Some((0, b"vhdxfilX".to_vec())), None),
        ("header 1", Some((64 << 10, b"X".to_vec())), None),
        ("region table", Some((192 << 10 | 20, b"X".to_vec())), None),
        ("short file", None, Some(100)),
        ("header area only", None, Some(200 << 10)),
        ("no metadata", None, Some(3 << 20)),
        ("cut data", None, Some((8 << 20) + 4096)),
        // Metadata items (the region is at 3 MiB, items at +64 KiB).
        (
            "block size 3M",
            Some(((3 << 20) + (64 << 10), le32(3 << 20))),
            None,
        ),
        (
            "block size 0",
            Some(((3 << 20) + (64 << 10), le32(0))),
            None,
        ),
        (
            "has parent",
            Some(((3 << 20) + (64 << 10) + 4, le32(2))),
            None,
        ),
        (
            "sector size 1000",
            Some(((3 << 20) + (64 << 10) + 32, le32(1000))),
            None,
        ),
        (
            "sector size 4096",
            Some(((3 << 20) + (64 << 10) + 32, le32(4096))),
            None,
        ),
        (
            "huge disk",
            Some(((3 << 20) + (64 << 10) + 8, le64(1 << 62))),
            None,
        ),
        (
            "metadata count",
            Some(((3 << 20) + 10, vec![0xff, 0xff])),
            None,
        ),
        ("item offset", Some(((3 << 20) + 48, le32(u32::MAX))), None),
        (
            "bat entry",
            Some(((2 << 20), le64(0xffff_ffff_fff0_0006))),
            None,
        ),
        ("bat entry in the header", Some(((2 << 20), le64(6))), None),
        (
            "bat entry over the log",
            Some(((2 << 20), le64((1 << 20) | 6))),
            None,
        ),
        (
            "bat entry state 7",
            Some(((2 << 20), le64((8 << 20) | 7))),
            None,
        ),
        (
            "bat entry state 3",
            Some(((2 << 20), le64((8 << 20) | 3))),
            None,
        ),
    ];
    for (what, patch, cut) in cases {
        let mut data = base.clone();
        if let Some((at, b)) = patch {
            data[at..at + b.len()].copy_from_slice(&b);
        }
        if let Some(n) = cut {
            data.truncate(n);
        }
        let path = dir.path().join("bad.vhdx");
        std::fs::write(&path, &data).unwrap();
        let qemu = qemu_open_error(&path);
        let ours = vhdx::open(storage(&path, false), Some(&path), false);
        match (qemu, ours) {
            (Some(q), Err(e)) => {
                if what != "huge disk" {
                    assert_eq!(
                        q,
                        format!("qemu-img: Could not open '{}': {e}", s(&path)),
                        "{what}"
                    );
                }
            }
            (None, Ok(dev)) => match try_qemu_contents(&path) {
                Some(q) => assert_same_contents(&read_all(dev.as_ref()), &q, what),
                // QEMU fails to read it: so does the driver.
                None => assert!(try_read_all(dev.as_ref()).is_none(), "{what}"),
            },
            (q, o) => panic!("{what}: qemu {q:?}, strata {:?}", o.err()),
        }
    }
}

#[test]
fn create_refusals_match_qemu() {
    let _serial = serial();
    let dir = scratch();
    let path = dir.path().join("r.vhdx");
    for (opts, size) in [
        ("block_size=3M", "16M"),
        ("log_size=5G", "16M"),
        ("log_size=0", "16M"),
        ("", "65T"),
    ] {
        let mut args = vec!["create", "-q", "-f", "vhdx"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&path), size]);
        let out = Command::new("qemu-img").args(&args).output().unwrap();
        assert!(!out.status.success(), "{opts}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut o = CreateOptions::default();
        match opts.split_once('=') {
            Some(("block_size", v)) => {
                o.block_size = v.trim_end_matches('M').parse::<u64>().unwrap() * MIB
            }
            Some(("log_size", "5G")) => o.log_size = 5 << 30,
            Some(("log_size", _)) => o.log_size = 0,
            _ => {}
        }
        let size = if size == "65T" { 65 << 40 } else { 16 << 20 };
        let err = vhdx::plan(size, &o).expect_err("refused");
        assert!(
            stderr.trim_end().ends_with(&err.to_string()),
            "{opts}: qemu said {stderr}, strata {err}"
        );
    }
}

#[test]
fn log_needing_replay_is_replayed_or_refused_as_qemu_does() {
    let _serial = serial();
    // An image with a log entry that sets one BAT entry: QEMU refuses it
    // read-only and replays it read-write; so does the driver.
    let dir = scratch();
    let q = dir.path().join("q.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", s(&q), "16M"]);
    qemu_io("vhdx", &q, &["write -P 9 0 64k"]);
    // Block 1's entry: point it at a copy of block 0 placed at the file's end.
    let mut data = std::fs::read(&q).unwrap();
    let end = data.len() as u64;
    let block0 = data[8 << 20..(8 << 20) + (8 << 20)].to_vec();
    data.extend_from_slice(&block0);
    let bat_sector_offset = 2u64 << 20;
    let mut sector = data[2 << 20..(2 << 20) + 4096].to_vec();
    sector[8..16].copy_from_slice(&(end | 6).to_le_bytes());
    let log_guid = [0x42u8; 16];
    let len = data.len() as u64;
    write_log_entry(
        &mut data,
        1 << 20,
        &log_guid,
        bat_sector_offset,
        &sector,
        len,
    );
    set_log_guid(&mut data, &log_guid);
    std::fs::write(&q, &data).unwrap();
    let d = dir.path().join("d.vhdx");
    std::fs::copy(&q, &d).unwrap();

    // Read-only: refused in QEMU's words.
    let out = Command::new("qemu-img")
        .args(["info", "-f", "vhdx", s(&q)])
        .output()
        .unwrap();
    let err = vhdx::open(storage(&q, false), Some(&q), false)
        .err()
        .expect("refused");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("qemu-img: Could not open '{}': {err}\n", s(&q))
    );

    // Read-write: replayed.
    qemu_img(&["check", "-r", "all", "-f", "vhdx", s(&q)]);
    let dev = VhdxImage::open_for_check(storage(&d, true), Some(&d), true).unwrap();
    assert!(dev.check().unwrap().log_replayed);
    drop(dev);
    let dev = open(&d, false);
    let ours = read_all(dev.as_ref());
    assert_same_contents(&ours, &qemu_contents("vhdx", &q), "replayed");
    assert_eq!(ours[8 << 20], 9, "block 1 shows the replayed entry");
    qemu_img(&["check", "-f", "vhdx", s(&d)]);
}

/// Set the log GUID of both headers (and their checksums).
fn set_log_guid(data: &mut [u8], guid: &[u8; 16]) {
    for off in [64usize << 10, 128 << 10] {
        data[off + 48..off + 64].copy_from_slice(guid);
        data[off + 4..off + 8].fill(0);
        let crc = crc32c::crc32c(&data[off..off + 4096]);
        data[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Write one log entry at the log's start: one data descriptor putting
/// `sector` at `file_offset`.
fn write_log_entry(
    data: &mut [u8],
    log_offset: usize,
    guid: &[u8; 16],
    file_offset: u64,
    sector: &[u8],
    file_len: u64,
) {
    let mut e = vec![0u8; 8192];
    e[..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&8192u32.to_le_bytes());
    e[16..24].copy_from_slice(&1u64.to_le_bytes());
    e[24..28].copy_from_slice(&1u32.to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[48..56].copy_from_slice(&file_len.to_le_bytes());
    e[56..64].copy_from_slice(&file_len.to_le_bytes());
    let d = 64;
    e[d..d + 4].copy_from_slice(b"desc");
    e[d + 4..d + 8].copy_from_slice(&sector[4092..4096]);
    e[d + 8..d + 16].copy_from_slice(&sector[..8]);
    e[d + 16..d + 24].copy_from_slice(&file_offset.to_le_bytes());
    e[d + 24..d + 32].copy_from_slice(&1u64.to_le_bytes());
    let s = 4096;
    e[s..s + 4].copy_from_slice(b"data");
    e[s + 4..s + 8].copy_from_slice(&0u32.to_le_bytes());
    e[s + 8..s + 4092].copy_from_slice(&sector[8..4092]);
    e[s + 4092..s + 4096].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32c::crc32c(&e);
    e[4..8].copy_from_slice(&crc.to_le_bytes());
    data[log_offset..log_offset + 8192].copy_from_slice(&e);
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
    let _serial = serial();
    use strata_storage::{picks_for, CrashClock, CrashStorage, MemStorage};
    // A crash between the data and the BAT entry's journal, and after the
    // journal but before the header drops its log GUID, must both come out
    // whole: the first with the old entry, the second by replaying the log.
    let dir = scratch();
    let size = 8u64 << 20;
    let base = {
        let m = std::sync::Arc::new(MemStorage::new());
        let o = CreateOptions {
            block_size: MIB,
            ..Default::default()
        };
        vhdx::create(m.clone(), None, size, &o).unwrap();
        m.snapshot()
    };
    let ops = [
        Op::Write(3 * MIB / 2, 1 << 20, 1),
        Op::Zero(MIB + 4096, 8192),
    ];
    let mut states = vec![vec![0u8; size as usize]];
    for op in ops {
        let mut next = states.last().unwrap().clone();
        op.apply_model(&mut next);
        states.push(next);
    }
    let mut images = 0;
    let mut replays = 0;
    let mut seen = std::collections::HashSet::new();
    for k in 0.. {
        let clock = CrashClock::new(Some(k));
        let store = std::sync::Arc::new(CrashStorage::new(base.clone(), clock.clone()));
        // The op in flight at the crash (ops.len() = none).
        let mut at = 0;
        if let Ok(dev) = vhdx::open(store.clone(), None, true) {
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
            // Equal disks (with the same operation in flight) are checked once.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&(&disk, at), &mut h);
            if !seen.insert(std::hash::Hasher::finish(&h)) {
                continue;
            }
            // QEMU's copy and the driver's: a log left to replay is replayed
            // by each (QEMU's check -r all, the driver's open for writing).
            let qa = dir.path().join("q.vhdx");
            let sb = dir.path().join("s.vhdx");
            std::fs::write(&qa, &disk).unwrap();
            std::fs::write(&sb, &disk).unwrap();
            let ro = vhdx::open(storage(&sb, false), Some(&sb), false);
            if let Err(e) = ro {
                assert_eq!(e.kind(), strata_format::ErrorKind::ReadOnly, "{e}");
                qemu_img(&["check", "-q", "-r", "all", "-f", "vhdx", s(&qa)]);
                drop(vhdx::open(storage(&sb, true), Some(&sb), true).expect("replays"));
                // The driver's replay leaves an image QEMU checks clean, and
                // both replays show the same disk.
                qemu_img(&["check", "-f", "vhdx", s(&sb)]);
                let got = read_all(open(&sb, false).as_ref());
                assert_same_contents(&got, &qemu_contents("vhdx", &qa), "replayed");
                replays += 1;
            }
            qemu_img(&["check", "-f", "vhdx", s(&qa)]);
            let got = read_all(open(&sb, false).as_ref());
            let before = &states[at];
            let after = &states[(at + 1).min(ops.len())];
            let (a, b) = ops.get(at).map(|o| o.range()).unwrap_or((0, 0));
            for (i, sector) in got.chunks(512).enumerate() {
                let r = i * 512..i * 512 + 512;
                let inside = r.start < b && r.end > a;
                let old = sector == &before[r.clone()];
                assert!(
                    old || inside && sector == &after[r],
                    "crash at op {k}, {pick:?}: sector {i} is neither old nor new"
                );
            }
            images += 1;
        }
    }
    assert!(images > 10, "{images} images checked");
    assert!(replays > 0, "no crash left a log to replay");
    eprintln!("{images} images checked, {replays} replayed");
}

#[test]
fn without_write_barriers_the_same_writes_land_and_only_flush_makes_them_durable() {
    let _serial = serial();
    use std::sync::Arc;
    use strata_storage::{CrashClock, CrashPick, CrashStorage, MemStorage};
    let dir = scratch();
    let size = 8u64 << 20;
    let base = {
        let m = Arc::new(MemStorage::new());
        let o = CreateOptions {
            block_size: MIB,
            ..Default::default()
        };
        vhdx::create(m.clone(), None, size, &o).unwrap();
        m.snapshot()
    };
    // New blocks (each journaled), a write into one of them, zeroes.
    let ops = [
        Op::Write(3 * MIB / 2, 1 << 20, 1),
        Op::Write(5 * MIB - 512, 4096, 2),
        Op::Write(MIB + 100, 3000, 3),
        Op::Zero(MIB + 4096, 8192),
    ];
    let mut model = vec![0u8; size as usize];
    for op in ops {
        op.apply_model(&mut model);
    }
    let write = |barriers: bool| {
        let store = Arc::new(CrashStorage::new(base.clone(), CrashClock::new(None)));
        let dev = VhdxImage::open(store.clone(), None, true).expect("open vhdx");
        dev.set_write_barriers(barriers).expect("barriers");
        for op in ops {
            op.run(&dev).expect("op");
        }
        dev.close().expect("close");
        (store, dev)
    };
    let (ordered, _) = write(true);
    let (store, dev) = write(false);
    let (a, b) = (ordered.volatile(), store.volatile());
    // The same writes, whatever the barriers: the same BAT, metadata and
    // payload; headers of the same sequence numbers; log entries in the same
    // sectors (GUIDs, and the checksums over them, are new each session).
    assert_eq!(a.len(), b.len());
    let log_end = 2 * MIB as usize;
    assert!(
        a[log_end..] == b[log_end..],
        "BAT, metadata or payload differ"
    );
    for header in [64 << 10, 128 << 10] {
        assert_eq!(a[header + 8..header + 16], b[header + 8..header + 16]);
    }
    for sector in (MIB as usize..log_end).step_by(4096) {
        assert_eq!(
            a[sector..sector + 4],
            b[sector..sector + 4],
            "log at {sector}"
        );
    }
    // With barriers, every step was made durable (and close flushed);
    // without, nothing was, close included.
    assert_eq!(ordered.pending(), 0);
    assert_eq!(store.after_crash(CrashPick::None), base);
    assert!(store.pending() > 0);
    dev.flush().expect("flush");
    assert_eq!(store.pending(), 0);
    // QEMU finds the flushed image clean, with the contents written.
    let path = dir.path().join("unordered.vhdx");
    std::fs::write(&path, store.after_crash(CrashPick::None)).unwrap();
    qemu_img(&["check", "-f", "vhdx", s(&path)]);
    assert_same_contents(&model, &qemu_contents("vhdx", &path), "without barriers");
}
