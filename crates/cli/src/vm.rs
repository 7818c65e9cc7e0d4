//! `strata vm`: define, run and snapshot QEMU virtual machines. No daemon: each
//! command works on the VM's state directory and talks to its own QMP socket.

use anyhow::{bail, Result};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use strata_jobs::Cancel;
use strata_vm::blockjob::{JobKind, JobOptions};
use strata_vm::{CreateOptions, DeleteOptions, Kind, Manager, StateDir, VmDef, VmRecord};

#[derive(clap::Args)]
pub struct VmCli {
    /// State directory (default: $STRATA_STATE_DIR, else /var/lib/strata).
    #[arg(long = "state-dir", global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(clap::Subcommand)]
enum VmCommand {
    /// Define a VM (from options, or from a TOML or JSON file with --file).
    Define(DefineArgs),
    /// Start a VM's QEMU, detached (KVM when usable, else TCG).
    Start { name: String },
    /// Press the power button; quit QEMU if the guest is still up after --timeout.
    Stop {
        name: String,
        /// Seconds to wait for the guest to power off.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Save a running VM's memory to a file and stop it; `start` resumes it.
    Save { name: String },
    /// Resume the VM whose saved state FILE is (as `start` does).
    Restore { file: PathBuf },
    /// Kill a VM's QEMU at once.
    Kill { name: String },
    /// List the defined VMs and their state.
    List {
        /// `json` for machine-readable output (what the HTTP API's VM list shows).
        #[arg(long, default_value = "human")]
        output: String,
    },
    /// Show a VM's state and definition.
    Status { name: String },
    /// Forget a stopped VM that has no snapshots (its disks are kept).
    Undefine { name: String },
    /// Run a command in the guest through its agent; exits with the command's code.
    Exec {
        name: String,
        /// Seconds to wait for the command.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Snapshots: create, list, info, current, revert, delete.
    #[command(subcommand)]
    Snapshot(SnapCommand),
    /// Live block jobs on a running VM's disk (progress bar; Ctrl-C cancels).
    #[command(subcommand)]
    Blockjob(JobCommand),
}

#[derive(clap::Subcommand)]
enum JobCommand {
    /// Merge the active layer into its backing file (a file no snapshot keeps).
    Commit {
        name: String,
        /// The disk (0 for the first).
        #[arg(long, default_value_t = 0)]
        disk: usize,
        /// Run the VM on the backing file afterwards (its definition updated).
        #[arg(long)]
        pivot: bool,
    },
    /// Copy the backing chain's data into the active layer, which then stands alone.
    Pull {
        name: String,
        #[arg(long, default_value_t = 0)]
        disk: usize,
    },
    /// Copy the disk to a new image DEST while the guest runs.
    Copy {
        name: String,
        dest: PathBuf,
        #[arg(long, default_value_t = 0)]
        disk: usize,
        /// qcow2 or raw.
        #[arg(long, default_value = "qcow2")]
        format: String,
        /// Move the VM to DEST afterwards (its definition updated).
        #[arg(long)]
        pivot: bool,
    },
    /// Cancel the jobs left running on the VM (its disks stay as they were).
    Cancel { name: String },
    /// Wait until a disk restored from a backup (`strata backup restore
    /// --instant`) is fully local, with progress.
    Wait {
        name: String,
        /// First set the stream's speed limit (bytes per second, suffixes
        /// k, M, G; 0 for none).
        #[arg(long, value_parser = crate::backup::parse_speed)]
        speed: Option<u64>,
    },
}

#[derive(clap::Args)]
struct DefineArgs {
    name: Option<String>,
    /// A JSON or TOML definition (name, memory_mib, cpus, disks [{file, format} or
    /// {image, clone}], kernel, initrd, append).
    #[arg(long, conflicts_with_all = ["memory", "cpus", "disk", "disk_from_image", "kernel", "initrd", "append"])]
    file: Option<PathBuf>,
    /// Memory (MiB, or with a K/M/G/T suffix).
    #[arg(long, default_value = "512M")]
    memory: String,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// A disk, PATH[,format=qcow2|raw] (repeatable; in guest order).
    #[arg(long)]
    disk: Vec<String>,
    /// A disk made from an image (ID or name), after the --disk ones: thin, a
    /// qcow2 overlay in the VM's directory on a verified local copy of the
    /// image, or copy (repeatable).
    #[arg(long, value_name = "IMAGE[,clone=thin|copy]")]
    disk_from_image: Vec<String>,
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    append: Option<String>,
}

#[derive(clap::Subcommand)]
enum SnapCommand {
    /// Create a snapshot (a running VM's memory is included unless --disk-only).
    Create {
        name: String,
        snapshot: String,
        #[arg(long)]
        disk_only: bool,
        /// Freeze the guest's filesystems through its agent around the snapshot.
        #[arg(long)]
        quiesce: bool,
        #[arg(long, conflicts_with = "external")]
        internal: bool,
        #[arg(long)]
        external: bool,
        /// With memory, external: pause the guest only while the disks switch
        /// (milliseconds) and save its memory as it was then while it runs on
        /// (the command takes longer than a default snapshot).
        #[arg(long, requires = "external", conflicts_with = "disk_only")]
        background: bool,
    },
    /// List the snapshots.
    List {
        name: String,
        /// Show the tree.
        #[arg(long)]
        tree: bool,
        /// `json` for machine-readable output.
        #[arg(long, default_value = "human")]
        output: String,
    },
    /// Show one snapshot (JSON).
    Info { name: String, snapshot: String },
    /// Print the current snapshot.
    Current { name: String },
    /// Revert to a snapshot.
    Revert {
        name: String,
        snapshot: String,
        /// Allow restarting a running VM (needed for a disk-only snapshot).
        #[arg(long)]
        force: bool,
    },
    /// Delete a snapshot, merging its data into its neighbours.
    Delete {
        name: String,
        snapshot: String,
        /// Delete its descendants too.
        #[arg(long)]
        children: bool,
        /// Only forget it; leave the image files as they are.
        #[arg(long)]
        metadata_only: bool,
    },
}

pub fn run(cli: VmCli) -> i32 {
    let mgr = Manager::new(StateDir::resolve(cli.state_dir));
    match dispatch(&mgr, cli.command) {
        Ok(code) => code,
        Err(e) => {
            crate::img::Ctx { prog: "strata vm" }.error(&e);
            // A command the user cancelled (Ctrl-C) ends as one killed by SIGINT.
            match e.downcast_ref::<strata_vm::Error>() {
                Some(strata_vm::Error::Cancelled(_)) => 130,
                _ => 1,
            }
        }
    }
}

fn dispatch(mgr: &Manager, cmd: VmCommand) -> Result<i32> {
    match cmd {
        VmCommand::Define(a) => define(mgr, a)?,
        VmCommand::Start { name } => {
            if let Some(note) = mgr.start(&name)? {
                eprintln!("{note}");
            }
            println!("VM '{name}' started");
        }
        VmCommand::Stop { name, timeout } => {
            let clean = mgr.stop(&name, Duration::from_secs(timeout))?;
            if clean {
                println!("VM '{name}' powered off");
            } else {
                println!("VM '{name}' did not power off within {timeout} s; QEMU was told to quit");
            }
        }
        VmCommand::Save { name } => {
            let file = mgr.save(&name)?;
            println!("VM '{name}' saved to {}", file.display());
        }
        VmCommand::Restore { file } => {
            let (name, note) = mgr.restore(&file)?;
            if let Some(note) = note {
                eprintln!("{note}");
            }
            println!("VM '{name}' restored from {}", file.display());
        }
        VmCommand::Kill { name } => {
            if !mgr.kill(&name)? {
                println!("VM '{name}' was not running");
            }
        }
        VmCommand::List { output } => {
            let list = mgr.list()?;
            match output.as_str() {
                "json" => {
                    println!("{}", serde_json::to_string_pretty(&list)?);
                    return Ok(0);
                }
                "human" => {}
                other => bail!("unknown output format '{other}' (human or json)"),
            }
            println!("{:<24} {:<10} {:<8} CURRENT", "NAME", "STATE", "SNAPS");
            for s in list {
                println!(
                    "{:<24} {:<10} {:<8} {}",
                    s.name,
                    s.state,
                    s.snapshots,
                    s.current.as_deref().unwrap_or("-")
                );
            }
        }
        VmCommand::Status { name } => {
            let s = mgr.status(&name)?;
            println!("name: {}", s.name);
            println!("state: {}", s.state);
            if let Some(p) = s.pid {
                println!("pid: {p}");
            }
            println!("memory: {} MiB, cpus: {}", s.def.memory_mib, s.def.cpus);
            for (i, d) in s.def.disks.iter().enumerate() {
                println!("disk{i}: {} ({})", d.file.display(), d.format);
            }
            println!("snapshots: {}", s.snapshots);
            println!("current: {}", s.current.as_deref().unwrap_or("-"));
            if let Some(r) = &s.restore {
                print_restore(r);
            }
        }
        VmCommand::Undefine { name } => strata_registry::cache::undefine_vm(mgr, &name)?,
        VmCommand::Exec {
            name,
            timeout,
            command,
        } => {
            let out = mgr.exec(&name, &command, Duration::from_secs(timeout))?;
            std::io::stdout().write_all(&out.stdout)?;
            std::io::stderr().write_all(&out.stderr)?;
            return Ok(match (out.exit_code, out.signal) {
                (Some(c), _) => c as i32,
                (None, Some(sig)) => 128 + sig as i32,
                (None, None) => 1,
            });
        }
        VmCommand::Snapshot(c) => snapshot(mgr, c)?,
        VmCommand::Blockjob(c) => blockjob(mgr, c)?,
    }
    Ok(0)
}

fn define(mgr: &Manager, a: DefineArgs) -> Result<()> {
    let (def, images) = match &a.file {
        Some(f) => crate::image_ops::read_definition(mgr, f, a.name.as_deref())?,
        None => {
            let Some(name) = a.name else {
                bail!("define needs a NAME (or --file)");
            };
            let mut images = crate::image_ops::ImageDisks::new(mgr, &name)?;
            let mut def = VmDef {
                name,
                memory_mib: strata_vm::record::parse_memory(&a.memory)?,
                cpus: a.cpus,
                disks: a
                    .disk
                    .iter()
                    .map(|d| strata_vm::record::parse_disk(d))
                    .collect::<strata_vm::Result<_>>()?,
                kernel: a.kernel,
                initrd: a.initrd,
                append: a.append,
            };
            images.add_options(mgr, &mut def, &a.disk_from_image)?;
            (def, images)
        }
    };
    let name = def.name.clone();
    mgr.define(def)?;
    images.keep();
    println!("VM '{name}' defined");
    Ok(())
}

fn snapshot(mgr: &Manager, c: SnapCommand) -> Result<()> {
    match c {
        SnapCommand::Create {
            name,
            snapshot,
            disk_only,
            quiesce,
            internal,
            external,
            background,
        } => {
            let kind = match (internal, external) {
                (true, _) => Some(Kind::Internal),
                (_, true) => Some(Kind::External),
                _ => None,
            };
            let s = mgr.snapshot_create_cancellable(
                &name,
                &snapshot,
                CreateOptions {
                    disk_only,
                    quiesce,
                    kind,
                    background,
                },
                cancel_on_interrupt(),
            )?;
            interrupted_too_late("the snapshot");
            let mut what = format!(
                "{} {}",
                s.kind.name(),
                if s.memory { "full" } else { "disk-only" }
            );
            if let Some(n) = s.frozen_filesystems {
                what.push_str(&format!(", {n} filesystem(s) frozen"));
            }
            if let Some(p) = s.pause_ms {
                what.push_str(&format!(", guest paused {p} ms"));
            }
            println!("Snapshot '{snapshot}' created ({what})");
        }
        SnapCommand::List { name, tree, output } => {
            let rec = mgr.record(&name)?;
            match output.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&rec.snapshots)?),
                "human" if tree => print_tree(&rec, None, 0),
                "human" => {
                    println!(
                        "{:<20} {:<10} {:<10} {:<9} PARENT",
                        "NAME", "KIND", "MEMORY", "STATE"
                    );
                    for s in &rec.snapshots {
                        let cur = if rec.current.as_deref() == Some(&s.name) {
                            " *"
                        } else {
                            ""
                        };
                        println!(
                            "{:<20} {:<10} {:<10} {:<9} {}{cur}",
                            s.name,
                            s.kind.name(),
                            if s.memory { "yes" } else { "no" },
                            s.vm_state,
                            s.parent.as_deref().unwrap_or("-")
                        );
                    }
                }
                other => bail!("unknown output format '{other}' (human or json)"),
            }
        }
        SnapCommand::Info { name, snapshot } => {
            let info = mgr.record(&name)?.snapshot_info(&snapshot)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        SnapCommand::Current { name } => {
            let rec = mgr.record(&name)?;
            match rec.current {
                Some(c) => println!("{c}"),
                None => bail!("VM '{name}' has no current snapshot"),
            }
        }
        SnapCommand::Revert {
            name,
            snapshot,
            force,
        } => {
            mgr.snapshot_revert_cancellable(&name, &snapshot, force, cancel_on_interrupt())?;
            interrupted_too_late("the revert");
            println!("VM '{name}' reverted to snapshot '{snapshot}'");
        }
        SnapCommand::Delete {
            name,
            snapshot,
            children,
            metadata_only,
        } => {
            mgr.snapshot_delete_cancellable(
                &name,
                &snapshot,
                DeleteOptions {
                    children,
                    metadata_only,
                },
                cancel_on_interrupt(),
            )?;
            interrupted_too_late("the delete");
            println!("Snapshot '{snapshot}' deleted");
        }
    }
    Ok(())
}

fn print_tree(rec: &VmRecord, parent: Option<&str>, depth: usize) {
    for s in rec
        .snapshots
        .iter()
        .filter(|s| s.parent.as_deref() == parent)
    {
        let cur = if rec.current.as_deref() == Some(&s.name) {
            "  (current)"
        } else {
            ""
        };
        println!(
            "{}{} [{}{}]{cur}",
            "  ".repeat(depth),
            s.name,
            s.kind.name(),
            if s.memory { ", memory" } else { "" }
        );
        print_tree(rec, Some(&s.name), depth + 1);
    }
}

/// The `restore:` lines of `vm status`: a pair for each disk not local yet.
fn print_restore(r: &strata_vm::restore::RestoreStatus) {
    use strata_vm::restore::Phase;
    for d in &r.disks {
        let src = &d.disk.source;
        println!(
            "restore: disk {} from snapshot {} of {}",
            d.disk.disk,
            &src.snapshot[..src.snapshot.len().min(8)],
            src.repo
        );
        let state = match &d.phase {
            Phase::Streaming { done, total } => format!(
                "streaming, {} of {} MiB ({}%){}",
                done >> 20,
                total >> 20,
                done.saturating_mul(100).checked_div(*total).unwrap_or(0),
                match r.restore.speed {
                    0 => String::new(),
                    s => format!(", limited to {} KiB/s", s >> 10),
                }
            ),
            Phase::Stopped => "waiting: the VM is stopped; `start` resumes the stream".into(),
            Phase::ServerDown => {
                "the backup server is not running: the guest gets I/O errors for data not restored yet; `start` serves the backup again and resumes".into()
            }
            Phase::Failed(e) => format!("the stream failed ({e}); `start` resumes it"),
        };
        println!("restore state: {state}");
    }
    if let Some(pid) = r.server {
        println!("restore server: pid {pid}");
    }
}

/// Set by SIGINT while a block job runs: the job is cancelled.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// The cancel of a snapshot create, revert or delete, asked for by SIGINT:
/// the same request an API task's cancel makes, so the operation stops (and
/// undoes its work) where the API's would, or completes when it is past its
/// point of no return.
static SNAPSHOT_CANCEL: Cancel = Cancel::new();

extern "C" fn on_snapshot_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    SNAPSHOT_CANCEL.request();
    // SAFETY: signal(2) is async-signal-safe; SIG_DFL is a valid disposition.
    // A second Ctrl-C ends the command at once (the next command recovers).
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
    }
}

