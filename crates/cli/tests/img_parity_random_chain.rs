//! A seeded random sweep of the chain and metadata subcommands (`snapshot`,
//! `bitmap`, `rebase`, `commit`): each usage is built from the options qemu-img
//! documents, spelled as users spell them (short and long forms, `--opt=value`,
//! repeated and permuted options, `--object secret`, `--image-opts`, `json:`,
//! odd values and missing or extra arguments), over one fixture directory of
//! images of every kind (raw, qcow2 v2/v3, extended L2, compressed and zero
//! clusters, chains of 2 to 4 with raw, v2, extended-L2 and luks members,
//! internal snapshots, bitmaps, luks, an external data file, sizes that differ).
//! Each usage runs with strata and with qemu-img in their own copies of the
//! directory; what they print and how they exit must be the same, and every
//! file left must be byte-equal (or, after `snapshot -c`, whose snapshot holds
//! the time it was taken, alike in qemu-img's views).
//!
//! The seed and the number of usages are fixed; `STRATA_SWEEP_SEED` and
//! `STRATA_SWEEP_N` (or `SWEEP_SEED`, `SWEEP_N`) run other sweeps locally. Rows in [`PINNED`] are fixed usages
//! that once differed.

mod common;

use common::rng::{sweep_var, Draw, Rng};
use common::{assert_all_same, copy_dir, differs, io, map_json, outcome, qcow2, qemu_views, sh};
use std::path::Path;

const SECRET: &str = "--object secret,id=sec0,file=key.txt";

/// The images of the fixture, made with QEMU's own tools in `dir`.
fn fixture(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("key.txt"), "hunter2").unwrap();
    let img = |args: &[&str]| sh(dir, "qemu-img", args);
    img(&["create", "-q", "-f", "raw", "raw.img", "1M"]);
    io(dir, "raw", "raw.img", &["write -P 0x11 0 64k"]);
    qcow2(dir, "v2.qcow2", "1M", &["-o", "compat=0.10"]);
    io(
        dir,
        "qcow2",
        "v2.qcow2",
        &["write -P 0x12 0 64k", "write -z 128k 64k"],
    );
    qcow2(dir, "v3.qcow2", "1M", &[]);
    io(
        dir,
        "qcow2",
        "v3.qcow2",
        &[
            "write -P 0x13 0 64k",
            "write -z 128k 64k",
            "write -c -P 0x33 256k 64k",
        ],
    );
    qcow2(dir, "el2.qcow2", "1M", &["-o", "extended_l2=on"]);
    io(
        dir,
        "qcow2",
        "el2.qcow2",
        &["write -P 0x14 0 4k", "write -z 64k 8k"],
    );
    // base <- mid <- top <- t4: a chain of four.
    qcow2(dir, "base.qcow2", "1M", &[]);
    io(dir, "qcow2", "base.qcow2", &["write -P 0xaa 0 512k"]);
    qcow2(dir, "mid.qcow2", "1M", &["-b", "base.qcow2", "-F", "qcow2"]);
    io(
        dir,
        "qcow2",
        "mid.qcow2",
        &["write -P 0xbb 64k 64k", "write -z 256k 64k"],
    );
    qcow2(dir, "top.qcow2", "1M", &["-b", "mid.qcow2", "-F", "qcow2"]);
    io(dir, "qcow2", "top.qcow2", &["write -P 0xcc 96k 64k"]);
    qcow2(dir, "t4.qcow2", "1M", &["-b", "top.qcow2", "-F", "qcow2"]);
    io(dir, "qcow2", "t4.qcow2", &["write -P 0xdd 768k 64k"]);
    // Overlays over a raw, a v2, an extended-L2 and a smaller base.
    qcow2(dir, "rov.qcow2", "1M", &["-b", "raw.img", "-F", "raw"]);
    io(dir, "qcow2", "rov.qcow2", &["write -P 0xee 32k 4k"]);
    qcow2(
        dir,
        "v2ov.qcow2",
        "1M",
        &["-o", "compat=0.10", "-b", "v2.qcow2", "-F", "qcow2"],
    );
    io(dir, "qcow2", "v2ov.qcow2", &["write -P 0x22 192k 64k"]);
    qcow2(
        dir,
        "elov.qcow2",
        "1M",
        &["-o", "extended_l2=on", "-b", "el2.qcow2", "-F", "qcow2"],
    );
    io(dir, "qcow2", "elov.qcow2", &["write -P 0x77 4k 4k"]);
    qcow2(dir, "small.qcow2", "256k", &[]);
    io(dir, "qcow2", "small.qcow2", &["write -P 0x55 0 256k"]);
    qcow2(
        dir,
        "big.qcow2",
        "1M",
        &["-b", "small.qcow2", "-F", "qcow2"],
    );
    io(dir, "qcow2", "big.qcow2", &["write -P 0x66 128k 256k"]);
    qcow2(dir, "zero.qcow2", "0", &[]);
    qcow2(dir, "zov.qcow2", "0", &["-b", "zero.qcow2", "-F", "qcow2"]);
    // Internal snapshots (taken once: both tools see the same times).
    qcow2(dir, "snap.qcow2", "1M", &[]);
    io(dir, "qcow2", "snap.qcow2", &["write -P 0x01 0 64k"]);
    img(&["snapshot", "-c", "s1", "snap.qcow2"]);
    io(dir, "qcow2", "snap.qcow2", &["write -P 0x02 64k 64k"]);
    img(&["snapshot", "-c", "s2", "snap.qcow2"]);
    img(&["snapshot", "-c", "2", "snap.qcow2"]);
    io(dir, "qcow2", "snap.qcow2", &["write -P 0x03 0 4k"]);
    // Persistent bitmaps, one enabled, one disabled, one of 4k granularity.
    qcow2(dir, "bm.qcow2", "1M", &[]);
    img(&["bitmap", "--add", "bm.qcow2", "b0"]);
    img(&["bitmap", "--add", "--disable", "bm.qcow2", "b1"]);
    img(&["bitmap", "--add", "-g", "4k", "bm.qcow2", "b2"]);
    io(dir, "qcow2", "bm.qcow2", &["write -P 0x04 0 64k"]);
    qcow2(dir, "bm2.qcow2", "1M", &[]);
    img(&["bitmap", "--add", "bm2.qcow2", "b0"]);
    io(dir, "qcow2", "bm2.qcow2", &["write -P 0x05 512k 64k"]);
    // luks in qcow2, and an overlay over it.
    let luks = [
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
    ];
    let mut a = vec![
        "create",
        "-q",
        "--object",
        "secret,id=sec0,file=key.txt",
        "-f",
        "qcow2",
    ];
    a.extend_from_slice(&luks);
    a.extend_from_slice(&["luks.qcow2", "1M"]);
    img(&a);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "luks.qcow2",
        "-F",
        "qcow2",
        "lov.qcow2",
        "1M",
    ]);
    for (cmd, opts) in [
        (
            "write -P 0x43 0 64k",
            "driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=sec0",
        ),
        (
            "write -P 0x44 0 4k",
            "driver=qcow2,file.filename=lov.qcow2,backing.encrypt.key-secret=sec0",
        ),
    ] {
        let secret = "secret,id=sec0,file=key.txt";
        sh(
            dir,
            "qemu-io",
            &["--object", secret, "--image-opts", "-c", cmd, opts],
        );
    }
    // An external data file.
    qcow2(dir, "df.qcow2", "1M", &["-o", "data_file=df.raw"]);
    io(dir, "qcow2", "df.qcow2", &["write -P 0x0d 0 64k"]);
}

