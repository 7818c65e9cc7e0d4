//! The format extension: one cluster holding features (dirty bitmaps), read
//! when an image is opened read-only. QEMU checks it then and refuses an
//! image whose extension is damaged; the bitmaps it holds are validated here
//! and otherwise ignored (nothing in strata reads a parallels bitmap).

use super::header::{le32, le64};
use crate::{Error, Result};
use md5::{Digest, Md5};
use strata_storage::Storage;

const EXT_MAGIC: u64 = 0xab23_4cef_23dc_ea87;
const END_OF_FEATURES: u64 = 0;
const DIRTY_BITMAP_FEATURE: u64 = 0x2038_5fae_252c_b34a;
/// Magic and MD5 of the rest of the cluster.
const EXT_HEADER_LEN: usize = 24;
/// Magic, flags, data size, padding.
const FEATURE_HEADER_LEN: usize = 24;
/// Size in sectors, UUID, granularity in sectors, L1 table length.
const BITMAP_FEATURE_LEN: usize = 32;

/// Check the extension cluster at byte `ext_off` of an image with clusters
/// of `cluster_size` bytes and `nb_sectors` guest sectors, as QEMU's
/// read-only open does, with its messages.
///
/// Only the bytes the file holds are read (the rest of the cluster reads as
/// zeroes, as in QEMU); a hostile cluster size costs no allocation beyond the
/// file's own length.
pub fn check(
    storage: &dyn Storage,
    ext_off: u64,
    cluster_size: u64,
    nb_sectors: u64,
) -> Result<()> {
    let file_len = storage.size()?;
    let have = file_len.saturating_sub(ext_off).min(cluster_size);
    let mut cluster = vec![0u8; crate::units::index(have)];
    storage.read_at(&mut cluster, ext_off)?;
    let byte = |i: u64| -> u8 { cluster.get(crate::units::index(i)).copied().unwrap_or(0) };
    let read = |at: u64, n: usize| -> Vec<u8> { (0..n as u64).map(|i| byte(at + i)).collect() };

    let head = read(0, EXT_HEADER_LEN);
    let magic = le64(&head, 0);
    if magic != EXT_MAGIC {
        return Err(Error::invalid(format!(
            "Wrong parallels Format Extension magic: 0x{magic:x}, expected: 0x{EXT_MAGIC:x}"
        )));
    }
    let mut md5 = Md5::new();
    let body_end = (EXT_HEADER_LEN as u64).max(have);
    md5.update(&cluster[EXT_HEADER_LEN.min(cluster.len())..]);
    let zeros = [0u8; 4096];
    let mut left = cluster_size.saturating_sub(body_end);
    while left > 0 {
        let n = left.min(zeros.len() as u64);
        md5.update(&zeros[..crate::units::index(n)]);
        left -= n;
    }
    if md5.finalize()[..] != head[8..24] {
        return Err(Error::invalid(
            "Wrong checksum in Format Extension header. Format extension is corrupted.",
        ));
    }

    // QEMU counts what is left from the header on and takes a feature's data
    // off only where it moves past it, which this follows.
    let mut remaining = i64::try_from(cluster_size).unwrap_or(i64::MAX) - EXT_HEADER_LEN as i64;
    let mut pos = EXT_HEADER_LEN as u64;
    let mut names: Vec<[u8; 16]> = Vec::new();
    loop {
        if remaining < FEATURE_HEADER_LEN as i64 || pos + FEATURE_HEADER_LEN as u64 > cluster_size {
            return Err(Error::invalid(format!(
                "Can not read feature header, as remaining bytes ({remaining}) in Format Extension is less than Feature header size ({FEATURE_HEADER_LEN})"
            )));
        }
        let fh = read(pos, FEATURE_HEADER_LEN);
        pos += FEATURE_HEADER_LEN as u64;
        remaining -= FEATURE_HEADER_LEN as i64;
        let magic = le64(&fh, 0);
        let flags = le64(&fh, 8);
        let data_size = le32(&fh, 16);
        if flags != 0 {
            return Err(Error::invalid(
                "Flags for extension feature are unsupported",
            ));
        }
        if i64::from(data_size) > remaining {
            return Err(Error::invalid(
                "Feature data_size exceedes Format Extension cluster",
            ));
        }
        match magic {
            END_OF_FEATURES => return Ok(()),
            DIRTY_BITMAP_FEATURE => {
                let data_size = u64::from(data_size);
                if data_size < BITMAP_FEATURE_LEN as u64 {
                    return Err(Error::invalid(format!(
                        "Too small Bitmap Feature area in Parallels Format Extension: {data_size} bytes, expected at least {BITMAP_FEATURE_LEN} bytes"
                    )));
                }
                let bf = read(pos, BITMAP_FEATURE_LEN);
                let size = le64(&bf, 0);
                let mut id = [0u8; 16];
                id.copy_from_slice(&bf[8..24]);
                let granularity = u64::from(le32(&bf, 24)) << 9;
                let l1_size = le32(&bf, 28);
                if size != nb_sectors {
                    return Err(Error::invalid(format!(
                        "Bitmap size (in sectors) {} differs from disk size in sectors {nb_sectors}",
                        size as i64
                    )));
                }
                if u64::from(l1_size) * 8 > data_size - BITMAP_FEATURE_LEN as u64 {
                    return Err(Error::invalid(
                        "Bitmaps feature corrupted: l1 table exceeds extension data_size",
                    ));
                }
                if !granularity.is_power_of_two() || granularity < 512 {
                    return Err(Error::invalid(format!(
                        "Bitmap granularity {granularity} is not a power of two of at least 512"
                    )));
                }
                if names.contains(&id) {
                    return Err(Error::invalid(format!(
                        "Bitmap already exists: {}",
                        uuid_text(&id)
                    )));
                }
                names.push(id);
                // The table must cover the bitmap serialised in 64-bit words.
                let bits = (size * 512).div_ceil(granularity);
                let bytes = bits.div_ceil(64) * 8;
                let expected = bytes.div_ceil(cluster_size);
                if expected != u64::from(l1_size) {
                    return Err(Error::invalid(format!(
                        "Bitmap table size {l1_size} does not correspond to bitmap size and cluster size. Expected {expected}"
                    )));
                }
            }
            other => {
                return Err(Error::invalid(format!("Unknown feature: 0x{other:x}")));
            }
        }
        pos = (pos + u64::from(data_size)).next_multiple_of(8);
    }
}

/// A UUID as QEMU prints it (lowercase, hyphenated, bytes in stored order).
fn uuid_text(id: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in id.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}
