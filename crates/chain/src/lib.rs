//! The chain layer: opens an image and its backing chain.
//!
//! The gate: a backing file is opened only with a known format, recorded in the
//! overlay (the backing-format header extension) or given by the caller; backing
//! files are never probed. Relative backing names resolve against the overlay's
//! directory. Loops and chains deeper than [`OpenSpec::max_depth`] are refused.

mod index;
pub use index::IndexedChain;

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_format::luks::LuksImage;
use strata_format::qcow2::data_file::DataFileLock;
use strata_format::qcow2::{Qcow2Image, Qcow2OpenOptions, Unlock};
use strata_format::raw::RawImage;
use strata_format::{BlockDevice, Format};
use strata_storage::{BlkdebugConfig, BlkdebugStorage, FileStorage, OpenOptions, Storage};

/// Errors from opening a chain. Each names the image it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Format(#[from] strata_format::Error),
    #[error("{}", .0)]
    Storage(#[from] strata_storage::Error),
    /// Backing files are never probed: their format must be recorded in the
    /// overlay or given by the caller.
    #[error("Could not open backing file '{backing}' of '{image}': its format is not recorded in the image.")]
    BackingFormatUnknown { image: PathBuf, backing: String },
    #[error("Backing chain of '{image}' loops back to '{again}'")]
    Loop { image: PathBuf, again: PathBuf },
    #[error("Backing chain of '{image}' is deeper than the limit of {limit} images")]
    TooDeep { image: PathBuf, limit: usize },
    /// The backing file `backing` of `image` (found at `path`) failed to open; QEMU's
    /// words, said once for each level of the chain the failure is below the top.
    #[error("Could not open backing file: {}", source.without_name(path))]
    Backing {
        image: PathBuf,
        backing: String,
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },
    #[error("Could not determine the format of '{0}'")]
    UnknownFormat(PathBuf),
    /// The first bytes of the image could not be read to probe its format.
    #[error("Could not read image for determining its format: {0}")]
    Probe(strata_storage::Error),
    /// The image `name` names through a protocol (see [`set_protocol_opener`])
    /// could not be reached; `message` is the opener's, which does not repeat
    /// the name (callers say it, as for files).
    #[error("{message}")]
    Protocol { name: String, message: String },
    /// The image `name` names through a protocol opened, but refuses the
    /// writing a layer below the top was asked for (a read-only NBD export
    /// committed into). QEMU opens such a layer read-only first and fails
    /// only when it reopens it for writing, so the message stands alone: it is
    /// never wrapped in the steps down the chain.
    #[error("{message}")]
    ProtocolReopen { name: String, message: String },
    /// The top image's own store (an NBD export served read-only) refuses the
    /// writing open asked of it.
    #[error("Could not open image: Permission denied")]
    ReadOnlyStore,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The message without the leading "PATH: " the format engine gives it
    /// for the file at `path`: where a failure is reported under another name
    /// (nested in a backing-file failure, or after "Could not open new backing
    /// file 'NAME':"), the file is not named again, as in QEMU.
    pub fn without_name(&self, path: &Path) -> String {
        let m = self.to_string();
        match m.strip_prefix(&format!("{}: ", path.display())) {
            Some(rest) => rest.to_string(),
            None => m,
        }
    }

    /// The kind of failure; for a backing file that failed to open, that of the
    /// failure behind it.
    pub fn kind(&self) -> strata_format::ErrorKind {
        use strata_format::ErrorKind as K;
        match self {
            Error::Format(e) => e.kind(),
            Error::Storage(e) => e.kind(),
            Error::BackingFormatUnknown { .. } => K::BackingFormatUnknown,
            Error::Loop { .. } | Error::TooDeep { .. } => K::Invalid,
            Error::Backing { source, .. } => source.kind(),
            Error::UnknownFormat(_) => K::Unsupported,
            Error::Probe(e) => e.kind(),
            Error::Protocol { .. } => K::Io,
            Error::ProtocolReopen { .. } => K::ReadOnly,
            Error::ReadOnlyStore => K::ReadOnly,
        }
    }

    /// The overlay and the backing name whose format is unknown, when that is the
    /// failure (here or behind a backing file that failed to open).
    pub fn unknown_backing_format(&self) -> Option<(&Path, &str)> {
        match self {
            Error::BackingFormatUnknown { image, backing } => Some((image, backing)),
            Error::Backing { source, .. } => source.unknown_backing_format(),
            _ => None,
        }
    }

    /// For a backing file that failed to open: the innermost such file (as found,
    /// its name resolved) and the failure opening it.
    pub fn failed_backing(&self) -> Option<(&Path, &Error)> {
        match self {
            Error::Backing { path, source, .. } => {
                Some(source.failed_backing().unwrap_or((path, source)))
            }
            _ => None,
        }
    }

    /// `self`, a failure at the end of `links` (each an image, its backing name and
    /// that name resolved), wrapped once per link from the innermost outwards.
    fn below(self, links: &[(PathBuf, String, PathBuf)]) -> Error {
        links
            .iter()
            .rev()
            .fold(self, |source, (image, backing, path)| Error::Backing {
                image: image.clone(),
                backing: backing.clone(),
                path: path.clone(),
                source: Box::new(source),
            })
    }
}

/// Default depth limit (QEMU has none; very deep chains are a mistake worth stopping).
pub const DEFAULT_MAX_DEPTH: usize = 256;