/// Every image of the fixture (and a name that is none).
const IMAGES: &[&str] = &[
    "raw.img",
    "v2.qcow2",
    "v3.qcow2",
    "el2.qcow2",
    "base.qcow2",
    "mid.qcow2",
    "top.qcow2",
    "t4.qcow2",
    "rov.qcow2",
    "v2ov.qcow2",
    "elov.qcow2",
    "small.qcow2",
    "big.qcow2",
    "zero.qcow2",
    "zov.qcow2",
    "snap.qcow2",
    "bm.qcow2",
    "bm2.qcow2",
    "luks.qcow2",
    "lov.qcow2",
    "df.qcow2",
    "nonexist.qcow2",
];

/// Images with a backing file, for commit and rebase.
const OVERLAYS: &[&str] = &[
    "mid.qcow2",
    "top.qcow2",
    "t4.qcow2",
    "rov.qcow2",
    "v2ov.qcow2",
    "elov.qcow2",
    "big.qcow2",
    "zov.qcow2",
    "lov.qcow2",
];

/// An argument list under construction: groups (an option with its value)
/// are kept together when the order is shuffled.
#[derive(Default)]
struct Usage {
    groups: Vec<Vec<String>>,
}

impl Usage {
    fn add(&mut self, words: &[&str]) {
        self.groups
            .push(words.iter().map(|s| s.to_string()).collect());
    }
    /// `-x V`, `-xV`, `--long V` or `--long=V` at random.
    fn opt(&mut self, r: &mut Rng, short: &str, long: &str, v: &str) {
        match r.below(4) {
            0 if !short.is_empty() && !v.is_empty() => self.add(&[&format!("{short}{v}")]),
            1 => self.add(&[long, v]),
            2 => self.add(&[&format!("{long}={v}")]),
            _ if short.is_empty() => self.add(&[long, v]),
            _ => self.add(&[short, v]),
        }
    }
    /// A flag, short or long at random.
    fn flag(&mut self, r: &mut Rng, short: &str, long: &str) {
        if short.is_empty() || r.one_in(3) {
            self.add(&[long]);
        } else {
            self.add(&[short]);
        }
    }
    /// The subcommand, then the groups in a shuffled order when `shuffle`,
    /// the image last (or, once in a while, first).
    fn finish(mut self, r: &mut Rng, sub: &str, tail: Vec<String>) -> Vec<String> {
        if r.one_in(2) {
            for i in (1..self.groups.len()).rev() {
                let j = r.below(i + 1);
                self.groups.swap(i, j);
            }
        }
        let mut out = vec![sub.to_string()];
        let front = r.one_in(8);
        if front {
            out.extend(tail.iter().cloned());
        }
        out.extend(self.groups.into_iter().flatten());
        if !front {
            out.extend(tail);
        }
        out
    }
}

