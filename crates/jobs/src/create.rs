//! `create`: new qcow2 or raw images from qemu-img's option set (`-o key=value`),
//! with the same validation, defaults and the same "Formatting ..." summary.

use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_format::qcow2::{CompressionType, CreateOptions, Preallocation};
use strata_format::raw::RawImage;
use strata_format::{BlockDevice, Format};
use strata_storage::{FileStorage, Storage};

/// A request to create an image.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub path: PathBuf,
    pub format: Format,
    /// The size; when `None` it is taken from `size=` or the backing file.
    pub size: Option<u64>,
    /// `-o` options (already split; values as the user wrote them).
    pub options: BTreeMap<String, String>,
    /// Do not open the backing file (`-u`): the size must then be given.
    pub unsafe_backing: bool,
}

/// What was created, with qemu-img's one-line summary.
#[derive(Debug, Clone)]
pub struct Created {
    pub size: u64,
    /// `Formatting 'x.qcow2', fmt=qcow2 cluster_size=65536 ...`
    pub summary: String,
}

/// Options each format accepts.
pub fn supported_options(format: Format) -> &'static [(&'static str, &'static str)] {
    match format {
        Format::Qcow2 => &[
            ("backing_file", "File name of a base image"),
            ("backing_fmt", "Image format of the base image"),
            ("cluster_size", "qcow2 cluster size"),
            ("compat", "Compatibility level (v2 [0.10] or v3 [1.1])"),
            (
                "compression_type",
                "Compression method used for image cluster compression (zlib, zstd)",
            ),
            ("extended_l2", "Extended L2 tables (on/off)"),
            ("lazy_refcounts", "Postpone refcount updates (on/off)"),
            (
                "preallocation",
                "Preallocation mode (allowed values: off, metadata, falloc, full)",
            ),
            ("refcount_bits", "Width of a reference count entry in bits"),
            ("size", "Virtual disk size"),
        ],
        Format::Raw => &[
            (
                "preallocation",
                "Preallocation mode (allowed values: off, falloc, full)",
            ),
            ("size", "Virtual disk size"),
        ],
    }
}

fn invalid(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: {msg}", path.display()))
}

/// Parse an on/off value as QEMU does.
pub fn parse_bool(key: &str, v: &str) -> std::result::Result<bool, String> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// Parse a size with qemu's suffixes (k, M, G, T, P, E; b for bytes).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult): (&str, u64) = match s.chars().last()? {
        'b' | 'B' => (&s[..s.len() - 1], 1),
        'k' | 'K' => (&s[..s.len() - 1], 1 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        't' | 'T' => (&s[..s.len() - 1], 1 << 40),
        'p' | 'P' => (&s[..s.len() - 1], 1 << 50),
        'e' | 'E' => (&s[..s.len() - 1], 1 << 60),
        _ => (s, 1),
    };
    let v = if num.contains('.') {
        let f: f64 = num.parse().ok()?;
        let v = f * mult as f64;
        if !(0.0..9.223_372_036_854_775e18).contains(&v) {
            return None;
        }
        v as u64
    } else {
        num.parse::<u64>().ok()?.checked_mul(mult)?
    };
    (v <= i64::MAX as u64).then_some(v)
}

/// The qcow2 creation options a `-o` map describes (size excluded). Unknown keys,
/// bad values and unsupported features are refused with qemu-img's messages.
pub fn qcow2_options(
    opts: &BTreeMap<String, String>,
) -> std::result::Result<CreateOptions, String> {
    let mut c = CreateOptions::default();
    for (k, v) in opts {
        match k.as_str() {
            "size" => {}
            "compat" => {
                c.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(format!("Parameter 'version' does not accept value '{v}'")),
                }
            }
            "backing_file" => c.backing_file = Some(v.clone()),
            "backing_fmt" => c.backing_format = Some(v.clone()),
            "cluster_size" => {
                c.cluster_size = parse_size(v).ok_or_else(|| {
                    "Parameter 'cluster_size' expects a non-negative number below 2^64".to_string()
                })?
            }
            "preallocation" => {
                c.preallocation = v
                    .parse::<Preallocation>()
                    .map_err(|_| format!("Invalid parameter '{v}'"))?
            }
            "lazy_refcounts" => c.lazy_refcounts = parse_bool(k, v)?,
            "refcount_bits" => {
                c.refcount_bits = v
                    .parse()
                    .map_err(|_| "Parameter 'refcount_bits' expects a number".to_string())?
            }
            "compression_type" => {
                c.compression_type = match v.as_str() {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => return Err(format!("Invalid parameter '{v}'")),
                }
            }
            "extended_l2" => c.extended_l2 = parse_bool(k, v)?,
            "encryption" | "data_file" | "data_file_raw" => {
                return Err(format!(
                    "strata does not support '{k}' (encrypted images and external data files)"
                ))
            }
            k if k.starts_with("encrypt.") => {
                return Err("strata does not support encrypted images".to_string())
            }
            _ => return Err(format!("Invalid parameter '{k}'")),
        }
    }
    Ok(c)
}

