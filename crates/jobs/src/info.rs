//! `info`: what an image is (format, sizes, backing file, snapshots, format details
//! and the file under it), in the shape of QEMU's `ImageInfo`.
//!
//! Field names and optional fields follow QEMU's schema so that the JSON a client
//! gets from strata parses like the JSON qemu-img prints.

use crate::Result;
use serde::Serialize;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use strata_chain::Layer;
use strata_format::luks::LuksImage;
use strata_format::qcow2::{Qcow2Image, Snapshot};
use strata_format::vmdk::VmdkImage;
use strata_format::BlockDevice;

/// Information about one image (one layer of a chain).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// File names are bytes (they need not be UTF-8); JSON shows each invalid
    /// sequence as U+FFFD, as QEMU does.
    #[serde(serialize_with = "lossy")]
    pub filename: OsString,
    pub format: String,
    pub dirty_flag: bool,
    /// Bytes allocated on the host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    pub virtual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// `Some(true)` for an encrypted image (QEMU says nothing of clear ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy_opt")]
    pub backing_filename: Option<OsString>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy_opt")]
    pub full_backing_filename: Option<OsString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    pub children: Vec<ChildInfo>,
}

/// One internal snapshot.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_sec: u64,
    pub vm_clock_nsec: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
}

impl From<&Snapshot> for SnapshotInfo {
    fn from(s: &Snapshot) -> Self {
        SnapshotInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            vm_state_size: s.vm_state_size,
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            icount: s.icount,
        }
    }
}

/// Format-specific details, tagged by format.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum FormatSpecific {
    Qcow2(Qcow2Specific),
    File(FileSpecific),
    /// A `luks` image: its header, as a qcow2 image's `encrypt` block shows it.
    Luks(crate::info_encrypt::LuksInfo),
    /// A `vmdk` image: its descriptor's IDs and create type, its extents.
    Vmdk(VmdkSpecific),
}

/// vmdk details, fields in QEMU's schema order.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmdkSpecific {
    pub create_type: String,
    pub cid: u32,
    pub parent_cid: u32,
    pub extents: Vec<VmdkExtentInfo>,
}

/// One extent of a vmdk image.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VmdkExtentInfo {
    #[serde(serialize_with = "lossy")]
    pub filename: OsString,
    pub format: String,
    pub virtual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed: Option<bool>,
}

/// qcow2 details. Version 2 images report only `compat`, `compression-type` and
/// `refcount-bits`, as QEMU does.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    pub compat: String,
    /// The external data file's name as the image records it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    pub refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<Box<crate::info_encrypt::EncryptInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapEntry>>,
    pub compression_type: String,
}

/// A persistent dirty bitmap.
#[derive(Debug, Clone, Serialize)]
pub struct BitmapEntry {
    pub flags: Vec<String>,
    pub name: String,
    pub granularity: u64,
}

/// The protocol layer (a plain file) has no details yet.
#[derive(Debug, Clone, Serialize)]
pub struct FileSpecific {}

/// A child node: the file holding the image.
#[derive(Debug, Clone, Serialize)]
pub struct ChildInfo {
    pub name: String,
    pub info: ImageInfo,
}

