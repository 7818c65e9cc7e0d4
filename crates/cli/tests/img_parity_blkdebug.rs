//! QEMU's blkdebug driver through both tools: `blkdebug:CONFIG:FILE` names,
//! the option forms (`--image-opts`, `json:`), config-file mistakes, and
//! errors injected after the events QEMU's drivers announce (a data read, an
//! L2 table load, the refcount table load, the open itself). stdout, stderr
//! and the exit code must be identical, and an image read through a failing
//! filter is left as it was.

mod common;

use common::{assert_all_same, ok, same, sh};
use std::path::Path;

/// The commands that only look at an image, each run on every name.
const INSPECTIONS: [&[&str]; 5] = [
    &["info"],
    &["info", "--output=json"],
    &["map"],
    &["map", "--output=json"],
    &["check"],
];

/// `a.qcow2` with data in its first cluster, and a config file per rule.
fn setup(d: &Path) {
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    );
    common::io(d, "qcow2", "a.qcow2", &["write -P 5 0 64k"]);
    let rule = |name: &str, body: &str| std::fs::write(d.join(name), body).unwrap();
    for ev in [
        "read_aio",
        "l2_load",
        "reftable_load",
        "none",
        "refblock_load",
    ] {
        rule(
            &format!("{ev}.cfg"),
            &format!("[inject-error]\nevent = \"{ev}\"\nerrno = \"5\"\n"),
        );
    }
    rule(
        "enospc_once.cfg",
        "# a comment\n[inject-error]\nevent = \"l2_load\"\nerrno = \"28\"\nonce = \"on\"\n",
    );
    rule(
        "sector.cfg",
        "[inject-error]\nevent = \"read_aio\"\nsector = \"4096\"\n",
    );
    rule(
        "state.cfg",
        concat!(
            "[set-state]\nevent = \"l2_load\"\nnew_state = \"2\"\n",
            "[inject-error]\nevent = \"read_aio\"\nstate = \"2\"\n",
        ),
    );
    rule("noevent.cfg", "[inject-error]\nerrno = \"5\"\n");
    rule("badevent.cfg", "[inject-error]\nevent = \"bogus\"\n");
    rule(
        "badkey.cfg",
        "[inject-error]\nevent = \"read_aio\"\nfoo = \"1\"\n",
    );
    rule("badgroup.cfg", "[inject-errorx]\nevent = \"read_aio\"\n");
    rule("nogroup.cfg", "event = \"read_aio\"\n");
    rule(
        "badnum.cfg",
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"x\"\n",
    );
    rule(
        "badbool.cfg",
        "[inject-error]\nevent = \"read_aio\"\nonce = \"x\"\n",
    );
    rule("unquoted.cfg", "[inject-error]\nevent = read_aio\n");
    rule(
        "badio.cfg",
        "[inject-error]\nevent = \"none\"\niotype = \"x\"\n",
    );
    rule(
        "readio.cfg",
        "[inject-error]\nevent = \"none\"\niotype = \"read\"\n",
    );
    rule(
        "writeio.cfg",
        "[inject-error]\nevent = \"none\"\niotype = \"write\"\n",
    );
}

#[test]
fn injected_errors_fail_where_and_as_qemu_img_fails() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let before = std::fs::read(d.join("a.qcow2")).unwrap();
    let configs = [
        "read_aio",
        "l2_load",
        "reftable_load",
        "none",
        "refblock_load",
        "enospc_once",
        "sector",
        "state",
        "readio",
        "writeio",
        "",
    ];
    for c in configs {
        let cfg = if c.is_empty() {
            String::new()
        } else {
            format!("{c}.cfg")
        };
        let name = format!("blkdebug:{cfg}:a.qcow2");
        for sub in INSPECTIONS {
            let mut a = sub.to_vec();
            a.push(&name);
            same(d, &a);
        }
        same(d, &["compare", &name, "a.qcow2"]);
        same(d, &["compare", "a.qcow2", &name]);
        same(d, &["convert", "-O", "raw", &name, &format!("out-{c}.raw")]);
    }
    assert_all_same();
    // Reading through a failing filter changed nothing.
    assert_eq!(std::fs::read(d.join("a.qcow2")).unwrap(), before);
}

