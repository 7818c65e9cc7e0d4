//! QEMU's image lock protocol (block/file-posix.c), so strata and QEMU respect each other.
//!
//! For every permission `i` (0 consistent-read, 1 write, 2 write-unchanged, 3 resize) a
//! holder takes a shared open-file-description lock on byte `100 + i` if it *has* the
//! permission and on byte `200 + i` if it does *not share* it. A conflict is tested with
//! `F_OFD_GETLK` and `F_WRLCK`: another holder's read lock on the byte shows up.

use crate::{Error, Result};
use std::os::fd::AsRawFd;
use std::path::Path;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u8 = 1 << 0;
const WRITE: u8 = 1 << 1;
const WRITE_UNCHANGED: u8 = 1 << 2;
const RESIZE: u8 = 1 << 3;
const ALL: u8 = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;

/// How an image is locked when it is opened.
///
/// The permissions each mode holds and shares are those QEMU 10's file node ends
/// up with under qemu-img (as seen in /proc/locks): a format driver such as qcow2
/// never shares writing or resizing of the file under its metadata, while the raw
/// driver passes its user's sharing straight through to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// No locks at all (`-U` / `--force-share`): read-only inspection of an image in use.
    ForceShare,
    /// Reading through a format driver (qcow2, luks...), or reading a raw image
    /// that others must not change meanwhile (`convert`'s sources): holds
    /// consistent-read and shares neither write nor resize.
    Read,
    /// Reading a raw image: holds consistent-read and shares everything, so a
    /// raw image another process writes (a running qemu-nbd) can still be read.
    ReadRaw,
    /// Writing through a format driver: holds consistent-read, write and resize,
    /// and shares neither write nor resize.
    Write,
    /// Writing a raw image: holds consistent-read and write. QEMU shares writing
    /// here; strata does not, so that it never writes a file someone else writes.
    WriteRaw,
    /// Resizing a raw image: [`LockMode::WriteRaw`] that also holds resize.
    ResizeRaw,
    /// A raw image opened for writing by a subcommand that then refuses raw
    /// images without writing anything (`snapshot -c`, `commit`, `rebase`,
    /// `check -r`): locked exactly as qemu-img locks it, sharing writing, so
    /// the refusal is the subcommand's own, as qemu-img's is.
    WriteRawShared,
    /// A raw image an NBD server exports read-only, locked as qemu-nbd locks
    /// it: consistent-read held, everything but resize shared.
    ExportRawRead,
    /// A raw image an NBD server exports writable, locked as qemu-nbd locks it:
    /// consistent-read and write held, everything but resize shared.
    ExportRaw,
    /// Rewriting the key slots of a LUKS image (`amend`): taken on top of the
    /// open's own locks once the image is open, as QEMU's luks driver asks for
    /// its file when it updates keys: consistent read and write held, neither
    /// shared, so no one else may read or write the header meanwhile.
    UpdateKeys,
}

impl LockMode {
    /// (permissions held, permissions shared) as QEMU's bitmasks.
    fn perms(self) -> (u8, u8) {
        match self {
            LockMode::ForceShare => (0, ALL),
            LockMode::Read => (CONSISTENT_READ, CONSISTENT_READ | WRITE_UNCHANGED),
            LockMode::ReadRaw => (CONSISTENT_READ, ALL),
            LockMode::Write => (
                CONSISTENT_READ | WRITE | RESIZE,
                CONSISTENT_READ | WRITE_UNCHANGED,
            ),
            LockMode::WriteRaw => (CONSISTENT_READ | WRITE, ALL & !WRITE),
            LockMode::ResizeRaw => (CONSISTENT_READ | WRITE | RESIZE, ALL & !WRITE),
            LockMode::WriteRawShared => (CONSISTENT_READ | WRITE, ALL),
            LockMode::ExportRawRead => (CONSISTENT_READ, ALL & !RESIZE),
            LockMode::ExportRaw => (CONSISTENT_READ | WRITE, ALL & !RESIZE),
            LockMode::UpdateKeys => (CONSISTENT_READ | WRITE, WRITE_UNCHANGED | RESIZE),
        }
    }

    /// The mode for the same access to a raw image (`raw`) or through a format
    /// driver; a resize of a raw image also holds resize.
    pub fn for_raw(self, raw: bool) -> LockMode {
        match (self, raw) {
            (LockMode::Read, true) => LockMode::ReadRaw,
            (LockMode::Write, true) => LockMode::WriteRaw,
            (LockMode::ReadRaw | LockMode::ExportRawRead, false) => LockMode::Read,
            (
                LockMode::WriteRaw
                | LockMode::ResizeRaw
                | LockMode::WriteRawShared
                | LockMode::ExportRaw,
                false,
            ) => LockMode::Write,
            (m, _) => m,
        }
    }
}