/// The image named as users name it: a file name (with `-f` now and then),
/// `--image-opts` or a `json:` name; luks images get their secret.
fn name_image(r: &mut Rng, u: &mut Usage, img: &str, odd_format: bool) -> String {
    let luks = img.starts_with("luks") || img.starts_with("lov");
    let fmt = if img.ends_with(".img") {
        "raw"
    } else {
        "qcow2"
    };
    if luks && !r.one_in(5) {
        u.groups.push(SECRET.split(' ').map(String::from).collect());
    }
    let key = if img.starts_with("luks") {
        ",encrypt.key-secret=sec0"
    } else if img.starts_with("lov") {
        ",backing.encrypt.key-secret=sec0"
    } else {
        ""
    };
    match r.below(10) {
        0 | 1 => {
            u.add(&["--image-opts"]);
            format!("driver={fmt},file.filename={img}{key}")
        }
        2 => {
            let key = key.replace(",backing.encrypt.key-secret=sec0", "");
            let key = if key.is_empty() {
                String::new()
            } else {
                r#","encrypt.key-secret":"sec0""#.to_string()
            };
            format!(
                r#"json:{{"driver":"{fmt}"{key},"file":{{"driver":"file","filename":"{img}"}}}}"#
            )
        }
        3 | 4 => {
            let odd = odd_format && r.one_in(6);
            let f = if odd {
                r.pick(&["raw", "qcow2", "vmdk", "bogus"])
            } else {
                fmt
            };
            u.opt(r, "-f", "--format", f);
            if key.is_empty() || !r.one_in(2) {
                img.to_string()
            } else {
                u.add(&["--image-opts"]);
                format!("driver={f},file.filename={img}{key}")
            }
        }
        _ => img.to_string(),
    }
}

/// Rarely, an option qemu-img does not take for this subcommand, or a missing
/// or an extra argument.
fn odd(r: &mut Rng, u: &mut Usage, tail: &mut Vec<String>) {
    match r.below(40) {
        0 => u.add(&["-Z"]),
        1 => u.add(&["--bogus"]),
        2 => tail.clear(),
        3 => tail.push("extra".into()),
        _ => {}
    }
}

fn snapshot(r: &mut Rng) -> Vec<String> {
    let mut u = Usage::default();
    let img = if r.one_in(2) {
        "snap.qcow2"
    } else {
        r.pick(IMAGES)
    };
    let name = r.pick(&[
        "s1",
        "s2",
        "1",
        "2",
        "3",
        "new",
        "s 1",
        "",
        "x".repeat(40).leak(),
        "y".repeat(300).leak(),
        "s1,x",
    ]);
    let actions = 1 + usize::from(r.one_in(10));
    for _ in 0..actions {
        // qemu-img 10 declares --create, --apply and --delete without a value
        // (see snapshot.rs); as users type them, `--apply NAME` and
        // `--apply=NAME`. Left out: `--create IMG` and `--delete IMG` with no
        // name at all, where qemu-img crashes (SIGSEGV) and strata refuses.
        let (short, long) = match r.below(5) {
            0 => {
                u.flag(r, "-l", "--list");
                continue;
            }
            1 => ("-c", "--create"),
            2 => ("-a", "--apply"),
            3 => ("-d", "--delete"),
            _ => continue,
        };
        // Left out: an empty name after a long form, an empty file name
        // argument that strata refuses as a missing option value where
        // qemu-img counts it as a second file name.
        if name.is_empty() {
            u.add(&[short, ""]);
        } else {
            u.opt(r, short, long, name);
        }
    }
    if r.one_in(4) {
        u.flag(r, "-U", "--force-share");
    }
    if r.one_in(4) {
        u.flag(r, "-q", "--quiet");
    }
    let mut tail = vec![name_image(r, &mut u, img, true)];
    odd(r, &mut u, &mut tail);
    u.finish(r, "snapshot", tail)
}

