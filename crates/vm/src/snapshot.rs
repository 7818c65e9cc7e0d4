//! Snapshots of a VM: create, revert and delete, internal and external, with or
//! without memory, for a running or a stopped VM.
//!
//! Every multi-step operation first records an [`Intent`] (with the files it
//! will create) and records its result, clearing the intent, in one atomic write
//! of the VM record: until that write nothing refers to the new files, and the
//! next command removes them (see `recover`). A failure on the way undoes what
//! was done, so no half snapshot is left on disk or in the record.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use strata_jobs::Cancel;
use strata_qmp::commands::{
    blockdev_snapshot_action, BlockCommit, BlockdevAdd, BlockdevDel, Cont, JobComplete,
    QueryBlockJobs, SnapshotDelete, SnapshotLoad, SnapshotSave, Stop, Transaction,
};
use strata_qmp::{Agent, Qmp};

use crate::engine;
use crate::error::{Error, Result};
use crate::live::{self, node_of_file, stamp, JOB_TIMEOUT};
use crate::manager::{agent_timeout, connect_agent, vm_file, Manager, OpenVm};
use crate::memory;
use crate::qemu::{self, StartMode};
use crate::record::{Disk, Intent, Kind, MemoryLayout, Snapshot};
use crate::state::check_name;

/// The environment variable naming a step at which the command exits at once,
/// as if killed (for crash tests of the recovery): see [`step`].
pub const CRASH_AT_ENV: &str = "STRATA_VM_CRASH_AT";

/// The environment variable naming a step at which the VM's QEMU is killed
/// (SIGKILL) and the command goes on, for fault tests: see [`step`].
pub const KILL_QEMU_AT_ENV: &str = "STRATA_VM_KILL_QEMU_AT";

/// The environment variable naming steps (comma-separated) at which the
/// command waits [`STALL`] before going on, so a test can act at that point
/// (a cancel before an operation starts, or after its point of no return).
pub const STALL_AT_ENV: &str = "STRATA_VM_STALL_AT";

/// How long a step named in `STRATA_VM_STALL_AT` waits.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(2);

/// A named point between the steps of a multi-step operation. When
/// `STRATA_VM_CRASH_AT` names it, the process exits at once with status 86,
/// running no cleanup, like a strata killed there. When
/// `STRATA_VM_KILL_QEMU_AT` names it, the VM's QEMU is killed there and the
/// command carries on as it would after QEMU died by itself.
pub(crate) fn step(vm: &OpenVm, name: &str) {
    crash_point(name);
    if std::env::var(STALL_AT_ENV).is_ok_and(|v| v.split(',').any(|s| s == name)) {
        eprintln!("strata vm: stalling {STALL:?} at step '{name}' ({STALL_AT_ENV})");
        std::thread::sleep(STALL);
    }
    if std::env::var(KILL_QEMU_AT_ENV).is_ok_and(|v| v == name) {
        eprintln!("strata vm: killing QEMU at step '{name}' ({KILL_QEMU_AT_ENV})");
        let _ = qemu::kill(&vm.paths);
    }
}

/// The environment variable naming a step at which the operation fails as if
/// a QEMU command had failed there, QEMU running on (for tests of the
/// undo): see [`fail_point`].
pub const FAIL_AT_ENV: &str = "STRATA_VM_FAIL_AT";

/// A named point where `STRATA_VM_FAIL_AT` makes the operation fail with
/// [`Error::Qemu`], so its undo runs against a live QEMU.
pub(crate) fn fail_point(name: &str) -> Result<()> {
    if std::env::var(FAIL_AT_ENV).is_ok_and(|v| v == name) {
        eprintln!("strata vm: failing at step '{name}' ({FAIL_AT_ENV})");
        return Err(Error::Qemu(format!(
            "failed at step '{name}' ({FAIL_AT_ENV})"
        )));
    }
    Ok(())
}

/// The crash half of [`step`], for steps of other crates' operations on VMs
/// and their files: the process exits at once with status 86 when
/// `STRATA_VM_CRASH_AT` names `name`.
pub fn crash_point(name: &str) {
    if std::env::var(CRASH_AT_ENV).is_ok_and(|v| v == name) {
        eprintln!("strata vm: crashing at step '{name}' ({CRASH_AT_ENV})");
        std::process::exit(86);
    }
}

/// What `snapshot create` was asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateOptions {
    /// Disks only, no memory (a running VM's memory is included otherwise).
    pub disk_only: bool,
    /// Freeze the guest's filesystems through the agent around the switch.
    pub quiesce: bool,
    /// Internal or external; chosen from the other options when `None`.
    pub kind: Option<Kind>,
    /// External with memory: pause the guest only while the disks switch and
    /// save its memory as it was then while it runs on (see `memory`).
    pub background: bool,
}

