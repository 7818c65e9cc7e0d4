//! Checking uploaded data against its declared disk format with strata's own
//! engine, and measuring its virtual size.

use std::path::Path;

use strata_chain::OpenSpec;
use strata_format::Format;

use crate::error::{Error, Result};

/// Inspect the complete data of an image at `path` of `size` bytes declared as
/// `disk_format`. Returns the virtual size for the formats strata reads (raw,
/// qcow2), `None` for others. Refused as invalid: data declared qcow2 that is
/// not a valid qcow2 image or that names a backing file (an image must stand
/// alone; a backing name would point a consumer at a file of its host), and
/// data declared raw that is a qcow2 image (a consumer that probes would read
/// it as qcow2).
pub fn inspect(path: &Path, disk_format: &str, size: u64) -> Result<Option<u64>> {
    match disk_format {
        "qcow2" => {
            let spec = OpenSpec::new(path)
                .format(Some(Format::Qcow2))
                .force_share(true)
                .open_backing(false);
            let chain = strata_chain::open(&spec).map_err(|e| {
                Error::Invalid(format!("Image data is not a valid qcow2 image: {e}"))
            })?;
            let top = &chain.layers[0];
            if let Some(b) = &top.backing_name {
                return Err(Error::Invalid(format!(
                    "qcow2 images with a backing file are refused (it names '{}')",
                    b.to_string_lossy()
                )));
            }
            Ok(Some(top.device.virtual_size()))
        }
        "raw" => {
            if size >= 4 && strata_chain::probe_format(path).ok() == Some(Format::Qcow2) {
                return Err(Error::Invalid(
                    "Image data declared raw is a qcow2 image: set disk_format to qcow2".into(),
                ));
            }
            Ok(Some(size))
        }
        _ => Ok(None),
    }
}
