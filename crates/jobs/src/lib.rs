//! Jobs: operations on images, each defined once and served to both the CLI and the
//! API. A job that moves data first builds a plan, then applies it with progress
//! ([`Progress`]) and cancellation ([`Cancel`]).

pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod create_encrypt;
pub mod flatten;
pub mod info;
pub mod info_encrypt;
pub mod layers;
pub mod map;
pub mod measure;
pub mod output;
pub mod overlay;
pub mod rebase;
pub mod size;
pub mod snapshot;
pub mod status;
pub mod stream;

use std::sync::atomic::{AtomicBool, Ordering};

/// Serde for an optional image format, as its name ("qcow2", "raw").
mod format_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use strata_format::Format;

    pub fn serialize<S: Serializer>(f: &Option<Format>, s: S) -> Result<S::Ok, S::Error> {
        match f {
            Some(f) => s.serialize_some(f.name()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Format>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|n| n.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Errors from jobs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Chain(#[from] strata_chain::Error),
    #[error(transparent)]
    Format(#[from] strata_format::Error),
    #[error(transparent)]
    Storage(#[from] strata_storage::Error),
    /// The request cannot be carried out as given; the message says why and what to do.
    #[error("{0}")]
    Invalid(String),
    #[error("Operation cancelled")]
    Cancelled,
    /// The image's format keeps no internal snapshots.
    #[error("a {format} image has no internal snapshots")]
    NoInternalSnapshots { format: &'static str },
    /// No snapshot has this ID or name.
    #[error("no snapshot '{0}'")]
    SnapshotNotFound(String),
    /// A snapshot of the image already has this name (see `snapshot::NameRule`).
    #[error("a snapshot named '{0}' already exists")]
    SnapshotNameTaken(String),
    /// The image has no backing file to commit into or stream from.
    #[error("Image does not have a backing file")]
    NoBackingFile,
    /// `what` names no layer of `image`'s backing chain (or not one the operation
    /// can use there).
    #[error("Did not find '{what}' in the backing chain of '{}'", .image.display())]
    NotInChain {
        what: String,
        image: std::path::PathBuf,
    },
    /// An empty snapshot name where names must identify snapshots.
    #[error("a snapshot needs a name")]
    SnapshotNameEmpty,
    /// The image's format has no way to drop its data (raw), so it cannot be
    /// emptied after a commit.
    #[error("A {0} image cannot be emptied")]
    CannotEmpty(&'static str),
    /// `create` was asked for an image whose backing file is the image itself
    /// (by name or by identity); refused before anything is written.
    #[error("{}: Error: Trying to create an image with the same filename as the backing file", .0.display())]
    BackingIsItself(std::path::PathBuf),
    /// The output is a file of its own backing chain, `depth` levels down: worded
    /// as QEMU's locks refuse to open such an image.
    #[error("Could not open '{}': {}", .path.display(), output::shared_write_refusal(.path, *.depth))]
    OutputBelowItself {
        path: std::path::PathBuf,
        depth: usize,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The kind of failure, for callers to match on.
    pub fn kind(&self) -> strata_format::ErrorKind {
        use strata_format::ErrorKind as K;
        match self {
            Error::Chain(e) => e.kind(),
            Error::Format(e) => e.kind(),
            Error::Storage(e) => e.kind(),
            Error::Invalid(_) | Error::BackingIsItself(_) => K::InvalidArgument,
            Error::Cancelled => K::Cancelled,
            Error::CannotEmpty(_) | Error::NoInternalSnapshots { .. } => K::Unsupported,
            Error::SnapshotNotFound(_) | Error::NotInChain { .. } => K::NotFound,
            Error::SnapshotNameTaken(_) | Error::SnapshotNameEmpty => K::InvalidArgument,
            Error::NoBackingFile => K::InvalidArgument,
            // Refused as the lock protocol would refuse it.
            Error::OutputBelowItself { .. } => K::Locked,
        }
    }

    /// The chain error behind this one, if opening a chain failed.
    pub fn chain_error(&self) -> Option<&strata_chain::Error> {
        match self {
            Error::Chain(e) => Some(e),
            _ => None,
        }
    }
}

/// Receives progress of a long job. Implementations must be cheap and thread-safe.
pub trait Progress: Sync {
    /// The amount of work in bytes (may be called again if the estimate changes).
    fn set_total(&self, total: u64);
    /// `n` more bytes are done.
    fn advance(&self, n: u64);
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_total(&self, _total: u64) {}
    fn advance(&self, _n: u64) {}
}

/// A cancellation flag a job polls between units of work.
#[derive(Debug, Default)]
pub struct Cancel(AtomicBool);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// `Err(Cancelled)` once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}
