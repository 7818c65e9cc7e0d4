//! Differential check and repair against qemu-img over generated corruptions of
//! QEMU-made images.
//!
//! Base images are made by qemu-img and qemu-io (plain, extended L2, compressed
//! clusters, internal snapshots, a persistent bitmap, 2-bit refcounts, version 2).
//! Each case damages a copy in memory: reserved bits, unaligned offsets, offsets
//! past the end of the file or onto other metadata, duplicate references, refcounts
//! zeroed or raised, truncations, compressed descriptors with bad sizes or COPIED,
//! subcluster bitmaps, snapshot-table and bitmap-directory fields. For each case:
//!
//! - strata's check gives qemu-img's exit code (0 clean, 1 could not check,
//!   2 corrupt, 3 leaks only);
//! - after strata's `check -r all`, qemu-img reports no more corruptions and leaks
//!   than before, every guest cluster that read correctly before (through
//!   qemu-img) reads the same, and an allocating write through qemu-io changes
//!   none of them; and strata's own check of the repaired image finds no
//!   referenced cluster whose refcount is below its references.
//!
//! `STRATA_DIFF_CASES` sets the number of cases (default 2400), `STRATA_DIFF_SEED`
//! the seed.

mod damage;

use damage::{be32, be64, put32, put64, qemu_check, qemu_img, qemu_io, strata_check};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use strata_format::fuzzing;

/// A tiny deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            Some(&v[self.below(v.len() as u64) as usize])
        }
    }
}

/// Where a field lives in the image, by class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    L1 {
        at: usize,
    },
    L2 {
        at: usize,
        compressed: bool,
    },
    L2Bitmap {
        at: usize,
    },
    RefTable {
        at: usize,
    },
    /// The refcount entry of a cluster.
    RefCount {
        cluster: u64,
    },
    SnapL1 {
        at: usize,
    },
    SnapExtra {
        at: usize,
    },
    BitmapTableOffset {
        at: usize,
    },
    BitmapEntry {
        at: usize,
    },
}

/// A QEMU-made image, parsed.
struct Base {
    name: &'static str,
    bytes: Vec<u8>,
    /// The guest view (qemu-img convert -O raw).
    raw: Vec<u8>,
    cs: u64,
    cluster_bits: u32,
    refcount_order: u32,
    sites: Vec<Site>,
    /// Offsets of metadata clusters (header, tables, blocks, directories).
    meta: Vec<u64>,
    /// Offsets of data clusters.
    data: Vec<u64>,
}

const SIZE: u64 = 4 << 20;
/// The guest range the allocating write after a repair goes to (no base uses it).
const WRITE_AT: u64 = 0x38_0000;
const WRITE_LEN: u64 = 0x4000;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

fn make_base(dir: &Path, name: &'static str, create: &str, steps: &[&str]) -> Base {
    let path = dir.join(format!("{name}.qcow2"));
    let p = path.to_str().unwrap();
    let (c, out) = qemu_img(&["create", "-q", "-f", "qcow2", "-o", create, p, "4M"]);
    assert_eq!(c, 0, "{out}");
    for step in steps {
        let (c, out) = if let Some(cmds) = step.strip_prefix("io:") {
            let mut args = Vec::new();
            for cmd in cmds.split(';') {
                args.push("-c");
                args.push(cmd);
            }
            args.push(p);
            qemu_io(&args)
        } else {
            let mut args: Vec<&str> = step.split(' ').collect();
            args.push(p);
            if args[0] == "bitmap" {
                let name = args.remove(args.len() - 2);
                args.push(name);
            }
            qemu_img(&args)
        };
        assert_eq!(c, 0, "{name}: {step}: {out}");
    }
    let (v, out) = qemu_check(&path);
    assert_eq!(v.code, 0, "{name} must be clean: {out}");
    let bytes = std::fs::read(&path).unwrap();
    let raw = guest_view(&path, dir).expect("base converts");
    parse(name, bytes, raw)
}

