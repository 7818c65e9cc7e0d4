//! `strata backup`: disk backups in restic's repository format (`init`, `create`,
//! `list`, `restore`, `verify`, `prune`, `gc`, `stats`). The repository comes from `--repo`, `STRATA_REPOSITORY` or
//! `RESTIC_REPOSITORY`; the password from `--password-file`, `STRATA_PASSWORD`,
//! `RESTIC_PASSWORD_FILE` or `RESTIC_PASSWORD`, in that order.

mod instant;
mod maintenance;
mod nbd;
mod vm;

pub(crate) use instant::{parse_speed, wait as wait_restore};

use crate::img::progress::Bar;
use anyhow::{anyhow, bail, Result};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_format::Format;
use strata_jobs::Cancel;
use strata_repo::chunk::ChunkSize;
use strata_repo::disk;
use strata_repo::ops;
use strata_repo::restore::RestoreOptions;
use strata_repo::{Backend, KdfParams, Repository};

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
    /// Read the password from this file (surrounding whitespace and the newline
    /// trimmed); default $STRATA_PASSWORD, then $RESTIC_PASSWORD_FILE, then $RESTIC_PASSWORD.
    #[arg(long = "password-file")]
    password_file: Option<PathBuf>,
    /// While another process holds a conflicting lock, retry for up to this long
    /// (seconds, or with an s, m or h suffix) instead of failing at once.
    #[arg(long = "retry-lock", value_parser = parse_duration)]
    retry_lock: Option<std::time::Duration>,
}

fn parse_chunk_size(s: &str) -> Result<ChunkSize> {
    Ok(ChunkSize::parse(s)?)
}

/// A byte count or offset: bytes, or with a k, M, G or T suffix (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    strata_jobs::create::parse_size(s).ok_or_else(|| {
        format!("invalid size '{s}': bytes, or a number with a k, M, G or T suffix (e.g. 64M)")
    })
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
    #[arg(long = "vm", conflicts_with_all = ["format", "force_share", "changed_chunks", "bitmap"])]
    vm: Option<String>,
    /// Back up an NBD export instead: nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH. Ranges its base:allocation context
    /// reports as zeroes are not read.
    #[arg(long = "nbd", value_name = "URL", conflicts_with_all = ["vm", "format", "force_share", "changed_chunks"])]
    nbd: Option<String>,
    /// With --nbd: read only the chunks the export's
    /// qemu:dirty-bitmap:NAME context marks, reusing the parent's others (the
    /// bitmap must mark every change since the parent snapshot). With a qcow2
    /// image and --parent: read only the chunks its persistent bitmap NAME
    /// marks, then clear the bitmap once the snapshot is stored (the image is
    /// held with a write lock meanwhile; not with -U).
    #[arg(long = "bitmap", value_name = "NAME")]
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
    /// With --parent: only these chunk indexes changed (chunks of the parent's
    /// size; comma-separated lists and ranges, e.g. `0,5-9`); the others reuse
    /// the parent's blobs unread.
    #[arg(long = "changed-chunks", requires = "parent")]
    changed_chunks: Option<String>,
    /// The size of the fixed chunks the disk is cut into: 1M, 2M, 4M or 8M
    /// (default: the parent's, else 4M). Smaller chunks store less for small
    /// scattered changes; another size than the parent's reads the whole disk.
    #[arg(long = "chunk-size", value_name = "SIZE", value_parser = parse_chunk_size)]
    chunk_size: Option<ChunkSize>,
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
    /// With --length: where the range starts on the disk (bytes, or with a k,
    /// M, G or T suffix; default 0).
    #[arg(long = "offset", requires = "length", value_parser = parse_bytes)]
    offset: Option<u64>,
    /// Restore only this many bytes of the disk, from --offset (bytes, or
    /// with a k, M, G or T suffix, e.g. 64M).
    #[arg(long = "length", value_parser = parse_bytes)]
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
    /// The snapshots, each served as an export: unique ID prefixes or `latest`.
    #[arg(required = true)]
    snapshots: Vec<String>,
    /// Name of the export (default: empty); with several snapshots, one name
    /// per snapshot, in their order.
    #[arg(short = 'x', long = "export-name")]
    export_names: Vec<String>,
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
    password_from(file, |v| std::env::var(v).ok())
}

