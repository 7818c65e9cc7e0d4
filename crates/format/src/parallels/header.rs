//! The parallels header: the first 64 bytes of the file, the checks QEMU
//! makes before it accepts an image, and the header qemu-img writes.

use crate::{Error, Result};

/// Size of the header structure; the BAT follows it at once.
pub const HEADER_SIZE: usize = 64;
/// The signature of the original format: BAT entries count sectors.
pub const MAGIC_V1: &[u8; 16] = b"WithoutFreeSpace";
/// The signature of the extended format: BAT entries count clusters.
pub const MAGIC_V2: &[u8; 16] = b"WithouFreSpacExt";
/// The only version QEMU accepts.
pub const VERSION: u32 = 2;
/// The `inuse` value of an image open for writing (not closed cleanly).
pub const INUSE_MAGIC: u32 = 0x746f_6e59;
/// Sector size: header offsets and sizes count these.
pub const SECTOR: u64 = 512;
/// Cluster size of `create` without `cluster_size`.
pub const DEFAULT_CLUSTER_SIZE: u64 = 1 << 20;
/// `create`'s limit: the guest size must be below this many clusters.
pub const MAX_IMAGE_FACTOR: u64 = 1 << 32;
/// Geometry qemu-img records (not used to address anything).
const HEADS: u32 = 16;
const SECTORS_PER_CYLINDER: u64 = 32;

const OFF_VERSION: usize = 16;
const OFF_HEADS: usize = 20;
const OFF_CYLINDERS: usize = 24;
const OFF_TRACKS: usize = 28;
const OFF_BAT_ENTRIES: usize = 32;
const OFF_NB_SECTORS: usize = 36;
/// Offset of the `inuse` field.
pub const OFF_INUSE: usize = 44;
/// Offset of the `data_off` field.
pub const OFF_DATA_OFF: usize = 48;
const OFF_EXT_OFF: usize = 56;

/// Whether `head` (a file's first bytes) is a parallels image as QEMU's probe
/// decides: either signature and version 2.
pub fn probe(head: &[u8]) -> bool {
    head.len() >= HEADER_SIZE
        && (head[..16] == MAGIC_V1[..] || head[..16] == MAGIC_V2[..])
        && le32(head, OFF_VERSION) == VERSION
}

/// A header QEMU accepts, its fields in host order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The original signature (`WithoutFreeSpace`): BAT entries count
    /// sectors, `data_off` may be 0, the size field is 32 bits.
    pub v1: bool,
    /// Sectors per cluster.
    pub tracks: u32,
    /// BAT entries.
    pub bat_entries: u32,
    /// Guest sectors (the low 32 bits only for the original signature).
    pub nb_sectors: u64,
    /// [`INUSE_MAGIC`] while an image is open for writing.
    pub inuse: u32,
    /// The first data sector as recorded (0: right after the BAT, v1 only).
    pub data_off: u32,
    /// Sector of the format extension cluster, 0 for none.
    pub ext_off: u64,
}

impl Header {
    /// Parse and check `raw` as QEMU's open does, in its order and with its
    /// messages. (A file shorter than the header reads zero-padded.)
    pub fn parse(raw: &[u8; HEADER_SIZE]) -> Result<Header> {
        let not_parallels = || Error::invalid("Image not in Parallels format");
        if le32(raw, OFF_VERSION) != VERSION {
            return Err(not_parallels());
        }
        let v1 = if raw[..16] == MAGIC_V1[..] {
            true
        } else if raw[..16] == MAGIC_V2[..] {
            false
        } else {
            return Err(not_parallels());
        };
        let mut nb_sectors = le64(raw, OFF_NB_SECTORS);
        if v1 {
            nb_sectors &= 0xffff_ffff;
        }
        let tracks = le32(raw, OFF_TRACKS);
        if tracks == 0 {
            return Err(Error::invalid("Invalid image: Zero sectors per track"));
        }
        if tracks > i32::MAX as u32 / 513 {
            return Err(Error::invalid("Invalid image: Too big cluster"));
        }
        let bat_entries = le32(raw, OFF_BAT_ENTRIES);
        if bat_entries > i32::MAX as u32 / 4 {
            return Err(Error::invalid("Catalog too large"));
        }
        if nb_sectors > (i64::MAX as u64) / SECTOR {
            // QEMU's sector count is signed: a size it cannot hold is no image.
            return Err(not_parallels());
        }
        Ok(Header {
            v1,
            tracks,
            bat_entries,
            nb_sectors,
            inuse: le32(raw, OFF_INUSE),
            data_off: le32(raw, OFF_DATA_OFF),
            ext_off: le64(raw, OFF_EXT_OFF),
        })
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        u64::from(self.tracks) * SECTOR
    }

