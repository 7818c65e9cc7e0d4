//! qemu-img command lines as cloud and virtualization stacks run them:
//! OpenStack (nova, cinder, glance, diskimage-builder), libvirt's storage
//! driver, Proxmox VE (pve-storage, qemu-server), libguestfs's tools, Packer's
//! QEMU builder and vagrant-libvirt. Each row is one usage, with the flags in
//! the order and spelling the project uses, run by both tools in their own
//! copy of the same directory of images (qcow2 written by qemu-io, backing
//! chains, raw and sparse files, compressed clusters, internal snapshots, a
//! persistent bitmap, a compat=0.10 image, existing targets). They must print
//! the same bytes, exit alike and leave images QEMU sees alike. The same holds
//! for the command lines of tutorials, vendor manuals and Q&A answers (Red
//! Hat, SUSE, Ubuntu, Arch, Proxmox and oVirt documentation, qemu-img's own
//! manual, StackOverflow/ServerFault/Unix.SE), run on images named as they
//! name them.

mod common;

use common::{assert_all_same, io, qcow2, same_in_dir_copies, sh};
use std::path::Path;

/// A 64 MiB qcow2 image `qcow2_name` written by qemu-io (data at 0, 8 MiB and
/// 40 MiB, zeroes at 16 MiB), and the same guest bytes as the raw file `raw`.
fn disk_and_raw_copy(d: &Path, qcow2_name: &str, raw: &str) {
    qcow2(d, qcow2_name, "64M", &[]);
    io(
        d,
        "qcow2",
        qcow2_name,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 8M 64k",
            "write -z 16M 1M",
            "write -P 0x33 40M 512",
        ],
    );
    let args = ["convert", "-f", "qcow2", "-O", "raw", qcow2_name, raw];
    sh(d, "qemu-img", &args);
}

/// The images every usage runs on, made in `d` with QEMU's own tools:
/// - `disk.qcow2` (64 MiB): data at 0, 8 MiB and 40 MiB, zeroes at 16 MiB;
/// - `disk.raw`: the same guest bytes as a sparse raw file;
/// - `overlay.qcow2` on `disk.qcow2`, with data and zeroes of its own;
/// - `snap.qcow2` (32 MiB) with internal snapshots `s1` and `s2`;
/// - `comp.qcow2`: `disk.qcow2` with compressed clusters;
/// - `bm.qcow2` with the persistent bitmap `b0` tracking a write;
/// - `old.qcow2`: a compat=0.10 image with data;
/// - `target.qcow2` and `target.raw`: empty 64 MiB targets for `convert -n`.
fn fixture(d: &Path) {
    disk_and_raw_copy(d, "disk.qcow2", "disk.raw");
    qcow2(
        d,
        "overlay.qcow2",
        "64M",
        &["-b", "disk.qcow2", "-F", "qcow2"],
    );
    io(
        d,
        "qcow2",
        "overlay.qcow2",
        &["write -P 0x44 1M 128k", "write -z 8M 64k"],
    );
    qcow2(d, "snap.qcow2", "32M", &[]);
    io(d, "qcow2", "snap.qcow2", &["write -P 0x55 0 256k"]);
    sh(d, "qemu-img", &["snapshot", "-c", "s1", "snap.qcow2"]);
    io(d, "qcow2", "snap.qcow2", &["write -P 0x66 128k 256k"]);
    sh(d, "qemu-img", &["snapshot", "-c", "s2", "snap.qcow2"]);
    io(d, "qcow2", "snap.qcow2", &["write -P 0x77 1M 64k"]);
    sh(
        d,
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "disk.qcow2", "comp.qcow2"],
    );
    qcow2(d, "bm.qcow2", "16M", &[]);
    sh(d, "qemu-img", &["bitmap", "--add", "bm.qcow2", "b0"]);
    io(d, "qcow2", "bm.qcow2", &["write -P 0x88 2M 128k"]);
    qcow2(d, "old.qcow2", "16M", &["-o", "compat=0.10"]);
    io(d, "qcow2", "old.qcow2", &["write -P 0x99 64k 64k"]);
    qcow2(d, "target.qcow2", "64M", &[]);
    sh(d, "truncate", &["-s", "64M", "target.raw"]);
}

