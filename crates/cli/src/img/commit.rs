//! `strata img commit`: merge an overlay (and the layers down to a base) into the
//! base, as `qemu-img commit`; `--top` merges a middle range of the chain and
//! relinks the image above it (libvirt's intermediate block commit).

use super::common::{job_error, warn_probed_raw, Ctx};
use super::qsteps::{QemuSteps, Shown};
use anyhow::Result;
use std::path::PathBuf;
use strata_jobs::{commit, Cancel};

#[derive(clap::Args)]
pub struct Args {
    /// `--object` definitions and `--image-opts`.
    #[command(flatten)]
    naming: super::imgname::Naming,
    /// Format of the image (probed when omitted; backing files never are).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Cache mode (accepted for compatibility).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// The image to commit into (part of the backing chain; default: the backing
    /// file). Implies -d.
    #[arg(short = 'b', long = "base", value_name = "BASE")]
    base: Option<String>,
    /// Keep the top image's data (do not empty it after the commit).
    #[arg(short = 'd', long = "drop")]
    drop_empty: bool,
    /// Merge from this layer of the chain instead of the top image, then relink the
    /// image above it to the base (the merged layers leave the chain).
    #[arg(long = "top", value_name = "IMAGE")]
    top: Option<String>,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Bandwidth limit in bytes per second (size suffixes allowed; 0: none).
    #[arg(
        short = 'r',
        long = "rate",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    rate: Option<String>,
    /// The image whose changes are committed.
    #[arg(value_parser = super::common::any_file_name())]
    filename: PathBuf,
}

pub fn run(args: Args, _ctx: &Ctx) -> Result<i32> {
    // A rate is a size: out of range (negative, or too large with its suffix)
    // and not a number at all are refused with qemu-img's two messages.
    let rate = match args.rate.as_deref() {
        Some(r) => super::common::size_arg("rate limit", r)?,
        None => 0,
    };
    super::common::check_cache_mode(args.cache.as_deref(), false)?;
    let spec = args
        .naming
        .writable_spec(&args.filename, args.format.as_deref())?
        // A raw image has no backing file: refused once open, never written.
        .writes_no_raw_data(true);
    super::imgname::refuse_options_but_secrets(&spec)?;
    warn_probed_raw(&spec);
    // Failures name the image as the user did (an option list with its secrets).
    let named_as = PathBuf::from(spec.shown_name());
    let req = commit::CommitRequest {
        image: spec.path.clone(),
        format: spec.format,
        base: args.base.clone(),
        top: args.top.clone(),
        keep_top: args.drop_empty,
    };
    // qemu-img starts its progress once the image is open (before it looks for
    // the base: a chain without one still shows the first figure) and prints the
    // figure of its block job until the job is done (when the job starts, 0 again).
    let progress = || {
        Shown::new(args.progress && !args.quiet, |on| {
            QemuSteps::fraction(on, 1.0)
        })
    };
    let found = commit::resolve_spec(&req, spec.clone()).and_then(|r| match &args.base {
        Some(b) if base_unreachable_by_name(&spec, b, r.base) => {
            Err(strata_jobs::Error::NotInChain {
                what: b.clone(),
                image: spec.path.clone(),
            })
        }
        _ => Ok(r),
    });
    let resolved = match found {
        Ok(r) => r,
        Err(e) => {
            let opened = matches!(
                e,
                strata_jobs::Error::NoBackingFile | strata_jobs::Error::NotInChain { .. }
            );
            // Dropped with the error: its line ends after the message.
            let _shown = opened.then(|| {
                let shown = progress();
                shown.steps.set(0.0);
                shown
            });
            // The image is named as the user named it (a `json:` name or an
            // option list), as qemu-img names it.
            let e = match e {
                strata_jobs::Error::NotInChain { what, .. } => strata_jobs::Error::NotInChain {
                    what,
                    image: named_as.clone(),
                },
                e => e,
            };
            if let Some(m) = base_write_refused(&e) {
                return Err(anyhow::anyhow!("{m}"));
            }
            return Err(job_error(&named_as, e));
        }
    };
    let shown = progress();
    let cancel = Cancel::default();
    shown.steps.set(0.0);
    shown.steps.set(0.0);
    let limited = strata_jobs::layers::RateLimit::new(&shown, rate);
    commit::commit(&resolved, &limited, &cancel).map_err(|e| match e {
        strata_jobs::Error::EmptyFailed(f) => {
            anyhow::anyhow!("Failed to empty {}: {}", named_as.display(), f.message())
        }
        e => match base_write_refused(&e) {
            Some(m) => anyhow::anyhow!("{m}"),
            None => job_error(&named_as, e),
        },
    })?;
    shown.finish_bar();
    shown.steps.set(100.0);
    shown.steps.end();
    if !args.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

/// Whether qemu-img fails to find the base `name` (found by strata at layer
/// `base`) in the chain of `spec`. It looks a plain file name up from each
/// layer, resolved against that layer's file name, as is the backing name the
/// layer records; a layer QEMU names by a `json:` name (the top given options
/// that change its data or its backing file's, or the backing file given such
/// options) has no directory to resolve a relative name against, so the layer
/// below it is not found unless both names are absolute.
fn base_unreachable_by_name(spec: &strata_chain::OpenSpec, name: &str, base: usize) -> bool {
    if base == 0 || super::imgname::protocol_prefix(name.as_bytes()).is_some() {
        return false;
    }
    let Ok(chain) = strata_chain::open(spec) else {
        return false;
    };
    let above = base - 1;
    let (Some(layer), Some(below)) = (chain.layers.get(above), chain.layers.get(base)) else {
        return false;
    };
    let json_named = match above {
        0 => super::imgname::json_name_with_backing(
            spec,
            layer.format,
            Some((below.path.as_path(), below.format)),
        )
        .is_some(),
        1 => {
            let key = match layer.format {
                strata_format::Format::Qcow2 => "backing.encrypt.key-secret",
                strata_format::Format::Luks => "backing.key-secret",
                _ => return false,
            };
            spec.driver_options.contains_key(key)
        }
        _ => false,
    };
    let recorded_absolute = layer
        .backing_name
        .as_deref()
        .is_some_and(|n| std::path::Path::new(n).is_absolute());
    json_named && !(name.starts_with('/') && recorded_absolute)
}

/// The lock refusal of a layer below the top that could be read but not
/// written (a holder shares reading it, not writing: `qemu-nbd -r`), if that
/// is what `e` is. qemu-img opens the chain read-only and meets the lock only
/// as its commit reopens the base for writing, so it reports the refusal
/// alone, without the "Could not open 'TOP': Could not open backing file: "
/// of a failed open (as for a read-only NBD export, see
/// [`strata_chain::Error::ProtocolReopen`]).
fn base_write_refused(e: &strata_jobs::Error) -> Option<String> {
    fn below(e: &strata_chain::Error, depth: usize) -> Option<String> {
        let storage = match e {
            strata_chain::Error::Backing { source, .. } => return below(source, depth + 1),
            strata_chain::Error::Storage(s) => s,
            strata_chain::Error::Format(f) => f.storage_error()?,
            _ => return None,
        };
        // A held permission refused ("write"), not a sharing one ("shared ..."),
        // in a backing file rather than the top.
        match storage {
            strata_storage::Error::Locked {
                kind: "",
                perm: "write",
                ..
            } if depth > 0 => Some(storage.to_string()),
            _ => None,
        }
    }
    match e {
        strata_jobs::Error::Chain(c) => below(c, 0),
        _ => None,
    }
}
