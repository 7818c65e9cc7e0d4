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
        let sock = loop {
            match std::os::unix::net::UnixStream::connect(qmp) {
                Ok(s) => break s,
                Err(_) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(30),
                        "QEMU never opened its QMP socket"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        // The socket listens before the nodes are open; QMP answers a command
        // only from the main loop, once they are (and their headers written).
        use std::io::{BufRead, Write};
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut reply = std::io::BufReader::new(sock.try_clone().unwrap());
        let mut line = String::new();
        reply.read_line(&mut line).expect("QMP greeting");
        (&sock)
            .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
            .unwrap();
        line.clear();
        reply.read_line(&mut line).expect("QMP answer");
        assert!(line.contains("return"), "QMP refused: {line}");
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
            let with = |args: &[&str]| with_option(u, args);
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

/// Every name of the export `e` qemu-img takes as a backing file name: on the
/// socket `sock` (URL and legacy forms) and on 127.0.0.1:`port`.
fn backing_names(sock: &str, port: u16) -> Vec<String> {
    vec![
        format!("nbd+unix:///e?socket={sock}"),
        format!("nbd:unix:{sock}:exportname=e"),
        format!("nbd://127.0.0.1:{port}/e"),
        format!("nbd+tcp://127.0.0.1:{port}/e"),
        format!("nbd:127.0.0.1:{port}:exportname=e"),
    ]
}

#[test]
fn an_overlay_on_a_base_export_reads_through_it_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    golden(d);
    let sock = d.join("gold.sock");
    let sock = sock.to_str().unwrap().to_string();
    let port = free_port();
    let _unix = serve_read_only(d, "gold.raw", "raw", "e", &sock);
    let addr = format!("127.0.0.1:{port}");
    let _tcp = NbdServer::start(
        Server::Qemu,
        &[
            "-r",
            "-f",
            "raw",
            "-x",
            "e",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ],
        &d.join("gold.raw"),
        &addr,
    );
    let gold = std::fs::read(d.join("gold.raw")).unwrap();
    for (n, base) in backing_names(&sock, port).iter().enumerate() {
        let vm = format!("vm{n}.qcow2");
        qcow2(d, &vm, "8M", &["-b", base, "-F", "raw"]);
        io(d, "qcow2", &vm, &["write -P 0x77 5M 4k"]);
        for args in [
            vec!["info", &vm],
            vec!["info", "--backing-chain", &vm],
            vec!["info", "--backing-chain", "--output=json", &vm],
            vec!["map", &vm],
            vec!["map", "--output=json", &vm],
            vec!["check", &vm],
            vec!["compare", &vm, "gold.raw"],
            vec!["compare", "-F", "raw", base, "gold.raw"],
            vec!["convert", "-O", "raw", &vm, "out.raw"],
            vec!["measure", "-O", "qcow2", &vm],
            vec!["commit", &vm],
            vec!["rebase", "-u", "-b", base, "-F", "raw", &vm],
            vec!["create", "-f", "qcow2", "-b", base, "-F", "raw", "o.qcow2"],
            vec!["info", "o.qcow2"],
        ] {
            same(d, &args);
        }
    }
    // The export stayed as it was: nothing wrote through a read-only base.
    assert!(gold == std::fs::read(d.join("gold.raw")).unwrap());
    assert_all_same();
}

#[test]
fn an_nbd_server_given_as_a_file_descriptor_is_refused_as_qemu_img_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // stdin is /dev/null and stdout a pipe in both runs: open, but no socket.
    for opts in [
        "driver=nbd,server.type=fd,server.str=0",
        "driver=nbd,server.type=fd,server.str=1,export=e",
        "driver=nbd,server.type=fd,server.str=-1",
        "driver=nbd,server.type=fd,server.str=+1",
        "driver=nbd,server.type=fd,server.str= 1",
        "driver=nbd,server.type=fd,server.str=987",
        "driver=nbd,server.type=fd,server.str=",
        "driver=nbd,server.type=fd,server.str=abc",
        "driver=nbd,server.type=fd,server.str=12abc",
        "driver=nbd,server.type=fd,server.str=0x5",
        "driver=nbd,server.type=fd,server.str=2147483648",
        "driver=nbd,server.type=fd,server.str=-2147483649",
        "driver=nbd,server.type=fd,server.str=99999999999",
        "driver=nbd,server.type=fd",
        "driver=nbd,server.type=fd,server.path=x",
        "driver=nbd,server.type=fd,server.str=1,server.host=h",
        "driver=nbd,server.type=unix,server.path=/nowhere,server.host=h",
        "driver=nbd,server.type=inet,server.host=h,server.port=1,server.path=p",
        "driver=qcow2,file.driver=nbd,file.server.type=fd,file.server.str=1",
    ] {
        same(d, &["info", "--image-opts", opts]);
        same(d, &["map", "--image-opts", opts]);
    }
    same(
        d,
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "-f",
            "raw",
            "/dev/null",
            "driver=nbd,server.type=fd,server.str=1",
        ],
    );
    assert_all_same();
}

