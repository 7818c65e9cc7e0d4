//! Partial writes into images with extended L2 entries leave what qemu-img
//! leaves: a write that covers only part of a cluster allocates the cluster
//! but writes and marks only the subclusters it touches (copy-on-write of the
//! partly written ones), so the rest keeps reading through to the backing file
//! or as zeroes. Each tool runs the same command (`rebase` in safe mode,
//! `convert` with and without `-B`, `commit`) on its own copy of files
//! qemu-img and qemu-io made, at cluster sizes from 16 KiB to 2 MiB; both must
//! print the same and leave the same bytes and the same map. The NBD servers
//! are compared the same way: qemu-io writes the same requests through
//! `strata nbd serve` and through `qemu-nbd` to two copies of an image.

mod common;

use common::nbd::{NbdServer, Server};
use common::{assert_all_same, differs, ok, outcome, same_files};

const CLUSTERS: [&str; 4] = ["16k", "64k", "512k", "2M"];

/// A qcow2 image with extended L2 entries of cluster size `cs`.
fn el2(cs: &str) -> String {
    format!("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size={cs}")
}

/// Safe `rebase` onto a backing file that differs from the old one in small,
/// unaligned ranges: qemu-img writes the old backing file's data there, into
/// unallocated clusters of the overlay and into unallocated subclusters of its
/// allocated ones.
#[test]
fn safe_rebase_onto_a_new_backing_file_writes_only_the_subclusters_that_differ() {
    let dir = tempfile::tempdir().unwrap();
    for cs in CLUSTERS {
        let setup = format!(
            "{el2} old.qcow2 8M
             qemu-io -c 'write -P 1 0 8M' old.qcow2 >/dev/null
             qemu-img create -q -f raw new.raw 8M
             qemu-io -f raw -c 'write -P 1 0 8M' -c 'write -P 2 5000 300' \
                     -c 'write -P 3 1M 3k' -c 'write -P 4 3000k 100k' \
                     -c 'write -P 5 7M 1' new.raw >/dev/null
             {el2} -b old.qcow2 -F qcow2 top.qcow2 8M
             qemu-io -c 'write -P 9 4k 1k' -c 'write -P 9 3100k 2k' top.qcow2 >/dev/null",
            el2 = el2(cs)
        );
        same_files(
            dir.path(),
            &format!("rebase-{cs}"),
            &setup,
            &["rebase -b new.raw -F raw top.qcow2"],
            false,
        );
    }
    // An overlay without a backing file (and with an extended-L2 one).
    same_files(
        dir.path(),
        "rebase-nobacking",
        "qemu-img create -q -f qcow2 -o extended_l2=on el2.qcow2 1M
         qemu-img create -q -f qcow2 -o extended_l2=on -b el2.qcow2 -F qcow2 elov.qcow2 1M
         qemu-io -c 'write -P 0x77 4k 4k' elov.qcow2 >/dev/null
         qemu-img create -q -f qcow2 base.qcow2 1M
         qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x12 200k 3k' base.qcow2 >/dev/null
         qemu-img create -q -f qcow2 -o extended_l2=on lone.qcow2 1M
         qemu-io -c 'write -P 0x21 70k 1k' lone.qcow2 >/dev/null",
        &[
            "rebase -F raw -b base.qcow2 elov.qcow2",
            "rebase -b base.qcow2 -F qcow2 lone.qcow2",
        ],
        false,
    );
    assert_all_same();
}

