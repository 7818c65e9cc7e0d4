//! Instant restore: a VM runs at once on a disk restored from a backup while
//! the data streams into a local image behind it.
//!
//! The restored disk is a local qcow2 overlay whose backing file is the backup
//! snapshot served read-only over NBD by `strata backup serve`, started
//! detached on a Unix socket in the VM's directory (`restore.sock`, its pid in
//! `restore.pid`, its output in `restore.log`). QEMU runs the guest on the
//! overlay and a QMP `block-stream` job copies every cluster the overlay does
//! not hold yet from the backup, at an optional speed limit. When the job
//! completes the overlay has no backing file: the server is stopped and the
//! record no longer names a restore, so the disk is an ordinary local disk.
//!
//! Contract, for every interruption:
//! - the restore is recorded (disk, source, speed) before anything else, and
//!   every later step is idempotent: [`resume`] makes the overlay if it is
//!   missing, starts the server if it is not running, QEMU if it is stopped,
//!   and the stream if QEMU runs none;
//! - the server runs only while QEMU does: whatever opens the VM and finds QEMU
//!   gone stops it (so gc and prune are held off only while it serves); `vm
//!   start` serves the snapshot again and streams the rest;
//! - a server that dies mid-stream: QEMU's NBD client pauses the guest's reads
//!   of data not restored yet for [`RECONNECT_DELAY`] seconds, then fails them
//!   (I/O errors in the guest) and fails the stream; `vm start` on the running
//!   VM starts the server again, QEMU reconnects, and a new stream copies what
//!   is still missing;
//! - the stream ends waiting for its finalization, which runs with the guest
//!   paused after QEMU flushed every node (as live pulls do), so the overlay
//!   drops its backing link only once the copied data is on disk;
//! - the job's id is outside the prefix of the jobs recovery waits for, so an
//!   unrelated recovery never waits for a stream that may take hours.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use strata_format::Format;
use strata_jobs::create::{create, CreateRequest};
use strata_jobs::Progress;
use strata_qmp::commands::{JobDismiss, JobFinalize, JobInfo, QueryJobs};
use strata_qmp::Qmp;

use crate::error::{Error, Result};
use crate::live::{self, JOB_TIMEOUT};
use crate::manager::{Manager, OpenVm};
use crate::qemu::{self, StartMode, VmPaths};
use crate::record::Disk;
use crate::snapshot::step;

/// Seconds QEMU's NBD client holds the guest's reads after it lost the server,
/// reconnecting, before it fails them.
pub const RECONNECT_DELAY: u64 = 5;

/// How long `resume` retries a stream that fails while QEMU reconnects.
const RECONNECT_WAIT: Duration = Duration::from_secs(40);

/// The export name the server gives the snapshot's disk.
const EXPORT: &str = "restore";

/// How long a server may take to listen (opening an S3 repository included).
const SERVER_START: Duration = Duration::from_secs(60);

/// Where a restored disk's data comes from: one snapshot of a backup repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSource {
    /// The repository location (a directory, or an `s3:` URL).
    pub repo: String,
    /// The snapshot's full ID.
    pub snapshot: String,
    /// The password file the restore was given. Without one, the server takes
    /// the password from the environment of the command that starts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// The disk's size in bytes (a multiple of 512).
    pub size: u64,
}

/// An instant restore under way, kept in the VM record until the disk is local.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstantRestore {
    /// The disk restored (its index); the definition names its local overlay.
    pub disk: usize,
    pub source: BackupSource,
    /// The stream's speed limit in bytes per second (0: none).
    #[serde(default)]
    pub speed: u64,
}

/// Where a restore stands, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The stream copies data: `done` of `total` bytes.
    Streaming { done: u64, total: u64 },
    /// QEMU is stopped: the next start serves the backup again and streams the rest.
    Stopped,
    /// The server is not running while the guest needs it.
    ServerDown,
    /// The stream failed (QEMU's error); the server runs.
    Failed(String),
}

