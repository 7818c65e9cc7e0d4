//! The vdi header: the first 512 bytes of the file, its fields, the checks
//! QEMU makes before it accepts an image, and the header qemu-img writes.

use crate::{Error, ErrorKind, Result};

/// Size of the header structure (one sector).
pub const HEADER_SIZE: usize = 512;
/// The sector size every vdi image QEMU opens uses, as stored.
const SECTOR_SIZE_FIELD: u32 = 512;
/// The sector size every vdi image QEMU opens uses.
pub const SECTOR_SIZE: u64 = SECTOR_SIZE_FIELD as u64;
/// The only block size QEMU supports (1 MiB), as stored.
const BLOCK_SIZE_FIELD: u32 = 1 << 20;
/// The only block size QEMU supports (1 MiB).
pub const BLOCK_SIZE: u64 = BLOCK_SIZE_FIELD as u64;
/// The image signature at offset 0x40.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1 (major in the high half).
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Image type: blocks allocated on first write.
pub const TYPE_DYNAMIC: u32 = 1;
/// Image type: every block allocated at creation.
pub const TYPE_STATIC: u32 = 2;
/// Block map entry of a never-written block (reads as zeroes).
pub const UNALLOCATED: u32 = 0xffff_ffff;
/// Block map entry of a discarded block (reads as zeroes).
pub const DISCARDED: u32 = 0xffff_fffe;
/// The most blocks QEMU accepts: the block map, rounded up to whole sectors,
/// must fit in a signed 32-bit byte count.
pub const BLOCKS_MAX: u32 = ((1u32 << 31) - SECTOR_SIZE_FIELD) / 4;
/// The largest virtual size QEMU accepts.
pub const DISK_SIZE_MAX: u64 = BLOCKS_MAX as u64 * BLOCK_SIZE;
/// The text qemu-img writes at the start of the files it creates.
const QEMU_TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";
/// The header size field qemu-img writes.
const QEMU_HEADER_SIZE: u32 = 0x180;

// Field offsets in the header.
const OFF_SIGNATURE: usize = 0x40;
const OFF_VERSION: usize = 0x44;
const OFF_HEADER_SIZE: usize = 0x48;
const OFF_IMAGE_TYPE: usize = 0x4c;
const OFF_OFFSET_BMAP: usize = 0x154;
const OFF_OFFSET_DATA: usize = 0x158;
const OFF_SECTOR_SIZE: usize = 0x168;
const OFF_DISK_SIZE: usize = 0x170;
const OFF_BLOCK_SIZE: usize = 0x178;
const OFF_BLOCKS_IN_IMAGE: usize = 0x180;
const OFF_BLOCKS_ALLOCATED: usize = 0x184;
const OFF_UUID_IMAGE: usize = 0x188;
const OFF_UUID_LAST_SNAP: usize = 0x198;
const OFF_UUID_LINK: usize = 0x1a8;
const OFF_UUID_PARENT: usize = 0x1b8;

/// Whether `head` starts a vdi image as QEMU's probe decides: a whole header
/// and the signature in it (the text and version are not looked at).
pub fn probe(head: &[u8]) -> bool {
    head.len() >= HEADER_SIZE && le32(head, OFF_SIGNATURE) == SIGNATURE
}

/// A header QEMU accepts, with its fields in host order.
///
/// The bytes read are kept: when a write allocates blocks the header is
/// written back as read, with the allocated-block count (and a disk size
/// rounded up to whole sectors) replaced, as QEMU writes it.
#[derive(Debug, Clone)]
pub struct Header {
    raw: [u8; HEADER_SIZE],
    /// [`TYPE_DYNAMIC`], [`TYPE_STATIC`], or another value QEMU ignores.
    pub image_type: u32,
    /// Where the block map starts in the file (a sector multiple).
    pub offset_bmap: u64,
    /// Where block 0 of the data starts in the file (a sector multiple).
    pub offset_data: u64,
    /// The virtual size, rounded up to whole sectors as QEMU does.
    pub disk_size: u64,
    /// Entries in the block map.
    pub blocks_in_image: u32,
    /// Blocks stored in the data area; the next block allocated goes at this index.
    pub blocks_allocated: u32,
}

