//! Internal snapshots leave the file QEMU leaves: sequences of `snapshot -c`,
//! `-a` and `-d` with guest writes between them, run by each tool on its own copy
//! of the same image, must print the same and leave the same bytes (but for the
//! date each tool records in the snapshot table): the same L1 copies, snapshot
//! tables and refcount blocks in the same clusters, freed clusters given back
//! alike (the same ranges of data and holes), and the same unpadded file
//! length. So `info` (human and JSON, dates and disk usage aside: the blocks a
//! file takes also count the file system's own extent blocks, which follow
//! where it happened to place the data), `check` (its image end offset too),
//! `snapshot -l` (dates aside), the
//! file length and every snapshot's data are the same as well; those are
//! compared too, so that a difference is named. Version 2 images keep strata's
//! header switch (they have no dirty bit to cover QEMU's in-place updates): for
//! them only what the tools print and what the images read are compared.

mod common;

use common::{assert_all_same, differs, outcome};
use std::path::Path;

/// One step of a sequence: a guest write by `qemu-io` (`P`, offset, length) on
/// both copies, or a snapshot command run by each tool on its copy.
enum Step {
    Write(u8, &'static str, &'static str),
    Snap(&'static str, String),
}

fn c(name: &str) -> Step {
    Step::Snap("-c", name.into())
}
fn a(name: &str) -> Step {
    Step::Snap("-a", name.into())
}
fn d(name: &str) -> Step {
    Step::Snap("-d", name.into())
}

/// The sequence of the common case: create, write, create, delete, apply,
/// write, create, delete the rest.
fn mixed() -> Vec<Step> {
    vec![
        Step::Write(1, "0", "3M"),
        Step::Write(2, "30M", "1M"),
        c("s1"),
        Step::Write(3, "1M", "64k"),
        c("s2"),
        d("s1"),
        a("s2"),
        Step::Write(4, "2M", "200k"),
        c("s3"),
        a("s2"),
        d("s3"),
        Step::Write(5, "40M", "10k"),
        c("s4"),
        d("s2"),
        d("s4"),
        c("s5"),
    ]
}

/// The file with each snapshot entry's date fields zeroed.
fn undated(path: &Path) -> Vec<u8> {
    let mut b = std::fs::read(path).unwrap();
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let n = be32(&b, 60) as usize;
    let mut at = u64::from_be_bytes(b[64..72].try_into().unwrap()) as usize;
    for _ in 0..n {
        b[at + 16..at + 24].fill(0);
        let id = u16::from_be_bytes([b[at + 12], b[at + 13]]) as usize;
        let name = u16::from_be_bytes([b[at + 14], b[at + 15]]) as usize;
        let extra = be32(&b, at + 36) as usize;
        at += (40 + extra + id + name).next_multiple_of(8);
    }
    b
}

/// A line of `info` or `snapshot -l` without the date and clock columns (each
/// tool records its own time).
fn dateless(text: &str) -> String {
    text.lines()
        .filter(|l| !l.contains("\"date-sec\"") && !l.contains("\"date-nsec\""))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            // ID TAG VM_SIZE DATE TIME VM_CLOCK ICOUNT: keep ID, TAG, VM_SIZE, ICOUNT.
            match w
                .iter()
                .position(|t| t.len() == 10 && t.as_bytes()[4] == b'-')
            {
                Some(p) if p >= 2 => format!("{} {}", w[..p].join(" "), w[p + 3..].join(" ")),
                _ => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Run `steps` on two copies of `fixture` in `dir` (strata's `o.qcow2`,
/// qemu-img's `t.qcow2`) and record every difference. With `exact` the files
/// must be the same bytes (dates aside) after every snapshot command.
fn run_sequence(dir: &Path, what: &str, steps: &[Step], exact: bool) {
    for f in ["o.qcow2", "t.qcow2"] {
        std::fs::copy(dir.join("fixture.qcow2"), dir.join(f)).unwrap();
    }
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Write(p, off, len) => {
                for f in ["o.qcow2", "t.qcow2"] {
                    common::io(dir, "qcow2", f, &[format!("write -P {p} {off} {len}")]);
                }
            }
            Step::Snap(op, name) => {
                let step = format!("{what}, step {i}: snapshot {op} {name}");
                let ours = outcome(dir, "strata", &["snapshot", op, name, "o.qcow2"]);
                let theirs = outcome(dir, "qemu-img", &["snapshot", op, name, "t.qcow2"]);
                if ours != theirs {
                    differs(format!(
                        "{step}:\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
                    ));
                }
                compare_views(dir, &step, exact);
                compare_snapshot_data(dir, &step);
            }
        }
    }
}

/// The ranges of a file that hold data (between them, holes), as the file
/// system reports them.
fn data_ranges(path: &Path) -> Vec<(i64, i64)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let end = f.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut at = 0;
    while at < end {
        // SAFETY: lseek on a file descriptor this function owns.
        let data = unsafe { libc::lseek(f.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        out.push((data, hole));
        at = hole;
    }
    out
}

/// Compare the two copies as the module says.
fn compare(dir: &Path, step: &str, exact: bool) {
    compare_views(dir, step, exact);
    compare_snapshot_data(dir, step);
}

/// Compare the files and what qemu-img shows of them (but the snapshots' data).
fn compare_views(dir: &Path, step: &str, exact: bool) {
    let (o, t) = (dir.join("o.qcow2"), dir.join("t.qcow2"));
    if exact {
        let len = |p: &Path| std::fs::metadata(p).unwrap().len();
        if len(&o) != len(&t) {
            differs(format!("{step}: file length {} vs {}", len(&o), len(&t)));
        }
        if undated(&o) != undated(&t) {
            differs(format!("{step}: the files differ"));
        }
        let (ro, rt) = (data_ranges(&o), data_ranges(&t));
        if ro != rt {
            differs(format!(
                "{step}: data ranges\n  strata:   {ro:x?}\n  qemu-img: {rt:x?}"
            ));
        }
    }
    let show = |args: &[&str], f: &str| {
        let mut a = args.to_vec();
        a.push(f);
        let (code, out, err) = outcome(dir, "qemu-img", &a);
        let text = dateless(&format!("{out}{err}"))
            .replace(f, "IMG")
            .lines()
            .filter(|l| !l.trim_start().starts_with("disk size:") && !l.contains("\"actual-size\""))
            .collect::<Vec<_>>()
            .join("\n");
        (code, text)
    };
    let mut views: Vec<&[&str]> = vec![&["snapshot", "-l"]];
    if exact {
        views.extend([
            &["info"][..],
            &["info", "--output=json"][..],
            &["check"][..],
        ]);
    } else {
        // The layouts differ, so do the image end offsets: both check clean.
        for f in ["o.qcow2", "t.qcow2"] {
            let (code, out, err) = outcome(dir, "qemu-img", &["check", f]);
            if code != Some(0) {
                differs(format!("{step}: check {f} {code:?}\n{out}{err}"));
            }
        }
    }
    for args in views {
        let (ours, theirs) = (show(args, "o.qcow2"), show(args, "t.qcow2"));
        if ours != theirs {
            differs(format!(
                "{step}: {args:?}\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
            ));
        }
    }
}

/// The active disks and every snapshot of the two copies read the same.
fn compare_snapshot_data(dir: &Path, step: &str) {
    let (code, out, err) = outcome(dir, "qemu-img", &["compare", "-U", "o.qcow2", "t.qcow2"]);
    if code != Some(0) {
        differs(format!("{step}: compare {code:?}\n{out}{err}"));
    }
    let (_, list, _) = outcome(dir, "qemu-img", &["snapshot", "-l", "t.qcow2"]);
    for id in list
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next())
    {
        for (f, raw) in [("o.qcow2", "o.raw"), ("t.qcow2", "t.raw")] {
            let sn = format!("snapshot.id={id}");
            common::sh(
                dir,
                "qemu-img",
                &["convert", "-U", "-l", &sn, "-O", "raw", f, raw],
            );
        }
        if std::fs::read(dir.join("o.raw")).unwrap() != std::fs::read(dir.join("t.raw")).unwrap() {
            differs(format!("{step}: snapshot {id} reads differently"));
        }
    }
}

/// A fixture image made by qemu-img with `opts`.
fn fixture(dir: &Path, size: &str, opts: &[&str]) {
    let _ = std::fs::remove_file(dir.join("fixture.qcow2"));
    common::qcow2(dir, "fixture.qcow2", size, opts);
}

/// 1-bit refcounts cannot count a second reference: both tools refuse the
/// snapshot in the same words and leave the same file (the L1 copy leaked).
#[test]
fn a_snapshot_refused_for_1_bit_refcounts_leaves_qemus_bytes() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path(), "64M", &["-o", "refcount_bits=1"]);
    common::io(dir.path(), "qcow2", "fixture.qcow2", &["write -P 1 0 128k"]);
    for f in ["o.qcow2", "t.qcow2"] {
        std::fs::copy(dir.path().join("fixture.qcow2"), dir.path().join(f)).unwrap();
    }
    let ours = outcome(dir.path(), "strata", &["snapshot", "-c", "s1", "o.qcow2"]);
    let theirs = outcome(dir.path(), "qemu-img", &["snapshot", "-c", "s1", "t.qcow2"]);
    assert_eq!(theirs.0, Some(1));
    // qemu-img words the overflow as EINVAL.
    assert_eq!(ours, theirs);
    compare(dir.path(), "refcount_bits=1", true);
    assert_all_same();
}

