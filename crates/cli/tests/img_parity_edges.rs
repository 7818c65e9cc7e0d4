//! Edges of qemu-img's command line and of backing chains that scripts meet by
//! mistake: images whose backing chain loops back on itself, and long options
//! abbreviated (ambiguously, or with a value an option does not take). Both
//! tools run the same commands on the same files and must print the same bytes
//! and exit with the same code.
//!
//! Not pinned here, because qemu-img 10 never finishes them: commands that
//! open a looping chain read-only only (`check`, `map`, `compare`, `convert`,
//! `measure`, `dd`, `bench` without -w, `snapshot -l`, `create -b` onto a
//! loop) recurse without end in QEMU; strata refuses them instead.

mod common;

use common::{assert_all_same, qcow2, same, same_in_dir_copies, sh};
use std::path::Path;

/// `name` records `backing` (format qcow2) as its backing file, written as
/// given, without the backing file being opened.
fn link(dir: &Path, name: &str, backing: &str) {
    sh(
        dir,
        "qemu-img",
        &["rebase", "-u", "-F", "qcow2", "-b", backing, name],
    );
}

/// The bytes of each of `files` in `dir`.
fn contents(dir: &Path, files: &[&str]) -> Vec<Vec<u8>> {
    files
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect()
}

/// Opening a looping chain for writing (commit, rebase, resize, bench -w):
/// the file opened for writing is met again below itself, and its own lock
/// refuses the read-only open, worded as QEMU words it, once "Could not open
/// backing file" per step down; `info --backing-chain` names the file that
/// closes the loop; `info` alone does not open the backing file. Nothing is
/// written.
#[test]
fn looping_chains_are_refused_in_qemu_img_s_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // An image that is its own backing file, named relatively and absolutely.
    for (name, backing) in [
        ("self.qcow2", "self.qcow2".to_string()),
        ("abs.qcow2", d.join("abs.qcow2").display().to_string()),
    ] {
        qcow2(d, name, "1M", &[]);
        link(d, name, &backing);
    }
    // a -> b -> c -> a, entered at each point.
    qcow2(d, "a.qcow2", "1M", &[]);
    qcow2(d, "b.qcow2", "1M", &["-b", "a.qcow2", "-F", "qcow2"]);
    qcow2(d, "c.qcow2", "1M", &["-b", "b.qcow2", "-F", "qcow2"]);
    link(d, "a.qcow2", "c.qcow2");
    let files = ["self.qcow2", "abs.qcow2", "a.qcow2", "b.qcow2", "c.qcow2"];
    let before = contents(d, &files);
    for f in files {
        for args in [
            &["info", f][..],
            &["info", "--backing-chain", f],
            &["info", "-U", "--backing-chain", f],
            &["info", "--backing-chain", "--output=json", f],
            &["commit", f],
            &["commit", "-d", f],
            &["rebase", "-b", "", f],
            &["rebase", "-b", "self.qcow2", "-F", "qcow2", f],
            &["resize", f, "2M"],
            &["bench", "-w", "-c", "1", f],
        ] {
            same(d, args);
        }
    }
    same(d, &["commit", "-b", "self.qcow2", "self.qcow2"]);
    let abs = d.join("abs.qcow2").display().to_string();
    same(d, &["commit", &abs]);
    assert_eq!(contents(d, &files), before, "a refused command wrote");
    assert_all_same();
}