/// How to open an image and its chain.
#[derive(Debug, Clone)]
pub struct OpenSpec {
    pub path: PathBuf,
    /// The top image's format; probed (qcow2 magic, else raw) when `None`.
    pub format: Option<Format>,
    pub write: bool,
    /// Open without locks (`-U`), read-only.
    pub force_share: bool,
    /// Open backing files (`false`: the top image alone, unallocated reads as zeroes).
    pub open_backing: bool,
    /// Format of the top image's backing file when the image does not record one.
    pub backing_format: Option<Format>,
    pub max_depth: usize,
    /// Layers below the top to open for writing too, by depth (1 is the top's
    /// backing file): the base a commit writes into.
    pub write_layers: Vec<usize>,
    /// The top image's format-driver options, as QEMU's dotted keys below the
    /// driver (`encrypt.key-secret`, `data-file`, `backing`, `lazy-refcounts`...),
    /// values as text (JSON booleans as `on`/`off`). The command line has already
    /// refused keys QEMU's driver does not know; the file layer's options are not
    /// here (they became `path`). Empty for an image named by its file name.
    pub driver_options: BTreeMap<String, String>,
    /// Secret values by id (`--object secret,...`), for the options that name one.
    pub secrets: Arc<BTreeMap<String, Vec<u8>>>,
    /// The image as the user named it when that is not its file name (an option
    /// list, a `json:` name): messages about opening the image quote it.
    pub display_name: Option<String>,
    /// The protocol driver named as the image's format (`-f file`, `-f
    /// host_device`): the file is the image, with no format layer. The chain opens
    /// it as raw; reports name the driver.
    pub protocol_driver: Option<String>,
    /// Open for the metadata only (`info`): external data files are not opened,
    /// and an encrypted top image needs no secret (its data cannot be read).
    pub metadata_only: bool,
    /// QEMU's blkdebug filter between the top image's format and its file
    /// (`blkdebug:CONFIG:FILE`): its rules fail the requests the format engine
    /// makes after the events they name.
    pub blkdebug: Option<Arc<BlkdebugConfig>>,
    /// The format node under the top's filter, when the filter is over an
    /// image rather than a file (`blkdebug` over a qcow2 node): the top's bytes
    /// are that image's guest data (opened with its chain, see
    /// [`top_storage`]), and `path` is that image's file, naming it.
    pub filtered: Option<Box<OpenSpec>>,
    /// The top image's external data file when the options name it
    /// (`data-file.filename=`), instead of the file its header records. Not
    /// opened for a metadata-only open (as qemu-img's info ignores it).
    pub data_file: Option<PathBuf>,
    /// Why the `data-file` options cannot be honoured, said when the data file
    /// would be opened (a metadata-only open ignores them, as qemu-img's info).
    pub data_file_refusal: Option<String>,
    /// The top image's bytes when they are not the file at `path` (an NBD
    /// export, say): the top layer is opened on this storage, and `path` only
    /// names it.
    pub storage: Option<TopStorage>,
    /// Lock every file as qemu-img locks `convert`'s sources: nobody may write
    /// or resize them meanwhile, raw images included (see [`Self::no_share`]).
    pub no_share: bool,
    /// The top image is opened to be resized: a raw one also holds QEMU's
    /// resize permission, as `qemu-img resize` does.
    pub resize: bool,
    /// The subcommand opening the top image for writing refuses a raw one
    /// without writing to it: a raw top is locked sharing writing, as qemu-img
    /// locks it (see [`OpenSpec::writes_no_raw_data`]).
    pub writes_no_raw_data: bool,
    /// The top image is opened to be served over NBD: a raw one is locked as
    /// qemu-nbd locks it (others may read and write it, nobody may resize it).
    pub nbd_export: bool,
    /// Backing files given by options in place of those the overlays' headers
    /// name, by depth (`[0]` is the top's backing file): QEMU's `backing.`
    /// node options (`backing.driver`, `backing.file.filename`, one `backing.`
    /// per level). A depth beyond the list, or a node giving neither, follows
    /// the header.
    pub backing_nodes: Vec<BackingNode>,
}

/// A backing file given by options (see [`OpenSpec::backing_nodes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackingNode {
    /// Its file (`backing.file.filename`), as given: relative to the current
    /// directory, not to the overlay's. `None`: the file the overlay names.
    pub path: Option<PathBuf>,
    /// Its format driver (`backing.driver`). `None`: the format the overlay
    /// records, else (for a file given by options) the one its bytes show, as
    /// QEMU probes a backing node given without a driver.
    pub format: Option<Format>,
    /// Opened without a backing file of its own (`"backing": null` inside it).
    pub no_backing: bool,
}

/// Storage already open for the top image of an [`OpenSpec`].
#[derive(Clone)]
pub struct TopStorage(pub Arc<dyn Storage>);

impl std::fmt::Debug for TopStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopStorage")
    }
}

impl OpenSpec {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        OpenSpec {
            path: path.into(),
            format: None,
            write: false,
            force_share: false,
            open_backing: true,
            backing_format: None,
            max_depth: DEFAULT_MAX_DEPTH,
            write_layers: Vec::new(),
            driver_options: BTreeMap::new(),
            secrets: Arc::default(),
            display_name: None,
            protocol_driver: None,
            metadata_only: false,
            storage: None,
            blkdebug: None,
            filtered: None,
            data_file: None,
            data_file_refusal: None,
            no_share: false,
            resize: false,
            writes_no_raw_data: false,
            nbd_export: false,
            backing_nodes: Vec::new(),
        }
    }
    /// The backing node the options give for the layer at `depth` (1 = the
    /// top's backing file), if any.
    pub fn backing_node(&self, depth: usize) -> Option<&BackingNode> {
        depth.checked_sub(1).and_then(|i| self.backing_nodes.get(i))
    }
    /// The secret the top image opens with: the one its `encrypt.key-secret`
    /// option names (an id no `--object` defined is refused, in QEMU's words).
    pub fn unlock(&self) -> Result<Unlock> {
        self.unlock_at(0)
    }
    /// The option prefix of the layer at `depth` (1 = the top's backing file):
    /// `backing.` once per level, as QEMU nests a backing file's options.
    pub fn layer_prefix(depth: usize) -> String {
        "backing.".repeat(depth)
    }
    /// Whether options were given for the layer at `depth` or below.
    pub fn has_layer_options(&self, depth: usize) -> bool {
        let prefix = Self::layer_prefix(depth);
        depth > 0 && self.driver_options.keys().any(|k| k.starts_with(&prefix))
    }
    /// The secret the layer at `depth` opens with (see [`OpenSpec::unlock`]):
    /// a backing file's is its own `backing.encrypt.key-secret`, one `backing.`
    /// per level, never the top's. A `luks` image's secret is its `key-secret`.
    pub fn unlock_at(&self, depth: usize) -> Result<Unlock> {
        if self.metadata_only {
            // No secret is needed, nor its id looked up (as qemu-img's info).
            return Ok(Unlock::None);
        }
        let prefix = Self::layer_prefix(depth);
        let id = ["encrypt.key-secret", "key-secret"]
            .iter()
            .find_map(|k| self.driver_options.get(&format!("{prefix}{k}")));
        match id {
            None => Ok(Unlock::None),
            Some(id) => Ok(match self.secrets.get(id) {
                Some(v) => Unlock::Secret(v.as_slice().into()),
                // Refused by an encrypted image's open; a clear one needs none.
                None => Unlock::Unknown(id.clone()),
            }),
        }
    }
    /// The name messages about opening the image quote: as the user gave it.
    pub fn shown_name(&self) -> String {
        match &self.display_name {
            Some(n) => n.clone(),
            None => self.path.display().to_string(),
        }
    }
    pub fn format(mut self, f: Option<Format>) -> Self {
        self.format = f;
        self
    }
    pub fn write(mut self, w: bool) -> Self {
        self.write = w;
        self
    }
    pub fn force_share(mut self, u: bool) -> Self {
        self.force_share = u;
        self
    }
    /// Refuse to share writing and resizing of every file, raw ones too (a raw
    /// image is otherwise read while others write it, as QEMU's raw driver
    /// lets them): qemu-img's `convert` locks its sources so.
    pub fn no_share(mut self, yes: bool) -> Self {
        self.no_share = yes;
        self
    }
    /// Say that this open writes nothing to a raw top image (the subcommand
    /// refuses raw images once open, as qemu-img does): its file is then locked
    /// as qemu-img locks it, next to other writers of the raw image.
    pub fn writes_no_raw_data(mut self, yes: bool) -> Self {
        self.writes_no_raw_data = yes;
        self
    }
    /// Open the top image to serve it over NBD (see [`OpenSpec::nbd_export`]).
    pub fn nbd_export(mut self, yes: bool) -> Self {
        self.nbd_export = yes;
        self
    }
    /// Open the top image to resize it (see [`OpenSpec::resize`]).
    pub fn resize(mut self, yes: bool) -> Self {
        self.resize = yes;
        self
    }
    pub fn open_backing(mut self, b: bool) -> Self {
        self.open_backing = b;
        self
    }
    /// How the external data files of the images are locked when read: not at
    /// all under `-U`, sharing neither writing nor resizing for `convert`'s
    /// sources ([`Self::no_share`]), else as an ordinary reader that shares
    /// everything (as QEMU locks a qcow2 node's data child).
    pub fn data_file_lock(&self) -> DataFileLock {
        DataFileLock::for_reader(self.force_share, self.no_share)
    }
    /// Open the images for their metadata only (external data files stay closed).
    pub fn metadata_only(mut self, yes: bool) -> Self {
        self.metadata_only = yes;
        self
    }
    /// Also open the layer at `depth` (1 = the top's backing file) for writing.
    pub fn write_layer(mut self, depth: usize) -> Self {
        self.write_layers.push(depth);
        self
    }
}

