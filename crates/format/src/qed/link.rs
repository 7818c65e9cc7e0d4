//! The backing file link of a qed image: its name after the header, its
//! format recorded only when raw (the no-probe feature), and the header
//! rewrite that changes it (rebase).

use super::header::{F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, HEADER_LEN, NAME_OFFSET};
use super::image::QedImage;
use crate::{Error, ErrorKind, Overlay, Result};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// A qed image records its backing file's name, and its format only when it
/// is raw (the no-probe feature); other formats are probed, as the qed
/// format defines ([`Overlay::backing_format_probed`]).
impl Overlay for QedImage {
    fn backing_name(&self) -> Option<OsString> {
        self.backing_file_name().map(OsString::from_vec)
    }
    fn backing_format(&self) -> Option<String> {
        let st = self.lock();
        (st.header.has_backing_file() && st.header.features & F_BACKING_FORMAT_NO_PROBE != 0)
            .then(|| "raw".to_string())
    }
    fn backing_format_probed(&self) -> bool {
        true
    }
    /// Rewrites the header and the name after it in one write, then flushes,
    /// as QEMU changes a qed image's backing file; a name that does not fit
    /// the header area is refused ("No space left on device").
    fn set_backing_file(&self, name: Option<&OsStr>, format: Option<&str>) -> Result<()> {
        if self.is_read_only() {
            return Err(self.err(Error::read_only()));
        }
        let mut st = self.lock();
        let mut new = st.header;
        if name.is_some() && new.compat_features != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "Operation not supported",
            ));
        }
        new.features &= !(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
        let bytes = name.map(OsStr::as_bytes).unwrap_or_default();
        if name.is_some() {
            new.features |= F_BACKING_FILE;
            if format == Some("raw") {
                new.features |= F_BACKING_FORMAT_NO_PROBE;
            }
        }
        new.backing_filename_offset = NAME_OFFSET;
        new.backing_filename_size = u32::try_from(bytes.len())
            .map_err(|_| Error::new(ErrorKind::InvalidArgument, "No space left on device"))?;
        let total = HEADER_LEN as u64 + bytes.len() as u64;
        if total > new.header_bytes() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "No space left on device",
            ));
        }
        let mut buf = new.to_bytes().to_vec();
        buf.extend_from_slice(bytes);
        self.storage().write_at(&buf, 0).map_err(|e| self.err(e))?;
        self.storage().flush().map_err(|e| self.err(e))?;
        st.header = new;
        st.backing_name = name.map(|_| bytes.to_vec());
        Ok(())
    }
    /// QEMU's qed driver cannot empty an image.
    fn make_empty(&self) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "Operation not supported",
        ))
    }
}
