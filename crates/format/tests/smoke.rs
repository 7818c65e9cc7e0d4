use std::sync::Arc;
use strata_format::qcow2::{create, CreateOptions};
use strata_format::BlockDevice;
use strata_storage::{FileStorage, Storage};

#[test]
fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    let s: Arc<dyn Storage> = Arc::new(FileStorage::create(&p).unwrap());
    let img = create(
        s,
        &CreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    img.write(&data, 12345).unwrap();
    img.write(&data[..1000], 40 << 20).unwrap();
    img.write_zeroes(0, 4096, false).unwrap();
    img.close().unwrap();
    let mut back = vec![0u8; data.len()];
    img.read(&mut back, 12345).unwrap();
    assert_eq!(&back[4096 - 12345 % 4096..], &data[4096 - 12345 % 4096..]);
    drop(img);
    let out = std::process::Command::new("qemu-img")
        .args(["check", p.to_str().unwrap()])
        .output()
        .unwrap();
    println!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    let raw = dir.path().join("a.raw");
    let mut expect = vec![0u8; 64 << 20];
    expect[12345..12345 + data.len()].copy_from_slice(&data);
    expect[0..4096].fill(0);
    expect[40 << 20..(40 << 20) + 1000].copy_from_slice(&data[..1000]);
    std::fs::write(&raw, &expect).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            raw.to_str().unwrap(),
            p.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    println!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
}
