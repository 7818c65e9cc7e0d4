//! An exported disk: an image and its backing chain behind a gate, with the live
//! operations (internal snapshot, external snapshot, commit, stream) that change
//! the chain while clients keep reading and writing.
//!
//! The gate: every client request holds the gate shared for the whole of its I/O.
//! A live operation takes it exclusively for the instant it switches the chain: the
//! exclusive lock waits for requests in flight to finish (draining them) and holds
//! new ones back until the switch is done. Before switching, the chain is flushed,
//! so every write acknowledged before the operation is in the image the operation
//! freezes, and no write acknowledged after it is.

use crate::{Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use strata_chain::{Layer, OpenSpec};
use strata_format::{BlockDevice, Format, Status};
use strata_jobs::status::{ChainStatus, Walk};
use strata_jobs::{Cancel, NoProgress};
use strata_storage::sync;

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The export name clients ask for ("" is the default export).
    pub name: String,
    pub path: PathBuf,
    /// The top image's format; probed (qcow2 magic, else raw) when `None`.
    pub format: Option<Format>,
    pub read_only: bool,
    pub description: String,
    /// Minimum block size advertised and enforced (a power of two, 1..=65536).
    pub min_block: u32,
    /// What a client's TRIM does (qemu-nbd's `--discard`; ignored by default).
    pub discard: Discard,
    /// Whether writes of zero data become write-zeroes (qemu-nbd's
    /// `--detect-zeroes`; off by default). [`DetectZeroes::Unmap`] needs
    /// [`Discard::Unmap`]: [`Export::open`] refuses it otherwise.
    pub detect_zeroes: DetectZeroes,
}

/// What an export does with a client's TRIM, as qemu-nbd's `--discard`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discard {
    /// TRIM succeeds and changes nothing, and a write-zeroes never frees what
    /// the image allocated (qemu-nbd's default).
    #[default]
    Ignore,
    /// TRIM frees the range (a raw file's blocks are punched, a qcow2 image's
    /// clusters freed), and a write-zeroes without NBD's NO_HOLE flag may too.
    Unmap,
}

impl std::str::FromStr for Discard {
    type Err = Error;
    /// qemu-nbd's names: `ignore` (or `off`), `unmap` (or `on`).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ignore" | "off" => Ok(Discard::Ignore),
            "unmap" | "on" => Ok(Discard::Unmap),
            _ => Err(Error::Invalid(format!("Invalid discard mode `{s}'"))),
        }
    }
}

/// Whether an export turns writes of all-zero data into write-zeroes, as
/// qemu-nbd's `--detect-zeroes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Zero data is written as any data (qemu-nbd's default).
    #[default]
    Off,
    /// Zero data is written as a write-zeroes that keeps the allocation.
    On,
    /// Zero data is written as a write-zeroes that may free the range (only
    /// with [`Discard::Unmap`]).
    Unmap,
}

impl std::str::FromStr for DetectZeroes {
    type Err = Error;
    /// qemu-nbd's names: `off`, `on`, `unmap`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(DetectZeroes::Off),
            "on" => Ok(DetectZeroes::On),
            "unmap" => Ok(DetectZeroes::Unmap),
            _ => Err(Error::Invalid(format!(
                "Failed to parse detect_zeroes mode: invalid parameter value: {s}"
            ))),
        }
    }
}

impl ExportConfig {
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        ExportConfig {
            name: name.into(),
            path: path.into(),
            format: None,
            read_only: false,
            description: String::new(),
            min_block: 1,
            discard: Discard::Ignore,
            detect_zeroes: DetectZeroes::Off,
        }
    }
}

/// The chain an export currently serves.
pub struct Backend {
    /// Top first; each layer attached to the one below it.
    pub layers: Vec<Layer>,
    status: ChainStatus,
    /// Set when the chain could not be put back together after a failed live
    /// operation: every request then fails rather than show wrong data.
    pub failed: Option<String>,
}

