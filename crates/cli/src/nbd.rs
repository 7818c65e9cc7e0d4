//! `strata nbd` (placeholder).

#[derive(clap::Args)]
pub struct NbdCli {}

pub fn run(_cli: NbdCli) -> i32 {
    eprintln!("strata nbd: not implemented yet");
    1
}
