//! `qemu-img check -f vdi`: the block map's consistency, as QEMU checks it.

use super::bmap::is_allocated;
use super::image::VdiImage;
use crate::{Error, ErrorKind, Result};

/// The most error lines [`VdiImage::check`] keeps.
pub const MAX_KEPT_ERRORS: usize = 1 << 20;

/// What the check found (QEMU fills only the corruption count for vdi).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// The lines QEMU prints on stderr, each without its newline, in order.
    pub errors: Vec<String>,
    /// Corruptions found (one per error line, kept or not).
    pub corruptions: u64,
}

impl VdiImage {
    /// Check the block map as QEMU's vdi check does: every allocated entry
    /// must lie below the block count and name a block no earlier entry names,
    /// and the allocated entries must number the header's allocated-block count.
    ///
    /// `emit` receives each error line (QEMU prints them to stderr as they are
    /// found, without a limit), unformatted, so a hostile map costs neither
    /// memory nor formatting per error the caller does not keep.
    /// `repair` (`check -r`) is refused as QEMU refuses it for this format.
    pub fn check_with(
        &self,
        repair: bool,
        emit: &mut dyn FnMut(std::fmt::Arguments),
    ) -> Result<u64> {
        if repair {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "This image format does not support checks",
            ));
        }
        self.with_state(|st| {
            let blocks = st.header.blocks_in_image;
            let mut used = vec![0u64; crate::units::index(u64::from(blocks).div_ceil(64))];
            let mut allocated: u32 = 0;
            let mut corruptions = 0u64;
            for block in 0..st.bmap.blocks() {
                let entry = st.bmap.get(block);
                if !is_allocated(entry) {
                    continue;
                }
                if entry < blocks {
                    allocated += 1;
                    let (word, bit) = (crate::units::index(u64::from(entry / 64)), entry % 64);
                    if used[word] & (1 << bit) == 0 {
                        used[word] |= 1 << bit;
                    } else {
                        emit(format_args!(
                            "ERROR: block index {entry} also used by {entry}"
                        ));
                        corruptions += 1;
                    }
                } else {
                    emit(format_args!(
                        "ERROR: block index {block} too large, is {entry}"
                    ));
                    corruptions += 1;
                }
            }
            if allocated != st.header.blocks_allocated {
                emit(format_args!(
                    "ERROR: allocated blocks mismatch, is {allocated}, should be {}",
                    st.header.blocks_allocated
                ));
                corruptions += 1;
            }
            Ok(corruptions)
        })
    }

    /// [`Self::check_with`], its error lines collected: the first
    /// [`MAX_KEPT_ERRORS`] of them (a hostile map can name block 0 half a
    /// billion times; QEMU prints every line, this keeps memory bounded), while
    /// `corruptions` counts them all.
    pub fn check(&self, repair: bool) -> Result<CheckReport> {
        let mut errors = Vec::new();
        let corruptions = self.check_with(repair, &mut |l| {
            if errors.len() < MAX_KEPT_ERRORS {
                errors.push(l.to_string());
            }
        })?;
        Ok(CheckReport {
            errors,
            corruptions,
        })
    }
}
