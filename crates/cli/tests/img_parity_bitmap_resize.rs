//! `resize` of images holding persistent dirty bitmaps: qemu-img keeps every
//! bitmap's bits (a shrink drops those past the new end, a growth adds clean
//! ones), stores the set anew when it closes the image, and refuses to resize
//! an image with a bitmap marked in use (the other bitmaps are still stored
//! anew). Both tools run the same command on copies of the same image; they
//! must print the same, leave the same bytes, and QEMU must see the same
//! `info`, `check` and bitmap contents in both.

mod common;

use common::{
    assert_all_same, differs, io, outcome, qcow2, qemu_views, same_bytes, same_on_copies, sh,
};
use std::path::Path;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Offset and entry count of the bitmap directory of the qcow2 file `b`.
fn directory(b: &[u8]) -> Option<(usize, u32)> {
    let mut at = be32(b, 100) as usize;
    loop {
        let (kind, len) = (be32(b, at), be32(b, at + 4) as usize);
        match kind {
            0 => return None,
            0x2385_2875 => return Some((be64(b, at + 24) as usize, be32(b, at + 8))),
            _ => at += 8 + len.next_multiple_of(8),
        }
    }
}

/// Every bitmap of the qcow2 file `f` as its directory and tables give it:
/// name, flags, granularity, and the dirty guest ranges `(start, length)`.
fn bitmap_dump(dir: &Path, f: &str) -> String {
    let b = std::fs::read(dir.join(f)).unwrap();
    let cs = 1usize << be32(&b, 20);
    let Some((mut at, n)) = directory(&b) else {
        return "no bitmaps\n".into();
    };
    let mut out = String::new();
    for _ in 0..n {
        let (table, size, flags) = (be64(&b, at) as usize, be32(&b, at + 8), be32(&b, at + 12));
        let gran = 1u64 << b[at + 17];
        let name_size = u16::from_be_bytes([b[at + 18], b[at + 19]]) as usize;
        let extra = be32(&b, at + 20) as usize;
        let name = String::from_utf8_lossy(&b[at + 24 + extra..at + 24 + extra + name_size]);
        at += (24 + extra + name_size).next_multiple_of(8);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for j in 0..size as usize {
            let e = be64(&b, table + 8 * j);
            let off = (e & 0x00ff_ffff_ffff_fe00) as usize;
            for k in 0..cs * 8 {
                let set = if off != 0 {
                    b[off + k / 8] & (1 << (k % 8)) != 0
                } else {
                    e & 1 != 0
                };
                if !set {
                    continue;
                }
                let start = ((j * cs * 8 + k) as u64) * gran;
                match runs.last_mut() {
                    Some(r) if r.0 + r.1 == start => r.1 += gran,
                    _ => runs.push((start, gran)),
                }
            }
        }
        out += &format!("{name} flags {flags:#x} granularity {gran} table {size}: {runs:?}\n");
    }
    out
}

/// The copies left by [`same_on_copies`] are the same bytes and look the same
/// to QEMU, bitmap contents included.
fn alike(dir: &Path, (ours, theirs): (String, String), what: &str) {
    let (v_ours, v_theirs) = (qemu_views(dir, &ours), qemu_views(dir, &theirs));
    if v_ours != v_theirs {
        differs(format!("{what}: views\n{v_ours}\n---\n{v_theirs}"));
    }
    let (d_ours, d_theirs) = (bitmap_dump(dir, &ours), bitmap_dump(dir, &theirs));
    if d_ours != d_theirs {
        differs(format!("{what}: bitmaps\n{d_ours}---\n{d_theirs}"));
    }
    same_bytes(dir, &ours, &theirs, what);
}

