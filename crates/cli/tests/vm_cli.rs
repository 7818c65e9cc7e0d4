//! `strata vm` end to end: the real test guest booted under QEMU (TCG unless KVM
//! really works), driven only through the CLI, checked through the guest agent
//! and qemu-img. One VM per test keeps the number of boots small.
//!
//! Snapshot kinds by the VM's state when taken and when reverted (a stopped VM
//! has no memory to keep, so its snapshots are disk-only; a quiesce needs the
//! agent of a running guest and is refused otherwise):
//!
//! | kind | taken | reverted | test |
//! |---|---|---|---|
//! | internal full | running | running | `snapshots_of_a_running_guest_…` (s1) |
//! | internal full | running | stopped | `snapshots_of_a_running_guest_…` (i2) |
//! | external disk-only, quiesced | running | running (`--force`) | `snapshots_of_a_running_guest_…` (s2) |
//! | external disk-only | running | stopped | `snapshots_of_a_running_guest_…` (s2 again) |
//! | external full | running | running | `snapshots_of_a_running_guest_…` (s3) |
//! | external full, `--background` | running | running | `snapshots_of_a_running_guest_…` (s3b) |
//! | external full | running | stopped | `snapshots_of_a_running_guest_…` (s3 again) |
//! | internal disk-only | stopped | stopped | `a_stopped_vm_gets_…` (i1) |
//! | external disk-only | stopped | stopped | `deleting_middle_snapshots_keeps_…` (e2, e3, b1) |
//! | external disk-only | running | running | `deleting_middle_snapshots_of_a_running_guest_…` (e2, e4) |

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;

use strata_qmp::testing::TestGuest;
use strata_qmp::Agent;

use common::STRATA;

/// A state directory and the VM in it; the VM is killed when this is dropped.
struct Env {
    dir: tempfile::TempDir,
    vm: &'static str,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
            vm: "t",
        }
    }
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(STRATA);
        c.arg("vm").arg("--state-dir").arg(self.state()).args(args);
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }
    /// Run and require success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "strata vm {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
    /// Run with strata told to stop dead (no cleanup) at `step`, and require that
    /// it did.
    fn crash_at(&self, step: &str, args: &[&str]) {
        let o = self
            .cmd(args)
            .env("STRATA_VM_CRASH_AT", step)
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(86),
            "{step}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    /// Run and require failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "strata vm {args:?} succeeded");
        String::from_utf8(o.stderr).unwrap()
    }
    fn record(&self) -> Vec<u8> {
        std::fs::read(self.state().join("vms").join(self.vm).join("vm.json")).unwrap()
    }
    fn vm_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for sub in ["disks", "memory"] {
            if let Ok(rd) = std::fs::read_dir(self.state().join("vms").join(self.vm).join(sub)) {
                out.extend(rd.map(|e| e.unwrap().path()));
            }
        }
        out.sort();
        out
    }
    /// A shell command in the guest; its stdout, trimmed.
    fn sh(&self, script: &str) -> String {
        self.ok(&["exec", self.vm, "--", "/bin/sh", "-c", script])
            .trim()
            .to_string()
    }
    fn disks(&self) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.record()).unwrap();
        v["def"]["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["file"].as_str().unwrap().to_string())
            .collect()
    }
    fn info(&self, snap: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["snapshot", "info", self.vm, snap])).unwrap()
    }
    /// The file snapshot `snap` froze (of its first disk).
    fn snap_file(&self, snap: &str) -> String {
        self.info(snap)["disks"][0]["file"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.run(&["kill", self.vm]);
    }
}

fn qemu_img(args: &[&str]) -> String {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Run qemu-io commands on `file`; a failed command or a pattern mismatch fails.
fn qemu_io(file: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = c.arg(file).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && !out.contains("verification failed") && !out.contains("failed:"),
        "qemu-io {cmds:?} {file}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Require the qcow2 image `file` (possibly in use) to show what `raw` holds.
fn same_as_raw(file: &str, raw: &Path) {
    qemu_img(&[
        "compare",
        "-U",
        "-f",
        "qcow2",
        "-F",
        "raw",
        file,
        raw.to_str().unwrap(),
    ]);
}

fn qemu_img_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&qemu_img(args)).unwrap()
}

/// Define VM `t` on a copy of the test guest's disk.
fn define_guest(env: &Env) -> PathBuf {
    define_guest_with(env, &[])
}

/// Define VM `t` on a copy of the test guest's disk, then the disks `extra`.
fn define_guest_with(env: &Env, extra: &[&str]) -> PathBuf {
    let guest = TestGuest::ensure().unwrap();
    let disk = env.dir.path().join("data.qcow2");
    guest.copy_data_disk(&disk).unwrap();
    let (kernel, initrd) = (guest.kernel(), guest.initrd());
    let mut args = vec!["define", env.vm, "--memory", "256M"];
    for d in std::iter::once(disk.to_str().unwrap()).chain(extra.iter().copied()) {
        args.extend(["--disk", d]);
    }
    args.extend([
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--append",
        "console=ttyS0 panic=-1 quiet",
    ]);
    env.ok(&args);
    disk
}

/// Define VM `t` (stopped, no guest) on a new 16 MiB qcow2 disk, first written
/// with the qemu-io command `write`; returns the disk's path.
fn define_blank(env: &Env, write: Option<&str>) -> String {
    let disk = env.dir.path().join("d.qcow2");
    let d = disk.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", d, "16M"]);
    if let Some(w) = write {
        qemu_io(d, &[w]);
    }
    env.ok(&["define", "t", "--memory", "64M", "--disk", d]);
    d.to_string()
}

