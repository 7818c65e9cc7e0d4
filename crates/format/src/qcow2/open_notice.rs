//! Where the warnings of opening an image go.
//!
//! QEMU's qcow2 driver warns on its standard error when it opens an image
//! whose persistent bitmaps a program without bitmap support may have
//! changed (a bitmaps extension with the autoclear bit clear, always so in a
//! version 2 header, which has no autoclear field). The library prints
//! nothing itself: a program that mirrors QEMU's output installs a sink once,
//! and every such open hands it the warning. Without a sink it is dropped.

use std::sync::OnceLock;

/// A warning of an open: the text QEMU gives its `warning:` line, and what it
/// prints after that line as it is (no line end of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenWarning {
    pub warning: &'static str,
    pub trailer: &'static str,
}

static SINK: OnceLock<fn(&OpenWarning)> = OnceLock::new();

/// Send the warnings of every later open to `sink`. Only the first sink
/// installed in a process is kept.
pub fn on_open_warning(sink: fn(&OpenWarning)) {
    let _ = SINK.set(sink);
}

/// Hand a warning to the sink, if one is installed.
pub(crate) fn report(w: &OpenWarning) {
    if let Some(sink) = SINK.get() {
        sink(w);
    }
}

/// The bitmaps of a version 2 image, whose header cannot say whether a
/// program without bitmap support changed them.
pub(crate) const STALE_BITMAPS_V2: OpenWarning = OpenWarning {
    warning: "This qcow2 v2 image contains bitmaps, but they may have been modified by a \
              program without persistent bitmap support; so now they must all be considered \
              inconsistent",
    trailer: LEAK_HINT,
};

/// The bitmaps of a version 3 image whose autoclear bit a program without
/// bitmap support cleared.
pub(crate) const STALE_BITMAPS: OpenWarning = OpenWarning {
    warning: "a program lacking bitmap support modified this file, so all bitmaps are now \
              considered inconsistent",
    trailer: LEAK_HINT,
};

const LEAK_HINT: &str =
    "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.";
