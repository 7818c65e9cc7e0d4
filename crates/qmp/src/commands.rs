//! Typed QMP commands: each type holds a command's arguments and names its reply
//! type. Field names follow QEMU's schema (kebab-case on the wire). Commands not
//! listed here can be sent with `Qmp::execute_value`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::wire::{command, Empty};

/// Leave capabilities negotiation mode (sent by `Qmp::connect`).
#[derive(Debug, Clone, Serialize)]
pub struct QmpCapabilities {}
command!(QmpCapabilities, "qmp_capabilities", Empty);

/// The VM's run state.
#[derive(Debug, Clone, Serialize)]
pub struct QueryStatus {}
command!(QueryStatus, "query-status", StatusInfo);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    /// QEMU's RunState: `running`, `paused`, `postmigrate`, `inmigrate`,
    /// `shutdown`, `save-vm`, `restore-vm`, ...
    pub status: String,
}

/// Pause the guest's CPUs.
#[derive(Debug, Clone, Serialize)]
pub struct Stop {}
command!(Stop, "stop", Empty);

/// Resume the guest's CPUs.
#[derive(Debug, Clone, Serialize)]
pub struct Cont {}
command!(Cont, "cont", Empty);

/// End QEMU at once.
#[derive(Debug, Clone, Serialize)]
pub struct Quit {}
command!(Quit, "quit", Empty);

/// Press the ACPI power button.
#[derive(Debug, Clone, Serialize)]
pub struct SystemPowerdown {}
command!(SystemPowerdown, "system_powerdown", Empty);

/// The jobs QEMU knows (running or concluded but not dismissed).
#[derive(Debug, Clone, Serialize)]
pub struct QueryJobs {}
command!(QueryJobs, "query-jobs", Vec<JobInfo>);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub job_type: String,
    pub status: String,
    pub current_progress: u64,
    pub total_progress: u64,
    /// Set when the job concluded with an error.
    #[serde(default)]
    pub error: Option<String>,
}

/// Remove a concluded job.
#[derive(Debug, Clone, Serialize)]
pub struct JobDismiss {
    pub id: String,
}
command!(JobDismiss, "job-dismiss", Empty);

/// Ask a job in the ready state to complete (for mirror: pivot).
#[derive(Debug, Clone, Serialize)]
pub struct JobComplete {
    pub id: String,
}
command!(JobComplete, "job-complete", Empty);

/// Let a job waiting in the `pending` state (started with auto-finalize off)
/// make its changes to the graph and conclude.
#[derive(Debug, Clone, Serialize)]
pub struct JobFinalize {
    pub id: String,
}
command!(JobFinalize, "job-finalize", Empty);

/// Cancel a job.
#[derive(Debug, Clone, Serialize)]
pub struct JobCancel {
    pub id: String,
}
command!(JobCancel, "job-cancel", Empty);

/// Save an internal snapshot of the VM (a job): the disks of `devices` and the
/// machine state into `vmstate` (a qcow2 node also listed in `devices`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotSave {
    pub job_id: String,
    pub tag: String,
    pub vmstate: String,
    pub devices: Vec<String>,
}
command!(SnapshotSave, "snapshot-save", Empty);

/// Load an internal snapshot (a job); the arguments mean what they mean for save.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotLoad {
    pub job_id: String,
    pub tag: String,
    pub vmstate: String,
    pub devices: Vec<String>,
}
command!(SnapshotLoad, "snapshot-load", Empty);

/// Delete an internal snapshot from `devices` (a job).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotDelete {
    pub job_id: String,
    pub tag: String,
    pub devices: Vec<String>,
}
command!(SnapshotDelete, "snapshot-delete", Empty);

/// Add a block node; the options are QEMU's BlockdevOptions as JSON.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct BlockdevAdd(pub Value);
command!(BlockdevAdd, "blockdev-add", Empty);

/// Remove a block node nothing uses any more.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    pub node_name: String,
}
command!(BlockdevDel, "blockdev-del", Empty);

/// Apply several actions atomically (all or none): each action is
/// `{"type": "blockdev-snapshot", "data": {...}}` and the like.
#[derive(Debug, Clone, Serialize)]
pub struct Transaction {
    pub actions: Vec<Value>,
}
command!(Transaction, "transaction", Empty);

/// The block jobs running.
#[derive(Debug, Clone, Serialize)]
pub struct QueryBlockJobs {}
command!(QueryBlockJobs, "query-block-jobs", Vec<BlockJobInfo>);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobInfo {
    #[serde(rename = "type")]
    pub job_type: String,
    pub device: String,
    pub len: u64,
    pub offset: u64,
    pub ready: bool,
    pub status: String,
}

/// Start an outgoing migration, e.g. to `file:PATH` to save memory.
#[derive(Debug, Clone, Serialize)]
pub struct Migrate {
    pub uri: String,
}
command!(Migrate, "migrate", Empty);

/// Start an incoming migration in a QEMU started with `-incoming defer`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateIncoming {
    pub uri: String,
}
command!(MigrateIncoming, "migrate-incoming", Empty);

/// Turn migration capabilities on or off (they last for the process's life).
/// `MIGRATION` status events are sent only while the `events` capability is on.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetCapabilities {
    pub capabilities: Vec<MigrationCapability>,
}
command!(MigrateSetCapabilities, "migrate-set-capabilities", Empty);

