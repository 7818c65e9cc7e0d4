//! Overlays and external snapshots made by strata are ordinary QEMU chains: qemu-img
//! sees the recorded backing file and format, qemu-io reads the base through them
//! and writes into them, and `qemu-img check` passes. A chain of external snapshots
//! taken in turn (with writes in between) reads the same through strata and QEMU.

mod common;

use common::{qemu, serial};
use std::path::Path;
use std::process::{Command, Stdio};
use strata_format::{ErrorKind, Format};
use strata_jobs::overlay::{self, OverlayRequest};

fn info(dir: &Path, img: &str) -> serde_json::Value {
    serde_json::from_str(&qemu(
        dir,
        "qemu-img",
        &["info", "-U", "--output=json", img],
    ))
    .unwrap()
}

fn read_all(path: &Path) -> Vec<u8> {
    let chain = strata_chain::open(
        &strata_chain::OpenSpec::new(path)
            .format(None)
            .force_share(true),
    )
    .unwrap();
    let top = chain.top();
    let mut v = vec![0u8; top.virtual_size() as usize];
    top.read(&mut v, 0).unwrap();
    v
}

#[test]
fn backing_name_is_bare_in_the_same_directory_and_absolute_elsewhere() {
    let _serial = serial();
    let t = tempfile::tempdir().unwrap();
    let sub = t.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(t.path().join("base.img"), b"").unwrap();
    std::fs::write(sub.join("other.img"), b"").unwrap();
    let abs_base = std::fs::canonicalize(t.path().join("base.img")).unwrap();
    let abs_other = std::fs::canonicalize(sub.join("other.img")).unwrap();
    let cases: [(&Path, &Path, String); 4] = [
        (
            &t.path().join("top.qcow2"),
            &t.path().join("base.img"),
            "base.img".into(),
        ),
        (
            &t.path().join("top.qcow2"),
            &sub.join("other.img"),
            abs_other.display().to_string(),
        ),
        (
            &sub.join("top.qcow2"),
            &t.path().join("base.img"),
            abs_base.display().to_string(),
        ),
        (
            &sub.join("top.qcow2"),
            &t.path().join("sub/../sub/other.img"),
            "other.img".into(),
        ),
    ];
    for (overlay, backing, want) in cases {
        assert_eq!(
            overlay::backing_name(overlay, backing).unwrap(),
            want,
            "{overlay:?} on {backing:?}"
        );
    }
    assert!(overlay::backing_name(&t.path().join("x"), &t.path().join("missing")).is_err());
}

#[test]
fn external_snapshot_of_raw_and_qcow2_disks_is_a_qemu_chain() {
    let _serial = serial();
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "disk.raw", "3M"],
    );
    qemu(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 1M", "disk.raw"],
    );
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "disk.qcow2",
            "5M",
        ],
    );
    qemu(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 1M 1M", "disk.qcow2"],
    );
    for (disk, fmt, size, cluster) in [
        ("disk.raw", Format::Raw, 3u64 << 20, 65536u64),
        ("disk.qcow2", Format::Qcow2, 5 << 20, 4096),
    ] {
        let ov = format!("{disk}.snap1");
        let before = read_all(&d.join(disk));
        let p = overlay::external_snapshot(&d.join(disk), fmt, &d.join(&ov)).unwrap();
        assert_eq!((p.size, p.cluster_size, p.depth), (size, cluster, 2));
        let i = info(d, &ov);
        assert_eq!(i["backing-filename"], disk);
        assert_eq!(i["backing-filename-format"], fmt.name());
        assert_eq!(i["virtual-size"], size);
        assert_eq!(i["cluster-size"], cluster);
        qemu(d, "qemu-img", &["check", &ov]);
        // The overlay shows the disk, and takes writes without touching it.
        qemu(
            d,
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", fmt.name(), &ov, disk],
        );
        assert_eq!(read_all(&d.join(&ov)), before);
        qemu(
            d,
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x33 512k 1M", &ov],
        );
        let mut after = before.clone();
        after[512 << 10..(512 << 10) + (1 << 20)].fill(0x33);
        assert_eq!(read_all(&d.join(&ov)), after);
        assert_eq!(read_all(&d.join(disk)), before, "{disk} must not change");
        qemu(d, "qemu-img", &["check", &ov]);
        // Never over an existing file.
        let e = overlay::external_snapshot(&d.join(disk), fmt, &d.join(&ov)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    }
}