#[test]
fn config_and_option_mistakes_get_qemu_img_messages() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    for c in [
        "noevent", "badevent", "badkey", "badgroup", "nogroup", "badnum", "badbool", "unquoted",
        "badio",
    ] {
        same(d, &["info", &format!("blkdebug:{c}.cfg:a.qcow2")]);
    }
    for name in [
        "blkdebug:missing.cfg:a.qcow2",
        "blkdebug:a.qcow2",
        "blkdebug::missing.qcow2",
    ] {
        same(d, &["info", name]);
    }
    for opts in [
        "driver=blkdebug,image.filename=a.qcow2,foo=1",
        "driver=blkdebug",
        "driver=qcow2,file.driver=blkdebug,file.image.filename=a.qcow2,file.align=3",
        "driver=qcow2,file.driver=blkdebug,file.image.filename=a.qcow2,file.inject-error.event=bogus",
    ] {
        same(d, &["info", "--image-opts", opts]);
    }
    // Inline rules fail reads as a config file's do.
    for opts in [
        "driver=qcow2,file.driver=blkdebug,file.image.filename=a.qcow2,file.inject-error.event=l2_load,file.inject-error.errno=28",
        "driver=qcow2,file.driver=blkdebug,file.image.filename=a.qcow2,file.inject-error.0.event=read_aio,file.config=l2_load.cfg",
    ] {
        same(d, &["map", "--image-opts", opts]);
        same(d, &["convert", "--image-opts", opts, "-O", "raw", "o.raw"]);
    }
    same(
        d,
        &[
            "map",
            r#"json:{"driver":"qcow2","file":{"driver":"blkdebug","image":{"filename":"a.qcow2"},"inject-error":[{"event":"l2_load","errno":28}]}}"#,
        ],
    );
    same(
        d,
        &[
            "info",
            "--image-opts",
            "driver=blkdebug,config=l2_load.cfg,image.filename=a.qcow2",
        ],
    );
    assert_all_same();
}

/// `sub args... blkdebug:CFG:COPY` (or the filter's name where `sub` has
/// `IMG`) with both tools, each on its own copy of `a.qcow2`: the same output, and copies QEMU reads alike: the same guest
/// data, the same snapshots, and the same check verdict (a failure may leak a
/// cluster, the same one; the file's length is not compared). Where QEMU
/// leaves its copy inconsistent (`qemu_corrupts`), strata's must check clean.
fn same_write(d: &Path, n: usize, cfg: &str, sub: &[&str], qemu_corrupts: bool) {
    let (ours, theirs) = (format!("o{n}.qcow2"), format!("t{n}.qcow2"));
    for c in [&ours, &theirs] {
        std::fs::copy(d.join("a.qcow2"), d.join(c)).unwrap();
    }
    let run = |prog: &str, copy: &str| {
        let name = format!("blkdebug:{cfg}:{copy}");
        let mut a: Vec<&str> = sub
            .iter()
            .map(|x| if *x == "IMG" { name.as_str() } else { x })
            .collect();
        if !sub.contains(&"IMG") {
            a.push(&name);
        }
        let (code, out, err) = common::outcome(d, prog, &a);
        (code, out.replace(copy, "IMG"), err.replace(copy, "IMG"))
    };
    let (r_ours, r_theirs) = (run("strata", &ours), run("qemu-img", &theirs));
    if r_ours != r_theirs {
        common::differs(format!(
            "`{sub:?}` with {cfg}\n  strata:   {r_ours:?}\n  qemu-img: {r_theirs:?}"
        ));
    }
    let state = |copy: &str| {
        let (code, out, err) = common::outcome(d, "qemu-img", &["check", copy]);
        let verdict: Vec<String> = (out + &err)
            .lines()
            .filter(|l| !l.starts_with("Image end offset"))
            .map(String::from)
            .collect();
        let (_, list, _) = common::outcome(d, "qemu-img", &["snapshot", "-l", copy]);
        let tags: Vec<String> = list
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
            .collect();
        (code, verdict, tags)
    };
    let (s_ours, s_theirs) = (state(&ours), state(&theirs));
    if qemu_corrupts {
        assert_eq!(s_theirs.0, Some(2), "QEMU's copy is no longer inconsistent");
        if s_ours.0 != Some(0) {
            common::differs(format!("`{sub:?}` with {cfg}: strata's image {s_ours:?}"));
        }
    } else if s_ours != s_theirs {
        common::differs(format!(
            "`{sub:?}` with {cfg}: images
  strata:   {s_ours:?}
  qemu-img: {s_theirs:?}"
        ));
    }
    let (code, out, err) = common::outcome(d, "qemu-img", &["compare", "-U", &ours, &theirs]);
    if code != Some(0) {
        common::differs(format!("`{sub:?}` with {cfg}: compare\n{out}{err}"));
    }
}

