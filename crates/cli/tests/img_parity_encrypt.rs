//! Encrypted qcow2 images through both tools: LUKS images made by qemu-img and by
//! strata, and a legacy AES image, under info (text and JSON), check, map,
//! compare, convert, snapshot, resize, create and amend, with the secret, without
//! it, with a wrong one and with an id no `--object` defines. stdout, stderr and
//! the exit code must be identical; what one tool writes encrypted, the other
//! reads back the same.

mod common;

use common::{assert_all_same, ok, same, sh};
use std::path::Path;

const SECRET: &str = "secret,id=s0,data=Pa55";
const WRONG: &str = "secret,id=s0,data=nope";

/// `--image-opts` name of an encrypted qcow2 `file` whose secret is `s0`.
fn named(file: &str) -> String {
    format!("driver=qcow2,encrypt.key-secret=s0,file.filename={file}")
}

/// qemu-io on an encrypted image.
fn qemu_io(d: &Path, file: &str, cmds: &[&str]) {
    let mut a = vec!["--object", SECRET, "--image-opts"];
    let n = named(file);
    a.push(&n);
    for c in cmds {
        a.extend(["-c", c]);
    }
    sh(d, "qemu-io", &a);
}

/// The `-o` of a LUKS image whose secret is `s0`.
const LUKS: &str = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10";

/// qemu-img creates the encrypted qcow2 `f` (4 MiB) with `-o opts`.
fn create(d: &Path, f: &str, opts: &str) {
    sh(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "--object", SECRET, "-o", opts, f, "4M",
        ],
    );
}

/// qemu-img finds the encrypted image named by `name` identical to raw `raw`.
fn reads_as_raw(d: &Path, name: &str, raw: &str) {
    let other = format!("driver=raw,file.filename={raw}");
    let args = ["compare", "--object", SECRET, "--image-opts", name, &other];
    ok(d, "qemu-img", &args);
}

/// `e.qcow2` (LUKS, by qemu-img), `l.qcow2` (legacy AES, by qemu-img) and
/// `c.qcow2` (clear), each with data, in `d`.
fn images(d: &Path) {
    for (f, o) in [
        ("e.qcow2", LUKS),
        ("l.qcow2", "encrypt.format=aes,encrypt.key-secret=s0"),
    ] {
        create(d, f, o);
        qemu_io(
            d,
            f,
            &[
                "write -P 0x17 0 100k",
                "write -z 1M 64k",
                "write -P 9 3M 1000",
            ],
        );
    }
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "c.qcow2", "4M"],
    );
}

#[test]
fn encrypted_images_are_inspected_and_refused_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    let e = named("e.qcow2");
    let l = named("l.qcow2");
    for f in ["e.qcow2", "l.qcow2"] {
        same(d, &["info", f]);
        same(d, &["info", "--output=json", f]);
        same(d, &["info", "-U", "--output=json", f]);
        // Without the secret, everything but info is refused.
        same(d, &["check", f]);
        same(d, &["map", f]);
        same(d, &["compare", f, "c.qcow2"]);
        same(d, &["convert", "-O", "raw", f, "out.raw"]);
        same(d, &["snapshot", "-l", f]);
        same(d, &["measure", "-O", "qcow2", f]);
        same(d, &["resize", f, "8M"]);
    }
    for (obj, name) in [(SECRET, &e), (WRONG, &e), (SECRET, &l)] {
        for sub in [&["check"][..], &["check", "--output=json"], &["map"]] {
            let mut a = sub.to_vec();
            a.extend(["--object", obj, "--image-opts", name.as_str()]);
            same(d, &a);
        }
        same(
            d,
            &[
                "map",
                "--output=json",
                "--object",
                obj,
                "--image-opts",
                name,
            ],
        );
        same(
            d,
            &["snapshot", "-l", "--object", obj, "--image-opts", name],
        );
    }
    // An id no --object defines.
    let other = "driver=qcow2,encrypt.key-secret=s9,file.filename=e.qcow2";
    same(d, &["check", "--object", SECRET, "--image-opts", other]);
    same(d, &["map", "--object", SECRET, "--image-opts", other]);
    // Compare, decrypted, against a clear copy made by each tool.
    same(
        d,
        &[
            "compare",
            "--object",
            SECRET,
            "--image-opts",
            &e,
            "driver=qcow2,file.filename=c.qcow2",
        ],
    );
    assert_all_same();
}

