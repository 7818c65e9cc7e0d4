//! Corners of the qcow2 engine where strata must repair images as qemu-img
//! does: an image without any refcount table (QEMU's iotest 108), which only
//! `check` opens and `check -r all` rebuilds. Both tools run the same commands on identically
//! made files and must print the same bytes and leave the same files.

mod common;

use common::{assert_all_same, same_files};

/// The shell lines that make iotest 108's image: data written, then the
/// header's refcount table offset (when `offset_too`) and cluster count zeroed.
fn no_reftable_setup(offset_too: bool) -> String {
    let mut s = String::from(
        "qemu-img create -q -f qcow2 img.qcow2 64M\n\
         qemu-io -c 'write -P 42 0 64k' img.qcow2 >/dev/null\n\
         printf '\\x00\\x00\\x00\\x00' | dd of=img.qcow2 bs=1 seek=56 conv=notrunc 2>/dev/null\n",
    );
    if offset_too {
        s += "printf '\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00' | dd of=img.qcow2 bs=1 seek=48 conv=notrunc 2>/dev/null\n";
    }
    s
}

/// Without a refcount table, every subcommand but `check` refuses the image
/// ("Image does not contain a reference count table"); `check` reports every
/// cluster in use as unreferenced (exit 2), `check -r leaks` fails asking for
/// a rebuild, and `check -r all` rebuilds the refcounts into an image that
/// checks clean and keeps its data; both tools leave the same bytes.
#[test]
fn image_without_refcount_table_is_only_opened_by_check_and_rebuilt_by_repair() {
    let root = tempfile::tempdir().unwrap();
    for offset_too in [true, false] {
        same_files(
            root.path(),
            &format!("no-reftable-{offset_too}"),
            &no_reftable_setup(offset_too),
            &[
                "check img.qcow2",
                "check --output=json img.qcow2",
                "info img.qcow2",
                "map img.qcow2",
                "convert -O raw img.qcow2 out.raw",
                "snapshot -l img.qcow2",
                "resize img.qcow2 128M",
                "check -r leaks img.qcow2",
                "check -r all img.qcow2",
                "check img.qcow2",
                "convert -O raw img.qcow2 out.raw",
            ],
            false,
        );
    }
    assert_all_same();
}
