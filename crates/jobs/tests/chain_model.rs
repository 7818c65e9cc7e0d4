//! Model test of chain operations: random chains (2 to 16 images, a raw or qcow2
//! bottom, random data and zero writes at every level) and a random commit, stream
//! or rebase, checked against an in-memory model of what each image shows.

use proptest::prelude::*;
use std::sync::Arc;
use strata_format::qcow2::{create, CreateOptions, Qcow2Image};
use strata_format::raw::RawImage;
use strata_format::BlockDevice;
use strata_jobs::{commit, rebase, stream, Cancel, NoProgress};
use strata_storage::{MemStorage, Storage};

const SIZE: usize = 256 << 10;

#[derive(Debug, Clone)]
struct Write {
    off: usize,
    len: usize,
    /// 0 writes zeroes.
    seed: u8,
}

#[derive(Debug, Clone)]
enum Op {
    Commit {
        top: usize,
        base: usize,
        keep_top: bool,
    },
    Stream {
        base: usize,
    },
    Rebase {
        onto: Option<usize>,
    },
}

fn writes() -> impl Strategy<Value = Vec<Write>> {
    proptest::collection::vec(
        (0usize..SIZE, 1usize..40_000, 0u8..4).prop_map(|(off, len, seed)| Write {
            off,
            len: len.min(SIZE - off),
            seed,
        }),
        0..6,
    )
}

fn bytes_of(w: &Write) -> Vec<u8> {
    (0..w.len)
        .map(|i| {
            if w.seed == 0 {
                0
            } else {
                (i as u8).wrapping_add(w.seed * 37) | 1
            }
        })
        .collect()
}

/// Build the chain: layer 0 is the top. Returns the devices, attached.
fn build(raw_bottom: bool, layers: &[Vec<Write>]) -> Vec<Arc<dyn BlockDevice>> {
    let n = layers.len();
    // Bottom first, each attached to its backing file before it is written, as
    // images are in use.
    let mut devs: Vec<Arc<dyn BlockDevice>> = Vec::new();
    for (i, ws) in layers.iter().enumerate().rev() {
        let mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let bottom = i == n - 1;
        let dev: Arc<dyn BlockDevice> = if bottom && raw_bottom {
            Arc::new(
                RawImage::create(mem, SIZE as u64, strata_format::qcow2::Preallocation::Off)
                    .unwrap(),
            )
        } else {
            let (bf, bfmt) = if bottom {
                (None, None)
            } else {
                let fmt = if i + 1 == n - 1 && raw_bottom {
                    "raw"
                } else {
                    "qcow2"
                };
                (Some(format!("L{}", i + 1)), Some(fmt.to_string()))
            };
            Arc::new(
                create(
                    mem,
                    &CreateOptions {
                        size: SIZE as u64,
                        cluster_size: 4096,
                        backing_file: bf,
                        backing_format: bfmt,
                        ..Default::default()
                    },
                )
                .unwrap(),
            )
        };
        if let Some(below) = devs.last() {
            dev.set_backing(Some(below.clone()));
        }
        for w in ws {
            if w.seed == 0 {
                dev.write_zeroes(w.off as u64, w.len as u64, false).unwrap();
            } else {
                dev.write(&bytes_of(w), w.off as u64).unwrap();
            }
        }
        devs.push(dev);
    }
    devs.reverse();
    devs
}

/// What layer `from` shows, by the model: the first layer at or below it that
/// wrote a byte decides it.
fn model_view(raw_bottom: bool, layers: &[Vec<Write>], from: usize) -> Vec<u8> {
    let mut v = vec![0u8; SIZE];
    for (i, ws) in layers.iter().enumerate().skip(from).rev() {
        let _ = (i, raw_bottom);
        for w in ws {
            v[w.off..w.off + w.len].copy_from_slice(&bytes_of(w));
        }
    }
    v
}

fn view(d: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; d.virtual_size() as usize];
    d.read(&mut v, 0).unwrap();
    v
}

fn relink(d: &dyn BlockDevice, to: Option<usize>) {
    let name = to.map(|i| format!("L{i}"));
    commit::relink_above(d, name.as_deref(), to.map(|_| "qcow2")).unwrap();
}

fn case() -> impl Strategy<Value = (bool, Vec<Vec<Write>>, Op)> {
    (any::<bool>(), proptest::collection::vec(writes(), 2..=16)).prop_flat_map(|(raw, layers)| {
        let n = layers.len();
        let op = prop_oneof![
            (0..n - 1, any::<bool>()).prop_flat_map(move |(top, keep)| {
                (top + 1..n).prop_map(move |base| Op::Commit {
                    top,
                    base,
                    keep_top: keep,
                })
            }),
            (1..=n).prop_map(|base| Op::Stream { base }),
            proptest::option::of(1..n).prop_map(|onto| Op::Rebase { onto }),
        ];
        (Just(raw), Just(layers), op)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn chain_operations_keep_the_guest_view((raw, layers, op) in case()) {
        let devs = build(raw, &layers);
        let before = model_view(raw, &layers, 0);
        prop_assert!(view(devs[0].as_ref()) == before, "the chain does not read as the model");
        let c = Cancel::default();
        match op {
            Op::Commit { top, base, keep_top } => {
                let p = commit::plan(&devs, top, base, &c).unwrap();
                commit::apply_plan(&devs, &p, &NoProgress, &c).unwrap();
                // The base now shows what `top` showed.
                prop_assert!(view(devs[base].as_ref()) == model_view(raw, &layers, top), "the base does not show what the top showed");
                if top > 0 {
                    relink(devs[top - 1].as_ref(), Some(base));
                    devs[top - 1].set_backing(Some(devs[base].clone()));
                } else if !keep_top && base == 1 {
                    commit::make_empty(devs[0].as_ref()).unwrap();
                }
            }
            Op::Stream { base } => {
                let p = stream::plan(&devs, base, &c).unwrap();
                stream::apply_plan(&devs, &p, &NoProgress, &c).unwrap();
                let to = (base < devs.len()).then_some(base);
                relink(devs[0].as_ref(), to);
                devs[0].set_backing(to.map(|b| devs[b].clone()));
            }
            Op::Rebase { onto } => {
                rebase::copy_differences(&devs[0], onto.map(|b| &devs[b]), &NoProgress, &c).unwrap();
                relink(devs[0].as_ref(), onto);
                devs[0].set_backing(onto.map(|b| devs[b].clone()));
            }
        }
        prop_assert!(view(devs[0].as_ref()) == before, "the top's guest view changed");
        for d in &devs {
            if let Some(q) = d.as_any().downcast_ref::<Qcow2Image>() {
                let r = q.check(strata_format::qcow2::Repair::None).unwrap();
                prop_assert_eq!(r.corruptions, 0);
            }
        }
    }
}