/// The guest's counter: "pid value".
fn counter(env: &Env) -> (u64, u64) {
    let s = env.sh("echo $(cat /tmp/pid) $(cat /tmp/n)");
    let mut it = s.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

/// Start the guest's counter process (its pid in /tmp/pid, its value in
/// /tmp/n, counting up ten times a second) and wait for its first value.
fn start_counter(env: &Env) {
    // Each value is renamed into place, so a reader never sees the file empty.
    env.sh("sh -c 'echo $$ > /tmp/pid; i=0; while :; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done' >/dev/null 2>&1 &");
    wait_counter_past(env, 0);
}

fn wait_counter_past(env: &Env, value: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, n) = counter(env);
        if n > value {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's counter is stuck at {n}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The VM's state when a round trip reverts.
#[derive(Clone, Copy, PartialEq, Debug)]
enum RevertFrom {
    Running,
    /// QEMU killed first: the revert starts it and loads the snapshot.
    Stopped,
}

/// Snapshot with memory, change the file, let the counter run on, revert (from
/// a running or a stopped VM): the guest runs, the file is as at the snapshot
/// and the same counter process continues from its value at the snapshot.
fn memory_snapshot_round_trip(
    env: &Env,
    snap: &str,
    extra: &[&str],
    content: &str,
    from: RevertFrom,
) {
    env.sh(&format!("echo {content} > /data/f; sync"));
    let (pid, before) = counter(env);
    let mut args = vec!["snapshot", "create", env.vm, snap];
    args.extend(extra);
    env.ok(&args);
    let (_, after) = counter(env);
    env.sh("echo changed > /data/f; sync");
    let later = wait_counter_past(env, after + 20);
    if from == RevertFrom::Stopped {
        env.ok(&["kill", env.vm]);
        assert!(env.ok(&["status", env.vm]).contains("state: stopped"));
    }
    env.ok(&["snapshot", "revert", env.vm, snap]);
    assert!(
        env.ok(&["status", env.vm]).contains("state: running"),
        "{snap} ({from:?}): the guest does not run after the revert"
    );
    assert_eq!(env.sh("cat /data/f"), content, "{snap}: file not reverted");
    let (pid2, resumed) = counter(env);
    assert_eq!(
        pid2, pid,
        "{snap}: the counter process is not the same (a reboot?)"
    );
    assert!(
        resumed >= before && resumed < later,
        "{snap}: counter {resumed} does not continue from [{before}, {after}] (it was {later} before the revert)"
    );
    let info = env.info(snap);
    assert_eq!(info["memory"], true);
    assert_eq!(info["current"], true);
}

#[test]
fn snapshots_of_a_running_guest_revert_its_files_and_its_memory() {
    let env = Env::new();
    let disk = define_guest(&env);
    env.ok(&["start", env.vm]);
    start_counter(&env);

    // Internal, with memory (the default for a running VM).
    memory_snapshot_round_trip(&env, "s1", &[], "one", RevertFrom::Running);
    assert_eq!(env.info("s1")["kind"], "internal");
    let listed = qemu_img(&["snapshot", "-l", "-U", disk.to_str().unwrap()]);
    assert!(
        listed.contains(" s1 "),
        "qemu-img does not list s1:\n{listed}"
    );

    // Quiesced external disk-only: the agent froze /data and thawed it after.
    env.sh("echo two > /data/f; sync");
    env.ok(&[
        "snapshot",
        "create",
        env.vm,
        "s2",
        "--disk-only",
        "--quiesce",
    ]);
    let s2 = env.info("s2");
    assert_eq!(s2["kind"], "external");
    assert_eq!(s2["memory"], false);
    assert!(s2["frozen_filesystems"].as_u64().unwrap() >= 1, "{s2}");
    assert_eq!(s2["parent"], "s1");
    env.sh("touch /data/written-after-thaw");
    {
        let mut agent = Agent::connect(
            &env.state().join("vms/t/agent.sock"),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(
            agent.fsfreeze_status().unwrap(),
            strata_qmp::agent::FreezeStatus::Thawed
        );
        // While this connection holds the agent's only channel, the agent
        // cannot answer strata: a quiesced snapshot fails and leaves nothing.
        let record = env.record();
        let files = env.vm_files();
        let e = env
            .cmd(&[
                "snapshot",
                "create",
                env.vm,
                "q",
                "--disk-only",
                "--quiesce",
            ])
            .env("STRATA_AGENT_TIMEOUT", "3")
            .output()
            .unwrap();
        assert!(!e.status.success());
        let msg = String::from_utf8_lossy(&e.stderr);
        assert!(
            msg.contains("cannot quiesce") && msg.contains("agent"),
            "{msg}"
        );
        assert_eq!(env.record(), record, "a failed quiesce changed the record");
        assert_eq!(env.vm_files(), files, "a failed quiesce left files");
    }
    // The overlay's backing file is the disk as it was, with its format.
    let top = env.disks()[0].clone();
    let info = qemu_img_json(&["info", "-U", "--output=json", &top]);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["full-backing-filename"], disk.to_str().unwrap());
    assert_eq!(info["backing-filename-format"], "qcow2");

    // External with memory.
    memory_snapshot_round_trip(&env, "s3", &["--external"], "three", RevertFrom::Running);
    assert!(
        env.info("s3")["pause_ms"].is_u64(),
        "the guest's pause was not measured"
    );
    let mem = env.info("s3")["memory_file"].as_str().unwrap().to_string();
    assert!(Path::new(&mem).is_file());
    // The revert loaded the memory through a migration strata set up: like
    // every save, it runs without QEMU's default 128 MiB/s limit.
    let params = monitor(&env)
        .execute_value("query-migrate-parameters", None)
        .unwrap();
    assert_eq!(params["max-bandwidth"], i64::MAX, "{params}");

    // External with memory saved in the background: the guest paused only for
    // the disk switch; memory and disks are still of one instant.
    let bg = ["--external", "--background"];
    memory_snapshot_round_trip(&env, "s3b", &bg, "three-bg", RevertFrom::Running);
    assert!(env.info("s3b")["pause_ms"].is_u64());

    // Reverting a stopped VM to a memory snapshot brings the guest back where it
    // was, running, with no boot.
    let (pid, _) = counter(&env);
    env.sh("echo gone > /data/f; sync");
    env.ok(&["kill", env.vm]);
    assert!(env.ok(&["status", env.vm]).contains("state: stopped"));
    env.ok(&["snapshot", "revert", env.vm, "s3"]);
    assert!(env.ok(&["status", env.vm]).contains("state: running"));
    assert_eq!(env.sh("cat /data/f"), "three");
    assert_eq!(counter(&env).0, pid, "the guest was rebooted, not restored");

    // Saved to a file and stopped, the guest resumes on start, and again from
    // restore FILE: the same counter process, the file as it was.
    for resume in ["start", "restore"] {
        env.sh("echo saved > /data/f; sync");
        let (pid, before) = counter(&env);
        let out = env.ok(&["save", env.vm]);
        let file = out.trim().rsplit(' ').next().unwrap().to_string();
        assert!(Path::new(&file).is_file(), "{out}");
        assert!(env.ok(&["status", env.vm]).contains("state: stopped"));
        let e = env.fails(&["snapshot", "revert", env.vm, "s3"]);
        assert!(e.contains("saved state"), "{e}");
        match resume {
            "start" => env.ok(&["start", env.vm]),
            _ => env.ok(&["restore", &file]),
        };
        assert!(env.ok(&["status", env.vm]).contains("state: running"));
        let (pid2, now) = counter(&env);
        assert_eq!(pid2, pid, "{resume}: the guest was rebooted, not resumed");
        assert!(now >= before, "{resume}: counter went back");
        assert_eq!(env.sh("cat /data/f"), "saved");
        assert!(
            !Path::new(&file).exists(),
            "{resume}: the saved state was kept"
        );
    }

    // A disk-only snapshot of a running VM needs a restart to revert to.
    let e = env.fails(&["snapshot", "revert", env.vm, "s2"]);
    assert!(e.contains("--force"), "{e}");
    env.ok(&["snapshot", "revert", env.vm, "s2", "--force"]);
    assert_eq!(env.sh("cat /data/f"), "two");
    assert_eq!(env.ok(&["snapshot", "current", env.vm]).trim(), "s2");
    let tree = env.ok(&["snapshot", "list", env.vm, "--tree"]);
    assert!(
        tree.contains("s1") && tree.contains("  s2") && tree.contains("    s3"),
        "{tree}"
    );

    // A snapshot after a revert starts a branch.
    env.ok(&["snapshot", "create", env.vm, "b1", "--disk-only"]);
    assert_eq!(env.info("b1")["parent"], "s2");
    assert_eq!(env.info("s2")["children"], serde_json::json!(["s3", "b1"]));

    // strata killed after QEMU switched to new overlays, before the record was
    // written: the next command merges them back and removes them.
    let record = env.record();
    let files = env.vm_files();
    env.crash_at(
        "create-done",
        &["snapshot", "create", env.vm, "c", "--disk-only"],
    );
    env.sh("echo during > /data/f; sync");
    assert!(!env.ok(&["snapshot", "list", env.vm]).contains("\nc "));
    assert_eq!(env.record(), record, "recovery did not restore the record");
    assert_eq!(env.vm_files(), files, "recovery left the new overlay");
    assert_eq!(
        env.sh("cat /data/f"),
        "during",
        "a write made before recovery was lost"
    );

    // Deleting the current external leaf merges its overlay down, live.
    env.sh("echo merged > /data/f; sync");
    env.ok(&["snapshot", "delete", env.vm, "b1"]);
    assert_eq!(env.sh("cat /data/f"), "merged");

    // Internal with memory, reverted while the VM is stopped: QEMU starts
    // paused, loads it, and the same counter process runs on (a new one: the
    // revert to s2 restarted the guest).
    start_counter(&env);
    memory_snapshot_round_trip(&env, "i2", &[], "four", RevertFrom::Stopped);
    assert_eq!(env.info("i2")["kind"], "internal");

    // A disk-only snapshot reverted while the VM is stopped changes the disks
    // only; the next start boots on them.
    env.ok(&["kill", env.vm]);
    env.ok(&["snapshot", "revert", env.vm, "s2"]);
    assert!(env.ok(&["status", env.vm]).contains("state: stopped"));
    env.ok(&["start", env.vm]);
    assert_eq!(env.sh("cat /data/f"), "two");
    env.ok(&["stop", env.vm]);
    for d in env.disks() {
        qemu_img(&["check", &d]);
    }
}

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() {
    let env = Env::new();
    let disk = env.dir.path().join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "16M"]);
    let d = disk.to_str().unwrap();

    let e = env.fails(&["status", "nope"]);
    assert!(e.contains("VM 'nope' is not defined"), "{e}");
    let e = env.fails(&["define", "../x", "--disk", d]);
    assert!(e.contains("invalid VM name"), "{e}");
    let e = env.fails(&["define", "t", "--disk", "/nonexistent.qcow2"]);
    assert!(e.contains("/nonexistent.qcow2"), "{e}");
    let e = env.fails(&["define", "t", "--disk", &format!("{d},format=raw")]);
    assert!(e.contains("is qcow2, not raw"), "{e}");
    assert!(!env.state().join("vms/t").exists());

    env.ok(&["define", "t", "--memory", "64M", "--disk", d]);
    let record = env.record();
    let e = env.fails(&["define", "t", "--disk", d]);
    assert!(e.contains("already defined"), "{e}");
    for bad in ["../x", "a/b", ".x", ""] {
        let e = env.fails(&["snapshot", "create", "t", bad]);
        assert!(e.contains("invalid snapshot name"), "{bad}: {e}");
    }
    for args in [
        ["snapshot", "revert", "t", "nosnap"],
        ["snapshot", "delete", "t", "nosnap"],
        ["snapshot", "info", "t", "nosnap"],
    ] {
        let e = env.fails(&args);
        assert!(e.contains("VM 't' has no snapshot 'nosnap'"), "{e}");
    }
    let e = env.fails(&["snapshot", "create", "t", "q", "--disk-only", "--quiesce"]);
    assert!(e.contains("--quiesce needs a running VM"), "{e}");
    let e = env.fails(&["snapshot", "create", "t", "b", "--external", "--background"]);
    assert!(e.contains("--background needs"), "{e}");
    let e = env.fails(&["exec", "t", "--", "/bin/true"]);
    assert!(e.contains("not running"), "{e}");
    let o = env
        .cmd(&["start", "t"])
        .env("STRATA_QEMU", "/nonexistent/qemu-system")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("cannot start QEMU '/nonexistent/qemu-system'"),
        "{e}"
    );
    assert!(env.ok(&["status", "t"]).contains("state: stopped"));
    assert_eq!(env.record(), record, "a refused command changed the record");
    assert!(env.vm_files().is_empty());
}