/// The images the tutorials, manuals and Q&A answers of [`GUIDES_CREATE_INFO`],
/// [`GUIDES_CONVERT_RESIZE`] and [`GUIDES_CHAINS`] work on, made in `d` with QEMU's own tools:
/// - `base.qcow2` (64 MiB): data at 0, 8 MiB and 40 MiB, zeroes at 16 MiB;
/// - `disk.img`: the same guest bytes as a sparse raw file;
/// - `snap1.qcow2` on `base.qcow2` and `snap2.qcow2` on `snap1.qcow2`,
///   external snapshots with data and zeroes of their own;
/// - `vm.qcow2` (32 MiB) with internal snapshots `clean-install` and
///   `before-upgrade`;
/// - `bm.qcow2` (16 MiB) with the persistent bitmap `b0` tracking a write;
/// - `leaky.qcow2` with one leaked cluster (allocated, unreferenced);
/// - `target.qcow2` and `target.raw`: empty 64 MiB targets for `convert -n`.
fn guides_fixture(d: &Path) {
    disk_and_raw_copy(d, "base.qcow2", "disk.img");
    qcow2(
        d,
        "snap1.qcow2",
        "64M",
        &["-b", "base.qcow2", "-F", "qcow2"],
    );
    io(
        d,
        "qcow2",
        "snap1.qcow2",
        &["write -P 0x44 1M 128k", "write -z 8M 64k"],
    );
    qcow2(
        d,
        "snap2.qcow2",
        "64M",
        &["-b", "snap1.qcow2", "-F", "qcow2"],
    );
    io(
        d,
        "qcow2",
        "snap2.qcow2",
        &["write -P 0x55 2M 64k", "write -P 0x66 0 64k"],
    );
    qcow2(d, "vm.qcow2", "32M", &[]);
    io(d, "qcow2", "vm.qcow2", &["write -P 0x55 0 256k"]);
    sh(
        d,
        "qemu-img",
        &["snapshot", "-c", "clean-install", "vm.qcow2"],
    );
    io(d, "qcow2", "vm.qcow2", &["write -P 0x66 128k 256k"]);
    sh(
        d,
        "qemu-img",
        &["snapshot", "-c", "before-upgrade", "vm.qcow2"],
    );
    io(d, "qcow2", "vm.qcow2", &["write -P 0x77 1M 64k"]);
    qcow2(d, "bm.qcow2", "16M", &[]);
    sh(d, "qemu-img", &["bitmap", "--add", "bm.qcow2", "b0"]);
    io(d, "qcow2", "bm.qcow2", &["write -P 0x88 2M 128k"]);
    // A leak: one more cluster at the end of the file, counted but unused.
    qcow2(d, "leaky.qcow2", "16M", &[]);
    io(d, "qcow2", "leaky.qcow2", &["write -P 0x99 0 64k"]);
    let leaky = d.join("leaky.qcow2");
    let len = std::fs::metadata(&leaky).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&leaky)
        .unwrap();
    f.set_len(len + 65536).unwrap();
    drop(f);
    common::damage::poke_refcount(&leaky, len / 65536, 1);
    qcow2(d, "target.qcow2", "64M", &[]);
    sh(d, "truncate", &["-s", "64M", "target.raw"]);
}

/// Run every row of `table` (a command line split at spaces; `''` is an
/// empty argument) with both tools, each in its own copy of a fresh
/// [`fixture`], and fail with every difference found.
fn run_table(table: &[&str]) {
    run_table_on(fixture, table);
}

/// [`run_table`] on the images `make` makes.
fn run_table_on(make: fn(&Path), table: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let fix = dir.path().join("imgs");
    std::fs::create_dir(&fix).unwrap();
    make(&fix);
    for (n, line) in table.iter().enumerate() {
        let args: Vec<&str> = line
            .split_whitespace()
            .map(|a| if a == "''" { "" } else { a })
            .collect();
        // Snapshot rows too: strata places a snapshot's new tables where
        // qemu-img places them, so the files' lengths agree as well.
        same_in_dir_copies(&fix, n, &args);
    }
    assert_all_same();
}

/// OpenStack nova: image cache fetch and conversion, instance disks on a
/// cached base, resize, live-snapshot rebase and snapshot extraction.
const NOVA: &[&str] = &[
    // images.qemu_img_info (privsep): path first, then the flags
    "info disk.qcow2 --force-share --output=json",
    "info overlay.qcow2 --force-share --output=json",
    "info snap.qcow2 --force-share --output=json",
    "info bm.qcow2 --force-share --output=json",
    "info comp.qcow2 --force-share --output=json",
    // qemu_img_info with the format the image record names
    "info disk.qcow2 --force-share --output=json -f qcow2",
    "info disk.raw --force-share --output=json -f raw",
    // the record says qcow2 but the file is raw: refused
    "info disk.raw --force-share --output=json -f qcow2",
    // an image missing from the cache
    "info gone.qcow2 --force-share --output=json",
    // image cache fetch_to_raw: convert to raw without the host cache
    "convert -t none -O raw -f qcow2 disk.qcow2 out.raw",
    "convert -t writeback -O raw -f qcow2 comp.qcow2 out.raw",
    "convert -t none -O raw -f qcow2 overlay.qcow2 out.raw",
    // snapshot upload: raw to qcow2, with and without compression
    "convert -t none -O qcow2 -f raw disk.raw out.qcow2",
    "convert -t none -O qcow2 -f raw -c disk.raw out.qcow2",
    // extract_snapshot: flatten the instance disk, compressed when configured
    "convert -f qcow2 -O qcow2 overlay.qcow2 out.qcow2",
    "convert -f qcow2 -O qcow2 -c overlay.qcow2 out.qcow2",
    "convert -f qcow2 -O raw overlay.qcow2 out.raw",
    // create_cow_image: backing file, its format and cluster size, and size in -o
    "create -f qcow2 -o backing_file=disk.qcow2,backing_fmt=qcow2,cluster_size=65536,size=67108864 inst.qcow2",
    "create -f qcow2 -o backing_file=disk.qcow2,backing_fmt=qcow2,cluster_size=65536 inst.qcow2",
    "create -f qcow2 -o backing_file=disk.raw,backing_fmt=raw,size=134217728 inst.qcow2",
    // create_image: ephemeral and swap disks
    "create -f raw eph.raw 1G",
    "create -f qcow2 eph.qcow2 1G",
    "create -f qcow2 eph.qcow2 20971520",
    // resize of an instance disk (bytes) and of a raw disk
    "resize disk.qcow2 134217728",
    "resize -f raw disk.raw 134217728",
    "resize overlay.qcow2 100663296",
    // a shrink nova never asks for: refused without --shrink
    "resize disk.qcow2 33554432",
    // live snapshot: rebase the delta onto its base, or flatten it
    "rebase -b disk.qcow2 -F qcow2 overlay.qcow2",
    "rebase -b '' overlay.qcow2",
    "rebase -f qcow2 -b '' overlay.qcow2",
    // legacy internal snapshots of an instance disk
    "snapshot -c nova-snap disk.qcow2",
    "snapshot -d s1 snap.qcow2",
];

