use std::time::Duration;

/// What went wrong, without where.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// Connecting, reading or writing the socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// No answer (or no awaited event) within the time allowed.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// QEMU went away (its monitor socket closed) before the operation finished.
    #[error("QEMU exited (its QMP connection closed: {0})")]
    QemuExited(String),
    /// QEMU or the agent answered the command with an error.
    #[error("{class}: {desc}")]
    CommandFailed {
        command: String,
        class: String,
        desc: String,
    },
    /// A job started by a command concluded with an error.
    #[error("job '{job}' failed: {desc}")]
    JobFailed { job: String, desc: String },
    /// The peer broke the protocol (unparsable message, unexpected reply shape).
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// An error from a QMP or guest-agent operation: the kind plus the operation it
/// happened in ("QMP snapshot-save", "guest agent guest-exec", "waiting for event
/// JOB_STATUS_CHANGE ..."), so a message always names the command.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {kind}")]
pub struct Error {
    pub op: String,
    pub kind: ErrorKind,
}

impl Error {
    pub fn new(op: impl Into<String>, kind: ErrorKind) -> Self {
        Error {
            op: op.into(),
            kind,
        }
    }
    pub(crate) fn io(op: impl Into<String>, e: std::io::Error) -> Self {
        Self::new(op, ErrorKind::Io(e))
    }
    pub(crate) fn protocol(op: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(op, ErrorKind::Protocol(detail.into()))
    }
    /// True when QEMU (or the agent's side of the channel) went away.
    pub fn is_qemu_exited(&self) -> bool {
        matches!(self.kind, ErrorKind::QemuExited(_))
    }
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, ErrorKind::Timeout(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
