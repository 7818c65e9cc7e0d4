//! `-o help` (and `-o ?`) of `create`, `convert` and `amend`: scripts read these
//! listings to learn which options a format takes, so strata prints qemu-img's
//! layout: the header line, the option names with their `<type>`, padded to
//! qemu-img's column, in qemu-img's order, the closing lines, and the same exit
//! codes and refusals (an unknown format, a target name with an unknown or
//! unsuitable protocol, a format without amendable options).
//!
//! The description after " - " is prose, and strata's is its own: every option
//! line is compared exactly up to its " - " (name, type, padding) and must have
//! a description after it.

mod common;

use common::opthelp::layout;
use common::{assert_all_same, differs, outcome, sh};
use std::path::Path;

/// Run `args` with both tools in `dir` and record any difference in exit code,
/// stderr, or the listing's layout (see [`layout`]).
fn same_listing(dir: &Path, args: &[&str]) {
    let (c1, o1, e1) = outcome(dir, "strata", args);
    let (c2, o2, e2) = outcome(dir, "qemu-img", args);
    let ours = (c1, layout(&o1), e1);
    let theirs = (c2, layout(&o2), e2);
    if ours != theirs || ours.1.is_none() {
        differs(format!(
            "`img {}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}\n  strata's stdout: {o1:?}",
            args.join(" ")
        ));
    }
}

#[test]
fn create_option_listings_have_qemu_imgs_layout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["create", "-f", "qcow2", "-o", "help"][..],
        &["create", "-f", "qcow2", "-o", "?"],
        &["create", "-f", "qcow2", "-o", "help,size=1"],
        &["create", "-f", "qcow2", "-o", "size=1", "-o", "help"],
        &["create", "-f", "qcow2", "-o", "cluster_size=bad,help"],
        &["create", "-f", "raw", "-o", "help"],
        &["create", "-o", "help"],
        &["create", "-f", "luks", "-o", "help"],
        &["create", "-f", "file", "-o", "help"],
        // With a target, the protocol's options join the format's.
        &["create", "-f", "qcow2", "-o", "help", "x.qcow2"],
        &["create", "-f", "raw", "-o", "help", "x.raw"],
        &["create", "-o", "help", "x.raw"],
        &["create", "-f", "luks", "-o", "help", "x.luks"],
        &["create", "-f", "file", "-o", "help", "x"],
        &["create", "-f", "qcow2", "-o", "help", "file:x.qcow2"],
        &["create", "-f", "qcow2", "-o", "help", "./a:b"],
        &["create", "-f", "qcow2", "-o", "help", "/no/such/dir/x"],
        &["create", "-f", "raw", "-o", "help", "/dev/null"],
        &["create", "-f", "qcow2", "-o", "help", "/dev/null"],
        &["create", "-f", "raw", "-o", "help", "nbd://localhost/x"],
        &["create", "-f", "qcow2", "-o", "help", "nbd:localhost:10809"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "help",
            "nbd+unix:///x?socket=/s",
        ],
        // The listing needs no size and ignores what follows it.
        &[
            "create", "-f", "qcow2", "-o", "help", "x.qcow2", "1G", "extra",
        ],
        &[
            "create", "-f", "qcow2", "-o", "help", "-b", "missing", "x.qcow2",
        ],
    ] {
        same_listing(d, args);
    }
    assert!(
        !d.join("x.qcow2").exists() && !d.join("x.raw").exists() && !d.join("x").exists(),
        "a listing creates nothing"
    );
    assert_all_same();
}

/// qemu-img asks for a listing with an item named `help` or `?` that has no
/// value; `help=on` is an option like any other, and a name ends at the first
/// comma, doubled or not.
#[test]
fn create_help_is_an_item_without_a_value() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["create", "-f", "qcow2", "-o", "help,,x"][..],
        &["create", "-f", "qcow2", "-o", "help,,"],
        &["create", "-f", "qcow2", "-o", "foo=bar,help"],
        &["create", "-f", "qcow2", "-o", "help=on"],
        &["create", "-f", "qcow2", "-o", "?=1"],
        &["create", "-f", "qcow2", "-o", "x=help"],
        &["create", "-f", "qcow2", "-o", "a=b,,help"],
        &["create", "-f", "qcow2", "-o", "nohelp"],
        &["create", "-f", "qcow2", "-o", ",help"],
        &["create", "-f", "qcow2", "-o", "help,"],
        &["create", "-f", "qcow2", "-o", "help", "-o", ""],
    ] {
        same_listing(d, args);
    }
    assert_all_same();
}

