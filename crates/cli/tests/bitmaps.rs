//! Persistent dirty bitmaps survive strata's changes to an image, valid: enabled
//! bitmaps record every change as QEMU's do (the same bits), disabled ones keep
//! their bits, a resize keeps every bitmap's bits (as QEMU's does), and qemu-img checks the image clean (no bitmap cluster leaks). The
//! bits are read back by the real QEMU (qemu-nbd exports a bitmap, nbdinfo maps it).

use std::path::Path;
use std::process::Command;

mod common;

use common::{ok as run, STRATA};

fn strata(dir: &Path, args: &[&str]) -> String {
    run(dir, "strata", args)
}

/// The dirty ranges of bitmap `name` as QEMU reads them: (start, length) pairs.
fn dirty(dir: &Path, img: &str, name: &str) -> Vec<(u64, u64)> {
    let sock = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let sock_name = sock.to_str().unwrap();
    let srv = common::nbd::QemuNbd::start(
        &dir.join(img),
        "",
        &["-B", name, "-k", sock_name],
        sock_name,
    );
    let map = run(
        dir,
        "nbdinfo",
        &[
            &format!("--map=qemu:dirty-bitmap:{name}"),
            &format!("nbd+unix:///?socket={}", sock.display()),
        ],
    );
    drop(srv);
    map.lines()
        .filter(|l| l.contains("dirty"))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .take(2)
                .map(|x| x.parse().unwrap())
                .collect();
            (f[0], f[1])
        })
        .collect()
}

/// Clean check, and no bitmap left marked in use.
fn sound(dir: &Path, img: &str, what: &str) {
    let check = Command::new("qemu-img")
        .args(["check", img])
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(0),
        "{what}: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let info = run(dir, "qemu-img", &["info", "--output=json", img]);
    assert!(
        info.contains("\"name\": \"b1\""),
        "{what}: bitmaps gone\n{info}"
    );
    assert!(
        !info.contains("in-use"),
        "{what}: a bitmap is left in use\n{info}"
    );
}

fn size(dir: &Path, img: &str) -> u64 {
    let info = run(dir, "qemu-img", &["info", "--output=json", img]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// `src.raw`: 64 MiB, 4 KiB of data at 20 MiB (what the tests write with convert -n).
fn source_raw(dir: &Path) {
    run(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "raw", "src.raw", "64M"],
    );
    run(
        dir,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 3 20M 4k", "src.raw"],
    );
}

/// `b1` enabled; `b2` disabled, dirty at 8 MiB only.
fn image_with_bitmaps(dir: &Path, name: &str, backing: Option<&str>) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        a.extend(["-b", b, "-F", "qcow2"]);
    }
    a.extend([name, "64M"]);
    run(dir, "qemu-img", &a);
    run(dir, "qemu-img", &["bitmap", "--add", name, "b1"]);
    run(dir, "qemu-img", &["bitmap", "--add", name, "b2"]);
    run(dir, "qemu-io", &["-c", "write -P 2 8M 64k", name]);
    run(dir, "qemu-img", &["bitmap", "--disable", name, "b2"]);
    run(dir, "qemu-io", &["-c", "write -P 1 1M 64k", name]);
}

