//! A corpus of malicious and malformed qcow2 images, one per bad-input class. Each
//! is built from a valid image by corrupting specific fields, and must be refused
//! with an error of the kind that class calls for (or, for damage only a check
//! finds, with the line qemu-img's check would print): never a panic, a hang or
//! a huge allocation. Where QEMU enforces the same rule, the real `qemu-img info` must
//! refuse the same file too.
//!
//! Allocation is measured: this test binary counts the bytes each thread holds,
//! and every case (and every random corruption) must stay under [`ALLOC_LIMIT`]
//! however large the image claims to be.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::sync::{mpsc, Arc};
use std::time::Duration;
use strata_format::qcow2::{
    create, CreateOptions, Qcow2Image, Qcow2OpenOptions, Repair, SnapshotSpec,
};
use strata_format::{fuzzing, BlockDevice, ErrorKind, Offset};
use strata_storage::{MemStorage, Storage};

/// Most bytes one case may hold allocated at once. QEMU's own limits allow a 32 MiB
/// L1 table and an 8 MiB refcount table; everything else must be bounded by what
/// the file really holds, or by fixed caches.
const ALLOC_LIMIT: usize = 256 << 20;
/// Snapshots in the snapshot-flood case.
const SNAPSHOT_FLOOD: usize = 4000;
/// A case still running after this long is taken to hang (each takes milliseconds).
const HANG_LIMIT: Duration = Duration::from_secs(60);

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(add: usize, sub: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get().saturating_add(add).saturating_sub(sub);
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counters
// are thread-local cells with constant initialisers, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: AllocLayout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            note(l.size(), 0);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: AllocLayout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            note(l.size(), 0);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: AllocLayout) {
        System.dealloc(p, l);
        note(0, l.size());
    }
    unsafe fn realloc(&self, p: *mut u8, l: AllocLayout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            note(new, l.size());
        }
        q
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Run `f` and return its result with the most bytes this thread held allocated at
/// once while it ran (beyond what it held before).
fn peak_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    (r, PEAK.with(Cell::get).saturating_sub(base))
}

/// Run `f` on its own thread; a panic or a hang becomes an error.
fn guarded<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(HANG_LIMIT) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(_)) => Err("PANICKED".into()),
        Err(_) => Err(format!("still running after {HANG_LIMIT:?}")),
    }
}

const CS: usize = 65536;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A valid v3 image: data in two L2 ranges, a compressed cluster, a snapshot.
fn base_with(opts: CreateOptions) -> Vec<u8> {
    let s = Arc::new(MemStorage::new());
    let img = create(s.clone(), &opts).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8 | 1).collect();
    img.write(&data, 0).unwrap();
    img.write(&data, 5 << 20).unwrap();
    let text = b"compressible ".repeat(opts.cluster_size as usize / 13 + 1);
    let z = img
        .compress_cluster(&text[..opts.cluster_size as usize])
        .unwrap();
    img.write_compressed_cluster(3 << 20 >> opts.cluster_size.trailing_zeros(), &z)
        .unwrap();
    img.snapshot_create(&SnapshotSpec {
        name: "snap".into(),
        ..Default::default()
    })
    .unwrap();
    img.write(&data[..4096], 65536).unwrap();
    img.close().unwrap();
    drop(img);
    s.snapshot()
}

fn base() -> Vec<u8> {
    base_with(CreateOptions {
        size: 16 << 20,
        ..Default::default()
    })
}

/// Offsets of interesting structures in an image made by [`base`].
struct Layout {
    l1: usize,
    reftable: usize,
    snapshots: usize,
    l2: usize,
    refblock: usize,
}

fn layout(b: &[u8]) -> Layout {
    let l1 = be64(b, 40) as usize;
    let reftable = be64(b, 48) as usize;
    Layout {
        l1,
        reftable,
        snapshots: be64(b, 64) as usize,
        l2: (be64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize,
        refblock: be64(b, reftable) as usize,
    }
}

/// Offset of header extension `magic`, if present.
fn extension(b: &[u8], magic: u32) -> Option<usize> {
    let mut p = be32(b, 100) as usize;
    while p + 8 <= CS {
        let (m, len) = (be32(b, p), be32(b, p + 4) as usize);
        if m == 0 {
            return None;
        }
        if m == magic {
            return Some(p);
        }
        p += 8 + len.div_ceil(8) * 8;
    }
    None
}

/// Insert header extension `ty` first, shifting the others (and anything after
/// them) down inside the first cluster.
fn insert_extension(b: &mut [u8], ty: u32, data: &[u8]) {
    let hl = be32(b, 100) as usize;
    let mut e = Vec::new();
    e.extend_from_slice(&ty.to_be_bytes());
    e.extend_from_slice(&(data.len() as u32).to_be_bytes());
    e.extend_from_slice(data);
    e.resize(e.len().next_multiple_of(8), 0);
    let tail = b[hl..CS - e.len()].to_vec();
    b[hl..hl + e.len()].copy_from_slice(&e);
    b[hl + e.len()..CS].copy_from_slice(&tail);
}

/// The data of a bitmaps extension.
fn bitmaps_ext(count: u32, dir_size: u64, dir_offset: u64) -> Vec<u8> {
    [
        count.to_be_bytes().as_slice(),
        &[0; 4],
        &dir_size.to_be_bytes(),
        &dir_offset.to_be_bytes(),
    ]
    .concat()
}

/// Where in the life of an image the bad input must be caught.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Opening (read-only) fails.
    Open,
    /// Opening works; reading, walking or listing fails.
    Use,
    /// Everything reads, and `check` reports the damage as corruption.
    Check,
    /// A read-only open works, a read-write open is refused.
    WriteOpen,
    /// Reads work; a guest write of the first cluster is refused and the image is
    /// marked corrupt.
    Write,
    /// A read-only open works, reads everything and leaves the file untouched; a
    /// read-write open repairs it.
    ReadOnlyUntouched,
    /// The image claims far more than the file holds: every use works within the
    /// allocation bound.
    Bounded,
}

