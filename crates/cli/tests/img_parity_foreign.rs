//! The formats of other tools (vpc, vdi, vhdx, vmdk) through both tools:
//! create (each option), info (text and JSON), map, check, convert to and
//! from each subformat, compare, and refusals. stdout, stderr and the exit
//! code must be identical, and the images each tool writes alike. Each format
//! has its own module.

mod common;

mod vdi {
    use crate::common::{assert_all_same, io, ok, same, same_in_dir_copies};
    use std::path::Path;

    fn put(dir: &Path, file: &str, at: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(file))
            .unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

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
        assert_all_same();
    }
}