/// Describe one opened layer. `filename` is how the user (or the overlay above)
/// named it.
pub fn layer_info(layer: &Layer, filename: &OsStr) -> Result<ImageInfo> {
    let dev = &layer.device;
    let actual = dev.allocated_bytes()?;
    let file_len = file_length(dev.as_ref())?;
    // QEMU picks its host_device protocol for character and block devices.
    let device = std::fs::metadata(&layer.path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_char_device() || m.file_type().is_block_device()
    });
    let file_template = |name: OsString, len: u64, actual: Option<u64>| ImageInfo {
        filename: name,
        format: "file".into(),
        dirty_flag: false,
        actual_size: actual,
        virtual_size: len,
        cluster_size: None,
        encrypted: None,
        backing_filename: None,
        full_backing_filename: None,
        backing_filename_format: None,
        snapshots: Vec::new(),
        format_specific: Some(FormatSpecific::File(FileSpecific {})),
        children: Vec::new(),
    };
    let file = ImageInfo {
        filename: filename.to_os_string(),
        format: if device { "host_device" } else { "file" }.into(),
        dirty_flag: false,
        actual_size: actual,
        virtual_size: file_len,
        cluster_size: None,
        encrypted: None,
        backing_filename: None,
        full_backing_filename: None,
        backing_filename_format: None,
        snapshots: Vec::new(),
        format_specific: Some(FormatSpecific::File(FileSpecific {})),
        children: Vec::new(),
    };
    let mut info = ImageInfo {
        filename: filename.to_os_string(),
        format: dev.format_name().to_string(),
        dirty_flag: false,
        actual_size: actual,
        virtual_size: dev.virtual_size(),
        cluster_size: None,
        encrypted: None,
        backing_filename: None,
        full_backing_filename: None,
        backing_filename_format: None,
        snapshots: Vec::new(),
        format_specific: None,
        children: vec![ChildInfo {
            name: "file".into(),
            info: file,
        }],
    };
    // The format-specific part of `info` is qcow2's own header and bitmap
    // directory: an inspection of that format, not a capability of devices.
    if let Some(q) = dev.as_any().downcast_ref::<Qcow2Image>() {
        let h = q.header();
        info.dirty_flag = h.is_dirty();
        info.cluster_size = Some(h.cluster_size());
        let encrypt = q
            .encryption()
            .map(|e| crate::info_encrypt::EncryptInfo::of(&e));
        info.encrypted = encrypt.is_some().then_some(true);
        info.backing_filename = layer.backing_name.clone();
        info.full_backing_filename = layer.backing_path.clone().map(PathBuf::into_os_string);
        info.backing_filename_format = layer.backing_format.clone();
        info.snapshots = q.snapshots().iter().map(SnapshotInfo::from).collect();
        let v3 = h.version >= 3;
        let bitmaps = if v3 { q.bitmaps()? } else { Vec::new() };
        info.format_specific = Some(FormatSpecific::Qcow2(Qcow2Specific {
            compat: if v3 { "1.1" } else { "0.10" }.into(),
            data_file: strata_format::qcow2::data_file::name(&h)
                .map(|n| String::from_utf8_lossy(&n).into_owned()),
            data_file_raw: strata_format::qcow2::data_file::has_data_file(&h)
                .then(|| strata_format::qcow2::data_file::is_raw(&h)),
            extended_l2: v3.then(|| h.extended_l2()),
            lazy_refcounts: v3.then(|| h.lazy_refcounts()),
            corrupt: v3.then(|| h.is_corrupt()),
            refcount_bits: h.refcount_bits(),
            encrypt: encrypt.map(Box::new),
            bitmaps: (!bitmaps.is_empty()).then(|| {
                bitmaps
                    .iter()
                    .map(|b| BitmapEntry {
                        flags: b.flag_names().into_iter().map(String::from).collect(),
                        name: b.name.clone(),
                        granularity: b.granularity,
                    })
                    .collect()
            }),
            compression_type: h.compression_type.name().into(),
        }));
    }
    if dev
        .format_name()
        .parse::<strata_format::Format>()
        .is_ok_and(strata_format::Format::is_foreign)
    {
        info.cluster_size = dev.cluster_size();
    }
    if dev
        .as_any()
        .downcast_ref::<strata_format::qed::QedImage>()
        .is_some()
    {
        // QEMU's qed reports no dirty flag (the need-check flag stays inside).
        info.backing_filename = layer.backing_name.clone();
        info.full_backing_filename = layer.backing_path.clone().map(PathBuf::into_os_string);
        info.backing_filename_format = layer.backing_format.clone();
    }
    if let Some(v) = dev.as_any().downcast_ref::<VmdkImage>() {
        info.backing_filename = layer.backing_name.clone();
        info.full_backing_filename = layer.backing_path.clone().map(PathBuf::into_os_string);
        info.backing_filename_format = layer.backing_format.clone();
        vmdk_info(&mut info, v, &file_template)?;
    }
    if let Some(l) = dev.as_any().downcast_ref::<LuksImage>() {
        info.encrypted = Some(true);
        info.format_specific = Some(FormatSpecific::Luks(crate::info_encrypt::luks(&l.header())));
    }
    Ok(info)
}

