//! The VM manager: define, start, stop, kill, list, status, undefine and exec.
//! No daemon: each call takes the VM's lock, reads its record, finishes or
//! rolls back an interrupted operation (see `recover`), and talks to the VM's
//! own QMP socket.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use strata_qmp::agent::ExecOutput;
use strata_qmp::commands::SystemPowerdown;
use strata_qmp::{Agent, Qmp};

use crate::error::{Error, Result};
use crate::qemu::{self, StartMode, VmPaths};
use crate::record::{VmDef, VmRecord};
use crate::state::{check_name, StateDir, VmLock};

/// The environment variable bounding how long a command waits for the guest
/// agent to answer (seconds).
pub const AGENT_TIMEOUT_ENV: &str = "STRATA_AGENT_TIMEOUT";

/// How long a command waits by default for another one holding the VM's lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(120);

/// Entry point of all VM operations.
#[derive(Debug, Clone)]
pub struct Manager {
    pub(crate) state: StateDir,
    /// How long an operation waits for the VM's lock before failing with
    /// [`Error::Busy`].
    lock_wait: Duration,
}

/// A VM opened for an operation: its lock is held until this is dropped.
pub(crate) struct OpenVm {
    pub name: String,
    pub paths: VmPaths,
    pub rec: VmRecord,
    _lock: VmLock,
}

impl OpenVm {
    pub fn dir(&self) -> &std::path::Path {
        &self.paths.dir
    }
    pub fn save(&self) -> Result<()> {
        self.rec.save(&self.paths.dir)
    }
}

/// A VM's state as `status` and `list` report it (and `list --output=json`
/// and the HTTP API show it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Status {
    pub name: String,
    /// `running`, `paused`, `stopped`, or another QEMU run state; `busy` in a
    /// list when another operation holds the VM (its other fields are then
    /// those of its record as last saved, and its QEMU is not asked).
    pub state: String,
    pub pid: Option<i32>,
    pub current: Option<String>,
    pub snapshots: usize,
    pub def: VmDef,
    /// The instant restore under way, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub restore: Option<crate::restore::RestoreStatus>,
}

impl Manager {
    pub fn new(state: StateDir) -> Self {
        Manager {
            state,
            lock_wait: LOCK_WAIT,
        }
    }

    /// The same manager, waiting at most `wait` for a VM another operation
    /// holds (a service answers "busy" rather than keep a caller waiting).
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    pub fn state_dir(&self) -> &StateDir {
        &self.state
    }

