//! Adding and erasing LUKS key slots, as QEMU's `amend` does with
//! `encrypt.state=active|inactive`: which slot a request names or finds, and
//! QEMU's refusals, checked in QEMU's order so the first one reported is the
//! same. Planning reads the key material (to find the master key, or the slots
//! an old password opens) but writes nothing; the image writes the change
//! (see `Qcow2Image::change_key_slots` for the order that keeps it crash safe).

use super::luks::{LuksHeader, NUM_KEY_SLOTS};
use crate::{Error, Result};

/// The state a request gives the slots it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Add a key (`encrypt.state=active`).
    Active,
    /// Erase keys (`encrypt.state=inactive`).
    Inactive,
}

/// What the `encrypt.*` amend options ask, secrets by their `--object` id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlotRequest {
    pub state: SlotState,
    /// The password of the slot to add.
    pub new_secret: Option<String>,
    /// Erase the slots this password opens.
    pub old_secret: Option<String>,
    /// The slot to add or erase. QEMU takes the option as a 64-bit number and
    /// keeps its low 32 bits, signed: that value.
    pub keyslot: Option<i32>,
    /// Milliseconds of PBKDF2 an unlock of the new slot should cost (QEMU's
    /// 64-bit value taken as unsigned, as QEMU scales it).
    pub iter_time: Option<u64>,
}

/// QEMU's unlock time for a new slot when `encrypt.iter-time` is not given.
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;

/// The change a request comes to.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySlotChange {
    /// Store `master` in `slot` for `password`.
    Add {
        slot: usize,
        master: Vec<u8>,
        password: Vec<u8>,
        iter_time_ms: u64,
    },
    /// Erase these slots (their descriptors and their key material).
    Erase { slots: Vec<usize> },
}

impl std::fmt::Debug for KeySlotChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySlotChange::Add {
                slot, iter_time_ms, ..
            } => f
                .debug_struct("Add")
                .field("slot", slot)
                .field("iter_time_ms", iter_time_ms)
                .finish_non_exhaustive(),
            KeySlotChange::Erase { slots } => {
                f.debug_struct("Erase").field("slots", slots).finish()
            }
        }
    }
}

impl KeySlotChange {
    /// The slot QEMU names when writing the change fails.
    pub fn first_slot(&self) -> usize {
        match self {
            KeySlotChange::Add { slot, .. } => *slot,
            KeySlotChange::Erase { slots } => slots.first().copied().unwrap_or(0),
        }
    }
}

/// Where a plan gets what it needs: secret values by id (an unknown id is an
/// error in QEMU's words), and the LUKS area's bytes.
pub struct PlanInputs<'a> {
    /// The password the image was opened with (`encrypt.key-secret`).
    pub unlock: &'a [u8],
    pub secret: &'a dyn Fn(&str) -> Result<Vec<u8>>,
    pub read: &'a mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    /// `--force`: overwrite an active slot, erase an inactive one or the last.
    pub force: bool,
}

fn refuse(msg: impl Into<String>) -> Error {
    Error::invalid_argument(msg)
}

/// The change `req` asks of the slots of `h`, or QEMU's refusal.
pub fn plan(h: &LuksHeader, req: &KeySlotRequest, io: PlanInputs<'_>) -> Result<KeySlotChange> {
    match req.state {
        SlotState::Active => plan_add(h, req, io),
        SlotState::Inactive => plan_erase(h, req, io),
    }
}

fn active_count(h: &LuksHeader) -> usize {
    h.slots.iter().filter(|s| s.active).count()
}

/// `n` as a slot index, if it is one.
fn slot_index(n: i32) -> Option<usize> {
    usize::try_from(n).ok().filter(|&i| i < NUM_KEY_SLOTS)
}

fn plan_add(h: &LuksHeader, req: &KeySlotRequest, io: PlanInputs<'_>) -> Result<KeySlotChange> {
    let Some(new_secret) = &req.new_secret else {
        return Err(refuse("'new-secret' is required to activate a keyslot"));
    };
    if req.old_secret.is_some() {
        return Err(refuse(
            "'old-secret' must not be given when activating keyslots",
        ));
    }
    let last = NUM_KEY_SLOTS - 1;
    let slot = match req.keyslot {
        // QEMU prints the index unsigned here.
        Some(n) => slot_index(n).ok_or_else(|| {
            refuse(format!(
                "Invalid keyslot {} specified, must be between 0 and {last}",
                n as u32
            ))
        })?,
        None => h
            .slots
            .iter()
            .position(|s| !s.active)
            .ok_or_else(|| refuse("Can't add a keyslot - all keyslots are in use"))?,
    };
    if !io.force && h.slots[slot].active {
        return Err(refuse(format!(
            "Refusing to overwrite active keyslot {slot} - please erase it first"
        )));
    }
    let master = h.find_key(io.unlock, io.read).map_err(|e| {
        Error::new(
            e.kind(),
            format!("{}\nFailed to retrieve the master key", e.message()),
        )
    })?;
    let password = (io.secret)(new_secret)?;
    Ok(KeySlotChange::Add {
        slot,
        master,
        password,
        iter_time_ms: req.iter_time.unwrap_or(DEFAULT_ITER_TIME_MS),
    })
}

