//! Hostile `luks` headers: an image qemu-img made, one field damaged at a
//! time (truncated file, magic, version, strings without NUL, unknown cipher,
//! mode and hash names, payload offset inside the header, past the end of the
//! file or unaligned, key slot material inside the header, past the end,
//! overlapping another slot, stripes 0 or 2^32 - 1, iteration counts 0 or
//! 2^32 - 1, master key length 0 or 2^32 - 1). Each must open as QEMU's luks
//! driver opens it for its metadata, or be refused with QEMU's words (read
//! from qemu-img, run on the same bytes), and with the secret be refused
//! quickly with a typed error: no panic, no write, no huge allocation, no
//! unlock that runs for minutes.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_format::crypto::luks::MAX_UNLOCK_ITERS;
use strata_format::luks::LuksImage;
use strata_format::qcow2::Unlock;
use strata_format::ErrorKind;
use strata_storage::MemStorage;

/// A `luks` image of 1 MiB made by qemu-img, password `Pa55`.
fn qemu_image(d: &Path) -> Vec<u8> {
    let out = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            "secret,id=s0,data=Pa55",
            "-o",
            "key-secret=s0,iter-time=10",
            "base.luks",
            "1M",
        ])
        .current_dir(d)
        .output()
        .expect("qemu-img must be installed");
    assert!(out.status.success(), "{out:?}");
    std::fs::read(d.join("base.luks")).unwrap()
}

