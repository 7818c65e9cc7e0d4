//! The state directory: one directory per VM under `vms/`, holding its record
//! (`vm.json`: definition, active disks and snapshot tree in one file, so one
//! atomic write commits a whole change), its lock file, QEMU's sockets, pid file
//! and logs, the overlays strata creates and memory files.
//!
//! Contract: the record is only ever replaced by [`write_atomic`] (temporary
//! file, fsync, rename, fsync of the directory), so after a crash it reads back
//! as either the old or the new version, never a mix.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The environment variable naming the state directory.
pub const STATE_DIR_ENV: &str = "STRATA_STATE_DIR";
/// The state directory when neither an option nor the environment names one.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/strata";

/// The root of strata's VM state.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root`, made absolute (against the current
    /// directory): the overlays strata makes there name their backing files by
    /// these paths, which must not depend on where a later command runs.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        StateDir {
            root: std::path::absolute(&root).unwrap_or(root),
        }
    }

    /// `explicit` if given, else `$STRATA_STATE_DIR`, else `/var/lib/strata`.
    pub fn resolve(explicit: Option<PathBuf>) -> Self {
        let root = explicit
            .or_else(|| {
                std::env::var_os(STATE_DIR_ENV)
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        StateDir::new(root)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// Where the image registry keeps the local copies of images that thin
    /// clones read (`ID.FMT`): the only files outside a VM's directory that
    /// disks strata made from images rest on.
    pub fn image_cache(&self) -> PathBuf {
        self.root.join("image-cache")
    }

    /// The directory of VM `name` (which must be a checked name).
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.vms().join(name)
    }

    /// The names of the defined VMs, sorted.
    pub fn list(&self) -> Result<Vec<String>> {
        let dir = self.vms();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join(RECORD).is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    }
}

/// The record's file name in a VM's directory.
pub const RECORD: &str = "vm.json";

/// Check a VM or snapshot name: 1 to 64 characters of letters, digits, `.`,
/// `_` and `-`, starting with a letter or digit. Such a name is safe as a file
/// name and cannot climb out of a directory (`..`, `/` are refused).
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid {what} name '{name}': use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

/// Replace `path` with `data` atomically and durably: write a temporary file in
/// the same directory, fsync it, rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let op = || format!("write {}", path.display());
    let res = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map_err(|e| Error::io(op(), e))
}

/// An exclusive lock on one VM (an `flock` on its lock file), held until
/// dropped. Every command that reads and changes a VM holds it, so commands on
/// one VM run one at a time and only one of them talks to its guest agent.
#[derive(Debug)]
pub struct VmLock {
    _file: File,
}

impl VmLock {
    /// Take the lock of the VM whose directory is `dir`, waiting up to `wait`.
    pub fn acquire(dir: &Path, vm: &str, wait: Duration) -> Result<VmLock> {
        let path = dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let deadline = Instant::now() + wait;
        loop {
            // SAFETY: flock on a descriptor this function owns.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(VmLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(Error::io(format!("lock {}", path.display()), err));
            }
            if Instant::now() >= deadline {
                return Err(Error::Busy(vm.to_string()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_or_confuse_are_refused() {
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-flag",
            "a b",
            "x\0",
            &"a".repeat(65),
        ] {
            assert!(check_name("snapshot", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["vm1", "before-upgrade", "s.1_2", "A"] {
            check_name("snapshot", good).unwrap();
        }
    }

    #[test]
    fn an_atomic_write_replaces_the_whole_file_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vm.json");
        write_atomic(&p, b"old").unwrap();
        write_atomic(&p, b"new content").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new content");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_second_lock_on_a_vm_waits_then_reports_busy() {
        let d = tempfile::tempdir().unwrap();
        let held = VmLock::acquire(d.path(), "vm", Duration::ZERO).unwrap();
        let e = VmLock::acquire(d.path(), "vm", Duration::from_millis(100)).unwrap_err();
        assert!(e.to_string().contains("busy"), "{e}");
        drop(held);
        VmLock::acquire(d.path(), "vm", Duration::ZERO).unwrap();
    }
}
