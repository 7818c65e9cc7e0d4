//! NBD exports started through `strata serve`'s HTTP API, read and written by
//! the real clients (nbdinfo, qemu-io, qemu-img): an image exported on a Unix
//! socket takes writes, an internal snapshot, an external one and its commit
//! through the control endpoint, and is left clean when stopped; a read-only
//! export on TCP refuses writes; a backup snapshot exported as `strata backup
//! serve` does reads back identical to its image; bad requests get 400, 404
//! and 409 and leave nothing listening.

mod common;

use std::path::Path;
use std::process::Command;

use common::api::{token, Server};
use common::restic::{run, s, strata};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// `tool ARGS`, which must succeed (a missing tool fails the test); stdout.
fn ok(tool: &str, args: &[&str]) -> String {
    common::ok(Path::new("/"), tool, args)
}

/// qemu-io on an NBD URL (raw over NBD); its stdout.
fn nbd_io(url: &str, cmd: &str) -> String {
    ok("qemu-io", &["-f", "raw", "-c", cmd, url])
}

/// The size nbdinfo reads from the export at `url`.
fn nbdinfo_size(url: &str) -> u64 {
    ok("nbdinfo", &["--size", url]).trim().parse().unwrap()
}

/// The export's chain as `GET /api/v1/exports/{id}` shows it.
fn chain(srv: &Server, tok: &str, id: &str) -> Vec<Value> {
    let r = srv
        .req(
            "GET",
            &format!("/api/v1/exports/{id}"),
            Some(tok),
            None,
            b"",
        )
        .expect(200);
    r["export"]["chain"].as_array().unwrap().clone()
}

fn control(srv: &Server, tok: &str, id: &str, body: Value) -> common::api::Reply {
    srv.json("POST", &format!("/api/v1/exports/{id}/control"), tok, &body)
}

