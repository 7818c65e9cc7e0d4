//! `flatten`: the guest view of a chain (any stack of devices) copied into a
//! new standalone image, with no backing file: what `qemu-img convert -O FMT`
//! makes of a chain, for callers that build images from VM disks.

use crate::convert::{convert, ConvertOptions, ConvertStats, Plan};
use crate::create::{create, CreateRequest};
use crate::status::ChainStatus;
use crate::{Cancel, Progress, Result};
use std::path::Path;
use strata_format::qcow2::Qcow2Image;
use strata_format::Format;

/// Create `path` as a new `format` image of the source's virtual size and copy
/// the source's guest view into it (holes and zero ranges are not written),
/// then flush and close it. `map_sources`: the source's files may be mapped
/// (no one can shrink them meanwhile; see [`ConvertOptions::map_sources`]).
/// On error the partly written file is left for the caller to remove.
pub fn flatten(
    source: &ChainStatus,
    path: &Path,
    format: Format,
    map_sources: bool,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<ConvertStats> {
    create(&CreateRequest {
        path: path.to_path_buf(),
        format,
        size: Some(source.virtual_size()),
        options: Default::default(),
        unsafe_backing: false,
    })?;
    let target = strata_chain::open_image(path, format, true, false)?;
    // Nobody uses the new image before it is complete: metadata writes need
    // no barriers, and data clusters may be allocated in bulk.
    if let Some(q) = target.as_any().downcast_ref::<Qcow2Image>() {
        q.set_write_barriers(false)?;
        q.set_falloc_new_clusters(true);
    }
    let opts = ConvertOptions {
        map_sources,
        ..ConvertOptions::default()
    };
    let cluster = target.cluster_size().unwrap_or(512);
    let plan = Plan::new(std::slice::from_ref(source), &opts, cluster, cancel)?;
    let stats = convert(
        std::slice::from_ref(source),
        &plan,
        &target,
        &opts,
        progress,
        cancel,
    )?;
    target.close()?;
    Ok(stats)
}
