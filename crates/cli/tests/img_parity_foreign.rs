//! The formats of other tools (vpc, vdi, vhdx, vmdk) through both tools:
//! create with each option, info, map, check, convert to and from, compare,
//! resize and refusals. stdout, stderr and the exit code must be identical,
//! and what each tool writes reads the same. One module per format.

mod common;

mod vhdx {
    use super::common::{assert_all_same, ok, same, same_in_dir_copies, sh};
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
        let mut run = |args: &[&str]| {
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
            run(&["create", "-f", "vhdx", "-o", o, "new.vhdx", "16M"]);
        }
        run(&["create", "-f", "vhdx", "new.vhdx", "1G"]);
        run(&["create", "-f", "vhdx", "new.vhdx", "1000"]);
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
            run(&["convert", "-O", "vhdx", "-o", o, "src.raw", "out.vhdx"]);
        }
        run(&["convert", "-f", "vhdx", "-O", "raw", "q.vhdx", "out.raw"]);
        run(&["convert", "-O", "qcow2", "f.vhdx", "out.qcow2"]);
        run(&["convert", "-O", "vhdx", "q.vhdx", "out.vhdx"]);
        run(&["check", "-r", "all", "q.vhdx"]);
        assert_all_same();
    }
}
