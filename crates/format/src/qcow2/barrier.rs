//! Named metadata barriers, and (for the crash sweeps only) a way to remove one.
//!
//! Every flush that orders two metadata writes is a barrier. The crash sweeps prove
//! the order holds by crashing between them with unflushed writes lost; to show
//! those sweeps would notice a missing barrier, a test built with the
//! `crash-hooks` feature removes one named barrier on its own thread with
//! [`skip`] and expects the sweep to fail. Without the feature nothing is removable.

/// A flush between two metadata writes that must reach the disk in order.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Barrier {
    /// Refcount blocks raised for new clusters, and data written for new
    /// mappings, are durable before the L2 tables that point at them are written.
    RefcountsBeforeL2,
    /// A new L2 table is durable before the L1 entry that points at it.
    L2BeforeL1,
    /// A snapshot's raised refcounts, and its L2 tables' COPIED flags made to
    /// agree with them, are durable before the active L1 table is switched to the
    /// snapshot's tables (apply).
    SnapshotRefcountsBeforeL1,
}

#[cfg(feature = "crash-hooks")]
thread_local! {
    static SKIPPED: std::cell::Cell<Option<Barrier>> = const { std::cell::Cell::new(None) };
}

/// Make `barrier` a no-op for the operations this thread runs from now on (`None`
/// restores every barrier). For the crash sweeps' own tests only.
#[cfg(feature = "crash-hooks")]
#[doc(hidden)]
pub fn skip(barrier: Option<Barrier>) {
    SKIPPED.with(|s| s.set(barrier));
}

/// Whether a test removed `barrier` on this thread.
pub(crate) fn skipped(barrier: Barrier) -> bool {
    #[cfg(feature = "crash-hooks")]
    {
        SKIPPED.with(|s| s.get() == Some(barrier))
    }
    #[cfg(not(feature = "crash-hooks"))]
    {
        let _ = barrier;
        false
    }
}
