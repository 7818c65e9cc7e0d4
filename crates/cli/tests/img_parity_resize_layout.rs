//! Grow and shrink sequences leave the files qemu-img leaves: the same
//! commands, run by each tool on its own copy of an image qemu-img made (and
//! qemu-io filled), print the same and leave files of the same length, the same
//! disk usage (within the one 4 KiB block a file system may add for its extent
//! tree), the same bytes, map and guest data, and strata's checks clean.
//!
//! Shrinking discards the clusters and L2 tables past the new end and punches
//! them, as QEMU does.

mod common;

use common::{assert_all_same, differs, io, map_json, outcome, same_image};
use std::path::Path;

/// One sequence: create options and size, the qemu-io commands that fill the
/// image, and the resize steps (each the arguments before the file name, then
/// the new size).
struct Case {
    opts: String,
    size: &'static str,
    writes: &'static [&'static str],
    steps: Vec<(&'static [&'static str], &'static str)>,
}

/// Length and disk usage (512-byte blocks) of `name` in `d`.
fn room(d: &Path, name: &str) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(d.join(name)).unwrap();
    (meta.len(), meta.blocks())
}

/// Run `case` with both tools and record every difference.
fn same_sequence(d: &Path, n: usize, case: &Case) {
    let what = format!(
        "-o {} {} {:?}: {:?}",
        case.opts, case.size, case.writes, case.steps
    );
    let (ours, theirs) = (format!("o{n}.qcow2"), format!("t{n}.qcow2"));
    for f in [&ours, &theirs] {
        let args = [
            "create", "-q", "-f", "qcow2", "-o", &case.opts, f, case.size,
        ];
        common::sh(d, "qemu-img", &args);
        if !case.writes.is_empty() {
            io(d, "qcow2", f, case.writes);
        }
    }
    for (before, new_size) in &case.steps {
        let run = |prog: &str, f: &str| {
            let mut a = vec!["resize"];
            a.extend_from_slice(before);
            a.extend([f, "--", new_size]);
            let (code, out, err) = outcome(d, prog, &a);
            (code, out.replace(f, "IMG"), err.replace(f, "IMG"))
        };
        let (r_ours, r_theirs) = (run("strata", &ours), run("qemu-img", &theirs));
        if r_ours != r_theirs {
            differs(format!(
                "{what}: resize {before:?} {new_size}\n  strata:   {r_ours:?}\n  qemu-img: {r_theirs:?}"
            ));
        }
    }
    let ((l_ours, b_ours), (l_theirs, b_theirs)) = (room(d, &ours), room(d, &theirs));
    if l_ours != l_theirs || b_ours.abs_diff(b_theirs) > 8 {
        differs(format!(
            "{what}: (length, blocks) strata {:?}, qemu-img {:?}",
            (l_ours, b_ours),
            (l_theirs, b_theirs)
        ));
    }
    let read = |f: &str| std::fs::read(d.join(f)).unwrap();
    if read(&ours) != read(&theirs) {
        differs(format!("{what}: the files' bytes differ"));
    }
    let (m_ours, m_theirs) = (map_json(d, &ours), map_json(d, &theirs));
    if m_ours != m_theirs {
        differs(format!("{what}: map\n{m_ours}---\n{m_theirs}"));
    }
    same_image(d, &ours, &theirs, &what);
    let _ = std::fs::remove_file(d.join(&ours));
    let _ = std::fs::remove_file(d.join(&theirs));
}

const SHRINK: &[&str] = &["--shrink"];

/// The exact sequence a user reported: a 1 GiB image grown to 2 GiB and shrunk
/// back (by size and by a negative change) leaves qemu-img's file, in which the
/// L2 tables the shrink allocated and dropped are holes.
#[test]
fn growing_then_shrinking_back_punches_the_dropped_tables_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let back = [
        vec![(&[][..], "2G"), (SHRINK, "1G")],
        vec![(&[][..], "+1G"), (SHRINK, "-1G")],
    ];
    for (n, steps) in back.into_iter().enumerate() {
        let case = Case {
            opts: "cluster_size=64k".into(),
            size: "1G",
            writes: &[],
            steps,
        };
        same_sequence(d, n, &case);
    }
    assert_all_same();
}

/// Metadata preallocation at 512-byte (and other small) clusters needs a new
/// refcount block every few runs; the run that first needs one stays where
/// the search found it (QEMU retries the same clusters once the block is
/// placed past them). `create`, `resize --preallocation=metadata` and
/// `convert -o preallocation=metadata` each leave qemu-img's very bytes.
#[test]
fn metadata_preallocation_keeps_the_run_that_needed_a_new_refcount_block_where_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut n = 0;
    for (cs, bits, sizes) in [
        ("512", "16", &["4M", "16M", "64M"][..]),
        ("512", "1", &["16M"][..]),
        ("512", "64", &["4M", "16M"][..]),
        ("1k", "8", &["33M"][..]),
        ("4k", "64", &["100M"][..]),
    ] {
        let opts = format!("cluster_size={cs},refcount_bits={bits}");
        for &size in sizes {
            let with_prealloc = format!("{opts},preallocation=metadata");
            let src = format!("src-{size}.raw");
            if !d.join(&src).exists() {
                common::sh(d, "qemu-img", &["create", "-q", "-f", "raw", &src, size]);
                io(d, "raw", &src, &["write -P 0x5a 1M 64k"]);
            }
            let steps: [Vec<&str>; 3] = [
                vec![
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &with_prealloc,
                    "IMG",
                    size,
                ],
                vec!["resize", "-q", "--preallocation=metadata", "IMG", size],
                vec!["convert", "-O", "qcow2", "-o", &with_prealloc, &src, "IMG"],
            ];
            for step in &steps {
                n += 1;
                let (ours, theirs) = (format!("o{n}.qcow2"), format!("t{n}.qcow2"));
                if step[0] == "resize" {
                    for f in [&ours, &theirs] {
                        let a = ["create", "-q", "-f", "qcow2", "-o", &opts, f, "1M"];
                        common::sh(d, "qemu-img", &a);
                    }
                }
                let what = format!("{step:?} ({opts}, {size})");
                let run = |prog: &str, f: &str| {
                    let a: Vec<&str> = step
                        .iter()
                        .map(|&s| if s == "IMG" { f } else { s })
                        .collect();
                    let (code, out, err) = outcome(d, prog, &a);
                    (code, out.replace(f, "IMG"), err.replace(f, "IMG"))
                };
                let (r_ours, r_theirs) = (run("strata", &ours), run("qemu-img", &theirs));
                if r_ours != r_theirs {
                    differs(format!(
                        "{what}\n  strata:   {r_ours:?}\n  qemu-img: {r_theirs:?}"
                    ));
                }
                let read = |f: &str| std::fs::read(d.join(f)).unwrap();
                if read(&ours) != read(&theirs) {
                    differs(format!("{what}: the files' bytes differ"));
                }
                same_image(d, &ours, &theirs, &what);
                let _ = std::fs::remove_file(d.join(&ours));
                let _ = std::fs::remove_file(d.join(&theirs));
            }
        }
    }
    assert_all_same();
}
