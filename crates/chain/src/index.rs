//! A read-only view of a whole chain that remembers which layer serves each
//! granule, so a read through a deep chain costs one lookup instead of one per
//! layer (the usual cost of long external-snapshot chains).
//!
//! The index is filled lazily from each layer's `block_status` and is only valid
//! while no layer changes, so the view is built only over chains whose layers are
//! all open read-only (the locks then keep writers away). A granule is the smallest
//! allocation unit of any qcow2 layer (its subcluster with extended L2 entries), so a
//! layer allocates a granule wholly or not at all; where a layer answers for less
//! than a granule (a layer ending mid-granule), the granule is marked mixed and read
//! through the chain as usual.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use strata_format::{BlockDevice, Error as FormatError, Extent, Status};
use strata_storage::Storage;

/// Entries per lazily allocated page of the index (64 KiB pages).
const PAGE: u64 = 1 << 13;
/// Largest index (in entries) the view accepts; beyond it reads go through the chain.
const MAX_ENTRIES: u64 = 1 << 25;
/// Granules a miss asks the layers about at once.
const WINDOW: u64 = 256;

// An entry: bits 0-7 the tag (UNKNOWN, ZERO, MIXED, or the serving layer's depth
// + 1); bit 8 set when bits 9-63 hold the host offset (in 512-byte units) of the
// granule's data in that layer's file, which is then read directly.
const UNKNOWN: u64 = 0;
const ZERO: u64 = 0xff;
const MIXED: u64 = 0xfe;
const HAS_HOST: u64 = 1 << 8;
/// Layers that can be named in an entry.
const MAX_LAYERS: usize = 0xfd;
/// Host offsets the entry can hold (QEMU's limit for qcow2 is 2^56).
const MAX_HOST: u64 = 1 << 56;

/// The indexed view; see the module documentation.
pub struct IndexedChain {
    layers: Vec<Arc<dyn BlockDevice>>,
    /// Each layer's file, for reading data at a known host offset directly.
    files: Vec<Option<Arc<dyn Storage>>>,
    size: u64,
    granule_bits: u32,
    pages: Vec<OnceLock<Box<[AtomicU64]>>>,
}

impl IndexedChain {
    /// An indexed view of `layers` (top first, attached to each other), or `None`
    /// when the chain cannot be indexed: a writable layer, a layer over a
    /// debugging filter, too many layers, or an index that would be too large.
    pub fn new(layers: Vec<Arc<dyn BlockDevice>>) -> Option<IndexedChain> {
        if layers.is_empty() || layers.len() > MAX_LAYERS || layers.iter().any(|l| !l.read_only()) {
            return None;
        }
        // A debugging filter under a layer must see each read as the format
        // engine makes it (its rules count reads and the events they announce).
        if layers
            .iter()
            .any(|l| l.host_file().is_some_and(|f| f.watches_requests()))
        {
            return None;
        }
        let granule = layers
            .iter()
            .filter_map(|l| l.allocation_unit())
            .min()
            .unwrap_or(65536)
            .max(512);
        let granule_bits = granule.trailing_zeros();
        let size = layers[0].virtual_size();
        let entries = size.div_ceil(granule);
        if entries > MAX_ENTRIES {
            return None;
        }
        let pages = (0..entries.div_ceil(PAGE))
            .map(|_| OnceLock::new())
            .collect();
        let files = layers.iter().map(|l| l.host_file().cloned()).collect();
        Some(IndexedChain {
            layers,
            files,
            size,
            granule_bits,
            pages,
        })
    }

    fn slot(&self, g: u64) -> &AtomicU64 {
        let page = self.pages[(g / PAGE) as usize]
            .get_or_init(|| (0..PAGE).map(|_| AtomicU64::new(UNKNOWN)).collect());
        &page[(g % PAGE) as usize]
    }

