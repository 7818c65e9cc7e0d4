use crate::{Error, Result, Storage};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The operation counter and trip flag of one or more [`FaultStorage`]s: the plan's
/// operation number counts the mutating operations of every backend sharing it.
#[derive(Debug, Default)]
pub struct FaultClock {
    ops: AtomicU64,
    cut: AtomicBool,
}

/// What happens when a [`FaultStorage`] reaches its fault point. (A crash, which
/// loses unflushed writes, is [`crate::CrashStorage`]'s.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// That one operation fails with the given errno (EIO, ENOSPC...) and changes
    /// nothing; later operations succeed.
    ErrorOnce(i32),
}

/// Which mutating operation (0-based, counting writes, write-zeroes, discards, resizes
/// and flushes) fails, and how.
#[derive(Debug, Clone, Copy)]
pub struct FaultPlan {
    pub at: u64,
    pub mode: FaultMode,
}

/// Wraps a backend and fails its mutating operations according to a [`FaultPlan`].
///
/// Reads always pass through, so a test can inspect exactly what reached the
/// storage before the fault. With no plan it only counts operations, which is how a
/// test learns how many fault points an operation has.
#[derive(Debug)]
pub struct FaultStorage<S> {
    inner: S,
    plan: Option<FaultPlan>,
    clock: Arc<FaultClock>,
}

impl<S: Storage> FaultStorage<S> {
    pub fn new(inner: S, plan: Option<FaultPlan>) -> Self {
        Self::with_clock(inner, plan, Arc::new(FaultClock::default()))
    }

    /// A backend counting on a shared clock: the plan's `at` counts the mutating
    /// operations of every backend sharing `clock`.
    pub fn with_clock(inner: S, plan: Option<FaultPlan>, clock: Arc<FaultClock>) -> Self {
        FaultStorage { inner, plan, clock }
    }

    /// Mutating operations seen so far on this backend's clock (including the
    /// failed ones).
    pub fn ops(&self) -> u64 {
        self.clock.ops.load(Ordering::SeqCst)
    }

    /// Whether the plan has fired.
    pub fn tripped(&self) -> bool {
        self.clock.cut.load(Ordering::SeqCst)
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }

    fn gate(&self) -> Result<()> {
        let n = self.clock.ops.fetch_add(1, Ordering::SeqCst);
        let Some(plan) = self.plan else { return Ok(()) };
        let FaultMode::ErrorOnce(errno) = plan.mode;
        if n == plan.at {
            self.clock.cut.store(true, Ordering::SeqCst);
            return Err(Error::Injected(std::io::Error::from_raw_os_error(errno)));
        }
        Ok(())
    }
}

impl<S: Storage> Storage for FaultStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.gate()?;
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.gate()?;
        self.inner.write_zeroes(offset, len)
    }
    fn write_zeroes_fast(&self, offset: u64, len: u64) -> Result<bool> {
        self.gate()?;
        self.inner.write_zeroes_fast(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.gate()?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<bool> {
        self.gate()?;
        self.inner.write_zeroes_unmap(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.gate()?;
        self.inner.flush()
    }
    fn size(&self) -> Result<u64> {
        self.inner.size()
    }
    fn set_size(&self, size: u64) -> Result<()> {
        self.gate()?;
        self.inner.set_size(size)
    }
    fn preallocate(&self, offset: u64, len: u64) -> Result<()> {
        self.gate()?;
        self.inner.preallocate(offset, len)
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.inner.allocated_bytes()
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn probe_data(&self, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        self.inner.probe_data(offset, max_len)
    }
    fn debug_event(&self, event: crate::DebugEvent) {
        self.inner.debug_event(event)
    }
    fn watches_requests(&self) -> bool {
        self.inner.watches_requests()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStorage;

    #[test]
    fn error_once_fails_one_operation_with_its_errno() {
        let s = FaultStorage::new(
            MemStorage::new(),
            Some(FaultPlan {
                at: 0,
                mode: FaultMode::ErrorOnce(libc::ENOSPC),
            }),
        );
        let e = s.write_at(b"a", 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        s.write_at(b"b", 0).unwrap();
        assert_eq!(s.inner().snapshot(), b"b");
    }

    #[test]
    fn without_plan_it_counts_mutations() {
        let s = FaultStorage::new(MemStorage::new(), None);
        s.write_at(b"ab", 0).unwrap();
        s.flush().unwrap();
        s.discard(0, 1).unwrap();
        let mut b = [9u8; 2];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(s.ops(), 3);
        assert_eq!(b, [0, b'b']);
    }
}