fn bitmap(r: &mut Rng) -> Vec<String> {
    let mut u = Usage::default();
    let img = if r.one_in(3) {
        r.pick(IMAGES)
    } else {
        r.pick(&["bm.qcow2", "bm2.qcow2", "v3.qcow2"])
    };
    let name = r.pick(&["b0", "b1", "b2", "new", "", "b 0", "x".repeat(1100).leak()]);
    for _ in 0..1 + r.below(3) {
        match r.below(7) {
            0 | 1 => u.add(&["--add"]),
            2 => u.add(&["--remove"]),
            3 => u.add(&["--clear"]),
            4 => u.add(&["--enable"]),
            5 => u.add(&["--disable"]),
            _ => {
                let src = r.pick(&["b0", "b1", "b2", "nosuch"]);
                u.opt(r, "", "--merge", src);
                if r.one_in(2) {
                    let file = r.pick(&[
                        "bm2.qcow2",
                        "bm.qcow2",
                        "v3.qcow2",
                        "raw.img",
                        "nonexist.qcow2",
                    ]);
                    u.opt(r, "-b", "--source-file", file);
                    if r.one_in(2) {
                        let fmt = r.pick(&["qcow2", "raw", "bogus"]);
                        u.opt(r, "-F", "--source-format", fmt);
                    }
                }
            }
        }
    }
    if r.one_in(3) {
        let g = r.pick(&[
            "64k", "512", "4096", "1M", "2G", "4G", "0", "63k", "abc", "1.5k", "-1", "128K",
            "65536",
        ]);
        u.opt(r, "-g", "--granularity", g);
    }
    // Left out: a qcow2 image opened with -f raw. qemu-img opens it and
    // fails the operation ("Operation add on bitmap b0 failed: Can't store
    // persistent bitmaps to #block112: Operation not supported", a node name
    // that changes from run to run; "Dirty bitmap 'b0' not found" for the
    // others); strata refuses the format first.
    let mut tail = vec![name_image(r, &mut u, img, false), name.to_string()];
    odd(r, &mut u, &mut tail);
    u.finish(r, "bitmap", tail)
}

fn cache(r: &mut Rng, u: &mut Usage, short: &str, long: &str) {
    if r.one_in(5) {
        let mode = r.pick(&[
            "none",
            "writeback",
            "unsafe",
            "directsync",
            "writethrough",
            "bogus",
        ]);
        u.opt(r, short, long, mode);
    }
}

fn rebase(r: &mut Rng) -> Vec<String> {
    let mut u = Usage::default();
    let img = if r.one_in(5) {
        r.pick(IMAGES)
    } else {
        r.pick(OVERLAYS)
    };
    let unsafe_mode = r.one_in(3);
    if unsafe_mode {
        u.flag(r, "-u", "--backing-unsafe");
    }
    if !r.one_in(10) {
        let b = r.pick(&[
            "base.qcow2",
            "mid.qcow2",
            "top.qcow2",
            "",
            "raw.img",
            "v2.qcow2",
            "el2.qcow2",
            "small.qcow2",
            "./base.qcow2",
            "nonexist.qcow2",
            "luks.qcow2",
            "bm.qcow2",
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}"#,
        ]);
        // Left out: -u onto the image itself or an overlay of it. qemu-img
        // writes the loop (exit 0, an image nothing opens again); strata
        // refuses it as safe mode does (see output_safety.rs). The backing
        // file is removed instead.
        let file = if b.starts_with("json:") {
            "base.qcow2"
        } else {
            b.trim_start_matches("./")
        };
        let chain = ["base.qcow2", "mid.qcow2", "top.qcow2"];
        let at = |f: &str| chain.iter().position(|c| *c == f);
        let looped = file == img || matches!((at(img), at(file)), (Some(i), Some(j)) if j >= i);
        let b = if looped && unsafe_mode { "" } else { b };
        u.opt(r, "-b", "--backing", b);
        if !r.one_in(4) {
            let f = if b.ends_with(".img") { "raw" } else { "qcow2" };
            let f = if r.one_in(8) {
                r.pick(&["raw", "qcow2", "vmdk", "bogus"])
            } else {
                f
            };
            u.opt(r, "-F", "--backing-format", f);
        }
    }
    for (short, long, n) in [
        ("-c", "--compress", 6),
        ("-p", "--progress", 6),
        ("-q", "--quiet", 4),
        ("-U", "--force-share", 8),
    ] {
        if r.one_in(n) {
            u.flag(r, short, long);
        }
    }
    cache(r, &mut u, "-t", "--cache");
    cache(r, &mut u, "-T", "--backing-cache");
    let mut tail = vec![name_image(r, &mut u, img, true)];
    odd(r, &mut u, &mut tail);
    u.finish(r, "rebase", tail)
}

