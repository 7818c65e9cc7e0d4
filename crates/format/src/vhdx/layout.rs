//! The on-disk structures of a VHDX file (Microsoft's VHDX 1.0 specification,
//! as QEMU reads and writes it): file identifier, the two headers, the region
//! table, the metadata table and items, BAT entries, and their CRC-32C sums.
//!
//! Every structure is little-endian. Parsing takes bytes read from the file
//! and never trusts them: checks that need more context live with the caller.

/// 1 MiB: the unit of every region's offset and length.
pub const MIB: u64 = 1 << 20;
/// Offset of header 1 (header 2 follows 64 KiB later).
pub const HEADER1_OFFSET: u64 = 64 << 10;
/// Offset of header 2.
pub const HEADER2_OFFSET: u64 = 128 << 10;
/// Offset of the first region table (the second follows 64 KiB later).
pub const REGION_TABLE_OFFSET: u64 = 192 << 10;
/// Offset of the second region table.
pub const REGION_TABLE2_OFFSET: u64 = 256 << 10;
/// The bytes a header's checksum covers.
pub const HEADER_SIZE: usize = 4096;
/// The bytes the region table's and the metadata table's checksum or size cover.
pub const TABLE_SIZE: usize = 64 << 10;
/// The packed header's length (what an update writes).
pub const HEADER_STRUCT_LEN: usize = 80;
/// Payload block size limits.
pub const BLOCK_SIZE_MIN: u64 = MIB;
pub const BLOCK_SIZE_MAX: u64 = 256 * MIB;
/// Largest virtual disk the specification allows (64 TiB).
pub const MAX_IMAGE_SIZE: u64 = 64 << 40;
/// `2^23` sectors per chunk: a sector bitmap block covers this many sectors.
pub const MAX_SECTORS_PER_BLOCK: u64 = 1 << 23;

/// BAT entry states (the low 3 bits).
pub const PAYLOAD_BLOCK_NOT_PRESENT: u64 = 0;
pub const PAYLOAD_BLOCK_UNDEFINED: u64 = 1;
pub const PAYLOAD_BLOCK_ZERO: u64 = 2;
pub const PAYLOAD_BLOCK_UNMAPPED: u64 = 3;
pub const PAYLOAD_BLOCK_UNMAPPED_V095: u64 = 5;
pub const PAYLOAD_BLOCK_FULLY_PRESENT: u64 = 6;
pub const BAT_STATE_MASK: u64 = 7;
/// The file offset bits of a BAT entry (in whole MiB).
pub const BAT_FILE_OFF_MASK: u64 = 0xFFFF_FFFF_FFF0_0000;

/// Region table entry flag: a reader must understand the region.
pub const REGION_ENTRY_REQUIRED: u32 = 1;
/// Metadata entry flags.
pub const META_IS_VIRTUAL_DISK: u32 = 2;
pub const META_IS_REQUIRED: u32 = 4;
/// File parameter flags.
pub const PARAMS_LEAVE_BLOCKS_ALLOCATED: u32 = 1;
pub const PARAMS_HAS_PARENT: u32 = 2;

/// A GUID as its 16 bytes on disk (Microsoft's mixed-endian layout).
pub type Guid = [u8; 16];

/// Build the on-disk bytes of a GUID from its textual fields.
const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