/// Where a password comes from, first found wins: `file`, `STRATA_PASSWORD`,
/// then restic's variables in restic's own order (`RESTIC_PASSWORD_FILE`
/// before `RESTIC_PASSWORD`), so strata opens a repository with the password
/// restic would use. An empty variable counts as unset, as in restic.
fn password_from(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<String> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    let from_file = |p: &Path| Ok(strata_repo::ops::read_password_file(p)?);
    if let Some(p) = file {
        return from_file(p);
    }
    if let Some(p) = var("STRATA_PASSWORD") {
        return Ok(p);
    }
    if let Some(p) = var("RESTIC_PASSWORD_FILE") {
        return from_file(Path::new(&p));
    }
    if let Some(p) = var("RESTIC_PASSWORD") {
        return Ok(p);
    }
    bail!("no password given: use --password-file, STRATA_PASSWORD, RESTIC_PASSWORD_FILE or RESTIC_PASSWORD")
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
pub(super) fn bar() -> Bar {
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
    let args = ops::ImageBackup {
        image,
        format: a
            .format
            .as_deref()
            .map(|f| f.parse::<Format>())
            .transpose()?,
        force_share: a.force_share,
        parent: a.parent.clone(),
        changed_chunks: a
            .changed_chunks
            .as_deref()
            .map(ops::parse_chunk_list)
            .transpose()?,
        tags: a.tags,
        chunk_size: a.chunk_size,
        bitmap: a.bitmap,
    };
    let mut repo = a.repo.open()?;
    let bar = bar();
    let (opts, s) = ops::backup_image(&mut repo, &args, &bar, &Cancel::default())?;
    bar.finish();
    print_backup(&opts.name, &s);
    Ok(())
}

pub(super) fn print_backup(name: &str, s: &disk::BackupSummary) {
    if let Some(why) = &s.full_read {
        eprintln!("strata backup: reading the whole disk: {why}");
    }
    println!(
        "{}: {} bytes in {} chunks of {} ({} zero, {} reused), {} bytes read, {} new blobs, {} bytes stored",
        name,
        s.size,
        s.chunks,
        s.chunk_size,
        s.zero_chunks,
        s.reused_chunks,
        s.bytes_read,
        s.saved.new_blobs,
        s.saved.new_stored_bytes
    );
    println!("snapshot {} saved", s.snapshot.short());
    if let Some(b) = &s.bitmap_cleared {
        println!("bitmap '{b}' cleared");
    }
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
        println!("{}", ops::snapshots_json(&snaps));
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
    let n = rows.len();
    println!("{n} snapshot{}", if n == 1 { "" } else { "s" });
    Ok(())
}

fn restore_cmd(a: RestoreArgs) -> Result<()> {
    if a.instant.vm.is_some() {
        return instant::restore(a);
    }
    let opts = RestoreOptions {
        format: ops::restore_format(a.output_format.as_deref())?,
        range: a.length.map(|len| (a.offset.unwrap_or(0), len)),
        existing: a.existing,
    };
    let mut repo = a.repo.open()?;
    let bar = bar();
    let (id, s) = ops::restore_snapshot(
        &mut repo,
        &a.snapshot,
        &a.output,
        &opts,
        &bar,
        &Cancel::default(),
    )?;
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

/// The export names of `serve`: as given, one per snapshot (a single
/// snapshot's export is unnamed by default), all different.
fn export_names(snapshots: usize, mut names: Vec<String>) -> Result<Vec<String>> {
    if names.is_empty() && snapshots == 1 {
        names.push(String::new());
    }
    if names.len() != snapshots {
        bail!(
            "{snapshots} snapshots and {} export names: name each snapshot's export (-x NAME, once per snapshot)",
            names.len()
        );
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_str())) {
        bail!("export name '{dup}' is given twice");
    }
    Ok(names)
}

/// Serve snapshots over NBD, one export each, under a shared lock (refreshed
/// while the server runs), so no prune or gc removes the packs they read.
fn serve(a: ServeArgs) -> Result<()> {
    let names = export_names(a.snapshots.len(), a.export_names)?;
    let mut repo = a.repo.open()?;
    let lock = strata_repo::lock::Lock::acquire(&repo, false)?;
    repo.reload_index()?;
    let found = a
        .snapshots
        .iter()
        .map(|s| repo.find_snapshot(s))
        .collect::<Result<Vec<_>, _>>()?;
    let repo = Arc::new(repo);
    let mut exports = Vec::new();
    for (name, (id, snap)) in names.into_iter().zip(found) {
        let device = strata_repo::device::SnapshotDevice::open(repo.clone(), &snap)?;
        exports.push(Arc::new(strata_nbd::Export::from_device(
            name,
            format!("strata backup snapshot {}", id.short()),
            Arc::new(device),
        )?));
    }
    let keeper = strata_repo::lock::LockKeeper::start(repo.clone(), lock);
    let served = crate::nbd::run_server(
        exports,
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
    let released = keeper.stop();
    served?;
    released?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{export_names, parse_bytes, password_from};
    use std::path::Path;

    #[test]
    fn the_password_comes_from_the_file_then_strata_then_restics_variables_in_restics_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "from a\n").unwrap();
        std::fs::write(&b, "  from b \n").unwrap();
        let b = b.to_str().unwrap();
        let pw = |file: Option<&Path>, vars: &[(&str, &str)]| {
            password_from(file, |name| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            })
        };
        let all = [
            ("STRATA_PASSWORD", "strata"),
            ("RESTIC_PASSWORD_FILE", b),
            ("RESTIC_PASSWORD", "restic"),
        ];
        assert_eq!(pw(Some(&a), &all).unwrap(), "from a");
        assert_eq!(pw(None, &all).unwrap(), "strata");
        // restic reads RESTIC_PASSWORD_FILE before RESTIC_PASSWORD; empty means unset.
        assert_eq!(pw(None, &all[1..]).unwrap(), "from b");
        let empty = [
            ("STRATA_PASSWORD", ""),
            ("RESTIC_PASSWORD_FILE", ""),
            ("RESTIC_PASSWORD", "restic"),
        ];
        assert_eq!(pw(None, &empty).unwrap(), "restic");
        let e = pw(None, &empty[..2]).unwrap_err().to_string();
        assert!(e.starts_with("no password given"), "{e}");
    }

    #[test]
    fn restore_ranges_take_bytes_or_binary_suffixes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("0"), Ok(0));
        let e = parse_bytes("1X").unwrap_err();
        assert!(e.contains("invalid size '1X'"), "{e}");
        assert!(parse_bytes("-1").is_err());
    }

    #[test]
    fn serve_names_one_export_per_snapshot_and_refuses_missing_or_repeated_names() {
        assert_eq!(export_names(1, vec![]).unwrap(), [""]);
        assert_eq!(export_names(1, vec!["d".into()]).unwrap(), ["d"]);
        assert_eq!(
            export_names(2, vec!["a".into(), "b".into()]).unwrap(),
            ["a", "b"]
        );
        let e = export_names(2, vec![]).unwrap_err().to_string();
        assert!(e.contains("2 snapshots and 0 export names"), "{e}");
        let e = export_names(2, vec!["a".into(), "a".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'a' is given twice"), "{e}");
    }
}