#[test]
fn encrypted_images_convert_both_ways_as_qemu_img_converts_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    // Decrypting: the legacy and the LUKS image, to raw, by each tool.
    for f in ["e.qcow2", "l.qcow2"] {
        let n = named(f);
        for (prog, out) in [("strata", "s.raw"), ("qemu-img", "q.raw")] {
            ok(
                d,
                prog,
                &[
                    "convert",
                    "--object",
                    SECRET,
                    "--image-opts",
                    &n,
                    "-O",
                    "raw",
                    out,
                ],
            );
        }
        assert!(
            std::fs::read(d.join("s.raw")).unwrap() == std::fs::read(d.join("q.raw")).unwrap(),
            "{f}: strata decrypts differently from qemu-img"
        );
    }
    // Encrypting: strata makes a LUKS image of the raw copy (QEMU's default
    // cipher suite, and CBC-ESSIV), qemu-img checks it and finds it identical.
    for (i, extra) in [
        "",
        ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
    ]
    .iter()
    .enumerate()
    {
        let out = format!("t{i}.qcow2");
        let o = format!("{LUKS}{extra}");
        ok(
            d,
            "strata",
            &[
                "convert", "--object", SECRET, "-O", "qcow2", "-o", &o, "q.raw", &out,
            ],
        );
        let n = named(&out);
        let check = ok(
            d,
            "qemu-img",
            &["check", "--object", SECRET, "--image-opts", &n],
        );
        assert!(check.contains("No errors were found"), "{check}");
        reads_as_raw(d, &n, "q.raw");
    }
    // Into an existing encrypted image (-n, the target named by options), with
    // strata and qemu-img each on its own copy: both read back the source.
    for prog in ["strata", "qemu-img"] {
        let t = format!("{prog}-n.qcow2");
        create(d, &t, LUKS);
        let n = named(&t);
        ok(
            d,
            prog,
            &[
                "convert",
                "-n",
                "--object",
                SECRET,
                "--target-image-opts",
                "-f",
                "raw",
                "q.raw",
                &n,
            ],
        );
        reads_as_raw(d, &n, "q.raw");
    }
}

#[test]
fn encrypted_creation_and_amend_are_refused_as_qemu_img_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    let luks = "encrypt.format=luks,encrypt.iter-time=10";
    for o in [
        "encrypt.format=luks,encrypt.iter-time=10".to_string(),
        // The legacy format: the secret is asked for first.
        "encryption=on".into(),
        "encrypt.format=aes".into(),
        "encryption=on,encrypt.key-secret=s9".into(),
        "encrypt.format=aes,encrypt.key-secret=s9".into(),
        "encrypt.key-secret=s0".into(),
        "encrypt.format=foo,encrypt.key-secret=s0".into(),
        format!("{luks},encrypt.key-secret=s9"),
        format!("{luks},encrypt.key-secret=s0,encrypt.cipher-alg=foo"),
        format!("{luks},encrypt.key-secret=s0,encrypt.cipher-mode=foo"),
        format!("{luks},encrypt.key-secret=s0,encrypt.ivgen-alg=foo"),
        format!("{luks},encrypt.key-secret=s0,encrypt.hash-alg=foo"),
        format!("{luks},encrypt.key-secret=s0,encrypt.ivgen-hash-alg=foo"),
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=abc".into(),
        format!("{luks},encrypt.key-secret=s0,encrypt.foo=1"),
        format!(
            "{luks},encrypt.key-secret=s0,encrypt.cipher-alg=aes-128,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1"
        ),
    ] {
        same(
            d,
            &["create", "-f", "qcow2", "--object", SECRET, "-o", &o, "n.qcow2", "1M"],
        );
    }
    // A successful create prints the same summary (the images differ by their
    // random keys): both must open with the secret and be clean.
    same(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "--object",
            SECRET,
            "-o",
            &format!(
                "{luks},encrypt.key-secret=s0,encrypt.cipher-mode=cbc,encrypt.hash-alg=sha512"
            ),
            "n.qcow2",
            "1M",
        ],
    );
    let n = named("n.qcow2");
    let check = ok(
        d,
        "qemu-img",
        &["check", "--object", SECRET, "--image-opts", &n],
    );
    assert!(check.contains("No errors were found"), "{check}");
    // amend: creation-only encryption options, and key-slot options on a clear
    // image and without a state.
    let e = named("e.qcow2");
    for o in [
        "encrypt.format=luks",
        "encryption=on",
        "encrypt.key-secret=s0",
        "encrypt.cipher-alg=aes-128",
        "encrypt.hash-alg=sha1",
        "encrypt.iter-time=10",
        "encrypt.keyslot=1,encrypt.new-secret=s0",
    ] {
        same(d, &["amend", "--object", SECRET, "-o", o, "c.qcow2"]);
        same(
            d,
            &["amend", "--object", SECRET, "-o", o, "--image-opts", &e],
        );
    }
    assert_all_same();
}

