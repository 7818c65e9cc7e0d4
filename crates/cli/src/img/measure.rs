//! `strata img measure`: the file size a new image needs, for a size or a source
//! image (with its chain), by qemu-img's formulas.

use super::common::{image_size, open_chain, parse_options, Ctx, OutputFormat};
use super::qjson;
use anyhow::{bail, Result};
use std::path::PathBuf;
use strata_format::qcow2::Qcow2Image;
use strata_format::Format;
use strata_jobs::measure::{measure, Source, Target};
use strata_jobs::snapshot::SnapshotKey;
use strata_jobs::status::ChainStatus;
use strata_jobs::Cancel;

#[derive(clap::Args)]
pub struct Args {
    /// `--object` definitions and `--image-opts`.
    #[command(flatten)]
    naming: super::imgname::Naming,
    /// Output format.
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human, value_name = "OFMT")]
    output: OutputFormat,
    /// Format of the image to be created (default raw).
    #[arg(
        short = 'O',
        long = "target-format",
        value_name = "OUTPUT_FMT",
        default_value = "raw"
    )]
    out_format: String,
    /// Creation options of the image to be created.
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    options: Vec<String>,
    /// Measure an image of this size instead of a source image.
    #[arg(long = "size", value_name = "SIZE", allow_hyphen_values = true)]
    size: Option<String>,
    /// Source image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Measure an internal snapshot of the source (snapshot.name=N, snapshot.id=I or a name).
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Open without locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The source image.
    #[arg(value_parser = super::common::any_file_name())]
    filenames: Vec<PathBuf>,
}

