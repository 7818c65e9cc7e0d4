//! `amend` of a `luks` image: QEMU's luks amend options (`state`,
//! `new-secret`, `old-secret`, `keyslot`, `iter-time`, without qcow2's
//! `encrypt.` prefix), checked in qemu-img's order (the image is opened with its
//! secret first), written by the key-slot code LUKS-encrypted qcow2 images use.

use super::amend::{change_key_slots, KeyImage};
use strata_format::luks::LuksImage;
use strata_format::Format;

/// The options a luks amend takes.
const AMEND_KEYS: [&str; 5] = ["state", "new-secret", "old-secret", "keyslot", "iter-time"];
/// Amend the luks image `spec` names as `items` ask (`force` is `--force`).
/// The error is the text qemu-img prints after its name.
pub fn run(
    items: &[(String, String)],
    spec: &strata_chain::OpenSpec,
    force: bool,
    bar: &super::qsteps::QemuSteps,
) -> Result<i32, String> {
    // qemu-img opens the image as any LUKS writer (sharing writing: nothing is
    // written yet) and asks for the key update's locks only once the options
    // are read; strata takes them at the same point, before any key slot is
    // written (see `LockMode::UpdateKeys`).
    let open_spec = spec.clone().writes_no_raw_data(true);
    let dev = strata_chain::open_top(&open_spec, Format::Luks, true).map_err(|e| {
        format!(
            "{}\n",
            super::common::open_error(&spec.path, &spec.shown_name(), &e)
        )
    })?;
    let img = dev
        .as_any()
        .downcast_ref::<LuksImage>()
        .ok_or_else(|| "Could not open the image as luks\n".to_string())?;
    for (k, _) in items {
        // nocow is the file's option, not the format's: a plain invalid parameter.
        let create_only = strata_jobs::create::LUKS_KEYS.contains(&k.as_str()) && k != "nocow";
        if create_only && !AMEND_KEYS.contains(&k.as_str()) {
            return Err(format!(
                "Invalid parameter '{k}'\nThis option is only supported for image creation\n"
            ));
        }
        if !AMEND_KEYS.contains(&k.as_str()) {
            return Err(format!("Invalid parameter '{k}'\n"));
        }
    }
    super::amend_keys::check_numbers(items, "").map_err(|e| format!("{e}\n"))?;
    // The options parsed, qemu-img shows 0% before the driver reads them, and
    // 100% once it is done, whether it succeeded or not.
    bar.set(0.0);
    let amended = amend_keys(img, items, spec, force);
    bar.set(100.0);
    amended?;
    dev.close().map_err(|e| format!("{e}\n"))?;
    Ok(0)
}

/// The key-slot change the options ask for, as QEMU's luks driver makes it.
fn amend_keys(
    img: &LuksImage,
    items: &[(String, String)],
    spec: &strata_chain::OpenSpec,
    force: bool,
) -> Result<(), String> {
    let req = super::amend_keys::request(items).map_err(|e| format!("{e}\n"))?;
    let storage = img.storage();
    if let (Some(file), Some(path)) = (storage.file(), storage.path()) {
        strata_storage::lock::acquire(file, path, strata_storage::LockMode::UpdateKeys)
            .map_err(|e| format!("{e}\n"))?;
    }
    change_key_slots(KeyImage::Luks(img), spec, &req, force)
}