pub const BAT_GUID: Guid = guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
pub const METADATA_GUID: Guid = guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
pub const FILE_PARAM_GUID: Guid = guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
pub const VIRTUAL_SIZE_GUID: Guid = guid(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
pub const PAGE83_GUID: Guid = guid(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
pub const PHYS_SECTOR_GUID: Guid = guid(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
pub const PARENT_LOCATOR_GUID: Guid = guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
pub const LOGICAL_SECTOR_GUID: Guid = guid(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);

/// A fresh random GUID (version 4 bits as a UUID generator sets them).
pub fn random_guid() -> Guid {
    let mut g = [0u8; 16];
    // A failing entropy source leaves a fixed GUID: GUIDs here are labels, not secrets.
    let _ = getrandom::getrandom(&mut g);
    g[6] = (g[6] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
pub fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[at..at + 16]);
    g
}

/// CRC-32C of `buf` with the 4 bytes at `crc_at` taken as zero (VHDX's
/// checksum rule).
pub fn checksum(buf: &[u8], crc_at: usize) -> u32 {
    let crc = crc32c::crc32c(&buf[..crc_at]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &buf[crc_at + 4..])
}

/// Whether the checksum stored at `crc_at` matches `buf`.
pub fn checksum_ok(buf: &[u8], crc_at: usize) -> bool {
    checksum(buf, crc_at) == le32(buf, crc_at)
}

/// Store `buf`'s checksum at `crc_at`.
pub fn set_checksum(buf: &mut [u8], crc_at: usize) {
    let c = checksum(buf, crc_at);
    buf[crc_at..crc_at + 4].copy_from_slice(&c.to_le_bytes());
}

/// One of the two headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence_number: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

/// "head"
const HEADER_SIGNATURE: &[u8; 4] = b"head";

impl Header {
    /// The header in a 4 KiB header area, if its checksum, signature and
    /// version (1) are right, as QEMU takes a header to be valid.
    pub fn parse(area: &[u8]) -> Option<Header> {
        if area.len() < HEADER_SIZE || !checksum_ok(&area[..HEADER_SIZE], 4) {
            return None;
        }
        let h = Header::decode(area);
        (&area[..4] == HEADER_SIGNATURE && h.version == 1).then_some(h)
    }

    /// The fields, unchecked.
    pub fn decode(area: &[u8]) -> Header {
        Header {
            sequence_number: le64(area, 8),
            file_write_guid: guid_at(area, 16),
            data_write_guid: guid_at(area, 32),
            log_guid: guid_at(area, 48),
            log_version: le16(area, 64),
            version: le16(area, 66),
            log_length: le32(area, 68),
            log_offset: le64(area, 72),
        }
    }

    /// Write the header's fields over the start of `area` (a 4 KiB header
    /// area, whose other bytes are kept) and set its checksum.
    pub fn encode_into(&self, area: &mut [u8]) {
        area[..4].copy_from_slice(HEADER_SIGNATURE);
        area[8..16].copy_from_slice(&self.sequence_number.to_le_bytes());
        area[16..32].copy_from_slice(&self.file_write_guid);
        area[32..48].copy_from_slice(&self.data_write_guid);
        area[48..64].copy_from_slice(&self.log_guid);
        area[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        area[66..68].copy_from_slice(&self.version.to_le_bytes());
        area[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        area[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        set_checksum(&mut area[..HEADER_SIZE], 4);
    }
}

/// One region table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Guid,
    pub file_offset: u64,
    pub length: u32,
    pub required: bool,
}

/// "regi"
pub const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// "metadata"
pub const METADATA_SIGNATURE: &[u8; 8] = b"metadata";

impl RegionEntry {
    pub fn decode(b: &[u8]) -> RegionEntry {
        RegionEntry {
            guid: guid_at(b, 0),
            file_offset: le64(b, 16),
            length: le32(b, 24),
            required: le32(b, 28) & REGION_ENTRY_REQUIRED != 0,
        }
    }
    pub fn encode(&self, b: &mut [u8]) {
        b[..16].copy_from_slice(&self.guid);
        b[16..24].copy_from_slice(&self.file_offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.length.to_le_bytes());
        b[28..32].copy_from_slice(&u32::from(self.required).to_le_bytes());
    }
}

/// One metadata table entry: where an item lies in the metadata region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataEntry {
    pub item_id: Guid,
    pub offset: u32,
    pub length: u32,
    pub flags: u32,
}

impl MetadataEntry {
    pub fn decode(b: &[u8]) -> MetadataEntry {
        MetadataEntry {
            item_id: guid_at(b, 0),
            offset: le32(b, 16),
            length: le32(b, 20),
            flags: le32(b, 24),
        }
    }
    pub fn encode(&self, b: &mut [u8]) {
        b[..16].copy_from_slice(&self.item_id);
        b[16..20].copy_from_slice(&self.offset.to_le_bytes());
        b[20..24].copy_from_slice(&self.length.to_le_bytes());
        b[24..28].copy_from_slice(&self.flags.to_le_bytes());
    }
}

/// Payload blocks per sector bitmap block (the BAT interleaves one bitmap
/// entry after this many payload entries), for 512-byte or 4 KiB sectors.
pub fn chunk_ratio(logical_sector_size: u64, block_size: u64) -> u64 {
    MAX_SECTORS_PER_BLOCK * logical_sector_size / block_size
}

/// The number of BAT entries of a disk without a parent, as QEMU counts them
/// (32-bit block counts; an empty disk wraps to a large count, as in QEMU).
pub fn bat_entries(virtual_size: u64, block_size: u64, chunk_ratio: u64) -> u64 {
    // QEMU holds the block count in 32 bits.
    let blocks = u32::try_from(virtual_size.div_ceil(block_size) & 0xffff_ffff).unwrap_or(0);
    let bits = chunk_ratio.trailing_zeros();
    u64::from(blocks) + u64::from(blocks.wrapping_sub(1) >> bits)
}
