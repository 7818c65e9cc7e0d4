//! The command-line contract shared by every `strata img` subcommand: `--help` that
//! explains, qemu-img's exit code 1 for bad arguments, and the `qemu-img` symlink.

mod common;

use std::process::Command;

use common::STRATA;
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
        "data_file" => "guest-data.bin",
        "extended_l2" | "lazy_refcounts" | "data_file_raw" => "on",
        "preallocation" => "metadata",
        "refcount_bits" => "8",
        "size" => "2M",
        "encrypt.cipher-alg" => "aes-128",
        "encrypt.cipher-mode" => "xts",
        "encrypt.format" => "luks",
        "encrypt.hash-alg" => "sha512",
        "encrypt.iter-time" => "10",
        "encrypt.ivgen-alg" => "plain64",
        "encrypt.ivgen-hash-alg" => "sha256",
        "encrypt.key-secret" => "sec0",
        "encryption" => "on",
        "nocow" => "on",
        "extent_size_hint" => "1M",
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
        // Naming a target adds its protocol's options, for convert as for create.
        let via_convert = ok(&["img", "convert", "-O", fmt, "-o", "help", "base.qcow2", "x"]);
        let with_target = ok(&["img", "create", "-f", fmt, "-o", "help", "x"]);
        assert_eq!(via_convert, with_target);
        assert!(!d.join("x").exists(), "-o help made an image");
        // The listing for a named target adds the file's own options.
        let keys: Vec<String> = with_target
            .lines()
            .skip(1)
            .filter_map(|l| l.trim_start().split_once('=').map(|(k, _)| k.to_string()))
            .collect();
        assert!(keys.len() >= 2, "{with_target}");
        for k in keys {
            let mut v = sample(&k);
            if fmt == "raw" && k == "preallocation" {
                v = "falloc";
            }
            // v2 takes neither of the v3-only switches; the raw-data switch needs a
            // data file.
            // The encryption options need a secret (and a format but for the
            // old switch); luks gets a short key derivation.
            let luks_rest = [
                ("encrypt.format", "luks"),
                ("encrypt.key-secret", "sec0"),
                ("encrypt.iter-time", "10"),
            ]
            .iter()
            .filter(|(o, _)| *o != k)
            .map(|(o, v)| format!(",{o}={v}"))
            .collect::<String>();
            let encrypted = k.starts_with("encrypt");
            let compat = match k.as_str() {
                "extended_l2" | "lazy_refcounts" => ",compat=1.1".to_string(),
                "data_file_raw" => ",data_file=raw-data.bin".to_string(),
                "encryption" => ",encrypt.key-secret=sec0".to_string(),
                "encrypt.ivgen-hash-alg" => format!(",encrypt.ivgen-alg=essiv{luks_rest}"),
                _ if encrypted => luks_rest,
                _ => String::new(),
            };
            let name = format!("{fmt}-{k}.img");
            let opts = format!("{k}={v}{compat}");
            let mut args = vec!["img", "create", "-q", "-f", fmt, "-o", &opts, &name];
            if encrypted {
                args.extend(["--object", "secret,id=sec0,data=pw"]);
            }
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
                let opened = format!("driver=qcow2,file.filename={name},encrypt.key-secret=sec0");
                let check: Vec<&str> = if encrypted {
                    let obj = "secret,id=sec0,data=pw";
                    vec!["check", "--object", obj, "--image-opts", &opened]
                } else {
                    vec!["check", &name]
                };
                let out = Command::new("qemu-img")
                    .args(&check)
                    .current_dir(d)
                    .output()
                    .expect("qemu-img must be installed");
                assert!(out.status.success(), "{opts}: check failed");
            }
        }
    }
}

/// Run `strata img ARGS` (words split at spaces) in `dir`: exit code and stderr.
fn img_in(dir: &std::path::Path, args: &str) -> (Option<i32>, String) {
    let args: Vec<&str> = args.split(' ').collect();
    let out = common::run(dir, "strata", &args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn engine_refusals_get_the_command_lines_advice_from_their_kind() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for args in [
        "create -q -f qcow2 base.qcow2 1M",
        "create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2",
        "create -q -f qcow2 other.qcow2 1M",
    ] {
        assert_eq!(img_in(d, args).0, Some(0), "{args:?}");
    }
    // The backing format extension becomes one of an unknown type (ignored), so
    // the overlay records no backing format; the base gets the corrupt bit.
    let mut top = std::fs::read(d.join("top.qcow2")).unwrap();
    let at = top
        .windows(4)
        .position(|w| w == 0xe279_2acau32.to_be_bytes())
        .expect("a backing format extension");
    top[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    std::fs::write(d.join("top.qcow2"), top).unwrap();
    let mut base = std::fs::read(d.join("base.qcow2")).unwrap();
    base[79] |= 2;
    std::fs::write(d.join("bad.qcow2"), base).unwrap();

    let unknown = "Could not open 'top.qcow2': Could not open backing file 'base.qcow2' of \
        'top.qcow2': its format is not recorded in the image.\nGive it with -F FMT, or \
        record it with 'strata img rebase -u -b base.qcow2 -F FMT top.qcow2'\n";
    let corrupt = "qcow2: Image is corrupt; cannot be opened read/write\n";
    for (args, code, says) in [
        ("map top.qcow2", 1, format!("strata img: {unknown}")),
        (
            "compare top.qcow2 bad.qcow2",
            2,
            format!("strata img: {unknown}"),
        ),
        (
            "rebase -b top.qcow2 -F qcow2 bad.qcow2",
            1,
            format!("strata img: Could not open 'bad.qcow2': {corrupt}"),
        ),
        (
            "resize bad.qcow2 2M",
            1,
            format!("strata img: Could not open 'bad.qcow2': {corrupt}"),
        ),
        (
            "rebase -b top.qcow2 -F qcow2 other.qcow2",
            1,
            format!("strata img: Could not open new backing file 'top.qcow2': {unknown}"),
        ),
    ] {
        assert_eq!(img_in(d, args), (Some(code), says), "{args:?}");
    }
}
