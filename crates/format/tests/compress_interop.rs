//! The compressed-cluster codec against QEMU 10, in both directions, without the rest
//! of the qcow2 driver: the codec file is included directly and images are parsed and
//! built by hand here.
//!
//! - QEMU writes: `qemu-img convert -c` with each compression type and two cluster
//!   sizes; every compressed L2 entry is located, read with its sector-rounded length
//!   (so the neighbouring cluster's bytes follow the stream) and decompressed.
//! - QEMU reads: a qcow2 is built from scratch with clusters from `compress()`, then
//!   `qemu-img check` must find it clean and `qemu-img compare` equal to the raw source.
//!
//! These tests need QEMU's qemu-img; they fail if it is missing.

#[allow(dead_code)]
#[path = "../src/qcow2/compress.rs"]
mod compress;

use compress::{compress, decompress, CompressionType};
use std::process::Command;

const KINDS: [CompressionType; 2] = [CompressionType::Zlib, CompressionType::Zstd];
/// Not a whole number of clusters, to cover a zero-padded last cluster.
const VSIZE: usize = (1 << 20) + 4608;

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (QEMU 10) must be installed: run scripts/install-deps.sh")
}

fn qemu_img_ok(args: &[&str]) -> String {
    let out = qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Guest data: per 4 KiB block, compressible text, noise or zeroes.
fn guest_data() -> Vec<u8> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = vec![0u8; VSIZE];
    for (blk, chunk) in v.chunks_mut(4096).enumerate() {
        match blk % 7 {
            3 => chunk.iter_mut().for_each(|b| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }),
            5 => {}
            _ => {
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = b"compressed cluster interop "[(i + blk) % 27] ^ (blk as u8);
                }
            }
        }
    }
    // A whole cluster of noise (for 64 KiB clusters), which QEMU stores uncompressed.
    let noisy = 3 << 16;
    for b in &mut v[noisy..noisy + 65536] {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *b = seed as u8;
    }
    v
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}
fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

const L2_COMPRESSED: u64 = 1 << 62;
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Decode every guest cluster of a qcow2 (no backing file, no extended L2) using the
/// codec for the compressed ones. Returns the guest bytes and the count of
/// compressed clusters seen.
fn read_qcow2(img: &[u8], kind: CompressionType) -> (Vec<u8>, usize) {
    assert_eq!(be32(img, 0), 0x5146_49fb, "qcow2 magic");
    assert_eq!(be32(img, 4), 3, "version");
    let cluster_bits = be32(img, 20);
    let cs = 1usize << cluster_bits;
    let size = be64(img, 24) as usize;
    let l1_size = be32(img, 36) as usize;
    let l1_off = be64(img, 40) as usize;
    let incompat = be64(img, 72);
    let header_len = be32(img, 100) as usize;
    let ctype = if header_len > 104 { img[104] } else { 0 };
    assert_eq!(ctype, kind.as_byte(), "header compression type");
    assert_eq!(
        incompat & 8 != 0,
        kind == CompressionType::Zstd,
        "feature bit 3"
    );

    let csize_shift = 62 - (cluster_bits - 8);
    let csize_mask = (1u64 << (cluster_bits - 8)) - 1;
    let coff_mask = (1u64 << csize_shift) - 1;
    let l2n = cs / 8;
    let mut guest = vec![0u8; size.div_ceil(cs) * cs];
    let mut compressed = 0;
    for l1i in 0..l1_size {
        let l2_off = (be64(img, l1_off + 8 * l1i) & L2_OFFSET_MASK) as usize;
        if l2_off == 0 {
            continue;
        }
        for l2i in 0..l2n {
            let gc = l1i * l2n + l2i;
            if gc * cs >= size {
                break;
            }
            let e = be64(img, l2_off + 8 * l2i);
            let dst = &mut guest[gc * cs..(gc + 1) * cs];
            if e & L2_COMPRESSED != 0 {
                let off = (e & coff_mask) as usize;
                let nb_sectors = ((e >> csize_shift) & csize_mask) as usize + 1;
                let len = nb_sectors * 512 - (off & 511);
                // Past the end of the file reads as zeroes, as in QEMU.
                let mut input = vec![0u8; len];
                let avail = img.len().saturating_sub(off).min(len);
                input[..avail].copy_from_slice(&img[off..off + avail]);
                decompress(kind, &input, dst)
                    .unwrap_or_else(|e| panic!("guest cluster {gc} at 0x{off:x}: {e}"));
                compressed += 1;
            } else if e & 1 != 0 {
                // Zero flag: stays zero.
            } else if e & L2_OFFSET_MASK != 0 {
                let off = (e & L2_OFFSET_MASK) as usize;
                dst.copy_from_slice(&img[off..off + cs]);
            }
        }
    }
    guest.truncate(size);
    (guest, compressed)
}

