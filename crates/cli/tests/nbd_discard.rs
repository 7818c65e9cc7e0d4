//! `strata nbd serve --discard=ignore|unmap --detect-zeroes=off|on|unmap`
//! against qemu-nbd with the same flags: a real client (qemu-io over NBD)
//! trims, writes zeroes (with and without NO_HOLE) and writes zero data into
//! a fully allocated raw file and qcow2 image, each server on its own copy;
//! the files left must have qemu-nbd's length, allocated extents (FIEMAP),
//! bytes and map. Also the refusals of bad modes, worded as qemu-nbd's.

mod common;

use common::fiemap::extent_bytes;
use common::nbd::{NbdServer, Server};
use common::{assert_all_same, differs, map_json, sh};
use std::path::Path;
use std::process::Command;

/// The server flag sets compared (none: both servers' defaults).
const MODES: [&[&str]; 5] = [
    &[],
    &["--discard=ignore"],
    &["--discard=unmap"],
    &["--detect-zeroes=on"],
    &["--discard=unmap", "--detect-zeroes=unmap"],
];

/// What the client does: trims (whole and partial clusters), write-zeroes
/// with NO_HOLE (`-z`) and without (`-z -u`), and zero data.
const REQUESTS: [&str; 5] = [
    "discard 1M 1M",
    "discard 100k 1M",
    "write -z 1M 1M",
    "write -z -u 1M 1M",
    "write -P 0 1M 1M",
];

/// Serve `x.FMT` in `d` with `server` and `flags`, run `request` through
/// qemu-io over NBD, and stop the server.
fn serve_and_send(d: &Path, server: Server, fmt: &str, flags: &[&str], request: &str) {
    let sock = d.join("x.sock");
    let sock = sock.to_str().unwrap();
    let mut args = vec!["-f", fmt, "-k", sock];
    args.extend_from_slice(flags);
    let image = d.join(format!("x.{fmt}"));
    let srv = NbdServer::start(server, &args, &image, sock);
    let url = format!("nbd+unix:///?socket={sock}");
    common::ok(d, "qemu-io", &["-f", "raw", "-c", request, &url]);
    drop(srv);
}

/// Record any difference between strata's and qemu-nbd's image left.
fn same_image_left(dirs: &[std::path::PathBuf; 2], f: &str, what: &str) {
    let (o, t) = (dirs[0].join(f), dirs[1].join(f));
    let room = |p: &Path| (std::fs::metadata(p).unwrap().len(), extent_bytes(p));
    let (r_o, r_t) = (room(&o), room(&t));
    if r_o != r_t {
        differs(format!(
            "[{what}] (length, allocated bytes) strata {r_o:?}, qemu-nbd {r_t:?}"
        ));
    }
    if std::fs::read(&o).unwrap() != std::fs::read(&t).unwrap() {
        differs(format!("[{what}] the files' bytes differ"));
        return;
    }
    let (m_o, m_t) = (map_json(&dirs[0], f), map_json(&dirs[1], f));
    if m_o != m_t {
        differs(format!("[{what}] map\n{m_o}---\n{m_t}"));
    }
}

fn check_format(fmt: &str) {
    let dir = tempfile::tempdir().unwrap();
    let setup = format!(
        "qemu-img create -q -f {fmt} -o preallocation=full x.{fmt} 4M
qemu-io -f {fmt} -c 'write -P 1 0 4M' x.{fmt} >/dev/null"
    );
    let mut n = 0;
    for flags in MODES {
        for request in REQUESTS {
            let dirs = [
                dir.path().join(format!("{n}-o")),
                dir.path().join(format!("{n}-t")),
            ];
            for (d, server) in dirs.iter().zip([Server::Strata, Server::Qemu]) {
                std::fs::create_dir_all(d).unwrap();
                sh(d, "bash", &["-ec", &setup]);
                serve_and_send(d, server, fmt, flags, request);
            }
            let what = format!("{fmt} {} `{request}`", flags.join(" "));
            same_image_left(&dirs, &format!("x.{fmt}"), &what);
            n += 1;
        }
    }
    assert_all_same();
}