/// One image of a chain.
#[derive(Clone)]
pub struct Layer {
    /// The path as opened (resolved against the overlay's directory).
    pub path: PathBuf,
    pub format: Format,
    pub device: Arc<dyn BlockDevice>,
    /// The backing file name as recorded in the image (bytes: it need not be UTF-8).
    pub backing_name: Option<OsString>,
    /// The backing format as recorded in the image.
    pub backing_format: Option<String>,
    /// The backing file name resolved to a path.
    pub backing_path: Option<PathBuf>,
}

/// An image and its backing chain; `layers[0]` is the top.
pub struct Chain {
    pub layers: Vec<Layer>,
}

impl Chain {
    pub fn top(&self) -> &Arc<dyn BlockDevice> {
        &self.layers[0].device
    }

    /// A device for reading the top's guest view. When every layer is open
    /// read-only it is an [`IndexedChain`], which resolves the serving layer of each
    /// granule once (reads through deep chains cost about what a flat image costs);
    /// otherwise it is the top device itself.
    pub fn reader(&self) -> Arc<dyn BlockDevice> {
        match IndexedChain::new(self.devices()) {
            Some(view) => Arc::new(view),
            None => self.top().clone(),
        }
    }

    /// The devices, top first.
    pub fn devices(&self) -> Vec<Arc<dyn BlockDevice>> {
        self.layers.iter().map(|l| l.device.clone()).collect()
    }

    /// The index of the layer `name` designates: a path (relative to the current
    /// directory or to the top image's directory) or the backing name an overlay
    /// records for it.
    pub fn find(&self, name: &str) -> Option<usize> {
        let canon = |p: &Path| std::fs::canonicalize(p).ok();
        let wanted: Vec<PathBuf> = [
            canon(Path::new(name)),
            canon(&resolve_backing(&self.layers[0].path, name)),
        ]
        .into_iter()
        .flatten()
        .collect();
        self.layers.iter().enumerate().position(|(i, l)| {
            canon(&l.path).is_some_and(|c| wanted.contains(&c))
                || (i > 0 && self.layers[i - 1].backing_name.as_deref() == Some(OsStr::new(name)))
        })
    }
}

/// Opens images named by a protocol rather than a file (QEMU's `nbd://...`
/// backing file names): the chain layer only knows files, so the program
/// registers one with [`set_protocol_opener`].
pub trait ProtocolOpener: Send + Sync {
    /// Whether `name` is a protocol name this opener serves (decided from the
    /// name alone, nothing is contacted). Such a name is never resolved
    /// against an overlay's directory.
    fn claims(&self, name: &str) -> bool;
    /// Connect to the image `name` names (one [`ProtocolOpener::claims`]),
    /// for writing if `write`: its store and the canonical name it is reported
    /// under. The error is the reason, in QEMU's words, without the name.
    fn open(&self, name: &str, write: bool) -> Result<(Arc<dyn Storage>, String), ProtocolRefusal>;
}

/// Why a [`ProtocolOpener`] did not open a name, in QEMU's words (without the
/// name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolRefusal {
    /// The image could not be reached or opened at all.
    Unreachable(String),
    /// The image opens, but not for the writing asked of it (a read-only
    /// export); QEMU meets this when it reopens the layer read/write.
    ReadOnly(String),
}

static PROTOCOL_OPENER: std::sync::OnceLock<Box<dyn ProtocolOpener>> = std::sync::OnceLock::new();

/// Register the process's [`ProtocolOpener`]; backing files (and [`open_image`]
/// paths) it claims open through it from now on. Only the first registration
/// counts.
pub fn set_protocol_opener(opener: Box<dyn ProtocolOpener>) {
    let _ = PROTOCOL_OPENER.set(opener);
}

/// The registered opener, when it claims `path` (a name that is not a file).
fn protocol_for(path: &Path) -> Option<&'static dyn ProtocolOpener> {
    let opener = PROTOCOL_OPENER.get()?;
    let name = path.to_str()?;
    opener.claims(name).then_some(opener.as_ref())
}

/// Whether `name` names an image through a registered [`ProtocolOpener`]
/// rather than a file.
pub fn is_protocol_name(name: &Path) -> bool {
    protocol_for(name).is_some()
}

