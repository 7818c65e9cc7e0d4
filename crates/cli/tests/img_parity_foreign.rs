//! The formats of other tools (vpc, vdi, vhdx, vmdk) through both tools:
//! create (each option), info (text and JSON), map, check, convert to and
//! from each subformat, compare, and refusals. stdout, stderr and the exit
//! code must be identical, and the images each tool writes alike. Each format
//! has its own module.

mod common;

mod vdi {
    use crate::common::{assert_all_same, io, ok, put, same, same_in_dir_copies};
    use std::path::Path;

    /// qemu-img's images: `q.vdi` dynamic (10 MiB, data in three blocks,
    /// a zero write, blocks never written), `s.vdi` static, `q.raw` the same
    /// guest bytes as `q.vdi`, and damaged copies of `q.vdi`.
    fn fixture(d: &Path) {
        let writes = [
            "write -P 0x17 1000 5000",
            "write -z 1M 64k",
            "write -P 9 3M 1M",
            "write -P 5 8388000 5000",
        ];
        ok(
            d,
            "qemu-img",
            &["create", "-q", "-f", "vdi", "q.vdi", "10M"],
        );
        io(d, "vdi", "q.vdi", &writes);
        let s = [
            "create",
            "-q",
            "-f",
            "vdi",
            "-o",
            "static=on",
            "s.vdi",
            "10M",
        ];
        ok(d, "qemu-img", &s);
        io(d, "vdi", "s.vdi", &writes);
        ok(
            d,
            "qemu-img",
            &["create", "-q", "-f", "raw", "q.raw", "10M"],
        );
        io(d, "raw", "q.raw", &writes);
        let damaged: &[(&str, u64, &[u8])] = &[
            ("version.vdi", 0x44, &[2, 0, 1, 0]),
            ("signature.vdi", 0x40, &[0, 0, 0, 0]),
            ("blocksize.vdi", 0x178, &[0, 0, 0x20, 0]),
            ("parent.vdi", 0x1b8, &[1]),
            // Block 3 names data block 0 again (duplicate); the count is off.
            ("duplicate.vdi", 0x20c, &[0, 0, 0, 0]),
            // Block 3 names a block past the map.
            ("range.vdi", 0x20c, &[200, 0, 0, 0]),
            ("count.vdi", 0x184, &[9, 0, 0, 0]),
        ];
        for (name, at, bytes) in damaged {
            std::fs::copy(d.join("q.vdi"), d.join(name)).unwrap();
            put(d, name, *at, bytes);
        }
    }

