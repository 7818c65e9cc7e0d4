//! Helpers shared by the `strata img` subcommands: sizes, `-o` options, output modes.

use anyhow::{anyhow, Result};
use std::collections::BTreeMap;

/// Per-invocation context.
pub struct Ctx {
    /// How the program names itself in messages ("qemu-img" or "strata img").
    pub prog: &'static str,
}

impl Ctx {
    /// Print an error the way qemu-img does: `prog: message` on stderr.
    pub fn error(&self, e: &anyhow::Error) {
        let mut msg = engine_text(e.as_ref());
        for cause in e.chain().skip(1) {
            let c = match cause.downcast_ref::<std::io::Error>() {
                Some(io) => strata_storage::os_message(io),
                None => cause.to_string(),
            };
            if !msg.contains(&c) {
                msg.push_str(": ");
                msg.push_str(&c);
                msg.push_str(&advice(cause).unwrap_or_default());
            }
        }
        eprintln!("{}: {}", self.prog, msg);
    }
}

/// What the CLI says after an engine error of some kinds: the advice the
/// engine's messages leave to the interface, worded for this command line.
fn advice(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let chain = e
        .downcast_ref::<strata_chain::Error>()
        .or_else(|| {
            e.downcast_ref::<strata_jobs::Error>()
                .and_then(strata_jobs::Error::chain_error)
        })
        .or_else(|| {
            e.downcast_ref::<strata_nbd::Error>()
                .and_then(strata_nbd::Error::chain_error)
        });
    if let Some((image, backing)) = chain.and_then(strata_chain::Error::unknown_backing_format) {
        return Some(format!(
            "\nGive it with -F FMT, or record it with 'strata img rebase -u -b {backing} -F FMT {}'",
            image.display()
        ));
    }
    if let Some(strata_jobs::Error::CannotEmpty(_)) = e.downcast_ref() {
        return Some("; use -d to keep it".into());
    }
    None
}

/// An engine error as the CLI prints it: its text, then the advice for its kind.
pub fn engine_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    s.push_str(&advice(e).unwrap_or_default());
    s
}

/// The chain-opening spec for a user-named image: `-f` parsed, `-U` applied.
pub fn open_spec(
    path: &std::path::Path,
    format: Option<&str>,
    force_share: bool,
) -> Result<strata_chain::OpenSpec> {
    let format = format
        .map(|f| f.parse::<strata_format::Format>())
        .transpose()?;
    Ok(strata_chain::OpenSpec::new(path)
        .format(format)
        .force_share(force_share))
}

/// qemu-img's warning when the raw image `spec` names (a file or an NBD
/// export) is opened for writing without `-f`.
pub fn warn_probed_raw(spec: &strata_chain::OpenSpec) {
    if spec.format.is_none()
        && strata_chain::probe_spec(spec).ok() == Some(strata_format::Format::Raw)
    {
        // A blkdebug filter's node is named after it (`blkdebug:CONFIG:FILE`).
        match super::blkdebug::node_name(spec) {
            Some(name) => warn_guessed_raw(std::path::Path::new(&name)),
            None => warn_guessed_raw(&spec.path),
        }
    }
}

/// qemu-img's warning that probing guessed raw for the image `path` names.
pub fn warn_guessed_raw(path: &std::path::Path) {
    eprintln!(
        "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions.",
        path.display()
    );
}

/// Probe `path`'s format; a file that cannot be read gets qemu-img's twice-said
/// "Could not open" message.
pub fn probe_format(path: &std::path::Path) -> Result<strata_format::Format> {
    strata_chain::probe_format(path).map_err(|e| {
        let p = path.display();
        let os = match std::fs::metadata(path) {
            Err(io) => strata_storage::os_message(&io),
            Ok(_) => e.to_string(),
        };
        anyhow!("Could not open '{p}': Could not open '{p}': {os}")
    })
}

