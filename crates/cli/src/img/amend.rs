//! `strata img amend`: change a qcow2 image's options in place (`-o compat=`,
//! `lazy_refcounts=`, `refcount_bits=`, `size=`, `backing_file=`, `backing_fmt=`),
//! with qemu-img's refusals, messages and `-p` output.

use super::common::{open_qcow2, option_items, option_size, spec_format, warn_probed_raw, Ctx};
use super::qsteps::QemuSteps;
use anyhow::{anyhow, bail, Result};
use std::path::PathBuf;
use strata_format::qcow2::amend::{AmendOptions, AmendPoint, AmendStep};
use strata_format::qcow2::Qcow2Image;
use strata_format::{BlockDevice, Format};

#[derive(clap::Args)]
pub struct Args {
    /// `--object` definitions and `--image-opts`.
    #[command(flatten)]
    naming: super::imgname::Naming,
    /// Image format (probed when omitted); only qcow2 images can be amended.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Options to change, `key=value[,key=value...]` (`-o help` lists them).
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    options: Vec<String>,
    /// Show progress in qemu-img's format.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Quiet: no progress.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Cache mode (accepted for compatibility; strata flushes at every ordering point).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Allow the key-slot changes qemu-img guards with --force: overwriting an
    /// active slot, erasing an inactive one or the last one.
    #[arg(long = "force")]
    force: bool,
    /// The image.
    #[arg(value_parser = super::common::any_file_name())]
    filenames: Vec<PathBuf>,
}

/// qcow2 options only `create` takes.
const CREATION_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "extended_l2",
    "compression_type",
    "encryption",
];

/// What the `-o` items ask for.
#[derive(Default)]
struct Request {
    amend: AmendOptions,
    size: Option<u64>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    data_file: Option<String>,
    data_file_raw: Option<bool>,
    /// Key-slot options (`encrypt.state=...`), by their name below `encrypt.`.
    encrypt: Vec<(String, String)>,
}

/// The type of the value qemu-img reads for option `key` as it parses a list.
fn typed(key: &str, v: &str) -> Result<(), String> {
    use strata_jobs::create::{option_size_error, parse_bool, parse_opt_number, parse_size_u64};
    match key {
        "lazy_refcounts" | "data_file_raw" | "encryption" | "extended_l2" => {
            parse_bool(key, v).map(drop)
        }
        "refcount_bits" | "encrypt.iter-time" => parse_opt_number(key, v).map(drop),
        "size" | "cluster_size" => parse_size_u64(v)
            .map(drop)
            .ok_or_else(|| option_size_error(key, v)),
        _ => Ok(()),
    }
}

/// The list parsed as qemu-img parses it against a set of options (`known`
/// keys): in the order typed, each key known and each value of its type; the
/// first mistake, in qemu-img's words.
fn parse_against(items: &[(String, String)], known: impl Fn(&str) -> bool) -> Result<(), String> {
    for (k, v) in items {
        if !known(k) {
            return Err(format!("Invalid parameter '{k}'"));
        }
        typed(k, v)?;
    }
    Ok(())
}

