//! Instant restore: a VM runs at once on a disk restored from a backup while
//! the data streams into a local image behind it.
//!
//! Each restored disk is a local qcow2 overlay whose backing file is its backup
//! snapshot served read-only over NBD by `strata backup serve`: one server for
//! all the disks restored at once (one export each), started detached on a
//! Unix socket in the VM's directory (`restore.sock`, its pid in
//! `restore.pid`, its output in `restore.log`). QEMU runs the guest on the
//! overlays and one QMP `block-stream` job per disk copies every cluster its
//! overlay does not hold yet from the backup, at an optional speed limit. When
//! a disk's job completes its overlay has no backing file and the record no
//! longer names it; once no disk is left the server is stopped and the record
//! names no restore, so the disks are ordinary local disks.
//!
//! Contract, for every interruption:
//! - the restore is recorded (disk, source, speed) before anything else, and
//!   every later step is idempotent: [`resume`] makes each overlay if it is
//!   missing, starts the server if it is not running, QEMU if it is stopped,
//!   and each disk's stream if QEMU runs none;
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

/// The export name of the one disk of a restore recorded before several disks
/// could be restored at once (its overlay's backing file names it).
const SINGLE_EXPORT: &str = "restore";

/// The export name the server gives disk `disk`'s snapshot.
fn export_name(disk: usize) -> String {
    format!("restore-disk{disk}")
}

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

/// One disk of an instant restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredDisk {
    /// The disk restored (its index); the definition names its local overlay.
    pub disk: usize,
    pub source: BackupSource,
    /// The server's export of the disk's snapshot, which the overlay's
    /// backing file names.
    pub export: String,
}

impl RestoredDisk {
    /// Disk `disk` restored from `source`, served under its own export name.
    pub fn new(disk: usize, source: BackupSource) -> RestoredDisk {
        RestoredDisk {
            disk,
            source,
            export: export_name(disk),
        }
    }
}

/// An instant restore under way, kept in the VM record until every disk is local.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RecordedRestore")]
pub struct InstantRestore {
    /// The disks not local yet, all from one repository (one server serves them).
    pub disks: Vec<RestoredDisk>,
    /// Each stream's speed limit in bytes per second (0: none).
    pub speed: u64,
}

/// The forms of [`InstantRestore`] a record holds.
#[derive(Deserialize)]
#[serde(untagged)]
enum RecordedRestore {
    Disks {
        disks: Vec<RestoredDisk>,
        #[serde(default)]
        speed: u64,
    },
    /// A single disk, recorded before several could be restored at once.
    Single {
        disk: usize,
        source: BackupSource,
        #[serde(default)]
        speed: u64,
    },
}

impl From<RecordedRestore> for InstantRestore {
    fn from(r: RecordedRestore) -> InstantRestore {
        match r {
            RecordedRestore::Disks { disks, speed } => InstantRestore { disks, speed },
            RecordedRestore::Single {
                disk,
                source,
                speed,
            } => InstantRestore {
                disks: vec![RestoredDisk {
                    disk,
                    source,
                    export: SINGLE_EXPORT.into(),
                }],
                speed,
            },
        }
    }
}

impl InstantRestore {
    /// The disks' indexes, as a message names them ("0, 2").
    fn disk_list(&self) -> String {
        let d: Vec<String> = self.disks.iter().map(|d| d.disk.to_string()).collect();
        d.join(", ")
    }
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

/// Where one disk of an instant restore stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskStatus {
    pub disk: RestoredDisk,
    /// The local image the data streams into.
    pub file: PathBuf,
    pub phase: Phase,
}

/// An instant restore and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RestoreStatus {
    pub restore: InstantRestore,
    /// Each disk not local yet, in the record's order.
    pub disks: Vec<DiskStatus>,
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

