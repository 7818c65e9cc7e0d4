//! `strata img stream`: pull into an image the data it reads from part of its
//! backing chain (down to `-b BASE`, or all of it), then drop that part by
//! relinking the image to the base (or to nothing).

use super::commit::backing_name_for;
use super::common::{open_chain, open_spec, warn_probed_raw, Ctx};
use super::progress::Bar;
use anyhow::{bail, Result};
use std::path::PathBuf;
use strata_jobs::{commit, stream, Cancel};

#[derive(clap::Args)]
pub struct Args {
    /// Format of the image (probed when omitted).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Keep this backing file (and what is below it); pull everything above it.
    /// Without -b the whole chain is pulled and the image stands alone.
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image to stream into (it stays readable throughout).
    filename: PathBuf,
}

pub fn run(args: Args, _ctx: &Ctx) -> Result<i32> {
    let name = args.filename.display().to_string();
    warn_probed_raw(&args.filename, args.format.as_deref());
    let spec = open_spec(&args.filename, args.format.as_deref(), false)?.write(true);
    let chain = open_chain(&spec)?;
    if chain.layers.len() < 2 {
        bail!("Image does not have a backing file");
    }
    let base = match &args.base {
        Some(b) => match chain.find(b) {
            Some(i) if i > 0 => i,
            _ => bail!("Did not find '{b}' in the backing chain of '{name}'"),
        },
        None => chain.layers.len(),
    };
    let layers = chain.devices();
    let cancel = Cancel::default();
    let plan = stream::plan(&layers, base, &cancel)?;
    let bar = Bar::new(args.progress && !args.quiet);
    stream::apply_plan(&layers, &plan, &bar, &cancel)?;
    bar.finish();
    if base == chain.layers.len() {
        commit::relink_above(layers[0].as_ref(), None, None)?;
    } else {
        let new_name = backing_name_for(&chain, 0, base);
        commit::relink_above_to(
            layers[0].as_ref(),
            Some(&new_name),
            Some(chain.layers[base].format.name()),
        )?;
    }
    if let Some(q) = layers[0]
        .as_any()
        .downcast_ref::<strata_format::qcow2::Qcow2Image>()
    {
        q.close()?;
    }
    Ok(0)
}