/// What proves that a case was caught.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// An error of this kind, with a message.
    Kind(ErrorKind),
    /// A line of the check report containing this (lower case): the report is
    /// qemu-img's text, not an error.
    Reports(&'static str),
    /// The stage itself is the proof (the image is repaired, or stays usable).
    Nothing,
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    stage: Stage,
    expect: Expect,
    /// The real qemu-img refuses `info` on it as well.
    qemu_refuses: bool,
}

fn case(
    name: &'static str,
    stage: Stage,
    expect: Expect,
    qemu_refuses: bool,
    f: impl FnOnce(&mut Vec<u8>, &Layout),
) -> Case {
    let mut b = base();
    let l = layout(&b);
    f(&mut b, &l);
    Case {
        name,
        bytes: b,
        stage,
        expect,
        qemu_refuses,
    }
}

fn corpus() -> Vec<Case> {
    use ErrorKind as K;
    use Expect::*;
    use Stage::*;
    let mut v = vec![
        case("empty file", Open, Kind(K::Invalid), true, |b, _| b.clear()),
        case("one byte", Open, Kind(K::Invalid), true, |b, _| {
            b.truncate(1)
        }),
        case("truncated header", Open, Kind(K::Invalid), true, |b, _| {
            b.truncate(50)
        }),
        case("bad magic", Open, Kind(K::Invalid), true, |b, _| {
            b[0] = b'X'
        }),
        case("version 1", Open, Kind(K::Unsupported), true, |b, _| {
            put32(b, 4, 1)
        }),
        case("version 4", Open, Kind(K::Unsupported), true, |b, _| {
            put32(b, 4, 4)
        }),
        case("cluster bits 8", Open, Kind(K::Invalid), true, |b, _| {
            put32(b, 20, 8)
        }),
        case("cluster bits 22", Open, Kind(K::Invalid), true, |b, _| {
            put32(b, 20, 22)
        }),
        case(
            "header length below 104",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put32(b, 100, 96),
        ),
        case(
            "header length beyond the cluster",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put32(b, 100, CS as u32 + 8),
        ),
        case(
            "virtual size overflows",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put64(b, 24, u64::MAX - 511),
        ),
        case(
            "L1 table over 32 MiB",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put32(b, 36, (32 << 20) / 8 + 1),
        ),
        case(
            "L1 table too small for the size",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put32(b, 36, 0),
        ),
        case(
            "L1 offset unaligned",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put64(b, 40, 3 * CS as u64 + 8),
        ),
        case(
            "L1 offset past the end of the file",
            Open,
            Kind(K::Invalid),
            false,
            |b, _| put64(b, 40, 1 << 40),
        ),
        case(
            "L1 offset plus size overflows",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put64(b, 40, u64::MAX - CS as u64 + 1),
        ),
        case(
            "refcount table offset unaligned",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put64(b, 48, CS as u64 + 512),
        ),
        case(
            "refcount table of zero clusters",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put32(b, 56, 0),
        ),
        case(
            "refcount table over 8 MiB",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put32(b, 56, (8 << 20) / CS as u32 + 1),
        ),
        case(
            "refcount table past the end of the file",
            Open,
            Kind(K::Invalid),
            false,
            |b, _| put64(b, 48, 1 << 40),
        ),
        case("refcount order 7", Open, Kind(K::Invalid), true, |b, _| {
            put32(b, 96, 7)
        }),
        case(
            "backing name over 1023 bytes",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| {
                put64(b, 8, 4096);
                put32(b, 16, 1024);
            },
        ),
        case(
            "backing name outside the first cluster",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| {
                put64(b, 8, CS as u64 - 4);
                put32(b, 16, 100);
            },
        ),
        case(
            "unknown incompatible feature",
            Open,
            Kind(K::Unsupported),
            true,
            |b, _| {
                let f = be64(b, 72) | 1 << 40;
                put64(b, 72, f)
            },
        ),
        case(
            "named unknown incompatible feature",
            Open,
            Kind(K::Unsupported),
            true,
            |b, _| {
                let t = extension(b, 0x6803_f857).expect("feature table");
                let len = be32(b, t + 4) as usize;
                let mut e = t + 8;
                while e < t + 8 + len {
                    if b[e] == 0 {
                        b[e + 1] = 40;
                        b[e + 2..e + 48].fill(0);
                        b[e + 2..e + 13].copy_from_slice(b"time-travel");
                        break;
                    }
                    e += 48;
                }
                let f = be64(b, 72) | 1 << 40;
                put64(b, 72, f)
            },
        ),
        case(
            "LUKS encryption method without its header extension",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put32(b, 32, 2),
        ),
        case(
            "unknown encryption method",
            Open,
            Kind(K::Unsupported),
            true,
            |b, _| put32(b, 32, 3),
        ),
        case(
            "unknown compression type",
            Open,
            Kind(K::Unsupported),
            true,
            |b, _| {
                b[104] = 7;
                let f = be64(b, 72) | 1 << 3;
                put64(b, 72, f)
            },
        ),
        case(
            "zstd without the compression bit",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| b[104] = 1,
        ),
        case(
            "extension runs past the cluster",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| {
                let e = be32(b, 100) as usize;
                put32(b, e + 4, 0x7fff_fff0);
            },
        ),
        case(
            "too many snapshots",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put32(b, 60, 65537),
        ),
        case(
            "snapshot table offset unaligned",
            Open,
            Kind(K::Invalid),
            true,
            |b, l| put64(b, 64, l.snapshots as u64 + 4),
        ),
        case(
            // Opens as with QEMU: the table reads as zeros, and check reports it.
            "snapshot table past the end of the file",
            Check,
            Reports("snapshot table entry 0 is incomplete"),
            false,
            |b, _| put64(b, 64, 1 << 40),
        ),
        case(
            "snapshot extra data over 1024 bytes",
            Open,
            Kind(K::Invalid),
            true,
            |b, l| put32(b, l.snapshots + 36, 1028),
        ),
        case(
            "snapshot id longer than the table allows",
            Open,
            Kind(K::Invalid),
            false,
            |b, l| {
                // An id of 64 KiB at the end of a table that the header says is the last
                // structure: the entry then claims more than the 64 MiB table limit
                // allows once multiplied out over 65536 such entries.
                b[l.snapshots + 12..l.snapshots + 14].copy_from_slice(&0xffffu16.to_be_bytes());
                b[l.snapshots + 14..l.snapshots + 16].copy_from_slice(&0xffffu16.to_be_bytes());
                put32(b, 60, 65536);
            },
        ),
        // As with QEMU, an image whose snapshot L1 table is misplaced or too
        // large opens; using that snapshot is refused (img_parity_hostile pins
        // the refusals) and check reports the entry.
        case(
            "snapshot L1 offset unaligned",
            Check,
            Reports("l1 table is not cluster aligned; snapshot table entry corrupted"),
            false,
            |b, l| {
                let o = be64(b, l.snapshots);
                put64(b, l.snapshots, o + 8)
            },
        ),
        case(
            "snapshot L1 table over 32 MiB",
            Check,
            Reports("l1 table is too large; snapshot table entry corrupted"),
            false,
            |b, l| put32(b, l.snapshots + 8, (32 << 20) / 8 + 1),
        ),
        case(
            "L1 entry with an unaligned L2 offset",
            Use,
            Kind(K::Corrupt),
            false,
            |b, l| {
                let e = be64(b, l.l1);
                put64(b, l.l1, e + 512)
            },
        ),
        case(
            "L1 entry with reserved bits",
            Check,
            Reports("reserved bits set"),
            false,
            |b, l| {
                let e = be64(b, l.l1);
                put64(b, l.l1, e | 1 << 58)
            },
        ),
        case(
            "L2 entry with an unaligned data offset",
            Use,
            Kind(K::Corrupt),
            false,
            |b, l| {
                let e = be64(b, l.l2);
                put64(b, l.l2, e | 0x1000)
            },
        ),
        case(
            "L2 entry with reserved bits",
            Check,
            Reports("reserved bits set"),
            false,
            |b, l| {
                let e = be64(b, l.l2);
                put64(b, l.l2, e | 1 << 57)
            },
        ),
        case(
            "data cluster beyond the file's reach",
            Check,
            Reports("exceeding the end of the file"),
            false,
            |b, l| put64(b, l.l2, 1 << 63 | 1 << 55),
        ),
        case(
            "L2 entry pointing at the refcount table",
            Check,
            Reports("refcount=1 reference=2"),
            false,
            |b, l| put64(b, l.l2, 1 << 63 | CS as u64),
        ),
        case(
            "L1 entry pointing at the L1 table",
            Check,
            Reports("reference=3"),
            false,
            |b, l| {
                let off = l.l1 as u64;
                put64(b, l.l1, 1 << 63 | off)
            },
        ),
        case(
            "refcount block offset unaligned",
            Check,
            Reports("refcount"),
            false,
            |b, l| {
                let e = be64(b, l.reftable);
                put64(b, l.reftable, e + 512)
            },
        ),
        case(
            "refcount block counts nothing",
            Check,
            Reports("refcount=0 reference=1"),
            false,
            |b, l| b[l.refblock..l.refblock + CS].fill(0),
        ),
        case(
            "corrupt bit set",
            WriteOpen,
            Kind(K::MarkedCorrupt),
            false,
            |b, _| {
                let f = be64(b, 72) | 2;
                put64(b, 72, f)
            },
        ),
    ];
    // Compressed clusters: descriptor past the file, and a garbage stream.
    let compressed = |name, garbage: bool| {
        let mut b = base();
        let l = layout(&b);
        let idx = (3 << 20) / CS;
        let at = l.l2 + idx * 8;
        let e = be64(&b, at);
        assert!(e & 1 << 62 != 0, "the base has a compressed cluster");
        if garbage {
            let host = (e & ((1 << 54) - 1)) as usize;
            b[host..host + 64].fill(0xa5);
        } else {
            put64(&mut b, at, 1 << 62 | (1 << 50));
        }
        Case {
            name,
            bytes: b,
            stage: Stage::Use,
            expect: Kind(K::BadCompressedData),
            qemu_refuses: false,
        }
    };
    v.push(compressed(
        "compressed cluster past the end of the file",
        false,
    ));
    v.push(compressed("compressed cluster with a garbage stream", true));
    // Extended L2: a subcluster both allocated and zero.
    let mut b = base_with(CreateOptions {
        size: 16 << 20,
        extended_l2: true,
        ..Default::default()
    });
    let l = layout(&b);
    put64(&mut b, l.l2 + 8, 1 | 1 << 32);
    v.push(Case {
        name: "subcluster both allocated and zero",
        bytes: b,
        stage: Stage::Use,
        expect: Kind(K::Corrupt),
        qemu_refuses: false,
    });
    // A version 2 image with a zero flag.
    let mut b = base_with(CreateOptions {
        size: 16 << 20,
        version: 2,
        ..Default::default()
    });
    let l = layout(&b);
    let e = be64(&b, l.l2);
    put64(&mut b, l.l2, e | 1);
    v.push(Case {
        name: "zero flag in a version 2 image",
        bytes: b,
        stage: Stage::Use,
        expect: Kind(K::Corrupt),
        qemu_refuses: false,
    });
    // Bitmap directory outside the file.
    let mut b = base();
    let hl = be32(&b, 100) as usize;
    let ext = [
        0x2385_2875u32.to_be_bytes().as_slice(),
        24u32.to_be_bytes().as_slice(),
        1u32.to_be_bytes().as_slice(),
        0u32.to_be_bytes().as_slice(),
        1024u64.to_be_bytes().as_slice(),
        (1u64 << 40).to_be_bytes().as_slice(),
    ]
    .concat();
    // Insert the extension first; the rest shifts down inside the cluster.
    let tail: Vec<u8> = b[hl..CS - ext.len()].to_vec();
    b[hl..hl + ext.len()].copy_from_slice(&ext);
    b[hl + ext.len()..CS].copy_from_slice(&tail);
    let f = be64(&b, 88) | 1;
    put64(&mut b, 88, f);
    v.push(Case {
        name: "bitmap directory outside the file",
        bytes: b,
        stage: Stage::Use,
        expect: Kind(K::Corrupt),
        qemu_refuses: true,
    });
    // Header extensions inserted in front of the existing ones.
    let ext_case = |name, expect, qemu_refuses, ty: u32, data: &[u8], autoclear: u64| {
        let mut b = base();
        insert_extension(&mut b, ty, data);
        let f = be64(&b, 88) | autoclear;
        put64(&mut b, 88, f);
        Case {
            name,
            bytes: b,
            stage: Stage::Open,
            expect,
            qemu_refuses,
        }
    };
    v.push(ext_case(
        "backing format name of 16 bytes",
        Kind(K::Invalid),
        true,
        0xe279_2aca,
        b"qcow2qcow2qcow2q",
        0,
    ));
    v.push({
        let mut c = ext_case(
            "duplicate backing format extension",
            Kind(K::Invalid),
            false,
            0xe279_2aca,
            b"qcow2",
            0,
        );
        insert_extension(&mut c.bytes, 0xe279_2aca, b"raw");
        c
    });
    v.push(ext_case(
        "encryption extension without an encryption method",
        Kind(K::Invalid),
        true,
        0x0537_be77,
        &[0; 16],
        0,
    ));
    // External data files: a name that runs past the header cluster, a data file
    // that is not there, the raw-data bit without a data file.
    v.push({
        let mut c = ext_case(
            "data file name extension running past the header cluster",
            Kind(K::Invalid),
            true,
            0x4441_5441,
            b"d.raw",
            0,
        );
        let hl = be32(&c.bytes, 100) as usize;
        put32(&mut c.bytes, hl + 4, 0x1_0000);
        let f = be64(&c.bytes, 72) | 1 << 2;
        put64(&mut c.bytes, 72, f);
        c
    });
    v.push({
        let mut c = ext_case(
            "data file that does not exist",
            Kind(K::NotFound),
            false,
            0x4441_5441,
            b"/nonexistent-dir/strata-hostile-data.raw",
            0,
        );
        let f = be64(&c.bytes, 72) | 1 << 2;
        put64(&mut c.bytes, 72, f);
        c
    });
    v.push(case(
        "raw external data bit without a data file",
        Open,
        Kind(K::Invalid),
        false,
        |b, _| {
            let f = be64(b, 88) | 1 << 1;
            put64(b, 88, f)
        },
    ));
    v.push(ext_case(
        "bitmaps extension of 16 bytes",
        Kind(K::Invalid),
        true,
        0x2385_2875,
        &[0; 16],
        1,
    ));
    v.push(ext_case(
        "65536 bitmaps",
        Kind(K::Invalid),
        true,
        0x2385_2875,
        &bitmaps_ext(65536, 1024, 3 * CS as u64),
        1,
    ));
    v.push(ext_case(
        "bitmap directory over 64 MiB",
        Kind(K::Invalid),
        true,
        0x2385_2875,
        &bitmaps_ext(1, 1024 * 65535 + 8, 3 * CS as u64),
        1,
    ));
    v.push(ext_case(
        "bitmap directory offset unaligned",
        Kind(K::Invalid),
        true,
        0x2385_2875,
        &bitmaps_ext(1, 1024, 3 * CS as u64 + 512),
        1,
    ));
    v.extend([
        case(
            "header length not a multiple of 8",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put32(b, 100, 108),
        ),
        case(
            "compression bit without the compression field",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| {
                put32(b, 100, 104);
                let f = be64(b, 72) | 1 << 3;
                put64(b, 72, f)
            },
        ),
        case(
            "external data file bit without a data file name",
            Open,
            Kind(K::Invalid),
            false,
            |b, _| {
                let f = be64(b, 72) | 1 << 2;
                put64(b, 72, f)
            },
        ),
        case(
            "virtual size needing an L1 table over 32 MiB",
            Open,
            Kind(K::Invalid),
            true,
            |b, _| put64(b, 24, 1 << 62),
        ),
        case(
            "L1 table on the header",
            Open,
            Kind(K::Invalid),
            false,
            |b, _| put64(b, 40, 0),
        ),
        case(
            "refcount table on the header",
            Open,
            Kind(K::Invalid),
            false,
            |b, _| put64(b, 48, 0),
        ),
        case(
            "snapshot table on the header",
            Open,
            Kind(K::Invalid),
            false,
            |b, _| put64(b, 64, 0),
        ),
        case(
            "backing file offset in the fixed header",
            Open,
            Kind(K::Invalid),
            false,
            |b, _| {
                put64(b, 8, 16);
                put32(b, 16, 8);
            },
        ),
        case(
            "refcount block past the end of the file",
            Check,
            Reports("outside image"),
            false,
            |b, l| put64(b, l.reftable + 8, 1 << 40),
        ),
        case(
            "two refcount table entries share one block",
            Check,
            Reports("reference=2"),
            false,
            |b, l| {
                let e = be64(b, l.reftable);
                put64(b, l.reftable + 8, e)
            },
        ),
        case(
            "refcount table entry pointing at the refcount table",
            Check,
            Reports("reference=2"),
            false,
            |b, l| put64(b, l.reftable + 8, l.reftable as u64),
        ),
        case(
            "L1 entry pointing at the refcount table",
            Check,
            Reports("reference=2"),
            false,
            |b, l| {
                // A second L1 entry: the table (a whole cluster) already has room.
                put32(b, 36, 2);
                put64(b, l.l1 + 8, 1 << 63 | l.reftable as u64)
            },
        ),
        case(
            "one L2 table behind two L1 entries",
            Check,
            Reports("reference=2"),
            false,
            |b, l| {
                put32(b, 36, 2);
                let e = be64(b, l.l1);
                put64(b, l.l1 + 8, e)
            },
        ),
        case(
            "L2 table past the end of the file",
            Check,
            Reports("exceeding the end of the file"),
            false,
            |b, l| put64(b, l.l1, 1 << 63 | 1 << 50),
        ),
        case(
            "data cluster pointing at the L1 table, then written",
            Write,
            Kind(K::Corrupt),
            false,
            |b, l| put64(b, l.l2, 1 << 63 | l.l1 as u64),
        ),
        case(
            "data cluster pointing at the refcount table, then written",
            Write,
            Kind(K::Corrupt),
            false,
            |b, l| put64(b, l.l2, 1 << 63 | l.reftable as u64),
        ),
        case(
            "data cluster pointing at its own L2 table, then written",
            Write,
            Kind(K::Corrupt),
            false,
            |b, l| put64(b, l.l2, 1 << 63 | l.l2 as u64),
        ),
        case(
            "dirty image with a wrong refcount, opened read-only",
            ReadOnlyUntouched,
            Nothing,
            false,
            |b, l| {
                let f = be64(b, 72) | 1;
                put64(b, 72, f);
                // The L1 table's own refcount (16-bit entries) drops to zero.
                let at = l.refblock + 2 * (l.l1 / CS);
                b[at..at + 2].fill(0);
            },
        ),
        case(
            "thousands of snapshots sharing one 32 MiB L1 table",
            Bounded,
            Nothing,
            false,
            |b, l| {
                // Copies of the one snapshot entry, each claiming the largest L1
                // table QEMU allows (mostly past the end of the file).
                let s = l.snapshots;
                let var = be32(b, s + 36) as usize
                    + usize::from(u16::from_be_bytes([b[s + 12], b[s + 13]]))
                    + usize::from(u16::from_be_bytes([b[s + 14], b[s + 15]]));
                let mut entry = b[s..s + (40 + var).next_multiple_of(8)].to_vec();
                put32(&mut entry, 8, (32 << 20) / 8);
                let at = b.len().next_multiple_of(CS);
                b.resize(at, 0);
                for _ in 0..SNAPSHOT_FLOOD {
                    b.extend_from_slice(&entry);
                }
                put32(b, 60, SNAPSHOT_FLOOD as u32);
                put64(b, 64, at as u64);
            },
        ),
        case(
            "tables claiming a petabyte disk in a small file",
            Bounded,
            Nothing,
            false,
            |b, l| {
                // A 16 MiB L1 table and an 8 MiB refcount table, each starting in
                // the last clusters of the file and running far past its end, for
                // a disk of 2^50 bytes.
                let at = b.len().next_multiple_of(CS);
                let l1 = b[l.l1..l.l1 + 8].to_vec();
                let rt = b[l.reftable..l.reftable + 8].to_vec();
                b.resize(at + 2 * CS, 0);
                b[at..at + 8].copy_from_slice(&l1);
                b[at + CS..at + CS + 8].copy_from_slice(&rt);
                put64(b, 24, 1 << 50);
                put64(b, 40, at as u64);
                put32(b, 36, 2 << 20);
                put64(b, 48, (at + CS) as u64);
                put32(b, 56, (8 << 20) / CS as u32);
            },
        ),
    ]);
    // A zstd image whose compressed cluster holds a deflate stream.
    let mut b = base();
    b[104] = 1;
    let f = be64(&b, 72) | 1 << 3;
    put64(&mut b, 72, f);
    v.push(Case {
        name: "zstd image holding a deflate stream",
        bytes: b,
        stage: Stage::Use,
        expect: Kind(K::BadCompressedData),
        qemu_refuses: false,
    });
    // Extended L2: subclusters allocated without a host cluster. (A compressed
    // entry's bitmap is ignored by reads, as QEMU ignores it; only `check`
    // reports it.)
    {
        let (name, entry, bitmap) = ("subclusters allocated at host offset 0", 1u64 << 63, 1u64);
        let mut b = base_with(CreateOptions {
            size: 16 << 20,
            extended_l2: true,
            ..Default::default()
        });
        let l = layout(&b);
        put64(&mut b, l.l2, entry);
        put64(&mut b, l.l2 + 8, bitmap);
        v.push(Case {
            name,
            bytes: b,
            stage: Stage::Use,
            expect: Kind(K::Corrupt),
            qemu_refuses: false,
        });
    }
    // Extended L2 with clusters too small for 32 subclusters of 512 bytes.
    let mut b = base_with(CreateOptions {
        size: 16 << 20,
        extended_l2: true,
        ..Default::default()
    });
    put32(&mut b, 20, 12);
    v.push(Case {
        name: "extended L2 with 4 KiB clusters",
        bytes: b,
        stage: Stage::Open,
        expect: Kind(K::Invalid),
        qemu_refuses: true,
    });
    v
}