/// An instant restore and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreStatus {
    pub restore: InstantRestore,
    /// The local image the data streams into.
    pub file: PathBuf,
    pub phase: Phase,
    /// The server's pid, when it runs.
    pub server: Option<i32>,
}

fn socket(paths: &VmPaths) -> PathBuf {
    paths.dir.join("restore.sock")
}
fn pid_file(paths: &VmPaths) -> PathBuf {
    paths.dir.join("restore.pid")
}
/// The server's output (the place to look when it died).
pub fn server_log(paths: &VmPaths) -> PathBuf {
    paths.dir.join("restore.log")
}

/// The id of the stream job of disk `disk`: outside [`live::JOB_PREFIX`].
fn job_id(disk: usize) -> String {
    format!("restore-disk{disk}")
}

/// The overlay's backing file name: the server's export, read as raw, with a
/// reconnect delay so a server restarted at once goes unnoticed by the guest.
fn backing_name(paths: &VmPaths) -> String {
    let spec = json!({
        "driver": "raw",
        "file": {
            "driver": "nbd",
            "server": {"type": "unix", "path": socket(paths)},
            "export": EXPORT,
            "reconnect-delay": RECONNECT_DELAY,
        },
    });
    format!("json:{spec}")
}

/// The pid of the VM's backup server, when it is alive (a live process whose
/// command line names this VM's socket: a reused pid is not taken for it).
pub fn server_pid(paths: &VmPaths) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(paths))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name; a zombie has ended.
    let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let sock = socket(paths).display().to_string();
    let names_socket = cmdline.split(|b| *b == 0).any(|a| a == sock.as_bytes());
    (pid > 0 && state != 'Z' && names_socket).then_some(pid)
}

