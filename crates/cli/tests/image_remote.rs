//! `strata image --server URL`: every verb through the API of `strata serve`
//! prints byte for byte what it prints on the local state directory (text and
//! JSON, refusals included), downloads are verified against the image's
//! sha512 as they stream, and authentication, connection and TLS failures
//! are reported with the server named.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use common::api::{token, Server};
use common::STRATA;
use serde_json::json;

/// What a `strata image` run left: success, stdout, stderr.
type Outcome = (bool, String, String);

/// `strata image ARGS` with `env` set (and STRATA_SERVER / STRATA_TOKEN
/// cleared unless `env` sets them).
fn image_env(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut c = Command::new(STRATA);
    c.arg("image")
        .args(args)
        .env_remove("STRATA_SERVER")
        .env_remove("STRATA_TOKEN");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run strata image");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `strata image ARGS` on the local state directory.
fn local(state: &Path, args: &[&str]) -> Outcome {
    let mut a = args.to_vec();
    a.extend(["--state-dir", state.to_str().unwrap()]);
    image_env(&a, &[])
}

/// `strata image ARGS` through the server, given by the environment.
fn remote(srv: &Server, tok: &str, args: &[&str]) -> Outcome {
    image_env(
        args,
        &[("STRATA_SERVER", srv.url.as_str()), ("STRATA_TOKEN", tok)],
    )
}

fn ok(o: Outcome, what: &str) -> String {
    assert!(o.0, "{what}: {}{}", o.1, o.2);
    o.1
}

/// A qcow2 image with some data, made by qemu-img and qemu-io.
fn qcow2_with_data(dir: &Path) -> std::path::PathBuf {
    common::ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "d.qcow2", "64M"],
    );
    common::io(
        dir,
        "qcow2",
        "d.qcow2",
        &["write -P 7 0 1M", "write -P 3 5M 64k"],
    );
    dir.join("d.qcow2")
}

#[test]
fn every_image_verb_prints_the_same_through_the_server_as_locally() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tok = token(&state, false);
    let srv = Server::start(&state, &[]);
    let qcow2 = qcow2_with_data(dir.path());
    let raw = dir.path().join("r.raw");
    std::fs::write(
        &raw,
        (0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
    )
    .unwrap();

    // create-from-file through the server prints what local show prints of it.
    let made = ok(
        remote(
            &srv,
            &tok,
            &[
                "create-from-file",
                qcow2.to_str().unwrap(),
                "--name",
                "base",
            ],
        ),
        "remote create-from-file",
    );
    let id = made
        .lines()
        .find_map(|l| l.strip_prefix("id "))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(made, ok(local(&state, &["show", &id]), "local show"));
    let made_raw = ok(
        remote(
            &srv,
            &tok,
            &[
                "create-from-file",
                raw.to_str().unwrap(),
                "--name",
                "plain",
                "--disk-format",
                "raw",
                "--output=json",
            ],
        ),
        "remote create-from-file --output=json",
    );
    let raw_id = serde_json::from_str::<serde_json::Value>(&made_raw).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        made_raw,
        ok(
            local(&state, &["show", &raw_id, "--output=json"]),
            "local show json"
        )
    );
    // An image with custom properties, tags and no data, made through the API.
    let queued = srv.create(
        &tok,
        &json!({"name": "props", "disk_format": "raw", "container_format": "bare",
                "tags": ["a", "b"], "os_distro": "debian", "protected": true}),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();

    let cases: Vec<Vec<&str>> = vec![
        vec!["list"],
        vec!["list", "--output=json"],
        vec!["list", "--name", "base"],
        vec!["list", "--status", "queued", "--output=json"],
        vec!["list", "--name", "nothing-has-this-name"],
        vec!["show", &id],
        vec!["show", &id, "--output=json"],
        vec!["show", &queued],
        vec!["show", &queued, "--output=json"],
        // Refusals, in the registry's words either way.
        vec!["show", "00000000-0000-4000-8000-000000000000"],
        vec!["show", "../tokens"],
        vec!["show", ".."],
        vec!["delete", "00000000-0000-4000-8000-000000000000"],
        vec!["download", &queued, "-f", "/nonexistent/never-written"],
        vec![
            "download",
            "no-such-image",
            "-f",
            "/nonexistent/never-written",
        ],
    ];
    for args in &cases {
        let l = local(&state, args);
        let r = remote(&srv, &tok, args);
        assert_eq!(
            l, r,
            "strata image {args:?}: local (left) vs server (right)"
        );
    }

    // Downloads: the same bytes as the source, either way.
    for (img, src) in [(&raw_id, &raw), (&id, &qcow2)] {
        let lo = dir.path().join("local.out");
        let ro = dir.path().join("remote.out");
        ok(
            local(&state, &["download", img, "-f", lo.to_str().unwrap()]),
            "local download",
        );
        ok(
            remote(&srv, &tok, &["download", img, "-f", ro.to_str().unwrap()]),
            "remote download",
        );
        let want = std::fs::read(src).unwrap();
        assert!(
            std::fs::read(&lo).unwrap() == want,
            "local download differs"
        );
        assert!(
            std::fs::read(&ro).unwrap() == want,
            "remote download differs"
        );
    }
    // The last one is the qcow2 image: QEMU finds it intact.
    common::ok(dir.path(), "qemu-img", &["check", "remote.out"]);

    // Delete through the server; both sides then refuse alike.
    ok(remote(&srv, &tok, &["delete", &raw_id]), "remote delete");
    let after = ["show", raw_id.as_str()];
    let l = local(&state, &after);
    assert!(!l.0 && l.2.contains("No image found"), "{l:?}");
    assert_eq!(l, remote(&srv, &tok, &after));
    // A protected image stays; both refuse in the registry's words.
    let l = local(&state, &["delete", &queued]);
    let r = remote(&srv, &tok, &["delete", &queued]);
    assert!(!l.0 && !r.0, "a protected image was deleted");
    assert!(
        l.2.contains("is protected") && r.2.contains("is protected"),
        "{l:?} {r:?}"
    );
}

