//! The engine against real QEMU, both ways.
//!
//! strata writes, QEMU confirms: random writes, zeroes and discards through strata on
//! every configuration, then `qemu-img check` must be clean and `qemu-img compare`
//! must match the reference raw image.
//! QEMU writes, strata reads: images made by qemu-img and qemu-io (v2/v3, cluster
//! sizes, compressed zlib/zstd, zero clusters, subclusters, backing files,
//! preallocation) read identically to `qemu-img convert -O raw` of the same image.
//! A missing qemu-img or qemu-io fails these tests.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use strata_format::qcow2::{
    create, CompressionType, CreateOptions, Preallocation, Qcow2Image, Qcow2OpenOptions,
};
use strata_format::raw::RawImage;
use strata_format::BlockDevice;
use strata_storage::{FileStorage, OpenOptions, Storage};

fn qemu(tool: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} must be installed (QEMU 10): {e}"));
    out
}

fn qemu_ok(tool: &str, args: &[&str]) -> String {
    let out = qemu(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A deterministic pseudo-random generator (xorshift) so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn strata_writes_then_qemu_checks(opts: CreateOptions, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let img_path = dir.path().join("t.qcow2");
    let ref_path = dir.path().join("ref.raw");
    let size = opts.size;
    let mut model = vec![0u8; size as usize];
    if let Some(b) = &opts.backing_file {
        let bpath = dir.path().join(b);
        let mut content = vec![0u8; size as usize / 2];
        let mut r = Rng(seed ^ 0x55);
        for c in content.iter_mut() {
            *c = r.next() as u8;
        }
        std::fs::write(&bpath, &content).unwrap();
        model[..content.len()].copy_from_slice(&content);
    }
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::create(&img_path).unwrap());
    let img = create(storage, &opts).unwrap();
    if let Some(b) = &opts.backing_file {
        let bs: Arc<dyn Storage> =
            Arc::new(FileStorage::open(dir.path().join(b), OpenOptions::read()).unwrap());
        img.set_backing(Some(Arc::new(RawImage::open(bs).unwrap())));
    }
    let mut r = Rng(seed);
    for i in 0..60 {
        let off = r.below(size);
        let len = (r.below(300_000) + 1).min(size - off);
        match r.below(10) {
            0..=6 => {
                let data: Vec<u8> = (0..len).map(|k| (k as u8) ^ (i as u8) | 1).collect();
                img.write(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            7 | 8 => {
                img.write_zeroes(off, len, r.below(2) == 0).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => img.flush().unwrap(),
        }
    }
    img.close().unwrap();
    drop(img);
    std::fs::write(&ref_path, &model).unwrap();
    let out = qemu("qemu-img", &["check", s(&img_path)]);
    assert!(
        out.status.success(),
        "qemu-img check failed for {opts:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    qemu_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            s(&ref_path),
            s(&img_path),
        ],
    );
}

#[test]
fn strata_written_images_pass_qemu_check_and_compare_in_every_configuration() {
    let mut seed = 1;
    for cluster_size in [512u64, 4096, 65536, 2 << 20] {
        for refcount_bits in [1u32, 16, 64] {
            seed += 1;
            strata_writes_then_qemu_checks(
                CreateOptions {
                    size: 8 << 20,
                    cluster_size,
                    refcount_bits,
                    ..Default::default()
                },
                seed,
            );
        }
    }
    for version in [2u32, 3] {
        seed += 1;
        strata_writes_then_qemu_checks(
            CreateOptions {
                size: 8 << 20,
                version,
                ..Default::default()
            },
            seed,
        );
    }
    for cluster_size in [16384u64, 65536, 1 << 20] {
        seed += 1;
        strata_writes_then_qemu_checks(
            CreateOptions {
                size: 8 << 20,
                cluster_size,
                extended_l2: true,
                ..Default::default()
            },
            seed,
        );
    }
    for version in [2u32, 3] {
        seed += 1;
        strata_writes_then_qemu_checks(
            CreateOptions {
                size: 8 << 20,
                version,
                backing_file: Some("base.raw".into()),
                backing_format: Some("raw".into()),
                ..Default::default()
            },
            seed,
        );
    }
    seed += 1;
    strata_writes_then_qemu_checks(
        CreateOptions {
            size: 8 << 20,
            lazy_refcounts: true,
            compression_type: CompressionType::Zstd,
            ..Default::default()
        },
        seed,
    );
    for p in [
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        seed += 1;
        strata_writes_then_qemu_checks(
            CreateOptions {
                size: 8 << 20,
                preallocation: p,
                ..Default::default()
            },
            seed,
        );
    }
}

/// Read the whole guest view through strata (with a raw or qcow2 backing file if the
/// image names one) and compare with qemu-img's own conversion to raw.
fn strata_reads_like_qemu(img_path: &Path, backing: Option<(&Path, &str)>) {
    let dir = img_path.parent().unwrap();
    let raw = dir.join(format!(
        "{}.expect.raw",
        img_path.file_name().unwrap().to_str().unwrap()
    ));
    qemu_ok("qemu-img", &["convert", "-O", "raw", s(img_path), s(&raw)]);
    let expect = std::fs::read(&raw).unwrap();
    let st: Arc<dyn Storage> = Arc::new(FileStorage::open(img_path, OpenOptions::read()).unwrap());
    let img = Qcow2Image::open(
        st,
        Qcow2OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    if let Some((bp, fmt)) = backing {
        let bs: Arc<dyn Storage> = Arc::new(FileStorage::open(bp, OpenOptions::read()).unwrap());
        let dev: Arc<dyn BlockDevice> = if fmt == "raw" {
            Arc::new(RawImage::open(bs).unwrap())
        } else {
            Arc::new(
                Qcow2Image::open(
                    bs,
                    Qcow2OpenOptions {
                        read_only: true,
                        ..Default::default()
                    },
                )
                .unwrap(),
            )
        };
        img.set_backing(Some(dev));
    }
    assert_eq!(img.virtual_size(), expect.len() as u64);
    let mut got = vec![0u8; expect.len()];
    // Read in odd-sized pieces to cross cluster and subcluster boundaries.
    let mut off = 0usize;
    let mut step = 4093usize;
    while off < got.len() {
        let n = step.min(got.len() - off);
        img.read(&mut got[off..off + n], off as u64).unwrap();
        off += n;
        step = step * 7 % 300_007 + 511;
    }
    if got != expect {
        let first = got.iter().zip(&expect).position(|(a, b)| a != b).unwrap();
        panic!(
            "{}: strata reads differ from qemu-img at offset {first}",
            img_path.display()
        );
    }
}

/// Write a recognisable pattern with qemu-io: data, zeroes, and overwrites.
fn qemu_io_pattern(img: &Path, fmt: &str, size: u64) {
    let mut cmds = Vec::new();
    let mut r = Rng(size ^ 0x9e37);
    for i in 0..24 {
        let off = r.below(size / 512) * 512;
        let len = ((r.below(200) + 1) * 512).min(size - off);
        let pat = (i * 17 + 1) % 256;
        if i % 5 == 4 {
            cmds.push(format!("write -z {off} {len}"));
        } else {
            cmds.push(format!("write -P {pat} {off} {len}"));
        }
    }
    // Unaligned writes too (sub-sector).
    cmds.push("write -P 0xab 1000 3000".into());
    let mut args = vec!["-f", fmt];
    for c in &cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    qemu_ok("qemu-io", &args);
}

#[test]
fn qemu_written_images_read_identically_through_strata() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 6 << 20;
    let sz = size.to_string();
    let mut n = 0;
    let mut make = |opts: &str| {
        n += 1;
        let p = dir.path().join(format!("q{n}.qcow2"));
        qemu_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, s(&p), &sz],
        );
        qemu_io_pattern(&p, "qcow2", size);
        p
    };
    for opts in [
        "compat=0.10",
        "compat=1.1",
        "cluster_size=512",
        "cluster_size=4096",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=64",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "lazy_refcounts=on",
        "preallocation=metadata",
        "preallocation=falloc",
        "preallocation=full",
        "compression_type=zstd",
    ] {
        let p = make(opts);
        strata_reads_like_qemu(&p, None);
    }
}

#[test]
fn qemu_compressed_images_read_identically_through_strata() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // Compressible, incompressible and zero regions.
    let mut data = vec![0u8; 5 << 20];
    let mut r = Rng(42);
    for (i, b) in data.iter_mut().enumerate() {
        *b = match (i >> 16) % 4 {
            0 => (i % 13) as u8,
            1 => r.next() as u8,
            2 => 0,
            _ => b"strata compresses text "[i % 23],
        };
    }
    std::fs::write(&src, &data).unwrap();
    for (ty, cs) in [
        ("zlib", "65536"),
        ("zstd", "65536"),
        ("zlib", "4096"),
        ("zstd", "512"),
        ("zlib", "2M"),
    ] {
        let out = dir.path().join(format!("c-{ty}-{cs}.qcow2"));
        qemu_ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ty},cluster_size={cs}"),
                s(&src),
                s(&out),
            ],
        );
        strata_reads_like_qemu(&out, None);
    }
}

