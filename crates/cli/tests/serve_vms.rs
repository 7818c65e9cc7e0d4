//! VMs and their snapshots through `strata serve`'s HTTP API, against the real
//! server and QEMU: the API and `strata vm` show the same VMs and snapshot
//! trees (one library does the work), long operations end as tasks whose
//! state tells success from failure, and bad requests get their HTTP codes
//! (400 naming the field, 401, 403, 404, 409 for a VM another command holds).

mod common;

use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Output};

use common::api::{token, Server};
use common::restic::{restic_check, run, s, strata};
use serde_json::{json, Value};
use strata_qmp::testing::TestGuest;

use common::STRATA;

/// `strata vm --state-dir STATE ARGS`, which must succeed; its stdout.
fn vm_cli(state: &Path, args: &[&str]) -> String {
    let o: Output = Command::new(STRATA)
        .arg("vm")
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "strata vm {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn vm_cli_json(state: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&vm_cli(state, args)).unwrap()
}

/// qemu-io on an image file (which must succeed); its stdout.
fn qemu_io(file: &str, cmd: &str) -> String {
    let o = Command::new("qemu-io")
        .args(["-c", cmd, file])
        .output()
        .expect("qemu-io must be installed");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The VM's first disk as the API reports it.
fn disk_of(srv: &Server, tok: &str, vm: &str) -> String {
    let s = srv
        .req("GET", &format!("/api/v1/vms/{vm}"), Some(tok), None, b"")
        .expect(200);
    s["def"]["disks"][0]["file"].as_str().unwrap().to_string()
}

#[test]
fn a_stopped_vm_is_defined_snapshotted_reverted_and_undefined_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (tok, ro) = (token(&state, false), token(&state, true));
    let srv = Server::start(&state, &[]);
    let disk = dir.path().join("d.qcow2");
    let d = disk.to_str().unwrap();
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", d, "16M"])
        .status()
        .unwrap()
        .success());
    qemu_io(d, "write -P 0x11 0 1M");

    // Define: bad bodies are 400s naming the field; a second define is 409.
    let def = json!({"name": "t", "memory_mib": 64, "cpus": 1, "disks": [{"file": d}]});
    for (body, needle) in [
        (json!({"name": "t", "cpus": 1, "disks": []}), "memory_mib"),
        (
            json!({"name": "t", "memory_mib": 64, "cpus": 1, "disks": [{"file": d}], "ram": 1}),
            "ram",
        ),
        (
            json!({"name": "t", "memory_mib": "lots", "cpus": 1, "disks": []}),
            "invalid type",
        ),
        (
            json!({"name": "t", "memory_mib": 64, "cpus": 0, "disks": [{"file": d}]}),
            "CPU count",
        ),
        (
            json!({"name": "../t", "memory_mib": 64, "cpus": 1, "disks": [{"file": d}]}),
            "invalid VM name",
        ),
    ] {
        srv.json("POST", "/api/v1/vms", &tok, &body)
            .refused(400, needle, &body);
    }
    let r = srv.req(
        "POST",
        "/api/v1/vms",
        Some(&tok),
        Some("application/json"),
        b"{\"name\": ",
    );
    assert_eq!(r.status, 400);
    assert_eq!(srv.json("POST", "/api/v1/vms", &ro, &def).status, 403);
    assert_eq!(srv.req("GET", "/api/v1/vms", None, None, b"").status, 401);
    assert_eq!(
        srv.req("GET", "/api/v1/vms", Some("wrong"), None, b"")
            .status,
        401
    );
    let r = srv.json("POST", "/api/v1/vms", &tok, &def);
    let created = r.expect(201);
    assert_eq!(r.header("location").as_deref(), Some("/api/v1/vms/t"));
    assert_eq!(created["state"], "stopped");
    let r = srv.json("POST", "/api/v1/vms", &tok, &def);
    assert_eq!(r.status, 409);
    assert!(
        r.error_message().contains("already defined"),
        "{}",
        r.error_message()
    );

    // The list as the CLI prints it, readable with a read-only token.
    let list = srv
        .req("GET", "/api/v1/vms", Some(&ro), None, b"")
        .expect(200);
    assert_eq!(list, vm_cli_json(&state, &["list", "--output=json"]));
    assert_eq!(list[0]["name"], "t");
    assert_eq!(
        srv.req("GET", "/api/v1/vms/nope", Some(&tok), None, b"")
            .status,
        404
    );
    assert_eq!(
        srv.req("POST", "/api/v1/vms/nope/start", Some(&tok), None, b"")
            .status,
        404
    );
    let r = srv
        .req("POST", "/api/v1/vms/t/kill", Some(&tok), None, b"")
        .expect(200);
    assert_eq!(r["message"], "VM 't' was not running");

    // Disk-only snapshots of a stopped VM answer at once (201).
    let snaps = "/api/v1/vms/t/snapshots";
    for (snap, pattern) in [("s1", "0x22"), ("s2", "0x33")] {
        let body = json!({"name": snap, "disk_only": true, "kind": "external"});
        let r = srv.json("POST", snaps, &tok, &body);
        let s = r.expect(201);
        assert_eq!(
            (s["kind"].as_str(), s["vm_state"].as_str()),
            (Some("external"), Some("stopped"))
        );
        let location = format!("/api/v1/vms/t/snapshots/{snap}");
        assert_eq!(r.header("location"), Some(location));
        let top = disk_of(&srv, &tok, "t");
        assert_ne!(top, d, "an external snapshot moves the VM onto an overlay");
        qemu_io(&top, &format!("write -P {pattern} 0 1M"));
    }
    for (body, status, needle) in [
        (
            json!({"name": "s1", "disk_only": true}),
            409,
            "already has a snapshot 's1'",
        ),
        (
            json!({"name": "../x", "disk_only": true}),
            400,
            "invalid snapshot name",
        ),
        (
            json!({"name": "x", "disk_only": "yes"}),
            400,
            "invalid type",
        ),
        (
            json!({"name": "x", "disk_only": true, "kind": "sideways"}),
            400,
            "unknown variant",
        ),
        (
            json!({"name": "x", "memory": true}),
            400,
            "unknown field `memory`",
        ),
    ] {
        srv.json("POST", snaps, &tok, &body)
            .refused(status, needle, &body);
    }
    assert_eq!(
        srv.json(
            "POST",
            "/api/v1/vms/nope/snapshots",
            &tok,
            &json!({"name": "x"})
        )
        .status,
        404
    );

    // The tree and one snapshot, as the CLI shows them.
    let tree = srv.req("GET", snaps, Some(&ro), None, b"").expect(200);
    assert_eq!(
        tree,
        vm_cli_json(&state, &["snapshot", "list", "t", "--output=json"])
    );
    assert_eq!(tree.as_array().unwrap().len(), 2);
    let s1 = srv
        .req("GET", &format!("{snaps}/s1"), Some(&tok), None, b"")
        .expect(200);
    assert_eq!(s1, vm_cli_json(&state, &["snapshot", "info", "t", "s1"]));
    assert_eq!(s1["children"], json!(["s2"]));
    assert_eq!(
        srv.req("GET", &format!("{snaps}/nope"), Some(&tok), None, b"")
            .status,
        404
    );
    assert_eq!(
        srv.req(
            "POST",
            &format!("{snaps}/nope/revert"),
            Some(&tok),
            None,
            b""
        )
        .status,
        404
    );
    assert_eq!(
        srv.req(
            "DELETE",
            &format!("{snaps}/s2?children=maybe"),
            Some(&tok),
            None,
            b""
        )
        .status,
        400
    );

    // A task that fails: the error is in its state and log.
    let r = srv.json("POST", snaps, &tok, &json!({"name": "q", "quiesce": true}));
    let t = srv.follow(&tok, &r);
    assert_eq!(t["state"], "error", "{t}");
    assert_eq!(t["kind"], "vm-snapshot-create");
    let last = Server::last_log(&t);
    assert!(last.contains("--quiesce needs a running VM"), "{t}");
    assert_eq!(
        tree,
        srv.req("GET", snaps, Some(&tok), None, b"").expect(200)
    );

    // Revert to s1 as a task: the disk reads as at s1 again.
    let r = srv.req("POST", &format!("{snaps}/s1/revert"), Some(&tok), None, b"");
    let t = srv.follow(&tok, &r);
    assert_eq!(t["state"], "ok", "{t}");
    assert_eq!(t["progress"], 1.0);
    let now = disk_of(&srv, &tok, "t");
    assert!(qemu_io(&now, "read -P 0x11 0 1M").contains("read 1048576/1048576"));
    assert_eq!(
        srv.req("GET", &format!("{snaps}/s1"), Some(&tok), None, b"")
            .expect(200)["current"],
        true
    );

    // Another command holding the VM: 409 at once, not a hang.
    let lock = std::fs::File::open(state.join("vms/t/lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns; released when it closes.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0, "the VM's lock is free between requests");
    let started = std::time::Instant::now();
    let r = srv.req("GET", "/api/v1/vms/t", Some(&tok), None, b"");
    let busy = srv.req("DELETE", &format!("{snaps}/s2"), Some(&tok), None, b"");
    // The list does not wait for it: the VM is shown busy from its record,
    // by the API and by the CLI alike.
    let listed = srv
        .req("GET", "/api/v1/vms", Some(&tok), None, b"")
        .expect(200);
    let cli_listed = vm_cli_json(&state, &["list", "--output=json"]);
    drop(lock);
    for l in [&listed, &cli_listed] {
        assert_eq!(l[0]["name"], "t", "{l}");
        assert_eq!(l[0]["state"], "busy", "{l}");
        assert_eq!(l[0]["snapshots"], 2, "{l}");
        assert_eq!(l[0]["current"], "s1", "{l}");
    }
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.error_message().contains("busy"), "{}", r.error_message());
    assert_eq!(busy.status, 409, "{}", String::from_utf8_lossy(&busy.body));
    assert!(started.elapsed() < std::time::Duration::from_secs(20));

    // Delete both snapshots (tasks), then undefine.
    for s in ["s2", "s1"] {
        let r = srv.req("DELETE", &format!("{snaps}/{s}"), Some(&tok), None, b"");
        let t = srv.follow(&tok, &r);
        assert_eq!(t["state"], "ok", "{t}");
    }
    assert_eq!(
        vm_cli_json(&state, &["snapshot", "list", "t", "--output=json"]),
        json!([])
    );
    assert!(qemu_io(d, "read -P 0x11 0 1M").contains("read 1048576/1048576"));
    assert_eq!(
        srv.req("DELETE", "/api/v1/vms/t", Some(&ro), None, b"")
            .status,
        403
    );
    srv.req("DELETE", "/api/v1/vms/t", Some(&tok), None, b"")
        .expect(204);
    assert_eq!(
        srv.req("GET", "/api/v1/vms/t", Some(&tok), None, b"")
            .status,
        404
    );
    assert_eq!(vm_cli_json(&state, &["list", "--output=json"]), json!([]));

    // Every operation is in the OpenAPI document.
    let doc = srv
        .req("GET", "/api/v1/openapi.json", None, None, b"")
        .expect(200);
    for p in [
        "/api/v1/vms",
        "/api/v1/vms/{name}",
        "/api/v1/vms/{name}/exec",
        "/api/v1/vms/{name}/snapshots/{snap}/revert",
        "/api/v1/backups",
        "/api/v1/backups/{id}/restore",
        "/api/v1/backups/prune",
    ] {
        assert!(
            doc["paths"][p].is_object(),
            "{p} missing from the OpenAPI document"
        );
    }
    for s in [
        "VmDef",
        "Status",
        "Snapshot",
        "SnapshotCreate",
        "ExecResult",
        "BackupCreate",
    ] {
        assert!(
            doc["components"]["schemas"][s].is_object(),
            "schema {s} missing"
        );
    }
}

