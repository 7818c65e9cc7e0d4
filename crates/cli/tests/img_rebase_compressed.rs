//! `strata img rebase -c` writes the clusters it copies compressed, as qemu-img
//! rebase -c does: on copies of the same overlay both tools print the same
//! bytes, and leave images with the same `qemu-img info`, the same data and the
//! same allocation map (compressed clusters where QEMU has them, the clusters the
//! overlay already stored untouched).

mod common;

use common::{assert_all_same, differs, outcome, same_image, same_on_copies, sh};

#[test]
fn rebase_c_compresses_what_qemu_img_rebase_c_compresses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = |args: &[&str]| sh(d, "qemu-img", args);
    q(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    common::io(
        d,
        "qcow2",
        "base.qcow2",
        &["write -P 1 0 1M", "write -P 3 2M 100k", "write -z 3M 64k"],
    );
    for (top, opts) in [
        ("top.qcow2", "compression_type=zlib"),
        ("ztop.qcow2", "compression_type=zstd"),
    ] {
        q(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            top,
        ]);
        common::io(
            d,
            "qcow2",
            top,
            &["write -P 2 512k 64k", "write -P 5 3M 1k"],
        );
    }
    q(&["create", "-q", "-f", "qcow2", "nb.qcow2", "4M"]);
    common::io(d, "qcow2", "nb.qcow2", &["write -P 1 0 256k"]);
    let cases: &[(&str, &[&str])] = &[
        ("top.qcow2", &["-c", "-b", ""]),
        ("top.qcow2", &["-c", "-b", "nb.qcow2", "-F", "qcow2"]),
        ("top.qcow2", &["-c", "-u", "-b", ""]),
        ("ztop.qcow2", &["-c", "-b", ""]),
    ];
    for (n, (top, args)) in cases.iter().enumerate() {
        let what = format!("rebase {args:?} {top}");
        let (ours, theirs) = same_on_copies(d, n, top, "rebase", args, &[]);
        same_image(d, &ours, &theirs, &what);
        let map = |f: &str| outcome(d, "qemu-img", &["map", "--output=json", f]).1;
        if map(&ours) != map(&theirs) {
            differs(format!(
                "{what}: map\n{}\n---\n{}",
                map(&ours),
                map(&theirs)
            ));
        }
        assert!(
            map(&theirs).contains("\"compressed\": true") || args.contains(&"-u"),
            "{what}: the case compresses nothing"
        );
    }
    assert_all_same();
}
