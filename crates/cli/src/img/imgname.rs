//! QEMU's ways of naming an image on qemu-img's command line, turned into a
//! [`strata_chain::OpenSpec`]: a file name, a `json:{...}` pseudo-filename (nested
//! objects and dotted keys alike), or with `--image-opts` an option list
//! (`driver=qcow2,file.filename=PATH,...`). The format driver's own options go to
//! the spec's `driver_options`; the file layer below it becomes the spec's path;
//! `--object` secrets go to its `secrets`. Options QEMU's drivers do not know are
//! refused with QEMU's message, naming the image as typed.

use super::blkdebug::Under;
use super::common::split_items;
use super::objects::ObjectArgs;
use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use strata_chain::OpenSpec;
use strata_format::Format;

/// `--object` and `--image-opts`, as every subcommand that opens an existing
/// image takes them.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct Naming {
    #[command(flatten)]
    pub objects: ObjectArgs,
    /// The image arguments are option lists (`driver=qcow2,file.filename=PATH,...`),
    /// not file names.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
}

impl Naming {
    /// The spec for the image argument `name` with `-f` `format` and `-U`: its
    /// location, format, driver options and the command line's secrets.
    pub fn spec(&self, name: &Path, format: Option<&str>, force_share: bool) -> Result<OpenSpec> {
        if self.image_opts && format.is_some() {
            bail!("--image-opts and --format are mutually exclusive");
        }
        Ok(self.spec_nbd(name, format, force_share)?.0)
    }

    /// [`Naming::spec`] for a subcommand that opens the image for its
    /// metadata only (`info`): an unknown option is refused before any
    /// secret is looked for, as QEMU opens such an image without its key.
    pub fn metadata_spec(
        &self,
        name: &Path,
        format: Option<&str>,
        force_share: bool,
    ) -> Result<OpenSpec> {
        if self.image_opts && format.is_some() {
            bail!("--image-opts and --format are mutually exclusive");
        }
        Ok(self.spec_nbd_as(name, format, force_share, true)?.0)
    }

    /// [`Naming::spec`] for an image the subcommand opens for writing (no
    /// `-U`): an option list or `json:` name asking for `force-share` on it
    /// (or on its file) is refused as qemu-img refuses it, before the image or
    /// the rest of its options are looked at; so is an NBD export served
    /// read-only.
    pub fn writable_spec(&self, name: &Path, format: Option<&str>) -> Result<OpenSpec> {
        if self.image_opts && format.is_some() {
            bail!("--image-opts and --format are mutually exclusive");
        }
        self.objects.secrets()?;
        let flat = self.flat_options(name, format).unwrap_or_default();
        let on = |k: &str| switched_on(&flat, k);
        // A read-only node may share its file; it is refused for writing
        // below, once open.
        if !self.read_only_node(name, format) && (on("force-share") || on("file.force-share")) {
            bail!(
                "Could not open '{}': force-share=on can only be used with read-only images",
                name.display()
            );
        }
        let (spec, nbd) = self.spec_nbd(name, format, false)?;
        // A read-only export cannot be opened for writing: refused at the
        // open, before the format is probed.
        if nbd.is_some_and(|s| strata_storage::Storage::read_only(s.as_ref())) {
            bail!(
                "Could not open '{}': Could not open image: Permission denied",
                name.display()
            );
        }
        self.refuse_read_only_node(name, format, &spec)?;
        Ok(spec)
    }

    /// Refuses to write an image whose options make it, or its file, a
    /// read-only node (`read-only=on`, `file.read-only=on`), as qemu-img
    /// refuses it: the image is opened first (read-only, then closed again),
    /// so whatever fails that open is said instead, in its own words; only an
    /// image that opens is refused as "Block node is read-only", where QEMU's
    /// request for write permission on the opened node fails.
    pub fn refuse_read_only_node(
        &self,
        name: &Path,
        format: Option<&str>,
        spec: &OpenSpec,
    ) -> Result<()> {
        if !self.read_only_node(name, format) {
            return Ok(());
        }
        let mut trial = spec.clone();
        trial.write = false;
        trial.write_layers.clear();
        drop(super::common::open_chain(&trial)?);
        bail!(
            "Could not open '{}': Block node is read-only",
            spec.shown_name()
        );
    }

    /// Whether the options of the image argument `name` make it, or its
    /// file, a read-only node.
    fn read_only_node(&self, name: &Path, format: Option<&str>) -> bool {
        let flat = self.flat_options(name, format).unwrap_or_default();
        switched_on(&flat, "read-only") || switched_on(&flat, "file.read-only")
    }

    /// [`Naming::spec`], and the NBD export's storage when the name is one.
    pub fn spec_nbd(
        &self,
        name: &Path,
        format: Option<&str>,
        force_share: bool,
    ) -> Result<(
        OpenSpec,
        Option<std::sync::Arc<strata_nbd::storage::NbdStorage>>,
    )> {
        self.spec_nbd_as(name, format, force_share, false)
    }

    /// [`Naming::spec_nbd`]; `metadata_only` as in [`Naming::metadata_spec`].
    fn spec_nbd_as(
        &self,
        name: &Path,
        format: Option<&str>,
        force_share: bool,
        metadata_only: bool,
    ) -> Result<(
        OpenSpec,
        Option<std::sync::Arc<strata_nbd::storage::NbdStorage>>,
    )> {
        if self.image_opts && format.is_some() {
            bail!("--image-opts and --format are mutually exclusive");
        }
        let secrets = self.objects.secrets()?;
        let (mut spec, nbd) = match self.open_nbd(name, format)? {
            Some(nbd) => (nbd.spec, Some(nbd.storage)),
            None => match image_spec(name, format, self.image_opts) {
                Ok(spec) => (spec, None),
                Err(e) if metadata_only => return Err(for_metadata_open(e)),
                Err(e) => return Err(for_data_open(e, name, &secrets)),
            },
        };
        spec.force_share |= force_share;
        spec.secrets = secrets;
        if !metadata_only {
            // A backing node given without a backing file of its own by the
            // deprecated empty string, warned of as QEMU opens the node.
            for _ in spec.driver_options.iter().filter(|(k, v)| {
                k.starts_with("backing.") && k.ends_with(".backing") && v.is_empty()
            }) {
                super::common::warn(
                    "Use of \"backing\": \"\" is deprecated; use \"backing\": null instead",
                );
            }
        }
        Ok((spec, nbd))
    }

    /// The NBD export the image argument `name` names, connected (`None` when it
    /// names no export): see [`super::nbdname`].
    pub fn open_nbd(
        &self,
        name: &Path,
        format: Option<&str>,
    ) -> Result<Option<super::nbdname::Opened>> {
        let typed = name.to_string_lossy();
        let flat = self.flat_options(name, format);
        if !super::nbdname::names_export(&typed, flat.as_ref()) {
            return Ok(None);
        }
        super::nbdname::open(&typed, flat.as_ref(), format, &self.objects.objects()?).map(Some)
    }

    /// Whether the image argument `name` names an NBD export.
    pub fn names_nbd(&self, name: &Path) -> bool {
        let flat = self.flat_options(name, None);
        super::nbdname::names_export(&name.to_string_lossy(), flat.as_ref())
    }

    /// The options of an image argument given as an option list or a `json:`
    /// name (`-f` as its driver), `None` for a file name or unparsable JSON.
    fn flat_options(&self, name: &Path, format: Option<&str>) -> Option<BTreeMap<String, String>> {
        if self.image_opts {
            return Some(opts_list(&name.to_string_lossy()));
        }
        let json = name.as_os_str().as_bytes().strip_prefix(b"json:")?;
        let mut flat = json_options(json).ok()?;
        if let Some(f) = format {
            flat.insert("driver".into(), f.to_string());
        }
        Some(flat)
    }
}

/// Whether the switch `key` of an option map is on, in any of QEMU's spellings.
fn switched_on(flat: &BTreeMap<String, String>, key: &str) -> bool {
    flat.get(key)
        .is_some_and(|v| strata_jobs::create::parse_bool(key, v) == Ok(true))
}

/// Whether `key` is one of the options every block driver takes.
pub fn is_common_option(key: &str) -> bool {
    COMMON_OPTIONS.contains(&key)
}

/// Options every block driver takes (QEMU's generic node options); accepted and,
/// but for `force-share`, without effect on strata.
const COMMON_OPTIONS: [&str; 8] = [
    "node-name",
    "cache.direct",
    "cache.no-flush",
    "read-only",
    "auto-read-only",
    "discard",
    "detect-zeroes",
    "force-share",
];

/// The qcow2 driver's own options (a key, or a prefix ending in '.').
const QCOW2_OPTIONS: [&str; 17] = [
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "overlap-check",
    "overlap-check.",
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
    "encrypt.format",
    "encrypt.key-secret",
    "data-file",
    "data-file.",
    "backing",
];

