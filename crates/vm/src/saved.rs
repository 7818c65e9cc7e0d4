//! `vm save`: the guest's memory and device state written to a file and QEMU
//! ended, the disks left as they were; `vm start` (or `vm restore FILE`)
//! resumes the guest from it, running or paused as it was.
//!
//! The save records an intent naming the file first; the record names the
//! saved state only once the file is complete, and QEMU quits after that
//! write, so the disks never move on from the saved memory. An interrupted save
//! is undone by the next command (the file removed, a guest left stopped by
//! the migration resumed).

use strata_qmp::commands::{Cont, Migrate, MigrateIncoming};

use crate::error::{Error, Result};
use crate::live::stamp;
use crate::manager::{running_qmp, vm_file, Manager, OpenVm};
use crate::memory::{self, set_capabilities, wait_migration, Mode};
use crate::qemu::{self, StartMode};
use crate::record::{Intent, Kind, MemoryLayout, Saved};
use crate::snapshot::no_block_jobs;

impl Manager {
    /// Save running (or paused) VM `name` to a file and stop it. Returns the file.
    pub fn save(&self, name: &str) -> Result<std::path::PathBuf> {
        let mut vm = self.open(name)?;
        crate::restore::not_restoring(&vm, "saving it")?;
        let qmp = running_qmp(&vm)?;
        no_block_jobs(&vm, &qmp)?;
        let vm_state = qemu::run_state(&qmp)?;
        if vm_state != "running" && vm_state != "paused" {
            return Err(Error::State(format!(
                "VM '{name}' is in state '{vm_state}'; save needs it running or paused"
            )));
        }
        let file = vm_file(&vm, "memory", format!("saved-{}.mem", stamp()))?;
        vm.rec.intent = Some(Intent {
            op: "save".into(),
            snapshot: String::new(),
            kind: Kind::External,
            new_files: vec![file.clone()],
            quiesce: false,
        });
        vm.save()?;
        let saved = (|| -> Result<()> {
            set_capabilities(&qmp, Mode::Plain)?;
            qmp.execute(&Migrate {
                uri: format!("file:{}", file.display()),
            })?;
            wait_migration(&qmp, "saving the memory", "completed")?;
            memory::sync_file(&file)
        })();
        if let Err(e) = saved {
            undo_save(&mut vm, Some(&qmp), &file)?;
            return Err(e);
        }
        vm.rec.saved = Some(Saved {
            file: file.clone(),
            vm_state,
        });
        vm.rec.intent = None;
        vm.save()?;
        qemu::quit(qmp, &vm.paths)?;
        Ok(file)
    }

    /// Resume the VM whose saved state is `file` (as `start` does).
    pub fn restore(&self, file: &std::path::Path) -> Result<(String, Option<String>)> {
        let want = std::fs::canonicalize(file)
            .map_err(|e| Error::Invalid(format!("'{}' cannot be used: {e}", file.display())))?;
        for name in self.state.list()? {
            let rec = self.record(&name)?;
            if rec.saved.as_ref().is_some_and(|s| s.file == want) {
                let note = self.start(&name)?;
                return Ok((name, note));
            }
        }
        Err(Error::Invalid(format!(
            "'{}' is no VM's saved state",
            file.display()
        )))
    }
}

/// Start QEMU waiting for the saved state, load it, resume as saved; the saved
/// state is forgotten and its file removed once the guest runs from it. On a
/// failure QEMU is ended and the saved state kept.
pub(crate) fn resume(mut vm: OpenVm) -> Result<Option<String>> {
    let saved = vm.rec.saved.clone().expect("caller checked");
    let (qmp, note) = launch_from_memory(&vm, &saved.file, MemoryLayout::MappedRam)?;
    vm.rec.saved = None;
    vm.save()?;
    let _ = std::fs::remove_file(&saved.file);
    if saved.vm_state == "running" {
        qmp.execute(&Cont {})?;
    }
    Ok(note)
}

/// Start the VM's QEMU paused and load the memory file `file` (laid out as
/// `layout`) into it. On a
/// failure QEMU is ended again.
pub(crate) fn launch_from_memory(
    vm: &OpenVm,
    file: &std::path::Path,
    layout: MemoryLayout,
) -> Result<(strata_qmp::Qmp, Option<String>)> {
    let (qmp, note) = qemu::launch(
        &vm.rec.def,
        &vm.paths,
        StartMode {
            paused: true,
            incoming: true,
        },
    )?;
    let loaded = (|| -> Result<()> {
        set_capabilities(&qmp, Mode::Load(layout))?;
        qmp.execute(&MigrateIncoming {
            uri: format!("file:{}", file.display()),
        })?;
        wait_migration(&qmp, "loading the memory", "completed")
    })();
    match loaded {
        Ok(()) => Ok((qmp, note)),
        Err(e) => {
            let _ = qemu::quit(qmp, &vm.paths);
            Err(e)
        }
    }
}

/// Undo a save that did not finish: remove its file and resume a guest the
/// migration left stopped.
pub(crate) fn undo_save(
    vm: &mut OpenVm,
    qmp: Option<&strata_qmp::Qmp>,
    file: &std::path::Path,
) -> Result<()> {
    if let Some(q) = qmp {
        let _ = q.execute_value("migrate_cancel", None);
        if qemu::run_state(q)? == "postmigrate" {
            q.execute(&Cont {})?;
        }
    }
    let _ = std::fs::remove_file(file);
    vm.rec.intent = None;
    vm.save()
}
