//! Refusals a script may match on, worded as qemu-img words them: a backing chain
//! that loops, incompatible features the image's feature-name table names (or
//! not), size options out of range or not sizes at all, an L1 table past QEMU's
//! limit, an image whose header refuses to open under every subcommand, and
//! snapshot operations that fail.

mod common;

use common::{assert_all_same, same, sh};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

/// Set the incompatible feature bits of qcow2 image `name` to `bits`.
fn set_incompatible(dir: &Path, name: &str, bits: u64) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(name))
        .unwrap();
    f.seek(SeekFrom::Start(72)).unwrap();
    f.write_all(&bits.to_be_bytes()).unwrap();
}

#[test]
fn a_backing_chain_that_loops_is_named_as_qemu_img_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = |args: &[&str]| sh(d, "qemu-img", args);
    // Two images naming each other; the loop is also met under a name spelled
    // differently from the one given (./ prefix).
    q(&["create", "-q", "-f", "qcow2", "l1.qcow2", "1M"]);
    q(&[
        "create", "-q", "-f", "qcow2", "-b", "l1.qcow2", "-F", "qcow2", "l2.qcow2",
    ]);
    q(&["rebase", "-u", "-b", "l2.qcow2", "-F", "qcow2", "l1.qcow2"]);
    q(&["create", "-q", "-f", "qcow2", "self.qcow2", "1M"]);
    q(&[
        "rebase",
        "-u",
        "-b",
        "./self.qcow2",
        "-F",
        "qcow2",
        "self.qcow2",
    ]);
    for img in ["l1.qcow2", "l2.qcow2", "./l1.qcow2"] {
        same(d, &["info", img]);
        same(d, &["info", "--backing-chain", img]);
        same(d, &["info", "--backing-chain", "--output=json", img]);
    }
    assert_all_same();
}

#[test]
fn unknown_incompatible_features_are_refused_in_qemu_imgs_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "named.qcow2", "1M"],
    );
    // Unknown bits alone (the table names bits 0 to 4 only), one low and one high.
    std::fs::copy(d.join("named.qcow2"), d.join("unknown.qcow2")).unwrap();
    set_incompatible(d, "unknown.qcow2", (1 << 5) | (1 << 63));
    // An image whose table names bit 7 (QEMU writes one on every v3 image; the
    // test adds an entry): that name, then the bits left unnamed.
    std::fs::copy(d.join("named.qcow2"), d.join("table.qcow2")).unwrap();
    add_feature_name(d, "table.qcow2", 7, "a feature from the future");
    set_incompatible(d, "table.qcow2", (1 << 7) | (1 << 9));
    for img in ["unknown.qcow2", "table.qcow2"] {
        for args in [
            &["info", img][..],
            &["check", img],
            &["map", img],
            &["snapshot", "-l", img],
            &["measure", "-O", "qcow2", img],
            &["convert", "-O", "raw", img, "out.raw"],
            &["compare", img, "named.qcow2"],
        ] {
            same(d, args);
        }
    }
    assert_all_same();
}