#[test]
fn a_stopped_vm_gets_internal_and_external_snapshots_through_the_engine() {
    let env = Env::new();
    let disk = define_blank(&env, Some("write -P 0x11 0 64k"));
    let d = disk.as_str();

    // Internal: made in the file itself, visible to qemu-img.
    env.ok(&["snapshot", "create", "t", "i1"]);
    assert!(qemu_img(&["snapshot", "-l", d]).contains(" i1 "));
    let e = env.fails(&["snapshot", "create", "t", "i1"]);
    assert!(e.contains("already has a snapshot 'i1'"), "{e}");

    // External: an overlay on the disk, with backing file and format recorded.
    env.ok(&["snapshot", "create", "t", "e1", "--external"]);
    let top = env.disks()[0].clone();
    assert_ne!(top, d);
    let info = qemu_img_json(&["info", "--output=json", &top]);
    assert_eq!(info["full-backing-filename"], d);
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(env.info("e1")["parent"], "i1");

    // The internal snapshot's file is now a backing file: reverting in place
    // is refused, and nothing changes.
    let record = env.record();
    let e = env.fails(&["snapshot", "revert", "t", "i1"]);
    assert!(e.contains("backing"), "{e}");
    assert_eq!(env.record(), record);

    // Writes land in the overlay; deleting the leaf merges them into the disk.
    qemu_io(&top, &["write -P 0x22 0 4k"]);
    env.ok(&["snapshot", "delete", "t", "e1"]);
    assert_eq!(env.disks(), vec![d.to_string()]);
    assert!(!Path::new(&top).exists(), "the merged overlay was kept");
    qemu_img(&["check", d]);
    qemu_io(d, &["read -P 0x22 0 4k", "read -P 0x11 4k 60k"]);

    // Revert and delete the internal one through the engine.
    env.ok(&["snapshot", "revert", "t", "i1"]);
    qemu_io(d, &["read -P 0x11 0 64k"]);
    let listed: serde_json::Value =
        serde_json::from_str(&env.ok(&["snapshot", "list", "t", "--output=json"])).unwrap();
    assert_eq!(listed[0]["name"], "i1");
    assert_eq!(listed[0]["disks"][0]["file"], d);
    env.ok(&["snapshot", "delete", "t", "i1"]);
    assert!(!qemu_img(&["snapshot", "-l", d]).contains("i1"));
    env.ok(&["undefine", "t"]);
    assert!(env.fails(&["status", "t"]).contains("not defined"));

    // The same VM from a definition file; a misspelt key is refused.
    let file = env.dir.path().join("t.json");
    let def = serde_json::json!({"name": "t", "memory_mib": 64, "cpus": 1,
                                 "disks": [{"file": d, "format": "qcow2"}]});
    std::fs::write(&file, def.to_string()).unwrap();
    env.ok(&["define", "--file", file.to_str().unwrap()]);
    assert!(env
        .ok(&["status", "t"])
        .contains(&format!("disk0: {d} (qcow2)")));
    let bad = env.dir.path().join("bad.json");
    std::fs::write(&bad, def.to_string().replace("cpus", "cpu")).unwrap();
    let e = env.fails(&["define", "u", "--file", bad.to_str().unwrap()]);
    assert!(e.contains("is not a VM definition"), "{e}");

    // The same definition in TOML gives the same record; a misspelt key is refused.
    let record = env.record();
    env.ok(&["undefine", "t"]);
    let toml = env.dir.path().join("t.toml");
    let text = format!(
        "name = \"t\"\nmemory_mib = 64\ncpus = 1\n\n[[disks]]\nfile = \"{d}\"\nformat = \"qcow2\"\n"
    );
    std::fs::write(&toml, &text).unwrap();
    env.ok(&["define", "--file", toml.to_str().unwrap()]);
    assert_eq!(env.record(), record, "TOML and JSON definitions differ");
    let bad = env.dir.path().join("bad.toml");
    std::fs::write(&bad, text.replace("cpus", "cpu")).unwrap();
    let e = env.fails(&["define", "u", "--file", bad.to_str().unwrap()]);
    assert!(e.contains("is not a VM definition"), "{e}");
}

/// Crash (exit with no cleanup) at each step of create, revert and delete of a
/// stopped VM: the next command finds record and disks in agreement.
#[test]
fn an_interrupted_snapshot_operation_is_undone_or_finished_by_the_next_command() {
    let env = Env::new();
    let disk = define_blank(&env, None);
    let d = disk.as_str();
    let crash = |step: &str, args: &[&str]| {
        env.crash_at(step, args);
        let r: serde_json::Value = serde_json::from_slice(&env.record()).unwrap();
        assert!(r["intent"].is_object(), "{step}: no intent recorded");
    };
    let mut cases = 0;
    for (step, kind) in [
        ("create-overlays", "--external"),
        ("create-done", "--external"),
        ("create-done", "--internal"),
    ] {
        let record = env.record();
        crash(step, &["snapshot", "create", "t", "x", kind]);
        env.ok(&["status", "t"]);
        assert_eq!(
            env.record(),
            record,
            "{step} {kind}: record not rolled back"
        );
        assert!(env.vm_files().is_empty(), "{step} {kind}: files left");
        assert!(
            !qemu_img(&["snapshot", "-l", d]).contains(" x "),
            "{step} {kind}"
        );
        qemu_img(&["check", d]);
        cases += 1;
    }
    env.ok(&["snapshot", "create", "t", "e1", "--external"]);
    let record = env.record();
    let files = env.vm_files();
    crash("revert-overlays", &["snapshot", "revert", "t", "e1"]);
    env.ok(&["status", "t"]);
    assert_eq!(env.record(), record, "revert not rolled back");
    assert_eq!(env.vm_files(), files, "revert left its overlays");
    cases += 1;

    // A delete that merged already is finished, not undone.
    let top = env.disks()[0].clone();
    qemu_io(&top, &["write -P 0x33 0 4k"]);
    crash("delete-merged", &["snapshot", "delete", "t", "e1"]);
    env.ok(&["status", "t"]);
    assert_eq!(env.disks(), vec![d.to_string()]);
    assert!(env.vm_files().is_empty());
    assert!(!env.ok(&["snapshot", "list", "t"]).contains("e1"));
    qemu_img(&["check", d]);
    qemu_io(d, &["read -P 0x33 0 4k"]);
    cases += 1;
    assert_eq!(cases, 5);
}

