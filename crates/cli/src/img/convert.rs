//! `strata img convert`: copy images between formats, flatten backing chains,
//! export internal snapshots, compress (zlib or zstd on every core), with
//! qemu-img's flags and messages.

use super::common::{open_chain, open_spec, parse_options, Ctx};
use super::convert_steps::{convert_figures, ConvertShape};
use super::measure::snapshot_key;
use super::qsteps::{QemuSteps, Shown};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::sync::Arc;
use strata_format::qcow2::Qcow2Image;
use strata_format::{BlockDevice, Format};
use strata_jobs::convert::{convert, default_workers, ConvertOptions, Plan, MAX_SPARSE};
use strata_jobs::create::{prepare, CreateRequest};
use strata_jobs::output::{check_output, Inputs};
use strata_jobs::snapshot::SnapshotKey;
use strata_jobs::status::ChainStatus;
use strata_jobs::Cancel;

#[derive(clap::Args)]
pub struct Args {
    /// Source format (probed from each source when omitted; backing files never are).
    #[arg(short = 'f', long = "source-format", value_name = "FMT")]
    format: Option<String>,
    /// Output format: qcow2 or raw (default raw).
    #[arg(short = 'O', long = "output-format", value_name = "OUTPUT_FMT")]
    out_format: Option<String>,
    /// `--object` definitions and `--image-opts` (`--source-image-opts`) for the sources.
    #[command(flatten)]
    naming: super::imgname::Naming,
    /// The source images are option lists (as --image-opts).
    #[arg(long = "source-image-opts")]
    source_image_opts: bool,
    /// The output is an option list naming an existing image (with -n).
    #[arg(long = "target-image-opts")]
    target_image_opts: bool,
    /// Creation options of the output (`-o help` with `create` lists them).
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    options: Vec<String>,
    /// Compress the output's clusters (qcow2; zlib or zstd by -o compression_type).
    #[arg(short = 'c')]
    compress: bool,
    /// Leave out aligned all-zero blocks of this size (default 4k; 0 writes everything).
    #[arg(
        short = 'S',
        long = "sparse-size",
        value_name = "SPARSE_SIZE",
        allow_hyphen_values = true
    )]
    sparse_size: Option<String>,
    /// Do not create the target: write into an existing image.
    #[arg(short = 'n')]
    no_create: bool,
    /// The output gets this backing file; only what the source's top layer stores is copied.
    #[arg(short = 'B', long = "backing", value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Format of the -B backing file (required with -B).
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Threads reading, scanning and compressing, 1 to 16 (default: one per CPU, at least 2).
    #[arg(
        short = 'm',
        long = "parallel",
        value_name = "NUM",
        allow_hyphen_values = true
    )]
    workers: Option<String>,
    /// Write output as it is ready instead of in guest order.
    #[arg(short = 'W', long = "oob-writes")]
    out_of_order: bool,
    /// With -n: the target already reads as zeroes, so zero ranges are not written.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Convert an internal snapshot: snapshot.name=NAME, snapshot.id=ID or NAME.
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT_PARAM")]
    snapshot_param: Option<String>,
    /// Offload the copy to the storage (copy_file_range): accepted as qemu-img
    /// takes it; strata copies through its own reads and writes, which leave the
    /// same target.
    #[arg(short = 'C', long = "copy-range-offloading")]
    copy_range: bool,
    /// Open the sources without locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Target cache mode: none, writeback, writethrough, directsync or unsafe (the
    /// default, as in qemu-img convert: the target is not flushed at the end).
    #[arg(short = 't', long = "output-cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Source cache mode (validated; strata reads through the page cache).
    #[arg(short = 'T', long = "source-cache", value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// Bandwidth limit in bytes per second for the output (size suffixes allowed;
    /// 0: none).
    #[arg(
        short = 'r',
        long = "rate",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    rate: Option<String>,
    /// Copy the persistent bitmaps of the source's own layer into the target.
    #[arg(long = "bitmaps")]
    bitmaps: bool,
    /// With --bitmaps: leave out inconsistent bitmaps (with a warning) instead of
    /// failing.
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,
    /// Go on past sectors of the sources that cannot be read: they are copied as
    /// zeroes, each with a warning.
    #[arg(long = "salvage")]
    salvage: bool,
    /// Source images (concatenated) followed by the output image.
    #[arg(value_name = "FILENAME")]
    #[arg(value_parser = super::common::any_file_name())]
    files: Vec<PathBuf>,
}

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    use strata_format::Operation;
    convert_images(args, ctx).map_err(|e| match super::ioerr::io_failure(&e) {
        Some(f) if f.op == Operation::Read => {
            anyhow::anyhow!("error while reading at byte {}: {}", f.offset, f.os)
        }
        Some(f) if matches!(f.op, Operation::Write | Operation::WriteZeroes) => {
            anyhow::anyhow!("error while writing at byte {}: {}", f.offset, f.os)
        }
        Some(f) if f.op == Operation::BlockStatus => anyhow::anyhow!(
            "error while reading block status at offset {}: {}",
            f.offset,
            f.os
        ),
        _ => e,
    })
}

