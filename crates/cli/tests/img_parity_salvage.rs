//! `convert --salvage` through both tools: sources whose reads fail (errors
//! injected by blkdebug rules below the format, a compressed cluster that no
//! longer decompresses) are copied with zeroes where sectors cannot be read, a
//! warning per such sector, and exit code 0; with `-n`, `-p`, `-q`, `-c`,
//! `-m 1`, a raw or qcow2 target. The refusals of `-C` next to `--salvage`,
//! `-c` and `-S` come in qemu-img's order. stdout, stderr, the exit code and
//! the images left must be alike (each tool works in its own copy of the
//! fixture directory).
//!
//! Not compared: the failure of a copy without `--salvage` over the damaged
//! compressed cluster (qemu-img: "error while reading at byte 0: Input/output
//! error"; strata names the decompression failure); failures spread over several of qemu-img's parallel copy
//! requests with its default 8 coroutines (qemu-img interleaves their warnings
//! by coroutine; strata's, like `-m 1`'s, come in offset order). Failed
//! allocation queries (an L2 table that cannot be loaded) are compared with
//! `-m 1`.

mod common;

use common::{assert_all_same, sh};
use std::path::Path;

/// Run `args` with each tool in its own copy of the fixture directory and
/// record any difference in what they print, and in the image `target` they
/// leave (alike to QEMU). The damaged sources cannot be compared as images,
/// so only the target is.
fn same_salvage(fx: &Path, n: usize, args: &[&str], target: &str) {
    let parent = fx.parent().unwrap();
    let (ours, theirs) = (format!("fx-o{n}"), format!("fx-t{n}"));
    for copy in [&ours, &theirs] {
        common::copy_dir(fx, &parent.join(copy));
    }
    let r_ours = common::outcome(&parent.join(&ours), "strata", args);
    let r_theirs = common::outcome(&parent.join(&theirs), "qemu-img", args);
    let what = format!("img {}", args.join(" "));
    if r_ours != r_theirs {
        common::differs(format!(
            "`{what}`\n  strata:   {r_ours:?}\n  qemu-img: {r_theirs:?}"
        ));
    }
    if parent.join(&theirs).join(target).exists() {
        let (o, t) = (format!("{ours}/{target}"), format!("{theirs}/{target}"));
        common::same_image(parent, &o, &t, &format!("`{what}`"));
    }
}

/// The fixture directory: `a.qcow2` (1 MiB, data at 0 and 128k), `c.qcow2`
/// (the same data compressed, its first cluster damaged), `r.raw` (raw data),
/// `n.qcow2` and `n.raw` (existing targets for `-n`), and one blkdebug config
/// per rule.
fn fixture(root: &Path) -> std::path::PathBuf {
    let d = root.join("fx");
    std::fs::create_dir(&d).unwrap();
    let q = |args: &[&str]| sh(&d, "qemu-img", args);
    common::qcow2(&d, "a.qcow2", "1M", &[]);
    common::io(
        &d,
        "qcow2",
        "a.qcow2",
        &[
            "write -P 5 0 64k",
            "write -P 7 128k 64k",
            "write -P 9 640k 4k",
        ],
    );
    q(&["convert", "-q", "-c", "-O", "qcow2", "a.qcow2", "c.qcow2"]);
    damage_first_compressed_cluster(&d.join("c.qcow2"));
    q(&["create", "-q", "-f", "raw", "r.raw", "1M"]);
    common::io(&d, "raw", "r.raw", &["write -P 3 4k 8k"]);
    common::qcow2(&d, "n.qcow2", "1M", &[]);
    q(&["create", "-q", "-f", "raw", "n.raw", "1M"]);
    common::io(&d, "raw", "n.raw", &["write -P 1 0 1M"]);
    let rule = |name: &str, body: &str| std::fs::write(d.join(name), body).unwrap();
    rule(
        "all.cfg",
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\n",
    );
    // Host sector 642: inside a.qcow2's first data cluster (host 0x50000).
    rule(
        "sector.cfg",
        "[inject-error]\nevent = \"read_aio\"\nsector = \"642\"\n",
    );
    rule(
        "enospc.cfg",
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"28\"\nsector = \"20\"\n",
    );
    rule(
        "once.cfg",
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nonce = \"on\"\n",
    );
    d
}

/// Overwrite the start of the compressed data of `path`'s first guest cluster
/// (a qcow2 image of 64k clusters) with bytes no deflate stream begins with.
fn damage_first_compressed_cluster(path: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut be = |at: u64| {
        let mut b = [0u8; 8];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut b).unwrap();
        u64::from_be_bytes(b)
    };
    let l1 = be(40);
    let l2 = be(l1) & 0x00ff_ffff_ffff_fe00;
    let entry = be(l2);
    assert!(entry & (1 << 62) != 0, "the first cluster is compressed");
    // 64k clusters: the host offset takes the low 62 - (16 - 8) bits.
    let host = entry & ((1 << 54) - 1);
    f.seek(SeekFrom::Start(host)).unwrap();
    f.write_all(&[0xff; 64]).unwrap();
}

