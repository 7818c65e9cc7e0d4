//! Jobs: operations on images, each defined once and served to both the CLI and the
//! API. A job that moves data first builds a plan, then applies it with progress
//! ([`Progress`]) and cancellation ([`Cancel`]).

pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod info;
pub mod layers;
pub mod map;
pub mod measure;
pub mod overlay;
pub mod rebase;
pub mod status;
pub mod stream;

use std::sync::atomic::{AtomicBool, Ordering};

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