/// The format of the image `spec` names: given, or probed from its file or
/// NBD export (see [`probe_format`]).
pub fn spec_format(spec: &strata_chain::OpenSpec) -> Result<strata_format::Format> {
    match (spec.format, &spec.storage, &spec.blkdebug) {
        (Some(f), _, _) => Ok(f),
        (None, Some(_), _) | (None, None, Some(_)) => strata_chain::probe_spec(spec)
            .map_err(|e| open_error(&spec.path, &spec.shown_name(), &e)),
        (None, None, None) => probe_format(&spec.path),
    }
}

/// Open the image `spec` names as a qcow2 image on its own (no backing file
/// attached), for writing (locked as QEMU locks it) or reading; an encrypted one
/// with the secret its options name.
pub fn open_qcow2(
    spec: &strata_chain::OpenSpec,
    write: bool,
) -> Result<strata_format::qcow2::Qcow2Image> {
    let path = spec.path.as_path();
    let unlock = spec
        .unlock()
        .map_err(|e| open_error(path, &spec.shown_name(), &e))?;
    let opts = if write {
        strata_storage::OpenOptions::write()
    } else {
        strata_storage::OpenOptions::read()
    };
    let storage: std::sync::Arc<dyn strata_storage::Storage> = match (&spec.blkdebug, &spec.storage)
    {
        (None, None) => std::sync::Arc::new(
            strata_storage::FileStorage::open(path, opts)
                .map_err(|e| anyhow!("Could not open '{}': {e}", spec.shown_name()))?,
        ),
        _ => strata_chain::top_storage(spec, write)
            .map_err(|e| open_error(path, &spec.shown_name(), &e))?,
    };
    strata_chain::open_qcow2_on(
        spec,
        storage,
        strata_format::qcow2::Qcow2OpenOptions {
            read_only: !write,
            unlock,
            ..Default::default()
        },
    )
    .map_err(|e| match e {
        strata_chain::Error::Format(e) => {
            anyhow!("Could not open '{}': {}", spec.shown_name(), e.message())
        }
        e => open_error(path, &spec.shown_name(), &e),
    })
}

/// Open the image `spec` names on its own (no backing file attached), with the
/// secret its options name, a failure worded as qemu-img words a failed open.
/// Its backing chain is opened too and closed again (see [`verify_backing`]):
/// qemu-img opens the image with its chain, and fails as the chain fails.
pub fn open_top(
    spec: &strata_chain::OpenSpec,
    format: strata_format::Format,
    write: bool,
) -> Result<std::sync::Arc<dyn strata_format::BlockDevice>> {
    let dev = strata_chain::open_top(spec, format, write)
        .map_err(|e| open_error(&spec.path, &spec.shown_name(), &e))?;
    verify_backing(spec, dev.as_ref(), write)?;
    Ok(dev)
}

/// Refuse the image `spec` names, held open as `top` (for writing when
/// `written`), when its backing chain does not open, in qemu-img's words:
/// a backing file gone or unreadable, or a chain that loops back to a top held
/// for writing (its own lock refuses it). Nothing is written; see
/// [`strata_chain::verify_backing`].
pub fn verify_backing(
    spec: &strata_chain::OpenSpec,
    top: &dyn strata_format::BlockDevice,
    written: bool,
) -> Result<()> {
    strata_chain::verify_backing(spec, top, written)
        .map_err(|e| open_error(&spec.path, &spec.shown_name(), &e))
}

/// Open an image and (unless the spec says not to) its chain, with qemu-img's
/// "Could not open 'FILE': reason" message on failure.
pub fn open_chain(spec: &strata_chain::OpenSpec) -> Result<strata_chain::Chain> {
    strata_chain::open(spec).map_err(|e| open_error(&spec.path, &spec.shown_name(), &e))
}

/// qemu-img's "Could not open 'NAME': reason" for a failure to open `path`'s
/// chain, the image named as the user named it (a layer refusing its reopen
/// for writing, [`strata_chain::Error::ProtocolReopen`], says its reason alone).
pub fn open_error(path: &std::path::Path, name: &str, e: &strata_chain::Error) -> anyhow::Error {
    // A layer that opened but refuses to be reopened for writing (a read-only
    // NBD export committed into): QEMU's reopen failure names no image.
    if let strata_chain::Error::ProtocolReopen { message, .. } = e {
        return anyhow!("{message}");
    }
    // The engine's message names the file too; say it once.
    let path = path.display().to_string();
    let msg = engine_text(e);
    let msg = msg.strip_prefix(&format!("{path}: ")).unwrap_or(&msg);
    anyhow!("Could not open '{name}': {msg}")
}