/// qemu-img's verdict on `bytes` opened as luks for its metadata: `Ok(())`
/// when `info` works, else its message (after the "Could not open" prefix).
fn qemu_verdict(d: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(d.join("h.luks"), bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["info", "-f", "luks", "h.luks"])
        .current_dir(d)
        .output()
        .expect("qemu-img must be installed");
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let m = err.trim_end();
    let m = m
        .strip_prefix("qemu-img: Could not open 'h.luks': ")
        .unwrap_or(m);
    Err(m.to_string())
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_str(b: &mut [u8], at: usize, len: usize, s: &[u8]) {
    b[at..at + len].fill(0);
    b[at..at + s.len()].copy_from_slice(s);
}

/// Slot `i`'s descriptor field at `field` bytes into it.
fn slot(i: usize, field: usize) -> usize {
    208 + 48 * i + field
}

type Damage = (&'static str, Box<dyn Fn(&mut Vec<u8>)>);

fn damages(base: &[u8]) -> Vec<Damage> {
    let slot1_offset = u32::from_be_bytes(base[slot(1, 40)..slot(1, 44)].try_into().unwrap());
    vec![
        ("truncated in the header", Box::new(|b| b.truncate(100))),
        ("truncated after the header", Box::new(|b| b.truncate(600))),
        (
            "truncated in the key material",
            Box::new(|b| b.truncate(5000)),
        ),
        ("bad magic", Box::new(|b| b[0] = b'X')),
        ("version 2", Box::new(|b| b[6..8].copy_from_slice(&[0, 2]))),
        ("cipher name without NUL", Box::new(|b| b[8..40].fill(b'a'))),
        (
            "cipher mode without NUL",
            Box::new(|b| b[40..72].fill(b'x')),
        ),
        ("hash spec without NUL", Box::new(|b| b[72..104].fill(b's'))),
        (
            "unknown cipher",
            Box::new(|b| put_str(b, 8, 32, b"blowfish")),
        ),
        (
            "unknown mode",
            Box::new(|b| put_str(b, 40, 32, b"ofb-plain64")),
        ),
        (
            "mode without an IV",
            Box::new(|b| put_str(b, 40, 32, b"xts")),
        ),
        (
            "unknown IV generator",
            Box::new(|b| put_str(b, 40, 32, b"xts-foo")),
        ),
        (
            "unknown IV hash",
            Box::new(|b| put_str(b, 40, 32, b"xts-essiv:md4")),
        ),
        ("unknown hash", Box::new(|b| put_str(b, 72, 32, b"md4"))),
        ("payload in the header", Box::new(|b| put32(b, 104, 4))),
        (
            "payload past the end",
            Box::new(|b| put32(b, 104, 0xffff_0000)),
        ),
        ("payload unaligned", Box::new(|b| put32(b, 104, 4097))),
        ("key bytes 0", Box::new(|b| put32(b, 108, 0))),
        ("key bytes 2^32-1", Box::new(|b| put32(b, 108, u32::MAX))),
        ("master key iterations 0", Box::new(|b| put32(b, 164, 0))),
        (
            "slot state corrupt",
            Box::new(|b| put32(b, slot(0, 0), 0x1234)),
        ),
        ("slot iterations 0", Box::new(|b| put32(b, slot(0, 4), 0))),
        (
            "slot material in the header",
            Box::new(|b| put32(b, slot(0, 40), 1)),
        ),
        (
            "slot material overlapping the next",
            Box::new(move |b| put32(b, slot(0, 40), slot1_offset)),
        ),
        ("stripes 0", Box::new(|b| put32(b, slot(0, 44), 0))),
        (
            "stripes 2^32-1",
            Box::new(|b| put32(b, slot(0, 44), u32::MAX)),
        ),
    ]
}

/// Open `bytes` (for the metadata only, or with the secret) on a store whose
/// bytes are compared afterwards: the open must not write.
fn open(bytes: &[u8], metadata_only: bool) -> strata_format::Result<LuksImage> {
    let s = Arc::new(MemStorage::from_vec(bytes.to_vec()));
    let unlock = Unlock::Secret(b"Pa55".as_slice().into());
    let r = LuksImage::open(s.clone(), &unlock, metadata_only);
    assert_eq!(s.snapshot(), bytes, "opening wrote to the image");
    r
}

#[test]
fn damaged_luks_headers_open_or_are_refused_as_qemu_opens_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qemu_image(d);
    assert!(open(&base, false).is_ok(), "the undamaged image opens");
    let mut failures = Vec::new();
    for (what, damage) in damages(&base) {
        let mut b = base.clone();
        damage(&mut b);
        let ours = open(&b, true)
            .map(|_| ())
            .map_err(|e| e.message().to_string());
        let theirs = qemu_verdict(d, &b);
        if ours != theirs {
            failures.push(format!("{what}:\n  strata: {ours:?}\n  qemu:   {theirs:?}"));
        }
        // With the secret: refused or opened, quickly, never a panic.
        let t = Instant::now();
        let r = open(&b, false);
        if t.elapsed() > Duration::from_secs(20) {
            failures.push(format!("{what}: the unlock took {:?}", t.elapsed()));
        }
        if ours.is_err() && r.is_ok() {
            failures.push(format!("{what}: opens with the secret, not without"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// QEMU reads slot material past the end of the file when a slot's offset
/// plus its length wraps in 32 bits; strata refuses the slot.
#[test]
fn key_material_past_the_end_of_any_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_image(dir.path());
    let mut b = base.clone();
    put32(&mut b, slot(0, 40), 0xffff_fff0);
    let e = open(&b, true).err().expect("refused");
    assert_eq!(e.kind(), ErrorKind::Invalid);
    assert_eq!(
        e.message(),
        "Keyslot 0 is overlapping with the encrypted payload"
    );
}

/// Iteration counts past the bound are refused before any PBKDF2 work (QEMU
/// would run 2^32 - 1 iterations, for the better part of an hour); the header
/// still opens for its metadata, as in QEMU.
#[test]
fn iteration_counts_past_the_bound_are_refused_quickly_at_unlock() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qemu_image(d);
    for (what, at) in [("slot", slot(0, 4)), ("master key", 164)] {
        for n in [MAX_UNLOCK_ITERS + 1, u32::MAX] {
            let mut b = base.clone();
            put32(&mut b, at, n);
            assert_eq!(qemu_verdict(d, &b), Ok(()), "{what} {n}: qemu-img info");
            assert!(open(&b, true).is_ok(), "{what} {n}: metadata");
            let t = Instant::now();
            let e = open(&b, false).err().expect("refused");
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{what} {n}: {:?}",
                t.elapsed()
            );
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{what} {n}: {e}");
            assert!(e.message().contains(&n.to_string()), "{what} {n}: {e}");
        }
    }
    // An active slot past the bound that the password does not reach first
    // is still refused: every slot tried costs its iterations.
    let mut b = base.clone();
    put32(&mut b, slot(1, 0), 0x00ac_71f3);
    put32(&mut b, slot(1, 4), u32::MAX);
    // Slot 0 opens first: the image opens.
    assert!(open(&b, false).is_ok());
}