    /// Define a new VM. Refused when the name is taken or the definition is bad.
    pub fn define(&self, mut def: VmDef) -> Result<()> {
        def.validate()?;
        let dir = self.state.vm_dir(&def.name);
        if dir.join(crate::state::RECORD).exists() {
            return Err(Error::Exists(format!(
                "VM '{}' is already defined",
                def.name
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let _lock = VmLock::acquire(&dir, &def.name, self.lock_wait)?;
        if dir.join(crate::state::RECORD).exists() {
            return Err(Error::Exists(format!(
                "VM '{}' is already defined",
                def.name
            )));
        }
        VmRecord {
            def,
            snapshots: Vec::new(),
            current: None,
            intent: None,
            saved: None,
            restore: None,
        }
        .save(&dir)
    }

    /// Open VM `name` for an operation: lock, load, recover.
    pub(crate) fn open(&self, name: &str) -> Result<OpenVm> {
        check_name("VM", name)?;
        let dir = self.state.vm_dir(name);
        if !dir.join(crate::state::RECORD).is_file() {
            return Err(Error::NoSuchVm(name.to_string()));
        }
        let lock = VmLock::acquire(&dir, name, self.lock_wait)?;
        let rec = VmRecord::load(&dir)?;
        let mut vm = OpenVm {
            name: name.to_string(),
            paths: VmPaths { dir },
            rec,
            _lock: lock,
        };
        crate::recover::recover(&mut vm)?;
        crate::restore::settle(&mut vm)?;
        Ok(vm)
    }

    /// Start the VM's QEMU (detached), resuming the guest from its saved state
    /// when `save` left one. Returns a note when TCG is used.
    pub fn start(&self, name: &str) -> Result<Option<String>> {
        let mut vm = self.open(name)?;
        if vm.rec.restore.is_some() {
            // Also on a running VM: the server and the stream are made anew
            // when they died.
            return crate::restore::resume(&mut vm);
        }
        if vm.rec.saved.is_some() {
            // A save interrupted after its record write leaves QEMU stopped
            // after the migration: it cannot have written since, so it goes.
            if let Some(q) = qemu::connect(&vm.paths)? {
                qemu::quit(q, &vm.paths)?;
            }
        }
        if qemu::live_pid(&vm.paths).is_some() {
            return Err(Error::State(format!("VM '{name}' is already running")));
        }
        if vm.rec.saved.is_some() {
            return crate::saved::resume(vm);
        }
        let (_qmp, note) = qemu::launch(&vm.rec.def, &vm.paths, StartMode::default())?;
        Ok(note)
    }

    /// Press the power button, and quit QEMU if the guest has not powered off
    /// within `timeout`. Returns true when the guest shut down by itself.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<bool> {
        let vm = self.open(name)?;
        let qmp = running_qmp(&vm)?;
        qmp.execute(&SystemPowerdown {})?;
        let clean = match qmp.wait_event_named("SHUTDOWN", timeout) {
            Ok(_) => true,
            Err(e) if e.is_qemu_exited() => true,
            Err(e) if e.is_timeout() => false,
            Err(e) => return Err(e.into()),
        };
        qemu::quit(qmp, &vm.paths)?;
        crate::restore::stop_server(&vm.paths);
        Ok(clean)
    }

    /// SIGKILL the VM's QEMU. Returns false when it was not running.
    pub fn kill(&self, name: &str) -> Result<bool> {
        let vm = self.open(name)?;
        let killed = qemu::kill(&vm.paths)?;
        crate::restore::stop_server(&vm.paths);
        Ok(killed)
    }

    /// The status of one VM.
    pub fn status(&self, name: &str) -> Result<Status> {
        let vm = self.open(name)?;
        let (state, pid) = match qemu::connect(&vm.paths)? {
            Some(q) => (qemu::run_state(&q)?, qemu::live_pid(&vm.paths)),
            None => ("stopped".to_string(), None),
        };
        Ok(Status {
            name: vm.name.clone(),
            state,
            pid,
            current: vm.rec.current.clone(),
            snapshots: vm.rec.snapshots.len(),
            def: vm.rec.def.clone(),
            restore: crate::restore::restore_status(&vm)?,
        })
    }

    /// The status of every defined VM. A VM another operation holds is not
    /// waited for: it is listed as `busy` from its record as last saved.
    pub fn list(&self) -> Result<Vec<Status>> {
        let now = self.clone().with_lock_wait(Duration::ZERO);
        let mut out = Vec::new();
        for name in self.state.list()? {
            match now.status(&name) {
                Ok(s) => out.push(s),
                Err(Error::Busy(_)) => out.push(self.busy_status(&name)?),
                // Undefined between the listing and the look.
                Err(Error::NoSuchVm(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// What can be told of a VM without its lock: its record (written
    /// atomically, so whole) and whether its QEMU process lives.
    fn busy_status(&self, name: &str) -> Result<Status> {
        let paths = VmPaths {
            dir: self.state.vm_dir(name),
        };
        let rec = VmRecord::load(&paths.dir)?;
        Ok(Status {
            name: name.to_string(),
            state: "busy".to_string(),
            pid: qemu::live_pid(&paths),
            current: rec.current,
            snapshots: rec.snapshots.len(),
            def: rec.def,
            restore: None,
        })
    }

    /// Forget a stopped VM without snapshots. Its own disks are kept; files
    /// strata made in its directory go with it, among them disks made from
    /// images (thin clones on the image cache, copies). Refused while a disk
    /// in its directory rests on a file elsewhere (other than the image
    /// cache): removing it would lose writes meant for that file.
    pub fn undefine(&self, name: &str) -> Result<()> {
        let vm = self.open(name)?;
        if qemu::live_pid(&vm.paths).is_some() {
            return Err(Error::State(format!(
                "VM '{name}' is running; stop or kill it first"
            )));
        }
        crate::restore::not_restoring(&vm, "undefining it")?;
        if !vm.rec.snapshots.is_empty() {
            return Err(Error::State(format!(
                "VM '{name}' has {} snapshot(s); delete them first",
                vm.rec.snapshots.len()
            )));
        }
        let canonical = |p: PathBuf| p.canonicalize().unwrap_or(p);
        let own = [
            canonical(vm.dir().to_path_buf()),
            canonical(self.state.image_cache()),
        ];
        for d in vm
            .rec
            .def
            .disks
            .iter()
            .filter(|d| d.file.starts_with(vm.dir()))
        {
            let files = d.layer_files().map_err(|e| {
                Error::State(format!(
                    "VM '{name}': its disk {} cannot be read ({e}); it is kept",
                    d.file.display()
                ))
            })?;
            if let Some(f) = files.iter().find(|f| !own.iter().any(|o| f.starts_with(o))) {
                return Err(Error::State(format!(
                    "VM '{name}' runs on disks strata made in its state directory over {}; \
                     delete its snapshots (merging them) before undefining it",
                    f.display()
                )));
            }
        }
        let dir = vm.dir().to_path_buf();
        drop(vm);
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(format!("remove {}", dir.display()), e))
    }

    /// Run `argv` in the guest through the agent and wait for it to exit.
    pub fn exec(&self, name: &str, argv: &[String], timeout: Duration) -> Result<ExecOutput> {
        let vm = self.open(name)?;
        let (path, args) = argv
            .split_first()
            .ok_or_else(|| Error::Invalid("no command given".into()))?;
        running_qmp(&vm)?;
        let mut agent = connect_agent(&vm, agent_timeout().max(Duration::from_secs(60)))?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok(agent.exec(path, &args, timeout)?)
    }

    /// The record of VM `name` (definition and snapshot tree).
    pub fn record(&self, name: &str) -> Result<VmRecord> {
        Ok(self.open(name)?.rec)
    }
}

/// The monitor of a running (or paused) VM, or a clear error when it is stopped.
pub(crate) fn running_qmp(vm: &OpenVm) -> Result<Qmp> {
    qemu::connect(&vm.paths)?
        .ok_or_else(|| Error::State(format!("VM '{}' is not running", vm.name)))
}

/// How long to wait for the agent, from `STRATA_AGENT_TIMEOUT` (default 10 s).
pub(crate) fn agent_timeout() -> Duration {
    std::env::var(AGENT_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(10))
}

/// Connect to the VM's guest agent and sync, within `timeout`.
pub(crate) fn connect_agent(vm: &OpenVm, timeout: Duration) -> Result<Agent> {
    let start = Instant::now();
    Agent::connect(&vm.paths.agent(), timeout).map_err(|e| {
        Error::State(format!(
            "the guest agent of VM '{}' does not answer within {:?} ({e})",
            vm.name,
            start.elapsed()
        ))
    })
}

/// Files strata creates for a VM live under its directory.
pub(crate) fn vm_file(vm: &OpenVm, sub: &str, name: String) -> Result<PathBuf> {
    let dir = vm.dir().join(sub);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    Ok(dir.join(name))
}
