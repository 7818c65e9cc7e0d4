//! `strata img bench`: time a run of read or write requests of one size at a
//! stepping offset, with qemu-img bench's flags, refusals and output lines.

use super::common::{open_chain, size_arg, Ctx};
use anyhow::{anyhow, bail, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The image argument is an option list (`driver=...,file.filename=PATH`).
    /// qemu-img bench takes no `--object`, so it cannot unlock an encrypted
    /// image: neither can this.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Number of requests (default 75000).
    #[arg(
        short = 'c',
        long = "count",
        value_name = "COUNT",
        allow_hyphen_values = true
    )]
    count: Option<String>,
    /// Requests in flight at once (default 64).
    #[arg(
        short = 'd',
        long = "depth",
        value_name = "DEPTH",
        allow_hyphen_values = true
    )]
    depth: Option<String>,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Native AIO (accepted for compatibility).
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// AIO mode: threads, native or io_uring (accepted for compatibility).
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    aio: Option<String>,
    /// Offset of the first request.
    #[arg(
        short = 'o',
        long = "offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    offset: Option<String>,
    /// Quiet (qemu-img prints its two lines anyway).
    #[arg(short = 'q')]
    quiet: bool,
    /// Bytes per request (default 4 KiB).
    #[arg(
        short = 's',
        long = "buffer-size",
        value_name = "BUFFER_SIZE",
        allow_hyphen_values = true
    )]
    size: Option<String>,
    /// Offset step between requests (default: the request size).
    #[arg(
        short = 'S',
        long = "step-size",
        value_name = "STEP_SIZE",
        allow_hyphen_values = true
    )]
    step: Option<String>,
    /// Cache mode (checked; strata uses the page cache).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// Open read-only even if another program writes the image.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Byte written by write requests (default 0).
    #[arg(long = "pattern", value_name = "PATTERN", allow_hyphen_values = true)]
    pattern: Option<String>,
    /// Flush after this many write requests.
    #[arg(
        long = "flush-interval",
        value_name = "FLUSH_INTERVAL",
        allow_hyphen_values = true
    )]
    flush_interval: Option<String>,
    /// Flush without waiting for the requests in flight (each flush here follows
    /// the request that completes the interval).
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// The image (exactly one; the count is checked after the option values).
    #[arg(value_name = "FILENAME")]
    files: Vec<std::ffi::OsString>,
}

/// A number argument in `[min, max]`, refused with qemu-img's two messages.
pub(super) fn ranged(what: &str, s: Option<&str>, min: u64, max: u64, default: u64) -> Result<u64> {
    let Some(s) = s else { return Ok(default) };
    match size_arg(what, s) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        Err(e) if !e.to_string().contains("Must be between") => Err(e),
        _ => bail!("Invalid {what} specified. Must be between {min} and {max}."),
    }
}

