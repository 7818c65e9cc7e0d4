//! `strata img rebase`: change an image's backing file. Safe mode copies the
//! differences between the old and new backing content first, so the guest view is
//! unchanged; `-u` only rewrites the pointer; `-b ""` flattens the image.

use super::common::{open_chain, warn_probed_raw, Ctx};
use super::qsteps::{rebase_figures, QemuSteps, Shown};
use anyhow::{bail, Result};
use std::path::PathBuf;
use strata_format::Format;
use strata_jobs::output::{check_output, shared_write_refusal, Inputs};
use strata_jobs::{commit, rebase, Cancel};

#[derive(clap::Args)]
pub struct Args {
    /// `--object` definitions and `--image-opts`.
    #[command(flatten)]
    naming: super::imgname::Naming,
    /// Format of the image (probed when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// The new backing file ("" for none), relative to the image's directory.
    /// With -u and no -b, the backing file is removed.
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Format of the new backing file (required with a non-empty -b).
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Unsafe: only rewrite the backing file name; copy nothing.
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_mode: bool,
    /// Write the copied clusters compressed.
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Cache mode (checked; strata uses the page cache).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Source cache mode (checked; strata uses the page cache).
    #[arg(short = 'T', long = "backing-cache", value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// Share the backing files with other users, as qemu-img's `-U` does for
    /// them (the image itself is still opened for writing, locked): strata opens
    /// backing files read-only, so this is accepted and changes nothing.
    #[arg(short = 'U', long = "force-share")]
    _force_share: bool,
    /// The image to rebase.
    #[arg(value_parser = super::common::any_file_name())]
    filename: PathBuf,
}

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    // `-u` without `-b` drops the backing file, as in qemu-img.
    let backing = match (&args.backing, args.unsafe_mode) {
        (Some(b), _) => b.clone(),
        (None, true) => String::new(),
        (None, false) => bail!(
            "Must specify backing file (-b) or use unsafe mode (-u)\nTry '{} rebase --help' for more info",
            super::invoked_as(ctx.prog)
        ),
    };
    // qemu-img shows its first figure before it opens anything.
    let shown = Shown::new(args.progress && !args.quiet, |on| {
        QemuSteps::milestones(on, 2.0, Vec::new())
    });
    shown.steps.set(0.0);
    super::common::check_cache_mode(args.cache.as_deref(), false)?;
    super::common::check_cache_mode(args.src_cache.as_deref(), true)?;
    let new_name = (!backing.is_empty()).then_some(backing.clone());
    let spec = args
        .naming
        .writable_spec(&args.filename, args.format.as_deref())?;
    // A safe rebase compares with the old backing file the header names.
    if !args.unsafe_mode {
        super::imgname::refuse_backing_nodes(&spec)?;
    }
    warn_probed_raw(&spec);
    // A raw image has no backing file link: refused once open, never written.
    let spec = spec
        .write(true)
        .open_backing(!args.unsafe_mode)
        .writes_no_raw_data(true);
    let chain = open_chain(&spec)?;
    let image = chain.top().clone();
    // With -u no backing file is opened: options for one are refused, as
    // qemu-img refuses options nothing takes.
    if args.unsafe_mode {
        super::imgname::refuse_backing_options(&spec, chain.layers[0].format)?;
    }
    // Only qcow2 writes compressed clusters; qemu-img refuses -c for any other
    // format as soon as the image is open.
    if args.compress && chain.layers[0].format != Format::Qcow2 {
        bail!("Compression not supported for this file format");
    }
    // The new backing format must name one of QEMU's drivers, even with no new
    // backing file. With -u any of them is recorded as given (the backing file
    // is not opened); otherwise strata must open it, so it must be one strata
    // reads.
    if let Some(f) = &args.backing_format {
        if !super::imgname::is_qemu_driver(f) {
            bail!("Invalid format name: '{f}'");
        }
    }
    let new_format_name = args
        .backing_format
        .as_deref()
        .filter(|_| new_name.is_some());
    // In safe mode qemu-img reads a new backing file that is one of the
    // image's backing files through the image's own chain, whatever -F says
    // (the format given is only recorded).
    let in_chain = new_name
        .as_deref()
        .filter(|_| !args.unsafe_mode)
        .and_then(|n| layer_in_chain(&chain, &spec.path, n));
    let new_format: Option<Format> = match new_format_name {
        Some(f) if args.unsafe_mode || in_chain.is_some() => f.parse().ok(),
        // A format QEMU has and strata lacks: qemu-img opens the new backing
        // file with it, and its driver refuses a file not in its format.
        Some(f) => match (f.parse(), &new_name, super::imgname::foreign_format(f)) {
            (Ok(f), _, _) => Some(f),
            (Err(_), Some(n), Some(foreign)) => {
                let path = strata_chain::resolve_backing(&spec.path, n);
                bail!(
                    "Could not open new backing file '{n}': {}",
                    super::imgname::foreign_refusal(foreign, &path)
                )
            }
            (Err(e), _, _) => return Err(e.into()),
        },
        None => None,
    };
    // A raw image on an NBD export: QEMU's nbd driver has no driver
    // information, which rebase asks for before anything else.
    if image.overlay().is_none() && spec.storage.is_some() {
        bail!("could not get block driver info");
    }
    // QEMU's parallels driver has none either.
    if chain.layers[0].format == Format::Parallels {
        drop(chain);
        image.close()?;
        bail!("could not get block driver info");
    }
    // In safe mode qemu-img opens the new backing file before anything else: a
    // missing one is refused first.
    let missing_new_backing = |n: &str| -> Result<()> {
        let path = strata_chain::resolve_backing(&spec.path, n);
        let file = !n.starts_with("json:");
        if let (false, true, Err(e)) = (args.unsafe_mode, file, std::fs::metadata(&path)) {
            bail!(
                "Could not open new backing file '{n}': Could not open '{n}': {}",
                strata_storage::os_message(&e)
            );
        }
        Ok(())
    };
    // Without -F the new backing file is refused once the image (and, in safe
    // mode, the new backing file) opened, as qemu-img gets that far first; a
    // raw image too (the missing format is found before the missing link).
    // In safe mode on an image that can take a backing file, qemu-img probes
    // the new backing file's format, copies the differences (the guest view
    // stays the same) and only then refuses to record a link without a format:
    // the copy is done here too, and refused after it.
    let format_missing = new_name.is_some() && new_format_name.is_none();
    if let (Some(n), true) = (&new_name, format_missing) {
        if args.unsafe_mode || image.overlay().is_none() {
            missing_new_backing(n)?;
            // qemu-img shows its last figure before it reports the change
            // of the link failed.
            shown.steps.set(100.0);
            bail!("Could not change the backing file to '{n}': backing format must be specified");
        }
    }
    // An image without a backing file link (raw) cannot take one: refused as
    // qemu-img refuses the change, before anything is written (its copy of
    // nothing shows its last figure first, -u or not).
    if image.overlay().is_none() {
        if let Some(n) = &new_name {
            missing_new_backing(n)?;
        }
        shown.steps.set(100.0);
        bail!("Could not change the backing file to '{backing}': Operation not supported");
    }
    if let Some(n) = &new_name {
        // The image must not end up below itself (with -u too): qemu-img's locks
        // refuse that in safe mode, worded so.
        let mut below = Inputs::default();
        below.add_backing_chain(&spec.path, n, new_format);
        if let Err(strata_jobs::Error::OutputBelowItself { path, depth }) =
            check_output(&spec.path, &below)
        {
            bail!(
                "Could not open new backing file '{n}': {}",
                shared_write_refusal(&path, depth - 1)
            );
        }
    }
    if !args.unsafe_mode {
        // A relative new backing name resolves against the image's file
        // name; an image QEMU names by a `json:` name (options that change
        // its data, or its backing file's) has none to resolve it against.
        if new_name
            .as_deref()
            .is_some_and(|n| !n.starts_with('/') && !n.starts_with("json:"))
        {
            let backing = chain.layers.get(1).map(|l| (l.path.as_path(), l.format));
            let top = chain.layers[0].format;
            if let Some(j) = super::imgname::json_name_with_backing(&spec, top, backing) {
                bail!(
                    "Could not resolve backing filename: Cannot use relative backing file names for '{j}'"
                );
            }
        }
        let new_chain = match (&new_name, new_format) {
            _ if in_chain.is_some() => None,
            (Some(n), f) if f.is_some() || format_missing => {
                let path = strata_chain::resolve_backing(&spec.path, n);
                // A `json:` name is opened as QEMU opens it (its file names
                // relative to the working directory), and recorded as given.
                let spec = if n.starts_with("json:") {
                    super::imgname::image_spec(std::path::Path::new(n), new_format_name, false)
                        .map_err(|e| {
                            anyhow::anyhow!("Could not open new backing file '{n}': {e}")
                        })?
                } else {
                    strata_chain::OpenSpec::new(&path).format(f)
                };
                Some(strata_chain::open(&spec).map_err(|e| match &e {
                    // The format driver's own refusal (a secret it needs, a
                    // header it rejects): the file is not named again.
                    strata_chain::Error::Format(_) => anyhow::anyhow!(
                        "Could not open new backing file '{n}': {}",
                        e.without_name(&path)
                    ),
                    _ => anyhow::anyhow!(
                        "Could not open new backing file '{n}': Could not open '{n}': {}",
                        short(&e)
                    ),
                })?)
            }
            _ => None,
        };
        let new_backing = in_chain.or_else(|| new_chain.as_ref().map(|c| c.top().clone()));
        let cancel = Cancel::default();
        let plan = rebase::plan(&image, new_backing.as_ref(), &cancel)?;
        if shown.steps.enabled() {
            let new_path = new_name
                .as_ref()
                .map(|n| strata_chain::resolve_backing(&spec.path, n));
            let figures = rebase_figures(image.as_ref(), args.compress, new_path.as_deref())?;
            shown
                .steps
                .set_milestones(figures_at_compared_bytes(figures, &plan));
            // Figures for ranges with nothing to compare before the first are
            // due before any copying (a first read that fails follows them).
            strata_jobs::Progress::advance(&shown.steps, 0);
        }
        rebase::apply(
            &image,
            new_backing.as_ref(),
            &plan,
            args.compress,
            &shown,
            &cancel,
        )
        .map_err(|e| match e {
            // qemu-img names the side whose read failed, not the reason.
            strata_jobs::Error::RebaseRead { from, .. } => {
                anyhow::anyhow!("error while reading from {from}")
            }
            e => e.into(),
        })?;
        shown.steps.complete();
        shown.finish_bar();
        if let (Some(n), true) = (&new_name, format_missing) {
            image.close()?;
            // qemu-img ends its copy at its last figure, then reports the
            // change of the link failed.
            shown.steps.set(100.0);
            bail!("Could not change the backing file to '{n}': backing format must be specified");
        }
    }
    // A format whose link cannot change (vmdk) refuses once the data is
    // copied, as qemu-img's rebase does.
    commit::relink_above(image.as_ref(), new_name.as_deref(), new_format_name).map_err(
        |e| match &e {
            strata_jobs::Error::Format(f) if f.kind() == strata_format::ErrorKind::Unsupported => {
                anyhow::anyhow!(
                    "Could not change the backing file to '{backing}': Operation not supported"
                )
            }
            _ => e.into(),
        },
    )?;
    shown.steps.set(100.0);
    shown.steps.end();
    image.close()?;
    Ok(0)
}