/// The second secret, for an overlay encrypted apart from its backing file.
const SECRET1: &str = "secret,id=s1,data=0ther";

/// `o.qcow2`: a LUKS overlay (secret `s1`) over the LUKS `e.qcow2` (secret
/// `s0`), with data of its own; `p.qcow2`: a clear overlay over `e.qcow2`.
fn encrypted_chain(d: &Path) {
    images(d);
    let objs = ["--object", SECRET, "--object", SECRET1];
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    a.extend(objs);
    a.extend(["-b", "e.qcow2", "-F", "qcow2", "-o"]);
    let luks1 = "encrypt.format=luks,encrypt.key-secret=s1,encrypt.iter-time=10";
    sh(d, "qemu-img", &[&a[..], &[luks1, "o.qcow2"]].concat());
    let mut io = vec!["--image-opts"];
    io.extend(objs);
    let top =
        "driver=qcow2,file.filename=o.qcow2,encrypt.key-secret=s1,backing.encrypt.key-secret=s0";
    io.extend([top, "-c", "write -P 0x42 64k 64k", "-c", "write -z 3M 4k"]);
    sh(d, "qemu-io", &io);
    sh(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "e.qcow2", "-F", "qcow2", "p.qcow2",
        ],
    );
}

#[test]
fn encrypted_backing_files_open_with_their_own_secret_as_qemu_img_opens_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    encrypted_chain(d);
    let objs = ["--object", SECRET, "--object", SECRET1];
    let top = "driver=qcow2,file.filename=o.qcow2,encrypt.key-secret=s1";
    // The backing file's secret: right, missing, the overlay's, undefined; and
    // options for backing files the chain does not have.
    let names = [
        format!("{top},backing.encrypt.key-secret=s0"),
        top.to_string(),
        format!("{top},backing.encrypt.key-secret=s1"),
        format!("{top},backing.encrypt.key-secret=s9"),
        format!("{top},backing.encrypt.key-secret=s0,backing.lazy-refcounts=on"),
        format!("{top},backing.encrypt.key-secret=s0,backing.backing.encrypt.key-secret=s0"),
        "driver=qcow2,file.filename=p.qcow2,backing.encrypt.key-secret=s0".to_string(),
        "driver=qcow2,file.filename=p.qcow2".to_string(),
        "driver=qcow2,file.filename=c.qcow2,backing.encrypt.key-secret=s0".to_string(),
    ];
    let base = "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s0";
    for n in &names {
        for sub in [
            &["map"][..],
            &["map", "--output=json"],
            &["check"],
            &["check", "--output=json"],
            &["info"],
            &["info", "--backing-chain"],
            &["compare"],
            &["compare", "-s"],
        ] {
            let mut a: Vec<&str> = sub.to_vec();
            a.extend(objs);
            a.extend(["--image-opts", n]);
            if sub[0] == "compare" {
                a.push(base);
            }
            same(d, &a);
        }
    }
    // The same through a json: name, and by the file name alone.
    let json = r#"json:{"driver":"qcow2","file":{"filename":"o.qcow2"},"encrypt":{"key-secret":"s1"},"backing":{"encrypt":{"key-secret":"s0"}}}"#;
    for sub in ["map", "check", "compare"] {
        let mut a = vec![sub];
        a.extend(objs);
        a.push(json);
        if sub == "compare" {
            a.push("p.qcow2");
        }
        same(d, &a);
    }
    for sub in ["map", "check"] {
        same(d, &[sub, "o.qcow2"]);
        same(d, &[sub, "p.qcow2"]);
    }
    // Converted through the chain, each tool's copy reads as the other's.
    for (tool, out) in [("strata", "s.raw"), ("qemu-img", "q.raw")] {
        let mut a = vec!["convert", "-O", "raw"];
        a.extend(objs);
        a.extend(["--image-opts", &names[0], out]);
        ok(d, tool, &a);
    }
    sh(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", "s.raw", "q.raw"],
    );
    let mut a = vec!["compare"];
    a.extend(objs);
    a.extend(["--image-opts", &names[0], "driver=raw,file.filename=s.raw"]);
    ok(d, "qemu-img", &a);
    // Into a new encrypted image: qemu-img reads strata's with its secret.
    let mut a = vec!["convert", "-O", "qcow2", "-o", LUKS];
    a.extend(objs);
    a.extend(["--image-opts", &names[0], "n.qcow2"]);
    ok(d, "strata", &a);
    reads_as_raw(d, &named("n.qcow2"), "s.raw");
    assert_all_same();
}