fn commit(r: &mut Rng) -> Vec<String> {
    let mut u = Usage::default();
    let img = if r.one_in(6) {
        r.pick(IMAGES)
    } else {
        r.pick(OVERLAYS)
    };
    if r.one_in(3) {
        let b = r.pick(&[
            "base.qcow2",
            "mid.qcow2",
            "top.qcow2",
            "raw.img",
            "nonexist.qcow2",
            "./base.qcow2",
            "small.qcow2",
            "t4.qcow2",
        ]);
        u.opt(r, "-b", "--base", b);
    }
    // Left out: -p. qemu-img prints its block job's figure each time its
    // loop polls the job, a number of `(0.00/100%)` lines that changes from
    // run to run of qemu-img itself.
    for (short, long, n) in [("-d", "--drop", 3), ("-q", "--quiet", 4)] {
        if r.one_in(n) {
            u.flag(r, short, long);
        }
    }
    if r.one_in(5) {
        // Left out: rates of a few bytes a second (`-r 100`, `-r 1k`). Both
        // tools keep to them: a commit of one 64k cluster then sleeps for
        // minutes in qemu-img as in strata.
        let rate = r.pick(&["0", "1M", "1G", "-1", "abc", "2M", "10M", "1.5M", "16E"]);
        u.opt(r, "-r", "--rate", rate);
    }
    cache(r, &mut u, "-t", "--cache");
    let mut tail = vec![name_image(r, &mut u, img, true)];
    odd(r, &mut u, &mut tail);
    u.finish(r, "commit", tail)
}

/// One usage from `r`.
fn usage(r: &mut Rng) -> Vec<String> {
    match r.below(4) {
        0 => snapshot(r),
        1 => bitmap(r),
        2 => rebase(r),
        _ => commit(r),
    }
}

