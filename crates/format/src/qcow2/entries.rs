//! L1 and L2 table entries: decoding with reserved-bit checks, and encoding.

use crate::units::HostOffset;
use crate::{Error, Result};

pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;
/// Bits 9..=55: a cluster-aligned host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
pub const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Subclusters per cluster in extended-L2 images.
pub const SUBCLUSTERS: u32 = 32;

/// Decode an L1 entry into the L2 table offset (none if 0) and its COPIED flag.
///
/// Reserved bits are ignored, as QEMU's reads ignore them (only `check` reports
/// them, as corruptions it cannot repair); an L2 offset that is not
/// cluster-aligned is corruption.
pub fn decode_l1(e: u64, cluster_size: u64, index: u64) -> Result<(HostOffset, bool)> {
    let off = e & OFFSET_MASK;
    if !off.is_multiple_of(cluster_size) {
        return Err(Error::corrupt(format!(
            "L2 table offset 0x{off:x} in L1 entry {index} is not cluster-aligned"
        )));
    }
    Ok((HostOffset(off), e & OFLAG_COPIED != 0))
}

/// A decoded L2 entry (for extended L2, the first 64 bits plus the subcluster bitmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Standard cluster (possibly with subclusters). `host` none means no host cluster.
    Normal {
        host: HostOffset,
        copied: bool,
        zero: bool,
        bitmap: u64,
    },
    /// Compressed cluster: bytes `[offset, offset + size)` hold the compressed data
    /// (the last sector may contain trailing bytes).
    Compressed { offset: HostOffset, size: u64 },
}

/// Guest-visible state of one (sub)cluster per its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubState {
    Unallocated,
    /// Zero; `host` set when a preallocated cluster stays reserved.
    Zero {
        host: HostOffset,
    },
    Data {
        host: HostOffset,
    },
    Compressed {
        offset: HostOffset,
        size: u64,
    },
}

/// Layout parameters needed to decode entries.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub extended_l2: bool,
    pub version: u32,
    /// Guest clusters live in an external data file, where offset 0 is a valid
    /// cluster (guest cluster 0): an entry with offset 0 and COPIED is allocated.
    pub data_file: bool,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Bits of the compressed-cluster host offset field.
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
    fn csize_mask(&self) -> u64 {
        (1 << (self.cluster_bits - 8)) - 1
    }
    pub fn subclusters(&self) -> u32 {
        if self.extended_l2 {
            SUBCLUSTERS
        } else {
            1
        }
    }
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / u64::from(self.subclusters())
    }
    /// Subcluster index `i` (an offset inside a cluster divided by the subcluster
    /// size) in the width `sub_state` takes.
    #[inline]
    pub fn subcluster_in(&self, i: u64) -> u32 {
        debug_assert!(i < u64::from(self.subclusters()));
        #[allow(clippy::cast_possible_truncation)] // below `subclusters()`, at most 32
        let i = i as u32;
        i
    }

    /// Decode an L2 entry and (for extended L2) its bitmap as QEMU's reads decode
    /// it: reserved bits (and, with extended L2, the zero flag, which is reserved
    /// there) are ignored, as qemu-img reads, maps and converts such entries and
    /// only `check` reports them. An unaligned data offset, a zero flag in a
    /// version 2 image and an invalid subcluster bitmap are corruption (QEMU marks
    /// the image corrupt for these).
    pub fn decode_l2(&self, e: u64, bitmap: u64) -> Result<L2Entry> {
        // A compressed entry's bitmap is meaningless: `check` reports one that is
        // not zero, but reads ignore it, as QEMU's do.
        if e & OFLAG_COMPRESSED != 0 {
            let shift = self.csize_shift();
            let offset = e & ((1u64 << shift) - 1);
            let nb_sectors = ((e >> shift) & self.csize_mask()) + 1;
            let size = (nb_sectors * 512) - (offset & 511);
            return Ok(L2Entry::Compressed {
                offset: HostOffset(offset),
                size,
            });
        }
        let host = e & OFFSET_MASK;
        if !host.is_multiple_of(self.cluster_size()) {
            return Err(Error::corrupt(format!(
                "data cluster offset 0x{host:x} is not cluster-aligned"
            )));
        }
        // With extended L2 the zero flag is a reserved bit: the bitmap says
        // which subclusters read as zeroes.
        let zero = !self.extended_l2 && e & OFLAG_ZERO != 0;
        if zero && self.version < 3 {
            return Err(Error::corrupt("zero cluster flag set in a version 2 image"));
        }
        if self.extended_l2 {
            let alloc = bitmap & 0xffff_ffff;
            let zeros = bitmap >> 32;
            if alloc & zeros != 0 {
                return Err(Error::corrupt(format!(
                    "subcluster bitmap 0x{bitmap:016x} marks subclusters both allocated and zero"
                )));
            }
            // Offset 0 with COPIED is guest cluster 0 of an external data file.
            let data_file_zero = self.data_file && e & OFLAG_COPIED != 0;
            if alloc != 0 && host == 0 && !data_file_zero {
                return Err(Error::corrupt(
                    "subclusters allocated without a host cluster",
                ));
            }
        }
        Ok(L2Entry::Normal {
            host: HostOffset(host),
            copied: e & OFLAG_COPIED != 0,
            zero,
            bitmap,
        })
    }

    /// State of subcluster `sc` (0 for non-extended images) of a decoded entry.
    pub fn sub_state(&self, entry: L2Entry, sc: u32) -> SubState {
        match entry {
            L2Entry::Compressed { offset, size } => SubState::Compressed { offset, size },
            L2Entry::Normal {
                host,
                zero,
                bitmap,
                copied,
            } => {
                if self.extended_l2 {
                    if bitmap & (1 << sc) != 0 {
                        SubState::Data {
                            host: HostOffset(host.0 + u64::from(sc) * self.subcluster_size()),
                        }
                    } else if bitmap & (1 << (32 + sc)) != 0 {
                        SubState::Zero {
                            host: HostOffset::NONE,
                        }
                    } else {
                        SubState::Unallocated
                    }
                } else if zero {
                    SubState::Zero { host }
                } else if host.is_none() && !(self.data_file && copied) {
                    SubState::Unallocated
                } else {
                    SubState::Data { host }
                }
            }
        }
    }

    /// Encode a compressed-cluster entry for data at `offset` of `size` bytes.
    pub fn encode_compressed(&self, offset: HostOffset, size: u64) -> u64 {
        let offset = offset.get();
        let nb_sectors = ((offset + size - 1) >> 9) - (offset >> 9) + 1;
        OFLAG_COMPRESSED | offset | ((nb_sectors - 1) << self.csize_shift())
    }

    /// Largest byte range a compressed cluster may hold (QEMU limits it to a cluster,
    /// and the sector count field bounds it too).
    pub fn max_compressed_size(&self) -> u64 {
        self.cluster_size()
    }
}