impl Header {
    /// Parse and check `raw` as QEMU's open does, in its order and with its
    /// messages. (A file shorter than the header reads as zero-padded, as QEMU
    /// reads it, so the caller passes the padded bytes.)
    pub fn parse(raw: &[u8; HEADER_SIZE]) -> Result<Header> {
        let signature = le32(raw, OFF_SIGNATURE);
        let version = le32(raw, OFF_VERSION);
        let offset_bmap = le32(raw, OFF_OFFSET_BMAP);
        let offset_data = le32(raw, OFF_OFFSET_DATA);
        let sector_size = le32(raw, OFF_SECTOR_SIZE);
        let raw_disk_size = le64(raw, OFF_DISK_SIZE);
        let block_size = le32(raw, OFF_BLOCK_SIZE);
        let blocks_in_image = le32(raw, OFF_BLOCKS_IN_IMAGE);

        if raw_disk_size > DISK_SIZE_MAX {
            return Err(size_too_large(raw_disk_size));
        }
        // Odd sizes (VBoxManage convertfromraw makes them) round up to a sector.
        let disk_size = raw_disk_size.next_multiple_of(SECTOR_SIZE);
        let room = u64::from(blocks_in_image) * u64::from(block_size);
        if signature != SIGNATURE {
            return Err(Error::invalid(format!(
                "Image not in VDI format (bad signature {signature:08x})"
            )));
        }
        let refuse = if version != VERSION_1_1 {
            format!("version {}.{}", version >> 16, version & 0xffff)
        } else if u64::from(offset_bmap) % SECTOR_SIZE != 0 {
            format!("unaligned block map offset {offset_bmap:#x}")
        } else if u64::from(offset_data) % SECTOR_SIZE != 0 {
            format!("unaligned data offset {offset_data:#x}")
        } else if u64::from(sector_size) != SECTOR_SIZE {
            format!("sector size {sector_size} is not {SECTOR_SIZE}")
        } else if u64::from(block_size) != BLOCK_SIZE {
            format!("block size {block_size} is not {BLOCK_SIZE}")
        } else if disk_size > room {
            format!("disk size {disk_size}, image bitmap has room for {room}")
        } else if raw[OFF_UUID_LINK..OFF_UUID_LINK + 16] != [0; 16] {
            "non-NULL link UUID".to_string()
        } else if raw[OFF_UUID_PARENT..OFF_UUID_PARENT + 16] != [0; 16] {
            "non-NULL parent UUID".to_string()
        } else if blocks_in_image > BLOCKS_MAX {
            format!("too many blocks {blocks_in_image}, max is {BLOCKS_MAX}")
        } else {
            String::new()
        };
        if !refuse.is_empty() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("unsupported VDI image ({refuse})"),
            ));
        }
        Ok(Header {
            raw: *raw,
            image_type: le32(raw, OFF_IMAGE_TYPE),
            offset_bmap: u64::from(offset_bmap),
            offset_data: u64::from(offset_data),
            disk_size,
            blocks_in_image,
            blocks_allocated: le32(raw, OFF_BLOCKS_ALLOCATED),
        })
    }

    /// The header qemu-img writes for a new image of `size` bytes (a sector
    /// multiple, at most [`DISK_SIZE_MAX`]), with fresh random UUIDs for the
    /// image and its last snapshot.
    pub fn new_image(size: u64, static_image: bool) -> Result<Header> {
        if size > DISK_SIZE_MAX {
            return Err(size_too_large(size));
        }
        let blocks = u32::try_from(size.div_ceil(BLOCK_SIZE)).map_err(|_| size_too_large(size))?;
        let bmap_len = bmap_bytes(blocks);
        let offset_data =
            u32::try_from(SECTOR_SIZE + bmap_len).map_err(|_| size_too_large(size))?;
        let mut raw = [0u8; HEADER_SIZE];
        raw[..QEMU_TEXT.len()].copy_from_slice(QEMU_TEXT);
        let image_type = if static_image {
            TYPE_STATIC
        } else {
            TYPE_DYNAMIC
        };
        put32(&mut raw, OFF_SIGNATURE, SIGNATURE);
        put32(&mut raw, OFF_VERSION, VERSION_1_1);
        put32(&mut raw, OFF_HEADER_SIZE, QEMU_HEADER_SIZE);
        put32(&mut raw, OFF_IMAGE_TYPE, image_type);
        put32(&mut raw, OFF_OFFSET_BMAP, SECTOR_SIZE_FIELD);
        put32(&mut raw, OFF_OFFSET_DATA, offset_data);
        put32(&mut raw, OFF_SECTOR_SIZE, SECTOR_SIZE_FIELD);
        raw[OFF_DISK_SIZE..OFF_DISK_SIZE + 8].copy_from_slice(&size.to_le_bytes());
        put32(&mut raw, OFF_BLOCK_SIZE, BLOCK_SIZE_FIELD);
        put32(&mut raw, OFF_BLOCKS_IN_IMAGE, blocks);
        let allocated = if static_image { blocks } else { 0 };
        put32(&mut raw, OFF_BLOCKS_ALLOCATED, allocated);
        raw[OFF_UUID_IMAGE..OFF_UUID_IMAGE + 16].copy_from_slice(&random_uuid()?);
        raw[OFF_UUID_LAST_SNAP..OFF_UUID_LAST_SNAP + 16].copy_from_slice(&random_uuid()?);
        Header::parse(&raw)
    }

    /// Whether every block was allocated at creation (QEMU then asks the file
    /// which allocated ranges read as zeroes).
    pub fn is_static(&self) -> bool {
        self.image_type == TYPE_STATIC
    }

    /// Bytes of the block map as QEMU reads and writes it: whole sectors.
    pub fn bmap_len(&self) -> u64 {
        bmap_bytes(self.blocks_in_image)
    }

    /// The image UUID in its usual text form.
    pub fn uuid_image(&self) -> String {
        uuid_text(&self.raw[OFF_UUID_IMAGE..OFF_UUID_IMAGE + 16])
    }

    /// The last snapshot's UUID in its usual text form.
    pub fn uuid_last_snap(&self) -> String {
        uuid_text(&self.raw[OFF_UUID_LAST_SNAP..OFF_UUID_LAST_SNAP + 16])
    }

    /// The header bytes QEMU writes back: as read, with the current
    /// allocated-block count and the sector-rounded disk size.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut raw = self.raw;
        raw[OFF_DISK_SIZE..OFF_DISK_SIZE + 8].copy_from_slice(&self.disk_size.to_le_bytes());
        put32(&mut raw, OFF_BLOCKS_ALLOCATED, self.blocks_allocated);
        raw
    }
}

