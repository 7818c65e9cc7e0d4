//! `strata backup restore SNAPSHOT OUTPUT --vm NAME --instant`: the VM starts
//! at once on OUTPUT, a qcow2 overlay on the snapshot served over NBD, while
//! QEMU streams the backup into it (see `strata_vm::restore`). The snapshot,
//! the repository and its password are checked here, before the VM is touched.

use super::{Repository, RestoreArgs};
use crate::img::progress::Bar;
use anyhow::{bail, Result};
use std::io::IsTerminal;
use std::path::PathBuf;
use strata_vm::restore::BackupSource;
use strata_vm::{Manager, StateDir};

#[derive(clap::Args)]
pub(super) struct InstantArgs {
    /// Restore as a disk of this VM of `strata vm` (stopped; with --instant):
    /// OUTPUT, a new file, becomes that disk.
    #[arg(long = "vm", requires = "instant", conflicts_with_all = ["existing", "offset", "length"])]
    pub vm: Option<String>,
    /// With --vm: which disk (0 for the first).
    #[arg(long = "disk", requires = "vm", default_value_t = 0)]
    disk: usize,
    /// With --instant: restore another disk of the VM at the same time, from
    /// a snapshot of the same repository into a new file (repeatable). One
    /// server serves every disk; each streams in its own job.
    #[arg(long = "also-disk", value_name = "N:SNAPSHOT:OUTPUT", requires = "instant",
          value_parser = parse_also_disk)]
    also_disk: Vec<AlsoDisk>,
    /// Start the VM at once on OUTPUT, a qcow2 overlay reading the backup
    /// over NBD, while every cluster streams into it; `strata vm status`
    /// shows the progress, `strata vm blockjob wait` waits for it.
    #[arg(long = "instant", requires = "vm")]
    instant: bool,
    /// The stream's speed limit in bytes per second (suffixes k, M, G; 0 or
    /// unset: none), so the guest's own reads keep priority.
    #[arg(long = "speed", requires = "instant", value_parser = parse_speed)]
    speed: Option<u64>,
    /// Wait until the disk is fully restored (a progress bar on a terminal).
    #[arg(long = "wait", requires = "instant")]
    wait: bool,
    /// With --vm: the VM state directory (as `strata vm --state-dir`).
    #[arg(long = "state-dir", requires = "vm", value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// Another disk to restore: `N:SNAPSHOT:OUTPUT` (the file name may hold colons).
#[derive(Clone, Debug)]
pub(super) struct AlsoDisk {
    disk: usize,
    snapshot: String,
    output: PathBuf,
}

fn parse_also_disk(s: &str) -> Result<AlsoDisk, String> {
    let mut parts = s.splitn(3, ':');
    let (Some(n), Some(snapshot), Some(output)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("'{s}' is not N:SNAPSHOT:OUTPUT"));
    };
    let disk = n
        .parse()
        .map_err(|_| format!("'{n}' is not a disk index (0 for the first)"))?;
    if snapshot.is_empty() || output.is_empty() {
        return Err(format!("'{s}' names no snapshot or no output"));
    }
    Ok(AlsoDisk {
        disk,
        snapshot: snapshot.to_string(),
        output: output.into(),
    })
}

/// A speed limit: bytes per second, with an optional k, M, G or T suffix.
pub(crate) fn parse_speed(s: &str) -> Result<u64, String> {
    strata_jobs::create::parse_size(s)
        .filter(|v| *v <= i64::MAX as u64)
        .ok_or_else(|| format!("invalid speed '{s}': bytes per second, e.g. 50M"))
}

pub(super) fn restore(a: RestoreArgs) -> Result<()> {
    let i = &a.instant;
    let name = i.vm.clone().expect("called with --vm");
    if let Some(f) = a.output_format.as_deref().filter(|f| *f != "qcow2") {
        bail!("instant restore makes a qcow2 overlay; -O {f} cannot be used with --vm");
    }
    // The server runs later, from whatever directory starts the VM: local
    // paths are recorded absolute.
    let mut location = a.repo.location()?;
    if !location.starts_with("s3:") {
        location = std::path::absolute(&location)?.display().to_string();
    }
    let password_file = a
        .repo
        .password_file
        .as_deref()
        .map(std::path::absolute)
        .transpose()?;
    let repo: Repository = a.repo.open()?;
    let wanted = std::iter::once((i.disk, &a.snapshot, &a.output))
        .chain(i.also_disk.iter().map(|d| (d.disk, &d.snapshot, &d.output)));
    let mut disks = Vec::new();
    let mut started = Vec::new();
    for (disk, snapshot, output) in wanted {
        let (id, snap) = repo.find_snapshot(snapshot)?;
        let node = strata_repo::restore::disk_node(&repo, &snap)?;
        let source = BackupSource {
            repo: location.clone(),
            snapshot: id.to_string(),
            password_file: password_file.clone(),
            size: node.size,
        };
        started.push(format!(
            "disk {disk} ({}) streams from snapshot {}",
            output.display(),
            id.short()
        ));
        disks.push((disk, output.clone(), source));
    }
    drop(repo);
    let mgr = Manager::new(StateDir::resolve(i.state_dir.clone()));
    let note = mgr.instant_restore(&name, disks, i.speed.unwrap_or(0))?;
    if let Some(note) = note {
        eprintln!("{note}");
    }
    println!(
        "VM '{name}' started on {}; {} (`strata vm status {name}` shows the progress, `strata vm blockjob wait {name}` waits for it)",
        a.output.display(),
        started.join(", "),
    );
    if i.wait {
        wait(&mgr, &name, None)?;
    }
    Ok(())
}

/// Wait for VM `name`'s restore with a progress bar on a terminal, first
/// setting the stream's speed limit to `speed` when given.
pub(crate) fn wait(mgr: &Manager, name: &str, speed: Option<u64>) -> Result<()> {
    let bar = Bar::new(std::io::stderr().is_terminal());
    let waited = mgr.restore_wait(name, speed, &bar, &|| false)?;
    bar.finish();
    if waited {
        println!("VM '{name}': disk restored; it no longer needs the backup");
    } else {
        println!("VM '{name}' has no disk being restored");
    }
    Ok(())
}