/// A vmdk image's details, and its extent files (those apart from the
/// image's own file) as child nodes before `file`, the last extent first
/// (QEMU's order).
fn vmdk_info(
    info: &mut ImageInfo,
    v: &VmdkImage,
    file: &dyn Fn(OsString, u64, Option<u64>) -> ImageInfo,
) -> Result<()> {
    let extents = v.extents();
    info.format_specific = Some(FormatSpecific::Vmdk(VmdkSpecific {
        create_type: v.create_type().to_string(),
        cid: v.cid(),
        parent_cid: v.parent_cid(),
        extents: extents
            .iter()
            .map(|e| VmdkExtentInfo {
                filename: e.filename.clone().into_os_string(),
                format: e.format.clone(),
                virtual_size: e.virtual_size,
                cluster_size: e.cluster_size,
                compressed: e.compressed.then_some(true),
            })
            .collect(),
    }));
    // The image's own file is the descriptor (or the one sparse extent).
    let main = v.main_file();
    let (len, actual) = (main.size()?, main.allocated_bytes()?);
    for c in info.children.iter_mut().filter(|c| c.name == "file") {
        c.info.virtual_size = len.div_ceil(512) * 512;
        c.info.actual_size = actual;
    }
    for (i, e) in extents.iter().enumerate() {
        if let Some((len, actual)) = v.extent_file_size(i)? {
            info.children.insert(
                0,
                ChildInfo {
                    name: format!("extents.{i}"),
                    info: file(e.filename.clone().into_os_string(), len, actual),
                },
            );
        }
    }
    Ok(())
}

/// The length of the file under a device, in whole 512-byte sectors as QEMU
/// reports it.
fn file_length(dev: &dyn BlockDevice) -> Result<u64> {
    // A qcow2 image's file is its metadata's, even when the data is elsewhere.
    let file = match dev.as_any().downcast_ref::<Qcow2Image>() {
        Some(q) => Some(q.image_file()),
        None => match dev.as_any().downcast_ref::<LuksImage>() {
            Some(l) => Some(l.storage()),
            None => dev.host_file(),
        },
    };
    let len = match file {
        Some(file) => file.size()?,
        None => dev.virtual_size(),
    };
    Ok(len.div_ceil(512) * 512)
}

/// Describe every layer of a chain, top first; each below the top is named as the
/// layer above resolved its backing file name.
pub fn chain_info(chain: &strata_chain::Chain, top_name: &OsStr) -> Result<Vec<ImageInfo>> {
    let mut out = Vec::with_capacity(chain.layers.len());
    let mut name = top_name.to_os_string();
    for layer in &chain.layers {
        // A layer reached through a protocol (an NBD export) is named as it
        // reports itself.
        if strata_chain::is_protocol_name(&layer.path) {
            name = layer.path.clone().into_os_string();
        }
        let info = layer_info(layer, &name)?;
        name = layer
            .backing_path
            .clone()
            .map(PathBuf::into_os_string)
            .unwrap_or_default();
        out.push(info);
    }
    Ok(out)
}

/// A name in JSON: its bytes as UTF-8, each invalid sequence as U+FFFD.
fn lossy<S: serde::Serializer>(name: &OsString, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&name.to_string_lossy())
}

fn lossy_opt<S: serde::Serializer>(
    name: &Option<OsString>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match name {
        Some(n) => lossy(n, s),
        None => s.serialize_none(),
    }
}