#[test]
fn bitmaps_stay_valid_through_writes_snapshots_commits_and_resizes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b2 = vec![(8 << 20, 65536)];
    source_raw(d);

    // Before any change, strata leaves the bits as they are.
    image_with_bitmaps(d, "d.qcow2", None);
    let before = dirty(d, "d.qcow2", "b1");
    assert_eq!(before, vec![(1 << 20, 65536), (8 << 20, 65536)]);
    strata(d, &["snapshot", "-c", "s1", "d.qcow2"]);
    assert_eq!(
        dirty(d, "d.qcow2", "b1"),
        before,
        "a snapshot changes no data"
    );
    sound(d, "d.qcow2", "snapshot create");

    // Each step runs on a copy with each tool, from bits QEMU wrote; the
    // enabled bitmap records just what the step wrote, as QEMU's does (the
    // same bits, and the same file), the disabled one keeps its bits.
    let steps: &[(&str, &[&str])] = &[
        (
            "convert -n",
            &[
                "convert", "-n", "-f", "raw", "-O", "qcow2", "src.raw", "IMG",
            ],
        ),
        ("rebase", &["rebase", "-b", "src.raw", "-F", "raw", "IMG"]),
        ("grow", &["resize", "IMG", "+64M"]),
        ("shrink", &["resize", "--shrink", "IMG", "32M"]),
    ];
    run(d, "qemu-img", &["bitmap", "--clear", "d.qcow2", "b1"]);
    run(d, "qemu-io", &["-c", "write -P 5 0 4k", "d.qcow2"]);
    for (what, args) in steps {
        for (tool, img) in [("strata", "ours.qcow2"), ("qemu-img", "theirs.qcow2")] {
            std::fs::copy(d.join("d.qcow2"), d.join(img)).unwrap();
            let args: Vec<&str> = args
                .iter()
                .map(|a| if *a == "IMG" { img } else { a })
                .collect();
            run(d, tool, &args);
            sound(d, img, what);
        }
        let (ours, theirs) = (dirty(d, "ours.qcow2", "b1"), dirty(d, "theirs.qcow2", "b1"));
        assert_eq!(ours, theirs, "{what}: b1");
        assert_eq!(
            dirty(d, "ours.qcow2", "b2"),
            b2,
            "{what}: disabled b2 changed"
        );
        let bytes = |f: &str| std::fs::read(d.join(f)).unwrap();
        assert!(
            bytes("ours.qcow2") == bytes("theirs.qcow2"),
            "{what}: the files differ"
        );
    }
    // QEMU refuses to load a snapshot over bitmaps (in use or not).
    let out = Command::new(STRATA)
        .args(["img", "snapshot", "-a", "s1", "d.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Device has active dirty bitmaps"),
        "{out:?}"
    );

    // A size whose bitmap would not fit in memory (256 GiB for 1P at 512-byte
    // granularity) is refused up front, with nothing changed: qemu-img aborts,
    // failing to allocate it, and QEMU could not load the bitmap afterwards.
    run(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "fine.qcow2", "64M"],
    );
    run(
        d,
        "qemu-img",
        &["bitmap", "--add", "-g", "512", "fine.qcow2", "b1"],
    );
    let out = Command::new(STRATA)
        .args(["img", "resize", "fine.qcow2", "1P"])
        .current_dir(d)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("persistent bitmap 'b1'"), "{err}");
    assert_eq!(size(d, "fine.qcow2"), 64 << 20);
    sound(d, "fine.qcow2", "refused resize");

    // A size past the bitmaps' on-disk limits but within memory resizes, as
    // qemu-img's does, leaving every bitmap in use (not stored again) with
    // qemu-img's warning: the same bytes as qemu-img leaves.
    std::fs::copy(d.join("d.qcow2"), d.join("q.qcow2")).unwrap();
    run(d, "qemu-img", &["resize", "q.qcow2", "1P"]);
    let out = Command::new(STRATA)
        .args(["img", "resize", "d.qcow2", "1P"])
        .current_dir(d)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("Lost persistent bitmaps"), "{err}");
    assert_eq!(size(d, "d.qcow2"), 1 << 50);
    let same =
        std::fs::read(d.join("d.qcow2")).unwrap() == std::fs::read(d.join("q.qcow2")).unwrap();
    assert!(
        same,
        "resize past the bitmaps' limits: not the bytes qemu-img leaves"
    );

    // Commit writes into a base with bitmaps (which record what it writes),
    // and empties a top with bitmaps (whose guest view does not change: its
    // bits stay), as QEMU's commit does.
    let mut maps = Vec::new();
    for tool in ["strata", "qemu-img"] {
        let (base, top) = (format!("{tool}-base.qcow2"), format!("{tool}-top.qcow2"));
        image_with_bitmaps(d, &base, None);
        image_with_bitmaps(d, &top, Some(&base));
        run(d, tool, &["commit", &top]);
        let mut m = Vec::new();
        for img in [&base, &top] {
            sound(d, img, "commit");
            assert_eq!(dirty(d, img, "b2"), b2, "commit: {img} b2");
            m.push(dirty(d, img, "b1"));
        }
        maps.push(m);
    }
    assert_eq!(maps[0], maps[1], "commit: b1 of base and top");
}