/// A tree four deep with two branches, on a stopped VM: deleting a middle
/// snapshot and then the branch point merges their data into the images above,
/// and every remaining snapshot and the current state keep their content.
#[test]
fn deleting_middle_snapshots_keeps_every_other_snapshot_and_the_current_state() {
    let env = Env::new();
    let disk = define_blank(&env, Some("write -P 0xa1 0 64k"));
    let d = disk.as_str();
    let top = |env: &Env| env.disks()[0].clone();
    let snap_file = |env: &Env, s: &str| env.snap_file(s);
    env.ok(&["snapshot", "create", "t", "e1", "--external"]);
    qemu_io(&top(&env), &["write -P 0xb2 4k 4k"]);
    env.ok(&["snapshot", "create", "t", "e2", "--external"]);
    qemu_io(&top(&env), &["write -P 0xc3 8k 4k"]);
    env.ok(&["snapshot", "create", "t", "e3", "--external"]);
    qemu_io(&top(&env), &["write -P 0xd4 12k 4k"]);
    env.ok(&["snapshot", "revert", "t", "e2"]);
    qemu_io(&top(&env), &["write -P 0xe5 16k 4k"]);
    env.ok(&["snapshot", "create", "t", "b1", "--external"]);
    qemu_io(&top(&env), &["write -P 0xf6 20k 4k"]);
    assert_eq!(env.info("e2")["children"], serde_json::json!(["e3", "b1"]));

    // What each image shows: (file, [(pattern, offset)]), the rest of 0..24k as
    // written before it.
    let e3_view = [
        "read -P 0xa1 0 4k",
        "read -P 0xb2 4k 4k",
        "read -P 0xc3 8k 4k",
        "read -P 0xa1 12k 4k",
    ];
    let b1_view = [
        "read -P 0xa1 0 4k",
        "read -P 0xb2 4k 4k",
        "read -P 0xa1 8k 8k",
        "read -P 0xe5 16k 4k",
    ];
    let now_view = [
        "read -P 0xa1 0 4k",
        "read -P 0xb2 4k 4k",
        "read -P 0xa1 8k 8k",
        "read -P 0xe5 16k 4k",
        "read -P 0xf6 20k 4k",
    ];
    let check_all = |env: &Env| {
        qemu_io(&snap_file(env, "e3"), &e3_view);
        qemu_io(&snap_file(env, "b1"), &b1_view);
        qemu_io(&top(env), &now_view);
        qemu_io(d, &["read -P 0xa1 0 64k"]);
        for f in env.vm_files() {
            qemu_img(&["check", f.to_str().unwrap()]);
        }
    };
    check_all(&env);

    // The middle snapshot and branch point e2, with strata stopped after the
    // first image was rebased: the next command finishes the merge.
    let e2_file = snap_file(&env, "e2");
    env.crash_at("merge-rebased", &["snapshot", "delete", "t", "e2"]);
    env.ok(&["status", "t"]);
    assert!(!env.ok(&["snapshot", "list", "t"]).contains("e2"));
    assert!(
        !Path::new(&e2_file).exists(),
        "the merged snapshot's file was kept"
    );
    assert_eq!(env.info("e3")["parent"], "e1");
    assert_eq!(env.info("b1")["parent"], "e1");
    check_all(&env);

    // Then e1, now the branch point, whose file is the user's own disk: the
    // images above take its data and the disk itself is left alone.
    env.ok(&["snapshot", "delete", "t", "e1"]);
    assert_eq!(env.info("e3")["parent"], serde_json::Value::Null);
    check_all(&env);
    for s in ["e3", "b1"] {
        let info = qemu_img_json(&["info", "--output=json", &snap_file(&env, s)]);
        assert!(info.get("backing-filename").is_none(), "{s}: {info}");
    }

    // Every remaining snapshot still reverts to its own content.
    env.ok(&["snapshot", "revert", "t", "e3"]);
    qemu_io(&top(&env), &e3_view);
    env.ok(&["snapshot", "revert", "t", "b1"]);
    qemu_io(&top(&env), &b1_view);
}

/// A tree four deep with two branches of external snapshots of a running guest
/// that keeps appending to a log: deleting a middle snapshot (its only user an
/// image QEMU does not have open), a branch point under an image of the running
/// chain (block-stream into it), the current leaf (active commit and pivot) and
/// then a branch point right under the active layer (block-stream into it) keeps
/// every remaining snapshot's content bit for bit and the guest's data whole,
/// and every image passes qemu-img check.
#[test]
fn deleting_middle_snapshots_of_a_running_guest_keeps_every_snapshot_and_its_data() {
    let env = Env::new();
    let disk = define_guest(&env);
    env.ok(&["start", env.vm]);
    env.sh("sh -c 'i=0; while :; do i=$((i+1)); echo $i >> /data/log; sync; sleep 0.05; done' >/dev/null 2>&1 &");
    let snap = |s: &str, extra: &[&str]| {
        env.sh(&format!("echo {s} > /data/f; sync"));
        let mut args = vec!["snapshot", "create", env.vm, s];
        args.extend(extra);
        env.ok(&args);
    };
    snap("e1", &["--disk-only"]);
    snap("e2", &["--external"]);
    snap("e3", &["--disk-only"]);
    snap("e4", &["--disk-only"]);
    env.ok(&["snapshot", "revert", env.vm, "e2"]);
    assert_eq!(env.sh("cat /data/f"), "e2");
    snap("b1", &["--disk-only"]);
    env.sh("echo now > /data/f; sync");
    assert_eq!(env.info("e2")["children"], serde_json::json!(["e3", "b1"]));
    assert_eq!(env.snap_file("e1"), disk.to_str().unwrap());

    // Each snapshot's frozen content, to compare with after every delete.
    let raw = |s: &str| env.dir.path().join(format!("{s}.raw"));
    let all = ["e1", "e2", "e3", "e4", "b1"];
    for s in all {
        let f = env.snap_file(s);
        qemu_img(&["convert", "-U", "-O", "raw", &f, raw(s).to_str().unwrap()]);
    }
    let log_is_whole = |env: &Env| {
        let log = env.sh("cat /data/log");
        let n: Vec<u64> = log.lines().map(|l| l.parse().unwrap()).collect();
        assert!(
            n.iter().enumerate().all(|(i, v)| *v == i as u64 + 1),
            "the guest's log has gaps or garbage: {log}"
        );
        n.len()
    };
    let mut seen = log_is_whole(&env);
    let mut check = |env: &Env, gone: &[&str]| {
        for s in all.iter().filter(|s| !gone.contains(s)) {
            let f = env.snap_file(s);
            same_as_raw(&f, &raw(s));
            qemu_img(&["check", "-U", &f]);
        }
        assert_eq!(env.sh("cat /data/f"), "now");
        let n = log_is_whole(env);
        assert!(n > seen, "the guest stopped writing ({n} lines)");
        seen = n;
    };
    check(&env, &[]);

    // A middle snapshot whose files only e4's (not open in QEMU) is built on.
    env.ok(&["snapshot", "delete", env.vm, "e3"]);
    assert_eq!(env.info("e4")["parent"], "e2");
    check(&env, &["e3"]);

    // The branch point e2, whose file lies under b1's in the running chain.
    let e2_file = env.snap_file("e2");
    env.ok(&["snapshot", "delete", env.vm, "e2"]);
    assert!(!Path::new(&e2_file).exists(), "the merged file was kept");
    assert_eq!(env.info("b1")["parent"], "e1");
    assert_eq!(env.info("e4")["parent"], "e1");
    check(&env, &["e3", "e2"]);

    // The current leaf b1: the active layer is committed into b1's file, which
    // the guest then writes.
    let b1_file = env.snap_file("b1");
    env.ok(&["snapshot", "delete", env.vm, "b1"]);
    assert_eq!(env.disks(), vec![b1_file.clone()]);
    check(&env, &["e3", "e2", "b1"]);

    // e1, now a branch point right under the active layer, on the user's disk:
    // the active layer takes its data and the disk itself is left alone.
    env.ok(&["snapshot", "delete", env.vm, "e1"]);
    assert_eq!(env.info("e4")["parent"], serde_json::Value::Null);
    check(&env, &["e3", "e2", "b1", "e1"]);
    for f in [&b1_file, &env.snap_file("e4")] {
        let info = qemu_img_json(&["info", "-U", "--output=json", f]);
        assert!(info.get("backing-filename").is_none(), "{f}: {info}");
    }
    same_as_raw(disk.to_str().unwrap(), &raw("e1"));

    // The remaining snapshot still reverts to its own content.
    env.ok(&["snapshot", "revert", env.vm, "e4", "--force"]);
    assert_eq!(env.sh("cat /data/f"), "e4");
    env.ok(&["stop", env.vm]);
    for f in env.vm_files() {
        qemu_img(&["check", f.to_str().unwrap()]);
    }
}