/// What `snapshot delete` was asked for (also the query of the HTTP API's
/// delete).
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
pub struct DeleteOptions {
    /// Delete the snapshot's descendants too.
    pub children: bool,
    /// Only forget the snapshot; its data stays where it is.
    pub metadata_only: bool,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Run state of a VM: the monitor when QEMU runs, and `running`, `paused`,
/// `stopped` or QEMU's other states.
fn vm_state(vm: &OpenVm) -> Result<(Option<Qmp>, String)> {
    match qemu::connect(&vm.paths)? {
        Some(q) => {
            let s = qemu::run_state(&q)?;
            Ok((Some(q), s))
        }
        None => Ok((None, "stopped".to_string())),
    }
}

/// Thaws the guest's filesystems when dropped, on every path.
pub(crate) struct FreezeGuard {
    agent: Agent,
    frozen: bool,
}

impl FreezeGuard {
    pub(crate) fn freeze(mut agent: Agent) -> Result<(FreezeGuard, u64)> {
        let n = agent.fsfreeze_freeze().map_err(|e| {
            // A partial freeze is undone before reporting.
            let _ = agent.fsfreeze_thaw();
            Error::State(format!("cannot quiesce the guest: {e}"))
        })?;
        Ok((
            FreezeGuard {
                agent,
                frozen: true,
            },
            n,
        ))
    }

    pub(crate) fn thaw(&mut self) -> Result<()> {
        if self.frozen {
            self.frozen = false;
            self.agent.fsfreeze_thaw()?;
        }
        Ok(())
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        let _ = self.thaw();
    }
}

/// Refuse while a block job runs: its result would be mixed into the snapshot.
pub(crate) fn no_block_jobs(vm: &OpenVm, qmp: &Qmp) -> Result<()> {
    let jobs = qmp.execute(&QueryBlockJobs {})?;
    if let Some(j) = jobs.first() {
        return Err(Error::State(format!(
            "VM '{}' has a block job running ({} on {}); wait for it or cancel it first",
            vm.name, j.job_type, j.device
        )));
    }
    Ok(())
}

fn remove_files(files: &[PathBuf]) {
    for f in files {
        let _ = std::fs::remove_file(f);
    }
}

impl Manager {
    /// Create snapshot `snap` of VM `name`.
    pub fn snapshot_create(&self, name: &str, snap: &str, opts: CreateOptions) -> Result<Snapshot> {
        self.snapshot_create_cancellable(name, snap, opts, &Cancel::new())
    }

