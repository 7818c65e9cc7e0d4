//! Where the lines of an automatic repair go.
//!
//! A dirty image (a qcow2 one with lazy refcounts, a parallels one, not
//! closed cleanly) opened read-write is repaired before use, and QEMU prints
//! what the repair found and fixed on its standard error, the lines `check -r
//! all` prints ("ERROR cluster 5 refcount=0 reference=1", "Rebuilding
//! refcount structure", "Repairing image was not closed correctly", ...). The library
//! prints nothing itself: a program that mirrors QEMU's output installs a sink
//! once, and every automatic repair hands its lines to it. Without a sink the
//! lines are dropped.

use std::sync::OnceLock;

static SINK: OnceLock<fn(&str)> = OnceLock::new();

/// Send the lines of every later automatic repair to `sink`, one call per line.
/// Only the first sink installed in a process is kept.
pub fn on_auto_repair(sink: fn(&str)) {
    let _ = SINK.set(sink);
}

/// Hand the lines of an automatic repair to the sink, if one is installed.
pub(crate) fn report(lines: &[String]) {
    if let Some(sink) = SINK.get() {
        lines.iter().for_each(|l| sink(l));
    }
}
