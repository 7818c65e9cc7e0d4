//! `amend` and the bitmap store survive a crash at every write and flush: for each cut, with the
//! unflushed writes lost in the picks the crash sweep uses (none, all, the
//! newest, seeded random subsets, a torn write), the image left behind passes
//! `qemu-img check` as it lies (clean or leaks only), and `qemu-img compare`
//! finds the guest view unchanged, as is each snapshot's view read by strata.
//! Covered: downgrade to v2 (zero clusters with and without a host cluster, a
//! snapshot, a backing file), upgrade to v3, and refcount width changes up and
//! down; and a new set of persistent bitmaps (added, removed, merged), which
//! after any cut is the old set or the new one, as strata reads them, and which
//! `qemu-img check` counts without errors. The tests print the number of cut
//! points and images checked.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use strata_format::qcow2::amend::AmendOptions;
use strata_format::qcow2::bitmap_edit::Bitmap;
use strata_format::qcow2::{Qcow2Image, Qcow2OpenOptions};
use strata_format::BlockDevice;
use strata_storage::{picks_for, CrashClock, CrashStorage, MemStorage, Storage};

fn tool(dir: &Path, prog: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn must(dir: &Path, prog: &str, args: &[&str]) {
    let (code, text) = tool(dir, prog, args);
    assert_eq!(code, 0, "{prog} {args:?}: {text}");
}

/// Build `name` in `dir` with qemu-img/qemu-io: `create` options, then qemu-io
/// commands, a snapshot `s1` when asked, then more commands.
fn build(dir: &Path, name: &str, create: &[&str], before: &[&str], after: Option<&[&str]>) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    a.extend_from_slice(create);
    a.extend_from_slice(&[name, "4M"]);
    must(dir, "qemu-img", &a);
    let io = |cmds: &[&str]| {
        let mut a = vec![];
        for c in cmds {
            a.extend_from_slice(&["-c", c]);
        }
        a.push(name);
        must(dir, "qemu-io", &a);
    };
    io(before);
    if let Some(after) = after {
        must(dir, "qemu-img", &["snapshot", "-c", "s1", name]);
        io(after);
    }
}