#[test]
fn trims_and_zeroes_into_a_raw_file_leave_the_room_qemu_nbd_leaves() {
    check_format("raw");
}

#[test]
fn trims_and_zeroes_into_a_qcow2_image_leave_the_room_qemu_nbd_leaves() {
    check_format("qcow2");
}

/// A bad `--discard` or `--detect-zeroes` mode, and `--detect-zeroes=unmap`
/// without `--discard=unmap`, are refused before serving, with qemu-nbd's
/// words and exit code.
#[test]
fn bad_discard_and_detect_zeroes_modes_are_refused_as_qemu_nbd_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(d, "qemu-img", &["create", "-q", "-f", "raw", "x.raw", "1M"]);
    let sock = d.join("x.sock");
    let sock = sock.to_str().unwrap();
    for flags in [
        &["--discard=bogus"][..],
        &["--detect-zeroes=bogus"],
        &["--detect-zeroes=unmap"],
        &["--discard=ignore", "--detect-zeroes=unmap"],
    ] {
        let run = |prog: &str, pre: &[&str], name: &str| {
            let out = Command::new(prog)
                .args(pre)
                .args(["-f", "raw", "-k", sock])
                .args(flags)
                .arg("x.raw")
                .current_dir(d)
                .output()
                .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"));
            let err = String::from_utf8_lossy(&out.stderr).replace(name, "PROG");
            (out.status.code(), err)
        };
        let ours = run(common::STRATA, &["nbd", "serve"], "strata nbd");
        let theirs = run("qemu-nbd", &[], "qemu-nbd");
        assert_eq!(ours, theirs, "{flags:?}");
    }
}

/// Host bytes a client's trim frees in the image an export serves, measured
/// between two qemu-io sessions (each ends with a flush): `before` runs, then
/// the allocation is taken, `trim` runs, and the drop is returned.
fn room_freed_by(url: &str, d: &Path, image: &Path, before: &str, trim: &str) -> i128 {
    common::ok(d, "qemu-io", &["-f", "raw", "-c", before, url]);
    let held = i128::from(extent_bytes(image));
    common::ok(d, "qemu-io", &["-f", "raw", "-c", trim, url]);
    held - i128::from(extent_bytes(image))
}

