//! Key-slot amends (`amend -o state=active,keyslot=N,new-secret=...` and
//! `state=inactive`) of a plain `luks` image and of a LUKS-encrypted qcow2
//! image, cut at every write and flush, with the unflushed writes lost in the
//! picks the crash sweep uses (none, all, the newest, seeded random subsets, a
//! torn write). After every cut:
//! - the keys that open the image are the old set or the new one, and every
//!   slot the header calls active opens with its password;
//! - so every passphrase valid before the amend still opens the image, unless
//!   the amend (which removes it) is complete;
//! - the guest data reads whole with any key of the set;
//! - an image with a single passphrase never loses it: a second slot for the
//!   same passphrase, added and then the first erased, leaves one of the two.
//!
//! The images are made by qemu-img; the tests print the number of cut points
//! and images checked.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use strata_format::crypto::keyslots::{KeySlotRequest, SlotState};
use strata_format::crypto::luks::{LuksHeader, NUM_KEY_SLOTS};
use strata_format::luks::LuksImage;
use strata_format::qcow2::{EncryptionInfo, Qcow2Image, Qcow2OpenOptions, Unlock};
use strata_format::BlockDevice;
use strata_storage::{picks_for, CrashClock, CrashPick, CrashStorage, MemStorage, Storage};

/// The passwords of the sweep, by secret id.
const PASSWORDS: [(&str, &[u8]); 3] = [("s0", b"zero"), ("s1", b"one"), ("s2", b"two")];

fn must(dir: &Path, prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn secret(id: &str) -> strata_format::Result<Vec<u8>> {
    PASSWORDS
        .iter()
        .find(|(i, _)| *i == id)
        .map(|(_, p)| p.to_vec())
        .ok_or_else(|| strata_format::Error::invalid_argument(format!("No secret with id '{id}'")))
}

/// The two image kinds: how each opens, where its LUKS area lies.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Luks,
    Qcow2,
}

impl Kind {
    /// An image of this kind made by qemu-img in `d`, 1 MiB of guest data
    /// written, key `s0` in slot 0 and, with `s1_slots`, key `s1` in those.
    fn build(self, d: &Path, s1_slots: &[&str]) -> Vec<u8> {
        let objs = [
            "--object",
            "secret,id=s0,data=zero",
            "--object",
            "secret,id=s1,data=one",
        ];
        let (fmt, opts, name, prefix) = match self {
            Kind::Luks => (
                "luks",
                "key-secret=s0,iter-time=10",
                "driver=luks,file.filename=k.img,key-secret=s0",
                "",
            ),
            Kind::Qcow2 => (
                "qcow2",
                "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                "driver=qcow2,file.filename=k.img,encrypt.key-secret=s0",
                "encrypt.",
            ),
        };
        let create = ["create", "-q", "-f", fmt, "-o", opts, "k.img", "1M"];
        must(
            d,
            "qemu-img",
            &[&create[..2], &objs[..2], &create[2..]].concat(),
        );
        let io = ["--image-opts", name, "-c", "write -P 5 0 1M"];
        must(d, "qemu-io", &[&objs[..], &io[..]].concat());
        for slot in s1_slots {
            let o = format!(
                "{prefix}state=active,{prefix}new-secret=s1,{prefix}iter-time=10,{prefix}keyslot={slot}"
            );
            let a = ["amend", "-o", &o, "--image-opts", name];
            must(d, "qemu-img", &[&a[..1], &objs[..], &a[1..]].concat());
        }
        std::fs::read(d.join("k.img")).unwrap()
    }

    /// The header and the LUKS area's offset in the file, read by strata
    /// (`None` if the image does not open for its metadata).
    fn header(self, bytes: &[u8]) -> Option<(LuksHeader, u64)> {
        let s = Arc::new(MemStorage::from_vec(bytes.to_vec()));
        match self {
            Kind::Luks => Some((LuksImage::open(s, &Unlock::None, true).ok()?.header(), 0)),
            Kind::Qcow2 => {
                let opts = Qcow2OpenOptions {
                    read_only: true,
                    metadata_only: true,
                    ..Default::default()
                };
                let img = Qcow2Image::open(s, opts).ok()?;
                let Some(EncryptionInfo::Luks(h)) = img.encryption() else {
                    return None;
                };
                Some((*h, img.header().crypto?.offset))
            }
        }
    }