/// Create the image `req` describes. The file is created (or truncated).
pub fn create(req: &CreateRequest) -> Result<Created> {
    let p = &req.path;
    let opts = &req.options;
    let size_opt = match opts.get("size") {
        Some(s) => Some(parse_size(s).ok_or_else(|| {
            invalid(
                p,
                "Invalid image size specified. Must be between 0 and 9223372036854775807.",
            )
        })?),
        None => None,
    };
    let mut size = req.size.or(size_opt);
    match req.format {
        Format::Raw => {
            for k in opts.keys() {
                if k != "size" && k != "preallocation" {
                    if k == "backing_file" || k == "backing_fmt" {
                        return Err(invalid(
                            p,
                            "Backing file not supported for file format 'raw'",
                        ));
                    }
                    return Err(invalid(p, format!("Invalid parameter '{k}'")));
                }
            }
            let prealloc = match opts.get("preallocation") {
                Some(v) => match v.parse::<Preallocation>() {
                    Ok(Preallocation::Metadata) | Err(_) => {
                        return Err(invalid(p, format!("Invalid parameter '{v}'")))
                    }
                    Ok(m) => Some((m, v.clone())),
                },
                None => None,
            };
            let size = size.ok_or_else(|| invalid(p, "Image creation needs a size parameter"))?;
            let mut summary = format!("Formatting '{}', fmt=raw size={size}", p.display());
            if let Some((_, v)) = &prealloc {
                summary.push_str(&format!(" preallocation={v}"));
            }
            let storage: Arc<dyn Storage> = Arc::new(FileStorage::create(p)?);
            let img = RawImage::create(
                storage,
                size,
                prealloc.map(|x| x.0).unwrap_or(Preallocation::Off),
            )?;
            img.flush()?;
            Ok(Created { size, summary })
        }
        Format::Qcow2 => {
            let mut c = qcow2_options(opts).map_err(|m| invalid(p, m))?;
            if c.backing_file.is_some() && c.backing_format.is_none() {
                return Err(invalid(p, "Backing file specified without backing format"));
            }
            if let (Some(b), false) = (&c.backing_file, req.unsafe_backing) {
                let bfmt: Format = c
                    .backing_format
                    .as_deref()
                    .expect("checked above")
                    .parse()
                    .map_err(|e: strata_format::Error| invalid(p, e))?;
                let bpath = strata_chain::resolve_backing(p, b);
                let dev = strata_chain::open_image(&bpath, bfmt, false, true).map_err(|e| {
                    invalid(
                        p,
                        format!("Could not open '{b}': {e}\nCould not open backing image."),
                    )
                })?;
                if size.is_none() {
                    size = Some(dev.virtual_size());
                }
            }
            let size = size.ok_or_else(|| invalid(p, "Image creation needs a size parameter"))?;
            c.size = size.div_ceil(512) * 512;
            c.validate().map_err(|e| invalid(p, e))?;
            let summary = qcow2_summary(p, opts, &c, size);
            let storage: Arc<dyn Storage> = Arc::new(FileStorage::create(p)?);
            let img = strata_format::qcow2::create(storage, &c).map_err(|e| invalid(p, e))?;
            img.close()?;
            Ok(Created { size, summary })
        }
    }
}

/// qemu-img's summary line: defaults always, other options when given, in QEMU's order.
fn qcow2_summary(
    p: &Path,
    opts: &BTreeMap<String, String>,
    c: &CreateOptions,
    size: u64,
) -> String {
    let onoff = |b: bool| if b { "on" } else { "off" };
    let mut parts = vec![
        format!("cluster_size={}", c.cluster_size),
        format!(
            "extended_l2={}",
            opts.get("extended_l2")
                .map(String::as_str)
                .unwrap_or(onoff(c.extended_l2))
        ),
    ];
    if let Some(v) = opts.get("preallocation") {
        parts.push(format!("preallocation={v}"));
    }
    parts.push(format!(
        "compression_type={}",
        opts.get("compression_type")
            .map(String::as_str)
            .unwrap_or("zlib")
    ));
    parts.push(format!("size={size}"));
    for k in ["compat", "backing_file", "backing_fmt"] {
        if let Some(v) = opts.get(k) {
            parts.push(format!("{k}={v}"));
        }
    }
    parts.push(format!(
        "lazy_refcounts={}",
        opts.get("lazy_refcounts")
            .map(String::as_str)
            .unwrap_or(onoff(c.lazy_refcounts))
    ));
    parts.push(format!(
        "refcount_bits={}",
        opts.get("refcount_bits")
            .cloned()
            .unwrap_or(c.refcount_bits.to_string())
    ));
    format!(
        "Formatting '{}', fmt=qcow2 {}",
        p.display(),
        parts.join(" ")
    )
}