#[test]
fn we_read_what_qemu_compresses() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data = guest_data();
    std::fs::write(&raw, &data).unwrap();
    for kind in KINDS {
        for cluster_size in [4096usize, 65536] {
            let img = dir
                .path()
                .join(format!("{}-{cluster_size}.qcow2", kind.name()));
            let opts = format!(
                "compression_type={},cluster_size={cluster_size}",
                kind.name()
            );
            qemu_img_ok(&[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &opts,
                raw.to_str().unwrap(),
                img.to_str().unwrap(),
            ]);
            let bytes = std::fs::read(&img).unwrap();
            let (guest, compressed) = read_qcow2(&bytes, kind);
            assert!(
                guest == data,
                "{} with {cluster_size}-byte clusters: guest data differs",
                kind.name()
            );
            let clusters = VSIZE.div_ceil(cluster_size);
            assert!(
                compressed * 2 > clusters,
                "{}: only {compressed} of {clusters} clusters compressed",
                kind.name()
            );
        }
    }
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// A qcow2 v3 image holding `data`, every cluster compressed with `compress()` (or
/// stored plainly when it does not shrink, or left unallocated when all zero), packed
/// the way QEMU packs them.
fn build_qcow2(data: &[u8], kind: CompressionType, cluster_bits: u32) -> (Vec<u8>, usize) {
    let cs = 1usize << cluster_bits;
    let guest_clusters = data.len().div_ceil(cs);
    let l2n = cs / 8;
    assert!(guest_clusters <= l2n, "one L2 table is enough here");
    // Cluster 0 header, 1 refcount table, 2 refcount block, 3 L1, 4 L2, then data.
    let (rt, rb, l1, l2) = (cs, 2 * cs, 3 * cs, 4 * cs);
    let mut img = vec![0u8; 5 * cs];
    let mut refcounts = vec![1u16; 5];
    let csize_shift = 62 - (cluster_bits - 8);
    let mut next = 5 * cs; // byte where the next compressed stream goes
    let mut compressed = 0;
    for gc in 0..guest_clusters {
        let mut cluster = data[gc * cs..data.len().min((gc + 1) * cs)].to_vec();
        cluster.resize(cs, 0);
        if cluster.iter().all(|&b| b == 0) {
            continue;
        }
        let entry = match compress(kind, &cluster, cs - 1) {
            Some(c) => {
                let start = next;
                let end = start + c.len();
                if img.len() < end {
                    img.resize(end.div_ceil(cs) * cs, 0);
                }
                img[start..end].copy_from_slice(&c);
                for hc in start / cs..=(end - 1) / cs {
                    if refcounts.len() <= hc {
                        refcounts.resize(hc + 1, 0);
                    }
                    refcounts[hc] += 1;
                }
                next = end;
                compressed += 1;
                let nb = ((end - 1) / 512 - start / 512) as u64;
                L2_COMPRESSED | (nb << csize_shift) | start as u64
            }
            None => {
                let start = img.len().max(next.div_ceil(cs) * cs);
                img.resize(start + cs, 0);
                img[start..start + cs].copy_from_slice(&cluster);
                refcounts.resize(start / cs + 1, 0);
                refcounts[start / cs] = 1;
                next = start + cs;
                (1 << 63) | start as u64
            }
        };
        put64(&mut img, l2 + 8 * gc, entry);
    }
    assert!(
        refcounts.len() <= cs / 2,
        "one refcount block is enough here"
    );
    for (i, &r) in refcounts.iter().enumerate() {
        img[rb + 2 * i..rb + 2 * i + 2].copy_from_slice(&r.to_be_bytes());
    }
    put64(&mut img, rt, rb as u64);
    put64(&mut img, l1, (1 << 63) | l2 as u64);

    put32(&mut img, 0, 0x5146_49fb);
    put32(&mut img, 4, 3);
    put32(&mut img, 20, cluster_bits);
    put64(&mut img, 24, data.len() as u64);
    put32(&mut img, 36, 1); // l1_size
    put64(&mut img, 40, l1 as u64);
    put64(&mut img, 48, rt as u64);
    put32(&mut img, 56, 1); // refcount_table_clusters
    let incompat = if kind == CompressionType::Zstd { 8 } else { 0 };
    put64(&mut img, 72, incompat);
    put32(&mut img, 96, 4); // refcount_order: 16-bit
    put32(&mut img, 100, 112); // header_length, with the compression type byte
    img[104] = kind.as_byte();
    // Header extensions: only the end marker (type 0, length 0) at 112.
    (img, compressed)
}

#[test]
fn qemu_reads_what_we_compress() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data = guest_data();
    std::fs::write(&raw, &data).unwrap();
    for kind in KINDS {
        for cluster_bits in [12u32, 16] {
            let (bytes, compressed) = build_qcow2(&data, kind, cluster_bits);
            assert!(compressed > 0);
            // Our own reader agrees first (a check of the builder).
            assert!(read_qcow2(&bytes, kind).0 == data);
            let img = dir
                .path()
                .join(format!("ours-{}-{cluster_bits}.qcow2", kind.name()));
            std::fs::write(&img, &bytes).unwrap();
            let img = img.to_str().unwrap();

            let info = qemu_img_ok(&["info", "--output=json", "-f", "qcow2", img]);
            assert!(
                info.contains(&format!("\"compression-type\": \"{}\"", kind.name())),
                "{info}"
            );
            let check = qemu_img(&["check", "-f", "qcow2", img]);
            assert!(
                check.status.success(),
                "qemu-img check on {img}: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
            let stdout = String::from_utf8_lossy(&check.stdout);
            assert!(stdout.contains("compressed clusters"), "{stdout}");
            qemu_img_ok(&[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                img,
                raw.to_str().unwrap(),
            ]);
        }
    }
}

#[test]
fn zstd_and_zlib_bits_are_refused_when_mismatched() {
    // Sanity of the hand-built header: QEMU refuses zstd data without feature bit 3.
    let data = guest_data();
    let (mut bytes, _) = build_qcow2(&data, CompressionType::Zstd, 16);
    put64(&mut bytes, 72, 0);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bad.qcow2");
    std::fs::write(&img, &bytes).unwrap();
    let out = qemu_img(&["info", "-f", "qcow2", img.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "QEMU accepted a mismatched compression type"
    );
}