/// Driver options QEMU knows that would change the guest's view of the image and
/// that strata does not implement: refused rather than ignored.
const UNSUPPORTED_DATA_OPTIONS: &[&str] = &["offset", "size", "backing"];

/// The options a backing file takes through its overlay's `backing.` keys (one
/// `backing.` per level): its own secret (`encrypt.key-secret`, a luks file's `key-secret`) and the qcow2 options that leave its
/// data as the image records it. Its file, driver and data file stay those the
/// overlay records.
fn backing_option_supported(key: &str) -> bool {
    let mut own = key;
    while let Some(rest) = own.strip_prefix("backing.") {
        own = rest;
    }
    own != key
        && (COMMON_OPTIONS.contains(&own)
            || known(own, &QCOW2_OPTIONS) && !known(own, &["backing", "data-file", "data-file."])
            || LUKS_OPTIONS.contains(&own))
}

/// The raw format driver's own options.
const RAW_OPTIONS: [&str; 2] = ["offset", "size"];
/// The parallels driver's own options (how the file grows).
const PARALLELS_OPTIONS: [&str; 2] = ["prealloc-mode", "prealloc-size"];
/// The luks driver's own options.
const LUKS_OPTIONS: [&str; 1] = ["key-secret"];
/// The vpc driver's own options.
const VPC_OPTIONS: [&str; 1] = ["force_size_calc"];

/// The file protocol's options (host_device's too).
const FILE_OPTIONS: [&str; 6] = [
    "aio",
    "aio-max-batch",
    "locking",
    "pr-manager",
    "x-check-cache-dropped",
    "drop-cache",
];

/// Whether `key` is one of `known` (exactly, or below a prefix ending in '.';
/// a child like `backing` takes its own dotted options too).
fn known(key: &str, known: &[&str]) -> bool {
    known.iter().any(|k| match k.strip_suffix('.') {
        Some(prefix) => key.strip_prefix(prefix).is_some_and(|r| r.starts_with('.')),
        None => key == *k || (*k == "backing" && key.starts_with("backing.")),
    })
}

/// The spec for the image argument `name` (see the module doc); `format` is `-f`,
/// which wins over a `json:` name's driver.
pub fn image_spec(name: &Path, format: Option<&str>, image_opts: bool) -> Result<OpenSpec> {
    let typed = name.to_string_lossy().into_owned();
    let flat = if image_opts {
        let (flat, warnings) = opts_list_noted(&typed);
        for w in warnings {
            super::common::warn(&w);
        }
        Some(flat)
    } else if let Some(json) = name.as_os_str().as_bytes().strip_prefix(b"json:") {
        Some(json_options(json).map_err(|e| anyhow!("Could not open '{typed}': {e}"))?)
    } else {
        None
    };
    let Some(mut flat) = flat else {
        return file_name_spec(name, format)
            .map_err(|e| anyhow!("Could not open '{typed}': {e}"))
            .map(|mut spec| {
                if spec.path != name {
                    spec.display_name = Some(typed);
                }
                spec
            });
    };
    if let Some(f) = format {
        flat.insert("driver".into(), f.to_string());
    }
    let mut spec = from_options(flat).map_err(|e| match e.downcast::<NamingError>() {
        Ok(n) => anyhow::Error::new(n.opening(&typed)),
        Err(e) => anyhow!("Could not open '{typed}': {e}"),
    })?;
    spec.display_name = Some(typed);
    Ok(spec)
}

/// An error from [`image_spec`] as a subcommand opening the image for its
/// data (not `info`) gives it: see [`NamingErrorKind::UnknownOptionOnEncrypted`].
/// `secrets` are the command line's; `name` the image as typed.
pub fn for_data_open(
    e: anyhow::Error,
    name: &Path,
    secrets: &BTreeMap<String, Vec<u8>>,
) -> anyhow::Error {
    match e
        .downcast_ref::<NamingError>()
        .and_then(|n| n.for_data_open(secrets))
    {
        Some(refusal) => anyhow!("Could not open '{}': {refusal}", name.display()),
        None => e,
    }
}

/// An error from [`image_spec`] as a subcommand opening the image for its
/// metadata only (`info`) gives it: see [`NamingErrorKind::BackingNodeOption`].
fn for_metadata_open(e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<NamingError>() {
        Ok(n) => match n.kind {
            NamingErrorKind::BackingNodeOption {
                unknown_without_backing,
            } => anyhow!("{}{unknown_without_backing}", n.context),
            kind => anyhow::Error::new(NamingError { kind, ..n }),
        },
        Err(e) => e,
    }
}

/// Whether QEMU 10 lists `name` among its block drivers (`qemu-img --help`):
/// the backing formats its qcow2 driver takes but `blkreplay` (which it does
/// not list), and `iser` (which it lists but refuses as a backing format).
pub fn is_qemu_driver(name: &str) -> bool {
    name == "iser" || (name != "blkreplay" && strata_jobs::create::BACKING_FORMATS.contains(&name))
}

/// The protocol drivers qemu-img takes as a format (`-f file`): the file itself
/// is the image.
const PROTOCOL_DRIVERS: [&str; 3] = ["file", "host_device", "host_cdrom"];

/// Protocol prefixes QEMU's block layer knows and strata does not open: named
/// as such rather than as unknown protocols.
const UNSUPPORTED_PROTOCOLS: [&str; 18] = [
    "blkverify",
    "http",
    "https",
    "ftp",
    "ftps",
    "ssh",
    "gluster",
    "gluster+tcp",
    "gluster+unix",
    "gluster+rdma",
    "iscsi",
    "iser",
    "nfs",
    "rbd",
    "null-co",
    "null-aio",
    "nvme",
    "host_cdrom",
];

/// The refusal of a protocol prefix other than `file:`.
fn protocol_refusal(prefix: &[u8]) -> anyhow::Error {
    let p = String::from_utf8_lossy(prefix);
    if UNSUPPORTED_PROTOCOLS.contains(&p.as_ref()) {
        anyhow!("The '{p}' protocol is not supported by strata")
    } else {
        anyhow!("Unknown protocol '{p}'")
    }
}

/// The protocol prefix of a file name, as QEMU finds one: a colon before any
/// slash (`nbd:...`, `file:...`; `./a:b` has none).
pub(super) fn protocol_prefix(name: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = name.iter().position(|&b| b == b':' || b == b'/')?;
    (name[end] == b':').then(|| (&name[..end], &name[end + 1..]))
}

/// The file a `file:` name names: the rest after the prefix, with `./` put in
/// front when the rest would read as a protocol name again.
fn file_protocol_path(rest: &[u8]) -> Result<std::path::PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    if rest.is_empty() {
        bail!("The 'file' block driver requires a file name");
    }
    let mut path = Vec::with_capacity(rest.len() + 2);
    if protocol_prefix(rest).is_some() {
        path.extend_from_slice(b"./");
    }
    path.extend_from_slice(rest);
    Ok(std::ffi::OsString::from_vec(path).into())
}

/// The spec for an image named by its file name (perhaps with a protocol
/// prefix) and `-f`. A protocol driver given as the format takes the name as a
/// file name (but for a `file:` prefix).
fn file_name_spec(name: &Path, format: Option<&str>) -> Result<OpenSpec> {
    let bytes = name.as_os_str().as_bytes();
    let prefix = protocol_prefix(bytes);
    if let Some(p) = format.filter(|f| PROTOCOL_DRIVERS.contains(f)) {
        let path = match prefix {
            Some((b"file", rest)) if p == "file" => file_protocol_path(rest)?,
            _ => name.to_path_buf(),
        };
        check_protocol_file(p, &path)?;
        let mut spec = OpenSpec::new(path).format(Some(Format::Raw));
        spec.protocol_driver = Some(p.to_string());
        return Ok(spec);
    }
    if format == Some("blkdebug") {
        // The filter as the format: what it filters is read as raw bytes. A
        // name without the `blkdebug:` prefix is the filtered image's, with
        // no rules.
        let mut spec = if matches!(prefix, Some((b"blkdebug", _))) {
            file_name_spec(name, Some("raw"))?
        } else {
            let mut filtered = std::ffi::OsString::from("blkdebug::");
            filtered.push(name.as_os_str());
            file_name_spec(Path::new(&filtered), Some("raw"))?
        };
        spec.protocol_driver = Some("blkdebug".into());
        return Ok(spec);
    }
    // A foreign format driver is refused once its file is found.
    let foreign = format.and_then(foreign_format);
    let format = match foreign {
        Some(_) => None,
        None => format.map(parse_format).transpose()?,
    };
    let path = match prefix {
        None => {
            // QEMU takes a device by its name through host_device, anything
            // else through the file driver, which wants a regular file.
            if !is_device(name) {
                check_protocol_file("file", name)?;
            }
            name.to_path_buf()
        }
        Some((b"blkdebug", rest)) => {
            let (path, rules) = super::blkdebug::from_filename(&String::from_utf8_lossy(rest))?;
            // The image under the filter is a file name of its own: a `file:`
            // prefix is taken off, another protocol prefix refused.
            let inner = path.as_os_str().as_bytes();
            let path = match protocol_prefix(inner) {
                _ if inner.is_empty() => bail!("The 'file' block driver requires a file name"),
                None => path.clone(),
                Some((b"file", rest)) => file_protocol_path(rest)?,
                Some((b"json", json)) => match filtered_json_node(json)? {
                    Under::File(path) => path,
                    Under::Node(inner) => {
                        if let Some(f) = foreign {
                            return Err(foreign_refusal(f, &inner.path));
                        }
                        return Ok(filter_over_node(inner, format, rules));
                    }
                },
                Some((p, _)) if super::nbdname::is_nbd_protocol(p) => {
                    return Err(super::nbdname::refusal_under_filter(
                        &String::from_utf8_lossy(inner),
                    ))
                }
                Some((other, _)) => return Err(protocol_refusal(other)),
            };
            if let Some(f) = foreign {
                return Err(foreign_refusal(f, &path));
            }
            return Ok(blkdebug_spec(path, format, rules));
        }
        Some((b"file", rest)) => {
            let path = file_protocol_path(rest)?;
            check_protocol_file("file", &path)?;
            path
        }
        Some((other, _)) => return Err(protocol_refusal(other)),
    };
    if let Some(f) = foreign {
        return Err(foreign_refusal(f, &path));
    }
    Ok(OpenSpec::new(path).format(format))
}

