//! `strata img map`: how guest ranges are stored, through the whole backing chain
//! (text and `--output=json`, as qemu-img prints them).

use super::common::{open_chain, size_arg, Ctx, OutputFormat};
use anyhow::{bail, Result};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use strata_jobs::map::{map, map_runs, MapEntry};
use strata_jobs::status::ChainStatus;
use strata_jobs::Cancel;

#[derive(clap::Args)]
pub struct Args {
    /// `--object` definitions and `--image-opts`.
    #[command(flatten)]
    naming: super::imgname::Naming,
    /// Image format (probed from the top image when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Output format (`json` adds zero/unallocated runs and the chain depth).
    #[arg(long = "output", value_name = "OFMT")]
    output: Option<String>,
    /// Start mapping at this guest offset.
    #[arg(
        short = 's',
        long = "start-offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    start_offset: Option<String>,
    /// Map at most this many bytes.
    #[arg(
        short = 'l',
        long = "max-length",
        value_name = "LENGTH",
        allow_hyphen_values = true
    )]
    max_length: Option<String>,
    /// Open without locks, to inspect an image in use.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image (exactly one; the count is checked after the option values).
    #[arg(value_name = "FILENAME")]
    files: Vec<std::ffi::OsString>,
}

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    let try_help = format!(
        "Try '{} map --help' for more info",
        super::invoked_as(ctx.prog)
    );
    // qemu-img judges each value as its option loop meets it: `getopt::refusal`
    // has already refused the first bad one in the order typed.
    let output = match args.output.as_deref() {
        None | Some("human") => OutputFormat::Human,
        Some("json") => OutputFormat::Json,
        Some(o) => bail!("--output expects 'human' or 'json' not '{o}'\n{try_help}"),
    };
    let start = args
        .start_offset
        .as_deref()
        .map_or(Ok(0), |s| size_arg("start offset", s))?;
    let max_len = args
        .max_length
        .as_deref()
        .map(|s| size_arg("max length", s))
        .transpose()?;
    let [file] = args.files.as_slice() else {
        bail!("Expecting one image file name\n{try_help}");
    };
    let file = PathBuf::from(file);
    map_image(&args, &file, output, start, max_len).map_err(|e| {
        match super::ioerr::io_failure(&e) {
            Some(f) => anyhow::anyhow!("Could not read file metadata: {}", f.os),
            None => e,
        }
    })
}

fn map_image(
    args: &Args,
    file: &std::path::Path,
    output: OutputFormat,
    start: u64,
    max_len: Option<u64>,
) -> Result<i32> {
    let (spec, nbd) = args
        .naming
        .spec_nbd(file, args.format.as_deref(), args.force_share)?;
    // A filter over a format node maps as that node, into its file: the
    // node's whole chain when the filter is the image, the node alone (its
    // own allocation) when a raw image above the filter passes block status down.
    let (spec, node_only) = match &spec.filtered {
        Some(inner) => {
            // The image above the filter opens (its format is right) first.
            drop(open_chain(&spec)?);
            let mut inner = (**inner).clone();
            inner.force_share |= spec.force_share;
            (inner, spec.protocol_driver.is_none())
        }
        None => (spec, false),
    };
    let chain = open_chain(&spec)?;
    // A raw image on an NBD export maps as the server's block status says.
    let nbd = nbd.filter(|_| chain.layers[0].format == strata_format::Format::Raw);
    // File names, printed as the bytes they are (they need not be UTF-8); a layer
    // with an external data file maps into that file, named as it was opened (as
    // the image records it, or as the options named it). A blkdebug filter
    // under a format is the file that format maps into, except under raw,
    // whose block status passes through the filter to the file beneath.
    let top_name = super::blkdebug::node_name(&spec)
        .filter(|_| chain.layers[0].format != strata_format::Format::Raw)
        .map(String::into_bytes);
    let top_name = top_name
        .as_deref()
        .unwrap_or(spec.path.as_os_str().as_bytes());
    let names: Vec<Vec<u8>> = std::iter::once(top_name)
        .chain(
            chain.layers[1..]
                .iter()
                .zip(&chain.layers)
                .map(|(l, above)| {
                    // A backing export is named as it reports itself.
                    if strata_chain::is_protocol_name(&l.path) {
                        return l.path.as_os_str().as_bytes();
                    }
                    above
                        .backing_path
                        .as_ref()
                        .map_or(&b""[..], |p| p.as_os_str().as_bytes())
                }),
        )
        .zip(&chain.layers)
        .map(|(name, layer)| {
            layer
                .device
                .as_any()
                .downcast_ref::<strata_format::qcow2::Qcow2Image>()
                .and_then(|img| {
                    let opened = img.data_file_storage().and_then(|s| s.path());
                    opened
                        .map(|p| p.as_os_str().as_bytes().to_vec())
                        .or_else(|| img.data_file_name())
                })
                .unwrap_or_else(|| name.to_vec())
        })
        .collect();
    let status = match node_only {
        true => ChainStatus::top_layer(&chain)?,
        false => ChainStatus::new(&chain)?,
    };
    // A drive without a medium has no length: qemu-img has begun its listing.
    let no_medium = super::imgname::cdrom_without_medium(&spec);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let json = output == OutputFormat::Json;
    if json {
        write!(out, "[")?;
    } else {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )?;
    }
    if no_medium {
        out.flush()?;
        bail!("Failed to get size for '{}'", spec.shown_name());
    }
    // A vmdk's extents may be files of their own: data there maps into them.
    let vmdk_file = |depth: usize, offset: u64| {
        chain.layers[depth]
            .device
            .as_any()
            .downcast_ref::<strata_format::vmdk::VmdkImage>()
            .and_then(|v| v.extent_file_at(offset))
            .map(|p| p.as_os_str().as_bytes().to_vec())
    };
    let mut first = true;
    let mut failure = None;
    let emit = |e: &MapEntry| {
        if json {
            if !first {
                writeln!(out, ",").map_err(io_err)?;
            }
            write!(out, "{}", json_entry(e)).map_err(io_err)?;
        } else if e.data {
            let Some(off) = e.offset else {
                failure = Some("File contains external, encrypted or compressed clusters.");
                return Err(strata_jobs::Error::Cancelled);
            };
            if !e.zero {
                write!(
                    out,
                    "{:<16}{:<16}{:<16}",
                    hex(e.start),
                    hex(e.length),
                    hex(off),
                )
                .and_then(|()| match vmdk_file(e.depth, e.start) {
                    Some(f) => out.write_all(&f),
                    None => out.write_all(&names[e.depth]),
                })
                .and_then(|()| out.write_all(b"\n"))
                .map_err(io_err)?;
            }
        }
        first = false;
        Ok(())
    };
    let cancel = Cancel::default();
    let res = match nbd {
        Some(s) => map_runs(
            status.virtual_size(),
            start,
            max_len,
            &cancel,
            emit,
            |off, len| super::nbdname::map_entry(&s, off, len),
        ),
        None => map(&status, start, max_len, &cancel, emit),
    };
    if let Some(msg) = failure {
        out.flush()?;
        bail!("{msg}");
    }
    res?;
    if json {
        writeln!(out, "]")?;
    }
    out.flush()?;
    Ok(0)
}

fn io_err(e: std::io::Error) -> strata_jobs::Error {
    strata_jobs::Error::Invalid(format!("Could not write the map: {e}"))
}

/// C's `%#x`: `0` for zero, `0x...` otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// One entry in qemu-img's JSON map line format.
fn json_entry(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}
