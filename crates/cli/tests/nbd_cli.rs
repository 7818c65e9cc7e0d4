//! `strata nbd serve` and `strata nbd ctl` as a user runs them: qemu-io writes
//! over nbd:// while snapshots, external snapshots and commits are taken through
//! the control socket; one log line per client; SIGTERM leaves clean images;
//! TLS with certificates made by openssl, used by nbdinfo and qemu-img.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn strata() -> &'static str {
    env!("CARGO_BIN_EXE_strata")
}

fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (required by this test): {e}"))
}

fn ok(tool: &str, args: &[&str]) -> String {
    let o = run(tool, args);
    assert!(
        o.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A `strata nbd serve` process with its stderr collected.
struct Served {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    port: u16,
}

impl Served {
    fn start(args: &[&str]) -> Served {
        let mut child = Command::new(strata())
            .arg("nbd")
            .arg("serve")
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start strata nbd serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("ready") || line.contains("cannot") {
                    let _ = tx.send(());
                }
                l.lock().unwrap().push(line);
            }
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("server never became ready");
        let port = log
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| l.strip_prefix("strata nbd: listening on tcp "))
            .and_then(|a| a.rsplit(':').next()?.parse().ok())
            .unwrap_or(0);
        Served { child, log, port }
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, and wait for a clean exit.
    fn term(mut self) -> Vec<String> {
        // SAFETY: kill(2) takes plain integers; the child is ours and not yet waited
        // for, so its pid cannot have been reused.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let st = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(st.success(), "server exit: {st:?}\n{:#?}", self.lines());
        self.lines()
    }
}

/// A failed test must not leave its server running (holding the test's output
/// pipe, so the harness would never finish).
impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ctl(control: &Path, args: &[&str]) -> Output {
    let mut a = vec!["nbd", "ctl", "--socket", s(control)];
    a.extend_from_slice(args);
    run(strata(), &a)
}

fn ctl_ok(control: &Path, args: &[&str]) -> serde_json::Value {
    let o = ctl(control, args);
    assert!(
        o.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn ctl_takes_snapshots_and_commits_while_qemu_io_writes_over_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "32M"]);
    let sock = dir.path().join("nbd.sock");
    let control = dir.path().join("ctl.sock");
    let srv = Served::start(&[
        "-b",
        "127.0.0.1",
        "-p",
        "0",
        "-k",
        s(&sock),
        "--control",
        s(&control),
        "-x",
        "disk",
        s(&img),
    ]);
    assert_ne!(srv.port, 0, "{:#?}", srv.lines());
    // qemu-io writes 600 blocks of 64 KiB, rewriting 96 slots over and over.
    let mut cmds = Vec::new();
    for i in 0..600u32 {
        cmds.push("-c".to_string());
        cmds.push(format!("write -P {} {} 64k", i % 250 + 1, (i % 96) * 65536));
    }
    let uri = format!("nbd://127.0.0.1:{}/disk", srv.port);
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(&cmds)
        .arg(&uri)
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-io is required");
    let mut overlays = Vec::new();
    for k in 0..12 {
        match k % 4 {
            0 | 2 => {
                let v = ctl_ok(&control, &["snapshot", &format!("snap{k}")]);
                assert!(v["id"].is_string());
            }
            1 => {
                let ov = dir.path().join(format!("ov{k}.qcow2"));
                ctl_ok(&control, &["snapshot-external", s(&ov)]);
                overlays.push(ov);
            }
            _ => {
                ctl_ok(&control, &["commit"]);
            }
        }
    }
    let list = ctl_ok(&control, &["list"]);
    assert_eq!(list["exports"][0]["name"], "disk");
    assert_eq!(list["exports"][0]["chain"].as_array().unwrap().len(), 1);
    assert!(writer.wait().unwrap().success(), "qemu-io writer failed");
    // Errors come back as errors.
    let o = ctl(&control, &["commit"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not have a backing file"));
    let o = ctl(&control, &["snapshot", "snap0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    let log = srv.term();
    assert!(
        log.iter().any(|l| l.contains("connected to export 'disk'")),
        "{log:#?}"
    );
    assert!(log.iter().any(|l| l.contains("disconnected")), "{log:#?}");
    // Every write is in the image: slot j holds the last pattern written to it.
    let mut reads = Vec::new();
    for j in 0..96u32 {
        let last = (0..600u32).filter(|i| i % 96 == j).max().unwrap();
        reads.push("-c".to_string());
        reads.push(format!("read -P {} {} 64k", last % 250 + 1, j * 65536));
    }
    let mut a: Vec<&str> = reads.iter().map(String::as_str).collect();
    a.push(s(&img));
    let out = ok("qemu-io", &a);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    ok("qemu-img", &["check", s(&img)]);
    let snaps = ok("qemu-img", &["snapshot", "-l", s(&img)]);
    assert!(
        snaps.contains("snap0") && snaps.contains("snap4"),
        "{snaps}"
    );
    for ov in overlays {
        ok("qemu-img", &["check", s(&ov)]);
    }
}

fn make_certs(dir: &Path) -> PathBuf {
    let d = dir.join("pki");
    std::fs::create_dir_all(&d).unwrap();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    ok(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=strata test CA",
            "-keyout",
            &p("ca-key.pem"),
            "-out",
            &p("ca-cert.pem"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    ok(
        "openssl",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &p("server-key.pem"),
            "-out",
            &p("server.csr"),
        ],
    );
    let ext = d.join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
    )
    .unwrap();
    ok(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca-cert.pem"),
            "-CAkey",
            &p("ca-key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &p("server-cert.pem"),
            "-extfile",
            s(&ext),
        ],
    );
    d
}

#[test]
fn tls_clients_are_served_and_plain_clients_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    ok("qemu-io", &["-c", "write -P 0x3c 0 1M", s(&img)]);
    let pki = make_certs(dir.path());
    let sock = dir.path().join("nbd.sock");
    let srv = Served::start(&[
        "-b",
        "127.0.0.1",
        "-p",
        "0",
        "-k",
        s(&sock),
        "--tls-cert",
        s(&pki.join("server-cert.pem")),
        "--tls-key",
        s(&pki.join("server-key.pem")),
        "-x",
        "disk",
        s(&img),
    ]);
    let info = ok(
        "nbdinfo",
        &[&format!(
            "nbds+unix:///disk?socket={}&tls-certificates={}",
            sock.display(),
            pki.display()
        )],
    );
    assert!(
        info.contains("export-size: 8388608") && info.contains("TLS"),
        "{info}"
    );
    let obj = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.display()
    );
    let opts = format!(
        "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={},file.export=disk,file.tls-creds=tls0",
        srv.port
    );
    // qemu-io over the TLS export, with its x509 credentials.
    let tls_qemu_io = |cmds: &[&str]| {
        let mut a = vec!["--object", &obj, "--image-opts"];
        for c in cmds {
            a.extend(["-c", c]);
        }
        a.push(&opts);
        ok("qemu-io", &a);
    };
    tls_qemu_io(&[
        "read -P 0x3c 0 1M",
        "write -P 0x4d 1M 64k",
        "read -P 0x4d 1M 64k",
    ]);
    // Many requests in flight on one TLS session (its reading and writing halves
    // work at once): nbdcopy in and out, large and small requests, content kept.
    let uri = format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        sock.display(),
        pki.display()
    );
    let src = dir.path().join("src.raw");
    let pattern: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &pattern).unwrap();
    for (size, requests) in [("4194304", "4"), ("65536", "64")] {
        ok(
            "nbdcopy",
            &[
                "--connections=1",
                &format!("--requests={requests}"),
                &format!("--request-size={size}"),
                s(&src),
                &uri,
            ],
        );
        let back = dir.path().join("back.raw");
        ok(
            "nbdcopy",
            &[
                "--connections=1",
                &format!("--requests={requests}"),
                &uri,
                s(&back),
            ],
        );
        assert!(std::fs::read(&back).unwrap() == pattern, "TLS copy {size}");
    }
    tls_qemu_io(&["write -P 0x4d 1M 64k"]);
    // Without TLS: refused during the handshake.
    let o = run(
        "nbdinfo",
        &[&format!("nbd+unix:///disk?socket={}", sock.display())],
    );
    assert!(!o.status.success());
    srv.term();
    ok("qemu-io", &["-c", "read -P 0x4d 1M 64k", s(&img)]);
    ok("qemu-img", &["check", s(&img)]);
}

