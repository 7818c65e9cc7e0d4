//! Helpers shared by the repository tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use strata_repo::{Backend, Error, ErrorKind, FileType, Handle};
use strata_repo::{KdfParams, LocalBackend, Repository};

pub const PASSWORD: &str = "correct horse";
pub const MIB: u64 = 1 << 20;

/// Cheap scrypt parameters: these tests are about the format, not the KDF's cost.
pub fn kdf() -> KdfParams {
    KdfParams {
        n: 1024,
        r: 8,
        p: 1,
    }
}

/// A new repository in `dir/repo`.
pub fn new_repo(dir: &Path) -> Repository {
    Repository::init(
        Arc::new(LocalBackend::new(dir.join("repo"))),
        PASSWORD,
        kdf(),
    )
    .unwrap()
}

/// Deterministic incompressible bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A local backend whose writes (and, if asked, removals of anything but locks)
/// fail once `left` runs out: nothing is written or removed from then on, as if
/// the process had been cut there.
pub struct CutBackend {
    inner: LocalBackend,
    left: AtomicI64,
    removes: bool,
}

impl CutBackend {
    /// Cut after `cut` writes.
    pub fn writes(root: &Path, cut: i64) -> CutBackend {
        CutBackend {
            inner: LocalBackend::new(root),
            left: AtomicI64::new(cut),
            removes: false,
        }
    }

    /// Cut after `cut` writes and removals together (locks are never cut).
    pub fn writes_and_removes(root: &Path, cut: i64) -> CutBackend {
        CutBackend {
            removes: true,
            ..CutBackend::writes(root, cut)
        }
    }

    /// The writes and removals done so far (those cut included).
    pub fn used(&self, cut: i64) -> i64 {
        cut - self.left.load(Ordering::SeqCst)
    }

    fn pass(&self, h: &Handle) -> strata_repo::Result<()> {
        if self.left.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(Error::new(ErrorKind::Io, format!("cut at {h}")));
        }
        Ok(())
    }
}

impl Backend for CutBackend {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn create(&self) -> strata_repo::Result<()> {
        self.inner.create()
    }
    fn list(&self, kind: FileType) -> strata_repo::Result<Vec<(String, u64)>> {
        self.inner.list(kind)
    }
    fn read(&self, h: &Handle) -> strata_repo::Result<Vec<u8>> {
        self.inner.read(h)
    }
    fn read_range(&self, h: &Handle, offset: u64, len: usize) -> strata_repo::Result<Vec<u8>> {
        self.inner.read_range(h, offset, len)
    }
    fn write(&self, h: &Handle, data: &[u8]) -> strata_repo::Result<()> {
        self.pass(h)?;
        self.inner.write(h, data)
    }
    fn remove(&self, h: &Handle) -> strata_repo::Result<()> {
        if self.removes && h.kind != FileType::Lock {
            self.pass(h)?;
        }
        self.inner.remove(h)
    }
    fn stat(&self, h: &Handle) -> strata_repo::Result<u64> {
        self.inner.stat(h)
    }
}

/// `restic check --read-data` passes on the repository at `repo`.
pub fn restic_check(repo: &Path) {
    let out = Command::new("restic")
        .args(["--no-cache", "check", "--read-data", "-r"])
        .arg(repo)
        .env("RESTIC_PASSWORD", PASSWORD)
        .output()
        .expect("restic must be installed (scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "restic check failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Restore `snap` to the raw file `out` and return its bytes.
pub fn restored(
    repo: &mut Repository,
    snap: &strata_repo::tree::Snapshot,
    out: &Path,
) -> strata_repo::Result<Vec<u8>> {
    strata_repo::restore::restore(
        repo,
        snap,
        out,
        strata_format::Format::Raw,
        &strata_jobs::NoProgress,
        &strata_jobs::Cancel::default(),
    )?;
    Ok(std::fs::read(out).unwrap())
}