/// The snapshot key of a `-l` argument: a snapshot's ID or name, or an option
/// list of `snapshot.id=` and `snapshot.name=` (other keys refused as qemu-img
/// refuses them, after its warning for a key without a value).
pub fn snapshot_key(param: &str, ctx: &Ctx) -> Result<SnapshotKey> {
    if !param.starts_with("snapshot.") {
        return Ok(SnapshotKey::IdOrName(param.to_string()));
    }
    // An option list: a key given twice takes its last value.
    let (mut id, mut name) = (None, None);
    for item in super::common::split_items(param) {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                eprintln!(
                    "{}: warning: short-form boolean option '{item}' deprecated\nPlease use {item}=on instead",
                    ctx.prog
                );
                (item.clone(), "on".to_string())
            }
        };
        match k.as_str() {
            "snapshot.id" => id = Some(v),
            "snapshot.name" => name = Some(v),
            _ => {
                eprintln!("{}: Invalid parameter '{k}'", ctx.prog);
                bail!("Failed in parsing snapshot param '{param}'");
            }
        }
    }
    Ok(SnapshotKey::Exact { id, name })
}

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    super::common::check_option_lists(&args.options)?;
    let snapshot = args
        .snapshot
        .as_deref()
        .map(|s| snapshot_key(s, ctx))
        .transpose()?;
    if args.filenames.len() > 1 {
        bail!("At most one filename argument is allowed.");
    }
    let filename = args.filenames.first();
    if filename.is_none() && (args.naming.image_opts || args.format.is_some() || snapshot.is_some())
    {
        bail!("--image-opts, -f, and -l require a filename argument.");
    }
    match (filename.is_some(), args.size.is_some()) {
        (true, true) => bail!("--size N cannot be used together with a filename."),
        (false, false) => bail!("Either --size N or one filename must be specified."),
        _ => {}
    }
    let format: Format = match args.out_format.parse() {
        Ok(f) => f,
        Err(e) => {
            // qemu-img opens the source before it looks the output format up:
            // a missing source is reported first.
            if let Some(f) = filename {
                open_chain(
                    &args
                        .naming
                        .spec(f, args.format.as_deref(), args.force_share)?,
                )?;
            }
            return Err(unmeasurable_format(&args.out_format).unwrap_or_else(|| e.into()));
        }
    };
    let opts = parse_options(&args.options)?;
    // The first option the target format does not know is refused once the
    // source is open, before anything is measured.
    let unknown = super::common::option_items(&args.options)
        .into_iter()
        .find(|(k, _)| !super::opthelp::creatable(format.name(), k));
    if let Some((k, _)) = unknown {
        if let Some(f) = filename {
            open_chain(
                &args
                    .naming
                    .spec(f, args.format.as_deref(), args.force_share)?,
            )?;
        }
        eprintln!("{}: Invalid parameter '{k}'", ctx.prog);
        bail!("Invalid options for file format '{}'", args.out_format);
    }
    let mut target = Target {
        format,
        ..Default::default()
    };
    if format == Format::Qcow2 {
        // qemu-img's measure knows compat only as 0.10, 1.1 or v3.
        let bad_compat = opts
            .get("compat")
            .filter(|v| !["0.10", "1.1", "v3"].contains(&v.as_str()));
        // The encryption options are checked apart (see `luks_area` below).
        let clear: std::collections::BTreeMap<_, _> = opts
            .iter()
            .filter(|(k, _)| !k.starts_with("encrypt.") && k.as_str() != "encryption")
            .filter(|(k, _)| bad_compat.is_none() || k.as_str() != "compat")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let c = strata_jobs::create::qcow2_options(&clear).map_err(anyhow::Error::msg)?;
        // QEMU's order: the cluster size, the compat level, then the
        // refcount width (the job checks them again, for its other callers).
        strata_jobs::measure::check_cluster_size(c.cluster_size, c.extended_l2)?;
        if let Some(v) = bad_compat {
            bail!("Invalid compatibility level: '{v}'");
        }
        strata_jobs::measure::check_refcount_width(c.refcount_bits, c.version)?;
        target.cluster_size = c.cluster_size;
        target.refcount_bits = c.refcount_bits;
        target.extended_l2 = c.extended_l2;
        target.version = c.version;
        target.preallocation = c.preallocation;
        target.has_backing_file = c.backing_file.is_some();
    }
    // A LUKS target's options and secret are checked as qemu-img's driver
    // checks them: once the source (if any) is open.
    let secrets = args.naming.objects.secrets()?;
    let luks_area = || -> Result<u64> {
        use strata_jobs::create_encrypt::{measured_luks_area, measured_luks_header};
        match format {
            Format::Qcow2 => measured_luks_area(&opts, &secrets),
            Format::Luks => measured_luks_header(&opts, &secrets),
            _ => Ok(0),
        }
        .map_err(anyhow::Error::msg)
    };
    let cancel = Cancel::default();
    let m = match (filename, &args.size) {
        (None, Some(s)) => {
            let size = image_size(s)?;
            target.luks_area = luks_area()?;
            measure(Source::Size(size), &target, &cancel)?
        }
        (Some(f), _) => {
            let chain = open_chain(&args.naming.spec(
                f,
                args.format.as_deref(),
                args.force_share,
            )?)?;
            let top = chain.top().clone();
            // The snapshot is loaded as the source opens, before the target's
            // options are looked at.
            let status = match &snapshot {
                Some(key) => {
                    // The snapshot reads through the image's backing chain.
                    let devices = match strata_jobs::snapshot::view_chain_at(&chain.devices(), key)
                    {
                        Err(strata_jobs::Error::NoInternalSnapshots { .. }) => {
                            bail!(super::convert::no_snapshot_load(&chain.layers[0].format))
                        }
                        Err(_) => bail!("Failed to load snapshot: Can't find snapshot"),
                        Ok(d) => d,
                    };
                    ChainStatus::from_devices(devices)?
                }
                None => ChainStatus::new(&chain)?,
            };
            target.luks_area = luks_area()?;
            // The bitmaps' sizes are read from qcow2's bitmap directory: an
            // inspection of that format, no capability of devices.
            let q = top.as_any().downcast_ref::<Qcow2Image>();
            let bitmaps = match q {
                Some(q) if q.header().version >= 3 => Some(q.bitmaps()?),
                // QEMU's parallels driver supports persistent bitmaps (it
                // reads those of the format extension, which strata does
                // not copy): none to measure.
                None if chain.layers[0].format == strata_format::Format::Parallels => {
                    Some(Vec::new())
                }
                _ => None,
            };
            measure(
                Source::Image {
                    chain: &status,
                    bitmaps,
                },
                &target,
                &cancel,
            )?
        }
        (None, None) => unreachable!("checked above"),
    };
    match args.output {
        OutputFormat::Json => println!("{}", qjson::to_string(&serde_json::to_value(m)?)),
        OutputFormat::Human => {
            println!("required size: {}", m.required);
            println!("fully allocated size: {}", m.fully_allocated);
            if let Some(b) = m.bitmaps {
                println!("bitmaps size: {b}");
            }
        }
    }
    Ok(0)
}

/// qemu-img's refusal of an output format strata does not measure but QEMU
/// knows: the drivers that create images have no size measurement, the other
/// drivers no image creation. None for a name QEMU does not know either.
fn unmeasurable_format(name: &str) -> Option<anyhow::Error> {
    const CREATING: [&str; 12] = [
        "file",
        "host_cdrom",
        "host_device",
        "nbd",
        "nvme",
        "parallels",
        "qcow",
        "qed",
        "vdi",
        "vhdx",
        "vmdk",
        "vpc",
    ];
    // Drivers qemu-img loads from a module (its message names the package).
    const MODULES: [&str; 10] = [
        "ftp", "ftps", "gluster", "http", "https", "iscsi", "iser", "nfs", "rbd", "ssh",
    ];
    if CREATING.contains(&name) {
        Some(anyhow::anyhow!(
            "Block driver '{name}' does not support size measurement"
        ))
    } else if super::imgname::is_qemu_driver(name) && !MODULES.contains(&name) {
        Some(anyhow::anyhow!(
            "Format driver '{name}' does not support image creation"
        ))
    } else {
        None
    }
}
