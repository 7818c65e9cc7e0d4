//! `strata img resize`: change an image's virtual size (`SIZE`, `+SIZE` or `-SIZE`);
//! shrinking needs `--shrink`, as in qemu-img.

use super::common::{option_size, Ctx};
use anyhow::{bail, Result};
use std::path::PathBuf;
use strata_format::qcow2::Preallocation;

#[derive(clap::Args)]
pub struct Args {
    /// `--object` definitions and `--image-opts`.
    #[command(flatten)]
    naming: super::imgname::Naming,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Preallocation of the new area: off, metadata, falloc or full.
    #[arg(long = "preallocation", value_name = "PREALLOC")]
    preallocation: Option<String>,
    /// Allow the image to shrink (data past the new end is lost).
    #[arg(long = "shrink")]
    shrink: bool,
    /// Quiet: print nothing on success.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The image.
    #[arg(value_parser = super::common::any_file_name())]
    filename: PathBuf,
    /// The new size, or a change (+SIZE / -SIZE), with k, M, G, T, P, E suffixes.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

/// The largest length QEMU's block layer gives an image: 2^63 - 1 rounded down to
/// a whole GiB.
const MAX_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    let (sign, num) = match args.size.as_bytes().first() {
        Some(b'+') => (1i8, &args.size[1..]),
        Some(b'-') => (-1, &args.size[1..]),
        _ => (0, args.size.as_str()),
    };
    let n = option_size("size", num)?;
    let prealloc = match args.preallocation.as_deref() {
        None | Some("off") => None,
        Some(p) => Some(
            p.parse::<Preallocation>()
                .map_err(|_| anyhow::anyhow!("Invalid preallocation mode '{p}'"))?,
        ),
    };
    let spec = args
        .naming
        .writable_spec(&args.filename, args.format.as_deref())?;
    super::imgname::refuse_backing_nodes(&spec)?;
    super::common::warn_probed_raw(&spec);
    let format = super::common::spec_format(&spec)?;
    // qemu-img opens the image with its backing chain: a backing file that fails
    // to open fails the resize, and one longer than the image has the range the
    // image grows over zeroed (the engine's resize does that).
    let dev = if format == strata_format::Format::Qcow2 {
        super::common::open_chain(&spec.clone().write(true))?
            .top()
            .clone()
    } else {
        // A raw image is locked with QEMU's resize permission, as qemu-img
        // resize locks it (a qemu-nbd serving it, which shares no resize,
        // refuses the resize, and a reader of it does not).
        super::common::open_top(&spec.clone().resize(true), format, true)?
    };
    let cur = dev.virtual_size();
    // As qemu-img computes it: the value as a signed 64-bit number, the change
    // added with wrap-around (+15E is a shrink below zero, +2^64-1 one of a byte).
    let total = match sign {
        0 => n as i64,
        s => (cur as i64).wrapping_add((n as i64).wrapping_mul(i64::from(s))),
    };
    if total <= 0 {
        bail!("New image size must be positive");
    }
    let new = total as u64;
    if new <= cur && prealloc.is_some() {
        bail!("Preallocation can only be used for growing images");
    }
    if new < cur && !args.shrink {
        eprintln!(
            "{}: Use the --shrink option to perform a shrink operation.",
            ctx.prog
        );
        eprintln!("{}: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.", ctx.prog);
        return Ok(1);
    }
    // A raw file has no metadata to preallocate; its driver refuses the mode
    // before changing anything.
    if format == strata_format::Format::Raw && prealloc == Some(Preallocation::Metadata) {
        bail!("Unsupported preallocation mode: metadata");
    }
    // QEMU's qed driver grows only without preallocation.
    if format == strata_format::Format::Qed && new > cur {
        if let Some(p) = &args.preallocation.as_deref().filter(|p| *p != "off") {
            bail!("Unsupported preallocation mode '{p}'");
        }
    }
    // An NBD export keeps the size its server gives it.
    if spec.storage.is_some() && new != cur && format == strata_format::Format::Raw {
        bail!("Cannot resize NBD nodes");
    }
    if new > MAX_LENGTH {
        bail!("offset({new}) exceeds maximum({MAX_LENGTH})");
    }
    // qemu-img reports the format's refusal without the file's name.
    let qcow2 = dev
        .as_any()
        .downcast_ref::<strata_format::qcow2::Qcow2Image>();
    let raw = dev.as_any().downcast_ref::<strata_format::raw::RawImage>();
    match (qcow2, raw, prealloc) {
        // qcow2 preallocates the grown range before it hides a longer backing
        // file there, as QEMU does (see `grow_preallocated`).
        (Some(q), _, Some(p)) if new > cur => q
            .grow_preallocated(new, p)
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?,
        (_, Some(r), Some(p)) if new > cur => r
            .grow_preallocated(new, p)
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?,
        _ => {
            dev.resize(new, args.shrink)
                .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        }
    }
    dev.flush()?;
    dev.close()?;
    if !args.quiet {
        println!("Image resized.");
    }
    // qemu-img resizes past a bitmap's limits and fails only to store the
    // bitmaps when it closes the image: a warning, not a failure, naming the
    // node by the name QEMU makes up for it.
    if let Some(name) = qcow2.and_then(|q| q.lost_bitmap()) {
        eprintln!(
            "{}: Lost persistent bitmaps during inactivation of node '{}': Bitmap '{name}' doesn't satisfy the constraints: Too much space will be occupied by the bitmap. Use larger granularity",
            ctx.prog,
            super::common::generated_node_name(1)
        );
    }
    Ok(0)
}
