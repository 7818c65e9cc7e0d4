//! Offset spaces of an image, as types: a guest offset is never taken for a host
//! offset, nor a cluster index for a byte offset. Each type carries only the
//! arithmetic that makes sense for it, checked where an image's own numbers could
//! overflow it. All are `#[repr(transparent)]` over `u64` and their methods
//! `#[inline]`, so they cost nothing over the bare integers.

// The in-memory tables (L1, refcount table, refcount counters) are indexed by
// on-disk 64-bit numbers; `index` below relies on usize being 64 bits wide.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("strata-format needs a 64-bit target (table indexes are 64-bit)");

/// `n` as an in-memory index or length. Lossless: the crate builds only for 64-bit
/// targets (asserted above), where usize and u64 have the same width. Callers bound
/// `n` by a table's length or by an allocation they made, never by trust in the image.
#[inline(always)]
pub(crate) const fn index(n: u64) -> usize {
    #[allow(clippy::cast_possible_truncation)] // 64-bit targets only, see above
    let i = n as usize;
    i
}

/// A count kept in a 32-bit header field (L1 entries, snapshots, table clusters).
/// The callers' own limits keep it far below 2^32; past it is an error naming
/// `what`, never a wrapped value.
pub(crate) fn header_u32(n: u64, what: &str) -> crate::Result<u32> {
    u32::try_from(n)
        .map_err(|_| crate::Error::invalid(format!("{what} of {n} does not fit the header")))
}

/// A byte offset in the guest-visible disk.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

impl GuestOffset {
    #[inline]
    pub const fn get(self) -> u64 {
        self.0
    }
    /// The end of a request of `len` bytes starting here, or `None` on overflow.
    #[inline]
    pub const fn checked_end(self, len: u64) -> Option<GuestOffset> {
        match self.0.checked_add(len) {
            Some(e) => Some(GuestOffset(e)),
            None => None,
        }
    }
}

/// A byte offset in an image file. Zero is "no cluster" in L1/L2/refcount-table
/// entries (cluster 0 always holds the header).
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

impl HostOffset {
    /// The "no cluster" value of table entries.
    pub const NONE: HostOffset = HostOffset(0);

    #[inline]
    pub const fn get(self) -> u64 {
        self.0
    }
    #[inline]
    pub const fn is_none(self) -> bool {
        self.0 == 0
    }
    /// Whether this offset starts a cluster of `1 << cluster_bits` bytes.
    #[inline]
    pub const fn is_aligned(self, cluster_bits: u32) -> bool {
        self.0 & ((1u64 << cluster_bits) - 1) == 0
    }
    /// The cluster this byte lies in.
    #[inline]
    pub const fn cluster(self, cluster_bits: u32) -> ClusterIndex {
        ClusterIndex(self.0 >> cluster_bits)
    }
    /// Every cluster that the `len` bytes from here touch (none if `len` is 0).
    /// The caller keeps `self + len` inside the host offset space (below 2^56).
    #[inline]
    pub fn clusters(self, len: u64, cluster_bits: u32) -> impl Iterator<Item = ClusterIndex> {
        let first = self.0 >> cluster_bits;
        let end = (self.0 + len).div_ceil(1u64 << cluster_bits);
        (first..if len == 0 { first } else { end }).map(ClusterIndex)
    }
}

/// A byte further on: `host + n` for `n` inside the cluster (or the run of
/// clusters) this offset starts. Entries hold offsets below 2^56, so that sum
/// cannot overflow.
impl std::ops::Add<u64> for HostOffset {
    type Output = HostOffset;
    #[inline]
    fn add(self, n: u64) -> HostOffset {
        HostOffset(self.0 + n)
    }
}

/// The distance in bytes from `rhs` up to `self`.
impl std::ops::Sub for HostOffset {
    type Output = u64;
    #[inline]
    fn sub(self, rhs: HostOffset) -> u64 {
        self.0 - rhs.0
    }
}

/// The index of a host cluster in an image file (its offset divided by the cluster
/// size): what refcounts are kept for.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClusterIndex(pub u64);

impl ClusterIndex {
    #[inline]
    pub const fn get(self) -> u64 {
        self.0
    }
    /// The cluster's first byte, or `None` if it lies past 2^64.
    #[inline]
    pub const fn offset(self, cluster_bits: u32) -> Option<HostOffset> {
        match self.0.checked_mul(1u64 << cluster_bits) {
            Some(o) => Some(HostOffset(o)),
            None => None,
        }
    }
    /// The cluster `n` clusters further on, or `None` on overflow.
    #[inline]
    pub const fn checked_add(self, n: ClusterCount) -> Option<ClusterIndex> {
        match self.0.checked_add(n.0) {
            Some(c) => Some(ClusterIndex(c)),
            None => None,
        }
    }
    /// This index in an in-memory per-cluster table.
    #[inline]
    pub(crate) const fn slot(self) -> usize {
        index(self.0)
    }
}

/// A number of clusters.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClusterCount(pub u64);

impl ClusterCount {
    #[inline]
    pub const fn get(self) -> u64 {
        self.0
    }
    /// Clusters needed to hold `bytes` bytes.
    #[inline]
    pub const fn for_bytes(bytes: u64, cluster_bits: u32) -> ClusterCount {
        ClusterCount(bytes.div_ceil(1u64 << cluster_bits))
    }
    /// Their size in bytes, or `None` past 2^64.
    #[inline]
    pub const fn bytes(self, cluster_bits: u32) -> Option<u64> {
        self.0.checked_mul(1u64 << cluster_bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_offsets_round_trip_and_overflow_is_none() {
        let c = HostOffset(0x3_0000).cluster(16);
        assert_eq!(c, ClusterIndex(3));
        assert_eq!(c.offset(16), Some(HostOffset(0x3_0000)));
        assert_eq!(ClusterIndex(u64::MAX >> 15).offset(16), None);
        assert!(HostOffset(0x3_0000).is_aligned(16));
        assert!(!HostOffset(0x3_0200).is_aligned(16));
    }

    #[test]
    fn guest_request_end_and_cluster_counts_are_checked() {
        assert_eq!(GuestOffset(10).checked_end(5), Some(GuestOffset(15)));
        assert_eq!(GuestOffset(u64::MAX).checked_end(1), None);
        assert_eq!(ClusterCount::for_bytes(65537, 16), ClusterCount(2));
        assert_eq!(ClusterCount(2).bytes(16), Some(131072));
        assert_eq!(ClusterCount(u64::MAX).bytes(16), None);
        assert_eq!(ClusterIndex(1).checked_add(ClusterCount(u64::MAX)), None);
    }
}