#[test]
fn info_names_an_image_opened_with_a_secret_by_its_json_options_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    encrypted_chain(d);
    let objs = ["--object", SECRET, "--object", SECRET1];
    let names = [
        named("e.qcow2"),
        "file.filename=e.qcow2,encrypt.key-secret=s0".to_string(),
        format!("{},encrypt.format=luks,lazy-refcounts=on", named("e.qcow2")),
        format!(
            "{},file.driver=file,file.locking=off,node-name=n0,read-only=on",
            named("e.qcow2")
        ),
        "driver=qcow2,file.filename=o.qcow2,encrypt.key-secret=s1".to_string(),
        "driver=qcow2,file.filename=o.qcow2,encrypt.key-secret=s9".to_string(),
        // No option that changes the data: the file name stays the name.
        "driver=qcow2,file.filename=e.qcow2,lazy-refcounts=on".to_string(),
        "driver=qcow2,file.filename=p.qcow2,l2-cache-size=1M".to_string(),
    ];
    let jsons = [
        r#"json:{"driver":"qcow2","file":{"filename":"e.qcow2","locking":"off"},"encrypt":{"key-secret":"s0"},"lazy-refcounts":true}"#,
        r#"json:{"driver":"qcow2","file.filename":"o.qcow2","encrypt.key-secret":"s1"}"#,
    ];
    let all = names
        .iter()
        .map(|n| ["--image-opts", n.as_str()].to_vec())
        .chain(jsons.iter().map(|j| vec![*j]));
    for n in all {
        for sub in [
            &["info"][..],
            &["info", "--output=json"],
            &["info", "--backing-chain"],
            &["info", "--backing-chain", "--output=json"],
        ] {
            same(d, &[sub, &objs[..], &n[..]].concat());
        }
    }
    assert_all_same();
}

/// Three secrets for the key-slot cases: `s0` opens the images as created.
const KEYS: [&str; 3] = [SECRET, SECRET1, "secret,id=s2,data=th1rd"];