impl Backend {
    fn new(layers: Vec<Layer>) -> Result<Self> {
        let devices = layers.iter().map(|l| l.device.clone()).collect();
        let status = ChainStatus::from_devices(devices)?;
        Ok(Backend {
            layers,
            status,
            failed: None,
        })
    }

    /// The device clients read and write.
    pub fn top(&self) -> &Arc<dyn BlockDevice> {
        &self.layers[0].device
    }

    /// `base:allocation` flags (`STATE_HOLE`, `STATE_ZERO`) of the run starting at
    /// `offset` (at most `len` bytes, `len` ≥ 1) and its length.
    pub fn allocation(&self, offset: u64, len: u64) -> strata_format::Result<(u64, u32)> {
        let s = self
            .status
            .status(offset, len, Walk::DataOrZero)
            .map_err(to_format)?;
        let mut flags = 0;
        if !s.data {
            flags |= crate::proto::STATE_HOLE;
        }
        if s.zero {
            flags |= crate::proto::STATE_ZERO;
        }
        Ok((s.len, flags))
    }

    /// `qemu:allocation-depth` of the run starting at `offset`: 0 when no layer
    /// stores it, else the 1-based depth of the layer that does.
    pub fn depth(&self, offset: u64, len: u64) -> strata_format::Result<(u64, u32)> {
        let s = self
            .status
            .status(offset, len, Walk::Allocated)
            .map_err(to_format)?;
        let d = if s.allocated {
            u32::try_from(s.depth + 1).unwrap_or(u32::MAX)
        } else {
            0
        };
        Ok((s.len, d))
    }

    /// Whether `[offset, offset+len)` reads as zeroes without reading it.
    pub fn reads_as_zero(&self, offset: u64, len: u64) -> strata_format::Result<bool> {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let s = self
                .status
                .status(pos, end - pos, Walk::DataOrZero)
                .map_err(to_format)?;
            if !s.zero || s.len == 0 {
                return Ok(false);
            }
            pos += s.len;
        }
        Ok(true)
    }
}

/// Status queries only fail with engine errors; keep them as such.
fn to_format(e: strata_jobs::Error) -> strata_format::Error {
    match e {
        strata_jobs::Error::Format(f) => f,
        other => strata_format::Error::new(other.kind(), other.to_string()),
    }
}

/// A layer as `list` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    pub path: String,
    pub format: String,
    /// Internal snapshots (qcow2), by name.
    pub snapshots: Vec<String>,
}

/// An export as `list` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    /// Top first.
    pub chain: Vec<LayerInfo>,
}

/// An exported disk. Shared by every connection to it (so one flush covers the
/// writes of all connections: the multi-connection promise holds).
pub struct Export {
    pub name: String,
    pub description: String,
    pub read_only: bool,
    pub min_block: u32,
    /// What a client's TRIM does; see [`ExportConfig::discard`].
    pub discard: Discard,
    /// Whether zero data is written as write-zeroes; see
    /// [`ExportConfig::detect_zeroes`].
    pub detect_zeroes: DetectZeroes,
    size: u64,
    gate: RwLock<Backend>,
    /// Ranges written since a commit began copying (None when no commit runs).
    dirty: Mutex<Option<Vec<(u64, u64)>>>,
    /// One live operation at a time.
    ops: Mutex<()>,
    /// Bytes written since the top image's writeback was last started.
    written: std::sync::atomic::AtomicU64,
    /// A writeback start is under way (at most one at a time).
    kicking: Arc<std::sync::atomic::AtomicBool>,
}

/// Every this many bytes of writes, the top image's writeback is started in the
/// background, so a client's flush (a guest's fsync) waits for less.
const WRITEBACK_STEP: u64 = 32 << 20;