/// What a `json:` name under a filter (`blkdebug::json:{...}`) names: a file
/// protocol node (`driver` `file` or `host_device`, or no driver and a
/// `filename`), or a format node. Mistakes get QEMU's messages.
fn filtered_json_node(json: &[u8]) -> Result<Under<OpenSpec>> {
    let mut flat = json_options(json)?;
    match flat.get("driver").map(String::as_str) {
        Some(_) => {}
        None if flat.contains_key("filename") => {
            flat.insert("driver".into(), "file".into());
        }
        None => bail!("Must specify either driver or file"),
    }
    let spec = from_options(flat)?;
    match spec.protocol_driver.as_deref() {
        Some("file" | "host_device") => Ok(Under::File(spec.path)),
        None => Ok(Under::Node(spec)),
        Some(_) => bail!("strata does not support a filter over another filter yet"),
    }
}

/// The spec for an image whose file is behind QEMU's blkdebug filter.
fn blkdebug_spec(
    path: std::path::PathBuf,
    format: Option<Format>,
    rules: strata_storage::BlkdebugConfig,
) -> OpenSpec {
    let mut spec = OpenSpec::new(path).format(format);
    spec.blkdebug = Some(std::sync::Arc::new(rules));
    spec
}

/// The spec for an image (of `format`, probed when `None`) whose bytes are the
/// guest data of the image `inner` behind QEMU's blkdebug filter: the filter's
/// rules apply to the requests made of `inner`.
fn filter_over_node(
    inner: OpenSpec,
    format: Option<Format>,
    rules: strata_storage::BlkdebugConfig,
) -> OpenSpec {
    let mut spec = blkdebug_spec(inner.path.clone(), format, rules);
    spec.filtered = Some(Box::new(inner));
    spec
}

/// The spec of a blkdebug node's options over what they filter (a file, or a
/// format node), the top of `format`.
fn blkdebug_over(
    under: Under<BTreeMap<String, String>>,
    format: Option<Format>,
    rules: strata_storage::BlkdebugConfig,
) -> Result<OpenSpec> {
    Ok(match under {
        Under::File(path) => blkdebug_spec(path, format, rules),
        Under::Node(opts) => match from_options(opts)? {
            inner if inner.protocol_driver.is_some() => {
                bail!("strata does not support a filter over another filter yet")
            }
            inner => filter_over_node(inner, format, rules),
        },
    })
}

/// The file an output image's name names: a `file:` prefix taken off (an empty
/// rest names no file), another protocol refused as QEMU refuses it.
pub fn output_path(name: &Path) -> Result<std::path::PathBuf> {
    match protocol_prefix(name.as_os_str().as_bytes()) {
        None => Ok(name.to_path_buf()),
        Some((b"file", b"")) => Ok(Default::default()),
        Some((b"file", rest)) => file_protocol_path(rest),
        // Filters and null devices QEMU opens but cannot create.
        Some((p @ (b"blkdebug" | b"blkverify" | b"null-co" | b"null-aio"), _)) => Err(anyhow!(
            "Protocol driver '{}' does not support image creation",
            String::from_utf8_lossy(p)
        )),
        Some((other, _)) => Err(protocol_refusal(other)),
    }
}

/// An output format given as `-O`/`-f`: the `file` protocol driver writes the
/// bytes as raw does.
pub fn output_format(f: &str) -> Result<Format, strata_format::Error> {
    match f {
        "file" => Ok(Format::Raw),
        f => match creation_refusal(f) {
            Some(m) => Err(strata_format::Error::invalid_argument(m)),
            None => f.parse(),
        },
    }
}

/// qemu-img's refusal of a driver it has but that creates no image, named
/// as a target format.
pub fn creation_refusal(f: &str) -> Option<String> {
    CANNOT_CREATE
        .contains(&f)
        .then(|| format!("Format driver '{f}' does not support image creation"))
}

/// QEMU's drivers that exist but create no image (filters and null devices):
/// named as a target format, they are refused as such, not as unknown.
const CANNOT_CREATE: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "null-aio",
    "null-co",
    "preallocate",
    "quorum",
    "snapshot-access",
    "throttle",
];

/// A format name given with `-f` or `driver=`, refused as QEMU refuses a driver
/// it does not have.
fn parse_format(f: &str) -> Result<Format> {
    f.parse::<Format>()
        .map_err(|_| anyhow!("Unknown driver '{f}'"))
}

/// A format driver QEMU has and strata lacks, given as `-f` or `driver=` for
/// the file at `path` (named as the user named it): `None` for another name.
/// QEMU's driver opens the file (a missing one is refused as the file
/// protocol refuses it) and refuses a file not in its format in its own words
/// ([`strata_jobs::foreign_probe`]); a file that passes the checks modelled
/// there is refused as an unknown driver, as before.
pub fn foreign_format(f: &str) -> Option<&str> {
    (f.parse::<Format>().is_err() && strata_jobs::foreign_probe::FILE_FORMATS.contains(&f))
        .then_some(f)
}

/// The refusal of the file at `path` by the foreign format driver `f` (see
/// [`foreign_format`]).
pub fn foreign_refusal(f: &str, path: &Path) -> anyhow::Error {
    if let Err(e) = std::fs::metadata(path) {
        return anyhow!(
            "Could not open '{}': {}",
            path.display(),
            strata_storage::os_message(&e)
        );
    }
    match strata_jobs::foreign_probe::refusal(f, path) {
        Some(m) => anyhow!("{m}"),
        None => anyhow!("Unknown driver '{f}'"),
    }
}

/// A protocol driver opens only its kind of file: `file` a regular file,
/// `host_device` and `host_cdrom` a block or character device. A file that is not there is left
/// to the open, which says so. An empty name is refused as QEMU refuses it.
fn check_protocol_file(driver: &str, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if path.as_os_str().is_empty() {
        bail!("The '{driver}' block driver requires a file name");
    }
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let t = meta.file_type();
    let p = path.display();
    match driver {
        "file" if !t.is_file() => bail!("'file' driver requires '{p}' to be a regular file"),
        "host_device" | "host_cdrom" if !t.is_block_device() && !t.is_char_device() => {
            bail!("'{driver}' driver requires '{p}' to be either a character or block device")
        }
        _ => Ok(()),
    }
}

/// Whether `path` is a block or character device (a missing file is not).
fn is_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device() || m.file_type().is_char_device())
        .unwrap_or(false)
}

/// An `--image-opts` list as QEMU's option parser reads it: `key=value` items,
/// the last of a repeated key winning. A first item without `=` is the value
/// of `file` (a node name, which strata never has); a later bare `key` means
/// `key=on` (`nokey`: `key=off`, `no` alone the empty key).
fn opts_list(list: &str) -> BTreeMap<String, String> {
    opts_list_noted(list).0
}

