//! `strata backup`: disk backups in restic's repository format (`init`, `create`,
//! `list`, `restore`, `verify`, `prune`, `gc`, `stats`). The repository comes from `--repo`, `STRATA_REPOSITORY` or
//! `RESTIC_REPOSITORY`; the password from `--password-file`, `STRATA_PASSWORD`,
//! `RESTIC_PASSWORD` or `RESTIC_PASSWORD_FILE`, in that order.

mod instant;
mod maintenance;
mod nbd;
mod vm;

pub(crate) use instant::{parse_speed, wait as wait_restore};

use crate::img::progress::Bar;
use anyhow::{anyhow, bail, Context, Result};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_format::Format;
use strata_jobs::Cancel;
use strata_repo::disk::{self, BackupOptions, DiskSource, Incremental};
use strata_repo::restore::{self, RestoreOptions};
use strata_repo::{Backend, Id, KdfParams, Repository};

#[derive(clap::Args)]
pub struct BackupCli {
    #[command(subcommand)]
    command: BackupCommand,
}

#[derive(clap::Subcommand)]
enum BackupCommand {
    /// Create a repository (restic format, version 2, compressed).
    Init(InitArgs),
    /// Back up a disk image (qcow2 or raw, with its backing chain).
    Create(CreateArgs),
    /// List the snapshots of a repository.
    List(ListArgs),
    /// Restore a snapshot's disk (or a byte range of it) to a raw or qcow2 image;
    /// with --vm NAME --instant, start the VM on it at once while the data streams in.
    Restore(RestoreArgs),
    /// Check the repository: snapshots, index and (all or a sample of) the packs.
    Verify(VerifyArgs),
    /// Forget the snapshots a retention policy does not keep, then collect garbage.
    Prune(PruneArgs),
    /// Remove data no snapshot references (unreferenced blobs and packs).
    Gc(GcArgs),
    /// Sizes: logical, deduplicated, stored; deduplication and compression factors.
    Stats(StatsArgs),
    /// Export a snapshot's disk read-only over NBD: any NBD client (QEMU, qemu-img,
    /// nbdcopy) reads the backup in place, without restoring it first.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct RepoArgs {
    /// The repository: a directory, or s3:http://HOST:PORT/BUCKET[/PREFIX]; default $STRATA_REPOSITORY, then $RESTIC_REPOSITORY.
    #[arg(long = "repo", short = 'r')]
    repo: Option<String>,
    /// Read the password from this file (surrounding whitespace and the newline trimmed).
    #[arg(long = "password-file")]
    password_file: Option<PathBuf>,
    /// While another process holds a conflicting lock, retry for up to this long
    /// (seconds, or with an s, m or h suffix) instead of failing at once.
    #[arg(long = "retry-lock", value_parser = parse_duration)]
    retry_lock: Option<std::time::Duration>,
}

/// `90`, `90s`, `5m` or `1h`.
fn parse_duration(s: &str) -> Result<std::time::Duration> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = num.parse().map_err(|_| {
        anyhow!("invalid duration '{s}': expected seconds, or a number with s, m or h")
    })?;
    let secs = match unit {
        's' => Some(n),
        'm' => n.checked_mul(60),
        'h' => n.checked_mul(3600),
        _ => None,
    }
    .ok_or_else(|| {
        anyhow!("invalid duration '{s}': expected seconds, or a number with s, m or h")
    })?;
    Ok(std::time::Duration::from_secs(secs))
}

#[derive(clap::Args)]
struct InitArgs {
    #[command(flatten)]
    repo: RepoArgs,
}

#[derive(clap::Args)]
struct CreateArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The image to back up.
    #[arg(required_unless_present_any = ["vm", "nbd"], conflicts_with_all = ["vm", "nbd"])]
    image: Option<PathBuf>,
    /// Back up a disk of this running VM of `strata vm` instead: a consistent
    /// point taken through QEMU, reading only what changed since the VM's
    /// previous backup (a persistent dirty bitmap) when it can.
    #[arg(long = "vm", conflicts_with_all = ["format", "force_share", "changed_chunks"])]
    vm: Option<String>,
    /// Back up an NBD export instead: nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH. Ranges its base:allocation context
    /// reports as zeroes are not read.
    #[arg(long = "nbd", value_name = "URL", conflicts_with_all = ["vm", "format", "force_share", "changed_chunks"])]
    nbd: Option<String>,
    /// With --nbd: read only the 4 MiB chunks the export's
    /// qemu:dirty-bitmap:NAME context marks, reusing the parent's others (the
    /// bitmap must mark every change since the parent snapshot).
    #[arg(long = "bitmap", value_name = "NAME", requires = "nbd")]
    bitmap: Option<String>,
    /// With --vm: the disk (0 for the first).
    #[arg(long = "disk", requires = "vm", default_value_t = 0)]
    disk: usize,
    /// With --vm: the VM state directory (as `strata vm --state-dir`).
    #[arg(long = "state-dir", requires = "vm", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Its format (probed when not given).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Read an image another process holds for writing (force-share).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Parent snapshot (ID prefix or `latest`), recorded in the new snapshot.
    #[arg(long = "parent")]
    parent: Option<String>,
    /// With --parent: only these 4 MiB chunk indexes changed (comma-separated
    /// lists and ranges, e.g. `0,5-9`); the others reuse the parent's blobs unread.
    #[arg(long = "changed-chunks", requires = "parent")]
    changed_chunks: Option<String>,
    /// Tag the snapshot (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
}