fn convert_images(args: Args, ctx: &Ctx) -> Result<i32> {
    let early = early_values(&args, ctx)?;
    let (sparse_size, workers, rate, snapshot) = early;
    // The combinations qemu-img refuses once the options are read, in its order.
    if args.skip_broken_bitmaps && !args.bitmaps {
        bail!("Use of --skip-broken-bitmaps requires --bitmaps");
    }
    if args.copy_range && args.compress {
        bail!("Cannot enable copy offloading when -c is used");
    }
    if args.copy_range && args.sparse_size.is_some() {
        bail!("Cannot enable copy offloading when -S is used");
    }
    if args.copy_range && args.salvage {
        bail!("Cannot use copy offloading in salvaging mode");
    }
    if args.target_image_opts && !args.no_create {
        bail!("--target-image-opts requires use of -n flag");
    }
    let mut naming = args.naming.clone();
    naming.image_opts |= args.source_image_opts;
    // An unknown output format is reported once the sources are open (for a
    // new target) or where the existing target is opened (-n).
    let out_fmt_name = args.out_format.as_deref().unwrap_or("raw");
    let out_format_known = super::imgname::output_format(out_fmt_name);
    let out_format = *out_format_known.as_ref().unwrap_or(&Format::Raw);
    if args.no_create && !args.options.is_empty() {
        bail!("-o has no effect when skipping image creation");
    }
    if args.target_is_zero && !args.no_create {
        bail!("--target-is-zero requires use of -n flag");
    }
    if super::opthelp::has_help_option(&args.options) {
        // The target is the last file name, when there are two or more.
        let target = match args.files.as_slice() {
            [_, .., out] => Some(out.to_string_lossy()),
            _ => None,
        };
        let fmt = args.out_format.as_deref().unwrap_or("raw");
        print!("{}", super::opthelp::create_help(fmt, target.as_deref())?);
        return Ok(0);
    }
    let mut options = parse_options(&args.options)?;
    let (out_path, src_paths) = match args.files.split_last() {
        Some((out, srcs)) if !srcs.is_empty() => (out, srcs),
        _ => bail!("Must specify image file name"),
    };
    super::common::check_cache_mode(args.src_cache.as_deref(), true)?;
    // An output named by options is an existing image: its format is the one
    // the options give, or probed.
    let secrets = naming.objects.secrets()?;
    // The target's driver options (an encrypted target's key-secret), from an
    // option list or from the -o that creates it.
    let mut target_spec = None;
    let mut target_shown: Option<String> = None;
    let plain_out;
    // A target protocol strata cannot write is refused where qemu-img looks it
    // up: once the sources are open (to create the target), or where it opens
    // the existing target (-n).
    let mut out_refused = None;
    // A target named by options (or `json:`) that cannot be opened: refused
    // where qemu-img opens the existing target.
    let mut target_refused: Option<anyhow::Error> = None;
    // An NBD export as the target is connected to where the target is opened.
    let target_naming = super::imgname::Naming {
        objects: naming.objects.clone(),
        image_opts: args.target_image_opts,
    };
    let nbd_out = target_naming.names_nbd(out_path);
    let (out_path, out_format) = if nbd_out {
        plain_out = out_path.clone();
        (&plain_out, out_format)
    } else if args.target_image_opts
        || (args.no_create
            && [&b"json:"[..], b"blkdebug:"].iter().any(|p| {
                std::os::unix::ffi::OsStrExt::as_bytes(out_path.as_os_str()).starts_with(p)
            }))
    {
        // Opened for writing: `force-share` is refused first. qemu-img reads
        // the target's name where it opens the target, after the sources and
        // the other options: a mistake in it waits until then.
        let named = target_naming.writable_spec(out_path, None).and_then(|t| {
            super::imgname::refuse_reopened_options(&t)?;
            let format = match t.format {
                Some(f) => f,
                None => super::common::probe_format(&t.path)?,
            };
            Ok((t, format))
        });
        match named {
            Ok((t, format)) => {
                target_shown = Some(t.shown_name());
                (&target_spec.insert(t).path, format)
            }
            Err(e) => {
                target_refused = Some(e);
                (out_path, out_format)
            }
        }
    } else {
        plain_out = super::imgname::output_path(out_path).unwrap_or_else(|e| {
            out_refused = Some(e);
            out_path.clone()
        });
        (&plain_out, out_format)
    };
    let flush = !matches!(args.cache.as_deref(), None | Some("unsafe"));
    // qemu-img shows its first figure once the options are read, before it opens
    // anything, and ends the line on failure too.
    let shown = Shown::new(args.progress && !args.quiet, |on| {
        QemuSteps::milestones(on, 1.0, Vec::new())
    });
    shown.steps.set(0.0);
    // `-l NAME` reads one image; `-l snapshot.id=...` loads the snapshot of
    // the first source and reads the others as they are, as qemu-img does.
    if matches!(snapshot, Some(SnapshotKey::IdOrName(_))) && src_paths.len() > 1 {
        // qemu-img opens every source before it refuses the combination: a
        // source it cannot open is reported first.
        for p in src_paths {
            open_chain(&naming.spec(p, args.format.as_deref(), args.force_share)?)?;
        }
        bail!("No support for concatenating multiple snapshot");
    }

    // Sources, each with its chain (or the snapshot view over the chain below).
    // Every file of their chains, and of the -B chain, is one the output must not be.
    let mut inputs = Inputs::default();
    let mut chains = Vec::with_capacity(src_paths.len());
    let mut sources = Vec::with_capacity(src_paths.len());
    let mut bitmaps_of = None;
    // The target's backing file: -B, or the backing_file the creation options give
    // (-B wins). Either way only what each source's top layer stores is copied.
    let out_backing = match (&args.backing, options.get("backing_file")) {
        (Some(b), _) => Some(b.clone()),
        (None, Some(b)) if !args.no_create && out_format != Format::Raw => Some(b.clone()),
        _ => None,
    };
    for p in src_paths {
        // With -B only the top layer is copied, but the whole chain is opened (as
        // qemu-img opens it): whether the top has a backing file decides whether
        // what it does not store is left to the target's backing file or zeroed.
        // qemu-img locks its sources against writers and resizers, raw ones
        // too (a raw image another process writes is not copied).
        let spec = naming
            .spec(p, args.format.as_deref(), args.force_share)?
            .no_share(true);
        inputs.add_read_chain(&spec.path, spec.format);
        let chain = open_chain(&spec)?;
        if args.bitmaps {
            bitmaps_of = Some(chain.top().clone());
        }
        chains.push(chain);
    }
    // The snapshot is loaded once every source is open.
    for (i, chain) in chains.iter().enumerate() {
        let status = match &snapshot {
            Some(key) if i == 0 => {
                let devices = strata_jobs::snapshot::view_chain_at(&chain.devices(), key).map_err(
                    |e| match e {
                        strata_jobs::Error::NoInternalSnapshots { .. } => {
                            anyhow::anyhow!(no_snapshot_load(&chain.layers[0].format))
                        }
                        strata_jobs::Error::Format(f)
                            if super::snapshot::bad_snapshot_l1(&f).is_some() =>
                        {
                            anyhow::anyhow!("Failed to load snapshot: {}", f.message())
                        }
                        _ => anyhow::anyhow!("Failed to load snapshot: Can't find snapshot"),
                    },
                )?;
                ChainStatus::from_devices(devices)?
            }
            _ => ChainStatus::new(chain)?,
        };
        sources.push(status);
    }
    let total: u64 = sources.iter().map(|s| s.virtual_size()).sum();
    // -O with --target-image-opts (which implies -n) is refused as the target
    // is opened, whatever format it names: after the checks of the sources
    // and their bitmaps, before any judgement of the format.
    let target_opts_conflict = args.target_image_opts && args.out_format.is_some();
    if let (Err(e), false) = (&out_format_known, target_opts_conflict) {
        if args.no_create {
            // The existing target's driver is looked up where it is opened,
            // after its cache mode is read.
            super::common::check_cache_mode(args.cache.as_deref(), false)?;
            bail!(
                "Could not open '{}': Unknown driver '{out_fmt_name}'",
                out_path.display()
            );
        }
        bail!("{e}");
    }
    if let Some(e) = out_refused.take_if(|_| !args.no_create) {
        return Err(e);
    }
    if !args.no_create {
        // qemu-img reads the -o list against the format's creation options
        // (every key known, every typed value well formed) before it judges
        // -B, -F, -c or --bitmaps, in the order typed. The backing file
        // itself is looked at only when the image is created.
        super::create::first_bad_item(out_format, out_path, &args.options).map_err(|e| {
            let m = e.to_string();
            let prefix = format!("{}: ", out_path.display());
            anyhow::anyhow!("{}", m.strip_prefix(&prefix).unwrap_or(&m))
        })?;
    }

    // The target: created (with -o, -B and -F) unless -n. qemu-img sets -B and -F
    // as creation options over -o's, then checks them in this order.
    if !args.no_create
        && matches!(
            out_format,
            Format::Raw | Format::Vpc | Format::Vdi | Format::Vhdx | Format::Parallels
        )
    {
        let name = out_format.name();
        if args.backing.is_some() {
            bail!("Backing file not supported for file format '{name}'");
        }
        if args.backing_format.is_some() {
            bail!("Backing file format not supported for file format '{name}'");
        }
    }
    if src_paths.len() > 1 && out_backing.is_some() {
        bail!("Having a backing file for the target makes no sense when concatenating multiple input images");
    }
    if !args.no_create {
        if let Some(f) = &args.backing_format {
            options.insert("backing_fmt".into(), f.clone());
        }
        if let Some(b) = &out_backing {
            let Some(f) = options.get("backing_fmt").cloned() else {
                bail!("Use of backing file requires explicit backing format");
            };
            inputs.add_backing_chain(out_path, b, f.parse().ok());
            options.insert("backing_file".into(), b.clone());
        }
    } else if let Some(b) = &out_backing {
        // The existing target is opened over -B's chain as qemu-img opens it, so
        // a target inside that chain is refused (qemu-img fails on its lock).
        let f = args.backing_format.as_deref().and_then(|f| f.parse().ok());
        inputs.add_backing_chain(out_path, b, f);
    }
    // vmdk takes compressed writes too (stored compressed in a
    // stream-optimized extent, as ordinary grains elsewhere).
    if args.compress && !target_opts_conflict && !matches!(out_format, Format::Qcow2 | Format::Vmdk)
    {
        bail!("Compression not supported for this file format");
    }
    if args.compress
        && options
            .get("preallocation")
            .is_some_and(|p| p.as_str() != "off")
    {
        bail!("Compression and preallocation not supported at the same time");
    }
    // Bitmaps are judged after the target's options and -c.
    if args.bitmaps && src_paths.len() > 1 {
        bail!("Copying bitmaps only possible with single source");
    }
    let bitmaps = match &bitmaps_of {
        Some(top) => Some(super::convert_bitmaps::read(top, args.skip_broken_bitmaps)?),
        None => None,
    };
    if target_opts_conflict {
        bail!("--image-opts and --format are mutually exclusive");
    }
    // qemu-img reads the target's cache mode only once it has created the
    // target (a bad mode leaves the new, empty target behind).
    let target_cache = || super::common::check_cache_mode(args.cache.as_deref(), false);
    let target_is_zero;
    let mut target_backing_size = None;
    let target: Arc<dyn BlockDevice> = if nbd_out {
        let fmt = (!args.target_image_opts).then(|| out_format.name());
        let nbd = super::nbdname::convert_target(
            &target_naming,
            out_path,
            fmt,
            total,
            (!args.no_create).then_some(&options),
        )?;
        // A qcow2 image just formatted onto the export reads as zeroes; the
        // export itself (raw) holds whatever it held.
        target_is_zero = if args.no_create {
            args.target_is_zero
        } else {
            out_format == Format::Qcow2
        };
        let t = open_chain(&nbd.write(true).open_backing(false))?
            .top()
            .clone();
        if t.virtual_size() < total {
            bail!("output file is smaller than input file");
        }
        t
    } else if args.no_create {
        target_cache()?;
        if let Some(e) = target_refused {
            return Err(e);
        }
        if let Some(e) = out_refused {
            bail!("Could not open '{}': {e}", out_path.display());
        }
        // Named as the user named it (a `blkdebug:` name is its file's path).
        let target_name = target_shown
            .take()
            .unwrap_or_else(|| out_path.display().to_string());
        check_output(out_path, &inputs).map_err(|e| match e {
            strata_jobs::Error::Storage(e) => {
                anyhow::anyhow!("Could not open '{target_name}': {e}")
            }
            e => e.into(),
        })?;
        // The target's backing chain is opened (read-only) as qemu-img opens
        // it: a missing backing file, or one a writer holds, refuses the
        // convert before anything is written. Only the top is written.
        let mut spec = open_spec(out_path, Some(out_format.name()), false)?.write(true);
        if let Some(t) = &target_spec {
            spec.driver_options = t.driver_options.clone();
            spec.display_name = t.display_name.clone();
            // Written through its blkdebug filter, whose rules fail the
            // requests they name.
            spec.blkdebug = t.blkdebug.clone();
        }
        spec.secrets = secrets.clone();
        let chain = open_chain(&spec)?;
        let t = chain.top().clone();
        if args.target_is_zero && out_backing.is_some() {
            // qemu-img refuses the copy here but exits with success (its
            // status is still the one of the open that succeeded), its
            // progress shown complete.
            eprintln!(
                "{}: Cannot use --target-is-zero when the destination image has a backing file",
                ctx.prog
            );
            shown.steps.set(100.0);
            shown.steps.end();
            return Ok(0);
        }
        if t.virtual_size() < total {
            bail!("output file is smaller than input file");
        }
        target_is_zero = args.target_is_zero;
        t
    } else {
        // qemu-img convert reports option errors without the file name, and the
        // format's own refusals as "FILE: error while converting FMT: ...".
        let prefix = format!("{}: ", out_path.display());
        // Refusals of the format, or of an output that is an input.
        let create_failed = |e: strata_jobs::Error| {
            let m = e.to_string();
            if matches!(e, strata_jobs::Error::OutputBelowItself { .. }) {
                // qemu-img gets this far only when it opens the new image.
                return anyhow::anyhow!("{m}");
            }
            anyhow::anyhow!(
                "{prefix}error while converting {}: {}",
                out_format.name(),
                m.strip_prefix(&prefix).unwrap_or(&m)
            )
        };
        let prepared = prepare(&CreateRequest {
            path: out_path.clone(),
            format: out_format,
            size: Some(total),
            options: options.clone(),
            unsafe_backing: true,
        })
        .map_err(|e| match e {
            // The file -B names: refused as the output's own backing file, or as a
            // source if it is one too (qemu-img's locks catch that first).
            strata_jobs::Error::BackingIsItself(path) => create_failed(
                check_output(out_path, &inputs)
                    .err()
                    .unwrap_or(strata_jobs::Error::OutputBelowItself { path, depth: 1 }),
            ),
            e => {
                let m = e.to_string();
                anyhow::anyhow!("{}", m.strip_prefix(&prefix).unwrap_or(&m))
            }
        })?;
        prepared
            .refusing(&inputs)
            .with_secrets(secrets.clone())
            .create()
            .map_err(create_failed)?;
        target_cache()?;
        target_is_zero = strata_jobs::create::created_reads_zero(out_format, &options);
        let mut spec = open_spec(out_path, Some(out_format.name()), false)?.write(true);
        for key in ["encrypt.key-secret", "key-secret"] {
            if let Some(id) = options.get(key) {
                spec.driver_options.insert(key.into(), id.clone());
            }
        }
        spec.secrets = secrets;
        let t = if out_backing.is_some() {
            // Opened with its backing file, as qemu-img does: a cluster the source
            // fills only in part takes the rest from there.
            let chain = open_chain(&spec)?;
            target_backing_size = chain.layers.get(1).map(|l| l.device.virtual_size());
            chain.top().clone()
        } else {
            open_chain(&spec.open_backing(false))?.top().clone()
        };
        // A new target is unusable until the copy completes: its metadata
        // writes are ordered but flushed only at the end (qemu-img's target
        // cache mode makes its flushes no-ops too). A qcow2 target's data
        // clusters are allocated in bulk, a tuning knob of that format alone.
        t.set_write_barriers(false)?;
        if let Some(q) = t.as_any().downcast_ref::<Qcow2Image>() {
            q.set_falloc_new_clusters(true);
        }
        t
    };

    if bitmaps.is_some() {
        super::convert_bitmaps::check_target(&target)?;
    }
    let cluster = target.cluster_size().unwrap_or(512);
    // A stream-optimized vmdk compresses each grain it is given: it takes
    // whole grains only, as qemu-img's convert gives them.
    // `-c` gives a vmdk whole grains the same way.
    let vmdk = target
        .as_any()
        .downcast_ref::<strata_format::vmdk::VmdkImage>();
    let whole_clusters = vmdk
        .filter(|v| args.compress || v.needs_whole_grains())
        .map(|_| cluster);
    let opts = ConvertOptions {
        whole_clusters,
        compress: args.compress && vmdk.is_none(),
        sparse_size,
        target_is_zero,
        target_has_backing: out_backing.is_some(),
        workers,
        flush,
        out_of_order: args.out_of_order,
        // -C copies what the sources store as data with no look for zeroes in
        // it, as qemu-img's offloaded copy does.
        whole_data: args.copy_range,
        // A source others may write (-U) could shrink under a map. Salvage
        // reads every byte through the source's device, one window at a time,
        // so its warnings come in the order of the offsets.
        map_sources: !args.force_share && !args.salvage,
    };
    let opts = if args.salvage {
        ConvertOptions { workers: 1, ..opts }
    } else {
        opts
    };
    // Wrapped before the plan walks the allocation: a failed query there is
    // salvaged (and warned of) as qemu-img's counting pass does.
    let sources = if args.salvage {
        salvaging(&sources, (!args.quiet).then_some(ctx.prog))?
    } else {
        sources
    };
    let cancel = Cancel::default();
    let plan = Plan::new(&sources, &opts, cluster, &cancel)?;
    if shown.steps.enabled() {
        let shape = ConvertShape {
            target_has_backing: out_backing.is_some(),
            target_backing_size,
            write_zeroes: sparse_size == 0,
            // A target taking whole grains counts as qemu-img's compressed
            // copy does.
            compress_cluster: (args.compress || opts.whole_clusters.is_some()).then_some(cluster),
        };
        shown
            .steps
            .set_milestones(convert_figures(&sources, &shape)?);
    }
    // -r: the writer is held back to RATE bytes per second (producers wait on it).
    let limited = strata_jobs::layers::RateLimit::new(&shown, rate);
    convert(&sources, &plan, &target, &opts, &limited, &cancel)?;
    shown.steps.complete();
    if let Some(b) = &bitmaps {
        super::convert_bitmaps::store(&target, b, ctx.prog)?;
    }
    shown.finish_bar();
    // A raw target has nothing to finalize. Its data reaches the disk as the cache
    // mode says: `convert` flushes it unless `-t unsafe`, qemu-img's default for
    // convert, asked for no flush; closing it here would sync it anyway (3x slower).
    if target.format_name() != "raw" {
        target.close()?;
    }
    shown.steps.set(100.0);
    shown.steps.end();
    Ok(0)
}

