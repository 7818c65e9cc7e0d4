//! The figures `qemu-img convert -p` prints. qemu-img walks the sources in
//! 512-byte sectors, asks the allocation status of each run, cuts data runs into
//! requests of at most 2 MiB (one cluster when compressing) and, as each request
//! of data (or of zeroes, with `-S 0`) is taken, prints the share of such sectors
//! done. The same walk over strata's view of the sources gives the same figures.

use strata_format::qcow2::Qcow2Image;
use strata_jobs::status::{ChainStatus, Walk};

const SECTOR: u64 = 512;
/// qemu-img's copy buffer: the longest data request, in sectors.
const BUF_SECTORS: u64 = (2 << 20) / SECTOR;
/// The longest block-status request, in sectors (2 GiB less one sector).
const MAX_REQUEST_SECTORS: u64 = ((i32::MAX as u64) & !(SECTOR - 1)) / SECTOR;

/// What the walk depends on besides the sources.
pub struct ConvertShape {
    /// The target has a backing file (`-B`): only the sources' top layers count.
    pub target_has_backing: bool,
    /// Size of the target's backing file, when it has one.
    pub target_backing_size: Option<u64>,
    /// `-S 0`: zero runs are written too, and count.
    pub write_zeroes: bool,
    /// `-c`, with the target's cluster size.
    pub compress_cluster: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Zero,
    Backing,
}

/// One source as the walk sees it.
struct Part<'a> {
    status: &'a ChainStatus,
    /// First sector of this source in the concatenation.
    start: u64,
    sectors: u64,
    /// Runs end on this boundary when they can (the top layer's cluster), in sectors.
    align: u64,
}

struct Walker<'a> {
    parts: Vec<Part<'a>>,
    total: u64,
    shape: &'a ConvertShape,
    next_status: u64,
    kind: Kind,
}

/// `(byte position, figure)` for every figure qemu-img prints while copying, in
/// order; the position is where the request begins in the target.
pub fn convert_figures(
    sources: &[ChainStatus],
    shape: &ConvertShape,
) -> strata_jobs::Result<Vec<(u64, f32)>> {
    let mut parts = Vec::with_capacity(sources.len());
    let mut start = 0;
    for s in sources {
        let sectors = s.virtual_size().div_ceil(SECTOR);
        let align = s.layer(0).cluster_size().map_or(1, |c| (c / SECTOR).max(1));
        parts.push(Part {
            status: s,
            start,
            sectors,
            align,
        });
        start += sectors;
    }
    let mut w = Walker {
        parts,
        total: start,
        shape,
        next_status: 0,
        kind: Kind::Data,
    };
    let counted =
        |w: &Walker, k: Kind| k == Kind::Data || (w.shape.write_zeroes && k == Kind::Zero);
    // First pass: the sectors that count.
    let mut allocated = 0u64;
    let mut sector = 0;
    while sector < w.total {
        let n = w.iteration(sector)?;
        if counted(&w, w.kind) {
            allocated += n;
        }
        sector += n;
    }
    // Second pass: the copy, one figure per counted request.
    w.next_status = 0;
    let mut figures = Vec::new();
    let mut done = 0u64;
    sector = 0;
    while sector < w.total {
        let mut n = w.iteration(sector)?;
        let kind = w.kind;
        if w.shape.write_zeroes && kind == Kind::Zero {
            n = n.min(w.buf_sectors());
        }
        if counted(&w, kind) {
            done += n;
            let figure = (100.0 * done as f64 / allocated as f64) as f32;
            figures.push((sector * SECTOR, figure));
        }
        sector += n;
    }
    Ok(figures)
}

impl Walker<'_> {
    /// The copy buffer: one cluster when compressing.
    fn buf_sectors(&self) -> u64 {
        self.shape
            .compress_cluster
            .map_or(BUF_SECTORS, |c| (c / SECTOR).max(1))
    }

    /// The next request at `sector`, in sectors; sets `self.kind`.
    fn iteration(&mut self, sector: u64) -> strata_jobs::Result<u64> {
        let part = self
            .parts
            .iter()
            .rfind(|p| p.start <= sector && p.sectors > 0)
            .expect("sector inside the sources");
        let mut n = (self.total - sector).min(MAX_REQUEST_SECTORS);
        let mut post_backing_zero = false;
        if let Some(b) = self.shape.target_backing_size {
            let b = b.div_ceil(SECTOR);
            if sector >= b {
                post_backing_zero = true;
            } else if sector + n > b {
                n = b - sector;
            }
        }
        if self.next_status <= sector {
            let offset = (sector - part.start) * SECTOR;
            let size = part.status.virtual_size();
            let len = (n * SECTOR).min(size - offset);
            let st = part.status.status(offset, len, Walk::Allocated)?;
            let mut count = st.len;
            // qemu's qcow2 driver answers one compressed cluster at a time and
            // never past the end of an L2 table.
            for d in [0, st.depth] {
                if let Some(q) = part.status.layer(d).as_any().downcast_ref::<Qcow2Image>() {
                    let g = q.geometry();
                    let cluster = g.cluster_size();
                    let entry = if g.extended_l2 { 16 } else { 8 };
                    let table = cluster * (cluster / entry);
                    count = count.min(table - offset % table);
                    if st.compressed && d == st.depth {
                        count = count.min(cluster - offset % cluster);
                    }
                }
            }
            n = count.div_ceil(SECTOR);
            let tail = (sector - part.start + n) % part.align;
            if n > tail {
                n -= tail;
            }
            let top_only = self.shape.target_has_backing;
            // Unallocated in the top layer reads from the backing file, if there is one.
            let from_backing = st.depth > 0 || (!st.allocated && part.status.depth() > 1);
            self.kind = if top_only && from_backing {
                Kind::Backing
            } else if st.zero {
                if post_backing_zero {
                    Kind::Backing
                } else {
                    Kind::Zero
                }
            } else {
                Kind::Data
            };
            self.next_status = sector + n;
        }
        n = n.min(self.next_status - sector);
        if self.kind == Kind::Data {
            n = n.min(self.buf_sectors());
        }
        if let Some(c) = self.shape.compress_cluster {
            let c = (c / SECTOR).max(1);
            if n < c {
                n = c.min(self.total - sector);
                self.kind = Kind::Data;
            } else {
                n = n / c * c;
            }
        }
        Ok(n)
    }
}
