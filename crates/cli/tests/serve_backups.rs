//! Backups through `strata serve`'s HTTP API on the repository the server was
//! started with: a backup of a qcow2 chain made as a task restores (another
//! task) to an image `qemu-img compare` finds identical, the real restic checks
//! the repository, the list and stats are those of `strata backup`, verify,
//! prune and gc report their results in their tasks, and failures end their
//! tasks in `error` with the reason.

mod common;

use common::api::{token, Server};
use common::restic::{qcow2_chain, qemu_img, restic_check, run, s, strata};
use serde_json::{json, Value};

/// `strata backup ARGS --repo REPO --output=json`.
fn cli_json(repo: &std::path::Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--repo", s(repo), "--output=json"]);
    serde_json::from_slice(&run(strata(&all)).stdout).unwrap()
}

#[test]
fn backups_made_and_restored_through_the_api_are_byte_identical_and_restic_checks_them() {
    let dir = tempfile::tempdir().unwrap();
    let (state, repo) = (dir.path().join("state"), dir.path().join("repo"));
    let (tok, ro) = (token(&state, false), token(&state, true));

    // Without a repository the endpoints say how to configure one.
    {
        let srv = Server::start(&state, &[]);
        let r = srv.req("GET", "/api/v1/backups", Some(&tok), None, b"");
        assert_eq!(r.status, 503);
        assert!(
            r.error_message().contains("--backup-repo"),
            "{}",
            r.error_message()
        );
    }
    let srv = Server::start_with_backups(&state, &repo);
    let image = qcow2_chain(dir.path());

    // Bad requests: 400 naming the field, 403 for a read-only token.
    for (path, body, needle) in [
        ("/api/v1/backups", json!({"image": 5}), "invalid type"),
        (
            "/api/v1/backups",
            json!({"image": s(&image), "fromat": "raw"}),
            "unknown field `fromat`",
        ),
        (
            "/api/v1/backups",
            json!({"image": s(&image), "format": "bogus"}),
            "format",
        ),
        (
            "/api/v1/backups",
            json!({"image": s(&image), "parent": "latest", "changed_chunks": "3-1"}),
            "chunk list",
        ),
        (
            "/api/v1/backups/latest/restore",
            json!({"path": "/x", "format": "vmdk"}),
            "raw or qcow2",
        ),
        (
            "/api/v1/backups/latest/restore",
            json!({"path": "/x", "offset": 5}),
            "offset needs a length",
        ),
        (
            "/api/v1/backups/prune",
            json!({"dry_run": true}),
            "keep_last",
        ),
        (
            "/api/v1/backups/verify",
            json!({"read_data_subset": "1/2", "no_read_data": true}),
            "exclude each other",
        ),
    ] {
        srv.json("POST", path, &tok, &body)
            .refused(400, needle, &body);
    }
    let r = srv.json("POST", "/api/v1/backups", &ro, &json!({"image": s(&image)}));
    assert_eq!(r.status, 403);

    // A backup task: progress to the end, the new snapshot in its result.
    let r = srv.json(
        "POST",
        "/api/v1/backups",
        &tok,
        &json!({"image": s(&image), "tags": ["api"]}),
    );
    let t = srv.follow(&tok, &r);
    assert_eq!(t["state"], "ok", "{t}");
    assert_eq!(t["progress"], 1.0);
    let snap = t["result"]["snapshot"].as_str().unwrap().to_string();
    assert_eq!(t["result"]["name"], "top.qcow2");
    let list = srv
        .req("GET", "/api/v1/backups", Some(&ro), None, b"")
        .expect(200);
    assert_eq!(list, cli_json(&repo, &["list"]));
    assert_eq!(list[0]["id"], snap);
    assert_eq!(list[0]["tags"], json!(["api"]));

    // Restore to qcow2: the guest sees the same bytes.
    let out = dir.path().join("restored.qcow2");
    let r = srv.json(
        "POST",
        &format!("/api/v1/backups/{}/restore", &snap[..8]),
        &tok,
        &json!({"path": s(&out), "format": "qcow2"}),
    );
    let t = srv.follow(&tok, &r);
    assert_eq!(t["state"], "ok", "{t}");
    assert_eq!(t["result"]["snapshot"], snap);
    qemu_img(&["compare", s(&image), s(&out)]);
    qemu_img(&["check", s(&out)]);
    restic_check(&repo);

    // Failures end their tasks in error, with the reason.
    for (path, body, needle) in [
        (
            "/api/v1/backups/ffffffff/restore",
            json!({"path": s(&dir.path().join("x.raw"))}),
            "ffffffff",
        ),
        (
            "/api/v1/backups",
            json!({"image": s(&dir.path().join("missing.qcow2"))}),
            "missing.qcow2",
        ),
    ] {
        let t = srv.follow(&tok, &srv.json("POST", path, &tok, &body));
        assert_eq!(t["state"], "error", "{t}");
        let last = Server::last_log(&t);
        assert!(last.contains(needle), "{t}");
    }
    assert!(!dir.path().join("x.raw").exists());

    // Upkeep: verify, a dry prune, a dry gc, stats; as the CLI reports them.
    let t = srv.follow(
        &tok,
        &srv.req("POST", "/api/v1/backups/verify", Some(&tok), None, b""),
    );
    assert_eq!(t["state"], "ok", "{t}");
    assert_eq!(t["result"]["problems"], json!([]));
    assert_eq!(t["result"], cli_json(&repo, &["verify"]));
    let r = srv.json(
        "POST",
        "/api/v1/backups/prune",
        &tok,
        &json!({"keep_last": 1, "dry_run": true}),
    );
    let t = srv.follow(&tok, &r);
    assert_eq!(t["state"], "ok", "{t}");
    assert_eq!(t["result"]["snapshots"][0]["keep"], true);
    assert_eq!(t["result"]["dry_run"], true);
    let t = srv.follow(
        &tok,
        &srv.json(
            "POST",
            "/api/v1/backups/gc",
            &tok,
            &json!({"dry_run": true}),
        ),
    );
    assert_eq!(t["state"], "ok", "{t}");
    assert_eq!(t["result"], cli_json(&repo, &["gc", "--dry-run"]));
    let mut stats = srv
        .req("GET", "/api/v1/backups/stats", Some(&ro), None, b"")
        .expect(200);
    let mut cli = cli_json(&repo, &["stats"]);
    // The repository's own size counts the lock file of whoever asks (its
    // content, so its size, differs from process to process).
    for v in [&mut stats, &mut cli] {
        let total = v["repository_bytes"].take().as_u64().unwrap();
        assert!(total > v["stored_bytes"].as_u64().unwrap(), "{v}");
    }
    assert_eq!(stats, cli);
    assert_eq!(stats["snapshots"], 1);
    restic_check(&repo);
}
