//! `qemu-img create -f vmdk`: every subformat, laid out as QEMU lays it out.

use super::descriptor::NewDescriptor;
use super::header::{
    SparseHeader, COMPRESSION_DEFLATE, FLAG_COMPRESS, FLAG_MARKER, FLAG_NL_DETECT, FLAG_RGD,
    FLAG_ZERO_GRAIN,
};
use super::image::VmdkImage;
use super::CreateOptions;
use crate::units::index;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_storage::{FileStorage, OpenOptions, Storage};

const SUBFORMATS: [&str; 5] = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];
const ADAPTERS: [&str; 4] = ["ide", "buslogic", "lsilogic", "legacyESX"];
/// The size of each extent of a split (twoGbMaxExtent*) image.
const SPLIT_SIZE: u64 = 0x8000_0000;

/// Write a new sparse extent of `size` bytes at the start of `storage`:
/// header, redundant grain directory and its tables, grain directory and
/// its tables, the file grown to where grains start (QEMU's layout, with
/// its 32-bit arithmetic).
fn init_sparse(storage: &dyn Storage, size: u64, compress: bool, zeroed_grain: bool) -> Result<()> {
    let capacity = size / 512;
    let granularity: u64 = 128;
    let gtes: u32 = 512;
    // QEMU computes these in 32 bits.
    #[allow(clippy::cast_possible_truncation)]
    let grains = capacity.div_ceil(granularity) as u32;
    let gt_size: u32 = (gtes * 4).div_ceil(512);
    let gt_count: u32 = grains.div_ceil(gtes);
    #[allow(clippy::cast_possible_truncation)]
    let gd_sectors: u32 = (u64::from(gt_count) * 4).div_ceil(512) as u32;
    let tables = u64::from(gt_size.wrapping_mul(gt_count));
    let desc_offset = 1u64;
    let desc_size = 20u64;
    let rgd_offset = desc_offset + desc_size;
    let gd_offset = rgd_offset + u64::from(gd_sectors) + tables;
    let grain_offset = (gd_offset + u64::from(gd_sectors) + tables).next_multiple_of(granularity);
    let h = SparseHeader {
        version: if compress {
            3
        } else if zeroed_grain {
            2
        } else {
            1
        },
        flags: FLAG_RGD
            | FLAG_NL_DETECT
            | if compress {
                FLAG_COMPRESS | FLAG_MARKER
            } else {
                0
            }
            | if zeroed_grain { FLAG_ZERO_GRAIN } else { 0 },
        capacity,
        granularity,
        desc_offset,
        desc_size,
        num_gtes_per_gt: gtes,
        rgd_offset,
        gd_offset,
        grain_offset,
        compress_algorithm: if compress { COMPRESSION_DEFLATE } else { 0 },
    };
    let sector = h.to_sector();
    storage.write_at(&sector[..4 + super::header::SPARSE_HEADER_LEN], 0)?;
    storage.set_size(grain_offset * 512)?;
    for dir in [rgd_offset, gd_offset] {
        let mut gd = vec![0u8; index(u64::from(gd_sectors) * 512)];
        #[allow(clippy::cast_possible_truncation)] // QEMU's 32-bit sector counter
        let mut tmp = (dir as u32).wrapping_add(gd_sectors);
        for e in gd.chunks_exact_mut(4).take(index(u64::from(gt_count))) {
            e.copy_from_slice(&tmp.to_le_bytes());
            tmp = tmp.wrapping_add(gt_size);
        }
        storage.write_at(&gd, dir * 512)?;
    }
    Ok(())
}

/// A new flat extent file of `size` bytes, as QEMU's file driver creates
/// it (its first block written, so that it reads as data).
fn init_flat(storage: &dyn Storage, size: u64) -> Result<()> {
    storage.set_size(size)?;
    if size > 0 {
        let n = if size < 4096 { 512 } else { 4096 };
        storage.write_at(&[0u8; 4096][..n], 0)?;
    }
    Ok(())
}

/// `path` split as QEMU splits it: directory (with its slash), the name
/// before its last dot, and the rest (".vmdk").
fn decompose(path: &Path) -> Result<(PathBuf, String, String)> {
    let s = path.to_string_lossy();
    if s.is_empty() {
        return Err(Error::invalid_argument("No filename provided"));
    }
    let cut = s.rfind('/').map_or(0, |i| i + 1);
    let (dir, base) = s.split_at(cut);
    let (prefix, postfix) = match base.rfind('.') {
        Some(i) => base.split_at(i),
        None => (base, ""),
    };
    Ok((PathBuf::from(dir), prefix.to_string(), postfix.to_string()))
}

fn new_file(path: &Path) -> Result<Arc<dyn Storage>> {
    Ok(Arc::new(FileStorage::create(path)?))
}