/// qemu-img's figures (each with the offset its range ends at) as milestones
/// of the job carrying out `plan`: a figure is due once the ranges to compare
/// before its offset are done.
fn figures_at_compared_bytes(
    figures: Vec<(u64, f32)>,
    plan: &rebase::RebasePlan,
) -> Vec<(u64, f32)> {
    // Both ascend: one pass over the ranges.
    let mut ranges = plan.ranges.iter().peekable();
    let mut whole = 0u64; // bytes of the ranges that end at or before `end`
    figures
        .into_iter()
        .map(|(end, figure)| {
            while let Some(r) = ranges.next_if(|r| r.offset + r.len <= end) {
                whole += r.len;
            }
            let part = ranges.peek().map_or(0, |r| end.saturating_sub(r.offset));
            (whole + part, figure)
        })
        .collect()
}

/// The device of the layer of `chain` below its top whose file is the new
/// backing file `name` (resolved against the image `path`), if any.
fn layer_in_chain(
    chain: &strata_chain::Chain,
    path: &std::path::Path,
    name: &str,
) -> Option<std::sync::Arc<dyn strata_format::BlockDevice>> {
    let target = std::fs::canonicalize(strata_chain::resolve_backing(path, name)).ok()?;
    chain
        .layers
        .iter()
        .skip(1)
        .find(|l| std::fs::canonicalize(&l.path).is_ok_and(|p| p == target))
        .map(|l| l.device.clone())
}

/// The innermost reason of a chain error, as qemu-img words it.
fn short(e: &strata_chain::Error) -> String {
    match e {
        strata_chain::Error::Storage(strata_storage::Error::Io { source, .. }) => {
            strata_storage::os_message(source)
        }
        other => super::common::engine_text(other),
    }
}