#[test]
fn exports_started_through_the_api_serve_nbd_clients_and_take_live_operations() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (state, repo) = (d.join("state"), d.join("repo"));
    let img = d.join("a.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    ok("qemu-io", &["-c", "write -P 0x11 0 1M", s(&img)]);
    let raw = d.join("b.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "8M"]);
    ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x44 3M 1M", s(&raw)],
    );
    let tok = token(&state, false);
    let ro = token(&state, true);
    let srv = Server::start_with_backups(&state, &repo);
    run(strata(&["create", "--repo", s(&repo), s(&raw)]));

    // A qcow2 image on a Unix socket: nbdinfo and qemu-io read and write it.
    let sock = d.join("a.sock");
    let body = json!({"image": img, "socket": sock, "name": "disk"});
    assert_eq!(srv.json("POST", "/api/v1/exports", &ro, &body).status, 403);
    let rw = srv.json("POST", "/api/v1/exports", &tok, &body).expect(201);
    let id = rw["id"].as_str().unwrap().to_string();
    let url = rw["url"].as_str().unwrap().to_string();
    assert_eq!(url, format!("nbd+unix:///disk?socket={}", sock.display()));
    assert_eq!(rw["read_only"], false);
    assert_eq!(nbdinfo_size(&url), 16 * MIB);
    assert!(nbd_io(&url, "read -P 0x11 0 1M").contains("read 1048576/1048576"));
    nbd_io(&url, "write -P 0x22 1M 1M");

    // Live operations, as the control socket takes them.
    let r = control(
        &srv,
        &tok,
        &id,
        json!({"command": "snapshot", "name": "s1"}),
    )
    .expect(200);
    assert_eq!(r["ok"], true, "{r}");
    let top = chain(&srv, &tok, &id);
    assert_eq!(top.len(), 1);
    assert_eq!(top[0]["snapshots"], json!(["s1"]));
    let overlay = d.join("overlay.qcow2");
    control(
        &srv,
        &tok,
        &id,
        json!({"command": "snapshot-external", "overlay": overlay}),
    )
    .expect(200);
    nbd_io(&url, "write -P 0x33 2M 1M");
    assert_eq!(chain(&srv, &tok, &id).len(), 2, "writes go to the overlay");
    assert_eq!(
        control(&srv, &tok, &id, json!({"command": "list"})).expect(200)["exports"][0]["name"],
        "disk"
    );
    control(&srv, &tok, &id, json!({"command": "commit"})).expect(200);
    assert_eq!(
        chain(&srv, &tok, &id).len(),
        1,
        "committed back to the image"
    );
    assert!(nbd_io(&url, "read -P 0x33 2M 1M").contains("read 1048576/1048576"));

    // The same image cannot be exported twice for writing.
    let again = json!({"image": img, "socket": d.join("again.sock")});
    srv.json("POST", "/api/v1/exports", &tok, &again).refused(
        409,
        "",
        &"a second export of a written image",
    );
    assert!(!d.join("again.sock").exists(), "a refused export listened");

    // A raw image read-only on TCP: reads match, writes are refused.
    let tcp = srv
        .json(
            "POST",
            "/api/v1/exports",
            &tok,
            &json!({"image": raw, "format": "raw", "read_only": true, "address": "127.0.0.1:0"}),
        )
        .expect(201);
    let tcp_url = tcp["url"].as_str().unwrap().to_string();
    assert!(tcp_url.starts_with("nbd://127.0.0.1:"), "{tcp_url}");
    assert_eq!(nbdinfo_size(&tcp_url), 8 * MIB);
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&raw), &tcp_url],
    );
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &tcp_url])
        .output()
        .unwrap();
    assert!(
        !w.status.success() || String::from_utf8_lossy(&w.stdout).contains("failed"),
        "a read-only export took a write"
    );

    // A backup snapshot, read-only as `strata backup serve` serves it.
    let bsock = d.join("b.sock");
    let b = srv
        .json(
            "POST",
            "/api/v1/exports",
            &tok,
            &json!({"backup": "latest", "socket": bsock}),
        )
        .expect(201);
    let bid = b["id"].as_str().unwrap().to_string();
    assert!(b["source"].as_str().unwrap().starts_with("backup "), "{b}");
    let burl = b["url"].as_str().unwrap().to_string();
    ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(&raw), &burl],
    );
    control(
        &srv,
        &tok,
        &bid,
        json!({"command": "snapshot", "name": "x"}),
    )
    .refused(409, "", &"a snapshot of a backup export");

    let listed = srv
        .req("GET", "/api/v1/exports", Some(&ro), None, b"")
        .expect(200);
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");

    // Stopped: the socket is gone and the image is clean, with what was
    // written, the snapshot and the committed overlay's data.
    for e in [&id, &bid, tcp["id"].as_str().unwrap()] {
        srv.req(
            "DELETE",
            &format!("/api/v1/exports/{e}"),
            Some(&tok),
            None,
            b"",
        )
        .expect(204);
    }
    assert!(!sock.exists() && !bsock.exists());
    assert_eq!(
        srv.req("GET", "/api/v1/exports", Some(&tok), None, b"")
            .expect(200),
        json!([])
    );
    ok("qemu-img", &["check", s(&img)]);
    for (p, off) in [("0x11", "0"), ("0x22", "1M"), ("0x33", "2M")] {
        let out = ok(
            "qemu-io",
            &["-c", &format!("read -P {p} {off} 1M"), s(&img)],
        );
        assert!(out.contains("read 1048576/1048576"), "{p} at {off}: {out}");
    }
    assert!(ok("qemu-img", &["snapshot", "-l", s(&img)]).contains("s1"));
    hostile(&srv, &tok, &img, d, &id);

    let doc = srv
        .req("GET", "/api/v1/openapi.json", None, None, b"")
        .expect(200);
    for p in [
        "/api/v1/exports",
        "/api/v1/exports/{id}",
        "/api/v1/exports/{id}/control",
    ] {
        assert!(
            doc["paths"][p].is_object(),
            "{p} missing from the OpenAPI document"
        );
    }
}