/// Run the stages of `c`: the message that proves it was caught, or what went wrong.
fn verdict(c: &Case) -> std::result::Result<String, String> {
    let open_on = |s: Arc<MemStorage>, rw: bool| {
        Qcow2Image::open(
            s,
            Qcow2OpenOptions {
                read_only: !rw,
                ..Default::default()
            },
        )
    };
    let open = |rw: bool| open_on(Arc::new(MemStorage::from_vec(c.bytes.clone())), rw);
    let must_be = |e: strata_format::Error| {
        let msg = e.to_string();
        match c.expect {
            Expect::Kind(k) if e.kind() == k && !e.message().trim().is_empty() => Ok(msg),
            other => Err(format!(
                "expected {other:?}, got a {:?} error: {msg}",
                e.kind()
            )),
        }
    };
    match c.stage {
        Stage::Open => match open(false) {
            Ok(_) => Err("opened".into()),
            Err(e) => must_be(e),
        },
        Stage::Use => {
            let img = open(false).map_err(|e| format!("open failed early: {e}"))?;
            match fuzzing::exercise_image(&img) {
                Ok(()) => Err("every use succeeded".into()),
                Err(e) => must_be(e),
            }
        }
        Stage::Check => {
            let img = open(false).map_err(|e| format!("open failed: {e}"))?;
            let report = img
                .check(Repair::None)
                .map_err(|e| format!("check failed: {e}"))?;
            if report.corruptions == 0 {
                return Err(format!("check found nothing: {report:?}"));
            }
            let text = report.messages.join("\n").to_lowercase();
            match c.expect {
                Expect::Reports(says) if text.contains(says) => Ok(text),
                other => Err(format!("expected {other:?} in the report: {text}")),
            }
        }
        Stage::WriteOpen => {
            open(false).map_err(|e| format!("read-only open refused: {e}"))?;
            match open(true) {
                Ok(_) => Err("opened for writing".into()),
                Err(e) => must_be(e),
            }
        }
        Stage::Write => {
            let s = Arc::new(MemStorage::from_vec(c.bytes.clone()));
            let img = open_on(s.clone(), true).map_err(|e| format!("open failed: {e}"))?;
            let mut buf = vec![0u8; 4096];
            img.read(&mut buf, 0)
                .map_err(|e| format!("read failed: {e}"))?;
            let msg = match img.write(&[0xeeu8; 4096], 0) {
                Ok(()) => return Err("the write went through".into()),
                // The refusal says where: the host offset the entry pointed at.
                Err(e) if !matches!(e.offset(), Some(Offset::Host(_))) => {
                    return Err(format!("the refusal names no host offset: {e}"))
                }
                Err(e) => must_be(e)?,
            };
            drop(img);
            let after = open_on(Arc::new(MemStorage::from_vec(s.snapshot())), false)
                .map_err(|e| format!("reopen failed: {e}"))?;
            if !after.header().is_corrupt() {
                return Err("the image was not marked corrupt".into());
            }
            Ok(msg)
        }
        Stage::ReadOnlyUntouched => {
            let s = Arc::new(MemStorage::from_vec(c.bytes.clone()));
            let img = open_on(s.clone(), false).map_err(|e| format!("open failed: {e}"))?;
            fuzzing::exercise_image(&img).map_err(|e| format!("use failed: {e}"))?;
            drop(img);
            if s.snapshot() != c.bytes {
                return Err("a read-only open changed the file".into());
            }
            let img = open_on(s, true).map_err(|e| format!("rw open failed: {e}"))?;
            let r = img.check(Repair::None).map_err(|e| e.to_string())?;
            if r.corruptions != 0 || img.header().is_dirty() {
                return Err(format!("a read-write open did not repair: {r:?}"));
            }
            Ok("repaired on a read-write open".into())
        }
        Stage::Bounded => {
            let img = open(false).map_err(|e| format!("open failed: {e}"))?;
            fuzzing::exercise_image(&img).map_err(|e| format!("use failed: {e}"))?;
            Ok(format!("usable, {} bytes claimed", img.virtual_size()))
        }
    }
}

