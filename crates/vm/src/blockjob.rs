//! Live block jobs on a running VM's disk, outside the snapshot tree: commit
//! the active layer into its backing file, pull (stream) the backing chain into
//! the active layer, and copy (mirror) the disk to a new image, each with
//! progress and cancellation, and with a pivot that makes the VM run on the
//! result (its definition updated in the same pause).
//!
//! A job that would change a file a snapshot keeps is refused: the snapshot
//! commands merge those. A pivot records an intent first and switches with the
//! guest paused after QEMU flushed every node; the new definition is written
//! before the guest resumes, so the guest cannot write to the new image before
//! the record names it (see `recover`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use strata_format::Format;
use strata_jobs::create::{create, CreateRequest};
use strata_jobs::Progress;
use strata_qmp::commands::{
    BlockCommit, BlockStream, BlockdevAdd, BlockdevDel, BlockdevMirror, JobComplete, JobFinalize,
    QueryJobs,
};
use strata_qmp::Qmp;

use crate::error::{Error, Result};
use crate::live::{self, node_of_file, stamp, JOB_PREFIX, JOB_TIMEOUT};
use crate::manager::{running_qmp, Manager, OpenVm};
use crate::qemu;
use crate::record::{Disk, Intent, Kind};

/// Which block job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobKind {
    /// Merge the active layer into its backing file.
    Commit,
    /// Copy the backing chain's data into the active layer, which then stands
    /// alone.
    Pull,
    /// Copy the whole disk to a new image at `dest` (`format`: qcow2 or raw).
    Copy { dest: PathBuf, format: String },
}

/// What `blockjob` was asked for.
#[derive(Debug, Clone)]
pub struct JobOptions {
    pub kind: JobKind,
    /// The disk (0 for the first).
    pub disk: usize,
    /// Commit and copy: make the VM run on the result.
    pub pivot: bool,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    /// The image the VM's disk runs on afterwards.
    pub disk: PathBuf,
    pub pivoted: bool,
}

