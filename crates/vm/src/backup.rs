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
use crate::manager::{running_qmp, vm_file, Manager, OpenVm};
use crate::qemu;

/// The prefix of the dirty bitmaps strata keeps for backups.
pub const BITMAP_PREFIX: &str = "strata-backup-";

/// The prefix of the fleecing jobs and overlay nodes a backup adds to QEMU. Not
/// the prefix of the jobs recovery waits for: a fleecing job runs until
/// cancelled, and only the next backup removes one a killed backup left.
const FLEECE_PREFIX: &str = "backup-fleece-";
/// The prefix of the NBD exports a backup adds to QEMU.
const EXPORT_PREFIX: &str = "strata-export-";
/// The VM's subdirectory of the fleecing overlays and NBD sockets.
pub(crate) const WORK_DIR: &str = "backup";

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
pub(crate) struct BitmapInfo {
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
        crate::restore::not_restoring(&vm, "a backup of it")?;
        let qmp = running_qmp(&vm)?;
        let ndisks = vm.rec.def.disks.len();
        let d = vm.rec.def.disks.get(disk).ok_or_else(|| {
            Error::Invalid(format!("VM '{name}' has no disk {disk} (it has {ndisks})"))
        })?;
        clear_leftovers(&qmp, &vm.dir().join(WORK_DIR))?;
        let top = qemu::top_nodes(&qmp, ndisks)?.swap_remove(disk);
        let (size, bitmaps) = node_info(&qmp, &top)?;
        let qcow2 = d.format == "qcow2";
        let (changes, full_reason) = usable(&qmp, &top, since, &bitmaps);
        let bitmap = qcow2.then(|| format!("{BITMAP_PREFIX}{}", stamp()));
        let spec = PointSpec {
            top: &top,
            size,
            disk_file: &d.file,
            changes: changes.clone(),
            full_reason,
            bitmap: bitmap.clone(),
        };
        let (out, cleaned) = hold_point(&vm, &qmp, spec, read);
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

/// The disk a point is taken of (its top node in QEMU, virtual size and
/// file) and the bitmaps to switch in the point's transaction (see
/// [`BackupPoint`]; all `None` for a point that leaves bitmaps alone).
pub(crate) struct PointSpec<'a> {
    pub top: &'a str,
    pub size: u64,
    pub disk_file: &'a std::path::Path,
    pub changes: Option<String>,
    pub full_reason: Option<String>,
    pub bitmap: Option<String>,
}

/// Start a point of `disk` (a fleecing overlay, its job and its export, and
/// the bitmap changes in the same transaction), run `read` on it, and remove
/// it again, whatever part of it was made. Returns what `read` returned (or
/// why the point could not start) and whether the cleanup succeeded.
pub(crate) fn hold_point<T, E>(
    vm: &OpenVm,
    qmp: &Qmp,
    disk: PointSpec<'_>,
    read: impl FnOnce(&BackupPoint) -> std::result::Result<T, E>,
) -> (Result<std::result::Result<T, E>>, Result<()>) {
    let id = stamp();
    let fleece_file = match vm_file(vm, WORK_DIR, format!("{FLEECE_PREFIX}{id}.qcow2")) {
        Ok(f) => f,
        Err(e) => return (Err(e), Ok(())),
    };
    let socket = fleece_file.with_file_name(format!("nbd-{id}.sock"));
    let (fleece, job, export) = (
        format!("{FLEECE_PREFIX}{id}"),
        format!("{FLEECE_PREFIX}{id}"),
        format!("{EXPORT_PREFIX}{id}"),
    );
    if let Err(e) = create(&CreateRequest {
        path: fleece_file.clone(),
        format: Format::Qcow2,
        size: Some(disk.size),
        options: Default::default(),
        unsafe_backing: false,
    }) {
        let _ = std::fs::remove_file(&fleece_file);
        return (Err(e.into()), Ok(()));
    }
    let point = BackupPoint {
        socket: socket.clone(),
        export: export.clone(),
        size: disk.size,
        changes: disk.changes,
        full_reason: disk.full_reason,
        bitmap: disk.bitmap,
        disk_file: disk.disk_file.to_path_buf(),
    };
    let started = start_point(qmp, disk.top, &point, &fleece, &fleece_file, &job);
    if started.is_ok() {
        crate::snapshot::step(vm, "backup-point");
    }
    let out = started.map(|()| read(&point));
    let cleaned = stop_point(qmp, &fleece, &job, &export);
    let _ = std::fs::remove_file(&fleece_file);
    let _ = std::fs::remove_file(&socket);
    (out, cleaned)
}

