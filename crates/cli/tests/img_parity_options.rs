//! Every option of every subcommand, as qemu-img 10's own help and option tables
//! list them (short and long forms, a long form shortened to a prefix, an option
//! given twice, values out of range or malformed, a missing value, too many file
//! names), run through both tools: stdout, stderr and the exit code must be the
//! same, and so must the files each leaves behind (each tool works in its own copy
//! of the same directory).
//!
//! What is deliberately not compared: the text of `--help` and `-o help`, which is
//! qemu-img's own prose (both tools print their help on stdout and exit 0);
//! snapshot's `--create`,
//! `--apply` and `--delete`, whose value qemu-img 10.0 fails to read (it takes
//! the name as a second file name, and crashes with no name at all); and the
//! length of a file `commit` empties, where qemu-img leaves a different length
//! (the images read the same).

mod common;

use common::{assert_all_same, same, same_in_dir_copies, sh};
use std::path::Path;

/// The fixture: `base.qcow2` with data, `top.qcow2` over it with data of its own
/// and an internal snapshot `snap1`, `b2.qcow2` with a persistent bitmap `bm0`,
/// and a raw `r.raw`.
fn fixture(dir: &Path) {
    let q = |args: &[&str]| sh(dir, "qemu-img", args);
    let io = |f: &str, fmt: &str, cmd: &str| sh(dir, "qemu-io", &["-f", fmt, "-c", cmd, f]);
    common::qcow2(dir, "base.qcow2", "64M", &[]);
    io("base.qcow2", "qcow2", "write -P 1 0 1M");
    io("base.qcow2", "qcow2", "write -P 2 10M 64k");
    common::qcow2(
        dir,
        "top.qcow2",
        "64M",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    io("top.qcow2", "qcow2", "write -P 3 512k 1M");
    q(&["snapshot", "-c", "snap1", "top.qcow2"]);
    q(&["create", "-q", "-f", "raw", "r.raw", "16M"]);
    io("r.raw", "raw", "write -P 5 0 64k");
    std::fs::copy(dir.join("base.qcow2"), dir.join("b2.qcow2")).unwrap();
    io("b2.qcow2", "qcow2", "write -P 9 0 4k");
    q(&["bitmap", "--add", "b2.qcow2", "bm0"]);
}

/// Commands that change nothing: run in the fixture itself.
const READING: &[&str] = &[
    // info: -f/--format (twice: the last wins), -b/--backing-chain, -U, --output,
    // --image-opts, prefixes of long options, a missing value, a bad value.
    "info -f qcow2 top.qcow2",
    "info --format qcow2 top.qcow2",
    "info --format=qcow2 top.qcow2",
    "info -f raw -f qcow2 top.qcow2",
    "info -b top.qcow2",
    "info --backing-chain top.qcow2",
    "info --back top.qcow2",
    "info -U top.qcow2",
    "info --force-share top.qcow2",
    "info --output json top.qcow2",
    "info --output=json --output=human top.qcow2",
    "info --output=xml top.qcow2",
    "info --image-opts driver=qcow2,file.filename=top.qcow2",
    "info -f bogus top.qcow2",
    "info -t none top.qcow2",
    "info --output",
    "info --format",
    "check -qf",
    "info",
    "info a b",
    // map: --start-offset, --max-length, in and out of range.
    "map --format qcow2 top.qcow2",
    "map --output json top.qcow2",
    "map --force-share top.qcow2",
    "map --start-offset=1M --max-length=2M --output=json top.qcow2",
    "map --start-offset -1 top.qcow2",
    "map --start-offset foo top.qcow2",
    "map --max-length -5 top.qcow2",
    "map --max-length 0 top.qcow2",
    "map --start-offset 100M top.qcow2",
    "map --image-opts driver=qcow2,file.filename=top.qcow2",
    // check without repair: -q/--quiet, -f/--format, -T/--cache, --output.
    "check --quiet top.qcow2",
    "check --format qcow2 top.qcow2",
    "check --output json top.qcow2",
    "check --output=xml top.qcow2",
    "check -T none top.qcow2",
    "check --cache writeback top.qcow2",
    "check -T bogus top.qcow2",
    "check -T bogus nothere.qcow2",
    "check -r top.qcow2",
    "check --repair top.qcow2",
    "check -r bogus top.qcow2",
    "check -r leaks -U top.qcow2",
    "check r.raw",
    // compare: the long forms of every option, a bad cache mode (exit 2).
    "compare --quiet base.qcow2 b2.qcow2",
    "compare --strict base.qcow2 top.qcow2",
    "compare --a-format qcow2 --b-format qcow2 base.qcow2 b2.qcow2",
    "compare --left-format qcow2 --right-format qcow2 base.qcow2 base.qcow2",
    "compare --progress base.qcow2 base.qcow2",
    "compare --cache none base.qcow2 base.qcow2",
    "compare -T bogus base.qcow2 base.qcow2",
    "compare -p -T bogus base.qcow2 base.qcow2",
    "compare -f raw base.qcow2 b2.qcow2",
    // measure: --target-format, --options, --snapshot, --size.
    "measure --target-format qcow2 top.qcow2",
    "measure -O qcow2 --options cluster_size=4k --size 1G",
    "measure -O qcow2 --snapshot snap1 top.qcow2",
    "measure --format qcow2 -O raw top.qcow2",
    // qcow2's checks in QEMU's order: for create, extended L2 on a version 2
    // image before the cluster size; for measure, the cluster size (and its
    // extended-L2 minimum), then compat, then the refcount width.
    "create -f qcow2 -o compat=0.10,cluster_size=3k,extended_l2=on n.qcow2 1M",
    "create -f qcow2 -o cluster_size=3k,extended_l2=on n.qcow2 1M",
    "measure -O qcow2 -o compat=bogus,cluster_size=3k --size 1M",
    "measure -O qcow2 -o cluster_size=3k,extended_l2=on --size 1M",
    "measure -O qcow2 -o compat=bogus,refcount_bits=3 --size 1M",
    "measure -O qcow2 -o compat=0.10,refcount_bits=3 --size 1M",
    "measure -O qcow2 -o compat=0.10,refcount_bits=8,extended_l2=on --size 1M",
    // snapshot -l, long forms.
    "snapshot --list top.qcow2",
    "snapshot -U --list top.qcow2",
];

/// bench runs: compared but for the time each run took.
const BENCH: &[&str] = &[
    "bench --count 8 --depth 2 --buffer-size 4k --step-size 8k --offset 1M --format qcow2 top.qcow2",
    "bench -c 4 --native --aio threads --cache none top.qcow2",
    "bench -c 4 --write --pattern 7 --flush-interval 2 --no-drain -d 1 top.qcow2",
    "bench -t bogus top.qcow2",
    "bench -t bogus -c 0 top.qcow2",
];

/// Commands that write: each tool runs in its own copy of the fixture.
const WRITING: &[&str] = &[
    // create: every long form, -u without a readable backing file, size twice.
    "create --format qcow2 n.qcow2 1M",
    "create --quiet -f qcow2 n.qcow2 1M",
    "create -f qcow2 --options cluster_size=4k n.qcow2 1M",
    "create -f qcow2 -o cluster_size=4k -o lazy_refcounts=on n.qcow2 1M",
    "create -f qcow2 --backing base.qcow2 --backing-format qcow2 n.qcow2",
    "create -f qcow2 --backing-unsafe -b base.qcow2 -F qcow2 n.qcow2 1M",
    "create -f qcow2 -u -b nothere.qcow2 -F qcow2 n.qcow2",
    "create -f qcow2 -o size=2M n.qcow2 1M",
    "create -f qcow2 -o size=2M n.qcow2",
    "create -f qcow2 n.qcow2 1M extra",
    "create -f raw -f qcow2 n.qcow2 1M",
    "create -f qcow2 -o compat=0.10 -o compat=1.1 n.qcow2 1M",
    // resize: long forms, --preallocation checked before the image is opened,
    // too many arguments.
    "resize --quiet top.qcow2 +1M",
    "resize --format qcow2 top.qcow2 128M",
    "resize --shrink -f raw r.raw 8M",
    "resize --preallocation=full -f raw r.raw 20M",
    "resize --preallocation=bogus r.raw 20M",
    "resize top.qcow2 +1M extra",
    "resize top.qcow2 1M 2M 3M",
    // check with repair.
    "check --repair leaks top.qcow2",
    "check --repair=all -q top.qcow2",
    // convert: the long forms qemu-img takes (and those its help names but its
    // parser refuses), -C, -S and -m in and out of range, -s (gone from qemu-img).
    "convert --source-format qcow2 -O raw top.qcow2 o.raw",
    "convert --output-format qcow2 top.qcow2 o.qcow2",
    "convert --target-format qcow2 top.qcow2 o.qcow2",
    "convert --quiet -O raw top.qcow2 o.raw",
    "convert -O qcow2 --options cluster_size=4k top.qcow2 o.qcow2",
    "convert -O qcow2 --backing base.qcow2 --backing-format qcow2 top.qcow2 o.qcow2",
    "convert -O raw --sparse-size 8k top.qcow2 o.raw",
    "convert -O raw -S -1 top.qcow2 o.raw",
    "convert -O raw -S foo top.qcow2 o.raw",
    "convert -O raw -S 1000 top.qcow2 o.raw",
    "convert -O raw --source-cache none top.qcow2 o.raw",
    "convert -O raw --output-cache writeback top.qcow2 o.raw",
    "convert -O raw -T bogus top.qcow2 o.raw",
    "convert -p -O raw -t bogus top.qcow2 o.raw",
    "convert -O raw --parallel 4 top.qcow2 o.raw",
    "convert -O raw -m -3 top.qcow2 o.raw",
    "convert -O raw -m 3x top.qcow2 o.raw",
    "convert -O raw -m 17 top.qcow2 o.raw",
    "convert -O raw --oob-writes top.qcow2 o.raw",
    "convert -O raw -C top.qcow2 o.raw",
    "convert -O raw --copy-range-offloading top.qcow2 o.raw",
    "convert -O raw --rate 1G top.qcow2 o.raw",
    "convert -O raw --snapshot snap1 top.qcow2 o.raw",
    "convert -O raw -s snap1 top.qcow2 o.raw",
    "convert -O raw --source-snapshot snap1 top.qcow2 o.raw",
    "convert --no-create -O raw top.qcow2 r.raw",
    "convert -n -O raw -t bogus top.qcow2 r.raw",
    "convert -n -O bogus -t bogus top.qcow2 r.raw",
    "convert -n -O bogus -t none top.qcow2 r.raw",
    "convert --compress -O qcow2 top.qcow2 o.qcow2",
    "convert --source-image-opts -O raw driver=qcow2,file.filename=top.qcow2 o.raw",
    // commit, rebase, amend, snapshot, dd: long forms and cache modes.
    "commit --quiet --drop top.qcow2",
    "commit --base base.qcow2 --cache writeback top.qcow2",
    "commit --format qcow2 --rate 1G --drop top.qcow2",
    "commit -t bogus top.qcow2",
    "rebase --backing-unsafe --backing b2.qcow2 --backing-format qcow2 top.qcow2",
    "rebase --quiet --compress -b b2.qcow2 -F qcow2 top.qcow2",
    "rebase -U -u -b b2.qcow2 -F qcow2 top.qcow2",
    "rebase --force-share -b b2.qcow2 -F qcow2 top.qcow2",
    "rebase -t bogus top.qcow2",
    "rebase -p -t bogus -u -b base.qcow2 -F qcow2 top.qcow2",
    "rebase -T bogus -t bogus2 -u -b base.qcow2 -F qcow2 top.qcow2",
    "rebase --cache none --backing-cache none -b b2.qcow2 -F qcow2 top.qcow2",
    "amend --quiet --format qcow2 --options lazy_refcounts=on top.qcow2",
    "amend --progress -o compat=0.10 base.qcow2",
    "amend --progres -o compat=1.1 top.qcow2",
    "amend -t bogus -o compat=1.1 top.qcow2",
    "amend -t bogus top.qcow2",
    "amend --cache none -o lazy_refcounts=on top.qcow2",
    "snapshot --quiet -a snap1 top.qcow2",
    "snapshot -U -c x top.qcow2",
    "dd --format qcow2 --output-format qcow2 if=top.qcow2 of=o.qcow2 bs=64k count=4",
    "bitmap --add --granularity 128k b2.qcow2 bm1",
    "bitmap --merge bm0 --source-file b2.qcow2 --source-format qcow2 base.qcow2 bm0",
];

#[test]
fn every_documented_option_behaves_as_in_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let fx = dir.path().join("fx");
    std::fs::create_dir(&fx).unwrap();
    fixture(&fx);
    for case in READING {
        same(&fx, &case.split_whitespace().collect::<Vec<_>>());
    }
    for case in BENCH {
        let args: Vec<&str> = case.split_whitespace().collect();
        let timeless = |prog: &str| {
            let (code, out, err) = common::outcome(&fx, prog, &args);
            let out: Vec<&str> = out
                .lines()
                .filter(|l| !l.starts_with("Run completed"))
                .collect();
            (code, out.join("\n"), err)
        };
        let (ours, theirs) = (timeless("strata"), timeless("qemu-img"));
        if ours != theirs {
            common::differs(format!(
                "`img {case}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
            ));
        }
    }
    for (n, case) in WRITING.iter().enumerate() {
        same_in_dir_copies(&fx, n, &case.split_whitespace().collect::<Vec<_>>());
    }
    assert_all_same();
}

/// `SUB --help` prints on stdout and exits 0 with both tools (the text itself is
/// each tool's own).
#[test]
fn every_subcommand_help_goes_to_stdout_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let subs = [
        "amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create", "dd",
        "info", "map", "measure", "rebase", "resize", "snapshot",
    ];
    for sub in subs {
        for prog in ["strata", "qemu-img"] {
            let (code, out, err) = common::outcome(dir.path(), prog, &[sub, "--help"]);
            assert_eq!(code, Some(0), "{prog} {sub} --help: {err}");
            assert!(!out.is_empty() && err.is_empty(), "{prog} {sub} --help");
        }
    }
}