/// Start the VM's backup server (detached, in its own process group) unless it
/// runs, and wait until it accepts connections. Returns where its output
/// starts in the log when it started one.
fn start_server(vm: &OpenVm, r: &InstantRestore) -> Result<Option<u64>> {
    if server_pid(&vm.paths).is_some() {
        return Ok(None);
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::io("find the strata executable to serve the backup", e))?;
    let log_path = server_log(&vm.paths);
    let from = std::fs::metadata(&log_path).map_or(0, |m| m.len());
    let sock = socket(&vm.paths);
    let mut cmd = Command::new(exe);
    cmd.args(["backup", "serve", "--repo", &r.source.repo])
        .arg(&r.source.snapshot)
        .arg("-k")
        .arg(&sock)
        .args(["-x", EXPORT]);
    if let Some(p) = &r.source.password_file {
        cmd.arg("--password-file").arg(p);
    }
    let mut child = qemu::spawn_detached(&mut cmd, &log_path, "the backup server")?;
    crate::state::write_atomic(&pid_file(&vm.paths), child.id().to_string().as_bytes())?;
    let deadline = Instant::now() + SERVER_START;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::State(format!(
                "the backup server for VM '{}' exited at start ({status}); its log {} ends with:\n{}",
                vm.name,
                log_path.display(),
                qemu::log_tail(&log_path)
            )));
        }
        if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::State(format!(
                "the backup server for VM '{}' did not listen within {SERVER_START:?}; log:\n{}",
                vm.name,
                qemu::log_tail(&log_path)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Reap it if it ends while this process lives; it outlives this process.
    std::thread::spawn(move || child.wait());
    Ok(Some(from))
}

/// Stop the VM's backup server, if it runs (SIGTERM: it releases its
/// repository lock), and wait until it is gone.
pub(crate) fn stop_server(paths: &VmPaths) {
    if let Some(pid) = server_pid(paths) {
        // SAFETY: kill(2) on the pid of the server this VM started, checked
        // above to be that server; no memory effects.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while server_pid(paths).is_some() {
            if Instant::now() >= deadline {
                // SAFETY: as above.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_file(pid_file(paths));
}

/// Create the local overlay of the restore, unless it exists: qcow2, the
/// disk's size, backed by the server's export (not opened: it need not run).
fn ensure_overlay(vm: &OpenVm, r: &InstantRestore) -> Result<()> {
    let file = &vm.rec.def.disks[r.disk].file;
    if file.exists() {
        return Ok(());
    }
    let mut options = std::collections::BTreeMap::new();
    options.insert("backing_file".to_string(), backing_name(&vm.paths));
    options.insert("backing_fmt".to_string(), "raw".to_string());
    create(&CreateRequest {
        path: file.clone(),
        format: Format::Qcow2,
        size: Some(r.source.size),
        options,
        unsafe_backing: true,
    })?;
    Ok(())
}

/// The stream job of the restore, as QEMU reports it.
fn job(qmp: &Qmp, r: &InstantRestore) -> Result<Option<JobInfo>> {
    let id = job_id(r.disk);
    Ok(qmp.execute(&QueryJobs {})?.into_iter().find(|j| j.id == id))
}

/// True while QEMU's view of the restored disk still has a backing file.
fn has_backing(qmp: &Qmp, vm: &OpenVm, r: &InstantRestore) -> Result<bool> {
    let chains = live::chains(qmp, vm.rec.def.disks.len())?;
    Ok(chains.get(r.disk).is_some_and(|c| c.len() > 1))
}

/// Start the stream job: every cluster of the backing into the overlay.
fn start_stream(qmp: &Qmp, vm: &OpenVm, r: &InstantRestore) -> Result<()> {
    let top = qemu::top_nodes(qmp, vm.rec.def.disks.len())?.swap_remove(r.disk);
    qmp.execute_value(
        "block-stream",
        Some(json!({
            "job-id": job_id(r.disk),
            "device": top,
            "speed": r.speed,
            "auto-finalize": false,
            "auto-dismiss": false,
        })),
    )?;
    Ok(())
}

/// Finalize a stream waiting in `pending` (the guest paused after a flush of
/// every node), then record the disk as local.
fn finish(vm: &mut OpenVm, qmp: &Qmp, r: &InstantRestore) -> Result<()> {
    let id = job_id(r.disk);
    live::flushed_pause(qmp, || {
        qmp.execute(&JobFinalize { id: id.clone() })?;
        Ok(qmp.finish_job("block-stream", &id, JOB_TIMEOUT)?)
    })?;
    step(vm, "restore-finalized");
    complete(vm, Some(qmp), r)
}

/// The overlay stands alone: stop the server and drop the restore from the record.
fn complete(vm: &mut OpenVm, qmp: Option<&Qmp>, r: &InstantRestore) -> Result<()> {
    if let Some(q) = qmp {
        if has_backing(q, vm, r)? {
            return Err(Error::Qemu(format!(
                "disk {} of VM '{}' still has its backing file after the stream",
                r.disk, vm.name
            )));
        }
    }
    stop_server(&vm.paths);
    vm.rec.restore = None;
    vm.save()
}

/// Bring an instant restore a previous command left to rest, whenever the VM
/// is opened: a stream waiting for its finalization is finalized; a running
/// QEMU with no stream (its starter was killed) gets one when the server runs;
/// a stopped QEMU's server is stopped; an overlay that stands alone ends the
/// restore. A failed stream is left for `status` to report and `start` to resume.
pub(crate) fn settle(vm: &mut OpenVm) -> Result<()> {
    let Some(r) = vm.rec.restore.clone() else {
        return Ok(());
    };
    match qemu::connect(&vm.paths)? {
        Some(q) => match job(&q, &r)? {
            Some(j) if j.status == "pending" => finish(vm, &q, &r),
            Some(j) if j.status == "concluded" && j.error.is_none() => {
                q.execute(&JobDismiss { id: j.id })?;
                complete(vm, Some(&q), &r)
            }
            Some(_) => Ok(()),
            None if !has_backing(&q, vm, &r)? => complete(vm, Some(&q), &r),
            None if server_pid(&vm.paths).is_some() => start_stream(&q, vm, &r),
            None => Ok(()),
        },
        None => {
            stop_server(&vm.paths);
            let file = vm.rec.def.disks[r.disk].file.clone();
            if file.exists() && !crate::engine::has_backing(&file)? {
                complete(vm, None, &r)?;
            }
            Ok(())
        }
    }
}

/// Make an instant restore go on: the overlay, the server, QEMU (started when
/// `launch` and stopped) and the stream, each made only when missing. A stream
/// that failed (its server died) is replaced by a new one, which copies only
/// what the overlay lacks. Returns QEMU's start note (TCG).
pub(crate) fn resume(vm: &mut OpenVm) -> Result<Option<String>> {
    let Some(r) = vm.rec.restore.clone() else {
        return Ok(None);
    };
    ensure_overlay(vm, &r)?;
    let started = start_server(vm, &r)?;
    let deadline = Instant::now() + RECONNECT_WAIT;
    let (qmp, note) = match qemu::connect(&vm.paths)? {
        Some(q) => {
            if let Some(from) = started {
                if job(&q, &r)?.is_none_or(|j| j.status == "concluded") && has_backing(&q, vm, &r)?
                {
                    wait_reconnected(vm, from, deadline)?;
                }
            }
            (q, None)
        }
        None => qemu::launch(&vm.rec.def, &vm.paths, StartMode::default())?,
    };
    step(vm, "restore-launched");
    while Instant::now() < deadline {
        match job(&qmp, &r)? {
            Some(j) if j.status == "pending" => {
                finish(vm, &qmp, &r)?;
                return Ok(note);
            }
            Some(j) if j.status == "concluded" => {
                qmp.execute(&JobDismiss { id: j.id })?;
                if j.error.is_none() {
                    complete(vm, Some(&qmp), &r)?;
                    return Ok(note);
                }
            }
            Some(_) => return Ok(note),
            None => {}
        }
        if !has_backing(&qmp, vm, &r)? {
            complete(vm, Some(&qmp), &r)?;
            return Ok(note);
        }
        start_stream(&qmp, vm, &r)?;
        std::thread::sleep(Duration::from_secs(1));
    }
    let err = job(&qmp, &r)?.and_then(|j| j.error).unwrap_or_default();
    Err(Error::State(format!(
        "the stream restoring disk {} of VM '{}' fails: {err}; the backup server's log is {}",
        r.disk,
        vm.name,
        server_log(&vm.paths).display()
    )))
}

/// Wait until the running QEMU has connected to the server that started
/// writing its log at `from`. Once the delay it holds requests for a lost
/// server is over, QEMU's NBD client fails them until its background
/// reconnection, retried at growing intervals (up to 16 s), reaches the new
/// server; the server logs each client's connection to its export.
fn wait_reconnected(vm: &OpenVm, from: u64, deadline: Instant) -> Result<()> {
    use std::io::{Read, Seek};
    let log = server_log(&vm.paths);
    loop {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&log) {
            if f.seek(std::io::SeekFrom::Start(from)).is_ok() {
                let _ = f.read_to_string(&mut text);
            }
        }
        if text.contains(&format!("connected to export '{EXPORT}'")) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::State(format!(
                "QEMU did not reconnect to the backup server of VM '{}' within {RECONNECT_WAIT:?}; its log is {}",
                vm.name,
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Where `r` stands on `vm`.
fn phase(vm: &OpenVm, r: &InstantRestore) -> Result<Phase> {
    let Some(q) = qemu::connect(&vm.paths)? else {
        return Ok(Phase::Stopped);
    };
    let server_up = server_pid(&vm.paths).is_some();
    Ok(match job(&q, r)? {
        Some(j) if j.status == "concluded" => Phase::Failed(j.error.unwrap_or_default()),
        _ if !server_up => Phase::ServerDown,
        Some(j) => Phase::Streaming {
            done: j.current_progress,
            total: j.total_progress,
        },
        None => Phase::Streaming {
            done: 0,
            total: r.source.size,
        },
    })
}

/// The advice when the server or the stream failed while the guest runs.
fn broken(vm: &OpenVm, what: &str) -> Error {
    Error::State(format!(
        "{what}: the guest of VM '{name}' gets I/O errors reading data not restored yet \
         (the server's log is {log}). Start the VM again (`strata vm start {name}`): it serves \
         the backup again, the running guest's disk reconnects and the stream copies the rest \
         (stop the VM first for a fresh boot)",
        name = vm.name,
        log = server_log(&vm.paths).display()
    ))
}

impl Manager {
    /// Restore disk `disk` of stopped VM `name` from `source` at once: `file`
    /// (which must not exist) becomes the disk, a qcow2 overlay on the backup
    /// served over NBD; the VM starts on it and a stream copies every cluster
    /// into it (at `speed` bytes per second, 0 for no limit) while the guest
    /// runs. Returns QEMU's start note (TCG).
    pub fn instant_restore(
        &self,
        name: &str,
        disk: usize,
        file: &Path,
        source: BackupSource,
        speed: u64,
    ) -> Result<Option<String>> {
        let mut vm = self.open(name)?;
        let n = vm.rec.def.disks.len();
        if disk >= n {
            return Err(Error::Invalid(format!(
                "VM '{name}' has no disk {disk} (it has {n})"
            )));
        }
        if qemu::live_pid(&vm.paths).is_some() {
            return Err(Error::State(format!(
                "VM '{name}' is running; stop it before restoring one of its disks"
            )));
        }
        if let Some(r) = &vm.rec.restore {
            return Err(Error::State(format!(
                "VM '{name}' is already restoring disk {} from a backup; wait for it to finish",
                r.disk
            )));
        }
        if vm.rec.saved.is_some() {
            return Err(Error::State(format!(
                "VM '{name}' has a saved state; start it (or undefine it) before restoring a disk"
            )));
        }
        if !vm.rec.snapshots.is_empty() {
            return Err(Error::State(format!(
                "VM '{name}' has {} snapshot(s) holding its disks; delete them before restoring a disk",
                vm.rec.snapshots.len()
            )));
        }
        if source.size == 0 || !source.size.is_multiple_of(512) {
            return Err(Error::Invalid(format!(
                "the backed-up disk is {} bytes, not a positive multiple of 512: it cannot be a VM disk",
                source.size
            )));
        }
        if file.exists() || file.symlink_metadata().is_ok() {
            return Err(Error::Invalid(format!(
                "'{}' exists; instant restore makes a new image (remove it or choose another path)",
                file.display()
            )));
        }
        let file = std::path::absolute(file)
            .map_err(|e| Error::io(format!("resolve {}", file.display()), e))?;
        let parent = file.parent().unwrap_or(Path::new("/"));
        if !parent.is_dir() {
            return Err(Error::Invalid(format!(
                "'{}' is not a directory",
                parent.display()
            )));
        }
        vm.rec.def.disks[disk] = Disk {
            file,
            format: "qcow2".into(),
        };
        vm.rec.restore = Some(InstantRestore {
            disk,
            source,
            speed,
        });
        vm.save()?;
        step(&vm, "restore-recorded");
        resume(&mut vm)
    }

    /// Where the instant restore of VM `name` stands (`None`: none under way).
    pub fn restore_status(&self, name: &str) -> Result<Option<RestoreStatus>> {
        let vm = self.open(name)?;
        restore_status(&vm)
    }

    /// Wait until the instant restore of VM `name` is done (the disk local, the
    /// server stopped), reporting progress; first set the stream's speed limit
    /// to `speed` (bytes per second, 0 for none) when given. The VM's lock is
    /// held only for each look, so other commands run meanwhile. A stopped VM,
    /// a failed stream or a dead server end the wait with what to do. Returns
    /// false when no restore was under way.
    pub fn restore_wait(
        &self,
        name: &str,
        speed: Option<u64>,
        progress: &dyn Progress,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<bool> {
        if let Some(speed) = speed {
            let mut vm = self.open(name)?;
            let Some(mut r) = vm.rec.restore.clone() else {
                return Ok(false);
            };
            r.speed = speed;
            vm.rec.restore = Some(r.clone());
            vm.save()?;
            if let Some(q) = qemu::connect(&vm.paths)? {
                if job(&q, &r)?.is_some_and(|j| j.status == "running" || j.status == "paused") {
                    q.execute_value(
                        "block-job-set-speed",
                        Some(json!({"device": job_id(r.disk), "speed": speed})),
                    )?;
                }
            }
        }
        let mut done = 0;
        let mut first = true;
        loop {
            let st = self.restore_status(name)?;
            let Some(st) = st else {
                return Ok(!first);
            };
            first = false;
            match st.phase {
                Phase::Streaming { done: d, total } => {
                    progress.set_total(total);
                    progress.advance(d.saturating_sub(done));
                    done = done.max(d);
                }
                Phase::Stopped => {
                    return Err(Error::State(format!(
                        "VM '{name}' stopped before disk {} was restored; start it again \
                         (`strata vm start {name}`): it serves the backup and streams the rest",
                        st.restore.disk
                    )))
                }
                Phase::ServerDown => {
                    let vm = self.open(name)?;
                    return Err(broken(&vm, "the backup server is not running"));
                }
                Phase::Failed(e) => {
                    let vm = self.open(name)?;
                    return Err(broken(&vm, &format!("the restore stream failed ({e})")));
                }
            }
            if cancelled() {
                return Err(Error::State(format!(
                    "stopped waiting; the restore of VM '{name}' goes on"
                )));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Where the restore of the open VM stands.
pub(crate) fn restore_status(vm: &OpenVm) -> Result<Option<RestoreStatus>> {
    let Some(r) = vm.rec.restore.clone() else {
        return Ok(None);
    };
    Ok(Some(RestoreStatus {
        file: vm.rec.def.disks[r.disk].file.clone(),
        phase: phase(vm, &r)?,
        server: server_pid(&vm.paths),
        restore: r,
    }))
}

/// Refuse `what` while a disk of the VM is being restored.
pub(crate) fn not_restoring(vm: &OpenVm, what: &str) -> Result<()> {
    match &vm.rec.restore {
        None => Ok(()),
        Some(r) => Err(Error::State(format!(
            "VM '{}' is restoring disk {} from a backup; {what} waits until it is done \
             (`strata vm blockjob wait {}`)",
            vm.name, r.disk, vm.name
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::VmRecord;

    #[test]
    fn the_overlay_backing_is_a_raw_nbd_export_on_the_vms_socket_with_a_reconnect_delay() {
        let paths = VmPaths {
            dir: "/s/vms/t".into(),
        };
        let name = backing_name(&paths);
        let spec: serde_json::Value =
            serde_json::from_str(name.strip_prefix("json:").unwrap()).unwrap();
        assert_eq!(spec["driver"], "raw");
        assert_eq!(spec["file"]["driver"], "nbd");
        assert_eq!(spec["file"]["server"]["path"], "/s/vms/t/restore.sock");
        assert_eq!(spec["file"]["export"], EXPORT);
        assert_eq!(spec["file"]["reconnect-delay"], RECONNECT_DELAY);
    }

    #[test]
    fn a_record_keeps_its_restore_and_older_records_read_without_one() {
        let old = r#"{"def":{"name":"t","memory_mib":64,"cpus":1,"disks":[{"file":"/d.qcow2"}]}}"#;
        let mut rec: VmRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.restore, None);
        assert!(!serde_json::to_string(&rec).unwrap().contains("restore"));
        rec.restore = Some(InstantRestore {
            disk: 0,
            source: BackupSource {
                repo: "/r".into(),
                snapshot: "ab".repeat(32),
                password_file: None,
                size: 1 << 20,
            },
            speed: 4096,
        });
        let back: VmRecord = serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(back.restore, rec.restore);
    }

    #[test]
    fn a_pid_file_naming_another_process_is_not_taken_for_the_server() {
        let d = tempfile::tempdir().unwrap();
        let paths = VmPaths {
            dir: d.path().into(),
        };
        assert_eq!(server_pid(&paths), None);
        std::fs::write(pid_file(&paths), std::process::id().to_string()).unwrap();
        assert_eq!(server_pid(&paths), None, "this test process is no server");
    }
}
