//! `strata backup create --vm NAME`: a backup of a running VM's disk from a
//! consistent point QEMU holds, incremental through the persistent dirty
//! bitmap the previous backup started (`strata_repo::export::back_up_vm_disk`,
//! which the HTTP API runs too). Without a usable bitmap it reads everything
//! and says why on stderr.

use super::nbd::note;
use super::{bar, print_backup, CreateArgs};
use anyhow::Result;
use strata_jobs::Cancel;
use strata_repo::export::{back_up_vm_disk, VmBackup};
use strata_vm::{Manager, StateDir};

pub(super) fn create(a: CreateArgs) -> Result<()> {
    let args = VmBackup {
        vm: a.vm.clone().expect("called with --vm"),
        disk: a.disk,
        parent: a.parent.clone(),
        tags: a.tags.clone(),
        chunk_size: a.chunk_size,
    };
    let mut repo = a.repo.open()?;
    let mgr = Manager::new(StateDir::resolve(a.state_dir.clone()));
    let bar = bar();
    let (opts, s) = back_up_vm_disk(&mut repo, &mgr, &args, &bar, &Cancel::default(), &note)?;
    bar.finish();
    print_backup(&opts.name, &s);
    Ok(())
}
