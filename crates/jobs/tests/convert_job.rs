//! The convert job through its library interface: progress covers the whole target,
//! a cancelled job stops between windows with `Cancelled`, and a source read
//! through the driver (no file map) converts the same as a mapped one.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use strata_chain::OpenSpec;
use strata_format::{BlockDevice, Format};
use strata_jobs::convert::{convert, ConvertOptions, Plan};
use strata_jobs::status::ChainStatus;
use strata_jobs::{Cancel, Error, Progress};

const SIZE: u64 = 64 << 20;

/// A raw source with data every other MiB (patterned so misplaced bytes show).
fn source(dir: &Path) -> ChainStatus {
    let p = dir.join("src.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(SIZE).unwrap();
    use std::os::unix::fs::FileExt;
    for mib in (0..SIZE >> 20).step_by(2) {
        let block: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(31) ^ mib as u32) as u8 | 1)
            .collect();
        f.write_all_at(&block, mib << 20).unwrap();
    }
    let chain = strata_chain::open(&OpenSpec::new(&p).format(Some(Format::Raw))).unwrap();
    ChainStatus::new(&chain).unwrap()
}

fn target(dir: &Path, name: &str) -> Arc<dyn BlockDevice> {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
    strata_chain::open_image(&p, Format::Raw, true, false).unwrap()
}

/// Counts progress and cancels once `cancel_after` bytes are done.
struct Counter<'a> {
    done: AtomicU64,
    total: AtomicU64,
    cancel_after: u64,
    cancel: &'a Cancel,
}

impl Progress for Counter<'_> {
    fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::SeqCst);
    }
    fn advance(&self, n: u64) {
        let d = self.done.fetch_add(n, Ordering::SeqCst) + n;
        if d >= self.cancel_after {
            self.cancel.cancel();
        }
    }
}

fn counter(cancel: &Cancel, cancel_after: u64) -> Counter<'_> {
    Counter {
        done: AtomicU64::new(0),
        total: AtomicU64::new(0),
        cancel_after,
        cancel,
    }
}

fn same(a: &dyn BlockDevice, b: &dyn BlockDevice) -> bool {
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    (0..SIZE >> 20).all(|i| {
        a.read(&mut x, i << 20).unwrap();
        b.read(&mut y, i << 20).unwrap();
        x == y
    })
}

#[test]
fn progress_covers_the_whole_target_and_data_arrives_mapped_or_read() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    for (name, map_sources, out_of_order) in
        [("mapped.raw", true, false), ("read.raw", false, true)]
    {
        let opts = ConvertOptions {
            map_sources,
            out_of_order,
            workers: 3,
            ..ConvertOptions::default()
        };
        let cancel = Cancel::default();
        let plan = Plan::new(std::slice::from_ref(&src), &opts, 512, &cancel).unwrap();
        assert_eq!(plan.total(), SIZE);
        assert_eq!(plan.data_bytes, SIZE / 2, "holes are never read");
        let t = target(dir.path(), name);
        let p = counter(&cancel, u64::MAX);
        let stats = convert(std::slice::from_ref(&src), &plan, &t, &opts, &p, &cancel).unwrap();
        assert_eq!(p.total.load(Ordering::SeqCst), SIZE);
        assert_eq!(p.done.load(Ordering::SeqCst), SIZE);
        assert_eq!(stats.data_bytes, SIZE / 2);
        assert!(same(src.layer(0).as_ref(), t.as_ref()), "{name} differs");
    }
}

#[test]
fn cancelled_job_stops_between_windows() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let opts = ConvertOptions {
        workers: 1,
        ..ConvertOptions::default()
    };
    let cancel = Cancel::default();
    let plan = Plan::new(std::slice::from_ref(&src), &opts, 512, &cancel).unwrap();
    let t = target(dir.path(), "out.raw");
    // Cancel once the first window is written.
    let p = counter(&cancel, 1);
    let r = convert(std::slice::from_ref(&src), &plan, &t, &opts, &p, &cancel);
    assert!(matches!(r, Err(Error::Cancelled)), "{:?}", r.err());
    let done = p.done.load(Ordering::SeqCst);
    assert!(done > 0 && done < SIZE, "stopped early, after {done} bytes");

    // Cancelled before it starts: nothing is written.
    let cancel = Cancel::default();
    cancel.cancel();
    let t = target(dir.path(), "none.raw");
    let p = counter(&cancel, u64::MAX);
    let r = convert(std::slice::from_ref(&src), &plan, &t, &opts, &p, &cancel);
    assert!(matches!(r, Err(Error::Cancelled)));
    assert_eq!(p.done.load(Ordering::SeqCst), 0);
    assert!(t.allocated_bytes().unwrap().unwrap_or(0) == 0);
}
