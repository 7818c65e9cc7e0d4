//! Which host clusters of the data area hold a guest cluster: the map QEMU
//! keeps to place new clusters (the first free one, else at the end).

/// A bitmap over host clusters counted from the data area's start.
#[derive(Debug, Clone, Default)]
pub struct UsedMap {
    words: Vec<u64>,
    len: u64,
}

/// Why a cluster could not be marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkError {
    /// The range reaches past the map.
    TooBig,
    /// A cluster of the range is already used.
    Busy,
}

impl UsedMap {
    /// A map of `len` clusters, all free.
    pub fn new(len: u64) -> UsedMap {
        UsedMap {
            words: vec![0; crate::units::index(len.div_ceil(64))],
            len,
        }
    }

    /// Clusters covered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether cluster `i` is used.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[crate::units::index(i / 64)] & (1 << (i % 64)) != 0
    }

    fn set_bit(&mut self, i: u64, on: bool) {
        let w = &mut self.words[crate::units::index(i / 64)];
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }

    /// Mark clusters `first..first+count` used, unless the range reaches past
    /// the map or one of them is used already (nothing changes then).
    pub fn mark(&mut self, first: u64, count: u64) -> Result<(), MarkError> {
        let end = first.checked_add(count).ok_or(MarkError::TooBig)?;
        if end > self.len {
            return Err(MarkError::TooBig);
        }
        if (first..end).any(|i| self.get(i)) {
            return Err(MarkError::Busy);
        }
        for i in first..end {
            self.set_bit(i, true);
        }
        Ok(())
    }

    /// Mark cluster `i` free (nothing if it lies past the map).
    pub fn clear(&mut self, i: u64) {
        if i < self.len {
            self.set_bit(i, false);
        }
    }

    /// The first free cluster at or after `from`, or [`Self::len`].
    pub fn next_free(&self, from: u64) -> u64 {
        self.scan(from, true)
    }

    /// The first used cluster at or after `from`, or [`Self::len`].
    pub fn next_used(&self, from: u64) -> u64 {
        self.scan(from, false)
    }

    /// The first cluster at or after `from` that is free (`free`) or used,
    /// a word at a time.
    fn scan(&self, from: u64, free: bool) -> u64 {
        let mut i = from;
        while i < self.len {
            let w = self.words[crate::units::index(i / 64)];
            let w = if free { !w } else { w } >> (i % 64);
            if w == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            let found = i + u64::from(w.trailing_zeros());
            return found.min(self.len);
        }
        self.len
    }

    /// Grow (new clusters free) or shrink to `len` clusters.
    pub fn resize(&mut self, len: u64) {
        self.words.resize(crate::units::index(len.div_ceil(64)), 0);
        if len < self.len && !len.is_multiple_of(64) {
            if let Some(w) = self.words.last_mut() {
                *w &= (1u64 << (len % 64)) - 1;
            }
        }
        self.len = len;
    }
}