fn guest_view(path: &Path, dir: &Path) -> Option<Vec<u8>> {
    let out = dir.join(format!(
        "{}.raw",
        path.file_name().unwrap().to_str().unwrap()
    ));
    let (c, _) = qemu_img(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let r = if c == 0 {
        std::fs::read(&out).ok()
    } else {
        None
    };
    let _ = std::fs::remove_file(&out);
    r
}

fn parse(name: &'static str, bytes: Vec<u8>, raw: Vec<u8>) -> Base {
    let b = &bytes;
    let version = be32(b, 4);
    let cluster_bits = be32(b, 20);
    let cs = 1u64 << cluster_bits;
    let l1_size = be32(b, 36) as usize;
    let l1_off = be64(b, 40) as usize;
    let rt_off = be64(b, 48) as usize;
    let rt_clusters = be32(b, 56) as u64;
    let nb_snap = be32(b, 60) as usize;
    let snap_off = be64(b, 64) as usize;
    let (incompat, refcount_order, header_len) = if version >= 3 {
        (be64(b, 72), be32(b, 96), be32(b, 100) as usize)
    } else {
        (0, 4, 72)
    };
    let ext = incompat & (1 << 4) != 0;
    let mut sites = Vec::new();
    let mut meta = vec![0u64, l1_off as u64];
    let mut data = Vec::new();
    for c in 0..rt_clusters {
        meta.push(rt_off as u64 + c * cs);
    }
    let mut l1s = vec![(l1_off, l1_size)];
    let mut at = snap_off;
    for _ in 0..nb_snap {
        let sl1 = be64(b, at) as usize;
        let ssize = be32(b, at + 8) as usize;
        sites.push(Site::SnapL1 { at });
        sites.push(Site::SnapExtra { at });
        meta.push(sl1 as u64);
        meta.push(at as u64 & !(cs - 1));
        l1s.push((sl1, ssize));
        let id = u16::from_be_bytes([b[at + 12], b[at + 13]]) as usize;
        let nm = u16::from_be_bytes([b[at + 14], b[at + 15]]) as usize;
        let extra = be32(b, at + 36) as usize;
        at += (40 + id + nm + extra).next_multiple_of(8);
    }
    let stride = if ext { 16 } else { 8 };
    let mut seen = std::collections::BTreeSet::new();
    for (l1, n) in l1s {
        for i in 0..n {
            let e = be64(b, l1 + 8 * i);
            if l1 == l1_off {
                sites.push(Site::L1 { at: l1 + 8 * i });
            }
            let l2 = (e & OFFSET_MASK) as usize;
            if l2 == 0 || !seen.insert(l2) {
                continue;
            }
            meta.push(l2 as u64);
            for j in 0..cs as usize / stride {
                let at = l2 + j * stride;
                let e = be64(b, at);
                let compressed = e & (1 << 62) != 0;
                sites.push(Site::L2 { at, compressed });
                if ext {
                    sites.push(Site::L2Bitmap { at: at + 8 });
                }
                if !compressed && e & OFFSET_MASK != 0 {
                    data.push(e & OFFSET_MASK);
                }
            }
        }
    }
    for i in 0..(rt_clusters * cs / 8) as usize {
        let e = be64(b, rt_off + 8 * i);
        if e != 0 {
            sites.push(Site::RefTable { at: rt_off + 8 * i });
            meta.push(e);
        }
    }
    for c in 0..(b.len() as u64).div_ceil(cs) + 2 {
        sites.push(Site::RefCount { cluster: c });
    }
    // Header extensions: the bitmap directory.
    let mut at = header_len.max(72);
    while version >= 3 && at + 8 <= cs as usize {
        let ty = be32(b, at);
        let len = be32(b, at + 4) as usize;
        if ty == 0 {
            break;
        }
        if ty == 0x2385_2875 {
            let count = be32(b, at + 8);
            let dir = be64(b, at + 24) as usize;
            meta.push(dir as u64 & !(cs - 1));
            let mut d = dir;
            for _ in 0..count {
                let t = be64(b, d) as usize;
                let tsize = be32(b, d + 8) as usize;
                sites.push(Site::BitmapTableOffset { at: d });
                meta.push(t as u64);
                for k in 0..tsize {
                    sites.push(Site::BitmapEntry { at: t + 8 * k });
                    let e = be64(b, t + 8 * k) & OFFSET_MASK;
                    if e != 0 {
                        meta.push(e);
                    }
                }
                let nm = u16::from_be_bytes([b[d + 18], b[d + 19]]) as usize;
                let extra = be32(b, d + 20) as usize;
                d += (24 + extra + nm).next_multiple_of(8);
            }
        }
        at += 8 + len.next_multiple_of(8);
    }
    meta.sort_unstable();
    meta.dedup();
    Base {
        name,
        bytes,
        raw,
        cs,
        cluster_bits,
        refcount_order,
        sites,
        meta,
        data,
    }
}

fn refcount_at(base: &Base, b: &[u8], cluster: u64) -> Option<(usize, u32)> {
    let h_rt = be64(b, 48) as usize;
    let bits = 1u64 << base.refcount_order;
    let per_block = base.cs * 8 / bits;
    let at = h_rt + 8 * (cluster / per_block) as usize;
    if at + 8 > b.len() {
        return None;
    }
    let block = be64(b, at) & !0x1ff;
    if block == 0 || block as usize + base.cs as usize > b.len() {
        return None;
    }
    let bit = (cluster % per_block) * bits;
    Some((block as usize + (bit / 8) as usize, (bit % 8) as u32))
}

fn get_refcount(base: &Base, b: &[u8], cluster: u64) -> Option<u64> {
    let (at, shift) = refcount_at(base, b, cluster)?;
    let bits = 1u32 << base.refcount_order;
    Some(if bits < 8 {
        u64::from((b[at] >> shift) & ((1u16 << bits) - 1) as u8)
    } else {
        (0..bits as usize / 8).fold(0u64, |v, k| (v << 8) | u64::from(b[at + k]))
    })
}

fn set_refcount(base: &Base, b: &mut [u8], cluster: u64, v: u64) -> bool {
    let Some((at, shift)) = refcount_at(base, b, cluster) else {
        return false;
    };
    let bits = 1u32 << base.refcount_order;
    if bits < 8 {
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        b[at] = (b[at] & !mask) | (((v as u8) << shift) & mask);
    } else {
        for k in 0..bits as usize / 8 {
            b[at + k] = (v >> (8 * (bits as usize / 8 - 1 - k))) as u8;
        }
    }
    true
}

/// Apply one random damage; returns its description (None if it does not apply).
fn damage(base: &Base, b: &mut Vec<u8>, rng: &mut Rng) -> Option<String> {
    let cs = base.cs;
    let len = b.len() as u64;
    let kind = rng.below(14);
    let site = *rng.pick(&base.sites)?;
    let other_meta = *rng.pick(&base.meta)?;
    let other_data = rng.pick(&base.data).copied().unwrap_or(other_meta);
    let past_eof = len.next_multiple_of(cs) + rng.below(4) * cs;
    match kind {
        // Truncate at a cluster boundary or anywhere.
        0 => {
            let at = if rng.below(2) == 0 {
                rng.below(len / cs) * cs
            } else {
                rng.below(len)
            }
            .max(512);
            b.truncate(at as usize);
            return Some(format!("truncate to {at:#x}"));
        }
        // Refcount of some cluster zeroed, raised, or set to the maximum.
        1 | 2 => {
            let Site::RefCount { cluster } = site else {
                return None;
            };
            let cur = get_refcount(base, b, cluster)?;
            let max = if base.refcount_order == 6 {
                u64::MAX
            } else {
                (1u64 << (1u32 << base.refcount_order)) - 1
            };
            let v = match rng.below(4) {
                0 => 0,
                1 => (cur + 1).min(max),
                2 => max,
                _ => cur.saturating_sub(1),
            };
            set_refcount(base, b, cluster, v);
            return Some(format!("refcount of cluster {cluster}: {cur} -> {v}"));
        }
        _ => {}
    }
    let (at, what) = match site {
        Site::L1 { at } => (at, "L1"),
        Site::L2 { at, compressed } => (at, if compressed { "L2 compressed" } else { "L2" }),
        Site::L2Bitmap { at } => (at, "L2 bitmap"),
        Site::RefTable { at } => (at, "refcount table"),
        Site::SnapL1 { at } => (at, "snapshot L1 offset"),
        Site::SnapExtra { at } => (at + 36, "snapshot extra size"),
        Site::BitmapTableOffset { at } => (at, "bitmap table offset"),
        Site::BitmapEntry { at } => (at, "bitmap table entry"),
        Site::RefCount { .. } => return None,
    };
    if at + 8 > b.len() {
        return None;
    }
    let old = be64(b, at);
    let new = match (what, kind) {
        ("snapshot extra size", _) => {
            let v = [0u32, 8, 15, 16, 23][rng.below(5) as usize];
            put32(b, at, v);
            return Some(format!("{what} at {at:#x} -> {v}"));
        }
        ("L2 bitmap", _) => match rng.below(4) {
            0 => old ^ (1 << rng.below(64)),
            1 => old | ((old & 0xffff_ffff) << 32),
            2 => old | 1,
            _ => rng.next(),
        },
        ("L2 compressed", 3..=5) => {
            // Sector count field: bigger, smaller, or everything set.
            let shift = 62 - (base.cluster_bits - 8);
            let mask = ((1u64 << (base.cluster_bits - 8)) - 1) << shift;
            match rng.below(3) {
                0 => old | mask,
                1 => old & !mask,
                _ => (old & !mask) | (((old & mask) >> shift).wrapping_add(1) << shift & mask),
            }
        }
        (_, 3) => old ^ (1u64 << [0, 1, 8, 9, 56, 57, 61, 62, 63][rng.below(9) as usize]),
        (_, 4) => {
            old.wrapping_add(if rng.below(2) == 0 { 0x200 } else { cs / 2 }) | keep_flags(old)
        }
        (_, 5) => (old & !OFFSET_MASK) | past_eof,
        (_, 6) => (old & !OFFSET_MASK) | other_meta,
        (_, 7) => (old & !OFFSET_MASK) | other_data,
        (_, 8) => old | (1 << 63),
        (_, 9) => 0,
        (_, 10) => (old & !OFFSET_MASK) | (rng.below(len / cs + 2) * cs),
        (_, 11) => old ^ (1 << rng.below(64)),
        (_, 12) => old & !(1 << 63),
        _ => {
            (1u64 << 62)
                | (other_data + rng.below(cs))
                | (rng.below(4) << (62 - (base.cluster_bits - 8)))
        }
    };
    if new == old {
        return None;
    }
    put64(b, at, new);
    Some(format!("{what} at {at:#x}: {old:#x} -> {new:#x}"))
}

fn keep_flags(e: u64) -> u64 {
    e & !OFFSET_MASK
}

/// The guest clusters of `view` that equal the base's.
fn good_clusters(base: &Base, view: &[u8]) -> Vec<bool> {
    let n = (SIZE / base.cs) as usize;
    (0..n)
        .map(|i| {
            let r = i * base.cs as usize..(i + 1) * base.cs as usize;
            view.len() >= r.end && view[r.clone()] == base.raw[r]
        })
        .collect()
}

#[derive(Default)]
struct Tally {
    cases: u64,
    by_qemu_code: BTreeMap<i32, u64>,
    repaired: u64,
    writes: u64,
    failures: Vec<String>,
}

fn run_case(base: &Base, dir: &Path, seed: u64, tally: &Mutex<Tally>) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut bytes = base.bytes.clone();
    let mut what = Vec::new();
    for _ in 0..1 + (rng.below(10) < 3) as usize {
        for _ in 0..8 {
            if let Some(d) = damage(base, &mut bytes, &mut rng) {
                what.push(d);
                break;
            }
        }
    }
    if what.is_empty() {
        return;
    }
    let name = format!("{}: {}", base.name, what.join("; "));
    let path: PathBuf = dir.join(format!("case-{seed}.qcow2"));
    std::fs::write(&path, &bytes).unwrap();
    let mut fail = Vec::new();
    let (before, qout) = qemu_check(&path);
    let (scode, sreport) = strata_check(&bytes);
    if scode != before.code {
        fail.push(format!(
            "check: qemu-img exit {} ({} corruptions, {} leaks), strata exit {scode} {:?}\nqemu-img: {qout}",
            before.code,
            before.corruptions,
            before.leaks,
            sreport.map(|r| r.messages)
        ));
    }
    let mut repaired = false;
    let mut wrote = false;
    match fuzzing::repair_all(&bytes) {
        Err(e) => fail.push(format!("repair broke its promise: {e}")),
        Ok(Some(fixed)) if fixed != bytes => {
            repaired = true;
            let good = guest_view(&path, dir).map(|v| good_clusters(base, &v));
            std::fs::write(&path, &fixed).unwrap();
            let (after, aout) = qemu_check(&path);
            if before.code != 1
                && after.corruptions + after.leaks > before.corruptions + before.leaks
            {
                fail.push(format!(
                    "after repair qemu-img finds more: {before:?} -> {after:?}\n{aout}"
                ));
            }
            if before.code != 1 && after.code == 1 {
                fail.push(format!("after repair qemu-img cannot check: {aout}"));
            }
            let (wc, _) = qemu_io(&[
                "-c",
                &format!("write -P 0xa5 {WRITE_AT:#x} {WRITE_LEN:#x}"),
                path.to_str().unwrap(),
            ]);
            wrote = wc == 0;
            if let (Some(good), Some(view)) = (good, guest_view(&path, dir)) {
                let now = good_clusters(base, &view);
                let cs = base.cs;
                let lost: Vec<u64> = (0..good.len())
                    .filter(|&i| good[i] && !now[i])
                    .map(|i| i as u64 * cs)
                    .filter(|&g| g + cs <= WRITE_AT || g >= WRITE_AT + WRITE_LEN)
                    .collect();
                if !lost.is_empty() {
                    fail.push(format!(
                        "guest clusters that read correctly before the repair differ after it and a write (write ok: {wrote}): {lost:x?}"
                    ));
                }
            }
        }
        Ok(_) => {}
    }
    let _ = std::fs::remove_file(&path);
    let mut t = tally.lock().unwrap();
    t.cases += 1;
    *t.by_qemu_code.entry(before.code).or_default() += 1;
    t.repaired += u64::from(repaired);
    t.writes += u64::from(wrote);
    if !fail.is_empty() {
        t.failures
            .push(format!("case {seed} [{name}]\n  {}", fail.join("\n  ")));
    }
}

