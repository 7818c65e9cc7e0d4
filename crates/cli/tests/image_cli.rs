//! `strata image` on the local state directory: the same registry the API
//! serves, so an image made by the CLI is the one the server lists.

mod common;

use std::process::Command;

use common::api::{token, Server};
use common::STRATA;

fn image(state: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let o = Command::new(STRATA)
        .arg("image")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .expect("strata image");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(state: &std::path::Path, args: &[&str]) -> String {
    let (ok, out, err) = image(state, args);
    assert!(ok, "strata image {args:?}: {out}{err}");
    out
}

#[test]
fn image_commands_create_list_show_download_and_delete_in_the_servers_registry() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    common::ok(
        dir.path(),
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "d.qcow2", "64M"],
    );
    common::io(dir.path(), "qcow2", "d.qcow2", &["write -P 9 0 2M"]);
    let src = dir.path().join("d.qcow2");
    let made: serde_json::Value = serde_json::from_str(&ok(
        &state,
        &[
            "create-from-file",
            src.to_str().unwrap(),
            "--name",
            "base",
            "--output=json",
        ],
    ))
    .unwrap();
    let id = made["id"].as_str().unwrap().to_string();
    assert_eq!(made["status"], "active");
    assert_eq!(made["virtual_size"], 64u64 << 20);
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&state, &["list", "--output=json"])).unwrap();
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(ok(&state, &["list"]).contains("base"));
    assert!(ok(&state, &["show", &id]).contains("os_hash_value"));

    // The server sees the same registry.
    let tok = token(&state, true);
    let srv = Server::start(&state, &[]);
    let r = srv.req("GET", &format!("/v2/images/{id}"), Some(&tok), None, b"");
    assert_eq!(r.json()["checksum"], made["checksum"]);
    drop(srv);

    let out = dir.path().join("out.qcow2");
    ok(&state, &["download", &id, "-f", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    common::ok(dir.path(), "qemu-img", &["check", "out.qcow2"]);
    ok(&state, &["delete", &id]);
    let (okk, _, err) = image(&state, &["show", &id]);
    assert!(!okk && err.contains("No image found"), "{err}");
    let (okk, _, err) = image(&state, &["show", "../tokens"]);
    assert!(!okk && err.contains("No image found"), "{err}");
}