/// The store of the protocol name `path` when an opener claims it.
fn protocol_storage(path: &Path, write: bool) -> Option<Result<(Arc<dyn Storage>, String)>> {
    let opener = protocol_for(path)?;
    let name = path.to_str()?;
    Some(opener.open(name, write).map_err(|refusal| match refusal {
        ProtocolRefusal::Unreachable(message) => Error::Protocol {
            name: name.to_string(),
            message,
        },
        ProtocolRefusal::ReadOnly(message) => Error::ProtocolReopen {
            name: name.to_string(),
            message,
        },
    }))
}

/// Probe the format of a top image from its first bytes: qcow2 by magic, else raw.
pub fn probe_format(path: &Path) -> Result<Format> {
    if let Some(s) = protocol_storage(path, false) {
        return probe_storage(s?.0.as_ref());
    }
    let s = FileStorage::open(path, OpenOptions::read().force_share(true))?;
    probe_storage(&s)
}

/// [`probe_format`] for the top image `spec` names, on its own storage if it has one.
pub fn probe_spec(spec: &OpenSpec) -> Result<Format> {
    match &spec.storage {
        Some(s) => probe_storage(s.0.as_ref()),
        // The guest data of the image under the filter is probed; a filter
        // over a file is probed through (its rules fail the probe's read).
        None if spec.filtered.is_some() || spec.blkdebug.is_some() => {
            probe_storage(&*top_storage(spec, false)?)
        }
        None => probe_format(&spec.path),
    }
}

pub fn probe_storage(s: &dyn Storage) -> Result<Format> {
    let mut buf = [0u8; 4];
    s.read_at(&mut buf, 0).map_err(Error::Probe)?;
    Ok(if strata_format::qcow2::probe(&buf) {
        Format::Qcow2
    } else if probe_luks(s)? {
        Format::Luks
    } else {
        probe_foreign(s)?.unwrap_or(Format::Raw)
    })
}

/// The format of another tool whose probe claims the store's first bytes (as
/// QEMU probes: the first 2048 bytes, zeroes past the end of a shorter file).
fn probe_foreign(s: &dyn Storage) -> Result<Option<Format>> {
    const PROBE_LEN: u64 = 2048;
    let len = s.size().map_err(Error::Probe)?.min(PROBE_LEN);
    let mut head = vec![0u8; PROBE_LEN as usize];
    s.read_at(&mut head[..len as usize], 0)
        .map_err(Error::Probe)?;
    use strata_format::{parallels, qed, vdi, vhdx, vmdk, vpc};
    Ok([
        (Format::Vmdk, vmdk::probe as fn(&[u8]) -> bool),
        (Format::Vdi, vdi::probe),
        (Format::Vpc, vpc::probe),
        (Format::Vhdx, vhdx::probe),
        (Format::Qed, qed::probe),
        (Format::Parallels, parallels::probe),
    ]
    .into_iter()
    .find(|(_, probe)| probe(&head))
    .map(|(f, _)| f))
}

/// Whether the store starts with the LUKS magic (a 6-byte signature).
fn probe_luks(s: &dyn Storage) -> Result<bool> {
    let mut buf = [0u8; 6];
    s.read_at(&mut buf, 0).map_err(Error::Probe)?;
    Ok(strata_format::luks::probe(&buf))
}

/// Resolve a backing file name recorded in `overlay` (relative names are relative to
/// the overlay's directory, as QEMU resolves them).
///
/// The result is spelled as QEMU spells it: a relative name is appended, as
/// written, to the overlay's name up to and including its last `/` (nothing when
/// it has none). No component is normalised away, so each `./` of a chain stays
/// in the names below it (`./a` backed by `./b` backed by `./a` reaches
/// `./././a`), as QEMU's messages quote them. A name a registered
/// [`ProtocolOpener`] claims (an NBD URL) is kept as written, like an absolute
/// one.
pub fn resolve_backing(overlay: &Path, name: impl AsRef<Path>) -> PathBuf {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let p = name.as_ref();
    if p.is_absolute() || is_protocol_name(p) {
        return p.to_path_buf();
    }
    let base = overlay.as_os_str().as_bytes();
    let mut out = match base.iter().rposition(|&c| c == b'/') {
        Some(i) => base[..=i].to_vec(),
        None => Vec::new(),
    };
    out.extend_from_slice(p.as_os_str().as_bytes());
    PathBuf::from(OsString::from_vec(out))
}

/// Open one image file (no backing) as a block device.
pub fn open_image(
    path: &Path,
    format: Format,
    write: bool,
    force_share: bool,
) -> Result<Arc<dyn BlockDevice>> {
    open_image_with(path, format, write, force_share, false, &Unlock::None)
}

/// [`open_image`], for the image's metadata only when `metadata_only` (an external
/// data file is not opened), an encrypted image opened as `unlock` says.
pub fn open_image_with(
    path: &Path,
    format: Format,
    write: bool,
    force_share: bool,
    metadata_only: bool,
    unlock: &Unlock,
) -> Result<Arc<dyn BlockDevice>> {
    let raw = matches!(format, Format::Raw | Format::Luks);
    let data_lock = DataFileLock::for_reader(force_share, false);
    open_image_locked(
        path,
        format,
        write,
        force_share,
        raw,
        metadata_only,
        unlock,
        data_lock,
    )
}

/// [`open_image_with`], the file locked as a raw image is (`raw_locks`: others
/// may keep using it as QEMU's raw driver lets them) or as one under a format
/// driver, an external data file as `data_lock` says.
#[allow(clippy::too_many_arguments)]
fn open_image_locked(
    path: &Path,
    format: Format,
    write: bool,
    force_share: bool,
    raw_locks: bool,
    metadata_only: bool,
    unlock: &Unlock,
    data_lock: DataFileLock,
) -> Result<Arc<dyn BlockDevice>> {
    if let Some(s) = protocol_storage(path, write) {
        return open_storage_with(s?.0, format, write, metadata_only, unlock, data_lock);
    }
    let opts = if write {
        OpenOptions::write()
    } else {
        OpenOptions::read().force_share(force_share)
    };
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, opts.raw(raw_locks))?);
    open_storage_with(storage, format, write, metadata_only, unlock, data_lock)
}

/// The top image's store: its own storage when the spec carries one (an NBD
/// export; refused for writing when it is read-only), else the file at
/// `spec.path`; behind the blkdebug filter when the spec asks for one.
pub fn top_storage(spec: &OpenSpec, write: bool) -> Result<Arc<dyn Storage>> {
    top_storage_as(spec, write, spec.format)
}

