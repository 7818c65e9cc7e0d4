//! The qed header: the first 64 bytes of the file, the checks QEMU makes
//! before it accepts an image (in its order, with its messages), and the
//! header qemu-img writes.

use crate::{Error, ErrorKind, Result};

/// Size of the header structure on disk.
pub const HEADER_LEN: usize = 64;
/// Where qemu-img puts the backing file name: right after the header.
pub const NAME_OFFSET: u32 = 64;
/// "QED\0", little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"QED\0");
/// Feature: the image has a backing file (its name follows the header).
pub const F_BACKING_FILE: u64 = 0x01;
/// Feature: the image was not closed cleanly and needs a check before use.
pub const F_NEED_CHECK: u64 = 0x02;
/// Feature: the backing file is raw and must not be probed.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
/// Every feature bit QEMU knows.
pub const FEATURE_MASK: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// The smallest and largest cluster sizes (powers of two).
pub const MIN_CLUSTER_SIZE: u32 = 4096;
pub const MAX_CLUSTER_SIZE: u32 = 64 * 1024 * 1024;
/// The smallest and largest table sizes, in clusters (powers of two).
pub const MIN_TABLE_SIZE: u32 = 1;
pub const MAX_TABLE_SIZE: u32 = 16;
/// qemu-img's defaults for a new image.
pub const DEFAULT_CLUSTER_SIZE: u32 = 65536;
pub const DEFAULT_TABLE_SIZE: u32 = 4;
/// The longest backing file name QEMU reads (its buffer, with the NUL).
const BACKING_NAME_BUF: u32 = 4096;
/// Guest sizes are whole sectors.
pub const SECTOR_SIZE: u64 = 512;

/// A header QEMU accepts, its fields in host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub cluster_size: u32,
    /// L1 and L2 table size, in clusters.
    pub table_size: u32,
    /// Header area (header and backing name), in clusters.
    pub header_size: u32,
    pub features: u64,
    pub compat_features: u64,
    pub autoclear_features: u64,
    pub l1_table_offset: u64,
    /// The virtual size in bytes.
    pub image_size: u64,
    pub backing_filename_offset: u32,
    pub backing_filename_size: u32,
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

/// Whether `head` (the first bytes of a file, zero-padded to 2048 when it is
/// shorter) starts a qed image as QEMU's probe decides: the magic.
pub fn probe(head: &[u8]) -> bool {
    head.len() >= HEADER_LEN && le32(head, 0) == MAGIC
}

fn invalid(msg: &str) -> Error {
    Error::invalid(msg)
}

/// A power of two in `[min, max]`.
fn pow2_in(v: u32, min: u32, max: u32) -> bool {
    (min..=max).contains(&v) && v.is_power_of_two()
}

/// Whether `cluster_size` is one QEMU accepts.
pub fn cluster_size_valid(cluster_size: u32) -> bool {
    pow2_in(cluster_size, MIN_CLUSTER_SIZE, MAX_CLUSTER_SIZE)
}

/// Whether `table_size` (in clusters) is one QEMU accepts.
pub fn table_size_valid(table_size: u32) -> bool {
    pow2_in(table_size, MIN_TABLE_SIZE, MAX_TABLE_SIZE)
}

/// The largest virtual size two table levels of these sizes address.
pub fn max_image_size(cluster_size: u32, table_size: u32) -> u64 {
    let entries = u64::from(table_size) * u64::from(cluster_size) / 8;
    entries
        .saturating_mul(u64::from(cluster_size))
        .saturating_mul(entries)
}

/// Whether `image_size` is whole sectors and addressable with these sizes.
pub fn image_size_valid(image_size: u64, cluster_size: u32, table_size: u32) -> bool {
    image_size.is_multiple_of(SECTOR_SIZE) && image_size <= max_image_size(cluster_size, table_size)
}

