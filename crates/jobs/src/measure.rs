//! `measure`: the file size a new image needs, by QEMU's formulas, so the numbers
//! agree with `qemu-img measure` and an operator can size storage before a convert.

use crate::status::{ChainStatus, Walk};
use crate::{Cancel, Error, Result};
use serde::Serialize;
use strata_format::qcow2::{BitmapInfo, Preallocation};
use strata_format::Format;

const L1_ENTRY: u64 = 8;
/// QEMU's limit on the L1 table's size.
const MAX_L1_BYTES: u64 = 32 << 20;
const REFTABLE_ENTRY: u64 = 8;
const BITMAP_TABLE_ENTRY: u64 = 8;

/// The target of a measurement.
#[derive(Debug, Clone)]
pub struct Target {
    pub format: Format,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub extended_l2: bool,
    /// qcow2 version (2 or 3).
    pub version: u32,
    pub preallocation: Preallocation,
    /// The new image will have a backing file (so every cluster may be needed).
    pub has_backing_file: bool,
    /// Bytes of the new image's LUKS area (0: not LUKS-encrypted), taken in
    /// whole clusters on top of the rest for qcow2, as QEMU counts it; the
    /// header of a `luks` target.
    pub luks_area: u64,
}

impl Default for Target {
    fn default() -> Self {
        Target {
            format: Format::Raw,
            cluster_size: 65536,
            refcount_bits: 16,
            extended_l2: false,
            version: 3,
            preallocation: Preallocation::Off,
            has_backing_file: false,
            luks_area: 0,
        }
    }
}

/// Sizes in bytes, as `qemu-img measure` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Measurement {
    /// The size the image needs for the source's data.
    pub required: u64,
    /// The size of the image with every cluster allocated.
    pub fully_allocated: u64,
    /// Space for the source's persistent bitmaps, when both ends support them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<u64>,
}

/// What is measured: a size alone, or a source image (its whole chain).
pub enum Source<'a> {
    Size(u64),
    Image {
        chain: &'a ChainStatus,
        /// Persistent bitmaps of the source, when its format can hold them.
        bitmaps: Option<Vec<BitmapInfo>>,
    },
}

/// Measure `source` as an image of `target`.
pub fn measure(source: Source<'_>, target: &Target, cancel: &Cancel) -> Result<Measurement> {
    match target.format {
        Format::Raw => {
            let required = match source {
                Source::Size(s) => s.div_ceil(512) * 512,
                Source::Image { chain, .. } => chain.virtual_size(),
            };
            Ok(Measurement {
                required,
                fully_allocated: required,
                bitmaps: None,
            })
        }
        f @ (Format::Vpc
        | Format::Vdi
        | Format::Vhdx
        | Format::Vmdk
        | Format::Qed
        | Format::Parallels) => Err(Error::Invalid(format!(
            "Block driver '{}' does not support size measurement",
            f.name()
        ))),
        // The header and key material, then the disk: nothing is sparse.
        Format::Luks => {
            let disk = match source {
                Source::Size(s) => s.div_ceil(512) * 512,
                Source::Image { chain, .. } => chain.virtual_size(),
            };
            let required = disk
                .checked_add(target.luks_area)
                .ok_or_else(|| Error::Invalid("The image size is too large".into()))?;
            Ok(Measurement {
                required,
                fully_allocated: required,
                bitmaps: None,
            })
        }
        Format::Qcow2 => measure_qcow2(source, target, cancel),
    }
}

/// A qcow2 target's cluster size as qemu-img's measure judges it, in its
/// order: a power of two from 512 bytes to 2 MiB, then (with extended L2
/// entries) at least 16 KiB.
pub fn check_cluster_size(cluster_size: u64, extended_l2: bool) -> Result<()> {
    if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
        return Err(Error::Invalid(
            "Cluster size must be a power of two between 512 and 2048k".into(),
        ));
    }
    if extended_l2 && cluster_size < 16384 {
        return Err(Error::Invalid(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                .into(),
        ));
    }
    Ok(())
}

