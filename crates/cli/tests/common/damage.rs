//! Known damage done to qcow2 images (16-bit refcounts) in place, for the tests
//! that compare how both tools see and repair it.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

fn be64(f: &mut std::fs::File, at: u64) -> u64 {
    let mut e = [0u8; 8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut e).unwrap();
    u64::from_be_bytes(e)
}

fn open(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

/// The cluster size, refcount table offset and L1 table offset of the image.
fn geometry(f: &mut std::fs::File) -> (u64, u64, u64) {
    let mut h = [0u8; 64];
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_exact(&mut h).unwrap();
    let bits = u32::from_be_bytes(h[20..24].try_into().unwrap());
    let rt = u64::from_be_bytes(h[48..56].try_into().unwrap());
    let l1 = u64::from_be_bytes(h[40..48].try_into().unwrap());
    (1 << bits, rt, l1)
}

/// Set the refcount of `cluster` to `value`, in whichever refcount block holds it.
pub fn poke_refcount(path: &Path, cluster: u64, value: u16) {
    let mut f = open(path);
    let (cs, rt, _) = geometry(&mut f);
    let per_block = cs / 2;
    let rb = be64(&mut f, rt + 8 * (cluster / per_block));
    f.seek(SeekFrom::Start(rb + 2 * (cluster % per_block)))
        .unwrap();
    f.write_all(&value.to_be_bytes()).unwrap();
}

/// The cluster index of the first L2 table of the active L1 table.
pub fn first_l2_cluster(path: &Path) -> u64 {
    let mut f = open(path);
    let (cs, _, l1) = geometry(&mut f);
    (be64(&mut f, l1) & 0x00ff_ffff_ffff_fe00) / cs
}

/// Set refcount table entry `index` to `value`.
pub fn poke_reftable(path: &Path, index: u64, value: u64) {
    let mut f = open(path);
    let (_, rt, _) = geometry(&mut f);
    f.seek(SeekFrom::Start(rt + 8 * index)).unwrap();
    f.write_all(&value.to_be_bytes()).unwrap();
}

/// Refcount table entry `index`.
pub fn reftable_entry(path: &Path, index: u64) -> u64 {
    let mut f = open(path);
    let (_, rt, _) = geometry(&mut f);
    be64(&mut f, rt + 8 * index)
}

/// Set the table size of the first persistent bitmap of a qcow2 v3 image to
/// `entries` (its directory entry, found through the bitmaps header extension).
pub fn poke_bitmap_table_size(path: &Path, entries: u32) {
    let mut f = open(path);
    let mut len = [0u8; 4];
    f.seek(SeekFrom::Start(100)).unwrap();
    f.read_exact(&mut len).unwrap();
    let mut at = u64::from(u32::from_be_bytes(len));
    loop {
        let mut head = [0u8; 8];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut head).unwrap();
        let kind = u32::from_be_bytes(head[..4].try_into().unwrap());
        let size = u64::from(u32::from_be_bytes(head[4..].try_into().unwrap()));
        assert_ne!(kind, 0, "the image has no bitmaps extension");
        if kind == 0x2385_2875 {
            let directory = be64(&mut f, at + 8 + 16);
            f.seek(SeekFrom::Start(directory + 8)).unwrap();
            f.write_all(&entries.to_be_bytes()).unwrap();
            return;
        }
        at += 8 + size.next_multiple_of(8);
    }
}

/// Write `bytes` into `file` (in `dir`) at `at`.
pub fn poke(dir: &Path, file: &str, at: u64, bytes: &[u8]) {
    let mut f = open(&dir.join(file));
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
}

/// Set bit `bit` of the header's feature field at `field` (72 incompatible,
/// 80 compatible, 88 autoclear) of a qcow2 v3 image.
pub fn set_feature_bit(path: &Path, field: u64, bit: u32) {
    let mut f = open(path);
    let v = be64(&mut f, field) | 1 << bit;
    f.seek(SeekFrom::Start(field)).unwrap();
    f.write_all(&v.to_be_bytes()).unwrap();
}

/// The header extensions of a qcow2 image without a backing file name, in file
/// order (type, data).
pub fn header_extensions(path: &Path) -> Vec<(u32, Vec<u8>)> {
    let b = std::fs::read(path).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let mut at = if be32(4) >= 3 { be32(100) as usize } else { 72 };
    let mut out = Vec::new();
    loop {
        let (kind, len) = (be32(at), be32(at + 4) as usize);
        if kind == 0 {
            return out;
        }
        out.push((kind, b[at + 8..at + 8 + len].to_vec()));
        at += 8 + len.next_multiple_of(8);
    }
}

/// Replace the header extensions of a qcow2 image without a backing file name
/// by `exts` (they must fit in its first cluster).
pub fn set_header_extensions(path: &Path, exts: &[(u32, Vec<u8>)]) {
    let mut f = open(path);
    let mut h = [0u8; 104];
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_exact(&mut h).unwrap();
    let v3 = u32::from_be_bytes(h[4..8].try_into().unwrap()) >= 3;
    let at = if v3 {
        u64::from(u32::from_be_bytes(h[100..104].try_into().unwrap()))
    } else {
        72
    };
    let mut bytes = Vec::new();
    for (kind, data) in exts {
        bytes.extend_from_slice(&kind.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        bytes.resize(bytes.len().next_multiple_of(8), 0);
    }
    bytes.extend_from_slice(&[0; 8]);
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&bytes).unwrap();
}

/// The big-endian 64-bit word at byte `at` of the file (a header field, a table entry).
pub fn word_at(path: &Path, at: u64) -> u64 {
    be64(&mut open(path), at)
}
