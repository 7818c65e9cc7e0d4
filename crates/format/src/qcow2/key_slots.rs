//! Adding and erasing the LUKS key slots of an encrypted qcow2 image in place
//! (`amend -o encrypt.state=...`): the LUKS area of the image is written in
//! the crash-safe order [`crate::crypto::slot_writes`] keeps.

use super::encryption::{read_area, EncryptionInfo};
use super::Qcow2Image;
use crate::crypto::keyslots::KeySlotRequest;
use crate::crypto::luks::LuksHeader;
use crate::crypto::slot_writes::{self, LuksArea};
use crate::{Error, Result};
use std::sync::Arc;

pub use crate::crypto::slot_writes::KeySlotError;

impl Qcow2Image {
    /// The LUKS header the image opened with (`None` for other images).
    fn luks_header(&self) -> Option<LuksHeader> {
        match self.crypt.as_ref().map(|c| &c.info) {
            Some(EncryptionInfo::Luks(h)) => Some((**h).clone()),
            _ => None,
        }
    }

    /// Read `buf` at `off` inside the LUKS area, as opening does.
    fn read_luks_area(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let m = self.lock()?;
        let ext =
            m.h.crypto
                .ok_or_else(|| Error::invalid("Missing CRYPTO header for crypt method 2"))?;
        let size = m.storage.size()?;
        read_area(m.storage.as_ref(), ext, size, off, buf)
    }

    /// Write `data` at `off` inside the LUKS area and flush it. Refused when
    /// the range leaves the area or the file (a damaged header must not make
    /// strata write over other data or grow the file).
    fn write_luks_area(&self, off: u64, data: &[u8]) -> Result<()> {
        let m = self.lock()?;
        let ext =
            m.h.crypto
                .ok_or_else(|| Error::invalid("Missing CRYPTO header for crypt method 2"))?;
        let len = data.len() as u64;
        if off.checked_add(len).is_none_or(|end| end > ext.length) {
            return Err(Error::invalid(
                "Request for data outside of extension header",
            ));
        }
        let size = m.storage.size()?;
        let at = ext
            .offset
            .checked_add(off)
            .filter(|a| a.checked_add(len).is_some_and(|e| e <= size))
            .ok_or_else(|| Error::invalid("The LUKS area lies past the end of the image file"))?;
        m.storage.write_at(data, at)?;
        m.storage.flush()?;
        Ok(())
    }

    /// Add or erase LUKS key slots as `req` asks (see
    /// [`crate::crypto::slot_writes`] for the write order). `unlock` is the
    /// password the image was opened with, `secret` gives secret values by id,
    /// `force` is `--force`. The image must be open for writing with its secret.
    pub fn change_key_slots(
        &mut self,
        req: &KeySlotRequest,
        unlock: &[u8],
        secret: &dyn Fn(&str) -> Result<Vec<u8>>,
        force: bool,
    ) -> std::result::Result<(), KeySlotError> {
        let h = self.luks_header().ok_or_else(|| {
            KeySlotError::Refused(Error::invalid(
                "Only LUKS encryption options can be amended",
            ))
        })?;
        let updated = slot_writes::change(&*self, &h, req, unlock, secret, force)?;
        if let Some(c) = self.crypt.as_mut().and_then(Arc::get_mut) {
            c.info = EncryptionInfo::Luks(Box::new(updated));
        }
        Ok(())
    }
}

impl LuksArea for Qcow2Image {
    fn read_area(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.read_luks_area(off, buf)
    }
    fn write_area(&self, off: u64, data: &[u8]) -> Result<()> {
        self.write_luks_area(off, data)
    }
}