#[test]
fn qemu_backing_chains_read_identically_through_strata() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 4 << 20;
    let sz = size.to_string();
    // raw base <- qcow2 mid <- qcow2 top, each with its own writes.
    let base = dir.path().join("base.raw");
    qemu_ok("qemu-img", &["create", "-q", "-f", "raw", s(&base), &sz]);
    qemu_io_pattern(&base, "raw", size);
    let mid = dir.path().join("mid.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
        ],
    );
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 7 65536 200000",
            "-c",
            "write -z 1048576 131072",
            s(&mid),
        ],
    );
    strata_reads_like_qemu(&mid, Some((&base, "raw")));
    // Extended L2 overlay: subcluster writes leave the rest of each cluster to the backing.
    let ext = dir.path().join("ext.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&ext),
        ],
    );
    qemu_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 9 2048 2048",
            "-c",
            "write -z 70000 4096",
            "-c",
            "write -P 3 131072 512",
            s(&ext),
        ],
    );
    strata_reads_like_qemu(&ext, Some((&base, "raw")));
    // A larger overlay on a smaller backing file: the tail reads as zeroes.
    let small = dir.path().join("small.raw");
    qemu_ok("qemu-img", &["create", "-q", "-f", "raw", s(&small), "1M"]);
    qemu_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 5 0 1M", s(&small)],
    );
    let big = dir.path().join("big.qcow2");
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "small.raw",
            "-F",
            "raw",
            s(&big),
            "3M",
        ],
    );
    strata_reads_like_qemu(&big, Some((&small, "raw")));
}