/// A count argument in `[min, max]`: a plain integer as `strtol` reads it (no
/// size suffix), refused with qemu-img's two messages.
pub(super) fn counted(
    what: &str,
    s: Option<&str>,
    min: u64,
    max: u64,
    default: u64,
) -> Result<u64> {
    let Some(s) = s else { return Ok(default) };
    match super::dd::c_integer(s) {
        None => bail!("Invalid {what} specified: '{s}'."),
        Some(v) if (min as i128..=max as i128).contains(&v) => Ok(v as u64),
        Some(_) => bail!("Invalid {what} specified. Must be between {min} and {max}."),
    }
}

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    let int_max = i32::MAX as u64;
    let i64_max = i64::MAX as u64;
    // qemu-img judges each value as its option loop meets it: `getopt::refusal`
    // has already refused the first bad one in the order typed.
    let count = counted("request count", args.count.as_deref(), 1, int_max, 75000)?;
    let depth = counted("queue depth", args.depth.as_deref(), 1, int_max, 64)?;
    let offset = ranged("offset", args.offset.as_deref(), 0, i64_max, 0)?;
    let bufsize = ranged("buffer size", args.size.as_deref(), 1, int_max, 4096)?;
    let step = ranged("step size", args.step.as_deref(), 0, int_max, 0)?;
    let pattern = counted("pattern byte", args.pattern.as_deref(), 0, 255, 0)? as u8;
    let flush = counted(
        "flush interval",
        args.flush_interval.as_deref(),
        0,
        int_max,
        0,
    )?;
    if args
        .cache
        .as_deref()
        .is_some_and(|c| !super::convert::is_cache_mode(c))
    {
        bail!("Invalid cache mode");
    }
    if let Some(a) = &args.aio {
        if !matches!(a.as_str(), "threads" | "native" | "io_uring") {
            bail!("Invalid aio option: {a}");
        }
    }
    let [filename] = args.files.as_slice() else {
        bail!(
            "Expecting one image file name\nTry '{} bench --help' for more info",
            super::invoked_as(ctx.prog)
        );
    };
    let filename = PathBuf::from(filename);
    let _ = (args.native, args.quiet, args.no_drain);
    if flush > 0 && !args.write {
        bail!("--flush-interval is only available in write tests");
    }
    if flush > 0 && flush < depth {
        bail!("Flush interval can't be smaller than depth");
    }
    let step = if step == 0 { bufsize } else { step };
    let naming = super::imgname::Naming {
        objects: Default::default(),
        image_opts: args.image_opts,
    };
    // qemu-img's block layer refuses these when it opens the image: sharing a
    // writable image before anything else, native AIO without O_DIRECT once the
    // file is found.
    if args.force_share && args.write {
        bail!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            filename.display()
        );
    }
    let spec = naming
        .spec(&filename, args.format.as_deref(), args.force_share)?
        .write(args.write);
    let native = args.native || args.aio.as_deref() == Some("native");
    let direct = matches!(args.cache.as_deref(), Some("none" | "directsync"));
    if native && !direct && std::fs::metadata(&spec.path).is_ok() {
        bail!(
            "Could not open '{}': aio=native was specified, but it requires cache.direct=on, which was not specified.",
            filename.display()
        );
    }
    if args.write {
        // A write test on a probed raw image gets qemu-img's warning.
        super::common::warn_probed_raw(&spec);
    }
    let chain = open_chain(&spec)?;
    let dev = if args.write {
        chain.top().clone()
    } else {
        chain.reader()
    };
    let image_size = dev.virtual_size();
    println!(
        "Sending {count} {} requests, {bufsize} bytes each, {depth} in parallel (starting at offset {offset}, step size {step})",
        if args.write { "write" } else { "read" }
    );
    if flush > 0 {
        println!("Sending flush every {flush} requests");
    }
    // Offsets are handed out in order; after each the next is `step` on, taken
    // modulo the image size as qemu-img takes it (a request that then runs past
    // the end fails, as there).
    let next = Mutex::new((offset, 0u64));
    let done = AtomicU64::new(0);
    let failed: Mutex<Option<String>> = Mutex::new(None);
    let start = Instant::now();
    let work = || {
        let mut buf = vec![pattern; bufsize as usize];
        loop {
            let off = {
                let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                if n.1 == count || failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                let off = n.0;
                n.1 += 1;
                n.0 = match image_size {
                    0 => 0,
                    size => off.saturating_add(step) % size,
                };
                off
            };
            let r = if args.write {
                dev.write(&buf, off)
            } else {
                dev.read(&mut buf, off)
            };
            let k = done.fetch_add(1, Ordering::Relaxed) + 1;
            let r = r.and_then(|_| match flush {
                f if f > 0 && k.is_multiple_of(f) => dev.flush(),
                _ => Ok(()),
            });
            if let Err(e) = r {
                let msg = match e.storage_error() {
                    Some(strata_storage::Error::Io { source, .. }) => {
                        strata_storage::os_message(source)
                    }
                    _ => "Input/output error".to_string(),
                };
                *strata_storage::sync::lock(&failed) = Some(msg);
                return;
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..depth.min(8) {
            s.spawn(work);
        }
        work();
    });
    if let Some(msg) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        eprintln!("{}: Failed request: {msg}", ctx.prog);
        return Ok(1);
    }
    if args.write {
        dev.flush().map_err(|e| anyhow!(e))?;
        if let Some(q) = dev
            .as_any()
            .downcast_ref::<strata_format::qcow2::Qcow2Image>()
        {
            q.close()?;
        }
    }
    println!(
        "Run completed in {:.3} seconds.",
        start.elapsed().as_secs_f64()
    );
    Ok(0)
}
