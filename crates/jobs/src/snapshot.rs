//! Internal snapshots: create, apply (revert to), delete and list, defined once for
//! every interface (`strata img snapshot`, the NBD control socket, the VM manager
//! and the HTTP API). Requests are plain data; the device is the caller's open
//! image (the top of its chain).
//!
//! One set of rules:
//! - the device must offer [`InternalSnapshots`](strata_format::InternalSnapshots)
//!   (qcow2), else [`Error::NoInternalSnapshots`];
//! - a snapshot is taken after the device is flushed, so it holds every write
//!   completed before the call;
//! - it records the date, a VM clock of zero and an instruction count of zero, as
//!   `qemu-img snapshot -c` records them;
//! - apply and delete find the snapshot by ID, then by name, and refuse an unknown
//!   one with [`Error::SnapshotNotFound`] before writing anything;
//! - names follow the request's [`NameRule`].

use crate::info::SnapshotInfo;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use strata_format::qcow2::SnapshotSpec;
use strata_format::{BlockDevice, InternalSnapshots};

/// Which snapshot names a create accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NameRule {
    /// A non-empty name no snapshot of the image has yet: interfaces that name
    /// snapshots only by name (the NBD control socket, the VM manager, the API)
    /// need that to find them again.
    #[default]
    Unique,
    /// Any name, empty and repeated ones included, as `qemu-img snapshot -c`
    /// accepts them (snapshots are then told apart by their IDs).
    Any,
}

/// Take an internal snapshot of the current disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRequest {
    pub name: String,
    #[serde(default)]
    pub names: NameRule,
}

/// Revert the disk to a snapshot; the current state is lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// The snapshot's ID or name.
    pub snapshot: String,
}

/// Delete a snapshot, freeing what only it used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRequest {
    /// The snapshot's ID or name.
    pub snapshot: String,
}

fn snapshots_of(image: &dyn BlockDevice) -> Result<&dyn InternalSnapshots> {
    image
        .internal_snapshots()
        .ok_or(Error::NoInternalSnapshots {
            format: image.format_name(),
        })
}

/// Whether `key` names a snapshot (by ID or by name).
fn known(snaps: &dyn InternalSnapshots, key: &str) -> bool {
    snaps.list().iter().any(|s| s.id == key || s.name == key)
}

/// The snapshots of `image`, in table order (none for a format without them).
pub fn list(image: &dyn BlockDevice) -> Vec<SnapshotInfo> {
    image
        .internal_snapshots()
        .map(|s| s.list().iter().map(SnapshotInfo::from).collect())
        .unwrap_or_default()
}

/// Create the snapshot `req` asks for (see the module's rules); returns it.
pub fn create(image: &dyn BlockDevice, req: &CreateRequest) -> Result<SnapshotInfo> {
    let snaps = snapshots_of(image)?;
    if req.names == NameRule::Unique {
        if req.name.is_empty() {
            return Err(Error::SnapshotNameEmpty);
        }
        if snaps.list().iter().any(|s| s.name == req.name) {
            return Err(Error::SnapshotNameTaken(req.name.clone()));
        }
    }
    image.flush()?;
    let made = snaps.create(&SnapshotSpec {
        name: req.name.clone(),
        icount: Some(0),
        ..Default::default()
    })?;
    Ok(SnapshotInfo::from(&made))
}

/// Revert `image` to the snapshot `req` names.
pub fn apply(image: &dyn BlockDevice, req: &ApplyRequest) -> Result<()> {
    let snaps = snapshots_of(image)?;
    if !known(snaps, &req.snapshot) {
        return Err(Error::SnapshotNotFound(req.snapshot.clone()));
    }
    Ok(snaps.apply(&req.snapshot)?)
}

/// Delete the snapshot `req` names; returns what it was.
pub fn delete(image: &dyn BlockDevice, req: &DeleteRequest) -> Result<SnapshotInfo> {
    let snaps = snapshots_of(image)?;
    if !known(snaps, &req.snapshot) {
        return Err(Error::SnapshotNotFound(req.snapshot.clone()));
    }
    Ok(SnapshotInfo::from(&snaps.delete(&req.snapshot)?))
}

/// How a reader names the snapshot it reads, as qemu-img's `-l` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotKey {
    /// The snapshot with this ID, else the first with this name (`-l NAME`).
    IdOrName(String),
    /// The snapshot whose ID and name are the ones given; a part not given
    /// matches any (`-l snapshot.id=ID,snapshot.name=NAME`). An ID is never
    /// taken for a name here, nor a name for an ID.
    Exact {
        id: Option<String>,
        name: Option<String>,
    },
}

/// The chain `layers` (top first, each attached to the next) as it was at the top's
/// snapshot `key` (an ID or a name): see [`view_chain_at`].
pub fn view_chain(layers: &[Arc<dyn BlockDevice>], key: &str) -> Result<Vec<Arc<dyn BlockDevice>>> {
    view_chain_at(layers, &SnapshotKey::IdOrName(key.to_string()))
}

/// The chain `layers` (top first, each attached to the next) as it was at the
/// top's snapshot `key`: the snapshot's read-only view on top, reading through
/// the top's backing chain, then the backing layers. For reading a snapshot as
/// a disk (`convert -l`, `measure -l`). An exact key that names no snapshot
/// is [`Error::SnapshotNotFound`]; an ID or name, the format's own refusal.
pub fn view_chain_at(
    layers: &[Arc<dyn BlockDevice>],
    key: &SnapshotKey,
) -> Result<Vec<Arc<dyn BlockDevice>>> {
    let top = layers
        .first()
        .ok_or_else(|| Error::Invalid("an empty chain has no snapshots".into()))?;
    let snaps = snapshots_of(top.as_ref())?;
    let key = match key {
        SnapshotKey::IdOrName(k) => k.clone(),
        SnapshotKey::Exact { id, name } => {
            let matches = |s: &&strata_format::qcow2::Snapshot| {
                (id.is_some() || name.is_some())
                    && id.as_ref().is_none_or(|i| &s.id == i)
                    && name.as_ref().is_none_or(|n| &s.name == n)
            };
            let shown = || id.clone().or_else(|| name.clone()).unwrap_or_default();
            // IDs are unique: the one found is named by it.
            snaps
                .list()
                .iter()
                .find(matches)
                .map(|s| s.id.clone())
                .ok_or_else(|| Error::SnapshotNotFound(shown()))?
        }
    };
    let view = snaps.view(&key)?;
    view.set_backing(top.backing());
    let mut out = vec![view];
    out.extend(layers[1..].iter().cloned());
    Ok(out)
}
