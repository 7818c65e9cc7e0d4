//! `strata img create`: a new qcow2 or raw image, optionally on a backing file, with
//! qemu-img's options (`-o cluster_size=...,compat=...,preallocation=...`).

use super::common::{check_option_lists, image_size, parse_options, Ctx};
use super::imgname::{output_format, output_path};
use anyhow::Result;
use std::path::PathBuf;
use strata_format::Format;
use strata_jobs::create::{prepare, CreateRequest};

#[derive(clap::Args)]
pub struct Args {
    /// Image format: qcow2 or raw (default raw).
    #[arg(
        short = 'f',
        long = "format",
        value_name = "FMT",
        default_value = "raw"
    )]
    format: String,
    /// Format options, comma separated (`-o help` lists them).
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file: the new image is an overlay on it (qcow2 only).
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Backing file format (required with -b).
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Do not open the backing file (its size must then be given).
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_backing: bool,
    /// `--object` definitions (secrets for encryption keys).
    #[command(flatten)]
    objects: super::objects::ObjectArgs,
    /// Quiet: do not print the summary line.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// The new image (not needed with `-o help`).
    #[arg(value_parser = super::common::any_file_name())]
    filename: Option<PathBuf>,
    /// Virtual size (k, M, G, T, P, E suffixes); defaults to the backing file's size.
    size: Option<String>,
    /// Arguments beyond the size: refused after the size is read (and ignored
    /// by `-o help`), as qemu-img does.
    #[arg(hide = true)]
    extra: Vec<String>,
}

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    // The secrets by id, for the options that name one.
    let secrets = args.objects.secrets()?;
    check_option_lists(&args.options)?;
    if super::opthelp::has_help_option(&args.options) {
        let target = args.filename.as_ref().map(|f| f.to_string_lossy());
        print!(
            "{}",
            super::opthelp::create_help(&args.format, target.as_deref())?
        );
        return Ok(0);
    }
    let format: Format = output_format(&args.format).map_err(|e| match &args.filename {
        Some(p) => anyhow::anyhow!("{}: {e}", p.display()),
        None => anyhow::anyhow!("{e}"),
    })?;
    let mut options = parse_options(&args.options)?;
    let Some(filename) = args.filename.clone() else {
        anyhow::bail!(
            "Expecting image file name\nTry '{} create --help' for more info",
            super::invoked_as(ctx.prog)
        );
    };
    let size = match &args.size {
        Some(s) => Some(image_size(s)?),
        None => None,
    };
    if let Some(extra) = args.extra.first() {
        anyhow::bail!(
            "Unexpected argument: {extra}\nTry '{} create --help' for more info",
            super::invoked_as(ctx.prog)
        );
    }
    first_bad_item(format, &filename, &args.options)?;
    if size.is_some() && options.contains_key("size") {
        anyhow::bail!(
            "{}: The image size must be specified only once",
            filename.display()
        );
    }
    let no_backing = matches!(
        format,
        Format::Luks | Format::Raw | Format::Vpc | Format::Vdi | Format::Vhdx | Format::Parallels
    );
    if no_backing && (args.backing.is_some() || args.backing_format.is_some()) {
        // qemu-img reads the -o list (naming the first unknown option) before
        // it refuses -b and -F for a format without backing files.
        prepare(&CreateRequest {
            path: filename.clone(),
            format,
            size: Some(size.unwrap_or(0)),
            options: options.clone(),
            unsafe_backing: true,
        })?;
    }
    if no_backing {
        // qemu-img refuses -b and -F itself for a format without backing
        // files; as -o options they are merely unknown to the driver.
        let f = filename.display();
        let name = format.name();
        if args.backing.is_some() {
            anyhow::bail!("{f}: Backing file not supported for file format '{name}'");
        }
        if args.backing_format.is_some() {
            anyhow::bail!("{f}: Backing file format not supported for file format '{name}'");
        }
    }
    if let Some(b) = &args.backing {
        options.insert("backing_file".into(), b.clone());
    }
    if let Some(f) = &args.backing_format {
        options.insert("backing_fmt".into(), f.clone());
    }
    let typed = filename.to_string_lossy().into_owned();
    let on_export = super::nbdname::names_export(&typed, None);
    let path = if on_export {
        filename.clone()
    } else {
        output_path(&filename).map_err(|e| anyhow::anyhow!("{}: {e}", filename.display()))?
    };
    let prepared = prepare(&CreateRequest {
        path: path.clone(),
        format,
        size,
        options,
        unsafe_backing: args.unsafe_backing,
    })?;
    // Printed before the format's own checks, which may still refuse, as
    // qemu-img does.
    if !args.quiet {
        // Worded with the name and format as given (`file:x`, `-f file`).
        println!(
            "{}",
            prepared.summary_as(&filename.display().to_string(), &args.format)
        );
    }
    let prepared = prepared.with_secrets(secrets);
    if on_export {
        // An NBD export is formatted in place: it is neither created nor resized.
        let named = |e: anyhow::Error| anyhow::anyhow!("{typed}: {e}");
        let storage =
            super::nbdname::open_device(&typed, &args.objects.objects()?).map_err(named)?;
        if let (Format::Raw, Some(size)) = (format, size) {
            super::nbdname::check_fits(&storage, size).map_err(named)?;
        }
        prepared.create_on(storage)?;
    } else {
        prepared.create()?;
    }
    Ok(0)
}

/// Refuse the first `-o` item qemu-img refuses as it reads the list against
/// `format`'s creation options, in the order typed: a key the format does not
/// know, or a value not of its key's type. A key given twice is judged each
/// time (the map the options end in keeps only its last value). The refusal
/// names `path` as [`prepare`] does.
pub(super) fn first_bad_item(
    format: Format,
    path: &std::path::Path,
    opts: &[String],
) -> Result<()> {
    for (k, v) in super::common::option_items(opts) {
        // The backing file is only recorded by this reading.
        if k == "backing_file" && format != Format::Raw {
            continue;
        }
        prepare(&CreateRequest {
            path: path.to_path_buf(),
            format,
            size: Some(0),
            options: std::iter::once((k, v)).collect(),
            unsafe_backing: true,
        })?;
    }
    Ok(())
}