/// A job's error on the image `path`: failures to open its chain worded as
/// [`open_chain`] words them, the rest as the job says.
pub fn job_error(path: &std::path::Path, e: strata_jobs::Error) -> anyhow::Error {
    match e {
        strata_jobs::Error::Chain(c) => open_error(path, &path.display().to_string(), &c),
        e => e.into(),
    }
}

/// `--output=human|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    #[default]
    Human,
    Json,
}

/// An image size argument (`create`'s size, `measure --size`), refused as
/// [`size_arg`] refuses it.
pub fn image_size(s: &str) -> Result<u64> {
    size_arg("image size", s)
}

/// A size argument named `what` ("image size", "start offset"...), refused with
/// qemu-img's two messages: out of range for a well-formed number (too large, or a
/// negative number of bytes), invalid for anything else.
pub fn size_arg(what: &str, s: &str) -> Result<u64> {
    if let Some(v) = strata_jobs::create::parse_size(s) {
        return Ok(v);
    }
    if strata_jobs::create::size_out_of_range(s) {
        Err(anyhow!(
            "Invalid {what} specified. Must be between 0 and 9223372036854775807."
        ))
    } else {
        Err(anyhow!("Invalid {what} specified: '{s}'."))
    }
}

/// A size given as an option value (`resize`'s size, after its sign): any value
/// below 2^64, as QEMU's option parser reads it, refused with its messages.
pub fn option_size(key: &str, s: &str) -> Result<u64> {
    if let Some(v) = strata_jobs::create::parse_size_u64(s) {
        return Ok(v);
    }
    Err(anyhow!(
        "{}",
        strata_jobs::create::option_size_error(key, s)
    ))
}

/// Refuse a `-t` (`source` false) or `-T` (`source` true) value that names no
/// cache mode QEMU knows, in qemu-img's words; strata itself always reads and
/// writes through the page cache.
pub fn check_cache_mode(mode: Option<&str>, source: bool) -> Result<()> {
    match mode {
        Some(c) if !super::convert::is_cache_mode(c) => {
            let what = if source { "source cache" } else { "cache" };
            anyhow::bail!("Invalid {what} option: {c}")
        }
        _ => Ok(()),
    }
}

/// `-r RATE` as qemu-img reads it: a size with an optional suffix, in bytes/s.
pub fn parse_rate(r: Option<&str>) -> Result<u64> {
    let Some(r) = r else { return Ok(0) };
    match strata_jobs::create::parse_size(r) {
        Some(v) if v <= i64::MAX as u64 => Ok(v),
        _ if r.trim_start().starts_with('-') || r.parse::<f64>().is_ok() => {
            anyhow::bail!(
                "Invalid rate limit specified. Must be between 0 and 9223372036854775807."
            )
        }
        _ => anyhow::bail!("Invalid rate limit specified: '{r}'."),
    }
}

/// Parse repeated `-o key=value,key2=value2` options (commas inside values are
/// written `,,` as in QEMU). Later values win.
pub fn parse_options(opts: &[String]) -> Result<BTreeMap<String, String>> {
    check_option_lists(opts)?;
    Ok(option_items(opts).into_iter().collect())
}

/// Refuse an `-o` argument qemu-img refuses as it reads it: empty, starting with
/// a comma, or ending in an odd number of commas (an escaped comma is two).
pub fn check_option_lists(opts: &[String]) -> Result<()> {
    for o in opts {
        let trailing = o.len() - o.trim_end_matches(',').len();
        if o.is_empty() || o.starts_with(',') || trailing % 2 == 1 {
            anyhow::bail!("Invalid option list: {o}");
        }
    }
    Ok(())
}

