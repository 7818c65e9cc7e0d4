//! The storage failures of a guest request (a read, a block-status query)
//! picked out of an error, so a subcommand can word them as qemu-img does
//! ("error while reading at byte N: Input/output error").

use strata_format::{ErrorKind, Offset, Operation};

/// A guest request the storage failed: which, where, and the OS's words.
pub struct IoFailure {
    pub op: Operation,
    pub offset: u64,
    pub os: String,
    /// The file whose storage failed.
    pub path: Option<std::path::PathBuf>,
}

/// The failed guest request behind `e`, if the storage failed one.
/// Data that does not decompress counts as a failed read: QEMU's compressed
/// read fails with EIO there, and qemu-img words it as any read error.
pub fn io_failure(e: &anyhow::Error) -> Option<IoFailure> {
    let (f, os) = match storage_failure(e) {
        Some(f) => (f, words_of(f.storage_error()?)),
        None => {
            let f = engine_error(e).filter(|f| f.kind() == ErrorKind::BadCompressedData)?;
            let eio = std::io::Error::from_raw_os_error(libc::EIO);
            (f, strata_storage::os_message(&eio))
        }
    };
    let offset = match f.offset() {
        Some(Offset::Guest(g)) => g.0,
        _ => 0,
    };
    Some(IoFailure {
        op: f.operation()?,
        offset,
        os,
        path: f.path().map(Into::into),
    })
}

/// What qemu-img says of a failed storage request: the OS's words alone for a
/// failed read or write (a file's, an NBD export's whose server went away),
/// without the operation and the name the storage error carries.
fn words_of(e: &strata_storage::Error) -> String {
    match e {
        strata_storage::Error::Io { source, .. } => strata_storage::os_message(source),
        other => other.to_string(),
    }
}

/// The OS's words for the storage failure behind `e` (without the file's
/// name, as qemu-img words a failed operation), if the storage failed.
pub fn os_words(e: &anyhow::Error) -> Option<String> {
    Some(words_of(storage_failure(e)?.storage_error()?))
}

/// The engine error behind `e` that a failing storage raised.
fn storage_failure(e: &anyhow::Error) -> Option<&strata_format::Error> {
    let f = engine_error(e)?;
    (f.kind() == ErrorKind::Io && f.storage_error().is_some()).then_some(f)
}

/// The engine error behind `e`, if any.
fn engine_error(e: &anyhow::Error) -> Option<&strata_format::Error> {
    e.chain().find_map(|c| {
        c.downcast_ref::<strata_format::Error>().or_else(|| {
            match c.downcast_ref::<strata_jobs::Error>()? {
                strata_jobs::Error::Format(f) => Some(f),
                _ => None,
            }
        })
    })
}