    /// The entry of granule `g`. A miss asks each layer for the status of a window
    /// of granules and records the answer for every whole granule it holds for, so
    /// sparse layers cost one query per extent.
    fn resolve(&self, g: u64) -> strata_format::Result<u64> {
        let v = self.slot(g).load(Ordering::Relaxed);
        if v != UNKNOWN {
            return Ok(v);
        }
        let gsize = 1u64 << self.granule_bits;
        let off = g << self.granule_bits;
        let want = gsize.min(self.size - off);
        // How far from `off` the answer holds.
        let mut run = (gsize * WINDOW).min(self.size - off);
        let mut tag = ZERO;
        let mut host = None;
        for (depth, layer) in self.layers.iter().enumerate() {
            let lsize = layer.virtual_size();
            if off >= lsize {
                break; // past this layer's end: zeroes (for the whole run)
            }
            let avail = lsize - off;
            if avail < want {
                (tag, run) = (MIXED, want);
                break;
            }
            let e = layer.block_status(off, run.min(avail))?;
            if e.len < want {
                (tag, run) = (MIXED, want);
                break;
            }
            run = run.min(e.len);
            match e.status {
                Status::Unallocated => continue,
                Status::Zero { .. } => break,
                Status::Data { host_offset, .. } => {
                    tag = depth as u64 + 1;
                    if self.files[depth].is_some() {
                        host = host_offset;
                    }
                    break;
                }
            }
        }
        // Whole granules only (the last granule of the disk may be short).
        let n = if run == want {
            1
        } else {
            (run >> self.granule_bits).max(1)
        };
        let mut first = tag;
        for i in 0..n {
            let mut v = tag;
            if let Some(h) = host {
                let h = h + (i << self.granule_bits);
                if h.is_multiple_of(512) && h < MAX_HOST {
                    v |= HAS_HOST | (h >> 9) << 9;
                }
            }
            if i == 0 {
                first = v;
            }
            self.slot(g + i).store(v, Ordering::Relaxed);
        }
        Ok(first)
    }

    /// The layers, top first.
    pub fn layers(&self) -> &[Arc<dyn BlockDevice>] {
        &self.layers
    }
}

fn read_only() -> FormatError {
    FormatError::read_only()
}

