//! A consistent point in time of a running VM's disk, for backups. One QMP
//! `transaction` starts a fleecing `blockdev-backup` (sync `none`: QEMU copies
//! the old data of every cluster the guest overwrites into a temporary qcow2
//! overlay whose backing is the live disk, so the overlay shows the disk as it
//! was) and, atomically with it, starts a new persistent dirty bitmap and
//! freezes the previous backup's one. QEMU exports the overlay read-only over
//! NBD on a Unix socket in the VM's directory, with the frozen bitmap as the
//! `qemu:dirty-bitmap:NAME` context: the clusters changed between the previous
//! backup's point and this one.
//!
//! Bitmaps are persistent (stored in the qcow2 file when QEMU shuts down), so
//! they survive a restart of the VM. A backup that fails hands the changes back
//! to the previous bitmap, so the next incremental still sees them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_format::Format;
use strata_jobs::create::{create, CreateRequest};
use strata_qmp::Qmp;

use crate::error::{Error, Result};
use crate::live::stamp;
use crate::manager::{running_qmp, vm_file, Manager};
use crate::qemu;

/// The prefix of the dirty bitmaps strata keeps for backups.
pub const BITMAP_PREFIX: &str = "strata-backup-";

/// Time allowed for QEMU to let go of the export and the fleecing job.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The point in time a backup reads.
#[derive(Debug, Clone)]
pub struct BackupPoint {
    /// QEMU's NBD server socket.
    pub socket: PathBuf,
    /// The export showing the disk at the point.
    pub export: String,
    /// The disk's virtual size.
    pub size: u64,
    /// The frozen bitmap of the changes since the previous backup (exported as
    /// `qemu:dirty-bitmap:NAME`); `None`: everything must be read.
    pub changes: Option<String>,
    /// Why there is no usable bitmap of changes, when there is none.
    pub full_reason: Option<String>,
    /// The bitmap recording the changes from this point on, for the next
    /// incremental (`None` for a disk that cannot keep one: not qcow2).
    pub bitmap: Option<String>,
    /// The disk's image file.
    pub disk_file: PathBuf,
}

/// One dirty bitmap as QEMU reports it.
struct BitmapInfo {
    name: String,
    recording: bool,
    persistent: bool,
    inconsistent: bool,
}

impl Manager {
    /// Take a point in time of disk `disk` (0-based) of running VM `name` and run
    /// `read` on it, under the VM's lock; `since` names the bitmap the previous
    /// backup started. When `read` succeeds the frozen bitmap is removed (the new
    /// one holds what changes next); when it fails, the new bitmap is merged back
    /// into the previous one, which records again. The fleecing overlay, the
    /// export and the job are removed either way.
    pub fn backup_point<T, E>(
        &self,
        name: &str,
        disk: usize,
        since: Option<&str>,
        read: impl FnOnce(&BackupPoint) -> std::result::Result<T, E>,
    ) -> Result<std::result::Result<T, E>> {
        let vm = self.open(name)?;
        let qmp = running_qmp(&vm)?;
        let ndisks = vm.rec.def.disks.len();
        let d = vm.rec.def.disks.get(disk).ok_or_else(|| {
            Error::Invalid(format!("VM '{name}' has no disk {disk} (it has {ndisks})"))
        })?;
        let top = qemu::top_nodes(&qmp, ndisks)?.swap_remove(disk);
        let (size, bitmaps) = node_info(&qmp, &top)?;
        let qcow2 = d.format == "qcow2";
        let (changes, full_reason) = usable(&qmp, &top, since, &bitmaps);
        let id = stamp();
        let bitmap = qcow2.then(|| format!("{BITMAP_PREFIX}{id}"));
        let fleece_file = vm_file(&vm, "backup", format!("fleece-{id}.qcow2"))?;
        let socket = vm_file(&vm, "backup", format!("nbd-{id}.sock"))?;
        let (fleece, job, export) = (
            format!("fleece-{id}"),
            format!("fleece-{id}"),
            format!("backup-{id}"),
        );
        create(&CreateRequest {
            path: fleece_file.clone(),
            format: Format::Qcow2,
            size: Some(size),
            options: Default::default(),
            unsafe_backing: false,
        })?;
        let point = BackupPoint {
            socket: socket.clone(),
            export: export.clone(),
            size,
            changes: changes.clone(),
            full_reason,
            bitmap: bitmap.clone(),
            disk_file: d.file.clone(),
        };
        let started = start_point(&qmp, &top, &point, &fleece, &fleece_file, &job);
        let out = started.map(|()| read(&point));
        let cleaned = stop_point(&qmp, &fleece, &job, &export);
        let _ = std::fs::remove_file(&fleece_file);
        let _ = std::fs::remove_file(&socket);
        let read_ok = matches!(out, Ok(Ok(_)));
        match (&changes, &bitmap) {
            (Some(old), _) if read_ok => {
                qmp.execute_value(
                    "block-dirty-bitmap-remove",
                    Some(json!({"node": top, "name": old})),
                )?;
            }
            (Some(old), Some(new)) => {
                // Hand the changes since this point back to the previous
                // bitmap. When the point's transaction never ran, `new` does
                // not exist and this transaction changes nothing; when this
                // fails, the next backup finds the previous bitmap not
                // recording and reads everything.
                let node = &top;
                let _ = qmp.execute_value(
                    "transaction",
                    Some(json!({"actions": [
                        {"type": "block-dirty-bitmap-merge",
                         "data": {"node": node, "target": old, "bitmaps": [new]}},
                        {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": old}},
                        {"type": "block-dirty-bitmap-remove", "data": {"node": node, "name": new}},
                    ]})),
                );
            }
            _ => {}
        }
        let out = out?;
        cleaned?;
        Ok(out)
    }
}

/// The node's virtual size and dirty bitmaps.
fn node_info(qmp: &Qmp, node: &str) -> Result<(u64, Vec<BitmapInfo>)> {
    let nodes = qmp.execute_value("query-named-block-nodes", Some(json!({"flat": true})))?;
    let n = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node))
        .ok_or_else(|| Error::Qemu(format!("QEMU has no node '{node}'")))?;
    let size = n
        .pointer("/image/virtual-size")
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::Qemu(format!("QEMU reports no size for node '{node}'")))?;
    let flag = |b: &Value, k: &str| b.get(k).and_then(Value::as_bool).unwrap_or(false);
    let bitmaps = n
        .get("dirty-bitmaps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|b| {
            Some(BitmapInfo {
                name: b.get("name")?.as_str()?.to_string(),
                recording: flag(b, "recording"),
                persistent: flag(b, "persistent"),
                inconsistent: flag(b, "inconsistent"),
            })
        })
        .collect();
    Ok((size, bitmaps))
}

