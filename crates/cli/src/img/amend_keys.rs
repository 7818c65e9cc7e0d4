//! `amend -o encrypt.state=...`: the LUKS key-slot options of qemu-img's amend,
//! parsed in QEMU's two stages (the option list's number check, then the
//! key-slot request's own fields, in their order), with QEMU's messages.

use anyhow::{bail, Result};
use strata_format::crypto::keyslots::{KeySlotRequest, SlotState};

/// The option list's check of a number option (`encrypt.keyslot`,
/// `encrypt.iter-time`): any 64-bit magnitude, negative ones included.
fn check_opt_number(key: &str, v: &str) -> Result<()> {
    strata_jobs::create::parse_opt_number(key, v)
        .map(drop)
        .map_err(|e| anyhow::anyhow!(e))
}

/// The request's integer fields: a signed 64-bit value.
fn keyval_int(name: &str, v: &str) -> Result<i64> {
    let bad = || anyhow::anyhow!("Parameter '{name}' expects integer");
    let (neg, n) = strata_jobs::create::c_number(v).map_err(|_| bad())?;
    if neg {
        0i64.checked_sub_unsigned(n).ok_or_else(bad)
    } else {
        i64::try_from(n).map_err(|_| bad())
    }
}

/// The last value given for `name` (below `encrypt.`).
fn last<'a>(items: &'a [(String, String)], name: &str) -> Option<&'a str> {
    items
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The first stage: the number options must be numbers (checked before the
/// image's encryption is looked at, as qemu-img parses its option list first).
/// Messages name each option with `prefix` (`encrypt.` for qcow2).
pub fn check_numbers(items: &[(String, String)], prefix: &str) -> Result<()> {
    for (k, v) in items {
        if k == "keyslot" || k == "iter-time" {
            check_opt_number(&format!("{prefix}{k}"), v)?;
        }
    }
    Ok(())
}

/// The second stage: the request, its fields in QEMU's order (state, the
/// secrets, the slot, the time).
pub fn request(items: &[(String, String)]) -> Result<KeySlotRequest> {
    let state = match last(items, "state") {
        None => bail!("Parameter 'state' is missing"),
        Some("active") => SlotState::Active,
        Some("inactive") => SlotState::Inactive,
        Some(v) => bail!("Parameter 'state' does not accept value '{v}'"),
    };
    let keyslot = last(items, "keyslot")
        .map(|v| keyval_int("keyslot", v))
        .transpose()?;
    let iter_time = last(items, "iter-time")
        .map(|v| keyval_int("iter-time", v))
        .transpose()?;
    Ok(KeySlotRequest {
        state,
        new_secret: last(items, "new-secret").map(str::to_string),
        old_secret: last(items, "old-secret").map(str::to_string),
        // QEMU keeps the low 32 bits of the slot, and takes the time unsigned.
        keyslot: keyslot.map(|n| n as i32),
        iter_time: iter_time.map(|n| n as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn slot_numbers_are_read_as_qemu_reads_them() {
        let r = |v: &str| request(&items(&[("state", "inactive"), ("keyslot", v)]));
        assert_eq!(r("0x3").unwrap().keyslot, Some(3));
        assert_eq!(r(" 010").unwrap().keyslot, Some(8));
        assert_eq!(r("-1").unwrap().keyslot, Some(-1));
        assert_eq!(r("-4294967293").unwrap().keyslot, Some(3));
        assert_eq!(r("4294967296").unwrap().keyslot, Some(0));
        assert_eq!(
            r("18446744073709551615").unwrap_err().to_string(),
            "Parameter 'keyslot' expects integer"
        );
        let n = |v: &str| check_numbers(&items(&[("keyslot", v)]), "encrypt.");
        assert!(n("18446744073709551615").is_ok());
        assert_eq!(
            n("18446744073709551616").unwrap_err().to_string(),
            "Value '18446744073709551616' is too large for parameter 'encrypt.keyslot'"
        );
        for bad in ["", "1k", "5.5", "08", "0x"] {
            assert_eq!(
                n(bad).unwrap_err().to_string(),
                "Parameter 'encrypt.keyslot' expects a number",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_state_is_required_and_checked_first() {
        let e = request(&items(&[("keyslot", "x")])).unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'state' is missing");
        let e = request(&items(&[("state", "on"), ("keyslot", "x")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Parameter 'state' does not accept value 'on'"
        );
        let r = request(&items(&[("state", "active"), ("iter-time", "-5")])).unwrap();
        assert_eq!(r.iter_time, Some(u64::MAX - 4));
    }
}
