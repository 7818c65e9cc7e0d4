//! The image cache that thin clones rest on, through the CLI (no guest boots:
//! defining and undefining VMs is enough): a forced delete keeps the cache
//! copy while clones read it and removes it with the last of them; a thin
//! clone's VM undefines (its disk goes, the copy is released), a VM whose
//! disk in its directory rests on a file of the user's is still refused; a
//! process killed between an image delete or a VM undefine and the sweep
//! leaves a copy that the next deploy or delete removes; a download's
//! temporary file left by a killed process goes too.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::restic::{qemu_img, run, s, stdout};
use common::vm::crashed_at;
use common::STRATA;

struct State {
    dir: tempfile::TempDir,
}

impl State {
    fn new() -> State {
        State {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    fn cmd(&self, what: &str, args: &[&str]) -> Command {
        let mut c = Command::new(STRATA);
        c.arg(what).arg("--state-dir").arg(self.root()).args(args);
        c
    }
    fn ok(&self, what: &str, args: &[&str]) -> String {
        stdout(&run(self.cmd(what, args)))
    }
    /// `strata WHAT ARGS` fails; its stderr.
    fn fails(&self, what: &str, args: &[&str]) -> String {
        let o: Output = self.cmd(what, args).output().unwrap();
        assert!(!o.status.success(), "strata {what} {args:?} succeeded");
        String::from_utf8_lossy(&o.stderr).into_owned()
    }
    /// A new active qcow2 image named `name` of a small disk with a pattern; its ID.
    fn image(&self, name: &str, pattern: u8) -> String {
        let f = self.dir.path().join(format!("{name}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", s(&f), "8M"]);
        run(Command::new("qemu-io").args(["-c", &format!("write -P {pattern} 1M 1M"), s(&f)]));
        let out = self.ok(
            "image",
            &["create-from-file", s(&f), "--name", name, "--output=json"],
        );
        let rec: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(rec["status"], "active", "{rec}");
        rec["id"].as_str().unwrap().to_string()
    }
    /// Define VM `vm` on a thin clone of `image`; the clone's file.
    fn clone_vm(&self, vm: &str, image: &str) -> PathBuf {
        self.ok(
            "vm",
            &["define", vm, "--memory", "64M", "--disk-from-image", image],
        );
        let rec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.root().join("vms").join(vm).join("vm.json")).unwrap(),
        )
        .unwrap();
        PathBuf::from(rec["def"]["disks"][0]["file"].as_str().unwrap())
    }
    fn cache(&self, id: &str) -> PathBuf {
        self.root().join("image-cache").join(format!("{id}.qcow2"))
    }
    /// The names in the cache directory but its lock.
    fn cached(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root().join("image-cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".lock")
            .collect();
        names.sort();
        names
    }
}

/// The backing file `qemu-img info` names for `disk`.
fn backing_of(disk: &Path) -> String {
    let info: serde_json::Value =
        serde_json::from_slice(&qemu_img(&["info", "-U", "--output=json", s(disk)]).stdout)
            .unwrap();
    info["full-backing-filename"].as_str().unwrap().to_string()
}

#[test]
fn a_forced_delete_keeps_the_cache_copy_until_the_last_thin_clone_is_undefined() {
    let st = State::new();
    let id = st.image("golden", 0x5a);
    let a = st.clone_vm("a", &id);
    let b = st.clone_vm("b", "golden");
    let cache = st.cache(&id);
    for clone in [&a, &b] {
        assert_eq!(backing_of(clone), s(&cache.canonicalize().unwrap()));
    }

    let err = st.fails("image", &["delete", &id]);
    assert!(
        err.contains("in use") && err.contains("VM 'a'") && err.contains("VM 'b'"),
        "{err}"
    );
    st.ok("image", &["delete", "--force", &id]);
    assert!(st.fails("image", &["show", &id]).contains("No image"));
    assert!(cache.exists(), "a forced delete took the copy clones read");
    qemu_img(&["compare", "-U", s(&a), s(&b)]);

    // A thin clone's VM undefines: its disk goes, the copy stays for `b`.
    st.ok("vm", &["undefine", "a"]);
    assert!(!st.root().join("vms/a").exists());
    assert!(cache.exists(), "the copy went while VM 'b' reads it");
    qemu_img(&["check", "-U", s(&b)]);
    // The last clone goes: so does the copy.
    st.ok("vm", &["undefine", "b"]);
    assert_eq!(st.cached(), Vec::<String>::new());

    // An unforced delete of an image nobody reads removes its copy too, and
    // an image still recorded keeps its copy after its clones go.
    let kept = st.image("kept", 0x11);
    st.clone_vm("k", &kept);
    st.ok("vm", &["undefine", "k"]);
    assert_eq!(st.cached(), vec![format!("{kept}.qcow2")]);
    st.ok("image", &["delete", &kept]);
    assert_eq!(st.cached(), Vec::<String>::new());
}

#[test]
fn a_vm_whose_disk_in_its_directory_rests_on_a_users_file_is_still_not_undefined() {
    let st = State::new();
    let user = st.dir.path().join("user.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&user), "8M"]);
    let disks = st.root().join("vms/u/disks");
    std::fs::create_dir_all(&disks).unwrap();
    let top = disks.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&user),
        "-F",
        "qcow2",
        s(&top),
    ]);
    st.ok("vm", &["define", "u", "--memory", "64M", "--disk", s(&top)]);
    let err = st.fails("vm", &["undefine", "u"]);
    assert!(
        err.contains("made in its state directory") && err.contains(s(&user)),
        "{err}"
    );
    assert!(top.exists() && st.root().join("vms/u/vm.json").exists());
}

#[test]
fn a_copy_left_by_a_killed_delete_or_undefine_goes_at_the_next_deploy_or_delete() {
    let st = State::new();
    // Killed after the image's record went, before the sweep.
    let first = st.image("first", 0x21);
    st.clone_vm("f", &first);
    st.ok("vm", &["undefine", "f"]);
    crashed_at(st.cmd("image", &["delete", &first]), "image-deleted");
    assert!(st.fails("image", &["show", &first]).contains("No image"));
    assert_eq!(st.cached(), vec![format!("{first}.qcow2")]);
    // A download's temporary file, as a killed clone leaves it.
    let part = st
        .root()
        .join("image-cache")
        .join(format!(".{first}.qcow2.part-1"));
    std::fs::write(&part, b"half").unwrap();

    // The next deploy removes both, and makes its own copy.
    let second = st.image("second", 0x22);
    let disk = st.clone_vm("g", &second);
    assert_eq!(st.cached(), vec![format!("{second}.qcow2")]);
    assert_eq!(
        backing_of(&disk),
        s(&st.cache(&second).canonicalize().unwrap())
    );

    // Killed after the VM went, before the sweep: the image was deleted
    // (forced) while the clone read it, so the copy is nobody's now.
    st.ok("image", &["delete", "--force", &second]);
    assert_eq!(st.cached(), vec![format!("{second}.qcow2")]);
    crashed_at(st.cmd("vm", &["undefine", "g"]), "vm-undefined");
    assert!(!st.root().join("vms/g").exists());
    assert_eq!(st.cached(), vec![format!("{second}.qcow2")]);
    let third = st.image("third", 0x23);
    st.ok("image", &["delete", &third]);
    assert_eq!(st.cached(), Vec::<String>::new());
}
