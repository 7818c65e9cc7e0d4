//! strata's NBD server: exports images and backing chains over TCP and Unix
//! sockets (fixed newstyle handshake, structured replies, extended headers, block
//! status, TLS), and changes the chain under live connections: internal and
//! external snapshots, commit and stream, driven through a control socket.
//!
//! - [`client`]: a small blocking client (reads, writes, block status, metadata contexts);
//! - [`storage`]: an export as a storage backend, for the engine to open like a file;
//! - [`device`]: an export as a read-only block device, for the engine's jobs;
//! - [`proto`]: wire constants;
//! - [`export`]: an exported chain behind the gate that live operations take;
//! - [`server`]: listeners and transmission;
//! - `handshake`: the fixed newstyle handshake, one function per option type;
//! - [`control`]: the JSON-lines control socket;
//! - [`tls`]: loading a certificate and key into a rustls configuration.

pub mod client;
pub mod control;
pub mod device;
pub mod export;
mod handshake;
pub mod proto;
pub mod server;
pub mod storage;
pub mod tls;
pub mod url;

pub use export::{DetectZeroes, Discard, Export, ExportConfig};
pub use server::{Server, ServerConfig};

/// Errors from the NBD crate (opening exports, live operations, TLS setup).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Chain(#[from] strata_chain::Error),
    #[error(transparent)]
    Format(#[from] strata_format::Error),
    #[error(transparent)]
    Jobs(#[from] strata_jobs::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A request that cannot be carried out; the message says why.
    #[error("{0}")]
    Invalid(String),
    /// A live operation asked of an export that serves read-only.
    #[error("export '{0}' is read-only")]
    ReadOnlyExport(String),
    /// The backing file a commit must write is held by another user (a lock);
    /// the message says which and why.
    #[error("{0}")]
    BackingBusy(String),
    #[error("TLS: {0}")]
    Tls(String),
    /// The client could not reach the server at `addr`.
    #[error(
        "Failed to connect to '{addr}': {}",
        strata_storage::os_message(source)
    )]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The server has no export of that name; `reason` is the server's message.
    #[error("Requested export not available\nserver reported: {reason}")]
    ExportUnavailable { export: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The kind of failure, for callers to match on.
    pub fn kind(&self) -> strata_format::ErrorKind {
        use strata_format::ErrorKind as K;
        match self {
            Error::Chain(e) => e.kind(),
            Error::Format(e) => e.kind(),
            Error::Jobs(e) => e.kind(),
            Error::Io(e) if e.kind() == std::io::ErrorKind::NotFound => K::NotFound,
            Error::Io(_) => K::Io,
            Error::Connect { .. } => K::Io,
            Error::ExportUnavailable { .. } => K::NotFound,
            Error::Invalid(_) | Error::Tls(_) => K::InvalidArgument,
            Error::ReadOnlyExport(_) => K::ReadOnly,
            Error::BackingBusy(_) => K::Locked,
        }
    }

    /// The chain error behind this one, if opening a chain failed.
    pub fn chain_error(&self) -> Option<&strata_chain::Error> {
        match self {
            Error::Chain(e) => Some(e),
            Error::Jobs(e) => e.chain_error(),
            _ => None,
        }
    }
}