#[test]
fn serve_refuses_a_missing_image_saying_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let out = run(
        strata(),
        &[
            "nbd",
            "serve",
            "-k",
            s(&sock),
            "-x",
            "disk",
            "missing.qcow2",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("strata nbd: cannot export 'missing.qcow2'"),
        "{err}"
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(!sock.exists(), "a socket was left behind");
}

/// SIGKILL, and wait for the process to be gone (its socket files stay behind).
fn kill_hard(mut srv: Served) {
    // SAFETY: kill(2) takes plain integers; the child is ours and not yet waited for,
    // so its pid cannot have been reused.
    unsafe {
        libc::kill(srv.child.id() as i32, libc::SIGKILL);
    }
    srv.child.wait().unwrap();
}

#[test]
fn a_restart_after_sigkill_replaces_stale_sockets_and_a_live_or_foreign_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let sock = dir.path().join("nbd.sock");
    let control = dir.path().join("nbd.ctl");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "4M"]);
    let args = [
        "-k",
        s(&sock),
        "--control",
        s(&control),
        "-x",
        "disk",
        "-f",
        "qcow2",
        s(&img),
    ];
    let uri = format!("nbd+unix:///disk?socket={}", s(&sock));
    // Killed (no clean-up) twice in a row: each restart finds both sockets stale.
    for round in 0..2u8 {
        let srv = Served::start(&args);
        let write = format!("write -P {} 0 64k", 0x30 + round);
        ok("qemu-io", &["-f", "raw", "-c", &write, &uri]);
        kill_hard(srv);
        assert!(
            sock.exists() && control.exists(),
            "the kill left no stale socket"
        );
    }
    let srv = Served::start(&args);
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x31 0 64k", &uri]);
    ctl_ok(&control, &["list"]);
    // `serve OPT PATH` of `image` fails, saying `why`.
    let refused = |opt: &str, path: &Path, image: &Path, why: &str| {
        let args = ["nbd", "serve", opt, s(path), "-x", "disk", "-f", "qcow2"];
        let out = run(strata(), &[&args[..], &[s(image)]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(why), "{err}");
    };
    // While it runs, a second server on the same sockets is refused, and the first
    // keeps serving.
    let dir2 = tempfile::tempdir().unwrap();
    let img2 = dir2.path().join("other.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img2), "4M"]);
    refused("-k", &sock, &img2, "a server is listening on it");
    refused("--control", &control, &img2, "a server is listening on it");
    ok("qemu-io", &["-f", "raw", "-c", "read -P 0x31 0 64k", &uri]);
    ctl_ok(&control, &["list"]);
    srv.term();
    // A path that holds something other than a socket is never removed.
    for (opt, path) in [("-k", &sock), ("--control", &control)] {
        std::fs::write(path, b"not a socket").unwrap();
        refused(opt, path, &img, "is not a socket");
        assert_eq!(std::fs::read(path).unwrap(), b"not a socket");
        std::fs::remove_file(path).unwrap();
    }
    ok("qemu-img", &["check", s(&img)]);
}
