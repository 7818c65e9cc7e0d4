//! `strata img dd`: copy a byte range of an image into a new image with dd's
//! operands (`if=`, `of=`, `bs=`, `count=`, `skip=`), as qemu-img dd does: the
//! output (`-O`, raw by default) is created anew, `count` blocks are counted from
//! the start of the input (the skipped ones included), and every block is
//! written, zeroes too.

use super::common::{open_chain, size_arg, Ctx};
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};
use strata_format::Format;

#[derive(clap::Args)]
pub struct Args {
    /// `--object` definitions and `--image-opts`.
    #[command(flatten)]
    naming: super::imgname::Naming,
    /// Input format (probed when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Output format (raw by default).
    #[arg(short = 'O', long = "output-format", value_name = "OUTPUT_FMT")]
    output_format: Option<String>,
    /// Open the input read-only even if another program writes it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Operands: if=INPUT of=OUTPUT [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS].
    operands: Vec<String>,
}

/// The operands as given.
#[derive(Debug, Default, PartialEq, Eq)]
struct Operands {
    input: Option<String>,
    output: Option<String>,
    bs: u64,
    count: Option<u64>,
    skip: u64,
}

fn parse(operands: &[String]) -> Result<Operands> {
    let mut o = Operands {
        bs: 512,
        ..Default::default()
    };
    for op in operands {
        let Some((k, v)) = op.split_once('=') else {
            bail!("unrecognized operand {op}");
        };
        match k {
            "if" => o.input = Some(v.to_string()),
            "of" => o.output = Some(v.to_string()),
            "bs" => {
                let bs = size_arg("bs", v).map_err(|e| {
                    if e.to_string().ends_with("9223372036854775807.") {
                        anyhow!("Invalid bs specified. Must be between 1 and 2147483647.")
                    } else {
                        e
                    }
                })?;
                if bs == 0 || bs > i32::MAX as u64 {
                    bail!("Invalid bs specified. Must be between 1 and 2147483647.");
                }
                o.bs = bs;
            }
            "count" => o.count = Some(block_count("count", v)?),
            "skip" => o.skip = block_count("skip", v)?,
            _ => bail!("unrecognized operand {k}"),
        }
    }
    Ok(o)
}

/// `s` read as C's `strtoll` reads it in base 0 (leading blanks, a sign, then
/// decimal, `0x` hexadecimal or `0` octal digits; no size suffix) with nothing
/// left over: `None` if it is not such a number; a value past `i64`'s range
/// reads as `i128::MAX`.
pub(super) fn c_integer(s: &str) -> Option<i128> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => (16, h),
        None if t.len() > 1 && t.starts_with('0') => (8, &t[1..]),
        None => (10, t),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    Some(match u64::from_str_radix(digits, radix) {
        Ok(v) if v <= i64::MAX as u64 && neg => -(v as i128),
        Ok(v) if v <= i64::MAX as u64 => v as i128,
        _ => i128::MAX,
    })
}

