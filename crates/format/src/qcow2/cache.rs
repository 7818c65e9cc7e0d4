//! A bounded write-back cache of metadata tables (L2 tables, refcount blocks), keyed
//! by host offset. Eviction picks the least recently used table; dirty tables are
//! handed back to the caller to be written in the order the image requires.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A fast hasher for table offsets (trusted, cluster-aligned integers): a few
/// multiply-xor rounds instead of SipHash, which dominated per-cluster lookups.
#[derive(Default)]
pub struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, k: u64) {
        let mut x = self.0 ^ k;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 = x ^ (x >> 31);
    }
}

type OffsetMap<V> = HashMap<u64, V, BuildHasherDefault<OffsetHasher>>;

pub struct Slot<T> {
    pub data: T,
    pub dirty: bool,
    used: u64,
}

pub struct TableCache<T> {
    map: OffsetMap<Slot<T>>,
    capacity: usize,
    tick: u64,
}

impl<T> TableCache<T> {
    pub fn new(capacity: usize) -> Self {
        TableCache {
            map: OffsetMap::default(),
            capacity: capacity.max(2),
            tick: 0,
        }
    }

    pub fn get(&mut self, offset: u64) -> Option<&mut Slot<T>> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.map.get_mut(&offset)?;
        slot.used = tick;
        Some(slot)
    }

    pub fn contains(&self, offset: u64) -> bool {
        self.map.contains_key(&offset)
    }

    /// Insert a table. If the cache is full, the least recently used table is removed
    /// first and returned (with its offset) so a dirty one can be written.
    #[must_use]
    pub fn insert(&mut self, offset: u64, data: T, dirty: bool) -> Option<(u64, Slot<T>)> {
        let evicted = if self.map.len() >= self.capacity && !self.map.contains_key(&offset) {
            let victim = self.map.iter().min_by_key(|(_, s)| s.used).map(|(&k, _)| k);
            victim.and_then(|k| self.map.remove(&k).map(|s| (k, s)))
        } else {
            None
        };
        self.tick += 1;
        self.map.insert(
            offset,
            Slot {
                data,
                dirty,
                used: self.tick,
            },
        );
        evicted
    }

    /// Offsets of dirty tables, in ascending order (sequential writes).
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&k, _)| k)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn any_dirty(&self) -> bool {
        self.map.values().any(|s| s.dirty)
    }

    /// Return a slot that was evicted but could not be written.
    pub fn put_back(&mut self, offset: u64, slot: Slot<T>) {
        self.map.insert(offset, slot);
    }

    /// Forget the table at `offset`, dirty or not (its cluster was freed: what the
    /// cache held of it is never written).
    pub fn remove(&mut self, offset: u64) {
        self.map.remove(&offset);
    }

    /// Drop every clean table (after tables were freed underneath the cache).
    pub fn clear(&mut self) {
        self.map.retain(|_, s| s.dirty);
    }
}