/// OpenStack cinder: image_utils and the NFS/remotefs drivers' qcow2
/// snapshot chains.
const CINDER: &[&str] = &[
    // image_utils.qemu_img_info
    "info --output=json disk.qcow2",
    "info --output=json --force-share overlay.qcow2",
    "info --output=json -f raw disk.raw",
    "info --output=json -f qcow2 snap.qcow2",
    // convert_image: copy image to volume / volume to image
    "convert -O raw -t none -f qcow2 disk.qcow2 vol.raw",
    "convert -O raw -f qcow2 comp.qcow2 vol.raw",
    "convert -O qcow2 -t none -f raw disk.raw vol.qcow2",
    "convert -O qcow2 -c -f raw disk.raw vol.qcow2",
    "convert -O qcow2 -t none -c -f qcow2 overlay.qcow2 vol.qcow2",
    // convert of a source that is not there
    "convert -O raw -f qcow2 missing.qcow2 vol.raw",
    // remotefs _create_qcow2_snap_file: overlay with -o backing options and size
    "create -f qcow2 -o backing_file=disk.qcow2,backing_fmt=qcow2 vol.snap.qcow2 67108864",
    "create -f qcow2 -o backing_file=overlay.qcow2,backing_fmt=qcow2 vol.snap2.qcow2 1G",
    // nfs _create_qcow2_file: a new volume with preallocated metadata
    "create -f qcow2 -o preallocation=metadata vol.qcow2 1073741824",
    "create -f qcow2 vol.qcow2 1G",
    // image_utils.resize_image (size in GiB)
    "resize disk.qcow2 1G",
    "resize -f qcow2 overlay.qcow2 1G",
    "resize -f raw disk.raw 1G",
    // remotefs _rebase_img: relink a snapshot file unsafely
    "rebase -u -b disk.raw overlay.qcow2 -F raw",
    "rebase -u -b disk.qcow2 -F qcow2 overlay.qcow2",
    // remotefs snapshot delete: commit the snapshot file into its base
    "commit overlay.qcow2",
    "commit -d overlay.qcow2",
    "commit -f qcow2 overlay.qcow2",
    // commit of an image with no backing file
    "commit disk.qcow2",
];

/// OpenStack glance's image_conversion import plugin and
/// diskimage-builder's final conversion.
const GLANCE_DIB: &[&str] = &[
    // glance image_conversion: inspect with the claimed format first
    "info -f qcow2 --output=json disk.qcow2",
    "info -f raw --output=json disk.raw",
    "info -f qcow2 --output=json overlay.qcow2",
    "info -f qcow2 --output=json disk.raw",
    // glance image_conversion: convert to the store's target format
    "convert -f qcow2 -O raw disk.qcow2 conv.raw",
    "convert -f raw -O qcow2 disk.raw conv.qcow2",
    "convert -f qcow2 -O raw comp.qcow2 conv.raw",
    "convert -f qcow2 -O qcow2 old.qcow2 conv.qcow2",
    // diskimage-builder: raw build image to qcow2 with DIB_QEMU_IMG_OPTIONS
    "convert -c -f raw -O qcow2 -o compat=0.10 disk.raw img.qcow2",
    "convert -f raw -O qcow2 -o compat=0.10 disk.raw img.qcow2",
    "convert -f raw -O qcow2 -o compat=1.1 disk.raw img.qcow2",
    "convert -c -f raw -O raw disk.raw img.raw",
    // diskimage-builder: size the final image
    "info --output=json img.qcow2",
    "measure -f raw -O qcow2 disk.raw",
    "measure --output=json -f raw -O qcow2 disk.raw",
];

