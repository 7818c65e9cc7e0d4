//! `map`: how each guest range of an image (and its chain) is stored, merged into
//! runs exactly as qemu-img reports them.

use crate::status::{ChainStatus, Walk};
use crate::{Cancel, Result};
use serde::Serialize;

/// One run of `qemu-img map` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// The chain layer that serves the run (0 is the top image).
    pub depth: usize,
    /// Allocated in that layer.
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    /// Host offset in the layer's file, when meaningful.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl MapEntry {
    /// Whether `next` continues this run with identical properties.
    fn mergeable(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// Map `[start, start+len)` of the chain (clamped to its size), calling `emit` with
/// each merged run in order. Cancellation is checked between queries.
pub fn map(
    chain: &ChainStatus,
    start: u64,
    len: Option<u64>,
    cancel: &Cancel,
    emit: impl FnMut(&MapEntry) -> Result<()>,
) -> Result<()> {
    map_runs(
        chain.virtual_size(),
        start,
        len,
        cancel,
        emit,
        |off, len| {
            let st = chain.status(off, len, Walk::DataOrZero)?;
            Ok(MapEntry {
                start: off,
                length: st.len,
                depth: st.depth,
                present: st.allocated,
                zero: st.zero,
                data: st.data,
                compressed: st.compressed,
                offset: st.host_offset,
            })
        },
    )
}

/// [`map`] over any source of runs: `query(offset, len)` describes the run at
/// `offset` (at most `len` bytes, at least one) of an image of `size` bytes.
pub fn map_runs(
    size: u64,
    start: u64,
    len: Option<u64>,
    cancel: &Cancel,
    mut emit: impl FnMut(&MapEntry) -> Result<()>,
    mut query: impl FnMut(u64, u64) -> Result<MapEntry>,
) -> Result<()> {
    let end = match len {
        Some(l) => start.saturating_add(l).min(size),
        None => size,
    };
    let mut cur: Option<MapEntry> = None;
    let mut off = start.min(end);
    while off < end {
        cancel.check()?;
        let e = query(off, end - off)?;
        off += e.length;
        match &mut cur {
            Some(c) if c.mergeable(&e) => c.length += e.length,
            _ => {
                if let Some(c) = cur.take() {
                    emit(&c)?;
                }
                cur = Some(e);
            }
        }
    }
    // qemu-img prints one empty entry when there is nothing to map.
    let last = cur.unwrap_or(MapEntry {
        start,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
    });
    emit(&last)
}
