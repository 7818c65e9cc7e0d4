//! A corpus of malicious and malformed qcow2 images, one per bad-input class. Each
//! is built from a valid image by corrupting specific fields, and must be refused
//! with an error that says what is wrong: never a panic, a hang or a huge
//! allocation. Where QEMU enforces the same rule, the real `qemu-img info` must
//! refuse the same file too.

use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_format::qcow2::{
    create, CreateOptions, Qcow2Image, Qcow2OpenOptions, Repair, SnapshotSpec,
};
use strata_format::{fuzzing, BlockDevice};
use strata_storage::{MemStorage, Storage};

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
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    stage: Stage,
    /// Part of the error message (lower case).
    says: &'static str,
    /// The real qemu-img refuses `info` on it as well.
    qemu_refuses: bool,
}

fn case(
    name: &'static str,
    stage: Stage,
    says: &'static str,
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
        says,
        qemu_refuses,
    }
}

fn corpus() -> Vec<Case> {
    use Stage::*;
    let mut v = vec![
        case("empty file", Open, "", true, |b, _| b.clear()),
        case("one byte", Open, "", true, |b, _| b.truncate(1)),
        case("truncated header", Open, "", true, |b, _| b.truncate(50)),
        case("bad magic", Open, "", false, |b, _| b[0] = b'X'),
        case("version 1", Open, "version", true, |b, _| put32(b, 4, 1)),
        case("version 4", Open, "version", true, |b, _| put32(b, 4, 4)),
        case("cluster bits 8", Open, "cluster", true, |b, _| {
            put32(b, 20, 8)
        }),
        case("cluster bits 22", Open, "cluster", true, |b, _| {
            put32(b, 20, 22)
        }),
        case("header length below 104", Open, "header", true, |b, _| {
            put32(b, 100, 96)
        }),
        case(
            "header length beyond the cluster",
            Open,
            "header",
            true,
            |b, _| put32(b, 100, CS as u32 + 8),
        ),
        case("virtual size overflows", Open, "", true, |b, _| {
            put64(b, 24, u64::MAX - 511)
        }),
        case("L1 table over 32 MiB", Open, "l1", true, |b, _| {
            put32(b, 36, (32 << 20) / 8 + 1)
        }),
        case(
            "L1 table too small for the size",
            Open,
            "l1",
            true,
            |b, _| put32(b, 36, 0),
        ),
        case("L1 offset unaligned", Open, "l1", true, |b, _| {
            put64(b, 40, 3 * CS as u64 + 8)
        }),
        case(
            "L1 offset past the end of the file",
            Open,
            "",
            false,
            |b, _| put64(b, 40, 1 << 40),
        ),
        case("L1 offset plus size overflows", Open, "", true, |b, _| {
            put64(b, 40, u64::MAX - CS as u64 + 1)
        }),
        case(
            "refcount table offset unaligned",
            Open,
            "reference count",
            true,
            |b, _| put64(b, 48, CS as u64 + 512),
        ),
        case(
            "refcount table of zero clusters",
            Open,
            "reference count",
            true,
            |b, _| put32(b, 56, 0),
        ),
        case(
            "refcount table over 8 MiB",
            Open,
            "reference count",
            true,
            |b, _| put32(b, 56, (8 << 20) / CS as u32 + 1),
        ),
        case(
            "refcount table past the end of the file",
            Open,
            "",
            false,
            |b, _| put64(b, 48, 1 << 40),
        ),
        case("refcount order 7", Open, "refcount", true, |b, _| {
            put32(b, 96, 7)
        }),
        case(
            "backing name over 1023 bytes",
            Open,
            "backing",
            true,
            |b, _| {
                put64(b, 8, 4096);
                put32(b, 16, 1024);
            },
        ),
        case(
            "backing name outside the first cluster",
            Open,
            "backing",
            true,
            |b, _| {
                put64(b, 8, CS as u64 - 4);
                put32(b, 16, 100);
            },
        ),
        case(
            "unknown incompatible feature",
            Open,
            "feature",
            true,
            |b, _| {
                let f = be64(b, 72) | 1 << 40;
                put64(b, 72, f)
            },
        ),
        case(
            "named unknown incompatible feature",
            Open,
            "time-travel",
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
        case("encryption method set", Open, "encrypt", true, |b, _| {
            put32(b, 32, 2)
        }),
        case(
            "unknown compression type",
            Open,
            "compression",
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
            "compression",
            true,
            |b, _| b[104] = 1,
        ),
        case(
            "extension runs past the cluster",
            Open,
            "extension",
            true,
            |b, _| {
                let e = be32(b, 100) as usize;
                put32(b, e + 4, 0x7fff_fff0);
            },
        ),
        case("too many snapshots", Open, "snapshot", true, |b, _| {
            put32(b, 60, 65537)
        }),
        case(
            "snapshot table offset unaligned",
            Open,
            "snapshot",
            true,
            |b, l| put64(b, 64, l.snapshots as u64 + 4),
        ),
        case(
            "snapshot table past the end of the file",
            Open,
            "snapshot",
            false,
            |b, _| put64(b, 64, 1 << 40),
        ),
        case(
            "snapshot extra data over 1024 bytes",
            Open,
            "snapshot",
            true,
            |b, l| put32(b, l.snapshots + 36, 1028),
        ),
        case(
            "snapshot id longer than the table allows",
            Open,
            "snapshot",
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
        case(
            "snapshot L1 offset unaligned",
            Open,
            "snapshot",
            false,
            |b, l| {
                let o = be64(b, l.snapshots);
                put64(b, l.snapshots, o + 8)
            },
        ),
        case(
            "snapshot L1 table over 32 MiB",
            Open,
            "snapshot",
            false,
            |b, l| put32(b, l.snapshots + 8, (32 << 20) / 8 + 1),
        ),
        case(
            "L1 entry with an unaligned L2 offset",
            Use,
            "",
            false,
            |b, l| {
                let e = be64(b, l.l1);
                put64(b, l.l1, e + 512)
            },
        ),
        case(
            "L1 entry past the end of the file",
            Use,
            "",
            false,
            |b, l| put64(b, l.l1, 1 << 62 | 1 << 50),
        ),
        case("L1 entry with reserved bits", Use, "", false, |b, l| {
            let e = be64(b, l.l1);
            put64(b, l.l1, e | 1 << 58)
        }),
        case(
            "L2 entry with an unaligned data offset",
            Use,
            "",
            false,
            |b, l| {
                let e = be64(b, l.l2);
                put64(b, l.l2, e | 0x1000)
            },
        ),
        case("L2 entry with reserved bits", Use, "", false, |b, l| {
            let e = be64(b, l.l2);
            put64(b, l.l2, e | 1 << 57)
        }),
        case(
            "data cluster beyond the file's reach",
            Check,
            "beyond the end",
            false,
            |b, l| put64(b, l.l2, 1 << 63 | 1 << 55),
        ),
        case(
            "L2 entry pointing at the refcount table",
            Check,
            "refcount=1 reference=2",
            false,
            |b, l| put64(b, l.l2, 1 << 63 | CS as u64),
        ),
        case(
            "L1 entry pointing at the L1 table",
            Check,
            "",
            false,
            |b, l| {
                let off = l.l1 as u64;
                put64(b, l.l1, 1 << 63 | off)
            },
        ),
        case(
            "refcount block offset unaligned",
            Check,
            "refcount",
            false,
            |b, l| {
                let e = be64(b, l.reftable);
                put64(b, l.reftable, e + 512)
            },
        ),
        case("refcount block counts nothing", Check, "", false, |b, l| {
            b[l.refblock..l.refblock + CS].fill(0)
        }),
        case("corrupt bit set", WriteOpen, "corrupt", false, |b, _| {
            let f = be64(b, 72) | 2;
            put64(b, 72, f)
        }),
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
            says: "compress",
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
        says: "",
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
        says: "",
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
        says: "bitmap",
        qemu_refuses: true,
    });
    v
}

/// Run the stages of `c` and return what happened.
fn verdict(c: &Case) -> std::result::Result<(), String> {
    let open = |rw: bool| {
        Qcow2Image::open(
            Arc::new(MemStorage::from_vec(c.bytes.clone())),
            Qcow2OpenOptions {
                read_only: !rw,
                ..Default::default()
            },
        )
    };
    let low = |e: &dyn std::fmt::Display| e.to_string().to_lowercase();
    let must_say = |msg: String| {
        if msg.contains(c.says) && !msg.trim().is_empty() {
            Ok(())
        } else {
            Err(format!("error does not say '{}': {msg}", c.says))
        }
    };
    match c.stage {
        Stage::Open => match open(false) {
            Ok(_) => Err("opened".into()),
            Err(e) => must_say(low(&e)),
        },
        Stage::Use => {
            let img = open(false).map_err(|e| format!("open failed early: {e}"))?;
            let r = fuzzing::exercise_image(&img).and_then(|()| img.bitmaps().map(|_| ()));
            match r {
                Ok(()) => Err("every use succeeded".into()),
                Err(e) => must_say(low(&e)),
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
            must_say(report.messages.join("\n").to_lowercase())
        }
        Stage::WriteOpen => {
            open(false).map_err(|e| format!("read-only open refused: {e}"))?;
            match open(true) {
                Ok(_) => Err("opened for writing".into()),
                Err(e) => must_say(low(&e)),
            }
        }
    }
}

#[test]
fn every_hostile_image_is_refused_with_a_clear_error() {
    let corpus = corpus();
    assert!(corpus.len() >= 50, "{} classes", corpus.len());
    let mut failures = Vec::new();
    for c in &corpus {
        let t = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| verdict(c)));
        let took = t.elapsed();
        match r {
            Ok(Ok(())) if took < Duration::from_secs(5) => {}
            Ok(Ok(())) => failures.push(format!("{}: took {took:?}", c.name)),
            Ok(Err(m)) => failures.push(format!("{}: {m}", c.name)),
            Err(_) => failures.push(format!("{}: PANICKED", c.name)),
        }
        // Whatever the stage, the shared fuzzing entry point never panics.
        let _ = std::panic::catch_unwind(|| fuzzing::exercise(&c.bytes))
            .unwrap_or_else(|_| panic!("{}: exercise panicked", c.name));
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
        /// data alike) never make the driver panic, hang or allocate without bound.
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
            let t = Instant::now();
            let _ = fuzzing::exercise(&b);
            prop_assert!(t.elapsed() < Duration::from_secs(5));
        }
    }
}
