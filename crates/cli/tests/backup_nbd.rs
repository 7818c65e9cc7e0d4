//! `strata backup create --nbd URL` against `qemu-nbd` (missing, the test
//! fails): a full backup reads only what the export's `base:allocation`
//! reports as allocated, an incremental with `--bitmap` reads only the chunks
//! QEMU's persistent dirty bitmap marks, a bitmap the server does not offer
//! means a full read said on stderr, and every snapshot restores, through
//! strata and through restic, to the image as `qemu-img` shows it. The bytes
//! read are counted by a proxy between strata and the server.

mod common;

use common::nbd::{CountingProxy, QemuNbd};
use common::restic::*;
use std::path::Path;
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;

fn qemu_io(image: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(s(image)));
}

/// `strata backup create --nbd URL ARGS`: its output, whatever the status.
fn backup(repo: &Path, url: &str, args: &[&str]) -> Output {
    let mut a = vec!["create", "--repo", s(repo), "--nbd", url];
    a.extend(args);
    run(strata(&a))
}

/// The snapshot restores, through strata, to what `qemu-img` shows of `want`
/// (a raw copy of the image at the time).
fn restores_to(repo: &Path, id: &str, want: &Path) {
    let out = want.with_extension("restored");
    run(strata(&["restore", "--repo", s(repo), id, s(&out)]));
    qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&out), s(want)]);
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn nbd_exports_are_backed_up_reading_only_allocated_then_bitmap_marked_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, repo) = (d.join("disk.qcow2"), d.join("repo"));
    qemu_img(&["create", "-f", "qcow2", s(&img), "400M"]);
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 8M",
            "write -P 0x22 100M 7M",
            "write -P 0x33 250M 3M",
            "write -z 300M 4M",
        ],
    );
    // The bitmap records every write after this point.
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    let before = d.join("before.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&before)]);
    run(strata(&["init", "--repo", s(&repo)]));

    let upstream = d.join("qemu-nbd.sock");
    let proxy = CountingProxy::start(d.join("proxy.sock"), s(&upstream).to_string());
    let url = proxy.url("disk0");
    let serve = |bitmap_args: &[&str]| {
        let mut args = vec!["-k", s(&upstream)];
        args.extend(bitmap_args);
        QemuNbd::start(&img, "disk0", &args, s(&upstream))
    };

    // Full: only the 18 MiB qemu-img calls data are read (not the zeroed range).
    let srv = serve(&["-B", "b0"]);
    let full = backup(&repo, &url, &["--bitmap", "b0"]);
    assert_eq!(proxy.take_read(), allocated(&img));
    assert_eq!(allocated(&img), 18 * MIB);
    let stderr = String::from_utf8_lossy(&full.stderr);
    assert!(
        stderr.contains("reading the whole disk: there is no previous backup of this export"),
        "{stderr}"
    );
    let full_id = saved_id(&full);
    drop(srv);

    // Change 1% (4 MiB): 2 MiB over the data of chunk 0, 2 MiB in the empty
    // chunk 50. The incremental reads chunk 0 whole and chunk 50's written half.
    qemu_io(&img, &["write -P 0x44 1M 2M", "write -P 0x55 200M 2M"]);
    let after = d.join("after.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&after)]);
    let srv = serve(&["-B", "b0"]);
    let incr = backup(&repo, &url, &["--bitmap", "b0"]);
    assert_eq!(proxy.take_read(), 6 * MIB);
    let stderr = String::from_utf8_lossy(&incr.stderr);
    assert!(
        stderr.contains(&format!(
            "incremental: 2 of 100 chunks changed since snapshot {full_id}"
        )),
        "{stderr}"
    );
    let incr_id = saved_id(&incr);

    // A bitmap the export does not offer: everything allocated is read, and said.
    let missing = backup(&repo, &url, &["--parent", &incr_id, "--bitmap", "nosuch"]);
    assert_eq!(proxy.take_read(), allocated(&img));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains(
            "reading the whole disk: the server does not offer 'qemu:dirty-bitmap:nosuch'"
        ),
        "{stderr}"
    );
    drop(srv);

    // The same export over TCP, by an nbd:// URL.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let srv = QemuNbd::start(
        &img,
        "disk0",
        &["-b", "127.0.0.1", "-p", &port.to_string()],
        &addr,
    );
    let tcp_id = saved_id(&backup(&repo, &format!("nbd://{addr}/disk0"), &[]));
    drop(srv);

    restores_to(&repo, &full_id, &before);
    for id in [&incr_id, &saved_id(&missing), &tcp_id] {
        restores_to(&repo, id, &after);
    }
    restic_check(&repo);
    let target = d.join("restic-out");
    run(restic(
        &repo,
        &["restore", &incr_id, "--target", s(&target)],
    ));
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        s(&target.join("disk0")),
        s(&img),
    ]);
}

#[test]
fn a_malformed_nbd_url_is_refused_before_the_repository_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let out = strata(&[
        "create",
        "--repo",
        s(&dir.path().join("none")),
        "--nbd",
        "nbd+unix:///x",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid NBD URL 'nbd+unix:///x': no ?socket=PATH"),
        "{stderr}"
    );
}