#[derive(clap::Args)]
struct ListArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// `human` or `json` (restic's `snapshots --json` shape).
    #[arg(long = "output", default_value = "human")]
    output: String,
}

#[derive(clap::Args)]
struct RestoreArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The snapshot: a unique ID prefix or `latest`.
    snapshot: String,
    /// The image to write (created or overwritten).
    output: PathBuf,
    /// Output format: raw (sparse, the default) or qcow2.
    #[arg(short = 'O', long = "output-format")]
    output_format: Option<String>,
    /// Restore only the bytes from this disk offset (with --length).
    #[arg(long = "offset", requires = "length")]
    offset: Option<u64>,
    /// Restore only this many bytes (from --offset, default 0).
    #[arg(long = "length")]
    length: Option<u64>,
    /// Write into the existing image OUTPUT (format probed) at the disk's own
    /// offsets, zeroes included, instead of creating a new file.
    #[arg(long = "existing", conflicts_with = "output_format")]
    existing: bool,
    #[command(flatten)]
    instant: instant::InstantArgs,
}

#[derive(clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Read only a subset of the packs: `n/t` (part n of t) or a percentage (`10%`).
    #[arg(long = "read-data-subset", conflicts_with = "no_read_data")]
    read_data_subset: Option<String>,
    /// Check snapshots, trees and the index only; read no pack.
    #[arg(long = "no-read-data")]
    no_read_data: bool,
    /// `human` or `json`.
    #[arg(long = "output", default_value = "human")]
    output: String,
}

#[derive(clap::Args)]
struct PruneArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Keep the N most recent snapshots.
    #[arg(long = "keep-last", short = 'l', default_value_t = 0)]
    last: u32,
    /// Keep the most recent snapshot of each of the last N hours that have one.
    #[arg(long = "keep-hourly", short = 'H', default_value_t = 0)]
    hourly: u32,
    /// ... of each of the last N days.
    #[arg(long = "keep-daily", short = 'd', default_value_t = 0)]
    daily: u32,
    /// ... of each of the last N ISO weeks.
    #[arg(long = "keep-weekly", short = 'w', default_value_t = 0)]
    weekly: u32,
    /// ... of each of the last N months.
    #[arg(long = "keep-monthly", short = 'm', default_value_t = 0)]
    monthly: u32,
    /// ... of each of the last N years.
    #[arg(long = "keep-yearly", short = 'y', default_value_t = 0)]
    yearly: u32,
    /// Print each snapshot with keep or remove and the rules that keep it; change nothing.
    #[arg(long = "dry-run", short = 'n')]
    dry_run: bool,
    /// `human` or `json`.
    #[arg(long = "output", default_value = "human")]
    output: String,
}

#[derive(clap::Args)]
struct GcArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// Count what would be removed; change nothing.
    #[arg(long = "dry-run", short = 'n')]
    dry_run: bool,
    /// `human` or `json`.
    #[arg(long = "output", default_value = "human")]
    output: String,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// The snapshot: a unique ID prefix or `latest`.
    snapshot: String,
    /// Name of the export.
    #[arg(short = 'x', long = "export-name", default_value = "")]
    export_name: String,
    #[command(flatten)]
    listen: crate::nbd::ListenArgs,
}

#[derive(clap::Args)]
struct StatsArgs {
    #[command(flatten)]
    repo: RepoArgs,
    /// `human` or `json`.
    #[arg(long = "output", default_value = "human")]
    output: String,
}