/// Parse the list as qemu-img does, against the options the format amends: the
/// first mistake in the order typed is refused; a list the creation options
/// would take whole is told so. The values are judged by [`judge_values`].
fn parse_request(items: &[(String, String)]) -> Result<Request> {
    let amendable = |k: &str| super::opthelp::amendable("qcow2", k);
    if let Err(e) = parse_against(items, amendable) {
        let creatable = |k: &str| {
            amendable(k)
                || CREATION_ONLY.contains(&k)
                || strata_jobs::create::ENCRYPT_KEYS.contains(&k)
        };
        if parse_against(items, creatable).is_ok() {
            bail!("{e}\nThis option is only supported for image creation");
        }
        bail!("{e}");
    }
    let mut r = Request::default();
    for (k, v) in items {
        match k.as_str() {
            "compat" => {
                r.amend.version = Some(match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    // Only the last one counts (checked above).
                    _ => continue,
                })
            }
            "lazy_refcounts" => {
                r.amend.lazy_refcounts =
                    Some(strata_jobs::create::parse_bool(k, v).map_err(|e| anyhow!(e))?)
            }
            "refcount_bits" => {
                // Its range is judged with the other values (`judge_values`).
                let bits = strata_jobs::create::parse_opt_number(k, v).map_err(|e| anyhow!(e))?;
                r.amend.refcount_bits = Some(bits);
            }
            "size" => r.size = Some(option_size("size", v)?),
            "backing_file" => r.backing_file = Some(v.clone()),
            "backing_fmt" => r.backing_fmt = Some(v.clone()),
            "data_file" => r.data_file = Some(v.clone()),
            "data_file_raw" => {
                r.data_file_raw =
                    Some(strata_jobs::create::parse_bool(k, v).map_err(|e| anyhow!(e))?)
            }
            k if k.starts_with("encrypt.") => r
                .encrypt
                .push((k.trim_start_matches("encrypt.").to_string(), v.clone())),
            _ => {}
        }
    }
    Ok(r)
}

/// The values qcow2 judges before it changes anything, in its order (after the
/// encryption options): `compat`, `data_file` (only an image with a data file
/// takes one), `data_file_raw` (which cannot be turned on), the range of
/// `refcount_bits`. Where a key is repeated its last value counts.
fn judge_values(items: &[(String, String)], img: &Qcow2Image) -> Result<()> {
    let last = |key: &str| {
        items
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    if let Some(v) = last("compat") {
        if !matches!(v, "0.10" | "v2" | "1.1" | "v3") {
            bail!("Unknown compatibility level {v}");
        }
    }
    if last("data_file").is_some() && !img.has_data_file() {
        bail!("data-file can only be set for images that use an external data file");
    }
    if let Some(v) = last("data_file_raw") {
        if strata_jobs::create::parse_bool("data_file_raw", v) == Ok(true) && !img.data_file_raw() {
            bail!("data-file-raw cannot be set on existing images");
        }
    }
    if let Some(v) = last("refcount_bits") {
        let bits =
            strata_jobs::create::parse_opt_number("refcount_bits", v).map_err(|e| anyhow!(e))?;
        if bits == 0 || bits > 64 || !bits.is_power_of_two() {
            bail!("Refcount width must be a power of two and may not exceed 64 bits");
        }
    }
    Ok(())
}

/// Spreads each step's own (done, total) over the whole run as qemu-img does:
/// the steps finished so far count with their size, and the steps still to come
/// are projected at the average size of those seen.
struct StepProgress {
    steps: u64,
    finished: u64,
    done_before: u64,
    last: Option<(AmendStep, u64)>,
}

impl StepProgress {
    fn report(&mut self, step: AmendStep, done: u64, total: u64) -> (u64, u64) {
        if let Some((prev, size)) = self.last {
            if prev != step {
                self.done_before += size;
                self.finished += 1;
            }
        }
        self.last = Some((step, total));
        let covered = self.done_before + total;
        let ahead = self.steps.saturating_sub(self.finished + 1);
        let projected = covered * ahead / (self.finished + 1);
        (self.done_before + done, covered + projected)
    }
}

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    super::common::check_option_lists(&args.options)?;
    if args.options.is_empty() {
        eprintln!(
            "{}: Must specify options (-o)\nTry '{} amend --help' for more info",
            ctx.prog,
            super::invoked_as(ctx.prog)
        );
        return Ok(1);
    }
    let items = option_items(&args.options);
    let help = super::opthelp::has_help_option(&args.options);
    if help {
        // A format given lists its options without the image being opened.
        if let Some(f) = &args.format {
            return print_help(f);
        }
    }
    let [path] = args.filenames.as_slice() else {
        bail!("Expecting one image file name");
    };
    // qemu-img starts its progress before opening the image: a failure from here
    // on still ends the line.
    let bar = QemuSteps::milestones(args.progress && !args.quiet, 1.0, Vec::new());
    super::common::check_cache_mode(args.cache.as_deref(), false)?;
    let spec = args.naming.writable_spec(path, args.format.as_deref())?;
    super::imgname::refuse_backing_nodes(&spec)?;
    let format = spec_format(&spec)?;
    warn_probed_raw(&spec);
    if help {
        if format == Format::Luks && spec.protocol_driver.is_none() {
            // qemu-img opens the image, with its secret, before it lists.
            strata_chain::open_top(&spec, Format::Luks, true)
                .map_err(|e| super::common::open_error(&spec.path, &spec.shown_name(), &e))?;
        }
        return print_help(spec.protocol_driver.as_deref().unwrap_or(format.name()));
    }
    if format == Format::Luks && spec.protocol_driver.is_none() {
        let result = super::amend_luks::run(&items, &spec, args.force, &bar);
        bar.end();
        return result.or_else(|e| {
            eprint!("{}: {e}", ctx.prog);
            Ok(1)
        });
    }
    if format != Format::Qcow2 {
        bail!(
            "Format driver '{}' does not support option amendment",
            spec.protocol_driver.as_deref().unwrap_or(format.name())
        );
    }
    // As qemu-img: the image opens, with its backing chain, before the
    // options are read.
    let mut img = open_qcow2(&spec, true)?;
    // Kept attached: a size growing over a longer backing file zeroes the
    // range, so the backing file's bytes do not show through (as resize).
    strata_chain::attach_backing(&spec, &img, true)
        .map_err(|e| super::common::open_error(&spec.path, &spec.shown_name(), &e))?;
    let req = parse_request(&items)?;
    super::amend_keys::check_numbers(&req.encrypt, "encrypt.")?;
    // As qemu-img: the progress starts before the format judges the values, so
    // a refused value still shows 0% and 100%.
    bar.set(0.0);
    let judged = (|| -> Result<Option<_>> {
        if !req.encrypt.is_empty() && img.encryption().is_none() {
            bail!("Can't amend encryption options - encryption not present");
        }
        judge_values(&items, &img)?;
        if req.encrypt.is_empty() {
            return Ok(None);
        }
        Ok(Some(super::amend_keys::request(&req.encrypt)?))
    })()
    .map_err(|e| format!("{e}\n"));
    let h = img.header();
    let steps = req.amend.steps(h.version, h.refcount_order).len() as u64;
    // As qemu-img: the key slots change before the format's other options.
    let result = judged.and_then(|keys| {
        match &keys {
            Some(k) => change_key_slots(KeyImage::Qcow2(&mut img), &spec, k, args.force),
            None => Ok(()),
        }
        .and_then(|()| amend(img, &req, steps, &bar).map_err(|e| format!("{e}\n")))
    });
    bar.set(100.0);
    match result {
        Ok(()) => {
            bar.end();
            Ok(0)
        }
        Err(e) => {
            eprint!("{}: {e}", ctx.prog);
            Ok(1)
        }
    }
}