/// `--object` arguments defining [`KEYS`].
fn key_objects() -> Vec<&'static str> {
    KEYS.iter().flat_map(|k| ["--object", *k]).collect()
}

/// What each secret opens of `copy` by `tool`, its guest data compared with
/// `e.qcow2`'s (one line per secret; the copy's name replaced), and which slots
/// its header says are active.
fn key_view(d: &Path, tool: &str, copy: &str) -> String {
    let mut out = String::new();
    for id in ["s0", "s1", "s2"] {
        let n = format!("driver=qcow2,file.filename={copy},encrypt.key-secret={id}");
        let e = named("e.qcow2");
        let mut a = vec!["compare"];
        a.extend(key_objects());
        a.extend(["--image-opts", &n, &e]);
        let (code, o, e) = common::outcome(d, tool, &a);
        out += &format!("{id}: {code:?} {o}{e}").replace(copy, "IMG");
    }
    let (_, info, _) = common::outcome(d, "qemu-img", &["info", "--output=json", copy]);
    out + &info
        .lines()
        .filter(|l| l.contains("\"active\""))
        .collect::<Vec<_>>()
        .join("")
}

#[test]
fn key_slots_are_added_and_erased_as_qemu_img_does_and_both_tools_open_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d);
    let objs = key_objects();
    let amend = |img: &str, extra: &[&str]| {
        let n = named(img);
        let mut a = vec!["amend", "-q"];
        a.extend(objs.iter().copied());
        a.extend(extra);
        a.extend(["--image-opts", &n]);
        sh(d, "qemu-img", &a);
    };
    // `two.qcow2`: s0 in slot 0, s1 in slot 3; `full.qcow2`: all eight slots
    // (s0 in 0, s1 in 1..6, s2 in 7).
    std::fs::copy(d.join("e.qcow2"), d.join("two.qcow2")).unwrap();
    let add = "encrypt.state=active,encrypt.iter-time=10,encrypt.new-secret=";
    amend("two.qcow2", &["-o", &format!("{add}s1,encrypt.keyslot=3")]);
    std::fs::copy(d.join("e.qcow2"), d.join("full.qcow2")).unwrap();
    for s in ["s1", "s1", "s1", "s1", "s1", "s1", "s2"] {
        amend("full.qcow2", &["-o", &format!("{add}{s}")]);
    }
    let cases: &[(&str, &[&str])] = &[
        // Adding a key.
        ("e.qcow2", &["-o", &format!("{add}s1")]),
        ("e.qcow2", &["-o", &format!("{add}s1,encrypt.keyslot=6")]),
        ("e.qcow2", &["-o", &format!("{add}s1,encrypt.keyslot=0x7")]),
        (
            "e.qcow2",
            &["-o", &format!("{add}s1,encrypt.keyslot=4294967301")],
        ),
        ("e.qcow2", &["-o", &format!("{add}s1,encrypt.keyslot=0")]),
        (
            "e.qcow2",
            &["--force", "-o", &format!("{add}s1,encrypt.keyslot=0")],
        ),
        ("e.qcow2", &["-o", &format!("{add}s1,encrypt.keyslot=8")]),
        ("e.qcow2", &["-o", &format!("{add}s1,encrypt.keyslot=-1")]),
        ("e.qcow2", &["-o", &format!("{add}s1,encrypt.keyslot=abc")]),
        (
            "e.qcow2",
            &[
                "-o",
                &format!("{add}s1,encrypt.keyslot=18446744073709551615"),
            ],
        ),
        (
            "e.qcow2",
            &[
                "-o",
                &format!("{add}s1,encrypt.keyslot=18446744073709551616"),
            ],
        ),
        ("e.qcow2", &["-o", &format!("{add}s9")]),
        (
            "e.qcow2",
            &["-o", &format!("{add}s1,encrypt.old-secret=s0")],
        ),
        (
            "e.qcow2",
            &["-o", "encrypt.state=active,encrypt.iter-time=10"],
        ),
        (
            "e.qcow2",
            &[
                "-o",
                "encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=1k",
            ],
        ),
        (
            "e.qcow2",
            &[
                "-o",
                &format!("{add}s1,encrypt.iter-time=99999999999999999999"),
            ],
        ),
        ("e.qcow2", &["-o", "encrypt.state=on,encrypt.new-secret=s1"]),
        (
            "e.qcow2",
            &["-o", "encrypt.keyslot=1,encrypt.new-secret=s1"],
        ),
        ("e.qcow2", &["-o", "encrypt.state=active,encrypt.secret=s0"]),
        (
            "e.qcow2",
            &["-p", "-o", &format!("{add}s2,lazy_refcounts=on")],
        ),
        ("full.qcow2", &["-o", &format!("{add}s0")]),
        // Erasing keys.
        (
            "two.qcow2",
            &["-o", "encrypt.state=inactive,encrypt.old-secret=s1"],
        ),
        (
            "two.qcow2",
            &["-o", "encrypt.state=inactive,encrypt.old-secret=s0"],
        ),
        (
            "two.qcow2",
            &["-o", "encrypt.state=inactive,encrypt.keyslot=3"],
        ),
        (
            "two.qcow2",
            &[
                "-o",
                "encrypt.state=inactive,encrypt.keyslot=3,encrypt.old-secret=s0",
            ],
        ),
        (
            "two.qcow2",
            &[
                "-o",
                "encrypt.state=inactive,encrypt.keyslot=3,encrypt.old-secret=s1",
            ],
        ),
        (
            "two.qcow2",
            &["-o", "encrypt.state=inactive,encrypt.keyslot=5"],
        ),
        (
            "two.qcow2",
            &["--force", "-o", "encrypt.state=inactive,encrypt.keyslot=5"],
        ),
        (
            "two.qcow2",
            &["-o", "encrypt.state=inactive,encrypt.keyslot=-1"],
        ),
        (
            "two.qcow2",
            &["-o", "encrypt.state=inactive,encrypt.keyslot=8"],
        ),
        ("two.qcow2", &["-o", "encrypt.state=inactive"]),
        (
            "two.qcow2",
            &["-o", "encrypt.state=inactive,encrypt.new-secret=s1"],
        ),
        (
            "two.qcow2",
            &[
                "-o",
                "encrypt.state=inactive,encrypt.keyslot=3,encrypt.iter-time=10",
            ],
        ),
        (
            "two.qcow2",
            &["-o", "encrypt.state=inactive,encrypt.old-secret=s9"],
        ),
        (
            "two.qcow2",
            &["-o", "encrypt.state=inactive,encrypt.old-secret=s2"],
        ),
        (
            "full.qcow2",
            &["-o", "encrypt.state=inactive,encrypt.old-secret=s1"],
        ),
        // The last key: only with --force.
        (
            "e.qcow2",
            &["-o", "encrypt.state=inactive,encrypt.keyslot=0"],
        ),
        (
            "e.qcow2",
            &["-o", "encrypt.state=inactive,encrypt.old-secret=s0"],
        ),
        (
            "e.qcow2",
            &[
                "--force",
                "-o",
                "encrypt.state=inactive,encrypt.old-secret=s0",
            ],
        ),
        (
            "e.qcow2",
            &["--force", "-o", "encrypt.state=inactive,encrypt.keyslot=0"],
        ),
    ];
    for (n, (img, extra)) in cases.iter().enumerate() {
        let what = format!("amend {} {img}", extra.join(" "));
        let (ours, theirs) = common::same_on_named_copies(d, n, img, &what, &|f| {
            let mut a: Vec<String> = vec!["amend".into()];
            a.extend(objs.iter().map(|s| s.to_string()));
            a.extend(extra.iter().map(|s| s.to_string()));
            a.extend(["--image-opts".into(), named(f)]);
            a
        });
        // Each tool opens each tool's result with the same secrets, to the same data.
        let theirs_view = key_view(d, "qemu-img", &theirs);
        for (tool, copy) in [("qemu-img", &ours), ("strata", &ours), ("strata", &theirs)] {
            let view = key_view(d, tool, copy);
            if view != theirs_view {
                common::differs(format!(
                    "{what}: {tool} on {copy}:\n{view}\n--- qemu-img on qemu-img's copy:\n{theirs_view}"
                ));
            }
        }
    }
    // Without the image's own secret, and with a wrong one.
    let wrong_objs = ["--object", WRONG, "--object", SECRET1];
    let o = format!("{add}s1");
    same(
        d,
        &[
            "amend", "--object", SECRET, "--object", SECRET1, "-o", &o, "-f", "qcow2", "e.qcow2",
        ],
    );
    let e = named("e.qcow2");
    same(
        d,
        &[&["amend"], &wrong_objs[..], &["-o", &o, "--image-opts", &e]].concat(),
    );
    same(
        d,
        &["amend", "--object", SECRET, "-o", &o, "--image-opts", &e],
    );
    assert_all_same();
}

