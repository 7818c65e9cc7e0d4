//! Where repository files live. A [`Backend`] stores whole files by type and
//! name, written once and never modified; the repository logic above it never
//! sees paths, so an object store can implement the same trait.

use crate::error::Result;

/// The kinds of files in a repository, each in its own directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileType {
    /// The single `config` file.
    Config,
    Key,
    /// Pack files (blobs and their header).
    Data,
    Index,
    Snapshot,
    Lock,
}

impl FileType {
    /// The directory (or, for the config, the file) name in restic's default layout.
    pub fn dir(self) -> &'static str {
        match self {
            FileType::Config => "config",
            FileType::Key => "keys",
            FileType::Data => "data",
            FileType::Index => "index",
            FileType::Snapshot => "snapshots",
            FileType::Lock => "locks",
        }
    }

    /// Every type but the config.
    pub const DIRS: [FileType; 5] = [
        FileType::Key,
        FileType::Data,
        FileType::Index,
        FileType::Snapshot,
        FileType::Lock,
    ];
}

/// A file of a repository: its type and name (the hex storage ID, or "config").
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Handle {
    pub kind: FileType,
    pub name: String,
}

impl Handle {
    pub fn new(kind: FileType, name: impl Into<String>) -> Self {
        Handle {
            kind,
            name: name.into(),
        }
    }

    pub fn config() -> Self {
        Handle::new(FileType::Config, "config")
    }
}

impl std::fmt::Display for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            FileType::Config => f.write_str("config"),
            k => write!(f, "{}/{}", k.dir(), self.name),
        }
    }
}

/// Storage for repository files.
///
/// Contracts:
/// - `write` is atomic: after a crash the file is either absent or complete under
///   its name, never partial; when `write` returns the file is durable;
/// - files are immutable once written (content-addressed names make rewriting the
///   same name with the same bytes harmless);
/// - errors for a missing file have [`crate::ErrorKind::NotFound`].
pub trait Backend: Send + Sync {
    /// A human-readable location (a path or URL), for messages.
    fn location(&self) -> String;
    /// Create the repository's empty structure. Fails with `AlreadyExists` if a
    /// config is already there.
    fn create(&self) -> Result<()>;
    /// The names and sizes of all files of `kind` (temporary files are never listed).
    fn list(&self, kind: FileType) -> Result<Vec<(String, u64)>>;
    /// The whole file.
    fn read(&self, h: &Handle) -> Result<Vec<u8>>;
    /// `len` bytes at `offset`; a short file is an error.
    fn read_range(&self, h: &Handle, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// [`Backend::read_range`] into `buf` (its length is the length read), for
    /// callers that reuse their memory.
    fn read_range_into(&self, h: &Handle, offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.copy_from_slice(&self.read_range(h, offset, buf.len())?);
        Ok(())
    }
    /// Store `data` under `h`, atomically and durably.
    fn write(&self, h: &Handle, data: &[u8]) -> Result<()>;
    fn remove(&self, h: &Handle) -> Result<()>;
    /// The file's size.
    fn stat(&self, h: &Handle) -> Result<u64>;
}