/// An image whose LUKS key slots an amend changes.
pub(super) enum KeyImage<'a> {
    Qcow2(&'a mut Qcow2Image),
    Luks(&'a strata_format::luks::LuksImage),
}

/// Add or erase key slots as `req` asks, with the secret the image opened
/// with. The error is the text qemu-img prints after its name: a refusal ends
/// with a newline, a failed write with QEMU's hint, which does not.
pub(super) fn change_key_slots(
    img: KeyImage<'_>,
    spec: &strata_chain::OpenSpec,
    req: &strata_format::crypto::keyslots::KeySlotRequest,
    force: bool,
) -> Result<(), String> {
    use strata_format::qcow2::key_slots::KeySlotError;
    let unlock = match spec.unlock() {
        Ok(strata_format::qcow2::Unlock::Secret(s)) => s,
        Ok(u) => match u.secret(strata_format::crypto::key_required) {
            Ok(s) => s.clone(),
            Err(e) => return Err(format!("{}\n", e.message())),
        },
        Err(e) => return Err(format!("{e}\n")),
    };
    let secret = |id: &str| {
        spec.secrets.get(id).cloned().ok_or_else(|| {
            strata_format::Error::invalid_argument(format!("No secret with id '{id}'"))
        })
    };
    match img {
        KeyImage::Qcow2(q) => q.change_key_slots(req, &unlock, &secret, force),
        KeyImage::Luks(l) => l.change_key_slots(req, &unlock, &secret, force),
    }
    .map_err(|e| match e {
        KeySlotError::Refused(e) => format!("{}\n", e.message()),
        KeySlotError::Failed { message, .. } => message,
    })
}

/// Print the `-o help` listing of the format driver `fmt`.
fn print_help(fmt: &str) -> Result<i32> {
    print!("{}", super::opthelp::amend_help(fmt)?);
    Ok(0)
}

/// In qemu-img's order (see [`Qcow2Image::amend_with`]): the upgrade and the
/// refcount width change, then the data file and the backing file check (a
/// backing file or format other than the current one is refused), lazy
/// refcounts, the size (a plain resize), and the downgrade last, which closes
/// the image. A refusal leaves the steps before it done, as qemu-img does.
fn amend(img: Qcow2Image, req: &Request, steps: u64, bar: &QemuSteps) -> Result<(), String> {
    let mut spread = StepProgress {
        steps,
        finished: 0,
        done_before: 0,
        last: None,
    };
    let mut progress = |step, done, total| {
        let (d, t) = spread.report(step, done, total);
        bar.set_fraction(d, t);
    };
    let mut between = |point, img: &Qcow2Image| -> Result<(), Refusal> {
        match point {
            AmendPoint::AfterRefcounts => {
                if req.data_file.is_some() || req.data_file_raw.is_some() {
                    img.amend_data_file(req.data_file.as_deref(), req.data_file_raw)?;
                }
                check_backing(img, req).map_err(Refusal::Said)
            }
            AmendPoint::BeforeDowngrade => match req.size {
                Some(size) => Ok(img.resize(size, true)?),
                None => Ok(()),
            },
        }
    };
    img.amend_with(&req.amend, &mut progress, &mut between)
        .map_err(|e| match e {
            Refusal::Said(s) => s,
            Refusal::Format(e) => match super::snapshot::bad_snapshot_l1(&e) {
                // The zero-cluster expansion of a downgrade reads every snapshot's
                // L1 table: qemu-img reports the bad one, then the failed expansion.
                Some((msg, errno)) => {
                    let prog = super::common::PROG.get().copied().unwrap_or("strata img");
                    format!("{msg}\n{prog}: Failed to turn zero into data clusters: {errno}")
                }
                None => e.message().to_string(),
            },
        })
}

/// Why an amend stopped: the format's error, or a refusal in qemu-img's words.
enum Refusal {
    Format(strata_format::Error),
    Said(String),
}

impl From<strata_format::Error> for Refusal {
    fn from(e: strata_format::Error) -> Self {
        Refusal::Format(e)
    }
}

/// Only a request that names the current backing file and format passes:
/// changing them is rebase's work.
fn check_backing(img: &Qcow2Image, req: &Request) -> Result<(), String> {
    if req.backing_file.is_some() || req.backing_fmt.is_some() {
        // Only a request that names the current backing file and format passes:
        // changing them is rebase's work.
        let h = img.header();
        let name = h.backing_file.as_deref().and_then(|n| n.to_str());
        if req.backing_file.as_deref() != name
            || req.backing_fmt.as_deref() != h.backing_format.as_deref()
        {
            return Err(
                "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_step_starts_past_the_first_steps_work() {
        let mut s = StepProgress {
            steps: 2,
            finished: 0,
            done_before: 0,
            last: None,
        };
        assert_eq!(s.report(AmendStep::Upgrade, 1, 2), (1, 4));
        assert_eq!(s.report(AmendStep::RefcountWidth, 0, 30), (2, 32));
        assert_eq!(s.report(AmendStep::RefcountWidth, 30, 30), (32, 32));
    }
}