/// The parent's CID for `backing` (named relative to the new image at `path`).
fn parent_cid(path: Option<&Path>, backing: &str) -> Result<u32> {
    let b = Path::new(backing);
    let full = if b.is_absolute() {
        b.to_path_buf()
    } else {
        path.and_then(Path::parent).unwrap_or(Path::new("")).join(b)
    };
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&full, OpenOptions::read())?);
    let mut head = vec![0u8; 2048];
    storage.read_at(&mut head, 0)?;
    let len = index(storage.size()?.min(2048));
    if !super::probe(&head[..len]) {
        let fmt = if head.starts_with(b"QFI\xfb") {
            "qcow2"
        } else {
            "raw"
        };
        return Err(Error::invalid_argument(format!(
            "Invalid backing file format: {fmt}. Must be vmdk"
        )));
    }
    let img = VmdkImage::open(storage, Some(&full), false)
        .map_err(|_| Error::invalid_argument("Failed to read parent CID"))?;
    Ok(img.cid())
}

/// Check the options as QEMU does before anything is written.
fn check(opts: &CreateOptions) -> Result<(bool, bool, bool)> {
    if !ADAPTERS.contains(&opts.adapter_type.as_str()) {
        return Err(Error::invalid_argument(format!(
            "invalid parameter value: {}",
            opts.adapter_type
        )));
    }
    if !SUBFORMATS.contains(&opts.subformat.as_str()) {
        return Err(Error::invalid_argument(format!(
            "invalid parameter value: {}",
            opts.subformat
        )));
    }
    let hw = opts.hwversion.as_deref().filter(|h| *h != "undefined");
    if opts.compat6 && hw.is_some() {
        return Err(Error::invalid_argument(
            "compat6 cannot be enabled with hwversion set",
        ));
    }
    let sub = opts.subformat.as_str();
    let split = sub == "twoGbMaxExtentFlat" || sub == "twoGbMaxExtentSparse";
    let flat = sub == "monolithicFlat" || sub == "twoGbMaxExtentFlat";
    let compress = sub == "streamOptimized";
    if flat && opts.backing_file.is_some() {
        return Err(Error::new(
            crate::ErrorKind::Unsupported,
            "Flat image can't have backing file",
        ));
    }
    if flat && opts.zeroed_grain {
        return Err(Error::new(
            crate::ErrorKind::Unsupported,
            "Flat image can't enable zeroed grain",
        ));
    }
    Ok((split, flat, compress))
}

/// Create the image: see [`super::create`].
pub fn create(
    storage: Arc<dyn Storage>,
    path: Option<&Path>,
    size: u64,
    opts: &CreateOptions,
) -> Result<()> {
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::invalid_argument("Image size is too large"))?;
    let (split, flat, compress) = check(opts)?;
    let name = path.unwrap_or(Path::new(""));
    let (dir, prefix, postfix) = decompose(name)?;
    let hw = match opts.hwversion.as_deref().filter(|h| *h != "undefined") {
        _ if opts.compat6 => "6",
        Some(h) => h,
        None => "4",
    };
    let tools = opts.toolsversion.as_deref().unwrap_or("2147483647");
    let parent_cid = match &opts.backing_file {
        Some(b) => parent_cid(path, b)?,
        None => 0xffff_ffff,
    };

    let line = |sectors: u64, file: &str| {
        if flat {
            format!("RW {sectors} FLAT \"{file}\" 0\n")
        } else {
            format!("RW {sectors} SPARSE \"{file}\"\n")
        }
    };
    let mut lines = String::new();
    storage.set_size(0)?;
    if !split && !flat {
        init_sparse(storage.as_ref(), size, compress, opts.zeroed_grain)?;
        lines.push_str(&line(size.div_ceil(512), &format!("{prefix}{postfix}")));
    } else {
        let extent_size = if split { SPLIT_SIZE } else { size };
        let mut created = 0u64;
        let mut idx = 1u32;
        while created < size {
            let cur = (size - created).min(extent_size);
            let fname = if split {
                format!("{prefix}-{}{idx:03}{postfix}", if flat { 'f' } else { 's' })
            } else {
                format!("{prefix}-flat{postfix}")
            };
            let ext = new_file(&dir.join(&fname))?;
            if flat {
                init_flat(ext.as_ref(), cur)?;
            } else {
                init_sparse(ext.as_ref(), cur, compress, opts.zeroed_grain)?;
            }
            ext.flush()?;
            lines.push_str(&line(cur.div_ceil(512), &fname));
            created += cur;
            idx += 1;
        }
    }

    let mut r = [0u8; 4];
    getrandom::getrandom(&mut r).map_err(|e| Error::invalid(e.to_string()))?;
    let desc = NewDescriptor {
        cid: u32::from_le_bytes(r),
        parent_cid,
        create_type: &opts.subformat,
        parent: opts.backing_file.as_deref(),
        extent_lines: &lines,
        hw_version: hw,
        size,
        adapter_type: &opts.adapter_type,
        tools_version: tools,
    }
    .render();
    if !split && !flat {
        storage.write_at(desc.as_bytes(), 0x200)?;
    } else {
        storage.write_at(desc.as_bytes(), 0)?;
        storage.set_size(desc.len() as u64)?;
    }
    storage.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_names_as_qemu() {
        let (d, p, x) = decompose(Path::new("/a/b/disk.x.vmdk")).unwrap();
        assert_eq!(
            (d.to_str().unwrap(), p.as_str(), x.as_str()),
            ("/a/b/", "disk.x", ".vmdk")
        );
        let (d, p, x) = decompose(Path::new("disk")).unwrap();
        assert_eq!(
            (d.to_str().unwrap(), p.as_str(), x.as_str()),
            ("", "disk", "")
        );
    }
}
