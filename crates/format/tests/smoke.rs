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

/// NBD's fast zero: `write_zeroes_fast` zeroes by metadata or allocation changes
/// only; where that is impossible it answers `false` and leaves the data as it was.
#[test]
fn fast_zeroing_changes_metadata_only_or_refuses_with_data_untouched() {
    use strata_format::raw::RawImage;
    use strata_storage::MemStorage;
    let mk = |version: u32| {
        create(
            Arc::new(MemStorage::new()),
            &CreateOptions {
                size: 1 << 20,
                version,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let read = |d: &dyn BlockDevice, off: u64, n: usize| {
        let mut b = vec![0u8; n];
        d.read(&mut b, off).unwrap();
        b
    };
    let c = 65536u64;
    // v3: whole clusters become zero clusters; a partial cluster only if it
    // already reads as zeroes.
    let v3 = mk(3);
    v3.write(&[7u8; 3 * 65536], 0).unwrap();
    assert!(v3.write_zeroes_fast(0, 2 * c, true).unwrap());
    assert_eq!(read(&v3, 0, 2 * c as usize), vec![0u8; 2 * c as usize]);
    assert!(!v3.write_zeroes_fast(2 * c + 512, 4096, true).unwrap());
    assert_eq!(read(&v3, 2 * c, c as usize), vec![7u8; c as usize]);
    assert!(v3.write_zeroes_fast(4 * c + 512, 4096, false).unwrap());
    assert!(v3.write_zeroes_fast(512, c, false).unwrap());
    assert!(!v3.write_zeroes_fast(c + 512, c, false).unwrap());
    // v2 with a backing file has no zero flag: refused, backing data still shows.
    let backing = Arc::new(RawImage::open(Arc::new(MemStorage::new())).unwrap());
    let v2 = mk(2);
    v2.set_backing(Some(backing.clone()));
    backing.resize(1 << 20, false).unwrap();
    backing.write(&[9u8; 65536], 0).unwrap();
    assert!(!v2.write_zeroes_fast(0, c, true).unwrap());
    assert_eq!(read(&v2, 0, c as usize), vec![9u8; c as usize]);
    // Without a backing file, v2 zeroes by deallocating.
    let v2 = mk(2);
    v2.write(&[3u8; 65536], 0).unwrap();
    assert!(v2.write_zeroes_fast(0, c, true).unwrap());
    assert_eq!(read(&v2, 0, c as usize), vec![0u8; c as usize]);
}
