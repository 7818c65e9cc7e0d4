//! Running a VM's QEMU: the command line, a detached start with its log kept in
//! the VM's directory, and the questions asked over QMP (is it running, which
//! node is each disk's active layer).
//!
//! QEMU runs in its own process group with stdin closed and stdout/stderr
//! appended to `qemu.log`; it outlives the strata command that started it. Its
//! pid is in `qemu.pid`, its monitor on `qmp.sock`, the agent on `agent.sock`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_qmp::accel::{self, Accel};
use strata_qmp::cmdline;
use strata_qmp::commands::QueryStatus;
use strata_qmp::Qmp;

use crate::error::{Error, Result};
use crate::record::VmDef;

/// The environment variable naming the QEMU binary.
pub const QEMU_ENV: &str = "STRATA_QEMU";
/// The QEMU binary used when `STRATA_QEMU` is unset.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
/// The files of a VM's running QEMU.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn agent(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
}

/// How QEMU starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartMode {
    /// Start with the CPUs stopped (`-S`).
    pub paused: bool,
    /// Wait for an incoming migration (`-incoming defer`).
    pub incoming: bool,
}

pub use strata_qmp::cmdline::{disk_device, disk_node};

/// The QEMU binary: `$STRATA_QEMU` or `qemu-system-x86_64`.
pub fn qemu_binary() -> String {
    std::env::var(QEMU_ENV)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_QEMU.to_string())
}

fn command_line(def: &VmDef, paths: &VmPaths, accel: Accel, mode: StartMode) -> Command {
    let mut cmd = Command::new(qemu_binary());
    cmd.arg("-name").arg(&def.name);
    cmd.args(["-accel", accel.name()]);
    if accel == Accel::Kvm {
        cmd.args(["-cpu", "host"]);
    }
    cmd.arg("-m").arg(def.memory_mib.to_string());
    cmd.arg("-smp").arg(def.cpus.to_string());
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none"]);
    if let Some(k) = &def.kernel {
        cmd.arg("-kernel").arg(k);
    }
    if let Some(i) = &def.initrd {
        cmd.arg("-initrd").arg(i);
    }
    if let Some(a) = &def.append {
        cmd.arg("-append").arg(a);
    }
    cmd.arg("-serial")
        .arg(format!("file:{}", paths.serial().display()));
    for (i, d) in def.disks.iter().enumerate() {
        cmdline::add_disk(&mut cmd, i, &d.file, &d.format);
    }
    cmdline::add_channels(&mut cmd, &paths.agent(), &paths.qmp());
    cmd.arg("-pidfile").arg(paths.pid());
    if mode.paused {
        cmd.arg("-S");
    }
    if mode.incoming {
        cmd.args(["-incoming", "defer"]);
    }
    cmd
}