/// [`opts_list`], with QEMU's deprecation warning for each short-form boolean
/// item (the text after "warning: ").
fn opts_list_noted(list: &str) -> (BTreeMap<String, String>, Vec<String>) {
    let mut flat = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut items = split_items(list);
    // The first item, even an empty one, without `=`: the node named as `file`.
    let end = first_item_end(list);
    if !list.is_empty() && !list[..end].contains('=') {
        flat.insert("file".to_string(), list[..end].replace(",,", ","));
        items = split_items(list.get(end + 1..).unwrap_or(""));
    }
    for item in items {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                let (k, v) = match item.strip_prefix("no") {
                    Some(k) => (k.to_string(), "off"),
                    None => (item.clone(), "on"),
                };
                warnings.push(format!(
                    "short-form boolean option '{item}' deprecated\nPlease use {k}={v} instead"
                ));
                (k, v.to_string())
            }
        };
        flat.insert(k, v);
    }
    (flat, warnings)
}

/// The byte offset where the first item of the option list `list` ends: its
/// first comma not doubled (`,,` is a comma inside the item), else its length.
fn first_item_end(list: &str) -> usize {
    let b = list.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b',' {
            if b.get(i + 1) == Some(&b',') {
                i += 2;
                continue;
            }
            return i;
        }
        i += 1;
    }
    b.len()
}

/// The options of a `json:` pseudo-filename, nested objects flattened to dotted
/// keys (arrays by index), scalars as text: booleans `on`/`off`, null empty.
fn json_options(json: &[u8]) -> Result<BTreeMap<String, String>> {
    let (std_json, open_string) = single_quoted_to_json(json);
    let v: Value = serde_json::from_slice(&std_json).map_err(|e| {
        // QEMU's lexer calls a string left open a stray token (from its quote
        // on), and input that ends inside a value a premature end.
        let why = if json.iter().all(u8::is_ascii_whitespace) {
            "Expecting a JSON value".to_string()
        } else if let Some(at) = open_string {
            let token = String::from_utf8_lossy(&json[at..]);
            format!("JSON parse error, stray '{token}'")
        } else if e.is_eof() {
            "JSON parse error, premature EOI".to_string()
        } else {
            "JSON parse error, expecting value".to_string()
        };
        anyhow!("Could not parse the JSON options: {why}")
    })?;
    let Value::Object(map) = v else {
        bail!("Invalid JSON object given");
    };
    let mut flat = BTreeMap::new();
    for (k, v) in map {
        flatten(&k, &v, &mut flat);
    }
    Ok(flat)
}

/// `json` with QEMU's single-quoted strings (`'driver': 'qcow2'`, which its
/// JSON parser takes as well as double-quoted ones) rewritten as standard
/// JSON strings: `\'` inside becomes `'`, a `"` inside is escaped. Text
/// outside strings and double-quoted strings are left as they are, so
/// malformed input stays malformed. Also gives where a string left open at
/// the end begins.
fn single_quoted_to_json(json: &[u8]) -> (Vec<u8>, Option<usize>) {
    let mut out = Vec::with_capacity(json.len());
    let mut quote: Option<u8> = None;
    let mut opened = 0;
    let mut i = 0;
    while i < json.len() {
        let c = json[i];
        match quote {
            None if c == b'\'' => {
                quote = Some(c);
                opened = i;
                out.push(b'"');
            }
            None | Some(b'"') if c == b'"' => {
                quote = if quote.is_some() { None } else { Some(c) };
                opened = i;
                out.push(c);
            }
            Some(q) if c == b'\\' && i + 1 < json.len() => {
                let next = json[i + 1];
                if q == b'\'' && next == b'\'' {
                    out.push(next);
                } else {
                    out.extend_from_slice(&[c, next]);
                }
                i += 1;
            }
            Some(b'\'') if c == b'\'' => {
                quote = None;
                out.push(b'"');
            }
            Some(b'\'') if c == b'"' => out.extend_from_slice(b"\\\""),
            _ => out.push(c),
        }
        i += 1;
    }
    (out, quote.map(|_| opened))
}

/// The value a `json:` name's `"backing": null` flattens to: open the image
/// without its backing file (what management tools ask to measure or inspect
/// one layer). No option list can spell it.
const NO_BACKING: &str = "\0null";

fn flatten(key: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(&format!("{key}.{k}"), v, out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{key}.{i}"), v, out);
            }
        }
        Value::String(s) => {
            out.insert(key.to_string(), s.clone());
        }
        Value::Bool(b) => {
            out.insert(key.to_string(), if *b { "on" } else { "off" }.to_string());
        }
        Value::Number(n) => {
            out.insert(key.to_string(), n.to_string());
        }
        Value::Null if key == "backing" || key.ends_with(".backing") => {
            out.insert(key.to_string(), NO_BACKING.to_string());
        }
        Value::Null => {
            out.insert(key.to_string(), String::new());
        }
    }
}

/// The options below `child.`, with that prefix taken off (removed from `flat`).
fn take_child(flat: &mut BTreeMap<String, String>, child: &str) -> BTreeMap<String, String> {
    let prefix = format!("{child}.");
    let keys: Vec<String> = flat
        .keys()
        .filter(|k| k.starts_with(&prefix))
        .cloned()
        .collect();
    keys.into_iter()
        .filter_map(|k| {
            let v = flat.remove(&k)?;
            Some((k[prefix.len()..].to_string(), v))
        })
        .collect()
}

/// Refuse the first key of `opts` that neither the driver (`own`) nor the
/// generic node options know; `force-share=on` asks to open without locks.
fn check_options(
    opts: &BTreeMap<String, String>,
    own: &[&str],
    refusal: impl Fn(&str) -> String,
) -> Result<bool> {
    if let Some(k) = opts
        .keys()
        .find(|k| !known(k, own) && !COMMON_OPTIONS.contains(&k.as_str()))
    {
        bail!("{}", refusal(k));
    }
    Ok(opts.get("force-share").map(String::as_str) == Some("on"))
}

/// A spec from an image's flattened options.
fn from_options(mut flat: BTreeMap<String, String>) -> Result<OpenSpec> {
    let driver = flat.remove("driver");
    match driver.as_deref() {
        Some(p @ ("file" | "host_device" | "host_cdrom")) => {
            let Some(path) = flat.remove("filename") else {
                bail!("The '{p}' block driver requires a file name");
            };
            super::optvalues::check_node(&flat, "", true)?;
            let force_share = if file_missing(Path::new(&path)) {
                flat.get("force-share").map(String::as_str) == Some("on")
            } else {
                super::optvalues::check_opened_file(&flat, None)?;
                check_options(&flat, &FILE_OPTIONS, |k| {
                    format!("Block protocol '{p}' doesn't support the option '{k}'")
                })?
            };
            check_protocol_file(p, Path::new(&path))?;
            let mut spec = OpenSpec::new(path)
                .format(Some(Format::Raw))
                .force_share(force_share);
            spec.protocol_driver = Some(p.to_string());
            return Ok(spec);
        }
        Some("blkdebug") => {
            let (under, rules) =
                super::blkdebug::from_options(flat, |k| COMMON_OPTIONS.contains(&k))?;
            let mut spec = blkdebug_over(under, Some(Format::Raw), rules)?;
            spec.protocol_driver = Some("blkdebug".into());
            return Ok(spec);
        }
        Some(f) if f.parse::<Format>().is_ok() => {}
        None => {}
        // Refused once its file is found (see `format_spec`).
        Some(other) if foreign_format(other).is_some() => {}
        Some(other) => bail!("Unknown driver '{other}'"),
    }
    if driver.is_none() && !flat.keys().any(|k| k == "file" || k.starts_with("file.")) {
        bail!("Must specify either driver or file");
    }
    if let Some(node) = flat.remove("file") {
        bail!("Cannot find device='{node}' nor node-name='{node}'");
    }
    let mut file = take_child(&mut flat, "file");
    super::optvalues::check_node(&flat, "", false)?;
    let over_file = matches!(
        file.get("driver").map(String::as_str),
        None | Some("file" | "host_device")
    );
    super::optvalues::check_node(&file, "", over_file)?;
    if file.get("driver").map(String::as_str) == Some("blkdebug") {
        file.remove("driver");
        let (under, rules) = super::blkdebug::from_options(file, |k| COMMON_OPTIONS.contains(&k))?;
        return match under {
            Under::File(path) => format_spec(flat, driver, path, Some(rules)),
            node => {
                let path = std::path::PathBuf::new();
                let mut spec = format_spec(flat, driver, path, None)?;
                let over = blkdebug_over(node, spec.format, rules)?;
                spec.path = over.path;
                spec.blkdebug = over.blkdebug;
                spec.filtered = over.filtered;
                Ok(spec)
            }
        };
    }
    let Some(path) = file.remove("filename") else {
        bail!("A block device must be specified for \"file\"");
    };
    let protocol = file.remove("driver").unwrap_or_else(|| "file".into());
    if !matches!(protocol.as_str(), "file" | "host_device") {
        bail!("Unknown protocol '{protocol}'");
    }
    // Options nothing takes are refused once the file opened (a missing
    // file is said first, by the open).
    if !file_missing(Path::new(&path)) {
        super::optvalues::check_opened_file(&file, Some(&flat))?;
        check_options(&file, &FILE_OPTIONS, |k| {
            format!("Block protocol '{protocol}' doesn't support the option '{k}'")
        })?;
    }
    check_protocol_file(&protocol, Path::new(&path))?;
    format_spec(flat, driver, path.into(), None)
}