/// Long options as getopt reads them, per subcommand: an unambiguous prefix
/// is the option; a prefix of several is refused naming them in qemu-img's
/// order (with any `=value` as typed); `--NAME=VALUE` for an option without
/// a value is refused naming the option in full; an unknown one is
/// unrecognized. The options before the subcommand read the same way.
#[test]
fn long_option_prefixes_are_read_as_getopt_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2(d, "a.qcow2", "1M", &[]);
    for args in [
        &["info", "--f", "a.qcow2"][..],
        &["info", "--fo", "qcow2", "a.qcow2"],
        &["info", "--fo=qcow2", "a.qcow2"],
        &["info", "--f=x"],
        &["info", "--=x", "a.qcow2"],
        &["info", "--out=json", "a.qcow2"],
        &["info", "--back", "a.qcow2"],
        &["info", "--form=qcow2", "--force", "a.qcow2"],
        &["info", "--backing-chain=x", "a.qcow2"],
        &["info", "--force-share=1", "a.qcow2"],
        &["info", "--image=x"],
        &["info", "--help=x"],
        &["info", "--xyz", "a.qcow2"],
        &["info", "--xx=y", "a.qcow2"],
        &["convert", "--s", "a.qcow2", "o.raw"],
        &["convert", "--so", "qcow2", "a.qcow2", "o.raw"],
        &["convert", "--t", "a.qcow2", "o.raw"],
        &["convert", "--b", "a.qcow2", "o.raw"],
        &["create", "--pre", "-f", "qcow2", "n.qcow2", "1M"],
        &["create", "--backing-", "x", "n.qcow2", "1M"],
        &["create", "--q=1", "n.qcow2", "1M"],
        &["check", "--out=json", "a.qcow2"],
        &["check", "--r"],
        &["check", "--o", "a.qcow2"],
        &["map", "--s=0", "a.qcow2"],
        &["map", "--o", "json", "a.qcow2"],
        &["compare", "--r", "raw", "a.qcow2", "a.qcow2"],
        &["compare", "--s=1", "a.qcow2", "a.qcow2"],
        &["measure", "--s", "1M", "-O", "qcow2"],
        &["measure", "--t", "qcow2", "--si", "1M"],
        &["rebase", "--f", "a.qcow2"],
        &["rebase", "--backing", "", "--backing-u", "a.qcow2"],
        &["commit", "--o"],
        &["commit", "--d=1", "a.qcow2"],
        &["amend", "--force=1", "-o", "compat=1.1", "a.qcow2"],
        &["amend", "--o", "a.qcow2"],
        &["resize", "--s=1", "a.qcow2", "2M"],
        &["snapshot", "--l=1", "a.qcow2"],
        &["dd", "--o", "if=a.qcow2", "of=o.raw"],
        &["bench", "--f", "a.qcow2"],
        &["bench", "--n", "a.qcow2"],
        &["--=x", "info", "a.qcow2"],
        &["--f", "info", "a.qcow2"],
        &["--ver=1"],
    ] {
        same(d, args);
    }
    assert!(!d.join("n.qcow2").exists() && !d.join("o.raw").exists());
    assert_all_same();
}

/// A character device named as an image (`/dev/null`): its file node is
/// QEMU's host_device protocol, in `info` and its JSON; `map` and `check` of
/// it, and `-f host_device` on it and on a regular file.
#[test]
fn character_devices_are_host_device_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(d, "truncate", &["-s", "1M", "r.raw"]);
    for args in [
        &["info", "/dev/null"][..],
        &["info", "-f", "raw", "/dev/null"],
        &["info", "--output=json", "/dev/null"],
        &["map", "/dev/null"],
        &["check", "/dev/null"],
        &["info", "-f", "host_device", "/dev/null"],
        &["info", "-f", "host_device", "r.raw"],
        &["map", "-f", "host_device", "r.raw"],
    ] {
        same(d, args);
    }
    assert_all_same();
}

/// Commands that open an image for writing with its backing chain (amend,
/// snapshot -c/-d/-a, commit) refuse it when that chain does not open, as
/// qemu-img does before it reads their options: a backing file gone, or a
/// chain that loops back to the image held for writing (its own lock, quoted
/// with the name the chain reached it by: each relative `./` step stays in it,
/// `./x` backed by `./y` backed by `./x` reaching `./././x`). Nothing is
/// written.
#[test]
fn writing_opens_refuse_a_chain_that_does_not_open_in_qemu_img_s_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2(d, "self.qcow2", "1M", &[]);
    link(d, "self.qcow2", "self.qcow2");
    qcow2(d, "dot.qcow2", "1M", &[]);
    link(d, "dot.qcow2", "./dot.qcow2");
    qcow2(d, "a.qcow2", "1M", &[]);
    qcow2(d, "b.qcow2", "1M", &["-b", "a.qcow2", "-F", "qcow2"]);
    link(d, "a.qcow2", "b.qcow2");
    qcow2(d, "x.qcow2", "1M", &[]);
    qcow2(d, "y.qcow2", "1M", &[]);
    link(d, "x.qcow2", "./y.qcow2");
    link(d, "y.qcow2", "./x.qcow2");
    std::fs::create_dir(d.join("sub")).unwrap();
    qcow2(d, "sub/z.qcow2", "1M", &[]);
    link(d, "sub/z.qcow2", "../sub/z.qcow2");
    qcow2(
        d,
        "miss.qcow2",
        "1M",
        &["-u", "-b", "gone.qcow2", "-F", "qcow2"],
    );
    let files = [
        "self.qcow2",
        "dot.qcow2",
        "a.qcow2",
        "b.qcow2",
        "x.qcow2",
        "y.qcow2",
        "sub/z.qcow2",
        "miss.qcow2",
    ];
    let before = contents(d, &files);
    let abs = d.join("x.qcow2").display().to_string();
    for f in [
        "self.qcow2",
        "dot.qcow2",
        "a.qcow2",
        "x.qcow2",
        "./x.qcow2",
        abs.as_str(),
        "sub/z.qcow2",
        "miss.qcow2",
    ] {
        for args in [
            &["amend", "-o", "compat=1.1", f][..],
            &["amend", "-o", "foo=bar", f],
            &["snapshot", "-c", "s", f],
            &["snapshot", "-d", "s", f],
            &["snapshot", "-a", "s", f],
            &["commit", f],
            &["rebase", "-b", "", f],
        ] {
            same(d, args);
        }
    }
    // Read-only opens of the broken chain.
    for args in [
        &["snapshot", "-l", "miss.qcow2"][..],
        &["snapshot", "-l", "-U", "miss.qcow2"],
    ] {
        same(d, args);
    }
    assert_eq!(contents(d, &files), before, "a refused command wrote");
    assert_all_same();
}