/// A `count=` or `skip=` value: a plain integer ([`c_integer`]) from 0 to
/// `i64::MAX`, refused with qemu-img's messages.
fn block_count(what: &str, s: &str) -> Result<u64> {
    match c_integer(s) {
        None => bail!("Invalid {what} specified: '{s}'."),
        Some(v) if (0..=i64::MAX as i128).contains(&v) => Ok(v as u64),
        Some(_) => {
            bail!("Invalid {what} specified. Must be between 0 and 9223372036854775807.")
        }
    }
}

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    let o = parse(&args.operands)?;
    let (Some(input), Some(output)) = (&o.input, &o.output) else {
        bail!("Must specify both input and output files");
    };
    let input_path = PathBuf::from(input);
    let spec = args
        .naming
        .spec(&input_path, args.format.as_deref(), args.force_share)?;
    let chain = open_chain(&spec)?;
    // qemu-img looks the output format up once the input is open.
    let out_format = match &args.output_format {
        None => Format::Raw,
        Some(f) => super::imgname::output_format(f).map_err(|_| {
            anyhow!(super::imgname::creation_refusal(f).unwrap_or("Unknown file format".into()))
        })?,
    };
    if super::imgname::cdrom_without_medium(&spec) {
        bail!("Failed to get size for '{}'", spec.shown_name());
    }
    let reader = chain.reader();
    let mut size = reader.virtual_size();
    if let Some(count) = o.count {
        size = size.min(count.saturating_mul(o.bs));
    }
    let mut start = o.skip.saturating_mul(o.bs);
    if start > size {
        eprintln!("{}: {input}: cannot skip to specified offset", ctx.prog);
        start = size;
    }
    let on_export = super::nbdname::names_export(output, None);
    let out_path = if on_export {
        PathBuf::from(output)
    } else {
        super::imgname::output_path(Path::new(output))?
    };
    let request = strata_jobs::create::CreateRequest {
        path: out_path.clone(),
        format: out_format,
        size: Some(size - start),
        options: Default::default(),
        unsafe_backing: false,
    };
    let create_failed = |e: strata_jobs::Error| {
        let msg = e.to_string();
        let msg = msg.strip_prefix(&format!("{output}: ")).unwrap_or(&msg);
        anyhow!("{output}: error while creating output image: {msg}")
    };
    let out = if on_export {
        // An NBD export is formatted in place, within its size.
        let device = super::nbdname::open_device(output, &args.naming.objects.objects()?)
            .map_err(|e| anyhow!("{output}: error while creating output image: {e}"))?;
        if out_format == Format::Raw {
            super::nbdname::check_fits(&device, size - start)
                .map_err(|e| anyhow!("{output}: error while creating output image: {e}"))?;
        }
        strata_jobs::create::prepare(&request)
            .and_then(|p| p.create_on(device.clone()))
            .map_err(create_failed)?;
        let unlock = strata_format::qcow2::Unlock::None;
        strata_chain::open_storage(device, out_format, true, false, &unlock)?
    } else {
        strata_jobs::create::create(&request).map_err(create_failed)?;
        strata_chain::open_image(&out_path, out_format, true, false)?
    };
    let mut buf = vec![0u8; o.bs.min(size - start).max(1) as usize];
    let mut pos = start;
    while pos < size {
        let n = (size - pos).min(o.bs) as usize;
        // A failed read (storage, or data that does not decompress) is worded
        // as qemu-img's dd words it.
        reader.read(&mut buf[..n], pos).map_err(|e| {
            let e = anyhow::Error::new(e);
            match super::ioerr::io_failure(&e) {
                Some(f) => anyhow::anyhow!("error while reading from input image file: {}", f.os),
                None => e,
            }
        })?;
        out.write(&buf[..n], pos - start)?;
        pos += n as u64;
    }
    out.flush()?;
    if let Some(q) = out
        .as_any()
        .downcast_ref::<strata_format::qcow2::Qcow2Image>()
    {
        q.close()?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(a: &[&str]) -> Result<Operands> {
        parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn operands_parse_with_dd_defaults_and_qemu_img_refusals() {
        let o = ops(&["if=a", "of=b", "bs=64k", "count=3", "skip=1"]).unwrap();
        assert_eq!((o.bs, o.count, o.skip), (65536, Some(3), 1));
        assert_eq!(ops(&["if=a"]).unwrap().bs, 512);
        let err = |a: &[&str]| ops(a).unwrap_err().to_string();
        assert_eq!(err(&["foo=1"]), "unrecognized operand foo");
        assert_eq!(err(&["a.qcow2"]), "unrecognized operand a.qcow2");
        assert_eq!(
            err(&["bs=0"]),
            "Invalid bs specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            err(&["bs=3G"]),
            "Invalid bs specified. Must be between 1 and 2147483647."
        );
        assert_eq!(err(&["bs=abc"]), "Invalid bs specified: 'abc'.");
    }
}