    /// [`Manager::snapshot_create`], stopped by `cancel`: a cancel before the
    /// VM's lock is taken means nothing starts; one while QEMU saves memory
    /// stops QEMU's work (`job-cancel` of the internal snapshot's
    /// `snapshot-save` job, `migrate_cancel` of an external snapshot's memory
    /// copy) and removes what was made, the VM running as before; the switch
    /// of the disks and the recording of the snapshot are past the point of no
    /// return (a cancel then is answered too late and the snapshot completes),
    /// except that a `background` snapshot's memory save, which goes on after
    /// the switch, may still be cancelled: QEMU's save is stopped
    /// (`migrate_cancel`), the memory file removed and the snapshot recorded
    /// as a disk-only one. A cancelled create returns [`Error::Cancelled`]
    /// saying what was undone or kept.
    pub fn snapshot_create_cancellable(
        &self,
        name: &str,
        snap: &str,
        opts: CreateOptions,
        cancel: &Cancel,
    ) -> Result<Snapshot> {
        check_name("snapshot", snap)?;
        let mut vm = self.open(name)?;
        step(&vm, "create-begin");
        not_started(cancel)?;
        crate::restore::not_restoring(&vm, "taking a snapshot")?;
        if vm.rec.snapshots.iter().any(|s| s.name == snap) {
            return Err(Error::Exists(format!(
                "VM '{name}' already has a snapshot '{snap}'"
            )));
        }
        let (qmp, state) = vm_state(&vm)?;
        let live = match state.as_str() {
            "running" | "paused" => true,
            "stopped" => false,
            other => {
                return Err(Error::State(format!(
                "VM '{name}' is in state '{other}'; a snapshot needs it running, paused or stopped"
            )))
            }
        };
        let memory = live && !opts.disk_only;
        let kind = opts.kind.unwrap_or(if live && opts.disk_only {
            Kind::External
        } else {
            Kind::Internal
        });
        if opts.quiesce && !(live && opts.disk_only) {
            return Err(Error::Invalid(
                "--quiesce needs a running VM and --disk-only (a memory snapshot would keep the guest frozen)".into(),
            ));
        }
        if opts.background && !(memory && kind == Kind::External) {
            return Err(Error::Invalid(
                "--background needs an external snapshot with memory of a running VM".into(),
            ));
        }
        if live && kind == Kind::Internal && opts.disk_only {
            return Err(Error::Invalid(
                "an internal snapshot of a running VM always includes its memory; use --external with --disk-only, or stop the VM".into(),
            ));
        }
        if kind == Kind::Internal {
            if let Some(d) = vm.rec.def.disks.iter().find(|d| d.format != "qcow2") {
                return Err(Error::Invalid(format!(
                    "disk '{}' is {}: internal snapshots need qcow2 (use --external)",
                    d.file.display(),
                    d.format
                )));
            }
        }
        if let Some(q) = &qmp {
            no_block_jobs(&vm, q)?;
        }
        // The agent is asked before anything is made, so a silent agent leaves
        // nothing behind.
        let agent = if opts.quiesce {
            Some(
                connect_agent(&vm, agent_timeout())
                    .map_err(|e| Error::State(format!("cannot quiesce, no snapshot taken: {e}")))?,
            )
        } else {
            None
        };
        let mut s = Snapshot {
            name: snap.to_string(),
            parent: vm.rec.current.clone(),
            created: now_secs(),
            kind,
            memory,
            memory_file: None,
            memory_layout: MemoryLayout::default(),
            disks: vm.rec.def.disks.clone(),
            vm_state: state.clone(),
            frozen_filesystems: None,
            pause_ms: None,
        };
        match (kind, &qmp) {
            (Kind::Internal, Some(q)) => internal_live(&mut vm, q, &mut s, cancel)?,
            (Kind::Internal, None) => {
                // The engine's snapshot is quick and made in one step.
                not_started(cancel)?;
                cancel.point_of_no_return().map_err(|_| cancelled_early())?;
                vm.rec.intent = Some(Intent {
                    op: "create".into(),
                    snapshot: snap.into(),
                    kind,
                    new_files: Vec::new(),
                    quiesce: false,
                });
                vm.save()?;
                if let Err(e) = engine::internal_create(&s.disks, snap) {
                    vm.rec.intent = None;
                    vm.save()?;
                    return Err(e);
                }
            }
            (Kind::External, q) => {
                external_create(&mut vm, q.as_ref(), &mut s, agent, opts.background, cancel)?
            }
        }
        step(&vm, "create-done");
        vm.rec.snapshots.push(s.clone());
        vm.rec.current = Some(snap.to_string());
        vm.rec.intent = None;
        vm.save()?;
        if memory && !s.memory {
            debug_assert!(cancel.is_cancelled());
            return Err(Error::Cancelled(format!(
                "QEMU's background save of the memory was stopped (migrate_cancel) after the disks had switched and its file removed; snapshot '{snap}' was kept as a disk-only snapshot"
            )));
        }
        debug_assert!(cancel.is_past_return());
        Ok(s)
    }
}

/// An internal snapshot of a running VM: one `snapshot-save` job over all
/// disks. A cancel while the job runs is passed to QEMU (`job-cancel`); a
/// cancel that comes before the snapshot is past its point of no return
/// (whether QEMU stopped early or had finished) deletes what the job wrote,
/// so no snapshot is left in the files, and the guest runs as it did.
fn internal_live(vm: &mut OpenVm, qmp: &Qmp, s: &mut Snapshot, cancel: &Cancel) -> Result<()> {
    let nodes = qemu::top_nodes(qmp, vm.rec.def.disks.len())?;
    vm.rec.intent = Some(Intent {
        op: "create".into(),
        snapshot: s.name.clone(),
        kind: Kind::Internal,
        new_files: Vec::new(),
        quiesce: false,
    });
    vm.save()?;
    qmp.take_events();
    let job = format!("strata-save-{}", stamp());
    let mut asked = false;
    let saved = qmp
        .execute(&SnapshotSave {
            job_id: job.clone(),
            tag: s.name.clone(),
            vmstate: nodes[0].clone(),
            devices: nodes.clone(),
        })
        .and_then(|_| {
            qmp.finish_job_polling("snapshot-save", &job, JOB_TIMEOUT, || {
                if cancel.is_cancelled() && !asked {
                    asked = true;
                    let _ = qmp.execute_value("job-cancel", Some(json!({ "id": job })));
                }
            })
        })
        .map_err(Error::from)
        .and_then(|()| {
            cancel.point_of_no_return().map_err(|_| {
                Error::Cancelled("the snapshot QEMU had just taken was deleted again".into())
            })
        });
    if let Err(e) = saved {
        // Remove whatever part was written, then the intent.
        let del = format!("strata-undo-{}", stamp());
        let _ = qmp.run_job(
            &SnapshotDelete {
                job_id: del.clone(),
                tag: s.name.clone(),
                devices: nodes,
            },
            &del,
            JOB_TIMEOUT,
        );
        vm.rec.intent = None;
        vm.save()?;
        if !cancel.is_cancelled() {
            return Err(e);
        }
        // QEMU resumes a guest it stopped for the save however the job ends;
        // this makes sure of it.
        if s.vm_state == "running" && qemu::run_state(qmp)? != "running" {
            qmp.execute(&Cont {})?;
        }
        return Err(match e {
            Error::Cancelled(m) => Error::Cancelled(format!("{m}; the VM runs as before")),
            _ => Error::Cancelled(format!(
                "QEMU's snapshot-save job was cancelled (job-cancel) and what it wrote deleted; the VM runs as before ({e})"
            )),
        });
    }
    s.pause_ms = memory::pause_from_events(qmp).0;
    Ok(())
}

/// `Err(Cancelled)` when `cancel` was asked for before the operation began.
fn not_started(cancel: &Cancel) -> Result<()> {
    if cancel.is_cancelled() {
        return Err(cancelled_early());
    }
    Ok(())
}

fn cancelled_early() -> Error {
    Error::Cancelled("before it started; nothing was done".into())
}

/// An external snapshot: new overlays on every disk, switched to in one
/// `transaction` when the VM runs, with the memory saved at that same instant
/// when asked (`background`: see [`CreateOptions::background`]).
fn external_create(
    vm: &mut OpenVm,
    qmp: Option<&Qmp>,
    s: &mut Snapshot,
    agent: Option<Agent>,
    background: bool,
    cancel: &Cancel,
) -> Result<()> {
    let st = stamp();
    let mut overlays = Vec::new();
    for i in 0..vm.rec.def.disks.len() {
        overlays.push(vm_file(
            vm,
            "disks",
            format!("disk{i}-{}-{st}.qcow2", s.name),
        )?);
    }
    let memory_file = if s.memory {
        Some(vm_file(vm, "memory", format!("{}-{st}.mem", s.name))?)
    } else {
        None
    };
    let mut new_files = overlays.clone();
    new_files.extend(memory_file.clone());
    vm.rec.intent = Some(Intent {
        op: "create".into(),
        snapshot: s.name.clone(),
        kind: Kind::External,
        new_files: new_files.clone(),
        quiesce: agent.is_some(),
    });
    vm.save()?;
    let undo = |vm: &mut OpenVm, e: Error| -> Error {
        remove_files(&new_files);
        vm.rec.intent = None;
        let e = if cancel.is_cancelled() {
            let memory = match (qmp.is_some(), &memory_file) {
                (true, Some(_)) => "QEMU's copy of the memory was cancelled (migrate_cancel); ",
                _ => "",
            };
            Error::Cancelled(format!(
                "{memory}the {} new overlay(s){} removed; the VM runs on its disks as before",
                overlays.len(),
                if memory_file.is_some() {
                    " and the memory file"
                } else {
                    ""
                }
            ))
        } else {
            e
        };
        match vm.save() {
            Ok(()) => e,
            Err(e2) => Error::State(format!("{e}; recording the rollback failed too: {e2}")),
        }
    };
    for (ov, d) in overlays.iter().zip(&vm.rec.def.disks) {
        if let Err(e) = engine::create_overlay(ov, d) {
            return Err(undo(vm, e));
        }
    }
    step(vm, "create-overlays");
    match qmp {
        Some(q) => {
            let targets = Targets {
                overlays: &overlays,
                memory: memory_file.as_ref().map(|m| (m, background)),
                stamp: &st,
            };
            if let Err(e) = switch_live(vm, q, s, &targets, agent, cancel) {
                return Err(undo(vm, e));
            }
        }
        None => {
            if cancel.point_of_no_return().is_err() {
                return Err(undo(vm, cancelled_early()));
            }
        }
    }
    match memory_file {
        // A cancel stopped a background save after the switch: the snapshot
        // stays, without memory.
        Some(m) if !s.memory => remove_files(&[m]),
        m => s.memory_file = m,
    }
    vm.rec.def.disks = overlays
        .into_iter()
        .map(|file| Disk {
            file,
            format: "qcow2".into(),
        })
        .collect();
    Ok(())
}

/// What an external snapshot switches a running VM to.
struct Targets<'a> {
    /// The new overlays, one per disk.
    overlays: &'a [PathBuf],
    /// With memory: its file, and whether it is saved in the background.
    memory: Option<(&'a PathBuf, bool)>,
    /// The stamp of the new files, also in the names of their QEMU nodes.
    stamp: &'a str,
}

/// The live part of an external snapshot. On error nothing has been switched:
/// added nodes are removed again and the guest runs as before.
fn switch_live(
    vm: &OpenVm,
    qmp: &Qmp,
    s: &mut Snapshot,
    targets: &Targets,
    agent: Option<Agent>,
    cancel: &Cancel,
) -> Result<()> {
    let (overlays, memory, st) = (targets.overlays, targets.memory, targets.stamp);
    let tops = qemu::top_nodes(qmp, vm.rec.def.disks.len())?;
    let mut added = Vec::new();
    let mut switched = false;
    let result = (|| -> Result<()> {
        for (i, ov) in overlays.iter().enumerate() {
            let node = format!("s{st}d{i}");
            qmp.execute(&BlockdevAdd(json!({
                "driver": "qcow2",
                "node-name": node,
                "file": {"driver": "file", "filename": ov},
                "backing": null,
            })))?;
            added.push(node);
        }
        let actions = tops
            .iter()
            .zip(&added)
            .map(|(t, o)| blockdev_snapshot_action(t, o))
            .collect();
        let mut guard = match agent {
            Some(a) => {
                let (g, n) = FreezeGuard::freeze(a)?;
                s.frozen_filesystems = Some(n);
                Some(g)
            }
            None => None,
        };
        // The disks switch past the point of no return: undoing the switch
        // would mean merging the guest's new writes back.
        match memory {
            None => {
                cancel.point_of_no_return()?;
                let t0 = Instant::now();
                qmp.execute(&Transaction { actions })?;
                s.pause_ms = Some(t0.elapsed().as_millis() as u64);
            }
            Some((mem, background)) => {
                // Memory and disks of one instant (see `memory`).
                let running = s.vm_state == "running";
                let taken = memory::snapshot(qmp, mem, running, background, cancel, || {
                    cancel.point_of_no_return()?;
                    qmp.execute(&Transaction { actions })?;
                    switched = true;
                    Ok(())
                })?;
                s.pause_ms = taken.pause_ms;
                s.memory_layout = taken.layout;
                s.memory = taken.memory;
            }
        }
        if let Some(g) = guard.as_mut() {
            g.thaw()?;
        }
        Ok(())
    })();
    if result.is_err() {
        if switched {
            // Merge back whatever the guest wrote since the switch, and pivot.
            for (t, o) in tops.iter().zip(&added) {
                active_commit(qmp, o, t)?;
            }
        }
        for n in &added {
            let _ = qmp.execute(&BlockdevDel {
                node_name: n.clone(),
            });
        }
    }
    result
}

/// Start merging the active layer `top` into the node `base` below it and wait
/// until the commit is ready (`base` in step with `top`); returns the job's id.
fn commit_ready(qmp: &Qmp, top: &str, base: &str) -> Result<String> {
    let job = format!("strata-commit-{}", stamp());
    qmp.execute(&BlockCommit {
        job_id: job.clone(),
        device: top.to_string(),
        top_node: None,
        base_node: Some(base.to_string()),
        auto_dismiss: Some(false),
    })?;
    qmp.wait_block_job_ready(&job, JOB_TIMEOUT)?;
    Ok(job)
}

/// Complete ready commits `(job, top)`: each `base` becomes the active layer
/// (the pivot) and its `top` is removed. Call with the guest paused after a
/// flush (see `live::flushed_pause`).
fn complete_commits(qmp: &Qmp, jobs: &[(String, String)]) -> Result<()> {
    for (job, top) in jobs {
        qmp.execute(&JobComplete { id: job.clone() })?;
        qmp.finish_job("block-commit", job, JOB_TIMEOUT)?;
        let _ = qmp.execute(&BlockdevDel {
            node_name: top.clone(),
        });
    }
    Ok(())
}

/// Merge the active layer `top` into the node `base` below it and make `base`
/// the active layer again (commit, wait until ready, then with the guest paused
/// and every node flushed complete the pivot, and remove `top`).
pub(crate) fn active_commit(qmp: &Qmp, top: &str, base: &str) -> Result<()> {
    let job = commit_ready(qmp, top, base)?;
    live::flushed_pause(qmp, || complete_commits(qmp, &[(job, top.to_string())]))
}

/// Start QEMU paused and load internal snapshot `tag` (disks and memory).
fn load_internal(vm: &OpenVm, qmp: &Qmp, tag: &str) -> Result<()> {
    let nodes = qemu::top_nodes(qmp, vm.rec.def.disks.len())?;
    let job = format!("strata-load-{}", stamp());
    qmp.run_job(
        &SnapshotLoad {
            job_id: job.clone(),
            tag: tag.to_string(),
            vmstate: nodes[0].clone(),
            devices: nodes,
        },
        &job,
        JOB_TIMEOUT,
    )?;
    Ok(())
}

/// Leave the guest running or paused as it was when snapshot `s` was taken.
fn set_run_state(qmp: &Qmp, s: &Snapshot) -> Result<()> {
    let now = qemu::run_state(qmp)?;
    if s.vm_state == "running" && now != "running" {
        qmp.execute(&Cont {})?;
    } else if s.vm_state == "paused" && now == "running" {
        qmp.execute(&Stop {})?;
    }
    Ok(())
}

impl Manager {
    /// Revert VM `name` to snapshot `snap`. A running VM that must be restarted
    /// for it (a disk-only snapshot) is refused unless `force`.
    pub fn snapshot_revert(&self, name: &str, snap: &str, force: bool) -> Result<()> {
        self.snapshot_revert_cancellable(name, snap, force, &Cancel::new())
    }