    /// The image opened for writing with `pw`.
    fn open(self, s: Arc<dyn Storage>, pw: &[u8]) -> strata_format::Result<Opened> {
        let unlock = Unlock::Secret(pw.into());
        Ok(match self {
            Kind::Luks => Opened::Luks(Box::new(LuksImage::open(s, &unlock, false)?)),
            Kind::Qcow2 => Opened::Qcow2(Box::new(Qcow2Image::open(
                s,
                Qcow2OpenOptions {
                    unlock,
                    ..Default::default()
                },
            )?)),
        })
    }

    /// Run `req` on the image in `s`, opened with `pw` (a failure, such as
    /// the cut, leaves what it leaves).
    fn amend(self, s: Arc<dyn Storage>, pw: &[u8], req: &KeySlotRequest) {
        match self.open(s, pw) {
            Ok(Opened::Luks(img)) => {
                let _ = img.change_key_slots(req, pw, &secret, false);
            }
            Ok(Opened::Qcow2(mut img)) => {
                let _ = img.change_key_slots(req, pw, &secret, false);
            }
            Err(_) => {}
        }
    }

    /// The guest data read by strata with `pw`.
    fn data(self, bytes: &[u8], pw: &[u8]) -> Option<Vec<u8>> {
        let dev: Box<dyn BlockDevice> = match self
            .open(Arc::new(MemStorage::from_vec(bytes.to_vec())), pw)
            .ok()?
        {
            Opened::Luks(i) => i,
            Opened::Qcow2(i) => i,
        };
        let mut buf = vec![0u8; usize::try_from(dev.virtual_size()).ok()?];
        dev.read(&mut buf, 0).ok()?;
        Some(buf)
    }

