//! qcow2 overlays over encrypted backing files through both tools: a plain
//! `luks` image (`-F luks`, its secret as `backing.key-secret`) and a qcow2
//! image with LUKS encryption (`backing.encrypt.key-secret`). create (with and
//! without `-u`, the size taken from the backing file's header, which needs no
//! secret), info (with `--backing-chain`), map, check, compare, convert (with
//! `-B`), commit and rebase, with the backing file's secret, without it and
//! with a wrong one. stdout, stderr and the exit code must be identical, and
//! the images the two tools leave alike.

mod common;

use common::luks::SECRET;
use common::{assert_all_same, copy_dir, differs, ok, outcome, same};
use std::path::Path;

const WRONG: &str = "secret,id=s0,data=nope";

/// The `--image-opts` name of the overlay `file` whose backing file opens with
/// secret `s0` under `key` (`key-secret` for luks, `encrypt.key-secret` for qcow2).
fn overlay_opts(file: &str, key: &str) -> String {
    format!("driver=qcow2,file.filename={file},backing.{key}=s0")
}

/// In `d`: `b.luks` (a luks image of 4 MiB, data at 0 and 3 MiB), `b.qcow2`
/// (the same guest data in a LUKS-encrypted qcow2 image), and over each a
/// qcow2 overlay made by qemu-img, `ol.qcow2` and `oq.qcow2`, each with data of
/// its own at 64 KiB; `r.raw`, 4 MiB of zeroes. Returns the overlays with their backing-secret key.
fn fixture(d: &Path) -> [(&'static str, &'static str); 2] {
    let fast = ["--object", SECRET];
    let mut a = vec!["create", "-q", "-f", "luks"];
    a.extend(fast);
    a.extend(["-o", "key-secret=s0,iter-time=10", "b.luks", "4M"]);
    ok(d, "qemu-img", &a);
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    a.extend(fast);
    a.extend([
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "b.qcow2",
        "4M",
    ]);
    ok(d, "qemu-img", &a);
    let io = |opts: &str, cmds: &[&str]| {
        let mut a = vec!["--object", SECRET, "--image-opts", opts];
        for c in cmds {
            a.extend(["-c", c]);
        }
        ok(d, "qemu-io", &a);
    };
    let base = ["write -P 0x17 0 100k", "write -P 9 3M 1000"];
    io("driver=luks,key-secret=s0,file.filename=b.luks", &base);
    io(
        "driver=qcow2,encrypt.key-secret=s0,file.filename=b.qcow2",
        &base,
    );
    let overlays = [
        ("ol.qcow2", "key-secret"),
        ("oq.qcow2", "encrypt.key-secret"),
    ];
    for ((o, key), (b, f)) in overlays
        .iter()
        .zip([("b.luks", "luks"), ("b.qcow2", "qcow2")])
    {
        ok(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-b", b, "-F", f, o],
        );
        io(&overlay_opts(o, key), &["write -P 5 64k 64k"]);
    }
    std::fs::write(d.join("r.raw"), vec![0u8; 4 << 20]).unwrap();
    overlays
}

#[test]
fn overlays_over_encrypted_backing_files_are_created_as_qemu_img_creates_them() {
    let dir = tempfile::tempdir().unwrap();
    let fx = dir.path().join("fx");
    std::fs::create_dir(&fx).unwrap();
    fixture(&fx);
    for (b, f) in [("b.luks", "luks"), ("b.qcow2", "qcow2")] {
        // The size comes from the backing file's header: no secret needed,
        // a wrong one not even looked at.
        for obj in [&[][..], &["--object", SECRET], &["--object", WRONG]] {
            for size in [&[][..], &["4M"], &["1M"]] {
                for u in [&[][..], &["-u"]] {
                    let mut a = vec!["create", "-f", "qcow2", "-b", b, "-F", f];
                    a.extend(obj);
                    a.extend(u);
                    a.push("n.qcow2");
                    a.extend(size);
                    same_in_dirs(&fx, 0, &a);
                    assert_all_same();
                }
            }
        }
        // Probed, the format is named and refused.
        same_in_dirs(&fx, 0, &["create", "-f", "qcow2", "-b", b, "n.qcow2"]);
    }
    // A backing file that is not of the format given: the driver's own words.
    for (b, f) in [("r.raw", "qcow2"), ("r.raw", "luks"), ("b.qcow2", "luks")] {
        same_in_dirs(
            &fx,
            0,
            &["create", "-f", "qcow2", "-b", b, "-F", f, "n.qcow2"],
        );
    }
    assert_all_same();
}

#[test]
fn overlays_over_encrypted_backing_files_are_read_as_qemu_img_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (o, key) in fixture(d) {
        let n = overlay_opts(o, key);
        // By file name: metadata alone works, data needs the backing secret.
        same(d, &["info", o]);
        same(d, &["info", "--backing-chain", o]);
        same(d, &["info", "--backing-chain", "--output=json", o]);
        same(d, &["check", o]);
        same(d, &["map", o]);
        same(d, &["compare", o, o]);
        // With the backing secret, a wrong one, and an id no --object defines.
        for obj in [&["--object", SECRET][..], &["--object", WRONG], &[]] {
            for sub in [
                &["map"][..],
                &["map", "--output=json"],
                &["check"],
                &["info"],
                &["info", "--backing-chain"],
            ] {
                let mut a = sub.to_vec();
                a.extend(obj);
                a.extend(["--image-opts", n.as_str()]);
                same(d, &a);
            }
            let mut a = vec!["compare"];
            a.extend(obj);
            a.extend(["--image-opts", n.as_str(), n.as_str()]);
            same(d, &a);
            let mut a = vec!["convert"];
            a.extend(obj);
            a.extend(["--image-opts", n.as_str(), "-O", "raw", "out.raw"]);
            same(d, &a);
        }
    }
    assert_all_same();
}