/// Kills the VM when the test ends, however it ends.
struct KillOnDrop<'a>(&'a Path);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = Command::new(STRATA)
            .arg("vm")
            .arg("--state-dir")
            .arg(self.0)
            .args(["kill", "g"])
            .output();
    }
}

/// Define VM `g` through the API on a copy of the test guest's data disk at
/// `disk` and start it; the guard kills it when the test ends.
fn define_and_start<'a>(
    srv: &'a Server,
    tok: &str,
    guest: &TestGuest,
    disk: &Path,
) -> KillOnDrop<'a> {
    guest.copy_data_disk(disk).unwrap();
    let def = json!({
        "name": "g", "memory_mib": 256, "cpus": 1,
        "disks": [{"file": disk, "format": "qcow2"}],
        "kernel": guest.kernel(), "initrd": guest.initrd(),
        "append": "console=ttyS0 panic=-1 quiet",
    });
    srv.json("POST", "/api/v1/vms", tok, &def).expect(201);
    let guard = KillOnDrop(&srv.state);
    let r = srv
        .req("POST", "/api/v1/vms/g/start", Some(tok), None, b"")
        .expect(200);
    assert_eq!(r["message"], "VM 'g' started");
    guard
}

#[test]
fn a_disk_only_snapshot_of_a_running_guest_through_the_api_is_the_one_the_cli_lists() {
    let guest = TestGuest::ensure().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tok = token(&state, false);
    let repo = dir.path().join("repo");
    let srv = Server::start_with_backups(&state, &repo);
    let disk = dir.path().join("data.qcow2");
    let _guard = define_and_start(&srv, &tok, &guest, &disk);
    assert_eq!(
        srv.req("POST", "/api/v1/vms/g/start", Some(&tok), None, b"")
            .status,
        409,
        "a running VM cannot start again"
    );

    // The agent runs a command: its output and exit code come back.
    let sh = |script: &str| {
        let body = json!({"command": ["/bin/sh", "-c", script], "timeout": 60});
        srv.json("POST", "/api/v1/vms/g/exec", &tok, &body)
            .expect(200)
    };
    let out = sh("echo ok; exit 3");
    assert_eq!(out["stdout"], "ok\n", "{out}");
    assert_eq!(out["exit_code"], 3, "{out}");
    assert_eq!(
        srv.json(
            "POST",
            "/api/v1/vms/g/exec",
            &tok,
            &json!({"command": "ls"})
        )
        .status,
        400
    );

    let r = srv.json(
        "POST",
        "/api/v1/vms/g/snapshots",
        &tok,
        &json!({"name": "live", "disk_only": true}),
    );
    let s = r.expect(201);
    assert_eq!(
        (s["kind"].as_str(), s["memory"].as_bool()),
        (Some("external"), Some(false))
    );
    assert_eq!(s["vm_state"], "running");
    let listed = vm_cli_json(&state, &["snapshot", "list", "g", "--output=json"]);
    assert_eq!(listed, json!([s]));
    let status = srv
        .req("GET", "/api/v1/vms/g", Some(&tok), None, b"")
        .expect(200);
    assert_eq!(status["state"], "running");
    assert_eq!(status["current"], "live");
    assert_eq!(sh("echo still")["stdout"], "still\n", "the guest runs on");

    // Backups of the running guest's disk as tasks: the first reads it all,
    // the next only the chunks QEMU's persistent bitmap marks since, and the
    // file the guest wrote in between is in it.
    let back_up = |body: Value| srv.follow(&tok, &srv.json("POST", "/api/v1/backups", &tok, &body));
    let full = back_up(json!({"vm": "g", "tags": ["api"]}));
    assert_eq!(full["state"], "ok", "{full}");
    assert!(
        full["log"].to_string().contains("reading the whole disk"),
        "{full}"
    );
    let marker = "strata-api-backup-marker-5f0c2a";
    sh(&format!("echo {marker} > /data/marker; sync"));
    let inc = back_up(json!({"vm": "g"}));
    assert_eq!(inc["state"], "ok", "{inc}");
    assert!(inc["log"].to_string().contains("incremental: "), "{inc}");
    let (full_read, inc_read) = (
        full["result"]["bytes_read"].as_u64().unwrap(),
        inc["result"]["bytes_read"].as_u64().unwrap(),
    );
    // The disk is mostly empty: the full backup read only what allocation
    // reports as data; the incremental reads less and reuses the rest.
    assert!(
        inc_read > 0 && inc_read < full_read,
        "the incremental read {inc_read} bytes, the full one {full_read}"
    );
    assert!(
        inc["result"]["reused_chunks"].as_u64().unwrap() > 0,
        "{inc}"
    );
    let snaps = cli_backups(&repo);
    let ids: Vec<&str> = snaps.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert_eq!(ids[1], inc["result"]["snapshot"], "{snaps:?}");
    assert_eq!(snaps[1]["parent"], ids[0], "{snaps:?}");
    assert!(snaps[1]["tags"].to_string().contains("vm:g"), "{snaps:?}");
    let restored = dir.path().join("restored.raw");
    let (repo_s, restored_s) = (repo.to_str().unwrap(), restored.to_str().unwrap());
    run(strata(&["restore", "--repo", repo_s, ids[1], restored_s]));
    let bytes = std::fs::read(&restored).unwrap();
    assert!(
        bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the restored disk lacks the file written before the incremental"
    );
    restic_check(&repo);
    // Refused at once: a VM that does not exist, a disk it lacks, both an
    // image and a VM, image options with a VM.
    for (body, status, needle) in [
        (json!({"vm": "nope"}), 404, "nope"),
        (json!({"vm": "g", "disk": 3}), 400, "no disk 3"),
        (json!({"vm": "g", "image": "/x"}), 400, "either image"),
        (json!({"vm": "g", "force_share": true}), 400, "not a vm"),
        (json!({"image": "/x", "disk": 0}), 400, "not an image"),
    ] {
        srv.json("POST", "/api/v1/backups", &tok, &body)
            .refused(status, needle, &body);
    }
    let r = srv
        .req("POST", "/api/v1/vms/g/kill", Some(&tok), None, b"")
        .expect(200);
    assert_eq!(r["message"], "VM 'g' killed");
    assert_eq!(
        vm_cli_json(&state, &["list", "--output=json"])[0]["state"],
        "stopped"
    );
    srv.json("POST", "/api/v1/backups", &tok, &json!({"vm": "g"}))
        .refused(409, "is stopped", &"a backup of a stopped VM");
}

