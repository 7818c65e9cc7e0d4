//! Creating qcow2 images with QEMU's options.

use super::compress::CompressionType;
use super::encryption::LuksEncrypt;
use super::header::{self, Header};
use super::image::{Qcow2Image, Qcow2OpenOptions};
use super::refcount::rb_set;
use crate::units::index;
use crate::{BlockDevice, Error, Result};
use std::sync::Arc;
use strata_storage::Storage;

/// `preallocation=` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    #[default]
    Off,
    Metadata,
    Falloc,
    Full,
}

impl std::str::FromStr for Preallocation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => {
                return Err(Error::invalid_argument(format!(
                    "Invalid parameter '{s}' for preallocation"
                )))
            }
        })
    }
}

/// Everything `qemu-img create -f qcow2 -o ...` can set.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    pub lazy_refcounts: bool,
    pub refcount_bits: u32,
    pub preallocation: Preallocation,
    pub compression_type: CompressionType,
    pub extended_l2: bool,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Encrypt with LUKS (`encrypt.format=luks`).
    pub encrypt: Option<LuksEncrypt>,
    /// Encrypt with the legacy AES format (`encryption=on`, `encrypt.format=aes`)
    /// keyed by this password; only one of `encrypt` and `encrypt_aes` is set.
    pub encrypt_aes: Option<std::sync::Arc<[u8]>>,
    /// External data file name (`data_file=`): created (or truncated) and named in
    /// the header; relative names are taken from the current directory, as QEMU does.
    pub data_file: Option<String>,
    /// `data_file_raw=on`: the data file is kept a raw image of the disk.
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            lazy_refcounts: false,
            refcount_bits: 16,
            preallocation: Preallocation::Off,
            compression_type: CompressionType::Zlib,
            extended_l2: false,
            backing_file: None,
            backing_format: None,
            encrypt: None,
            encrypt_aes: None,
            data_file: None,
            data_file_raw: false,
        }
    }
}