/// An overlay's backing file name: the server's export `export`, read as raw,
/// with a reconnect delay so a server restarted at once goes unnoticed by the
/// guest.
fn backing_name(paths: &VmPaths, export: &str) -> String {
    let spec = json!({
        "driver": "raw",
        "file": {
            "driver": "nbd",
            "server": {"type": "unix", "path": socket(paths)},
            "export": export,
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
/// runs, serving every disk of `r` not local yet, and wait until it accepts
/// connections. Returns where its output starts in the log when it started one.
fn start_server(vm: &OpenVm, r: &InstantRestore) -> Result<Option<u64>> {
    if server_pid(&vm.paths).is_some() {
        return Ok(None);
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::io("find the strata executable to serve the backup", e))?;
    let log_path = server_log(&vm.paths);
    let from = std::fs::metadata(&log_path).map_or(0, |m| m.len());
    let sock = socket(&vm.paths);
    let Some(first) = r.disks.first() else {
        return Ok(None);
    };
    let mut cmd = Command::new(exe);
    cmd.args(["backup", "serve", "--repo", &first.source.repo]);
    for d in &r.disks {
        cmd.arg(&d.source.snapshot).args(["-x", &d.export]);
    }
    cmd.arg("-k").arg(&sock);
    if let Some(p) = &first.source.password_file {
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

/// Create the local overlay of disk `d`, unless it exists: qcow2, the disk's
/// size, backed by the server's export (not opened: it need not run).
fn ensure_overlay(vm: &OpenVm, d: &RestoredDisk) -> Result<()> {
    let file = &vm.rec.def.disks[d.disk].file;
    if file.exists() {
        return Ok(());
    }
    let mut options = std::collections::BTreeMap::new();
    options.insert(
        "backing_file".to_string(),
        backing_name(&vm.paths, &d.export),
    );
    options.insert("backing_fmt".to_string(), "raw".to_string());
    create(&CreateRequest {
        path: file.clone(),
        format: Format::Qcow2,
        size: Some(d.source.size),
        options,
        unsafe_backing: true,
    })?;
    Ok(())
}

/// The stream job of disk `disk`, as QEMU reports it.
fn job(qmp: &Qmp, disk: usize) -> Result<Option<JobInfo>> {
    let id = job_id(disk);
    Ok(qmp.execute(&QueryJobs {})?.into_iter().find(|j| j.id == id))
}

/// True while QEMU's view of disk `disk` still has a backing file.
fn has_backing(qmp: &Qmp, vm: &OpenVm, disk: usize) -> Result<bool> {
    let chains = live::chains(qmp, vm.rec.def.disks.len())?;
    Ok(chains.get(disk).is_some_and(|c| c.len() > 1))
}

/// Start the stream job of disk `disk`: every cluster of the backing into the
/// overlay, at `speed` bytes per second (0: no limit).
fn start_stream(qmp: &Qmp, vm: &OpenVm, disk: usize, speed: u64) -> Result<()> {
    let top = qemu::top_nodes(qmp, vm.rec.def.disks.len())?.swap_remove(disk);
    qmp.execute_value(
        "block-stream",
        Some(json!({
            "job-id": job_id(disk),
            "device": top,
            "speed": speed,
            "auto-finalize": false,
            "auto-dismiss": false,
        })),
    )?;
    Ok(())
}

/// Finalize disk `disk`'s stream waiting in `pending` (the guest paused after
/// a flush of every node), then record the disk as local.
fn finish(vm: &mut OpenVm, qmp: &Qmp, disk: usize) -> Result<()> {
    let id = job_id(disk);
    live::flushed_pause(qmp, || {
        qmp.execute(&JobFinalize { id: id.clone() })?;
        Ok(qmp.finish_job("block-stream", &id, JOB_TIMEOUT)?)
    })?;
    step(vm, "restore-finalized");
    complete(vm, Some(qmp), disk)
}

/// Disk `disk`'s overlay stands alone: drop it from the restore; with no disk
/// left, stop the server and drop the restore from the record.
fn complete(vm: &mut OpenVm, qmp: Option<&Qmp>, disk: usize) -> Result<()> {
    if let Some(q) = qmp {
        if has_backing(q, vm, disk)? {
            return Err(Error::Qemu(format!(
                "disk {disk} of VM '{}' still has its backing file after the stream",
                vm.name
            )));
        }
    }
    if let Some(r) = vm.rec.restore.as_mut() {
        r.disks.retain(|d| d.disk != disk);
        if r.disks.is_empty() {
            stop_server(&vm.paths);
            vm.rec.restore = None;
        }
    }
    vm.save()
}

/// Bring an instant restore a previous command left to rest, whenever the VM
/// is opened, disk by disk: a stream waiting for its finalization is
/// finalized; a running QEMU with no stream (its starter was killed) gets one
/// when the server runs; a stopped QEMU's server is stopped; an overlay that
/// stands alone ends that disk's restore. A failed stream is left for `status`
/// to report and `start` to resume.
pub(crate) fn settle(vm: &mut OpenVm) -> Result<()> {
    let Some(r) = vm.rec.restore.clone() else {
        return Ok(());
    };
    match qemu::connect(&vm.paths)? {
        Some(q) => {
            for d in &r.disks {
                match job(&q, d.disk)? {
                    Some(j) if j.status == "pending" => finish(vm, &q, d.disk)?,
                    Some(j) if j.status == "concluded" && j.error.is_none() => {
                        q.execute(&JobDismiss { id: j.id })?;
                        complete(vm, Some(&q), d.disk)?
                    }
                    Some(_) => {}
                    None if !has_backing(&q, vm, d.disk)? => complete(vm, Some(&q), d.disk)?,
                    None if server_pid(&vm.paths).is_some() => {
                        start_stream(&q, vm, d.disk, r.speed)?
                    }
                    None => {}
                }
            }
            Ok(())
        }
        None => {
            stop_server(&vm.paths);
            for d in &r.disks {
                let file = vm.rec.def.disks[d.disk].file.clone();
                if file.exists() && !crate::engine::has_backing(&file)? {
                    complete(vm, None, d.disk)?;
                }
            }
            Ok(())
        }
    }
}

/// Make an instant restore go on: the overlays, the server, QEMU (started
/// when stopped) and each disk's stream, each made only when missing. A
/// stream that failed (its server died) is replaced by a new one, which copies
/// only what the overlay lacks. Returns QEMU's start note (TCG).
pub(crate) fn resume(vm: &mut OpenVm) -> Result<Option<String>> {
    let Some(r) = vm.rec.restore.clone() else {
        return Ok(None);
    };
    for d in &r.disks {
        ensure_overlay(vm, d)?;
    }
    let started = start_server(vm, &r)?;
    let deadline = Instant::now() + RECONNECT_WAIT;
    let (qmp, note) = match qemu::connect(&vm.paths)? {
        Some(q) => {
            if let Some(from) = started {
                for d in &r.disks {
                    if job(&q, d.disk)?.is_none_or(|j| j.status == "concluded")
                        && has_backing(&q, vm, d.disk)?
                    {
                        wait_reconnected(vm, &d.export, from, deadline)?;
                    }
                }
            }
            (q, None)
        }
        None => qemu::launch(&vm.rec.def, &vm.paths, StartMode::default())?,
    };
    step(vm, "restore-launched");
    while Instant::now() < deadline {
        let Some(r) = vm.rec.restore.clone() else {
            return Ok(note);
        };
        let mut started_one = false;
        for d in &r.disks {
            match job(&qmp, d.disk)? {
                Some(j) if j.status == "pending" => {
                    finish(vm, &qmp, d.disk)?;
                    continue;
                }
                Some(j) if j.status == "concluded" => {
                    qmp.execute(&JobDismiss { id: j.id })?;
                    if j.error.is_none() {
                        complete(vm, Some(&qmp), d.disk)?;
                        continue;
                    }
                }
                Some(_) => continue,
                None => {}
            }
            if !has_backing(&qmp, vm, d.disk)? {
                complete(vm, Some(&qmp), d.disk)?;
                continue;
            }
            start_stream(&qmp, vm, d.disk, r.speed)?;
            started_one = true;
        }
        if !started_one {
            return Ok(note);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let failing: Vec<String> = match &vm.rec.restore {
        Some(r) => r
            .disks
            .iter()
            .filter_map(|d| {
                let j = job(&qmp, d.disk).ok()??;
                let err = j.error?;
                Some(format!("disk {}: {err}", d.disk))
            })
            .collect(),
        None => Vec::new(),
    };
    Err(Error::State(format!(
        "the streams restoring VM '{}' fail ({}); the backup server's log is {}",
        vm.name,
        failing.join("; "),
        server_log(&vm.paths).display()
    )))
}

/// Wait until the running QEMU has connected to export `export` of the server
/// that started writing its log at `from`. Once the delay it holds requests
/// for a lost server is over, QEMU's NBD client fails them until its
/// background reconnection, retried at growing intervals (up to 16 s), reaches
/// the new server; the server logs each client's connection to its export.
fn wait_reconnected(vm: &OpenVm, export: &str, from: u64, deadline: Instant) -> Result<()> {
    use std::io::{Read, Seek};
    let log = server_log(&vm.paths);
    loop {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&log) {
            if f.seek(std::io::SeekFrom::Start(from)).is_ok() {
                let _ = f.read_to_string(&mut text);
            }
        }
        if text.contains(&format!("connected to export '{export}'")) {
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

/// Where disk `d` stands, with QEMU's monitor `qmp` (`None`: QEMU is stopped).
fn phase(qmp: Option<&Qmp>, server_up: bool, d: &RestoredDisk) -> Result<Phase> {
    let Some(q) = qmp else {
        return Ok(Phase::Stopped);
    };
    Ok(match job(q, d.disk)? {
        Some(j) if j.status == "concluded" => Phase::Failed(j.error.unwrap_or_default()),
        _ if !server_up => Phase::ServerDown,
        Some(j) => Phase::Streaming {
            done: j.current_progress,
            total: j.total_progress,
        },
        None => Phase::Streaming {
            done: 0,
            total: d.source.size,
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

/// Check that disk `disk` of VM `name` (which has `n` disks) can be restored
/// from `source` into `file`, a new image in an existing directory; returns
/// `file` made absolute.
fn check_target(
    name: &str,
    n: usize,
    disk: usize,
    file: &Path,
    source: &BackupSource,
) -> Result<PathBuf> {
    if disk >= n {
        return Err(Error::Invalid(format!(
            "VM '{name}' has no disk {disk} (it has {n})"
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
    Ok(file)
}

impl Manager {
    /// Restore disks of stopped VM `name` from backups at once: for each
    /// (disk index, new file, source), the file (which must not exist)
    /// becomes the disk, a qcow2 overlay on the backup served over NBD (one
    /// server for all, so the sources share one repository); the VM starts on
    /// them and one stream per disk copies every cluster into its overlay (at
    /// `speed` bytes per second each, 0 for no limit) while the guest runs.
    /// Returns QEMU's start note (TCG).
    pub fn instant_restore(
        &self,
        name: &str,
        disks: Vec<(usize, PathBuf, BackupSource)>,
        speed: u64,
    ) -> Result<Option<String>> {
        let mut vm = self.open(name)?;
        let n = vm.rec.def.disks.len();
        if disks.is_empty() {
            return Err(Error::Invalid("no disk to restore".into()));
        }
        if qemu::live_pid(&vm.paths).is_some() {
            return Err(Error::State(format!(
                "VM '{name}' is running; stop it before restoring one of its disks"
            )));
        }
        if let Some(r) = &vm.rec.restore {
            return Err(Error::State(format!(
                "VM '{name}' is already restoring disk(s) {} from a backup; wait for it to finish",
                r.disk_list()
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
        let mut restored = Vec::new();
        let mut files = Vec::new();
        for (disk, file, source) in disks {
            let file = check_target(name, n, disk, &file, &source)?;
            if restored.iter().any(|d: &RestoredDisk| d.disk == disk) {
                return Err(Error::Invalid(format!("disk {disk} is named twice")));
            }
            if files.contains(&file) {
                return Err(Error::Invalid(format!(
                    "'{}' is named for two disks",
                    file.display()
                )));
            }
            let first = restored.first().map(|d: &RestoredDisk| &d.source);
            if let Some(f) = first
                .filter(|f| (&f.repo, &f.password_file) != (&source.repo, &source.password_file))
            {
                return Err(Error::Invalid(format!(
                    "the disks come from two repositories ({} and {}): one restore serves one repository",
                    f.repo, source.repo
                )));
            }
            files.push(file);
            restored.push(RestoredDisk::new(disk, source));
        }
        for (d, file) in restored.iter().zip(files) {
            vm.rec.def.disks[d.disk] = Disk {
                file,
                format: "qcow2".into(),
            };
        }
        vm.rec.restore = Some(InstantRestore {
            disks: restored,
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
                for d in &r.disks {
                    let j = job(&q, d.disk)?;
                    if j.is_some_and(|j| j.status == "running" || j.status == "paused") {
                        q.execute_value(
                            "block-job-set-speed",
                            Some(json!({"device": job_id(d.disk), "speed": speed})),
                        )?;
                    }
                }
            }
        }
        let mut done = 0;
        let mut first = true;
        // Per disk: bytes streamed and the stream's total.
        let mut streams = std::collections::BTreeMap::new();
        loop {
            let st = self.restore_status(name)?;
            let Some(st) = st else {
                return Ok(!first);
            };
            first = false;
            // Disks done drop out of the status: their bytes stay counted.
            for d in &st.disks {
                match &d.phase {
                    Phase::Streaming { done: n, total } => {
                        let i = d.disk.disk;
                        let seen = streams.entry(i).or_insert((0, 0));
                        *seen = (seen.0.max(*n), *total);
                    }
                    Phase::Stopped => {
                        return Err(Error::State(format!(
                            "VM '{name}' stopped before disk(s) {} were restored; start it again \
                             (`strata vm start {name}`): it serves the backup and streams the rest",
                            st.restore.disk_list()
                        )))
                    }
                    Phase::ServerDown => {
                        let vm = self.open(name)?;
                        return Err(broken(&vm, "the backup server is not running"));
                    }
                    Phase::Failed(e) => {
                        let vm = self.open(name)?;
                        return Err(broken(
                            &vm,
                            &format!("the stream restoring disk {} failed ({e})", d.disk.disk),
                        ));
                    }
                }
            }
            let (now, total) = streams
                .values()
                .fold((0u64, 0u64), |(a, b), (n, t)| (a + n, b + t));
            progress.set_total(total);
            progress.advance(now.saturating_sub(done));
            done = done.max(now);
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
    let qmp = qemu::connect(&vm.paths)?;
    let server = server_pid(&vm.paths);
    let disks = r
        .disks
        .iter()
        .map(|d| {
            Ok(DiskStatus {
                file: vm.rec.def.disks[d.disk].file.clone(),
                phase: phase(qmp.as_ref(), server.is_some(), d)?,
                disk: d.clone(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Some(RestoreStatus {
        disks,
        server,
        restore: r,
    }))
}

/// Refuse `what` while a disk of the VM is being restored.
pub(crate) fn not_restoring(vm: &OpenVm, what: &str) -> Result<()> {
    match &vm.rec.restore {
        None => Ok(()),
        Some(r) => Err(Error::State(format!(
            "VM '{}' is restoring disk(s) {} from a backup; {what} waits until it is done \
             (`strata vm blockjob wait {}`)",
            vm.name,
            r.disk_list(),
            vm.name
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
        let name = backing_name(&paths, &export_name(1));
        let spec: serde_json::Value =
            serde_json::from_str(name.strip_prefix("json:").unwrap()).unwrap();
        assert_eq!(spec["driver"], "raw");
        assert_eq!(spec["file"]["driver"], "nbd");
        assert_eq!(spec["file"]["server"]["path"], "/s/vms/t/restore.sock");
        assert_eq!(spec["file"]["export"], "restore-disk1");
        assert_eq!(spec["file"]["reconnect-delay"], RECONNECT_DELAY);
    }

    #[test]
    fn a_record_keeps_its_restore_and_older_records_read_without_one() {
        let old = r#"{"def":{"name":"t","memory_mib":64,"cpus":1,"disks":[{"file":"/d.qcow2"}]}}"#;
        let mut rec: VmRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.restore, None);
        assert!(!serde_json::to_string(&rec).unwrap().contains("restore"));
        let source = |snap: &str| BackupSource {
            repo: "/r".into(),
            snapshot: snap.repeat(32),
            password_file: None,
            size: 1 << 20,
        };
        rec.restore = Some(InstantRestore {
            disks: vec![
                RestoredDisk::new(0, source("ab")),
                RestoredDisk::new(1, source("cd")),
            ],
            speed: 4096,
        });
        let back: VmRecord = serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(back.restore, rec.restore);
    }

    #[test]
    fn a_single_disk_restore_recorded_before_several_disks_reads_with_its_export() {
        let single = r#"{"def":{"name":"t","memory_mib":64,"cpus":1,"disks":[{"file":"/d.qcow2"}]},
            "restore":{"disk":0,"source":{"repo":"/r","snapshot":"ab","size":512},"speed":7}}"#;
        let rec: VmRecord = serde_json::from_str(single).unwrap();
        let r = rec.restore.unwrap();
        assert_eq!(r.speed, 7);
        assert_eq!(r.disks.len(), 1);
        assert_eq!((r.disks[0].disk, r.disks[0].source.size), (0, 512));
        assert_eq!(
            r.disks[0].export, "restore",
            "its overlay names this export"
        );
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
