//! A snapshot's disk as a read-only [`BlockDevice`], so anything that reads
//! devices (the NBD server, a converter) reads a backup in place: a read maps its
//! offset to the blobs holding it, loads each (authenticated and hash-checked, as
//! a restore does) and copies the part asked for. The last few blobs read are
//! kept, so small sequential reads do not load a 4 MiB blob each time. Zero
//! blobs are reported as zero extents and never loaded.

use crate::error::Result;
use crate::pack::BlobType;
use crate::repository::Repository;
use crate::restore::{disk_node, layout, Piece};
use crate::tree::Snapshot;
use std::sync::{Arc, Mutex};
use strata_format::{BlockDevice, Extent, Status};

/// Blobs kept in memory.
const CACHED: usize = 8;

/// The disk of one snapshot.
pub struct SnapshotDevice {
    repo: Arc<Repository>,
    pieces: Vec<Piece>,
    size: u64,
    /// Recently loaded blobs, by piece index, most recent last.
    cache: Mutex<Vec<(usize, Arc<Vec<u8>>)>>,
}

impl SnapshotDevice {
    /// The disk of `snap` (every blob located in the index up front).
    pub fn open(repo: Arc<Repository>, snap: &Snapshot) -> Result<SnapshotDevice> {
        let node = disk_node(&repo, snap)?;
        let pieces = layout(&repo, &node)?;
        Ok(SnapshotDevice {
            repo,
            pieces,
            size: node.size,
            cache: Mutex::new(Vec::new()),
        })
    }

    /// The index of the piece holding `offset` (which is inside the disk).
    fn piece_at(&self, offset: u64) -> usize {
        self.pieces.partition_point(|p| p.end() <= offset)
    }

    fn blob(&self, i: usize) -> strata_format::Result<Arc<Vec<u8>>> {
        if let Some((_, b)) = self
            .cache
            .lock()
            .expect("cache")
            .iter()
            .find(|(j, _)| *j == i)
        {
            return Ok(b.clone());
        }
        let p = &self.pieces[i];
        let data = self.repo.load_blob(BlobType::Data, &p.id).map_err(|e| {
            strata_format::Error::corrupt(format!("backup blob at disk offset {}: {e}", p.offset))
        })?;
        let data = Arc::new(data);
        let mut cache = strata_storage::sync::lock(&self.cache);
        if cache.len() >= CACHED {
            cache.remove(0);
        }
        cache.push((i, data.clone()));
        Ok(data)
    }

    fn read_only_error() -> strata_format::Error {
        strata_format::Error::read_only()
    }
}

impl BlockDevice for SnapshotDevice {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> strata_format::Result<()> {
        strata_format::check_range(offset, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let i = self.piece_at(pos);
            let p = self.pieces[i];
            let n = ((p.end() - pos) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            if p.zero {
                out.fill(0);
            } else {
                let data = self.blob(i)?;
                let from = (pos - p.offset) as usize;
                out.copy_from_slice(&data[from..from + n]);
            }
            done += n;
        }
        Ok(())
    }

    fn write(&self, _: &[u8], _: u64) -> strata_format::Result<()> {
        Err(Self::read_only_error())
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> strata_format::Result<()> {
        Err(Self::read_only_error())
    }

    fn discard(&self, _: u64, _: u64) -> strata_format::Result<()> {
        Err(Self::read_only_error())
    }

    fn flush(&self) -> strata_format::Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> strata_format::Result<Extent> {
        strata_format::check_range(offset, len.max(1), self.size)?;
        let end = offset + len;
        let mut i = self.piece_at(offset);
        let zero = self.pieces[i].zero;
        let mut reach = self.pieces[i].end();
        while reach < end && i + 1 < self.pieces.len() && self.pieces[i + 1].zero == zero {
            i += 1;
            reach = self.pieces[i].end();
        }
        Ok(Extent {
            offset,
            len: reach.min(end) - offset,
            status: if zero {
                Status::Zero { host_offset: None }
            } else {
                Status::Data {
                    host_offset: None,
                    compressed: false,
                }
            },
        })
    }

    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }

    fn set_backing(&self, _: Option<Arc<dyn BlockDevice>>) {}

    fn read_only(&self) -> bool {
        true
    }

    fn allocated_bytes(&self) -> strata_format::Result<Option<u64>> {
        Ok(None)
    }

    fn resize(&self, _: u64, _: bool) -> strata_format::Result<()> {
        Err(Self::read_only_error())
    }

    fn path(&self) -> Option<std::path::PathBuf> {
        None
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
