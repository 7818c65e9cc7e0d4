//! Copy plans between the layers of a backing chain: the part shared by commit
//! (upper layers into a base) and stream (middle layers into the top).
//!
//! A plan lists the guest ranges whose visible content comes from a chosen band of
//! layers, each to be copied as data or written as zeroes. It is computed from
//! allocation status alone (nothing is read), so it also says how much a job will
//! write before it starts.

use crate::status::{ChainStatus, Walk};
use crate::{Cancel, Progress, Result};
use std::sync::Arc;
use strata_format::BlockDevice;

/// Bytes moved per read/write.
const CHUNK: u64 = 4 << 20;

/// What to do with a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Copy the visible bytes.
    Copy,
    /// The visible bytes are zeroes: write zeroes.
    Zero,
}

/// One range of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    pub action: Action,
}

/// The ranges a job will write, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyPlan {
    pub ranges: Vec<Range>,
}

impl CopyPlan {
    /// Bytes of data to copy.
    pub fn copy_bytes(&self) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.action == Action::Copy)
            .map(|r| r.len)
            .sum()
    }

    /// Bytes written in all (data and zeroes).
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    fn push(&mut self, offset: u64, len: u64, action: Action) {
        if let Some(last) = self.ranges.last_mut() {
            if last.action == action && last.offset + last.len == offset {
                last.len += len;
                return;
            }
        }
        self.ranges.push(Range {
            offset,
            len,
            action,
        });
    }
}

/// The ranges of `layers[0..end]`'s visible content (of `size` bytes) that are
/// stored in `layers[from..end]` - that is, served by those layers and not by a
/// layer above `from` nor by anything below `end`.
pub fn plan_band(
    layers: &[Arc<dyn BlockDevice>],
    from: usize,
    end: usize,
    size: u64,
    cancel: &Cancel,
) -> Result<CopyPlan> {
    let status = ChainStatus::from_devices(layers[..end].to_vec())?;
    let size = size.min(status.virtual_size());
    let mut plan = CopyPlan::default();
    let mut off = 0;
    while off < size {
        cancel.check()?;
        let st = status.status(off, size - off, Walk::Allocated)?;
        if st.allocated && st.depth >= from {
            let action = if st.zero && !st.data {
                Action::Zero
            } else {
                Action::Copy
            };
            plan.push(off, st.len, action);
        }
        off += st.len;
    }
    Ok(plan)
}

/// Carry out `plan`: read each Copy range through `source` (the guest view) and
/// write it into `dest`; write zeroes for Zero ranges. `dest` is flushed at the end,
/// so the data is durable before the caller relinks anything.
pub fn apply(
    plan: &CopyPlan,
    source: &dyn BlockDevice,
    dest: &dyn BlockDevice,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<()> {
    progress.set_total(plan.total_bytes());
    let mut buf = Vec::new();
    for r in &plan.ranges {
        let mut off = r.offset;
        let end = r.offset + r.len;
        while off < end {
            cancel.check()?;
            let n = (end - off).min(CHUNK);
            match r.action {
                Action::Zero => dest.write_zeroes(off, n, false)?,
                Action::Copy => {
                    buf.resize(n as usize, 0);
                    source.read(&mut buf, off)?;
                    if crate::convert::is_zero(&buf) {
                        dest.write_zeroes(off, n, false)?;
                    } else {
                        dest.write(&buf, off)?;
                    }
                }
            }
            off += n;
            progress.advance(n);
        }
    }
    dest.flush()?;
    Ok(())
}
