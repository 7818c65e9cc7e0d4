//! `qemu-img check -f vdi`: the block map's consistency, as QEMU checks it.

use super::bmap::is_allocated;
use super::image::VdiImage;
use crate::{Error, ErrorKind, Result};

/// What the check found (QEMU fills only the corruption count for vdi).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// The lines QEMU prints on stderr, each without its newline, in order.
    pub errors: Vec<String>,
    /// Corruptions found (one per error line).
    pub corruptions: u64,
}

impl VdiImage {
    /// Check the block map as QEMU's vdi check does: every allocated entry
    /// must lie below the block count and name a block no earlier entry names,
    /// and the allocated entries must number the header's allocated-block count.
    ///
    /// `emit` receives each error line (QEMU prints them to stderr as they are
    /// found, without a limit), so a hostile map costs no memory per error.
    /// `repair` (`check -r`) is refused as QEMU refuses it for this format.
    pub fn check_with(&self, repair: bool, emit: &mut dyn FnMut(String)) -> Result<u64> {
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
                        emit(format!("ERROR: block index {entry} also used by {entry}"));
                        corruptions += 1;
                    }
                } else {
                    emit(format!("ERROR: block index {block} too large, is {entry}"));
                    corruptions += 1;
                }
            }
            if allocated != st.header.blocks_allocated {
                emit(format!(
                    "ERROR: allocated blocks mismatch, is {allocated}, should be {}",
                    st.header.blocks_allocated
                ));
                corruptions += 1;
            }
            Ok(corruptions)
        })
    }

    /// [`Self::check_with`], its error lines collected.
    pub fn check(&self, repair: bool) -> Result<CheckReport> {
        let mut errors = Vec::new();
        let corruptions = self.check_with(repair, &mut |l| errors.push(l))?;
        Ok(CheckReport {
            errors,
            corruptions,
        })
    }
}
