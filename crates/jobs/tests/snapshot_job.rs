//! The snapshot jobs' one set of rules, on images qemu-img made and checks:
//! unique names where the request asks for them, unknown snapshots refused before
//! anything is written, a snapshot holds the writes completed before it, a raw
//! image has none, and requests are plain JSON.

mod common;

use common::{qemu, serial};
use std::path::Path;
use strata_format::{BlockDevice, Format};
use strata_jobs::snapshot::{self, ApplyRequest, CreateRequest, DeleteRequest, NameRule};
use strata_jobs::Error;

fn qemu_img(dir: &Path, args: &[&str]) -> String {
    qemu(dir, "qemu-img", args)
}

fn qcow2(dir: &Path) -> std::path::PathBuf {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "d.qcow2", "4M"]);
    qemu_img(dir, &["snapshot", "-c", "taken", "d.qcow2"]);
    dir.join("d.qcow2")
}

fn open(path: &Path, format: Format) -> std::sync::Arc<dyn BlockDevice> {
    strata_chain::open_image(path, format, true, false).unwrap()
}

fn create(name: &str, names: NameRule) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        names,
    }
}

#[test]
fn unique_names_refuse_a_taken_or_empty_name_and_write_nothing() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = qcow2(dir.path());
    let before = std::fs::read(&path).unwrap();
    let dev = open(&path, Format::Qcow2);
    let taken = snapshot::create(dev.as_ref(), &create("taken", NameRule::Unique));
    assert!(
        matches!(&taken, Err(Error::SnapshotNameTaken(n)) if n == "taken"),
        "{taken:?}"
    );
    let empty = snapshot::create(dev.as_ref(), &create("", NameRule::Unique));
    assert!(matches!(empty, Err(Error::SnapshotNameEmpty)), "{empty:?}");
    drop(dev);
    assert!(std::fs::read(&path).unwrap() == before, "the image changed");
}

#[test]
fn apply_and_delete_refuse_an_unknown_snapshot_before_writing() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = qcow2(dir.path());
    let before = std::fs::read(&path).unwrap();
    let dev = open(&path, Format::Qcow2);
    let key = "nosuch".to_string();
    let applied = snapshot::apply(
        dev.as_ref(),
        &ApplyRequest {
            snapshot: key.clone(),
        },
    );
    assert!(
        matches!(&applied, Err(Error::SnapshotNotFound(k)) if *k == key),
        "{applied:?}"
    );
    let deleted = snapshot::delete(
        dev.as_ref(),
        &DeleteRequest {
            snapshot: key.clone(),
        },
    );
    assert!(
        matches!(&deleted, Err(Error::SnapshotNotFound(k)) if *k == key),
        "{deleted:?}"
    );
    drop(dev);
    assert!(std::fs::read(&path).unwrap() == before, "the image changed");
}

#[test]
fn a_snapshot_holds_the_writes_before_it_and_apply_brings_them_back() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = qcow2(dir.path());
    let dev = open(&path, Format::Qcow2);
    dev.write(&[0xa5; 65536], 65536).unwrap();
    let made = snapshot::create(dev.as_ref(), &create("s", NameRule::Unique)).unwrap();
    assert_eq!(
        (made.id.as_str(), made.name.as_str(), made.icount),
        ("2", "s", Some(0))
    );
    dev.write(&[0x5a; 65536], 65536).unwrap();
    snapshot::apply(
        dev.as_ref(),
        &ApplyRequest {
            snapshot: "s".into(),
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 65536];
    dev.read(&mut buf, 65536).unwrap();
    assert!(buf.iter().all(|&b| b == 0xa5));
    let gone = snapshot::delete(
        dev.as_ref(),
        &DeleteRequest {
            snapshot: "1".into(),
        },
    )
    .unwrap();
    assert_eq!(gone.name, "taken");
    dev.close().unwrap();
    drop(dev);
    qemu_img(dir.path(), &["check", "d.qcow2"]);
    let out = qemu(
        dir.path(),
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0xa5 64k 64k", "d.qcow2"],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let listed = qemu_img(dir.path(), &["snapshot", "-l", "d.qcow2"]);
    assert_eq!(listed.lines().count(), 3, "{listed}");
    assert!(
        listed.lines().nth(2).unwrap().starts_with("2       s "),
        "{listed}"
    );
}

#[test]
fn a_raw_image_has_no_internal_snapshots() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    qemu_img(dir.path(), &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    let dev = open(&dir.path().join("r.raw"), Format::Raw);
    assert!(snapshot::list(dev.as_ref()).is_empty());
    let no = |r: Result<(), Error>| matches!(r, Err(Error::NoInternalSnapshots { format: "raw" }));
    assert!(no(snapshot::create(
        dev.as_ref(),
        &create("s", NameRule::Any)
    )
    .map(|_| ())));
    assert!(no(snapshot::apply(
        dev.as_ref(),
        &ApplyRequest {
            snapshot: "s".into()
        }
    )));
    assert!(no(snapshot::delete(
        dev.as_ref(),
        &DeleteRequest {
            snapshot: "s".into()
        }
    )
    .map(|_| ())));
}

#[test]
fn requests_are_plain_json_and_names_default_to_unique() {
    let req: CreateRequest = serde_json::from_str(r#"{"name":"nightly"}"#).unwrap();
    assert_eq!(req, create("nightly", NameRule::Unique));
    let req: CreateRequest = serde_json::from_str(r#"{"name":"","names":"any"}"#).unwrap();
    assert_eq!(req.names, NameRule::Any);
    let commit: strata_jobs::commit::CommitRequest =
        serde_json::from_str(r#"{"image":"top.qcow2","format":"qcow2","base":"base.qcow2"}"#)
            .unwrap();
    assert_eq!(commit.format, Some(Format::Qcow2));
    assert!(!commit.keep_top);
    let back: strata_jobs::commit::CommitRequest =
        serde_json::from_str(&serde_json::to_string(&commit).unwrap()).unwrap();
    assert_eq!(back, commit);
    let bad = serde_json::from_str::<strata_jobs::commit::CommitRequest>(
        r#"{"image":"t","format":"bogus"}"#,
    );
    assert!(bad.is_err());
}
