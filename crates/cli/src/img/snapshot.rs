//! `strata img snapshot`: internal snapshots with qemu-img's interface
//! (`-l` list, `-c` create, `-a` apply by ID or name, `-d` delete by name).

use super::common::{human_size, Ctx};
use anyhow::{bail, Result};
use std::path::PathBuf;
use strata_jobs::info::SnapshotInfo;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("action").args(["list", "create", "apply", "delete"])))]
pub struct Args {
    /// `--object` definitions and `--image-opts`.
    #[command(flatten)]
    naming: super::imgname::Naming,
    /// List the snapshots (the default when no action is given).
    #[arg(short = 'l', long = "list")]
    list: bool,
    /// Create a snapshot named NAME of the current disk.
    #[arg(short = 'c', long = "create", value_name = "NAME")]
    create: Option<String>,
    /// Apply (revert to) the snapshot with this ID or name; the current state is lost.
    #[arg(short = 'a', long = "apply", value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Delete the snapshot with this name, freeing what only it used.
    #[arg(short = 'd', long = "delete", value_name = "SNAPSHOT")]
    delete: Option<String>,
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

pub fn run(args: Args, _ctx: &Ctx) -> Result<i32> {
    let spec = args
        .naming
        .spec(&args.filename, args.format.as_deref(), args.force_share)?
        // A raw image has no snapshots: refused once open, never written.
        .writes_no_raw_data(true);
    let format = super::common::spec_format(&spec)?;
    let writing = args.create.is_some() || args.apply.is_some() || args.delete.is_some();
    if writing && spec.force_share {
        bail!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            spec.shown_name()
        );
    }
    if writing {
        // qemu-img warns of a probed raw image as it opens it for writing (twice
        // to apply a snapshot: it opens the image again).
        let times = if args.apply.is_some() { 2 } else { 1 };
        for _ in 0..times {
            super::common::warn_probed_raw(&spec);
        }
    }
    let dev = super::common::open_top(&spec, format, writing)?;
    use strata_jobs::snapshot::{self as job, NameRule};
    use strata_jobs::Error as E;
    // qemu-img's wording for each refusal (a format without internal snapshots is
    // worded as its block layer words it).
    if let Some(name) = &args.create {
        let req = job::CreateRequest {
            name: name.clone(),
            names: NameRule::Any,
        };
        job::create(dev.as_ref(), &req).map_err(|e| match e {
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
    } else if let Some(key) = &args.apply {
        let req = job::ApplyRequest {
            snapshot: key.clone(),
        };
        let data_file = dev
            .as_any()
            .downcast_ref::<strata_format::qcow2::Qcow2Image>()
            .is_some_and(strata_format::qcow2::Qcow2Image::has_data_file);
        job::apply(dev.as_ref(), &req).map_err(|e| match e {
            E::NoInternalSnapshots { .. } if data_file => anyhow::anyhow!(
                "Could not apply snapshot '{key}': Failed to load snapshot: Operation not supported"
            ),
            E::NoInternalSnapshots { .. } => anyhow::anyhow!(
                "Could not apply snapshot '{key}': Block driver does not support snapshots"
            ),
            E::SnapshotNotFound(_) => anyhow::anyhow!(
                "Could not apply snapshot '{key}': Failed to load snapshot: No such file or directory"
            ),
            // A refcount the width cannot hold (a cluster shared too often).
            E::Format(f) if f.kind() == strata_format::ErrorKind::InvalidArgument => anyhow::anyhow!(
                "Could not apply snapshot '{key}': Failed to load snapshot: Invalid argument"
            ),
            e => anyhow::Error::new(e).context(format!("Could not apply snapshot '{key}'")),
        })?;
    } else if let Some(key) = &args.delete {
        // qemu-img deletes by name only (an ID is not looked up).
        let Some(target) = job::list(dev.as_ref()).into_iter().find(|s| s.name == *key) else {
            bail!("Could not delete snapshot '{key}': snapshot not found");
        };
        let req = job::DeleteRequest {
            snapshot: target.id,
        };
        job::delete(dev.as_ref(), &req).map_err(|e| match e {
            E::NoInternalSnapshots { .. } | E::SnapshotNotFound(_) => {
                anyhow::anyhow!("Could not delete snapshot '{key}': snapshot not found")
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
