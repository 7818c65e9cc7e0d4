//! A storage that loses what was not flushed when the machine crashes.
//!
//! [`CrashStorage`] keeps two images: the *volatile* one every read sees, and the
//! *durable* one a power cut would leave. Writes, write-zeroes, discards and
//! resizes change the volatile image at once and are queued; `flush` applies the
//! queue to the durable image. At the crash point (a count of mutating operations
//! on a shared [`CrashClock`]) that operation and every later one fails with EIO
//! and changes nothing, as if the process died there. What the disk then holds is
//! materialised by [`materialise`] for a chosen [`CrashPick`]: the durable image
//! plus none, all, only the newest, a seeded random subset of the unflushed
//! operations, or such a subset with one operation torn into a seeded subset of
//! its 512-byte sectors.
//! A sector is the unit a disk writes whole, so a write of at most one sector is
//! never torn.
//!
//! Several stores sharing one clock crash together (the files of a chain) and
//! their unflushed operations form one pool: a pick chooses from all of them, in
//! the order they were issued.

use crate::sync;
use crate::{Error, MemStorage, Result, Storage};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The size of the unit a disk writes whole.
pub const SECTOR: u64 = 512;

/// The operation counter and crash point shared by one or more [`CrashStorage`]s.
#[derive(Debug, Default)]
pub struct CrashClock {
    ops: AtomicU64,
    seq: AtomicU64,
    crash_at: Option<u64>,
    crashed: AtomicBool,
}

impl CrashClock {
    /// A clock that crashes at mutating operation `crash_at` (0-based, counting
    /// writes, write-zeroes, discards, resizes and flushes of every store on it),
    /// or never.
    pub fn new(crash_at: Option<u64>) -> Arc<Self> {
        Arc::new(CrashClock {
            crash_at,
            ..Default::default()
        })
    }

    /// Mutating operations seen so far (including the refused ones).
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::SeqCst)
    }

    /// Whether the crash has happened.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    fn gate(&self) -> Result<()> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if self.crashed() || self.crash_at.is_some_and(|at| n >= at) {
            self.crashed.store(true, Ordering::SeqCst);
            return Err(Error::Injected(std::io::Error::from_raw_os_error(
                libc::EIO,
            )));
        }
        Ok(())
    }
}

/// Which of the unflushed operations reach the disk at the crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPick {
    /// None: the disk holds what the last flush made durable.
    None,
    /// All of them, whole (the cut the old fault backend modelled).
    All,
    /// Only the newest one (of all stores on the clock): the write issued last
    /// overtakes every earlier unflushed one. At a crash just after a write, this
    /// is the pick that exposes a missing barrier before it.
    Newest,
    /// Each one independently, by a coin seeded with the value.
    Random(u64),
    /// As `Random`, except one operation (chosen by the seed among those covering
    /// more than one sector) lands as a seeded subset of its sectors: a torn write.
    Torn(u64),
}

#[derive(Debug, Clone)]
enum Change {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Resize(u64),
}

#[derive(Debug, Clone)]
struct Pending {
    seq: u64,
    change: Change,
}

impl Change {
    /// The byte range it covers, for the changes a crash may tear.
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            Change::Write(off, data) => Some((*off, data.len() as u64)),
            Change::Zero(off, len) => Some((*off, *len)),
            Change::Resize(_) => None,
        }
    }

    fn sectors(&self) -> u64 {
        self.range().map_or(0, |(off, len)| {
            if len == 0 {
                0
            } else {
                (off + len).div_ceil(SECTOR) - off / SECTOR
            }
        })
    }

    fn apply(&self, to: &MemStorage) -> Result<()> {
        match self {
            Change::Write(off, data) => to.write_at(data, *off),
            Change::Zero(off, len) => to.write_zeroes(*off, *len),
            Change::Resize(size) => to.set_size(*size),
        }
    }

    /// Apply only the sectors (numbered from the first one the change covers)
    /// `keep` says to.
    fn apply_sectors(&self, to: &MemStorage, keep: &dyn Fn(u64) -> bool) -> Result<()> {
        let Some((off, len)) = self.range() else {
            return self.apply(to);
        };
        let first = off / SECTOR;
        for s in 0..self.sectors() {
            if !keep(s) {
                continue;
            }
            let start = ((first + s) * SECTOR).max(off);
            let end = ((first + s + 1) * SECTOR).min(off + len);
            match self {
                Change::Write(_, data) => {
                    to.write_at(&data[(start - off) as usize..(end - off) as usize], start)?
                }
                _ => to.write_zeroes(start, end - start)?,
            }
        }
        Ok(())
    }
}