/// Bytes of a block map of `blocks` entries, rounded up to whole sectors.
pub fn bmap_bytes(blocks: u32) -> u64 {
    (u64::from(blocks) * 4).next_multiple_of(SECTOR_SIZE)
}

/// QEMU's refusal of a virtual size above [`DISK_SIZE_MAX`] (at open and create).
pub fn size_too_large(size: u64) -> Error {
    Error::unsupported(format!(
        "VDI image size (size is {size:#x}, max supported is {DISK_SIZE_MAX:#x})"
    ))
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(v)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// A UUID stored the VirtualBox way (first three fields little-endian) from
/// the RFC 4122 byte order, and back (the swap is its own inverse).
fn swap_uuid(u: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&u[..16]);
    out[0..4].reverse();
    out[4..6].reverse();
    out[6..8].reverse();
    out
}

/// A random (version 4) UUID in the on-disk byte order.
fn random_uuid() -> Result<[u8; 16]> {
    let mut u = [0u8; 16];
    getrandom::getrandom(&mut u)
        .map_err(|e| Error::new(ErrorKind::Io, format!("Could not generate a UUID: {e}")))?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(swap_uuid(&u))
}

fn uuid_text(stored: &[u8]) -> String {
    let u = swap_uuid(stored);
    let hex: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex[0..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_match_qemu() {
        assert_eq!(BLOCKS_MAX, 536_870_784);
        assert_eq!(DISK_SIZE_MAX, 0x1_ffff_f800_0000);
    }

    #[test]
    fn new_header_parses_back() {
        let h = Header::new_image(5 << 20, false).unwrap();
        assert_eq!(h.blocks_in_image, 5);
        assert_eq!(h.offset_data, 1024);
        assert_eq!(h.blocks_allocated, 0);
        assert!(!h.is_static());
        assert_eq!(h.uuid_image().len(), 36);
        assert_eq!(&h.uuid_image()[14..15], "4");
    }
}
