//! Repository locks as restic keeps them: sealed JSON files in `locks/`. Any
//! number of non-exclusive locks may coexist; an exclusive lock excludes all
//! others. A lock is stale (ignored) when older than 30 minutes, or when it was
//! made on this host by a process that no longer exists. A holder refreshes its
//! lock every 5 minutes and removes it when done.

use crate::backend::{Backend, FileType, Handle};
use crate::error::{Error, ErrorKind, Result};
use crate::host;
use crate::id::Id;
use crate::repository::Repository;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

const STALE_AFTER_SECS: i64 = 30 * 60;
const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);
/// How long to wait for racing writers before checking again.
const SETTLE: Duration = Duration::from_millis(100);
/// How often a waiting acquirer tries again.
const RETRY_EVERY: Duration = Duration::from_millis(250);

/// A lock document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockInfo {
    pub time: String,
    pub exclusive: bool,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub pid: i64,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
}

impl LockInfo {
    fn mine(exclusive: bool) -> LockInfo {
        LockInfo {
            time: Timestamp::now().rfc3339(),
            exclusive,
            hostname: host::hostname(),
            username: host::username(),
            pid: i64::from(std::process::id()),
            uid: host::uid(),
            gid: host::gid(),
        }
    }

    /// Whether the lock can be ignored.
    pub fn is_stale(&self, now: Timestamp) -> bool {
        let Some(t) = Timestamp::parse(&self.time) else {
            return true;
        };
        if now.secs - t.secs > STALE_AFTER_SECS {
            return true;
        }
        self.hostname == host::hostname() && !host::process_alive(self.pid)
    }
}

/// A lock held on a repository; removed when released or dropped.
pub struct Lock {
    backend: Arc<dyn Backend>,
    id: Id,
    exclusive: bool,
    written: Instant,
}

impl Lock {
    /// Take a lock (`exclusive` or shared). While a live conflicting lock is
    /// held, try again for up to the repository's [`Repository::lock_wait`], then
    /// fail with [`ErrorKind::Locked`] naming the holder.
    pub fn acquire(repo: &Repository, exclusive: bool) -> Result<Lock> {
        let start = Instant::now();
        let wait = repo.lock_wait();
        loop {
            match Lock::try_acquire(repo, exclusive) {
                Err(e) if e.kind() == ErrorKind::Locked && start.elapsed() < wait => {
                    std::thread::sleep(RETRY_EVERY.min(wait.saturating_sub(start.elapsed())));
                }
                r => return r,
            }
        }
    }

    fn try_acquire(repo: &Repository, exclusive: bool) -> Result<Lock> {
        check_conflicts(repo, exclusive, None)?;
        let id = write_lock(repo, exclusive)?;
        let lock = Lock {
            backend: repo.backend().clone(),
            id,
            exclusive,
            written: Instant::now(),
        };
        std::thread::sleep(SETTLE);
        check_conflicts(repo, exclusive, Some(&id))?;
        Ok(lock)
    }

    /// Rewrite the lock if it is due (call regularly during long work).
    pub fn refresh_if_due(&mut self, repo: &Repository) -> Result<()> {
        if self.written.elapsed() < REFRESH_EVERY {
            return Ok(());
        }
        let id = write_lock(repo, self.exclusive)?;
        let old = std::mem::replace(&mut self.id, id);
        self.written = Instant::now();
        let _ = self.backend.remove(&handle(&old));
        Ok(())
    }

    /// Remove the lock.
    pub fn release(self) -> Result<()> {
        let h = handle(&self.id);
        let backend = self.backend.clone();
        std::mem::forget(self);
        backend.remove(&h)
    }
}

/// A lock kept fresh by a thread of its own while long-lived readers (an NBD
/// export of a snapshot) depend on it, so no prune or gc removes what they
/// read. A lock that can no longer be refreshed is left to expire and the
/// failure is returned by [`LockKeeper::stop`].
pub struct LockKeeper {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<()>>,
}

impl LockKeeper {
    /// Refresh `lock` on `repo` until [`LockKeeper::stop`].
    pub fn start(repo: Arc<Repository>, mut lock: Lock) -> LockKeeper {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                lock.refresh_if_due(&repo)?;
            }
            lock.release()
        });
        LockKeeper { stop, thread }
    }

    /// Stop refreshing and remove the lock.
    pub fn stop(self) -> Result<()> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| Error::new(ErrorKind::Io, "the lock refresher panicked"))?
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.backend.remove(&handle(&self.id));
    }
}

fn handle(id: &Id) -> Handle {
    Handle::new(FileType::Lock, id.to_string())
}

fn write_lock(repo: &Repository, exclusive: bool) -> Result<Id> {
    let json = serde_json::to_vec(&LockInfo::mine(exclusive)).expect("json");
    repo.save_unpacked(FileType::Lock, &json)
}

/// The live locks of the repository (stale and unreadable ones left out).
pub fn live_locks(repo: &Repository) -> Result<Vec<(Id, LockInfo)>> {
    let now = Timestamp::now();
    let mut out = Vec::new();
    for (name, _) in repo.backend().list(FileType::Lock)? {
        let Ok(id) = Id::parse(&name) else { continue };
        // A lock removed since the listing, or one this key cannot read, is no conflict.
        let Ok(plain) = repo.load_unpacked(FileType::Lock, &id) else {
            continue;
        };
        let Ok(info) = serde_json::from_slice::<LockInfo>(&plain) else {
            continue;
        };
        if !info.is_stale(now) {
            out.push((id, info));
        }
    }
    Ok(out)
}

fn check_conflicts(repo: &Repository, exclusive: bool, mine: Option<&Id>) -> Result<()> {
    for (id, info) in live_locks(repo)? {
        if Some(&id) == mine || !(exclusive || info.exclusive) {
            continue;
        }
        if let Some(m) = mine {
            let _ = repo.backend().remove(&handle(m));
        }
        return Err(Error::new(
            ErrorKind::Locked,
            format!(
                "the repository is locked {}by PID {} on {} by {} since {} (lock {})",
                if info.exclusive { "exclusively " } else { "" },
                info.pid,
                info.hostname,
                info.username,
                info.time,
                id.short()
            ),
        ));
    }
    Ok(())
}