impl CreateOptions {
    /// Check the combination as QEMU does, with its messages.
    pub fn validate(&self) -> Result<()> {
        // The checks and their order are QEMU's (the first failing one is reported).
        let bad = |m: &str| Err(Error::invalid_argument(m));
        let cs = self.cluster_size;
        let v2 = self.version == 2;
        if !self.size.is_multiple_of(512) {
            return bad("Image size must be a multiple of 512 bytes");
        }
        if self.version != 2 && self.version != 3 {
            return bad("Invalid compatibility level");
        }
        if self.extended_l2 && v2 {
            return bad("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return bad("Cluster size must be a power of two between 512 and 2048k");
        }
        if self.extended_l2 && cs < 16384 {
            return bad(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        if self.backing_file.is_some()
            && self.preallocation != Preallocation::Off
            && !self.extended_l2
        {
            return bad("Backing file and preallocation can only be used at the same time if extended_l2 is on");
        }
        if self.backing_format.is_some() && self.backing_file.is_none() {
            return bad("Backing format cannot be used without backing file");
        }
        if v2 && self.lazy_refcounts {
            return bad("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return bad("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if v2 && self.refcount_bits != 16 {
            return bad("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)");
        }
        if self.data_file_raw && self.data_file.is_none() {
            return bad("data-file-raw requires data-file");
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return bad("Backing file and data-file-raw cannot be used at the same time");
        }
        if self.data_file.is_some() && v2 {
            return bad("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if v2 && self.compression_type != CompressionType::Zlib {
            return bad("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        // The last two are refused by QEMU once it writes the image; here, before
        // anything is written, so that a refused create leaves no file changed.
        if let Some(name) = self.backing_file.as_deref().filter(|n| n.len() > 1023) {
            return bad(&format!(
                "Could not assign backing file '{name}' with format '{}': Invalid argument",
                self.backing_format.as_deref().unwrap_or("")
            ));
        }
        let l2_entries = cs / if self.extended_l2 { 16 } else { 8 };
        let l1_entries = self.size.div_ceil(cs * l2_entries);
        if l1_entries.saturating_mul(8) > header::MAX_L1_BYTES {
            return bad("The image size is too large for file format 'qcow2' (try using a larger cluster size)");
        }
        Ok(())
    }
}

/// Create a qcow2 image on `storage` (which is truncated) and return it open for
/// writing. Layout as QEMU's: header, refcount table, refcount block, L1 table.
pub fn create(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<Qcow2Image> {
    opts.validate()?;
    let data = match &opts.data_file {
        None => None,
        Some(name) => Some(super::data_file::create_file(name)?),
    };
    create_inner(storage, data, opts)
}

/// Create a qcow2 image on `storage` whose external data file (`opts.data_file`
/// names it in the header) is `data`, already open; `data` is truncated.
pub fn create_with_data_file(
    storage: Arc<dyn Storage>,
    data: Arc<dyn Storage>,
    opts: &CreateOptions,
) -> Result<Qcow2Image> {
    opts.validate()?;
    if opts.data_file.is_none() {
        return Err(Error::invalid_argument(
            "a data file needs a data_file name",
        ));
    }
    create_inner(storage, Some(data), opts)
}

fn create_inner(
    storage: Arc<dyn Storage>,
    data: Option<Arc<dyn Storage>>,
    opts: &CreateOptions,
) -> Result<Qcow2Image> {
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let refcount_order = opts.refcount_bits.trailing_zeros();
    let mut h = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order,
        header_length: if opts.version >= 3 {
            header::V3_HEADER_LEN_COMPRESSION
        } else {
            header::V2_HEADER_LEN
        },
        compression_type: opts.compression_type,
        backing_file: opts.backing_file.clone().map(Into::into),
        backing_format: opts.backing_format.clone(),
        // As QEMU: no feature-name table with clusters of 4 KiB or less, where it
        // would leave little room for a backing file name in the first cluster.
        feature_names: if opts.version >= 3 && cs > 4096 {
            Header::default_feature_names()
        } else {
            Vec::new()
        },
        bitmaps: None,
        crypto: None,
        unknown_extensions: Vec::new(),
    };
    if opts.lazy_refcounts {
        h.compatible_features |= header::compat::LAZY_REFCOUNTS;
    }
    if opts.compression_type != CompressionType::Zlib {
        h.incompatible_features |= header::incompat::COMPRESSION;
    }
    if opts.extended_l2 {
        h.incompatible_features |= header::incompat::EXTL2;
    }
    if let Some(name) = &opts.data_file {
        h.incompatible_features |= header::incompat::DATA_FILE;
        super::data_file::set_name(&mut h, Some(name.as_bytes()));
        if opts.data_file_raw {
            h.autoclear_features |= header::autoclear::DATA_FILE_RAW;
        }
    }
    let hdr = h.serialize()?;
    // The old contents go first, durably: new clusters under an old header would
    // make an image neither old nor new. A file that is still empty (made for
    // this image, as convert and create make theirs) has nothing to drop.
    if storage.size()? != 0 {
        storage.set_size(0)?;
        storage.flush()?;
    }
    // Refcount table (cluster 1) pointing at one refcount block (cluster 2) that counts
    // clusters 0, 1 and 2. They are durable before the header names them: a crash
    // before the header leaves a file no tool opens as qcow2, never a qcow2 header
    // over missing refcounts (which qemu-img would call corrupt).
    let mut table = vec![0u8; index(cs)];
    table[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    storage.write_at(&table, cs)?;
    let mut block = vec![0u8; index(cs)];
    for c in 0..3 {
        rb_set(&mut block, refcount_order, c, 1);
    }
    storage.write_at(&block, 2 * cs)?;
    storage.flush()?;
    let mut first = vec![0u8; index(cs)];
    first[..hdr.len()].copy_from_slice(&hdr);
    storage.write_at(&first, 0)?;
    storage.flush()?;
    let mut img = match data {
        None => Qcow2Image::open(storage.clone(), Qcow2OpenOptions::default())?,
        Some(data) => {
            data.set_size(0)?;
            Qcow2Image::open_with_data_file(storage.clone(), data, Qcow2OpenOptions::default())?
        }
    };
    // Size the disk: the L1 table is created by the ordinary growth path (a raw
    // data file is mapped whole there).
    img.resize(opts.size, false)?;
    // The LUKS area follows the L1 table, as in QEMU's images.
    if let Some(enc) = &opts.encrypt {
        img.install_luks(enc)?;
    }
    if let Some(password) = &opts.encrypt_aes {
        img.install_aes(password)?;
    }
    if opts.preallocation != Preallocation::Off {
        img.preallocate(opts.preallocation)?;
    }
    img.flush()?;
    Ok(img)
}
