//! The foreign formats (QEMU's vpc, vdi, vhdx and vmdk drivers) through both
//! tools: create with each option, info, map, check, convert to and from,
//! compare, and refusals. stdout, stderr and the exit code must be identical;
//! what one tool writes, the other reads back the same.

mod common;

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
}
