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