/// Reopen layer `i` (a backing file) for writing or read-only, with the gate held
/// exclusively (no request is in flight). The old handle is closed first: its
/// locks would otherwise conflict with the new ones. If the file cannot be opened
/// for writing (another process uses it as a backing file, or permissions), it is
/// opened read-only again and the chain is as before.
fn reopen(b: &mut Backend, i: usize, write: bool) -> Result<()> {
    let mut layers = std::mem::take(&mut b.layers);
    let (path, format) = (layers[i].path.clone(), layers[i].format);
    // Drop every reference to the old handle: the layer above's backing pointer,
    // the status index and the layer itself.
    layers[i - 1].device.set_backing(None);
    b.status = ChainStatus::from_devices(vec![layers[0].device.clone()])?;
    let below = layers.get(i + 1).map(|l| l.device.clone());
    let placeholder = layers[0].device.clone();
    drop(std::mem::replace(&mut layers[i].device, placeholder));
    let (device, err) = match strata_chain::open_image(&path, format, write, false) {
        Ok(d) => (d, None),
        Err(e) => match strata_chain::open_image(&path, format, false, false) {
            Ok(d) => (d, Some(e)),
            Err(again) => {
                // The file went away meanwhile: the top alone would show zeroes
                // where the backing file's data was. Refuse all I/O instead.
                let msg = format!(
                    "the backing file '{}' could not be reopened: {again}",
                    path.display()
                );
                b.layers = layers;
                b.failed = Some(msg.clone());
                return Err(Error::Io(std::io::Error::other(msg)));
            }
        },
    };
    device.set_backing(below);
    layers[i - 1].device.set_backing(Some(device.clone()));
    layers[i].device = device;
    *b = Backend::new(layers)?;
    match err {
        None => Ok(()),
        Some(e) => Err(Error::BackingBusy(format!(
            "cannot write the backing file '{}' to commit into it: {e}",
            path.display()
        ))),
    }
}

/// Give the device clients write the export's TRIM policy. Under
/// [`Discard::Unmap`] a qcow2 image punches the file's space of the clusters a
/// trim (or a zero write that may unmap) frees, once their zero refcounts are
/// durable, as qemu-nbd's qcow2 driver passes those discards down to its file;
/// under [`Discard::Ignore`] the export never frees anything, so there is
/// nothing to punch.
fn apply_discard_policy(device: &dyn BlockDevice, discard: Discard) {
    if let Some(q) = device
        .as_any()
        .downcast_ref::<strata_format::qcow2::Qcow2Image>()
    {
        q.set_punch_unmapped(discard == Discard::Unmap);
    }
}

fn layer_for(path: &Path, format: Format, device: Arc<dyn BlockDevice>) -> Layer {
    let (backing_name, backing_format) = match device.overlay() {
        Some(link) => (link.backing_name(), link.backing_format()),
        None => (None, None),
    };
    let backing_path = backing_name
        .as_deref()
        .map(|b| strata_chain::resolve_backing(path, b));
    Layer {
        path: path.to_path_buf(),
        format,
        device,
        backing_name,
        backing_format,
        backing_path,
    }
}

impl Export {
    /// Open the image and its chain. Only the top is opened for writing; backing
    /// files are opened read-only with QEMU's read locks, so other overlays of the
    /// same base (other exports, QEMU guests) keep working. A live commit reopens
    /// the backing file it writes for the time it needs it (see [`Export::commit`]).
    pub fn open(cfg: &ExportConfig) -> Result<Export> {
        if !cfg.min_block.is_power_of_two() || cfg.min_block > 65536 {
            return Err(Error::Invalid(format!(
                "minimum block size {} is not a power of two up to 65536",
                cfg.min_block
            )));
        }
        if cfg.detect_zeroes == DetectZeroes::Unmap && cfg.discard != Discard::Unmap {
            return Err(Error::Invalid(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap".into(),
            ));
        }
        // Locked as qemu-nbd locks what it serves (a raw image stays open to
        // other readers and writers, as QEMU's raw driver lets them).
        let spec = OpenSpec::new(&cfg.path)
            .format(cfg.format)
            .write(!cfg.read_only)
            .nbd_export(true);
        let chain = strata_chain::open(&spec)?;
        let size = chain.top().virtual_size();
        apply_discard_policy(chain.top().as_ref(), cfg.discard);
        Ok(Export {
            name: cfg.name.clone(),
            description: cfg.description.clone(),
            read_only: cfg.read_only,
            min_block: cfg.min_block,
            discard: cfg.discard,
            detect_zeroes: cfg.detect_zeroes,
            size,
            gate: RwLock::new(Backend::new(chain.layers)?),
            dirty: Mutex::new(None),
            ops: Mutex::new(()),
            written: Default::default(),
            kicking: Default::default(),
        })
    }

