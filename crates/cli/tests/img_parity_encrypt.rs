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
