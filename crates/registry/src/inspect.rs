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
/// `disk_format` (Glance's names). Returns the virtual size for the formats
/// strata reads (raw, qcow2, vhd, vhdx, vdi, vmdk), `None` for others.
///
/// Refused as invalid, as Glance's format inspection refuses them: data that
/// is not a valid image of its declared format; an image that does not stand
/// alone (a qcow2 backing file or external data file, a vmdk descriptor
/// naming extent files or a parent, a differencing VHD): such a name would
/// point a consumer at a file of its host; an encrypted qcow2 (there is no
/// secret to read it with); and data declared as one format that a consumer
/// probing it would read as another (a vmdk declared raw, a qcow2 declared
/// iso, ...). The refusals name no path of the server.
pub fn inspect(path: &Path, disk_format: &str, size: u64) -> Result<Option<u64>> {
    let opts = strata_storage::OpenOptions::read().force_share(true);
    let file = strata_storage::FileStorage::open(path, opts).map_err(|e| {
        Error::io(
            "open the uploaded data",
            std::io::Error::other(e.to_string()),
        )
    })?;
    inspect_bytes(Arc::new(file), Some(path), disk_format, size)
}

/// [`inspect`] for data that is not a host file (an image in a backup
/// repository), read through `dev`, with the same refusals.
pub(crate) fn inspect_device(
    dev: Arc<dyn BlockDevice>,
    disk_format: &str,
    size: u64,
) -> Result<Option<u64>> {
    inspect_bytes(Arc::new(DeviceBytes(dev)), None, disk_format, size)
}

/// [`inspect`] of the data in `bytes`; `path`, the server's name for it, is
/// taken out of the engine's messages and never given to a driver (no
/// driver looks for companion files beside it).
fn inspect_bytes(
    bytes: Arc<dyn Storage>,
    path: Option<&Path>,
    disk_format: &str,
    size: u64,
) -> Result<Option<u64>> {
    let invalid = |e: strata_format::Error| {
        let mut msg = e.to_string();
        if let Some(p) = path {
            msg = msg.replace(&format!("{}: ", p.display()), "");
            msg = msg.replace(&p.display().to_string(), "the image");
        }
        Error::Invalid(format!(
            "Image data is not a valid {disk_format} image: {msg}"
        ))
    };
    // Every driver opens the data read-only (its `write` argument false).
    let write = false;
    match disk_format {
        "qcow2" => qcow2_size(bytes, invalid),
        "vmdk" => {
            let head = head(bytes.as_ref())?;
            if !strata_format::vmdk::probe(&head) {
                return Err(invalid(strata_format::Error::invalid("no vmdk header")));
            }
            if !strata_format::vmdk::is_self_contained(&head) {
                return Err(Error::Invalid(
                    "vmdk images whose descriptor names other files (extents) are refused: \
                     upload a monolithicSparse or streamOptimized image"
                        .into(),
                ));
            }
            let img = strata_format::vmdk::VmdkImage::open(bytes, None, write).map_err(invalid)?;
            if let Some(parent) = img.parent_file_name() {
                return Err(backing_refused("vmdk", parent.as_ref()));
            }
            checked(&img, invalid)
        }
        "vhd" => {
            let img = strata_format::vpc::VpcImage::open(bytes, write).map_err(invalid)?;
            if img.footer().disk_type() == VHD_DIFFERENCING {
                return Err(Error::Invalid(
                    "differencing VHD images are refused: they need their parent disk; \
                     upload the merged disk (qemu-img convert)"
                        .into(),
                ));
            }
            Ok(Some(img.virtual_size()))
        }
        "vhdx" => {
            let img = strata_format::vhdx::open_for_check(bytes, None, write).map_err(invalid)?;
            checked(img.as_ref(), invalid)
        }
        "vdi" => {
            let img = strata_format::vdi::open(bytes, None, write).map_err(invalid)?;
            checked(img.as_ref(), invalid)
        }
        declared => {
            if size > 0 {
                let found = strata_chain::probe_storage(bytes.as_ref())
                    .map_err(|e| Error::Corrupt(format!("reading the image back: {e}")))?;
                if found != Format::Raw && glance_name(found) != Some(declared) {
                    return Err(declared_as_other(declared, found));
                }
            }
            Ok((declared == "raw").then_some(size))
        }
    }
}

/// A VHD footer's disk type of a differencing disk (its blocks fall through
/// to a parent it names).
const VHD_DIFFERENCING: u32 = 4;

/// The first bytes of the data, as the format probes read them.
fn head(bytes: &dyn Storage) -> Result<Vec<u8>> {
    let mut head = vec![0u8; 2048];
    bytes
        .read_at(&mut head, 0)
        .map_err(|e| Error::Corrupt(format!("reading the image back: {e}")))?;
    Ok(head)
}

/// The virtual size of `img` once its driver's own check finds nothing wrong
/// with its tables (a block mapped twice or past the end of the data).
fn checked(
    img: &dyn BlockDevice,
    invalid: impl Fn(strata_format::Error) -> Error,
) -> Result<Option<u64>> {
    let report = strata_format::foreign_check::check(img).map_err(&invalid)?;
    if report.corruptions > 0 || report.failure.is_some() {
        let first = report.messages.first().cloned().unwrap_or_default();
        return Err(invalid(strata_format::Error::invalid(format!(
            "its tables are damaged ({} corruptions{}{first})",
            report.corruptions,
            if first.is_empty() { "" } else { "; first: " }
        ))));
    }
    Ok(Some(img.virtual_size()))
}

/// The name Glance gives `format` as a disk format, if it has one.
fn glance_name(format: Format) -> Option<&'static str> {
    match format {
        Format::Raw => Some("raw"),
        Format::Qcow2 => Some("qcow2"),
        Format::Vpc => Some("vhd"),
        Format::Vhdx => Some("vhdx"),
        Format::Vdi => Some("vdi"),
        Format::Vmdk => Some("vmdk"),
        Format::Parallels => Some("ploop"),
        Format::Luks | Format::Qed => None,
    }
}

fn declared_as_other(declared: &str, found: Format) -> Error {
    Error::Invalid(match glance_name(found) {
        Some(name) => {
            format!("Image data declared {declared} is a {name} image: set disk_format to {name}")
        }
        None => format!(
            "Image data declared {declared} is a {} image, which is not a disk format images can have",
            found.name()
        ),
    })
}

/// The virtual size of the qcow2 image in `bytes`, once it is checked to be
/// valid in full and to stand alone (no backing file, no external data file,
/// no encryption).
fn qcow2_size(
    bytes: Arc<dyn Storage>,
    invalid: impl Fn(strata_format::Error) -> Error,
) -> Result<Option<u64>> {
    let open = |metadata_only| {
        let opts = Qcow2OpenOptions {
            read_only: true,
            metadata_only,
            ..Default::default()
        };
        Qcow2Image::open(bytes.clone(), opts).map_err(&invalid)
    };
    let meta = open(true)?;
    if let Some(b) = &meta.header().backing_file {
        return Err(backing_refused("qcow2", b));
    }
    if meta.has_data_file() || meta.encryption().is_some() {
        return Err(Error::Invalid(
            "Image data is not a valid qcow2 image here: an external data file or encryption is refused".into(),
        ));
    }
    // Opened again in full: everything a guest's read relies on is checked.
    Ok(Some(open(false)?.virtual_size()))
}

fn backing_refused(format: &str, name: &OsStr) -> Error {
    Error::Invalid(format!(
        "{format} images with a backing file are refused (it names '{}')",
        name.to_string_lossy()
    ))
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