    /// Export `device`, which is no image file (a backup, say), read-only under
    /// `name`. Live operations on it fail: it has no file to snapshot or commit.
    pub fn from_device(
        name: impl Into<String>,
        description: impl Into<String>,
        device: Arc<dyn BlockDevice>,
    ) -> Result<Export> {
        let size = device.virtual_size();
        let layer = Layer {
            path: PathBuf::new(),
            format: Format::Raw,
            device,
            backing_name: None,
            backing_format: None,
            backing_path: None,
        };
        Ok(Export {
            name: name.into(),
            description: description.into(),
            read_only: true,
            min_block: 1,
            discard: Discard::Ignore,
            detect_zeroes: DetectZeroes::Off,
            size,
            gate: RwLock::new(Backend::new(vec![layer])?),
            dirty: Mutex::new(None),
            ops: Mutex::new(()),
            written: Default::default(),
            kicking: Default::default(),
        })
    }

    /// The size advertised to clients (fixed for the life of the export).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Hold the gate shared: the chain cannot switch while the guard lives.
    pub fn io(&self) -> RwLockReadGuard<'_, Backend> {
        sync::read(&self.gate)
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, Backend> {
        sync::write(&self.gate)
    }

    /// Record that `[offset, offset+len)` changed (call with the gate held shared,
    /// after the write). Only recorded while a commit copies.
    pub fn mark_dirty(&self, offset: u64, len: u64) {
        let mut d = sync::lock(&self.dirty);
        if let Some(v) = d.as_mut() {
            v.push((offset, len));
        }
    }

    /// Count `len` bytes written to the top of `b` (the backend a request used);
    /// every [`WRITEBACK_STEP`] bytes, start its writeback on a short-lived thread
    /// (see [`strata_storage::start_writeback`]). Never waits.
    pub fn wrote(&self, b: &Backend, len: u64) {
        use std::sync::atomic::Ordering;
        let before = self.written.fetch_add(len, Ordering::Relaxed);
        if before + len < WRITEBACK_STEP {
            return;
        }
        self.written.store(0, Ordering::Relaxed);
        let Some(path) = b.top().path() else { return };
        if self.kicking.swap(true, Ordering::AcqRel) {
            return;
        }
        let kicking = self.kicking.clone();
        std::thread::spawn(move || {
            if let Ok(f) = std::fs::File::open(&path) {
                strata_storage::start_writeback(&f);
            }
            kicking.store(false, Ordering::Release);
        });
    }

    /// Flush the whole chain's top (all connections' writes).
    pub fn flush(&self) -> Result<()> {
        Ok(self.io().top().flush()?)
    }

    /// Take an internal snapshot `name` of the top image (qcow2 only), by
    /// [`strata_jobs::snapshot::create`]'s rules with unique names (clients find
    /// snapshots again by name). Requests in flight are drained first and new
    /// ones held back until it is taken: it holds exactly the writes acknowledged
    /// before it. Returns the snapshot's ID.
    pub fn snapshot(&self, name: &str) -> Result<String> {
        use strata_jobs::snapshot::{create, CreateRequest, NameRule};
        self.check_writable()?;
        let _op = sync::lock(&self.ops);
        let b = self.exclusive();
        let req = CreateRequest {
            name: name.to_string(),
            names: NameRule::Unique,
        };
        Ok(create(b.top().as_ref(), &req)?.id)
    }