pub fn run(cli: BackupCli) -> i32 {
    let r = match cli.command {
        BackupCommand::Init(a) => init(a),
        BackupCommand::Create(a) => create(a),
        BackupCommand::List(a) => list(a),
        BackupCommand::Restore(a) => restore_cmd(a),
        BackupCommand::Verify(a) => maintenance::verify(a),
        BackupCommand::Prune(a) => maintenance::prune(a),
        BackupCommand::Gc(a) => maintenance::gc(a),
        BackupCommand::Stats(a) => maintenance::stats(a),
        BackupCommand::Serve(a) => serve(a),
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            crate::img::Ctx {
                prog: "strata backup",
            }
            .error(&e);
            1
        }
    }
}

impl RepoArgs {
    /// The repository location: `--repo`, else the environment.
    fn location(&self) -> Result<String> {
        self.repo
            .clone()
            .or_else(|| std::env::var("STRATA_REPOSITORY").ok())
            .or_else(|| std::env::var("RESTIC_REPOSITORY").ok())
            .filter(|r| !r.is_empty())
            .ok_or_else(|| {
                anyhow!("no repository given: use --repo, STRATA_REPOSITORY or RESTIC_REPOSITORY")
            })
    }

    fn backend(&self) -> Result<Arc<dyn Backend>> {
        Ok(strata_repo::open_location(&self.location()?)?)
    }

    fn password(&self) -> Result<String> {
        password(self.password_file.as_deref())
    }

    fn open(&self) -> Result<Repository> {
        let backend = self.backend()?;
        let mut repo = Repository::open(backend, &self.password()?)?;
        if let Some(wait) = self.retry_lock {
            repo.set_lock_wait(wait);
        }
        Ok(repo)
    }
}

/// A repository's password: from `file` when given, else the environment.
pub(crate) fn password(file: Option<&Path>) -> Result<String> {
    let from_file = |p: &Path| -> Result<String> {
        let s = std::fs::read_to_string(p)
            .with_context(|| format!("could not read the password file '{}'", p.display()))?;
        Ok(s.trim().to_string())
    };
    if let Some(p) = file {
        return from_file(p);
    }
    for var in ["STRATA_PASSWORD", "RESTIC_PASSWORD"] {
        if let Ok(p) = std::env::var(var) {
            return Ok(p);
        }
    }
    if let Ok(p) = std::env::var("RESTIC_PASSWORD_FILE") {
        return from_file(Path::new(&p));
    }
    bail!("no password given: use --password-file, STRATA_PASSWORD, RESTIC_PASSWORD or RESTIC_PASSWORD_FILE")
}

fn init(a: InitArgs) -> Result<()> {
    let backend = a.repo.backend()?;
    let password = a.repo.password()?;
    if password.is_empty() {
        bail!("an empty password is not allowed");
    }
    let repo = Repository::init(backend.clone(), &password, KdfParams::default())?;
    println!(
        "created repository {} at {}",
        &repo.config().id[..10],
        backend.location()
    );
    Ok(())
}

/// A progress bar on stderr when it is a terminal.
fn bar() -> Bar {
    Bar::new(std::io::stderr().is_terminal())
}

fn create(a: CreateArgs) -> Result<()> {
    if a.vm.is_some() {
        return vm::create(a);
    }
    if a.nbd.is_some() {
        return nbd::create(a);
    }
    let image = a
        .image
        .clone()
        .expect("clap requires an image without --vm");
    let format = a
        .format
        .as_deref()
        .map(|f| f.parse::<Format>())
        .transpose()?;
    let mut repo = a.repo.open()?;
    let src = DiskSource::open(&image, format, a.force_share)?;
    let mut opts = BackupOptions::for_image(&image);
    opts.tags = a.tags;
    if let Some(p) = &a.parent {
        let (parent, _) = repo.find_snapshot(p)?;
        opts.parent = Some(parent);
        if let Some(list) = &a.changed_chunks {
            opts.incremental = Some(Incremental {
                parent,
                changed: parse_chunk_list(list)?,
            });
        }
    }
    run_backup(&mut repo, &src, &opts)
}

/// Back up `src` with a progress bar and print what it did.
fn run_backup(repo: &mut Repository, src: &DiskSource, opts: &BackupOptions) -> Result<()> {
    let bar = bar();
    let s = disk::backup(repo, src, opts, &bar, &Cancel::default())?;
    bar.finish();
    println!(
        "{}: {} bytes in {} chunks ({} zero, {} reused), {} bytes read, {} new blobs, {} bytes stored",
        opts.name,
        s.size,
        s.chunks,
        s.zero_chunks,
        s.reused_chunks,
        s.bytes_read,
        s.saved.new_blobs,
        s.saved.new_stored_bytes
    );
    println!("snapshot {} saved", s.snapshot.short());
    Ok(())
}

