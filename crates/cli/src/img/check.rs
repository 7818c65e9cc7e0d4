//! `strata img check`: consistency check and repair with qemu-img's report, JSON and
//! exit codes (0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 format
//! without checks).

use super::common::{Ctx, OutputFormat};
use super::qjson;
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::sync::Arc;
use strata_format::qcow2::{CheckReport, Qcow2OpenOptions, Repair};
use strata_format::Format;
use strata_storage::{FileStorage, OpenOptions, Storage};

#[derive(clap::Args)]
pub struct Args {
    /// `--object` definitions and `--image-opts`.
    #[command(flatten)]
    naming: super::imgname::Naming,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Output format.
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human, value_name = "OFMT")]
    output: OutputFormat,
    /// Repair: `leaks` frees leaked clusters only; `all` also fixes refcounts that
    /// are too low and wrong COPIED flags (rebuilding refcount structures if needed).
    #[arg(short = 'r', long = "repair", value_name = "leaks|all")]
    repair: Option<String>,
    /// Cache mode for the image (checked; strata uses the page cache).
    #[arg(short = 'T', long = "cache", value_name = "SRC_CACHE")]
    cache: Option<String>,
    /// Open without locks (read-only checks only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Quiet: print nothing (the exit code still tells the result).
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image.
    #[arg(value_parser = super::common::any_file_name())]
    filename: PathBuf,
}

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    let repair = match args.repair.as_deref() {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(other) => bail!(
            "--repair (-r) expects 'leaks' or 'all' not '{other}'\nTry '{} check --help' for more info",
            super::invoked_as(ctx.prog)
        ),
    };
    args.naming.objects.objects()?;
    super::common::check_cache_mode(args.cache.as_deref(), true)?;
    let spec = args
        .naming
        .spec(&args.filename, args.format.as_deref(), args.force_share)?
        // Only qcow2 is checked: a raw image is refused once open, never written.
        .writes_no_raw_data(true);
    if repair != Repair::None {
        args.naming
            .refuse_read_only_node(&args.filename, args.format.as_deref(), &spec)?;
        if spec.force_share {
            bail!(
                "Could not open '{}': force-share=on can only be used with read-only images",
                spec.shown_name()
            );
        }
    }
    let writing = repair != Repair::None;
    let opened_err = |e| super::common::open_error(&spec.path, &spec.shown_name(), &e);
    // The top's own storage or a blkdebug filter is opened once: the probe
    // goes through it too.
    let filtered = match (&spec.blkdebug, &spec.storage) {
        (None, None) => None,
        _ => Some(strata_chain::top_storage(&spec, writing).map_err(opened_err)?),
    };
    let format = match (spec.format, &filtered) {
        (Some(f), _) => f,
        (None, Some(s)) => strata_chain::probe_storage(&**s).map_err(opened_err)?,
        (None, None) => super::common::probe_format(&spec.path)?,
    };
    if repair != Repair::None {
        super::common::warn_probed_raw(&spec);
    }
    // These drivers check their own tables and repair nothing: vdi's and
    // vmdk's refuse a repair as no check at all, vhdx's checks anyway.
    let own_check = match format {
        Format::Vdi | Format::Vmdk => repair == Repair::None,
        Format::Vhdx | Format::Qed => true,
        _ => false,
    };
    if format == Format::Parallels {
        return check_parallels(&spec, filtered, repair, &args, ctx);
    }
    if own_check {
        let dev = if format == Format::Qed {
            // Opened as QEMU opens an image to check it: a flagged image is
            // not checked and repaired by the open, but by the check.
            let storage = match &filtered {
                Some(s) => s.clone(),
                None => strata_chain::top_storage_as(&spec, writing, Some(format))
                    .map_err(opened_err)?,
            };
            let path = storage.path().map(std::path::Path::to_path_buf);
            strata_format::qed::open_for_check(storage, path.as_deref(), writing)
                .map_err(|e| opened_err(e.into()))?
        } else if format == Format::Vhdx {
            // Opened as QEMU opens an image to check it: BAT entries past the
            // file's end are the check's to report, not the open's to refuse.
            let storage = match &filtered {
                Some(s) => s.clone(),
                None => strata_chain::top_storage_as(&spec, writing, Some(format))
                    .map_err(opened_err)?,
            };
            let path = storage.path().map(std::path::Path::to_path_buf);
            strata_format::vhdx::open_for_check(storage, path.as_deref(), writing)
                .map_err(|e| opened_err(e.into()))?
        } else {
            strata_chain::open_top(&spec, format, writing).map_err(opened_err)?
        };
        let checked = match strata_format::qed::check_report(dev.as_ref(), writing) {
            Some(r) => r,
            None => strata_format::foreign_check::check(dev.as_ref()),
        };
        let report = match checked {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{}: Check failed: {e}", ctx.prog);
                return Ok(1);
            }
        };
        return finish(&report, &args, &spec.shown_name(), format, ctx, || Ok(()));
    }
    if format != Format::Qcow2 {
        // qemu-img opens the image (a luks one with its secret) before it
        // finds no checks: a missing or unreadable file is reported as such.
        // The probe's hold on a filtered file is let go first (it would meet
        // its own lock).
        drop(filtered);
        strata_chain::open_top(&spec, format, writing).map_err(opened_err)?;
        eprintln!("{}: This image format does not support checks", ctx.prog);
        return Ok(63);
    }
    let opts = if writing {
        OpenOptions::write()
    } else {
        OpenOptions::read().force_share(spec.force_share)
    };
    let storage: Arc<dyn Storage> = match filtered {
        Some(s) => s,
        None => Arc::new(
            FileStorage::open(&spec.path, opts)
                .with_context(|| format!("Could not open '{}'", spec.shown_name()))?,
        ),
    };
    let img = strata_chain::open_qcow2_on(
        &spec,
        storage,
        Qcow2OpenOptions {
            read_only: !writing,
            for_repair: writing,
            no_auto_repair: true,
            for_check: true,
            unlock: spec
                .unlock()
                .map_err(|e| super::common::open_error(&spec.path, &spec.shown_name(), &e))?,
            ..Default::default()
        },
    )
    .map_err(|e| super::common::open_error(&spec.path, &spec.shown_name(), &e))?;
    // qemu-img opens the backing chain too (each file with the secret its
    // options give), and fails when a file is gone or cannot be opened: a check
    // that passes says the image can be used.
    // A repair holds the image for writing before its chain opens, so a chain
    // that loops back to it meets the image's own lock, in QEMU's words; the
    // refusal comes before anything is written.
    if img.header().backing_file.is_some() || spec.has_layer_options(1) {
        let opened = if writing {
            strata_chain::verify_backing(&spec, &img, true)
        } else {
            let below = spec.clone().write(false);
            strata_chain::open(&below).map(drop)
        };
        if let Err(e @ strata_chain::Error::Backing { .. }) = opened {
            return Err(super::common::open_error(
                &spec.path,
                &spec.shown_name(),
                &e,
            ));
        }
    }
    let first = img.check(repair);
    let report = match first {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: Check failed: {e}", ctx.prog);
            return Ok(1);
        }
    };
    let close = || -> Result<()> {
        if writing {
            img.close()?;
        }
        Ok(())
    };
    finish(
        &report,
        &args,
        &spec.shown_name(),
        Format::Qcow2,
        ctx,
        close,
    )
}