/// An `--image-opts` list whose first item has no `=` names a node as `file`
/// (strata has none to find); a later bare item is a deprecated short-form
/// boolean (`KEY` on, `noKEY` off), warned about as qemu-img warns.
#[test]
fn a_bare_first_image_opts_item_is_a_node_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2(d, "t.qcow2", "1M", &[]);
    for o in [
        "t.qcow2",
        "foo",
        "t.qcow2,driver=qcow2",
        ",driver=qcow2",
        ",,x",
        "a,,b,driver=raw",
        "file=t.qcow2",
        "driver=qcow2,t.qcow2",
        "driver=qcow2,file.filename=t.qcow2,force-share",
        "driver=qcow2,file.filename=t.qcow2,noforce-share",
        "driver=qcow2,file.filename=t.qcow2,no",
    ] {
        same(d, &["info", "--image-opts", o]);
        same(d, &["map", "--image-opts", o]);
        same(d, &["check", "--image-opts", o]);
        same(d, &["compare", "--image-opts", o, o]);
        same(d, &["convert", "--image-opts", "-O", "raw", o, "n.raw"]);
        let _ = std::fs::remove_file(d.join("n.raw"));
    }
    assert_all_same();
}

/// In a `-o` list a bare item is a boolean: `KEY` on, `noKEY` off, `no` the
/// empty key; so `-o nocow` asks for an option `cow` no format has.
#[test]
fn bare_creation_options_are_booleans_on_or_off() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = dir.path().join("f");
    std::fs::create_dir(&fixture).unwrap();
    qcow2(&fixture, "t.qcow2", "1M", &[]);
    let mut n = 0;
    let mut run = |args: &[&str]| {
        n += 1;
        same_in_dir_copies(&fixture, n, args);
    };
    for o in [
        "nocow",
        "cow",
        "no",
        "nocow=on",
        "nocow=off",
        "lazy_refcounts",
        "nolazy_refcounts",
        "compat=1.1,lazy_refcounts",
        "preallocation",
        "backing_file=x",
        "backing_fmt=raw",
    ] {
        run(&["create", "-f", "qcow2", "-o", o, "n.qcow2", "1M"]);
        run(&["create", "-f", "raw", "-o", o, "n.raw", "1M"]);
    }
    run(&["amend", "-o", "lazy_refcounts", "t.qcow2"]);
    run(&["amend", "-o", "nolazy_refcounts", "t.qcow2"]);
    run(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "lazy_refcounts",
        "t.qcow2",
        "n.qcow2",
    ]);
    run(&[
        "convert",
        "-O",
        "raw",
        "-o",
        "backing_file=x",
        "t.qcow2",
        "n.raw",
    ]);
    run(&["create", "-f", "raw", "-b", "x", "n.raw", "1M"]);
    run(&["create", "-f", "raw", "-F", "raw", "n.raw", "1M"]);
    same(
        &fixture,
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "lazy_refcounts",
            "--size",
            "1M",
        ],
    );
    assert_all_same();
}
