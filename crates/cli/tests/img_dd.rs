//! `strata img dd` does what qemu-img dd does: each tool runs the same command
//! in its own directory holding the same input image; stdout, stderr and the
//! exit code must be equal, and so must the images they create (byte for byte
//! for raw; for qcow2 the same guest data and the same allocation map).

mod common;

use common::{assert_all_same, differs, outcome, sh};
use std::path::Path;

const CASES: &[&[&str]] = &[
    &["if=a.qcow2", "of=o.raw"],
    &[
        "-O",
        "qcow2",
        "bs=64k",
        "count=10",
        "skip=2",
        "if=a.qcow2",
        "of=o.qcow2",
    ],
    &["-O", "qcow2", "if=a.qcow2", "of=o.qcow2"],
    &["skip=100000", "if=a.qcow2", "of=o.raw"],
    &["bs=1.5k", "count=2", "if=a.qcow2", "of=o.raw"],
    &["bs=1k", "count=0", "if=a.qcow2", "of=o.raw"],
    &["bs=512", "skip=1", "if=a.qcow2", "of=o.raw"],
    &["bs=1M", "count=100", "if=a.qcow2", "of=o.raw"],
    &["-f", "raw", "if=a.qcow2", "of=o.raw"],
    &["-U", "bs=1M", "if=a.qcow2", "of=o.raw"],
    &["-f", "qcow2", "-f", "raw", "if=a.qcow2", "of=o.raw"],
    &["if=a.qcow2", "if=b", "of=o.raw"],
    &["foo=1", "if=a.qcow2", "of=o.raw"],
    &["a.qcow2"],
    &["if=a.qcow2"],
    &["bs=0", "if=a.qcow2", "of=o.raw"],
    &["bs=3G", "if=a.qcow2", "of=o.raw"],
    &["bs=abc", "if=a.qcow2", "of=o.raw"],
    &["count=-1", "if=a.qcow2", "of=o.raw"],
    &["skip=abc", "if=a.qcow2", "of=o.raw"],
    &["-O", "foo", "if=a.qcow2", "of=o.raw"],
    &["-p", "if=a.qcow2", "of=o.raw"],
    &["if=missing", "of=o.raw"],
    &["if=a.qcow2", "of=missing/o.raw"],
];

fn input(dir: &Path) {
    sh(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"],
    );
    common::io(
        dir,
        "qcow2",
        "a.qcow2",
        &["write -P 1 0 1M", "write -P 2 3M 512k"],
    );
}

#[test]
fn dd_prints_and_writes_what_qemu_img_dd_does() {
    for args in CASES {
        let (q, s) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (q, s) = (q.path(), s.path());
        input(q);
        input(s);
        let mut a = vec!["dd"];
        a.extend_from_slice(args);
        let (r_ours, r_theirs) = (outcome(s, "strata", &a), outcome(q, "qemu-img", &a));
        if r_ours != r_theirs {
            differs(format!(
                "dd {args:?}\n  strata:   {r_ours:?}\n  qemu-img: {r_theirs:?}"
            ));
        }
        for out in ["o.raw", "o.qcow2"] {
            let (theirs, ours) = (q.join(out), s.join(out));
            if theirs.exists() != ours.exists() {
                differs(format!("dd {args:?}: {out} made by one tool only"));
            } else if out.ends_with(".raw") && theirs.exists() {
                if std::fs::read(&theirs).unwrap() != std::fs::read(&ours).unwrap() {
                    differs(format!("dd {args:?}: {out} differs"));
                }
            } else if theirs.exists() {
                let p = |d: &Path| d.join(out).display().to_string();
                let (code, o, e) = outcome(q, "qemu-img", &["compare", &p(q), &p(s)]);
                if code != Some(0) {
                    differs(format!("dd {args:?}: {out} compare\n{o}{e}"));
                }
                let map = |d: &Path| outcome(d, "qemu-img", &["map", "--output=json", out]).1;
                if map(q) != map(s) {
                    differs(format!("dd {args:?}: {out} map differs"));
                }
                let (code, o, e) = outcome(s, "qemu-img", &["check", out]);
                if code != Some(0) {
                    differs(format!("dd {args:?}: {out} check\n{o}{e}"));
                }
            }
        }
    }
    assert_all_same();
}