#[test]
fn salvage_copies_unreadable_sectors_as_zeroes_with_qemu_img_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture(dir.path());
    let mut n = 0;
    let mut case = |args: &[&str]| {
        n += 1;
        same_salvage(&fx, n, args, args.last().unwrap());
    };
    // One failing sector: one warning, the rest copied.
    for out in ["raw", "qcow2"] {
        let o = format!("o.{out}");
        case(&[
            "convert",
            "--salvage",
            "-O",
            out,
            "blkdebug:sector.cfg:a.qcow2",
            &o,
        ]);
    }
    // A compressed cluster that does not decompress: a warning per sector of it.
    case(&["convert", "--salvage", "-O", "raw", "c.qcow2", "o.raw"]);
    case(&["convert", "--salvage", "-O", "qcow2", "c.qcow2", "o.qcow2"]);
    case(&[
        "convert",
        "--salvage",
        "-q",
        "-O",
        "raw",
        "c.qcow2",
        "o.raw",
    ]);
    case(&[
        "convert",
        "--salvage",
        "-p",
        "-O",
        "raw",
        "c.qcow2",
        "o.raw",
    ]);
    case(&[
        "convert",
        "--salvage",
        "-c",
        "-O",
        "qcow2",
        "c.qcow2",
        "o.qcow2",
    ]);
    case(&[
        "convert",
        "--salvage",
        "-n",
        "-O",
        "raw",
        "c.qcow2",
        "n.raw",
    ]);
    case(&[
        "convert",
        "--salvage",
        "-n",
        "-O",
        "qcow2",
        "c.qcow2",
        "n.qcow2",
    ]);
    case(&[
        "convert",
        "--salvage",
        "-S",
        "0",
        "-O",
        "raw",
        "c.qcow2",
        "o.raw",
    ]);
    // Every read failing, one request at a time (-m 1): zeroes throughout.
    for extra in [&[][..], &["-c"], &["-p"], &["-q"], &["-W"]] {
        let mut a = vec!["convert", "--salvage", "-m", "1"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["-O", "qcow2", "blkdebug:all.cfg:a.qcow2", "o.qcow2"]);
        case(&a);
    }
    case(&[
        "convert",
        "--salvage",
        "-m",
        "1",
        "-n",
        "-O",
        "raw",
        "blkdebug:all.cfg:a.qcow2",
        "n.raw",
    ]);
    // A raw source, another errno; a rule that fires once (the retry reads).
    case(&[
        "convert",
        "--salvage",
        "-O",
        "raw",
        "blkdebug:enospc.cfg:r.raw",
        "o.raw",
    ]);
    case(&[
        "convert",
        "--salvage",
        "-O",
        "raw",
        "blkdebug:once.cfg:a.qcow2",
        "o.raw",
    ]);
    // Two sources: offsets count from each source's start.
    case(&[
        "convert",
        "--salvage",
        "-m",
        "1",
        "-O",
        "raw",
        "blkdebug:enospc.cfg:r.raw",
        "blkdebug:sector.cfg:a.qcow2",
        "o.raw",
    ]);
    // Nothing to salvage: the plain copy.
    case(&["convert", "--salvage", "-O", "qcow2", "a.qcow2", "o.qcow2"]);
    assert_all_same();
}

#[test]
fn salvage_and_copy_offloading_refusals_come_in_qemu_img_order() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture(dir.path());
    let cases: [&[&str]; 8] = [
        &["-C", "--salvage"],
        &["-C", "-c"],
        &["-C", "-S", "4k"],
        &["-C", "-S", "4k", "-c", "--salvage"],
        &["-C", "--salvage", "--skip-broken-bitmaps"],
        &["-C", "--salvage", "--target-image-opts"],
        &["-C", "--salvage", "-n", "-o", "cluster_size=4k"],
        &["--salvage", "-o", "help", "-C"],
    ];
    for (n, extra) in cases.iter().enumerate() {
        let mut a = vec!["convert"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["-O", "qcow2", "a.qcow2", "o.qcow2"]);
        same_salvage(&fx, n + 1, &a, "o.qcow2");
    }
    assert_all_same();
}

/// A source whose allocation queries fail (its L2 tables cannot be loaded):
/// each sector is taken as data with qemu-img's block-status warning, first
/// for the whole source (qemu-img's counting pass), then again before each
/// sector's own read warning; zeroes are copied and the exit code is 0.
///
/// Left: the same rule firing once (`once = "on"`): qemu-img's copy warns of
/// nothing (the one failure lands on a request of its own that it does not
/// report), strata's first allocation query fails and is warned of, twice.
#[test]
fn salvage_goes_on_past_failed_allocation_queries_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let fx = fixture(dir.path());
    std::fs::write(fx.join("l2.cfg"), "[inject-error]\nevent = \"l2_load\"\n").unwrap();
    let mut n = 100;
    for cfg in ["l2"] {
        let src = format!("blkdebug:{cfg}.cfg:a.qcow2");
        for extra in [&[][..], &["-q"], &["-n"]] {
            for out in ["raw", "qcow2"] {
                n += 1;
                let target = if extra == ["-n"] {
                    format!("n.{out}")
                } else {
                    format!("o.{out}")
                };
                let mut a = vec!["convert", "--salvage", "-m", "1"];
                a.extend_from_slice(extra);
                a.extend_from_slice(&["-O", out, &src, &target]);
                same_salvage(&fx, n, &a, &target);
            }
        }
    }
    // Without --salvage the first failed query ends the copy.
    same_salvage(
        &fx,
        200,
        &["convert", "-O", "raw", "blkdebug:l2.cfg:a.qcow2", "o.raw"],
        "o.raw",
    );
    assert_all_same();
}
