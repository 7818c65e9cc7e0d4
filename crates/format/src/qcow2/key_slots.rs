//! Adding and erasing the LUKS key slots of an encrypted qcow2 image in place
//! (`amend -o encrypt.state=...`), in an order that survives a crash.
//!
//! The LUKS area of a qcow2 image has one key material region per slot, at a
//! fixed place, and a header whose 48-byte slot descriptors say which slots are
//! active. A descriptor can straddle two sectors (slot 6's salt does), so a
//! torn write could leave it half old, half new; its 4-byte `active` word never
//! straddles one. That word is therefore the commit point of every change: it
//! is written alone, after (adding) or before (erasing) everything else, each
//! step flushed before the next.
//!
//! Adding a key:
//! 1. (`--force` over an active slot only) the slot's `active` word is
//!    cleared: its old key is given up before its material is overwritten;
//! 2. the new key material is written into the slot's region;
//! 3. the descriptor's salt and iteration count are written, `active` still
//!    clear;
//! 4. the `active` word is set: from then on the new key opens the image.
//!
//! A crash before step 4 leaves the old set of keys (less a key overwritten on
//! purpose with `--force`; LUKS1 gives a slot one region, so that key cannot
//! survive its overwrite), never an active slot whose material or salt is half
//! written.
//!
//! Erasing keys:
//! 1. the `active` words of all the erased slots are cleared (one write; each
//!    word lands whole): the old keys no longer open the image, the others
//!    were never touched;
//! 2. their salts and iteration counts are cleared, as QEMU leaves an erased
//!    slot;
//! 3. only then is each erased slot's key material overwritten with random
//!    bytes. Wiping first would leave, after a crash, an active slot whose
//!    material is gone: a key that looks present and opens nothing, which
//!    would also let the "last active slot" guard pass wrongly.
//!
//! So a crash leaves the old set of keys or the new one, never none (unless
//! the last key was erased on purpose with `--force`), and every slot marked
//! active opens with its password.

use super::encryption::{read_area, EncryptionInfo};
use super::Qcow2Image;
use crate::crypto::keyslots::{self, KeySlotChange, KeySlotRequest, PlanInputs};
use crate::crypto::luks::{self, KeySlot, LuksHeader};
use crate::crypto::SECTOR_SIZE;
use crate::units::index;
use crate::{Error, Result};
use std::sync::Arc;

/// Why a key-slot amend failed.
#[derive(Debug)]
pub enum KeySlotError {
    /// Refused before anything was written (QEMU's checks, a wrong secret).
    Refused(Error),
    /// Writing the change failed; `message` is QEMU's report (the cause, then
    /// the slot), which ends without a newline as QEMU's hint does.
    Failed { error: Error, message: String },
}

impl KeySlotError {
    pub fn error(&self) -> &Error {
        match self {
            KeySlotError::Refused(e) | KeySlotError::Failed { error: e, .. } => e,
        }
    }
}

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

    /// Add or erase LUKS key slots as `req` asks (see the module docs for
    /// the write order). `unlock` is the password the image was opened with,
    /// `secret` gives secret values by id, `force` is `--force`. The image
    /// must be open for writing with its secret.
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
        let change = {
            let mut read = |off: u64, buf: &mut [u8]| self.read_luks_area(off, buf);
            keyslots::plan(
                &h,
                req,
                PlanInputs {
                    unlock,
                    secret,
                    read: &mut read,
                    force,
                },
            )
            .map_err(KeySlotError::Refused)?
        };
        let updated = self
            .apply_key_slots(&h, &change)
            .map_err(|error| KeySlotError::Failed {
                message: keyslots::write_failure(&change, &error),
                error,
            })?;
        if let Some(c) = self.crypt.as_mut().and_then(Arc::get_mut) {
            c.info = EncryptionInfo::Luks(Box::new(updated));
        }
        Ok(())
    }

    /// Write `change` to the disk in the module's order; returns the header
    /// now on disk.
    fn apply_key_slots(&self, h: &LuksHeader, change: &KeySlotChange) -> Result<LuksHeader> {
        let mut new = h.clone();
        match change {
            KeySlotChange::Add {
                slot,
                master,
                password,
                iter_time_ms,
            } => {
                let i = *slot;
                let iterations = luks::slot_iterations(h, *iter_time_ms)?;
                let (desc, material) = h.seal_key(i, password, master, iterations)?;
                if h.slots[i].active {
                    new.slots[i].active = false;
                    self.write_descriptors(&new, &[i], true)?;
                }
                self.write_luks_area(u64::from(desc.key_offset) * SECTOR_SIZE, &material)?;
                new.slots[i] = KeySlot {
                    active: false,
                    ..desc
                };
                self.write_descriptors(&new, &[i], false)?;
                new.slots[i] = desc;
                self.write_descriptors(&new, &[i], true)?;
            }
            KeySlotChange::Erase { slots } => {
                for &i in slots {
                    new.slots[i].active = false;
                }
                self.write_descriptors(&new, slots, true)?;
                for &i in slots {
                    new.slots[i] = h.slots[i].erased();
                }
                self.write_descriptors(&new, slots, false)?;
                for &i in slots {
                    let mut garbage = vec![0u8; index(h.material_len(i))];
                    crate::crypto::random(&mut garbage)?;
                    self.write_luks_area(u64::from(h.slots[i].key_offset) * SECTOR_SIZE, &garbage)?;
                }
            }
        }
        Ok(new)
    }

    /// Write the descriptors of `slots` from `h` in one write and flush it
    /// (the bytes between them as they are on disk); with `active_only`, only
    /// their 4-byte `active` words change.
    fn write_descriptors(&self, h: &LuksHeader, slots: &[usize], active_only: bool) -> Result<()> {
        let (Some(&first), Some(&last)) = (slots.iter().min(), slots.iter().max()) else {
            return Ok(());
        };
        let start = luks::slot_descriptor_offset(first);
        let end = luks::slot_descriptor_offset(last) + 48;
        let mut bytes = vec![0u8; end - start];
        self.read_luks_area(start as u64, &mut bytes)?;
        for &i in slots {
            let at = luks::slot_descriptor_offset(i) - start;
            let len = if active_only { 4 } else { 48 };
            bytes[at..at + len].copy_from_slice(&h.slots[i].serialize()[..len]);
        }
        self.write_luks_area(start as u64, &bytes)
    }
}
