//! Typed errors: an [`ErrorKind`] callers match on, a context naming what was being
//! done (file, blob, offset) and the underlying cause.

use std::fmt;

/// What went wrong, for callers that act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No key of the repository opens with the password given.
    WrongPassword,
    /// The repository, a snapshot or a file in it does not exist.
    NotFound,
    /// Something already exists where a new one was to be made (init on a repository).
    AlreadyExists,
    /// Stored bytes fail authentication or their hash, or do not parse: the
    /// repository is damaged or was tampered with.
    Corrupt,
    /// The repository uses something this implementation does not support.
    Unsupported,
    /// Another process holds a conflicting lock.
    Locked,
    /// The request is not valid as given (an ambiguous snapshot prefix, a bad size).
    Invalid,
    /// The image engine failed to read the source or write the output.
    Image,
    /// An I/O error from the backend or a local file.
    Io,
    /// The operation was cancelled.
    Cancelled,
}

/// A repository error: its kind, what was being done, and the cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn context(&self) -> &str {
        &self.context
    }

    pub(crate) fn io(context: impl Into<String>, e: std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            _ => ErrorKind::Io,
        };
        Error::with_source(kind, context, e)
    }

    pub(crate) fn corrupt(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, context)
    }

    /// The same error with `outer` put in front of its context.
    pub fn wrap(mut self, outer: impl fmt::Display) -> Self {
        self.context = format!("{outer}: {}", self.context);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<strata_jobs::Error> for Error {
    fn from(e: strata_jobs::Error) -> Self {
        Error::with_source(ErrorKind::Image, "image operation failed", e)
    }
}

impl From<strata_chain::Error> for Error {
    fn from(e: strata_chain::Error) -> Self {
        Error::with_source(ErrorKind::Image, "could not open the image", e)
    }
}

impl From<strata_format::Error> for Error {
    fn from(e: strata_format::Error) -> Self {
        Error::with_source(ErrorKind::Image, "image access failed", e)
    }
}