fn flock(start: i64, kind: libc::c_short) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

fn set_lock(fd: i32, byte: i64, path: &Path) -> Result<()> {
    let mut fl = flock(byte, libc::F_RDLCK as libc::c_short);
    // SAFETY: fd is a valid open descriptor and fl is initialised.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &mut fl) };
    if r == -1 {
        let err = std::io::Error::last_os_error();
        return Err(lock_error(byte, path, err));
    }
    Ok(())
}

fn is_locked_by_other(fd: i32, byte: i64, path: &Path) -> Result<bool> {
    let mut fl = flock(byte, libc::F_WRLCK as libc::c_short);
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        return Err(Error::Io {
            op: "test lock on",
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn lock_error(byte: i64, path: &Path, err: std::io::Error) -> Error {
    if matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
        let (kind, idx) = if byte >= SHARED_BASE {
            ("shared", byte - SHARED_BASE)
        } else {
            ("", byte - PERM_BASE)
        };
        Error::Locked {
            kind,
            perm: PERM_NAMES[idx as usize],
            path: path.to_path_buf(),
        }
    } else {
        Error::Io {
            op: "lock",
            path: path.to_path_buf(),
            source: err,
        }
    }
}

/// Take the locks `mode` asks for on `file`, failing if another holder conflicts.
///
/// The locks live as long as the open file description (they go when the file closes).
/// Acquiring a second mode on the same file adds its locks to those already held
/// (a holder's own locks never conflict with it).
pub fn acquire(file: &std::fs::File, path: &Path, mode: LockMode) -> Result<()> {
    let fd = file.as_raw_fd();
    let (held, shared) = mode.perms();
    let unshared = ALL & !shared;
    for i in 0..4 {
        if held & (1 << i) != 0 {
            set_lock(fd, PERM_BASE + i, path)?;
        }
        if unshared & (1 << i) != 0 {
            set_lock(fd, SHARED_BASE + i, path)?;
        }
    }
    // As QEMU checks (and so with its error for the first conflict): every
    // permission held first, then every permission not shared.
    for i in 0..4i64 {
        // We hold permission i: nobody else may refuse to share it.
        if held & (1 << i) != 0 && is_locked_by_other(fd, SHARED_BASE + i, path)? {
            return Err(Error::Locked {
                kind: "",
                perm: PERM_NAMES[i as usize],
                path: path.to_path_buf(),
            });
        }
    }
    for i in 0..4i64 {
        // We refuse to share permission i: nobody else may hold it.
        if unshared & (1 << i) != 0 && is_locked_by_other(fd, PERM_BASE + i, path)? {
            return Err(Error::Locked {
                kind: "shared",
                perm: PERM_NAMES[i as usize],
                path: path.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Let go of every lock taken on `file` (all of QEMU's lock bytes), before
/// it closes. Closing releases them too, but only when the last copy of the
/// descriptor goes: a child process another thread forks meanwhile (to run a
/// program) holds a copy until it executes that program, and with it the
/// locks, past this close. Unlocking acts on the open file description, so
/// the copy lets go too. A failure changes nothing: the close still releases
/// the locks.
pub fn release(file: &std::fs::File) {
    let mut fl = flock(PERM_BASE, libc::F_UNLCK as libc::c_short);
    fl.l_len = SHARED_BASE + 4 - PERM_BASE;
    // SAFETY: the descriptor is open and fl is initialised.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
}

/// Who else uses an image, as seen through QEMU's lock bytes, without taking any lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockProbe {
    /// Some process holds the write permission (a running QEMU writing the image).
    pub write_held: bool,
    /// Some process refuses to share writing (no one else may write).
    pub write_unshared: bool,
}

/// Look at the lock bytes of `path` and report who holds what. Takes no locks, so it
/// never disturbs a QEMU that is about to open the image.
pub fn probe(path: &Path) -> Result<LockProbe> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        op: "Could not open",
        path: path.to_path_buf(),
        source,
    })?;
    let fd = file.as_raw_fd();
    Ok(LockProbe {
        write_held: is_locked_by_other(fd, PERM_BASE + 1, path)?,
        write_unshared: is_locked_by_other(fd, SHARED_BASE + 1, path)?,
    })
}
