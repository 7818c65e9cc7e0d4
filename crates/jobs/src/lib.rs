//! Jobs: operations on images, each defined once and served to both the CLI and the
//! API. A job that moves data first builds a plan, then applies it with progress
//! ([`Progress`]) and cancellation ([`Cancel`]).

pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod create_encrypt;
pub mod create_foreign;
pub mod flatten;
pub mod foreign_probe;
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

use std::sync::atomic::{AtomicU8, Ordering};

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
    /// Emptying the top image after a commit failed (its data is already in
    /// the base); the error is the engine's, its message without the file's
    /// name. The command line names the image as the user did.
    #[error("Failed to empty the image: {}", .0.message())]
    EmptyFailed(strata_format::Error),
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
    /// Reading one of the two views a rebase compares failed: `from` names
    /// it as qemu-img does ("old backing file", "new backing file"); the
    /// failure itself is the source.
    #[error("error while reading from {from}")]
    RebaseRead {
        from: &'static str,
        #[source]
        source: Box<Error>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The kind of failure, for callers to match on.
    pub fn kind(&self) -> strata_format::ErrorKind {
        use strata_format::ErrorKind as K;
        match self {
            Error::Chain(e) => e.kind(),
            Error::Format(e) | Error::EmptyFailed(e) => e.kind(),
            Error::Storage(e) => e.kind(),
            Error::Invalid(_) | Error::BackingIsItself(_) => K::InvalidArgument,
            Error::Cancelled => K::Cancelled,
            Error::CannotEmpty(_) | Error::NoInternalSnapshots { .. } => K::Unsupported,
            Error::SnapshotNotFound(_) | Error::NotInChain { .. } => K::NotFound,
            Error::SnapshotNameTaken(_) | Error::SnapshotNameEmpty => K::InvalidArgument,
            Error::NoBackingFile => K::InvalidArgument,
            // Refused as the lock protocol would refuse it.
            Error::OutputBelowItself { .. } => K::Locked,
            Error::RebaseRead { source, .. } => source.kind(),
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

/// A cancellation flag a job polls between units of work, with a point of no
/// return: an operation whose last steps cannot be interrupted safely calls
/// [`Cancel::point_of_no_return`] before them; a cancel asked for after that
/// is refused ([`CancelAnswer::TooLate`]) and the operation completes. The CLI
/// (on SIGINT) and the API (a task's cancel) ask through [`Cancel::request`],
/// so both get the same answer from the same operation.
#[derive(Debug, Default)]
pub struct Cancel(AtomicU8);

/// The states of a [`Cancel`].
const RUNNING: u8 = 0;
const REQUESTED: u8 = 1;
const PAST_RETURN: u8 = 2;

/// What a cancel request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelAnswer {
    /// The operation stops at its next check and undoes what it did.
    Accepted,
    /// The operation is past its point of no return: it completes.
    TooLate,
}

impl Cancel {
    /// A flag not cancelled (`const`, for a static one a signal handler sets).
    pub const fn new() -> Cancel {
        Cancel(AtomicU8::new(RUNNING))
    }

    /// Ask the operation to stop. Async-signal-safe (one atomic operation).
    pub fn request(&self) -> CancelAnswer {
        match self
            .0
            .compare_exchange(RUNNING, REQUESTED, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) | Err(REQUESTED) => CancelAnswer::Accepted,
            Err(_) => CancelAnswer::TooLate,
        }
    }

    /// [`Cancel::request`], ignoring the answer.
    pub fn cancel(&self) {
        self.request();
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst) == REQUESTED
    }

    /// Whether the operation passed its point of no return.
    pub fn is_past_return(&self) -> bool {
        self.0.load(Ordering::SeqCst) == PAST_RETURN
    }

    /// `Err(Cancelled)` once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Enter the steps that cannot be interrupted: `Err(Cancelled)` when a
    /// cancel came first (the caller undoes and stops), else from now on every
    /// request answers [`CancelAnswer::TooLate`].
    pub fn point_of_no_return(&self) -> Result<()> {
        match self
            .0
            .compare_exchange(RUNNING, PAST_RETURN, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) | Err(PAST_RETURN) => Ok(()),
            Err(_) => Err(Error::Cancelled),
        }
    }

    /// Past the point of no return, open a later stage that a cancel may stop
    /// again with a meaning of its own (an external snapshot whose disks have
    /// switched can still give up its memory save and stay a disk-only
    /// snapshot): from now on a request is [`CancelAnswer::Accepted`] until
    /// the stage ends with another [`Cancel::point_of_no_return`].
    pub fn reopen(&self) {
        let _ = self
            .0
            .compare_exchange(PAST_RETURN, RUNNING, Ordering::SeqCst, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod cancel_tests {
    use super::*;

    #[test]
    fn a_cancel_before_the_point_of_no_return_stops_the_operation_and_one_after_it_is_too_late() {
        let c = Cancel::new();
        assert!(c.check().is_ok());
        assert_eq!(c.request(), CancelAnswer::Accepted);
        assert_eq!(c.request(), CancelAnswer::Accepted, "asked twice");
        assert!(c.is_cancelled());
        assert!(matches!(c.point_of_no_return(), Err(Error::Cancelled)));
        assert!(
            c.is_cancelled(),
            "a refused entry leaves the cancel in force"
        );

        let c = Cancel::default();
        c.point_of_no_return().unwrap();
        c.point_of_no_return().unwrap();
        assert_eq!(c.request(), CancelAnswer::TooLate);
        assert!(!c.is_cancelled() && c.is_past_return());
        assert!(c.check().is_ok(), "the operation completes");

        c.reopen();
        assert_eq!(c.request(), CancelAnswer::Accepted, "a reopened stage");
        assert!(c.is_cancelled() && c.point_of_no_return().is_err());
        let c = Cancel::new();
        c.reopen();
        assert!(
            !c.is_past_return() && !c.is_cancelled(),
            "nothing to reopen"
        );
    }
}