/// `convert` into extended L2 from sources whose data covers clusters in part:
/// the sparse detection leaves the zero parts unwritten, and `-B` writes what
/// differs from the new backing file.
#[test]
fn convert_into_extended_l2_writes_partial_clusters_as_subclusters() {
    let dir = tempfile::tempdir().unwrap();
    for cs in CLUSTERS {
        let setup = format!(
            "qemu-img create -q -f raw src.raw 8M
             qemu-io -f raw -c 'write -P 1 4k 4k' -c 'write -P 2 70k 1k' \
                     -c 'write -P 3 1020k 8k' -c 'write -P 4 3M 600k' \
                     -c 'write -P 5 8188k 4k' src.raw >/dev/null
             {el2} base.qcow2 8M
             qemu-io -c 'write -P 1 0 2M' -c 'write -P 4 3M 1M' base.qcow2 >/dev/null
             {el2} -b base.qcow2 -F qcow2 top.qcow2 8M
             qemu-io -c 'write -P 7 12k 1k' -c 'write -P 8 2044k 8k' top.qcow2 >/dev/null",
            el2 = el2(cs)
        );
        let o = format!("-o extended_l2=on,cluster_size={cs}");
        same_files(
            dir.path(),
            &format!("convert-{cs}"),
            &setup,
            &[
                &format!("convert -O qcow2 {o} src.raw a.qcow2"),
                &format!("convert -O qcow2 {o} -S 512 src.raw b.qcow2"),
                &format!("convert -O qcow2 {o} -B base.qcow2 -F qcow2 src.raw c.qcow2"),
                &format!("convert -O qcow2 {o} -B base.qcow2 -F qcow2 top.qcow2 d.qcow2"),
            ],
            false,
        );
    }
    assert_all_same();
}

/// `commit` of an overlay whose data covers clusters in part into an
/// extended-L2 base: qemu-img's mirror job copies whole chunks of its
/// granularity (the cluster size, at most 64 KiB), into the base's unallocated
/// clusters and into unallocated and zero subclusters of its allocated ones.
/// Its chunks are copied in parallel, so the order the new clusters take in the
/// file changes from run to run of qemu-img itself: the bases are compared by
/// their maps without host offsets, their checks (but for how many clusters
/// are fragmented, which follows that order) and their guest data (not their
/// lengths: the cluster qemu-img allocates last may be written in part).
#[test]
fn commit_into_an_extended_l2_base_copies_the_chunks_qemu_img_copies() {
    let dir = tempfile::tempdir().unwrap();
    for cs in CLUSTERS {
        let d = dir.path().join(format!("commit-{cs}"));
        std::fs::create_dir(&d).unwrap();
        let setup = format!(
            "qemu-img create -q -f raw root.raw 8M
             qemu-io -f raw -c 'write -P 1 0 8M' root.raw >/dev/null
             {el2} -b root.raw -F raw base.qcow2 8M
             qemu-io -c 'write -P 2 1M 3k' -c 'write -z 2M 8k' -c 'write -P 3 5M 100k' \
                     base.qcow2 >/dev/null
             {el2} -b base.qcow2 -F qcow2 top.qcow2 8M
             qemu-io -c 'write -P 4 10k 1k' -c 'write -P 5 1M 9k' -c 'write -P 6 2M 1k' \
                     -c 'write -P 7 5100k 300' -c 'write -P 8 6M 1' top.qcow2 >/dev/null",
            el2 = el2(cs)
        );
        let dirs = [d.join("o"), d.join("t")];
        for (dir, prog) in dirs.iter().zip(["strata", "qemu-img"]) {
            std::fs::create_dir(dir).unwrap();
            common::sh(dir, "bash", &["-ec", &setup]);
            let got = outcome(dir, prog, &["commit", "top.qcow2"]);
            let want = (Some(0), "Image committed.\n".to_string(), String::new());
            if got != want {
                differs(format!("[commit-{cs}] {prog}: {got:?}"));
            }
        }
        for f in ["base.qcow2", "top.qcow2"] {
            let (o, t) = (dirs[0].join(f), dirs[1].join(f));
            let (o, t) = (o.to_str().unwrap(), t.to_str().unwrap());
            let seen = |p: &str| {
                let map = guest_map(&ok(&d, "qemu-img", &["map", "--output=json", p]));
                let check = outcome(&d, "qemu-img", &["check", "--output=json", p]);
                // How fragmented the file is follows that order too.
                let report: Vec<String> = check
                    .1
                    .replace(p, "IMG")
                    .lines()
                    .filter(|l| !l.contains("\"fragmented-clusters\""))
                    .map(str::to_string)
                    .collect();
                (map, check.0, report)
            };
            if seen(o) != seen(t) {
                differs(format!(
                    "[commit-{cs}] {f}: strata {:?}\n qemu-img {:?}",
                    seen(o),
                    seen(t)
                ));
            }
            if outcome(&d, "qemu-img", &["compare", o, t]).0 != Some(0) {
                differs(format!("[commit-{cs}] {f}: the guest data differ"));
            }
        }
    }
    assert_all_same();
}

