//! An output is never one of the command's inputs, nor an image in use: `convert`
//! and `create` refuse, with qemu-img's words, before any byte of any file changes.
//! Each case runs through both tools on identical fresh files; where qemu-img
//! refuses cleanly its output must be matched byte for byte, and where it damages a
//! file first (it compares names, or refuses only once the damage is done) strata
//! must print the same refusal and leave every file as it was.

mod common;

use common::outcome;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The files of the scene: `base` with data, `top` over it (with data of its own),
/// an unrelated `other`, and the links `lnk -> base` (symlink) and `hard` (a hard
/// link to `base`).
fn scene(dir: &Path) {
    let q = |args: &[&str]| common::sh(dir, "qemu-img", args);
    let io = |f: &str, cmd: &str| common::sh(dir, "qemu-io", &["-f", "qcow2", "-c", cmd, f]);
    q(&["create", "-q", "-f", "qcow2", "base", "1M"]);
    io("base", "write -P 0x11 0 64k");
    q(&[
        "create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", "top",
    ]);
    io("top", "write -P 0x22 64k 64k");
    q(&["create", "-q", "-f", "qcow2", "other", "1M"]);
    std::os::unix::fs::symlink("base", dir.join("lnk")).unwrap();
    std::fs::hard_link(dir.join("base"), dir.join("hard")).unwrap();
}

/// Every regular file of `dir` with its bytes.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

/// What running `args` gives: (exit code, stdout, stderr).
type Outcome = (Option<i32>, String, String);

/// Run `args` with `prog` on a fresh scene; the outcome and whether every file of
/// the scene is as it was (none changed, none added, none removed).
fn on_fresh_scene(prog: &str, args: &[&str]) -> (Outcome, bool) {
    let dir = tempfile::tempdir().unwrap();
    scene(dir.path());
    let before = contents(dir.path());
    let outcome = outcome(dir.path(), prog, args);
    (outcome, contents(dir.path()) == before)
}

/// strata refuses `args` with exit 1 and leaves every file untouched; its output is
/// qemu-img's. Returns whether qemu-img left the files untouched too.
fn refused_as_qemu_img_refuses(args: &[&str]) -> bool {
    let (ours, ours_kept) = on_fresh_scene("strata", args);
    let (theirs, theirs_kept) = on_fresh_scene("qemu-img", args);
    assert_eq!(ours.0, Some(1), "`img {}`: {ours:?}", args.join(" "));
    assert!(ours_kept, "`img {}` changed a file", args.join(" "));
    assert_eq!(
        ours,
        theirs,
        "`img {}`: strata, then qemu-img",
        args.join(" ")
    );
    theirs_kept
}

#[test]
fn convert_and_create_refuse_outputs_that_qemu_img_refuses_before_touching_anything() {
    let cases: &[&[&str]] = &[
        // The output is the source's backing file, which -B takes out of the
        // source's open chain (strata used to replace it and exit 0).
        &[
            "convert", "-O", "qcow2", "-B", "other", "-F", "qcow2", "top", "base",
        ],
        &[
            "convert", "-O", "qcow2", "-B", "base", "-F", "qcow2", "top", "base",
        ],
        // -n: the overlay's data used to be written into its own backing file.
        &[
            "convert", "-n", "-O", "qcow2", "-B", "base", "-F", "qcow2", "top", "base",
        ],
        &["convert", "-n", "-O", "qcow2", "top", "base"],
        &["convert", "-O", "qcow2", "top", "top"],
        &["convert", "-O", "raw", "top", "base"],
        // The same file under another name.
        &["convert", "-O", "qcow2", "top", "lnk"],
        &["convert", "-O", "qcow2", "top", "hard"],
        &[
            "convert", "-n", "-O", "qcow2", "-B", "other", "-F", "qcow2", "top", "hard",
        ],
        // An image that would be its own backing file.
        &["create", "-f", "qcow2", "-b", "base", "-F", "qcow2", "base"],
        &[
            "create", "-f", "qcow2", "-u", "-b", "base", "-F", "qcow2", "base", "2M",
        ],
    ];
    for args in cases {
        assert!(
            refused_as_qemu_img_refuses(args),
            "qemu-img is expected to refuse `{}` cleanly",
            args.join(" ")
        );
    }
}

#[test]
fn outputs_qemu_img_damages_before_refusing_are_refused_untouched_with_its_words() {
    // qemu-img truncates the output, then its locks refuse the image it made (the
    // output is the file -B names, or deeper in that chain): same words, no damage.
    let cases: &[&[&str]] = &[
        &[
            "convert", "-O", "qcow2", "-B", "other", "-F", "qcow2", "top", "other",
        ],
        &[
            "convert", "-O", "qcow2", "-B", "top", "-F", "qcow2", "other", "top",
        ],
        &[
            "convert", "-O", "qcow2", "-B", "top", "-F", "qcow2", "other", "base",
        ],
    ];
    for args in cases {
        assert!(
            !refused_as_qemu_img_refuses(args),
            "qemu-img now refuses `{}` cleanly: move the case",
            args.join(" ")
        );
    }
}