/// The `key=value` items of repeated `-o` options in the order given (a key
/// without a value is `on`, `noKEY` is `KEY` off).
pub fn option_items(opts: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for o in opts {
        for item in split_items(o) {
            match item.split_once('=') {
                Some((k, v)) => out.push((k.to_string(), v.to_string())),
                // A bare item is a boolean: `KEY` is on, `noKEY` off (`no`
                // alone the empty key), as QEMU's option parser reads it.
                None => match item.strip_prefix("no") {
                    Some(k) => out.push((k.to_string(), "off".to_string())),
                    None => out.push((item, "on".to_string())),
                },
            }
        }
    }
    out
}

/// The items of a QEMU option list: split at single commas (`,,` is a comma
/// inside an item); empty items are left out.
pub fn split_items(list: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items.retain(|i| !i.is_empty());
    items
}

/// QEMU's human-readable size: three significant digits and a binary unit
/// ("192 KiB", "1 GiB", "1.5 MiB").
pub fn human_size(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // Same unit choice as QEMU: the unit in which the value is below 1000.
    let x = val as f64 / (1000.0 / 1024.0);
    let exp = if x == 0.0 {
        0
    } else {
        x.log2().floor() as i32 + 1
    };
    let i = (((exp - 1).max(0)) / 10).min(6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i])
}

/// C's `%0.3g`: three significant digits, trailing zeroes trimmed.
pub fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let exp = v.abs().log10().floor() as i32;
    if !(-5..3).contains(&exp) {
        // Scientific form, as %g switches to it.
        let s = format!("{:.2e}", v);
        let (mant, e) = s.split_once('e').expect("e");
        let mant = mant.trim_end_matches('0').trim_end_matches('.');
        let e: i32 = e.parse().expect("exp");
        return format!("{mant}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    let s = format!("{:.*}", decimals, v);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The program's name as its messages begin (`qemu-img`, `strata img`), for
/// code that runs without the command's context; set once as a command starts.
pub static PROG: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Print `PROG: warning: MESSAGE` on stderr, as qemu-img prints a warning.
pub fn warn(message: &str) {
    let prog = PROG.get().copied().unwrap_or("strata img");
    eprintln!("{prog}: warning: {message}");
}

/// clap's parser for an image's file name: any string, the empty one
/// included. clap's own `PathBuf` parser refuses an empty value as a missing
/// one; qemu-img takes `''` and fails only when it opens (or creates) it.
pub fn any_file_name() -> clap::builder::ValueParser {
    use clap::builder::TypedValueParser;
    clap::builder::ValueParser::new(
        clap::builder::OsStringValueParser::new().map(std::path::PathBuf::from),
    )
}

/// The name QEMU makes up for a node opened without one (`#block` then a
/// counter, `n` for the `n`th node named, then two random digits), which its
/// messages give where the image has no name of its own: a new name each run,
/// as in qemu-img.
pub fn generated_node_name(n: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % 100;
    format!("#block{n}{random:02}")
}

/// An option map from `(key, value)` pairs, for the tests of option parsing.
#[cfg(test)]
pub fn option_map(list: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(image_size("1G").unwrap(), 1 << 30);
        assert_eq!(image_size("512").unwrap(), 512);
        assert_eq!(image_size("64k").unwrap(), 65536);
        assert_eq!(image_size("1.5M").unwrap(), 3 << 19);
        assert!(image_size("12Q").is_err());
        assert!(image_size("99999999999E").is_err());
    }

    #[test]
    fn human_sizes_match_qemu_img() {
        assert_eq!(human_size(196608), "192 KiB");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(3 << 19), "1.5 MiB");
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1000), "0.977 KiB");
        assert_eq!(human_size(999), "999 B");
    }

    #[test]
    fn options_split_on_commas_with_escapes() {
        let o = parse_options(&[
            "cluster_size=4k,lazy_refcounts".into(),
            "backing_file=a,,b".into(),
        ])
        .unwrap();
        assert_eq!(o["cluster_size"], "4k");
        assert_eq!(o["lazy_refcounts"], "on");
        assert_eq!(o["backing_file"], "a,b");
    }
}