/// The bitmap of changes since the previous backup, or why there is none. A
/// bitmap strata made that cannot serve (an unclean QEMU exit left it
/// inconsistent, it stopped recording, or it belongs to no known backup) is
/// removed, so only the new one records.
fn usable(
    qmp: &Qmp,
    node: &str,
    since: Option<&str>,
    bitmaps: &[BitmapInfo],
) -> (Option<String>, Option<String>) {
    let mut reason = None;
    let mut found = None;
    for b in bitmaps.iter().filter(|b| b.name.starts_with(BITMAP_PREFIX)) {
        let wanted = Some(b.name.as_str()) == since;
        if wanted && b.recording && b.persistent && !b.inconsistent {
            found = Some(b.name.clone());
            continue;
        }
        if wanted {
            reason = Some(format!(
                "the dirty bitmap '{}' of the previous backup is {}",
                b.name,
                if b.inconsistent {
                    "inconsistent (QEMU did not shut down cleanly)"
                } else {
                    "not recording"
                }
            ));
        }
        let _ = qmp.execute_value(
            "block-dirty-bitmap-remove",
            Some(json!({"node": node, "name": b.name})),
        );
    }
    if found.is_some() {
        return (found, None);
    }
    let reason = reason.unwrap_or_else(|| match since {
        Some(s) => {
            format!(
                "the dirty bitmap '{s}' of the previous backup is missing from the disk \
             (removed, or QEMU ended without storing it)"
            )
        }
        None => "there is no previous backup of this disk with a dirty bitmap".to_string(),
    });
    (None, Some(reason))
}

/// Open the fleecing overlay on `top`, start the backup job and the bitmaps in
/// one transaction, and export the overlay.
fn start_point(
    qmp: &Qmp,
    top: &str,
    p: &BackupPoint,
    fleece: &str,
    fleece_file: &std::path::Path,
    job: &str,
) -> Result<()> {
    qmp.execute_value(
        "blockdev-add",
        Some(json!({
            "driver": "qcow2", "node-name": fleece, "read-only": false,
            "file": {"driver": "file", "filename": fleece_file},
            "backing": top,
        })),
    )?;
    let mut actions = vec![json!({"type": "blockdev-backup", "data": {
        "job-id": job, "device": top, "target": fleece, "sync": "none",
    }})];
    if let Some(new) = &p.bitmap {
        actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
            "node": top, "name": new, "persistent": true,
        }}));
    }
    if let Some(old) = &p.changes {
        actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {
            "node": top, "name": old,
        }}));
    }
    qmp.execute_value("transaction", Some(json!({ "actions": actions })))?;
    let _ = qmp.execute_value("nbd-server-stop", None);
    qmp.execute_value(
        "nbd-server-start",
        Some(json!({"addr": {"type": "unix", "data": {"path": p.socket}}})),
    )?;
    let mut export = json!({
        "type": "nbd", "id": p.export, "node-name": fleece,
        "name": p.export, "writable": false,
    });
    if let Some(old) = &p.changes {
        export["bitmaps"] = json!([old]);
    }
    qmp.execute_value("block-export-add", Some(export))?;
    Ok(())
}

/// Remove what [`start_point`] made (whatever part of it exists), waiting for
/// QEMU to let go of each piece before the next.
fn stop_point(qmp: &Qmp, fleece: &str, job: &str, export: &str) -> Result<()> {
    let _ = qmp.execute_value(
        "block-export-del",
        Some(json!({"id": export, "mode": "hard"})),
    );
    wait_gone(qmp, "query-block-exports", export)?;
    let _ = qmp.execute_value("nbd-server-stop", None);
    let _ = qmp.execute_value("job-cancel", Some(json!({"id": job})));
    wait_gone(qmp, "query-jobs", job)?;
    match qmp.execute_value("blockdev-del", Some(json!({"node-name": fleece}))) {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("Failed to find node") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Wait until the list QMP command `query` returns names no entry `id`.
fn wait_gone(qmp: &Qmp, query: &str, id: &str) -> Result<()> {
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    loop {
        let list = qmp.execute_value(query, None)?;
        let listed = list
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e.get("id").and_then(Value::as_str) == Some(id));
        if !listed {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Qemu(format!(
                "QEMU still lists '{id}' in {query} after {CLEANUP_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
