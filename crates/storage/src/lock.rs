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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// No locks at all (`-U` / `--force-share`): read-only inspection of an image in use.
    ForceShare,
    /// Reading: holds consistent-read and refuses to share writing, as `qemu-img info` does.
    Read,
    /// Writing: holds read, write and resize and shares neither write nor resize.
    Write,
}

impl LockMode {
    /// (permissions held, permissions shared) as QEMU's bitmasks.
    fn perms(self) -> (u8, u8) {
        match self {
            LockMode::ForceShare => (0, ALL),
            LockMode::Read => (CONSISTENT_READ, ALL & !WRITE),
            LockMode::Write => (
                CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE,
                CONSISTENT_READ | WRITE_UNCHANGED,
            ),
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
    for i in 0..4i64 {
        // We hold permission i: nobody else may refuse to share it.
        if held & (1 << i) != 0 && is_locked_by_other(fd, SHARED_BASE + i, path)? {
            return Err(Error::Locked {
                kind: "",
                perm: PERM_NAMES[i as usize],
                path: path.to_path_buf(),
            });
        }
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
