use crate::sync;
use crate::{Error, Result, Storage};
use std::sync::RwLock;

/// Storage in memory: for tests, models and scratch images.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        MemStorage {
            data: RwLock::new(bytes),
        }
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        sync::read(&self.data).clone()
    }
}

fn end_of(offset: u64, len: usize) -> Result<usize> {
    let end = offset.checked_add(len as u64).ok_or(Error::OutOfRange {
        offset,
        len: len as u64,
    })?;
    usize::try_from(end).map_err(|_| Error::OutOfRange {
        offset,
        len: len as u64,
    })
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = sync::read(&self.data);
        let end = end_of(offset, buf.len())?;
        let start = offset as usize;
        buf.fill(0);
        if start < data.len() {
            let avail = end.min(data.len()) - start;
            buf[..avail].copy_from_slice(&data[start..start + avail]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut data = sync::write(&self.data);
        let end = end_of(offset, buf.len())?;
        if end > data.len() {
            data.resize(end, 0);
        }
        data[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let mut data = sync::write(&self.data);
        let end = offset
            .checked_add(len)
            .ok_or(Error::OutOfRange { offset, len })?;
        let size = data.len() as u64;
        if offset < size {
            data[offset as usize..end.min(size) as usize].fill(0);
        }
        Ok(())
    }

    /// Memory is zeroed in place, as fast as any other write.
    fn write_zeroes_fast(&self, offset: u64, len: u64) -> Result<bool> {
        self.write_zeroes(offset, len)?;
        Ok(true)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    /// Memory holds no blocks to give back: the range is zeroed in place, in
    /// one operation as a file's punched hole is (so fault and crash models
    /// count the same operations as over a file).
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<bool> {
        self.write_zeroes(offset, len)?;
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn size(&self) -> Result<u64> {
        Ok(sync::read(&self.data).len() as u64)
    }

    fn set_size(&self, size: u64) -> Result<()> {
        let size = usize::try_from(size).map_err(|_| Error::OutOfRange {
            offset: size,
            len: 0,
        })?;
        sync::write(&self.data).resize(size, 0);
        Ok(())
    }

    fn allocated_bytes(&self) -> Result<Option<u64>> {
        Ok(Some(self.size()?))
    }
}