#[test]
fn strata_refuses_to_write_an_image_qemu_is_writing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("busy.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "1M"]);
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2", s(&p)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io must be installed");
    // Wait (without taking locks) until qemu-io holds the image for writing.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !strata_storage::lock::probe(&p).unwrap().write_held {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-io never opened the image"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let write = FileStorage::open(&p, OpenOptions::write());
    let read = FileStorage::open(&p, OpenOptions::read());
    let shared = FileStorage::open(&p, OpenOptions::read().force_share(true));
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        matches!(write, Err(strata_storage::Error::Locked { .. })),
        "strata opened for writing an image qemu-io held"
    );
    assert!(
        matches!(read, Err(strata_storage::Error::Locked { .. })),
        "a locking reader must refuse an image being written"
    );
    assert!(shared.is_ok(), "-U (force share) must open an image in use");
}

#[test]
fn a_backing_file_recorded_by_strata_is_what_qemu_img_reports() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![5u8; 1 << 20]).unwrap();
    let top = dir.path().join("top.qcow2");
    qemu_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&top), "1M"]);
    let st: Arc<dyn Storage> = Arc::new(FileStorage::open(&top, OpenOptions::write()).unwrap());
    let img = Qcow2Image::open(st, Qcow2OpenOptions::default()).unwrap();
    img.set_backing_file(Some(std::ffi::OsStr::new("base.raw")), Some("raw"))
        .unwrap();
    drop(img);
    let info = qemu_ok("qemu-img", &["info", "--output=json", s(&top)]);
    assert!(
        info.contains("\"backing-filename\": \"base.raw\""),
        "{info}"
    );
    assert!(
        info.contains("\"backing-filename-format\": \"raw\""),
        "{info}"
    );
    let raw = dir.path().join("out.raw");
    qemu_ok("qemu-img", &["convert", "-O", "raw", s(&top), s(&raw)]);
    assert!(std::fs::read(&raw).unwrap().iter().all(|&b| b == 5));
    // And back to no backing file at all.
    let st: Arc<dyn Storage> = Arc::new(FileStorage::open(&top, OpenOptions::write()).unwrap());
    let img = Qcow2Image::open(st, Qcow2OpenOptions::default()).unwrap();
    img.set_backing_file(None, None).unwrap();
    drop(img);
    let info = qemu_ok("qemu-img", &["info", "--output=json", s(&top)]);
    assert!(!info.contains("backing-filename"), "{info}");
    qemu_ok("qemu-img", &["check", s(&top)]);
}

