//! Real clients against the server: qemu-img and qemu-io over nbd:// and
//! nbd+unix://, nbdinfo (--map, --list, --content) and nbdcopy, contents
//! checked with `qemu-img compare`.

mod common;
use common::*;
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A qcow2 image with data, a zero range and a hole, written by qemu-io.
fn sample(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("disk.qcow2");
    qcow2(&img, "64M");
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -z 2M 1M",
            "-c",
            "write -P 0x17 10M 300k",
            s(&img),
        ],
    );
    img
}

/// A qcow2 overlay `name` (made by qemu-img) on the [`sample`] image in `dir`.
fn overlay(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "disk.qcow2",
            "-F",
            "qcow2",
            s(&p),
        ],
    );
    p
}

#[test]
fn qemu_img_reads_the_export_identically_over_tcp_and_unix() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path());
    let reference = dir.path().join("ref.raw");
    ok(
        "qemu-img",
        &["convert", "-O", "raw", s(&img), s(&reference)],
    );
    let srv = TestServer::start(dir.path(), vec![cfg("disk", &img)]);
    for uri in [srv.tcp_uri("disk"), srv.unix_uri("disk")] {
        let info = ok("qemu-img", &["info", "--output=json", &uri]);
        assert!(info.contains("\"virtual-size\": 67108864"), "{info}");
        ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &uri, s(&reference)],
        );
    }
}

#[test]
fn qemu_io_writes_through_nbd_land_in_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path());
    let srv = TestServer::start(dir.path(), vec![cfg("disk", &img)]);
    let uri = srv.unix_uri("disk");
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 4M 64k",
            "-c",
            "write -f -P 0x5b 5M 4k",
            "-c",
            "write -z 0 512k",
            "-c",
            "discard 10M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0x5a 4M 64k",
            "-c",
            "read -P 0 0 512k",
            &uri,
        ],
    );
    // Extended headers over TCP too (QEMU 10 negotiates them).
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x66 20M 1M",
            "-c",
            "read -P 0x66 20M 1M",
            &srv.tcp_uri("disk"),
        ],
    );
    srv.stop_and_release();
    ok("qemu-img", &["check", s(&img)]);
    ok(
        "qemu-io",
        &[
            "-c",
            "read -P 0x5a 4M 64k",
            "-c",
            "read -P 0x5b 5M 4k",
            "-c",
            "read -P 0 0 512k",
            "-c",
            "read -P 0xab 512k 512k",
            "-c",
            "read -P 0x66 20M 1M",
            s(&img),
        ],
    );
}

#[test]
fn nbdinfo_lists_maps_and_probes_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path());
    let mut c = cfg("disk", &img);
    c.description = "the sample disk".into();
    let other = dir.path().join("other.qcow2");
    qcow2(&other, "1M");
    let srv = TestServer::start(dir.path(), vec![c, cfg("other", &other).read_only_cfg()]);
    let uri = srv.unix_uri("disk");
    let info = ok("nbdinfo", &[&uri]);
    for want in [
        "export-size: 67108864",
        "base:allocation",
        "qemu:allocation-depth",
        "can_multi_conn: true",
        "can_fast_zero: true",
        "can_df: true",
        "block_size_maximum: 33554432",
        "description: the sample disk",
    ] {
        assert!(info.contains(want), "missing {want:?} in\n{info}");
    }
    let list = ok(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix:///?socket={}", srv.sock.display()),
        ],
    );
    assert!(
        list.contains("export=\"disk\"") && list.contains("export=\"other\""),
        "{list}"
    );
    assert!(list.contains("is_read_only: true"), "{list}");
    let map = ok("nbdinfo", &["--map", "--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let ext: Vec<(u64, u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    // Data at 0..1M and 10M.., zeroes elsewhere (the written zero range too).
    assert_eq!(ext[0], (0, 1 << 20, 0), "{map}");
    assert!(
        ext.iter().any(|&(o, _, t)| o == 10 << 20 && t == 0),
        "{map}"
    );
    assert!(
        ext.iter()
            .any(|&(o, l, t)| o <= 2 << 20 && o + l >= 3 << 20 && t == 3),
        "{map}"
    );
    let depth = ok("nbdinfo", &["--map=qemu:allocation-depth", &uri]);
    assert!(
        depth.contains("local") && depth.contains("absent"),
        "{depth}"
    );
    let content = ok("nbdinfo", &["--content", &uri]);
    assert!(content.contains("content:"), "{content}");
}

trait RoCfg {
    fn read_only_cfg(self) -> Self;
}
impl RoCfg for strata_nbd::ExportConfig {
    fn read_only_cfg(mut self) -> Self {
        self.read_only = true;
        self
    }
}

#[test]
fn nbdcopy_copies_out_and_in_with_several_connections() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path());
    let target = dir.path().join("target.qcow2");
    qcow2(&target, "64M");
    let out = dir.path().join("out.raw");
    let srv = TestServer::start(dir.path(), vec![cfg("src", &img), cfg("dst", &target)]);
    ok(
        "nbdcopy",
        &["--connections=4", &srv.unix_uri("src"), s(&out)],
    );
    ok(
        "qemu-img",
        &["compare", "-U", "-F", "raw", s(&img), s(&out)],
    );
    // Into the second export over TCP, multi-conn, then flushed by nbdcopy.
    ok(
        "nbdcopy",
        &["--connections=4", "--flush", s(&out), &srv.tcp_uri("dst")],
    );
    ok("nbdcopy", &[&srv.unix_uri("src"), &srv.unix_uri("dst")]);
    srv.stop_and_release();
    ok("qemu-img", &["compare", s(&img), s(&target)]);
    ok("qemu-img", &["check", s(&target)]);
}

