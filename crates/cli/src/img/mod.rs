//! `strata img`: qemu-img's interface (flags, exit codes, text and JSON output).
//!
//! Each subcommand lives in its own module with an `Args` (clap) and a
//! `run(args, &Ctx) -> anyhow::Result<i32>` returning the process exit code.

mod amend;
mod amend_keys;
mod amend_luks;
mod bench;
mod bitmap;
mod blkdebug;
mod check;
mod commit;
mod common;
mod compare;
mod convert;
mod convert_bitmaps;
mod convert_salvage;
mod convert_steps;
mod create;
mod dd;
mod getopt;
mod imgname;
mod info;
mod ioerr;
mod map;
mod measure;
mod nbdname;
mod objects;
mod opthelp;
mod optvalues;
pub(crate) mod progress;
mod qjson;
mod qprogress;
mod qsteps;
mod rebase;
mod resize;
mod snapshot;
mod stream;
mod tlscreds;
mod toplevel;
mod trace;
mod usage;

use clap::{Parser, Subcommand};
use std::ffi::OsString;

pub use common::Ctx;

#[derive(Parser)]
#[command(
    name = "img",
    // An option given twice takes the last value, as qemu-img's getopt loop does.
    args_override_self = true,
    // A long option may be shortened to any prefix naming it alone, as getopt
    // takes it (`--back` for `--backing-chain`).
    infer_long_args = true,
    // `help` is no command of qemu-img's: `-h`/`--help` are the ways to ask.
    disable_help_subcommand = true,
    about = "Disk image tool compatible with qemu-img",
    long_about = "Disk image tool compatible with qemu-img: the same subcommands, flags, exit codes \
                  and --output=json shapes. Invoked as `qemu-img` (a symlink), strata behaves as \
                  `strata img`."
)]
pub struct ImgCli {
    #[command(subcommand)]
    command: ImgCommand,
}

#[derive(Subcommand)]
enum ImgCommand {
    /// Create a new disk image (qcow2 or raw), optionally on top of a backing file.
    Create(create::Args),
    /// Show an image's format, sizes, backing file and format-specific details.
    Info(info::Args),
    /// Show how guest ranges are stored: allocated data, zeroes, or backing layers.
    Map(map::Args),
    /// Check an image for consistency and optionally repair it (exit codes 0/1/2/3/63).
    Check(check::Args),
    /// Compare the guest-visible contents of two images (exit 0 same, 1 different).
    Compare(compare::Args),
    /// Compute the size a new image needs for a given size or source image.
    Measure(measure::Args),
    /// Change an image's virtual size ([+|-]SIZE; shrinking needs --shrink).
    Resize(resize::Args),
    /// Convert or copy an image (formats, compression, flattening of a backing chain).
    Convert(convert::Args),
    /// List, create, apply or delete internal snapshots (-l, -c, -a, -d).
    Snapshot(snapshot::Args),
    /// Merge an overlay's data into its backing file (or a chosen base) and relink.
    Commit(commit::Args),
    /// Change a qcow2 image's version, refcount width, lazy refcounts, size or backing file.
    Amend(amend::Args),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps.
    Bitmap(bitmap::Args),
    /// Copy a byte range of an image into a new image (if=, of=, bs=, count=, skip=).
    Dd(dd::Args),
    /// Time a run of read or write requests (qemu-img bench's flags and output).
    Bench(bench::Args),
    /// Change an image's backing file, keeping the guest-visible content (or -u: not).
    Rebase(rebase::Args),
    /// Pull data from part of the backing chain into the image, then drop that part.
    Stream(stream::Args),
}

/// The qemu-img release whose command line `strata img` follows.
const QEMU_IMG_INTERFACE: &str = "10.0.0";

/// `--version`/`-V` before any subcommand, as qemu-img takes it. Under the name
/// `qemu-img` the first line keeps qemu-img's shape, so scripts that read the
/// version from it see the interface strata implements.
fn version_text(prog: &str) -> String {
    let strata = env!("CARGO_PKG_VERSION");
    if prog == "qemu-img" {
        format!(
            "qemu-img version {QEMU_IMG_INTERFACE} (strata {strata})\n\
             This is strata's implementation of the qemu-img command line, not QEMU.\n"
        )
    } else {
        format!("strata {strata} (qemu-img {QEMU_IMG_INTERFACE} command line)\n")
    }
}

