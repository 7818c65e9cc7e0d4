//! `strata img commit`: merge an overlay (and the layers down to a base) into the
//! base, as `qemu-img commit`; `--top` merges a middle range of the chain and
//! relinks the image above it (libvirt's intermediate block commit).

use super::common::{open_chain, open_spec, warn_probed_raw, Ctx};
use super::progress::Bar;
use anyhow::{bail, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use strata_chain::Chain;
use strata_jobs::{commit, Cancel};

#[derive(clap::Args)]
pub struct Args {
    /// Format of the image (probed when omitted; backing files never are).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Cache mode (accepted for compatibility).
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    /// The image to commit into (part of the backing chain; default: the backing
    /// file). Implies -d.
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<String>,
    /// Keep the top image's data (do not empty it after the commit).
    #[arg(short = 'd')]
    drop_empty: bool,
    /// Merge from this layer of the chain instead of the top image, then relink the
    /// image above it to the base (the merged layers leave the chain).
    #[arg(long = "top", value_name = "IMAGE")]
    top: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Bandwidth limit in bytes per second (size suffixes allowed; 0: none).
    #[arg(short = 'r', value_name = "RATE", allow_hyphen_values = true)]
    rate: Option<String>,
    /// The image whose changes are committed.
    filename: PathBuf,
}

/// The name to record in `above` for `base`: the name the chain already uses for
/// it when that resolves the same from `above`'s directory, else its full path.
pub fn backing_name_for(chain: &Chain, above: usize, base: usize) -> OsString {
    let recorded = chain.layers[base - 1]
        .backing_name
        .clone()
        .unwrap_or_default();
    let from_above = strata_chain::resolve_backing(&chain.layers[above].path, &recorded);
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if !recorded.is_empty() && same(&from_above, &chain.layers[base].path) {
        recorded
    } else {
        std::fs::canonicalize(&chain.layers[base].path)
            .unwrap_or_else(|_| chain.layers[base].path.clone())
            .into_os_string()
    }
}

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    let name = args.filename.display().to_string();
    let rate = super::common::parse_rate(args.rate.as_deref())?;
    // Find the layers first (read-only), then reopen what must be written.
    warn_probed_raw(&args.filename, args.format.as_deref());
    let spec = open_spec(&args.filename, args.format.as_deref(), false)?;
    let probe = open_chain(&spec)?;
    if probe.layers.len() < 2 {
        bail!("Image does not have a backing file");
    }
    let find = |what: &str| {
        probe.find(what).ok_or_else(|| {
            anyhow::anyhow!("Did not find '{what}' in the backing chain of '{name}'")
        })
    };
    let top = match &args.top {
        Some(t) => find(t)?,
        None => 0,
    };
    let base = match &args.base {
        Some(b) => find(b)?,
        None => top + 1,
    };
    if args.base.is_none() && base >= probe.layers.len() {
        // --top names the bottom of the chain: nothing below it to commit into.
        bail!("Image does not have a backing file");
    }
    if base <= top || base >= probe.layers.len() {
        bail!(
            "Did not find '{}' in the backing chain of '{name}'",
            args.base.clone().unwrap_or_default()
        );
    }
    let empty_top = top == 0 && args.base.is_none() && !args.drop_empty;
    let relink = top > 0;
    for user in commit::other_users(&probe, base) {
        eprintln!(
            "{}: warning: '{}' also has '{}' as its backing file; its content will change",
            ctx.prog,
            user.display(),
            probe.layers[base].path.display()
        );
    }
    drop(probe);
    let mut spec = spec
        .write(empty_top || (relink && top == 1))
        .write_layer(base);
    if relink && top > 1 {
        spec = spec.write_layer(top - 1);
    }
    let chain = open_chain(&spec)?;
    let layers = chain.devices();
    let cancel = Cancel::default();
    let plan = commit::plan(&layers, top, base, &cancel)?;
    let bar = Bar::new(args.progress && !args.quiet);
    let limited = strata_jobs::layers::RateLimit::new(&bar, rate);
    commit::apply_plan(&layers, &plan, &limited, &cancel)?;
    bar.finish();
    if relink {
        let new_name = backing_name_for(&chain, top - 1, base);
        commit::relink_above_to(
            layers[top - 1].as_ref(),
            Some(&new_name),
            Some(chain.layers[base].format.name()),
        )?;
    } else if empty_top {
        commit::make_empty(layers[0].as_ref())?;
    }
    for l in &layers {
        if let Some(q) = l
            .as_any()
            .downcast_ref::<strata_format::qcow2::Qcow2Image>()
        {
            if !l.read_only() {
                q.close()?;
            }
        }
    }
    if !args.quiet {
        println!("Image committed.");
    }
    Ok(0)
}
