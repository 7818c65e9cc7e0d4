//! Images of a running test guest's disk and VMs deployed from them, end to
//! end through the CLI (the real guest under QEMU, TCG unless KVM really
//! works; two boots): a file written in the guest is in the image made from
//! an internal snapshot and in the image made live (quiesced) from the
//! running VM, each equal to its source point (`qemu-img compare`) and clean
//! (`qemu-img check`); a new VM on a thin clone of the live image boots and
//! reads the file through its agent, while the cached base keeps its sha512
//! after the clone writes; deleting the image is refused while the clone
//! reads it; a full copy equals the image; a tampered cache is refused; a
//! failed or killed build leaves the image `killed`, the guest thawed and
//! running, and the VM's snapshot tree as it was.

mod common;

use common::restic::{run, stdout};
use common::vm::crashed_at;
use common::STRATA;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use strata_qmp::testing::TestGuest;

/// A state directory; its VMs are killed when this is dropped.
struct State {
    dir: tempfile::TempDir,
    vms: Vec<&'static str>,
}

impl State {
    fn root(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    fn cmd(&self, what: &str, args: &[&str]) -> Command {
        let mut c = Command::new(STRATA);
        c.arg(what).arg("--state-dir").arg(self.root()).args(args);
        c
    }
    fn vm(&self, args: &[&str]) -> String {
        stdout(&run(self.cmd("vm", args)))
    }
    fn image(&self, args: &[&str]) -> String {
        stdout(&run(self.cmd("image", args)))
    }
    /// Run `strata WHAT ARGS`, require failure, return stderr.
    fn fails(&self, what: &str, args: &[&str]) -> String {
        let o: Output = self.cmd(what, args).output().unwrap();
        assert!(!o.status.success(), "strata {what} {args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    }
    /// A shell command in VM `vm`'s guest; its stdout, trimmed.
    fn sh(&self, vm: &str, script: &str) -> String {
        self.vm(&["exec", vm, "--", "/bin/sh", "-c", script])
            .trim()
            .to_string()
    }
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--output=json");
        serde_json::from_str(&self.image(&a)).unwrap()
    }
    /// Define VM `name` running the test guest on `disks` (define options).
    fn define(&mut self, name: &'static str, disks: &[&str]) {
        let guest = TestGuest::ensure().unwrap();
        let mut args = vec!["define", name, "--memory", "256M"];
        args.extend_from_slice(disks);
        let (k, i) = (guest.kernel(), guest.initrd());
        args.extend([
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            i.to_str().unwrap(),
            "--append",
            "console=ttyS0 panic=-1 quiet",
        ]);
        self.vm(&args);
        self.vms.push(name);
    }
    fn record(&self, vm: &str) -> serde_json::Value {
        let p = self.root().join("vms").join(vm).join("vm.json");
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    }
}

impl Drop for State {
    fn drop(&mut self) {
        for vm in &self.vms {
            let _ = self.cmd("vm", &["kill", vm]).output();
        }
    }
}

fn qemu_img(args: &[&str]) -> String {
    stdout(&common::restic::qemu_img(args))
}

fn sha512(file: &Path) -> String {
    let out = stdout(&run(Command::new("sha512sum").arg(file)));
    out.split_whitespace().next().unwrap().to_string()
}

/// The image's data file and its record.
fn image_data(st: &State, id: &str) -> (PathBuf, serde_json::Value) {
    let rec = st.json(&["show", id]);
    assert_eq!(rec["status"], "active", "{rec}");
    (st.root().join("images").join(format!("{id}.data")), rec)
}

/// An active image made by `args` must be a clean standalone qcow2 whose
/// sha512 is the recorded one; returns its ID and data file.
fn made_image(st: &State, args: &[&str]) -> (String, PathBuf) {
    let mut a = args.to_vec();
    a.push("--output=json");
    let rec: serde_json::Value = serde_json::from_str(&st.image(&a)).unwrap();
    let id = rec["id"].as_str().unwrap().to_string();
    let (data, rec) = image_data(st, &id);
    assert_eq!(rec["disk_format"], "qcow2");
    assert_eq!(rec["os_hash_value"].as_str().unwrap(), sha512(&data));
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        data.to_str().unwrap(),
    ]))
    .unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    qemu_img(&["check", data.to_str().unwrap()]);
    (id, data)
}

/// No image is being built, and image `id` ended `killed`.
fn killed(st: &State, id: &str) {
    assert_eq!(st.json(&["show", id])["status"], "killed");
    let builds: Vec<_> = std::fs::read_dir(st.root().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".build"))
        .collect();
    assert!(builds.is_empty(), "build files left: {builds:?}");
}

/// The ID of the newest image named `name`.
fn id_named(st: &State, name: &str) -> String {
    let list = st.json(&["list", "--name", name]);
    list[0]["id"].as_str().unwrap().to_string()
}

