//! QEMU's plain `luks` format through both tools: create (options, defaults,
//! refusals), info (probed, text and JSON, by `--image-opts` and `json:`), map,
//! check, measure, compare, convert to and from, resize, with the secret, without
//! it, with a wrong one and with an id no `--object` defines. stdout, stderr and
//! the exit code must be identical; what one tool writes, the other reads back
//! the same. Header fields that are random in each new image (UUID, iteration
//! counts) are masked where the two tools made different images.

mod common;

use common::luks::{json_name, mask_random, opts_name, SECRET};
use common::{assert_all_same, differs, ok, outcome, same, same_on_named_copies, sh};
use std::path::Path;

const WRONG: &str = "secret,id=s0,data=nope";
/// A short unlock time, so that tests do not spend seconds in PBKDF2.
const FAST: &str = "key-secret=s0,iter-time=10";

/// qemu-io commands on the `luks` image `file`.
fn qemu_io(d: &Path, file: &str, cmds: &[&str]) {
    let n = opts_name(file);
    let mut a = vec!["--object", SECRET, "--image-opts", &n];
    for c in cmds {
        a.extend(["-c", c]);
    }
    sh(d, "qemu-io", &a);
}

/// qemu-img's `luks` image `q.luks` (4 MiB, data in three places) and a raw
/// file `q.raw` of the same guest bytes.
fn fixture(d: &Path) {
    ok(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "luks", "--object", SECRET, "-o", FAST, "q.luks", "4M",
        ],
    );
    let cmds = [
        "write -P 0x17 0 100k",
        "write -z 1M 64k",
        "write -P 9 3M 1000",
    ];
    qemu_io(d, "q.luks", &cmds);
    ok(d, "qemu-img", &["create", "-q", "-f", "raw", "q.raw", "4M"]);
    let mut a = vec!["-f", "raw"];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push("q.raw");
    sh(d, "qemu-io", &a);
}

/// `qemu-img compare` of the `luks` image `file` with raw `raw` succeeds.
fn reads_as(d: &Path, file: &str, raw: &str) {
    let j = json_name(file);
    ok(
        d,
        "qemu-img",
        &["compare", "--object", SECRET, "-F", "raw", &j, raw],
    );
}

#[test]
fn luks_images_are_inspected_and_refused_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    let n = opts_name("q.luks");
    let j = json_name("q.luks");
    // Probed, without the secret: info works, the rest is refused.
    same(d, &["info", "q.luks"]);
    same(d, &["info", "--output=json", "q.luks"]);
    same(d, &["info", "-f", "luks", "q.luks"]);
    same(d, &["check", "q.luks"]);
    same(d, &["map", "q.luks"]);
    same(d, &["compare", "q.luks", "q.raw"]);
    same(d, &["convert", "-O", "raw", "q.luks", "out.raw"]);
    same(d, &["measure", "-O", "qcow2", "q.luks"]);
    same(d, &["info", &j]);
    same(d, &["info", "--output=json", &j]);
    for obj in [SECRET, WRONG] {
        for sub in [
            &["info"][..],
            &["info", "--output=json"],
            &["check"],
            &["check", "--output=json"],
            &["check", "-r", "all"],
            &["map"],
            &["map", "--output=json"],
            &["measure", "-O", "raw"],
        ] {
            let mut a = sub.to_vec();
            a.extend(["--object", obj, "--image-opts", n.as_str()]);
            same(d, &a);
            let mut a = sub.to_vec();
            a.extend(["--object", obj, j.as_str()]);
            same(d, &a);
        }
        same(d, &["compare", "--object", obj, "-F", "raw", &j, "q.raw"]);
    }
    // An id no --object defines, and a driver option luks does not have.
    let other = "driver=luks,key-secret=s9,file.filename=q.luks";
    same(d, &["map", "--object", SECRET, "--image-opts", other]);
    let bad = "driver=luks,key-secret=s0,bogus=1,file.filename=q.luks";
    same(d, &["map", "--object", SECRET, "--image-opts", bad]);
    let bad = "driver=luks,encrypt.key-secret=s0,file.filename=q.luks";
    same(d, &["info", "--object", SECRET, "--image-opts", bad]);
    // A file that is not LUKS, opened as luks.
    same(d, &["info", "-f", "luks", "q.raw"]);
    same(d, &["map", "--object", SECRET, &json_name("q.raw")]);
    assert_all_same();
}