/// Encrypted images (LUKS, and the legacy AES format), both ways.
mod encrypted {
    use super::*;
    use strata_format::crypto::luks::LuksCreateOptions;
    use strata_format::crypto::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
    use strata_format::qcow2::encryption::LuksEncrypt;
    use strata_format::qcow2::{EncryptionInfo, Unlock};
    use strata_storage::ErrorKind;

    const PASSWORD: &str = "correct horse";

    /// The `--object` and `--image-opts` words that give qemu-img the password.
    fn with_secret(img: &Path) -> Vec<String> {
        vec![
            "--object".into(),
            format!("secret,id=s0,data={PASSWORD}"),
            "--image-opts".into(),
            format!(
                "driver=qcow2,encrypt.key-secret=s0,file.filename={}",
                s(img)
            ),
        ]
    }

    /// `qemu-img create` of an encrypted qcow2 with `-o opts` (secret `s0`).
    fn qemu_create_encrypted(img: &Path, opts: &str, size: &str) {
        let secret = format!("secret,id=s0,data={PASSWORD}");
        qemu_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                &secret,
                "-o",
                opts,
                s(img),
                size,
            ],
        );
    }

    fn qemu_with_secret(tool: &str, pre: &[&str], img: &Path, post: &[&str]) -> String {
        let mut args: Vec<String> = pre.iter().map(|a| a.to_string()).collect();
        args.extend(with_secret(img));
        args.extend(post.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        qemu_ok(tool, &refs)
    }

    /// Open `path` with `opts`, read-only unless `write`.
    fn open_with(
        path: &Path,
        write: bool,
        opts: Qcow2OpenOptions,
    ) -> strata_format::Result<Qcow2Image> {
        let o = if write {
            OpenOptions::write()
        } else {
            OpenOptions::read()
        };
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, o).unwrap());
        Qcow2Image::open(
            storage,
            Qcow2OpenOptions {
                read_only: !write,
                ..opts
            },
        )
    }

    fn open(path: &Path, write: bool, unlock: Unlock) -> strata_format::Result<Qcow2Image> {
        let opts = Qcow2OpenOptions {
            unlock,
            ..Default::default()
        };
        open_with(path, write, opts)
    }

    /// Open `path` read-only for its metadata alone (no secret).
    fn open_metadata(path: &Path) -> strata_format::Result<Qcow2Image> {
        let opts = Qcow2OpenOptions {
            metadata_only: true,
            ..Default::default()
        };
        open_with(path, false, opts)
    }

    fn secret() -> Unlock {
        Unlock::Secret(PASSWORD.as_bytes().into())
    }

    /// strata's whole guest view equals qemu-img's decrypted conversion to raw.
    fn strata_reads_like_qemu_with_secret(img: &Path) {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("qemu.raw");
        qemu_with_secret("qemu-img", &["convert", "-O", "raw"], img, &[s(&raw)]);
        let want = std::fs::read(&raw).unwrap();
        let image = open(img, false, secret()).unwrap();
        let mut got = vec![0u8; want.len()];
        image.read(&mut got, 0).unwrap();
        assert!(got == want, "strata's view of {img:?} differs from QEMU's");
    }

    #[test]
    fn qemu_written_luks_images_read_identically_through_strata() {
        let dir = tempfile::tempdir().unwrap();
        let variants = [
            "",
            "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1,",
            "encrypt.cipher-alg=aes-192,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512,",
            "encrypt.cipher-mode=ecb,",
        ];
        for (i, extra) in variants.iter().enumerate() {
            let img = dir.path().join(format!("q{i}.qcow2"));
            let o = format!(
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,{extra}cluster_size=4096"
            );
            qemu_create_encrypted(&img, &o, "4M");
            // Data at guest offsets far from their host offsets (the LUKS area
            // comes first in the file), partial sectors, zeroes, and a compressed
            // cluster, which QEMU stores unencrypted.
            qemu_with_secret(
                "qemu-io",
                &[],
                &img,
                &[
                    "-c",
                    "write -P 0x11 0 64k",
                    "-c",
                    "write -P 0x22 700 1000",
                    "-c",
                    "write -P 0x33 1M 300k",
                    "-c",
                    "write -z 1100k 8k",
                    "-c",
                    "write -c -P 0x44 3M 4k",
                ],
            );
            strata_reads_like_qemu_with_secret(&img);
        }
    }

    #[test]
    fn luks_ivs_count_host_sectors_not_guest_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("iv.qcow2");
        qemu_create_encrypted(
            &img,
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            "1M",
        );
        qemu_with_secret("qemu-io", &[], &img, &["-c", "write -P 0x5a 0 64k"]);
        let image = open(&img, false, secret()).unwrap();
        // Encrypted images report no host offsets: follow L1[0] and L2[0] in the
        // file itself (header field l1_table_offset at byte 40).
        let file = std::fs::read(&img).unwrap();
        let be64 = |at: u64| {
            let at = usize::try_from(at).unwrap();
            u64::from_be_bytes(file[at..at + 8].try_into().unwrap())
        };
        const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
        let l2 = be64(be64(40)) & OFFSET_MASK;
        assert_ne!(l2, 0, "guest cluster 0 has no L2 table");
        let host = be64(l2) & OFFSET_MASK;
        assert_ne!(host, 0, "guest cluster 0 not mapped");
        // The guest's first sector lies far from host offset 0: decrypting with
        // the guest's sector number would give noise, not QEMU's pattern.
        assert!(host >= 0x200000, "data at host 0x{host:x}");
        let mut got = vec![0u8; 65536];
        image.read(&mut got, 0).unwrap();
        assert!(got.iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn strata_written_luks_images_pass_qemu_check_and_compare() {
        let dir = tempfile::tempdir().unwrap();
        let suites = [
            LuksCreateOptions::default(),
            LuksCreateOptions {
                cipher_alg: CipherAlg::Aes128,
                cipher_mode: CipherMode::Cbc,
                ivgen_alg: IvGenAlg::Essiv,
                ivgen_hash_alg: Some(HashAlg::Sha256),
                hash_alg: HashAlg::Sha1,
                ..Default::default()
            },
        ];
        for (n, suite) in suites.into_iter().enumerate() {
            let img_path = dir.path().join(format!("s{n}.qcow2"));
            let ref_path = dir.path().join(format!("s{n}.raw"));
            let size = 6u64 << 20;
            let opts = CreateOptions {
                size,
                cluster_size: 65536,
                encrypt: Some(LuksEncrypt {
                    options: LuksCreateOptions {
                        iter_time_ms: 10,
                        ..suite
                    },
                    password: PASSWORD.as_bytes().into(),
                }),
                ..Default::default()
            };
            let storage: Arc<dyn Storage> = Arc::new(FileStorage::create(&img_path).unwrap());
            let img = create(storage, &opts).unwrap();
            let mut model = vec![0u8; size as usize];
            let mut r = Rng(77 + n as u64);
            for i in 0..40u64 {
                let off = r.below(size);
                let len = (r.below(200_000) + 1).min(size - off);
                if r.below(5) == 0 {
                    img.write_zeroes(off, len, r.below(2) == 0).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                } else {
                    let data: Vec<u8> = (0..len).map(|k| (k ^ i) as u8 | 1).collect();
                    img.write(&data, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
            }
            img.close().unwrap();
            drop(img);
            std::fs::write(&ref_path, &model).unwrap();
            let check = qemu_with_secret("qemu-img", &["check"], &img_path, &[]);
            assert!(check.contains("No errors were found"), "{check}");
            let mut args = with_secret(&img_path);
            args.insert(0, "compare".into());
            args.push(format!("driver=raw,file.filename={}", s(&ref_path)));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let same = qemu_ok("qemu-img", &refs);
            assert!(same.contains("Images are identical"), "{same}");
            // And strata reads back what it wrote.
            let again = open(&img_path, false, secret()).unwrap();
            let mut got = vec![0u8; size as usize];
            again.read(&mut got, 0).unwrap();
            assert!(got == model);
        }
    }

    #[test]
    fn an_encrypted_image_needs_its_secret_and_refuses_a_wrong_one() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("k.qcow2");
        qemu_create_encrypted(
            &img,
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            "1M",
        );
        qemu_with_secret("qemu-io", &[], &img, &["-c", "write -P 1 0 4k"]);
        let e = open(&img, false, Unlock::None).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Key);
        assert_eq!(
            e.message(),
            "Parameter 'encrypt.key-secret' is required for cipher"
        );
        let e = open(&img, true, Unlock::Secret(b"wrong".as_slice().into()))
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Key);
        assert_eq!(e.message(), "Invalid password, cannot unlock any keyslot");
        // For the metadata alone the image opens; its data does not read.
        let meta = open_metadata(&img).unwrap();
        let Some(EncryptionInfo::Luks(h)) = meta.encryption() else {
            panic!("no LUKS header");
        };
        let info = qemu_ok("qemu-img", &["info", "--output=json", s(&img)]);
        assert!(
            info.contains(&format!("\"uuid\": \"{}\"", h.uuid)),
            "{info}"
        );
        assert_eq!(h.payload_offset, 4040);
        let mut buf = [0u8; 512];
        assert_eq!(meta.read(&mut buf, 0).unwrap_err().kind(), ErrorKind::Key);
    }

    /// qemu-img and qemu-io write the legacy format (only QEMU's system
    /// emulators refuse it), so strata writes it too: unaligned writes into
    /// allocated, partly written and new clusters, which QEMU then reads back
    /// (the IVs count guest sectors, not host ones).
    #[test]
    fn legacy_aes_images_read_and_write_like_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("aes.qcow2");
        qemu_create_encrypted(&img, "encrypt.format=aes,encrypt.key-secret=s0", "2M");
        qemu_with_secret(
            "qemu-io",
            &[],
            &img,
            &["-c", "write -P 0x61 0 70k", "-c", "write -P 0x62 1M 3000"],
        );
        strata_reads_like_qemu_with_secret(&img);
        {
            let image = open(&img, true, secret()).unwrap();
            image.write(&[0x63; 1000], 60 * 1024 + 7).unwrap();
            image.write(&[0x64; 5000], 1024 * 1024 + 2900).unwrap();
            image.write(&[0x65; 70 * 1024], 1536 * 1024 + 100).unwrap();
            image.flush().unwrap();
        }
        let out = qemu_with_secret(
            "qemu-io",
            &["-r"],
            &img,
            &[
                "-c",
                "read -P 0x61 0 61447",
                "-c",
                "read -P 0x63 61447 1000",
                "-c",
                "read -P 0x61 62447 9233",
                "-c",
                "read -P 0x62 1M 2900",
                "-c",
                "read -P 0x64 1051476 5000",
                "-c",
                "read -P 0 1572864 100",
                "-c",
                "read -P 0x65 1572964 71680",
                "-c",
                "read -P 0 1644644 452",
            ],
        );
        assert!(!out.contains("verification failed"), "{out}");
        strata_reads_like_qemu_with_secret(&img);
        let check = qemu_with_secret("qemu-img", &["check"], &img, &[]);
        assert!(check.contains("No errors were found"), "{check}");
        let meta = open_metadata(&img).unwrap();
        assert_eq!(meta.encryption(), Some(EncryptionInfo::Aes));
    }
}
