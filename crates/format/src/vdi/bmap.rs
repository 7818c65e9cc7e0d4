//! The block map: one little-endian 32-bit entry per guest block, the index
//! of its block in the data area, or `0xffffffff` (never written) or
//! `0xfffffffe` (discarded), both reading as zeroes.

use super::header::{DISCARDED, SECTOR_SIZE};

const _: () = assert!(SECTOR_SIZE == 512);
use crate::units::index;

/// Entries per sector of the map.
const PER_SECTOR: u32 = 512 / 4;

/// Whether a map entry names a stored block.
pub fn is_allocated(entry: u32) -> bool {
    entry < DISCARDED
}

/// The block map as QEMU holds it: whole sectors read from the file.
///
/// Only the part that lies inside the file is held: past the file's end QEMU
/// reads zeroes, so those entries are 0 (block 0), and memory stays bounded
/// by the file's size whatever the header claims.
#[derive(Debug, Clone)]
pub struct BlockMap {
    /// The map's bytes from its start, possibly shorter than `len`.
    bytes: Vec<u8>,
    /// The map's length in bytes (whole sectors).
    len: u64,
    /// Entries that count (`blocks_in_image`).
    blocks: u32,
}

impl BlockMap {
    /// A map of `blocks` entries occupying `len` bytes (whole sectors), of
    /// which `bytes` (at most `len`) were read from the file.
    pub fn new(mut bytes: Vec<u8>, len: u64, blocks: u32) -> BlockMap {
        bytes.truncate(index(len));
        BlockMap { bytes, len, blocks }
    }

    /// Entries that count (`blocks_in_image`).
    pub fn blocks(&self) -> u32 {
        self.blocks
    }

    /// The entry of guest block `block` (below [`Self::blocks`]).
    pub fn get(&self, block: u32) -> u32 {
        let at = index(u64::from(block) * 4);
        match self.bytes.get(at..at + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }

    /// Set the entry of guest block `block` (below [`Self::blocks`]).
    pub fn set(&mut self, block: u32, entry: u32) {
        let at = index(u64::from(block) * 4);
        if self.bytes.len() < at + 4 {
            self.bytes.resize(at + 4, 0);
        }
        self.bytes[at..at + 4].copy_from_slice(&entry.to_le_bytes());
    }

    /// The byte offset in the map of the sector holding entry `first`, and the
    /// bytes of the sectors from that one through the one holding entry `last`:
    /// what QEMU writes back after allocating blocks `first..=last`.
    pub fn sectors(&self, first: u32, last: u32) -> (u64, Vec<u8>) {
        let start = u64::from(first / PER_SECTOR) * SECTOR_SIZE;
        let end = (u64::from(last / PER_SECTOR) + 1) * SECTOR_SIZE;
        let end = end.min(self.len);
        let mut out = vec![0u8; index(end.saturating_sub(start))];
        let have = index(end.min(self.bytes.len() as u64));
        if let Some(src) = self.bytes.get(index(start)..have) {
            out[..src.len()].copy_from_slice(src);
        }
        (start, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vdi::header::UNALLOCATED;

    #[test]
    fn short_map_reads_zero_entries() {
        let m = BlockMap::new(vec![0xff; 8], 512, 100);
        assert_eq!(m.get(0), UNALLOCATED);
        assert_eq!(m.get(1), UNALLOCATED);
        assert_eq!(m.get(2), 0);
    }

    #[test]
    fn sectors_cover_the_entries() {
        let mut m = BlockMap::new(vec![0xff; 1536], 1536, 300);
        m.set(200, 7);
        let (off, bytes) = m.sectors(200, 200);
        assert_eq!(off, 512);
        assert_eq!(bytes.len(), 512);
        assert_eq!(
            &bytes[(200 - 128) * 4..(200 - 128) * 4 + 4],
            &7u32.to_le_bytes()
        );
        let (off, bytes) = m.sectors(1, 299);
        assert_eq!((off, bytes.len()), (0, 1536));
    }
}