impl Manager {
    /// Run block job `opts` on running VM `name`, reporting to `progress`, and
    /// cancelling it (the disk as before) once `cancelled` says so.
    pub fn blockjob(
        &self,
        name: &str,
        opts: &JobOptions,
        progress: &dyn Progress,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<JobOutcome> {
        let mut vm = self.open(name)?;
        crate::restore::not_restoring(&vm, "another block job")?;
        let qmp = running_qmp(&vm)?;
        let n = vm.rec.def.disks.len();
        if opts.disk >= n {
            return Err(Error::Invalid(format!(
                "VM '{name}' has no disk {} (it has {n})",
                opts.disk
            )));
        }
        if let Some(j) = qmp.execute(&QueryJobs {})?.first() {
            return Err(Error::State(format!(
                "VM '{name}' has a job running ({} '{}'); wait for it or cancel it first",
                j.job_type, j.id
            )));
        }
        let chain = live::chains(&qmp, n)?.swap_remove(opts.disk);
        let top = qemu::top_nodes(&qmp, n)?.swap_remove(opts.disk);
        let job = format!("{JOB_PREFIX}blockjob-{}", stamp());
        let run = Run {
            qmp: &qmp,
            job: &job,
            progress,
            cancelled,
        };
        match &opts.kind {
            JobKind::Pull => {
                if opts.pivot {
                    return Err(Error::Invalid(
                        "--pivot is for commit and copy: a pull keeps the same image".into(),
                    ));
                }
                qmp.execute(&BlockStream {
                    job_id: job.clone(),
                    device: top,
                    base_node: None,
                    auto_finalize: Some(false),
                    auto_dismiss: Some(false),
                })?;
                run.wait_for("pending")?;
                live::flushed_pause(&qmp, || {
                    qmp.execute(&JobFinalize { id: job.clone() })?;
                    Ok(qmp.finish_job("block-stream", &job, JOB_TIMEOUT)?)
                })?;
                for f in &chain[1..] {
                    live::release(&qmp, f);
                }
                Ok(JobOutcome {
                    disk: chain[0].clone(),
                    pivoted: false,
                })
            }
            JobKind::Commit => {
                let base = chain.get(1).cloned().ok_or_else(|| {
                    Error::Invalid(format!(
                        "disk {} of VM '{name}' has no backing file to commit into",
                        opts.disk
                    ))
                })?;
                if let Some(s) = snapshot_holding(&vm, &base) {
                    return Err(Error::State(format!(
                        "'{}' holds snapshot '{s}'; committing into it would change the snapshot (delete the snapshot instead)",
                        base.display()
                    )));
                }
                let base_node = node_of_file(&qmp, &base)?;
                let format = node_format(&qmp, &base_node)?;
                qmp.execute(&BlockCommit {
                    job_id: job.clone(),
                    device: top,
                    top_node: None,
                    base_node: Some(base_node),
                    auto_dismiss: Some(false),
                })?;
                run.wait_for("ready")?;
                run.end(
                    &mut vm,
                    opts,
                    "block-commit",
                    Disk { file: base, format },
                    None,
                )
            }
            JobKind::Copy { dest, format } => {
                let fmt: Format = format.parse().map_err(|_| {
                    Error::Invalid(format!("unknown format '{format}' (qcow2 or raw)"))
                })?;
                if dest.exists() {
                    return Err(Error::Invalid(format!(
                        "'{}' exists already; copy makes a new image",
                        dest.display()
                    )));
                }
                let size = virtual_size(&qmp, opts.disk)?;
                create(&CreateRequest {
                    path: dest.clone(),
                    format: fmt,
                    size: Some(size),
                    options: BTreeMap::new(),
                    unsafe_backing: false,
                })?;
                let dest = std::fs::canonicalize(dest)
                    .map_err(|e| Error::io(format!("resolve {}", dest.display()), e))?;
                let node = format!("strata-copy-{}", stamp());
                let started = (|| -> Result<()> {
                    qmp.execute(&BlockdevAdd(json!({
                        "driver": fmt.name(),
                        "node-name": node,
                        "file": {"driver": "file", "filename": dest},
                    })))?;
                    qmp.execute(&BlockdevMirror {
                        job_id: job.clone(),
                        device: top,
                        target: node.clone(),
                        sync: "full".into(),
                        auto_dismiss: Some(false),
                    })?;
                    run.wait_for("ready")
                })();
                if let Err(e) = started {
                    let _ = qmp.execute(&BlockdevDel {
                        node_name: node.clone(),
                    });
                    let _ = std::fs::remove_file(&dest);
                    return Err(e);
                }
                let disk = Disk {
                    file: dest,
                    format: fmt.name().to_string(),
                };
                run.end(&mut vm, opts, "blockdev-mirror", disk, Some(&node))
            }
        }
    }
}

impl Manager {
    /// Cancel the jobs running on VM `name` (left by a block job command that
    /// was killed): its disks stay as they were. Returns the jobs' ids.
    pub fn blockjob_cancel(&self, name: &str) -> Result<Vec<String>> {
        let vm = self.open(name)?;
        let qmp = running_qmp(&vm)?;
        let jobs = qmp.execute(&QueryJobs {})?;
        for j in &jobs {
            qmp.execute_value("job-cancel", Some(json!({ "id": j.id })))?;
        }
        for j in &jobs {
            let _ = qmp.finish_job("job-cancel", &j.id, JOB_TIMEOUT);
        }
        Ok(jobs.into_iter().map(|j| j.id).collect())
    }
}

/// A job under way, for waiting on it.
struct Run<'a> {
    qmp: &'a Qmp,
    job: &'a str,
    progress: &'a dyn Progress,
    cancelled: &'a dyn Fn() -> bool,
}