#[test]
fn every_hostile_image_is_refused_with_a_clear_error() {
    let corpus = corpus();
    assert!(corpus.len() >= 60, "{} classes", corpus.len());
    let mut failures = Vec::new();
    for c in corpus {
        let name = c.name;
        let c = Arc::new(c);
        let r = guarded(move || {
            let (v, p1) = peak_alloc(|| verdict(&c));
            // Whatever the stage, the shared fuzzing entry points never panic.
            let (_, p2) = peak_alloc(|| fuzzing::exercise(&c.bytes));
            let (_, p3) = peak_alloc(|| fuzzing::exercise_write(&c.bytes));
            (v, p1.max(p2).max(p3))
        });
        match r {
            Ok((Ok(msg), peak)) if peak <= ALLOC_LIMIT => {
                eprintln!("{name}: {msg} (peak allocation {} KiB)", peak >> 10)
            }
            Ok((Ok(_), peak)) => failures.push(format!("{name}: allocated {peak} bytes")),
            Ok((Err(m), _)) => failures.push(format!("{name}: {m}")),
            Err(m) => failures.push(format!("{name}: {m}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn qemu_img_refuses_the_same_headers() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (i, c) in corpus().iter().enumerate().filter(|(_, c)| c.qemu_refuses) {
        let p = dir.path().join(format!("case{i}.qcow2"));
        std::fs::write(&p, &c.bytes).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["info", "-f", "qcow2"])
            .arg(&p)
            .output()
            .expect("qemu-img must be installed");
        if out.status.success() {
            failures.push(c.name);
        }
    }
    assert!(failures.is_empty(), "qemu-img accepted: {failures:?}");
}

#[test]
fn a_valid_base_passes_every_stage() {
    // The corpus means something only if its starting point is accepted.
    for b in [
        base(),
        base_with(CreateOptions {
            size: 16 << 20,
            extended_l2: true,
            ..Default::default()
        }),
    ] {
        fuzzing::exercise(&b).unwrap();
        let img = Qcow2Image::open(
            Arc::new(MemStorage::from_vec(b)),
            Qcow2OpenOptions::default(),
        )
        .unwrap();
        assert_eq!(img.check(Repair::None).unwrap().corruptions, 0);
        let _ = img.storage().size();
    }
}

mod mutations {
    use super::*;
    use proptest::prelude::*;

    fn images() -> Vec<Vec<u8>> {
        vec![
            base(),
            base_with(CreateOptions {
                size: 16 << 20,
                extended_l2: true,
                ..Default::default()
            }),
            base_with(CreateOptions {
                size: 8 << 20,
                version: 2,
                cluster_size: 4096,
                ..Default::default()
            }),
            base_with(CreateOptions {
                size: 8 << 20,
                cluster_size: 512,
                refcount_bits: 2,
                ..Default::default()
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// Random byte and field corruptions of valid images (header, tables and
        /// data alike) never make the driver panic, hang or allocate without bound, read-only
        /// or read-write.
        #[test]
        fn random_corruption_never_panics(
            which in 0usize..4,
            edits in proptest::collection::vec((0usize..(1 << 20), any::<u8>(), 0u8..3), 1..12),
        ) {
            let mut b = images().swap_remove(which);
            let meta_end = (be64(&b, 48) as usize + 4 * CS).min(b.len());
            for (pos, val, mode) in edits {
                // Mostly hit the header and metadata, where the parsing is.
                let at = match mode {
                    0 => pos % 512,
                    1 => pos % meta_end,
                    _ => pos % b.len(),
                };
                b[at] = val;
            }
            let r = guarded(move || {
                let (_, p1) = peak_alloc(|| fuzzing::exercise(&b));
                let (_, p2) = peak_alloc(|| fuzzing::exercise_write(&b));
                p1.max(p2)
            });
            match r {
                Ok(peak) => prop_assert!(peak <= ALLOC_LIMIT, "allocated {} bytes", peak),
                Err(m) => prop_assert!(false, "{}", m),
            }
        }
    }
}

#[test]
fn every_fuzz_seed_reads_and_writes_cleanly() {
    // The seeds are valid QEMU-made images (v2, v3 with a snapshot, extended L2,
    // compressed): both exercises must succeed on them, not merely not panic.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/open_image");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).expect("the fuzz seed corpus") {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let name = path.display().to_string();
        let r = guarded(move || {
            fuzzing::exercise(&bytes).map_err(|e| format!("read-only: {e}"))?;
            fuzzing::exercise_write(&bytes).map_err(|e| format!("read-write: {e}"))
        });
        match r {
            Ok(Ok(())) => seeds += 1,
            Ok(Err(m)) | Err(m) => panic!("{name}: {m}"),
        }
    }
    assert!(seeds >= 4, "{seeds} seeds");
}

/// A valid LUKS-encrypted image, its password, and where its encryption header
/// extension lies in the first cluster.
fn luks_base() -> (Vec<u8>, usize) {
    use strata_format::crypto::luks::LuksCreateOptions;
    use strata_format::qcow2::encryption::LuksEncrypt;
    let b = base_with(CreateOptions {
        size: 16 << 20,
        encrypt: Some(LuksEncrypt {
            options: LuksCreateOptions {
                iter_time_ms: 1,
                ..Default::default()
            },
            password: LUKS_PASSWORD.as_bytes().into(),
        }),
        ..Default::default()
    });
    let ext = extension(&b, 0x0537_be77).expect("crypto extension");
    (b, ext)
}

const LUKS_PASSWORD: &str = "hostile";

/// A LUKS-encrypted image damaged by `f(bytes, ext, area)` (`ext`: the header
/// extension's position; `area`: the LUKS area's offset in the file).
fn luks_case(
    name: &'static str,
    expect: ErrorKind,
    qemu_refuses: bool,
    f: impl FnOnce(&mut Vec<u8>, usize, usize),
) -> Case {
    let (mut b, ext) = luks_base();
    let area = be64(&b, ext + 8) as usize;
    f(&mut b, ext, area);
    Case {
        name,
        bytes: b,
        stage: Stage::Open,
        expect: Expect::Kind(expect),
        qemu_refuses,
    }
}

/// Bad LUKS headers, bad key slots, bad extension fields, overflowing sizes.
fn luks_corpus() -> Vec<Case> {
    use ErrorKind as K;
    let slot = |area: usize, i: usize| area + 208 + 48 * i;
    vec![
        luks_case("LUKS magic wrong", K::Invalid, true, |b, _, a| b[a] = b'X'),
        luks_case("LUKS version 2", K::Unsupported, true, |b, _, a| {
            b[a + 7] = 2
        }),
        luks_case(
            "LUKS cipher name without NUL",
            K::Invalid,
            true,
            |b, _, a| b[a + 8..a + 40].fill(b'a'),
        ),
        luks_case("LUKS hash spec without NUL", K::Invalid, true, |b, _, a| {
            b[a + 72..a + 104].fill(b's')
        }),
        luks_case(
            "LUKS payload inside the header",
            K::Invalid,
            true,
            |b, _, a| put32(b, a + 104, 1),
        ),
        luks_case(
            "LUKS master key iterations zero",
            K::Invalid,
            true,
            |b, _, a| put32(b, a + 164, 0),
        ),
        luks_case(
            "LUKS key slot stripes wrong",
            K::Invalid,
            true,
            |b, _, a| put32(b, slot(a, 3) + 44, 5),
        ),
        luks_case(
            "LUKS key slot state garbage",
            K::Invalid,
            true,
            |b, _, a| put32(b, slot(a, 2), 1),
        ),
        luks_case(
            "LUKS active key slot with zero iterations",
            K::Invalid,
            true,
            |b, _, a| put32(b, slot(a, 0) + 4, 0),
        ),
        luks_case(
            "LUKS key material inside the header",
            K::Invalid,
            true,
            |b, _, a| put32(b, slot(a, 0) + 40, 1),
        ),
        luks_case(
            "LUKS key material in the payload",
            K::Invalid,
            true,
            |b, _, a| put32(b, slot(a, 7) + 40, 4000),
        ),
        luks_case(
            // QEMU's 32-bit sum of offset and length wraps here and lets it pass.
            "LUKS key material offset at 2^32-1",
            K::Invalid,
            false,
            |b, _, a| put32(b, slot(a, 5) + 40, u32::MAX),
        ),
        luks_case("LUKS key slots overlapping", K::Invalid, true, |b, _, a| {
            let o = be32(b, slot(a, 4) + 40);
            put32(b, slot(a, 5) + 40, o)
        }),
        luks_case("LUKS key bytes 2^32-1", K::Invalid, true, |b, _, a| {
            put32(b, a + 108, u32::MAX)
        }),
        luks_case("LUKS key bytes zero", K::Invalid, true, |b, _, a| {
            put32(b, a + 108, 0)
        }),
        luks_case(
            // QEMU implements Twofish; strata says it does not.
            "LUKS cipher strata does not implement",
            K::Unsupported,
            false,
            |b, _, a| b[a + 8..a + 16].copy_from_slice(b"twofish\0"),
        ),
        luks_case("LUKS unknown hash", K::Invalid, true, |b, _, a| {
            b[a + 72..a + 80].copy_from_slice(b"sha2566\0")
        }),
        luks_case(
            "LUKS cipher mode without IV generator",
            K::Invalid,
            true,
            |b, _, a| {
                b[a + 40..a + 72].fill(0);
                b[a + 40..a + 43].copy_from_slice(b"xts")
            },
        ),
        luks_case(
            "LUKS ESSIV without its hash",
            K::Invalid,
            true,
            |b, _, a| {
                b[a + 40..a + 72].fill(0);
                b[a + 40..a + 49].copy_from_slice(b"cbc-essiv");
                put32(b, a + 108, 32)
            },
        ),
        luks_case(
            "encryption extension of 20 bytes",
            K::Invalid,
            true,
            |b, e, _| put32(b, e + 4, 20),
        ),
        luks_case(
            "encryption header offset unaligned",
            K::Invalid,
            true,
            |b, e, _| {
                let o = be64(b, e + 8);
                put64(b, e + 8, o + 512)
            },
        ),
        luks_case(
            "encryption header offset near 2^64",
            K::Invalid,
            true,
            |b, e, _| put64(b, e + 8, u64::MAX - 0xffff),
        ),
        // QEMU reads the key material only once a secret is given: `info` passes.
        luks_case(
            "encryption area shorter than its key material",
            K::Invalid,
            false,
            |b, e, _| put64(b, e + 16, 4096),
        ),
        luks_case(
            "encryption area length near 2^64 past the file",
            K::Invalid,
            true,
            |b, e, _| {
                put64(b, e + 8, 1 << 40);
                put64(b, e + 16, u64::MAX)
            },
        ),
        // QEMU reads the key material only once a secret is given: `info` passes.
        luks_case(
            "LUKS key material of the only slot damaged",
            K::Key,
            false,
            |b, _, a| {
                let m = a + 512 * be32(b, slot(a, 0) + 40) as usize;
                b[m..m + 100].iter_mut().for_each(|x| *x ^= 0xff)
            },
        ),
        luks_case("wrong password", K::Key, false, |b, _, a| {
            // The master key digest no longer matches any slot's key.
            b[a + 112] ^= 1
        }),
    ]
}

#[test]
fn every_hostile_luks_image_is_refused_with_a_clear_error_as_qemu_refuses_it() {
    use strata_format::qcow2::Unlock;
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (i, c) in luks_corpus().into_iter().enumerate() {
        let name = c.name;
        let c = Arc::new(c);
        let c2 = c.clone();
        let r = guarded(move || {
            peak_alloc(|| {
                let s = Arc::new(MemStorage::from_vec(c2.bytes.clone()));
                let opened = Qcow2Image::open(
                    s,
                    Qcow2OpenOptions {
                        read_only: true,
                        unlock: Unlock::Secret(LUKS_PASSWORD.as_bytes().into()),
                        ..Default::default()
                    },
                );
                match (opened, c2.expect) {
                    (Ok(_), _) => Err("opened".to_string()),
                    (Err(e), Expect::Kind(k)) if e.kind() == k && !e.message().is_empty() => {
                        Ok(e.to_string())
                    }
                    (Err(e), other) => Err(format!("expected {other:?}, got {:?}: {e}", e.kind())),
                }
            })
        });
        match r {
            Ok((Ok(msg), peak)) if peak <= ALLOC_LIMIT => eprintln!("{name}: {msg}"),
            Ok((Ok(_), peak)) => failures.push(format!("{name}: allocated {peak} bytes")),
            Ok((Err(m), _)) | Err(m) => failures.push(format!("{name}: {m}")),
        }
        if c.qemu_refuses {
            let p = dir.path().join(format!("luks{i}.qcow2"));
            std::fs::write(&p, &c.bytes).unwrap();
            let out = std::process::Command::new("qemu-img")
                .args(["info", "-f", "qcow2"])
                .arg(&p)
                .output()
                .expect("qemu-img must be installed");
            if out.status.success() {
                failures.push(format!("{name}: qemu-img accepted it"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A key-slot change on a LUKS image: opened with the image's password, with
/// `other` as secret `s1`.
fn change_slots(
    bytes: Vec<u8>,
    req: &strata_format::crypto::keyslots::KeySlotRequest,
) -> (
    Result<(), strata_format::qcow2::key_slots::KeySlotError>,
    Vec<u8>,
) {
    use strata_format::qcow2::Unlock;
    let s = Arc::new(MemStorage::from_vec(bytes));
    let mut img = Qcow2Image::open(
        s.clone(),
        Qcow2OpenOptions {
            unlock: Unlock::Secret(LUKS_PASSWORD.as_bytes().into()),
            ..Default::default()
        },
    )
    .expect("the image opens");
    let secret = |id: &str| match id {
        "s1" => Ok(b"other".to_vec()),
        _ => Err(strata_format::Error::invalid_argument(format!(
            "No secret with id '{id}'"
        ))),
    };
    let r = img.change_key_slots(req, LUKS_PASSWORD.as_bytes(), &secret, false);
    drop(img);
    (r, s.snapshot())
}

#[test]
fn a_key_slot_change_on_a_damaged_luks_area_is_refused_clearly_and_writes_nothing() {
    use strata_format::crypto::keyslots::{KeySlotRequest, SlotState};
    let (b, ext) = luks_base();
    let area = be64(&b, ext + 8) as usize;
    let slot = |i: usize| area + 208 + 48 * i;
    let add = |keyslot| KeySlotRequest {
        state: SlotState::Active,
        new_secret: Some("s1".into()),
        old_secret: None,
        keyslot: Some(keyslot),
        iter_time: Some(1),
    };
    // The header extension says the area ends inside slot 7's key material:
    // nothing is written past it (QEMU's refusal).
    let mut short = b.clone();
    let len = 512 * be32(&b, slot(7) + 40) as u64 + 1000;
    put64(&mut short, ext + 16, len);
    let (r, after) = change_slots(short.clone(), &add(7));
    match r {
        Err(e) => assert_eq!(
            e.error().message(),
            "Request for data outside of extension header"
        ),
        Ok(()) => panic!("a key was written past the end of the LUKS area"),
    }
    assert_eq!(after, short, "the image changed");
    // A second key whose material is then damaged opens nothing: erasing the
    // keys of its password finds none, and says so.
    let (r, with_two) = change_slots(b.clone(), &add(3));
    r.expect("the key is added");
    let mut damaged = with_two.clone();
    let m = area + 512 * be32(&damaged, slot(3) + 40) as usize;
    damaged[m..m + 64].iter_mut().for_each(|x| *x ^= 0x5a);
    let erase = KeySlotRequest {
        state: SlotState::Inactive,
        new_secret: None,
        old_secret: Some("s1".into()),
        keyslot: None,
        iter_time: None,
    };
    let (r, after) = change_slots(damaged.clone(), &erase);
    let e = r.expect_err("no slot opens with the damaged key");
    assert_eq!(
        e.error().message(),
        "No keyslots match given (old) password for erase operation"
    );
    assert_eq!(after[area..], damaged[area..], "the LUKS area changed");
}
