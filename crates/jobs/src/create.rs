//! `create`: new qcow2 or raw images from qemu-img's option set (`-o key=value`),
//! with the same validation, defaults and the same "Formatting ..." summary.

use crate::output::{self, FileId, Inputs};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_format::qcow2::{CompressionType, CreateOptions, Preallocation};
use strata_format::raw::RawImage;
use strata_format::{BlockDevice, Format};
use strata_storage::Storage;

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

/// Keys a `luks` `-o` map may hold, in the order of qemu-img's summary line.
pub const LUKS_KEYS: &[&str] = &[
    "size",
    "key-secret",
    "cipher-alg",
    "cipher-mode",
    "ivgen-alg",
    "ivgen-hash-alg",
    "hash-alg",
    "iter-time",
    "detached-header",
    "nocow",
    "preallocation",
];

/// Whether an image `create` made of `format` with the `-o` map reads as zeroes
/// before anything is written to it. An encrypted image's preallocated
/// clusters hold zeroes on disk, which decrypt to noise: such an image does
/// not, so a copy into it must write its zeroes (as qemu-img does).
pub fn created_reads_zero(format: Format, opts: &BTreeMap<String, String>) -> bool {
    let preallocated = opts
        .get("preallocation")
        .is_some_and(|p| p.as_str() != "off");
    format.zero_init() && !(preallocated && crate::create_encrypt::encrypted(opts))
}

fn invalid(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: {msg}", path.display()))
}

/// How qemu-img words a preallocation that needed the image's storage to grow
/// when the storage cannot (an NBD export): `None` for any other failure.
/// `metadata` grows the file once its clusters are mapped; `falloc` and `full`
/// grow it first, through the file layer's own resize.
fn cannot_grow_words(e: &strata_format::Error, mode: Preallocation) -> Option<String> {
    let refused = matches!(
        e.storage_error(),
        Some(strata_storage::Error::Io { op: "Could not resize", source, .. })
            if source.raw_os_error() == Some(libc::ENOTSUP)
    );
    match mode {
        _ if !refused => None,
        Preallocation::Metadata => Some("Could not resize image: Cannot grow NBD nodes".into()),
        Preallocation::Falloc | Preallocation::Full => Some(
            "Could not resize image: Failed to resize underlying file: Cannot grow NBD nodes"
                .into(),
        ),
        Preallocation::Off => None,
    }
}

/// Parse an on/off value as QEMU does (its spellings `on`, `yes`, `true`, `y`
/// and `off`, `no`, `false`, `n`).
pub fn parse_bool(key: &str, v: &str) -> std::result::Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// Parse a size as QEMU does (see [`crate::size`]), at most 2^63 - 1 (a size
/// QEMU can give an image).
pub fn parse_size(s: &str) -> Option<u64> {
    parse_size_u64(s).filter(|&v| v <= i64::MAX as u64)
}

/// Whether `s`, which did not parse as a size, failed only for its range: a
/// negative number, or a well-formed number too large. QEMU calls those out of
/// range and says the rest is not a size at all.
pub fn size_out_of_range(s: &str) -> bool {
    match crate::size::parse(s) {
        Ok(v) => v > i64::MAX as u64,
        Err(e) => e == crate::size::SizeError::OutOfRange,
    }
}

/// How QEMU's option parser refuses `s` as the size-typed option `key`.
pub fn option_size_error(key: &str, s: &str) -> String {
    if size_out_of_range(s) {
        format!("Value '{s}' is out of range for parameter '{key}'")
    } else {
        size_expected(key)
    }
}

/// Parse a size as QEMU's option parser does: any value below 2^64.
pub fn parse_size_u64(s: &str) -> Option<u64> {
    crate::size::parse(s).ok()
}

/// A C-style number as QEMU's option parser reads it (`strtoull`/`strtoll` with
/// base 0): leading blanks, a sign, `0x` for hex or a leading `0` for octal,
/// and nothing after the digits. Returns the sign and the magnitude;
/// `Err(true)` when the magnitude does not fit 64 bits, `Err(false)` when the
/// text is no number.
pub fn c_number(v: &str) -> std::result::Result<(bool, u64), bool> {
    let t = v.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(false);
    }
    u64::from_str_radix(digits, radix)
        .map(|n| (neg, n))
        .map_err(|_| true)
}