#[test]
fn a_chain_of_external_snapshots_reads_the_same_in_strata_and_qemu() {
    let _serial = serial();
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    qemu(d, "qemu-img", &["create", "-q", "-f", "raw", "s0", "4M"]);
    let mut model = vec![0u8; 4 << 20];
    let mut cur = ("s0".to_string(), Format::Raw);
    for i in 1..=8u8 {
        let next = format!("s{i}");
        overlay::external_snapshot(&d.join(&cur.0), cur.1, &d.join(&next)).unwrap();
        // A write through strata at each level.
        let chain = strata_chain::open(
            &strata_chain::OpenSpec::new(d.join(&next))
                .format(Some(Format::Qcow2))
                .write(true),
        )
        .unwrap();
        let off = (i as usize * 300_000) % (3 << 20);
        let data = vec![i; 200_000];
        chain.top().write(&data, off as u64).unwrap();
        chain.top().flush().unwrap();
        drop(chain);
        model[off..off + data.len()].copy_from_slice(&data);
        cur = (next, Format::Qcow2);
    }
    assert_eq!(read_all(&d.join("s8")), model);
    std::fs::write(d.join("model.raw"), &model).unwrap();
    qemu(
        d,
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", "s8", "model.raw"],
    );
    let chain = qemu(d, "qemu-img", &["info", "--backing-chain", "-U", "s8"]);
    assert_eq!(chain.matches("image: ").count(), 9, "{chain}");
    for i in 1..=8 {
        qemu(d, "qemu-img", &["check", &format!("s{i}")]);
    }
}

#[test]
fn external_snapshot_refuses_a_disk_qemu_is_writing_and_a_missing_disk() {
    let _serial = serial();
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "busy.qcow2", "1M"],
    );
    let mut writer = Command::new("qemu-io")
        .args(["-f", "qcow2", "busy.qcow2"])
        .current_dir(d)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-io must be installed");
    // Wait until qemu-io holds the write lock.
    let mut held = false;
    for _ in 0..500 {
        if strata_storage::lock::probe(&d.join("busy.qcow2"))
            .unwrap()
            .write_held
        {
            held = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(held, "qemu-io never locked the image");
    let e = overlay::external_snapshot(&d.join("busy.qcow2"), Format::Qcow2, &d.join("snap"))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    assert!(!d.join("snap").exists());
    drop(writer.stdin.take());
    writer.wait().unwrap();
    overlay::external_snapshot(&d.join("busy.qcow2"), Format::Qcow2, &d.join("snap")).unwrap();

    let e = overlay::external_snapshot(&d.join("nope"), Format::Raw, &d.join("snap2")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    // A leftover temporary file is never left behind.
    let names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("strata-new")), "{names:?}");
    // Explicit size (rounded up to whole sectors) and cluster size.
    let p = overlay::create_overlay(&OverlayRequest {
        overlay: d.join("big.qcow2"),
        backing: d.join("busy.qcow2"),
        backing_format: Format::Qcow2,
        size: Some((3 << 20) + 1),
        cluster_size: Some(16384),
    })
    .unwrap();
    assert_eq!((p.size, p.cluster_size), ((3 << 20) + 512, 16384));
    let i = info(d, "big.qcow2");
    assert_eq!(i["virtual-size"], (3 << 20) + 512);
    assert_eq!(i["cluster-size"], 16384);
    qemu(d, "qemu-img", &["check", "big.qcow2"]);
}