#[test]
fn check_and_repair_agree_with_qemu_img_on_damaged_images() {
    let cases: u64 = std::env::var("STRATA_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2400);
    let seed: u64 = std::env::var("STRATA_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let writes = "io:write -P 0x11 0 12k;write -P 0x22 64k 4k;write -P 0x33 1M 20k;write -P 0x44 0x201000 8k;write -z 0x300000 8k";
    let bases = [
        make_base(d, "plain", "cluster_size=4096", &[writes]),
        make_base(
            d,
            "extended-l2",
            "cluster_size=16384,extended_l2=on",
            &["io:write -P 0x11 0x1000 3k;write -P 0x22 0x9000 40k;write -z 0x20000 2k;write -P 0x33 0x200000 16k"],
        ),
        make_base(
            d,
            "compressed",
            "cluster_size=4096",
            &["io:write -c -P 0x55 0 4k;write -c -P 0x66 8k 8k;write -c -P 0x67 0x100000 4k;write -P 0x77 0x200000 8k"],
        ),
        make_base(
            d,
            "snapshots",
            "cluster_size=4096",
            &[writes, "snapshot -c s1", "io:write -P 0x88 4k 8k;write -P 0x99 0x280000 4k", "snapshot -c s2", "io:write -P 0xaa 0 4k"],
        ),
        make_base(
            d,
            "bitmap",
            "cluster_size=4096",
            &["bitmap --add b0", writes],
        ),
        make_base(
            d,
            "narrow-refcounts",
            "cluster_size=4096,refcount_bits=2",
            &[writes, "snapshot -c s1", "io:write -P 0x5a 0 4k"],
        ),
        make_base(
            d,
            "v2",
            "cluster_size=4096,compat=0.10",
            &[writes, "snapshot -c s1", "io:write -P 0x5b 64k 4k"],
        ),
    ];
    let tally = Mutex::new(Tally::default());
    let next = std::sync::atomic::AtomicU64::new(0);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= cases {
                    break;
                }
                let base = &bases[(i % bases.len() as u64) as usize];
                run_case(
                    base,
                    d,
                    seed.wrapping_mul(1_000_003).wrapping_add(i),
                    &tally,
                );
            });
        }
    });
    let t = tally.into_inner().unwrap();
    println!(
        "differential check: {} cases over {} QEMU-made images in {:.0?}; qemu-img exit codes {:?}; {} repairs changed the image, {} allocating writes after them",
        t.cases,
        bases.len(),
        started.elapsed(),
        t.by_qemu_code,
        t.repaired,
        t.writes
    );
    for f in &t.failures {
        println!("{f}");
    }
    assert!(
        t.cases >= cases * 9 / 10,
        "too few cases applied: {}",
        t.cases
    );
    assert!(
        t.failures.is_empty(),
        "{} of {} cases disagree:\n{}",
        t.failures.len(),
        t.cases,
        t.failures
            .iter()
            .take(25)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
