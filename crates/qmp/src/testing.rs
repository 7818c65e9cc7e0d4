//! Building and booting the project's test guest (`scripts/build-test-guest.sh`)
//! for tests of this crate and of the VM manager.
//!
//! The guest files live in `$STRATA_TEST_GUEST`, or in `target/test-guest` of the
//! workspace when that is unset; the build script runs when they are missing or
//! stale (it is cached, and serialises concurrent builders). A guest that cannot
//! be built is an error: tests using it fail, they never skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::accel::{self, Accel};
use crate::cmdline;
use crate::commands::QueryChardev;
use crate::{Agent, Qmp};

/// The environment variable naming the test guest's directory.
pub const GUEST_DIR_ENV: &str = "STRATA_TEST_GUEST";

/// The id of the agent's chardev and of its virtio-serial port in a [`TestVm`].
pub use crate::cmdline::{AGENT_CHARDEV, AGENT_PORT};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The built test guest: kernel, initramfs and the pristine data disk.
#[derive(Debug, Clone)]
pub struct TestGuest {
    pub dir: PathBuf,
}

impl TestGuest {
    /// Build the guest if needed (cached) and return where it is.
    pub fn ensure() -> Result<TestGuest, String> {
        let dir = match std::env::var_os(GUEST_DIR_ENV) {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => workspace_root().join("target/test-guest"),
        };
        let script = workspace_root().join("scripts/build-test-guest.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} {} failed ({}):\n{}",
                script.display(),
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let guest = TestGuest { dir };
        for f in [guest.kernel(), guest.initrd(), guest.data_disk()] {
            if !f.is_file() {
                return Err(format!("the guest build left no {}", f.display()));
            }
        }
        Ok(guest)
    }

    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }
    /// The pristine ext4 data disk (qcow2). Never boot it: boot a copy.
    pub fn data_disk(&self) -> PathBuf {
        self.dir.join("data.qcow2")
    }

    /// Copy the data disk to `dest`, for a VM to write.
    pub fn copy_data_disk(&self, dest: &Path) -> Result<(), String> {
        std::fs::copy(self.data_disk(), dest)
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "copy {} to {}: {e}",
                    self.data_disk().display(),
                    dest.display()
                )
            })
    }
}

/// A QEMU process running the test guest, killed when dropped.
pub struct TestVm {
    child: Child,
    pub dir: PathBuf,
    pub accel: Accel,
}

impl TestVm {
    /// Start QEMU on `guest` with `disks` (qcow2 files; the first is the guest's
    /// /dev/vda, mounted at /data) as nodes `disk0`, `disk1`... on virtio-blk,
    /// the agent's port, and QMP, with sockets and logs in `dir`. 256 MiB, one
    /// CPU, TCG unless KVM is really usable (see [`accel`]).
    pub fn launch(guest: &TestGuest, dir: &Path, disks: &[PathBuf]) -> Result<TestVm, String> {
        let choice = accel::choose()?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", choice.accel.name()]);
        if choice.accel == Accel::Kvm {
            cmd.args(["-cpu", "host"]);
        }
        cmd.args(["-m", "256", "-smp", "1", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(guest.kernel())
            .arg("-initrd")
            .arg(guest.initrd())
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("serial.log").display()));
        for (i, d) in disks.iter().enumerate() {
            cmdline::add_disk(&mut cmd, i, d, "qcow2");
        }
        cmdline::add_channels(&mut cmd, &dir.join("agent.sock"), &dir.join("qmp.sock"));
        let log = std::fs::File::create(dir.join("qemu.log"))
            .map_err(|e| format!("create {}: {e}", dir.join("qemu.log").display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
        Ok(TestVm {
            child,
            dir: dir.to_path_buf(),
            accel: choice.accel,
        })
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// Connect to QMP (QEMU may still be creating the socket).
    pub fn qmp(&self) -> crate::Result<Qmp> {
        Qmp::connect(&self.qmp_socket(), Duration::from_secs(30))
    }

    /// Wait until the guest's agent has its port open (the `VSERPORT_CHANGE`
    /// event, or `query-chardev` for a port opened before `qmp` connected),
    /// then connect to it and sync.
    pub fn agent(&self, qmp: &Qmp, timeout: Duration) -> crate::Result<Agent> {
        let deadline = Instant::now() + timeout;
        loop {
            let open = qmp
                .execute(&QueryChardev {})?
                .iter()
                .any(|c| c.label == AGENT_CHARDEV && c.frontend_open);
            if open {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(crate::Error::new(
                    format!("waiting for the guest agent to open port '{AGENT_PORT}'"),
                    crate::ErrorKind::Timeout(timeout),
                ));
            }
            match qmp.wait_vserport(AGENT_PORT, true, left.min(Duration::from_secs(1))) {
                Ok(_) => break,
                Err(e) if e.is_timeout() => continue,
                Err(e) => return Err(e),
            }
        }
        Agent::connect(
            &self.agent_socket(),
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(5)),
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A handle another thread can use to SIGKILL this QEMU.
    pub fn killer(&self) -> Killer {
        Killer(self.child.id())
    }

    /// Kill QEMU and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What the guest printed on its serial console (for failure messages).
    pub fn serial_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serial.log")).unwrap_or_default()
    }

    /// QEMU's own stdout and stderr.
    pub fn qemu_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills a QEMU by pid from any thread (the owning [`TestVm`] reaps it).
#[derive(Debug, Clone, Copy)]
pub struct Killer(u32);

impl Killer {
    pub fn kill(self) {
        // SAFETY: kill(2) with a pid and a signal number has no memory effects.
        // The pid is the owning TestVm's unreaped child, so it cannot be reused.
        unsafe {
            libc::kill(self.0 as libc::pid_t, libc::SIGKILL);
        }
    }
}