#[test]
fn luks_images_are_created_and_measured_as_qemu_img_creates_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sizes = ["--size", "1G"];
    for o in [
        FAST,
        "key-secret=s0,iter-time=10,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv",
        "key-secret=s0,iter-time=10,cipher-alg=aes-192,hash-alg=sha512",
        "key-secret=s0,iter-time=10,ivgen-alg=plain,hash-alg=sha1",
        "key-secret=s0,iter-time=10,preallocation=falloc",
        "key-secret=s0,iter-time=10,preallocation=full",
        "key-secret=s0,iter-time=10,preallocation=metadata",
    ] {
        let what = format!("create -o {o}");
        // Each tool in a directory of its own, the same names in both.
        let mut infos = Vec::new();
        for prog in ["strata", "qemu-img"] {
            let sub = d.join(prog);
            std::fs::create_dir_all(&sub).unwrap();
            let a = [
                "create", "-f", "luks", "--object", SECRET, "-o", o, "x.luks", "3M",
            ];
            infos.push(outcome(&sub, prog, &a));
            let (code, out, err) = outcome(&sub, "qemu-img", &["info", "--output=json", "x.luks"]);
            infos.push((code, mask_random(&out), err));
            infos.push(outcome(&sub, "qemu-img", &["info", "x.luks"]));
            let last = infos.last_mut().unwrap();
            last.1 = mask_random(&last.1);
            let len = std::fs::metadata(sub.join("x.luks")).unwrap().len();
            infos.push((Some(len as i32), String::new(), String::new()));
        }
        let (ours, theirs) = infos.split_at(infos.len() / 2);
        if ours != theirs {
            differs(format!(
                "{what}\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
            ));
        }
        // QEMU writes into what strata made; both tools then read the same
        // bytes from it (unwritten sectors decrypt to the same noise).
        let s = d.join("strata");
        let j = json_name("x.luks");
        ok(
            &s,
            "qemu-io",
            &["--object", SECRET, "-c", "write -P 0x61 512 70000", &j],
        );
        ok(
            &s,
            "strata",
            &["convert", "--object", SECRET, "-O", "raw", &j, "s.raw"],
        );
        ok(
            &s,
            "qemu-img",
            &["convert", "--object", SECRET, "-O", "raw", &j, "q.raw"],
        );
        assert_eq!(
            std::fs::read(s.join("s.raw")).unwrap(),
            std::fs::read(s.join("q.raw")).unwrap(),
            "{what}: strata and QEMU read the image differently"
        );
        let mut a = vec!["measure", "--object", SECRET, "-O", "luks", "-o", o];
        a.extend(sizes);
        same(d, &a);
    }
    // Refusals, before and after the "Formatting" line.
    for o in [
        "iter-time=10",
        "key-secret=s9",
        "key-secret=s0,cipher-alg=foo",
        "key-secret=s0,cipher-mode=bogus",
        "key-secret=s0,hash-alg=sha3",
        "key-secret=s0,bogus=1",
        "key-secret=s0,iter-time=abc",
        "key-secret=s0,preallocation=bad",
        "key-secret=s0,cluster_size=4k",
        "key-secret=s0,backing_file=a.luks",
    ] {
        same(
            d,
            &[
                "create", "-f", "luks", "--object", SECRET, "-o", o, "r.luks", "1M",
            ],
        );
    }
    same(d, &["create", "-f", "luks", "r.luks", "1M"]);
    same(d, &["create", "-f", "luks", "-b", "q.luks", "r.luks", "1M"]);
    same(d, &["create", "-f", "luks", "-F", "raw", "r.luks", "1M"]);
    same(
        d,
        &[
            "create",
            "-f",
            "luks",
            "-o",
            "backing_fmt=raw",
            "r.luks",
            "1M",
        ],
    );
    same(d, &["measure", "-O", "luks", "--size", "1G"]);
    same(
        d,
        &[
            "measure",
            "--object",
            SECRET,
            "-O",
            "luks",
            "-o",
            "key-secret=s9",
            "--size",
            "1G",
        ],
    );
    assert_all_same();
}

