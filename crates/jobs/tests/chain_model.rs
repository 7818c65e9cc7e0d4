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

/// One operation, drawn as raw numbers and mapped onto the chain as it is when
/// the operation runs (earlier operations shorten it).
#[derive(Debug, Clone)]
struct Op {
    kind: u8,
    a: usize,
    b: usize,
    flag: bool,
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
/// wrote a byte decides it (a raw bottom stores its writes, zeroes included, the
/// same way, so the bottom's format does not change the view).
fn model_view(layers: &[Vec<Write>], from: usize) -> Vec<u8> {
    let mut v = vec![0u8; SIZE];
    for ws in layers.iter().skip(from).rev() {
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

/// Points `d`'s header at `devs[to]` (or at nothing), named and formatted as that
/// image really is, and checks the header now says so.
fn relink(devs: &[Arc<dyn BlockDevice>], d: &dyn BlockDevice, to: Option<usize>) {
    let name = to.map(|i| format!("L{i}"));
    let format = to.map(|i| devs[i].format_name());
    commit::relink_above(d, name.as_deref(), format).unwrap();
    let link = d.overlay().expect("a qcow2 overlay");
    assert_eq!(
        link.backing_name().as_deref(),
        name.as_deref().map(std::ffi::OsStr::new)
    );
    assert_eq!(link.backing_format().as_deref(), format);
}

fn case() -> impl Strategy<Value = (bool, Vec<Vec<Write>>, Vec<Op>)> {
    let op = (0u8..3, 0usize..64, 0usize..64, any::<bool>()).prop_map(|(kind, a, b, flag)| Op {
        kind,
        a,
        b,
        flag,
    });
    (
        any::<bool>(),
        proptest::collection::vec(writes(), 2..=16),
        proptest::collection::vec(op, 1..=4),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any sequence of commits (into the backing file, into a lower base, or
    /// intermediate with relink; the top emptied or kept), streams and safe
    /// rebases keeps the top's guest view; a commit leaves the base showing what the
    /// committed layer showed; every qcow2 file stays consistent.
    #[test]
    fn chain_operations_keep_the_guest_view((raw, layers, ops) in case()) {
        let devs = build(raw, &layers);
        let before = model_view(&layers, 0);
        prop_assert_eq!(view(devs[0].as_ref()), before.clone(), "the chain reads as the model");
        // The current chain, as indexes into `devs` (top first).
        let mut chain: Vec<usize> = (0..devs.len()).collect();
        let c = Cancel::default();
        for op in ops {
            let n = chain.len();
            if n < 2 {
                break;
            }
            let cur: Vec<Arc<dyn BlockDevice>> = chain.iter().map(|&i| devs[i].clone()).collect();
            match op.kind {
                0 => {
                    let top = op.a % (n - 1);
                    let base = top + 1 + op.b % (n - 1 - top);
                    let shown = view(cur[top].as_ref());
                    let p = commit::plan(&cur, top, base, &c).unwrap();
                    commit::apply_plan(&cur, &p, &NoProgress, &c).unwrap();
                    prop_assert_eq!(view(cur[base].as_ref()), shown, "the base shows the committed view");
                    if top > 0 {
                        relink(&devs, cur[top - 1].as_ref(), Some(chain[base]));
                        cur[top - 1].set_backing(Some(cur[base].clone()));
                        chain.drain(top..base);
                    } else if op.flag && base == 1 {
                        commit::make_empty(cur[0].as_ref()).unwrap();
                    }
                }
                1 => {
                    let base = 1 + op.a % n;
                    let p = stream::plan(&cur, base, &c).unwrap();
                    stream::apply_plan(&cur, &p, &NoProgress, &c).unwrap();
                    let to = (base < n).then_some(base);
                    relink(&devs, cur[0].as_ref(), to.map(|b| chain[b]));
                    cur[0].set_backing(to.map(|b| cur[b].clone()));
                    chain.drain(1..base);
                }
                _ => {
                    let onto = op.flag.then(|| 1 + op.a % (n - 1));
                    rebase::copy_differences(&cur[0], onto.map(|b| &cur[b]), &NoProgress, &c).unwrap();
                    relink(&devs, cur[0].as_ref(), onto.map(|b| chain[b]));
                    cur[0].set_backing(onto.map(|b| cur[b].clone()));
                    chain.drain(1..onto.unwrap_or(n));
                }
            }
            prop_assert_eq!(view(devs[0].as_ref()), before.clone(), "the top's guest view changed after {:?}", op);
        }
        for d in &devs {
            // `check` is qcow2's own consistency check, not a device capability.
            if let Some(q) = d.as_any().downcast_ref::<Qcow2Image>() {
                let r = q.check(strata_format::qcow2::Repair::None).unwrap();
                prop_assert_eq!(r.corruptions, 0);
            }
        }
    }
}
