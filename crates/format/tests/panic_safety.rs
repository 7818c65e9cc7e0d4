//! A panic in the middle of an update never reaches the image file: the metadata
//! lock is poisoned, the image refuses further use with an error of its own kind,
//! and neither `close` nor `Drop` writes anything, so the file keeps what its last
//! completed flush left - the image before the update, which `qemu-img check`
//! finds clean and qemu-io reads unchanged. The same holds when a panic unwinds
//! through the owner of an image with unflushed changes.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use strata_format::qcow2::{Qcow2Image, Qcow2OpenOptions};
use strata_format::BlockDevice;
use strata_storage::{FileStorage, OpenOptions, Result, Storage};

/// A file whose next write or flush panics once armed, and which counts the
/// writes and flushes that come after that panic.
struct PanicStorage {
    inner: FileStorage,
    armed: AtomicBool,
    fired: AtomicBool,
    after: AtomicU64,
}

impl PanicStorage {
    fn change(&self) {
        if self.fired.load(Ordering::SeqCst) {
            self.after.fetch_add(1, Ordering::SeqCst);
        } else if self.armed.swap(false, Ordering::SeqCst) {
            self.fired.store(true, Ordering::SeqCst);
            panic!("injected panic in the middle of an update");
        }
    }
}

impl Storage for PanicStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.change();
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.change();
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.change();
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.change();
        self.inner.flush()
    }
    fn size(&self) -> Result<u64> {
        self.inner.size()
    }
    fn set_size(&self, size: u64) -> Result<()> {
        self.change();
        self.inner.set_size(size)
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
}

fn tool(dir: &Path, prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && !out.contains("Pattern verification failed"),
        "{prog} {args:?}: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// A qcow2 image whose first 64 KiB hold 0x11 (written and flushed by qemu-io),
/// opened by strata over a [`PanicStorage`].
fn image(dir: &Path) -> (Arc<PanicStorage>, Qcow2Image) {
    tool(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "d.qcow2", "4M"],
    );
    tool(
        dir,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 64k", "d.qcow2"],
    );
    let storage = Arc::new(PanicStorage {
        inner: FileStorage::open(dir.join("d.qcow2"), OpenOptions::write()).unwrap(),
        armed: AtomicBool::new(false),
        fired: AtomicBool::new(false),
        after: AtomicU64::new(0),
    });
    let s: Arc<dyn Storage> = storage.clone();
    let img = Qcow2Image::open(s, Qcow2OpenOptions::default()).unwrap();
    (storage, img)
}

/// The file is the image before the update: clean, the old data, not the new.
fn assert_pre_update(dir: &Path) {
    tool(dir, "qemu-img", &["check", "d.qcow2"]);
    tool(
        dir,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x11 0 64k",
            "-c",
            "read -P 0 64k 64k",
            "d.qcow2",
        ],
    );
}

#[test]
fn a_panic_while_metadata_is_written_poisons_the_image_and_nothing_more_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (storage, img) = image(dir.path());
    // A new cluster: its data goes out at once, its mapping waits for the flush.
    img.write(&[0x22; 65536], 65536).unwrap();
    storage.armed.store(true, Ordering::SeqCst);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| img.flush()));
    assert!(
        caught.is_err(),
        "the flush did not reach the injected panic"
    );
    assert!(storage.fired.load(Ordering::SeqCst));
    // The image refuses further use, with the poisoned kind, and writes nothing.
    let poisoned = |e: strata_format::Error| {
        matches!(e.storage_error(), Some(strata_storage::Error::Poisoned(_)))
    };
    assert!(poisoned(img.write(&[0x33; 512], 0).unwrap_err()));
    assert!(poisoned(img.flush().unwrap_err()));
    assert!(poisoned(img.close().unwrap_err()));
    drop(img);
    assert_eq!(
        storage.after.load(Ordering::SeqCst),
        0,
        "written after the panic"
    );
    drop(storage); // releases the file and its locks
    assert_pre_update(dir.path());
}

#[test]
fn a_panic_unwinding_through_the_owner_of_an_image_flushes_nothing_from_drop() {
    let dir = tempfile::tempdir().unwrap();
    let (storage, img) = image(dir.path());
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        img.write(&[0x22; 65536], 65536).unwrap();
        // Fail before the update is flushed; `img` drops while this unwinds.
        storage.fired.store(true, Ordering::SeqCst);
        let _owned = img;
        panic!("the caller fails in the middle of its update");
    }));
    assert!(caught.is_err());
    assert_pre_update(dir.path());
}
