//! The format layer's error: a kind to match on, a message, and the context it
//! happened in (image path, guest or host offset, operation), with the storage
//! error behind it as its source.

use crate::units::{GuestOffset, HostOffset};
use std::path::{Path, PathBuf};

pub use strata_storage::ErrorKind;

/// Where in the image an error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offset {
    /// A guest offset: the request that failed.
    Guest(GuestOffset),
    /// A host offset in the image file: the metadata or data found wrong there.
    Host(HostOffset),
}

/// What was being done when an error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operation {
    Open,
    Read,
    Write,
    WriteZeroes,
    Discard,
    BlockStatus,
    Flush,
    Resize,
}

/// An error from the format layer.
///
/// Its text (`Display`) is the message alone, after the image path when there is
/// one: `path: message`. The context is for callers that render their own wording
/// from [`Error::kind`], or log where it happened; it does not change the text.
/// Boxed, so that a `Result` of the guest view's hot paths stays one word.
#[derive(Debug)]
pub struct Error(Box<Inner>);

#[derive(Debug)]
struct Inner {
    kind: ErrorKind,
    message: String,
    path: Option<PathBuf>,
    offset: Option<Offset>,
    operation: Option<Operation>,
    source: Option<strata_storage::Error>,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(p) = &self.0.path {
            write!(f, "{}: ", p.display())?;
        }
        f.write_str(&self.0.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_ref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl Error {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            path: None,
            offset: None,
            operation: None,
            source: None,
        }))
    }
    /// The image breaks a rule of the format; `msg` says which.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, msg)
    }
    /// A feature this build does not support; `what` names it.
    pub fn unsupported(what: impl Into<String>) -> Self {
        Self::new(
            ErrorKind::Unsupported,
            format!("Unsupported {}", what.into()),
        )
    }
    /// Corruption found while using the image.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, msg)
    }
    /// A request outside the image.
    pub fn out_of_range(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::OutOfRange, msg)
    }
    /// An unusable argument from the caller.
    pub fn invalid_argument(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, msg)
    }
    /// Something the caller named (a snapshot, a bitmap) does not exist.
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, msg)
    }
    /// A change asked of an image opened read-only.
    pub fn read_only() -> Self {
        Self::new(ErrorKind::ReadOnly, "Image is read-only")
    }

    /// The same error, its message preceded by `what` failed (QEMU's
    /// "WHAT: REASON" wording).
    pub fn in_step(mut self, what: &str) -> Self {
        self.0.message = format!("{what}: {}", self.0.message);
        self
    }

    /// Attach the image path, unless one is already there.
    pub fn at(mut self, path: Option<&Path>) -> Self {
        if self.0.path.is_none() {
            self.0.path = path.map(Path::to_path_buf);
        }
        self
    }
    /// Attach the offset, unless one is already there (the innermost is the most
    /// precise: a host offset found wrong beats the guest request that met it).
    pub fn at_offset(mut self, offset: Offset) -> Self {
        self.0.offset.get_or_insert(offset);
        self
    }
    /// Attach the operation, unless one is already there.
    pub fn during(mut self, op: Operation) -> Self {
        self.0.operation.get_or_insert(op);
        self
    }

    /// The kind of failure, for callers and tests to match on.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }
    /// The message, without the path.
    pub fn message(&self) -> &str {
        &self.0.message
    }
    /// The image the error concerns, if known.
    pub fn path(&self) -> Option<&Path> {
        self.0.path.as_deref()
    }
    pub fn offset(&self) -> Option<Offset> {
        self.0.offset
    }
    pub fn operation(&self) -> Option<Operation> {
        self.0.operation
    }
    /// The storage error behind this one, if the storage failed.
    pub fn storage_error(&self) -> Option<&strata_storage::Error> {
        self.0.source.as_ref()
    }
    /// The storage error behind this one, taken out of it; the error itself
    /// when the storage did not fail.
    pub fn into_storage_error(self) -> std::result::Result<strata_storage::Error, Self> {
        let mut inner = self.0;
        match inner.source.take() {
            Some(e) => Ok(e),
            None => Err(Error(inner)),
        }
    }
    /// The OS error code behind this error (EIO, ENOSPC...), if the storage failed.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.0
            .source
            .as_ref()
            .and_then(strata_storage::Error::raw_os_error)
    }
}

/// A storage failure keeps its own kind and text; it becomes the source.
impl From<strata_storage::Error> for Error {
    fn from(e: strata_storage::Error) -> Self {
        let mut err = Error::new(e.kind(), e.to_string());
        err.0.source = Some(e);
        err
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Run one request of the guest view: an error from it carries the operation
/// and, for a ranged request, its guest offset.
#[inline]
pub(crate) fn request<T>(
    op: Operation,
    offset: Option<u64>,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    f().map_err(|e| {
        let e = e.during(op);
        match offset {
            Some(o) => e.at_offset(Offset::Guest(GuestOffset(o))),
            None => e,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_path_then_message_and_context_stays_out_of_it() {
        let e = Error::corrupt("L2 entry 0x1 has reserved bits set")
            .at_offset(Offset::Host(HostOffset(0x30000)))
            .during(Operation::Read)
            .at(Some(Path::new("a.qcow2")))
            .at_offset(Offset::Guest(GuestOffset(0)))
            .at(Some(Path::new("b.qcow2")));
        assert_eq!(e.to_string(), "a.qcow2: L2 entry 0x1 has reserved bits set");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(e.offset(), Some(Offset::Host(HostOffset(0x30000))));
        assert_eq!(e.operation(), Some(Operation::Read));
    }

    #[test]
    fn a_storage_error_keeps_its_kind_text_and_errno_as_the_source() {
        let e = Error::from(strata_storage::Error::ReadOnly);
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert_eq!(e.to_string(), "the storage is read-only");
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        assert!(std::error::Error::source(&e).is_some());
    }
}
