//! The order in which qemu-img refuses a command line, over every subcommand:
//! getopt hands the options over in one pass and qemu-img judges some values
//! as it meets them, so a bad value typed early is refused before an unknown
//! option, a missing value or a file name too many typed after it; an
//! unknown option typed first is refused before any value; `--` ends the
//! options; a repeated option is judged each time it is met. Each row runs
//! with strata and with qemu-img on copies of the same directory; both must
//! print the same bytes, exit alike and leave the same files.

mod common;

use common::{assert_all_same, io, qcow2, same_in_dir_copies, sh};
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
    // A bitmap, and a data cluster of zeroes.
    qcow2(dir, "bm.qcow2", "1M", &[]);
    sh(dir, "qemu-img", &["bitmap", "--add", "bm.qcow2", "b0"]);
    qcow2(dir, "z.qcow2", "1M", &[]);
    io(
        dir,
        "qcow2",
        "z.qcow2",
        &["write -P 0 0 64k", "write -P 1 64k 4k"],
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
    // convert, after the option loop: the -o list is read against the target
    // format's options before -B, -F, -c and --bitmaps are judged; --bitmaps
    // after -c.
    "convert -o bogus -c -O raw a.qcow2 o.raw",
    "convert -c -o bogus=1 -O raw a.qcow2 o.raw",
    "convert -O raw -o bogus -B base.qcow2 a.qcow2 o.raw",
    "convert -O raw -o size=abc -c a.qcow2 o.raw",
    "convert -O qcow2 -o cluster_size=abc -B base.qcow2 a.qcow2 o.qcow2",
    "convert --bitmaps -O qcow2 -B base.qcow2 bm.qcow2 o.qcow2",
    "convert --bitmaps -O qcow2 -B base.qcow2 bm.qcow2 bm.qcow2 o.qcow2",
    "convert --bitmaps -O qcow2 -o backing_file=base.qcow2 bm.qcow2 bm.qcow2 o.qcow2",
    "convert --bitmaps -c -O raw bm.qcow2 bm.qcow2 o.raw",
    "convert --bitmaps -O raw -B base.qcow2 bm.qcow2 bm.qcow2 o.raw",
    // -C copies data as stored, zeroes included (see also
    // copy_offloading_copies_what_a_raw_data_file_stores_like_qemu_img).
    "convert -C -O qcow2 z.qcow2 o.qcow2",
    "convert -C -O raw z.qcow2 o.raw",
    // amend parses its list against the options it amends (in the order
    // typed), then against create's for the hint; compat's value is judged
    // after every type, and before refcount_bits'.
    "amend -o compat=bogus,lazy_refcounts=x a.qcow2",
    "amend -o compat=bogus,size=abc a.qcow2",
    "amend -o refcount_bits=3,compat=bogus a.qcow2",
    "amend -o compat=bogus,compat=v3 a.qcow2",
    "amend -o compat=v3,compat=bogus a.qcow2",
    "amend -o compat a.qcow2",
    "amend -o cluster_size a.qcow2",
    "amend -o cluster_size=abc a.qcow2",
    "amend -o lazy_refcounts=x,cluster_size=64k a.qcow2",
    "amend -o refcount_bits=x,cluster_size=4k a.qcow2",
    "amend -o size=abc,cluster_size=4k a.qcow2",
    "amend -o encryption=x a.qcow2",
    "amend -o encryption=on a.qcow2",
    // --object is created as the option loop meets it, in every subcommand
    // that takes it (compare exits 2); `help` lists the types there.
    "info --object bogus --zzz a.qcow2",
    "info --zzz --object bogus a.qcow2",
    "info --object help --zzz a.qcow2",
    "info --object help,id=x a.qcow2",
    "check --object secret,id=s0,data=x --object secret,id=s0,data=y --zzz a.qcow2",
    "map --object secret,data=x --zzz a.qcow2",
    "compare --object secret,id=s0 --zzz a.qcow2 a.qcow2",
    "compare --object bogus a.qcow2 a.qcow2 extra",
    "snapshot -l --object bogus=1 --zzz a.qcow2",
    "commit --object secret,id=s0,file=nonexist --zzz a.qcow2",
    "rebase --object bogus -t bogus a.qcow2",
    "resize --object bogus --preallocation=bogus a.qcow2 1M",
    "amend --object bogus -o , a.qcow2",
    "convert -S abc --object bogus a.qcow2 o.raw",
    "convert --object bogus -S abc a.qcow2 o.raw",
    "create --object bogus -o , n.qcow2 1M",
    "measure --object bogus --size abc",
    "bitmap --object bogus --add a.qcow2 b0 extra",
    "dd --object bogus --zzz if=a.qcow2 of=o.raw",
    "info --object secret,id=s0,data=x,bogus=1 --output=bogus a.qcow2",
    // The -o items are read in the order typed, a repeated key each time.
    "create -f qcow2 -o lazy_refcounts=maybe,lazy_refcounts=on n.qcow2 1M",
    "create -f qcow2 -o zzz,cluster_size=abc n.qcow2 1M",
    "create -f qcow2 -o cluster_size=abc -o zzz n.qcow2 1M",
    "convert -O qcow2 -o zzz,cluster_size=abc -c a.qcow2 o.qcow2",
    "convert -O qcow2 -o cluster_size=abc,zzz a.qcow2 o.qcow2",
    // amend judges the encryption options, compat, data_file, data_file_raw,
    // then refcount_bits' range.
    "amend -o refcount_bits=3,data_file=x a.qcow2",
    "amend -o refcount_bits=3,data_file_raw=on a.qcow2",
    "amend -o compat=bogus,encrypt.old-secret=x a.qcow2",
    "amend -o refcount_bits=3,encrypt.old-secret=x a.qcow2",
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

/// `convert -C` from an image with a raw external data file, every cluster of
/// which reads as data: each is copied, zeroes included, as qemu-img does.
/// (A fixture of its own: the data file is named relative to the directory the
/// tools run in, which the comparison of the files left does not share.)
#[test]
fn copy_offloading_copies_what_a_raw_data_file_stores_like_qemu_img() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("fx");
    std::fs::create_dir_all(&dir).unwrap();
    qcow2(
        &dir,
        "dfr.qcow2",
        "1M",
        &["-o", "data_file=dfr.raw,data_file_raw=on"],
    );
    io(
        &dir,
        "qcow2",
        "dfr.qcow2",
        &["write -P 1 0 64k", "write -z 128k 64k"],
    );
    let mut left = Vec::new();
    for prog in ["strata", "qemu-img"] {
        let args = ["convert", "-C", "-O", "qcow2", "dfr.qcow2", "o.qcow2"];
        let out = common::outcome(&dir, prog, &args);
        let map = common::map_json(&dir, "o.qcow2");
        left.push((out, map, std::fs::read(dir.join("o.qcow2")).unwrap()));
        std::fs::remove_file(dir.join("o.qcow2")).unwrap();
    }
    assert_eq!(left[0].0, left[1].0, "what the tools print");
    assert_eq!(left[0].1, left[1].1, "the maps of the copies");
    assert!(left[0].2 == left[1].2, "the copies differ");
}