#[test]
fn remote_list_follows_the_servers_pages_past_its_largest_page() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tok = token(&state, false);
    let srv = Server::start(&state, &[]);
    let n = 1030;
    std::thread::scope(|s| {
        for t in 0..8 {
            let (srv, tok) = (&srv, &tok);
            s.spawn(move || {
                for i in (t..n).step_by(8) {
                    srv.create(tok, &json!({"name": format!("img-{i:04}")}));
                }
            });
        }
    });
    for args in [vec!["list"], vec!["list", "--output=json"]] {
        let l = ok(local(&state, &args), "local list");
        let r = ok(remote(&srv, &tok, &args), "remote list");
        assert_eq!(l.lines().count(), r.lines().count());
        assert!(l == r, "list {args:?} differs between local and server");
    }
    let listed = ok(remote(&srv, &tok, &["list"]), "remote list");
    assert_eq!(
        listed.lines().count(),
        n + 1,
        "every image once, plus the head"
    );
}

#[test]
fn remote_errors_name_the_server_for_missing_bad_and_read_only_tokens_and_refused_connections() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ro = token(&state, true);
    let srv = Server::start(&state, &[]);
    let id = srv.create(
        &token(&state, false),
        &json!({"name": "x", "disk_format": "raw", "container_format": "bare"}),
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let url = srv.url.as_str();

    let (okk, _, err) = image_env(&["list", "--server", url], &[]);
    assert!(
        !okk && err.contains("no API token") && err.contains("STRATA_TOKEN"),
        "{err}"
    );
    let (okk, _, err) = image_env(&["list", "--server", url, "--token", "wrong"], &[]);
    assert!(
        !okk && err.contains(url) && err.contains("HTTP 401"),
        "{err}"
    );
    // A read-only token reads, and may not delete.
    let (okk, out, err) = image_env(&["list", "--server", url, "--token", &ro], &[]);
    assert!(okk && out.contains(&id), "{err}");
    let (okk, _, err) = image_env(&["delete", &id, "--server", url, "--token", &ro], &[]);
    assert!(
        !okk && err.contains("HTTP 403") && err.contains("read-only"),
        "{err}"
    );
    assert!(ok(local(&state, &["list"]), "local list").contains(&id));
    let (okk, _, err) = image_env(
        &["create-from-file", "/nonexistent/file", "--name", "n"],
        &[("STRATA_SERVER", url), ("STRATA_TOKEN", &ro)],
    );
    assert!(!okk && err.contains("open /nonexistent/file"), "{err}");
    // Nobody listens on a port of a server that ended.
    let gone = srv.url.clone();
    drop(srv);
    let (okk, _, err) = image_env(&["list", "--server", &gone, "--token", &ro], &[]);
    assert!(
        !okk && err.contains("connection refused") && err.contains(&gone),
        "{err}"
    );
    let (okk, _, err) = image_env(&["list", "--server", "ftp://x", "--token", &ro], &[]);
    assert!(!okk && err.contains("invalid server URL"), "{err}");
}