/// [`top_storage`] for an image of `format` (when known): its file is locked
/// as QEMU locks a file under that format's driver.
pub fn top_storage_as(
    spec: &OpenSpec,
    write: bool,
    format: Option<Format>,
) -> Result<Arc<dyn Storage>> {
    let base: Arc<dyn Storage> = match &spec.storage {
        Some(s) if write && s.0.read_only() => return Err(Error::ReadOnlyStore),
        Some(s) => s.0.clone(),
        None if spec.filtered.is_some() => filtered_storage(spec, write)?,
        None => {
            let opts = if write {
                OpenOptions::write()
            } else {
                OpenOptions::read().force_share(spec.force_share)
            };
            let raw = matches!(format, Some(Format::Raw | Format::Luks)) && !spec.no_share;
            Arc::new(FileStorage::open(
                &spec.path,
                opts.raw(raw)
                    .resize(spec.resize)
                    .writes_no_raw_data(spec.writes_no_raw_data)
                    .nbd_export(spec.nbd_export),
            )?)
        }
    };
    Ok(match &spec.blkdebug {
        // The filter named as the format is the top node: the raw reader over
        // it stands for no driver of QEMU's and raises no events.
        Some(config) if spec.protocol_driver.as_deref() == Some("blkdebug") => {
            Arc::new(BlkdebugStorage::top_node(base, config.clone()))
        }
        Some(config) => Arc::new(BlkdebugStorage::new(base, config.clone())),
        None => base,
    })
}

/// The guest data of the image under the top's filter ([`OpenSpec::filtered`]),
/// opened with its backing chain as the top is opened: for writing when it is,
/// without locks when it is, with the top's secrets.
fn filtered_storage(spec: &OpenSpec, write: bool) -> Result<Arc<dyn Storage>> {
    let Some(inner) = &spec.filtered else {
        return Err(Error::Format(strata_format::Error::invalid_argument(
            "no image under the filter",
        )));
    };
    let mut inner = (**inner).clone();
    inner.write = write;
    inner.force_share |= spec.force_share;
    inner.metadata_only = spec.metadata_only;
    if inner.secrets.is_empty() {
        inner.secrets = spec.secrets.clone();
    }
    let chain = open(&inner)?;
    let device = if write {
        chain.top().clone()
    } else {
        chain.reader()
    };
    Ok(Arc::new(strata_format::DeviceStorage::new(
        device,
        inner.path.clone(),
    )))
}

/// An image of `format` on an open store (see [`open_image_with`]); an external
/// data file is locked as an ordinary reader locks it ([`DataFileLock::Shared`]).
pub fn open_storage(
    storage: Arc<dyn Storage>,
    format: Format,
    write: bool,
    metadata_only: bool,
    unlock: &Unlock,
) -> Result<Arc<dyn BlockDevice>> {
    open_storage_with(
        storage,
        format,
        write,
        metadata_only,
        unlock,
        DataFileLock::Shared,
    )
}

/// [`open_storage`], an external data file opened for reading locked as
/// `data_lock` says.
pub fn open_storage_with(
    storage: Arc<dyn Storage>,
    format: Format,
    write: bool,
    metadata_only: bool,
    unlock: &Unlock,
    data_lock: DataFileLock,
) -> Result<Arc<dyn BlockDevice>> {
    Ok(match format {
        Format::Raw => Arc::new(RawImage::open(storage)?),
        Format::Luks => Arc::new(LuksImage::open(storage, unlock, metadata_only)?),
        Format::Vpc
        | Format::Vdi
        | Format::Vhdx
        | Format::Vmdk
        | Format::Qed
        | Format::Parallels => open_foreign(storage, format, write)?,
        Format::Qcow2 => Arc::new(Qcow2Image::open(
            storage,
            Qcow2OpenOptions {
                read_only: !write,
                metadata_only,
                unlock: unlock.clone(),
                data_file_lock: data_lock,
                ..Default::default()
            },
        )?),
    })
}

/// An image of one of the [`Format::is_foreign`] formats on `storage` (its
/// companion files, such as a vmdk's extents, found next to the store's file).
fn open_foreign(
    storage: Arc<dyn Storage>,
    format: Format,
    write: bool,
) -> Result<Arc<dyn BlockDevice>> {
    use strata_format::{parallels, qed, vdi, vhdx, vmdk, vpc};
    let path = storage.path().map(Path::to_path_buf);
    let path = path.as_deref();
    Ok(match format {
        Format::Vpc => vpc::open(storage, path, write)?,
        Format::Vdi => vdi::open(storage, path, write)?,
        Format::Vhdx => vhdx::open(storage, path, write)?,
        Format::Qed => qed::open(storage, path, write)?,
        Format::Parallels => parallels::open(storage, path, write)?,
        _ => vmdk::open(storage, path, write)?,
    })
}

/// Open the top image `spec` names on its own (no backing attached), on its own
/// storage if it has one (behind its blkdebug filter), with the secret its
/// options name.
pub fn open_top(spec: &OpenSpec, format: Format, write: bool) -> Result<Arc<dyn BlockDevice>> {
    let unlock = spec.unlock()?;
    let storage = top_storage_as(spec, write, Some(format))?;
    match format {
        Format::Qcow2 if spec.data_file.is_some() || spec.data_file_refusal.is_some() => {
            Ok(Arc::new(open_qcow2_on(
                spec,
                storage,
                Qcow2OpenOptions {
                    read_only: !write,
                    metadata_only: spec.metadata_only,
                    unlock,
                    ..Default::default()
                },
            )?))
        }
        Format::Parallels if !spec.driver_options.is_empty() => {
            Ok(open_parallels_on(spec, storage, write)?)
        }
        _ => open_storage_with(
            storage,
            format,
            write,
            spec.metadata_only,
            &unlock,
            spec.data_file_lock(),
        ),
    }
}

/// The top parallels image `spec` names, on `storage`, with the driver's
/// preallocation options (`prealloc-mode`, `prealloc-size` in bytes, as the
/// command line checked and wrote them).
fn open_parallels_on(
    spec: &OpenSpec,
    storage: Arc<dyn Storage>,
    write: bool,
) -> Result<Arc<dyn BlockDevice>> {
    use strata_format::parallels::{self, OpenOptions, PreallocMode};
    let o = &spec.driver_options;
    let mut opts = OpenOptions::default();
    if let Some(n) = o.get("prealloc-size").and_then(|v| v.parse().ok()) {
        opts.prealloc_size = n;
    }
    if o.get("prealloc-mode").map(String::as_str) == Some("truncate") {
        opts.prealloc_mode = PreallocMode::Truncate;
    }
    let path = storage.path().map(Path::to_path_buf);
    Ok(parallels::open_with(storage, path.as_deref(), write, opts)?)
}

