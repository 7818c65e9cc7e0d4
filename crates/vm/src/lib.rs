//! strata's VM manager: QEMU guests defined in a state directory, started
//! detached, driven over their own QMP and guest-agent sockets (no daemon), with
//! a snapshot tree of internal and external snapshots, with or without memory.
//!
//! - [`state`]: the state directory, names, atomic writes, the per-VM lock;
//! - [`record`]: the VM definition and snapshot tree;
//! - [`qemu`]: QEMU's command line, detached start, QMP queries;
//! - [`manager`]: lifecycle (define, start, stop, kill, list, status, exec);
//! - [`snapshot`]: snapshot create, revert and delete;
//! - `memory`: guest memory to and from files, and memory snapshots with a short pause;
//! - `saved`: save a running VM's memory to a file and resume from it;
//! - [`backup`]: a consistent point of a running disk for backups, with dirty bitmaps;
//! - [`image_source`]: a disk read for an image, at a snapshot or live;
//! - [`blockjob`]: live commit, pull and copy of a running VM's disk;
//! - [`restore`]: instant restore, a VM running on a backup while it streams home;
//! - `engine`: the same on image files with strata's own engine;
//! - `live`: the same on a running VM's block graph, through QMP;
//! - `recover`: finishing or undoing an interrupted operation.

pub mod backup;
pub mod blockjob;
mod engine;
mod error;
pub mod image_source;
mod live;
pub mod manager;
mod memory;
pub mod qemu;
pub mod record;
mod recover;
pub mod restore;
mod saved;
pub mod snapshot;
pub mod state;

pub use error::{Error, Result};
pub use manager::{Manager, Status};
pub use record::{Disk, Kind, Snapshot, SnapshotInfo, VmDef, VmRecord};
pub use snapshot::{CreateOptions, DeleteOptions};
pub use state::StateDir;