/// The program as its "Try 'PROG SUB --help'" lines name it: as `qemu-img`, the
/// argv[0] it was run by, as typed (qemu-img prints a path there if it was run by
/// one, while its messages' prefix is the bare name); else `prog`.
pub(crate) fn invoked_as(prog: &str) -> String {
    match std::env::args_os().next() {
        Some(argv0) if prog == "qemu-img" => argv0.to_string_lossy().into_owned(),
        _ => prog.to_string(),
    }
}

/// Parse `args` as `<prog> SUBCOMMAND ...` and run it; returns the exit code.
pub fn main_as(args: impl Iterator<Item = OsString>, prog: &'static str) -> i32 {
    use clap::CommandFactory;
    let commands: Vec<String> = ImgCli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    let args = match toplevel::start(args.collect(), prog, &commands) {
        toplevel::Start::Exit(code) => return code,
        toplevel::Start::Run { args } => args,
    };
    // Values qemu-img judges as its option loop meets them are judged first,
    // in the order typed (clap would report a later mistake first).
    let typed: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if let Some(said) = getopt::refusal(&ImgCli::command(), &typed, &Ctx { prog }) {
        print!("{}", said.out);
        eprint!("{}", said.err);
        return said.code;
    }
    let argv = std::iter::once(OsString::from(prog)).chain(args.iter().cloned());
    match ImgCli::try_parse_from(argv) {
        Ok(cli) => run(cli, prog),
        Err(e) => {
            let typed: Vec<String> = args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            match usage::qemu_img_message(&e, prog, &typed) {
                Some(msg) => eprint!("{msg}"),
                None => {
                    let _ = e.print();
                }
            }
            // qemu-img exits 1 on bad arguments; help and version exit 0.
            if e.use_stderr() {
                1
            } else {
                0
            }
        }
    }
}

pub fn run(cli: ImgCli, prog: &'static str) -> i32 {
    let ctx = Ctx { prog };
    let _ = common::PROG.set(prog);
    // A dirty image repaired as it is opened says what was fixed, as qemu-img does.
    strata_format::qcow2::repair_notice::on_auto_repair(|line| eprintln!("{line}"));
    // So are the open's warnings about stale bitmaps, with qemu-img's prefix.
    strata_format::qcow2::open_notice::on_open_warning(|w| {
        let prog = common::PROG.get().copied().unwrap_or("strata img");
        eprint!("{prog}: warning: {}\n{}", w.warning, w.trailer);
    });
    // Backing files may name NBD exports, as QEMU's do.
    nbdname::install();
    let r = match cli.command {
        ImgCommand::Create(a) => create::run(a, &ctx),
        ImgCommand::Info(a) => info::run(a, &ctx),
        ImgCommand::Map(a) => map::run(a, &ctx),
        ImgCommand::Check(a) => check::run(a, &ctx),
        ImgCommand::Compare(a) => compare::run(a, &ctx),
        ImgCommand::Measure(a) => measure::run(a, &ctx),
        ImgCommand::Resize(a) => resize::run(a, &ctx),
        ImgCommand::Convert(a) => convert::run(a, &ctx),
        ImgCommand::Snapshot(a) => snapshot::run(a, &ctx),
        ImgCommand::Commit(a) => commit::run(a, &ctx),
        ImgCommand::Rebase(a) => rebase::run(a, &ctx),
        ImgCommand::Amend(a) => amend::run(a, &ctx),
        ImgCommand::Bitmap(a) => bitmap::run(a, &ctx),
        ImgCommand::Dd(a) => dd::run(a, &ctx),
        ImgCommand::Bench(a) => bench::run(a, &ctx),
        ImgCommand::Stream(a) => stream::run(a, &ctx),
    };
    let code = match r {
        Ok(code) => code,
        Err(e) => {
            ctx.error(&e);
            1
        }
    };
    qprogress::print_end_due();
    code
}