    #[test]
    fn vdi_images_are_inspected_as_qemu_img_does() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fixture(d);
        for f in ["q.vdi", "s.vdi"] {
            for args in [
                vec!["info", f],
                vec!["info", "--output=json", f],
                vec!["info", "-f", "vdi", f],
                vec!["map", f],
                vec!["map", "--output=json", f],
                vec!["check", f],
                vec!["check", "--output=json", f],
                vec!["check", "-f", "vdi", "-r", "leaks", f],
                vec!["compare", f, "q.raw"],
                vec!["compare", "-f", "vdi", "-F", "raw", f, "q.raw"],
                vec!["measure", "-O", "qcow2", f],
                vec!["measure", "-O", "vdi", f],
                vec!["snapshot", "-l", f],
            ] {
                same(d, &args);
            }
        }
        for f in [
            "version.vdi",
            "signature.vdi",
            "blocksize.vdi",
            "parent.vdi",
            "duplicate.vdi",
            "range.vdi",
            "count.vdi",
        ] {
            same(d, &["info", f]);
            same(d, &["info", "-f", "vdi", f]);
            same(d, &["check", "-f", "vdi", f]);
            same(d, &["check", "-f", "vdi", "--output=json", f]);
            same(d, &["map", "-f", "vdi", "--output=json", f]);
        }
        assert_all_same();
    }

    #[test]
    fn vdi_images_are_created_and_refused_as_qemu_img_does() {
        let dir = tempfile::tempdir().unwrap();
        let fx = dir.path().join("fx");
        std::fs::create_dir(&fx).unwrap();
        fixture(&fx);
        let cases: &[&[&str]] = &[
            &["create", "-f", "vdi", "n.vdi", "5M"],
            &["create", "-f", "vdi", "-o", "static=on", "n.vdi", "5M"],
            &["create", "-f", "vdi", "-o", "static=off", "n.vdi", "1000"],
            &["create", "-f", "vdi", "-o", "static=on", "n.vdi", "3000"],
            &["create", "-f", "vdi", "n.vdi", "0"],
            &["create", "-f", "vdi", "-o", "size=7M", "n.vdi"],
            &["create", "-f", "vdi", "n.vdi", "600T"],
            &["create", "-f", "vdi", "-o", "static=maybe", "n.vdi", "5M"],
            &[
                "create",
                "-f",
                "vdi",
                "-o",
                "cluster_size=2M",
                "n.vdi",
                "5M",
            ],
            &[
                "create",
                "-f",
                "vdi",
                "-o",
                "preallocation=full",
                "n.vdi",
                "5M",
            ],
            &[
                "create",
                "-f",
                "vdi",
                "-o",
                "preallocation=metadata",
                "n.vdi",
                "5M",
            ],
            &[
                "create",
                "-f",
                "vdi",
                "-o",
                "preallocation=foo",
                "n.vdi",
                "5M",
            ],
            &["create", "-f", "vdi", "-o", "nocow=on", "n.vdi", "5M"],
            &["create", "-f", "vdi", "-b", "q.vdi", "-F", "vdi", "n.vdi"],
            &[
                "create",
                "-q",
                "-f",
                "vdi",
                "-o",
                "static=on",
                "n.vdi",
                "64M",
            ],
            &["resize", "q.vdi", "20M"],
            &["resize", "-f", "vdi", "s.vdi", "5M"],
            &["amend", "-f", "vdi", "-o", "static=on", "q.vdi"],
            &["snapshot", "-c", "snap", "q.vdi"],
        ];
        for (n, args) in cases.iter().enumerate() {
            same_in_dir_copies(&fx, n, args);
        }
        assert_all_same();
    }

    #[test]
    fn vdi_images_are_converted_as_qemu_img_does() {
        let dir = tempfile::tempdir().unwrap();
        let fx = dir.path().join("fx");
        std::fs::create_dir(&fx).unwrap();
        fixture(&fx);
        ok(
            &fx,
            "qemu-img",
            &["convert", "-O", "qcow2", "q.vdi", "q.qcow2"],
        );
        let cases: &[&[&str]] = &[
            &["convert", "-O", "vdi", "q.raw", "o.vdi"],
            &["convert", "-O", "vdi", "-o", "static=on", "q.raw", "o.vdi"],
            &["convert", "-O", "vdi", "q.qcow2", "o.vdi"],
            &[
                "convert",
                "-O",
                "vdi",
                "-o",
                "static=on",
                "q.qcow2",
                "o.vdi",
            ],
            &["convert", "-f", "vdi", "-O", "raw", "q.vdi", "o.raw"],
            &["convert", "-O", "raw", "s.vdi", "o.raw"],
            &["convert", "-O", "qcow2", "q.vdi", "o.qcow2"],
            &["convert", "-O", "qcow2", "s.vdi", "o.qcow2"],
            &["convert", "-O", "vdi", "s.vdi", "o.vdi"],
            &["convert", "-O", "vdi", "-o", "static=on", "q.vdi", "o.vdi"],
            &["convert", "-O", "vdi", "-B", "q.qcow2", "q.raw", "o.vdi"],
            &["convert", "-O", "vdi", "version.vdi", "o.vdi"],
        ];
        for (n, args) in cases.iter().enumerate() {
            same_in_dir_copies(&fx, n, args);
        }
    }
}

mod vhdx {
    use super::common::{assert_all_same, ok, run, same, same_in_dir_copies, sh};
    use std::path::Path;

    /// A fixture directory: `src.raw` (12 MiB of patterned data with zero
    /// runs), `q.vhdx` (qemu-img's dynamic image, written by qemu-io across
    /// block boundaries), `f.vhdx` (its fixed image of `src.raw`) and
    /// `cut.vhdx` (`q.vhdx` cut inside its second data block).
    fn fixture(d: &Path) {
        let mut data: Vec<u8> = (0..12u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        data[3 << 20..6 << 20].fill(0);
        std::fs::write(d.join("src.raw"), data).unwrap();
        ok(
            d,
            "qemu-img",
            &["create", "-q", "-f", "vhdx", "q.vhdx", "12M"],
        );
        sh(
            d,
            "qemu-io",
            &[
                "-f",
                "vhdx",
                "-c",
                "write -P 0x17 100k 300k",
                "-c",
                "write -P 0x22 8388000 9000",
                "-c",
                "write -z 9M 1M",
                "q.vhdx",
            ],
        );
        ok(
            d,
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vhdx",
                "-o",
                "subformat=fixed",
                "src.raw",
                "f.vhdx",
            ],
        );
        let q = std::fs::read(d.join("q.vhdx")).unwrap();
        std::fs::write(d.join("cut.vhdx"), &q[..(11 << 20) + 4096]).unwrap();
        std::fs::write(d.join("log.vhdx"), with_pending_log(q)).unwrap();
    }

