//! Finishing or rolling back an operation a previous command left half done
//! (it crashed, was killed, or QEMU died under it). Runs whenever a VM is
//! opened, under its lock, before anything else.
//!
//! - create: the record was not updated, so the snapshot does not exist: its
//!   new files are removed (after ending a memory save still running and
//!   merging back overlays QEMU already switched to) and an internal tag that
//!   may have been written is deleted;
//! - revert: the record still names the old disks: the new overlays go;
//! - delete (external, merging the overlays down): rolled forward, since the
//!   merge may already have changed the snapshot's files;
//! - pivot (a block job's switch): the record follows what QEMU runs on;
//! - save: the file goes and the guest runs on;
//! - point (an image read from a running disk): only the thaw above.

use serde_json::Value;
use strata_qmp::commands::SnapshotDelete;

use crate::engine;
use crate::error::Result;
use crate::manager::{agent_timeout, connect_agent, OpenVm};
use crate::qemu;
use crate::record::Kind;
use crate::snapshot::active_commit;

/// The file each of the VM's active nodes reads, from `query-block`.
fn active_files(qmp: &strata_qmp::Qmp) -> Vec<String> {
    qmp.execute_value("query-block", None)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|b| b.pointer("/inserted/file").and_then(Value::as_str))
        .map(str::to_string)
        .collect()
}

pub(crate) fn recover(vm: &mut OpenVm) -> Result<()> {
    let Some(intent) = vm.rec.intent.clone() else {
        return Ok(());
    };
    let qmp = qemu::connect(&vm.paths)?;
    if let Some(q) = &qmp {
        crate::live::settle_jobs(q)?;
    }
    if intent.quiesce && qmp.is_some() {
        // The interrupted command may have left the guest frozen.
        if let Ok(mut agent) = connect_agent(vm, agent_timeout()) {
            let _ = agent.fsfreeze_thaw();
        }
    }
    match (intent.op.as_str(), intent.kind) {
        ("create", Kind::Internal) => match &qmp {
            Some(q) => {
                let nodes = qemu::top_nodes(q, vm.rec.def.disks.len())?;
                let _ = q.run_job(
                    &SnapshotDelete {
                        job_id: "strata-recover".into(),
                        tag: intent.snapshot.clone(),
                        devices: nodes,
                    },
                    "strata-recover",
                    std::time::Duration::from_secs(600),
                );
            }
            None => engine::internal_delete(&vm.rec.def.disks, &intent.snapshot)?,
        },
        ("point", _) => {}
        ("save", _) => {
            if let Some(f) = intent.new_files.first() {
                return crate::saved::undo_save(vm, qmp.as_ref(), f);
            }
        }
        ("pivot", _) => crate::blockjob::recover_pivot(vm, qmp.as_ref(), &intent)?,
        ("merge", _) => return crate::snapshot::finish_merge(vm, &intent.snapshot, qmp.as_ref()),
        ("delete", Kind::External) => {
            let s = vm.rec.snapshot(&intent.snapshot)?.clone();
            let pivoted = match &qmp {
                Some(q) => {
                    let files = active_files(q);
                    s.disks
                        .iter()
                        .all(|d| files.contains(&d.file.display().to_string()))
                }
                None => {
                    for (d, f) in vm.rec.def.disks.iter().zip(&s.disks) {
                        if d.file != f.file && !engine::is_on(&d.file, &f.file)? {
                            vm.rec.intent = None;
                            return vm.save();
                        }
                    }
                    for d in &vm.rec.def.disks {
                        if !s.disks.contains(d) {
                            engine::commit_into_backing(d)?;
                        }
                    }
                    true
                }
            };
            if !pivoted {
                if let Some(q) = &qmp {
                    let chains = crate::live::chains(q, s.disks.len())?;
                    let tops = qemu::top_nodes(q, s.disks.len())?;
                    for ((top, base), chain) in tops.iter().zip(&s.disks).zip(&chains) {
                        if chain
                            .first()
                            .is_some_and(|f| crate::live::same_file(f, &base.file))
                        {
                            continue;
                        }
                        if !chain
                            .get(1)
                            .is_some_and(|f| crate::live::same_file(f, &base.file))
                        {
                            // The disk is not on the snapshot's file: nothing
                            // was merged, the delete is dropped.
                            vm.rec.intent = None;
                            return vm.save();
                        }
                        let b = crate::live::node_of_file(q, &base.file)?;
                        active_commit(q, top, &b)?;
                    }
                }
            }
            if let Some(q) = &qmp {
                // A command stopped inside the pivot's pause left the guest paused.
                if qemu::run_state(q)? == "paused" {
                    q.execute(&strata_qmp::commands::Cont {})?;
                }
            }
            let old = std::mem::replace(&mut vm.rec.def.disks, s.disks.clone());
            vm.rec.snapshots.retain(|o| o.name != s.name);
            for o in &mut vm.rec.snapshots {
                if o.parent.as_deref() == Some(s.name.as_str()) {
                    o.parent = s.parent.clone();
                }
            }
            vm.rec.current = s.parent.clone();
            vm.rec.intent = None;
            vm.save()?;
            for d in old {
                if d.file.starts_with(vm.dir()) && !vm.rec.file_in_use(&d.file) {
                    let _ = std::fs::remove_file(&d.file);
                }
            }
            if let Some(m) = &s.memory_file {
                let _ = std::fs::remove_file(m);
            }
            return Ok(());
        }
        _ => {
            // An external create or revert: overlays QEMU already switched to are
            // merged back before their files go, once a memory save the command
            // left running has ended (its end could make the disks inactive).
            if let Some(q) = &qmp {
                crate::memory::end_interrupted_save(q)?;
                let files = active_files(q);
                let tops = qemu::top_nodes(q, vm.rec.def.disks.len())?;
                for (i, top) in tops.iter().enumerate() {
                    let on_new = intent
                        .new_files
                        .iter()
                        .any(|f| files.get(i) == Some(&f.display().to_string()));
                    if on_new {
                        let base = crate::live::node_of_file(q, &vm.rec.def.disks[i].file)?;
                        active_commit(q, top, &base)?;
                    }
                }
            }
            for f in &intent.new_files {
                let _ = std::fs::remove_file(f);
            }
        }
    }
    vm.rec.intent = None;
    vm.save()
}
