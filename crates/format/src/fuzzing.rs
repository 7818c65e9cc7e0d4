//! Drive the qcow2 driver over untrusted bytes: open, read, walk the allocation,
//! list snapshots and check. Shared by the hostile-image tests and the cargo-fuzz
//! target, so both exercise the same paths. Work is bounded whatever the image
//! claims (its virtual size, table sizes...), so a hostile image cannot make it hang.

use crate::qcow2::{Qcow2Image, Qcow2OpenOptions, Repair};
use crate::{BlockDevice, Result};
use std::sync::Arc;
use strata_storage::MemStorage;

/// Guest bytes read at most.
const READ_LIMIT: u64 = 8 << 20;
/// Allocation runs walked at most.
const EXTENT_LIMIT: usize = 4096;

/// Open `bytes` as a qcow2 image (read-only) and use it. The first error is
/// returned; a panic, a hang or a huge allocation is a bug.
pub fn exercise(bytes: &[u8]) -> Result<()> {
    let storage = Arc::new(MemStorage::from_vec(bytes.to_vec()));
    let img = Qcow2Image::open(
        storage,
        Qcow2OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    exercise_image(&img)
}

/// Use an open image as [`exercise`] does.
pub fn exercise_image(img: &Qcow2Image) -> Result<()> {
    let size = img.virtual_size();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size.min(READ_LIMIT) {
        let n = (size - off).min(buf.len() as u64) as usize;
        img.read(&mut buf[..n], off)?;
        off += n as u64;
    }
    let mut off = 0;
    let mut runs = 0;
    while off < size && runs < EXTENT_LIMIT {
        let e = img.block_status(off, size - off)?;
        off += e.len;
        runs += 1;
    }
    for s in img.snapshots() {
        let view = img.snapshot_view(&s.id)?;
        let mut first = vec![0u8; view.virtual_size().min(65536) as usize];
        view.read(&mut first, 0)?;
    }
    img.check(Repair::None)?;
    Ok(())
}