/// Run `args` with each tool in its own copy of `fx` and record any difference
/// in what they print or in the files they leave.
fn compare(fx: &Path, n: usize, args: &[String]) {
    let parent = fx.parent().unwrap();
    let dirs = [parent.join(format!("o{n}")), parent.join(format!("t{n}"))];
    for d in &dirs {
        copy_dir(fx, d);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let what = format!("#{n} `img {}`", shell_words(args));
    let ours = node_masked(outcome(&dirs[0], "strata", &a));
    let theirs = node_masked(outcome(&dirs[1], "qemu-img", &a));
    // qemu-img 10 aborts on an assertion of its own in some usages (rebase -c
    // onto an extended-L2 image whose subclusters are allocated in part:
    // `img_rebase: Assertion ... failed`): nothing to compare with.
    if theirs.0.is_none() && theirs.2.contains(": Assertion `") {
        for d in &dirs {
            std::fs::remove_dir_all(d).unwrap();
        }
        return;
    }
    if ours != theirs {
        differs(format!(
            "{what}\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
        ));
    }
    // A new snapshot holds the time it was taken: compared as QEMU sees it.
    let timed = args[0] == "snapshot"
        && args
            .iter()
            .any(|a| a.starts_with("-c") || a.starts_with("--c"));
    // qemu-img rebase -c compresses the clusters of one write in parallel:
    // their order in the file changes from run to run of qemu-img itself.
    let racy = args[0] == "rebase" && args.iter().any(|a| a == "-c" || a == "--compress");
    let mut names: Vec<String> = std::fs::read_dir(&dirs[1])
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for f in names {
        let (o, t) = (dirs[0].join(&f), dirs[1].join(&f));
        let Ok(bytes) = std::fs::read(&o) else {
            differs(format!("{what}: strata left no {f}"));
            continue;
        };
        if bytes == std::fs::read(&t).unwrap() {
            continue;
        }
        if racy && alike(&dirs, &f) {
            continue;
        }
        // snapshot -c/-a/-d on a version 2 image: strata keeps its header
        // switch there, a crash-safe layout QEMU's in-place order cannot give
        // without a dirty bit (see format's snapshot_switch): the files differ
        // by design, so they are compared as QEMU sees them.
        if args[0] == "snapshot"
            && version(&dirs[1].join(&f)) == Some(2)
            && switched_alike(&dirs, &f)
        {
            continue;
        }
        if !timed || qemu_views(&dirs[0], &f) != qemu_views(&dirs[1], &f) {
            differs(format!("{what}: {f} differs"));
        }
    }
    for d in &dirs {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// Whether file `f` is alike in the two directories `dirs` to QEMU: the same
/// views, the same map (where compressed clusters show no offset) and the
/// same guest data.
fn alike(dirs: &[std::path::PathBuf; 2], f: &str) -> bool {
    let theirs = dirs[1].join(f).display().to_string();
    qemu_views(&dirs[0], f) == qemu_views(&dirs[1], f)
        && map_json(&dirs[0], f) == map_json(&dirs[1], f)
        && outcome(&dirs[0], "qemu-img", &["compare", "-U", f, &theirs]).0 == Some(0)
}

/// `out` with the node a bitmap cannot be made persistent in, or stored to,
/// named `NODE`: qemu-img names the image by the node name it made up
/// (`#block178`), which changes from run to run of qemu-img itself; strata
/// names the file (or makes up a name of its own).
fn node_masked(mut out: (Option<i32>, String, String)) -> (Option<i32>, String, String) {
    out.2 = common::node::blind(&out.2, "persistent bitmaps to ");
    const AT: &str = "' persistent in '";
    if let Some(i) = out.2.find(AT) {
        let from = i + AT.len();
        if let Some(len) = out.2[from..].find('\'') {
            out.2.replace_range(from..from + len, "NODE");
        }
    }
    out
}

/// The qcow2 version of the file at `p`, if it is a qcow2 image.
fn version(p: &Path) -> Option<u32> {
    let b = std::fs::read(p).ok()?;
    (b.len() >= 8 && b[..4] == *b"QFI\xfb").then(|| u32::from_be_bytes(b[4..8].try_into().unwrap()))
}

/// Whether version 2 image `f` is alike in the two directories `dirs` to QEMU
/// but for its layout: the same `info` (the file's own length, allocated size
/// and the snapshots' dates aside), the same `check` verdict (its end offset
/// and fragmentation aside) and the same guest data.
fn switched_alike(dirs: &[std::path::PathBuf; 2], f: &str) -> bool {
    let view = |d: &Path, args: &[&str], drop: &[&str]| {
        let mut a = args.to_vec();
        a.push(f);
        let (code, out, _) = outcome(d, "qemu-img", &a);
        let mut v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            for k in drop {
                o.remove(*k);
            }
            if let Some(snaps) = o.get_mut("snapshots").and_then(|s| s.as_array_mut()) {
                for s in snaps.iter_mut().filter_map(|s| s.as_object_mut()) {
                    s.remove("date-sec");
                    s.remove("date-nsec");
                }
            }
        }
        (code, v)
    };
    let info = ["info", "-U", "--output=json"];
    let not_layout = ["children", "actual-size", "filename"];
    let check = ["check", "-U", "--output=json"];
    let not_end = ["image-end-offset", "fragmented-clusters", "filename"];
    let theirs = dirs[1].join(f).display().to_string();
    view(&dirs[0], &info, &not_layout) == view(&dirs[1], &info, &not_layout)
        && view(&dirs[0], &check, &not_end) == view(&dirs[1], &check, &not_end)
        && outcome(&dirs[0], "qemu-img", &["compare", "-U", f, &theirs]).0 == Some(0)
}

/// `args` as a shell line, for failure reports.
fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.=,/:".contains(c))
            {
                a.clone()
            } else {
                format!("'{a}'")
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Usages the sweep found differing, each fixed and kept as a row.
const PINNED: &[&[&str]] = &[
    // Writes into an image with an enabled bitmap are recorded in it, as
    // QEMU records them: the same bits, and the same file once stored.
    &[
        "rebase",
        "-b",
        "top.qcow2",
        "-Fqcow2",
        "-p",
        "--image-opts",
        "driver=qcow2,file.filename=bm2.qcow2",
    ],
    // A new backing format strata lacks: its driver refuses the file.
    &[
        "rebase",
        "-b",
        "nonexist.qcow2",
        "-Tunsafe",
        "-U",
        "-Fvmdk",
        "df.qcow2",
    ],
    &[
        "rebase",
        "--backing=raw.img",
        "--backing-format",
        "vmdk",
        "top.qcow2",
    ],
    // An image named by options is named so when it cannot be opened.
    &[
        "bitmap",
        "driver=qcow2,file.filename=nonexist.qcow2",
        "new",
        "--remove",
        "--clear",
        "--image-opts",
    ],
    // No snapshot is loaded over bitmaps, before it is looked up.
    &["snapshot", "-a1", "-q", "bm2.qcow2"],
    &["snapshot", "-a", "s1", "bm.qcow2"],
    // qemu-img 10 declares the long forms of -c/-a/-d without a value.
    &["snapshot", "--apply=s1", "snap.qcow2"],
    &["snapshot", "--create=s3", "snap.qcow2"],
    &["snapshot", "--delete", "s1", "snap.qcow2"],
    &["snapshot", "--apply", "snap.qcow2"],
    &["snapshot", "--apply", "raw.img"],
    // An action given twice is a mix, as two different ones are.
    &["snapshot", "-l", "-l", "snap.qcow2"],
    &["snapshot", "-c", "a", "-c", "b", "snap.qcow2"],
    &["snapshot", "-d", "s1", "-d", "s2", "snap.qcow2"],
    // -U with a writing action is refused before the image is opened.
    &["snapshot", "-U", "-a", "s1", "nonexist.qcow2"],
    &["snapshot", "-U", "-c", "s9", "nonexist.qcow2"],
    // Out-of-range rates and granularities are worded apart from non-numbers.
    &["commit", "-r", "16E", "top.qcow2"],
    &["commit", "-r", "-1", "top.qcow2"],
    &["commit", "--rate=abc", "top.qcow2"],
    &["bitmap", "--add", "-g", "-1", "bm.qcow2", "nb"],
    &["bitmap", "--add", "-g16E", "bm.qcow2", "nb"],
    &["bitmap", "--add", "--granularity=abc", "bm.qcow2", "nb"],
    // commit names the image as the user named it.
    &[
        "commit",
        "-b",
        "nonexist.qcow2",
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"rov.qcow2"}}"#,
    ],
    &[
        "commit",
        "-b",
        "t4.qcow2",
        "--image-opts",
        "driver=qcow2,file.filename=top.qcow2",
    ],
    // Safe rebase without -F copies the differences, then refuses the link.
    &["rebase", "-b", "base.qcow2", "top.qcow2"],
    &["rebase", "-u", "-b", "base.qcow2", "top.qcow2"],
    // The merge source is a file name even with --image-opts.
    &[
        "bitmap",
        "--merge",
        "b0",
        "-b",
        "bm2.qcow2",
        "--image-opts",
        "driver=qcow2,file.filename=bm.qcow2",
        "b0",
    ],
    &[
        "bitmap",
        "--merge",
        "b0",
        "-b",
        "bm2.qcow2",
        "-F",
        "qcow2",
        "--image-opts",
        "driver=qcow2,file.filename=bm.qcow2",
        "b1",
    ],
    // commit, bitmap, snapshot
    // A base named for an image without a backing file is not in its chain.
    &["commit", "-b", "base.qcow2", "v3.qcow2"],
    &[
        "commit",
        "-d",
        "-b",
        "nonexist.qcow2",
        "-f",
        "raw",
        "raw.img",
    ],
    // A granularity of 0 is none given.
    &["bitmap", "-g", "0", "--disable", "bm.qcow2", "b0"],
    &["bitmap", "--add", "--granularity=0", "bm.qcow2", "nb"],
    // A format QEMU has and strata lacks refuses the file in its own words.
    &["commit", "-f", "vmdk", "top.qcow2"],
    &["snapshot", "-l", "-f", "vmdk", "raw.img"],
    &["snapshot", "-c", "s9", "-f", "vdi", "snap.qcow2"],
    &["bitmap", "--add", "-f", "vmdk", "nonexist.qcow2", "nb"],
    &[
        "snapshot",
        "-l",
        "--image-opts",
        "driver=vmdk,file.filename=snap.qcow2",
    ],
    &[
        "bitmap",
        "--clear",
        r#"json:{"driver":"qcow","file":{"driver":"file","filename":"bm.qcow2"}}"#,
        "b0",
    ],
    // rebase
    // A link that cannot be changed for want of a format still shows the
    // last progress figure first.
    &[
        "rebase",
        "--backing-unsafe",
        "-bbase.qcow2",
        "--progress",
        "v2ov.qcow2",
    ],
    // -c: a cluster of zeroes is compressed too; clusters of one write are
    // compressed in parallel by qemu-img (their order is compared as QEMU
    // sees it).
    &[
        "rebase",
        "-c",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ],
    &["rebase", "-c", "-b", "base.qcow2", "t4.qcow2"],
    // Zeroes written where there is no old backing file: zero bits of whole
    // subclusters with extended L2 (the guest view keeps its zeroes).
    &["rebase", "-b", "raw.img", "el2.qcow2"],
    &["rebase", "-b", "raw.img", "-F", "raw", "el2.qcow2"],
    // A new backing file of the image's chain is read through that chain,
    // whatever -F says (it is only recorded).
    &["rebase", "-F", "raw", "-b", "base.qcow2", "top.qcow2"],
    &["rebase", "-F", "qcow2", "-b", "raw.img", "rov.qcow2"],
    // -p on extended L2: unallocated subclusters of an allocated cluster are
    // a run apart.
    &["rebase", "-p", "-b", "raw.img", "-F", "raw", "elov.qcow2"],
    // A `json:` new backing name is opened, and recorded as given.
    &[
        "rebase",
        "-b",
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}"#,
        "-F",
        "qcow2",
        "top.qcow2",
    ],
    &[
        "rebase",
        "-b",
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}"#,
        "top.qcow2",
    ],
    // snapshot on version 2 images: strata's header switch leaves another
    // layout, alike to QEMU.
    &["snapshot", "-c", "", "v2.qcow2"],
    &["snapshot", "-c", "s1", "v2ov.qcow2"],
    // Safe rebase without -F: the copy ends at its last figure before the
    // link is refused.
    &[
        "rebase",
        "-b",
        "mid.qcow2",
        "--format",
        "qcow2",
        "-p",
        "top.qcow2",
    ],
    &["rebase", "-p", "-b", "base.qcow2", "top.qcow2"],
    // A merge source without persistent bitmaps (raw, or qcow2 read as raw)
    // opens and holds none: the operations before the merge run first.
    &[
        "bitmap",
        "--enable",
        "--source-file",
        "raw.img",
        "--merge=b2",
        "--disable",
        "-F",
        "raw",
        "v3.qcow2",
        "b1",
    ],
    &["bitmap", "--merge", "b0", "-b", "raw.img", "bm.qcow2", "b0"],
    &[
        "bitmap",
        "--merge",
        "b0",
        "-b",
        "bm2.qcow2",
        "-F",
        "raw",
        "bm.qcow2",
        "b0",
    ],
    // A merge looks its target bitmap up before its source.
    &["bitmap", "--merge", "b2", "--clear", "bm2.qcow2", "b1"],
    &[
        "bitmap",
        "--merge",
        "nosuch",
        "-b",
        "bm.qcow2",
        "bm2.qcow2",
        "b1",
    ],
    // A relative base name is looked up against each layer's file name: an
    // image named by a `json:` name (its backing file's secret given) has
    // none, so its backing file is not found by name.
    &[
        "commit",
        "--object",
        "secret,id=sec0,file=key.txt",
        "-b",
        "luks.qcow2",
        "--image-opts",
        "driver=qcow2,file.filename=lov.qcow2,backing.encrypt.key-secret=sec0",
    ],
    &[
        "commit",
        "-q",
        "-b",
        "base.qcow2",
        "--image-opts",
        "driver=qcow2,file.filename=top.qcow2",
    ],
    // bitmap opens the image without its backing file: options for one are
    // refused.
    &[
        "bitmap",
        "--object",
        "secret,id=sec0,file=key.txt",
        "--add",
        "--image-opts",
        "driver=qcow2,file.filename=lov.qcow2,backing.encrypt.key-secret=sec0",
        "b1",
    ],
    // getopt refuses `--apply=NAME` (the long action takes no name) before
    // the file names are counted.
    &[
        "snapshot",
        "nonexist.qcow2",
        "--delete",
        "s1",
        "--apply=s1",
        "-q",
    ],
];

#[test]
fn pinned_chain_usages_match_qemu_img() {
    let root = tempfile::tempdir().unwrap();
    let fx = root.path().join("fx");
    fixture(&fx);
    for (i, row) in PINNED.iter().enumerate() {
        let args: Vec<String> = row.iter().map(|s| s.to_string()).collect();
        compare(&fx, i, &args);
    }
    assert_all_same();
}

#[test]
fn random_chain_usages_match_qemu_img() {
    let seed = sweep_var("SEED", 0x5eed_c4a1);
    // 400 usages pass (about 2.5 minutes on a loaded machine, with the
    // pinned rows beside them).
    let n = sweep_var("N", 400) as usize;
    let root = tempfile::tempdir().unwrap();
    let fx = root.path().join("fx");
    fixture(&fx);
    let mut r = Rng(seed);
    for i in 0..n {
        let args = usage(&mut r);
        compare(&fx, i, &args);
    }
    assert_all_same();
}
