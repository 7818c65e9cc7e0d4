//! `strata img snapshot`: internal snapshots with qemu-img's interface
//! (`-l` list, `-c` create, `-a` apply by ID or name, `-d` delete by name).

use super::common::{human_size, Ctx};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::sync::Arc;
use strata_format::qcow2::Qcow2Image;
use strata_format::BlockDevice;
use strata_jobs::info::SnapshotInfo;

/// qemu-img 10 reads `-c`, `-a` and `-d` with a value but declares their long
/// forms (`--create`, `--apply`, `--delete`) as taking none: `--apply=NAME` is
/// refused, `--apply NAME IMG` is two file names, and `--apply IMG` looks up no
/// snapshot (qemu-img prints the missing name as `(null)`). The long forms are
/// flags here so that the same command lines fail the same way.
#[derive(clap::Args)]
pub struct Args {
    /// `--object` definitions and `--image-opts`.
    #[command(flatten)]
    naming: super::imgname::Naming,
    /// List the snapshots (the default when no action is given).
    #[arg(short = 'l', long = "list", action = clap::ArgAction::Count)]
    list: u8,
    /// Create a snapshot named NAME of the current disk.
    #[arg(short = 'c', value_name = "NAME", action = clap::ArgAction::Append)]
    create: Vec<String>,
    /// `--create`: as qemu-img declares it, without a name.
    #[arg(long = "create", hide = true)]
    create_unnamed: bool,
    /// Apply (revert to) the snapshot with this ID or name; the current state is lost.
    #[arg(short = 'a', value_name = "SNAPSHOT", action = clap::ArgAction::Append)]
    apply: Vec<String>,
    /// `--apply`: as qemu-img declares it, without a name.
    #[arg(long = "apply", hide = true)]
    apply_unnamed: bool,
    /// Delete the snapshot with this name, freeing what only it used.
    #[arg(short = 'd', value_name = "SNAPSHOT", action = clap::ArgAction::Append)]
    delete: Vec<String>,
    /// `--delete`: as qemu-img declares it, without a name.
    #[arg(long = "delete", hide = true)]
    delete_unnamed: bool,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Open without locks, to list the snapshots of an image in use (read-only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Quiet: print nothing on success.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image.
    #[arg(value_parser = super::common::any_file_name())]
    filename: PathBuf,
}

/// qemu-img's snapshot table: header and one line per snapshot.
pub fn format_info_list(snaps: &[SnapshotInfo]) -> String {
    let mut out = String::from("Snapshot list:\n");
    out.push_str(&format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    ));
    for s in snaps {
        let secs = s.vm_clock_sec;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            s.vm_clock_nsec / 1_000_000
        );
        let icount = s.icount.map_or_else(|| "--".to_string(), |i| i.to_string());
        out.push_str(&format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            s.id,
            s.name,
            human_size(s.vm_state_size),
            local_date(s.date_sec),
            clock,
            icount
        ));
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS` in local time, as qemu-img prints snapshot dates.
fn local_date(secs: u32) -> String {
    let t = secs as libc::time_t;
    // SAFETY: `tm` is plain C data (integers and, on glibc, a nullable pointer), for
    // which all-zero bytes are a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers come from live locals; localtime_r writes only into `tm`
    // and, unlike localtime, keeps no shared static buffer.
    unsafe { libc::localtime_r(&t, &mut tm) };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// `r`, after the notices its operation left on `dev` are printed on stderr
/// (steps that failed without failing it, as QEMU prints them).
/// A snapshot whose L1 table QEMU refuses to load (misplaced or too large):
/// its message and the errno words qemu-img adds where it reports the failed
/// load a second time ("Invalid argument", "File too large").
pub fn bad_snapshot_l1(e: &strata_format::Error) -> Option<(&str, &'static str)> {
    use strata_format::qcow2::snapshot::{L1_OFFSET_INVALID, L1_TOO_LARGE};
    match e.message() {
        m @ L1_OFFSET_INVALID => Some((m, "Invalid argument")),
        m @ L1_TOO_LARGE => Some((m, "File too large")),
        _ => None,
    }
}

fn with_notices<T>(dev: &Arc<dyn BlockDevice>, r: T) -> T {
    if let Some(q) = dev.as_any().downcast_ref::<Qcow2Image>() {
        for n in q.take_notices() {
            eprintln!("{n}");
        }
    }
    r
}

/// What qemu-img prints for a snapshot name it was not given (C's `%s` of NULL).
const NO_NAME: &str = "(null)";

/// The one action of a command line: `None` to list. qemu-img refuses a second
/// action, the same one repeated too.
fn action(args: &Args, prog: &str) -> Result<Option<(char, Option<String>)>> {
    let mut all: Vec<(char, Option<String>)> = Vec::new();
    all.extend((0..args.list).map(|_| ('l', None)));
    all.extend(args.create.iter().map(|n| ('c', Some(n.clone()))));
    all.extend(args.create_unnamed.then_some(('c', None)));
    all.extend(args.apply.iter().map(|n| ('a', Some(n.clone()))));
    all.extend(args.apply_unnamed.then_some(('a', None)));
    all.extend(args.delete.iter().map(|n| ('d', Some(n.clone()))));
    all.extend(args.delete_unnamed.then_some(('d', None)));
    if all.len() > 1 {
        bail!(
            "Cannot mix '-l', '-a', '-c', '-d'\nTry '{} snapshot --help' for more info",
            super::invoked_as(prog)
        );
    }
    Ok(all.pop().filter(|(a, _)| *a != 'l'))
}

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    let action = action(&args, ctx.prog)?;
    let named = |a: char| {
        action
            .as_ref()
            .filter(|(c, _)| *c == a)
            .map(|(_, n)| n.clone())
    };
    let (create, apply, delete) = (named('c'), named('a'), named('d'));
    // Refused before the image is opened (or its format probed), -U as the
    // image's own force-share option.
    let writing = action.is_some();
    if writing && args.force_share {
        bail!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            args.filename.display()
        );
    }
    let spec = if writing {
        args.naming
            .writable_spec(&args.filename, args.format.as_deref())?
    } else {
        args.naming
            .spec(&args.filename, args.format.as_deref(), args.force_share)?
    }
    // A raw image has no snapshots: refused once open, never written.
    .writes_no_raw_data(true);
    super::imgname::refuse_backing_nodes(&spec)?;
    let format = super::common::spec_format(&spec)?;
    if writing {
        // qemu-img warns of a probed raw image as it opens it for writing (twice
        // to apply a snapshot: it opens the image again).
        let times = if apply.is_some() { 2 } else { 1 };
        for _ in 0..times {
            super::common::warn_probed_raw(&spec);
        }
    }
    let dev = super::common::open_top(&spec, format, writing)?;
    use strata_jobs::snapshot::{self as job, NameRule};
    use strata_jobs::Error as E;
    // qemu-img's wording for each refusal (a format without internal snapshots is
    // worded as its block layer words it).
    if let Some(None) = &create {
        // qemu-img 10 crashes here (it copies the missing name); refused instead.
        bail!("Could not create snapshot '{NO_NAME}': Invalid argument");
    }
    if let Some(None) = &delete {
        // qemu-img 10 crashes here (it compares the missing name); refused instead.
        bail!("Could not delete snapshot '{NO_NAME}': snapshot not found");
    }
    if let Some(Some(name)) = &create {
        let req = job::CreateRequest {
            name: name.clone(),
            names: NameRule::Any,
        };
        with_notices(&dev, job::create(dev.as_ref(), &req)).map_err(|e| match e {
            E::NoInternalSnapshots { .. } => {
                anyhow::anyhow!("Could not create snapshot '{name}': Operation not supported")
            }
            // A refcount the width cannot hold (1-bit refcounts): QEMU's EINVAL.
            E::Format(f) if f.kind() == strata_format::ErrorKind::InvalidArgument => {
                anyhow::anyhow!("Could not create snapshot '{name}': Invalid argument")
            }
            e => {
                let e = anyhow::Error::new(e);
                match super::ioerr::os_words(&e) {
                    Some(os) => anyhow::anyhow!("Could not create snapshot '{name}': {os}"),
                    None => e.context(format!("Could not create snapshot '{name}'")),
                }
            }
        })?;
    } else if let Some(given) = &apply {
        let key = given.as_deref().unwrap_or(NO_NAME);
        // QEMU refuses to load any snapshot over the image's bitmaps (all of
        // them loaded when it opens the image, disabled ones too), before it
        // looks the snapshot up.
        let qcow2 = dev.as_any().downcast_ref::<Qcow2Image>();
        if let Some(q) = qcow2 {
            if !q.bitmaps()?.is_empty() {
                bail!("Could not apply snapshot '{key}': Device has active dirty bitmaps");
            }
        }
        // No snapshot is found by a missing name, even one named "(null)".
        let found = job::list(dev.as_ref())
            .iter()
            .any(|s| s.name == key || s.id == key);
        if given.is_none() && found {
            bail!("Could not apply snapshot '{key}': Failed to load snapshot: No such file or directory");
        }
        let req = job::ApplyRequest {
            snapshot: key.to_string(),
        };
        let data_file = qcow2.is_some_and(Qcow2Image::has_data_file);
        with_notices(&dev, job::apply(dev.as_ref(), &req)).map_err(|e| match e {
            E::NoInternalSnapshots { .. } if data_file => anyhow::anyhow!(
                "Could not apply snapshot '{key}': Failed to load snapshot: Operation not supported"
            ),
            E::NoInternalSnapshots { .. } => anyhow::anyhow!(
                "Could not apply snapshot '{key}': Block driver does not support snapshots"
            ),
            E::SnapshotNotFound(_) => anyhow::anyhow!(
                "Could not apply snapshot '{key}': Failed to load snapshot: No such file or directory"
            ),
            // qemu-img reports a bad table as it loads it, then the failed load.
            E::Format(f) if bad_snapshot_l1(&f).is_some() => {
                let (msg, errno) = bad_snapshot_l1(&f).expect("matched");
                eprintln!("{}: {msg}", ctx.prog);
                anyhow::anyhow!(
                    "Could not apply snapshot '{key}': Failed to load snapshot: {errno}"
                )
            }
            // A refcount the width cannot hold (a cluster shared too often).
            E::Format(f) if f.kind() == strata_format::ErrorKind::InvalidArgument => anyhow::anyhow!(
                "Could not apply snapshot '{key}': Failed to load snapshot: Invalid argument"
            ),
            e => anyhow::Error::new(e).context(format!("Could not apply snapshot '{key}'")),
        })?;
    } else if let Some(Some(key)) = &delete {
        // qemu-img deletes by name only (an ID is not looked up).
        let Some(target) = job::list(dev.as_ref()).into_iter().find(|s| s.name == *key) else {
            bail!("Could not delete snapshot '{key}': snapshot not found");
        };
        let req = job::DeleteRequest {
            snapshot: target.id,
        };
        with_notices(&dev, job::delete(dev.as_ref(), &req)).map_err(|e| match e {
            E::NoInternalSnapshots { .. } | E::SnapshotNotFound(_) => {
                anyhow::anyhow!("Could not delete snapshot '{key}': snapshot not found")
            }
            E::Format(f) if bad_snapshot_l1(&f).is_some() => {
                anyhow::anyhow!("Could not delete snapshot '{key}': {}", f.message())
            }
            // A failure to drop the snapshot's references, in QEMU's words
            // (without the file's name).
            E::Format(f)
                if f.message()
                    .starts_with("Failed to free the cluster and L1 table") =>
            {
                anyhow::anyhow!("Could not delete snapshot '{key}': {}", f.message())
            }
            e => anyhow::Error::new(e).context(format!("Could not delete snapshot '{key}'")),
        })?;
    } else {
        // Like qemu-img, an image without snapshots lists nothing, not even the
        // header.
        let snaps = job::list(dev.as_ref());
        if !snaps.is_empty() {
            print!("{}", format_info_list(&snaps));
        }
    }
    if writing {
        dev.close()?;
    }
    Ok(0)
}
