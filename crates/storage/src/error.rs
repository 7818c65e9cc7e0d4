use std::path::PathBuf;

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
    /// The OS error code behind this error, if there is one (EIO, ENOSPC...).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::Injected(source) => source.raw_os_error(),
            Error::ReadOnly => Some(libc::EPERM),
            Error::OutOfRange { .. } => Some(libc::EINVAL),
            Error::Locked { .. } => Some(libc::EAGAIN),
            Error::ForceShareWrite => Some(libc::EINVAL),
            Error::Poisoned(_) => Some(libc::EIO),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