/// A number-typed `-o` value read as [`c_number`] reads it; a negative number
/// wraps around 2^64, as in C. Errs with qemu-img's words when the text is no
/// number or its magnitude does not fit 64 bits.
pub fn parse_opt_number(key: &str, v: &str) -> std::result::Result<u64, String> {
    match c_number(v) {
        Ok((neg, n)) => Ok(if neg { n.wrapping_neg() } else { n }),
        Err(true) => Err(format!("Value '{v}' is too large for parameter '{key}'")),
        Err(false) => Err(format!("Parameter '{key}' expects a number")),
    }
}

/// How qemu-img's "Formatting" line shows a number-typed option: the parsed
/// value as a signed 64-bit number (so `0x10` shows as 16 and `-1` as -1).
fn shown_number(key: &str, v: &str) -> String {
    parse_opt_number(key, v).map_or_else(|_| v.to_string(), |n| (n as i64).to_string())
}

/// Keys a qcow2 `-o` map may hold.
const QCOW2_KEYS: &[&str] = &[
    "size",
    "compat",
    "backing_file",
    "backing_fmt",
    "cluster_size",
    "preallocation",
    "lazy_refcounts",
    "refcount_bits",
    "compression_type",
    "extended_l2",
    "encryption",
    "data_file",
    "data_file_raw",
    "nocow",
    "extent_size_hint",
];

/// The `encrypt.*` keys of a qcow2 `-o` map, in QEMU's order (the summary's).
pub const ENCRYPT_KEYS: &[&str] = &[
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
];

/// The names QEMU 10's qcow2 driver takes as a backing format (its block
/// driver enumeration as this build has it): with `-u` any of them is recorded
/// as given, the backing file not opened; another is refused after the
/// summary line.
pub const BACKING_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Secrets by id (`--object secret,id=ID,...`), for `encrypt.key-secret=ID`.
pub type Secrets = Arc<BTreeMap<String, Vec<u8>>>;

/// How qemu-img words a bad size-typed option (two lines, suffixes explained).
fn size_expected(key: &str) -> String {
    format!(
        "Parameter '{key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
    )
}

/// The first stage of qemu-img's handling of a qcow2 `-o` map, before it prints its
/// "Formatting" line: known keys, and values of number and on/off types.
fn qcow2_parse(opts: &BTreeMap<String, String>) -> std::result::Result<CreateOptions, String> {
    let mut c = CreateOptions::default();
    for (k, v) in opts {
        match k.as_str() {
            "backing_file" => c.backing_file = Some(v.clone()),
            "backing_fmt" => c.backing_format = Some(v.clone()),
            "cluster_size" => {
                c.cluster_size = parse_size(v).ok_or_else(|| option_size_error(k, v))?
            }
            "lazy_refcounts" => c.lazy_refcounts = parse_bool(k, v)?,
            "refcount_bits" => {
                // Past u32, the width is no power of two up to 64 all the same.
                c.refcount_bits = u32::try_from(parse_opt_number(k, v)?).unwrap_or(0)
            }
            "extended_l2" => c.extended_l2 = parse_bool(k, v)?,
            "data_file" => c.data_file = Some(v.clone()),
            "data_file_raw" => c.data_file_raw = parse_bool(k, v)?,
            "encryption" | "nocow" => {
                parse_bool(k, v)?;
            }
            "extent_size_hint" => {
                parse_size_u64(v).ok_or_else(|| option_size_error(k, v))?;
            }
            "encrypt.iter-time" => {
                parse_opt_number(k, v)?;
            }
            k if QCOW2_KEYS.contains(&k) || ENCRYPT_KEYS.contains(&k) => {}
            _ => return Err(format!("Invalid parameter '{k}'")),
        }
    }
    Ok(c)
}