fn plan_erase(h: &LuksHeader, req: &KeySlotRequest, io: PlanInputs<'_>) -> Result<KeySlotChange> {
    if req.new_secret.is_some() {
        return Err(refuse(
            "'new-secret' must not be given when erasing keyslots",
        ));
    }
    if req.iter_time.is_some() {
        return Err(refuse(
            "'iter-time' must not be given when erasing keyslots",
        ));
    }
    let old = req
        .old_secret
        .as_deref()
        .map(|id| (io.secret)(id))
        .transpose()?;
    let read = io.read;
    if let Some(n) = req.keyslot {
        let last = NUM_KEY_SLOTS - 1;
        let slot = slot_index(n).ok_or_else(|| {
            refuse(format!(
                "Invalid keyslot {n} specified, must be between 0 and {last}"
            ))
        })?;
        if let Some(old) = &old {
            if h.load_key(slot, old, read)?.is_none() {
                return Err(refuse(format!(
                    "Given keyslot {slot} doesn't contain the given old password for erase operation"
                )));
            }
        }
        if !io.force && !h.slots[slot].active {
            return Err(refuse(format!(
                "Given keyslot {slot} is already erased (inactive) "
            )));
        }
        if !io.force && active_count(h) == 1 {
            return Err(refuse(format!(
                "Attempt to erase the only active keyslot {slot} which will erase all the data in the image irreversibly - refusing operation"
            )));
        }
        return Ok(KeySlotChange::Erase { slots: vec![slot] });
    }
    let Some(old) = old else {
        return Err(refuse(
            "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given",
        ));
    };
    let mut slots = Vec::new();
    for i in 0..NUM_KEY_SLOTS {
        if h.load_key(i, &old, read)?.is_some() {
            slots.push(i);
        }
    }
    if slots.is_empty() {
        return Err(refuse(
            "No keyslots match given (old) password for erase operation",
        ));
    }
    if !io.force && slots.len() == active_count(h) {
        return Err(refuse(
            "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation",
        ));
    }
    Ok(KeySlotChange::Erase { slots })
}

/// The error of a key-slot change that failed while being written, as QEMU
/// reports it: the cause, then which slot (QEMU's hint, which ends without a
/// newline).
pub fn write_failure(change: &KeySlotChange, e: &Error) -> String {
    let what = match change {
        KeySlotChange::Add { .. } => "write to",
        KeySlotChange::Erase { .. } => "erase",
    };
    format!(
        "{}\nFailed to {what} keyslot {}",
        e.message(),
        change.first_slot()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::luks::{create, LuksCreateOptions};
    use crate::units::index;

    fn image() -> (LuksHeader, Vec<u8>) {
        let opts = LuksCreateOptions {
            iter_time_ms: 1,
            ..Default::default()
        };
        let (h, area, _) = create(&opts, b"zero").unwrap();
        (h, area)
    }

    fn request(state: SlotState) -> KeySlotRequest {
        KeySlotRequest {
            state,
            new_secret: None,
            old_secret: None,
            keyslot: None,
            iter_time: None,
        }
    }

    fn run(
        h: &LuksHeader,
        area: &[u8],
        req: &KeySlotRequest,
        force: bool,
    ) -> Result<KeySlotChange> {
        let secret = |id: &str| match id {
            "s0" => Ok(b"zero".to_vec()),
            "s1" => Ok(b"one".to_vec()),
            _ => Err(Error::invalid_argument(format!("No secret with id '{id}'"))),
        };
        let mut read = |off: u64, buf: &mut [u8]| {
            let o = index(off);
            buf.copy_from_slice(&area[o..o + buf.len()]);
            Ok(())
        };
        plan(
            h,
            req,
            PlanInputs {
                unlock: b"zero",
                secret: &secret,
                read: &mut read,
                force,
            },
        )
    }

    #[test]
    fn an_added_key_goes_to_the_first_free_slot_with_the_master_key() {
        let (h, area) = image();
        let mut r = request(SlotState::Active);
        r.new_secret = Some("s1".into());
        match run(&h, &area, &r, false).unwrap() {
            KeySlotChange::Add {
                slot,
                password,
                iter_time_ms,
                ..
            } => {
                assert_eq!((slot, password.as_slice()), (1, &b"one"[..]));
                assert_eq!(iter_time_ms, DEFAULT_ITER_TIME_MS);
            }
            other => panic!("{other:?}"),
        }
        r.keyslot = Some(0);
        let e = run(&h, &area, &r, false).unwrap_err();
        assert_eq!(
            e.message(),
            "Refusing to overwrite active keyslot 0 - please erase it first"
        );
        assert!(run(&h, &area, &r, true).is_ok());
        r.keyslot = Some(-1);
        let e = run(&h, &area, &r, true).unwrap_err();
        assert_eq!(
            e.message(),
            "Invalid keyslot 4294967295 specified, must be between 0 and 7"
        );
    }

    #[test]
    fn the_last_key_is_erased_only_with_force() {
        let (h, area) = image();
        let mut r = request(SlotState::Inactive);
        r.old_secret = Some("s0".into());
        let e = run(&h, &area, &r, false).unwrap_err();
        assert!(
            e.message().starts_with("All the active keyslots match"),
            "{e}"
        );
        assert_eq!(
            run(&h, &area, &r, true).unwrap(),
            KeySlotChange::Erase { slots: vec![0] }
        );
        r.old_secret = Some("s1".into());
        let e = run(&h, &area, &r, true).unwrap_err();
        assert_eq!(
            e.message(),
            "No keyslots match given (old) password for erase operation"
        );
        r.old_secret = None;
        r.keyslot = Some(0);
        let e = run(&h, &area, &r, false).unwrap_err();
        assert!(e
            .message()
            .starts_with("Attempt to erase the only active keyslot 0"));
        r.keyslot = Some(3);
        let e = run(&h, &area, &r, false).unwrap_err();
        assert_eq!(e.message(), "Given keyslot 3 is already erased (inactive) ");
    }
}