/// libvirt's storage driver (storage_util.c) and its inactive snapshots:
/// create with an `-o` list (backing format, preallocation, compat, lazy
/// refcounts, extended L2), sizes in KiB, convert between volumes, resize,
/// info, and internal snapshots of a shut-off domain.
const LIBVIRT: &[&str] = &[
    // vol-create: qcow2 with compat, sizes in KiB
    "create -f qcow2 -o compat=1.1 vol.qcow2 1048576K",
    "create -f qcow2 -o compat=0.10 vol.qcow2 1048576K",
    "create -f qcow2 -o preallocation=metadata,compat=1.1 vol.qcow2 65536K",
    "create -f qcow2 -o preallocation=falloc,compat=1.1 vol.qcow2 8192K",
    // features: lazy_refcounts given as a bare flag, extended_l2
    "create -f qcow2 -o compat=1.1,lazy_refcounts vol.qcow2 1048576K",
    "create -f qcow2 -o compat=1.1,extended_l2=on vol.qcow2 1048576K",
    "create -f qcow2 -o compat=1.1,lazy_refcounts,extended_l2=on vol.qcow2 1048576K",
    // lazy refcounts need compat 1.1: refused by qemu-img itself
    "create -f qcow2 -o compat=0.10,lazy_refcounts vol.qcow2 1048576K",
    "create -f qcow2 -o nocow=on,compat=1.1 vol.qcow2 1048576K",
    "create -f qcow2 -o cluster_size=2097152,compat=1.1 vol.qcow2 1048576K",
    // raw volumes, with nocow as on btrfs pools
    "create -f raw vol.raw 1048576K",
    "create -f raw -o nocow=on vol.raw 1024K",
    "create -f raw -o nocow=on,preallocation=falloc vol.raw 1024K",
    "create -f qcow2 -o nocow=yes vol.qcow2 1048576K",
    // nocow is no qcow2 option, so no amend option either
    "amend -f qcow2 -o nocow=on disk.qcow2",
    // a volume on a backing store: -b, then backing_fmt in the -o list
    "create -f qcow2 -b disk.qcow2 -o backing_fmt=qcow2,compat=1.1 vol.qcow2 65536K",
    "create -f qcow2 -b disk.qcow2 -o backing_fmt=qcow2,compat=1.1 vol.qcow2",
    "create -f qcow2 -b disk.raw -o backing_fmt=raw,compat=1.1 vol.qcow2",
    // a backing store larger than the volume asked for
    "create -f qcow2 -b disk.qcow2 -o backing_fmt=qcow2,compat=1.1 vol.qcow2 1024K",
    // vol-create-from: convert between volumes with the target's -o list
    "convert -f raw -O qcow2 -o compat=1.1 disk.raw vol.qcow2",
    "convert -f qcow2 -O raw disk.qcow2 vol.raw",
    "convert -f qcow2 -O qcow2 -o compat=1.1,lazy_refcounts disk.qcow2 vol.qcow2",
    "convert -f qcow2 -O qcow2 -o preallocation=metadata,compat=1.1 overlay.qcow2 vol.qcow2",
    "convert -f qcow2 -O qcow2 -o compat=0.10 snap.qcow2 vol.qcow2",
    "convert -f raw -O qcow2 -o nocow=on,compat=1.1 disk.raw vol.qcow2",
    "convert -f qcow2 -O raw -o nocow=on disk.qcow2 vol.raw",
    // vol-resize: grow, and shrink only with --shrink
    "resize disk.qcow2 100663296",
    "resize --shrink disk.raw 33554432",
    "resize disk.raw 33554432",
    // storage pool refresh and domain start: inspect while a guest may hold it
    "info -U --output=json overlay.qcow2",
    "info -U --output=json --backing-chain overlay.qcow2",
    "info -U --output=json -f qcow2 bm.qcow2",
    "info --output=json --backing-chain overlay.qcow2",
    // inactive internal snapshots: create, revert, delete, list
    "snapshot -c snap3 snap.qcow2",
    "snapshot -a s1 snap.qcow2",
    "snapshot -d s2 snap.qcow2",
    "snapshot -l snap.qcow2",
    "snapshot -a nosuch snap.qcow2",
    "snapshot -d nosuch snap.qcow2",
    // inactive external snapshot: a new overlay on the current disk
    "create -f qcow2 -o backing_fmt=qcow2,compat=1.1 -b overlay.qcow2 ext.qcow2",
    // volume upgrade to compat 1.1 (amend), as managers on libvirt run it
    "amend -f qcow2 -o compat=1.1 old.qcow2",
    "amend -f qcow2 -o compat=0.10 disk.qcow2",
    "amend -f qcow2 -o lazy_refcounts=on disk.qcow2",
    "amend -f qcow2 -o compat=1.1 disk.qcow2",
    "amend -f qcow2 -o refcount_bits=64 overlay.qcow2",
    "amend -f qcow2 -o lazy_refcounts=on old.qcow2",
    "amend -f raw -o compat=1.1 disk.raw",
];

