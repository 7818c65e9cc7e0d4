//! Adding and erasing LUKS key slots in place (`amend`, for a LUKS-encrypted
//! qcow2 image and a `luks` image alike), in an order that survives a crash.
//!
//! A LUKS area has one key material region per slot, at a fixed place, and a header whose 48-byte slot descriptors say which slots are
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

use super::keyslots::{self, KeySlotChange, KeySlotRequest, PlanInputs};
use super::luks::{self, KeySlot, LuksHeader};
use super::SECTOR_SIZE;
use crate::units::index;
use crate::{Error, Result};

/// The bytes of a LUKS area (header and key material), wherever the image
/// keeps them.
pub trait LuksArea {
    /// Read `buf` at `off` into the area.
    fn read_area(&self, off: u64, buf: &mut [u8]) -> Result<()>;
    /// Write `data` at `off` into the area and flush it. Refused when the
    /// range leaves the area or the file (a damaged header must not make
    /// strata write over other data or grow the file).
    fn write_area(&self, off: u64, data: &[u8]) -> Result<()>;
}

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

/// Plan the change `req` asks of the slots of `h` (QEMU's refusals) and write
/// it to `area`; returns the header now on disk. `unlock` is the password the
/// image was opened with, `secret` gives secret values by id, `force` is
/// `--force`.
pub fn change(
    area: &dyn LuksArea,
    h: &LuksHeader,
    req: &KeySlotRequest,
    unlock: &[u8],
    secret: &dyn Fn(&str) -> Result<Vec<u8>>,
    force: bool,
) -> std::result::Result<LuksHeader, KeySlotError> {
    let change = {
        let mut read = |off: u64, buf: &mut [u8]| area.read_area(off, buf);
        keyslots::plan(
            h,
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
    apply(area, h, &change).map_err(|error| KeySlotError::Failed {
        message: keyslots::write_failure(&change, &error),
        error,
    })
}

/// Write `change` to `area` in the module's order; returns the header now
/// on disk.
fn apply(area: &dyn LuksArea, h: &LuksHeader, change: &KeySlotChange) -> Result<LuksHeader> {
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
                write_descriptors(area, &new, &[i], true)?;
            }
            area.write_area(u64::from(desc.key_offset) * SECTOR_SIZE, &material)?;
            new.slots[i] = KeySlot {
                active: false,
                ..desc
            };
            write_descriptors(area, &new, &[i], false)?;
            new.slots[i] = desc;
            write_descriptors(area, &new, &[i], true)?;
        }
        KeySlotChange::Erase { slots } => {
            for &i in slots {
                new.slots[i].active = false;
            }
            write_descriptors(area, &new, slots, true)?;
            for &i in slots {
                new.slots[i] = h.slots[i].erased();
            }
            write_descriptors(area, &new, slots, false)?;
            for &i in slots {
                let mut garbage = vec![0u8; index(h.material_len(i))];
                crate::crypto::random(&mut garbage)?;
                area.write_area(u64::from(h.slots[i].key_offset) * SECTOR_SIZE, &garbage)?;
            }
        }
    }
    Ok(new)
}

/// Write the descriptors of `slots` from `h` in one write and flush it
/// (the bytes between them as they are on disk); with `active_only`, only
/// their 4-byte `active` words change.
fn write_descriptors(
    area: &dyn LuksArea,
    h: &LuksHeader,
    slots: &[usize],
    active_only: bool,
) -> Result<()> {
    let (Some(&first), Some(&last)) = (slots.iter().min(), slots.iter().max()) else {
        return Ok(());
    };
    let start = luks::slot_descriptor_offset(first);
    let end = luks::slot_descriptor_offset(last) + 48;
    let mut bytes = vec![0u8; end - start];
    area.read_area(start as u64, &mut bytes)?;
    for &i in slots {
        let at = luks::slot_descriptor_offset(i) - start;
        let len = if active_only { 4 } else { 48 };
        bytes[at..at + len].copy_from_slice(&h.slots[i].serialize()[..len]);
    }
    area.write_area(start as u64, &bytes)
}