/// A 64 MiB image of `cluster` clusters with three bitmaps added and dirtied
/// by QEMU: `d1m` (1 MiB granularity, dirty then disabled), `e64k` (64 KiB,
/// enabled) and `f512` (512 bytes, enabled), dirty up to near the end.
fn with_bitmaps(dir: &Path, name: &str, cluster: &str) {
    qcow2(
        dir,
        name,
        "64M",
        &["-o", &format!("cluster_size={cluster}")],
    );
    sh(
        dir,
        "qemu-img",
        &["bitmap", "--add", "-g", "1M", name, "d1m"],
    );
    io(dir, "qcow2", name, &["write -P 1 3M 4k"]);
    sh(dir, "qemu-img", &["bitmap", "--disable", name, "d1m"]);
    sh(
        dir,
        "qemu-img",
        &["bitmap", "--add", "-g", "64K", name, "e64k"],
    );
    sh(
        dir,
        "qemu-img",
        &["bitmap", "--add", "-g", "512", name, "f512"],
    );
    io(
        dir,
        "qcow2",
        name,
        &[
            "write -P 2 0 1M",
            "write -P 3 40M 512",
            "write -P 4 63M 64k",
        ],
    );
}

/// Set the in-use flag of the `index`th entry of the bitmap directory of `f`
/// (what a program that had the bitmap open and stopped leaves).
fn mark_in_use(dir: &Path, f: &str, index: usize) {
    let path = dir.join(f);
    let mut b = std::fs::read(&path).unwrap();
    let (mut at, _) = directory(&b).unwrap();
    for _ in 0..index {
        let (name_size, extra) = (
            u16::from_be_bytes([b[at + 18], b[at + 19]]),
            be32(&b, at + 20),
        );
        at += (24 + extra as usize + name_size as usize).next_multiple_of(8);
    }
    b[at + 15] |= 1;
    std::fs::write(&path, b).unwrap();
}

#[test]
fn resize_keeps_bitmap_bits_and_stores_them_as_qemu_img_does() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let cases: &[&[&str]] = &[
        &["+64M"],
        &["--shrink", "32M"],
        &["--shrink", "60M"],
        &["--shrink", "-2M"],
        &["64M"],
        &["32M"],
        &["67109000"],
        &["--preallocation=metadata", "100M"],
        &["--preallocation=full", "+1M"],
        &["--preallocation=falloc", "--shrink", "32M"],
    ];
    let mut n = 0;
    for cluster in ["512", "64K", "2M"] {
        let img = format!("c{cluster}.qcow2");
        with_bitmaps(d, &img, cluster);
        for args in cases {
            n += 1;
            let (size, opts) = args.split_last().unwrap();
            let copies = same_on_copies(d, n, &img, "resize", opts, &[size]);
            alike(d, copies, &format!("resize {args:?} ({cluster} clusters)"));
        }
    }
    assert_all_same();
}

#[test]
fn resize_with_a_bitmap_in_use_is_refused_as_qemu_img_refuses_it() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    with_bitmaps(d, "iu.qcow2", "64K");
    mark_in_use(d, "iu.qcow2", 1);
    let cases: &[&[&str]] = &[&["+64M"], &["--shrink", "32M"], &["64M"], &["32M"]];
    for (n, args) in cases.iter().enumerate() {
        let (size, opts) = args.split_last().unwrap();
        let copies = same_on_copies(d, n, "iu.qcow2", "resize", opts, &[size]);
        alike(d, copies, &format!("resize {args:?} (bitmap in use)"));
    }
    assert_all_same();
}

#[test]
fn growing_over_a_longer_backing_file_leaves_the_grown_range_clean_as_qemu_img_does() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    qcow2(d, "base.qcow2", "128M", &[]);
    io(d, "qcow2", "base.qcow2", &["write -P 7 0 128M"]);
    sh(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "64M",
        ],
    );
    sh(d, "qemu-img", &["bitmap", "--add", "top.qcow2", "e"]);
    io(d, "qcow2", "top.qcow2", &["write -P 1 1M 64k"]);
    let cases: &[&[&str]] = &[&["128M"], &["--preallocation=metadata", "100M"]];
    for (n, args) in cases.iter().enumerate() {
        let (size, opts) = args.split_last().unwrap();
        let copies = same_on_copies(d, n, "top.qcow2", "resize", opts, &[size]);
        alike(d, copies, &format!("resize {args:?} (longer backing file)"));
    }
    assert_all_same();
}