/// `--discard=unmap` still holds for the image a live external snapshot puts
/// on top and for the base a live commit returns to: a trim there frees as
/// much host room as qemu-nbd's trim frees when it serves that same top from
/// the start (an overlay of the same base; the base itself).
#[test]
fn trims_after_a_live_snapshot_and_a_live_commit_free_the_room_qemu_nbd_frees() {
    let dir = tempfile::tempdir().unwrap();
    let setup = "qemu-img create -q -f qcow2 -o preallocation=full x.qcow2 4M
qemu-io -f qcow2 -c 'write -P 1 0 4M' x.qcow2 >/dev/null";
    let (o, t) = (dir.path().join("o"), dir.path().join("t"));
    for d in [&o, &t] {
        std::fs::create_dir(d).unwrap();
        sh(d, "bash", &["-ec", setup]);
    }
    let (write, trim_top, trim_base) = ("write -P 2 0 2M", "discard 0 1M", "discard 2M 1M");

    // strata: one export, switched by the control socket.
    let sock = o.join("x.sock");
    let ctl = o.join("x.ctl");
    let (sock_s, ctl_s) = (sock.to_str().unwrap(), ctl.to_str().unwrap());
    let args = [
        "-f",
        "qcow2",
        "-k",
        sock_s,
        "--discard=unmap",
        "--control",
        ctl_s,
    ];
    let srv = NbdServer::start(Server::Strata, &args, &o.join("x.qcow2"), sock_s);
    let url = format!("nbd+unix:///?socket={sock_s}");
    let ov = o.join("ov.qcow2");
    let ctl_run = |what: &[&str]| {
        let mut a = vec!["nbd", "ctl", "--socket", ctl_s];
        a.extend_from_slice(what);
        common::ok(&o, common::STRATA, &a);
    };
    ctl_run(&["snapshot-external", ov.to_str().unwrap()]);
    let ours_top = room_freed_by(&url, &o, &ov, write, trim_top);
    ctl_run(&["commit"]);
    let ours_base = room_freed_by(&url, &o, &o.join("x.qcow2"), "flush", trim_base);
    drop(srv);

    // qemu-nbd: the overlay served from the start, then the base.
    sh(
        &t,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "ov.qcow2",
        ],
    );
    let sock = t.join("x.sock");
    let sock_s = sock.to_str().unwrap();
    let url = format!("nbd+unix:///?socket={sock_s}");
    let args = ["-f", "qcow2", "-k", sock_s, "--discard=unmap"];
    let ov = t.join("ov.qcow2");
    let srv = NbdServer::start(Server::Qemu, &args, &ov, sock_s);
    let theirs_top = room_freed_by(&url, &t, &ov, write, trim_top);
    drop(srv);
    sh(&t, "qemu-img", &["commit", "-q", "ov.qcow2"]);
    let base = t.join("x.qcow2");
    let srv = NbdServer::start(Server::Qemu, &args, &base, sock_s);
    let theirs_base = room_freed_by(&url, &t, &base, "flush", trim_base);
    drop(srv);

    assert!(theirs_top > 0 && theirs_base > 0, "qemu-nbd freed no room");
    assert_eq!(
        (ours_top, ours_base),
        (theirs_top, theirs_base),
        "host bytes freed by a trim of the new top and of the committed base"
    );
}

/// A zero write covering part of a cluster that stores nothing (unallocated or
/// already zero) gives the whole cluster its zero flag where the rest of it
/// reads as zeroes through the chain, as qemu-nbd's qcow2 driver does, and is
/// written as zero bytes where the backing file shows through the rest: the
/// images left map alike and have the same length, with and without a backing
/// file.
#[test]
fn partial_zero_writes_zero_whole_clusters_where_the_rest_reads_as_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let setup = "qemu-img create -q -f qcow2 base.qcow2 4M
qemu-io -f qcow2 -c 'write -P 7 0 2M' base.qcow2 >/dev/null
qemu-img create -q -f qcow2 plain.qcow2 4M
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 4M";
    let requests = [
        "write -z 4k 4k",
        "write -z 3M 4k",
        "write -z 3100k 8k",
        "write -z 1M 60k",
    ];
    for image in ["plain.qcow2", "top.qcow2"] {
        let dirs = [
            dir.path().join(format!("{image}-o")),
            dir.path().join(format!("{image}-t")),
        ];
        for (d, server) in dirs.iter().zip([Server::Strata, Server::Qemu]) {
            std::fs::create_dir_all(d).unwrap();
            sh(d, "bash", &["-ec", setup]);
            let sock = d.join("x.sock");
            let sock = sock.to_str().unwrap();
            let srv = NbdServer::start(server, &["-f", "qcow2", "-k", sock], &d.join(image), sock);
            let url = format!("nbd+unix:///?socket={sock}");
            for r in requests {
                common::ok(d, "qemu-io", &["-f", "raw", "-c", r, &url]);
            }
            drop(srv);
        }
        let len = |d: &Path| std::fs::metadata(d.join(image)).unwrap().len();
        if len(&dirs[0]) != len(&dirs[1]) {
            differs(format!(
                "{image}: length {} vs {}",
                len(&dirs[0]),
                len(&dirs[1])
            ));
        }
        let (m_o, m_t) = (map_json(&dirs[0], image), map_json(&dirs[1], image));
        if m_o != m_t {
            differs(format!("{image}: map\n{m_o}---\n{m_t}"));
        }
    }
    assert_all_same();
}
