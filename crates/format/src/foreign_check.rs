//! `check` of the formats of other tools whose QEMU drivers check their own
//! tables (vdi, vhdx, vmdk): what qemu-img's check reports for them, in the
//! report qcow2's check fills ([`CheckReport`]). These drivers repair nothing.

use crate::qcow2::CheckReport;
use crate::{BlockDevice, Result};

/// Check the image `dev` holds (opened by its format's driver), as QEMU's
/// driver for its format checks it.
pub fn check(dev: &dyn BlockDevice) -> Result<CheckReport> {
    if let Some(v) = dev.as_any().downcast_ref::<crate::vmdk::VmdkImage>() {
        return crate::vmdk::check(v);
    }
    if let Some(vdi) = dev.as_any().downcast_ref::<crate::vdi::VdiImage>() {
        let r = vdi.check(false)?;
        return Ok(CheckReport {
            corruptions: r.corruptions,
            messages: r.errors,
            ..CheckReport::default()
        });
    }
    if let Some(img) = dev.as_any().downcast_ref::<crate::vhdx::VhdxImage>() {
        return crate::vhdx::check_report(img);
    }
    Ok(CheckReport::default())
}