/// Start QEMU for `def` detached and connect to its monitor. Returns the
/// connection and, when TCG is used, a note saying why.
pub fn launch(def: &VmDef, paths: &VmPaths, mode: StartMode) -> Result<(Qmp, Option<String>)> {
    let choice = accel::choose().map_err(Error::Invalid)?;
    let note = (choice.accel == Accel::Tcg)
        .then(|| format!("note: using TCG (slower than KVM): {}", choice.reason));
    for p in [paths.qmp(), paths.agent(), paths.pid()] {
        let _ = std::fs::remove_file(p);
    }
    let mut cmd = command_line(def, paths, choice.accel, mode);
    let what = format!("QEMU '{}'", qemu_binary());
    let mut child = spawn_detached(&mut cmd, &paths.log(), &what)?;
    // Wait for the monitor, noticing a QEMU that exits at once (bad options,
    // locked images) instead of waiting out the timeout.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Qemu(format!(
                "QEMU exited at start ({status}); its log {} ends with:\n{}",
                paths.log().display(),
                log_tail(&paths.log())
            )));
        }
        if paths.qmp().exists() {
            match Qmp::connect(&paths.qmp(), Duration::from_secs(5)) {
                Ok(q) => {
                    // Reap it when it ends while this process lives (a
                    // long-lived one, such as `strata serve`, would otherwise
                    // keep its zombie, which `live_pid` takes for running).
                    std::thread::spawn(move || child.wait());
                    return Ok((q, note));
                }
                Err(e) if Instant::now() >= deadline => return Err(e.into()),
                Err(_) => {}
            }
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Err(Error::Qemu(format!(
                "QEMU did not open its monitor within 60 s; log:\n{}",
                log_tail(&paths.log())
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start `cmd` (`what` names it in errors) in its own process group, so it
/// outlives this command, with stdin closed and stdout and stderr appended to
/// the log file `log`.
pub(crate) fn spawn_detached(cmd: &mut Command, log: &Path, what: &str) -> Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io(format!("open {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| Error::io("duplicate the log descriptor", e))?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| Error::Qemu(format!("cannot start {what}: {e}")))
}

/// The last lines of a log file (for error messages).
pub fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// QEMU's pid from its pid file, if that process is alive.
pub fn live_pid(paths: &VmPaths) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(paths.pid())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: signal 0 only checks that the process exists.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

/// Connect to the VM's monitor if its QEMU is running (`None` when it is not).
/// A QEMU that runs but does not answer on its monitor (another client holds
/// it: QEMU serves one at a time) is an error, never taken for a stopped VM.
pub fn connect(paths: &VmPaths) -> Result<Option<Qmp>> {
    let Some(pid) = live_pid(paths) else {
        return Ok(None);
    };
    match Qmp::connect(&paths.qmp(), Duration::from_secs(10)) {
        Ok(q) => Ok(Some(q)),
        // It may have exited meanwhile.
        Err(_) if live_pid(paths).is_none() => Ok(None),
        Err(e) => Err(Error::Qemu(format!(
            "QEMU (pid {pid}) runs but its monitor {} does not answer (is another client connected?): {e}",
            paths.qmp().display()
        ))),
    }
}

/// The VM's run state as QEMU reports it (`running`, `paused`, ...).
pub fn run_state(qmp: &Qmp) -> Result<String> {
    Ok(qmp.execute(&QueryStatus {})?.status)
}

/// Wait until QEMU's process is gone (it releases its image locks then).
pub fn wait_gone(paths: &VmPaths, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while live_pid(paths).is_some() {
        if Instant::now() >= deadline {
            return Err(Error::Qemu(format!(
                "QEMU (pid file {}) is still running after {timeout:?}",
                paths.pid().display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// SIGKILL the VM's QEMU and wait for it to be gone.
pub fn kill(paths: &VmPaths) -> Result<bool> {
    let Some(pid) = live_pid(paths) else {
        return Ok(false);
    };
    // SAFETY: kill(2) on the pid QEMU wrote; no memory effects.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    wait_gone(paths, Duration::from_secs(10))?;
    Ok(true)
}

/// Ask QEMU to quit and wait for it to be gone.
pub fn quit(qmp: Qmp, paths: &VmPaths) -> Result<()> {
    // The monitor may close before the reply arrives; that is success.
    let _ = qmp.execute(&strata_qmp::commands::Quit {});
    drop(qmp);
    wait_gone(paths, Duration::from_secs(30))
}

/// The node name of each disk's active layer (`n` disks, in order), from
/// `query-block`.
pub fn top_nodes(qmp: &Qmp, n: usize) -> Result<Vec<String>> {
    let blocks = qmp.execute_value("query-block", None)?;
    let list = blocks.as_array().cloned().unwrap_or_default();
    (0..n)
        .map(|i| {
            let prefix = format!("/machine/peripheral/{}/", disk_device(i));
            list.iter()
                .find(|b| {
                    b.get("qdev")
                        .and_then(Value::as_str)
                        .is_some_and(|q| q.starts_with(&prefix))
                })
                .and_then(|b| b.pointer("/inserted/node-name"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::Qemu(format!(
                        "QEMU reports no medium for disk {}",
                        disk_device(i)
                    ))
                })
        })
        .collect()
}
