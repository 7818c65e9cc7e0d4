//! qemu-img next to live QEMU processes, through both tools: chains whose base
//! is an NBD export (a backing file named by an `nbd` URL, as a VM's disk made
//! from a golden image served by qemu-nbd), exports served read-only asked to
//! take writes, odd export names, and images a running QEMU holds open. stdout,
//! stderr, the exit code and every image left behind must be alike.

mod common;

use common::nbd::{free_port, NbdServer, Server};
use common::{assert_all_same, io, qcow2, same, sh};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A raw golden image `gold.raw` (8 MiB: data, a hole, more data) in `d`.
fn golden(d: &Path) {
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "gold.raw", "8M"],
    );
    io(
        d,
        "raw",
        "gold.raw",
        &["write -P 0x11 0 1M", "write -P 0x22 5M 64k"],
    );
}

/// qemu-nbd serving `image` of `d` read-only (`-f FMT -r`) as export `export`
/// on the socket `sock`, until dropped.
fn serve_read_only(d: &Path, image: &str, fmt: &str, export: &str, sock: &str) -> NbdServer {
    NbdServer::start(
        Server::Qemu,
        &["-r", "-f", fmt, "-x", export, "-k", sock],
        &d.join(image),
        sock,
    )
}

#[test]
fn a_base_export_that_cannot_be_reached_is_refused_in_qemu_img_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    golden(d);
    let sock = d.join("gold.sock");
    let sock = sock.to_str().unwrap().to_string();
    let gone = d.join("gone.sock");
    let gone = gone.to_str().unwrap();
    let _srv = serve_read_only(d, "gold.raw", "raw", "e", &sock);
    let bases = [
        ("gone", format!("nbd+unix:///e?socket={gone}")),
        ("noexport", format!("nbd+unix:///nope?socket={sock}")),
        ("port", format!("nbd://127.0.0.1:{}/e", free_port())),
    ];
    for (img, base) in &bases {
        let img = format!("{img}.qcow2");
        qcow2(d, &img, "8M", &["-u", "-b", base, "-F", "raw"]);
        for sub in [
            vec!["info", &img],
            vec!["info", "--backing-chain", &img],
            vec!["map", &img],
            vec!["check", &img],
            vec!["compare", &img, "gold.raw"],
            vec!["convert", "-O", "raw", &img, "out.raw"],
            vec!["commit", &img],
            vec!["create", "-f", "qcow2", "-b", base, "-F", "raw", "o.qcow2"],
        ] {
            same(d, &sub);
        }
    }
    assert_all_same();
}

#[test]
fn read_only_exports_refuse_writing_opens_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    golden(d);
    qcow2(d, "q.qcow2", "8M", &[]);
    io(d, "qcow2", "q.qcow2", &["write -P 0x55 0 64k"]);
    let (rs, qs) = (d.join("r.sock"), d.join("q.sock"));
    let (rs, qs) = (rs.to_str().unwrap(), qs.to_str().unwrap());
    let _r = serve_read_only(d, "gold.raw", "raw", "r", rs);
    // A qcow2 image's bytes inside the export (probed over NBD).
    let _q = serve_read_only(d, "q.qcow2", "raw", "q", qs);
    let raw = format!("nbd+unix:///r?socket={rs}");
    let q = format!("nbd+unix:///q?socket={qs}");
    let raw_opts = format!("driver=nbd,server.type=unix,server.path={rs},export=r");
    let before = (
        std::fs::read(d.join("gold.raw")).unwrap(),
        std::fs::read(d.join("q.qcow2")).unwrap(),
    );
    for args in [
        vec!["convert", "-n", "-O", "raw", "q.qcow2", &raw],
        vec!["convert", "-n", "--target-image-opts", "q.qcow2", &raw_opts],
        vec!["convert", "-O", "raw", "q.qcow2", &raw],
        vec!["convert", "-O", "qcow2", "q.qcow2", &raw],
        vec!["create", "-f", "raw", &raw, "1M"],
        vec!["create", "-f", "qcow2", &raw, "1M"],
        vec!["resize", "-f", "raw", &raw, "8M"],
        vec!["dd", "-O", "raw", "if=q.qcow2", &format!("of={raw}")],
        vec!["bench", "-w", "-c", "1", "-f", "raw", &raw],
        vec!["rebase", "-u", "-b", "", "-f", "raw", &raw],
        vec!["info", &q],
        vec!["check", &q],
        vec!["check", "-r", "all", &q],
        vec!["snapshot", "-l", &q],
        vec!["snapshot", "-c", "s", &q],
        vec!["bitmap", "--add", &q, "b"],
        vec!["amend", "-o", "compat=0.10", &q],
        vec!["resize", &q, "16M"],
        vec!["commit", &q],
        vec!["rebase", "-u", "-b", "", &q],
    ] {
        same(d, &args);
    }
    let after = (
        std::fs::read(d.join("gold.raw")).unwrap(),
        std::fs::read(d.join("q.qcow2")).unwrap(),
    );
    assert!(before == after, "a read-only export was written");
    assert_all_same();
}

