use std::path::PathBuf;

/// What kind of failure an error of any strata library is: the part callers and
/// tests match on. Every library error (storage, format, chain, jobs, NBD) has a
/// `kind()`; its message and context (path, offset, operation) say the rest.
/// Interfaces render their own wording from the kind: library messages carry no
/// command-line advice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The image breaks a rule of its format (a header field out of range, a table
    /// out of place or past the end of the file): it is refused when opened.
    Invalid,
    /// The image's metadata was found corrupt while in use (a bad L2 entry, a
    /// refcount that would wrap, a write aimed at metadata).
    Corrupt,
    /// The image carries the corrupt bit: it opens only read-only, or for repair.
    MarkedCorrupt,
    /// Compressed data that does not decompress to a whole cluster.
    BadCompressedData,
    /// A feature this build does not implement (encryption, external data files,
    /// unknown incompatible features...).
    Unsupported,
    /// A request outside the image or the storage.
    OutOfRange,
    /// A change asked of an image or storage opened read-only.
    ReadOnly,
    /// An argument the caller passed is unusable (a bad option value, a size that
    /// is not a multiple of 512, a shrink that was not allowed...).
    InvalidArgument,
    /// Something the caller named does not exist (a file, a snapshot...).
    NotFound,
    /// Another holder's lock conflicts with the access asked for.
    Locked,
    /// A backing file's format is recorded nowhere and was not given.
    BackingFormatUnknown,
    /// The operation was cancelled by its caller.
    Cancelled,
    /// The storage failed (I/O error, no space, an injected fault...).
    Io,
    /// An encrypted image was opened without the secret it needs, or with one
    /// that unlocks none of its keys.
    Key,
}

/// Errors from a storage backend. Each names the operation and, where there is one, the path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} '{}': {}", path.display(), os_message(source))]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("range at offset {offset} with length {len} overflows")]
    OutOfRange { offset: u64, len: u64 },
    #[error("the storage is read-only")]
    ReadOnly,
    /// Another holder conflicts with a lock: worded as QEMU words it ("Failed to get
    /// "write" lock", "Failed to get shared "write" lock"), without naming the file
    /// first (callers say which open failed).
    #[error("Failed to get {}\"{perm}\" lock\nIs another process using the image [{}]?", lock_kind(kind), path.display())]
    Locked {
        kind: &'static str,
        perm: &'static str,
        path: PathBuf,
    },
    /// `-U` asked for on an image opened for writing (QEMU refuses it too).
    #[error("force-share=on can only be used with read-only images")]
    ForceShareWrite,
    /// Raised by [`crate::FaultStorage`] or [`crate::CrashStorage`] once the storage
    /// is gone (or an error was asked for).
    #[error("injected fault: {0}")]
    Injected(std::io::Error),
    /// Raised by a [`crate::BlkdebugStorage`] rule: the errno alone, worded as
    /// the OS words it (as QEMU reports an error its blkdebug driver injects).
    #[error("{}", os_message(.0))]
    Rule(std::io::Error),
    /// A thread panicked in the middle of an update of this state (`.0` names it):
    /// it is neither used nor written any more (see [`crate::sync`]).
    #[error("an operation panicked while updating the {0}; it is not used until reopened")]
    Poisoned(&'static str),
}

/// "shared " for a lock on a byte that refuses sharing, nothing for a held permission.
fn lock_kind(kind: &str) -> String {
    if kind.is_empty() {
        String::new()
    } else {
        format!("{kind} ")
    }
}

/// An I/O error's message without Rust's " (os error N)" suffix, as C tools print it.
pub fn os_message(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

impl Error {
    /// The kind of failure (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            Error::Io { .. } | Error::Injected(_) | Error::Rule(_) | Error::Poisoned(_) => {
                ErrorKind::Io
            }
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::ReadOnly => ErrorKind::ReadOnly,
            Error::Locked { .. } => ErrorKind::Locked,
            Error::ForceShareWrite => ErrorKind::InvalidArgument,
        }
    }

    /// The OS error code behind this error, if there is one (EIO, ENOSPC...).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::Injected(source) | Error::Rule(source) => {
                source.raw_os_error()
            }
            Error::ReadOnly => Some(libc::EPERM),
            Error::OutOfRange { .. } => Some(libc::EINVAL),
            Error::Locked { .. } => Some(libc::EAGAIN),
            Error::ForceShareWrite => Some(libc::EINVAL),
            Error::Poisoned(_) => Some(libc::EIO),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