/// Rewrite the feature-name table extension of `name` (written by qemu-img, the
/// header's first extension after the compression-type-free v3 header) with one
/// more incompatible entry `bit` named `text`.
fn add_feature_name(dir: &Path, name: &str, bit: u8, text: &str) {
    use std::io::Read;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut h = vec![0u8; 4096];
    f.read_exact(&mut h).unwrap();
    let header_len = u32::from_be_bytes(h[100..104].try_into().unwrap()) as usize;
    let mut at = header_len;
    loop {
        let ty = u32::from_be_bytes(h[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(h[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_ne!(ty, 0, "no feature-name table in {name}");
        if ty == 0x6803_f857 {
            // Entries of 48 bytes: type, bit, name padded with zeroes.
            let mut entry = vec![0u8, bit];
            entry.extend_from_slice(text.as_bytes());
            entry.resize(48, 0);
            let end = at + 8 + len;
            let mut rest = h[end.next_multiple_of(8)..].to_vec();
            let mut ext = h[at..end].to_vec();
            ext.extend_from_slice(&entry);
            let new_len = (len + 48) as u32;
            ext[4..8].copy_from_slice(&new_len.to_be_bytes());
            ext.resize(ext.len().next_multiple_of(8), 0);
            ext.append(&mut rest);
            ext.truncate(h.len() - at);
            f.seek(SeekFrom::Start(at as u64)).unwrap();
            f.write_all(&ext).unwrap();
            return;
        }
        at += 8 + len.next_multiple_of(8);
    }
}

#[test]
fn sizes_out_of_range_and_past_the_l1_limit_are_refused_as_qemu_img_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for size in [
        "-1",
        "-0",
        "-5k",
        "-1.5",
        "-18446744073709551615",
        "18446744073709551616",
        "16E",
        "1Q",
        "abc",
        "1e3",
        "",
    ] {
        let opt = format!("size={size}");
        same(d, &["create", "-f", "qcow2", "-o", &opt, "x.qcow2"]);
    }
    // The L1 table may hold 4 Mi entries: 2 PiB of 64 KiB clusters.
    sh(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "g.qcow2", "1P"],
    );
    for size in ["+100P", "+1025T", "3P"] {
        same(d, &["resize", "g.qcow2", size]);
    }
    for size in ["+-1", "+-5k", "+18446744073709551616", "+abc"] {
        same(d, &["resize", "g.qcow2", "--", size]);
    }
    assert_all_same();
}

/// Snapshot operations that fail, or that a user may expect to: a name or an ID
/// taken already, an unknown name to apply or delete, a raw image (probed or
/// named), an external data file, a long or empty name. Each runs on its own
/// copy through both tools: same output, messages, exit code, and the same
/// snapshot list afterwards.
#[test]
fn snapshot_failures_are_worded_as_qemu_img_words_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = |args: &[&str]| sh(d, "qemu-img", args);
    q(&["create", "-q", "-f", "qcow2", "s.qcow2", "1M"]);
    q(&["snapshot", "-c", "a", "s.qcow2"]);
    q(&["snapshot", "-c", "2", "s.qcow2"]);
    q(&["create", "-q", "-f", "raw", "s.raw", "1M"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=s.data",
        "ext.qcow2",
        "1M",
    ]);
    let long = "n".repeat(300);
    let cases: &[(&str, &[&str])] = &[
        ("s.qcow2", &["-c", "a"]),
        ("s.qcow2", &["-c", "1"]),
        ("s.qcow2", &["-c", "2"]),
        ("s.qcow2", &["-c", ""]),
        ("s.qcow2", &["-c", &long]),
        ("s.qcow2", &["-a", "zz"]),
        ("s.qcow2", &["-d", "zz"]),
        ("s.qcow2", &["-a", "1"]),
        ("s.qcow2", &["-d", "2"]),
        ("s.qcow2", &["-d", "1"]),
        ("s.raw", &["-c", "b"]),
        ("s.raw", &["-a", "b"]),
        ("s.raw", &["-d", "b"]),
        ("s.raw", &["-l"]),
        ("s.raw", &["-f", "raw", "-c", "b"]),
        ("s.raw", &["-f", "raw", "-l"]),
        ("ext.qcow2", &["-c", "a"]),
        ("ext.qcow2", &["-a", "a"]),
        ("ext.qcow2", &["-d", "a"]),
        ("ext.qcow2", &["-l"]),
    ];
    for (n, (img, args)) in cases.iter().enumerate() {
        let (ours, theirs) = common::same_on_copies(d, n, img, "snapshot", args, &[]);
        if img.ends_with(".qcow2") {
            let list = |f: &str| {
                let (code, out, err) = common::outcome(d, "qemu-img", &["snapshot", "-l", f]);
                // The dates differ by when each tool ran.
                let ids: Vec<String> = out
                    .lines()
                    .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
                    .collect();
                (code, ids, err)
            };
            if list(&ours) != list(&theirs) {
                common::differs(format!("snapshot {args:?} {img}: lists differ"));
            }
        }
    }
    assert_all_same();
}
