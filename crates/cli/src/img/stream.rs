//! `strata img stream` (placeholder).

use super::common::Ctx;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args, _ctx: &Ctx) -> anyhow::Result<i32> {
    anyhow::bail!("stream is not implemented yet")
}