/// A snapshot whose new clusters lie past what the refcount table covers: the
/// table grows during `snapshot -c`, in the same place with both tools.
#[test]
fn a_snapshot_that_grows_the_refcount_table_leaves_qemus_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters, 16-bit refcounts: one table cluster covers 8 MiB.
    fixture(dir.path(), "64M", &["-o", "cluster_size=512"]);
    let p = dir.path().join("fixture.qcow2");
    let reftable = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        u64::from_be_bytes(b[48..56].try_into().unwrap())
    };
    // 8010 KiB of data leave the file a few clusters short of 8 MiB: the L1
    // copy and the snapshot table of `-c` cross it.
    common::io(
        dir.path(),
        "qcow2",
        "fixture.qcow2",
        &["write -P 1 0 8010k"],
    );
    let before = reftable(&p);
    // Only creates: a delete's discards of 512-byte clusters leave another
    // allocated size, and this L1 table (4 KiB) is applied by the header switch.
    let steps = vec![c("s1"), Step::Write(2, "0", "64k"), c("s2")];
    run_sequence(dir.path(), "refcount table growth", &steps, true);
    assert_ne!(
        reftable(&dir.path().join("t.qcow2")),
        before,
        "the sequence must grow the refcount table"
    );
    assert_all_same();
}