/// The second stage, the qcow2 driver's own checks (after the "Formatting" line):
/// enumerated values and features strata does not write (the combination of
/// values is checked by [`CreateOptions::validate`]).
fn qcow2_values(
    opts: &BTreeMap<String, String>,
    c: &mut CreateOptions,
    secrets: &BTreeMap<String, Vec<u8>>,
) -> std::result::Result<(), String> {
    c.encrypt = crate::create_encrypt::luks_options(opts, secrets)?;
    c.encrypt_aes = crate::create_encrypt::aes_password(opts, secrets)?.map(Into::into);
    for (k, v) in opts {
        match k.as_str() {
            "backing_fmt" if !BACKING_FORMATS.contains(&v.as_str()) => {
                return Err(format!(
                    "Parameter 'backing-fmt' does not accept value '{v}'"
                ));
            }
            "compat" => {
                c.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(format!("Parameter 'version' does not accept value '{v}'")),
                }
            }
            "preallocation" => {
                c.preallocation = v
                    .parse::<Preallocation>()
                    .map_err(|_| format!("Parameter 'preallocation' does not accept value '{v}'"))?
            }
            "compression_type" => {
                c.compression_type = match v.as_str() {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => {
                        return Err(format!(
                            "Parameter 'compression-type' does not accept value '{v}'"
                        ))
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The qcow2 creation options a `-o` map describes (size excluded). Unknown keys,
/// bad values and unsupported features are refused with qemu-img's messages.
pub fn qcow2_options(
    opts: &BTreeMap<String, String>,
) -> std::result::Result<CreateOptions, String> {
    let mut c = qcow2_parse(opts)?;
    qcow2_values(opts, &mut c, &BTreeMap::new())?;
    Ok(c)
}

/// A create request checked as far as qemu-img checks before it prints its
/// "Formatting ..." line: [`Prepared::summary`] is that line, and
/// [`Prepared::create`] runs the format's own checks and writes the image.
#[derive(Debug, Clone)]
pub struct Prepared {
    path: PathBuf,
    size: u64,
    /// The summary line's options, after `fmt=FORMAT `.
    summary_options: String,
    kind: Kind,
    /// Files the new image must not be (its backing chain, and what the caller reads).
    inputs: Inputs,
    /// Secrets `encrypt.key-secret=` may name.
    secrets: Secrets,
    /// `nocow=on`: the new file is marked not to be copied on write.
    nocow: bool,
    /// `extent_size_hint=`: the file protocol's hint, checked against its
    /// limit (32 bits) after the summary line, before any file is made. A hint
    /// only: nothing the image holds depends on it.
    extent_size_hint: Option<u64>,
}

#[derive(Debug, Clone)]
enum Kind {
    /// The `preallocation=` value as given.
    Raw(Option<String>),
    /// The `-o` map (its LUKS settings are checked after the summary).
    Luks(BTreeMap<String, String>),
    Qcow2(CreateOptions, BTreeMap<String, String>),
    /// A format of another tool, with its `-o` map (typed after the summary).
    Foreign(Format, BTreeMap<String, String>),
}

/// Check `req` up to qemu-img's "Formatting" line: option keys and typed values,
/// the size, and the backing file (its header read, unless `-u`, for its size;
/// an encrypted one needs no secret).
pub fn prepare(req: &CreateRequest) -> Result<Prepared> {
    let p = &req.path;
    let opts = &req.options;
    let size_opt = match opts.get("size") {
        Some(s) => Some(parse_size(s).ok_or_else(|| invalid(p, option_size_error("size", s)))?),
        None => None,
    };
    let mut size = req.size.or(size_opt);
    let nocow = match opts.get("nocow") {
        Some(v) => parse_bool("nocow", v).map_err(|m| invalid(p, m))?,
        None => false,
    };
    let extent_size_hint = match opts.get("extent_size_hint") {
        Some(v) => Some(
            parse_size_u64(v)
                .ok_or_else(|| invalid(p, option_size_error("extent_size_hint", v)))?,
        ),
        None => None,
    };
    // qemu-img's summary prints the hint as a signed 64-bit number.
    let hint_summary = extent_size_hint
        .map(|v| format!(" extent_size_hint={}", v as i64))
        .unwrap_or_default();
    match req.format {
        Format::Raw => {
            for k in opts.keys() {
                if !["size", "preallocation", "nocow", "extent_size_hint"].contains(&k.as_str()) {
                    // `backing_file` too: the raw driver has no such option
                    // (qemu-img's own -b refusal is its caller's).
                    return Err(invalid(p, format!("Invalid parameter '{k}'")));
                }
            }
            let size = size.ok_or_else(|| invalid(p, "Image creation needs a size parameter"))?;
            let prealloc = opts.get("preallocation").cloned();
            let mut summary_options = format!("size={size}");
            if let Some(v) = opts.get("nocow") {
                summary_options.push_str(&format!(" nocow={v}"));
            }
            if let Some(v) = &prealloc {
                summary_options.push_str(&format!(" preallocation={v}"));
            }
            summary_options.push_str(&hint_summary);
            Ok(Prepared {
                path: p.clone(),
                size,
                summary_options,
                kind: Kind::Raw(prealloc),
                inputs: Inputs::default(),
                secrets: Secrets::default(),
                nocow,
                extent_size_hint,
            })
        }
        Format::Luks => {
            for (k, v) in opts {
                match k.as_str() {
                    "iter-time" => {
                        parse_opt_number(k, v).map_err(|m| invalid(p, m))?;
                    }
                    "detached-header" | "nocow" => {
                        parse_bool(k, v).map_err(|m| invalid(p, m))?;
                    }
                    // The file protocol's hint, read above.
                    "extent_size_hint" => {}
                    k if LUKS_KEYS.contains(&k) => {}
                    _ => return Err(invalid(p, format!("Invalid parameter '{k}'"))),
                }
            }
            let size = size.ok_or_else(|| invalid(p, "Image creation needs a size parameter"))?;
            let mut parts = vec![format!("size={size}")];
            parts.extend(LUKS_KEYS[1..].iter().filter_map(|k| {
                opts.get(*k).map(|v| match *k {
                    "iter-time" => format!("{k}={}", shown_number(k, v)),
                    _ => format!("{k}={v}"),
                })
            }));
            Ok(Prepared {
                path: p.clone(),
                size,
                summary_options: parts.join(" ") + &hint_summary,
                kind: Kind::Luks(opts.clone()),
                inputs: Inputs::default(),
                secrets: Secrets::default(),
                nocow,
                extent_size_hint,
            })
        }
        f @ (Format::Vpc
        | Format::Vdi
        | Format::Vhdx
        | Format::Vmdk
        | Format::Qed
        | Format::Parallels) => {
            crate::create_foreign::check(f, opts).map_err(|m| invalid(p, m))?;
            let mut inputs = Inputs::default();
            if let (Format::Qed, Some(b)) = (f, opts.get("backing_file")) {
                // A qed overlay's backing file is checked as a qcow2 one's.
                let fmt = opts.get("backing_fmt").map(String::as_str);
                check_backing(req, p, b, fmt, &mut size, &mut inputs)?;
            } else if let (None, Some(b)) = (size, opts.get("backing_file")) {
                // A vmdk over a parent takes the parent's size.
                let bpath = strata_chain::resolve_backing(p, b);
                let fmt = match opts.get("backing_fmt") {
                    Some(f) => f.parse::<Format>().map_err(|e| invalid(p, e))?,
                    None => strata_chain::probe_format(&bpath)?,
                };
                let dev = strata_chain::open_image(&bpath, fmt, false, true)
                    .map_err(|e| invalid(p, format!("{e}\nCould not open backing image.")))?;
                size = Some(dev.virtual_size());
            }
            let size = size.ok_or_else(|| invalid(p, "Image creation needs a size parameter"))?;
            Ok(Prepared {
                path: p.clone(),
                size,
                summary_options: crate::create_foreign::summary(f, size, opts),
                kind: Kind::Foreign(f, opts.clone()),
                inputs,
                secrets: Secrets::default(),
                nocow,
                extent_size_hint,
            })
        }
        Format::Qcow2 => {
            let c = qcow2_parse(opts).map_err(|m| invalid(p, m))?;
            let mut inputs = Inputs::default();
            if let Some(b) = &c.backing_file {
                check_backing(
                    req,
                    p,
                    b,
                    c.backing_format.as_deref(),
                    &mut size,
                    &mut inputs,
                )?;
            }
            let size = size.ok_or_else(|| invalid(p, "Image creation needs a size parameter"))?;
            Ok(Prepared {
                path: p.clone(),
                size,
                summary_options: qcow2_summary_options(opts, &c, size) + &hint_summary,
                kind: Kind::Qcow2(c, opts.clone()),
                inputs,
                secrets: Secrets::default(),
                nocow,
                extent_size_hint,
            })
        }
    }
}

/// Check the backing file `b` a new image of `req` (at `p`) records, with
/// its format (`backing_format`), as qemu-img does before its summary line
/// (for qcow2 and qed): the file opened for its header (unless `-u`), its
/// size taken when none was given (`size`), and every file of its chain
/// added to the files the new image must not be (`inputs`).
fn check_backing(
    req: &CreateRequest,
    p: &Path,
    b: &str,
    backing_format: Option<&str>,
    size: &mut Option<u64>,
    inputs: &mut Inputs,
) -> Result<()> {
    let p = &p.to_path_buf();
    let bpath = strata_chain::resolve_backing(p, b);
    let same_file = FileId::of(p).is_some_and(|id| FileId::of(&bpath) == Some(id));
    if same_file || Path::new(b) == p {
        return Err(Error::BackingIsItself(p.clone()));
    }
    let open_failed = |e: &strata_chain::Error| {
        let m = e.to_string();
        // A backing export that cannot be reached is not named
        // again (the opener's reason is QEMU's whole message).
        let e = if m.starts_with("Could not open") || strata_chain::is_protocol_name(Path::new(b)) {
            m
        } else if let strata_chain::Error::Format(_) = e {
            // The format driver's own refusal ("Image is not in
            // qcow2 format"), said as QEMU's create says it: the
            // file not named again.
            e.without_name(&bpath)
        } else {
            format!("Could not open '{b}': {m}")
        };
        invalid(p, format!("{e}\nCould not open backing image."))
    };
    let fmt: Option<Format> = match backing_format {
        Some(f) => match f.parse::<Format>() {
            Ok(f) => Some(f),
            // A driver strata lacks, recorded unopened (its
            // name is checked after the summary line).
            Err(_) if req.unsafe_backing => None,
            Err(_) if !BACKING_FORMATS.contains(&f) => {
                return Err(invalid(
                    p,
                    format!("Unknown driver '{f}'\nCould not open backing image."),
                ))
            }
            // The file protocol as a format: the file itself is
            // the backing image, read as raw (its size the new
            // image's); `file` is recorded as given.
            Err(_) if f == "file" => Some(Format::Raw),
            // A QEMU driver strata lacks: QEMU's driver would
            // open the file, and most files fail its first checks.
            Err(e) => {
                let why = crate::foreign_probe::refusal(f, &bpath)
                    .map(|m| format!("{m}\nCould not open backing image."));
                return Err(invalid(p, why.unwrap_or_else(|| e.to_string())));
            }
        },
        // With -u qemu-img does not look at the file to say
        // what it holds.
        None if req.unsafe_backing => {
            return Err(invalid(p, "Backing file specified without backing format"))
        }
        None => {
            // qemu-img probes, to say what it found, and still refuses:
            // a probed format is never recorded.
            let found = strata_chain::probe_format(&bpath).map_err(|e| open_failed(&e))?;
            return Err(invalid(
                p,
                format!(
                    "Backing file specified without backing format\nDetected format of {}.",
                    found.name()
                ),
            ));
        }
    };
    if let (false, Some(fmt)) = (req.unsafe_backing, fmt) {
        // For its header only, as qemu-img opens it (no I/O): an
        // encrypted backing file needs no secret, and an external
        // data file is not opened.
        let unlock = strata_format::qcow2::Unlock::None;
        let dev = strata_chain::open_image_with(&bpath, fmt, false, true, true, &unlock)
            .map_err(|e| open_failed(&e))?;
        if size.is_none() {
            *size = Some(dev.virtual_size());
        }
    }
    // The new image must not be any file of the chain it goes on
    // (with -u too, as far as that chain can be found).
    inputs.add_backing_chain(p, b, fmt);
    Ok(())
}

impl Prepared {
    /// qemu-img's summary: `Formatting 'x.qcow2', fmt=qcow2 cluster_size=65536 ...`.
    pub fn summary(&self) -> String {
        let format = match self.kind {
            Kind::Raw(_) => Format::Raw,
            Kind::Luks(_) => Format::Luks,
            Kind::Qcow2(..) => Format::Qcow2,
            Kind::Foreign(f, _) => f,
        };
        self.summary_as(&self.path.display().to_string(), format.name())
    }

    /// The summary line with the image and format named as the user gave them
    /// (`file:x`, `-f file`), as qemu-img prints it.
    pub fn summary_as(&self, name: &str, format: &str) -> String {
        format!("Formatting '{name}', fmt={format} {}", self.summary_options)
    }

    /// The secrets an `encrypt.key-secret=ID` option may name.
    pub fn with_secrets(mut self, secrets: Secrets) -> Self {
        self.secrets = secrets;
        self
    }

    /// Also refuse to create the image over any of `inputs` (the files the
    /// caller reads, such as a convert's sources).
    pub fn refusing(mut self, inputs: &Inputs) -> Self {
        self.inputs.extend(inputs);
        self
    }

    /// Run the format's checks and create the image. The output is opened through
    /// [`output::create_output`]: refused if it is one of the inputs or is in use,
    /// and truncated only once every check that needs no file has passed. If the
    /// image cannot be written, a file this call created is removed again (a file
    /// that existed before is never removed).
    pub fn create(self) -> Result<Created> {
        self.build(None)
    }

    /// Run the format's checks and write the image onto `storage`, an existing
    /// device that is not a file (an NBD export): nothing is created, removed or
    /// locked; what was on `storage` beyond the new image's metadata stays.
    pub fn create_on(self, storage: Arc<dyn Storage>) -> Result<Created> {
        self.build(Some(storage))
    }

    fn build(self, on: Option<Arc<dyn Storage>>) -> Result<Created> {
        let summary = self.summary();
        let p = &self.path;
        if self
            .extent_size_hint
            .is_some_and(|h| h > u64::from(u32::MAX))
        {
            return Err(invalid(p, "Extent size hint is too large"));
        }
        // QEMU's vdi and parallels drivers refuse a size, its vpc driver its
        // options or a size, and the file layer a preallocation mode, only once the file
        // layer has made the file, which stays (empty) behind.
        let keep_on_failure = match &self.kind {
            Kind::Foreign(f, opts) => {
                matches!(
                    f,
                    Format::Vdi | Format::Vpc | Format::Qed | Format::Parallels
                ) || opts.get("preallocation").is_some_and(|v| v == "metadata")
            }
            _ => false,
        };
        let build: Box<dyn FnOnce(Arc<dyn Storage>) -> Result<()>> = match self.kind {
            Kind::Raw(prealloc) => {
                let mode = match prealloc.as_deref() {
                    None => Preallocation::Off,
                    // On a device (an NBD export) the image is the device:
                    // qemu-img's generic creation takes no preallocation.
                    Some(v) if on.is_some() => match v.parse::<Preallocation>() {
                        Ok(Preallocation::Off) => Preallocation::Off,
                        Ok(_) => {
                            return Err(invalid(p, format!("Unsupported preallocation mode '{v}'")))
                        }
                        Err(_) => return Err(invalid(p, format!("invalid parameter value: {v}"))),
                    },
                    Some(v) => match v.parse::<Preallocation>() {
                        Ok(Preallocation::Metadata) => {
                            return Err(invalid(p, format!("Unsupported preallocation mode: {v}")))
                        }
                        Ok(m) => m,
                        Err(_) => return Err(invalid(p, format!("invalid parameter value: {v}"))),
                    },
                };
                let size = self.size;
                let path = p.clone();
                Box::new(move |storage| {
                    let img = RawImage::create(storage, size, mode).map_err(|e| {
                        if e.raw_os_error() == Some(libc::EFBIG) {
                            invalid(&path, "The image size is too large for file format 'raw'")
                        } else {
                            e.into()
                        }
                    })?;
                    img.flush()?;
                    Ok(())
                })
            }
            Kind::Luks(opts) => {
                let enc = crate::create_encrypt::luks_settings(&opts, "", &self.secrets)
                    .map_err(|m| invalid(p, m))?;
                if opts
                    .get("detached-header")
                    .is_some_and(|v| parse_bool("detached-header", v) == Ok(true))
                {
                    return Err(invalid(
                        p,
                        "A detached LUKS header is not supported by strata",
                    ));
                }
                let mode = match opts.get("preallocation").map(String::as_str) {
                    // QEMU's file layer takes `metadata` as no preallocation.
                    None | Some("metadata") => Preallocation::Off,
                    Some(v) => v
                        .parse::<Preallocation>()
                        .map_err(|_| invalid(p, format!("invalid parameter value: {v}")))?,
                };
                let size = self.size;
                let path = p.clone();
                Box::new(move |storage| {
                    let img = strata_format::luks::LuksImage::create(
                        storage,
                        size,
                        &enc.options,
                        &enc.password,
                        mode,
                    )
                    .map_err(|e| invalid(&path, e))?;
                    img.flush()?;
                    Ok(())
                })
            }
            Kind::Foreign(format, opts) => {
                let typed = crate::create_foreign::options(format, &opts);
                // vpc reads its options only once the file is made.
                if format != Format::Vpc {
                    typed.clone().map_err(|m| invalid(p, m))?;
                }
                // The file layer's preallocation: any mode but `metadata` does
                // nothing to the file these drivers write; an unknown one is
                // refused before the file is made, `metadata` after.
                let file_refusal = match opts.get("preallocation").map(String::as_str) {
                    None | Some("off" | "falloc" | "full") => None,
                    Some("metadata") => Some("Unsupported preallocation mode: metadata"),
                    Some(v) => return Err(invalid(p, format!("invalid parameter value: {v}"))),
                };
                let size = self.size;
                let path = p.clone();
                Box::new(move |storage| {
                    if let Some(m) = file_refusal {
                        return Err(invalid(&path, m));
                    }
                    let typed = typed.map_err(|m| invalid(&path, m))?;
                    crate::create_foreign::create(storage, &path, size, &typed)
                        .map_err(|e| invalid(&path, e))
                })
            }
            Kind::Qcow2(mut c, opts) => {
                c.size = self.size.div_ceil(512) * 512;
                qcow2_values(&opts, &mut c, &self.secrets).map_err(|m| invalid(p, m))?;
                c.validate().map_err(|e| invalid(p, e))?;
                let path = p.clone();
                Box::new(move |storage| {
                    let img = strata_format::qcow2::create(storage, &c).map_err(|e| {
                        match cannot_grow_words(&e, c.preallocation) {
                            Some(words) => invalid(&path, words),
                            None => invalid(&path, e),
                        }
                    })?;
                    img.close()?;
                    Ok(())
                })
            }
        };
        let created = Created {
            size: self.size,
            summary,
        };
        if let Some(storage) = on {
            build(storage)?;
            return Ok(created);
        }
        let out = output::create_output(p, &self.inputs).map_err(|e| match e {
            // qemu-img names the file before its lock and open errors.
            Error::Storage(e) => invalid(p, e),
            e => e,
        })?;
        if self.nocow {
            mark_nocow(p);
        }
        if let Err(e) = build(out.storage()) {
            if !keep_on_failure {
                out.discard();
            }
            return Err(e);
        }
        Ok(created)
    }
}

/// Create the image `req` describes ([`prepare`], then [`Prepared::create`]).
pub fn create(req: &CreateRequest) -> Result<Created> {
    prepare(req)?.create()
}

/// The options of qemu-img's summary line: defaults always, other options when
/// given, in QEMU's order.
fn qcow2_summary_options(opts: &BTreeMap<String, String>, c: &CreateOptions, size: u64) -> String {
    let onoff = |b: bool| if b { "on" } else { "off" };
    let mut parts: Vec<String> = std::iter::once("encryption")
        .chain(ENCRYPT_KEYS.iter().copied())
        .filter_map(|k| {
            opts.get(k).map(|v| match k {
                "encrypt.iter-time" => format!("{k}={}", shown_number(k, v)),
                _ => format!("{k}={v}"),
            })
        })
        .collect();
    parts.extend([
        format!("cluster_size={}", c.cluster_size),
        format!(
            "extended_l2={}",
            opts.get("extended_l2")
                .map(String::as_str)
                .unwrap_or(onoff(c.extended_l2))
        ),
    ]);
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
    for k in [
        "compat",
        "backing_file",
        "backing_fmt",
        "data_file",
        "data_file_raw",
    ] {
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
            .map(|v| shown_number("refcount_bits", v))
            .unwrap_or(c.refcount_bits.to_string())
    ));
    // The file protocol's own option comes after the format's.
    if let Some(v) = opts.get("nocow") {
        parts.push(format!("nocow={v}"));
    }
    parts.join(" ")
}

/// Mark the new, still empty file at `path` not to be copied on write (the
/// attribute takes effect only on an empty file, and only on filesystems that
/// copy on write, such as btrfs). Best effort, as QEMU's: a filesystem without
/// the attribute leaves the file as it is, and the image is created all the same.
fn mark_nocow(path: &Path) {
    /// `FS_NOCOW_FL` of the kernel's file attribute flags.
    const NOCOW: libc::c_int = 0x0080_0000;
    let Ok(f) = std::fs::File::open(path) else {
        return;
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let mut attr: libc::c_int = 0;
    // SAFETY: `fd` is open for the whole call and `attr` is a valid int the
    // ioctls read and write.
    unsafe {
        if libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut attr) == 0 {
            attr |= NOCOW;
            libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &attr);
        }
    }
}