/// Route SIGINT to [`SNAPSHOT_CANCEL`] and return it.
fn cancel_on_interrupt() -> &'static Cancel {
    // SAFETY: the handler only does atomic operations and signal(2).
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_snapshot_interrupt as *const () as libc::sighandler_t,
        );
    }
    &SNAPSHOT_CANCEL
}

/// Say so when a Ctrl-C came after `what` was past its point of no return.
fn interrupted_too_late(what: &str) {
    if INTERRUPTED.load(Ordering::SeqCst) && !SNAPSHOT_CANCEL.is_cancelled() {
        eprintln!(
            "strata vm: interrupted too late: {what} was past the point where stopping is safe, so it was completed"
        );
    }
}

fn blockjob(mgr: &Manager, c: JobCommand) -> Result<()> {
    let (name, opts) = match c {
        JobCommand::Cancel { name } => {
            let ids = mgr.blockjob_cancel(&name)?;
            println!("{} job(s) cancelled on VM '{name}'", ids.len());
            return Ok(());
        }
        JobCommand::Wait { name, speed } => return crate::backup::wait_restore(mgr, &name, speed),
        JobCommand::Commit { name, disk, pivot } => (
            name,
            JobOptions {
                kind: JobKind::Commit,
                disk,
                pivot,
            },
        ),
        JobCommand::Pull { name, disk } => (
            name,
            JobOptions {
                kind: JobKind::Pull,
                disk,
                pivot: false,
            },
        ),
        JobCommand::Copy {
            name,
            dest,
            disk,
            format,
            pivot,
        } => (
            name,
            JobOptions {
                kind: JobKind::Copy { dest, format },
                disk,
                pivot,
            },
        ),
    };
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
    let bar = crate::img::progress::Bar::new(true);
    let out = mgr.blockjob(&name, &opts, &bar, &|| INTERRUPTED.load(Ordering::SeqCst))?;
    bar.finish();
    if out.pivoted {
        println!(
            "VM '{name}' now runs disk {} on {}",
            opts.disk,
            out.disk.display()
        );
    } else {
        println!(
            "Block job done; VM '{name}' runs disk {} on {}",
            opts.disk,
            out.disk.display()
        );
    }
    Ok(())
}