/// Proxmox VE: pve-storage's Plugin.pm (alloc, clone, resize, snapshots,
/// volume info) and qemu-server's disk moves (`convert -p -n`, `dd`).
const PROXMOX: &[&str] = &[
    // alloc_image: -o preallocation first, then -f, path, size in KiB
    "create -o preallocation=metadata -f qcow2 vm-100-disk-0.qcow2 4194304K",
    "create -o preallocation=off -f qcow2 vm-100-disk-0.qcow2 4194304K",
    "create -o preallocation=falloc -f qcow2 vm-100-disk-0.qcow2 8192K",
    "create -o preallocation=full -f qcow2 vm-100-disk-0.qcow2 4096K",
    "create -f raw vm-100-disk-0.raw 4194304K",
    "create -o preallocation=falloc -f raw vm-100-disk-0.raw 8192K",
    // snapshot-as-volume-chain storages: extended L2 and 128k clusters
    "create -o preallocation=metadata,extended_l2=on,cluster_size=128k -f qcow2 vm-100-disk-0.qcow2 1048576K",
    // clone_image: a linked clone on the base volume
    "create -b disk.qcow2 -F qcow2 -f qcow2 vm-101-disk-0.qcow2",
    "create -b disk.raw -F raw -f qcow2 vm-101-disk-0.qcow2",
    // a clone of a base that is gone
    "create -b base-gone.qcow2 -F qcow2 -f qcow2 vm-101-disk-0.qcow2",
    // file_size_info / volume_size_info
    "info --output=json disk.qcow2",
    "info --output=json disk.raw",
    "info -f qcow2 --output=json overlay.qcow2",
    "info -f raw --output=json disk.raw",
    "info --output=json --backing-chain -f qcow2 overlay.qcow2",
    "info -f raw --output=json disk.qcow2",
    // volume_resize: -f, path, size in bytes
    "resize -f qcow2 disk.qcow2 134217728",
    "resize -f raw disk.raw 134217728",
    "resize -f qcow2 snap.qcow2 67108864",
    // volume_snapshot, volume_snapshot_rollback, volume_snapshot_delete
    "snapshot -c vzdump disk.qcow2",
    "snapshot -a s2 snap.qcow2",
    "snapshot -d s1 snap.qcow2",
    "snapshot -c s1 snap.qcow2",
    "snapshot -l snap.qcow2",
    // qemu_img_convert: move disk into an existing target volume
    "convert -p -n -f qcow2 -O raw disk.qcow2 target.raw",
    "convert -p -n -f raw -O qcow2 disk.raw target.qcow2",
    "convert -p -n -T none -f qcow2 -O qcow2 overlay.qcow2 target.qcow2",
    "convert -p -n -t none -f qcow2 -O raw comp.qcow2 target.raw",
    "convert -p -n -t none -T none -f raw -O raw disk.raw target.raw",
    // ... from a snapshot, and with a bandwidth limit
    "convert -p -n -l snapshot.name=s1 -f qcow2 -O raw snap.qcow2 target.raw",
    "convert -p -n -l snapshot.name=s2 -f qcow2 -O qcow2 snap.qcow2 target.qcow2",
    "convert -p -n -r 102400K -f qcow2 -O raw disk.qcow2 target.raw",
    // ... into a zero-initialized target (Proxmox's own QEMU has the zeroinit
    // driver; QEMU and strata refuse it). Without -p: what -p prints before a
    // failure is left to its own cases.
    "convert -n -f qcow2 -O raw disk.qcow2 zeroinit:target.raw",
    "convert -n -f qcow2 -O raw missing.qcow2 zeroinit:target.raw",
    "convert -f qcow2 -O raw missing.qcow2 zeroinit:target.raw",
    // ... into a target that is not there
    "convert -p -n -f qcow2 -O raw disk.qcow2 nosuch.raw",
    // ... of a snapshot the image does not have
    "convert -p -n -l snapshot.name=nosuch -f qcow2 -O raw snap.qcow2 target.raw",
    // EFI disk copy with dd
    "dd -n -f raw -O raw bs=65536 osize=1048576 if=disk.raw of=target.raw",
    "dd -n -f qcow2 -O raw bs=131072 osize=1048576 if=disk.qcow2 of=target.raw",
    // import sizing (qm disk import)
    "measure --output=json -O qcow2 disk.qcow2",
    "measure --output=json -f qcow2 -O raw overlay.qcow2",
    "measure --output=json -l snapshot.name=s1 -f qcow2 -O qcow2 snap.qcow2",
];

/// libguestfs (virt-sparsify, virt-builder, disk-create), Packer's QEMU
/// builder and vagrant-libvirt.
const GUESTFS_PACKER_VAGRANT: &[&str] = &[
    // libguestfs info: --output json as two words
    "info --output json disk.qcow2",
    "info --output json -f raw disk.raw",
    "info --output json -f qcow2 overlay.qcow2",
    // virt-sparsify: an overlay, then copy it out compacted
    "create -f qcow2 -o backing_file=disk.qcow2,backing_fmt=qcow2,compat=1.1 sparsify.qcow2",
    "convert -f qcow2 -O qcow2 -o compat=1.1 overlay.qcow2 sparse.qcow2",
    "convert -f qcow2 -O qcow2 -c -o compat=1.1 overlay.qcow2 sparse.qcow2",
    "convert -f qcow2 -O raw overlay.qcow2 sparse.raw",
    // guestfs disk-create: preallocation and cluster size
    "create -f qcow2 -o preallocation=off,compat=1.1 new.qcow2 268435456",
    "create -f qcow2 -o preallocation=metadata,compat=1.1,cluster_size=65536 new.qcow2 268435456",
    "create -f qcow2 -b disk.qcow2 -F qcow2 -o compat=1.1 new.qcow2",
    "create -f raw -o preallocation=off new.raw 268435456",
    // virt-builder: template to the output format, then resize
    "convert -f raw -O qcow2 -o preallocation=off,compat=1.1 disk.raw built.qcow2",
    "convert -f raw -O qcow2 -o preallocation=metadata disk.raw built.qcow2",
    "resize -f qcow2 disk.qcow2 8G",
    "resize -f raw disk.raw +64M",
    // Packer QEMU builder: create, on a backing file, convert, resize
    "create -f qcow2 packer.qcow2 40960M",
    "create -f qcow2 -b disk.qcow2 -F qcow2 packer.qcow2 40960M",
    "create -f raw packer.raw 40960M",
    "convert -O qcow2 -c disk.qcow2 packer-out.qcow2",
    "convert -O qcow2 disk.qcow2 packer-out.qcow2",
    "convert -O qcow2 -c -o compression_type=zstd disk.qcow2 packer-out.qcow2",
    "convert -O raw disk.qcow2 packer-out.raw",
    "resize -f qcow2 disk.qcow2 40960M",
    // Packer qemu_img_args inserted after the subcommand
    "create -o cluster_size=2M -f qcow2 packer.qcow2 40960M",
    "convert -o preallocation=metadata -O qcow2 disk.qcow2 packer-out.qcow2",
    // vagrant-libvirt: box image check, domain volume on the box, packaging
    "info --output=json bm.qcow2",
    "create -f qcow2 -F qcow2 -b disk.qcow2 box-vol.qcow2",
    "create -f qcow2 -F qcow2 -b disk.qcow2 box-vol.qcow2 128M",
    "rebase -p -b '' overlay.qcow2",
    "convert -p -f qcow2 -O qcow2 -c overlay.qcow2 box.img",
    "check disk.qcow2",
    "check --output=json overlay.qcow2",
    "map --output=json overlay.qcow2",
    "compare disk.qcow2 disk.raw",
    "compare -f qcow2 -F raw overlay.qcow2 disk.raw",
];