/// Version 2 images: the same output and the same data (their layout differs).
#[test]
fn snapshot_sequences_on_version_2_images_print_and_read_as_qemus() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path(), "64M", &["-o", "compat=0.10"]);
    run_sequence(dir.path(), "compat=0.10", &mixed(), false);
    assert_all_same();
}

/// The sequence of the common case on a small disk (2 MiB), for geometries
/// whose L1 table must stay within one sector to be applied in place.
fn mixed_small() -> Vec<Step> {
    vec![
        Step::Write(1, "0", "300k"),
        Step::Write(2, "1M", "64k"),
        c("s1"),
        Step::Write(3, "100k", "8k"),
        c("s2"),
        d("s1"),
        a("s2"),
        Step::Write(4, "200k", "20k"),
        c("s3"),
        a("s2"),
        d("s3"),
        Step::Write(5, "1500k", "10k"),
        c("s4"),
        d("s2"),
        d("s4"),
        c("s5"),
    ]
}

/// Run `steps` on a fixture made with `opts` and require QEMU's bytes.
fn exact_case(what: &str, size: &str, opts: &[&str], steps: &[Step]) {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path(), size, opts);
    run_sequence(dir.path(), what, steps, true);
    assert_all_same();
}

/// 512-byte clusters, on a disk whose L1 table fits one sector.
#[test]
fn snapshot_sequences_with_512_byte_clusters_leave_qemus_bytes() {
    exact_case(
        "cluster_size=512",
        "2M",
        &["-o", "cluster_size=512"],
        &mixed_small(),
    );
}

/// The default geometry (64 KiB clusters): each delete frees the snapshot
/// table at the end of the file, a partial cluster, which both tools give back
/// whole (the file keeps its length; its last block becomes a hole).
#[test]
fn snapshot_sequences_with_default_clusters_leave_qemus_bytes() {
    exact_case("default clusters", "64M", &[], &mixed());
}

/// `-l snapshot.id=ID,snapshot.name=NAME` names a snapshot exactly: an ID is
/// not looked for among names nor a name among IDs, both given must match
/// the same snapshot, a key given twice takes its last value. Unlike `-l
/// NAME`, it is not refused with several sources: the first is read at the
/// snapshot, the others as they are. convert and measure alike.
#[test]
fn snapshot_options_name_a_snapshot_exactly_and_load_it_on_the_first_source() {
    let dir = tempfile::tempdir().unwrap();
    // Made once (a snapshot records its date) and copied to both sides.
    let fix = dir.path().join("fix");
    std::fs::create_dir(&fix).unwrap();
    let made = "qemu-img create -q -f qcow2 a 1M
         qemu-io -c 'write -P 1 0 64k' a >/dev/null
         qemu-img snapshot -c snap a
         qemu-io -c 'write -P 2 0 128k' a >/dev/null
         qemu-img snapshot -c 1 a
         qemu-io -c 'write -P 3 0 192k' a >/dev/null
         qemu-img create -q -f qcow2 b 1M
         qemu-io -c 'write -P 4 64k 64k' b >/dev/null";
    common::sh(&fix, "bash", &["-ec", made]);
    let steps = [
        "convert -l snapshot.id=snap a o1",
        "convert -l snapshot.name=1 -O raw a o2",
        "convert -l snapshot.id=2,snapshot.id=1 -O raw a o3",
        "convert -l snapshot.name=x,snapshot.name=snap -O raw a o4",
        "convert -l snapshot.id=1,snapshot.name=1 a b o5",
        "convert -l snapshot.id=1,snapshot.name=snap -O raw a b a o6",
        "convert -l snapshot.name=1 -O qcow2 a b o7",
        "convert -l 1 a b o8",
        "convert -l snapshot.id=2 b a o9",
        "measure -l snapshot.id=snap a",
        "measure -l snapshot.name=1 a",
        "measure -l snapshot.name=snap,snapshot.id=1 -O qcow2 a",
    ];
    common::same_files(dir.path(), "exact", "cp ../fix/* .", &steps, false);
    assert_all_same();
}