/// Bad requests: 400 naming what is wrong, 404 for what does not exist, 409
/// for a socket path taken; none leaves an export running.
fn hostile(srv: &Server, tok: &str, img: &Path, d: &Path, stopped: &str) {
    let sock = d.join("h.sock");
    std::fs::write(d.join("taken"), b"").unwrap();
    for (body, status, needle) in [
        (json!({"socket": sock}), 400, "either image"),
        (
            json!({"image": img, "backup": "latest", "socket": sock}),
            400,
            "either image",
        ),
        (json!({"image": img}), 400, "either socket"),
        (
            json!({"image": img, "socket": sock, "address": "127.0.0.1:0"}),
            400,
            "either socket",
        ),
        (
            json!({"image": img, "address": "nowhere"}),
            400,
            "HOST:PORT",
        ),
        (
            json!({"image": img, "socket": sock, "format": "bogus"}),
            400,
            "format",
        ),
        (
            json!({"image": img, "socket": sock, "sokcet": 1}),
            400,
            "unknown field",
        ),
        (
            json!({"backup": "latest", "socket": sock, "read_only": true}),
            400,
            "read-only",
        ),
        (
            json!({"image": d.join("missing.qcow2"), "socket": sock}),
            404,
            "does not exist",
        ),
        (json!({"backup": "ffffffff", "socket": sock}), 404, ""),
        (
            json!({"image": img, "socket": d.join("taken")}),
            409,
            "exists",
        ),
    ] {
        srv.json("POST", "/api/v1/exports", tok, &body)
            .refused(status, needle, &body);
        assert!(!sock.exists(), "{body}: a refused export listened");
    }
    let id = stopped;
    for (method, path) in [
        ("GET", format!("/api/v1/exports/{id}")),
        ("DELETE", format!("/api/v1/exports/{id}")),
    ] {
        srv.req(method, &path, Some(tok), None, b"")
            .refused(404, "no export", &path);
    }
    control(srv, tok, id, json!({"command": "commit"})).refused(404, "no export", &"control");
    for (body, needle) in [
        (json!({"command": "snapshot"}), "needs name"),
        (json!({"command": "snapshot-external"}), "needs overlay"),
        (json!({"command": "quit"}), "DELETE"),
        (json!({"command": "format"}), "unknown command"),
        (json!({"command": "commit", "force": true}), "unknown field"),
    ] {
        control(srv, tok, id, body.clone()).refused(400, needle, &body);
    }
}

/// A failed live operation answers by what failed, in the API's error shape:
/// 400 for unusable arguments, 409 when the export's state refuses it (a name
/// taken, no backing file, a raw top, a read-only export), 500 when the
/// images cannot be read or written.
#[test]
fn control_errors_answer_400_409_or_500_by_what_failed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let (img, raw, ro) = (d.join("a.qcow2"), d.join("b.raw"), d.join("c.qcow2"));
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "8M"]);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&ro), "16M"]);
    let taken = d.join("taken.qcow2");
    std::fs::write(&taken, b"not to be overwritten").unwrap();
    let tok = token(&state, false);
    let srv = Server::start(&state, &[]);
    let start = |body: Value| -> String {
        let r = srv.json("POST", "/api/v1/exports", &tok, &body).expect(201);
        r["id"].as_str().unwrap().to_string()
    };
    let a = start(json!({"image": img, "socket": d.join("a.sock")}));
    let b = start(json!({"image": raw, "format": "raw", "socket": d.join("b.sock")}));
    let c = start(json!({"image": ro, "read_only": true, "socket": d.join("c.sock")}));
    control(&srv, &tok, &a, json!({"command": "snapshot", "name": "s1"})).expect(200);
    let cases = [
        (
            &a,
            json!({"command": "snapshot", "name": ""}),
            400,
            "needs a name",
        ),
        (
            &a,
            json!({"command": "snapshot-external", "overlay": taken}),
            400,
            "exists",
        ),
        (
            &a,
            json!({"command": "snapshot-external", "overlay": d.join("no/such/dir/o.qcow2")}),
            400,
            "",
        ),
        (
            &a,
            json!({"command": "snapshot", "name": "s1"}),
            409,
            "already exists",
        ),
        (&a, json!({"command": "commit"}), 409, "backing file"),
        (&a, json!({"command": "stream"}), 409, "backing file"),
        (&b, json!({"command": "snapshot", "name": "r"}), 409, "raw"),
        (
            &c,
            json!({"command": "snapshot", "name": "x"}),
            409,
            "read-only",
        ),
        (&c, json!({"command": "commit"}), 409, "read-only"),
    ];
    for (id, body, status, needle) in cases {
        control(&srv, &tok, id, body.clone()).refused(status, needle, &body);
    }
    assert_eq!(
        std::fs::read(&taken).unwrap(),
        b"not to be overwritten",
        "a refused overlay path was written"
    );

    // The base of an external snapshot removed behind the server's back: the
    // commit cannot reopen it to write, an I/O failure (500).
    let overlay = d.join("o.qcow2");
    let body = json!({"command": "snapshot-external", "overlay": overlay});
    control(&srv, &tok, &a, body).expect(200);
    std::fs::rename(&img, d.join("moved.qcow2")).unwrap();
    control(&srv, &tok, &a, json!({"command": "commit"})).refused(
        500,
        "could not be reopened",
        &"a commit into a vanished base",
    );
}

