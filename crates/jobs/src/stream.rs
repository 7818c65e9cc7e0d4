//! `stream` (pull): copy into the top image everything it reads from the layers
//! between it and a base, then drop those layers by relinking the top to the base
//! (or to nothing) in one header write. Data first, flush, then relink: a crash
//! leaves the chain showing the same content before and after.

use crate::layers::{apply, plan_band, CopyPlan, Zeroes};
use crate::{Cancel, Error, Progress, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use strata_chain::{Chain, OpenSpec};
use strata_format::{BlockDevice, Format};

/// Pull into an image the data it reads from part of its backing chain, then drop
/// that part, as libvirt's block pull does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRequest {
    /// The image streamed into (it stays readable throughout).
    pub image: PathBuf,
    /// Its format; probed when `None`.
    #[serde(default, with = "crate::format_name")]
    pub format: Option<Format>,
    /// The backing file to keep (a path, or the name a layer records for it):
    /// everything above it is pulled. `None` pulls the whole chain and leaves
    /// the image standing alone.
    #[serde(default)]
    pub base: Option<String>,
}

/// The index of the layer `req.base` names in `chain` (`chain.layers.len()` for
/// the whole chain). Errors: [`Error::NoBackingFile`] for an image without one,
/// [`Error::NotInChain`] when `base` names no layer below the image.
pub fn resolve_base(chain: &Chain, req: &StreamRequest) -> Result<usize> {
    if chain.layers.len() < 2 {
        return Err(Error::NoBackingFile);
    }
    match &req.base {
        Some(b) => match chain.find(b) {
            Some(i) if i > 0 => Ok(i),
            _ => Err(Error::NotInChain {
                what: b.clone(),
                image: req.image.clone(),
            }),
        },
        None => Ok(chain.layers.len()),
    }
}

/// Carry out `req`: open the image for writing, copy, flush, relink (see
/// [`relink_to_base`]) and close it.
pub fn stream(req: &StreamRequest, progress: &dyn Progress, cancel: &Cancel) -> Result<()> {
    let chain = strata_chain::open(&OpenSpec::new(&req.image).format(req.format).write(true))?;
    let base = resolve_base(&chain, req)?;
    let layers = chain.devices();
    let plan = plan(&layers, base, cancel)?;
    apply_plan(&layers, &plan, progress, cancel)?;
    relink_to_base(&chain, base)?;
    chain.top().close()?;
    Ok(())
}

/// The last step of a stream down to `chain.layers[base]`: record it as the top's
/// backing file (by the name the chain already uses for it when that still
/// resolves, else its full path), or no backing file when `base` is past the end.
pub fn relink_to_base(chain: &Chain, base: usize) -> Result<()> {
    let top = chain.top().as_ref();
    if base >= chain.layers.len() {
        return crate::commit::relink_above(top, None, None);
    }
    let name = crate::commit::backing_name_for(chain, 0, base);
    crate::commit::relink_above_to(top, Some(&name), Some(chain.layers[base].format.name()))
}

/// Plan pulling `layers[1..base]` into `layers[0]` (`base` = `layers.len()` pulls
/// the whole chain).
pub fn plan(layers: &[Arc<dyn BlockDevice>], base: usize, cancel: &Cancel) -> Result<CopyPlan> {
    if base == 0 || base > layers.len() {
        return Err(Error::Invalid(format!(
            "Cannot stream down to layer {base} of a chain of {} images",
            layers.len()
        )));
    }
    plan_band(layers, 1, base, layers[0].virtual_size(), cancel)
}

/// Copy the planned ranges into the top and flush it.
pub fn apply_plan(
    layers: &[Arc<dyn BlockDevice>],
    plan: &CopyPlan,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<()> {
    apply(
        plan,
        layers[0].as_ref(),
        layers[0].as_ref(),
        Zeroes::Keep,
        progress,
        cancel,
    )
}