impl Header {
    /// Parse the header and check it as QEMU's open does, given the file's
    /// length (`file_len`): the checks that need no further read.
    pub fn parse(raw: &[u8; HEADER_LEN], file_len: u64) -> Result<Header> {
        let h = Header {
            cluster_size: le32(raw, 4),
            table_size: le32(raw, 8),
            header_size: le32(raw, 12),
            features: le64(raw, 16),
            compat_features: le64(raw, 24),
            autoclear_features: le64(raw, 32),
            l1_table_offset: le64(raw, 40),
            image_size: le64(raw, 48),
            backing_filename_offset: le32(raw, 56),
            backing_filename_size: le32(raw, 60),
        };
        if le32(raw, 0) != MAGIC {
            return Err(invalid("Image not in QED format"));
        }
        let unknown = h.features & !FEATURE_MASK;
        if unknown != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("Unsupported QED features: {unknown:x}"),
            ));
        }
        if !cluster_size_valid(h.cluster_size) {
            return Err(invalid("QED cluster size is invalid"));
        }
        if !table_size_valid(h.table_size) {
            return Err(invalid("QED table size is invalid"));
        }
        if !image_size_valid(h.image_size, h.cluster_size, h.table_size) {
            return Err(invalid("QED image size is invalid"));
        }
        let file_size = h.start_of_cluster(file_len);
        if !h.table_offset_valid(h.l1_table_offset, file_size) {
            return Err(invalid("QED table offset is invalid"));
        }
        if u64::from(h.header_size) * u64::from(h.cluster_size) > u64::from(u32::MAX) {
            return Err(invalid("QED header size is too large"));
        }
        if h.has_backing_file() {
            let end = u64::from(h.backing_filename_offset) + u64::from(h.backing_filename_size);
            if end > h.header_bytes() {
                return Err(invalid("QED backing filename offset is invalid"));
            }
            if h.backing_filename_size >= BACKING_NAME_BUF {
                return Err(invalid("Failed to read backing filename"));
            }
        }
        Ok(h)
    }

    /// The 64 header bytes as stored.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        b
    }

    /// The header qemu-img writes for a new image (sizes already checked):
    /// one header cluster, the L1 table right after it.
    pub fn new_image(cluster_size: u32, table_size: u32, image_size: u64) -> Header {
        Header {
            cluster_size,
            table_size,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: u64::from(cluster_size),
            image_size,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        }
    }

    pub fn has_backing_file(&self) -> bool {
        self.features & F_BACKING_FILE != 0
    }

    pub fn needs_check(&self) -> bool {
        self.features & F_NEED_CHECK != 0
    }

    /// Bytes in the header area.
    pub fn header_bytes(&self) -> u64 {
        u64::from(self.header_size) * u64::from(self.cluster_size)
    }

    /// Bytes in one L1 or L2 table.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size) * u64::from(self.cluster_size)
    }

    /// Entries in one table.
    pub fn table_entries(&self) -> u64 {
        self.table_bytes() / 8
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        self.table_entries() * u64::from(self.cluster_size)
    }

    pub fn start_of_cluster(&self, offset: u64) -> u64 {
        offset & !(u64::from(self.cluster_size) - 1)
    }

    pub fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (u64::from(self.cluster_size) - 1)
    }

    /// Whether `offset` may hold a cluster: aligned, past the header area and
    /// inside the file (`file_size`, rounded down to whole clusters).
    pub fn cluster_offset_valid(&self, offset: u64, file_size: u64) -> bool {
        self.offset_in_cluster(offset) == 0 && offset >= self.header_bytes() && offset < file_size
    }

    /// Whether a whole table may start at `offset` (first and last clusters
    /// valid). As in QEMU, a table whose last cluster is its first (table
    /// size 1) is never valid: qemu-img creates such images but cannot open
    /// them.
    pub fn table_offset_valid(&self, offset: u64, file_size: u64) -> bool {
        let Some(end) = u64::from(self.table_size.saturating_sub(1))
            .checked_mul(u64::from(self.cluster_size))
            .and_then(|d| offset.checked_add(d))
        else {
            return false;
        };
        end > offset
            && self.cluster_offset_valid(offset, file_size)
            && self.cluster_offset_valid(end, file_size)
    }
}