    /// CRC-32C (Castagnoli), bit by bit: the checksum of VHDX structures.
    fn crc32c(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    /// The image `img` (qemu-img's 12 MiB dynamic image, 8 MiB blocks, its
    /// first block at 8 MiB) with a log entry left to replay: it points BAT
    /// entry 1 at a copy of block 0 appended to the file.
    fn with_pending_log(mut img: Vec<u8>) -> Vec<u8> {
        let end = img.len() as u64;
        let block0 = img[8 << 20..16 << 20].to_vec();
        img.extend_from_slice(&block0);
        let len = img.len() as u64;
        let mut sector = img[2 << 20..(2 << 20) + 4096].to_vec();
        sector[8..16].copy_from_slice(&(end | 6).to_le_bytes());
        let guid = [0x42u8; 16];
        let mut e = vec![0u8; 8192];
        e[..4].copy_from_slice(b"loge");
        e[8..12].copy_from_slice(&8192u32.to_le_bytes());
        e[16..24].copy_from_slice(&1u64.to_le_bytes());
        e[24..28].copy_from_slice(&1u32.to_le_bytes());
        e[32..48].copy_from_slice(&guid);
        e[48..56].copy_from_slice(&len.to_le_bytes());
        e[56..64].copy_from_slice(&len.to_le_bytes());
        e[64..68].copy_from_slice(b"desc");
        e[68..72].copy_from_slice(&sector[4092..]);
        e[72..80].copy_from_slice(&sector[..8]);
        e[80..88].copy_from_slice(&(2u64 << 20).to_le_bytes());
        e[88..96].copy_from_slice(&1u64.to_le_bytes());
        e[4096..4100].copy_from_slice(b"data");
        e[4104..8188].copy_from_slice(&sector[8..4092]);
        e[8188..].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c(&e);
        e[4..8].copy_from_slice(&crc.to_le_bytes());
        img[1 << 20..(1 << 20) + 8192].copy_from_slice(&e);
        for off in [64usize << 10, 128 << 10] {
            img[off + 48..off + 64].copy_from_slice(&guid);
            img[off + 4..off + 8].fill(0);
            let crc = crc32c(&img[off..off + 4096]);
            img[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
        }
        img
    }

    #[test]
    fn vhdx_images_are_inspected_as_qemu_img_does() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fixture(d);
        for img in ["q.vhdx", "f.vhdx"] {
            same(d, &["info", img]);
            same(d, &["info", "-f", "vhdx", img]);
            same(d, &["info", "--output=json", img]);
            same(d, &["map", "--output=json", img]);
            same(d, &["map", img]);
            same(d, &["check", img]);
            same(d, &["check", "--output=json", img]);
            same(d, &["compare", img, "src.raw"]);
            same(d, &["compare", "-f", "vhdx", "-F", "raw", img, "src.raw"]);
            same(d, &["measure", "-O", "qcow2", img]);
            same(d, &["resize", img, "30M"]);
            same(d, &["resize", "--shrink", img, "4M"]);
        }
        same(d, &["compare", "q.vhdx", "f.vhdx"]);
        // A truncated image: check reports the blocks past the end.
        same(d, &["check", "cut.vhdx"]);
        same(d, &["check", "--output=json", "cut.vhdx"]);
        // A log left to replay: refused read-only, in QEMU's words.
        let o = run(d, "qemu-img", &["info", "log.vhdx"]);
        assert!(String::from_utf8_lossy(&o.stderr).contains("replay"));
        same(d, &["info", "log.vhdx"]);
        same(d, &["check", "log.vhdx"]);
        same(d, &["convert", "-O", "raw", "log.vhdx", "out.raw"]);
        // Not a vhdx image.
        same(d, &["info", "-f", "vhdx", "src.raw"]);
        assert_all_same();
    }

    #[test]
    fn vhdx_images_are_created_and_converted_as_qemu_img_does() {
        let dir = tempfile::tempdir().unwrap();
        let fx = dir.path().join("fx");
        std::fs::create_dir(&fx).unwrap();
        fixture(&fx);
        let mut n = 0;
        let mut both = |args: &[&str]| {
            n += 1;
            same_in_dir_copies(&fx, n, args);
        };
        for o in [
            "subformat=dynamic",
            "subformat=fixed",
            "block_size=1M",
            "block_size=0",
            "block_size=300M",
            "log_size=3M",
            "log_size=1500000",
            "block_state_zero=off",
            "subformat=fixed,block_state_zero=off",
        ] {
            both(&["create", "-f", "vhdx", "-o", o, "new.vhdx", "16M"]);
        }
        both(&["create", "-f", "vhdx", "new.vhdx", "1G"]);
        both(&["create", "-f", "vhdx", "new.vhdx", "1000"]);
        // Refusals: the same words and exit code. (qemu-img leaves the empty
        // file it made before its vhdx driver refused; strata removes it.)
        for (i, o) in [
            "block_size=3M",
            "log_size=0",
            "log_size=5G",
            "subformat=foo",
            "block_state_zero=maybe",
        ]
        .into_iter()
        .enumerate()
        {
            let f = format!("refused{i}.vhdx");
            same(&fx, &["create", "-f", "vhdx", "-o", o, &f, "16M"]);
        }
        same(&fx, &["create", "-f", "vhdx", "big.vhdx", "65T"]);
        // Convert to and from each subformat.
        for o in [
            "subformat=dynamic",
            "subformat=fixed",
            "block_state_zero=off",
            "block_size=2M",
        ] {
            both(&["convert", "-O", "vhdx", "-o", o, "src.raw", "out.vhdx"]);
        }
        both(&["convert", "-f", "vhdx", "-O", "raw", "q.vhdx", "out.raw"]);
        both(&["convert", "-O", "qcow2", "f.vhdx", "out.qcow2"]);
        both(&["convert", "-O", "vhdx", "q.vhdx", "out.vhdx"]);
        both(&["check", "-r", "all", "q.vhdx"]);
        // The log replayed: the same report and the same disk after.
        both(&["check", "-r", "all", "log.vhdx"]);
        assert_all_same();
    }
}

mod vpc {
    use super::common::{assert_all_same, compare_runs, differs, FileCheck};
    use std::path::{Path, PathBuf};

