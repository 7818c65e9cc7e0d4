//! The registry's errors. Each variant maps to one HTTP status in the API
//! (see `Error::kind`), so the CLI and the server report the same refusal.

/// What went wrong, coarsely: the API turns each kind into its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input: malformed values, wrong types, unknown operations (400).
    Invalid,
    /// The operation is not allowed on this image or attribute (403).
    Forbidden,
    /// No image with that ID (404).
    NotFound,
    /// The image's state does not allow the operation now (409).
    Conflict,
    /// The image has no data to read yet (204, as Glance answers).
    NoData,
    /// The data is larger than allowed (413).
    TooLarge,
    /// A requested byte range lies outside the data (416).
    Range,
    /// Stored data does not match its recorded checksum (500-class).
    Corrupt,
    /// The file system failed (500).
    Io,
}

/// An error from a registry operation; nothing was changed unless it says so.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("No image found with ID {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NoData(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Range(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
}

impl Error {
    pub(crate) fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            op: op.into(),
            source,
        }
    }

    /// The refusal to read an image that has no data yet (its status is not
    /// `active`), worded once for the registry and its remote clients.
    pub fn no_data(id: &str, status: crate::Status) -> Self {
        Error::NoData(format!(
            "The requested image {id} has no data: its status is {}",
            status.as_str()
        ))
    }

    /// An error of the backup repository holding the data, during `op`.
    pub(crate) fn repo(op: impl Into<String>, e: strata_repo::Error) -> Self {
        let op = op.into();
        match e.kind() {
            strata_repo::ErrorKind::Corrupt => Error::Corrupt(format!("{op}: {e}")),
            strata_repo::ErrorKind::Locked => Error::Conflict(format!("{op}: {e}")),
            _ => Error::Io {
                op,
                source: std::io::Error::other(e.to_string()),
            },
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::Forbidden(_) => ErrorKind::Forbidden,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Conflict(_) => ErrorKind::Conflict,
            Error::NoData(_) => ErrorKind::NoData,
            Error::TooLarge(_) => ErrorKind::TooLarge,
            Error::Range(_) => ErrorKind::Range,
            Error::Corrupt(_) => ErrorKind::Corrupt,
            Error::Io { .. } => ErrorKind::Io,
        }
    }
}

impl From<strata_vm::Error> for Error {
    fn from(e: strata_vm::Error) -> Self {
        match e {
            strata_vm::Error::Io { op, source } => Error::Io { op, source },
            other => Error::Io {
                op: other.to_string(),
                source: std::io::Error::other("state write failed"),
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
