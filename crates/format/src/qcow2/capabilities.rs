//! The [`BlockDevice`](crate::BlockDevice) capabilities a qcow2 image offers:
//! internal snapshots and the overlay operations (backing link, emptying).

use super::image::Qcow2Image;
use super::snapshot::Snapshot;
use super::snapshot_ops::SnapshotSpec;
use crate::{BlockDevice, InternalSnapshots, Overlay, Result};
use std::ffi::{OsStr, OsString};
use std::sync::Arc;

impl InternalSnapshots for Qcow2Image {
    fn list(&self) -> Vec<Snapshot> {
        self.snapshots()
    }
    fn create(&self, spec: &SnapshotSpec) -> Result<Snapshot> {
        self.snapshot_create(spec)
    }
    fn apply(&self, key: &str) -> Result<()> {
        self.snapshot_apply(key)
    }
    fn delete(&self, key: &str) -> Result<Snapshot> {
        self.snapshot_delete(key)
    }
    fn view(&self, key: &str) -> Result<Arc<dyn BlockDevice>> {
        Ok(Arc::new(self.snapshot_view(key)?))
    }
}

impl Overlay for Qcow2Image {
    fn backing_name(&self) -> Option<OsString> {
        self.header().backing_file
    }
    fn backing_format(&self) -> Option<String> {
        self.header().backing_format
    }
    fn set_backing_file(&self, name: Option<&OsStr>, format: Option<&str>) -> Result<()> {
        Qcow2Image::set_backing_file(self, name, format)
    }
    fn make_empty(&self) -> Result<()> {
        Qcow2Image::make_empty(self)
    }
}
