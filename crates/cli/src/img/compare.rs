//! `strata img compare`: do two images (with their backing chains) show the guest
//! the same bytes? Exit 0 identical, 1 different, 2 error, as qemu-img.

use super::common::{open_chain, Ctx};
use super::qsteps::{QemuSteps, Shown};
use anyhow::{anyhow, Result};
use std::path::PathBuf;
use strata_format::Operation;
use strata_jobs::compare::{compare, Outcome};
use strata_jobs::status::ChainStatus;
use strata_jobs::Cancel;

#[derive(clap::Args)]
pub struct Args {
    /// `--object` definitions and `--image-opts`.
    #[command(flatten)]
    naming: super::imgname::Naming,
    /// Format of the first image (probed when omitted).
    #[arg(
        short = 'f',
        long = "a-format",
        alias = "left-format",
        value_name = "FMT"
    )]
    format1: Option<String>,
    /// Format of the second image (probed when omitted).
    #[arg(
        short = 'F',
        long = "b-format",
        alias = "right-format",
        value_name = "FMT"
    )]
    format2: Option<String>,
    /// Strict: fail on a size difference or a different allocation status, not only
    /// on different contents.
    #[arg(short = 's', long = "strict")]
    strict: bool,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet: print nothing (the exit code tells the result).
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Cache mode (checked; strata uses the page cache).
    #[arg(short = 'T', long = "cache", value_name = "SRC_CACHE")]
    cache: Option<String>,
    /// Open without locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(value_parser = super::common::any_file_name())]
    filename1: PathBuf,
    #[arg(value_parser = super::common::any_file_name())]
    filename2: PathBuf,
}

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    // Errors exit with 2 here, not 1: 1 means "different".
    match run_inner(&args) {
        Ok(code) => Ok(code),
        Err(e) if e.is::<NoMedium>() => {
            ctx.error(&e);
            Ok(4)
        }
        Err(e) => {
            // A failed read exits with 4, a failed allocation query with 3.
            let failed = super::ioerr::io_failure(&e).and_then(|f| {
                let name = failing_name(&args, f.path.as_deref());
                match f.op {
                    Operation::Read => Some((
                        format!(
                            "Error while reading offset {} of {name}: {}",
                            f.offset, f.os
                        ),
                        4,
                    )),
                    Operation::BlockStatus => {
                        Some((format!("Sector allocation test failed for {name}"), 3))
                    }
                    _ => None,
                }
            });
            match failed {
                Some((msg, code)) => {
                    ctx.error(&anyhow!(msg));
                    Ok(code)
                }
                None => {
                    ctx.error(&e);
                    Ok(2)
                }
            }
        }
    }
}

/// The image (as named) whose file `path` failed: the one behind a blkdebug
/// filter when both name that file.
fn failing_name(args: &Args, path: Option<&std::path::Path>) -> String {
    let spec = |p: &PathBuf, f: &Option<String>| args.naming.spec(p, f.as_deref(), true).ok();
    let (s1, s2) = (
        spec(&args.filename1, &args.format1),
        spec(&args.filename2, &args.format2),
    );
    let is = |s: &Option<strata_chain::OpenSpec>| {
        s.as_ref().is_some_and(|s| Some(s.path.as_path()) == path)
    };
    let filtered =
        |s: &Option<strata_chain::OpenSpec>| s.as_ref().is_some_and(|s| s.blkdebug.is_some());
    let second = is(&s2) && (!is(&s1) || (filtered(&s2) && !filtered(&s1)));
    let name = if second {
        &args.filename2
    } else {
        &args.filename1
    };
    name.display().to_string()
}

/// An image that has no length to give (a `host_cdrom` drive without a
/// medium), named as the command line names it: the comparison fails as a
/// failed read does.
#[derive(Debug)]
struct NoMedium(PathBuf);

impl std::fmt::Display for NoMedium {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Can't get size of {}: No medium found", self.0.display())
    }
}

impl std::error::Error for NoMedium {}

fn run_inner(args: &Args) -> Result<i32> {
    let open = |p: &PathBuf, f: &Option<String>| -> Result<_> {
        let spec = args.naming.spec(p, f.as_deref(), args.force_share)?;
        let chain = open_chain(&spec)?;
        let no_medium = super::imgname::cdrom_without_medium(&spec);
        // Through a raw image over a filter over a format node, allocation
        // is the node's own (the filter as the image has the node's chain).
        let status = match (&spec.filtered, &spec.protocol_driver) {
            (Some(node), None) => {
                let mut node = (**node).clone();
                node.force_share |= spec.force_share;
                ChainStatus::through(chain.top().clone(), &open_chain(&node)?)?
            }
            _ => ChainStatus::new(&chain)?,
        };
        Ok((status, no_medium))
    };
    // qemu-img starts its progress before opening the images (an open that fails
    // still ends it) and prints its first figure once both are open.
    args.naming.objects.objects()?;
    let shown = Shown::new(args.progress && !args.quiet, |on| {
        QemuSteps::relative(on, 2.0)
    });
    super::common::check_cache_mode(args.cache.as_deref(), true)?;
    let (a, a_no_medium) = open(&args.filename1, &args.format1)?;
    let (b, b_no_medium) = open(&args.filename2, &args.format2)?;
    for (no_medium, name) in [
        (a_no_medium, &args.filename1),
        (b_no_medium, &args.filename2),
    ] {
        if no_medium {
            return Err(NoMedium(name.clone()).into());
        }
    }
    shown.steps.set(0.0);
    let (sa, sb) = (a.virtual_size(), b.virtual_size());
    if sa != sb && !args.strict && !args.quiet {
        // Printed between the comparison of the common part and the check of the
        // longer image's tail, in the middle of the progress lines.
        shown
            .steps
            .notice(sa.min(sb), "Warning: Image size mismatch!".into());
    }
    let out = compare(&a, &b, args.strict, &shown, &Cancel::default())?;
    shown.finish_bar();
    let say = |s: &str| {
        if !args.quiet {
            println!("{s}");
        }
    };
    Ok(match out {
        Outcome::Identical { .. } => {
            say("Images are identical.");
            0
        }
        Outcome::StrictSizeMismatch => {
            say("Strict mode: Image size mismatch!");
            1
        }
        Outcome::StrictStatusMismatch { offset } => {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ));
            1
        }
        Outcome::ContentMismatch { offset, .. } => {
            say(&format!("Content mismatch at offset {offset}!"));
            1
        }
    })
}