    /// A patterned raw disk (data in two places, a zero run between) made
    /// by qemu-img and qemu-io, for the conversions.
    const SOURCE: &str = "qemu-img create -q -f raw src.raw 6M
        qemu-io -f raw -c 'write -P 0x11 0 1M' -c 'write -P 0x22 3M 4k' \
            -c 'write -P 0x33 5M 1000' src.raw";

    /// Two fresh directories under `root` for case `n`, with `setup` run
    /// in both (bash, qemu-img and qemu-io only).
    fn dirs(root: &Path, n: &str, setup: &str) -> [PathBuf; 2] {
        let dirs = [root.join(format!("{n}-o")), root.join(format!("{n}-t"))];
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap();
            if !setup.is_empty() {
                super::common::sh(d, "bash", &["-ec", setup]);
            }
        }
        dirs
    }

    /// A VHD file's bytes but for what differs between two creations: the
    /// footers' timestamp, checksum and UUID (in the copy at the start and
    /// in the footer at the end).
    fn masked(bytes: &[u8]) -> Vec<u8> {
        let mut b = bytes.to_vec();
        let len = b.len();
        let mut footers = vec![];
        if b.starts_with(b"conectix") {
            footers.push(0);
        }
        if len >= 512 && b[len - 512..].starts_with(b"conectix") {
            footers.push(len - 512);
        }
        for f in footers {
            b[f + 24..f + 28].fill(0);
            b[f + 64..f + 84].fill(0);
        }
        b
    }

    /// The two tools left the same VHD files (masked) in `dirs`.
    fn same_vhd_files(dirs: &[PathBuf; 2], n: &str) {
        for e in std::fs::read_dir(&dirs[1]).unwrap() {
            let f = e.unwrap().file_name();
            if !f.to_string_lossy().ends_with(".vhd") {
                continue;
            }
            let read = |d: &Path| std::fs::read(d.join(&f)).unwrap_or_default();
            if masked(&read(&dirs[0])) != masked(&read(&dirs[1])) {
                differs(format!(
                    "[{n}] {f:?}: the files differ beyond time and UUID"
                ));
            }
        }
    }

    /// Run `steps` with both tools in two fresh directories set up by
    /// `setup`; compare what they print, QEMU's view of every file they
    /// leave, and the VHD files' bytes.
    fn case(root: &Path, n: &str, setup: &str, steps: &[&str]) {
        let d = dirs(root, n, setup);
        compare_runs(&d, n, steps, FileCheck::QemuViews);
        same_vhd_files(&d, n);
    }

