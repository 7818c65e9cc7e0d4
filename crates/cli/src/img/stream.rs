//! `strata img stream`: pull into an image the data it reads from part of its
//! backing chain (down to `-b BASE`, or all of it), then drop that part by
//! relinking the image to the base (or to nothing).

use super::common::{job_error, warn_probed_raw, Ctx};
use super::progress::Bar;
use anyhow::Result;
use std::path::PathBuf;
use strata_jobs::{stream, Cancel};

#[derive(clap::Args)]
pub struct Args {
    /// `--object` definitions and `--image-opts`.
    #[command(flatten)]
    naming: super::imgname::Naming,
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
    #[arg(value_parser = super::common::any_file_name())]
    filename: PathBuf,
}

pub fn run(args: Args, _ctx: &Ctx) -> Result<i32> {
    let spec = args
        .naming
        .spec(&args.filename, args.format.as_deref(), false)?;
    super::imgname::refuse_backing_nodes(&spec)?;
    warn_probed_raw(&spec);
    let req = stream::StreamRequest {
        image: spec.path.clone(),
        format: spec.format,
        base: args.base.clone(),
    };
    let bar = Bar::new(args.progress && !args.quiet);
    stream::stream(&req, &bar, &Cancel::default()).map_err(|e| job_error(&spec.path, e))?;
    bar.finish();
    Ok(0)
}