    /// Live operations write the chain: refused on a read-only export.
    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnlyExport(self.name.clone()));
        }
        Ok(())
    }

    /// Create a qcow2 overlay at `overlay` on the current top and switch the
    /// export's writes to it. The old top is frozen from then on: it holds exactly
    /// the writes acknowledged before the switch.
    pub fn snapshot_external(&self, overlay: &Path) -> Result<()> {
        self.check_writable()?;
        let _op = sync::lock(&self.ops);
        // Create the (empty) overlay first, outside the gate: it only records the
        // top's name and format, which do not change while `ops` is held.
        let plan = {
            let b = self.io();
            let req = strata_jobs::overlay::OverlayRequest {
                overlay: overlay.to_path_buf(),
                backing: b.layers[0].path.clone(),
                backing_format: b.layers[0].format,
                size: Some(self.size),
                cluster_size: None,
            };
            strata_jobs::overlay::plan_on(&req, b.top().as_ref(), b.layers.len())?
        };
        strata_jobs::overlay::apply(&plan)?;
        let device = match strata_chain::open_image(overlay, Format::Qcow2, true, false) {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(overlay);
                return Err(e.into());
            }
        };
        apply_discard_policy(device.as_ref(), self.discard);
        let layer = layer_for(overlay, Format::Qcow2, device.clone());
        let mut b = self.exclusive();
        let flushed = b.top().flush();
        if let Err(e) = flushed {
            drop(b);
            drop(device);
            let _ = std::fs::remove_file(overlay);
            return Err(e.into());
        }
        device.set_backing(Some(b.top().clone()));
        let mut layers = vec![layer];
        layers.extend(b.layers.iter().cloned());
        *b = Backend::new(layers)?;
        // The frozen image is only read from now on: hold it with read locks, so
        // other tools (a backup copying it, qemu-img) can open it too.
        reopen(&mut b, 1, false)
    }

    /// Merge the top overlay into its backing file and switch the export back to
    /// it. The data is copied while clients keep writing (their writes are
    /// recorded); then, under the gate, the ranges written meanwhile are copied
    /// again, the backing file flushed, and the export switched.
    pub fn commit(&self) -> Result<()> {
        self.check_writable()?;
        let _op = sync::lock(&self.ops);
        let devices: Vec<Arc<dyn BlockDevice>> = {
            let mut b = self.exclusive();
            if b.layers.len() < 2 {
                return Err(strata_jobs::Error::NoBackingFile.into());
            }
            if b.layers[1].device.read_only() {
                reopen(&mut b, 1, true)?;
            }
            *sync::lock(&self.dirty) = Some(Vec::new());
            b.layers.iter().map(|l| l.device.clone()).collect()
        };
        let result = (|| -> Result<()> {
            let cancel = Cancel::default();
            let plan = strata_jobs::commit::plan(&devices, 0, 1, &cancel)?;
            strata_jobs::commit::apply_plan(&devices, &plan, &NoProgress, &cancel)?;
            let mut b = self.exclusive();
            let dirty = sync::lock(&self.dirty).take().unwrap_or_default();
            let top = b.top().clone();
            let base = b.layers[1].device.clone();
            for (off, len) in merge_ranges(dirty) {
                copy_view(top.as_ref(), base.as_ref(), off, len)?;
            }
            base.flush()?;
            let layers = b.layers[1..].to_vec();
            *b = Backend::new(layers)?;
            apply_discard_policy(b.top().as_ref(), self.discard);
            drop(b);
            // The old top is no longer served; it still shows the same view.
            top.flush()?;
            Ok(())
        })();
        *sync::lock(&self.dirty) = None;
        result
    }

    /// Pull the data of the backing chain into the top image and drop the backing
    /// chain. The copy goes a chunk at a time, each under the gate and only into
    /// ranges the top does not store yet, so a client write is never overwritten
    /// by older backing data.
    pub fn stream(&self) -> Result<()> {
        self.check_writable()?;
        let _op = sync::lock(&self.ops);
        let devices: Vec<_> = self.io().layers.iter().map(|l| l.device.clone()).collect();
        // Only an overlay format has a backing chain: one layer is all a raw top
        // ever has.
        if devices.len() < 2 {
            return Err(strata_jobs::Error::NoBackingFile.into());
        }
        let plan = strata_jobs::stream::plan(&devices, devices.len(), &Cancel::default())?;
        const CHUNK: u64 = 1 << 20;
        for r in &plan.ranges {
            let mut pos = r.offset;
            let end = r.offset + r.len;
            while pos < end {
                let n = (end - pos).min(CHUNK - pos % CHUNK);
                let b = self.exclusive();
                let top = b.top().clone();
                let mut p = pos;
                while p < pos + n {
                    let e = top.block_status(p, pos + n - p)?;
                    if e.len == 0 {
                        break;
                    }
                    if e.status == Status::Unallocated {
                        copy_view(top.as_ref(), top.as_ref(), p, e.len)?;
                    }
                    p += e.len;
                }
                drop(b);
                pos += n;
            }
        }
        let mut b = self.exclusive();
        let top = b.top().clone();
        top.flush()?;
        let chain = strata_chain::Chain {
            layers: b.layers.clone(),
        };
        strata_jobs::stream::relink_to_base(&chain, chain.layers.len())?;
        drop(chain);
        top.set_backing(None);
        let mut layer = b.layers[0].clone();
        layer.backing_name = None;
        layer.backing_format = None;
        layer.backing_path = None;
        *b = Backend::new(vec![layer])?;
        Ok(())
    }

    /// The export, its chain and the internal snapshots of each layer.
    pub fn info(&self) -> ExportInfo {
        let b = self.io();
        ExportInfo {
            name: self.name.clone(),
            size: self.size,
            read_only: self.read_only,
            chain: b
                .layers
                .iter()
                .map(|l| LayerInfo {
                    path: l.path.display().to_string(),
                    format: l.format.name().to_string(),
                    snapshots: strata_jobs::snapshot::list(l.device.as_ref())
                        .into_iter()
                        .map(|s| s.name)
                        .collect(),
                })
                .collect(),
        }
    }

    /// Flush and close every layer (errors are reported, the first one returned).
    pub fn close(&self) -> Result<()> {
        let b = self.exclusive();
        let mut first: Option<Error> = None;
        for l in &b.layers {
            if l.device.read_only() {
                continue;
            }
            if let Err(e) = l.device.close() {
                first.get_or_insert(e.into());
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Sort and merge overlapping or touching ranges.
fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (off, len) in v {
        if len == 0 {
            continue;
        }
        if let Some(last) = out.last_mut() {
            if off <= last.0 + last.1 {
                let end = (off + len).max(last.0 + last.1);
                last.1 = end - last.0;
                continue;
            }
        }
        out.push((off, len));
    }
    out
}

/// Copy the guest view of `src` over `[off, off+len)` into `dst`, zeroes as
/// zero writes, in 1 MiB pieces.
fn copy_view(src: &dyn BlockDevice, dst: &dyn BlockDevice, off: u64, len: u64) -> Result<()> {
    const PIECE: u64 = 1 << 20;
    let mut buf = vec![0u8; PIECE.min(len) as usize];
    let mut pos = off;
    let end = off + len;
    while pos < end {
        let n = (end - pos).min(PIECE);
        let b = &mut buf[..n as usize];
        src.read(b, pos)?;
        if b.iter().all(|&x| x == 0) {
            dst.write_zeroes(pos, n, false)?;
        } else {
            dst.write(b, pos)?;
        }
        pos += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::merge_ranges;

    #[test]
    fn merge_ranges_joins_overlapping_and_touching_ranges() {
        assert_eq!(
            merge_ranges(vec![(10, 5), (0, 4), (4, 2), (12, 10), (40, 0), (30, 1)]),
            vec![(0, 6), (10, 12), (30, 1)]
        );
    }
}