/// The running VM's monitor (see [`common::vm::monitor`]).
fn monitor(env: &Env) -> strata_qmp::Qmp {
    common::vm::monitor(&env.state().join("vms").join(env.vm))
}

/// qemu-io inside the running QEMU on the first disk (see [`common::vm::qemu_io_inside`]).
fn qemu_io_inside(env: &Env, cmd: &str) -> String {
    common::vm::qemu_io_inside(&env.state().join("vms").join(env.vm), cmd)
}

/// What a disk must show: slot `i` (4 KiB at `i` * 64 KiB) filled with byte
/// `model[i]` (0: never written).
fn reads(model: &[u8]) -> Vec<String> {
    model
        .iter()
        .enumerate()
        .map(|(i, p)| format!("read -P {p} {} 4k", i * 65536))
        .collect()
}

/// True when the image `file` (possibly in use) shows `model`.
fn file_shows(file: &str, model: &[u8]) -> bool {
    let cmds = reads(model);
    image_passes(
        file,
        "qcow2",
        &cmds.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

/// True when the image `file` of format `fmt` (possibly in use) passes the
/// qemu-io commands `cmds` (reads with patterns); a failure is printed.
fn image_passes(file: &str, fmt: &str, cmds: &[&str]) -> bool {
    let o = Command::new("qemu-io")
        .args(["-r", "-U", "-f", fmt])
        .args(cmds.iter().flat_map(|c| ["-c", c]))
        .arg(file)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let ok = o.status.success() && !out.contains("failed");
    if !ok {
        eprintln!(
            "qemu-io {file}: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    ok
}

/// True when VM `t`'s current disk shows `model` (a running QEMU flushes first;
/// no guest writes meanwhile).
fn current_shows(env: &Env, model: &[u8]) -> bool {
    if !env.ok(&["status", env.vm]).contains("state: stopped") {
        qemu_io_inside(env, "flush");
    }
    file_shows(&env.disks()[0], model)
}

/// A fault injected at a step: strata stopped dead there, or QEMU killed there
/// with strata going on.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Crash,
    KillQemu,
}

/// At every step of create (external disk-only, external full, internal full),
/// revert (external disk-only and full) and delete (current leaf: active commit;
/// middle: stream and rebase) of a running VM, strata stopped dead there and
/// QEMU killed there: the next command leaves no intent, every file the record
/// names exists and passes qemu-img check, strata's directory holds no file the
/// record does not name, each snapshot shows what the disk showed when it was
/// taken, and the current disk shows every write QEMU acknowledged (or, for a
/// revert that may have happened, the snapshot's content). A firmware-only VM
/// (no guest to boot) keeps each case short; writes go through QEMU's own
/// qemu-io on the active layer.
#[test]
fn faults_at_every_step_of_a_running_vm_leave_record_and_disks_in_agreement() {
    let env = Env::new();
    define_blank(&env, None);
    env.ok(&["start", env.vm]);

    // A block job running refuses a snapshot and changes nothing.
    let record = env.record();
    {
        let q = monitor(&env);
        q.execute_value(
            "blockdev-add",
            Some(serde_json::json!({"driver": "null-co", "node-name": "sink", "size": 16 << 20})),
        )
        .unwrap();
        q.execute_value(
            "blockdev-mirror",
            Some(serde_json::json!({"job-id": "mirror", "device": "disk0", "target": "sink", "sync": "full"})),
        )
        .unwrap();
        q.wait_block_job_ready("mirror", Duration::from_secs(60))
            .unwrap();
    }
    let e = env.fails(&["snapshot", "create", env.vm, "busy", "--disk-only"]);
    assert!(e.contains("block job running"), "{e}");
    assert_eq!(env.record(), record);
    assert!(env.vm_files().is_empty());
    monitor(&env)
        .execute_value("job-cancel", Some(serde_json::json!({"id": "mirror"})))
        .unwrap();

    let mut current: Vec<u8> = Vec::new();
    let mut snaps: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    let ensure_running = |env: &Env| {
        if env.ok(&["status", env.vm]).contains("state: stopped") {
            env.ok(&["start", env.vm]);
        }
    };
    // An acknowledged write of a new slot (flushed), into the model.
    let write = |env: &Env, current: &mut Vec<u8>| {
        let p = current.len() as u8 + 1;
        let out = qemu_io_inside(env, &format!("write -P {p} {} 4k", current.len() * 65536));
        assert!(!out.contains("failed"), "{out}");
        qemu_io_inside(env, "flush");
        current.push(p);
    };
    let mut cases = 0;
    let matrix: &[(&str, &[&str])] = &[
        ("create-disk", &["create-overlays", "create-done"]),
        ("create-full", &["create-overlays", "create-done"]),
        ("revert-disk", &["revert-overlays"]),
        ("revert-full", &["revert-overlays"]),
        ("delete-leaf", &["delete-merged"]),
        ("delete-middle", &["merge-streamed", "merge-rebased"]),
        ("create-internal", &["create-done"]),
    ];
    for (op, steps) in matrix {
        for step in *steps {
            for fault in [Fault::Crash, Fault::KillQemu] {
                let what = format!("{op} at {step} ({fault:?})");
                ensure_running(&env);
                write(&env, &mut current);
                let n = format!("s{cases}");
                let mut create = |env: &Env, name: &str, kind: &str, current: &mut Vec<u8>| {
                    env.ok(&["snapshot", "create", env.vm, name, kind]);
                    snaps.insert(name.to_string(), current.clone());
                    ensure_running(env);
                    write(env, current);
                };
                let args: Vec<String> = match *op {
                    "create-disk" => vec!["create".into(), n.clone(), "--disk-only".into()],
                    "create-full" => vec!["create".into(), n.clone(), "--external".into()],
                    "create-internal" => vec!["create".into(), n.clone(), "--internal".into()],
                    "revert-disk" | "revert-full" => {
                        let kind = if *op == "revert-disk" {
                            "--disk-only"
                        } else {
                            "--external"
                        };
                        create(&env, &n, kind, &mut current);
                        vec!["revert".into(), n.clone(), "--force".into()]
                    }
                    "delete-leaf" => {
                        create(&env, &n, "--disk-only", &mut current);
                        vec!["delete".into(), n.clone()]
                    }
                    _ => {
                        // n with a child whose files QEMU does not have open, and
                        // the active layer reverted onto n's files.
                        create(&env, &n, "--disk-only", &mut current);
                        create(&env, &format!("{n}x"), "--disk-only", &mut current);
                        env.ok(&["snapshot", "revert", env.vm, &n, "--force"]);
                        current = snaps[&n].clone();
                        write(&env, &mut current);
                        vec!["delete".into(), n.clone()]
                    }
                };
                let mut full = vec!["snapshot", args[0].as_str(), env.vm];
                full.extend(args[1..].iter().map(String::as_str));
                let acked = match fault {
                    Fault::Crash => {
                        env.crash_at(step, &full);
                        false
                    }
                    Fault::KillQemu => env
                        .cmd(&full)
                        .env("STRATA_VM_KILL_QEMU_AT", *step)
                        .status()
                        .unwrap()
                        .success(),
                };
                env.ok(&["status", env.vm]);

                // Record and files agree.
                let rec: serde_json::Value = serde_json::from_slice(&env.record()).unwrap();
                assert!(rec.get("intent").is_none(), "{what}: intent left: {rec}");
                let mut named: Vec<PathBuf> = env.disks().iter().map(PathBuf::from).collect();
                for s in rec["snapshots"].as_array().unwrap() {
                    for d in s["disks"].as_array().unwrap() {
                        named.push(PathBuf::from(d["file"].as_str().unwrap()));
                    }
                    if let Some(m) = s["memory_file"].as_str() {
                        named.push(PathBuf::from(m));
                    }
                }
                for f in env.vm_files() {
                    assert!(
                        named.contains(&f),
                        "{what}: {} is named nowhere",
                        f.display()
                    );
                }
                let running = !env.ok(&["status", env.vm]).contains("state: stopped");
                if running {
                    qemu_io_inside(&env, "flush");
                }
                for f in named
                    .iter()
                    .filter(|f| f.extension().is_some_and(|e| e == "qcow2"))
                {
                    assert!(f.is_file(), "{what}: {} is gone", f.display());
                    check_at_most_leaks(f);
                }

                // Nothing acknowledged is lost; the operation happened or not.
                let present: Vec<String> = rec["snapshots"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["name"].as_str().unwrap().to_string())
                    .collect();
                if op.starts_with("create") {
                    if present.contains(&n) {
                        snaps.insert(n.clone(), current.clone());
                    } else {
                        assert!(!acked, "{what}: acknowledged but not recorded");
                    }
                }
                if op.starts_with("delete") {
                    if present.contains(&n) {
                        assert!(!acked, "{what}: acknowledged but still recorded");
                    } else {
                        snaps.remove(&n);
                    }
                }
                let reverted = op.starts_with("revert") && rec["current"] == n.as_str() && {
                    let target = snaps[&n].clone();
                    current_shows(&env, &target)
                };
                if reverted {
                    current = snaps[&n].clone();
                } else {
                    assert!(
                        !(acked && op.starts_with("revert")),
                        "{what}: acknowledged revert not done"
                    );
                }
                assert!(
                    current_shows(&env, &current),
                    "{what}: the current disk lost data"
                );
                for (name, model) in &snaps {
                    let s = rec["snapshots"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|s| s["name"] == name.as_str())
                        .unwrap_or_else(|| panic!("{what}: snapshot {name} lost"));
                    if s["kind"] == "external" {
                        let f = s["disks"][0]["file"].as_str().unwrap();
                        assert!(file_shows(f, model), "{what}: snapshot {name} changed");
                    }
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 20);
    ensure_running(&env);
    env.ok(&["stop", env.vm, "--timeout", "1"]);
    for f in env
        .vm_files()
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "qcow2"))
    {
        check_at_most_leaks(f);
    }
}

/// A memory snapshot that fails after its disks switched, while QEMU finishes
/// the memory save, is undone with the save ended first: the finished save
/// makes the disks inactive, and before it was awaited the guest was resumed
/// under it and the merge back onto the old disk was refused ("Inactive ...
/// can't be a backing child of active"), leaving QEMU to abort at the
/// guest's next write. Now the guest runs on its old disk, writes and reads
/// it, and a later snapshot's merge (a block-commit) is accepted.
#[test]
fn a_memory_snapshot_failing_after_its_disks_switched_leaves_the_guest_running_on_active_disks() {
    let env = Env::new();
    define_blank(&env, None);
    env.ok(&["start", env.vm]);
    let disk = env.disks();
    let mut model = vec![7u8];
    qemu_io_inside(&env, "write -P 7 0 4k");
    qemu_io_inside(&env, "flush");
    let record = env.record();

    let o = env
        .cmd(&["snapshot", "create", env.vm, "f", "--external"])
        .env("STRATA_VM_FAIL_AT", "memory-continued")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("memory-continued"),
        "{err}"
    );
    assert_eq!(env.record(), record, "{err}");
    assert_eq!(env.vm_files(), Vec::<PathBuf>::new());
    assert!(env.ok(&["status", env.vm]).contains("state: running"));
    assert_eq!(env.disks(), disk);

    // The guest writes again (an inactive disk would make QEMU abort).
    let out = qemu_io_inside(&env, "write -P 8 65536 4k");
    assert!(!out.contains("failed"), "{out}");
    model.push(8);
    assert!(current_shows(&env, &model));

    // A merge needs the disks active: a disk-only snapshot, then its delete.
    env.ok(&["snapshot", "create", env.vm, "d", "--disk-only"]);
    qemu_io_inside(&env, "write -P 9 131072 4k");
    model.push(9);
    env.ok(&["snapshot", "delete", env.vm, "d"]);
    assert_eq!(env.disks(), disk);
    assert!(current_shows(&env, &model));
    env.ok(&["stop", env.vm, "--timeout", "1"]);
    check_at_most_leaks(Path::new(&disk[0]));
}

/// `qemu-img check` finds `file` clean or with leaked clusters only (exit 0 or
/// 3): what a QEMU killed while it wrote may leave, never a corruption.
fn check_at_most_leaks(file: &Path) {
    let o = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        matches!(o.status.code(), Some(0 | 3)),
        "qemu-img check {}: {}{}",
        file.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Live block jobs on a running VM (firmware only, writes through QEMU):
/// commit into a user's backing file, with and without pivot; copy to a new
/// image, with and without pivot (the definition follows); pull into an overlay
/// a snapshot froze the file below of; commit refused into a snapshot's file; a
/// second job refused while one runs; `cancel` ends a job left running.
#[test]
fn block_jobs_commit_pull_and_copy_a_running_vms_disk() {
    let env = Env::new();
    let dir = env.dir.path();
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", b, "16M"]);
    qemu_io(b, &["write -P 0x11 0 64k"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
    qemu_io(t, &["write -P 0x22 64k 64k"]);
    env.ok(&["define", env.vm, "--memory", "64M", "--disk", t]);
    env.ok(&["start", env.vm]);
    let write = |p: u8, off: &str| {
        qemu_io_inside(&env, &format!("write -P {p} {off} 64k"));
        qemu_io_inside(&env, "flush");
    };
    write(0x33, "128k");
    let view = [
        "read -P 0x11 0 64k",
        "read -P 0x22 64k 64k",
        "read -P 0x33 128k 64k",
    ];

    // Commit without pivot: the backing file takes the data, the VM stays.
    env.ok(&["blockjob", "commit", env.vm]);
    assert_eq!(env.disks(), vec![t.to_string()]);
    let readonly_view = |f: &str, cmds: &[&str]| assert!(image_passes(f, "qcow2", cmds), "{f}");
    readonly_view(b, &view);
    // With pivot: the VM runs on the backing file; the definition says so.
    write(0x44, "192k");
    env.ok(&["blockjob", "commit", env.vm, "--pivot"]);
    assert_eq!(env.disks(), vec![b.to_string()]);
    write(0x55, "256k");
    let view2 = [
        &view[..],
        &["read -P 0x44 192k 64k", "read -P 0x55 256k 64k"],
    ]
    .concat();
    qemu_io_inside(&env, "flush");
    readonly_view(b, &view2);
    assert!(top.is_file(), "the user's overlay was removed");
    let e = env.fails(&["blockjob", "commit", env.vm]);
    assert!(e.contains("no backing file"), "{e}");
    let e = env.fails(&["blockjob", "pull", env.vm, "--disk", "3"]);
    assert!(e.contains("has no disk 3"), "{e}");

    // Copy: without pivot a consistent copy, the VM stays; with pivot it moves.
    let c1 = dir.join("c1.qcow2");
    env.ok(&["blockjob", "copy", env.vm, c1.to_str().unwrap()]);
    assert_eq!(env.disks(), vec![b.to_string()]);
    readonly_view(c1.to_str().unwrap(), &view2);
    let e = env.fails(&["blockjob", "copy", env.vm, c1.to_str().unwrap()]);
    assert!(e.contains("exists already"), "{e}");
    let c2 = dir.join("c2.raw");
    let c2s = c2.to_str().unwrap();
    env.ok(&[
        "blockjob", "copy", env.vm, c2s, "--format", "raw", "--pivot",
    ]);
    assert_eq!(env.disks(), vec![c2s.to_string()]);
    assert!(env
        .ok(&["status", env.vm])
        .contains(&format!("disk0: {c2s} (raw)")));
    write(0x66, "320k");
    let view3 = [&view2[..], &["read -P 0x66 320k 64k"]].concat();
    assert!(image_passes(c2s, "raw", &view3));

    // A snapshot freezes c2: commit into it is refused; pull makes the overlay
    // stand alone and leaves the snapshot's file as it was.
    env.ok(&["snapshot", "create", env.vm, "s", "--disk-only"]);
    write(0x77, "384k");
    let record = env.record();
    let e = env.fails(&["blockjob", "commit", env.vm, "--pivot"]);
    assert!(e.contains("holds snapshot 's'"), "{e}");
    assert_eq!(env.record(), record);
    env.ok(&["blockjob", "pull", env.vm]);
    let ov = env.disks()[0].clone();
    let info = qemu_img_json(&["info", "-U", "--output=json", &ov]);
    assert!(info.get("backing-filename").is_none(), "{info}");
    qemu_io_inside(&env, "flush");
    let view4 = [&view3[..], &["read -P 0x77 384k 64k"]].concat();
    readonly_view(&ov, &view4);
    // The current snapshot's files no longer lie under the disk: deleting it
    // only forgets it, the VM keeps its disk and data.
    env.ok(&["snapshot", "delete", env.vm, "s"]);
    assert_eq!(env.disks(), vec![ov.clone()]);
    qemu_io_inside(&env, "flush");
    readonly_view(&ov, &view4);
    assert!(image_passes(c2s, "raw", &view3));

    // A job left running (here one of the test's own) refuses another; cancel
    // ends it.
    {
        let q = monitor(&env);
        q.execute_value(
            "blockdev-add",
            Some(serde_json::json!({"driver": "null-co", "node-name": "sink", "size": 16 << 20})),
        )
        .unwrap();
        let disk0 = q.execute_value("query-block", None).unwrap()[0]["inserted"]["node-name"]
            .as_str()
            .unwrap()
            .to_string();
        q.execute_value(
            "blockdev-mirror",
            Some(serde_json::json!({"job-id": "left", "device": disk0, "target": "sink", "sync": "full"})),
        )
        .unwrap();
    }
    let e = env.fails(&["blockjob", "pull", env.vm]);
    assert!(e.contains("has a job running"), "{e}");
    assert!(env
        .ok(&["blockjob", "cancel", env.vm])
        .contains("1 job(s) cancelled"));
    let jobs = monitor(&env).execute_value("query-jobs", None).unwrap();
    assert_eq!(jobs, serde_json::json!([]));
    env.ok(&["kill", env.vm]);
    for f in [b, t, &ov, c1.to_str().unwrap()] {
        qemu_img(&["check", f]);
    }
}

/// The `restore state:` line of `vm status` (empty once the disk is local).
fn restore_state(env: &Env) -> String {
    let status = env.ok(&["status", env.vm]);
    status
        .lines()
        .find_map(|l| l.strip_prefix("restore state: "))
        .unwrap_or_default()
        .to_string()
}

/// 64 KiB clusters of two raw files of the same size: (how many differ, how
/// many are the same and not all zero).
fn cluster_diff(a: &Path, b: &Path) -> (usize, usize) {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len());
    let mut out = (0, 0);
    for (x, y) in a.chunks(64 << 10).zip(b.chunks(64 << 10)) {
        if x != y {
            out.0 += 1;
        } else if x.iter().any(|&v| v != 0) {
            out.1 += 1;
        }
    }
    out
}

/// Instant restore of the test guest's lost disk: the guest boots from the
/// backup and reads a file it had written before the stream is done (the
/// stream is slowed by its speed limit), writes a new one, and rides out
/// faults: gc refused while the backup is served, the server killed (the
/// guest's reads of what is not restored yet fail, status says what to do,
/// `start` serves again and the same guest reads on), the VM stopped midway
/// (start streams the rest), strata killed right after starting QEMU (the next
/// command starts the stream). Once the stream completes the disk has no
/// backing file and checks clean, it differs from the backup restored at rest
/// only in the few clusters the guest wrote, and a reboot reads both files.
#[test]
fn an_instant_restore_runs_the_guest_at_once_and_rides_out_faults_until_the_disk_is_local() {
    use common::restic::{run, s, strata, PASSWORD};
    let env = Env::new();
    let disk = define_guest(&env);
    let d = s(&disk).to_string();
    let dir = env.dir.path();
    let vm_dir = env.state().join("vms").join(env.vm);
    let (repo, password) = (dir.join("repo"), dir.join("password"));
    std::fs::write(&password, PASSWORD).unwrap();

    env.ok(&["start", env.vm]);
    env.sh("echo before-backup > /data/marker; dd if=/dev/urandom of=/data/big bs=64k count=128 2>/dev/null; sync");
    let big_sum = env.sh("md5sum /data/big");
    env.ok(&["stop", env.vm]);
    run(strata(&["init", "--repo", s(&repo)]));
    run(strata(&["create", "--repo", s(&repo), &d]));
    let at_rest = dir.join("at-rest.qcow2");
    run(strata(&[
        "restore",
        "--repo",
        s(&repo),
        "latest",
        s(&at_rest),
        "-O",
        "qcow2",
    ]));
    std::fs::remove_file(&disk).unwrap();

    // The password comes from the file, recorded for the servers `start` runs.
    let out = run(strata(&[
        "restore",
        "--repo",
        s(&repo),
        "--password-file",
        s(&password),
        "latest",
        &d,
        "--vm",
        env.vm,
        "--instant",
        "--speed",
        "256k",
        "--state-dir",
        s(&env.state()),
    ])
    .env_remove("STRATA_PASSWORD"));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("started on"),
        "{out:?}"
    );
    assert_eq!(env.sh("cat /data/marker"), "before-backup");
    let state = restore_state(&env);
    let (done, total): (u64, u64) = {
        let nums: Vec<u64> = state
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse().ok())
            .collect();
        (nums[0], nums[1])
    };
    assert!(
        state.starts_with("streaming") && done < total,
        "the guest read its file only after the stream: {state}"
    );
    env.sh("echo during-restore > /data/new; sync");

    // gc while the backup is served is held off by the server's lock.
    let gc = strata(&["gc", "--repo", s(&repo)]).output().unwrap();
    let err = String::from_utf8_lossy(&gc.stderr);
    assert!(!gc.status.success() && err.contains("locked"), "{err}");

    // The server dies: data not restored yet (the disk's end) cannot be read.
    let pid = std::fs::read_to_string(vm_dir.join("restore.pid")).unwrap();
    let killed = Command::new("kill")
        .args(["-9", pid.trim()])
        .status()
        .unwrap();
    assert!(killed.success());
    let read_end = [
        "exec",
        env.vm,
        "--",
        "/bin/sh",
        "-c",
        "dd if=/dev/vda of=/dev/null bs=64k skip=1010 count=4",
    ];
    let o = env.run(&read_end);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("Input/output error"),
        "a read of data not restored, with the server gone: {err}"
    );
    let state = restore_state(&env);
    assert!(state.contains("`start`"), "{state}");
    let e = env.fails(&["blockjob", "wait", env.vm]);
    assert!(
        e.contains("I/O errors") && e.contains("strata vm start t"),
        "{e}"
    );
    // `start` on the running VM serves again; the same guest reads on.
    env.ok(&["start", env.vm]);
    env.ok(&read_end);
    assert!(restore_state(&env).starts_with("streaming"));

    // Stopped midway: the server goes with QEMU, the next start streams the rest.
    env.ok(&["stop", env.vm]);
    assert!(
        !vm_dir.join("restore.pid").exists(),
        "the server outlived QEMU"
    );
    assert!(restore_state(&env).contains("the VM is stopped"));
    // strata killed after starting QEMU, before the stream: the next command
    // starts it.
    env.crash_at("restore-launched", &["start", env.vm]);
    assert!(restore_state(&env).starts_with("streaming"));
    let jobs = monitor(&env).execute_value("query-jobs", None).unwrap();
    assert_eq!(jobs[0]["id"], "restore-disk0", "{jobs}");
    assert_eq!(jobs[0]["status"], "running", "{jobs}");
    assert_eq!(
        env.sh("cat /data/marker /data/new"),
        "before-backup\nduring-restore"
    );

    // No limit from now on; the wait ends with the disk local.
    env.ok(&["blockjob", "wait", env.vm, "--speed", "0"]);
    assert_eq!(restore_state(&env), "");
    let info = qemu_img_json(&["info", "-U", "--output=json", &d]);
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert!(!vm_dir.join("restore.pid").exists());
    assert!(!vm_dir.join("restore.sock").exists());
    assert_eq!(env.sh("md5sum /data/big"), big_sum);
    env.ok(&["stop", env.vm]);
    qemu_img(&["check", &d]);

    // The backup's clusters are all there; only the guest's writes differ.
    let (ours, theirs) = (dir.join("restored.raw"), dir.join("at-rest.raw"));
    qemu_img(&["convert", "-O", "raw", &d, s(&ours)]);
    qemu_img(&["convert", "-O", "raw", s(&at_rest), s(&theirs)]);
    let (differ, same_data) = cluster_diff(&ours, &theirs);
    eprintln!("clusters: {differ} differ, {same_data} hold the same data");
    assert!(differ > 0 && differ <= 64, "{differ} clusters differ");
    assert!(same_data >= 128, "only {same_data} clusters of data agree");

    env.ok(&["start", env.vm]);
    assert_eq!(
        env.sh("cat /data/marker /data/new"),
        "before-backup\nduring-restore"
    );
    assert_eq!(env.sh("md5sum /data/big"), big_sum);
}

/// Instant restore of both disks of a two-disk VM at once (the test guest's
/// disk and a data disk holding a pattern), each from its own backup: one
/// server serves both snapshots, the guest boots and reads both disks while
/// each streams in its own job, and once the wait ends both disks stand
/// alone, check clean, the server is gone and the data disk holds exactly the
/// bytes backed up.
#[test]
fn an_instant_restore_of_two_disks_serves_both_from_one_server_and_finishes_each_stream() {
    use common::restic::{run, s, saved_id, stdout, strata};
    let env = Env::new();
    let dir = env.dir.path();
    let extra = dir.join("extra.qcow2");
    let e = s(&extra).to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &e, "8M"]);
    qemu_io(&e, &["write -P 0x5a 0 3M", "write -P 0xa5 5M 3M"]);
    let disk = define_guest_with(&env, &[&e]);
    let d = s(&disk).to_string();
    let backed_up = dir.join("extra-backed-up.raw");
    qemu_img(&["convert", "-O", "raw", &e, s(&backed_up)]);

    let repo = dir.join("repo");
    run(strata(&["init", "--repo", s(&repo)]));
    let saved = |file: &str| saved_id(&run(strata(&["create", "--repo", s(&repo), file])));
    let (snap0, snap1) = (saved(&d), saved(&e));
    std::fs::remove_file(&disk).unwrap();
    std::fs::remove_file(&extra).unwrap();

    let also = format!("1:{snap1}:{e}");
    let out = run(strata(&[
        "restore",
        "--repo",
        s(&repo),
        &snap0,
        &d,
        "--vm",
        env.vm,
        "--instant",
        "--also-disk",
        &also,
        "--speed",
        "256k",
        "--state-dir",
        s(&env.state()),
    ]));
    assert!(stdout(&out).contains("disk 1 ("), "{out:?}");
    // Both read while streaming: the guest's files and the pattern's end.
    assert_eq!(env.sh("cat /data/README"), "strata test guest data disk");
    let end = "dd if=/dev/vdb bs=64k skip=127 count=1 2>/dev/null";
    let counts = env.sh(&format!("{end} | wc -c; {end} | tr -d '\\245' | wc -c"));
    assert_eq!(
        counts.split_whitespace().collect::<Vec<_>>(),
        ["65536", "0"],
        "the data disk's last 64 KiB are not all 0xa5"
    );
    let status = env.ok(&["status", env.vm]);
    let streaming = status
        .lines()
        .filter(|l| l.starts_with("restore state: streaming"))
        .count();
    assert_eq!(streaming, 2, "{status}");
    let jobs = monitor(&env).execute_value("query-jobs", None).unwrap();
    let mut ids: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["restore-disk0", "restore-disk1"], "{jobs}");
    // One server, serving both snapshots.
    let vm_dir = env.state().join("vms").join(env.vm);
    let pid = std::fs::read_to_string(vm_dir.join("restore.pid")).unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    for x in ["restore-disk0", "restore-disk1", &snap0, &snap1] {
        assert!(args.iter().any(|a| a.starts_with(x)), "{x} not in {args:?}");
    }

    env.ok(&["blockjob", "wait", env.vm, "--speed", "0"]);
    assert_eq!(restore_state(&env), "");
    assert!(!vm_dir.join("restore.pid").exists());
    for f in [&d, &e] {
        let info = qemu_img_json(&["info", "-U", "--output=json", f]);
        assert!(info.get("backing-filename").is_none(), "{info}");
    }
    assert_eq!(env.sh("cat /data/README"), "strata test guest data disk");
    env.ok(&["stop", env.vm]);
    qemu_img(&["check", &d]);
    qemu_img(&["check", &e]);
    same_as_raw(&e, &backed_up);
}

