//! What qemu-img says when `create -F DRIVER -b FILE` (or `-f DRIVER` for
//! the image a command opens) names a format strata does not read (dmg,
//! bochs, ...) and the file is not in that format: each QEMU driver
//! refuses the file in its own words when it opens it, and qemu-img reports
//! that refusal.
//!
//! Only the first checks each driver makes on the file's header are
//! modelled, those a file of another format (a qcow2 or raw file, the usual
//! mistake) fails. A file that passes them may really be in that format, or
//! fail a later check; strata then keeps its own refusal (`None`).

use std::io::Read;
use std::path::Path;

/// The QEMU format drivers modelled below that read their image through a
/// file child: each opens the file first (a missing file is refused as the
/// file protocol refuses it), then checks its header.
pub const FILE_FORMATS: &[&str] = &["dmg", "bochs", "cloop", "qcow"];

/// More bytes than any check below reads from the file's start (the
/// header fields end within its first 512 bytes).
const MAX_READ: u64 = 4096;

/// The refusal QEMU's `driver` gives the file at `path` (as the backing file
/// is opened: relative to the new image), or `None` when the file passes the
/// checks modelled here, or cannot be read.
pub fn refusal(driver: &str, path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut head = Vec::new();
    f.by_ref().take(MAX_READ).read_to_end(&mut head).ok()?;
    // QEMU reads past the end of a file as zeroes, and sizes a file in whole
    // 512-byte sectors.
    let sectors_len = len.checked_next_multiple_of(512)?;
    let at = |off: usize, n: usize| -> Vec<u8> {
        let mut v = vec![0u8; n];
        if let Some(src) = head.get(off..) {
            let k = src.len().min(n);
            v[..k].copy_from_slice(&src[..k]);
        }
        v
    };
    let le32 = |off: usize| u32::from_le_bytes(at(off, 4).try_into().unwrap_or_default());
    let be32 = |off: usize| u32::from_be_bytes(at(off, 4).try_into().unwrap_or_default());
    let tail = |n: u64| -> Option<Vec<u8>> {
        use std::io::{Seek, SeekFrom};
        let start = sectors_len.checked_sub(n)?;
        let mut v = vec![0u8; usize::try_from(n).ok()?];
        let mut f = std::fs::File::open(path).ok()?;
        f.seek(SeekFrom::Start(start)).ok()?;
        let mut got = 0;
        while got < v.len() {
            match f.read(&mut v[got..]).ok()? {
                0 => break,
                k => got += k,
            }
        }
        Some(v)
    };
    match driver {
        "dmg" => {
            if sectors_len < 512 {
                return Some("dmg file must be at least 512 bytes long".into());
            }
            // The trailer's magic lies in the last 515 bytes of the
            // sector-rounded length.
            let window = tail(sectors_len.min(515))?;
            let found = window.windows(4).any(|w| w == b"koly");
            (!found).then(|| "Could not locate UDIF trailer in dmg file".into())
        }
        "bochs" => {
            // Each field holds its text and a terminating NUL.
            let field = |off: usize, text: &[u8]| {
                let v = at(off, text.len() + 1);
                &v[..text.len()] == text && v[text.len()] == 0
            };
            let version = le32(64);
            let ok = field(0, b"Bochs Virtual HD Image")
                && field(32, b"Redolog")
                && field(48, b"Growing")
                && (version == 0x0002_0000 || version == 0x0001_0000);
            (!ok).then(|| "Image not in Bochs format".into())
        }
        "cloop" => {
            const MAX_BLOCK: u32 = 64 << 20;
            let block = be32(128);
            if block % 512 != 0 {
                return Some(format!("block_size {block} must be a multiple of 512"));
            }
            if block == 0 {
                return Some("block_size cannot be zero".into());
            }
            if block > MAX_BLOCK {
                return Some(format!(
                    "block_size {block} must be {} MB or less",
                    MAX_BLOCK >> 20
                ));
            }
            let blocks = u64::from(be32(132));
            let limit = (u64::from(u32::MAX) - 1) / 8;
            if blocks > limit {
                return Some(format!("n_blocks {blocks} must be {limit} or less"));
            }
            ((blocks + 1) * 8 > 512 << 20)
                .then(|| "image requires too many offsets, try increasing block size".into())
        }
        "qcow" => {
            if at(0, 4) != b"QFI\xfb" {
                return Some("Image not in qcow format".into());
            }
            let version = be32(4);
            match version {
                1 => None,
                2 | 3 => Some(format!(
                    "qcow (v1) does not support qcow version {version}\nTry the 'qcow2' driver instead."
                )),
                v => Some(format!("qcow (v1) does not support qcow version {v}")),
            }
        }
        "nbd" => (!path.to_string_lossy().starts_with("nbd:"))
            .then(|| "File name string for NBD must start with 'nbd:'".into()),
        _ => None,
    }
}
