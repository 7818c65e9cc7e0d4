//! QEMU's foreign formats (vpc, vdi, vhdx, vmdk) through both tools: create
//! with each option, info (text and JSON), map, check, convert to and from,
//! compare, resize and refusals. stdout, stderr and the exit code must be
//! identical, and the images each tool writes must look the same to QEMU.
//! Each format has its own module.

mod common;

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