    #[test]
    fn create_with_each_option_and_inspect() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (i, size) in ["0", "1000000", "9M", "64M", "1G", "200G"]
            .iter()
            .enumerate()
        {
            for (j, opts) in [
                "",
                "-o subformat=dynamic",
                "-o subformat=fixed",
                "-o force_size=on",
                "-o subformat=fixed,force_size=on",
                "-o force_size=off,subformat=dynamic",
            ]
            .iter()
            .enumerate()
            {
                if size.ends_with('G') && opts.contains("fixed") {
                    continue; // a fixed disk's file is its full size
                }
                let create = format!("create -f vpc {opts} a.vhd {size}").replace("  ", " ");
                case(
                    root,
                    &format!("c{i}{j}"),
                    "",
                    &[
                        &create,
                        "info a.vhd",
                        "info --output=json a.vhd",
                        "info -f vpc a.vhd",
                        "info -f vpc --output=json a.vhd",
                        "map -f vpc a.vhd",
                        "map -f vpc --output=json a.vhd",
                        "check -f vpc a.vhd",
                    ],
                );
            }
        }
        assert_all_same();
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().unwrap();
        case(
            dir.path(),
            "r",
            "qemu-img create -q -f vpc a.vhd 8M
            head -c 1000 a.vhd > cut.vhd
            : > empty.vhd
            cp a.vhd sum.vhd
            printf 'X' | dd of=sum.vhd bs=1 seek=24 conv=notrunc status=none",
            &[
                "info cut.vhd",
                "info -f vpc cut.vhd",
                "info -f vpc empty.vhd",
                "info sum.vhd",
                "convert -O raw sum.vhd out.raw",
                "create -f vpc big.vhd 3T",
                "create -f vpc -o force_size=on big2.vhd 2041G",
                "create -f vpc -o subformat=sparse b.vhd 8M",
                "create -f vpc -o force_size=maybe c.vhd 8M",
                "create -f vpc -o cluster_size=64k d.vhd 8M",
                "create -f vpc -o preallocation=metadata e.vhd 8M",
                "create -f vpc -o subformat=bogus,preallocation=metadata g.vhd 8M",
                "create -f vpc -o subformat=bogus,preallocation=bogus h.vhd 8M",
                "create -f vpc -o subformat=fixed,preallocation=falloc i.vhd 8M",
                "resize a.vhd 16M",
                "resize -f vpc a.vhd 16M",
                "check a.vhd",
                "check -f vpc a.vhd",
                "amend -f vpc -o subformat=fixed a.vhd",
                "snapshot -l a.vhd",
            ],
        );
        assert_all_same();
    }

    #[test]
    fn convert_to_and_from_vpc() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (i, opts) in [
            "",
            "-o subformat=fixed",
            "-o force_size=on",
            "-o subformat=fixed,force_size=on",
        ]
        .iter()
        .enumerate()
        {
            let to = format!("convert -f raw -O vpc {opts} src.raw out.vhd").replace("  ", " ");
            case(
                root,
                &format!("v{i}"),
                SOURCE,
                &[
                    // (`info` right after: its disk size is the file system's
                    // delayed allocation; QEMU's view below compares the rest.)
                    &to,
                    "map -f vpc --output=json out.vhd",
                    "map -f vpc out.vhd",
                    "compare -f raw -F vpc src.raw out.vhd",
                    "compare -f vpc -F raw out.vhd src.raw",
                    "convert -f vpc -O raw out.vhd back.raw",
                    "convert -f vpc -O qcow2 out.vhd back.qcow2",
                    "compare src.raw back.qcow2",
                ],
            );
        }
        // Into existing images: the blocks are allocated in the same order,
        // the footer moved alike.
        case(
            root,
            "n",
            &format!(
                "{SOURCE}
                qemu-img create -q -f vpc d.vhd 6M
                qemu-img create -q -f vpc -o subformat=fixed f.vhd 6M"
            ),
            &[
                "convert -n -f raw -O vpc src.raw d.vhd",
                "convert -n -f raw -O vpc src.raw f.vhd",
                "compare -f raw -F vpc src.raw d.vhd",
            ],
        );
        // QEMU writes the data: both tools read it.
        case(
            root,
            "q",
            &format!(
                "{SOURCE}
                qemu-img convert -f raw -O vpc src.raw q.vhd
                qemu-io -f vpc -c 'write -P 0x44 2047k 2k' -c 'write -z 4M 8k' q.vhd"
            ),
            &[
                "info q.vhd",
                "map --output=json q.vhd",
                "compare -f raw -F vpc src.raw q.vhd",
                "convert -O raw q.vhd q.raw",
                "convert -O vpc q.vhd copy.vhd",
                "convert -O vpc -o subformat=fixed q.vhd fixed.vhd",
                "compare -f vpc -F vpc q.vhd copy.vhd",
            ],
        );
        assert_all_same();
    }
}

mod vmdk {
    use super::common::{assert_all_same, copy_dir_sparse, differs, ok, outcome, sh};
    use std::path::Path;