#[test]
fn images_of_a_running_guest_deploy_thin_clones_that_boot_and_see_its_files() {
    let mut st = State {
        dir: tempfile::tempdir().unwrap(),
        vms: Vec::new(),
    };
    let guest = TestGuest::ensure().unwrap();
    let disk = st.dir.path().join("src.qcow2");
    guest.copy_data_disk(&disk).unwrap();
    let d = disk.to_str().unwrap().to_string();
    st.define("src", &["--disk", &d]);
    st.vm(&["start", "src"]);
    st.sh("src", "echo before-snapshot > /data/marker; sync");

    // From an internal snapshot (with memory) of the running guest: the image
    // equals the disk at the snapshot, not the disk after it.
    st.vm(&["snapshot", "create", "src", "s1"]);
    st.sh("src", "echo after-snapshot > /data/marker; sync");
    let (snap_id, snap_data) = made_image(
        &st,
        &["create-from-snapshot", "src", "s1", "--name", "at-s1"],
    );
    let at_s1 = st.dir.path().join("at-s1.raw");
    let at = at_s1.to_str().unwrap();
    qemu_img(&[
        "convert",
        "-U",
        "-l",
        "snapshot.name=s1",
        "-O",
        "raw",
        &d,
        at,
    ]);
    qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        snap_data.to_str().unwrap(),
        at,
    ]);
    std::fs::remove_file(&at_s1).unwrap();
    let tree = st.record("src")["snapshots"].clone();

    // A failed build leaves its image killed and the VM as it was.
    let err = st.fails(
        "image",
        &["create-from-snapshot", "src", "nosuch", "--name", "bad"],
    );
    assert!(err.contains("no snapshot 'nosuch'"), "{err}");
    killed(&st, &id_named(&st, "bad"));

    // A build killed while the quiesced point is held: the next registry open
    // turns the image killed; the next VM command thaws the guest.
    crashed_at(
        st.cmd(
            "image",
            &["create-from-vm", "src", "--quiesce", "--name", "cut"],
        ),
        "backup-point",
    );
    killed(&st, &id_named(&st, "cut"));
    st.sh("src", "echo live > /data/marker; sync");

    // Live while the guest runs: with the guest's filesystems frozen by the
    // test (so the disk holds still), the image equals the running disk.
    let mut agent = strata_qmp::Agent::connect(
        &st.root().join("vms/src/agent.sock"),
        std::time::Duration::from_secs(30),
    )
    .unwrap();
    assert!(agent.fsfreeze_freeze().unwrap() >= 1);
    let (_, frozen_data) = made_image(&st, &["create-from-vm", "src", "--name", "frozen"]);
    qemu_img(&["compare", "-U", frozen_data.to_str().unwrap(), &d]);
    agent.fsfreeze_thaw().unwrap();
    drop(agent);

    // Quiesced by strata: the guest is thawed after (it writes and syncs),
    // the VM still runs with the same snapshot tree and no job left in QEMU.
    let (live_id, _) = made_image(
        &st,
        &["create-from-vm", "src", "--quiesce", "--name", "golden"],
    );
    st.vm(&[
        "exec",
        "src",
        "--timeout",
        "60",
        "--",
        "/bin/sh",
        "-c",
        "touch /data/thawed; sync",
    ]);
    assert!(st.vm(&["status", "src"]).contains("state: running"));
    assert_eq!(st.record("src")["snapshots"], tree);
    assert_eq!(st.record("src")["intent"], serde_json::Value::Null);
    let qmp = common::vm::monitor(&st.root().join("vms/src"));
    assert_eq!(
        qmp.execute_value("query-jobs", None).unwrap(),
        serde_json::json!([])
    );
    drop(qmp);
    st.vm(&["kill", "src"]);

    // A thin clone: an overlay in the VM's directory on the read-only cache.
    st.define("clone", &["--disk-from-image", "golden"]);
    let clone_disk = st.record("clone")["def"]["disks"][0]["file"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        clone_disk.starts_with(st.root().join("vms/clone").to_str().unwrap()),
        "{clone_disk}"
    );
    let cache = st
        .root()
        .join("image-cache")
        .join(format!("{live_id}.qcow2"));
    let info: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", &clone_disk])).unwrap();
    assert_eq!(
        info["full-backing-filename"].as_str().unwrap(),
        cache.canonicalize().unwrap().to_str().unwrap()
    );
    assert!(std::fs::metadata(&cache).unwrap().permissions().readonly());
    st.vm(&["start", "clone"]);
    assert_eq!(st.sh("clone", "cat /data/marker"), "live");
    st.sh(
        "clone",
        "echo clone > /data/marker; dd if=/dev/urandom of=/data/noise bs=64k count=32; sync",
    );
    assert_eq!(st.sh("clone", "cat /data/marker"), "clone");
    let (_, live_rec) = image_data(&st, &live_id);
    assert_eq!(sha512(&cache), live_rec["os_hash_value"].as_str().unwrap());
    qemu_img(&["check", "-U", &clone_disk]);

    // The clone reads the image: deleting it is refused.
    let err = st.fails("image", &["delete", &live_id]);
    assert!(
        err.contains("in use") && err.contains("VM 'clone'"),
        "{err}"
    );
    st.json(&["show", &live_id]);

    // A full copy of the snapshot's image is that image, standing alone.
    st.vm(&[
        "define",
        "copy",
        "--disk-from-image",
        &format!("{snap_id},clone=copy"),
    ]);
    let copy_disk = st.record("copy")["def"]["disks"][0]["file"]
        .as_str()
        .unwrap()
        .to_string();
    qemu_img(&["compare", &copy_disk, snap_data.to_str().unwrap()]);

    // Bytes of the cache changed behind strata's back: no new clone on it,
    // nothing defined, nothing left.
    st.vm(&["kill", "clone"]);
    let mut perm = std::fs::metadata(&cache).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&cache, perm).unwrap();
    let mut bytes = std::fs::read(&cache).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&cache, bytes).unwrap();
    let err = st.fails("vm", &["define", "again", "--disk-from-image", "golden"]);
    assert!(err.contains("does not match the image's sha512"), "{err}");
    assert!(!st.root().join("vms/again/vm.json").exists());
    let left = st.root().join("vms/again/disks");
    assert!(
        std::fs::read_dir(&left).map_or(true, |mut d| d.next().is_none()),
        "files left in {}",
        left.display()
    );
}