/// A QEMU process (`-machine none`, no guest) holding block nodes open until
/// dropped: `args` are its `-blockdev` options.
struct Qemu(Child);

impl Qemu {
    /// Start it in `dir` and return once its QMP socket `qmp` accepts (the
    /// nodes are open by then).
    fn start(dir: &Path, blockdevs: &[String], qmp: &Path) -> Qemu {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-machine", "none", "-nodefaults", "-display", "none"])
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", qmp.display()),
            ]);
        for b in blockdevs {
            c.args(["-blockdev", b]);
        }
        let child = c
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 must be installed");
        let q = Qemu(child);
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(qmp).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "QEMU never opened its QMP socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn images_a_running_qemu_holds_are_locked_as_qemu_img_finds_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2(d, "base.qcow2", "8M", &[]);
    io(d, "qcow2", "base.qcow2", &["write -P 0x11 0 1M"]);
    qcow2(d, "rw.qcow2", "8M", &["-b", "base.qcow2", "-F", "qcow2"]);
    io(d, "qcow2", "rw.qcow2", &["write -P 0x22 2M 64k"]);
    sh(d, "qemu-img", &["snapshot", "-c", "s1", "rw.qcow2"]);
    sh(d, "qemu-img", &["bitmap", "--add", "rw.qcow2", "b0"]);
    qcow2(d, "ro.qcow2", "8M", &[]);
    io(d, "qcow2", "ro.qcow2", &["write -P 0x33 0 64k"]);
    let node = |n: &str, f: &str, ro: &str| {
        vec![
            format!("driver=file,node-name={n}f,filename={f},read-only={ro}"),
            format!("driver=qcow2,node-name={n},file={n}f,read-only={ro}"),
        ]
    };
    let mut blockdevs = node("rw", "rw.qcow2", "off");
    blockdevs.extend(node("ro", "ro.qcow2", "on"));
    let qmp: PathBuf = d.join("qmp.sock");
    let _qemu = Qemu::start(d, &blockdevs, &qmp);
    let before: Vec<Vec<u8>> = ["base.qcow2", "rw.qcow2", "ro.qcow2"]
        .iter()
        .map(|f| std::fs::read(d.join(f)).unwrap())
        .collect();
    for img in ["rw.qcow2", "ro.qcow2", "base.qcow2"] {
        for u in [None, Some("-U")] {
            let with = |args: &[&str]| -> Vec<String> {
                let mut v: Vec<String> = vec![args[0].into()];
                v.extend(u.map(String::from));
                v.extend(args[1..].iter().map(|s| s.to_string()));
                v
            };
            for args in [
                with(&["info", img]),
                with(&["info", "--backing-chain", img]),
                with(&["check", img]),
                with(&["map", "--output=json", img]),
                with(&["measure", "-O", "qcow2", img]),
                with(&["compare", img, "base.qcow2"]),
                with(&["snapshot", "-l", img]),
                with(&["convert", "-O", "raw", img, "out.raw"]),
                with(&["dd", &format!("if={img}"), "of=dd.raw"]),
                with(&["rebase", "-u", "-b", "", img]),
                with(&["snapshot", "-c", "s2", img]),
                with(&["bitmap", "--add", img, "b1"]),
                with(&["check", "-r", "all", img]),
                with(&["convert", "-n", "-O", "qcow2", "base.qcow2", img]),
            ] {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                same(d, &args);
            }
            if u.is_none() {
                for args in [
                    vec!["commit", img],
                    vec!["resize", img, "16M"],
                    vec!["amend", "-o", "compat=0.10", img],
                    vec!["create", "-f", "qcow2", img, "1M"],
                ] {
                    same(d, &args);
                }
            }
        }
    }
    let after: Vec<Vec<u8>> = ["base.qcow2", "rw.qcow2", "ro.qcow2"]
        .iter()
        .map(|f| std::fs::read(d.join(f)).unwrap())
        .collect();
    assert!(before == after, "an image QEMU holds was written");
    assert_all_same();
}