#[test]
fn bitmap_remove_leaves_the_file_qemu_img_leaves() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    with_bitmaps(d, "r.qcow2", "64K");
    qcow2(d, "one.qcow2", "64M", &[]);
    sh(d, "qemu-img", &["bitmap", "--add", "one.qcow2", "only"]);
    io(d, "qcow2", "one.qcow2", &["write -P 1 0 64k"]);
    let cases: &[(&str, &[&str], &str)] = &[
        ("r.qcow2", &["--remove"], "e64k"),
        ("r.qcow2", &["--remove"], "d1m"),
        ("r.qcow2", &["--remove"], "f512"),
        ("r.qcow2", &["--remove", "--add"], "f512"),
        ("r.qcow2", &["--add", "--remove"], "new"),
        ("r.qcow2", &["--remove", "--clear"], "e64k"),
        ("r.qcow2", &["--disable", "--remove"], "e64k"),
        ("r.qcow2", &["--remove"], "nope"),
        ("one.qcow2", &["--remove"], "only"),
    ];
    for (n, (img, args, name)) in cases.iter().enumerate() {
        let copies = same_on_copies(d, n, img, "bitmap", args, &[name]);
        alike(d, copies, &format!("bitmap {args:?} {name} ({img})"));
    }
    assert_all_same();
}

#[test]
fn bitmap_long_options_may_be_abbreviated_as_getopt_allows() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    with_bitmaps(d, "p.qcow2", "64K");
    let cases: &[(&[&str], &[&str])] = &[
        (&["--ad"], &["x"]),
        (&["--a", "--gran=1M"], &["x"]),
        (&["--gr", "4k", "--add"], &["x"]),
        (&["--rem"], &["e64k"]),
        (&["--ena"], &["d1m"]),
        (&["--e"], &["d1m"]),
        (&["--d"], &["e64k"]),
        (&["--dis"], &["e64k"]),
        (&["--c"], &["e64k"]),
        (&["--m=d1m"], &["e64k"]),
        (&["--mer", "d1m"], &["e64k"]),
        (&["--m", "d1m", "--so", "p.qcow2"], &["e64k"]),
        (&["--m", "d1m", "--source-fi=p.qcow2"], &["e64k"]),
        (
            &["--m", "d1m", "-b", "p.qcow2", "--source-fo=qcow2"],
            &["e64k"],
        ),
        (&["--s=x", "--add"], &["x"]),
        (&["--source", "x", "--add"], &["x"]),
        (&["--source-f=x", "--add"], &["x"]),
        (&["--add"], &["x", "--me"]),
        (&["--add"], &["x", "--so"]),
        (&["--ad=x"], &["x"]),
        (&["--add="], &["x"]),
        (&["--x"], &["x"]),
        (&["--x=1", "--add"], &["x"]),
        (&["--format", "qcow2", "--add"], &["x"]),
        (&["--f", "qcow2", "--add"], &["x"]),
        (&["--g"], &["x"]),
    ];
    for (n, (args, after)) in cases.iter().enumerate() {
        let copies = same_on_copies(d, n, "p.qcow2", "bitmap", args, after);
        alike(d, copies, &format!("bitmap {args:?} IMG {after:?}"));
    }
    // --i is --image-opts: the file is named by an option list.
    let copies = common::same_on_named_copies(d, 99, "p.qcow2", "bitmap --i --add", &|f| {
        [
            "bitmap",
            "--i",
            "--add",
            &format!("driver=qcow2,file.filename={f}"),
            "x",
        ]
        .map(String::from)
        .to_vec()
    });
    alike(d, copies, "bitmap --i --add");
    // A prefix of --help asks for the help text (its wording is strata's own).
    for h in ["--h", "--he", "--help"] {
        let (code, out, _) = outcome(d, "strata", &["bitmap", h, "p.qcow2", "x"]);
        assert_eq!(code, Some(0), "{h}");
        assert!(out.contains("bitmap"), "{h}: {out}");
    }
    assert_all_same();
}
