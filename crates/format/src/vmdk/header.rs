//! The binary headers of sparse extents: the hosted sparse header ("KDMV",
//! VMware's Virtual Disk Format 1.1, with the stream-optimized footer) and
//! the older VMFS sparse header ("COWD").
//!
//! All fields are little-endian except the magic, which reads as the
//! big-endian number of its ASCII letters.

use crate::{Error, Result};

/// "KDMV" as QEMU compares it (big-endian).
pub const KDMV_MAGIC: u32 = u32::from_be_bytes(*b"KDMV");
/// "COWD" as QEMU compares it (big-endian).
pub const COWD_MAGIC: u32 = u32::from_be_bytes(*b"COWD");

/// Header flag: newline-corruption detection bytes are present.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// Header flag: a redundant grain directory is kept.
pub const FLAG_RGD: u32 = 1 << 1;
/// Header flag: grain table entry 1 means "zeroed grain".
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Header flag: grains are compressed.
pub const FLAG_COMPRESS: u32 = 1 << 16;
/// Header flag: the stream has markers before grains and metadata.
pub const FLAG_MARKER: u32 = 1 << 17;
/// `gd_offset` value saying the grain directory is given in the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// `compress_algorithm` value for deflate (zlib).
pub const COMPRESSION_DEFLATE: u16 = 1;

/// Marker type of the footer in a stream-optimized file.
pub const MARKER_FOOTER: u32 = 3;
/// Marker type of the end of stream.
pub const MARKER_END_OF_STREAM: u32 = 0;

/// Bytes the hosted sparse header occupies after the magic.
pub const SPARSE_HEADER_LEN: usize = 75;

/// The hosted sparse extent header (the fields after the magic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub granularity: u64,
    /// Sector of the embedded descriptor (0: none).
    pub desc_offset: u64,
    /// Embedded descriptor length in sectors.
    pub desc_size: u64,
    pub num_gtes_per_gt: u32,
    /// Sector of the redundant grain directory.
    pub rgd_offset: u64,
    /// Sector of the grain directory, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// Sector where grains start.
    pub grain_offset: u64,
    pub compress_algorithm: u16,
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The big-endian magic of the first four bytes of `b` (0 when shorter).
pub fn magic(b: &[u8]) -> u32 {
    match b.get(..4) {
        Some(m) => u32::from_be_bytes([m[0], m[1], m[2], m[3]]),
        None => 0,
    }
}

impl SparseHeader {
    /// Parse the header from `b`, the bytes that follow the magic (at least
    /// [`SPARSE_HEADER_LEN`]).
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < SPARSE_HEADER_LEN {
            return Err(Error::invalid("File is too small, not a valid image"));
        }
        Ok(SparseHeader {
            version: le32(b, 0),
            flags: le32(b, 4),
            capacity: le64(b, 8),
            granularity: le64(b, 16),
            desc_offset: le64(b, 24),
            desc_size: le64(b, 32),
            num_gtes_per_gt: le32(b, 40),
            rgd_offset: le64(b, 44),
            gd_offset: le64(b, 52),
            grain_offset: le64(b, 60),
            compress_algorithm: u16::from_le_bytes([b[73], b[74]]),
        })
    }

    /// The first sector of a hosted sparse extent: magic, header, the
    /// newline-detection bytes QEMU writes; zero elsewhere.
    pub fn to_sector(self) -> [u8; 512] {
        let mut s = [0u8; 512];
        s[0..4].copy_from_slice(b"KDMV");
        let h = &mut s[4..];
        h[0..4].copy_from_slice(&self.version.to_le_bytes());
        h[4..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..16].copy_from_slice(&self.capacity.to_le_bytes());
        h[16..24].copy_from_slice(&self.granularity.to_le_bytes());
        h[24..32].copy_from_slice(&self.desc_offset.to_le_bytes());
        h[32..40].copy_from_slice(&self.desc_size.to_le_bytes());
        h[40..44].copy_from_slice(&self.num_gtes_per_gt.to_le_bytes());
        h[44..52].copy_from_slice(&self.rgd_offset.to_le_bytes());
        h[52..60].copy_from_slice(&self.gd_offset.to_le_bytes());
        h[60..68].copy_from_slice(&self.grain_offset.to_le_bytes());
        // One filler byte, then the check bytes "\n \r\n".
        h[69..73].copy_from_slice(&[0x0a, 0x20, 0x0d, 0x0a]);
        h[73..75].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        s
    }

    /// The header a stream-optimized file's footer carries, from the
    /// 1536 bytes that end the file (footer marker, footer, end-of-stream
    /// marker), checked as QEMU checks them.
    pub fn from_footer(b: &[u8]) -> Result<Self> {
        let bad = || Error::invalid("Invalid footer");
        if b.len() < 1536 {
            return Err(bad());
        }
        let (fm, rest) = b.split_at(512);
        let (footer, eos) = rest.split_at(512);
        if magic(footer) != KDMV_MAGIC
            || le32(fm, 8) != 0
            || le32(fm, 12) != MARKER_FOOTER
            || le64(eos, 0) != 0
            || le32(eos, 8) != 0
            || le32(eos, 12) != MARKER_END_OF_STREAM
        {
            return Err(bad());
        }
        Self::parse(&footer[4..])
    }
}

/// The VMFS sparse ("COWD") header fields QEMU uses (after the magic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowdHeader {
    pub disk_sectors: u32,
    pub granularity: u32,
    pub l1dir_offset: u32,
    pub l1dir_size: u32,
}

impl CowdHeader {
    /// Parse from the bytes that follow the magic (at least 40).
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < 40 {
            return Err(Error::invalid("File is too small, not a valid image"));
        }
        Ok(CowdHeader {
            disk_sectors: le32(b, 8),
            granularity: le32(b, 12),
            l1dir_offset: le32(b, 16),
            l1dir_size: le32(b, 20),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = SparseHeader {
            version: 1,
            flags: FLAG_RGD | FLAG_NL_DETECT,
            capacity: 8192,
            granularity: 128,
            desc_offset: 1,
            desc_size: 20,
            num_gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 26,
            grain_offset: 128,
            compress_algorithm: 0,
        };
        let s = h.to_sector();
        assert_eq!(magic(&s), KDMV_MAGIC);
        assert_eq!(SparseHeader::parse(&s[4..]).unwrap(), h);
    }
}