#[test]
fn overlays_over_encrypted_backing_files_are_converted_committed_and_rebased_alike() {
    let dir = tempfile::tempdir().unwrap();
    let fx = dir.path().join("fx");
    std::fs::create_dir(&fx).unwrap();
    let mut n = 0;
    let mut step = |args: &[&str]| {
        n += 1;
        same_in_dirs(&fx, n, args);
    };
    for (o, key) in fixture(&fx) {
        let opts = overlay_opts(o, key);
        let with_secret = |sub: &[&'static str], tail: &[&'static str]| {
            let mut a: Vec<String> = sub.iter().map(|s| s.to_string()).collect();
            a.extend(["--object", SECRET, "--image-opts", &opts].map(String::from));
            a.extend(tail.iter().map(|s| s.to_string()));
            a
        };
        let runs = [
            // A whole copy, then ones that keep an encrypted backing file.
            with_secret(&["convert"], &["-O", "qcow2", "c.qcow2"]),
            with_secret(
                &["convert"],
                &["-O", "qcow2", "-B", "b.luks", "-F", "luks", "c.qcow2"],
            ),
            with_secret(
                &["convert"],
                &["-O", "qcow2", "-B", "b.qcow2", "-F", "qcow2", "c.qcow2"],
            ),
            with_secret(&["convert", "-n"], &["-O", "raw", "r.raw"]),
            // Commit into the encrypted backing file.
            with_secret(&["commit"], &[]),
            with_secret(&["commit", "-d"], &[]),
            // Rebase: unsafe onto the other base, safe onto none.
            with_secret(&["rebase"], &["-u", "-b", "b.luks", "-F", "luks"]),
            with_secret(&["rebase"], &["-u", "-b", "b.qcow2", "-F", "qcow2"]),
            with_secret(&["rebase"], &["-b", ""]),
        ];
        for a in &runs {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            step(&a);
        }
        // Without the backing file's secret.
        step(&["commit", o]);
        step(&["rebase", "-b", "", o]);
        step(&["convert", "-O", "qcow2", o, "c.qcow2"]);
    }
    assert_all_same();
}

/// How a file of the fixture opens with its secrets, as `--image-opts`: the
/// `luks` base, the encrypted qcow2 base, and qcow2 overlays whose backing
/// file is `b.luks` or `b.qcow2` (read from the overlay's header).
fn opts_for(path: &Path) -> String {
    let p = path.display();
    let name = path.file_name().unwrap().to_string_lossy();
    if name.ends_with(".luks") {
        return format!("driver=luks,key-secret=s0,file.filename={p}");
    }
    if name.ends_with(".raw") {
        return format!("driver=raw,file.filename={p}");
    }
    let head = std::fs::read(path).unwrap();
    let has = |needle: &[u8]| head.windows(needle.len()).any(|w| w == needle);
    if name == "b.qcow2" {
        format!("driver=qcow2,encrypt.key-secret=s0,file.filename={p}")
    } else if has(b"b.luks") {
        format!("driver=qcow2,file.filename={p},backing.key-secret=s0")
    } else if has(b"b.qcow2") {
        format!("driver=qcow2,file.filename={p},backing.encrypt.key-secret=s0")
    } else {
        format!("driver=qcow2,file.filename={p}")
    }
}

/// Run `args` with each tool in its own copy of the directory `fixture` and
/// record any difference in what they print or in the files they leave: the
/// same names, the same `qemu-img info --output=json` (but for the allocated
/// size and the names) and the same guest data, read with the secrets.
fn same_in_dirs(fixture: &Path, n: usize, args: &[&str]) {
    let parent = fixture.parent().unwrap();
    let (ours, theirs) = (parent.join(format!("o{n}")), parent.join(format!("t{n}")));
    for copy in [&ours, &theirs] {
        if copy.exists() {
            std::fs::remove_dir_all(copy).unwrap();
        }
        copy_dir(fixture, copy);
    }
    let what = format!("img {}", args.join(" "));
    let (r_ours, r_theirs) = (
        outcome(&ours, "strata", args),
        outcome(&theirs, "qemu-img", args),
    );
    if r_ours != r_theirs {
        differs(format!(
            "`{what}`\n  strata:   {r_ours:?}\n  qemu-img: {r_theirs:?}"
        ));
    }
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    if names(&ours) != names(&theirs) {
        differs(format!(
            "`{what}`: files {:?} vs {:?}",
            names(&ours),
            names(&theirs)
        ));
        return;
    }
    for f in names(&ours) {
        let info = |d: &Path| {
            let (_, out, err) = outcome(d, "qemu-img", &["info", "--output=json", &f]);
            (out + &err)
                .lines()
                .filter(|l| !l.contains("actual-size") && !l.contains("\"filename\""))
                .collect::<Vec<_>>()
                .join("\n")
        };
        if info(&ours) != info(&theirs) {
            differs(format!(
                "`{what}` {f}: info\n{}\n---\n{}",
                info(&ours),
                info(&theirs)
            ));
        }
        let (a, b) = (opts_for(&ours.join(&f)), opts_for(&theirs.join(&f)));
        let args = ["compare", "--object", SECRET, "--image-opts", &a, &b];
        let (code, out, err) = outcome(parent, "qemu-img", &args);
        if code != Some(0) {
            differs(format!("`{what}` {f}: compare\n{out}{err}"));
        }
    }
}