/// Whether the image file `path` names does not exist: the open that follows
/// says so, as QEMU's does, before options that only the opened node would
/// look at are refused.
fn file_missing(path: &Path) -> bool {
    !path.as_os_str().is_empty()
        && matches!(std::fs::metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// The spec of a format node over the file `path` (perhaps behind blkdebug),
/// from the format driver's own options.
fn format_spec(
    mut flat: BTreeMap<String, String>,
    driver: Option<String>,
    path: std::path::PathBuf,
    blkdebug: Option<strata_storage::BlkdebugConfig>,
) -> Result<OpenSpec> {
    flat.remove("filename");
    if let Some(f) = driver.as_deref().and_then(foreign_format) {
        return Err(foreign_refusal(f, &path));
    }
    let format = driver.as_deref().map(parse_format).transpose()?;
    // Validated against the driver that will open the image: the named one, or
    // the probed one (a file that cannot be probed fails to open later anyway).
    let checked = format.or_else(|| strata_chain::probe_format(&path).ok());
    let own: &[&str] = match checked {
        Some(Format::Qcow2) => &QCOW2_OPTIONS,
        Some(Format::Raw) => &RAW_OPTIONS,
        Some(Format::Luks) => &LUKS_OPTIONS,
        Some(Format::Vpc) => &VPC_OPTIONS,
        Some(Format::Parallels) => &PARALLELS_OPTIONS,
        Some(Format::Vdi | Format::Vhdx | Format::Vmdk | Format::Qed) | None => &[],
    };
    let name = checked.map_or("raw", Format::name);
    // `"backing": null` (no backing file) is a generic option: every format
    // takes it, raw too; so is its deprecated spelling, the empty string.
    let no_backing = match flat.get("backing").map(String::as_str) {
        Some(NO_BACKING) => true,
        Some("") => {
            super::common::warn(
                "Use of \"backing\": \"\" is deprecated; use \"backing\": null instead",
            );
            true
        }
        _ => false,
    };
    if no_backing {
        flat.remove("backing");
    }
    if let Some(node) = flat.get("backing").filter(|_| !has_backing_children(&flat)) {
        return Err(backing_node_reference(&flat, node, own, name, checked));
    }
    // The backing nodes the options give are opened (QEMU opens them with
    // the image, before it looks at options nothing took): refusals of them
    // come first. Where the image is opened without its backing file
    // (`info`), they are options nothing takes.
    let backing_refusal = |refusal: String| {
        let left: serde_json::Map<String, Value> = flat
            .keys()
            .filter(|k| k.starts_with("backing."))
            .map(|k| (k.clone(), Value::Null))
            .collect();
        let first = super::qjson::key_order(&left)
            .first()
            .map_or_else(|| "backing".to_string(), |k| k.to_string());
        anyhow::Error::new(NamingError::new(
            NamingErrorKind::BackingNodeOption {
                unknown_without_backing: format!(
                    "Block format '{name}' does not support the option '{first}'"
                ),
            },
            refusal,
        ))
    };
    let (backing_nodes, node_keys) =
        backing_nodes(&flat, checked).map_err(|e| backing_refusal(e.to_string()))?;
    let missing = file_missing(&path);
    if !missing {
        super::optvalues::check_format(&flat, checked)?;
        // Sizes reach the parallels driver in bytes.
        if let Some(v) = flat
            .get_mut("prealloc-size")
            .filter(|_| checked == Some(Format::Parallels))
        {
            if let Some(n) = strata_jobs::create::parse_size_u64(v) {
                *v = n.to_string();
            }
        }
    }
    let force_share = if missing {
        Ok(flat.get("force-share").map(String::as_str) == Some("on"))
    } else {
        check_options(&flat, own, |k| {
            format!("Block format '{name}' does not support the option '{k}'")
        })
    }
    .map_err(
        |e| match checked.zip(encryption_secret_key(checked, &path)) {
            Some((format, key)) => anyhow::Error::new(NamingError::new(
                NamingErrorKind::UnknownOptionOnEncrypted {
                    secret_key: key,
                    secret_id: flat.get(key).cloned(),
                    path: path.clone(),
                    format,
                },
                e.to_string(),
            )),
            None => e,
        },
    )?;
    for k in COMMON_OPTIONS {
        flat.remove(k);
    }
    // Checked when the data file is opened: qemu-img's info ignores them.
    let data_file = data_file_option(&mut flat);
    // Options that change which bytes the guest sees must not be dropped silently.
    if let Some(k) = flat.keys().find(|k| {
        known(k, UNSUPPORTED_DATA_OPTIONS)
            && !backing_option_supported(k)
            && !node_keys.contains(*k)
    }) {
        let refusal =
            format!("Block format '{name}': strata does not support the option '{k}' yet");
        if k == "backing" || k.starts_with("backing.") {
            let left: serde_json::Map<String, Value> = flat
                .keys()
                .filter(|k| *k == "backing" || k.starts_with("backing."))
                .map(|k| (k.clone(), Value::Null))
                .collect();
            let first = super::qjson::key_order(&left)
                .first()
                .map_or_else(|| k.clone(), |k| k.to_string());
            return Err(anyhow::Error::new(NamingError::new(
                NamingErrorKind::BackingNodeOption {
                    unknown_without_backing: format!(
                        "Block format '{name}' does not support the option '{first}'"
                    ),
                },
                refusal,
            )));
        }
        bail!("{refusal}");
    }
    let mut spec = OpenSpec::new(path)
        .format(format)
        .force_share(force_share)
        .open_backing(!no_backing);
    spec.driver_options = flat;
    spec.backing_nodes = backing_nodes;
    match data_file {
        Ok(path) => spec.data_file = path,
        Err(e) => spec.data_file_refusal = Some(e.to_string()),
    }
    spec.blkdebug = blkdebug.map(std::sync::Arc::new);
    Ok(spec)
}

/// The backing nodes the `backing.` options of an image in `format` give
/// (QEMU's node options, one `backing.` per level): for each depth down to the
/// deepest one that names a driver, a file or no backing file, that node;
/// and the keys that said so. The keys stay in the options (the subcommands
/// that do not open backing nodes by options refuse them, `info` as QEMU
/// does); the backing files' own options are checked against the driver
/// named for them. Refusals are QEMU's, one "Could not open backing file: "
/// per level. What strata does not open (another protocol, a node named by
/// reference) is left to the caller's refusal of options it does not take.
fn backing_nodes(
    flat: &BTreeMap<String, String>,
    format: Option<Format>,
) -> Result<(
    Vec<strata_chain::BackingNode>,
    std::collections::BTreeSet<String>,
)> {
    let mut nodes = Vec::new();
    let mut taken = std::collections::BTreeSet::new();
    let mut parent = format;
    let mut depth = 1;
    let below = |d: usize, m: String| anyhow!("{}{m}", "Could not open backing file: ".repeat(d));
    loop {
        let prefix = strata_chain::OpenSpec::layer_prefix(depth);
        let keys: Vec<&String> = flat.keys().filter(|k| k.starts_with(&prefix)).collect();
        if keys.is_empty() {
            break;
        }
        // Raw and luks images have no backing file to give options for.
        if matches!(parent, Some(Format::Raw | Format::Luks)) {
            return Err(below(
                depth - 1,
                "Driver doesn't support backing files".into(),
            ));
        }
        let key = |k: &str| format!("{prefix}{k}");
        let get = |k: &str| flat.get(&key(k)).map(String::as_str);
        let mut node = strata_chain::BackingNode::default();
        let mut given = false;
        if let Some(d) = get("driver") {
            node.format = match d.parse::<Format>() {
                Ok(f) => Some(f),
                Err(_) if !is_qemu_driver(d) => {
                    return Err(below(depth, format!("Unknown driver '{d}'")))
                }
                // Left to the refusal of what strata does not open.
                Err(_) => None,
            };
            if node.format.is_some() {
                taken.insert(key("driver"));
                given = true;
            }
        }
        if let Some(f) = node.format {
            let own: &[&str] = match f {
                Format::Qcow2 => &QCOW2_OPTIONS,
                Format::Raw => &RAW_OPTIONS,
                Format::Luks => &LUKS_OPTIONS,
                Format::Vpc => &VPC_OPTIONS,
                Format::Vdi | Format::Vhdx | Format::Vmdk | Format::Qed | Format::Parallels => &[],
            };
            let next = format!("{prefix}backing.");
            if let Some(k) = keys
                .iter()
                .filter(|k| !k.starts_with(&next))
                .map(|k| &k[prefix.len()..])
                .find(|k| {
                    !matches!(*k, "driver" | "file" | "backing")
                        && !k.starts_with("file.")
                        && !known(k, own)
                        && !COMMON_OPTIONS.contains(k)
                })
            {
                return Err(below(
                    depth,
                    format!(
                        "Block format '{}' does not support the option '{k}'",
                        f.name()
                    ),
                ));
            }
        }
        let protocol = get("file.driver").unwrap_or("file");
        if let (Some(file), true) = (
            get("file.filename"),
            matches!(protocol, "file" | "host_device") && get("file").is_none(),
        ) {
            let file_keys: Vec<&str> = keys
                .iter()
                .filter_map(|k| k.strip_prefix(&key("file.")))
                .collect();
            if let Some(k) = file_keys.iter().find(|k| {
                !matches!(**k, "driver" | "filename")
                    && !FILE_OPTIONS.contains(k)
                    && !COMMON_OPTIONS.contains(k)
            }) {
                return Err(below(
                    depth,
                    format!("Block protocol '{protocol}' doesn't support the option '{k}'"),
                ));
            }
            check_protocol_file(protocol, Path::new(file))
                .map_err(|e| below(depth, e.to_string()))?;
            taken.extend(file_keys.iter().map(|k| key(&format!("file.{k}"))));
            node.path = Some(file.into());
            given = true;
        }
        match get("backing") {
            Some(NO_BACKING) => node.no_backing = true,
            // Its deprecated spelling: warned of where the node is opened
            // (see `Naming::spec_nbd_as`).
            Some("") => node.no_backing = true,
            _ => {}
        }
        if node.no_backing {
            taken.insert(key("backing"));
            given = true;
        }
        if given {
            nodes.resize(depth - 1, Default::default());
            parent = node.format;
            nodes.push(node);
        } else {
            parent = None;
        }
        depth += 1;
    }
    Ok((nodes, taken))
}

/// Whether `flat` gives options below `backing.` (a backing node by options).
fn has_backing_children(flat: &BTreeMap<String, String>) -> bool {
    flat.keys().any(|k| k.starts_with("backing."))
}

/// The refusal of `backing=NODE`, a backing node named by its node name
/// (qemu-img has no named nodes besides the images it opens): for an open
/// of the image's data, QEMU's search for the node (a format without
/// backing files refuses any), before any unknown option; for an open
/// without the backing file (`info`), the first option nothing takes, in
/// QEMU's dictionary order. `own` are the format's options, `name` its name.
fn backing_node_reference(
    flat: &BTreeMap<String, String>,
    node: &str,
    own: &[&str],
    name: &str,
    format: Option<Format>,
) -> anyhow::Error {
    let refusal = match format {
        Some(Format::Qcow2) => {
            format!(
                "Could not open backing file: Cannot find device='{node}' nor node-name='{node}'"
            )
        }
        _ => "Driver doesn't support backing files".to_string(),
    };
    let unknown: serde_json::Map<String, Value> = flat
        .keys()
        .filter(|k| *k == "backing" || (!known(k, own) && !COMMON_OPTIONS.contains(&k.as_str())))
        .map(|k| (k.clone(), Value::Null))
        .collect();
    let first = super::qjson::key_order(&unknown)
        .first()
        .map_or("backing", |k| k.as_str());
    anyhow::Error::new(NamingError::new(
        NamingErrorKind::BackingNodeOption {
            unknown_without_backing: format!(
                "Block format '{name}' does not support the option '{first}'"
            ),
        },
        refusal,
    ))
}

/// A refusal of an image's name whose wording depends on how the subcommand
/// opens the image (for its data, or for its metadata only): what the
/// refusal is ([`NamingErrorKind`]), the image it is about, and the refusal
/// for an open that meets nothing else first. Shows as that refusal.
#[derive(Debug)]
pub struct NamingError {
    /// What is refused, with what the other opens need to word it.
    kind: NamingErrorKind,
    /// `Could not open 'NAME': ` once the image's name is known, else empty.
    context: String,
    /// The refusal, without the context.
    refusal: String,
}

/// What a [`NamingError`] refuses.
#[derive(Debug)]
pub enum NamingErrorKind {
    /// An option the format driver does not know, on an encrypted image (a
    /// luks one, or a qcow2 one with encryption): QEMU's driver opens the
    /// image, its secret first, before the options left over are refused, so
    /// an image opened for its data (every subcommand but `info`) fails for a
    /// missing, unknown or wrong secret first.
    UnknownOptionOnEncrypted {
        /// The option naming the image's secret (`key-secret`, `encrypt.key-secret`).
        secret_key: &'static str,
        /// The secret's id when the option is given.
        secret_id: Option<String>,
        /// The image's file.
        path: std::path::PathBuf,
        /// The format the image is opened as.
        format: Format,
    },
    /// A backing node given by options: by its own options
    /// (`backing.driver=...`), which strata does not open yet (refused as not
    /// supported), or by a node name (`backing=NODE`, refused as QEMU's search
    /// for it refuses it). Where the image is opened without its backing file
    /// (`info`), refused as QEMU refuses options nothing takes (the first in
    /// its dictionary's order).
    BackingNodeOption {
        /// The refusal of an open without the backing file, without the context.
        unknown_without_backing: String,
    },
}

impl NamingError {
    fn new(kind: NamingErrorKind, refusal: String) -> Self {
        Self {
            kind,
            context: String::new(),
            refusal,
        }
    }

    /// The error about the image named `typed`.
    fn opening(self, typed: &str) -> Self {
        Self {
            context: format!("Could not open '{typed}': "),
            ..self
        }
    }

    /// For [`NamingErrorKind::UnknownOptionOnEncrypted`], the refusal QEMU
    /// gives opening the image for its data with `secrets`, when it is not
    /// the unknown option's: the missing secret, the secret id no `--object`
    /// defines, the wrong secret (tried as QEMU tries it, on the image's key
    /// slots). `None` for the other kinds.
    fn for_data_open(&self, secrets: &BTreeMap<String, Vec<u8>>) -> Option<String> {
        let NamingErrorKind::UnknownOptionOnEncrypted {
            secret_key,
            secret_id,
            path,
            format,
        } = &self.kind
        else {
            return None;
        };
        let id = match secret_id {
            None => return Some(format!("Parameter '{secret_key}' is required for cipher")),
            Some(id) if !secrets.contains_key(id) => {
                return Some(format!("No secret with id '{id}'"))
            }
            Some(id) => id,
        };
        // The secret opens the image or not: only a key no slot takes is said
        // here; any other failure leaves the unknown option's refusal.
        let mut spec = OpenSpec::new(path.clone())
            .format(Some(*format))
            .force_share(true);
        spec.driver_options
            .insert((*secret_key).to_string(), id.clone());
        spec.secrets = std::sync::Arc::new(secrets.clone());
        match strata_chain::open_top(&spec, *format, false) {
            Err(strata_chain::Error::Format(e)) if e.kind() == strata_format::ErrorKind::Key => {
                Some(e.message().to_string())
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for NamingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.context, self.refusal)
    }
}

impl std::error::Error for NamingError {}

/// The option naming the secret of the image at `path` opened as `format`
/// when it is encrypted: `key-secret` for luks, `encrypt.key-secret` for a
/// qcow2 image whose header says it is encrypted. `None` otherwise (or when
/// the header cannot be read: the open says why).
fn encryption_secret_key(format: Option<Format>, path: &Path) -> Option<&'static str> {
    use std::io::Read;
    match format? {
        Format::Luks => Some("key-secret"),
        Format::Raw
        | Format::Vpc
        | Format::Vdi
        | Format::Vhdx
        | Format::Vmdk
        | Format::Qed
        | Format::Parallels => None,
        Format::Qcow2 => {
            // QCOW2 header: magic at 0, crypt_method (big-endian u32) at 32.
            let mut header = [0u8; 36];
            std::fs::File::open(path)
                .ok()?
                .read_exact(&mut header)
                .ok()?;
            let method = u32::from_be_bytes([header[32], header[33], header[34], header[35]]);
            (header[..4] == *b"QFI\xfb" && method != 0).then_some("encrypt.key-secret")
        }
    }
}

/// The qcow2 driver's options that change the image's data ("strong" in QEMU's
/// terms): given, QEMU cannot name the image by its file name alone.
const QCOW2_STRONG_OPTIONS: [&str; 1] = ["encrypt.key-secret"];
/// The luks driver's options that change the image's data.
const LUKS_STRONG_OPTIONS: [&str; 1] = ["key-secret"];

/// The name qemu-img reports for the top image `spec` names, opened as
/// `format`, when its file name alone would not open it the same way: a
/// `json:` name of its driver, the options that change its data and its file
/// node. `None` when the file name suffices (options that only tune the open,
/// or a data file named by option, do not count, as in QEMU).
pub fn json_name(spec: &OpenSpec, format: Format) -> Option<String> {
    let strong_options: &[&str] = match format {
        Format::Qcow2 => &QCOW2_STRONG_OPTIONS,
        Format::Luks => &LUKS_STRONG_OPTIONS,
        Format::Raw
        | Format::Vpc
        | Format::Vdi
        | Format::Vhdx
        | Format::Vmdk
        | Format::Qed
        | Format::Parallels => return None,
    };
    if spec.storage.is_some() || spec.blkdebug.is_some() || spec.protocol_driver.is_some() {
        return None;
    }
    let mut top = serde_json::Map::new();
    top.insert("driver".into(), Value::from(format.name()));
    let mut strong = false;
    for &k in strong_options {
        if let Some(v) = spec.driver_options.get(k) {
            top.insert(k.into(), Value::from(v.as_str()));
            strong = true;
        }
    }
    if !strong {
        return None;
    }
    let mut file = serde_json::Map::new();
    file.insert("driver".into(), Value::from("file"));
    file.insert(
        "filename".into(),
        Value::from(spec.path.to_string_lossy().into_owned()),
    );
    top.insert("file".into(), Value::Object(file));
    Some(format!(
        "json:{}",
        super::qjson::to_compact(&Value::Object(top))
    ))
}

/// [`json_name`] for a top image whose backing file is open too: options
/// that change the backing file's data (its secret, under `backing.`) also
/// keep the file names from naming the image, and then the `json:` name holds
/// a `backing` node (its driver `backing.1`, its file `backing.0` as opened,
/// and those options), as QEMU names such an image.
pub fn json_name_with_backing(
    spec: &OpenSpec,
    format: Format,
    backing: Option<(&std::path::Path, Format)>,
) -> Option<String> {
    let strong = |f: Format| -> &'static [&'static str] {
        match f {
            Format::Qcow2 => &QCOW2_STRONG_OPTIONS,
            Format::Luks => &LUKS_STRONG_OPTIONS,
            Format::Raw
            | Format::Vpc
            | Format::Vdi
            | Format::Vhdx
            | Format::Vmdk
            | Format::Qed
            | Format::Parallels => &[],
        }
    };
    let mut node = serde_json::Map::new();
    if let Some((path, f)) = backing {
        for &k in strong(f) {
            if let Some(v) = spec.driver_options.get(&format!("backing.{k}")) {
                node.insert(k.into(), Value::from(v.as_str()));
            }
        }
        if !node.is_empty() {
            node.insert("driver".into(), Value::from(f.name()));
            let mut file = serde_json::Map::new();
            file.insert("driver".into(), Value::from("file"));
            file.insert(
                "filename".into(),
                Value::from(path.to_string_lossy().into_owned()),
            );
            node.insert("file".into(), Value::Object(file));
        }
    }
    if node.is_empty() {
        return json_name(spec, format);
    }
    if spec.storage.is_some() || spec.blkdebug.is_some() || spec.protocol_driver.is_some() {
        return None;
    }
    let mut top = serde_json::Map::new();
    top.insert("driver".into(), Value::from(format.name()));
    for &k in strong(format) {
        if let Some(v) = spec.driver_options.get(k) {
            top.insert(k.into(), Value::from(v.as_str()));
        }
    }
    let mut file = serde_json::Map::new();
    file.insert("driver".into(), Value::from("file"));
    file.insert(
        "filename".into(),
        Value::from(spec.path.to_string_lossy().into_owned()),
    );
    top.insert("file".into(), Value::Object(file));
    top.insert("backing".into(), Value::Object(node));
    Some(format!(
        "json:{}",
        super::qjson::to_compact(&Value::Object(top))
    ))
}

/// Options for a backing file, given where qemu-img opens none (`info`):
/// refused as QEMU refuses options nothing takes.
pub fn refuse_backing_options(spec: &OpenSpec, format: Format) -> Result<()> {
    // QEMU names the first of them in its dictionary's order.
    let left: serde_json::Map<String, Value> = spec
        .driver_options
        .keys()
        .filter(|k| k.starts_with("backing."))
        .map(|k| (k.clone(), Value::Null))
        .collect();
    match super::qjson::key_order(&left).first() {
        Some(k) => bail!(
            "Could not open '{}': Block format '{}' does not support the option '{k}'",
            spec.shown_name(),
            format.name()
        ),
        None => Ok(()),
    }
}

/// Refuse the options a subcommand would not honour because it reopens the
/// image by its file name (`commit`, `convert`'s existing target): a data file
/// named by option, and backing files' options. Dropped, writes would go to the
/// file the image records.
pub fn refuse_reopened_options(spec: &OpenSpec) -> Result<()> {
    refuse_options_but(spec, |_| false)
}

/// As [`refuse_reopened_options`], for a subcommand that opens the chain with
/// its layers' secrets (`commit`): the backing files' `encrypt.key-secret` (a
/// luks file's `key-secret`) and the generic node options, which leave their
/// data as it is (`read-only`: QEMU reopens the base for writing all the
/// same), are taken (one `backing.` per level); the other backing options
/// are refused.
pub fn refuse_options_but_secrets(spec: &OpenSpec) -> Result<()> {
    refuse_options_but(spec, |k| {
        let mut rest = k;
        while let Some(r) = rest.strip_prefix("backing.") {
            rest = r;
        }
        rest == "encrypt.key-secret"
            || LUKS_OPTIONS.contains(&rest)
            || (COMMON_OPTIONS.contains(&rest) && rest != "force-share")
    })
}

/// Refuse a backing node given by options (`backing.driver`,
/// `backing.file.filename`...) where the subcommand does not open it as
/// qemu-img does (it reopens or rewrites the chain by the names the headers
/// record): said as not supported rather than ignored.
pub fn refuse_backing_nodes(spec: &OpenSpec) -> Result<()> {
    if spec.backing_nodes.is_empty() {
        return Ok(());
    }
    refuse_options_but(spec, |_| false)
}

fn refuse_options_but(spec: &OpenSpec, taken: fn(&str) -> bool) -> Result<()> {
    let key = match spec
        .driver_options
        .keys()
        .find(|k| k.starts_with("backing.") && !taken(k))
    {
        Some(k) => k.as_str(),
        None if spec.data_file.is_some() || spec.data_file_refusal.is_some() => "data-file",
        None => return Ok(()),
    };
    bail!(
        "Could not open '{}': Block format 'qcow2': strata does not support the option '{key}' here yet",
        spec.shown_name()
    )
}

/// The external data file the `data-file` options name (taken out of `flat`):
/// a file node (`data-file.filename=`, `data-file.driver=file`), or a raw node
/// over one (`data-file.driver=raw,data-file.file.filename=`). A plain
/// `data-file=NAME` names a node qemu-img cannot have defined.
fn data_file_option(flat: &mut BTreeMap<String, String>) -> Result<Option<std::path::PathBuf>> {
    if let Some(node) = flat.remove("data-file") {
        bail!("Cannot find device='{node}' nor node-name='{node}'");
    }
    let mut child = take_child(flat, "data-file");
    if child.is_empty() {
        return Ok(None);
    }
    let unsupported = |k: &str| anyhow!("strata does not support the option 'data-file.{k}' yet");
    if child.get("driver").map(String::as_str) == Some("raw") {
        child.remove("driver");
        let file = take_child(&mut child, "file");
        if let Some(k) = child.keys().find(|k| !COMMON_OPTIONS.contains(&k.as_str())) {
            return Err(unsupported(k));
        }
        child = file;
    }
    let protocol = child.remove("driver").unwrap_or_else(|| "file".into());
    if protocol != "file" {
        return Err(unsupported("driver"));
    }
    let Some(path) = child.remove("filename") else {
        bail!("A block device must be specified for \"data-file\"");
    };
    check_options(&child, &FILE_OPTIONS, |k| {
        format!("Block protocol 'file' doesn't support the option '{k}'")
    })?;
    Ok(Some(path.into()))
}

/// Whether the image `spec` names is a `host_cdrom` drive holding no medium
/// (or a device that is no CD-ROM drive at all, `/dev/null`): QEMU's block
/// backend then has no length to give, and the commands that ask it (`map`,
/// `dd`, `compare`) fail, while those that ask the node (`info`, `convert`,
/// `measure`) see an empty image. The drive is asked as QEMU asks it.
pub fn cdrom_without_medium(spec: &OpenSpec) -> bool {
    if spec.protocol_driver.as_deref() != Some("host_cdrom") {
        return false;
    }
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    // Linux's CDROM_DRIVE_STATUS for the current slot; CDS_DISC_OK means a
    // medium is in.
    const CDROM_DRIVE_STATUS: libc::c_ulong = 0x5326;
    const CDSL_CURRENT: libc::c_int = libc::c_int::MAX;
    const CDS_DISC_OK: libc::c_int = 4;
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&spec.path)
    else {
        return true;
    };
    // SAFETY: the descriptor is open for the call's duration, and the request
    // takes its argument by value (no memory is passed).
    let status = unsafe { libc::ioctl(f.as_raw_fd(), CDROM_DRIVE_STATUS as _, CDSL_CURRENT) };
    status != CDS_DISC_OK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, image_opts: bool) -> Result<OpenSpec> {
        image_spec(Path::new(name), None, image_opts)
    }

    #[test]
    fn single_quoted_json_strings_read_as_double_quoted_ones() {
        let j = |s: &str| String::from_utf8(single_quoted_to_json(s.as_bytes()).0).unwrap();
        assert_eq!(j("{'a': 'b'}"), r#"{"a": "b"}"#);
        assert_eq!(j(r#"{'a"b': 'it\'s'}"#), r#"{"a\"b": "it's"}"#);
        assert_eq!(j(r#"{"a'b": "c\"d"}"#), r#"{"a'b": "c\"d"}"#);
        assert_eq!(j(r#"{'a': 'b\\'}"#), r#"{"a": "b\\"}"#);
        assert_eq!(single_quoted_to_json(b"{'a").1, Some(1));
        assert_eq!(single_quoted_to_json(b"{\"a\": \"b").1, Some(6));
        assert_eq!(single_quoted_to_json(b"{'a'}").1, None);
    }

    #[test]
    fn json_nested_and_dotted_keys_name_the_same_image() {
        let nested = spec(
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/x/a.qcow2"},"encrypt":{"key-secret":"sec0"},"lazy-refcounts":true}"#,
            false,
        )
        .unwrap();
        let dotted = spec(
            r#"json:{"driver":"qcow2","file.filename":"/x/a.qcow2","encrypt.key-secret":"sec0","lazy-refcounts":"on"}"#,
            false,
        )
        .unwrap();
        for s in [&nested, &dotted] {
            assert_eq!(s.path, Path::new("/x/a.qcow2"));
            assert_eq!(s.format, Some(Format::Qcow2));
            assert_eq!(s.driver_options["encrypt.key-secret"], "sec0");
            assert_eq!(s.driver_options["lazy-refcounts"], "on");
            assert_eq!(s.driver_options.len(), 2);
        }
    }

    #[test]
    fn options_that_would_change_the_guests_view_are_refused_not_ignored() {
        for name in [
            "driver=raw,file.filename=/x/a,offset=4096",
            "driver=raw,file.filename=/x/a,size=1M",
            "driver=qcow2,file.filename=/x/a,backing.driver=raw,backing.offset=1",
            "driver=qcow2,file.filename=/x/a,backing.driver=dmg",
            "driver=qcow2,file.filename=/x/a,backing.file.driver=nbd",
        ] {
            let e = spec(name, true).unwrap_err().to_string();
            assert!(
                e.contains("strata does not support the option"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn backing_nodes_by_options_reach_the_spec_by_depth() {
        let s = spec(
            "driver=qcow2,file.filename=/x/a,backing.backing.driver=raw,backing.backing.file.filename=/x/b,backing.backing.backing=",
            true,
        )
        .unwrap();
        assert_eq!(
            s.backing_nodes,
            vec![
                Default::default(),
                strata_chain::BackingNode {
                    path: Some("/x/b".into()),
                    format: Some(Format::Raw),
                    no_backing: true,
                },
            ]
        );
        let s = spec("driver=qcow2,file.filename=/x/a,backing.driver=qcow2", true).unwrap();
        assert_eq!(s.backing_nodes[0].format, Some(Format::Qcow2));
        assert_eq!(s.backing_nodes[0].path, None);
        let e = spec("driver=qcow2,file.filename=/x/a,backing.driver=nope", true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Could not open 'driver=qcow2,file.filename=/x/a,backing.driver=nope': Could not open backing file: Unknown driver 'nope'"
        );
    }

    #[test]
    fn an_empty_backing_option_opens_the_image_without_its_backing_file() {
        let s = spec("driver=qcow2,file.filename=/x/a,backing=", true).unwrap();
        assert!(!s.open_backing);
        assert!(s.driver_options.is_empty());
    }

    #[test]
    fn backing_secrets_and_a_data_file_by_option_reach_the_spec() {
        let s = spec(
            "driver=qcow2,file.filename=/x/a,backing.encrypt.key-secret=s0,backing.backing.lazy-refcounts=on,data-file.driver=raw,data-file.file.filename=/x/d",
            true,
        )
        .unwrap();
        assert_eq!(s.data_file.as_deref(), Some(Path::new("/x/d")));
        assert_eq!(s.driver_options["backing.encrypt.key-secret"], "s0");
        assert_eq!(s.driver_options["backing.backing.lazy-refcounts"], "on");
        assert_eq!(s.driver_options.len(), 2);
        let s = spec("driver=qcow2,file.filename=/x/a,data-file=n0", true).unwrap();
        assert_eq!(
            s.data_file_refusal.as_deref(),
            Some("Cannot find device='n0' nor node-name='n0'")
        );
    }

    #[test]
    fn image_opts_give_driver_options_and_the_file_location() {
        let s = spec(
            "driver=qcow2,file.driver=file,file.filename=/x/a,,b,lazy-refcounts=on,force-share=on,file.locking=off",
            true,
        )
        .unwrap();
        assert_eq!(s.path, Path::new("/x/a,b"));
        assert!(s.force_share);
        assert_eq!(
            s.driver_options.into_iter().collect::<Vec<_>>(),
            vec![("lazy-refcounts".to_string(), "on".to_string())]
        );
        // -f wins over a json: name's driver.
        let s = image_spec(
            Path::new(r#"json:{"driver":"qcow2","file.filename":"/x/a"}"#),
            Some("raw"),
            false,
        )
        .unwrap();
        assert_eq!(s.format, Some(Format::Raw));
        // A plain file name is left as it is; a colon before any slash is a
        // protocol prefix.
        let s = spec("./a:b", false).unwrap();
        assert_eq!((s.path.to_str(), s.format), (Some("./a:b"), None));
        let s = spec("file:a:b", false).unwrap();
        assert_eq!(s.path.to_str(), Some("./a:b"));
        assert_eq!(s.display_name.as_deref(), Some("file:a:b"));
        assert_eq!(
            spec("a:b", false).unwrap_err().to_string(),
            "Could not open 'a:b': Unknown protocol 'a'"
        );
        assert_eq!(
            spec("ssh://h/x", false).unwrap_err().to_string(),
            "Could not open 'ssh://h/x': The 'ssh' protocol is not supported by strata"
        );
    }

    #[test]
    fn unknown_options_and_bad_names_get_qemu_messages() {
        let err = |n: &str, o: bool| spec(n, o).unwrap_err().to_string();
        // Options nothing takes are refused once the file is found (a
        // missing one is said by the open): the file here exists.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, b"").unwrap();
        let f = f.display();
        let n = &format!("driver=qcow2,file.filename={f},foo=bar");
        assert_eq!(
            err(n, true),
            format!("Could not open '{n}': Block format 'qcow2' does not support the option 'foo'")
        );
        let n = &format!("driver=qcow2,file.filename={f},file.foo=bar");
        assert_eq!(
            err(n, true),
            format!("Could not open '{n}': Block protocol 'file' doesn't support the option 'foo'")
        );
        let n = "driver=bogus,file.filename=/x/a";
        assert_eq!(
            err(n, true),
            format!("Could not open '{n}': Unknown driver 'bogus'")
        );
        let n = "driver=qcow2,filename=/x/a";
        assert_eq!(
            err(n, true),
            format!("Could not open '{n}': A block device must be specified for \"file\"")
        );
        let n = r#"json:{"driver":"qcow2","file":"a"}"#;
        assert_eq!(
            err(n, false),
            format!("Could not open '{n}': Cannot find device='a' nor node-name='a'")
        );
        let n = r#"json:{"driver":"qcow2",}"#;
        assert_eq!(
            err(n, false),
            format!("Could not open '{n}': Could not parse the JSON options: JSON parse error, expecting value")
        );
        let n = "json:[1]";
        assert_eq!(
            err(n, false),
            format!("Could not open '{n}': Invalid JSON object given")
        );
        let e = Naming {
            image_opts: true,
            ..Default::default()
        }
        .spec(Path::new("driver=raw,file.filename=a"), Some("raw"), false)
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--image-opts and --format are mutually exclusive"
        );
    }
}