impl BlockDevice for IndexedChain {
    fn format_name(&self) -> &'static str {
        self.layers[0].format_name()
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> strata_format::Result<()> {
        strata_format::check_range(offset, buf.len() as u64, self.size)?;
        let gsize = 1u64 << self.granule_bits;
        let end = offset + buf.len() as u64;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let g = off >> self.granule_bits;
            let v = self.resolve(g)?;
            // Extend the run over following granules served the same way (and,
            // for direct reads, stored contiguously).
            let mut run_end = ((g + 1) << self.granule_bits).min(end);
            while run_end < end {
                let w = self.resolve(run_end >> self.granule_bits)?;
                let next = if v & HAS_HOST != 0 {
                    v + (((run_end >> self.granule_bits) - g) << self.granule_bits)
                } else {
                    v
                };
                if w != next {
                    break;
                }
                run_end = (run_end + gsize).min(end);
            }
            let n = (run_end - off) as usize;
            let part = &mut buf[pos..pos + n];
            match v & 0xff {
                ZERO => part.fill(0),
                MIXED => self.layers[0].read(part, off)?,
                d => {
                    let depth = (d - 1) as usize;
                    match &self.files[depth] {
                        Some(file) if v & HAS_HOST != 0 => {
                            let host = (v >> 9 << 9) + (off & (gsize - 1));
                            file.read_at(part, host).map_err(FormatError::from)?;
                        }
                        _ => self.layers[depth].read(part, off)?,
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }
    fn write(&self, _buf: &[u8], _offset: u64) -> strata_format::Result<()> {
        Err(read_only())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> strata_format::Result<()> {
        Err(read_only())
    }
    fn write_zeroes_fast(
        &self,
        _offset: u64,
        _len: u64,
        _may_unmap: bool,
    ) -> strata_format::Result<bool> {
        Err(read_only())
    }
    fn discard(&self, _offset: u64, _len: u64) -> strata_format::Result<()> {
        Err(read_only())
    }
    fn flush(&self) -> strata_format::Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> strata_format::Result<Extent> {
        self.layers[0].block_status(offset, len)
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        self.layers[0].backing()
    }
    /// The view's chain is fixed; attaching a backing device is ignored.
    fn set_backing(&self, _backing: Option<Arc<dyn BlockDevice>>) {}
    fn read_only(&self) -> bool {
        true
    }
    fn allocated_bytes(&self) -> strata_format::Result<Option<u64>> {
        self.layers[0].allocated_bytes()
    }
    fn resize(&self, _new_size: u64, _allow_shrink: bool) -> strata_format::Result<()> {
        Err(read_only())
    }
    fn path(&self) -> Option<std::path::PathBuf> {
        self.layers[0].path()
    }
    fn cluster_size(&self) -> Option<u64> {
        self.layers[0].cluster_size()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use crate::{open, OpenSpec};
    use std::sync::Arc;
    use strata_format::qcow2::{create, CreateOptions, Preallocation};
    use strata_format::raw::RawImage;
    use strata_format::BlockDevice;
    use strata_storage::{FileStorage, Storage};

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn scribble(d: &dyn BlockDevice, rng: &mut Rng, seed: u8) {
        let size = d.virtual_size();
        for _ in 0..12 {
            let off = rng.below(size);
            let len = (1 + rng.below(200_000)).min(size - off);
            if rng.below(4) == 0 {
                d.write_zeroes(off, len, false).unwrap();
            } else {
                let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ seed | 1).collect();
                d.write(&data, off).unwrap();
            }
        }
        d.flush().unwrap();
    }

    /// base (raw, shorter) <- 4K clusters <- 64K with extended L2 <- 512-byte
    /// clusters <- 64K (longer): the indexed view reads exactly what the top reads,
    /// for random ranges, including ranges past the shorter layers' ends.
    #[test]
    fn indexed_view_reads_what_the_chain_reads() {
        let t = tempfile::tempdir().unwrap();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let raw: Arc<dyn Storage> = Arc::new(FileStorage::create(t.path().join("l0")).unwrap());
        let base = RawImage::create(raw, 3 << 20, Preallocation::Off).unwrap();
        scribble(&base, &mut rng, 1);
        drop(base);
        let layers = [
            (4096, false, 4u64 << 20),
            (65536, true, 4 << 20),
            (512, false, 4 << 20),
            (65536, false, 5 << 20),
        ];
        for (i, &(cs, ext, size)) in layers.iter().enumerate() {
            let s: Arc<dyn Storage> =
                Arc::new(FileStorage::create(t.path().join(format!("l{}", i + 1))).unwrap());
            let img = create(
                s,
                &CreateOptions {
                    size,
                    cluster_size: cs,
                    extended_l2: ext,
                    backing_file: Some(format!("l{i}")),
                    backing_format: Some(if i == 0 { "raw" } else { "qcow2" }.into()),
                    ..Default::default()
                },
            )
            .unwrap();
            scribble(&img, &mut rng, i as u8 + 2);
            img.close().unwrap();
        }
        let chain = open(&OpenSpec::new(t.path().join("l4"))).unwrap();
        assert_eq!(chain.layers.len(), 5);
        let view = chain.reader();
        assert!(view.as_any().is::<super::IndexedChain>());
        let top = chain.top();
        let size = top.virtual_size();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for round in 0..2000 {
            let off = rng.below(size);
            let len = (1 + rng.below(300_000)).min(size - off) as usize;
            a.resize(len, 0);
            b.resize(len, 0);
            view.read(&mut a, off).unwrap();
            top.read(&mut b, off).unwrap();
            assert!(a == b, "round {round}: {len} bytes at {off}");
        }
        let mut all = vec![0u8; size as usize];
        let mut want = vec![0u8; size as usize];
        view.read(&mut all, 0).unwrap();
        top.read(&mut want, 0).unwrap();
        assert!(all == want);
        assert!(view.write(&[0], 0).is_err());
    }

    #[test]
    fn a_writable_chain_is_read_through_its_top() {
        let t = tempfile::tempdir().unwrap();
        let s: Arc<dyn Storage> = Arc::new(FileStorage::create(t.path().join("a")).unwrap());
        create(
            s,
            &CreateOptions {
                size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap()
        .close()
        .unwrap();
        let chain = open(&OpenSpec::new(t.path().join("a")).write(true)).unwrap();
        assert!(!chain.reader().as_any().is::<super::IndexedChain>());
    }
}
