//! Model-based tests: random operation sequences against an in-memory reference disk.
//!
//! Every configuration (cluster size, refcount width, version, extended L2, lazy
//! refcounts, with or without a backing file) runs random writes, write-zeroes,
//! discards, flushes and reopens; after each step the whole disk must read back as
//! the model says, and at the end the image's own check must find nothing wrong.

use proptest::prelude::*;
use std::sync::Arc;
use strata_format::qcow2::{create, CreateOptions, Qcow2Image, Qcow2OpenOptions, Repair};
use strata_format::raw::RawImage;
use strata_format::BlockDevice;
use strata_storage::{MemStorage, Storage};

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
    Reopen,
}

#[derive(Debug, Clone, Copy)]
struct Config {
    cluster_bits: u32,
    refcount_bits: u32,
    version: u32,
    extended_l2: bool,
    lazy: bool,
    backing: bool,
}

const DISK: u64 = 3 << 20;

fn op_strategy() -> impl Strategy<Value = Op> {
    let range = (0..DISK, 1u64..200_000).prop_map(|(off, len)| (off, len.min(DISK - off)));
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        2 => (range.clone(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => range.prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn pattern(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((off + i) as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn open(storage: &Arc<MemStorage>, backing: &Option<Arc<dyn BlockDevice>>) -> Qcow2Image {
    let s: Arc<dyn Storage> = storage.clone();
    let img = Qcow2Image::open(s, Qcow2OpenOptions::default()).expect("reopen");
    img.set_backing(backing.clone());
    img
}

/// Runs `ops` on a new image of `cfg` against the model and returns the image's bytes
/// after a clean close.
fn run(cfg: Config, ops: Vec<Op>) -> Vec<u8> {
    let cs = 1u64 << cfg.cluster_bits;
    // Backing: a raw disk with its own pattern (shorter than the overlay, to test
    // reads past the backing's end).
    let (backing, mut model): (Option<Arc<dyn BlockDevice>>, Vec<u8>) = if cfg.backing {
        let bsize = DISK - 512 * 1024;
        let mut content = pattern(7, 0, bsize);
        content.resize(DISK as usize, 0);
        let raw = RawImage::open(Arc::new(MemStorage::from_vec(
            content[..bsize as usize].to_vec(),
        )))
        .unwrap();
        (Some(Arc::new(raw) as Arc<dyn BlockDevice>), content)
    } else {
        (None, vec![0u8; DISK as usize])
    };
    let storage = Arc::new(MemStorage::new());
    let opts = CreateOptions {
        size: DISK,
        cluster_size: cs,
        version: cfg.version,
        refcount_bits: cfg.refcount_bits,
        extended_l2: cfg.extended_l2,
        lazy_refcounts: cfg.lazy,
        backing_file: cfg.backing.then(|| "backing.raw".to_string()),
        backing_format: cfg.backing.then(|| "raw".to_string()),
        ..Default::default()
    };
    let s: Arc<dyn Storage> = storage.clone();
    let mut img = create(s, &opts).expect("create");
    img.set_backing(backing.clone());
    for op in ops {
        match op {
            Op::Write { off, len, seed } => {
                let data = pattern(seed, off, len);
                img.write(&data, off).expect("write");
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zero { off, len, unmap } => {
                img.write_zeroes(off, len, unmap).expect("write_zeroes");
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { off, len } => {
                img.discard(off, len).expect("discard");
                // Whole clusters inside the range now read as zeroes (v3) or from the
                // backing file (v2); partial clusters keep their data.
                let start = off.next_multiple_of(cs);
                let mut end = (off + len) / cs * cs;
                if off + len == DISK {
                    end = DISK;
                }
                if end > start {
                    for c in (start..end).step_by(cs as usize) {
                        let e = (c + cs).min(DISK) as usize;
                        match backing.as_ref().filter(|_| cfg.version < 3) {
                            None => model[c as usize..e].fill(0),
                            Some(bk) => {
                                let mut b = vec![0u8; e - c as usize];
                                let bsz = bk.virtual_size();
                                if c < bsz {
                                    let n = ((bsz - c) as usize).min(b.len());
                                    bk.read(&mut b[..n], c).unwrap();
                                }
                                model[c as usize..e].copy_from_slice(&b);
                            }
                        }
                    }
                }
            }
            Op::Flush => img.flush().expect("flush"),
            Op::Reopen => {
                img.close().expect("close");
                drop(img);
                img = open(&storage, &backing);
            }
        }
        let mut all = vec![0u8; DISK as usize];
        img.read(&mut all, 0).expect("read");
        if all != model {
            let first = all.iter().zip(&model).position(|(a, b)| a != b).unwrap();
            panic!("content differs from the model at offset {first} after {op:?} ({cfg:?})");
        }
    }
    img.close().expect("close");
    let report = img.check(Repair::None).expect("check");
    assert_eq!(report.corruptions, 0, "{cfg:?}: {:?}", report.messages);
    assert_eq!(report.leaks, 0, "{cfg:?}: {:?}", report.messages);
    drop(img);
    storage.snapshot()
}

fn config_strategy() -> impl Strategy<Value = Config> {
    (
        prop_oneof![Just(9u32), Just(12), Just(14), Just(16), Just(17)],
        prop_oneof![
            Just(1u32),
            Just(2),
            Just(4),
            Just(8),
            Just(16),
            Just(32),
            Just(64)
        ],
        prop_oneof![Just(2u32), Just(3)],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(cluster_bits, refcount_bits, version, ext, lazy, backing)| Config {
                cluster_bits,
                refcount_bits: if version == 2 { 16 } else { refcount_bits },
                version,
                extended_l2: ext && version == 3 && cluster_bits >= 14,
                lazy: lazy && version == 3,
                backing,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_the_reference_disk(cfg in config_strategy(), ops in prop::collection::vec(op_strategy(), 1..24)) {
        run(cfg, ops);
    }
}

/// The header's `(refcount_table_clusters, refcount blocks in use)` of an image.
fn refcount_geometry(image: &[u8]) -> (u32, usize) {
    let be64 = |at: usize| u64::from_be_bytes(image[at..at + 8].try_into().unwrap());
    let table = be64(48) as usize;
    let clusters = u32::from_be_bytes(image[56..60].try_into().unwrap());
    let cs = 1usize << u32::from_be_bytes(image[20..24].try_into().unwrap());
    let blocks = (0..clusters as usize * cs / 8)
        .filter(|i| be64(table + i * 8) != 0)
        .count();
    (clusters, blocks)
}

/// `qemu-img check` of an image's bytes: QEMU must find it clean.
fn assert_qemu_finds_clean(image: &[u8]) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), image).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(file.path())
        .output()
        .expect("qemu-img must be installed");
    assert!(
        out.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fill_disk_then_rewrite() -> Vec<Op> {
    vec![
        Op::Write {
            off: 0,
            len: DISK,
            seed: 3,
        },
        Op::Reopen,
        Op::Write {
            off: 1000,
            len: 5000,
            seed: 9,
        },
    ]
}

#[test]
fn one_bit_refcounts_count_clusters_across_several_refcount_blocks() {
    // 512-byte clusters and 1-bit refcounts: a refcount block covers 4096 clusters
    // (2 MiB), so filling the 3 MiB disk (data, L2 tables) needs a second block.
    let cfg = Config {
        cluster_bits: 9,
        refcount_bits: 1,
        version: 3,
        extended_l2: false,
        lazy: false,
        backing: false,
    };
    let image = run(cfg, fill_disk_then_rewrite());
    let (_, blocks) = refcount_geometry(&image);
    assert!(
        blocks >= 2,
        "one refcount block covers the whole image: {blocks}"
    );
    assert_qemu_finds_clean(&image);
}

#[test]
fn small_clusters_with_64_bit_refcounts_grow_the_refcount_table() {
    // 512-byte clusters and 64-bit refcounts: a block covers 64 clusters and the
    // first table cluster 64 blocks (2 MiB), so filling the disk grows the table.
    let cfg = Config {
        cluster_bits: 9,
        refcount_bits: 64,
        version: 3,
        extended_l2: false,
        lazy: false,
        backing: false,
    };
    let image = run(cfg, fill_disk_then_rewrite());
    let (table_clusters, _) = refcount_geometry(&image);
    assert!(table_clusters > 1, "the refcount table did not grow");
    assert_qemu_finds_clean(&image);
}