/// Offset of the first bitmap directory entry (read from the header extension).
fn first_dir_entry(path: &Path) -> u64 {
    let b = std::fs::read(path).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let mut at = be32(100) as usize; // header length (v3)
    loop {
        let (ty, len) = (be32(at), be32(at + 4) as usize);
        assert_ne!(ty, 0, "no bitmaps extension");
        if ty == 0x2385_2875 {
            return u64::from_be_bytes(b[at + 8 + 16..at + 8 + 24].try_into().unwrap());
        }
        at += 8 + len.next_multiple_of(8);
    }
}

/// Bitmap directories strata cannot vouch for are not touched: writing marks the
/// bitmaps inconsistent (the autoclear rule for programs without them), the write
/// succeeds, and QEMU still opens the image and reads the data.
#[test]
fn bitmaps_strata_cannot_vouch_for_are_marked_inconsistent_not_trusted() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    source_raw(d);
    // (field offset in the entry, bytes written there)
    let damage: &[(&str, u64, &[u8])] = &[
        ("reserved flag", 12, &[0, 0, 0, 0x0a]),
        ("unknown type", 16, &[2]),
        ("table size too small", 8, &[0, 0, 0, 0]),
        ("granularity out of range", 17, &[40]),
        (
            "table past the end of the file",
            0,
            &[0, 0, 0x7f, 0, 0, 0, 0, 0],
        ),
    ];
    for (what, field, bytes) in damage {
        let img = "d.qcow2";
        let _ = std::fs::remove_file(d.join(img));
        image_with_bitmaps(d, img, None);
        let entry = first_dir_entry(&d.join(img));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join(img))
            .unwrap();
        f.seek(SeekFrom::Start(entry + field)).unwrap();
        f.write_all(bytes).unwrap();
        drop(f);
        strata(
            d,
            &["convert", "-n", "-f", "raw", "-O", "qcow2", "src.raw", img],
        );
        let info = Command::new("qemu-img")
            .args(["info", "--output=json", img])
            .current_dir(d)
            .output()
            .unwrap();
        assert!(info.status.success(), "{what}: QEMU cannot open the image");
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(
            !text.contains("\"bitmaps\""),
            "{what}: bitmaps still trusted\n{text}"
        );
        run(
            d,
            "qemu-img",
            &["compare", "-f", "raw", "-F", "qcow2", "src.raw", img],
        );
    }
}

/// Each case: qemu-img bitmap's arguments (the image and bitmap name follow).
const BITMAP_CASES: &[(&[&str], &str)] = &[
    (&["--add"], "n1"),
    (&["--add", "-g", "512", "--disable"], "n1"),
    (&["--add", "-g", "2M"], "n1"),
    (&["--remove"], "b1"),
    (&["--clear"], "b2"),
    (&["--enable"], "b2"),
    (&["--disable"], "b1"),
    (&["--merge", "b2"], "b1"),
    (&["--merge", "b1"], "b2"),
    (&["--add", "--merge", "b2"], "n"),
    (&["--add", "-g", "1M", "--merge", "b1"], "n"),
    (&["--add", "-g", "4k", "--merge", "b1"], "n"),
    (&["--merge", "ob", "-b", "other.qcow2", "-F", "qcow2"], "b2"),
    (&["--remove", "--add"], "b1"),
    // Failing operations: those before them stay done.
    (&["--add"], "b1"),
    (&["--remove"], "nope"),
    (&["--add", "--add"], "x"),
    (&["--clear", "--remove", "--remove"], "b2"),
    (&["--merge", "nope"], "b1"),
    (&["--add", "-g", "4G"], "n"),
    (&["--add"], ""),
];