#[test]
fn luks_images_convert_and_resize_both_ways_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    let j = json_name("q.luks");
    // Decrypting: each tool to raw, the same bytes.
    for (prog, out) in [("strata", "s.raw"), ("qemu-img", "t.raw")] {
        ok(
            d,
            prog,
            &["convert", "--object", SECRET, "-O", "raw", &j, out],
        );
    }
    assert_eq!(
        std::fs::read(d.join("s.raw")).unwrap(),
        std::fs::read(d.join("t.raw")).unwrap(),
        "strata decrypts differently from qemu-img"
    );
    // Encrypting: strata converts raw and qcow2 sources to luks (QEMU's default
    // suite and CBC-ESSIV); QEMU reads back the source, strata reads QEMU's.
    ok(
        d,
        "qemu-img",
        &["convert", "-O", "qcow2", "q.raw", "q.qcow2"],
    );
    for (i, extra) in ["", ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv"]
        .iter()
        .enumerate()
    {
        let o = format!("{FAST}{extra}");
        for src in ["q.raw", "q.qcow2"] {
            let (s, q) = (format!("s{i}.luks"), format!("q{i}.luks"));
            for (prog, out) in [("strata", &s), ("qemu-img", &q)] {
                let _ = std::fs::remove_file(d.join(out));
                ok(
                    d,
                    prog,
                    &[
                        "convert", "--object", SECRET, "-O", "luks", "-o", &o, src, out,
                    ],
                );
            }
            reads_as(d, &s, "q.raw");
            let (js, jq) = (json_name(&s), json_name(&q));
            ok(d, "strata", &["compare", "--object", SECRET, &js, &jq]);
            ok(
                d,
                "strata",
                &["compare", "--object", SECRET, "-F", "raw", &jq, "q.raw"],
            );
            same(d, &["compare", "--object", SECRET, &js, &jq]);
            let lens: Vec<u64> = [&s, &q]
                .iter()
                .map(|f| std::fs::metadata(d.join(f)).unwrap().len())
                .collect();
            assert_eq!(lens[0], lens[1], "{o} from {src}: file lengths");
        }
    }
    // Resize: grow, shrink refused without --shrink, shrink, each tool on its
    // own copy; the copies stay alike and QEMU reads strata's.
    for (i, args) in [
        &["+1M"][..],
        &["8M"],
        &["2M"],
        &["--shrink", "2M"],
        &["--shrink", "1000"],
        &["--preallocation=falloc", "+1M"],
    ]
    .iter()
    .enumerate()
    {
        let what = format!("resize {}", args.join(" "));
        let (ours, theirs) = same_on_named_copies(d, i, "q.luks", &what, &|f| {
            let mut a = vec!["resize".to_string(), "--object".into(), SECRET.into()];
            a.extend(args.iter().map(|s| s.to_string()));
            a.push(json_name(f));
            a
        });
        let (jo, jt) = (json_name(&ours), json_name(&theirs));
        let (code, out, err) = outcome(d, "qemu-img", &["compare", "--object", SECRET, &jo, &jt]);
        if code != Some(0) {
            differs(format!("{what}: compare {code:?} {out}{err}"));
        }
        let len = |f: &str| std::fs::metadata(d.join(f)).unwrap().len();
        if len(&ours) != len(&theirs) {
            differs(format!(
                "{what}: file lengths {} {}",
                len(&ours),
                len(&theirs)
            ));
        }
    }
    assert_all_same();
}

#[test]
fn luks_key_slots_are_amended_as_qemu_img_amends_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    let s1 = "secret,id=s1,data=Other";
    // Each request on its own pair of copies; both tools must print the same
    // and leave images that open (or not) with the same passwords.
    for (i, o) in [
        "state=active,new-secret=s1,iter-time=10",
        "state=active,new-secret=s1,keyslot=3,iter-time=10",
        "state=active,new-secret=s1,keyslot=0",
        "state=active,new-secret=s1,keyslot=8",
        "state=active",
        "state=active,new-secret=s9",
        "state=active,new-secret=s1,old-secret=s0",
        "state=inactive,keyslot=0",
        "state=inactive,keyslot=1",
        "state=inactive,old-secret=s0",
        "state=inactive,old-secret=s1",
        "state=inactive",
        "state=inactive,new-secret=s1",
        "state=bad",
        "keyslot=x,state=active",
        "bogus=1",
        "size=1M",
        "cipher-alg=aes-128",
        "encrypt.state=active",
        "state=active,new-secret=s1,iter-time=abc",
    ]
    .iter()
    .enumerate()
    {
        let what = format!("amend -o {o}");
        let (ours, theirs) = same_on_named_copies(d, i, "q.luks", &what, &|f| {
            let a = [
                "amend",
                "--object",
                SECRET,
                "--object",
                s1,
                "-o",
                o,
                "--image-opts",
            ];
            let mut a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
            // Every other request shows progress: qemu-img's 0% and 100% once
            // the driver takes the options (whether it then succeeds or not),
            // only the closing newline where they are refused before.
            if i % 2 == 1 {
                a.insert(1, "-p".into());
            }
            a.push(opts_name(f));
            a
        });
        for (id, obj) in [("s0", SECRET), ("s1", s1)] {
            let opens = |f: &str| {
                let n = format!("driver=luks,key-secret={id},file.filename={f}");
                let a = [
                    "--object",
                    obj,
                    "--image-opts",
                    n.as_str(),
                    "-c",
                    "read -P 0x17 0 100k",
                ];
                outcome(d, "qemu-io", &a).0
            };
            if opens(&ours) != opens(&theirs) {
                differs(format!(
                    "{what}: the key {id} opens one copy and not the other"
                ));
            }
        }
        let info = |f: &str| mask_random(&ok(d, "qemu-img", &["info", "--output=json", f]));
        if info(&ours).replace(&ours, "IMG") != info(&theirs).replace(&theirs, "IMG") {
            differs(format!("{what}: the key slots differ"));
        }
    }
    // Without the secret, and a format that cannot be amended this way.
    same(
        d,
        &[
            "amend",
            "--object",
            s1,
            "-o",
            "state=active,new-secret=s1",
            "q.luks",
        ],
    );
    same(d, &["amend", "-o", "state=active", "-f", "raw", "q.raw"]);
    assert_all_same();
}