/// A qcow2 target's refcount width as qemu-img's measure judges it, in its
/// order: a power of two up to 64, then 16 on a version 2 image.
pub fn check_refcount_width(refcount_bits: u32, version: u32) -> Result<()> {
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(Error::Invalid(
            "Refcount width must be a power of two and may not exceed 64 bits".into(),
        ));
    }
    if version == 2 && refcount_bits != 16 {
        return Err(Error::Invalid("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into()));
    }
    Ok(())
}

fn measure_qcow2(source: Source<'_>, t: &Target, cancel: &Cancel) -> Result<Measurement> {
    let cs = t.cluster_size;
    check_cluster_size(cs, t.extended_l2)?;
    check_refcount_width(t.refcount_bits, t.version)?;
    let too_big = || Error::Invalid("Image size is too large for this cluster size".into());
    let (virtual_size, mut required, bitmaps) = match source {
        Source::Size(s) => (round_up(s, cs).ok_or_else(too_big)?, 0, None),
        Source::Image { chain, bitmaps } => {
            let ssize = chain.virtual_size();
            let vsize = round_up(ssize, cs).ok_or_else(too_big)?;
            let required = if t.has_backing_file {
                vsize
            } else {
                data_bytes(chain, cs, cancel)?
            };
            let bitmaps = bitmaps
                .filter(|_| t.version >= 3)
                .map(|b| bitmaps_size(&b, ssize, cs));
            (vsize, required, bitmaps)
        }
    };
    if matches!(t.preallocation, Preallocation::Full | Preallocation::Falloc) {
        required = virtual_size;
    }
    // The L1 table may not exceed QEMU's limit of 32 MiB.
    let l2e = if t.extended_l2 { 16 } else { 8 };
    let l1_entries = (virtual_size / cs).div_ceil(cs / l2e);
    if l1_entries > MAX_L1_BYTES / L1_ENTRY {
        return Err(Error::Invalid(
            "The image size is too large (try using a larger cluster size)".into(),
        ));
    }
    let fully_allocated = prealloc_size(
        virtual_size,
        cs,
        t.refcount_bits.trailing_zeros(),
        t.extended_l2,
    )
    .and_then(|f| f.checked_add(round_up(t.luks_area, cs)?))
    .ok_or_else(too_big)?;
    Ok(Measurement {
        required: fully_allocated - virtual_size + required,
        fully_allocated,
        bitmaps,
    })
}

/// Bytes of whole clusters holding data (not zeroes) anywhere in the chain.
fn data_bytes(chain: &ChainStatus, cs: u64, cancel: &Cancel) -> Result<u64> {
    let size = chain.virtual_size();
    let mut required = 0u64;
    let mut off = 0u64;
    while off < size {
        cancel.check()?;
        let st = chain.status(off, size - off, Walk::Allocated)?;
        let mut n = st.len;
        if !st.zero && st.data && st.allocated {
            // Count through the end of the cluster the run ends in.
            n = round_up(off + n, cs).expect("inside the image") - off;
            required += off % cs + n;
        }
        off += n;
    }
    Ok(required)
}

fn round_up(v: u64, to: u64) -> Option<u64> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

/// The size of an image of `size` bytes with every cluster and all its metadata
/// allocated: header cluster, L2 and L1 tables, refcount table and blocks.
pub fn prealloc_size(size: u64, cs: u64, refcount_order: u32, extended_l2: bool) -> Option<u64> {
    let aligned = round_up(size, cs)?;
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let l2_entries = round_up(aligned / cs, cs / l2e)?;
    meta = meta.checked_add(l2_entries.checked_mul(l2e)?)?;
    let l1_entries = round_up(l2_entries * l2e / cs, cs / L1_ENTRY)?;
    meta = meta.checked_add(l1_entries.checked_mul(L1_ENTRY)?)?;
    let clusters = meta.checked_add(aligned)? / cs;
    meta = meta.checked_add(refcount_metadata_size(clusters, cs, refcount_order)?)?;
    meta.checked_add(aligned)
}

/// Bytes of refcount table and blocks needed to count `clusters` clusters plus the
/// refcount structures themselves (a fixed point).
pub fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> Option<u64> {
    let per_table_cluster = cs / REFTABLE_ENTRY;
    let per_block = (cs * 8) >> refcount_order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = clusters
            .checked_add(table)?
            .checked_add(blocks)?
            .div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    blocks.checked_add(table)?.checked_mul(cs)
}

/// Space for persistent bitmaps copied into a new image: each bitmap fully
/// allocated, its table, and the directory.
fn bitmaps_size(bitmaps: &[BitmapInfo], size: u64, cs: u64) -> u64 {
    let mut total = 0u64;
    let mut dir = 0u64;
    for b in bitmaps {
        let bits = size.div_ceil(b.granularity);
        let bytes = bits.div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        total += clusters * cs;
        total += (clusters * BITMAP_TABLE_ENTRY).div_ceil(cs) * cs;
        dir += b.entry_size;
    }
    total + dir.div_ceil(cs) * cs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fully_allocated_one_gib_matches_qemu() {
        assert_eq!(prealloc_size(1 << 30, 65536, 4, false), Some(1074135040));
    }

    #[test]
    fn empty_image_needs_header_and_tables() {
        let m = measure(
            Source::Size(1 << 30),
            &Target {
                format: Format::Qcow2,
                ..Default::default()
            },
            &Cancel::default(),
        )
        .unwrap();
        assert_eq!(m.required, 393216);
        assert_eq!(m.fully_allocated, 1074135040);
    }

    #[test]
    fn raw_measure_rounds_to_sectors() {
        let m = measure(Source::Size(1000), &Target::default(), &Cancel::default()).unwrap();
        assert_eq!((m.required, m.fully_allocated), (1024, 1024));
    }
}
