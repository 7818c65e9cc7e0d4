//! `convert --bitmaps`: the source's persistent dirty bitmaps are copied into the
//! target (same names, granularity and enabled state, the same bits), refused
//! where qemu-img refuses, at the same point of the conversion: the options and
//! the source before the target is created, the target's format once it exists,
//! the copy itself after the data.

use super::common::open_qcow2;
use anyhow::{bail, Result};
use std::io::Read;
use std::path::Path;
use strata_format::Format;

/// What was asked: `--bitmaps` and `--skip-broken-bitmaps`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked {
    pub bitmaps: bool,
    pub skip_broken: bool,
}

/// The checks made once the options are read, before any image is opened.
pub fn check_options(asked: Asked, sources: usize) -> Result<()> {
    if asked.skip_broken && !asked.bitmaps {
        bail!("Use of --skip-broken-bitmaps requires --bitmaps");
    }
    if asked.bitmaps && sources > 1 {
        bail!("Copying bitmaps only possible with single source");
    }
    Ok(())
}

/// The source must be able to hold persistent bitmaps (a qcow2 image).
pub fn check_source(asked: Asked, format: Option<Format>) -> Result<()> {
    if asked.bitmaps && format != Some(Format::Qcow2) {
        bail!("Source lacks bitmap support");
    }
    Ok(())
}

/// The target, once created (or opened with -n), must be able to hold them: a
/// qcow2 file of version 3 or later.
pub fn check_target(asked: Asked, path: &Path, format: Format) -> Result<()> {
    if !asked.bitmaps {
        return Ok(());
    }
    let version = (format == Format::Qcow2)
        .then(|| qcow2_version(path))
        .flatten();
    if version.is_none_or(|v| v < 3) {
        bail!("Format driver '{}' does not support bitmaps", format.name());
    }
    Ok(())
}

/// The version field of a qcow2 file's header, if it can be read.
fn qcow2_version(path: &Path) -> Option<u32> {
    let mut head = [0u8; 8];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    Some(u32::from_be_bytes([head[4], head[5], head[6], head[7]]))
}

/// Copy every persistent bitmap of the source into the target (both closed by
/// the conversion already). A bitmap marked in use cannot be copied: the
/// engine refuses to read it, naming it.
pub fn copy(
    asked: Asked,
    source: &strata_chain::OpenSpec,
    target: &strata_chain::OpenSpec,
) -> Result<()> {
    if !asked.bitmaps {
        return Ok(());
    }
    let from = open_qcow2(source, false)?.read_bitmaps()?;
    if from.is_empty() {
        return Ok(());
    }
    let to = open_qcow2(target, true)?;
    let mut set = to.read_bitmaps()?;
    for b in from {
        if set.iter().any(|t| t.name == b.name) {
            bail!("Bitmap already exists: {}", b.name);
        }
        set.push(b);
    }
    to.store_bitmaps(&set)?;
    to.close()?;
    Ok(())
}
