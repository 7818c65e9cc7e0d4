//! Taking locks, and what a poisoned lock means: one policy for every crate.
//!
//! A lock is poisoned when a thread panicked while it held it. What that says
//! about the data depends on the data, so there are two kinds of lock:
//!
//! - **Bookkeeping locks** (buffer pools, counters, in-flight range lists, the
//!   connection table, a first-error slot, an export's gate, a client's state):
//!   every update made under them is a single assignment, push or removal, so a
//!   panic cannot leave them half-changed. They are taken with [`lock`], [`read`],
//!   [`write`] and [`wait`], which recover the guard: the panic is reported where it
//!   happened and the other threads carry on.
//! - **Locks over state one update changes in several steps**, which must never be
//!   seen or written out half-changed: an open image's metadata (its L1/L2 caches,
//!   refcounts and header). They are taken with [`lock_whole`], which turns poison
//!   into [`Error::Poisoned`](crate::Error::Poisoned), an I/O error of its own kind
//!   (EIO to NBD clients). The device then fails every operation that needs that
//!   state, writes nothing more of it (not from `close`, not from `Drop`), and the
//!   image on disk stays as its last completed write left it: what a crash leaves,
//!   which the write ordering makes safe (leaks at worst). Reopening the image is
//!   the way on.
//!
//! No crate calls `lock().unwrap()` or `expect` on a lock: a panic on one thread
//! must not cascade into every thread that touches the same lock.

use crate::{Error, Result};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Lock a bookkeeping mutex, recovering it if a panic poisoned it (see the module).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read-lock a bookkeeping rwlock, recovering it if poisoned.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Write-lock a bookkeeping rwlock, recovering it if poisoned.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Wait on `cv` with a bookkeeping mutex's guard, recovering it if poisoned.
pub fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(|p| p.into_inner())
}

/// [`wait`] for at most `dur` (the caller checks why it woke).
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    g: MutexGuard<'a, T>,
    dur: std::time::Duration,
) -> MutexGuard<'a, T> {
    cv.wait_timeout(g, dur).unwrap_or_else(|p| p.into_inner()).0
}

/// The value of a bookkeeping mutex no one else holds any more, even if poisoned.
pub fn into_inner<T>(m: Mutex<T>) -> T {
    m.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// Lock a mutex over state that updates change in several steps (`what` names it
/// for the error): a poisoned one is [`Error::Poisoned`], never a guard.
pub fn lock_whole<'a, T: ?Sized>(m: &'a Mutex<T>, what: &'static str) -> Result<MutexGuard<'a, T>> {
    m.lock().map_err(|_| Error::Poisoned(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poisoned() -> Mutex<u32> {
        let m = Mutex::new(1);
        let _ = std::panic::catch_unwind(|| {
            let _g = m.lock().unwrap();
            panic!("in the middle of an update");
        });
        assert!(m.is_poisoned());
        m
    }

    #[test]
    fn a_bookkeeping_lock_is_recovered_after_a_panic() {
        let m = poisoned();
        *lock(&m) += 1;
        assert_eq!(into_inner(m), 2);
    }

    #[test]
    fn a_whole_state_lock_is_an_error_of_its_own_kind_after_a_panic() {
        let m = poisoned();
        let e = lock_whole(&m, "image metadata").unwrap_err();
        assert!(matches!(e, Error::Poisoned("image metadata")), "{e}");
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
    }
}
