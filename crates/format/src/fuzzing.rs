//! Drive the qcow2 driver over untrusted bytes: open, read, walk the allocation,
//! list snapshots and bitmaps, check, and (on a copy opened read-write) write.
//! Shared by the hostile-image tests and the cargo-fuzz target, so both exercise
//! the same paths. The work done here is bounded whatever the image claims (its
//! virtual size, table sizes, snapshot count...), so a hostile image cannot make
//! it hang; what the driver itself allocates or loops over is what is under test.

use crate::qcow2::{Qcow2Image, Qcow2OpenOptions, Repair};
use crate::{BlockDevice, Result};
use std::path::Path;
use std::sync::Arc;
use strata_storage::{MemStorage, Storage};

/// Guest bytes read at most.
const READ_LIMIT: u64 = 8 << 20;
/// Allocation runs walked at most.
const EXTENT_LIMIT: usize = 4096;
/// Snapshots whose view is opened and read at most.
const SNAPSHOT_LIMIT: usize = 16;
/// How far past its original size the write exercise lets the image file grow.
const GROWTH_LIMIT: u64 = 64 << 20;

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
        let n = crate::units::index((size - off).min(buf.len() as u64));
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
    for s in img.snapshots().iter().take(SNAPSHOT_LIMIT) {
        let view = img.snapshot_view(&s.id)?;
        let mut first = vec![0u8; view.virtual_size().min(65536) as usize];
        view.read(&mut first, 0)?;
    }
    img.bitmaps()?;
    img.check(Repair::None)?;
    Ok(())
}

/// Open a copy of `bytes` read-write (a dirty image is repaired first, as on any
/// read-write open), write a little at the start, the middle and the end of the
/// disk, flush and check. The file may grow by at most 64 MiB; past that, writes
/// fail with a storage error instead of allocating without bound.
pub fn exercise_write(bytes: &[u8]) -> Result<()> {
    let storage = Arc::new(Capped {
        inner: MemStorage::from_vec(bytes.to_vec()),
        limit: (bytes.len() as u64).saturating_add(GROWTH_LIMIT),
    });
    let img = Qcow2Image::open(storage, Qcow2OpenOptions::default())?;
    let size = img.virtual_size();
    let data = [0x5au8; 4096 + 512];
    for off in [0, size / 2, size.saturating_sub(data.len() as u64)] {
        let n = crate::units::index((size - off).min(data.len() as u64));
        img.write(&data[..n], off)?;
    }
    if size >= 8192 {
        img.write_zeroes(4096, 4096, true)?;
        img.discard(0, 4096)?;
    }
    img.flush()?;
    img.check(Repair::None)?;
    img.close()
}

/// Repair a copy of `bytes` as `check -r all` does and verify the repair's promise:
/// afterwards no cluster that any entry names (and qemu-img would count) has a
/// refcount below its references, so none that is still referenced can be handed
/// out again. Returns the repaired bytes (`None` when the image does not open for
/// repair), or a description of the broken promise. The file may grow by at most
/// 64 MiB.
pub fn repair_all(bytes: &[u8]) -> std::result::Result<Option<Vec<u8>>, String> {
    let storage = Arc::new(Capped {
        inner: MemStorage::from_vec(bytes.to_vec()),
        limit: (bytes.len() as u64).saturating_add(GROWTH_LIMIT),
    });
    let img = match Qcow2Image::open(
        storage.clone(),
        Qcow2OpenOptions {
            for_repair: true,
            no_auto_repair: true,
            for_check: true,
            ..Default::default()
        },
    ) {
        Ok(img) => img,
        Err(_) => return Ok(None),
    };
    let report = img.check(Repair::All).and_then(|r| img.close().map(|()| r));
    drop(img);
    let repaired = storage.inner.snapshot();
    let Ok(report) = report else {
        return Ok(Some(repaired));
    };
    if report.check_errors > 0 {
        return Ok(Some(repaired));
    }
    let again = Qcow2Image::open(
        Arc::new(MemStorage::from_vec(repaired.clone())),
        Qcow2OpenOptions {
            read_only: true,
            no_auto_repair: true,
            for_check: true,
            ..Default::default()
        },
    )
    .and_then(|img| img.check(Repair::None))
    .map_err(|e| format!("the repaired image does not check: {e}"))?;
    let low: Vec<&String> = again
        .messages
        .iter()
        .filter(|m| m.starts_with("ERROR cluster "))
        .collect();
    if low.is_empty() {
        Ok(Some(repaired))
    } else {
        Err(format!(
            "after repair, referenced clusters have refcounts below their references: {low:?}"
        ))
    }
}

/// A memory store that refuses to grow past `limit` bytes.
struct Capped {
    inner: MemStorage,
    limit: u64,
}

impl Capped {
    fn fits(&self, offset: u64, len: u64) -> strata_storage::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.limit => Ok(()),
            _ => Err(strata_storage::Error::OutOfRange { offset, len }),
        }
    }
}

impl Storage for Capped {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> strata_storage::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> strata_storage::Result<()> {
        self.fits(offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> strata_storage::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> strata_storage::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> strata_storage::Result<()> {
        self.inner.flush()
    }
    fn size(&self) -> strata_storage::Result<u64> {
        self.inner.size()
    }
    fn set_size(&self, size: u64) -> strata_storage::Result<()> {
        self.fits(size, 0)?;
        self.inner.set_size(size)
    }
    fn path(&self) -> Option<&Path> {
        None
    }
}
