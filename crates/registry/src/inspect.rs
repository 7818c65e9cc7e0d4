//! Checking uploaded data against its declared disk format with strata's own
//! engine, and measuring its virtual size.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;

use strata_format::qcow2::{Qcow2Image, Qcow2OpenOptions};
use strata_format::{BlockDevice, Format};
use strata_storage::Storage;

use crate::error::{Error, Result};

/// Inspect the complete data of an image at `path` of `size` bytes declared as
/// `disk_format`. Returns the virtual size for the formats strata reads (raw,
/// qcow2), `None` for others. Refused as invalid: data declared qcow2 that is
/// not a valid qcow2 image, that names a backing file or an external data file
/// (an image must stand alone; such a name would point a consumer at a file of
/// its host), or that is encrypted (there is no secret to read it with), and
/// data declared raw that is a qcow2 image (a consumer that probes would read
/// it as qcow2). The refusals name no path of the server.
pub fn inspect(path: &Path, disk_format: &str, size: u64) -> Result<Option<u64>> {
    match disk_format {
        "qcow2" => {
            let opts = strata_storage::OpenOptions::read().force_share(true);
            let file = strata_storage::FileStorage::open(path, opts).map_err(|e| {
                Error::io(
                    "open the uploaded data",
                    std::io::Error::other(e.to_string()),
                )
            })?;
            qcow2_size(Arc::new(file), Some(path))
        }
        "raw" => {
            if size >= 4 && strata_chain::probe_format(path).ok() == Some(Format::Qcow2) {
                return Err(raw_is_qcow2());
            }
            Ok(Some(size))
        }
        _ => Ok(None),
    }
}

/// [`inspect`] for data that is not a host file (an image in a backup
/// repository), read through `dev`, with the same refusals.
pub(crate) fn inspect_device(
    dev: Arc<dyn BlockDevice>,
    disk_format: &str,
    size: u64,
) -> Result<Option<u64>> {
    match disk_format {
        "qcow2" => qcow2_size(Arc::new(DeviceBytes(dev)), None),
        "raw" => {
            let mut magic = [0u8; 4];
            if size >= 4 {
                dev.read(&mut magic, 0)
                    .map_err(|e| Error::Corrupt(format!("reading the image back: {e}")))?;
                if strata_format::qcow2::probe(&magic) {
                    return Err(raw_is_qcow2());
                }
            }
            Ok(Some(size))
        }
        _ => Ok(None),
    }
}

/// The virtual size of the qcow2 image in `bytes`, once it is checked to be
/// valid in full and to stand alone (no backing file, no external data file,
/// no encryption). The engine's errors name the file they read: `path` (the
/// server's own) is taken out of them.
fn qcow2_size(bytes: Arc<dyn Storage>, path: Option<&Path>) -> Result<Option<u64>> {
    let not_qcow2 = |e: strata_format::Error| {
        let mut msg = e.to_string();
        if let Some(p) = path {
            msg = msg.replace(&format!("{}: ", p.display()), "");
        }
        not_qcow2(msg)
    };
    let open = |metadata_only| {
        let opts = Qcow2OpenOptions {
            read_only: true,
            metadata_only,
            ..Default::default()
        };
        Qcow2Image::open(bytes.clone(), opts).map_err(not_qcow2)
    };
    let meta = open(true)?;
    if let Some(b) = &meta.header().backing_file {
        return Err(backing_refused(b));
    }
    if meta.has_data_file() || meta.encryption().is_some() {
        return Err(Error::Invalid(
            "Image data is not a valid qcow2 image here: an external data file or encryption is refused".into(),
        ));
    }
    // Opened again in full: everything a guest's read relies on is checked.
    Ok(Some(open(false)?.virtual_size()))
}

fn not_qcow2(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("Image data is not a valid qcow2 image: {e}"))
}

fn backing_refused(name: &OsStr) -> Error {
    Error::Invalid(format!(
        "qcow2 images with a backing file are refused (it names '{}')",
        name.to_string_lossy()
    ))
}

fn raw_is_qcow2() -> Error {
    Error::Invalid("Image data declared raw is a qcow2 image: set disk_format to qcow2".into())
}

/// A device's guest bytes as read-only storage, for the format drivers.
struct DeviceBytes(Arc<dyn BlockDevice>);

impl DeviceBytes {
    fn refused() -> strata_storage::Error {
        strata_storage::Error::ReadOnly
    }
}

impl Storage for DeviceBytes {
    /// Bytes past the end read as zeroes, as the storage contract says.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> strata_storage::Result<()> {
        let size = self.0.virtual_size();
        buf.fill(0);
        let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        if n > 0 {
            self.0
                .read(&mut buf[..n], offset)
                .map_err(|e| strata_storage::Error::Io {
                    op: "read",
                    path: "image data".into(),
                    source: std::io::Error::other(e.to_string()),
                })?;
        }
        Ok(())
    }

    fn write_at(&self, _: &[u8], _: u64) -> strata_storage::Result<()> {
        Err(Self::refused())
    }

    fn write_zeroes(&self, _: u64, _: u64) -> strata_storage::Result<()> {
        Err(Self::refused())
    }

    fn discard(&self, _: u64, _: u64) -> strata_storage::Result<()> {
        Err(Self::refused())
    }

    fn flush(&self) -> strata_storage::Result<()> {
        Ok(())
    }

    fn size(&self) -> strata_storage::Result<u64> {
        Ok(self.0.virtual_size())
    }

    fn set_size(&self, _: u64) -> strata_storage::Result<()> {
        Err(Self::refused())
    }

    fn read_only(&self) -> bool {
        true
    }
}