#[test]
fn read_only_export_is_refused_to_writers_and_served_to_readers() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path());
    let srv = TestServer::start(dir.path(), vec![cfg("ro", &img).read_only_cfg()]);
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &srv.unix_uri("ro")],
    );
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && text.contains("Permission denied"),
        "{text}"
    );
    let info = ok("nbdinfo", &[&srv.unix_uri("ro")]);
    assert!(info.contains("is_read_only: true"), "{info}");
    ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 1M",
            &srv.unix_uri("ro"),
        ],
    );
}

#[test]
fn chain_export_shows_backing_data_and_allocation_depth() {
    let dir = tempfile::tempdir().unwrap();
    let base = sample(dir.path());
    let top = overlay(dir.path(), "top.qcow2");
    ok("qemu-io", &["-c", "write -P 0x77 1M 64k", s(&top)]);
    let srv = TestServer::start(dir.path(), vec![cfg("", &top)]);
    let uri = srv.unix_uri("");
    ok("qemu-img", &["compare", "-U", "-f", "raw", &uri, s(&top)]);
    let depth = ok("nbdinfo", &["--map=qemu:allocation-depth", "--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&depth).unwrap();
    let at = |off: u64| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let o = e["offset"].as_u64().unwrap();
                o <= off && off < o + e["length"].as_u64().unwrap()
            })
            .map(|e| e["type"].as_u64().unwrap())
            .unwrap()
    };
    assert_eq!(at(0), 2, "{depth}");
    assert_eq!(at(1 << 20), 1, "{depth}");
    assert_eq!(at(40 << 20), 0, "{depth}");
    let _ = base;
}

/// A writable export holds its backing files with read locks only: QEMU can use
/// the same base under another overlay, and a second export of a sibling overlay
/// opens. A commit takes the base for writing only while it runs, and is refused,
/// changing nothing, while another user holds the base.
#[test]
fn backing_files_stay_shared_and_commit_takes_the_base_only_when_free() {
    let dir = tempfile::tempdir().unwrap();
    let base = sample(dir.path());
    let (a, b) = (
        overlay(dir.path(), "a.qcow2"),
        overlay(dir.path(), "b.qcow2"),
    );
    ok("qemu-io", &["-c", "write -P 0x5a 1M 64k", s(&a)]);
    let srv = TestServer::start(dir.path(), vec![cfg("a", &a)]);
    // QEMU opens the sibling overlay (and so the base) without -U.
    ok("qemu-io", &["-r", "-c", "read -P 0xab 0 1M", s(&b)]);
    ok("qemu-img", &["info", "--backing-chain", s(&b)]);
    // A second export on the same base, in the same process.
    let sibling = strata_nbd::Export::open(&cfg("b", &b)).expect("sibling export opens");
    let refused = srv.export(0).commit().unwrap_err().to_string();
    assert!(refused.contains("disk.qcow2"), "{refused}");
    // The refused commit left the chain whole: the export still reads the base.
    let uri = srv.unix_uri("a");
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0x5a 1M 64k",
            &uri,
        ],
    );
    drop(sibling);
    // A child process that another test thread forks at this moment holds a
    // copy of the sibling's descriptors, and so its OFD locks, until it execs;
    // under load that can take a moment, so the now free base is retried
    // briefly (a base still held after 5 s fails the test).
    let mut tries = 0;
    loop {
        match srv.export(0).commit() {
            Ok(_) => break,
            Err(e) if tries < 50 && e.to_string().contains("lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("commit once the base is free: {e}"),
        }
    }
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x5a 1M 64k", &uri]);
    srv.stop_and_release();
    ok("qemu-io", &["-r", "-c", "read -P 0x5a 1M 64k", s(&base)]);
    ok("qemu-img", &["check", s(&base)]);
}

/// After a live external snapshot the frozen image is held with read locks: a
/// backup tool can read it (qemu-img without -U) while the export keeps writing
/// to the new overlay.
#[test]
fn frozen_image_of_an_external_snapshot_is_readable_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample(dir.path());
    let srv = TestServer::start(dir.path(), vec![cfg("disk", &img)]);
    let over = dir.path().join("over.qcow2");
    srv.export(0).snapshot_external(&over).unwrap();
    let uri = srv.unix_uri("disk");
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 64k", &uri]);
    let copy = dir.path().join("copy.raw");
    ok("qemu-img", &["convert", "-O", "raw", s(&img), s(&copy)]);
    ok(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0xab 0 1M", s(&copy)],
    );
    ok("qemu-img", &["check", s(&img)]);
}