/// Every snapshot's guest view, as strata reads it.
fn snapshot_views(bytes: &[u8]) -> strata_format::Result<Vec<Vec<u8>>> {
    let img = Qcow2Image::open(
        Arc::new(MemStorage::from_vec(bytes.to_vec())),
        Qcow2OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    img.snapshots()
        .iter()
        .map(|s| {
            let v = img.snapshot_view(&s.name)?;
            let mut buf = vec![0u8; v.virtual_size() as usize];
            v.read(&mut buf, 0)?;
            Ok(buf)
        })
        .collect()
}

fn amend(s: Arc<dyn Storage>, o: &AmendOptions) {
    if let Ok(img) = Qcow2Image::open(s, Qcow2OpenOptions::default()) {
        let _ = img.amend(o, &mut |_, _, _| {});
    }
}

/// The image's persistent bitmaps as strata reads them (`None` if it cannot).
fn bitmaps_of(bytes: &[u8]) -> Option<Vec<Bitmap>> {
    let img = Qcow2Image::open(
        Arc::new(MemStorage::from_vec(bytes.to_vec())),
        Qcow2OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .ok()?;
    img.read_bitmaps().ok()
}

/// Cut `op` on `name` at every point; returns (cut points, images checked).
/// With `sets`, the bitmaps after each cut must be one of them.
fn sweep(
    dir: &Path,
    name: &str,
    what_op: &str,
    op: &dyn Fn(Arc<dyn Storage>),
    sets: Option<&[Vec<Bitmap>]>,
    failures: &mut Vec<String>,
) -> (u64, u64) {
    let base = std::fs::read(dir.join(name)).unwrap();
    let views = snapshot_views(&base).expect("the base image opens");
    let uncut = Arc::new(CrashStorage::new(base.clone(), CrashClock::new(None)));
    op(uncut.clone());
    let total = uncut.clock().ops();
    let done = uncut.after_crash(strata_storage::CrashPick::None);
    assert_ne!(
        done, base,
        "{name} {what_op}: the uncut run changes the image"
    );
    let (mut cuts, mut images) = (0, 0);
    let mut seen = std::collections::HashSet::new();
    for k in 0..total {
        let store = Arc::new(CrashStorage::new(base.clone(), CrashClock::new(Some(k))));
        op(store.clone());
        cuts += 1;
        for pick in picks_for(&[&store], 1, 1) {
            let bytes = store.after_crash(pick);
            if !seen.insert(bytes.clone()) {
                continue;
            }
            images += 1;
            let what = format!("{name} {what_op} crash at {k}/{total} ({pick:?})");
            std::fs::write(dir.join("cut.qcow2"), &bytes).unwrap();
            let (code, text) = tool(dir, "qemu-img", &["check", "cut.qcow2"]);
            if code != 0 && code != 3 {
                failures.push(format!("{what}: check {code}\n{text}"));
            }
            let (code, text) = tool(dir, "qemu-img", &["compare", "-U", name, "cut.qcow2"]);
            if code != 0 {
                failures.push(format!("{what}: compare {code}\n{text}"));
            }
            match snapshot_views(&bytes) {
                Ok(v) if v == views => {}
                Ok(_) => failures.push(format!("{what}: a snapshot's view changed")),
                Err(e) => failures.push(format!("{what}: strata cannot open it: {e}")),
            }
            if let Some(sets) = sets {
                let got = bitmaps_of(&bytes);
                if !got.as_ref().is_some_and(|g| sets.contains(g)) {
                    failures.push(format!("{what}: bitmaps neither old nor new: {got:?}"));
                }
            }
        }
    }
    (cuts, images)
}

#[test]
fn amend_cut_at_any_write_leaves_a_consistent_image_with_the_same_guest_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    build(d, "base.qcow2", &[], &["write -P 7 0 4M"], None);
    // Zero clusters with and without host clusters, shared with a snapshot, over
    // a backing file (a plain zero cluster then needs a cluster of zeroes).
    build(
        d,
        "zeros.qcow2",
        &["-b", "base.qcow2", "-F", "qcow2"],
        &["write -P 1 0 256k", "write -z 64k 64k", "write -z 1M 128k"],
        Some(&["write -z 2M 64k", "write -P 2 3M 64k"]),
    );
    build(
        d,
        "v2.qcow2",
        &["-o", "compat=0.10,cluster_size=4k"],
        &["write -P 1 0 256k"],
        Some(&["write -P 2 0 8k"]),
    );
    build(
        d,
        "small.qcow2",
        &["-o", "cluster_size=4k"],
        &["write -P 3 0 1M", "write -P 4 2M 512k"],
        None,
    );
    let cases = [
        (
            "zeros.qcow2",
            AmendOptions {
                version: Some(2),
                ..Default::default()
            },
        ),
        (
            "v2.qcow2",
            AmendOptions {
                version: Some(3),
                ..Default::default()
            },
        ),
        (
            "v2.qcow2",
            AmendOptions {
                version: Some(3),
                refcount_bits: Some(8),
                ..Default::default()
            },
        ),
        (
            "small.qcow2",
            AmendOptions {
                refcount_bits: Some(64),
                ..Default::default()
            },
        ),
        (
            "small.qcow2",
            AmendOptions {
                refcount_bits: Some(1),
                ..Default::default()
            },
        ),
        (
            "small.qcow2",
            AmendOptions {
                lazy_refcounts: Some(true),
                ..Default::default()
            },
        ),
    ];
    let mut failures = Vec::new();
    let (mut cuts, mut images) = (0, 0);
    for (name, o) in &cases {
        let (c, i) = sweep(
            d,
            name,
            &format!("{o:?}"),
            &|s| amend(s, o),
            None,
            &mut failures,
        );
        cuts += c;
        images += i;
    }
    eprintln!("amend crash sweep: {cuts} cut points, {images} distinct images checked");
    assert!(
        failures.is_empty(),
        "{} bad images; the first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
    assert!(cuts > 50, "only {cuts} cut points");
}

#[test]
fn a_bitmap_store_cut_at_any_write_leaves_the_old_bitmaps_or_the_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    build(d, "bm.qcow2", &["-o", "cluster_size=4k"], &[], None);
    for args in [
        &["bitmap", "--add", "bm.qcow2", "a"][..],
        &["bitmap", "--add", "-g", "512", "bm.qcow2", "b"],
    ] {
        must(d, "qemu-img", args);
    }
    must(
        d,
        "qemu-io",
        &["-c", "write 0 100k", "-c", "write 3M 8k", "bm.qcow2"],
    );
    let old = bitmaps_of(&std::fs::read(d.join("bm.qcow2")).unwrap()).unwrap();
    assert!(
        old.iter().all(|b| b.bits.iter().any(|&x| x != 0)),
        "{old:?}"
    );
    // Remove `a`, add `c` and merge `b` into it.
    let mut new: Vec<Bitmap> = old.iter().filter(|b| b.name != "a").cloned().collect();
    let mut c = Bitmap::new("c", 16, true, 4 << 20);
    c.merge_from(&new[0]);
    new.push(c);
    let store = |s: Arc<dyn Storage>| {
        if let Ok(img) = Qcow2Image::open(s, Qcow2OpenOptions::default()) {
            let _ = img.store_bitmaps(&new);
        }
    };
    let mut failures = Vec::new();
    let sets = [old.clone(), new.clone()];
    let (cuts, images) = sweep(d, "bm.qcow2", "store", &store, Some(&sets), &mut failures);
    eprintln!("bitmap store crash sweep: {cuts} cut points, {images} distinct images checked");
    assert!(
        failures.is_empty(),
        "{} bad images; the first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
    assert!(cuts > 10, "only {cuts} cut points");
}

/// The passwords of the key-slot sweep, by secret id.
const PASSWORDS: [(&str, &[u8]); 3] = [("s0", b"zero"), ("s1", b"one"), ("s2", b"two")];

fn luks_open(storage: Arc<dyn Storage>, pw: &[u8]) -> strata_format::Result<Qcow2Image> {
    Qcow2Image::open(
        storage,
        Qcow2OpenOptions {
            unlock: strata_format::qcow2::Unlock::Secret(pw.into()),
            ..Default::default()
        },
    )
}

/// The ids of the passwords that open `bytes`; `None` when a slot the header
/// calls active opens with none of them (a key that looks present but is
/// gone), or the image does not open at all.
fn key_set(bytes: &[u8]) -> Option<Vec<&'static str>> {
    use strata_format::crypto::luks::NUM_KEY_SLOTS;
    use strata_format::qcow2::EncryptionInfo;
    let img = Qcow2Image::open(
        Arc::new(MemStorage::from_vec(bytes.to_vec())),
        Qcow2OpenOptions {
            read_only: true,
            metadata_only: true,
            ..Default::default()
        },
    )
    .ok()?;
    let Some(EncryptionInfo::Luks(h)) = img.encryption() else {
        return None;
    };
    let area = img.header().crypto?.offset;
    let mut read = |off: u64, buf: &mut [u8]| {
        let at = (area + off) as usize;
        buf.copy_from_slice(&bytes[at..at + buf.len()]);
        Ok(())
    };
    let mut set = Vec::new();
    for i in 0..NUM_KEY_SLOTS {
        let mut opens = false;
        for (id, pw) in PASSWORDS {
            if h.load_key(i, pw, &mut read).ok()?.is_some() {
                opens = true;
                if !set.contains(&id) {
                    set.push(id);
                }
                // One slot holds one password.
                break;
            }
        }
        if h.slots[i].active && !opens {
            return None;
        }
    }
    set.sort();
    Some(set)
}

/// The guest data of the LUKS image `bytes`, read by strata with `pw`.
fn luks_data(bytes: &[u8], pw: &[u8]) -> Option<Vec<u8>> {
    let img = luks_open(Arc::new(MemStorage::from_vec(bytes.to_vec())), pw).ok()?;
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read(&mut buf, 0).ok()?;
    Some(buf)
}

#[test]
fn a_key_slot_change_cut_at_any_write_leaves_the_old_keys_or_the_new_ones() {
    use strata_format::crypto::keyslots::{KeySlotRequest, SlotState};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // s0 in slot 0, s1 in slots 1 and 7 (descriptors in both header sectors).
    must(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=zero",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            "k.qcow2",
            "1M",
        ],
    );
    let objs = [
        "--object",
        "secret,id=s0,data=zero",
        "--object",
        "secret,id=s1,data=one",
    ];
    let name = "driver=qcow2,file.filename=k.qcow2,encrypt.key-secret=s0";
    must(
        d,
        "qemu-io",
        &[&objs[..], &["--image-opts", name, "-c", "write -P 5 0 1M"]].concat(),
    );
    for slot in ["1", "7"] {
        let o = format!("encrypt.state=active,encrypt.new-secret=s1,encrypt.iter-time=10,encrypt.keyslot={slot}");
        must(
            d,
            "qemu-img",
            &[&["amend"], &objs[..], &["-o", &o, "--image-opts", name]].concat(),
        );
    }
    let base = std::fs::read(d.join("k.qcow2")).unwrap();
    let data = luks_data(&base, b"zero").expect("the image opens");
    assert_eq!(key_set(&base), Some(vec!["s0", "s1"]));
    let req = |state, new: Option<&str>, old: Option<&str>, keyslot| KeySlotRequest {
        state,
        new_secret: new.map(str::to_string),
        old_secret: old.map(str::to_string),
        keyslot,
        iter_time: (state == SlotState::Active).then_some(1),
    };
    let cases = [
        (
            req(SlotState::Active, Some("s2"), None, None),
            vec!["s0", "s1", "s2"],
        ),
        (
            req(SlotState::Active, Some("s2"), None, Some(6)),
            vec!["s0", "s1", "s2"],
        ),
        (req(SlotState::Inactive, None, Some("s1"), None), vec!["s0"]),
        (req(SlotState::Inactive, None, None, Some(0)), vec!["s1"]),
    ];
    let secret = |id: &str| {
        PASSWORDS
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, p)| p.to_vec())
            .ok_or_else(|| {
                strata_format::Error::invalid_argument(format!("No secret with id '{id}'"))
            })
    };
    let run = |s: Arc<dyn Storage>, r: &KeySlotRequest| {
        if let Ok(mut img) = luks_open(s, b"zero") {
            let _ = img.change_key_slots(r, b"zero", &secret, false);
        }
    };
    let (mut cuts, mut images, mut failures) = (0, 0, Vec::new());
    for (r, new_set) in &cases {
        let uncut = Arc::new(CrashStorage::new(base.clone(), CrashClock::new(None)));
        run(uncut.clone(), r);
        let total = uncut.clock().ops();
        let done = uncut.after_crash(strata_storage::CrashPick::None);
        assert_eq!(key_set(&done).as_ref(), Some(new_set), "{r:?} uncut");
        let mut seen = std::collections::HashSet::new();
        for k in 0..total {
            let store = Arc::new(CrashStorage::new(base.clone(), CrashClock::new(Some(k))));
            run(store.clone(), r);
            cuts += 1;
            for pick in picks_for(&[&store], 2, 2) {
                let bytes = store.after_crash(pick);
                if !seen.insert(bytes.clone()) {
                    continue;
                }
                images += 1;
                let what = format!("{r:?} crash at {k}/{total} ({pick:?})");
                let set = key_set(&bytes);
                let old_set = vec!["s0", "s1"];
                if set.as_ref() != Some(&old_set) && set.as_ref() != Some(new_set) {
                    failures.push(format!("{what}: keys neither old nor new: {set:?}"));
                    continue;
                }
                let pw = if set.as_ref().unwrap().contains(&"s0") {
                    "zero"
                } else {
                    "one"
                };
                if luks_data(&bytes, pw.as_bytes()).as_ref() != Some(&data) {
                    failures.push(format!("{what}: the guest data changed"));
                }
                // QEMU opens it with a key of the set and finds it consistent.
                std::fs::write(d.join("cut.qcow2"), &bytes).unwrap();
                let id = if pw == "zero" { "s0" } else { "s1" };
                let n = format!("driver=qcow2,file.filename=cut.qcow2,encrypt.key-secret={id}");
                let (code, text) = tool(
                    d,
                    "qemu-img",
                    &[&["check"], &objs[..], &["--image-opts", &n]].concat(),
                );
                if code != 0 && code != 3 {
                    failures.push(format!("{what}: check {code}\n{text}"));
                }
            }
        }
    }
    eprintln!("key slot crash sweep: {cuts} cut points, {images} distinct images checked");
    assert!(
        failures.is_empty(),
        "{} bad images; the first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
    assert!(cuts >= 16, "only {cuts} cut points");
}