/// Bitmap with every subcluster allocated.
pub const ALL_ALLOCATED: u64 = 0xffff_ffff;
/// Bitmap with every subcluster zero.
pub const ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        cluster_bits: 16,
        extended_l2: false,
        version: 3,
        data_file: false,
    };

    #[test]
    fn compressed_entry_round_trips_offset_and_sector_count() {
        let e = G.encode_compressed(HostOffset(0x12_3456), 3000);
        match G.decode_l2(e, 0).unwrap() {
            L2Entry::Compressed { offset, size } => {
                assert_eq!(offset, HostOffset(0x12_3456));
                assert!((3000..3000 + 512).contains(&size));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unaligned_data_offset_is_corruption() {
        assert!(G.decode_l2(0x1_0200, 0).is_err());
    }

    #[test]
    fn reserved_l1_bits_are_ignored_as_qemu_reads_them() {
        assert_eq!(
            decode_l1(L1_RESERVED | 0x10_0000, 65536, 0).unwrap(),
            (HostOffset(0x10_0000), false)
        );
        assert!(decode_l1(0x10_1000, 65536, 0).is_err());
        assert_eq!(
            decode_l1(OFLAG_COPIED | 0x10_0000, 65536, 0).unwrap(),
            (HostOffset(0x10_0000), true)
        );
    }

    #[test]
    fn offset_zero_with_copied_is_cluster_zero_of_a_data_file() {
        let e = G.decode_l2(OFLAG_COPIED, 0).unwrap();
        assert_eq!(G.sub_state(e, 0), SubState::Unallocated);
        let g = Geometry {
            data_file: true,
            ..G
        };
        assert_eq!(
            g.sub_state(e, 0),
            SubState::Data {
                host: HostOffset(0)
            }
        );
        // Without COPIED it stays unallocated, as QEMU reads it.
        assert_eq!(
            g.sub_state(g.decode_l2(0, 0).unwrap(), 0),
            SubState::Unallocated
        );
    }

    #[test]
    fn reserved_l2_bits_are_ignored_as_qemu_reads_them() {
        let e = G
            .decode_l2(L2_STD_RESERVED | OFLAG_COPIED | 0x5_0000, 0)
            .unwrap();
        assert_eq!(
            G.sub_state(e, 0),
            SubState::Data {
                host: HostOffset(0x5_0000)
            }
        );
        // With extended L2 the zero flag is reserved too: the bitmap decides.
        let g = Geometry {
            extended_l2: true,
            ..G
        };
        let e = g.decode_l2(OFLAG_ZERO | 0x5_0000, 1).unwrap();
        assert_eq!(
            g.sub_state(e, 0),
            SubState::Data {
                host: HostOffset(0x5_0000)
            }
        );
        assert_eq!(g.sub_state(e, 1), SubState::Unallocated);
    }

    #[test]
    fn zero_flag_in_v2_is_corruption() {
        let g = Geometry { version: 2, ..G };
        assert!(g.decode_l2(OFLAG_ZERO, 0).is_err());
    }

    #[test]
    fn extended_bitmap_selects_subcluster_states() {
        let g = Geometry {
            cluster_bits: 16,
            extended_l2: true,
            version: 3,
            data_file: false,
        };
        let e = g.decode_l2(0x2_0000, 0b01 | (0b10 << 32)).unwrap();
        assert_eq!(
            g.sub_state(e, 0),
            SubState::Data {
                host: HostOffset(0x2_0000)
            }
        );
        assert_eq!(
            g.sub_state(e, 1),
            SubState::Zero {
                host: HostOffset::NONE
            }
        );
        assert_eq!(g.sub_state(e, 2), SubState::Unallocated);
        assert!(g.decode_l2(0x2_0000, 1 | (1 << 32)).is_err());
    }
}