/// Instant restore from a backup in S3-compatible storage (a real Garage
/// node): the server the restore starts reads the bucket, the export it serves
/// reads back as the backed-up disk while the stream runs, and the stream
/// completes into a local image holding the same bytes.
#[test]
fn an_instant_restore_from_an_s3_repository_serves_the_disk_and_streams_it_whole() {
    use common::garage::Garage;
    use common::restic::{noise, run, s, saved_id, strata, MIB};
    let g = Garage::start(1);
    let env = Env::new();
    let dir = env.dir.path();
    let on = |mut c: Command| {
        g.credentials(&mut c);
        c
    };
    let repo = g.repo(0, "instant");
    let raw = dir.join("disk.raw");
    let mut data = noise(2 * MIB);
    data.resize(6 * MIB, 0);
    data.extend(b"served from s3 ".iter().cycle().take(2 * MIB));
    std::fs::write(&raw, &data).unwrap();
    run(on(strata(&["init", "--repo", &repo])));
    let id = saved_id(&run(on(strata(&["create", "--repo", &repo, s(&raw)]))));

    define_blank(&env, None);
    let restored = dir.join("restored.qcow2");
    run(on(strata(&[
        "restore",
        "--repo",
        &repo,
        &id,
        s(&restored),
        "--vm",
        env.vm,
        "--instant",
        "--speed",
        "1M",
        "--state-dir",
        s(&env.state()),
    ])));
    assert!(restore_state(&env).starts_with("streaming"));
    // The export, read whole over the server's socket, is the disk.
    let sock = env.state().join("vms").join(env.vm).join("restore.sock");
    let export = format!("nbd+unix:///restore-disk0?socket={}", s(&sock));
    qemu_img(&["compare", "-f", "raw", "-F", "raw", &export, s(&raw)]);

    env.ok(&["blockjob", "wait", env.vm, "--speed", "0"]);
    assert_eq!(restore_state(&env), "");
    env.ok(&["kill", env.vm]);
    let info = qemu_img_json(&["info", "--output=json", s(&restored)]);
    assert!(info.get("backing-filename").is_none(), "{info}");
    qemu_img(&["check", s(&restored)]);
    same_as_raw(s(&restored), &raw);
}