/// A seeded coin: splitmix64 of the seed and the values mixed in.
fn coin(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed
        .wrapping_add(a.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(b.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A backend whose unflushed changes a crash may lose (see the module docs).
#[derive(Debug)]
pub struct CrashStorage {
    volatile: MemStorage,
    durable: MemStorage,
    pending: Mutex<Vec<Pending>>,
    clock: Arc<CrashClock>,
}

impl CrashStorage {
    /// A store whose durable and volatile images both start as `bytes`.
    pub fn new(bytes: Vec<u8>, clock: Arc<CrashClock>) -> Self {
        CrashStorage {
            volatile: MemStorage::from_vec(bytes.clone()),
            durable: MemStorage::from_vec(bytes),
            pending: Mutex::new(Vec::new()),
            clock,
        }
    }

    pub fn clock(&self) -> &Arc<CrashClock> {
        &self.clock
    }

    /// Unflushed changes (writes, zeroes, discards, resizes) now queued.
    pub fn pending(&self) -> usize {
        sync::lock(&self.pending).len()
    }

    /// Whether some unflushed change covers more than one sector (so that a
    /// [`CrashPick::Torn`] can tear it).
    pub fn can_tear(&self) -> bool {
        sync::lock(&self.pending)
            .iter()
            .any(|p| p.change.sectors() > 1)
    }

    /// What reads see now.
    pub fn volatile(&self) -> Vec<u8> {
        self.volatile.snapshot()
    }

    /// What the disk holds after a crash that lets the changes `pick` chooses
    /// through. Shorthand for [`materialise`] of this store alone.
    pub fn after_crash(&self, pick: CrashPick) -> Vec<u8> {
        materialise(&[self], pick).pop().expect("one store")
    }

    fn record(&self, change: Change) -> Result<()> {
        let mut q = sync::lock(&self.pending);
        self.clock.gate()?;
        change.apply(&self.volatile)?;
        let seq = self.clock.seq.fetch_add(1, Ordering::SeqCst);
        q.push(Pending { seq, change });
        Ok(())
    }
}

/// The images a crash leaves on `stores` (which share one clock) when `pick`
/// chooses which unflushed changes of all of them reach the disk. Changes are
/// applied in the order they were issued. The stores are not changed.
pub fn materialise(stores: &[&CrashStorage], pick: CrashPick) -> Vec<Vec<u8>> {
    let queues: Vec<Vec<Pending>> = stores
        .iter()
        .map(|s| sync::lock(&s.pending).clone())
        .collect();
    let newest = queues.iter().flatten().map(|p| p.seq).max();
    // The torn change: chosen by the seed among those spanning several sectors.
    let torn = match pick {
        CrashPick::Torn(seed) => {
            let tearable: Vec<u64> = queues
                .iter()
                .flatten()
                .filter(|p| p.change.sectors() > 1)
                .map(|p| p.seq)
                .collect();
            (!tearable.is_empty())
                .then(|| tearable[(coin(seed, u64::MAX, 0) % tearable.len() as u64) as usize])
        }
        _ => None,
    };
    stores
        .iter()
        .zip(&queues)
        .map(|(s, q)| {
            let out = MemStorage::from_vec(s.durable.snapshot());
            for p in q {
                let r = match pick {
                    CrashPick::None => Ok(()),
                    CrashPick::All => p.change.apply(&out),
                    CrashPick::Newest if newest == Some(p.seq) => p.change.apply(&out),
                    CrashPick::Newest => Ok(()),
                    CrashPick::Random(seed) | CrashPick::Torn(seed) if torn == Some(p.seq) => {
                        // A proper tear: some sectors land, some do not.
                        let n = p.change.sectors();
                        let whole = coin(seed, p.seq, 0) % n;
                        let hole = (whole + 1 + coin(seed, p.seq, 1) % (n - 1)) % n;
                        p.change.apply_sectors(&out, &|i| {
                            i == whole || (i != hole && coin(seed, p.seq, i + 2) & 1 == 1)
                        })
                    }
                    CrashPick::Random(seed) | CrashPick::Torn(seed) => {
                        if coin(seed, p.seq, 0) & 1 == 1 {
                            p.change.apply(&out)
                        } else {
                            Ok(())
                        }
                    }
                };
                r.expect("memory store accepts any in-range change");
            }
            out.snapshot()
        })
        .collect()
}

/// The picks worth trying after a crash of `stores`: none; all and only the
/// newest when something is pending; `random` seeded subsets when two or more
/// changes are (with one, a subset is none or all); `torn` torn writes when a
/// change covers several sectors. Picks that cannot differ from these are left out.
pub fn picks_for(stores: &[&CrashStorage], random: u64, torn: u64) -> Vec<CrashPick> {
    let pending: usize = stores.iter().map(|s| s.pending()).sum();
    let mut p = vec![CrashPick::None];
    if pending > 0 {
        p.push(CrashPick::All);
    }
    if pending > 1 {
        p.push(CrashPick::Newest);
        p.extend((1..=random).map(CrashPick::Random));
    }
    if stores.iter().any(|s| s.can_tear()) {
        p.extend((1..=torn).map(CrashPick::Torn));
    }
    p
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.volatile.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        offset
            .checked_add(buf.len() as u64)
            .ok_or(Error::OutOfRange {
                offset,
                len: buf.len() as u64,
            })?;
        self.record(Change::Write(offset, buf.to_vec()))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        offset
            .checked_add(len)
            .ok_or(Error::OutOfRange { offset, len })?;
        self.record(Change::Zero(offset, len))
    }
    fn write_zeroes_fast(&self, offset: u64, len: u64) -> Result<bool> {
        self.write_zeroes(offset, len)?;
        Ok(true)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }
    /// A punched hole, like any write, reaches the disk only at a flush (or,
    /// unflushed, at the crash's pick).
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<bool> {
        self.write_zeroes(offset, len)?;
        Ok(true)
    }
    fn flush(&self) -> Result<()> {
        let mut q = sync::lock(&self.pending);
        self.clock.gate()?;
        for p in q.drain(..) {
            p.change.apply(&self.durable)?;
        }
        Ok(())
    }
    fn size(&self) -> Result<u64> {
        self.volatile.size()
    }
    fn set_size(&self, size: u64) -> Result<()> {
        self.record(Change::Resize(size))
    }
    /// One operation, as over a file (a crash can land on it): it grows the
    /// store where `offset + len` passes its end, and changes nothing inside.
    fn preallocate(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or(Error::OutOfRange { offset, len })?;
        if end > self.size()? {
            self.set_size(end)
        } else {
            self.clock.gate()
        }
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.volatile.allocated_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(bytes: &[u8], at: Option<u64>) -> CrashStorage {
        CrashStorage::new(bytes.to_vec(), CrashClock::new(at))
    }

    #[test]
    fn unflushed_writes_are_lost_and_flushed_ones_kept() {
        let s = store(b"....", None);
        s.write_at(b"a", 0).unwrap();
        s.flush().unwrap();
        s.write_at(b"b", 1).unwrap();
        s.set_size(6).unwrap();
        let mut r = [0u8; 2];
        s.read_at(&mut r, 0).unwrap();
        assert_eq!(&r, b"ab", "reads see the volatile image");
        assert_eq!(s.after_crash(CrashPick::None), b"a...");
        assert_eq!(s.after_crash(CrashPick::All), b"ab..\0\0");
        assert_eq!(s.pending(), 2);
    }

    #[test]
    fn the_crash_point_refuses_that_operation_and_all_later_ones() {
        let s = store(b"..", Some(2));
        s.write_at(b"a", 0).unwrap();
        s.flush().unwrap();
        assert!(s.write_at(b"b", 1).is_err());
        assert!(s.flush().is_err());
        assert!(s.clock().crashed());
        assert_eq!(s.clock().ops(), 4);
        assert_eq!(s.after_crash(CrashPick::All), b"a.");
        assert_eq!(s.volatile(), b"a.");
    }

    #[test]
    fn random_picks_are_seeded_subsets_applied_in_order() {
        let s = store(&[0u8; 8], None);
        for i in 0..8u8 {
            s.write_at(&[i + 1], u64::from(i)).unwrap();
        }
        // The same write twice: a later one that lands overrides the earlier.
        s.write_at(&[9], 0).unwrap();
        let mut seen = std::collections::HashSet::new();
        for seed in 0..32 {
            let a = s.after_crash(CrashPick::Random(seed));
            assert_eq!(a, s.after_crash(CrashPick::Random(seed)), "seeded");
            for (i, &b) in a.iter().enumerate() {
                let i = i as u8;
                assert!(b == 0 || b == i + 1 || (i == 0 && b == 9), "{a:?}");
            }
            seen.insert(a);
        }
        assert!(seen.len() > 16, "subsets vary with the seed");
    }

    #[test]
    fn a_torn_write_lands_as_some_but_not_all_of_its_sectors() {
        let s = store(&[], None);
        s.write_at(&vec![7u8; 4 * 512], 0).unwrap();
        s.write_at(&[1u8; 100], 5000).unwrap(); // one sector: never torn
        let mut shapes = std::collections::HashSet::new();
        for seed in 0..16 {
            let a = s.after_crash(CrashPick::Torn(seed));
            let landed: Vec<bool> = (0..4).map(|i| a.get(i * 512) == Some(&7)).collect();
            assert!(landed.iter().any(|&l| l) && !landed.iter().all(|&l| l));
            for i in 0..4 {
                let sec = a.get(i * 512..(i + 1) * 512).unwrap_or(&[]);
                assert!(sec.iter().all(|&b| b == sec[0]), "sector {i} is whole");
            }
            if let Some(small) = a.get(5000..5100) {
                assert!(small == [1u8; 100] || small == [0u8; 100]);
            }
            shapes.insert(landed);
        }
        assert!(shapes.len() > 2, "the torn sectors vary with the seed");
    }

    #[test]
    fn stores_on_one_clock_crash_together_and_share_the_pool() {
        let clock = CrashClock::new(Some(3));
        let a = CrashStorage::new(vec![0; 2], clock.clone());
        let b = CrashStorage::new(vec![0; 2], clock.clone());
        a.write_at(&[1], 0).unwrap();
        b.write_at(&[2], 0).unwrap();
        a.flush().unwrap();
        assert!(b.write_at(&[3], 1).is_err(), "b stops at the shared point");
        assert!(a.write_at(&[4], 1).is_err());
        assert!(b.flush().is_err(), "nothing more becomes durable");
        assert_eq!(
            picks_for(&[&a, &b], 2, 1),
            [CrashPick::None, CrashPick::All],
            "one change pending: it lands or not"
        );
        let none = materialise(&[&a, &b], CrashPick::None);
        assert_eq!(none, vec![vec![1, 0], vec![0, 0]]);
        let all = materialise(&[&a, &b], CrashPick::All);
        assert_eq!(all, vec![vec![1, 0], vec![2, 0]]);
        b.write_at(&[5], 1).unwrap_err();
        let c = CrashStorage::new(vec![0; 2], CrashClock::new(None));
        c.write_at(&[1], 0).unwrap();
        c.write_at(&[2], 1).unwrap();
        assert_eq!(
            c.after_crash(CrashPick::Newest),
            vec![0, 2],
            "only the last lands"
        );
        let newest = materialise(&[&a, &b], CrashPick::Newest);
        assert_eq!(
            newest,
            vec![vec![1, 0], vec![2, 0]],
            "b's write was the newest"
        );
    }

    #[test]
    fn zeroes_discards_and_resizes_are_lost_unless_flushed() {
        let s = store(&[5u8; 1024], None);
        s.write_zeroes(0, 512).unwrap();
        s.discard(512, 512).unwrap();
        s.set_size(100).unwrap();
        assert_eq!(s.size().unwrap(), 100);
        assert_eq!(s.after_crash(CrashPick::None), vec![5u8; 1024]);
        assert_eq!(s.after_crash(CrashPick::All), vec![0u8; 100]);
        s.flush().unwrap();
        assert_eq!(s.after_crash(CrashPick::None), vec![0u8; 100]);
        assert_eq!(s.pending(), 0);
    }
}