/// Change migration parameters (they last for the process's life); a field
/// left `None` keeps its value.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrateSetParameters {
    /// The outgoing migration's speed limit, bytes per second (QEMU's default
    /// is 128 MiB/s).
    #[serde(rename = "max-bandwidth", skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
}
command!(MigrateSetParameters, "migrate-set-parameters", Empty);

#[derive(Debug, Clone, Serialize)]
pub struct MigrationCapability {
    pub capability: String,
    pub state: bool,
}

/// The state of the current or last migration.
#[derive(Debug, Clone, Serialize)]
pub struct QueryMigrate {}
command!(QueryMigrate, "query-migrate", MigrationInfo);

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// `setup`, `active`, `completed`, `failed`, ...; absent before any migration.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub error_desc: Option<String>,
    /// RAM transfer counters; absent before the migration reaches `active`.
    #[serde(default)]
    pub ram: Option<MigrationRam>,
}

/// The RAM part of [`MigrationInfo`]: pages written to the stream so far.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MigrationRam {
    /// Pages written with their content.
    #[serde(default)]
    pub normal: u64,
    /// Zero pages written as such (QEMU calls them duplicate).
    #[serde(default)]
    pub duplicate: u64,
}

/// The character devices and whether their front ends are open (for a
/// virtio-serial port: whether a guest program has the port open).
#[derive(Debug, Clone, Serialize)]
pub struct QueryChardev {}
command!(QueryChardev, "query-chardev", Vec<ChardevInfo>);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChardevInfo {
    pub label: String,
    pub filename: String,
    pub frontend_open: bool,
}

/// Create an image through a block driver (a job; dismiss it when concluded):
/// `options` are QEMU's BlockdevCreateOptions, e.g. `{"driver": "file",
/// "filename": ..., "size": 0}` or `{"driver": "qcow2", "file": NODE, "size": ...}`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevCreate {
    pub job_id: String,
    pub options: Value,
}
command!(BlockdevCreate, "blockdev-create", Empty);

/// Merge the data of `top_node` (default: the active layer of `device`) down into
/// `base_node` (default: the bottom of the chain). Committing the active layer
/// becomes ready (`BLOCK_JOB_READY`) and completes on `job-complete`. Set
/// `auto_dismiss: Some(false)` to read the outcome with `Qmp::finish_job`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockCommit {
    pub job_id: String,
    pub device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
}
command!(BlockCommit, "block-commit", Empty);

/// Copy the data of the backing chain (down to `base_node`, default all) into
/// `device`'s node. With `auto_finalize: Some(false)` the job waits in the
/// `pending` state, before it changes the node's backing link, for `job-finalize`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStream {
    pub job_id: String,
    pub device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_finalize: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
}
command!(BlockStream, "block-stream", Empty);

/// Mirror `device` to the node `target` (`sync`: `full`, `top` or `none`);
/// ready when in sync, `job-complete` pivots the guest to the target.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevMirror {
    pub job_id: String,
    pub device: String,
    pub target: String,
    pub sync: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
}
command!(BlockdevMirror, "blockdev-mirror", Empty);

/// The `transaction` action that puts the already added node `overlay` (opened
/// with `"backing": null`) on top of `node`.
pub fn blockdev_snapshot_action(node: &str, overlay: &str) -> Value {
    serde_json::json!({
        "type": "blockdev-snapshot",
        "data": { "node": node, "overlay": overlay },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{arguments, Command};

    fn args<C: Command>(c: &C) -> Option<Value> {
        arguments("test", c).unwrap()
    }

    #[test]
    fn arguments_use_qemus_member_names_and_omit_unset_options() {
        assert_eq!(args(&QueryStatus {}), None, "no arguments member at all");
        assert_eq!(
            args(&BlockStream {
                job_id: "s".into(),
                device: "top".into(),
                base_node: Some("base".into()),
                auto_finalize: None,
                auto_dismiss: None,
            }),
            Some(serde_json::json!({"job-id": "s", "device": "top", "base-node": "base"}))
        );
        assert_eq!(
            args(&BlockdevMirror {
                job_id: "m".into(),
                device: "disk0".into(),
                target: "copy".into(),
                sync: "full".into(),
                auto_dismiss: Some(false),
            }),
            Some(
                serde_json::json!({"job-id": "m", "device": "disk0", "target": "copy",
                                    "sync": "full", "auto-dismiss": false})
            )
        );
        assert_eq!(
            args(&BlockdevDel {
                node_name: "n".into()
            }),
            Some(serde_json::json!({"node-name": "n"}))
        );
        assert_eq!(
            args(&BlockdevAdd(
                serde_json::json!({"driver": "null-co", "node-name": "x"})
            )),
            Some(serde_json::json!({"driver": "null-co", "node-name": "x"}))
        );
        assert_eq!(
            args(&MigrateSetParameters {
                max_bandwidth: Some(1 << 40)
            }),
            Some(serde_json::json!({"max-bandwidth": 1u64 << 40}))
        );
        assert_eq!(args(&MigrateSetParameters::default()), None);
        assert_eq!(
            blockdev_snapshot_action("disk0", "ov"),
            serde_json::json!({"type": "blockdev-snapshot", "data": {"node": "disk0", "overlay": "ov"}})
        );
    }
}
