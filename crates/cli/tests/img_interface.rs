//! The command-line contract shared by every `strata img` subcommand: `--help` that
//! explains, qemu-img's exit code 1 for bad arguments, and the `qemu-img` symlink.

use std::process::Command;

const STRATA: &str = env!("CARGO_BIN_EXE_strata");
const SUBCOMMANDS: [&str; 9] = [
    "create", "info", "map", "check", "compare", "measure", "resize", "convert", "snapshot",
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
}