/// `check` of a parallels image: opened as QEMU's check opens it (not
/// repaired at open; for writing when repairing), checked and repaired by
/// its driver, then closed (which clears the in-use mark and cuts the file
/// to its last cluster, as QEMU's close does).
fn check_parallels(
    spec: &strata_chain::OpenSpec,
    filtered: Option<Arc<dyn Storage>>,
    repair: Repair,
    args: &Args,
    ctx: &Ctx,
) -> Result<i32> {
    let writing = repair != Repair::None;
    let opened_err = |e| super::common::open_error(&spec.path, &spec.shown_name(), &e);
    let storage = match filtered {
        Some(s) => s,
        None => strata_chain::top_storage_as(spec, writing, Some(Format::Parallels))
            .map_err(opened_err)?,
    };
    let path = storage.path().map(std::path::Path::to_path_buf);
    let dev = strata_format::parallels::open_for_check(storage, path.as_deref(), writing)
        .map_err(|e| opened_err(e.into()))?;
    let fix = strata_format::parallels::Fix {
        errors: repair == Repair::All,
        leaks: repair != Repair::None,
    };
    let report = match strata_format::parallels::check_report(dev.as_ref(), fix) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: Check failed: {e}", ctx.prog);
            return Ok(1);
        }
    };
    finish(
        &report,
        args,
        &spec.shown_name(),
        Format::Parallels,
        ctx,
        || Ok(dev.close()?),
    )
}

/// Print a check's `report` of the image (`name` as the user named it, of
/// `format`) as qemu-img prints it, once `close` has written out what a
/// repair changed, and give qemu-img's exit code.
fn finish(
    report: &CheckReport,
    args: &Args,
    name: &str,
    format: Format,
    ctx: &Ctx,
    close: impl FnOnce() -> Result<()>,
) -> Result<i32> {
    for (i, m) in report.messages.iter().enumerate() {
        if report.own_errors.contains(&i) {
            eprintln!("{}: {m}", ctx.prog);
        } else {
            eprintln!("{m}");
        }
    }
    if let Some(e) = report.failure {
        eprintln!("{}: Check failed: {e}", ctx.prog);
        return Ok(1);
    }
    close()?;
    let repaired = report.corruptions_fixed > 0 || report.leaks_fixed > 0;
    let human = args.output == OutputFormat::Human && !args.quiet;
    if repaired && human {
        print!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            report.leaks_fixed, report.corruptions_fixed
        );
    }
    // -q silences the report in either format (qemu-img prints its JSON
    // through the same quiet-aware printer as the text).
    match args.output {
        _ if args.quiet => {}
        OutputFormat::Human => print!("{}", human_report(report)),
        OutputFormat::Json => println!(
            "{}",
            qjson::to_string(&json_report(report, name, format.name()))
        ),
    }
    if report.check_errors > 0 {
        eprintln!("{}: Check failed", ctx.prog);
        return Ok(1);
    }
    Ok(if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}

/// qemu-img's text report.
pub fn human_report(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// qemu-img's JSON report: optional counters appear only when non-zero.
pub fn json_report(r: &CheckReport, filename: &str, format: &str) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!(format));
    m.insert("check-errors".into(), json!(r.check_errors));
    let mut opt = |k: &str, v: u64| {
        if v != 0 {
            m.insert(k.into(), json!(v));
        }
    };
    opt("image-end-offset", r.image_end_offset);
    opt("corruptions", r.corruptions);
    opt("leaks", r.leaks);
    opt("corruptions-fixed", r.corruptions_fixed);
    opt("leaks-fixed", r.leaks_fixed);
    opt("total-clusters", r.total_clusters);
    opt("allocated-clusters", r.allocated_clusters);
    opt("fragmented-clusters", r.fragmented_clusters);
    opt("compressed-clusters", r.compressed_clusters);
    Value::Object(m)
}