/// What qemu-img refuses to list: a format it does not have, a target whose
/// protocol it does not know or cannot create on. Without a listing, the size
/// is read before any extra argument is refused.
#[test]
fn create_listing_refusals_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["create", "-f", "foo", "-o", "help"][..],
        &["create", "-f", "foo", "-o", "help", "x"],
        &["create", "-f", "qcow2", "-o", "help", "foo:bar"],
        &["create", "-f", "qcow2", "-o", "help", "a:b"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "help",
            "json:{\"driver\":\"file\"}",
        ],
        &["create", "-f", "raw", "-o", "help", "null-co://"],
        &["create", "-f", "raw", "-o", "help", "blkdebug::x"],
        &["create", "-f", "raw", "-o", "help", "blkverify:a:b"],
        &["create", "-f", "qcow2", "x.qcow2", "foo", "extra"],
        &["create", "-f", "qcow2", "x.qcow2", "1M", "extra"],
    ] {
        same_listing(d, args);
    }
    assert!(!d.join("x.qcow2").exists());
    assert_all_same();
}

#[test]
fn convert_option_listings_have_qemu_imgs_layout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["convert", "-O", "qcow2", "-o", "help"][..],
        &["convert", "-O", "raw", "-o", "help"],
        &["convert", "-o", "help"],
        &["convert", "-O", "luks", "-o", "help"],
        &["convert", "-O", "file", "-o", "help"],
        // One file name is a source: no target yet.
        &["convert", "-O", "qcow2", "-o", "help", "a"],
        // The last of two or more is the target (none need exist).
        &["convert", "-O", "qcow2", "-o", "help", "a", "b"],
        &["convert", "-o", "help", "a", "b"],
        &["convert", "-O", "raw", "-o", "help", "a", "b", "c"],
        &["convert", "-O", "luks", "-o", "help", "a", "b.luks"],
        &["convert", "-O", "qcow2", "-o", "help", "a", "foo:b"],
        &["convert", "-O", "raw", "-o", "help", "a", "/dev/null"],
        &["convert", "-O", "qcow2", "-o", "help,,x", "a", "b"],
        &["convert", "-O", "qcow2", "-o", "help=on", "a", "b"],
        &["convert", "-O", "foo", "-o", "help"],
        &["convert", "-n", "-O", "raw", "-o", "help", "a", "b"],
    ] {
        same_listing(d, args);
    }
    assert!(!d.join("b").exists());
    assert_all_same();
}

/// `amend -o help` lists what amend changes: with `-f` without opening the
/// image (none need exist), else for the image's probed format.
#[test]
fn amend_option_listings_have_qemu_imgs_layout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"],
    );
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "img.raw", "1M"],
    );
    sh(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=pw",
            "-f",
            "luks",
            "-o",
            "key-secret=s0,iter-time=10",
            "img.luks",
            "1M",
        ],
    );
    for args in [
        &["amend", "-f", "qcow2", "-o", "help"][..],
        &["amend", "-f", "luks", "-o", "help"],
        &["amend", "-f", "qcow2", "-o", "?"],
        &["amend", "-f", "qcow2", "-o", "help", "missing.qcow2"],
        &["amend", "-f", "luks", "-o", "help", "missing.luks"],
        &["amend", "-f", "qcow2", "-o", "help,,x", "img.qcow2"],
        &["amend", "-f", "raw", "-o", "help"],
        &["amend", "-f", "file", "-o", "help"],
        &["amend", "-f", "foo", "-o", "help"],
        &["amend", "-o", "help"],
        &["amend", "-o", "help", "img.qcow2"],
        // The image is opened first, a luks image with its secret.
        &["amend", "-o", "help", "img.luks"],
        &[
            "amend",
            "--object",
            "secret,id=s0,data=pw",
            "--image-opts",
            "-o",
            "help",
            "driver=luks,key-secret=s0,file.filename=img.luks",
        ],
        &["amend", "-o", "help", "img.raw"],
        &["amend", "-o", "help", "missing.qcow2"],
    ] {
        same_listing(d, args);
    }
    assert_all_same();
}
