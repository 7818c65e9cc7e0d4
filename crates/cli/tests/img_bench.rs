//! `strata img bench` takes qemu-img bench's flags and prints its lines: on
//! copies of the same image, both tools print the same bytes but for the time
//! the run took, exit alike, and a write run leaves the same data, checked clean.

mod common;

use common::{assert_all_same, differs, outcome, same_image, sh};

const CASES: &[&[&str]] = &[
    &["-c", "1000"],
    &[
        "-c",
        "1000",
        "-w",
        "-s",
        "64k",
        "-d",
        "4",
        "-o",
        "1M",
        "-S",
        "128k",
        "--pattern=7",
    ],
    &["-c", "3000", "-w", "-o", "60M", "-s", "64k", "--pattern=9"],
    &["-c", "100", "-w", "--flush-interval=64"],
    &["-c", "100", "-w", "--no-drain", "--flush-interval=64"],
    &["-c", "10", "-S", "0", "-U", "-t", "none", "-i", "threads"],
    &["-c", "10", "-f", "qcow2", "-f", "raw"],
    &["-c", "10", "-o", "63M", "-s", "2M"],
    &["-c", "100", "-w", "--flush-interval=10"],
    &["-c", "100", "--flush-interval=10"],
    &["-c", "abc"],
    &["-c", "0"],
    &["-c", "-5"],
    &["-d", "0"],
    &["-s", "0"],
    &["-c", "10", "-o", "-1"],
    &["-c", "10", "-S", "abc"],
    &["-c", "10", "-d", "abc"],
    &["-c", "10", "-w", "--pattern=300"],
    &["-c", "10", "-i", "foo"],
];

/// The elapsed time, the one thing the two runs may differ in.
fn untimed(out: &str) -> String {
    out.lines()
        .map(|l| match l.strip_prefix("Run completed in ") {
            Some(rest) if rest.ends_with(" seconds.") => "Run completed in T seconds.".into(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn bench_prints_what_qemu_img_bench_prints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
    );
    for (n, args) in CASES.iter().enumerate() {
        let (ours, theirs) = (format!("o{n}.qcow2"), format!("t{n}.qcow2"));
        std::fs::copy(d.join("a.qcow2"), d.join(&ours)).unwrap();
        std::fs::copy(d.join("a.qcow2"), d.join(&theirs)).unwrap();
        let go = |prog: &str, f: &str| {
            let mut a = vec!["bench"];
            a.extend_from_slice(args);
            a.push(f);
            let (code, out, err) = outcome(d, prog, &a);
            (code, untimed(&out), err.replace(f, "IMG"))
        };
        let (r_ours, r_theirs) = (go("strata", &ours), go("qemu-img", &theirs));
        if r_ours != r_theirs {
            differs(format!(
                "bench {args:?}\n  strata:   {r_ours:?}\n  qemu-img: {r_theirs:?}"
            ));
        }
        same_image(d, &ours, &theirs, &format!("bench {args:?}"));
    }
    for args in [&["bench"][..], &["bench", "a.qcow2", "b.qcow2"]] {
        common::same(d, args);
    }
    assert_all_same();
}