#[test]
fn commit_through_an_encrypted_chain_works_and_is_refused_as_qemu_img_does() {
    let objs = ["--object", SECRET, "--object", SECRET1];
    let top = "driver=qcow2,file.filename=o.qcow2,encrypt.key-secret=s1";
    let names = [
        top.to_string(),
        format!("{top},backing.encrypt.key-secret=s1"),
        format!("{top},backing.encrypt.key-secret=s9"),
        format!("{top},backing.encrypt.key-secret=s0"),
    ];
    let mut seen: Vec<Vec<(Option<i32>, String, String)>> = Vec::new();
    for tool in ["strata", "qemu-img"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        encrypted_chain(d);
        // No other overlay of the base (strata would warn that it changes).
        std::fs::remove_file(d.join("p.qcow2")).unwrap();
        // The overlay's guest view before the commit, decrypted.
        let chain = &names[3];
        ok(
            d,
            "qemu-img",
            &[
                &["convert"],
                &objs[..],
                &["-O", "raw", "--image-opts", chain, "before.raw"],
            ]
            .concat(),
        );
        let mut outs = Vec::new();
        for n in &names {
            let a = [&["commit"], &objs[..], &["--image-opts", n]].concat();
            outs.push(common::outcome(d, tool, &a));
        }
        // The base now holds the overlay's view, encrypted with its own key.
        reads_as_raw(d, &named("e.qcow2"), "before.raw");
        let check = ok(
            d,
            "qemu-img",
            &[
                "check",
                "--object",
                SECRET,
                "--image-opts",
                &named("e.qcow2"),
            ],
        );
        assert!(check.contains("No errors were found"), "{tool}: {check}");
        seen.push(outs);
    }
    for (n, (ours, theirs)) in names.iter().zip(seen[0].iter().zip(&seen[1])) {
        assert_eq!(ours, theirs, "commit {n}");
    }
}