    /// A vmdk's CID is random in each new or written image: mask its value.
    fn mask_cid(s: &str) -> String {
        s.lines()
            .map(|l| {
                let t = l.trim_start();
                if t.starts_with("cid: ") || t.starts_with("\"cid\": ") || t.starts_with("CID=") {
                    let key = &l[..l.find(['=', ':']).unwrap() + 1];
                    format!("{key} X")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    type Outcome = (Option<i32>, String, String);

    fn masked(o: Outcome) -> Outcome {
        (o.0, mask_cid(&o.1), mask_cid(&o.2))
    }

    /// Both tools on the same files (commands that write nothing), CID masked.
    fn same(d: &Path, args: &[&str]) {
        let ours = masked(outcome(d, "strata", args));
        let theirs = masked(outcome(d, "qemu-img", args));
        if ours != theirs {
            differs(format!(
                "`img {}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}",
                args.join(" ")
            ));
        }
    }

    /// The bytes of a vmdk file with the CID value masked: a descriptor as
    /// text, a sparse file with the text of its embedded descriptor masked.
    fn masked_file(b: &[u8]) -> Vec<u8> {
        let text = |d: &[u8]| {
            let end = d.iter().position(|&c| c == 0).unwrap_or(d.len());
            mask_cid(&String::from_utf8_lossy(&d[..end])).into_bytes()
        };
        if b.starts_with(b"# Disk") {
            return text(b);
        }
        let mut v = b.to_vec();
        if v.len() >= 512 + 10240 && v.starts_with(b"KDMV") {
            let t = text(&b[512..512 + 10240]);
            v[512..512 + 10240].fill(0);
            v.extend_from_slice(&t);
        }
        v
    }

    /// Run `args` with each tool in its own copy of the fixture directory
    /// `fx` (`fx-o{n}` for strata, `fx-t{n}` for qemu-img); the outputs must
    /// match (CID masked), and so must the files left behind: the same names
    /// and, for the files `bytes` names, the same bytes but for the CID; for
    /// each `images` file, the same guest data and the same map.
    fn same_in_copies(fx: &Path, n: usize, args: &[&str], bytes: &[&str], images: &[&str]) {
        let parent = fx.parent().unwrap();
        let base = fx.file_name().unwrap().to_string_lossy().into_owned();
        let (o, t) = (
            parent.join(format!("{base}-o{n}")),
            parent.join(format!("{base}-t{n}")),
        );
        copy_dir_sparse(fx, &o);
        copy_dir_sparse(fx, &t);
        let ours = masked(outcome(&o, "strata", args));
        let theirs = masked(outcome(&t, "qemu-img", args));
        let what = format!("img {}", args.join(" "));
        if ours != theirs {
            differs(format!(
                "`{what}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
            ));
        }
        let names = |d: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        if names(&o) != names(&t) {
            differs(format!(
                "`{what}`: files {:?} vs {:?}",
                names(&o),
                names(&t)
            ));
            return;
        }
        for f in bytes {
            // Neither tool made it (a refusal): the names compared above.
            if !o.join(f).exists() {
                continue;
            }
            let (a, b) = (
                std::fs::read(o.join(f)).unwrap(),
                std::fs::read(t.join(f)).unwrap(),
            );
            if masked_file(&a) != masked_file(&b) {
                differs(format!("`{what}`: {f} differs"));
            }
        }
        for f in images {
            let theirs_path = t.join(f);
            let (code, out, err) = outcome(
                &o,
                "qemu-img",
                &["compare", "-U", f, theirs_path.to_str().unwrap()],
            );
            if code != Some(0) {
                differs(format!("`{what}`: {f} compare: {out}{err}"));
            }
            let map = |d: &Path| outcome(d, "qemu-img", &["map", "--output=json", f]);
            if map(&o) != map(&t) {
                differs(format!(
                    "`{what}`: {f} map\n{:?}\n---\n{:?}",
                    map(&o),
                    map(&t)
                ));
            }
            let check = |d: &Path| masked(outcome(d, "qemu-img", &["check", f]));
            if check(&o) != check(&t) {
                differs(format!(
                    "`{what}`: {f} check {:?} vs {:?}",
                    check(&o),
                    check(&t)
                ));
            }
        }
    }

    const SUBFORMATS: [&str; 5] = [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "streamOptimized",
    ];

    /// A raw file of 4 MiB + 4 KiB: data in several places, zeroes between.
    fn raw_fixture(d: &Path) {
        sh(
            d,
            "qemu-img",
            &["create", "-q", "-f", "raw", "src.raw", "4100k"],
        );
        sh(
            d,
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x11 0 100k",
                "-c",
                "write -P 0x22 1000k 3000",
                "-c",
                "write -P 0x33 4095k 5k",
                "src.raw",
            ],
        );
    }

    #[test]
    fn vmdk_create_matches_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let fx = dir.path().join("fx");
        std::fs::create_dir(&fx).unwrap();
        let cases: [(&str, &str, &[&str]); 10] = [
            ("", "64M", &["d.vmdk"]),
            ("subformat=monolithicFlat", "3M", &["d.vmdk", "d-flat.vmdk"]),
            (
                "subformat=twoGbMaxExtentSparse,adapter_type=lsilogic",
                "5G",
                &["d.vmdk", "d-s001.vmdk", "d-s002.vmdk", "d-s003.vmdk"],
            ),
            (
                "subformat=twoGbMaxExtentFlat,adapter_type=buslogic",
                "2049M",
                &["d.vmdk"],
            ),
            ("subformat=streamOptimized,hwversion=7", "10M", &["d.vmdk"]),
            ("zeroed_grain=on,compat6=on", "1000", &["d.vmdk"]),
            (
                "adapter_type=legacyESX,toolsversion=10240",
                "100G",
                &["d.vmdk"],
            ),
            (
                "subformat=monolithicSparse,zeroed_grain=off",
                "0",
                &["d.vmdk"],
            ),
            ("hwversion=undefined", "1M", &["d.vmdk"]),
            ("subformat=monolithicFlat", "0", &["d.vmdk"]),
        ];
        for (i, (o, size, files)) in cases.iter().enumerate() {
            let mut args = vec!["create", "-f", "vmdk"];
            if !o.is_empty() {
                args.extend(["-o", o]);
            }
            args.extend(["d.vmdk", size]);
            same_in_copies(&fx, i, &args, files, &[]);
        }
        assert_all_same();
    }

    #[test]
    fn vmdk_create_refusals_match_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ok(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
        );
        for o in [
            "subformat=xyz",
            "adapter_type=scsi",
            "compat6=on,hwversion=7",
            "subformat=monolithicFlat,zeroed_grain=on",
            "subformat=twoGbMaxExtentFlat,zeroed_grain=on",
            "compat6=maybe",
        ] {
            same(d, &["create", "-f", "vmdk", "-o", o, "x.vmdk", "1M"]);
        }
        assert_all_same();
    }

    #[test]
    fn vmdk_images_qemu_wrote_inspect_alike() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        raw_fixture(d);
        for sub in SUBFORMATS {
            let f = format!("{sub}.vmdk");
            let o = format!("subformat={sub}");
            ok(
                d,
                "qemu-img",
                &[
                    "convert", "-f", "raw", "-O", "vmdk", "-o", &o, "src.raw", &f,
                ],
            );
            if sub != "streamOptimized" {
                ok(
                    d,
                    "qemu-io",
                    &[
                        "-f",
                        "vmdk",
                        "-c",
                        "write -P 0x44 2000k 70000",
                        "-c",
                        "write -z 0 64k",
                        &f,
                    ],
                );
            }
            same(d, &["info", &f]);
            same(d, &["info", "--output=json", &f]);
            same(d, &["info", "-f", "vmdk", &f]);
            same(d, &["map", &f]);
            same(d, &["map", "--output=json", &f]);
            same(d, &["check", &f]);
            same(d, &["check", "--output=json", &f]);
            same(d, &["check", "-r", "all", &f]);
            same(d, &["compare", &f, "src.raw"]);
            same(d, &["compare", "-f", "vmdk", "-F", "raw", &f, "src.raw"]);
            same(d, &["resize", &f, "10M"]);
        }
        same(
            d,
            &[
                "compare",
                "monolithicSparse.vmdk",
                "twoGbMaxExtentFlat.vmdk",
            ],
        );
        same(d, &["compare", "streamOptimized.vmdk", "src.raw"]);
        assert_all_same();
    }

