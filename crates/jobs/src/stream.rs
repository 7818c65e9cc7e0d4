//! `stream` (pull): copy into the top image everything it reads from the layers
//! between it and a base, then drop those layers by relinking the top to the base
//! (or to nothing) in one header write. Data first, flush, then relink: a crash
//! leaves the chain showing the same content before and after.

use crate::layers::{apply, plan_band, CopyPlan};
use crate::{Cancel, Error, Progress, Result};
use std::sync::Arc;
use strata_format::BlockDevice;

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
        progress,
        cancel,
    )
}