/// qemu-nbd serving `image` of `d` writable (`-f FMT`, so it holds QEMU's
/// write lock on the file) as export `e` on the socket `sock`, until dropped.
fn serve_writable(d: &Path, image: &str, fmt: &str, sock: &str) -> NbdServer {
    NbdServer::start(
        Server::Qemu,
        &["-f", fmt, "-x", "e", "-k", sock],
        &d.join(image),
        sock,
    )
}

#[test]
fn files_a_running_qemu_nbd_serves_are_locked_as_qemu_img_finds_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    golden(d);
    qcow2(d, "q.qcow2", "8M", &[]);
    io(d, "qcow2", "q.qcow2", &["write -P 0x55 0 64k"]);
    let (rs, qs) = (d.join("r.sock"), d.join("q.sock"));
    let (rs, qs) = (rs.to_str().unwrap(), qs.to_str().unwrap());
    let _r = serve_writable(d, "gold.raw", "raw", rs);
    let _q = serve_writable(d, "q.qcow2", "qcow2", qs);
    // gold.raw is served too, so both files are held, but only q.qcow2 is
    // looked at: QEMU lets raw readers (info, map, measure...) share a file
    // with a writer, and a raw writer meets the "resize" lock, which strata's
    // locks do not model yet (it says "shared \"write\"" there).
    let files = ["gold.raw", "q.qcow2"];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(d.join(f)).unwrap())
        .collect();
    for img in ["q.qcow2"] {
        for u in [None, Some("-U")] {
            let with = |args: &[&str]| with_option(u, args);
            for args in [
                with(&["info", img]),
                with(&["info", "--output=json", img]),
                with(&["check", img]),
                with(&["map", img]),
                with(&["map", "--output=json", img]),
                with(&["measure", "-O", "qcow2", img]),
                with(&["compare", img, "gold.raw"]),
                with(&["snapshot", "-l", img]),
                with(&["convert", "-O", "raw", img, "out.raw"]),
                with(&["dd", &format!("if={img}"), "of=dd.raw"]),
            ] {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                same(d, &args);
            }
            if u.is_none() {
                for args in [
                    vec!["resize", img, "16M"],
                    vec!["amend", "-o", "size=16M", img],
                    vec!["snapshot", "-c", "s", img],
                    vec!["snapshot", "-d", "s", img],
                    vec!["check", "-r", "all", img],
                    vec!["commit", img],
                    vec!["rebase", "-u", "-b", "", img],
                    vec!["bitmap", "--add", img, "b"],
                    vec!["convert", "-n", "-O", "raw", "gold.raw", img],
                    vec!["create", "-f", "raw", img, "1M"],
                ] {
                    same(d, &args);
                }
            }
        }
    }
    let after: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(d.join(f)).unwrap())
        .collect();
    assert!(before == after, "a file qemu-nbd serves was written");
    assert_all_same();
}

/// `args` (a subcommand first) with `opt`, when given, right after the
/// subcommand: the same command with and without `-U`.
fn with_option(opt: Option<&str>, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![args[0].into()];
    v.extend(opt.map(String::from));
    v.extend(args[1..].iter().map(|s| s.to_string()));
    v
}