#[test]
fn writes_failed_by_a_rule_fail_and_leave_images_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let mut n = 0;
    for ev in [
        "l1_update",
        "write_aio",
        "cluster_alloc",
        "refblock_update_part",
        "pwritev",
        "l2_load",
    ] {
        let cfg = format!("w-{ev}.cfg");
        std::fs::write(
            d.join(&cfg),
            format!("[inject-error]\nevent = \"{ev}\"\nerrno = \"5\"\nonce = \"on\"\n"),
        )
        .unwrap();
        for sub in [&["snapshot", "-c", "s1"][..], &["resize", "64M"]] {
            n += 1;
            // A snapshot whose refcount block write fails leaves QEMU's image
            // with an L2 table marked copied at refcount 2; strata's stays
            // consistent.
            let qemu_corrupts = ev == "refblock_update_part" && sub[0] == "snapshot";
            same_write(d, n, &cfg, sub, qemu_corrupts);
        }
    }
    assert_all_same();
}

/// Failures injected at the steps QEMU announces inside an allocation: an L1
/// table growth's new table taken and written, and the refcount block lookup
/// of a refcount change. `resize` and `snapshot -c` fail as qemu-img fails them
/// and leave images QEMU reads alike.
#[test]
fn allocation_steps_failed_by_a_rule_fail_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let cases: &[(&str, &[&str])] = &[
        ("l1_grow_alloc_table", &["resize", "IMG", "1G"]),
        ("l1_grow_write_table", &["resize", "IMG", "1G"]),
        ("refblock_alloc", &["resize", "IMG", "1G"]),
        ("refblock_alloc", &["snapshot", "-c", "s1"]),
    ];
    for (n, (ev, sub)) in cases.iter().enumerate() {
        let cfg = format!("a-{ev}.cfg");
        std::fs::write(
            d.join(&cfg),
            format!("[inject-error]\nevent = \"{ev}\"\nerrno = \"5\"\nonce = \"on\"\n"),
        )
        .unwrap();
        same_write(d, 100 + n, &cfg, sub, false);
    }
    assert_all_same();
}

/// The filter over a format node (a qcow2 image, not its file): it passes
/// the node's guest data on, so a probe above it finds raw data, `info`
/// reports the raw image, the filter and the node with its file as children,
/// `map` maps into the node's file (its own allocation alone, not its backing
/// file's), `check` finds a format without checks, and the rules fail the
/// requests made of the node as in qemu-img. The named file forms, `json:`
/// and `--image-opts` alike; what `convert` and `dd` copy out is the guest data.
#[test]
fn a_filter_over_a_format_node_serves_its_guest_data_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    common::qcow2(d, "b.qcow2", "1M", &["-b", "a.qcow2", "-F", "qcow2"]);
    common::io(
        d,
        "qcow2",
        "b.qcow2",
        &["write -P 7 512k 64k", "write -z 64k 64k"],
    );
    let node =
        |f: &str| format!(r#"{{"driver":"qcow2","file":{{"driver":"file","filename":"{f}"}}}}"#);
    let names = [
        format!("blkdebug::json:{}", node("a.qcow2")),
        format!("blkdebug::json:{}", node("b.qcow2")),
        format!("blkdebug:read_aio.cfg:json:{}", node("a.qcow2")),
        format!("blkdebug:none.cfg:json:{}", node("a.qcow2")),
        r#"blkdebug::json:{"driver":"qcow2","file":{"filename":"a.qcow2"}}"#.into(),
        r#"json:{"driver":"raw","file":{"driver":"blkdebug","image":{"driver":"qcow2","file":{"filename":"b.qcow2"}}}}"#.into(),
    ];
    for (i, name) in names.iter().enumerate() {
        for sub in INSPECTIONS
            .iter()
            .copied()
            .chain([&["info", "-f", "raw"][..], &["info", "-f", "qcow2"]])
        {
            // (A qcow2 header read that fails is worded apart by qemu-img.)
            if sub.contains(&"qcow2") && name.contains("none.cfg") {
                continue;
            }
            let mut a = sub.to_vec();
            a.push(name);
            same(d, &a);
        }
        same(d, &["compare", name, "b.qcow2"]);
        same(d, &["compare", "a.qcow2", name]);
        let out = format!("node-{i}.raw");
        same(d, &["convert", "-O", "raw", name, &out]);
        same(
            d,
            &[
                "dd",
                &format!("if={name}"),
                "of=dd.raw",
                "bs=64k",
                "count=9",
            ],
        );
    }
    // Inline rules (which QEMU names the node by in reports) fail reads too.
    for name in [
        r#"json:{"driver":"raw","file":{"driver":"blkdebug","image":{"driver":"qcow2","file":{"filename":"a.qcow2"}},"inject-error":[{"event":"read_aio","errno":28}]}}"#,
        r#"json:{"driver":"raw","file":{"driver":"blkdebug","image":{"driver":"qcow2","file":{"filename":"b.qcow2"}},"inject-error":[{"event":"l2_load"}]}}"#,
    ] {
        same(d, &["map", name]);
        same(d, &["check", name]);
        same(d, &["convert", "-O", "raw", name, "inline.raw"]);
        same(
            d,
            &[
                "dd",
                &format!("if={name}"),
                "of=dd.raw",
                "bs=64k",
                "count=9",
            ],
        );
    }
    // What strata copies out of the filter is the node's guest data.
    ok(d, "strata", &["convert", "-O", "raw", &names[1], "s.raw"]);
    ok(d, "qemu-img", &["compare", "-f", "raw", "s.raw", "b.qcow2"]);
    let opts = [
        "driver=blkdebug,image.driver=qcow2,image.file.filename=a.qcow2",
        "driver=blkdebug,config=l2_load.cfg,image.driver=qcow2,image.file.filename=b.qcow2",
        "driver=raw,file.driver=blkdebug,file.config=read_aio.cfg,file.image.driver=qcow2,file.image.file.filename=a.qcow2",
        "driver=raw,file.driver=blkdebug,file.image.driver=qcow2,file.image.file.filename=b.qcow2",
    ];
    for o in opts {
        for sub in [
            &["info"][..],
            &["info", "--output=json"],
            &["map", "--output=json"],
            &["check"],
        ] {
            let mut a = sub.to_vec();
            a.extend(["--image-opts", o]);
            same(d, &a);
        }
        same(d, &["convert", "--image-opts", o, "-O", "raw", "o.raw"]);
    }
    assert_all_same();
}

