//! QEMU image-lock interop, against the real qemu-img and qemu-io (QEMU 10).
//!
//! QEMU's lock bytes as seen in /proc/locks with QEMU 10 (these tests rely on them):
//! - `qemu-io -f raw IMG` (read-write) locks 100-101 only: the raw driver passes its
//!   user's sharing through, and qemu-io shares everything.
//! - `qemu-io -f qcow2 IMG` locks 100, 101, 103, 201, 203: a format driver never lets
//!   others write or resize the file under its metadata.
//! - `qemu-io -r -f qcow2 IMG` locks 100, 201, 203; `qemu-io -r -f raw IMG` only 100.
//! - `qemu-img info -f raw` therefore opens an image another process writes, while
//!   `qemu-img info -f qcow2` fails with `Failed to get shared "write" lock`.
//!
//! These tests fail (they do not skip) when qemu-img or qemu-io is missing.

use std::io::Write;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};
use strata_storage::{lock, Error, FileStorage, OpenOptions};

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} (QEMU 10) must be installed (scripts/install-deps.sh): {e}")
    })
}

fn require_qemu_10() {
    let out = run("qemu-img", &["--version"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let major: u32 = text
        .strip_prefix("qemu-img version ")
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("cannot read qemu-img's version from {text:?}"));
    assert!(major >= 10, "QEMU 10 or newer needed, found {text}");
    run("qemu-io", &["--version"]);
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A raw image of 1 MiB.
fn raw_image(dir: &Path) -> String {
    let p = dir.join("disk.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    p.to_str().unwrap().to_owned()
}

/// A qcow2 image of 1 MiB, made by qemu-img.
fn qcow2_image(dir: &Path) -> String {
    let p = dir.join("disk.qcow2");
    let p = p.to_str().unwrap().to_owned();
    let out = run("qemu-img", &["create", "-q", "-f", "qcow2", &p, "1M"]);
    assert!(out.status.success(), "qemu-img create: {}", stderr(&out));
    p
}

fn assert_locked(r: strata_storage::Result<FileStorage>, what: &str) {
    match r {
        Err(Error::Locked { .. }) => {}
        Err(e) => panic!("{what}: expected a lock conflict, got error {e}"),
        Ok(_) => panic!("{what}: expected a lock conflict, but the open succeeded"),
    }
}

fn assert_lock_failure(out: &Output, what: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "{what} should have failed");
    assert!(
        err.contains("Failed to get") && err.contains("lock"),
        "{what} failed, but not with a lock error: {err}"
    );
}

/// A running qemu-io holding an image open until it is told to quit.
struct QemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl QemuIo {
    /// Start `qemu-io <args> IMG` and wait (up to 5 s) until its locks show up, as
    /// `locked` reports them.
    fn start(args: &[&str], img: &str, locked: impl Fn(&str) -> bool) -> QemuIo {
        let mut child = Command::new("qemu-io")
            .args(args)
            .arg(img)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-io (QEMU 10) must be installed (scripts/install-deps.sh)");
        let stdin = child.stdin.take();
        let mut q = QemuIo { child, stdin };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !locked(img) {
            if let Some(status) = q.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = q.child.stderr.take() {
                    std::io::Read::read_to_string(&mut e, &mut err).ok();
                }
                panic!("qemu-io {args:?} {img} exited early ({status}): {err}");
            }
            assert!(
                Instant::now() < deadline,
                "qemu-io {args:?} {img} did not lock the image within 5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }

    /// Tell qemu-io to quit and wait for it; its locks are gone afterwards.
    fn quit(mut self) {
        let mut stdin = self.stdin.take().expect("stdin");
        stdin.write_all(b"quit\n").ok();
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "qemu-io exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "qemu-io did not quit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        // After a failed assertion: do not leave our qemu-io behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

fn write_held(img: &str) -> bool {
    lock::probe(Path::new(img)).unwrap().write_held
}

fn write_unshared(img: &str) -> bool {
    lock::probe(Path::new(img)).unwrap().write_unshared
}

#[test]
fn qemu_img_respects_a_strata_writer() {
    require_qemu_10();
    let dir = tempfile::tempdir().unwrap();
    for (img, fmt) in [
        (raw_image(dir.path()), "raw"),
        (qcow2_image(dir.path()), "qcow2"),
    ] {
        let w = FileStorage::open(&img, OpenOptions::write()).unwrap();
        let probe = lock::probe(Path::new(&img)).unwrap();
        assert!(probe.write_held && probe.write_unshared, "{probe:?}");

        // A QEMU writer is refused, whatever the format.
        let out = run("qemu-io", &["-f", fmt, "-c", "write 0 512", &img]);
        assert_lock_failure(&out, &format!("qemu-io -f {fmt} write"));
        // qemu-img check opens its image as a reader through the format driver.
        if fmt == "qcow2" {
            // qcow2 never shares writing of its file: info and check are refused.
            let out = run("qemu-img", &["info", "-f", "qcow2", &img]);
            assert_lock_failure(&out, "qemu-img info -f qcow2");
            assert!(
                stderr(&out).contains("Failed to get shared \"write\" lock"),
                "{}",
                stderr(&out)
            );
            let out = run("qemu-img", &["check", "-f", "qcow2", &img]);
            assert_lock_failure(&out, "qemu-img check -f qcow2");
        } else {
            // raw passes qemu-img's sharing through: info opens a raw image in use.
            let out = run("qemu-img", &["info", "-f", "raw", &img]);
            assert!(
                out.status.success(),
                "qemu-img info -f raw under a writer: {}",
                stderr(&out)
            );
        }
        // -U always works.
        let out = run("qemu-img", &["info", "-U", "-f", fmt, &img]);
        assert!(out.status.success(), "qemu-img info -U: {}", stderr(&out));
        let out = run(
            "qemu-io",
            &["-U", "-r", "-f", fmt, "-c", "read 0 512", &img],
        );
        assert!(out.status.success(), "qemu-io -U -r: {}", stderr(&out));

        drop(w);
        assert!(!write_held(&img));
        let out = run("qemu-io", &["-f", fmt, "-c", "write 0 512", &img]);
        assert!(
            out.status.success(),
            "qemu-io write after strata closed: {}",
            stderr(&out)
        );
        let out = run("qemu-img", &["info", "-f", fmt, &img]);
        assert!(out.status.success(), "qemu-img info: {}", stderr(&out));
    }
}

#[test]
fn strata_respects_a_qemu_io_writer_on_raw() {
    require_qemu_10();
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path());
    let q = QemuIo::start(&["-f", "raw"], &img, write_held);
    // raw: QEMU holds write but shares it.
    assert!(!write_unshared(&img));

    assert_locked(
        FileStorage::open(&img, OpenOptions::write()),
        "strata writer under qemu-io",
    );
    assert_locked(
        FileStorage::open(&img, OpenOptions::read()),
        "strata reader (refusing to share write) under qemu-io",
    );
    let r = FileStorage::open(&img, OpenOptions::read().force_share(true))
        .expect("force-share open under qemu-io");
    drop(r);
    // The failed opens left nothing behind that would bother QEMU.
    assert!(!write_unshared(&img));

    q.quit();
    assert!(!write_held(&img));
    let w = FileStorage::open(&img, OpenOptions::write()).expect("strata writer after qemu-io");
    drop(w);
    FileStorage::open(&img, OpenOptions::read()).expect("strata reader after qemu-io");
}

#[test]
fn strata_respects_a_qemu_io_writer_on_qcow2() {
    require_qemu_10();
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2_image(dir.path());
    let q = QemuIo::start(&["-f", "qcow2"], &img, |p| {
        write_held(p) && write_unshared(p)
    });
    assert_locked(
        FileStorage::open(&img, OpenOptions::write()),
        "strata writer under qemu-io -f qcow2",
    );
    assert_locked(
        FileStorage::open(&img, OpenOptions::read()),
        "strata reader under qemu-io -f qcow2",
    );
    FileStorage::open(&img, OpenOptions::read().force_share(true))
        .expect("force-share open under qemu-io -f qcow2");
    q.quit();
    FileStorage::open(&img, OpenOptions::write()).expect("strata writer after qemu-io");
}

#[test]
fn qemu_readers_and_strata_writers() {
    require_qemu_10();
    let dir = tempfile::tempdir().unwrap();

    // A read-only qemu-io on raw shares everything: strata may write.
    let img = raw_image(dir.path());
    let q = QemuIo::start(&["-r", "-f", "raw"], &img, |p| {
        // Only byte 100 (consistent read) is taken; a strata writer would see it
        // only as "someone reads", so wait by testing that a reader's lock exists.
        let f = std::fs::File::open(p).unwrap();
        holds_byte(&f, 100)
    });
    let w = FileStorage::open(&img, OpenOptions::write()).expect("strata writer beside qemu-io -r");
    drop(w);
    q.quit();

    // A read-only qemu-io on qcow2 refuses to share writing: strata may only read.
    let img = qcow2_image(dir.path());
    let q = QemuIo::start(&["-r", "-f", "qcow2"], &img, write_unshared);
    assert!(!write_held(&img));
    assert_locked(
        FileStorage::open(&img, OpenOptions::write()),
        "strata writer beside qemu-io -r -f qcow2",
    );
    let r = FileStorage::open(&img, OpenOptions::read()).expect("strata reader beside a reader");
    drop(r);
    q.quit();
    FileStorage::open(&img, OpenOptions::write()).expect("strata writer after qemu-io -r");
}

/// Whether some other open file description holds a lock on `byte`.
fn holds_byte(f: &std::fs::File, byte: i64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock is plain integer data, for which all-zero bytes are valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: the descriptor is open for as long as `f` is borrowed, and F_OFD_GETLK
    // reads and writes only the flock struct we pass.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(r, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    fl.l_type != libc::F_UNLCK as libc::c_short
}

#[test]
fn strata_writers_exclude_each_other_and_readers_share() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();

    let w = FileStorage::open(&img, OpenOptions::write()).unwrap();
    assert_locked(
        FileStorage::open(&img, OpenOptions::write()),
        "second strata writer",
    );
    assert_locked(
        FileStorage::open(&img, OpenOptions::read()),
        "strata reader beside a writer",
    );
    FileStorage::open(&img, OpenOptions::read().force_share(true))
        .expect("force-share beside a writer");
    drop(w);

    let r1 = FileStorage::open(&img, OpenOptions::read()).unwrap();
    let r2 = FileStorage::open(&img, OpenOptions::read()).expect("two readers share");
    assert_locked(
        FileStorage::open(&img, OpenOptions::write()),
        "strata writer beside readers",
    );
    drop(r1);
    assert_locked(
        FileStorage::open(&img, OpenOptions::write()),
        "strata writer beside one reader",
    );
    drop(r2);
    let w = FileStorage::open(&img, OpenOptions::write()).expect("writer once readers left");
    // A failed open must not leave locks behind: after the conflicts above, the
    // only holder is `w`, and closing it frees the image.
    drop(w);
    let p = lock::probe(&img).unwrap();
    assert!(!p.write_held && !p.write_unshared, "{p:?}");
    FileStorage::create(&img).expect("create after everyone left");
}

#[test]
fn force_share_is_refused_for_writing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.raw");
    std::fs::write(&p, [0u8; 512]).unwrap();
    let e = strata_storage::FileStorage::open(
        &p,
        strata_storage::OpenOptions::write().force_share(true),
    )
    .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
}