/// `sources` with their top layers read with salvage (see `convert_salvage`);
/// `warn` is the program's name, `None` when quiet.
fn salvaging(sources: &[ChainStatus], warn: Option<&str>) -> Result<Vec<ChainStatus>> {
    sources
        .iter()
        .map(|s| {
            let mut devices: Vec<_> = (0..s.depth()).map(|d| s.layer(d).clone()).collect();
            devices[0] = super::convert_salvage::Salvaging::wrap(devices[0].clone(), warn);
            Ok(ChainStatus::from_devices(devices)?)
        })
        .collect()
}

/// A whole decimal number as C's integer parsing takes it (leading blanks and a
/// sign allowed, nothing after the digits), or `None`; a value beyond 64 bits
/// saturates, so it is refused as out of range, not as malformed.
/// The values qemu-img checks while it reads the options (-S, -m, -r, -l and
/// the -o lists), checked in the order they were typed: the sparse size, the
/// worker count, the rate limit and the snapshot key.
type Early = (u64, usize, u64, Option<SnapshotKey>);

/// The values of -S, -m, -r, -l and -o, read. qemu-img judges them as its
/// option loop meets them; `getopt::refusal` has already refused the first
/// bad one in the order typed, so here they are only parsed.
fn early_values(args: &Args, ctx: &Ctx) -> Result<Early> {
    let sparse = args
        .sparse_size
        .as_deref()
        .map_or(Ok(4096), sparse_size_arg)?;
    let workers = args
        .workers
        .as_deref()
        .map_or(Ok(default_workers()), workers_arg)?;
    let rate = super::common::parse_rate(args.rate.as_deref())?;
    let snapshot = args
        .snapshot_param
        .as_deref()
        .map(|s| snapshot_key(s, ctx))
        .transpose()?;
    super::common::check_option_lists(&args.options)?;
    Ok((sparse, workers, rate, snapshot))
}