/// The top qcow2 image `spec` names, on `storage`, opened as `opts` say, with
/// the external data file its options name (unless opened for the metadata
/// only), else the one its header records.
pub fn open_qcow2_on(
    spec: &OpenSpec,
    storage: Arc<dyn Storage>,
    opts: Qcow2OpenOptions,
) -> Result<Qcow2Image> {
    let opts = Qcow2OpenOptions {
        data_file_lock: spec.data_file_lock(),
        ..opts
    };
    if let (Some(refusal), false) = (&spec.data_file_refusal, opts.metadata_only) {
        return Err(Error::Format(strata_format::Error::invalid_argument(
            refusal.clone(),
        )));
    }
    match &spec.data_file {
        Some(data) if !opts.metadata_only => {
            use std::os::unix::ffi::OsStrExt;
            let data = strata_format::qcow2::data_file::open(
                data.as_os_str().as_bytes(),
                opts.read_only,
                opts.data_file_lock,
            )?;
            Ok(Qcow2Image::open_with_data_file(storage, data, opts)?)
        }
        _ => Ok(Qcow2Image::open(storage, opts)?),
    }
}

/// Open the image `spec` names and, unless told not to, its whole backing chain
/// (read-only), attaching each layer to the one above.
pub fn open(spec: &OpenSpec) -> Result<Chain> {
    let layers = walk(spec, None)?;
    // Attach each layer to the one below it.
    for i in 0..layers.len() - 1 {
        let below = layers[i + 1].device.clone();
        layers[i].device.set_backing(Some(below));
    }
    Ok(Chain { layers })
}

/// Open the backing chain below the top image `spec` names, which the caller
/// already holds open as `top` (for writing when `top_written`), only to learn
/// whether it opens, as QEMU opens it with the image: a backing file gone, of
/// an unknown format or failing to open is refused in QEMU's words, and a
/// chain that loops back to a top held for writing meets that top's own lock
/// (QEMU's "Failed to get shared \"write\" lock"). Every file below is opened
/// read-only and closed again; nothing is written. The walk ends at the first
/// file met twice (never loops) and at [`OpenSpec::max_depth`].
pub fn verify_backing(spec: &OpenSpec, top: &dyn BlockDevice, top_written: bool) -> Result<()> {
    if !spec.open_backing {
        return Ok(());
    }
    let (backing_name, backing_format, backing_probed) = link_of(top);
    walk(
        spec,
        Some(HeldTop {
            written: top_written,
            backing_name,
            backing_format,
            backing_probed,
        }),
    )
    .map(drop)
}

/// [`verify_backing`], keeping what it opened: the chain below `top` is
/// attached to it (each layer to the one above), so reads of `top` fall
/// through to its backing files and a resize can hide a longer backing file.
/// Nothing is attached when the spec opens no backing or `top` has none.
pub fn attach_backing(spec: &OpenSpec, top: &dyn BlockDevice, top_written: bool) -> Result<()> {
    if !spec.open_backing {
        return Ok(());
    }
    let (backing_name, backing_format, backing_probed) = link_of(top);
    let layers = walk(
        spec,
        Some(HeldTop {
            written: top_written,
            backing_name,
            backing_format,
            backing_probed,
        }),
    )?;
    for i in 1..layers.len() {
        layers[i - 1]
            .device
            .set_backing(Some(layers[i].device.clone()));
    }
    if let Some(first) = layers.first() {
        top.set_backing(Some(first.device.clone()));
    }
    Ok(())
}

/// The top image of a walk down a chain when the caller holds it open already.
struct HeldTop {
    written: bool,
    backing_name: Option<OsString>,
    backing_format: Option<String>,
    /// The format defines an unrecorded backing format as probed (qed).
    backing_probed: bool,
}

/// What `image` records of its backing file: name, format, and whether its
/// format defines an unrecorded backing format as probed
/// ([`strata_format::Overlay::backing_format_probed`]).
fn link_of(image: &dyn BlockDevice) -> (Option<OsString>, Option<String>, bool) {
    match image.overlay() {
        Some(link) => (
            link.backing_name(),
            link.backing_format(),
            link.backing_format_probed(),
        ),
        None => (None, None, false),
    }
}

