use std::path::PathBuf;

/// What went wrong, without where.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error(transparent)]
    Storage(#[from] strata_storage::Error),
    /// The image does not follow the format; `what` says which rule it breaks.
    #[error("{0}")]
    Invalid(String),
    /// A feature this build does not support (encryption, external data files...).
    #[error("Unsupported {0}")]
    Unsupported(String),
    /// The image is marked corrupt, or corruption was found while using it.
    #[error("{0}")]
    Corrupt(String),
    /// A request outside the image (offset + length past the virtual size).
    #[error("{0}")]
    OutOfRange(String),
    #[error("Image is read-only")]
    ReadOnly,
    #[error("Could not decompress cluster: {0}")]
    Decompress(String),
    /// An argument the caller passed is unusable (bad option value...).
    #[error("{0}")]
    InvalidArgument(String),
}

/// An error from the format layer: the kind plus the image it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{}{kind}", path_prefix(.path))]
pub struct Error {
    pub kind: ErrorKind,
    pub path: Option<PathBuf>,
}

fn path_prefix(p: &Option<PathBuf>) -> String {
    match p {
        Some(p) => format!("{}: ", p.display()),
        None => String::new(),
    }
}

impl Error {
    pub fn new(kind: ErrorKind) -> Self {
        Error { kind, path: None }
    }
    /// Attach the image path, unless one is already there.
    pub fn at(mut self, path: Option<&std::path::Path>) -> Self {
        if self.path.is_none() {
            self.path = path.map(|p| p.to_path_buf());
        }
        self
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid(msg.into()))
    }
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported(msg.into()))
    }
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt(msg.into()))
    }
    pub fn out_of_range(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::OutOfRange(msg.into()))
    }
    pub fn invalid_argument(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument(msg.into()))
    }
}

impl From<strata_storage::Error> for Error {
    fn from(e: strata_storage::Error) -> Self {
        Error::new(ErrorKind::Storage(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