/// `check`, `measure`, `dd` and `bench` on `luks` images: qemu-img's words
/// where it refuses (a format without checks, a missing secret, bench's lack
/// of `--object`), its sizes where it measures, and its bytes where it copies.
#[test]
fn luks_images_are_checked_measured_copied_and_benched_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    let o = opts_name("q.luks");
    let j = json_name("q.luks");
    for args in [
        vec!["check", "--object", SECRET, "--image-opts", &o],
        vec!["check", "--object", SECRET, &j],
        vec!["check", "-f", "luks", "q.luks"],
        vec!["check", "q.luks"],
        vec![
            "measure",
            "--object",
            SECRET,
            "-O",
            "qcow2",
            "--image-opts",
            &o,
        ],
        vec!["measure", "--object", SECRET, "-O", "raw", &j],
        vec!["measure", "-O", "qcow2", "-f", "luks", "q.luks"],
        vec![
            "measure",
            "--object",
            SECRET,
            "-O",
            "luks",
            "-o",
            "key-secret=s0",
            "--size",
            "10M",
        ],
        vec![
            "measure",
            "--object",
            SECRET,
            "-O",
            "luks",
            "-o",
            "key-secret=s0",
            "q.raw",
        ],
        vec![
            "measure",
            "--object",
            SECRET,
            "-O",
            "luks",
            "-o",
            "key-secret=s0",
            &j,
        ],
        vec!["measure", "-O", "luks", "--size", "10M"],
        vec![
            "measure",
            "--object",
            SECRET,
            "-O",
            "luks",
            "-o",
            "key-secret=s9",
            "--size",
            "1M",
        ],
        vec!["dd", "-f", "luks", "if=q.luks", "of=x.raw"],
        vec!["dd", "-O", "luks", "if=q.raw", "of=x.luks"],
        vec!["bench", "-c", "4", "--object", SECRET, "q.luks"],
        vec!["bench", "-c", "4", &j],
        vec!["bench", "-c", "4", "-f", "luks", "q.luks"],
        vec!["bench", "-c", "4", "--image-opts", &o],
    ] {
        same(d, &args);
    }
    // dd decrypts: both tools leave the same raw bytes.
    let input = format!("if={o}");
    for (n, extra) in [(0, vec![]), (1, vec!["count=40", "skip=3"])] {
        let run = |tool: &str| {
            let out = format!("of={tool}{n}.raw");
            let mut a = vec!["dd", "--object", SECRET, "--image-opts", "bs=4k", &out];
            a.push(&input);
            a.extend(extra.iter().copied());
            outcome(d, tool, &a)
        };
        let (ours, theirs) = (run("strata"), run("qemu-img"));
        if ours != theirs {
            differs(format!("dd {extra:?}: {ours:?} vs {theirs:?}"));
        }
        let n_ours = format!("strata{n}.raw");
        let n_theirs = format!("qemu-img{n}.raw");
        common::same_bytes(d, &n_ours, &n_theirs, &format!("dd {extra:?}"));
    }
    assert_all_same();
}

#[test]
fn damaged_luks_headers_are_refused_in_qemu_img_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    let base = std::fs::read(d.join("q.luks")).unwrap();
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    type Damage<'a> = (&'a str, &'a dyn Fn(&mut Vec<u8>));
    let cases: [Damage; 9] = [
        ("short", &|b| b.truncate(600)),
        ("cut", &|b| b.truncate(5000)),
        ("magic", &|b| b[0] = b'X'),
        ("version", &|b| b[6..8].copy_from_slice(&[0, 2])),
        ("hash", &|b| b[72..104].copy_from_slice(&[b'm'; 32])),
        ("stripes", &|b| put32(b, 208 + 44, u32::MAX)),
        ("payload", &|b| put32(b, 104, 0xffff_0000)),
        ("overlap", &|b| put32(b, 208 + 40, 1)),
        ("keybytes", &|b| put32(b, 108, 0)),
    ];
    for (name, damage) in cases {
        let mut b = base.clone();
        damage(&mut b);
        let f = format!("{name}.luks");
        std::fs::write(d.join(&f), b).unwrap();
        same(d, &["info", "-f", "luks", &f]);
        same(d, &["info", "--output=json", "-f", "luks", &f]);
        same(
            d,
            &["map", "--object", SECRET, "--image-opts", &opts_name(&f)],
        );
        same(d, &["check", "--object", SECRET, &json_name(&f)]);
    }
    assert_all_same();
}