/// A `map --output=json` without host offsets, its ranges merged where only
/// the host offsets told them apart: (start, length, the rest of the fields).
fn guest_map(json: &str) -> Vec<(u64, u64, String)> {
    let mut out: Vec<(u64, u64, String)> = Vec::new();
    for l in json.lines() {
        let num = |key: &str| -> u64 {
            let at = l.find(key).unwrap() + key.len();
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let (start, len) = (num("\"start\": "), num("\"length\": "));
        let rest = l[l.find("\"depth\"").unwrap()..]
            .split(", \"offset\"")
            .next()
            .unwrap()
            .trim_end_matches(['}', ']', ','])
            .to_string();
        match out.last_mut() {
            Some(last) if last.0 + last.1 == start && last.2 == rest => last.1 += len,
            _ => out.push((start, len, rest)),
        }
    }
    out
}

/// The write requests of the NBD test, as qemu-io commands.
const NBD_WRITES: &[&str] = &[
    "write -P 1 100 200",
    "write -P 2 70000 5000",
    "write -P 3 300 4096",
    "write -z 140k 8k",
    "write -P 4 143k 1000",
    "write -P 5 1000k 300k",
    "write -P 6 1100k 1",
    "flush",
];

/// qemu-io's writes through `strata nbd serve` and through `qemu-nbd` leave
/// the same bytes in the two copies of an extended-L2 image (with and without
/// a backing file).
#[test]
fn nbd_writes_into_extended_l2_leave_the_bytes_qemu_nbd_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for cs in CLUSTERS {
        for backed in [false, true] {
            let n = format!("nbd-{cs}-{backed}");
            let sd = d.join(&n);
            std::fs::create_dir(&sd).unwrap();
            let mut setup = "qemu-img create -q -f raw root.raw 4M
                 qemu-io -f raw -c 'write -P 0x31 0 4M' root.raw >/dev/null\n"
                .to_string();
            setup += &el2(cs);
            if backed {
                setup += " -b root.raw -F raw";
            }
            setup += " img.qcow2 4M";
            common::sh(&sd, "bash", &["-ec", &setup]);
            let sock = sd.join("e.sock");
            let sock = sock.to_str().unwrap();
            let url = format!("nbd+unix:///e?socket={sock}");
            let mut io = vec!["-f", "raw"];
            for w in NBD_WRITES {
                io.extend(["-c", w]);
            }
            io.push(&url);
            for (server, copy) in [(Server::Strata, "o.qcow2"), (Server::Qemu, "t.qcow2")] {
                std::fs::copy(sd.join("img.qcow2"), sd.join(copy)).unwrap();
                let srv = NbdServer::start(
                    server,
                    &["-f", "qcow2", "-x", "e", "-k", sock],
                    &sd.join(copy),
                    sock,
                );
                ok(&sd, "qemu-io", &io);
                drop(srv);
                let _ = std::fs::remove_file(sock);
            }
            let read = |f: &str| std::fs::read(sd.join(f)).unwrap();
            if read("o.qcow2") != read("t.qcow2") {
                let map = |f: &str| ok(&sd, "qemu-img", &["map", "--output=json", f]);
                differs(format!(
                    "[{n}] the images differ; maps:\n{}---\n{}",
                    map("o.qcow2"),
                    map("t.qcow2")
                ));
            }
        }
    }
    assert_all_same();
}
