//! `rebase`: give an image a new backing file. Safe mode first copies into the
//! image every range where the old and the new backing content differ (only where
//! the image itself stores nothing), so the guest view does not change; unsafe
//! mode (`-u`) only rewrites the pointer. The pointer changes last, in one header
//! write, after the copied data is flushed.

use crate::convert::is_zero;
use crate::{Cancel, Progress, Result};
use std::sync::Arc;
use strata_format::{BlockDevice, Status};

/// Bytes compared per step.
const CHUNK: u64 = 1 << 20;

/// What a safe rebase copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebaseStats {
    /// Bytes compared (ranges the image does not store itself).
    pub compared: u64,
    /// Bytes copied into the image because old and new backing content differ.
    pub copied: u64,
}

/// Copy into `image` (attached to its old backing chain) every range it does not
/// store whose content differs between the old chain and `new_backing` (`None`: no
/// backing file, zeroes). Flushes `image`; the caller then rewrites the pointer.
pub fn copy_differences(
    image: &Arc<dyn BlockDevice>,
    new_backing: Option<&Arc<dyn BlockDevice>>,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<RebaseStats> {
    let size = image.virtual_size();
    let new_size = new_backing.map_or(0, |b| b.virtual_size());
    progress.set_total(size);
    let mut stats = RebaseStats::default();
    let mut old = vec![0u8; CHUNK as usize];
    let mut new = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < size {
        cancel.check()?;
        let ext = image.block_status(off, (size - off).min(CHUNK))?;
        let n = ext.len;
        if ext.status == Status::Unallocated {
            let len = n as usize;
            // Old view: the image reads through its current backing chain here.
            image.read(&mut old[..len], off)?;
            // New view: the new backing file, zeroes past its end or without one.
            new[..len].fill(0);
            if let Some(b) = new_backing {
                if off < new_size {
                    let m = (new_size - off).min(n) as usize;
                    b.read(&mut new[..m], off)?;
                }
            }
            stats.compared += n;
            if old[..len] != new[..len] {
                // Copy only the sectors that differ, keeping the image sparse.
                let mut i = 0;
                while i < len {
                    let e = (i + 512).min(len);
                    let mut j = i;
                    while j < len && old[j..(j + 512).min(len)] != new[j..(j + 512).min(len)] {
                        j = (j + 512).min(len);
                    }
                    if j > i {
                        if is_zero(&old[i..j]) {
                            image.write_zeroes(off + i as u64, (j - i) as u64, false)?;
                        } else {
                            image.write(&old[i..j], off + i as u64)?;
                        }
                        stats.copied += (j - i) as u64;
                        i = j;
                    } else {
                        i = e;
                    }
                }
            }
        }
        off += n;
        progress.advance(n);
    }
    image.flush()?;
    Ok(stats)
}