/// qemu-img 10 still creates and writes the legacy AES format (only QEMU's
/// system emulators refuse it): `create` with `encryption=on` or
/// `encrypt.format=aes` changes nothing but the header's crypt method, and
/// `convert` writes the data encrypted by guest sector. strata leaves the very
/// same files, and qemu-img reads strata's copy back as the source.
#[test]
fn legacy_aes_images_are_created_and_written_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let fx = dir.path().join("fx");
    std::fs::create_dir(&fx).unwrap();
    sh(
        &fx,
        "qemu-img",
        &["create", "-q", "-f", "raw", "r.raw", "4M"],
    );
    sh(
        &fx,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x17 1000 100k",
            "-c",
            "write -P 9 3M 1000",
            "r.raw",
        ],
    );
    let mut n = 0;
    for o in [
        "encryption=on",
        "encrypt.format=aes",
        "encrypt.format=aes,compat=0.10",
        "encrypt.format=aes,cluster_size=4096",
    ] {
        let o = format!("{o},encrypt.key-secret=s0");
        for args in [
            vec![
                "create", "-f", "qcow2", "--object", SECRET, "-o", &o, "n.qcow2", "4M",
            ],
            vec![
                "convert", "--object", SECRET, "-O", "qcow2", "-o", &o, "r.raw", "n.qcow2",
            ],
        ] {
            n += 1;
            same_files_in_copies(&fx, n, &args);
        }
    }
    // Preallocated metadata: create only (strata's convert into a preallocated
    // encrypted target, LUKS as well, leaves unwritten clusters that do not read
    // as zeroes; not pinned here).
    let o = "encrypt.format=aes,preallocation=metadata,encrypt.key-secret=s0";
    let args = [
        "create", "-f", "qcow2", "--object", SECRET, "-o", o, "n.qcow2", "4M",
    ];
    same_files_in_copies(&fx, 20, &args);
    let parent = dir.path();
    let ours = format!("fx-o{n}");
    let n = named(&format!("{ours}/n.qcow2"));
    let raw = format!("driver=file,filename={ours}/r.raw");
    ok(
        parent,
        "qemu-img",
        &["compare", "--object", SECRET, "--image-opts", &n, &raw],
    );
    let check = ok(
        parent,
        "qemu-img",
        &["check", "--object", SECRET, "--image-opts", &n],
    );
    assert!(check.contains("No errors were found"), "{check}");
    assert_all_same();
}