    /// The ids of the passwords that open `bytes`, or `None` when a slot the
    /// header calls active opens with none of them (a key that looks present
    /// but is gone), or the header does not parse.
    fn key_set(self, bytes: &[u8]) -> Option<Vec<&'static str>> {
        let (h, area) = self.header(bytes)?;
        let mut read = |off: u64, buf: &mut [u8]| {
            let at = usize::try_from(area + off).expect("in memory");
            match bytes.get(at..at + buf.len()) {
                Some(b) => buf.copy_from_slice(b),
                None => buf.fill(0),
            }
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
}

enum Opened {
    Luks(Box<LuksImage>),
    Qcow2(Box<Qcow2Image>),
}

fn req(
    state: SlotState,
    new: Option<&str>,
    old: Option<&str>,
    keyslot: Option<i32>,
) -> KeySlotRequest {
    KeySlotRequest {
        state,
        new_secret: new.map(str::to_string),
        old_secret: old.map(str::to_string),
        keyslot,
        iter_time: (state == SlotState::Active).then_some(1),
    }
}

/// Cut each of `steps` (run in turn, each from where the last left the image,
/// opened with `pw`) at every write and flush. `sets[i]` is the key set before
/// step `i` (`sets[steps.len()]` after the last): after a cut in step `i`, the
/// keys must be `sets[i]` or `sets[i + 1]`, every active slot must open, and
/// the data must read whole. Returns (cut points, images checked).
fn sweep(
    kind: Kind,
    base: &[u8],
    pw: &[u8],
    steps: &[KeySlotRequest],
    sets: &[Vec<&'static str>],
    failures: &mut Vec<String>,
) -> (u64, u64) {
    let data = kind.data(base, pw).expect("the image opens");
    assert_eq!(
        kind.key_set(base).as_ref(),
        Some(&sets[0]),
        "{kind:?} before"
    );
    let (mut cuts, mut images) = (0, 0);
    let mut before = base.to_vec();
    for (i, r) in steps.iter().enumerate() {
        let uncut = Arc::new(CrashStorage::new(before.clone(), CrashClock::new(None)));
        kind.amend(uncut.clone(), pw, r);
        let total = uncut.clock().ops();
        let done = uncut.after_crash(CrashPick::None);
        assert_eq!(
            kind.key_set(&done).as_ref(),
            Some(&sets[i + 1]),
            "{kind:?} {r:?} uncut"
        );
        let mut seen = std::collections::HashSet::new();
        for k in 0..total {
            let store = Arc::new(CrashStorage::new(before.clone(), CrashClock::new(Some(k))));
            kind.amend(store.clone(), pw, r);
            cuts += 1;
            for pick in picks_for(&[&store], 2, 2) {
                let bytes = store.after_crash(pick);
                if !seen.insert(bytes.clone()) {
                    continue;
                }
                images += 1;
                let what = format!("{kind:?} {r:?} crash at {k}/{total} ({pick:?})");
                let set = kind.key_set(&bytes);
                let Some(set) = set.filter(|s| *s == sets[i] || *s == sets[i + 1]) else {
                    failures.push(format!("{what}: keys neither old nor new"));
                    continue;
                };
                if set.is_empty() {
                    failures.push(format!("{what}: no key opens the image"));
                    continue;
                }
                for id in &set {
                    let pw = secret(id).unwrap();
                    if kind.data(&bytes, &pw).as_ref() != Some(&data) {
                        failures.push(format!("{what}: the guest data changed for {id}"));
                    }
                }
            }
        }
        before = done;
    }
    (cuts, images)
}

fn run_all(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut cuts, mut images, mut failures) = (0, 0, Vec::new());
    let mut add = |base: &[u8], pw: &[u8], steps: &[KeySlotRequest], sets: &[Vec<&'static str>]| {
        let (c, i) = sweep(kind, base, pw, steps, sets, &mut failures);
        cuts += c;
        images += i;
    };
    use SlotState::{Active, Inactive};
    // One passphrase (s0 in slot 0): a second slot for it, then the first
    // erased by its number; or a new passphrase added, then the old one
    // erased by its value. Some slot opens the image at every cut.
    let single = kind.build(d, &[]);
    add(
        &single,
        b"zero",
        &[
            req(Active, Some("s0"), None, Some(3)),
            req(Inactive, None, None, Some(0)),
        ],
        &[vec!["s0"], vec!["s0"], vec!["s0"]],
    );
    add(
        &single,
        b"zero",
        &[
            req(Active, Some("s1"), None, None),
            req(Inactive, None, Some("s0"), None),
        ],
        &[vec!["s0"], vec!["s0", "s1"], vec!["s1"]],
    );
    // Two passphrases, s1 in slots 1 and 7 (descriptors in both sectors of
    // the header): added to a named slot, erased by passphrase and by number.
    let two = kind.build(d, &["1", "7"]);
    add(
        &two,
        b"zero",
        &[req(Active, Some("s2"), None, Some(6))],
        &[vec!["s0", "s1"], vec!["s0", "s1", "s2"]],
    );
    add(
        &two,
        b"zero",
        &[req(Inactive, None, Some("s1"), None)],
        &[vec!["s0", "s1"], vec!["s0"]],
    );
    add(
        &two,
        b"one",
        &[req(Inactive, None, None, Some(0))],
        &[vec!["s0", "s1"], vec!["s1"]],
    );
    eprintln!("{kind:?} key slot crash sweep: {cuts} cut points, {images} distinct images checked");
    assert!(
        failures.is_empty(),
        "{} bad images; the first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
    assert!(cuts >= 20, "only {cuts} cut points");
}

#[test]
fn a_luks_image_key_slot_amend_cut_at_any_write_keeps_every_valid_passphrase_or_completes() {
    run_all(Kind::Luks);
}

#[test]
fn a_qcow2_luks_key_slot_amend_cut_at_any_write_keeps_every_valid_passphrase_or_completes() {
    run_all(Kind::Qcow2);
}