/// Open the layers of the chain `spec` names, top first (without the top when
/// the caller holds it: `held`), none attached to another.
fn walk(spec: &OpenSpec, mut held: Option<HeldTop>) -> Result<Vec<Layer>> {
    // A filtered top is probed through its filter, which then serves the image.
    let mut filtered = match (&spec.blkdebug, &held) {
        (Some(_), None) => Some(top_storage(spec, spec.write)?),
        _ => None,
    };
    let format = match (spec.format, &filtered, &held) {
        (Some(f), _, _) => f,
        (None, Some(s), _) => probe_storage(&**s)?,
        // A held top is never opened again; its format is not needed.
        (None, None, Some(_)) => Format::Raw,
        (None, None, None) => probe_spec(spec)?,
    };
    // Layers above the first one opened here (the held top): depths count them.
    let skipped = usize::from(held.is_some());
    let mut layers: Vec<Layer> = Vec::new();
    // Each file opened so far, and whether it was opened for writing.
    let mut seen: HashMap<PathBuf, bool> = HashMap::new();
    let mut path = spec.path.clone();
    let mut fmt = format;
    let mut write = spec.write;
    // Each step down the chain so far: a failure below the top is wrapped once per step.
    let mut links: Vec<(PathBuf, String, PathBuf)> = Vec::new();
    // The store of the next layer when its name is a protocol's (already connected).
    let mut remote: Option<Arc<dyn Storage>> = None;
    loop {
        let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        if let Some(&written) = seen.get(&canon) {
            // Back at a file this open holds for writing: its own lock refuses
            // the read-only open of the backing file, in QEMU's words (QEMU
            // gets that far before it notices anything). Elsewhere, a loop.
            if written && !spec.force_share {
                return Err(Error::Storage(strata_storage::Error::Locked {
                    kind: "shared",
                    perm: "write",
                    path,
                })
                .below(&links));
            }
            return Err(Error::Loop {
                image: spec.path.clone(),
                again: path,
            });
        }
        // The top the caller holds counts as opened as it holds it.
        let top = held.take();
        seen.insert(canon.clone(), top.as_ref().map_or(write, |t| t.written));
        if layers.len() + skipped >= spec.max_depth {
            return Err(Error::TooDeep {
                image: spec.path.clone(),
                limit: spec.max_depth,
            });
        }
        let (backing_name, backing_format, backing_path, backing_probed) = match top {
            Some(t) => {
                let backing_path = t.backing_name.as_deref().map(|b| resolve_backing(&path, b));
                (
                    t.backing_name,
                    t.backing_format,
                    backing_path,
                    t.backing_probed,
                )
            }
            None => {
                // Each layer opens with its own secret (`backing.encrypt.key-secret`...).
                let device = if let Some(storage) = filtered.take() {
                    open_storage_with(
                        storage,
                        fmt,
                        write,
                        spec.metadata_only,
                        &spec.unlock()?,
                        spec.data_file_lock(),
                    )?
                } else if let Some(storage) = remote.take() {
                    spec.unlock_at(layers.len() + skipped)
                        .and_then(|unlock| {
                            open_storage_with(
                                storage,
                                fmt,
                                write,
                                spec.metadata_only,
                                &unlock,
                                spec.data_file_lock(),
                            )
                        })
                        .map_err(|e| e.below(&links))?
                } else if layers.len() + skipped == 0 {
                    open_top(spec, fmt, write)?
                } else {
                    let depth = layers.len() + skipped;
                    spec.unlock_at(depth)
                        .and_then(|unlock| {
                            open_image_locked(
                                &path,
                                fmt,
                                write,
                                spec.force_share,
                                matches!(fmt, Format::Raw | Format::Luks) && !spec.no_share,
                                spec.metadata_only,
                                &unlock,
                                spec.data_file_lock(),
                            )
                        })
                        .map_err(|e| e.below(&links))?
                };
                let (backing_name, backing_format, backing_probed) = link_of(device.as_ref());
                let backing_path = backing_name.as_deref().map(|b| resolve_backing(&path, b));
                layers.push(Layer {
                    path: path.clone(),
                    format: fmt,
                    device,
                    backing_name: backing_name.clone(),
                    backing_format: backing_format.clone(),
                    backing_path: backing_path.clone(),
                });
                (backing_name, backing_format, backing_path, backing_probed)
            }
        };
        let next = layers.len() + skipped;
        // The layer just opened was given by options without a backing file
        // of its own.
        if spec.backing_node(next - 1).is_some_and(|n| n.no_backing) {
            break;
        }
        let node = spec.backing_node(next).filter(|_| spec.open_backing);
        // A file given by options takes the place of the one the header names
        // (its format, unless given too, stays the recorded one).
        let given = node.and_then(|n| n.path.clone());
        let (backing_name, backing_path) = match given {
            Some(p) => {
                if let Some(l) = layers.last_mut() {
                    l.backing_path = Some(p.clone());
                }
                (Some(p.clone().into_os_string()), Some(p))
            }
            None => (backing_name, backing_path),
        };
        let (Some(name), Some(bpath)) = (backing_name, backing_path) else {
            if node.is_some_and(|n| n.format.is_some()) {
                // A driver for a backing file the image does not name, and
                // no file for it.
                let e = Error::Format(strata_format::Error::invalid_argument(
                    "A block device must be specified for \"file\"",
                ));
                links.push((path.clone(), String::new(), PathBuf::new()));
                return Err(e.below(&links));
            }
            if spec.open_backing && spec.has_layer_options(layers.len() + skipped) {
                // Options for a backing file the image does not have: QEMU
                // tries to open one from the options alone.
                let e = Error::Format(strata_format::Error::invalid_argument(
                    "Must specify either driver or file",
                ));
                links.push((path.clone(), String::new(), PathBuf::new()));
                return Err(e.below(&links));
            }
            break;
        };
        if !spec.open_backing {
            break;
        }
        // A file given by options without a driver, where the overlay
        // records no format, is probed once found (as QEMU does).
        // So is the backing file of a format that records only some
        // backing formats and defines the others as probed (qed).
        let probe =
            (backing_probed || node.is_some_and(|n| n.path.is_some())) && backing_format.is_none();
        let bfmt = match (node.and_then(|n| n.format), backing_format.as_deref()) {
            (Some(f), _) => Some(f),
            (None, None) if probe => None,
            (None, Some(f)) => Some(f.parse::<Format>().map_err(|_| {
                // The recorded format names no driver: opening the backing file
                // fails (before its file is looked at), as in QEMU.
                links.push((
                    path.clone(),
                    name.to_string_lossy().into_owned(),
                    bpath.clone(),
                ));
                Error::Format(strata_format::Error::invalid_argument(format!(
                    "Unknown driver '{f}'"
                )))
                .below(&links)
            })?),
            (None, None) if layers.len() + skipped == 1 && spec.backing_format.is_some() => {
                spec.backing_format
            }
            (None, None) => {
                return Err(Error::BackingFormatUnknown {
                    image: path.clone(),
                    backing: name.to_string_lossy().into_owned(),
                }
                .below(&links))
            }
        };
        links.push((
            path.clone(),
            name.to_string_lossy().into_owned(),
            bpath.clone(),
        ));
        let below_writes = spec.write_layers.contains(&(layers.len() + skipped));
        if let Some(opened) = protocol_storage(&bpath, below_writes) {
            // Reached through its protocol, and named as it reports itself.
            let (storage, canonical) = opened.map_err(|e| match e {
                e @ Error::ProtocolReopen { .. } => e,
                e => e.below(&links),
            })?;
            fmt = match bfmt {
                Some(f) => f,
                None => probe_storage(storage.as_ref()).map_err(|e| e.below(&links))?,
            };
            remote = Some(storage);
            path = PathBuf::from(canonical);
            write = below_writes;
            continue;
        }
        if let Err(e) = std::fs::metadata(&bpath) {
            return Err(Error::Storage(strata_storage::Error::Io {
                op: "Could not open",
                path: bpath,
                source: e,
            })
            .below(&links));
        }
        fmt = match bfmt {
            Some(f) => f,
            None => probe_format(&bpath).map_err(|e| e.below(&links))?,
        };
        path = bpath;
        write = spec.write_layers.contains(&(layers.len() + skipped));
    }
    Ok(layers)
}

#[cfg(test)]
mod gate_tests {
    use super::*;
    use strata_format::qcow2::{create, CreateOptions};