/// Run `args` with both tools, each in its own copy (`fx-o{n}`, `fx-t{n}`) of
/// the directory `fx`, and record any difference in what they print or in the
/// bytes of `n.qcow2` they leave (encrypted images: compared byte for byte, as
/// qemu-img cannot check them without the secret).
fn same_files_in_copies(fx: &Path, n: usize, args: &[&str]) {
    let parent = fx.parent().unwrap();
    let (ours, theirs) = (format!("fx-o{n}"), format!("fx-t{n}"));
    for c in [&ours, &theirs] {
        common::copy_dir(fx, &parent.join(c));
    }
    let r_ours = common::outcome(&parent.join(&ours), "strata", args);
    let r_theirs = common::outcome(&parent.join(&theirs), "qemu-img", args);
    if r_ours != r_theirs {
        common::differs(format!(
            "`img {}`\n  strata:   {r_ours:?}\n  qemu-img: {r_theirs:?}",
            args.join(" ")
        ));
    }
    common::same_bytes(
        parent,
        &format!("{ours}/n.qcow2"),
        &format!("{theirs}/n.qcow2"),
        &args.join(" "),
    );
}

/// A preallocated encrypted target holds zeroes on disk, which decrypt to noise:
/// convert must write the source's zero ranges into it, as qemu-img does, so
/// the copy reads as the source everywhere (strata once skipped them).
#[test]
fn convert_into_preallocated_encrypted_targets_writes_the_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::ok(d, "qemu-img", &["create", "-q", "-f", "raw", "s.raw", "4M"]);
    common::io(d, "raw", "s.raw", &["write -P 7 1000 100k"]);
    let obj = "secret,id=s,data=pw";
    for enc in [
        "encrypt.format=luks,encrypt.iter-time=10",
        "encrypt.format=aes",
    ] {
        for prealloc in ["metadata", "falloc", "full"] {
            let out = format!("o-{prealloc}-{}.qcow2", enc.len());
            let opts = format!("{enc},encrypt.key-secret=s,preallocation={prealloc}");
            common::ok(
                d,
                "strata",
                &[
                    "convert", "--object", obj, "-O", "qcow2", "-o", &opts, "s.raw", &out,
                ],
            );
            let copy = format!("driver=qcow2,file.filename={out},encrypt.key-secret=s");
            let said = common::ok(
                d,
                "qemu-img",
                &[
                    "compare",
                    "--object",
                    obj,
                    "--image-opts",
                    "driver=raw,file.filename=s.raw",
                    &copy,
                ],
            );
            assert_eq!(said, "Images are identical.\n", "{opts}");
        }
    }
}