/// Tutorials, manuals and Q&A answers: creating and inspecting images.
/// (Sizes of preallocated and raw images are scaled down: comparing them
/// reads them.)
const GUIDES_CREATE_INFO: &[&str] = &[
    // create: the everyday forms, preallocation modes, -o tuning
    "create -f qcow2 disk.qcow2 10G",
    "create -f raw disk.raw 128M",
    "create disk.raw 100M",
    "create -q -f qcow2 disk.qcow2 1G",
    "create -f qcow2 -o preallocation=metadata disk.qcow2 256M",
    "create -f qcow2 -o preallocation=falloc disk.qcow2 100M",
    "create -f qcow2 -o preallocation=full disk.qcow2 10M",
    "create -f raw -o preallocation=full disk.raw 10M",
    "create -f raw -o preallocation=falloc disk.raw 10M",
    "create -f qcow2 -o cluster_size=2M disk.qcow2 20G",
    "create -f qcow2 -o cluster_size=4k disk.qcow2 1G",
    "create -f qcow2 -o compression_type=zstd disk.qcow2 1G",
    "create -f qcow2 -o compat=1.1,lazy_refcounts=on a.qcow2 10G",
    "create -f qcow2 -o cluster_size=64k,preallocation=metadata,lazy_refcounts=on,compat=1.1 disk.qcow2 128M",
    "create -f qcow2 -o extended_l2=on,cluster_size=128k disk.qcow2 10G",
    "create -f qcow2 -o size=20G,cluster_size=65536 disk.qcow2",
    "create -f qcow2 -o refcount_bits=1 x.qcow2 1G",
    "create -f qcow2 -o encryption=on enc.qcow2 1G",
    // options after the names, as getopt permutes them
    "create -f qcow2 disk.qcow2 256M -o preallocation=metadata",
    "create -f qcow2 disk.qcow2 2T -o cluster_size=2M",
    // overlays on a base, the old -o spelling, a base that is missing
    "create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2",
    "create -f qcow2 -F qcow2 -b base.qcow2 overlay.qcow2 20G",
    "create -f qcow2 -o backing_file=disk.img,backing_fmt=raw img1.cow",
    "create -f qcow2 -b snap2.qcow2 -F qcow2 snap3.qcow2",
    "create -f qcow2 -o preallocation=metadata -b base.qcow2 -F qcow2 ov.qcow2",
    "create -f qcow2 -b base.qcow2 overlay.qcow2",
    "create -f qcow2 -o backing_file=base.qcow2 overlay.qcow2",
    "create -f qcow2 -b missing.qcow2 -F qcow2 overlay.qcow2 10G",
    // sizes tutorials get wrong, and an existing image overwritten
    "create -f qcow2 disk.qcow2 10GB",
    "create -f qcow2 disk.qcow2 1.5G",
    "create -f qcow2 disk.qcow2",
    "create -f qcow2 disk.qcow2 1P",
    "create -f qcow2 -o cluster_size=3k disk.qcow2 1G",
    "create -f raw disk.img 128M",
    // info: one image, the chain, JSON, force-share, image-opts, errors
    "info base.qcow2",
    "info disk.img",
    "info snap2.qcow2",
    "info vm.qcow2",
    "info leaky.qcow2",
    "info --backing-chain snap2.qcow2",
    "info --output=json --backing-chain snap2.qcow2",
    "info --backing-chain -U --output=json snap2.qcow2",
    "info -U --backing-chain --output=human snap2.qcow2",
    "info --output json snap1.qcow2",
    "info base.qcow2 --output=json",
    "info --force-share bm.qcow2",
    "info --image-opts driver=qcow2,file.filename=base.qcow2",
    "info --image-opts driver=qcow2,file.driver=file,file.filename=snap2.qcow2",
    "info -f qcow2 disk.img",
    "info -f raw base.qcow2",
    "info nonexistent.qcow2",
    "info --output=xml base.qcow2",
    "info snap1.qcow2 snap2.qcow2",
];