impl Run<'_> {
    /// Report progress until the job reaches `status` (`ready` or `pending`).
    /// A job that fails or is cancelled (`cancelled` said so) is an error.
    fn wait_for(&self, status: &str) -> Result<()> {
        let mut done = 0;
        loop {
            let info = self
                .qmp
                .execute(&QueryJobs {})?
                .into_iter()
                .find(|j| j.id == self.job)
                .ok_or_else(|| Error::Qemu(format!("QEMU lost job '{}'", self.job)))?;
            self.progress.set_total(info.total_progress);
            self.progress
                .advance(info.current_progress.saturating_sub(done));
            done = done.max(info.current_progress);
            if info.status == status {
                return Ok(());
            }
            if info.status == "concluded" {
                self.qmp.finish_job("block job", self.job, JOB_TIMEOUT)?;
                return Err(Error::Qemu(format!("job '{}' ended early", self.job)));
            }
            if (self.cancelled)() {
                self.cancel()?;
                return Err(Error::State("cancelled; the disk is as it was".into()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Cancel the job and wait until QEMU has dropped it.
    fn cancel(&self) -> Result<()> {
        self.qmp
            .execute_value("job-cancel", Some(json!({ "id": self.job })))?;
        let _ = self.qmp.finish_job("block job", self.job, JOB_TIMEOUT);
        Ok(())
    }

    /// End a job that is ready: with a pivot, make the VM run on `target` and
    /// record that before the guest resumes; without, leave `target` as an
    /// up-to-date copy and the VM where it was.
    fn end(
        &self,
        vm: &mut OpenVm,
        opts: &JobOptions,
        command: &str,
        target: Disk,
        target_node: Option<&str>,
    ) -> Result<JobOutcome> {
        if !opts.pivot {
            // Ends the job without a pivot; the target holds a consistent copy.
            self.qmp.execute_value(
                "block-job-cancel",
                Some(json!({ "device": self.job, "force": false })),
            )?;
            self.qmp.finish_job(command, self.job, JOB_TIMEOUT)?;
            if let Some(n) = target_node {
                let _ = self.qmp.execute(&BlockdevDel {
                    node_name: n.to_string(),
                });
            }
            return Ok(JobOutcome {
                disk: vm.rec.def.disks[opts.disk].file.clone(),
                pivoted: false,
            });
        }
        vm.rec.intent = Some(Intent {
            op: "pivot".into(),
            snapshot: opts.disk.to_string(),
            kind: Kind::External,
            new_files: vec![target.file.clone()],
            quiesce: false,
        });
        vm.save()?;
        let old = vm.rec.def.disks[opts.disk].clone();
        live::flushed_pause(self.qmp, || {
            self.qmp.execute(&JobComplete {
                id: self.job.to_string(),
            })?;
            self.qmp.finish_job(command, self.job, JOB_TIMEOUT)?;
            vm.rec.def.disks[opts.disk] = target.clone();
            vm.rec.intent = None;
            vm.save()
        })?;
        live::release(self.qmp, &old.file);
        if old.file.starts_with(vm.dir()) && !vm.rec.file_in_use(&old.file) {
            let _ = std::fs::remove_file(&old.file);
        }
        Ok(JobOutcome {
            disk: target.file,
            pivoted: true,
        })
    }
}

/// The snapshot whose files include `file`, if any.
fn snapshot_holding(vm: &OpenVm, file: &Path) -> Option<String> {
    vm.rec
        .snapshots
        .iter()
        .find(|s| s.disks.iter().any(|d| live::same_file(&d.file, file)))
        .map(|s| s.name.clone())
}

/// The driver (format) of node `node`.
fn node_format(qmp: &Qmp, node: &str) -> Result<String> {
    let nodes = qmp.execute_value("query-named-block-nodes", Some(json!({"flat": true})))?;
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n.get("node-name").and_then(|v| v.as_str()) == Some(node))
        .and_then(|n| n.get("drv").and_then(|v| v.as_str()))
        .map(str::to_string)
        .ok_or_else(|| Error::Qemu(format!("QEMU has no node '{node}'")))
}

/// The virtual size of disk `i`, from `query-block`.
fn virtual_size(qmp: &Qmp, i: usize) -> Result<u64> {
    let blocks = qmp.execute_value("query-block", None)?;
    let prefix = format!("/machine/peripheral/{}/", qemu::disk_device(i));
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| {
            b.get("qdev")
                .and_then(|q| q.as_str())
                .is_some_and(|q| q.starts_with(&prefix))
        })
        .and_then(|b| b.pointer("/inserted/image/virtual-size"))
        .and_then(|v| v.as_u64())
        .ok_or_else(|| Error::Qemu(format!("QEMU reports no size for disk {i}")))
}

/// Recovery of a pivot a previous command left: when QEMU runs on the new
/// image the record is brought up to date (and the guest, paused for the
/// switch, resumed); otherwise the VM never wrote to it and the old
/// definition stands.
pub(crate) fn recover_pivot(vm: &mut OpenVm, qmp: Option<&Qmp>, intent: &Intent) -> Result<()> {
    let (Ok(disk), Some(target)) = (intent.snapshot.parse::<usize>(), intent.new_files.first())
    else {
        return Ok(());
    };
    if let Some(q) = qmp {
        let chains = live::chains(q, vm.rec.def.disks.len())?;
        let on_target = chains
            .get(disk)
            .and_then(|c| c.first())
            .is_some_and(|f| live::same_file(f, target));
        if on_target {
            let top = qemu::top_nodes(q, vm.rec.def.disks.len())?.swap_remove(disk);
            vm.rec.def.disks[disk] = Disk {
                file: target.clone(),
                format: node_format(q, &top)?,
            };
            if qemu::run_state(q)? == "paused" {
                q.execute(&strata_qmp::commands::Cont {})?;
            }
        }
    }
    Ok(())
}