#[test]
fn outputs_that_are_inputs_by_identity_are_refused_where_qemu_img_compares_names() {
    // qemu-img compares the names only, and replaces base with an image that
    // names itself or its own overlay as backing file (exit 0).
    let same_file = |out: &str| {
        format!("PROG: {out}: Error: Trying to create an image with the same filename as the backing file\n")
    };
    let below = |out: &str, depth: usize| {
        format!(
            "PROG: Could not open '{out}': {}Failed to get shared \"write\" lock\nIs another process using the image [{out}]?\n",
            "Could not open backing file: ".repeat(depth)
        )
    };
    let summary = |out: &str, b: &str| {
        format!("Formatting '{out}', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 backing_file={b} backing_fmt=qcow2 lazy_refcounts=off refcount_bits=16\n")
    };
    let cases: Vec<(Vec<&str>, Outcome)> = vec![
        (
            vec![
                "create", "-f", "qcow2", "-b", "./base", "-F", "qcow2", "base",
            ],
            (Some(1), String::new(), same_file("base")),
        ),
        (
            vec!["create", "-f", "qcow2", "-b", "lnk", "-F", "qcow2", "base"],
            (Some(1), String::new(), same_file("base")),
        ),
        (
            vec!["create", "-f", "qcow2", "-b", "base", "-F", "qcow2", "hard"],
            (Some(1), String::new(), same_file("hard")),
        ),
        (
            vec!["create", "-f", "qcow2", "-b", "top", "-F", "qcow2", "base"],
            (Some(1), summary("base", "top"), below("base", 2)),
        ),
        (
            vec![
                "convert", "-n", "-O", "qcow2", "-B", "top", "-F", "qcow2", "other", "base",
            ],
            (Some(1), String::new(), below("base", 2)),
        ),
    ];
    for (args, expected) in cases {
        let (ours, kept) = on_fresh_scene("strata", &args);
        assert_eq!(ours, expected, "`img {}`", args.join(" "));
        assert!(kept, "`img {}` changed a file", args.join(" "));
        let (_, theirs_kept) = on_fresh_scene("qemu-img", &args);
        assert!(!theirs_kept, "qemu-img now refuses `{}`", args.join(" "));
    }
}

/// A qemu-nbd serving `image` (qcow2) read-write on a socket in `dir`, holding its
/// write locks until killed.
fn qemu_nbd_holding(dir: &Path, image: &str) -> Child {
    let sock = dir.join("nbd.sock");
    let mut child = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(dir.join(image))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd must be installed");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !sock.exists() {
        assert!(child.try_wait().unwrap().is_none(), "qemu-nbd exited");
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

#[test]
fn an_output_a_running_qemu_nbd_holds_is_refused_as_qemu_img_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    scene(d);
    let mut nbd = qemu_nbd_holding(d, "other");
    let held = std::fs::read(d.join("other")).unwrap();
    let cases: &[&[&str]] = &[
        &["create", "-f", "qcow2", "other", "1M"],
        &["create", "-f", "raw", "other", "1M"],
        &["convert", "-O", "qcow2", "base", "other"],
        &["convert", "-O", "raw", "base", "other"],
        &["convert", "-n", "-O", "qcow2", "base", "other"],
    ];
    let mut failures = Vec::new();
    for args in cases {
        let ours = outcome(d, "strata", args);
        let theirs = outcome(d, "qemu-img", args);
        if ours != theirs || ours.0 != Some(1) {
            failures.push(format!("`img {}`: {ours:?} vs {theirs:?}", args.join(" ")));
        }
        assert_eq!(std::fs::read(d.join("other")).unwrap(), held, "{args:?}");
    }
    nbd.kill().unwrap();
    nbd.wait().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_create_that_fails_leaves_no_new_file_and_never_removes_an_old_one() {
    let long = "a".repeat(1100);
    // (args, output name). qemu-img removes the new file too, except raw's (it
    // leaves an empty one); it also deletes an existing file it failed to
    // overwrite, where strata leaves it as it was.
    let cases: Vec<Vec<&str>> = vec![
        vec!["create", "-f", "qcow2", "new", "1E"],
        vec!["create", "-f", "raw", "new", "1E"],
        vec![
            "create", "-f", "qcow2", "-u", "-b", &long, "-F", "qcow2", "new", "1M",
        ],
        vec!["create", "-f", "qcow2", "other", "1E"],
        vec![
            "create", "-f", "qcow2", "-u", "-b", &long, "-F", "raw", "other", "1M",
        ],
    ];
    for args in cases {
        let (ours, kept) = on_fresh_scene("strata", &args);
        let (theirs, _) = on_fresh_scene("qemu-img", &args);
        assert_eq!(ours, theirs, "`img {}`", args.join(" "));
        assert_eq!(ours.0, Some(1), "`img {}`", args.join(" "));
        assert!(kept, "`img {}` left or changed a file", args.join(" "));
    }
}

#[test]
fn rebase_never_puts_an_image_below_itself() {
    // Safe mode: qemu-img's locks refuse it, and strata says the same.
    for args in [
        &["rebase", "-b", "top", "-F", "qcow2", "top"][..],
        &["rebase", "-b", "top", "-F", "qcow2", "base"][..],
    ] {
        assert!(refused_as_qemu_img_refuses(args), "{args:?}");
    }
    // -u: qemu-img writes the loop (exit 0, an image nothing can open again);
    // strata refuses it with the words of safe mode.
    for (image, levels) in [("top", 0), ("base", 1)] {
        let args = ["rebase", "-u", "-b", "top", "-F", "qcow2", image];
        let (ours, kept) = on_fresh_scene("strata", &args);
        let expected = format!(
            "PROG: Could not open new backing file 'top': {}Failed to get shared \"write\" lock\nIs another process using the image [{image}]?\n",
            "Could not open backing file: ".repeat(levels)
        );
        assert_eq!(ours, (Some(1), String::new(), expected), "{args:?}");
        assert!(kept, "{args:?} changed a file");
        let (theirs, theirs_kept) = on_fresh_scene("qemu-img", &args);
        assert_eq!(theirs.0, Some(0), "{args:?}: qemu-img now refuses");
        assert!(!theirs_kept);
    }
}