/// Tutorials, manuals and Q&A answers: converting, resizing, measuring,
/// mapping, comparing and copying images.
const GUIDES_CONVERT_RESIZE: &[&str] = &[
    // convert: formats, compression, sparseness, flattening, snapshots
    "convert -f raw -O qcow2 disk.img disk.qcow2",
    "convert disk.img -O qcow2 disk.qcow2",
    "convert -p -f qcow2 -O raw base.qcow2 out.img",
    "convert -O qcow2 -c base.qcow2 small.qcow2",
    "convert -c -O qcow2 -o compression_type=zstd base.qcow2 small.qcow2",
    "convert -S 0 -O qcow2 -o preallocation=metadata disk.img full.qcow2",
    "convert -O raw -S 1M base.qcow2 out.raw",
    "convert -m 16 -W -O qcow2 base.qcow2 out.qcow2",
    "convert -t none -T none -O raw base.qcow2 out.raw",
    "convert -n -O raw base.qcow2 target.raw",
    "convert -n -f qcow2 -O qcow2 snap2.qcow2 target.qcow2",
    "convert -O qcow2 snap2.qcow2 flat.qcow2",
    "convert -O qcow2 -F qcow2 -B base.qcow2 snap2.qcow2 new.qcow2",
    "convert -O qcow2 -B base.qcow2 snap2.qcow2 new.qcow2",
    "convert -l snapshot.name=before-upgrade -O raw vm.qcow2 out.raw",
    "convert -O raw -l clean-install vm.qcow2 out.raw",
    "convert -s clean-install -O qcow2 vm.qcow2 out.qcow2",
    "convert -O raw disk.img base.qcow2 joined.raw",
    "convert --bitmaps -O qcow2 bm.qcow2 out.qcow2",
    "convert --image-opts driver=qcow2,file.filename=base.qcow2 -O raw out.raw",
    "convert -n --target-image-opts base.qcow2 driver=raw,file.filename=target.raw",
    "convert -O qcow2 -o preallocation=metadata,lazy_refcounts=on,compat=1.1 disk.img out.qcow2",
    "convert -O qcow2 -o preallocation=metadata,extended_l2=on,cluster_size=128k disk.img out.qcow2",
    "convert -O qcow2 nonexistent.img out.qcow2",
    "convert -O qcow2 base.qcow2 base.qcow2",
    "convert -O qcow3 base.qcow2 out.qcow2",
    // resize: grow, shrink with and without --shrink, preallocation, chains
    "resize base.qcow2 +10G",
    "resize --shrink base.qcow2 -1M",
    "resize base.qcow2 -1M",
    "resize base.qcow2 +10",
    "resize --shrink disk.img 32M",
    "resize disk.img 32M",
    "resize -f raw disk.img 128M",
    "resize --preallocation=falloc disk.img +10M",
    "resize --preallocation=full base.qcow2 +10M",
    "resize --preallocation=metadata base.qcow2 +100M",
    "resize vm.qcow2 +1G",
    "resize --shrink vm.qcow2 16M",
    "resize bm.qcow2 +16M",
    "resize snap2.qcow2 128M",
    "resize --shrink -f qcow2 snap1.qcow2 -8M",
    "resize base.qcow2",
    // measure, map, compare, dd
    "measure -O qcow2 --size 10G",
    "measure -f raw -O qcow2 disk.img",
    "measure -O qcow2 disk.img",
    "measure --output=json -O qcow2 snap2.qcow2",
    "measure --output=json --bitmaps -O qcow2 bm.qcow2",
    "measure -O qcow2 --size 10G -o cluster_size=2M,preallocation=metadata",
    "measure --size 10G",
    "map base.qcow2",
    "map --output=json snap2.qcow2",
    "map -f qcow2 --output=human base.qcow2",
    "map --output=json disk.img",
    "map --start-offset=1M --max-length=1M base.qcow2",
    "compare disk.img base.qcow2",
    "compare -s disk.img base.qcow2",
    "compare -f raw -F qcow2 disk.img base.qcow2",
    "compare -s base.qcow2 snap2.qcow2",
    "compare -s vm.qcow2 base.qcow2",
    "compare --image-opts driver=raw,file.filename=disk.img driver=qcow2,file.filename=base.qcow2",
    "dd if=disk.img of=out.raw bs=1M count=10",
    "dd -f qcow2 -O raw if=base.qcow2 of=out.raw",
    "dd if=base.qcow2 of=out.qcow2 -O qcow2 bs=4k count=100",
    "dd if=disk.img of=out.raw bs=1M skip=8 count=1",
    "dd if=missing.img of=out.raw",
];