/// The node's virtual size and dirty bitmaps.
pub(crate) fn node_info(qmp: &Qmp, node: &str) -> Result<(u64, Vec<BitmapInfo>)> {
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

/// The bitmap of changes since the previous backup, or why there is none. The
/// previous bitmap left frozen by a killed backup takes back the changes of the
/// bitmaps strata made since and records again. A bitmap strata made that
/// cannot serve (an unclean QEMU exit left it
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
    let ours = || bitmaps.iter().filter(|b| b.name.starts_with(BITMAP_PREFIX));
    // A backup killed after its point froze the previous bitmap and started a
    // new one: together they hold every change since the previous backup.
    let resumed = ours()
        .find(|b| Some(b.name.as_str()) == since && !b.recording && b.persistent && !b.inconsistent)
        .is_some_and(|old| {
            let others: Vec<&str> = ours()
                .filter(|b| b.name != old.name && !b.inconsistent)
                .map(|b| b.name.as_str())
                .collect();
            let actions = json!([
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": node, "target": old.name, "bitmaps": others}},
                {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": old.name}},
            ]);
            !others.is_empty()
                && qmp
                    .execute_value("transaction", Some(json!({ "actions": actions })))
                    .is_ok()
        });
    for b in ours() {
        let wanted = Some(b.name.as_str()) == since;
        if wanted && (b.recording || resumed) && b.persistent && !b.inconsistent {
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

/// Remove what a backup killed before its own cleanup left in QEMU (its
/// fleecing job would copy every guest write into an overlay nobody reads) and
/// in the VM's directory. No backup of this VM runs: the VM's lock is held.
pub(crate) fn clear_leftovers(qmp: &Qmp, work: &std::path::Path) -> Result<()> {
    let ids = |query: &str, args: Option<Value>, key: &str, prefix: &str| -> Result<Vec<String>> {
        let list = qmp.execute_value(query, args)?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.get(key)?.as_str())
            .filter(|id| id.starts_with(prefix))
            .map(str::to_string)
            .collect())
    };
    for export in ids("query-block-exports", None, "id", EXPORT_PREFIX)? {
        del_export(qmp, &export)?;
    }
    for job in ids("query-jobs", None, "id", FLEECE_PREFIX)? {
        cancel_job(qmp, &job)?;
    }
    let flat = Some(json!({"flat": true}));
    for node in ids("query-named-block-nodes", flat, "node-name", FLEECE_PREFIX)? {
        del_node(qmp, &node)?;
    }
    if let Ok(rd) = std::fs::read_dir(work) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// Remove what [`start_point`] made (whatever part of it exists), waiting for
/// QEMU to let go of each piece before the next.
fn stop_point(qmp: &Qmp, fleece: &str, job: &str, export: &str) -> Result<()> {
    del_export(qmp, export)?;
    cancel_job(qmp, job)?;
    del_node(qmp, fleece)
}

/// Close NBD export `id` (and QEMU's NBD server) and wait until it is gone.
fn del_export(qmp: &Qmp, id: &str) -> Result<()> {
    let _ = qmp.execute_value("block-export-del", Some(json!({"id": id, "mode": "hard"})));
    wait_gone(qmp, "query-block-exports", id)?;
    let _ = qmp.execute_value("nbd-server-stop", None);
    Ok(())
}

/// Cancel job `id` and wait until it is gone.
fn cancel_job(qmp: &Qmp, id: &str) -> Result<()> {
    let _ = qmp.execute_value("job-cancel", Some(json!({"id": id})));
    wait_gone(qmp, "query-jobs", id)
}

/// Close node `name`; a node that does not exist is no error.
fn del_node(qmp: &Qmp, name: &str) -> Result<()> {
    match qmp.execute_value("blockdev-del", Some(json!({"node-name": name}))) {
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