    /// [`Manager::snapshot_revert`], which `cancel` stops only before it
    /// starts: once the VM's lock is taken the revert is past its point of no
    /// return (it replaces the running state) and a cancel is answered too late.
    pub fn snapshot_revert_cancellable(
        &self,
        name: &str,
        snap: &str,
        force: bool,
        cancel: &Cancel,
    ) -> Result<()> {
        let mut vm = self.open(name)?;
        cancel.point_of_no_return().map_err(|_| cancelled_early())?;
        crate::restore::not_restoring(&vm, "reverting to a snapshot")?;
        let s = vm.rec.snapshot(snap)?.clone();
        if vm.rec.saved.is_some() {
            return Err(Error::State(format!(
                "VM '{name}' has a saved state that a revert would make stale; start it (it resumes) first"
            )));
        }
        let (qmp, state) = vm_state(&vm)?;
        if qmp.is_some() && !s.memory && !force {
            return Err(Error::State(format!(
                "reverting running VM '{name}' to disk-only snapshot '{snap}' restarts the guest; add --force"
            )));
        }
        if let Some(q) = &qmp {
            no_block_jobs(&vm, q)?;
        }
        match s.kind {
            Kind::Internal => {
                if vm.rec.def.disks != s.disks {
                    return Err(Error::State(format!(
                        "internal snapshot '{snap}' lives in files that later external snapshots froze as backing files; it cannot be reverted to in place"
                    )));
                }
                match (qmp, s.memory) {
                    (Some(q), true) => {
                        load_internal(&vm, &q, snap)?;
                        set_run_state(&q, &s)?;
                    }
                    (None, true) => {
                        let (q, _) = qemu::launch(
                            &vm.rec.def,
                            &vm.paths,
                            StartMode {
                                paused: true,
                                incoming: false,
                            },
                        )?;
                        load_internal(&vm, &q, snap)?;
                        set_run_state(&q, &s)?;
                    }
                    (q, false) => {
                        let was_live = q.is_some();
                        if let Some(q) = q {
                            qemu::quit(q, &vm.paths)?;
                        }
                        engine::internal_apply(&s.disks, snap)?;
                        if was_live {
                            qemu::launch(&vm.rec.def, &vm.paths, StartMode::default())?;
                        }
                    }
                }
                vm.rec.current = Some(snap.to_string());
                vm.save()
            }
            Kind::External => external_revert(&mut vm, qmp, &state, &s),
        }
    }
}

/// Revert to an external snapshot: new overlays on the snapshot's files become
/// the VM's disks; the memory is loaded from its file when the snapshot has it.
fn external_revert(vm: &mut OpenVm, qmp: Option<Qmp>, state: &str, s: &Snapshot) -> Result<()> {
    let st = stamp();
    let mut overlays = Vec::new();
    for i in 0..s.disks.len() {
        overlays.push(vm_file(
            vm,
            "disks",
            format!("disk{i}-{}-{st}.qcow2", s.name),
        )?);
    }
    vm.rec.intent = Some(Intent {
        op: "revert".into(),
        snapshot: s.name.clone(),
        kind: Kind::External,
        new_files: overlays.clone(),
        quiesce: false,
    });
    vm.save()?;
    let made = overlays
        .iter()
        .zip(&s.disks)
        .try_for_each(|(ov, d)| engine::create_overlay(ov, d));
    if let Err(e) = made {
        remove_files(&overlays);
        vm.rec.intent = None;
        vm.save()?;
        return Err(e);
    }
    step(vm, "revert-overlays");
    let was_live = qmp.is_some() && state != "stopped";
    if let Some(q) = qmp {
        qemu::quit(q, &vm.paths)?;
    }
    let old = std::mem::replace(
        &mut vm.rec.def.disks,
        overlays
            .into_iter()
            .map(|file| Disk {
                file,
                format: "qcow2".into(),
            })
            .collect(),
    );
    vm.rec.current = Some(s.name.clone());
    vm.rec.intent = None;
    vm.save()?;
    // The overlays left behind hold only the discarded state.
    discard_unused(vm, &old);
    if let Some(mem) = &s.memory_file {
        let (q, _) = crate::saved::launch_from_memory(vm, mem, s.memory_layout)?;
        set_run_state(&q, s)?;
    } else if was_live {
        qemu::launch(&vm.rec.def, &vm.paths, StartMode::default())?;
    }
    Ok(())
}

/// Remove files strata made in the VM's directory that nothing refers to any more.
fn discard_unused(vm: &OpenVm, files: &[Disk]) {
    for d in files {
        if d.file.starts_with(vm.dir()) && !vm.rec.file_in_use(&d.file) {
            let _ = std::fs::remove_file(&d.file);
        }
    }
}

impl Manager {
    /// Delete snapshot `snap` of VM `name` (see [`DeleteOptions`]).
    pub fn snapshot_delete(&self, name: &str, snap: &str, opts: DeleteOptions) -> Result<()> {
        self.snapshot_delete_cancellable(name, snap, opts, &Cancel::new())
    }