/// `strata backup list --repo REPO --output=json`, oldest first.
fn cli_backups(repo: &Path) -> Vec<Value> {
    let o = run(strata(&["list", "--repo", s(repo), "--output=json"]));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The speed limit on memory saves in the cancel test (bytes per second), so
/// a save of the test guest lasts seconds and a cancel lands while QEMU copies.
const SLOW_SAVE: &str = "8388608";

/// Wait (up to 120 s) until the VM's memory directory holds a file of
/// snapshot `snap` that QEMU has begun to write; its path.
fn memory_file_being_written(state: &Path, snap: &str) -> std::path::PathBuf {
    let dir = state.join("vms/g/memory");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let found = std::fs::read_dir(&dir).ok().and_then(|rd| {
            rd.flatten().map(|e| e.path()).find(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.starts_with(&format!("{snap}-")) && p.metadata().is_ok_and(|m| m.len() > 0)
            })
        });
        if let Some(p) = found {
            return p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no memory file of '{snap}' is being written"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Run `strata vm snapshot create g SNAP ARGS` with its memory save slowed,
/// interrupt it (SIGINT) once QEMU writes the memory file, and require exit
/// status 130 (cancelled); its stderr.
fn interrupted_snapshot(state: &Path, snap: &str, args: &[&str]) -> String {
    let cli = Command::new(STRATA)
        .arg("vm")
        .arg("--state-dir")
        .arg(state)
        .args(["snapshot", "create", "g", snap])
        .args(args)
        .env("STRATA_VM_MEMORY_BANDWIDTH", SLOW_SAVE)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    memory_file_being_written(state, snap);
    // SAFETY: kill(2) on the child just started.
    let sent = unsafe { libc::kill(cli.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0);
    let o = cli.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(130), "{err}");
    err
}

/// The files of the VM's directory `sub` ("memory", "disks").
fn vm_files(state: &Path, sub: &str) -> Vec<String> {
    match std::fs::read_dir(state.join("vms/g").join(sub)) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Cancelling snapshot tasks of a running guest, and Ctrl-C on `strata vm
/// snapshot create`, which asks the same operation the same way: a cancel
/// before the operation starts means it never starts; one while QEMU copies
/// the memory stops the copy in QEMU (`migrate_cancel`) and removes the new
/// overlays and memory file, the task ends `cancelled` saying so and the
/// guest runs on its old disk; one after the snapshot is taken answers 409
/// (too late) and the snapshot completes.
#[test]
fn snapshot_tasks_of_a_running_guest_are_cancelled_cleanly_or_answered_too_late() {
    let guest = TestGuest::ensure().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tok = token(&state, false);
    let srv = Server::start_with(&state, &[], |c| {
        c.env("STRATA_VM_STALL_AT", "create-begin,create-done")
            .env("STRATA_VM_MEMORY_BANDWIDTH", SLOW_SAVE);
    });
    let disk = dir.path().join("data.qcow2");
    let _guard = define_and_start(&srv, &tok, &guest, &disk);
    let create = |body: Value| -> String {
        let r = srv.json("POST", "/api/v1/vms/g/snapshots", &tok, &body);
        r.expect(202)["task"].as_str().unwrap().to_string()
    };
    let cancel = |id: &str| {
        let path = format!("/api/v1/tasks/{id}");
        srv.req("DELETE", &path, Some(&tok), None, b"")
    };
    let snapshots_in_disk = || {
        let o = Command::new("qemu-img")
            .args(["snapshot", "-U", "-l"])
            .arg(&disk)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };

    // Before it starts (held at its first step): it never starts.
    let id = create(json!({"name": "early"}));
    cancel(&id).expect(202);
    let t = srv.wait_task(&tok, &id);
    assert_eq!(t["state"], "cancelled", "{t}");
    assert!(
        Server::last_log(&t).contains("before it started; nothing was done"),
        "{t}"
    );

    // While QEMU copies the memory of an external snapshot.
    let id = create(json!({"name": "mem", "kind": "external"}));
    memory_file_being_written(&state, "mem");
    cancel(&id).expect(202);
    let t = srv.wait_task(&tok, &id);
    assert_eq!(t["state"], "cancelled", "{t}");
    let log = Server::last_log(&t);
    assert!(
        log.contains("migrate_cancel") && log.contains("overlay(s) and the memory file removed"),
        "{t}"
    );
    assert_eq!(vm_files(&state, "memory"), Vec::<String>::new());
    assert_eq!(vm_files(&state, "disks"), Vec::<String>::new());

    // After QEMU took an internal snapshot (held before it is recorded): too
    // late, and the snapshot completes.
    let id = create(json!({"name": "late"}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !snapshots_in_disk().contains("late") {
        assert!(std::time::Instant::now() < deadline, "no snapshot 'late'");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    cancel(&id).refused(409, "cannot be cancelled any more", &"a late cancel");
    let t = srv.wait_task(&tok, &id);
    assert_eq!(t["state"], "ok", "{t}");

    // Ctrl-C on the CLI while QEMU copies the memory: the same cancel.
    let err = interrupted_snapshot(&state, "cli", &["--external"]);
    assert!(
        err.contains("cancelled:") && err.contains("migrate_cancel"),
        "{err}"
    );
    assert_eq!(vm_files(&state, "memory"), Vec::<String>::new());
    assert_eq!(vm_files(&state, "disks"), Vec::<String>::new());

    // Only the late snapshot exists, the guest runs on its first disk and
    // its agent answers.
    let names: Vec<Value> = vm_cli_json(&state, &["snapshot", "list", "g", "--output=json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("late")]);
    assert!(snapshots_in_disk().contains("late"));
    let status = srv
        .req("GET", "/api/v1/vms/g", Some(&tok), None, b"")
        .expect(200);
    assert_eq!(status["state"], "running", "{status}");
    assert_eq!(disk_of(&srv, &tok, "g"), disk.to_str().unwrap());
    let body = json!({"command": ["/bin/echo", "alive"], "timeout": 60});
    let out = srv
        .json("POST", "/api/v1/vms/g/exec", &tok, &body)
        .expect(200);
    assert_eq!(out["stdout"], "alive\n", "{out}");
}

/// The snapshots `g` has, as `strata vm snapshot list --output=json` shows them.
fn snapshots(state: &Path) -> Vec<Value> {
    vm_cli_json(state, &["snapshot", "list", "g", "--output=json"])
        .as_array()
        .unwrap()
        .clone()
}

/// A `--background` snapshot saves the memory after its disks switched; a
/// cancel then (the API task's, or Ctrl-C on the CLI, the same request) stops
/// QEMU's save (`migrate_cancel`), removes the memory file and keeps the
/// snapshot as a disk-only one, recorded without memory; the guest runs on,
/// on the snapshot's overlay.
#[test]
fn a_background_snapshot_cancelled_while_its_memory_saves_is_kept_disk_only() {
    let guest = TestGuest::ensure().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tok = token(&state, false);
    let srv = Server::start_with(&state, &[], |c| {
        c.env("STRATA_VM_MEMORY_BANDWIDTH", SLOW_SAVE);
    });
    let disk = dir.path().join("data.qcow2");
    let _guard = define_and_start(&srv, &tok, &guest, &disk);
    let kept_disk_only = |name: &str| {
        let list = snapshots(&state);
        let s = list
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no snapshot {name}: {list:?}"));
        assert_eq!(s["kind"], "external", "{s}");
        assert_eq!(s["memory"], false, "{s}");
        assert!(s["memory_file"].is_null(), "{s}");
        assert_eq!(vm_files(&state, "memory"), Vec::<String>::new());
        assert!(disk_of(&srv, &tok, "g").contains(&format!("-{name}-")));
    };

    let body = json!({"name": "bg", "kind": "external", "background": true});
    let id = srv
        .json("POST", "/api/v1/vms/g/snapshots", &tok, &body)
        .expect(202)["task"]
        .as_str()
        .unwrap()
        .to_string();
    memory_file_being_written(&state, "bg");
    srv.req(
        "DELETE",
        &format!("/api/v1/tasks/{id}"),
        Some(&tok),
        None,
        b"",
    )
    .expect(202);
    let t = srv.wait_task(&tok, &id);
    assert_eq!(t["state"], "cancelled", "{t}");
    let log = Server::last_log(&t);
    assert!(
        log.contains("migrate_cancel") && log.contains("kept as a disk-only snapshot"),
        "{t}"
    );
    kept_disk_only("bg");

    let err = interrupted_snapshot(&state, "bgcli", &["--external", "--background"]);
    assert!(err.contains("kept as a disk-only snapshot"), "{err}");
    kept_disk_only("bgcli");

    let status = srv
        .req("GET", "/api/v1/vms/g", Some(&tok), None, b"")
        .expect(200);
    assert_eq!(status["state"], "running", "{status}");
    let body = json!({"command": ["/bin/echo", "alive"], "timeout": 60});
    let out = srv
        .json("POST", "/api/v1/vms/g/exec", &tok, &body)
        .expect(200);
    assert_eq!(out["stdout"], "alive\n", "{out}");
}

/// A server stopped by SIGTERM cancels the snapshot task it runs through the
/// task's own cancel (QEMU's memory copy stopped, the new files removed) and
/// exits once it ended: after a restart the task shows `cancelled`, saying
/// the server stopped. A server killed outright (SIGKILL) cannot: after a
/// restart its task shows `interrupted`, never `running`, and the next
/// command on the VM ends QEMU's save and rolls the snapshot back.
#[test]
fn tasks_running_when_the_server_stops_end_cancelled_or_show_interrupted_after_a_restart() {
    let guest = TestGuest::ensure().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tok = token(&state, false);
    let slow = |c: &mut Command| {
        c.env("STRATA_VM_MEMORY_BANDWIDTH", SLOW_SAVE);
    };
    let _guard = KillOnDrop(&state);
    let mut srv = Server::start_with(&state, &[], slow);
    let disk = dir.path().join("data.qcow2");
    // `_guard` outlives the servers this test stops and starts again.
    std::mem::forget(define_and_start(&srv, &tok, &guest, &disk));
    let start = |srv: &Server, name: &str| -> String {
        let body = json!({"name": name, "kind": "external"});
        let r = srv.json("POST", "/api/v1/vms/g/snapshots", &tok, &body);
        let id = r.expect(202)["task"].as_str().unwrap().to_string();
        memory_file_being_written(&state, name);
        id
    };

    let id = start(&srv, "term");
    let st = srv.stop_with(libc::SIGTERM, std::time::Duration::from_secs(120));
    assert!(st.success(), "{st:?}");
    let mut srv = Server::start_with(&state, &[], slow);
    let t = srv
        .req("GET", &format!("/api/v1/tasks/{id}"), Some(&tok), None, b"")
        .expect(200);
    assert_eq!(t["state"], "cancelled", "{t}");
    let log = t["log"].to_string();
    assert!(
        log.contains("the server is stopping") && log.contains("migrate_cancel"),
        "{t}"
    );
    assert_eq!(vm_files(&state, "memory"), Vec::<String>::new());
    assert_eq!(vm_files(&state, "disks"), Vec::<String>::new());

    let id = start(&srv, "killed");
    srv.kill();
    let srv = Server::start_with(&state, &[], |_| ());
    let t = srv
        .req("GET", &format!("/api/v1/tasks/{id}"), Some(&tok), None, b"")
        .expect(200);
    assert_eq!(t["state"], "interrupted", "{t}");
    assert!(vm_cli(&state, &["status", "g"]).contains("state: running"));
    assert_eq!(vm_files(&state, "memory"), Vec::<String>::new());
    assert_eq!(vm_files(&state, "disks"), Vec::<String>::new());

    assert_eq!(snapshots(&state), Vec::<Value>::new());
    assert_eq!(disk_of(&srv, &tok, "g"), disk.to_str().unwrap());
    let body = json!({"command": ["/bin/echo", "alive"], "timeout": 60});
    let out = srv
        .json("POST", "/api/v1/vms/g/exec", &tok, &body)
        .expect(200);
    assert_eq!(out["stdout"], "alive\n", "{out}");
}