/// A convert target behind a filter (`-n`), outputs a filter cannot create,
/// and raw images behind one opened for writing or mapped: the same messages
/// (write failures at the byte QEMU names, probed raw images named after the
/// filter, mapped ones after their file), codes and files as qemu-img.
#[test]
fn filtered_targets_and_raw_images_behind_a_filter_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let fx = dir.path().join("fx");
    std::fs::create_dir(&fx).unwrap();
    setup(&fx);
    sh(
        &fx,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "t.qcow2", "1M"],
    );
    sh(
        &fx,
        "qemu-img",
        &["create", "-q", "-f", "raw", "raw.img", "1M"],
    );
    sh(
        &fx,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "big.qcow2", "8M"],
    );
    common::io(
        &fx,
        "qcow2",
        "big.qcow2",
        &["write -P 1 0 1M", "write -P 2 3M 1M"],
    );
    sh(
        &fx,
        "qemu-img",
        &["create", "-q", "-f", "raw", "r8.img", "8M"],
    );
    sh(
        &fx,
        "qemu-img",
        &["create", "-q", "-f", "raw", "data.img", "4M"],
    );
    common::io(&fx, "raw", "data.img", &["write -P 3 64k 1M"]);
    let rule = |name: &str, body: &str| std::fs::write(fx.join(name), body).unwrap();
    rule(
        "werr.cfg",
        "[inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\n",
    );
    rule(
        "wnospc.cfg",
        "[inject-error]\nevent = \"write_aio\"\nerrno = \"28\"\n",
    );
    // Left out: a rule on one sector. qemu-img's zero writes span a whole run
    // of zeroes; strata's stop at 2 MiB boundaries, so the byte named as
    // failing differs.
    let cases: &[&[&str]] = &[
        &[
            "convert",
            "-n",
            "-O",
            "raw",
            "a.qcow2",
            "blkdebug:werr.cfg:raw.img",
        ],
        &[
            "convert",
            "-n",
            "-O",
            "raw",
            "big.qcow2",
            "blkdebug:wnospc.cfg:r8.img",
        ],
        &[
            "convert",
            "-n",
            "-O",
            "qcow2",
            "a.qcow2",
            "blkdebug::t.qcow2",
        ],
        &[
            "convert",
            "-n",
            "-O",
            "qcow2",
            "a.qcow2",
            "blkdebug::a.qcow2",
        ],
        &[
            "convert",
            "-n",
            "a.qcow2",
            "--target-image-opts",
            "driver=raw,file.driver=blkdebug,file.image.filename=raw.img",
        ],
        &["create", "-f", "raw", "blkdebug::x.img", "1M"],
        &["create", "-f", "qcow2", "blkdebug:werr.cfg:x.img", "1M"],
        &["convert", "-O", "qcow2", "a.qcow2", "blkdebug::x.img"],
        &["dd", "if=a.qcow2", "of=blkdebug:werr.cfg:raw.img"],
        &["create", "-f", "raw", "null-co://", "1M"],
        &[
            "amend",
            "-o",
            "lazy_refcounts=on",
            "blkdebug:none.cfg:raw.img",
        ],
        &["resize", "blkdebug:none.cfg:raw.img", "2M"],
        &["commit", "blkdebug:none.cfg:raw.img"],
        &["check", "-r", "all", "blkdebug:none.cfg:raw.img"],
        &["rebase", "-u", "-b", "", "blkdebug::raw.img"],
        // Mapped into the file beneath the filter under raw (whose block
        // status passes through it), into the filter under qcow2.
        &["map", "blkdebug:none.cfg:data.img"],
        &["map", "-f", "raw", "blkdebug::data.img"],
        &[
            "map",
            "--image-opts",
            "driver=raw,file.driver=blkdebug,file.image.filename=data.img",
        ],
        &["map", "blkdebug:none.cfg:big.qcow2"],
    ];
    for (n, c) in cases.iter().enumerate() {
        common::same_in_dir_copies(&fx, n, c);
    }
    assert_all_same();
}