/// `-S SIZE` as qemu-img reads it: a size that is a multiple of 512 up to
/// [`MAX_SPARSE`] (0 turns sparse detection off), refused in its words.
pub(super) fn sparse_size_arg(s: &str) -> Result<u64> {
    match super::common::size_arg("buffer size for sparse output", s)? {
        v if v.is_multiple_of(512) && v <= MAX_SPARSE => Ok(v),
        _ => bail!("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output)."),
    }
}

/// `-m N` as qemu-img reads it: an integer from 1 to 16, refused in its words.
pub(super) fn workers_arg(m: &str) -> Result<usize> {
    match c_int(m) {
        Some(v) if (1..=16).contains(&v) => Ok(v as usize),
        Some(_) => bail!("Invalid number of coroutines specified. Must be between 1 and 16."),
        None => bail!("Invalid number of coroutines specified: '{m}'."),
    }
}

fn c_int(s: &str) -> Option<i64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v = digits.parse::<i64>().unwrap_or(i64::MAX);
    Some(if neg { -v } else { v })
}

/// The cache modes QEMU knows (`-t`, `-T`).
pub(super) fn is_cache_mode(c: &str) -> bool {
    matches!(
        c,
        "none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe"
    )
}

/// qemu-img's refusal (convert and measure `-l`) to read an internal snapshot
/// of an image that keeps none: a format without internal snapshots is named;
/// a qcow2 image that cannot keep any (one with an external data file) just
/// has no such snapshot, as its format does load them.
pub(super) fn no_snapshot_load(format: &impl std::fmt::Display) -> String {
    let format = format.to_string();
    if format == "qcow2" {
        return "Failed to load snapshot: Can't find snapshot".into();
    }
    format!(
        "Failed to load snapshot: Block format '{format}' used by device '' \
         does not support temporarily loading internal snapshots"
    )
}
