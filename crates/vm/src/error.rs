//! The VM manager's errors: each says what was refused or failed and why.

/// An error from a VM manager operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input (names, sizes, paths, options); nothing was changed.
    #[error("{0}")]
    Invalid(String),
    /// The VM or snapshot to be made already exists; nothing was changed.
    #[error("{0}")]
    Exists(String),
    #[error("VM '{0}' is not defined")]
    NoSuchVm(String),
    #[error("VM '{vm}' has no snapshot '{snap}'")]
    NoSuchSnapshot { vm: String, snap: String },
    /// The VM is not in a state the operation needs (running, stopped, ...).
    #[error("{0}")]
    State(String),
    /// Another strata command holds the VM's lock.
    #[error("VM '{0}' is busy: another strata command holds its lock")]
    Busy(String),
    /// The operation was cancelled before its point of no return; the message
    /// says what was undone (the VM and its snapshot tree are as before).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// Starting or talking to QEMU failed in a way QMP does not describe.
    #[error("{0}")]
    Qemu(String),
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
    #[error(transparent)]
    Qmp(#[from] strata_qmp::Error),
    #[error(transparent)]
    Jobs(#[from] strata_jobs::Error),
    #[error(transparent)]
    Chain(#[from] strata_chain::Error),
    #[error(transparent)]
    Format(#[from] strata_format::Error),
}

impl Error {
    pub(crate) fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            op: op.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