/// Refusals before the image is touched, as qemu-img words them.
const BITMAP_REFUSALS: &[&[&str]] = &[
    &["bitmap", "a.qcow2", "b1"],
    &["bitmap", "--add", "a.qcow2"],
    &["bitmap", "-g", "4k", "--clear", "a.qcow2", "b1"],
    &["bitmap", "-b", "x", "--clear", "a.qcow2", "b1"],
    &["bitmap", "-F", "qcow2", "--clear", "a.qcow2", "b1"],
    &["bitmap", "-U", "--clear", "a.qcow2", "b1"],
    &["bitmap", "--add=x", "a.qcow2", "b1"],
    &["bitmap", "--add", "-g", "abc", "a.qcow2", "n"],
    &[
        "bitmap",
        "--merge",
        "x",
        "-b",
        "missing.qcow2",
        "a.qcow2",
        "b1",
    ],
    &["bitmap", "--add", "missing.qcow2", "n"],
];

#[test]
fn bitmap_prints_and_leaves_what_qemu_img_bitmap_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    image_with_bitmaps(d, "a.qcow2", None);
    run(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "other.qcow2", "64M"],
    );
    run(
        d,
        "qemu-img",
        &["bitmap", "--add", "-g", "4k", "other.qcow2", "ob"],
    );
    run(d, "qemu-io", &["-c", "write 30M 12k", "other.qcow2"]);
    for (n, (args, name)) in BITMAP_CASES.iter().enumerate() {
        let what = format!("bitmap {args:?} {name}");
        let (ours, theirs) = common::same_on_copies(d, n, "a.qcow2", "bitmap", args, &[*name]);
        common::same_image(d, &ours, &theirs, &what);
        let names = |f: &str| -> Vec<String> {
            let info = run(d, "qemu-img", &["info", "--output=json", f]);
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            v["format-specific"]["data"]["bitmaps"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|b| b["name"].as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        for b in names(&theirs) {
            let (o, t) = (dirty(d, &ours, &b), dirty(d, &theirs, &b));
            if o != t {
                common::differs(format!(
                    "{what}: bits of {b}\n  strata:   {o:?}\n  qemu-img: {t:?}"
                ));
            }
        }
    }
    for args in BITMAP_REFUSALS {
        common::same(d, args);
    }
    common::assert_all_same();
}

#[test]
fn convert_bitmaps_copies_every_bitmap_with_its_bits_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::qcow2(d, "src.qcow2", "64M", &[]);
    run(d, "qemu-img", &["bitmap", "--add", "src.qcow2", "b1"]);
    run(
        d,
        "qemu-img",
        &["bitmap", "--add", "-g", "1M", "src.qcow2", "off"],
    );
    common::io(
        d,
        "qcow2",
        "src.qcow2",
        &["write -P 1 0 4k", "write -P 2 9M 70k"],
    );
    run(d, "qemu-img", &["bitmap", "--disable", "src.qcow2", "off"]);
    common::io(d, "qcow2", "src.qcow2", &["write -P 3 40M 64k"]);
    strata(
        d,
        &[
            "convert",
            "-O",
            "qcow2",
            "--bitmaps",
            "src.qcow2",
            "out.qcow2",
        ],
    );
    sound(d, "out.qcow2", "convert --bitmaps");
    common::verify(d, "src.qcow2", "out.qcow2");
    for name in ["b1", "off"] {
        assert_eq!(
            dirty(d, "out.qcow2", name),
            dirty(d, "src.qcow2", name),
            "bitmap {name}"
        );
    }
    assert!(!dirty(d, "out.qcow2", "b1").is_empty());
    // Names, granularities and the enabled flag as QEMU reads them.
    let bitmaps = |f: &str| {
        let info = run(d, "qemu-img", &["info", "--output=json", f]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        v["format-specific"]["data"]["bitmaps"].clone()
    };
    assert_eq!(bitmaps("out.qcow2"), bitmaps("src.qcow2"));
}