    /// What a BAT entry is multiplied by to give a sector.
    pub fn off_multiplier(&self) -> u64 {
        if self.v1 {
            1
        } else {
            u64::from(self.tracks)
        }
    }

    /// The guest size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.nb_sectors * SECTOR
    }

    /// Bytes of the header and the BAT.
    pub fn bat_end(&self) -> u64 {
        HEADER_SIZE as u64 + 4 * u64::from(self.bat_entries)
    }

    /// The lowest first data sector the image may record: the sector after
    /// the BAT, rounded up to a cluster for the extended signature.
    pub fn min_data_off(&self) -> u64 {
        let min = self.bat_end().div_ceil(SECTOR);
        if self.v1 {
            min
        } else {
            // QEMU rounds with a mask, right for the power-of-two cluster
            // sizes only: a cluster of 3 sectors rounds 54 to 56, not 54.
            let d = u64::from(self.tracks);
            (min + d - 1) & d.wrapping_neg()
        }
    }

    /// The first data sector QEMU uses for a file of `file_sectors` sectors,
    /// and whether the recorded `data_off` is right (QEMU's check repairs it
    /// to the returned value when it is not).
    pub fn data_start(&self, file_sectors: u64) -> (u64, bool) {
        self.data_start_with(self.data_off, file_sectors)
    }

    /// [`Self::data_start`] with `data_off` recorded instead (as a repair
    /// left it).
    pub fn data_start_with(&self, data_off: u32, file_sectors: u64) -> (u64, bool) {
        let min = self.min_data_off();
        let off = u64::from(data_off);
        if off == 0 && self.v1 {
            return (min, true);
        }
        if off < min || off > file_sectors {
            return (min, false);
        }
        (off, true)
    }
}

/// The parameters of a new image, checked as qemu-img's `create -f
/// parallels` checks them (sizes already rounded up to whole sectors).
pub fn check_create(size: u64, cluster_size: u64) -> Result<()> {
    if cluster_size >= i64::MAX as u64 / MAX_IMAGE_FACTOR {
        return Err(Error::invalid("Cluster size is too large"));
    }
    if size >= MAX_IMAGE_FACTOR * cluster_size {
        return Err(Error::invalid(
            "Image size is too large for this cluster size",
        ));
    }
    Ok(())
}

/// The first sector of a new image (header, then zeroes) and the sectors the
/// header and BAT take, rounded up to whole clusters, as qemu-img writes them.
/// `size` and `cluster_size` have passed [`check_create`].
pub fn new_image(size: u64, cluster_size: u64) -> ([u8; 512], u64) {
    let bat_entries = size.div_ceil(cluster_size);
    let bat_bytes = HEADER_SIZE as u64 + 4 * bat_entries;
    let data_sectors = bat_bytes.div_ceil(cluster_size) * cluster_size / SECTOR;
    let mut s = [0u8; 512];
    s[..16].copy_from_slice(MAGIC_V2);
    // The header's fields are 32 bits wide; qemu-img stores the low bits.
    let low = low32;
    put32(&mut s, OFF_VERSION, VERSION);
    put32(&mut s, OFF_HEADS, HEADS);
    put32(
        &mut s,
        OFF_CYLINDERS,
        low(size / SECTOR / u64::from(HEADS) / SECTORS_PER_CYLINDER),
    );
    put32(&mut s, OFF_TRACKS, low(cluster_size / SECTOR));
    put32(&mut s, OFF_BAT_ENTRIES, low(bat_entries));
    s[OFF_NB_SECTORS..OFF_NB_SECTORS + 8].copy_from_slice(&size.div_ceil(SECTOR).to_le_bytes());
    put32(&mut s, OFF_DATA_OFF, low(data_sectors));
    (s, data_sectors)
}

/// The low 32 bits of `n` (what a 32-bit header field keeps of it).
pub fn low32(n: u64) -> u32 {
    let b = n.to_le_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The little-endian u32 at `at`.
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The little-endian u64 at `at`.
pub fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Store `v` little-endian at `at`.
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