    #[test]
    fn vmdk_convert_to_and_from_matches_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let fx = dir.path().join("fx");
        std::fs::create_dir(&fx).unwrap();
        raw_fixture(&fx);
        let mut n = 0;
        for sub in SUBFORMATS {
            let o = format!("subformat={sub}");
            same_in_copies(
                &fx,
                n,
                &[
                    "convert", "-f", "raw", "-O", "vmdk", "-o", &o, "src.raw", "out.vmdk",
                ],
                &[],
                &["out.vmdk"],
            );
            n += 1;
            ok(
                &fx,
                "qemu-img",
                &[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "vmdk",
                    "-o",
                    &o,
                    "src.raw",
                    &format!("{sub}.vmdk"),
                ],
            );
        }
        same_in_copies(
            &fx,
            n,
            &[
                "convert",
                "-O",
                "vmdk",
                "-o",
                "zeroed_grain=on",
                "src.raw",
                "z.vmdk",
            ],
            &[],
            &["z.vmdk"],
        );
        n += 1;
        for sub in SUBFORMATS {
            let f = format!("{sub}.vmdk");
            for (fmt, out) in [("raw", "o.raw"), ("qcow2", "o.qcow2")] {
                same_in_copies(&fx, n, &["convert", "-O", fmt, &f, out], &[], &[out]);
                n += 1;
            }
        }
        same_in_copies(
            &fx,
            n,
            &[
                "convert",
                "-f",
                "vmdk",
                "-O",
                "vmdk",
                "-o",
                "subformat=twoGbMaxExtentSparse",
                "streamOptimized.vmdk",
                "t.vmdk",
            ],
            &[],
            &["t.vmdk"],
        );
        assert_all_same();
    }

    /// A stream-optimized target (or `-c`) takes whole grains, counted in
    /// the progress as qemu-img counts a compressed copy; each grain is
    /// allocated whole (zero-filled) before its compressed record, so a
    /// very compressible disk leaves a file of qemu-img's length.
    #[test]
    fn vmdk_compressed_targets_match_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let fx = dir.path().join("fx");
        std::fs::create_dir(&fx).unwrap();
        ok(
            &fx,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "src.qcow2", "16M"],
        );
        ok(
            &fx,
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0xab 1M 3M",
                "-c",
                "write -z 8M 1M",
                "src.qcow2",
            ],
        );
        let cases: [&[&str]; 2] = [
            &[
                "convert",
                "-p",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                "src.qcow2",
                "o.vmdk",
            ],
            &["convert", "-p", "-c", "-O", "vmdk", "src.qcow2", "o.vmdk"],
        ];
        for (n, args) in cases.iter().enumerate() {
            same_in_copies(&fx, n, args, &[], &["o.vmdk"]);
            let len = |who: &str| {
                std::fs::metadata(dir.path().join(format!("fx-{who}{n}/o.vmdk")))
                    .map(|m| m.len())
                    .ok()
            };
            if len("o") != len("t") {
                differs(format!(
                    "`{}`: file length {:?} vs {:?}",
                    args.join(" "),
                    len("o"),
                    len("t")
                ));
            }
        }
        // Formats without compressed writes refuse -c.
        same_in_copies(
            &fx,
            2,
            &["convert", "-c", "-O", "vpc", "src.qcow2", "o.vhd"],
            &[],
            &[],
        );
        assert_all_same();
    }

    #[test]
    fn vmdk_overlays_match_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let fx = dir.path().join("fx");
        std::fs::create_dir(&fx).unwrap();
        raw_fixture(&fx);
        ok(
            &fx,
            "qemu-img",
            &["create", "-q", "-f", "vmdk", "base.vmdk", "4100k"],
        );
        ok(
            &fx,
            "qemu-io",
            &["-f", "vmdk", "-c", "write -P 1 0 1M", "base.vmdk"],
        );
        ok(
            &fx,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-b",
                "base.vmdk",
                "-F",
                "vmdk",
                "top.vmdk",
            ],
        );
        ok(
            &fx,
            "qemu-io",
            &["-f", "vmdk", "-c", "write -P 2 1000 2000", "top.vmdk"],
        );
        for (n, args) in [
            &[
                "create",
                "-f",
                "vmdk",
                "-b",
                "base.vmdk",
                "-F",
                "vmdk",
                "t2.vmdk",
            ][..],
            &[
                "create",
                "-f",
                "vmdk",
                "-o",
                "backing_file=base.vmdk,backing_fmt=vmdk",
                "t2.vmdk",
                "4100k",
            ],
            &[
                "create", "-f", "vmdk", "-b", "src.raw", "-F", "raw", "t2.vmdk", "4M",
            ],
            &[
                "create",
                "-f",
                "vmdk",
                "-o",
                "subformat=monolithicFlat",
                "-b",
                "base.vmdk",
                "-F",
                "vmdk",
                "t2.vmdk",
            ],
        ]
        .iter()
        .enumerate()
        {
            same_in_copies(&fx, n, args, &["t2.vmdk"], &[]);
        }
        same_in_copies(
            &fx,
            10,
            &["convert", "-O", "raw", "top.vmdk", "o.raw"],
            &[],
            &["o.raw"],
        );
        // vmdk has no emptying: commit leaves the top as it was (and, the
        // base's CID changed, no longer readable over it, in QEMU too); nor
        // can its link change: rebase copies, then refuses.
        same_in_copies(&fx, 11, &["commit", "top.vmdk"], &[], &["base.vmdk"]);
        same_in_copies(
            &fx,
            12,
            &["rebase", "-b", "", "top.vmdk"],
            &[],
            &["top.vmdk"],
        );
        let d = fx.as_path();
        for args in [
            &["info", "top.vmdk"][..],
            &["info", "--output=json", "top.vmdk"],
            &["info", "--backing-chain", "top.vmdk"],
            &["map", "--output=json", "top.vmdk"],
            &["map", "top.vmdk"],
            &["check", "top.vmdk"],
            &["compare", "top.vmdk", "base.vmdk"],
        ] {
            same(d, args);
        }
        assert_all_same();
    }
}