    fn qcow2(path: &Path, backing: Option<&str>, fmt: Option<&str>) {
        let s: Arc<dyn Storage> = Arc::new(FileStorage::create(path).unwrap());
        create(
            s,
            &CreateOptions {
                size: 1 << 20,
                backing_file: backing.map(String::from),
                backing_format: fmt.map(String::from),
                ..Default::default()
            },
        )
        .unwrap()
        .close()
        .unwrap();
    }

    #[test]
    fn a_loop_in_the_chain_is_refused() {
        let t = tempfile::tempdir().unwrap();
        qcow2(&t.path().join("a"), Some("b"), Some("qcow2"));
        qcow2(&t.path().join("b"), Some("a"), Some("qcow2"));
        let e = open(&OpenSpec::new(t.path().join("a"))).err().unwrap();
        assert!(matches!(e, Error::Loop { .. }), "{e}");
        assert_eq!(e.kind(), strata_format::ErrorKind::Invalid);
        // An image that names itself.
        qcow2(&t.path().join("self"), Some("self"), Some("qcow2"));
        let e = open(&OpenSpec::new(t.path().join("self"))).err().unwrap();
        assert!(matches!(e, Error::Loop { .. }), "{e}");
    }

    #[test]
    fn backing_names_resolve_spelled_as_qemu_spells_them() {
        let r = |o: &str, b: &str| resolve_backing(Path::new(o), b);
        assert_eq!(r("x", "./y"), Path::new("./y"));
        assert_eq!(r("./x", "./y"), Path::new("././y"));
        assert_eq!(r("././y", "./x"), Path::new("./././x"));
        assert_eq!(r("/d/./x", "./y"), Path::new("/d/././y"));
        assert_eq!(r("sub/z", "../sub/z"), Path::new("sub/../sub/z"));
        assert_eq!(r("sub/z", "/abs"), Path::new("/abs"));
    }

    #[test]
    fn verifying_a_held_top_s_chain_meets_its_lock_or_its_gaps() {
        let t = tempfile::tempdir().unwrap();
        qcow2(&t.path().join("a"), Some("b"), Some("qcow2"));
        qcow2(&t.path().join("b"), Some("a"), Some("qcow2"));
        let spec = OpenSpec::new(t.path().join("a"));
        let top = open_image(&t.path().join("a"), Format::Qcow2, true, false).unwrap();
        // Held for writing: the loop meets the top's own lock, a step per link.
        let e = verify_backing(&spec, top.as_ref(), true).err().unwrap();
        assert!(
            e.to_string().starts_with(
                "Could not open backing file: Could not open backing file: Failed to get shared"
            ),
            "{e}"
        );
        // Held for reading: a loop.
        let e = verify_backing(&spec, top.as_ref(), false).err().unwrap();
        assert!(matches!(e, Error::Loop { .. }), "{e}");
        // A backing file gone.
        qcow2(&t.path().join("c"), Some("gone"), Some("qcow2"));
        let top = open_image(&t.path().join("c"), Format::Qcow2, true, false).unwrap();
        let spec = OpenSpec::new(t.path().join("c"));
        let e = verify_backing(&spec, top.as_ref(), true).err().unwrap();
        assert_eq!(e.kind(), strata_format::ErrorKind::NotFound);
        // Without backing files opened, nothing is looked at.
        assert!(verify_backing(&spec.open_backing(false), top.as_ref(), true).is_ok());
    }

    #[test]
    fn a_chain_deeper_than_the_limit_is_refused() {
        let t = tempfile::tempdir().unwrap();
        qcow2(&t.path().join("l0"), None, None);
        for i in 1..5 {
            let b = format!("l{}", i - 1);
            qcow2(&t.path().join(format!("l{i}")), Some(&b), Some("qcow2"));
        }
        let mut spec = OpenSpec::new(t.path().join("l4"));
        assert_eq!(open(&spec).unwrap().layers.len(), 5);
        spec.max_depth = 5;
        assert_eq!(open(&spec).unwrap().layers.len(), 5);
        spec.max_depth = 4;
        let e = open(&spec).err().unwrap();
        assert!(matches!(e, Error::TooDeep { limit: 4, .. }), "{e}");
    }

    #[test]
    fn a_backing_file_without_a_recorded_format_needs_one_given_and_is_never_probed() {
        let t = tempfile::tempdir().unwrap();
        // The backing file holds qcow2 bytes, but nothing says it is qcow2.
        qcow2(&t.path().join("base"), None, None);
        qcow2(&t.path().join("top"), Some("base"), None);
        let e = open(&OpenSpec::new(t.path().join("top"))).err().unwrap();
        assert_eq!(e.kind(), strata_format::ErrorKind::BackingFormatUnknown);
        assert_eq!(
            e.unknown_backing_format(),
            Some((t.path().join("top").as_path(), "base"))
        );
        // Given as raw, it is read as raw (the qcow2 header shows as data).
        let mut spec = OpenSpec::new(t.path().join("top"));
        spec.backing_format = Some(Format::Raw);
        let c = open(&spec).unwrap();
        assert_eq!(c.layers[1].format, Format::Raw);
        let mut magic = [0u8; 4];
        c.top().read(&mut magic, 0).unwrap();
        assert_eq!(&magic, b"QFI\xfb");
        // A recorded raw format wins over the content as well.
        qcow2(&t.path().join("top2"), Some("base"), Some("raw"));
        let c = open(&OpenSpec::new(t.path().join("top2"))).unwrap();
        assert_eq!(c.layers[1].format, Format::Raw);
    }

    #[test]
    fn relative_backing_names_resolve_against_the_overlay_directory() {
        let t = tempfile::tempdir().unwrap();
        let sub = t.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        qcow2(&sub.join("base"), None, None);
        qcow2(&t.path().join("base"), None, None);
        qcow2(&sub.join("top"), Some("base"), Some("qcow2"));
        let c = open(&OpenSpec::new(sub.join("top"))).unwrap();
        assert_eq!(c.layers[1].path, sub.join("base"));
        assert_eq!(c.find("base"), Some(1));
        // A missing backing file is said as QEMU says it; the error keeps the
        // overlay that names it.
        qcow2(&sub.join("orphan"), Some("nowhere"), Some("qcow2"));
        let e = open(&OpenSpec::new(sub.join("orphan"))).err().unwrap();
        assert_eq!(e.kind(), strata_format::ErrorKind::NotFound);
        let m = e.to_string();
        assert!(
            m.starts_with("Could not open backing file: Could not open '") && m.contains("nowhere"),
            "{m}"
        );
        assert!(matches!(&e, Error::Backing { image, .. } if *image == sub.join("orphan")));
    }
}