/// `0,5-9` → {0, 5, 6, 7, 8, 9}.
fn parse_chunk_list(s: &str) -> Result<std::collections::BTreeSet<u64>> {
    let mut out = std::collections::BTreeSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || anyhow!("invalid chunk list '{s}': expected indexes and ranges like 0,5-9");
        let (a, b): (u64, u64) = match part.split_once('-') {
            Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
            None => {
                let v = part.parse().map_err(|_| bad())?;
                (v, v)
            }
        };
        if a > b {
            return Err(bad());
        }
        out.extend(a..=b);
    }
    Ok(out)
}

/// Whether `--output` asks for JSON.
fn wants_json(output: &str) -> Result<bool> {
    match output {
        "json" => Ok(true),
        "human" => Ok(false),
        o => bail!("--output must be 'human' or 'json', not '{o}'"),
    }
}

fn list(a: ListArgs) -> Result<()> {
    let json = wants_json(&a.output)?;
    let repo = a.repo.open()?;
    // The image registry's snapshots are images, not backups: not listed here.
    let snaps: Vec<_> = repo
        .snapshots()?
        .into_iter()
        .filter(|(_, s)| !s.is_image())
        .collect();
    if json {
        let out: Vec<serde_json::Value> = snaps
            .iter()
            .map(|(id, s)| {
                let mut v = serde_json::to_value(s).expect("json");
                v["id"] = id.to_string().into();
                v["short_id"] = id.short().into();
                v
            })
            .collect();
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let rows: Vec<[String; 5]> = snaps
        .iter()
        .map(|(id, s)| {
            [
                id.short(),
                s.timestamp().display(),
                s.hostname.clone(),
                s.tags.join(","),
                s.paths.join(" "),
            ]
        })
        .collect();
    let head = ["ID", "Time", "Host", "Tags", "Paths"].map(String::from);
    let mut widths = head.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |r: &[String; 5]| {
        let cells: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    };
    line(&head);
    println!("{}", "-".repeat(widths.iter().sum::<usize>() + 8));
    rows.iter().for_each(line);
    println!("{} snapshots", rows.len());
    Ok(())
}

fn restore_cmd(a: RestoreArgs) -> Result<()> {
    if a.instant.vm.is_some() {
        return instant::restore(a);
    }
    let format = match a.output_format.as_deref().unwrap_or("raw") {
        "raw" => Format::Raw,
        "qcow2" => Format::Qcow2,
        o => bail!("output format must be raw or qcow2, not '{o}'"),
    };
    let mut repo = a.repo.open()?;
    let (id, snap): (Id, _) = repo.find_snapshot(&a.snapshot)?;
    let opts = RestoreOptions {
        format,
        range: a.length.map(|len| (a.offset.unwrap_or(0), len)),
        existing: a.existing,
    };
    let bar = bar();
    let s = restore::restore_with(&mut repo, &snap, &a.output, &opts, &bar, &Cancel::default())?;
    bar.finish();
    println!(
        "restored snapshot {} to {} ({} bytes, {} written)",
        id.short(),
        a.output.display(),
        s.size,
        s.bytes_written
    );
    Ok(())
}

/// Serve a snapshot over NBD under a shared lock (refreshed while the server
/// runs), so no prune or gc removes the packs it reads.
fn serve(a: ServeArgs) -> Result<()> {
    let mut repo = a.repo.open()?;
    let mut lock = strata_repo::lock::Lock::acquire(&repo, false)?;
    repo.reload_index()?;
    let (id, snap) = repo.find_snapshot(&a.snapshot)?;
    let repo = Arc::new(repo);
    let device = strata_repo::device::SnapshotDevice::open(repo.clone(), &snap)?;
    let export = strata_nbd::Export::from_device(
        a.export_name,
        format!("strata backup snapshot {}", id.short()),
        Arc::new(device),
    )?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refresher = {
        let (repo, stop) = (repo.clone(), stop.clone());
        std::thread::spawn(move || -> strata_repo::Result<()> {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(200));
                lock.refresh_if_due(&repo)?;
            }
            lock.release()
        })
    };
    let served = crate::nbd::run_server(
        vec![Arc::new(export)],
        crate::nbd::Listen {
            bind: a.listen.bind,
            port: a.listen.port,
            socket: a.listen.socket,
            control: None,
            tls: None,
            workers: 4,
            prog: "strata backup",
        },
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let released = refresher
        .join()
        .map_err(|_| anyhow!("the lock refresher panicked"))?;
    served?;
    released?;
    Ok(())
}
