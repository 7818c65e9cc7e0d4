//! The CHS geometry of a VHD disk and the sizes it allows, as QEMU computes
//! them (the VHD specification's algorithm, with up to 255 sectors per track
//! past the ATA limit).

/// The largest geometry: 65535 cylinders, 16 heads, 255 sectors per track.
/// An image with it takes its size from the footer's current size instead.
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
/// The largest disk QEMU opens or creates: 2040 GiB, in sectors.
pub const MAX_SECTORS: u64 = 0xff00_0000;

/// Cylinders, heads and sectors per track.
pub type Chs = (u16, u8, u8);

/// The number of sectors a geometry covers.
pub fn chs_sectors((c, h, s): Chs) -> u64 {
    u64::from(c) * u64::from(h) * u64::from(s)
}

/// The geometry the specification gives `total_sectors` (capped at the
/// largest); it may cover fewer sectors than asked.
pub fn calculate(total_sectors: u64) -> Chs {
    let total = total_sectors.min(MAX_GEOMETRY_SECTORS);
    let (secs, heads, cyls_times_heads): (u64, u64, u64);
    if total >= 65535 * 16 * 63 {
        secs = 255;
        heads = 16;
        cyls_times_heads = total / secs;
    } else {
        let mut s = 17;
        let mut cth = total / s;
        let mut h = cth.div_ceil(1024).max(4);
        if cth >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            cth = total / s;
        }
        if cth >= h * 1024 {
            s = 63;
            h = 16;
            cth = total / s;
        }
        secs = s;
        heads = h;
        cyls_times_heads = cth;
    }
    // Bounded by the cap above: at most 65535 cylinders, 16 heads, 255 sectors.
    let cyls = u16::try_from(cyls_times_heads / heads).unwrap_or(u16::MAX);
    let heads = u8::try_from(heads).unwrap_or(u8::MAX);
    let secs = u8::try_from(secs).unwrap_or(u8::MAX);
    (cyls, heads, secs)
}

/// The geometry and the size in sectors of a new disk of `size` bytes (a
/// multiple of 512): the smallest geometry covering it, or with `force_size`
/// (or when no geometry covers it) the largest geometry and the size as
/// given.
pub fn rounded(size: u64, force_size: bool) -> (Chs, u64) {
    let mut chs: Chs = (0, 0, 0);
    if force_size {
        chs = (65535, 16, 255);
    } else {
        let total = MAX_GEOMETRY_SECTORS.min(size / 512);
        let mut i = 0;
        while total > chs_sectors(chs) {
            chs = calculate(total + i);
            i += 1;
        }
    }
    if chs_sectors(chs) == MAX_GEOMETRY_SECTORS {
        (chs, size / 512)
    } else {
        (chs, chs_sectors(chs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_gib_rounds_up_to_whole_cylinders() {
        let (chs, sectors) = rounded(1 << 30, false);
        assert_eq!(chs, (2081, 16, 63));
        assert_eq!(sectors * 512, 1_073_995_776);
    }

    #[test]
    fn forced_or_huge_sizes_keep_the_size() {
        assert_eq!(rounded(1 << 30, true), ((65535, 16, 255), (1 << 30) / 512));
        let big = 200u64 << 30;
        assert_eq!(rounded(big, false), ((65535, 16, 255), big / 512));
        assert_eq!(rounded(0, false), ((0, 0, 0), 0));
    }
}
