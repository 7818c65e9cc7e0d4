//! The command-line contract shared by every `strata img` subcommand: `--help` that
//! explains, qemu-img's exit code 1 for bad arguments, and the `qemu-img` symlink.

use std::process::Command;

const STRATA: &str = env!("CARGO_BIN_EXE_strata");
const SUBCOMMANDS: [&str; 12] = [
    "create", "info", "map", "check", "compare", "measure", "resize", "convert", "snapshot",
    "commit", "rebase", "stream",
];

#[test]
fn every_subcommand_has_help_that_exits_zero() {
    for sub in SUBCOMMANDS {
        let out = Command::new(STRATA)
            .args(["img", sub, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{sub} --help failed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage:"), "{sub} --help: {text}");
        assert!(text.len() > 200, "{sub} --help says too little: {text}");
    }
    let out = Command::new(STRATA)
        .args(["img", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in SUBCOMMANDS {
        assert!(text.contains(sub), "img --help does not list {sub}");
    }
}

#[test]
fn bad_arguments_exit_one_like_qemu_img() {
    for args in [
        &["img", "info", "--no-such-flag", "x"][..],
        &["img", "frobnicate"],
        &["img", "snapshot", "-c", "a", "-d", "b", "x"],
    ] {
        let out = Command::new(STRATA).args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty(), "{args:?} printed no error");
    }
}

#[test]
fn a_missing_image_is_a_clear_error_with_exit_one() {
    let out = Command::new(STRATA)
        .args(["img", "snapshot", "-l", "/nonexistent/disk.qcow2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("strata img: ") && err.contains("/nonexistent/disk.qcow2"),
        "{err}"
    );
}

#[test]
fn invoked_as_qemu_img_it_behaves_as_strata_img() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("qemu-img");
    std::os::unix::fs::symlink(STRATA, &link).unwrap();
    let img = dir.path().join("d.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"])
        .status()
        .expect("the real qemu-img must be installed");
    assert!(made.success());
    let out = Command::new(&link)
        .args(["snapshot", "-c", "viaLink", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&link)
        .args(["snapshot", "-l", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("viaLink"));
    let out = Command::new(&link)
        .args(["snapshot", "-a", "nope", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("qemu-img: "),
        "errors name the program as invoked"
    );
    // Scripts read the version from qemu-img's first line.
    for flag in ["--version", "-V"] {
        let out = Command::new(&link).arg(flag).output().unwrap();
        assert!(out.status.success());
        let first = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        assert!(first.starts_with("qemu-img version 10."), "{first}");
        assert!(first.contains("strata"), "{first}");
    }
}

/// `-o help` lists only options create really takes: each one, given a sample
/// value, makes an image qemu-img checks clean. No image is made by the listing.
#[test]
fn option_help_lists_exactly_what_create_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sample = |k: &str| match k {
        "backing_file" => "base.qcow2",
        "backing_fmt" => "qcow2",
        "cluster_size" => "4k",
        "compat" => "0.10",
        "compression_type" => "zstd",
        "extended_l2" | "lazy_refcounts" => "on",
        "preallocation" => "metadata",
        "refcount_bits" => "8",
        "size" => "2M",
        other => panic!("no sample value for listed option {other}"),
    };
    let run = |args: &[&str]| {
        Command::new(STRATA)
            .args(args)
            .current_dir(d)
            .output()
            .unwrap()
    };
    let ok = |args: &[&str]| {
        let out = run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&["img", "create", "-q", "-f", "qcow2", "base.qcow2", "2M"]);
    for fmt in ["qcow2", "raw"] {
        let listing = ok(&["img", "create", "-f", fmt, "-o", "help"]);
        assert!(
            listing.starts_with(&format!("Supported {fmt} options:\n")),
            "{listing}"
        );
        let via_convert = ok(&["img", "convert", "-O", fmt, "-o", "help", "base.qcow2", "x"]);
        assert_eq!(via_convert, listing);
        assert!(!d.join("x").exists(), "-o help made an image");
        let keys: Vec<String> = listing
            .lines()
            .skip(1)
            .filter_map(|l| l.trim_start().split_once('=').map(|(k, _)| k.to_string()))
            .collect();
        assert!(keys.len() >= 2, "{listing}");
        for k in keys {
            let mut v = sample(&k);
            if fmt == "raw" && k == "preallocation" {
                v = "falloc";
            }
            // v2 takes neither of the v3-only switches.
            let compat = if k == "extended_l2" || k == "lazy_refcounts" {
                ",compat=1.1"
            } else {
                ""
            };
            let name = format!("{fmt}-{k}.img");
            let opts = format!("{k}={v}{compat}");
            let mut args = vec!["img", "create", "-q", "-f", fmt, "-o", &opts, &name];
            match k.as_str() {
                "backing_file" => args.extend(["-F", "qcow2"]),
                "backing_fmt" => args.extend(["-b", "base.qcow2"]),
                _ => {}
            }
            if k != "size" {
                args.push("2M");
            }
            ok(&args);
            if fmt == "qcow2" {
                let out = Command::new("qemu-img")
                    .args(["check", &name])
                    .current_dir(d)
                    .output()
                    .expect("qemu-img must be installed");
                assert!(out.status.success(), "{opts}: check failed");
            }
        }
    }
}
