//! A VM's disk read for an image: as it was at one of its snapshots, or as it
//! is now. The reader runs under the VM's lock, so no snapshot operation
//! changes the files meanwhile; the VM's run state and snapshot tree are left
//! as they were.
//!
//! - at a snapshot: an internal snapshot is read through the qcow2 file that
//!   holds it (QEMU never rewrites a snapshot's clusters, so this works while
//!   the VM runs); an external one is the file frozen at the snapshot, with
//!   its backing chain;
//! - now, running: a consistent point of the disk held by QEMU (the backup's
//!   fleecing point, see `backup`, without touching its dirty bitmaps),
//!   exported over NBD while the guest runs on, with the guest's filesystems
//!   frozen through the agent around the instant when asked; no snapshot is
//!   added to the VM's tree;
//! - now, stopped: the disk's file and its backing chain (nothing can start
//!   the VM while its lock is held).

use std::path::PathBuf;

use strata_format::Format;

use crate::backup::{clear_leftovers, hold_point, node_info, BackupPoint, PointSpec, WORK_DIR};
use crate::error::{Error, Result};
use crate::manager::{agent_timeout, connect_agent, OpenVm};
use crate::qemu;
use crate::record::{Disk, Intent, Kind};
use crate::snapshot::FreezeGuard;
use crate::Manager;

/// Where the disk's bytes are read from.
#[derive(Debug)]
pub enum DiskView<'a> {
    /// The image file `file` of `format` with its backing chain, through its
    /// internal snapshot `snapshot` when set. `in_use`: a running QEMU holds
    /// the file, so it is to be opened sharing and read-only, unmapped.
    File {
        file: PathBuf,
        format: Format,
        snapshot: Option<String>,
        in_use: bool,
    },
    /// A running disk at one instant, exported by QEMU (read-only) over NBD.
    Point(&'a BackupPoint),
}

fn disk_of<'d>(vm: &OpenVm, disks: &'d [Disk], disk: usize) -> Result<&'d Disk> {
    disks.get(disk).ok_or_else(|| {
        Error::Invalid(format!(
            "VM '{}' has no disk {disk} (it has {})",
            vm.name,
            disks.len()
        ))
    })
}

fn format_of(d: &Disk) -> Result<Format> {
    d.format
        .parse()
        .map_err(|_| Error::Invalid(format!("disk format '{}' is not readable", d.format)))
}

impl Manager {
    /// Run `read` on disk `disk` (0-based) of VM `name` as it was at snapshot
    /// `snap`, running or stopped.
    pub fn read_snapshot_disk<T, E>(
        &self,
        name: &str,
        snap: &str,
        disk: usize,
        read: impl FnOnce(&DiskView<'_>) -> std::result::Result<T, E>,
    ) -> Result<std::result::Result<T, E>> {
        let vm = self.open(name)?;
        let s = vm.rec.snapshot(snap)?;
        let d = disk_of(&vm, &s.disks, disk)?;
        let view = DiskView::File {
            file: d.file.clone(),
            format: format_of(d)?,
            snapshot: (s.kind == Kind::Internal).then(|| s.name.clone()),
            in_use: qemu::live_pid(&vm.paths).is_some(),
        };
        Ok(read(&view))
    }

    /// Run `read` on disk `disk` of VM `name` as it is now: at one consistent
    /// instant of a running (or paused) VM, with its filesystems frozen for
    /// that instant when `quiesce` (thawed on every path, and by the next
    /// command on the VM if this one dies in between); the file of a stopped
    /// one. `quiesce` needs a running guest with its agent.
    pub fn read_vm_disk<T, E>(
        &self,
        name: &str,
        disk: usize,
        quiesce: bool,
        read: impl FnOnce(&DiskView<'_>) -> std::result::Result<T, E>,
    ) -> Result<std::result::Result<T, E>> {
        let mut vm = self.open(name)?;
        crate::restore::not_restoring(&vm, "an image of it")?;
        let d = disk_of(&vm, &vm.rec.def.disks, disk)?.clone();
        let Some(qmp) = qemu::connect(&vm.paths)? else {
            if quiesce {
                return Err(Error::State(format!(
                    "VM '{name}' is not running: --quiesce needs its guest agent"
                )));
            }
            let view = DiskView::File {
                file: d.file.clone(),
                format: format_of(&d)?,
                snapshot: None,
                in_use: false,
            };
            return Ok(read(&view));
        };
        let state = qemu::run_state(&qmp)?;
        if quiesce && state != "running" {
            return Err(Error::State(format!(
                "VM '{name}' is {state}: --quiesce needs its guest running"
            )));
        }
        // A point a killed command left is no job of the user's.
        clear_leftovers(&qmp, &vm.dir().join(WORK_DIR))?;
        crate::snapshot::no_block_jobs(&vm, &qmp)?;
        let top = qemu::top_nodes(&qmp, vm.rec.def.disks.len())?.swap_remove(disk);
        let (size, _) = node_info(&qmp, &top)?;
        let mut guard = None;
        if quiesce {
            // Asked before anything is made, so a silent agent leaves nothing.
            let agent = connect_agent(&vm, agent_timeout())
                .map_err(|e| Error::State(format!("cannot quiesce, no image taken: {e}")))?;
            vm.rec.intent = Some(Intent {
                op: "point".into(),
                snapshot: String::new(),
                kind: Kind::External,
                new_files: Vec::new(),
                quiesce: true,
            });
            vm.save()?;
            guard = Some(FreezeGuard::freeze(agent)?.0);
        }
        let spec = PointSpec {
            top: &top,
            size,
            disk_file: &d.file,
            changes: None,
            full_reason: None,
            bitmap: None,
        };
        let mut thawed = Ok(());
        let (out, cleaned) = hold_point(&vm, &qmp, spec, |p| {
            // The instant is taken: the guest writes on at once.
            if let Some(g) = guard.as_mut() {
                thawed = g.thaw();
            }
            read(&DiskView::Point(p))
        });
        if let Some(mut g) = guard.take() {
            // The point never started: thaw here.
            thawed = thawed.and(g.thaw());
        }
        if vm.rec.intent.take().is_some() {
            vm.save()?;
        }
        thawed?;
        let out = out?;
        cleaned?;
        Ok(out)
    }
}
