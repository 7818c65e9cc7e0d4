//! The `strata` command line. `strata img ...` mirrors qemu-img; invoked under the
//! name `qemu-img` (a symlink), the binary behaves as `strata img`.

mod backup;
mod image_ops;
mod image_remote;
mod img;
mod nbd;
mod serve;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Virtual-machine disk images, snapshots and backups"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Disk image tool compatible with qemu-img (create, info, map, check, compare,
    /// measure, resize, convert).
    Img(Box<img::ImgCli>),
    /// NBD server: export images and chains; live snapshots, commit and stream.
    Nbd(Box<nbd::NbdCli>),
    /// Backups in restic's repository format: init, create, list, restore, verify, prune, gc, stats, serve.
    Backup(Box<backup::BackupCli>),
    /// Virtual machines: define, start, stop, exec, and snapshots with memory.
    Vm(Box<vm::VmCli>),
    /// The HTTP API: VMs and snapshots, backups, NBD exports and tasks, and the
    /// image registry (Glance v2 compatible); token auth, optional TLS.
    Serve(Box<serve::ServeCli>),
    /// API tokens: create (admin or --read-only), list.
    Token(Box<serve::TokenCli>),
    /// The image registry: list, show, download, delete, create-from-file,
    /// create-from-snapshot, create-from-vm.
    Image(Box<serve::ImageCli>),
}

fn main() {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let as_qemu_img = std::path::Path::new(&argv0)
        .file_name()
        .map(|n| n == "qemu-img")
        .unwrap_or(false);
    let code = if as_qemu_img {
        img::main_as(std::env::args_os().skip(1), "qemu-img")
    } else {
        let mut args: Vec<_> = std::env::args_os().collect();
        if args.get(1).map(|a| a == "img").unwrap_or(false) {
            args.drain(..2);
            img::main_as(args.into_iter(), "strata img")
        } else {
            match Cli::try_parse() {
                Ok(cli) => match cli.command {
                    Command::Img(c) => img::run(*c, "strata img"),
                    Command::Nbd(c) => nbd::run(*c),
                    Command::Backup(c) => backup::run(*c),
                    Command::Vm(c) => vm::run(*c),
                    Command::Serve(c) => serve::run_serve(*c),
                    Command::Token(c) => serve::run_token(*c),
                    Command::Image(c) => serve::run_image(*c),
                },
                Err(e) => {
                    let _ = e.print();
                    if e.use_stderr() {
                        1
                    } else {
                        0
                    }
                }
            }
        }
    };
    std::process::exit(code);
}
