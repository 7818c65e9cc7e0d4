//! Images of VM disks through the API (`POST /api/v1/images/from-snapshot`
//! and `/from-vm`, as tasks), on a stopped VM of `strata vm` (no guest boots):
//! the image of an internal snapshot equals the disk at the snapshot
//! (`qemu-img compare` against qemu-img's own reading of it), the live image
//! of the stopped VM equals its disk; a snapshot that does not exist fails
//! the task and leaves the image killed; a bad body is a 400.

mod common;

use common::api::{token, Server};
use common::restic::{qemu_img, run, s};
use common::STRATA;
use std::process::Command;

/// Start a task with `body` at `path`, wait for it, return (task, image ID
/// from its last log line when it succeeded).
fn task(srv: &Server, tok: &str, path: &str, body: &str) -> (serde_json::Value, Option<String>) {
    let r = srv.req(
        "POST",
        path,
        Some(tok),
        Some("application/json"),
        body.as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let t = srv.wait_task(tok, r.json()["task"].as_str().unwrap());
    let last = Server::last_log(&t);
    let id = last
        .strip_prefix("image ")
        .and_then(|l| l.strip_suffix(" is active"))
        .map(str::to_string);
    (t, id)
}

#[test]
fn api_tasks_make_images_of_a_vms_snapshot_and_disk() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let disk = state.join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&disk), "16M"]);
    common::io(
        state,
        "qcow2",
        s(&disk),
        &["write -P 7 0 1M", "write -P 3 8M 64k"],
    );
    let vm = |args: &[&str]| {
        run(Command::new(STRATA)
            .args(["vm", "--state-dir", s(state)])
            .args(args))
    };
    vm(&["define", "t", "--memory", "64M", "--disk", s(&disk)]);
    vm(&["snapshot", "create", "t", "s1"]);
    common::io(state, "qcow2", s(&disk), &["write -P 9 0 1M"]);
    let tok = token(state, false);
    let srv = Server::start(state, &[]);

    let (t, id) = task(
        &srv,
        &tok,
        "/api/v1/images/from-snapshot",
        r#"{"vm": "t", "snapshot": "s1", "name": "at-s1"}"#,
    );
    let id = id.unwrap_or_else(|| panic!("{t}"));
    let data = state.join("images").join(format!("{id}.data"));
    let at_s1 = state.join("at-s1.raw");
    qemu_img(&[
        "convert",
        "-l",
        "snapshot.name=s1",
        "-O",
        "raw",
        s(&disk),
        s(&at_s1),
    ]);
    qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&data), s(&at_s1)]);
    qemu_img(&["check", s(&data)]);
    let rec = srv
        .req("GET", &format!("/v2/images/{id}"), Some(&tok), None, b"")
        .json();
    assert_eq!(rec["status"], "active");
    assert_eq!(rec["strata_snapshot"], "s1");

    let (t, id) = task(
        &srv,
        &tok,
        "/api/v1/images/from-vm",
        r#"{"vm": "t", "disk_format": "raw"}"#,
    );
    let id = id.unwrap_or_else(|| panic!("{t}"));
    let data = state.join("images").join(format!("{id}.data"));
    qemu_img(&["compare", "-F", "raw", s(&disk), s(&data)]);

    let (t, id) = task(
        &srv,
        &tok,
        "/api/v1/images/from-snapshot",
        r#"{"vm": "t", "snapshot": "nope", "name": "bad"}"#,
    );
    assert_eq!(t["state"], "error", "{t}");
    assert!(id.is_none());
    assert!(t.to_string().contains("no snapshot 'nope'"), "{t}");
    let listed = srv
        .req("GET", "/v2/images?name=bad", Some(&tok), None, b"")
        .json();
    assert_eq!(listed["images"][0]["status"], "killed", "{listed}");

    for body in [
        r#"{"vm": "t"}"#,
        r#"{"vm": "t", "snapshot": "s1", "x": 1}"#,
        "{",
    ] {
        let r = srv.req(
            "POST",
            "/api/v1/images/from-snapshot",
            Some(&tok),
            Some("application/json"),
            body.as_bytes(),
        );
        assert_eq!(
            r.status,
            400,
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
}
