//! The on-disk structures of a VHD file: the 512-byte footer (a copy of which
//! heads a dynamic disk) and the dynamic disk header, both big-endian and
//! guarded by a ones'-complement byte-sum checksum.

/// Size of the footer, and the unit of every VHD offset.
pub const FOOTER_SIZE: usize = 512;
/// Size of the dynamic disk header.
pub const DYN_HEADER_SIZE: usize = 1024;
/// The footer's cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// The dynamic disk header's cookie.
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// Disk types of the footer's `type` field.
pub const TYPE_FIXED: u32 = 2;
pub const TYPE_DYNAMIC: u32 = 3;
/// A BAT entry for a block not stored in the file.
pub const BAT_UNALLOCATED: u32 = 0xffff_ffff;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;

/// Byte offset of the checksum field in both structures.
const FOOTER_CHECKSUM_AT: usize = 64;
const DYN_CHECKSUM_AT: usize = 36;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The ones' complement of the byte sum of `buf`, the field at
/// `checksum_at..+4` counted as zero.
pub fn checksum(buf: &[u8], checksum_at: usize) -> u32 {
    let sum = buf.iter().enumerate().fold(0u32, |acc, (i, &b)| {
        if (checksum_at..checksum_at + 4).contains(&i) {
            acc
        } else {
            acc.wrapping_add(u32::from(b))
        }
    });
    !sum
}

/// The fields of a footer strata uses or writes; [`Footer::raw`] keeps the
/// bytes as read, which are what a growing dynamic disk writes back at its
/// end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub raw: [u8; FOOTER_SIZE],
}

impl Footer {
    /// The footer in `buf` (512 bytes).
    pub fn from_bytes(buf: &[u8; FOOTER_SIZE]) -> Self {
        Footer { raw: *buf }
    }
    pub fn has_cookie(&self) -> bool {
        &self.raw[0..8] == FOOTER_COOKIE
    }
    /// Whether the stored checksum matches the footer's bytes.
    pub fn checksum_ok(&self) -> bool {
        checksum(&self.raw, FOOTER_CHECKSUM_AT) == be32(&self.raw, FOOTER_CHECKSUM_AT)
    }
    pub fn data_offset(&self) -> u64 {
        be64(&self.raw, 16)
    }
    pub fn creator_app(&self) -> [u8; 4] {
        [self.raw[28], self.raw[29], self.raw[30], self.raw[31]]
    }
    pub fn current_size(&self) -> u64 {
        be64(&self.raw, 48)
    }
    /// Cylinders, heads, sectors per track.
    pub fn geometry(&self) -> (u16, u8, u8) {
        (be16(&self.raw, 56), self.raw[58], self.raw[59])
    }
    pub fn disk_type(&self) -> u32 {
        be32(&self.raw, 60)
    }

    /// A new footer as qemu-img writes it: `creator_app`, sizes in bytes,
    /// the CHS geometry, the disk type, `timestamp` (VHD epoch seconds),
    /// `uuid`, and its checksum.
    pub fn new(
        creator_app: &[u8; 4],
        size: u64,
        (cyls, heads, secs): (u16, u8, u8),
        disk_type: u32,
        timestamp: u32,
        uuid: [u8; 16],
    ) -> Self {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit
        b[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // format version 1.0
        let data_offset = if disk_type == TYPE_FIXED {
            u64::MAX
        } else {
            FOOTER_SIZE as u64
        };
        b[16..24].copy_from_slice(&data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&timestamp.to_be_bytes());
        b[28..32].copy_from_slice(creator_app);
        b[32..34].copy_from_slice(&5u16.to_be_bytes()); // Virtual PC 2007: 5.3
        b[34..36].copy_from_slice(&3u16.to_be_bytes());
        b[36..40].copy_from_slice(b"Wi2k");
        b[40..48].copy_from_slice(&size.to_be_bytes()); // original size
        b[48..56].copy_from_slice(&size.to_be_bytes()); // current size
        b[56..58].copy_from_slice(&cyls.to_be_bytes());
        b[58] = heads;
        b[59] = secs;
        b[60..64].copy_from_slice(&disk_type.to_be_bytes());
        b[68..84].copy_from_slice(&uuid);
        let sum = checksum(&b, FOOTER_CHECKSUM_AT);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        Footer { raw: b }
    }
}

/// The dynamic disk header's fields that locate and shape the BAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynHeader {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
}

impl DynHeader {
    /// The header in `buf` (its first 512 bytes suffice), or `None` without
    /// the cookie. Its checksum is not checked (QEMU does not).
    pub fn parse(buf: &[u8]) -> Option<Self> {
        if buf.len() < 40 || &buf[0..8] != DYN_COOKIE {
            return None;
        }
        Some(DynHeader {
            table_offset: be64(buf, 16),
            max_table_entries: be32(buf, 28),
            block_size: be32(buf, 32),
        })
    }

    /// The 1024 bytes of this header as qemu-img writes it (no parent).
    pub fn to_bytes(&self) -> [u8; DYN_HEADER_SIZE] {
        let mut b = [0u8; DYN_HEADER_SIZE];
        b[0..8].copy_from_slice(DYN_COOKIE);
        // The specification says 0xFFFFFFFF, Microsoft's tools expect all 64 bits set.
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        let sum = checksum(&b, DYN_CHECKSUM_AT);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_footer_checks_and_reads_back() {
        let f = Footer::new(b"qemu", 1 << 30, (2081, 16, 63), TYPE_DYNAMIC, 7, [1; 16]);
        assert!(f.has_cookie() && f.checksum_ok());
        assert_eq!(f.current_size(), 1 << 30);
        assert_eq!(f.geometry(), (2081, 16, 63));
        assert_eq!(f.disk_type(), TYPE_DYNAMIC);
        assert_eq!(f.data_offset(), 512);
        let mut g = f.clone();
        g.raw[100] ^= 1;
        assert!(!g.checksum_ok());
    }

    #[test]
    fn a_dynamic_header_reads_back() {
        let h = DynHeader {
            table_offset: 1536,
            max_table_entries: 9,
            block_size: 0x20_0000,
        };
        assert_eq!(DynHeader::parse(&h.to_bytes()), Some(h));
        assert_eq!(DynHeader::parse(&[0u8; 512]), None);
    }
}