/// `strata serve` stopped by SIGTERM or SIGINT with NBD clients connected:
/// they read EOF, the data they wrote is in the image, the image's and the
/// repository's locks are released, the sockets removed, and it exits 0.
#[test]
fn a_server_stopped_by_a_signal_stops_its_exports_cleanly_under_connected_clients() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (state, repo) = (d.join("state"), d.join("repo"));
        let (img, raw) = (d.join("a.qcow2"), d.join("b.raw"));
        ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
        ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "8M"]);
        let tok = token(&state, false);
        let mut srv = Server::start_with_backups(&state, &repo);
        run(strata(&["create", "--repo", s(&repo), s(&raw)]));
        let (sock, bsock) = (d.join("a.sock"), d.join("b.sock"));
        let url = srv
            .json(
                "POST",
                "/api/v1/exports",
                &tok,
                &json!({"image": img, "socket": sock}),
            )
            .expect(201)["url"]
            .as_str()
            .unwrap()
            .to_string();
        let burl = srv
            .json(
                "POST",
                "/api/v1/exports",
                &tok,
                &json!({"backup": "latest", "socket": bsock}),
            )
            .expect(201)["url"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(std::fs::read_dir(repo.join("locks")).unwrap().count() > 0);

        // Two interactive clients, each with a request answered.
        let client = |url: &str, first: &str, answer: &str| {
            // The backup export (read only) is opened read-only.
            let ro: &[&str] = if first.starts_with("read") {
                &["-r"]
            } else {
                &[]
            };
            let mut c = Command::new("qemu-io")
                .args(ro)
                .args(["-f", "raw", url])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("qemu-io must be installed");
            let mut input = c.stdin.take().unwrap();
            writeln!(input, "{first}").unwrap();
            let mut out = BufReader::new(c.stdout.take().unwrap());
            let mut line = String::new();
            while !line.contains(answer) {
                line.clear();
                if out.read_line(&mut line).unwrap() == 0 {
                    let mut err = String::new();
                    let _ = std::io::Read::read_to_string(&mut c.stderr.take().unwrap(), &mut err);
                    panic!("qemu-io on {url} ended before '{answer}': {err}");
                }
            }
            (c, input, out)
        };
        let clients = [
            client(&url, "write -P 0x5a 0 1M", "wrote 1048576/1048576"),
            client(&burl, "read 0 4k", "read 4096/4096"),
        ];

        let status = srv.stop_with(sig, std::time::Duration::from_secs(60));
        assert_eq!(status.code(), Some(0), "signal {sig}: {status:?}");
        assert!(!sock.exists() && !bsock.exists(), "a socket was left");
        assert_eq!(
            std::fs::read_dir(repo.join("locks")).unwrap().count(),
            0,
            "the repository lock was left"
        );
        // The clients' next request finds the connection closed.
        for (mut c, mut input, mut out) in clients {
            writeln!(input, "read 0 4k").unwrap();
            drop(input);
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut rest);
            let _ = c.wait();
            assert!(
                !rest.contains("read 4096/4096"),
                "a stopped export answered: {rest}"
            );
        }
        // qemu-io opens the image for writing: its lock was released.
        let out = ok("qemu-io", &["-c", "read -P 0x5a 0 1M", s(&img)]);
        assert!(out.contains("read 1048576/1048576"), "{out}");
        ok("qemu-img", &["check", s(&img)]);
    }
}