/// `-f blkdebug`: the filter is the image's format, over the file's bytes (a
/// name without the `blkdebug:` prefix is the file's). It is the top node,
/// so no driver above announces events to it: only its `none` rules fire.
/// info names it (`blkdebug::FILE`, its `/image` child), check refuses, and
/// a bitmap cannot be stored to the node QEMU numbers first (its number is
/// compared, its random digits are not). Drivers that create no image are
/// refused as such as a target format.
#[test]
fn blkdebug_named_as_the_format_is_the_top_node_and_hears_no_events() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    sh(d, "qemu-img", &["create", "-q", "-f", "raw", "r.img", "1M"]);
    // One run of data: qemu-img reads it in one request (its requests in
    // flight each report a failure of their own).
    common::io(d, "raw", "r.img", &["write -P 3 0 64k"]);
    for name in [
        "blkdebug::a.qcow2",
        "a.qcow2",
        "blkdebug::file:a.qcow2",
        "blkdebug:read_aio.cfg:r.img",
        "blkdebug:none.cfg:r.img",
        "blkdebug:nosuch.cfg:r.img",
        "nosuch.img",
    ] {
        for sub in INSPECTIONS
            .iter()
            .copied()
            .chain([&["measure", "-O", "qcow2"][..]])
        {
            let mut a = vec![sub[0], "-f", "blkdebug"];
            a.extend(&sub[1..]);
            a.push(name);
            same(d, &a);
        }
        same(
            d,
            &["compare", "-f", "blkdebug", "-F", "raw", name, "r.img"],
        );
        same(
            d,
            &["convert", "-f", "blkdebug", "-O", "raw", name, "out.raw"],
        );
        same(
            d,
            &["dd", "-f", "blkdebug", &format!("if={name}"), "of=dd.raw"],
        );
    }
    for f in ["blkdebug", "null-co", "throttle", "quorum"] {
        same(d, &["create", "-f", f, "x.img", "1M"]);
        same(d, &["create", "-f", f, "-o", "help"]);
        same(d, &["convert", "-O", f, "a.qcow2", "x.img"]);
        same(d, &["dd", "-O", f, "if=a.qcow2", "of=x.img"]);
    }
    let bitmap_steps = [
        "bitmap --add -f blkdebug r.img b",
        "bitmap --add -f blkdebug blkdebug::r.img b",
        "bitmap --add -f raw blkdebug::r.img b",
        "bitmap --add -f file r.img b",
        "bitmap --add -f raw r.img b",
    ];
    common::node::same_but_node(
        d,
        "bitmap",
        "qemu-img create -q -f raw r.img 1M",
        &bitmap_steps,
        "persistent bitmaps to ",
    );
    assert_all_same();
}