    /// [`Manager::snapshot_delete`], which `cancel` stops only before it
    /// starts: a merge half done would change what the snapshot holds, so once
    /// the VM's lock is taken a cancel is answered too late.
    pub fn snapshot_delete_cancellable(
        &self,
        name: &str,
        snap: &str,
        opts: DeleteOptions,
        cancel: &Cancel,
    ) -> Result<()> {
        let mut vm = self.open(name)?;
        cancel.point_of_no_return().map_err(|_| cancelled_early())?;
        crate::restore::not_restoring(&vm, "deleting a snapshot")?;
        vm.rec.snapshot(snap)?;
        let mut order = Vec::new();
        if opts.children {
            descendants_leaves_first(&vm, snap, &mut order);
        } else {
            let kids = vm.rec.children(snap);
            let s = vm.rec.snapshot(snap)?;
            if !kids.is_empty() && s.kind == Kind::External && !opts.metadata_only {
                return merge_middle(&mut vm, snap);
            }
        }
        order.push(snap.to_string());
        for n in order {
            delete_one(&mut vm, &n, opts.metadata_only)?;
        }
        Ok(())
    }
}

fn descendants_leaves_first(vm: &OpenVm, snap: &str, out: &mut Vec<String>) {
    for c in vm.rec.children(snap) {
        descendants_leaves_first(vm, &c, out);
        out.push(c);
    }
}

/// Forget snapshot `snap`: its children take its parent, and so does `current`.
fn forget(vm: &mut OpenVm, snap: &str) {
    let parent = vm.rec.snapshot(snap).ok().and_then(|s| s.parent.clone());
    vm.rec.snapshots.retain(|s| s.name != snap);
    for s in &mut vm.rec.snapshots {
        if s.parent.as_deref() == Some(snap) {
            s.parent = parent.clone();
        }
    }
    if vm.rec.current.as_deref() == Some(snap) {
        vm.rec.current = parent;
    }
}

fn delete_one(vm: &mut OpenVm, snap: &str, metadata_only: bool) -> Result<()> {
    let s = vm.rec.snapshot(snap)?.clone();
    if metadata_only {
        forget(vm, snap);
        return vm.save();
    }
    let (qmp, _) = vm_state(vm)?;
    match s.kind {
        Kind::Internal => {
            match &qmp {
                Some(q) if vm.rec.def.disks == s.disks => {
                    let nodes = qemu::top_nodes(q, s.disks.len())?;
                    let job = format!("strata-del-{}", stamp());
                    q.run_job(
                        &SnapshotDelete {
                            job_id: job.clone(),
                            tag: snap.to_string(),
                            devices: nodes,
                        },
                        &job,
                        JOB_TIMEOUT,
                    )?;
                }
                Some(_) => {
                    return Err(Error::State(format!(
                        "internal snapshot '{snap}' is in backing files the running VM holds read-only; stop the VM to delete it"
                    )))
                }
                None => engine::internal_delete(&s.disks, snap)?,
            }
            forget(vm, snap);
            vm.save()
        }
        Kind::External => external_delete_leaf(vm, qmp, &s),
    }
}

/// Delete a leaf external snapshot. When the VM's disks are overlays on the
/// snapshot's files, the overlays are merged down into them (active commit with
/// pivot while running, strata's engine when stopped) and the VM runs on the
/// snapshot's files again; otherwise the snapshot's files hold nothing anyone
/// needs and the ones strata made are removed.
fn external_delete_leaf(vm: &mut OpenVm, qmp: Option<Qmp>, s: &Snapshot) -> Result<()> {
    // The VM's disks are overlays strata made directly on the snapshot's files
    // (a pull or a copy may have made them stand alone since).
    let mut on_top = vm.rec.current.as_deref() == Some(s.name.as_str())
        && vm
            .rec
            .def
            .disks
            .iter()
            .all(|d| d.file.starts_with(vm.dir()));
    if on_top {
        for (d, f) in vm.rec.def.disks.iter().zip(&s.disks) {
            on_top &= engine::is_on(&d.file, &f.file)?;
        }
    }
    let mut leftovers: Vec<Disk> = Vec::new();
    if on_top {
        let shared = vm
            .rec
            .snapshots
            .iter()
            .any(|o| o.name != s.name && o.disks.iter().any(|d| vm.rec.def.disks.contains(d)));
        if shared {
            return Err(Error::State(format!(
                "the VM's current disks also hold other snapshots; delete '{}' with --metadata-only",
                s.name
            )));
        }
        vm.rec.intent = Some(Intent {
            op: "delete".into(),
            snapshot: s.name.clone(),
            kind: Kind::External,
            new_files: Vec::new(),
            quiesce: false,
        });
        vm.save()?;
        match &qmp {
            Some(q) => {
                no_block_jobs(vm, q)?;
                let tops = qemu::top_nodes(q, s.disks.len())?;
                let mut jobs = Vec::new();
                for (top, base) in tops.iter().zip(&s.disks) {
                    let base_node = node_of_file(q, &base.file)?;
                    jobs.push((commit_ready(q, top, &base_node)?, top.clone()));
                }
                // The record names the merged files before the guest resumes on
                // them: a QEMU killed after the pivot leaves nothing newer there
                // for recovery's second merge to overwrite.
                live::flushed_pause(q, || {
                    complete_commits(q, &jobs)?;
                    step(vm, "delete-merged");
                    leftovers = std::mem::replace(&mut vm.rec.def.disks, s.disks.clone());
                    forget(vm, &s.name);
                    vm.rec.intent = None;
                    vm.save()
                })?;
            }
            None => {
                for d in &vm.rec.def.disks {
                    engine::commit_into_backing(d)?;
                }
                step(vm, "delete-merged");
                leftovers = std::mem::replace(&mut vm.rec.def.disks, s.disks.clone());
            }
        }
    } else {
        leftovers.extend(s.disks.iter().cloned());
    }
    forget(vm, &s.name);
    vm.rec.intent = None;
    vm.save()?;
    discard_unused(vm, &leftovers);
    if let Some(m) = &s.memory_file {
        let _ = std::fs::remove_file(m);
    }
    Ok(())
}

/// Delete an external snapshot that has children: every image built directly on
/// the snapshot's files (children's files, the VM's current overlays) takes in
/// what those files provided and is pointed past them, so every other snapshot
/// and the current state keep their content; then the snapshot's files go (when
/// strata made them and nothing else uses them). While the VM runs, the image
/// above them in QEMU's chain takes their data with `block-stream` as the guest
/// runs; images QEMU does not have open are rebased with strata's engine.
fn merge_middle(vm: &mut OpenVm, snap: &str) -> Result<()> {
    let qmp = qemu::connect(&vm.paths)?;
    if let Some(q) = &qmp {
        no_block_jobs(vm, q)?;
    }
    let frozen = vm.rec.snapshot(snap)?.disks.clone();
    for o in vm.rec.snapshots.iter().filter(|o| o.kind == Kind::Internal) {
        for d in &o.disks {
            for f in &frozen {
                if d.file != f.file && engine::is_on(&d.file, &f.file)? {
                    return Err(Error::State(format!(
                        "internal snapshot '{}' is kept in '{}', built on external snapshot '{snap}'; merging would change what it shows: delete it first, or use --metadata-only",
                        o.name,
                        d.file.display()
                    )));
                }
            }
        }
    }
    vm.rec.intent = Some(Intent {
        op: "merge".into(),
        snapshot: snap.to_string(),
        kind: Kind::External,
        new_files: Vec::new(),
        quiesce: false,
    });
    vm.save()?;
    finish_merge(vm, snap, qmp.as_ref())
}

/// The work of [`merge_middle`] after its intent is recorded; also how recovery
/// finishes an interrupted merge (each step can run again, with or without the
/// QEMU that ran when it was interrupted). `qmp`: the VM's monitor when it runs.
pub(crate) fn finish_merge(vm: &mut OpenVm, snap: &str, qmp: Option<&Qmp>) -> Result<()> {
    let s = vm.rec.snapshot(snap)?.clone();
    let mut users: Vec<PathBuf> = vm.rec.def.disks.iter().map(|d| d.file.clone()).collect();
    for o in &vm.rec.snapshots {
        users.extend(o.disks.iter().map(|d| d.file.clone()));
    }
    users.sort();
    users.dedup();
    for f in &s.disks {
        if let Some(q) = qmp {
            if live::stream_past(q, vm.rec.def.disks.len(), &f.file)? {
                step(vm, "merge-streamed");
            }
        }
        for x in users.iter().filter(|x| *x != &f.file) {
            if x.starts_with(vm.dir()) && engine::rebase_past(x, &f.file)? {
                step(vm, "merge-rebased");
            }
        }
    }
    forget(vm, snap);
    vm.rec.intent = None;
    vm.save()?;
    if let Some(q) = qmp {
        for f in &s.disks {
            live::release(q, &f.file);
        }
    }
    discard_unused(vm, &s.disks);
    if let Some(m) = &s.memory_file {
        let _ = std::fs::remove_file(m);
    }
    Ok(())
}