/// A one-shot HTTP server answering each of `replies` (head and body) to one
/// connection in turn; returns its URL.
fn fake_server(replies: Vec<(String, Vec<u8>)>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for (head, body) in replies {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut b).unwrap();
                assert!(n > 0, "request cut short");
                req.extend_from_slice(&b[..n]);
            }
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(&body).unwrap();
        }
    });
    url
}

fn http_ok(ctype: &str, body: &[u8]) -> (String, Vec<u8>) {
    (
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ),
        body.to_vec(),
    )
}

#[test]
fn remote_download_fails_and_leaves_no_file_unless_size_and_sha512_match() {
    use sha2::{Digest, Sha512};
    let dir = tempfile::tempdir().unwrap();
    let id = "6a1c3f50-2f7b-4e53-9d7e-0c8b9a3e2f11";
    let good = b"the image's bytes".to_vec();
    let sha: String = Sha512::digest(&good)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let record = |size: usize| {
        json!({"id": id, "name": "n", "status": "active", "visibility": "shared",
               "protected": false, "os_hidden": false, "tags": [], "disk_format": "raw",
               "container_format": "bare", "size": size, "virtual_size": size,
               "checksum": "0", "os_hash_algo": "sha512", "os_hash_value": sha,
               "min_disk": 0, "min_ram": 0, "owner": null,
               "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
               "self": format!("/v2/images/{id}"), "file": format!("/v2/images/{id}/file"),
               "schema": "/v2/schemas/image"})
        .to_string()
        .into_bytes()
    };
    let mut bad = good.clone();
    bad[3] ^= 1;
    let out = dir.path().join("out");
    let cases = [
        (good.len(), bad.clone(), "does not match its sha512"),
        (
            good.len() + 1,
            good.clone(),
            "sent 17 of the image's 18 bytes",
        ),
        (good.len(), good.clone(), ""),
    ];
    for (size, served, want_err) in cases {
        let url = fake_server(vec![
            http_ok("application/json", &record(size)),
            http_ok("application/octet-stream", &served),
        ]);
        let (okk, _, err) = image_env(
            &["download", id, "-f", out.to_str().unwrap()],
            &[("STRATA_SERVER", &url), ("STRATA_TOKEN", "t")],
        );
        if want_err.is_empty() {
            assert!(okk, "{err}");
            assert_eq!(std::fs::read(&out).unwrap(), good);
            continue;
        }
        assert!(!okk && err.contains(want_err), "{err}");
        assert!(!out.exists(), "a failed download left {}", out.display());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

#[test]
fn remote_mode_reaches_an_https_server_with_its_ca_file_and_refuses_it_without() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tok = token(&state, false);
    let (srv, cert) = Server::start_tls(&state, dir.path());
    let src = qcow2_with_data(dir.path());
    let ca = ["--ca-file", cert.to_str().unwrap()];
    let mut args = vec!["create-from-file", src.to_str().unwrap(), "--name", "t"];
    args.extend(ca);
    ok(remote(&srv, &tok, &args), "create over https");
    let mut args = vec!["list"];
    args.extend(ca);
    assert_eq!(
        ok(remote(&srv, &tok, &args), "list over https"),
        ok(local(&state, &["list"]), "local list")
    );
    let (okk, _, err) = remote(&srv, &tok, &["list"]);
    assert!(
        !okk && err.contains(&srv.url) && err.contains("certificate"),
        "an unverified TLS server was accepted: {err}"
    );
}