/// Tutorials, manuals and Q&A answers: internal and external snapshots,
/// commit, rebase, check and repair, amend, and persistent bitmaps. (A commit
/// of `snap2.qcow2`, whose data QEMU's commit job copies with requests in
/// flight together, is left out: qemu-img's layout of it changes from run to
/// run.)
const GUIDES_CHAINS: &[&str] = &[
    // internal snapshots
    "snapshot -c snap1 base.qcow2",
    "snapshot -l vm.qcow2",
    "snapshot -l -U vm.qcow2",
    "snapshot vm.qcow2 -l",
    "snapshot -a clean-install vm.qcow2",
    "snapshot -a 1 vm.qcow2",
    "snapshot -d before-upgrade vm.qcow2",
    "snapshot -d 2 vm.qcow2",
    "snapshot -c clean-install vm.qcow2",
    "snapshot -a nonexistent vm.qcow2",
    "snapshot -q -c daily vm.qcow2",
    "snapshot -l base.qcow2",
    "snapshot -l disk.img",
    "snapshot -c snap disk.img",
    "snapshot -c new snap1.qcow2",
    "snapshot -c",
    // commit of an overlay into its base
    "commit snap1.qcow2",
    "commit -d snap1.qcow2",
    "commit -t none snap1.qcow2",
    "commit -f qcow2 -t writeback snap1.qcow2",
    "commit -b disk.img snap2.qcow2",
    // rebase: safe, unsafe, flattening, onto a missing or raw base
    "rebase -b base.qcow2 -F qcow2 snap2.qcow2",
    "rebase -p -b base.qcow2 -F qcow2 snap2.qcow2",
    "rebase -t none -T none -b base.qcow2 -F qcow2 snap2.qcow2",
    "rebase -u -b base.qcow2 -F qcow2 snap2.qcow2",
    "rebase -b base.qcow2 -F qcow2 -u snap2.qcow2",
    "rebase -u -b base.qcow2 snap2.qcow2",
    "rebase -b '' snap1.qcow2",
    "rebase -p -b '' snap2.qcow2",
    "rebase -u -b '' snap2.qcow2",
    "rebase -b missing.qcow2 -F qcow2 snap1.qcow2",
    "rebase -b disk.img -F raw snap1.qcow2",
    "rebase -u -b disk.img -F raw snap1.qcow2",
    // check and repair
    "check base.qcow2",
    "check leaky.qcow2",
    "check -q leaky.qcow2",
    "check -r leaks leaky.qcow2",
    "check -r all leaky.qcow2",
    "check -r all -q leaky.qcow2",
    "check --output=json leaky.qcow2",
    "check -r leaks --output=json leaky.qcow2",
    "check -r leaks -U leaky.qcow2",
    "check -r all snap2.qcow2",
    "check -T none base.qcow2",
    "check bm.qcow2",
    "check disk.img",
    "check -r wrong base.qcow2",
    "check",
    // amend
    "amend -f qcow2 -o compat=0.10 base.qcow2",
    "amend -o compat=1.1 base.qcow2",
    "amend -f qcow2 -o compat=1.1,lazy_refcounts=on base.qcow2",
    "amend -o refcount_bits=1 base.qcow2",
    "amend -o size=128M base.qcow2",
    "amend -o size=32M base.qcow2",
    "amend -o compat=0.10 vm.qcow2",
    "amend -p -o compat=0.10 base.qcow2",
    "amend -o backing_file=disk.img,backing_fmt=raw snap1.qcow2",
    "amend -o cluster_size=128k base.qcow2",
    "amend -o compression_type=zstd base.qcow2",
    "amend -f raw -o size=1M disk.img",
    // persistent bitmaps
    "bitmap --add base.qcow2 bitmap0",
    "bitmap --add -g 64K --disable base.qcow2 bitmap0",
    "bitmap --add --granularity 1M bm.qcow2 b2",
    "bitmap --remove bm.qcow2 b0",
    "bitmap --clear bm.qcow2 b0",
    "bitmap --disable bm.qcow2 b0",
    "bitmap --enable bm.qcow2 b0",
    "bitmap --add bm.qcow2 b1 --merge b0",
    "bitmap --add bm.qcow2 b0",
    "bitmap --remove bm.qcow2 nosuch",
    "bitmap --merge b0 -b bm.qcow2 bm.qcow2 b1",
    // a raw image has no bitmaps to change (--add names QEMU's node, which
    // changes from run to run, so it is left out)
    "bitmap --remove disk.img b0",
    "bitmap --clear -f raw disk.img b0",
    "bitmap --enable disk.img b0",
    "bitmap --merge b1 -f raw disk.img b0",
    "bitmap --remove -f raw bm.qcow2 b0",
    // a bitmap of a 16 MiB disk merged into one of a 64 MiB disk
    "bitmap --add base.qcow2 b9 --merge b0 -b bm.qcow2 -F qcow2",
    "bitmap --merge b0 -b bm.qcow2 -F qcow2 base.qcow2 b0",
];

#[test]
fn nova_usages_print_and_leave_what_qemu_img_does() {
    run_table(NOVA);
}

#[test]
fn cinder_usages_print_and_leave_what_qemu_img_does() {
    run_table(CINDER);
}

#[test]
fn glance_and_diskimage_builder_usages_print_and_leave_what_qemu_img_does() {
    run_table(GLANCE_DIB);
}

#[test]
fn libvirt_storage_usages_print_and_leave_what_qemu_img_does() {
    run_table(LIBVIRT);
}

#[test]
fn proxmox_usages_print_and_leave_what_qemu_img_does() {
    run_table(PROXMOX);
}

#[test]
fn guestfs_packer_and_vagrant_usages_print_and_leave_what_qemu_img_does() {
    run_table(GUESTFS_PACKER_VAGRANT);
}

#[test]
fn tutorial_create_and_info_usages_print_and_leave_what_qemu_img_does() {
    run_table_on(guides_fixture, GUIDES_CREATE_INFO);
}

#[test]
fn tutorial_convert_resize_and_inspection_usages_print_and_leave_what_qemu_img_does() {
    run_table_on(guides_fixture, GUIDES_CONVERT_RESIZE);
}

#[test]
fn tutorial_snapshot_chain_and_maintenance_usages_print_and_leave_what_qemu_img_does() {
    run_table_on(guides_fixture, GUIDES_CHAINS);
}
