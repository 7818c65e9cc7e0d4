//! The order in which qemu-img refuses a command line, over every subcommand:
//! getopt hands the options over in one pass and qemu-img judges some values
//! as it meets them, so a bad value typed early is refused before an unknown
//! option, a missing value or a file name too many typed after it; an
//! unknown option typed first is refused before any value; `--` ends the
//! options; a repeated option is judged each time it is met. Each row runs
//! with strata and with qemu-img on copies of the same directory; both must
//! print the same bytes, exit alike and leave the same files.

mod common;

use common::{assert_all_same, qcow2, same_in_dir_copies, sh};
use std::path::Path;

fn fixture(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    qcow2(dir, "base.qcow2", "1M", &[]);
    qcow2(dir, "a.qcow2", "1M", &["-b", "base.qcow2", "-F", "qcow2"]);
    sh(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "raw", "r.raw", "1M"],
    );
}

/// Rows of one subcommand each, split on spaces.
const ROWS: &[&str] = &[
    // create: -o lists are checked as met.
    "create -o , --zzz n.qcow2 1M",
    "create --zzz -o , n.qcow2 1M",
    "create -f qcow2 -o , n.qcow2 1M extra",
    "create -f qcow2 n.qcow2 1M -o",
    "create -o , -- n.qcow2 1M",
    "create -o lazy_refcounts=on -o , -f qcow2 n.qcow2 1M",
    // info
    "info --output=bogus --zzz a.qcow2",
    "info --zzz --output=bogus a.qcow2",
    "info --output=bogus a.qcow2 extra",
    "info a.qcow2 --output",
    "info --output=json --output=bogus a.qcow2",
    "info -- --output=bogus",
    // map
    "map --start-offset=abc --zzz a.qcow2",
    "map --zzz --max-length=abc a.qcow2",
    "map -l abc a.qcow2 extra",
    "map -s 1 -s abc a.qcow2",
    "map -s 1 --output=x -l y a.qcow2",
    "map a.qcow2 -s",
    // check
    "check -r bogus --zzz a.qcow2",
    "check -q -r all -r bogus a.qcow2 extra",
    "check -T bogus --zzz a.qcow2",
    "check a.qcow2 -r",
    // compare
    "compare -T bogus --zzz a.qcow2 a.qcow2",
    "compare a.qcow2 a.qcow2 a.qcow2 -f",
    // measure
    "measure --size abc --zzz",
    "measure --zzz --size abc",
    "measure --size 1M --size abc -O qcow2",
    "measure -l snapshot.bogus=1 --zzz a.qcow2",
    "measure -o , --output=x a.qcow2",
    "measure --output=x -o , a.qcow2",
    "measure --size 1M a.qcow2 extra --output=x",
    // resize
    "resize --preallocation=bogus --zzz a.qcow2 1M",
    "resize --preallocation=bogus a.qcow2 1M extra",
    "resize --preallocation=bogus a.qcow2 abc",
    "resize --zzz --preallocation=bogus a.qcow2 1M",
    "resize a.qcow2 1M --preallocation",
    // A negative size right after the file name is no option; elsewhere it is.
    "resize --shrink a.qcow2 -512k",
    "resize --shrink a.qcow2 -512k --zzz",
    "resize --preallocation=bogus a.qcow2 -512k",
    "resize --shrink -512k a.qcow2",
    "resize -512k a.qcow2",
    // convert
    "convert -S abc --zzz a.qcow2 o.raw",
    "convert -m 0 --zzz a.qcow2 o.raw",
    "convert -r x --zzz a.qcow2 o.raw",
    "convert -l snapshot.bogus=1 --zzz a.qcow2 o.raw",
    "convert -o , --zzz a.qcow2 o.raw",
    "convert --zzz -S abc a.qcow2 o.raw",
    "convert -m 4 -S abc -m 0 a.qcow2 o.raw",
    "convert -S abc a.qcow2",
    "convert a.qcow2 o.raw -m",
    "convert -m 0 -- a.qcow2 o.raw",
    // snapshot: a second action is refused as met.
    "snapshot -l -c x a.qcow2 extra",
    "snapshot -c x -c y a.qcow2",
    "snapshot -l -l a.qcow2",
    "snapshot --zzz -l -c x a.qcow2",
    "snapshot -l -c x --zzz a.qcow2",
    "snapshot a.qcow2 -c",
    // commit
    "commit -r 16E a.qcow2 extra",
    "commit -r abc --zzz a.qcow2",
    "commit --zzz -r abc a.qcow2",
    "commit -r 1M -r abc a.qcow2",
    "commit -qr abc a.qcow2",
    "commit a.qcow2 -r",
    "commit -r abc -- a.qcow2",
    "commit -- -r abc",
    // amend
    "amend -o , --zzz a.qcow2",
    "amend -t bogus --zzz a.qcow2",
    "amend -o , a.qcow2 extra",
    "amend a.qcow2 -o",
    // rebase
    "rebase -t bogus --zzz a.qcow2",
    "rebase -u -b base.qcow2 a.qcow2 extra",
    "rebase a.qcow2 -b",
    // bitmap
    "bitmap -g abc --zzz a.qcow2 b0",
    "bitmap --zzz -g abc a.qcow2 b0",
    "bitmap --add a.qcow2 b0 -g",
    // dd
    "dd -f qcow2 --zzz if=a.qcow2 of=o.raw",
    "dd if=a.qcow2 of=o.raw -O",
    // bench
    "bench -c abc --zzz a.qcow2",
    "bench -d 0 --zzz a.qcow2",
    "bench -t bogus --zzz a.qcow2",
    "bench -i bogus --zzz a.qcow2",
    "bench --pattern=x --zzz a.qcow2",
    "bench --flush-interval=x --zzz a.qcow2",
    "bench -o x --zzz a.qcow2",
    "bench -s x --zzz a.qcow2",
    "bench -S x --zzz a.qcow2",
    "bench -c 5 -d 0 -c abc a.qcow2",
    "bench -c abc a.qcow2 extra",
    "bench --zzz -c abc a.qcow2",
    "bench a.qcow2 -c",
];

#[test]
fn each_subcommand_refuses_in_getopt_order_like_qemu_img() {
    let root = tempfile::tempdir().unwrap();
    let fx = root.path().join("fx");
    fixture(&fx);
    for (n, row) in ROWS.iter().enumerate() {
        let args: Vec<&str> = row.split(' ').collect();
        same_in_dir_copies(&fx, n, &args);
    }
    assert_all_same();
}
