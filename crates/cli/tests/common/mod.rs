//! Helpers shared by the command-line tests: run `strata img` or a QEMU tool in a
//! directory, and the parity machinery that runs both tools on the same files and
//! compares stdout, stderr and the exit code. A missing tool fails the test (it is
//! never skipped).
#![allow(dead_code)]

pub mod api;
pub mod damage;
pub mod fiemap;
pub mod garage;
pub mod image_repo;
pub mod luks;
pub mod nbd;
pub mod node;
pub mod opthelp;
pub mod restic;
pub mod rng;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `strata` binary under test.
pub const STRATA: &str = env!("CARGO_BIN_EXE_strata");

/// Run `prog` in `dir`; the program "strata" stands for `strata img`.
pub fn run(dir: &Path, prog: &str, args: &[&str]) -> Output {
    let mut c = if prog == "strata" {
        let mut c = Command::new(STRATA);
        c.arg("img");
        c
    } else {
        Command::new(prog)
    };
    c.args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"))
}

/// Run `prog` in `dir`, require success and return its stdout.
pub fn ok(dir: &Path, prog: &str, args: &[&str]) -> String {
    let o = run(dir, prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run qemu-io commands on `file` (format `fmt`), requiring success.
pub fn io<S: AsRef<str>>(dir: &Path, fmt: &str, file: &str, cmds: &[S]) {
    let mut a = vec!["-f", fmt];
    for c in cmds {
        a.push("-c");
        a.push(c.as_ref());
    }
    a.push(file);
    ok(dir, "qemu-io", &a);
}

/// `out` holds the same guest bytes as `src` and, if qcow2, is consistent.
pub fn verify(dir: &Path, src: &str, out: &str) {
    ok(dir, "qemu-img", &["compare", src, out]);
    if out.ends_with(".qcow2") {
        ok(dir, "qemu-img", &["check", out]);
    }
}

/// Run `prog` with `args` (text or raw bytes) in `dir`; it must succeed.
pub fn sh<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(dir: &Path, prog: &str, args: &[S]) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Create the qcow2 image `name` of `size` with qemu-img, `extra` options
/// before the name.
pub fn qcow2(dir: &Path, name: &str, size: &str, extra: &[&str]) {
    let mut a = vec!["create", "-q", "-f", "qcow2"];
    a.extend_from_slice(extra);
    a.extend_from_slice(&[name, size]);
    sh(dir, "qemu-img", &a);
}

/// qemu-img's `map --output=json` of `f` (and any error), its name read as IMG.
pub fn map_json(dir: &Path, f: &str) -> String {
    let (_, out, err) = outcome(dir, "qemu-img", &["map", "--output=json", f]);
    (out + &err).replace(f, "IMG")
}

/// Output of one run: exit code, stdout, stderr (program name normalised, so the
/// two tools' messages compare equal).
pub fn outcome(dir: &Path, prog: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = run(dir, prog, args);
    let err = String::from_utf8_lossy(&out.stderr)
        .replace("strata img", "qemu-img")
        .replace("qemu-img:", "PROG:");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        err,
    )
}

thread_local! {
    static FAILURES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `args` through both tools and record any difference (all differences of a
/// test are reported together by [`assert_all_same`]).
pub fn same(dir: &Path, args: &[&str]) {
    let ours = outcome(dir, "strata", args);
    let theirs = outcome(dir, "qemu-img", args);
    if ours != theirs {
        FAILURES.with(|f| {
            f.borrow_mut().push(format!(
                "`img {}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}",
                args.join(" ")
            ))
        });
    }
}

pub fn assert_all_same() {
    let failures = FAILURES.with(|f| std::mem::take(&mut *f.borrow_mut()));
    assert!(
        failures.is_empty(),
        "{} differences from qemu-img:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Run `sub args... IMG after...` with both tools, each on its own copy of `img` in `dir`
/// (`o{n}-IMG` for strata, `t{n}-IMG` for qemu-img), and record any difference
/// in what they print (the copies' names read `IMG`) for [`assert_all_same`].
/// Returns the names of the two copies (strata's, qemu-img's).
pub fn same_on_copies(
    dir: &Path,
    n: usize,
    img: &str,
    sub: &str,
    args: &[&str],
    after: &[&str],
) -> (String, String) {
    let what = format!("{sub} {} IMG {}", args.join(" "), after.join(" "));
    same_on_named_copies(dir, n, img, &what, &|f| {
        let mut a = vec![sub.to_string()];
        a.extend(args.iter().map(|s| s.to_string()));
        a.push(f.to_string());
        a.extend(after.iter().map(|s| s.to_string()));
        a
    })
}

/// [`same_on_copies`] for a command that names the image inside an argument
/// (an `--image-opts` list): `args(copy)` gives the whole command line for a
/// copy's file name; `what` describes the command in a failure.
pub fn same_on_named_copies(
    dir: &Path,
    n: usize,
    img: &str,
    what: &str,
    args: &dyn Fn(&str) -> Vec<String>,
) -> (String, String) {
    let ours = format!("o{n}-{img}");
    let theirs = format!("t{n}-{img}");
    std::fs::copy(dir.join(img), dir.join(&ours)).unwrap();
    std::fs::copy(dir.join(img), dir.join(&theirs)).unwrap();
    let run = |prog: &str, f: &str| {
        let a = args(f);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let (code, out, err) = outcome(dir, prog, &a);
        (code, out.replace(f, "IMG"), err.replace(f, "IMG"))
    };
    let (r_ours, r_theirs) = (run("strata", &ours), run("qemu-img", &theirs));
    if r_ours != r_theirs {
        FAILURES.with(|f| {
            f.borrow_mut().push(format!(
                "`img {what}`\n  strata:   {r_ours:?}\n  qemu-img: {r_theirs:?}"
            ))
        });
    }
    (ours, theirs)
}

/// Take the differences recorded so far (the helpers' own tests look at them
/// instead of failing with [`assert_all_same`]).
pub fn take_failures() -> Vec<String> {
    FAILURES.with(|f| std::mem::take(&mut *f.borrow_mut()))
}

/// Record a failure for [`assert_all_same`].
pub fn differs(what: String) {
    FAILURES.with(|f| f.borrow_mut().push(what));
}

/// The two copies of [`same_on_copies`] are the same bytes (for refusals and
/// header-only changes, where both tools must leave the very same file).
pub fn same_bytes(dir: &Path, ours: &str, theirs: &str, what: &str) {
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    if read(ours) != read(theirs) {
        differs(format!("{what}: the images differ"));
    }
}

/// What [`compare_runs`] compares of each file the tools leave.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum FileCheck {
    /// The bytes and the map.
    Bytes,
    /// The bytes, the map, the length and the disk usage (512-byte blocks,
    /// within the 8 a file system's extent tree may take).
    BytesAndUsage,
    /// qemu-img's view ([`qemu_views`]) and the map: for files the tools
    /// stamp with their own times (snapshots).
    QemuViews,
}

/// Run `setup` (bash, qemu-img and qemu-io only; nothing when empty) in two
/// fresh directories under `root` named after `n`, then compare the tools on
/// `steps` there ([`compare_runs`]), bytes and maps, and when `disk_usage`,
/// lengths and disk usage too.
pub fn same_files(root: &Path, n: &str, setup: &str, steps: &[&str], disk_usage: bool) {
    let dirs = [root.join(format!("{n}-o")), root.join(format!("{n}-t"))];
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
        if !setup.is_empty() {
            sh(d, "bash", &["-ec", setup]);
        }
    }
    let check = if disk_usage {
        FileCheck::BytesAndUsage
    } else {
        FileCheck::Bytes
    };
    compare_runs(&dirs, n, steps, check);
}

/// Run each command of `steps` (space-separated arguments) with strata in
/// `dirs[0]` and qemu-img in `dirs[1]`; record any difference in what they
/// print and, for every file qemu-img's side holds at the end, in what
/// `check` names.
pub fn compare_runs(dirs: &[PathBuf; 2], n: &str, steps: &[&str], check: FileCheck) {
    use std::os::unix::fs::MetadataExt;
    for step in steps {
        let args: Vec<&str> = step.split(' ').collect();
        let ours = outcome(&dirs[0], "strata", &args);
        let theirs = outcome(&dirs[1], "qemu-img", &args);
        if ours != theirs {
            differs(format!(
                "[{n}] `img {step}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
            ));
        }
    }
    let mut names: Vec<String> = std::fs::read_dir(&dirs[1])
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for f in names {
        let what = format!("[{n}] {steps:?}: {f}");
        if !dirs[0].join(&f).exists() {
            differs(format!("{what}: strata left no file"));
            continue;
        }
        if check == FileCheck::BytesAndUsage {
            let room = |d: &Path| {
                let meta = std::fs::metadata(d.join(&f)).unwrap();
                (meta.len(), meta.blocks())
            };
            let ((l_o, b_o), (l_t, b_t)) = (room(&dirs[0]), room(&dirs[1]));
            if l_o != l_t || b_o.abs_diff(b_t) > 8 {
                differs(format!(
                    "{what}: (length, blocks) strata {:?}, qemu-img {:?}",
                    (l_o, b_o),
                    (l_t, b_t)
                ));
            }
        }
        if check == FileCheck::QemuViews {
            let (v_o, v_t) = (qemu_views(&dirs[0], &f), qemu_views(&dirs[1], &f));
            if v_o != v_t {
                differs(format!("{what}: views\n{v_o}\n---\n{v_t}"));
            }
        } else {
            let read = |d: &Path| std::fs::read(d.join(&f)).unwrap();
            if read(&dirs[0]) != read(&dirs[1]) {
                differs(format!("{what}: the files' bytes differ"));
                continue;
            }
        }
        let (m_o, m_t) = (map_json(&dirs[0], &f), map_json(&dirs[1], &f));
        if m_o != m_t {
            differs(format!("{what}: map\n{m_o}---\n{m_t}"));
        }
    }
}

/// qemu-img's `info --output=json` and `check --output=json` of `f` in `dir`
/// (exit codes included), but for what the file system decides (allocated
/// size), the file's name and the times snapshots were taken: two copies that
/// give the same views look the same to QEMU.
pub fn qemu_views(dir: &Path, f: &str) -> String {
    let mut all = String::new();
    for args in [
        &["info", "--output=json", f][..],
        &["check", "--output=json", f],
    ] {
        let (code, out, err) = outcome(dir, "qemu-img", args);
        all += &format!("{code:?}\n");
        all += &(out + &err)
            .lines()
            .filter(|l| !l.contains("actual-size") && !l.contains("\"filename\""))
            .filter(|l| !l.contains("\"date-sec\"") && !l.contains("\"date-nsec\""))
            .collect::<Vec<_>>()
            .join("\n")
            .replace(f, "IMG");
    }
    all
}

/// The two copies of [`same_on_copies`] are alike to QEMU: the same `qemu-img
/// info --output=json` (but for the file's name and allocated size: QEMU punches
/// holes where strata may leave zeroes), the same guest data, and strata's copy,
/// if qcow2, checks clean.
pub fn same_image(dir: &Path, ours: &str, theirs: &str, what: &str) {
    let info = |f: &str| {
        let (_, out, err) = outcome(dir, "qemu-img", &["info", "--output=json", f]);
        (out + &err)
            .lines()
            .filter(|l| !l.contains("actual-size") && !l.contains("\"filename\""))
            // Snapshots the two tools take get the time they were taken.
            .filter(|l| !l.contains("\"date-sec\"") && !l.contains("\"date-nsec\""))
            .collect::<Vec<_>>()
            .join("\n")
            .replace(f, "IMG")
            // A copy in a directory of its own names its neighbours there.
            .replace(&f[..f.rfind('/').map_or(0, |i| i + 1)], "")
    };
    let (i_ours, i_theirs) = (info(ours), info(theirs));
    if i_ours != i_theirs {
        differs(format!("{what}: info\n{i_ours}\n---\n{i_theirs}"));
    }
    let (code, out, err) = outcome(dir, "qemu-img", &["check", ours]);
    if i_ours.contains("\"format\": \"qcow2\"") && code != Some(0) {
        differs(format!("{what}: check {code:?}\n{out}{err}"));
    }
    let (code, out, err) = outcome(dir, "qemu-img", &["compare", "-U", ours, theirs]);
    if code != Some(0) {
        differs(format!("{what}: compare\n{out}{err}"));
    }
}

/// Copy the files of the directory `from` into a new directory `to` by
/// `std::fs::copy`, which on ext4 writes a sparse file's holes out as zeroes:
/// the copies are fully allocated. (Suites that depend on that, knowingly or
/// not, keep it: qemu-img reads host-file holes as zero clusters in
/// `convert -B`, strata does not, so img_parity_random_convert's pinned rows
/// differ on sparse copies.)
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Copy the files of the directory `from` into a new directory `to`, each by
/// [`sparse_copy`]: the same bytes, and as sparse as the originals.
pub fn copy_dir_sparse(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        sparse_copy(&e.path(), &to.join(e.file_name()));
    }
}

/// Copy the file `from` to `to` (created, or truncated if it exists) with
/// `from`'s permissions, as `std::fs::copy` does, but keeping the holes:
/// the copy holds the same bytes, its data where `from` has data (read from
/// FIEMAP), its preallocated but unwritten extents preallocated, and holes
/// elsewhere. (`std::fs::copy` writes every hole of a sparse image out as
/// zeroes, which costs a 64 MiB write per copy of a 64 MiB image.) Where the
/// file system has no FIEMAP, data runs come from `SEEK_DATA`/`SEEK_HOLE`;
/// where it has neither, the whole file is copied.
pub fn sparse_copy(from: &Path, to: &Path) {
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::open(from).unwrap_or_else(|e| panic!("open {}: {e}", from.display()));
    let meta = src.metadata().unwrap();
    let len = meta.len();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(to)
        .unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    let extents = fiemap::extents(from)
        .or_else(|| data_runs(&src, len))
        .unwrap_or_else(|| vec![(0, len, false)]);
    let mut buf = vec![0u8; 1 << 20];
    for (start, length, unwritten) in extents {
        let end = start.checked_add(length).expect("extent end overflows");
        if unwritten {
            fiemap::preallocate(&dst, start, length);
            continue;
        }
        // Data past the end of the file stays out of the copy.
        let mut pos = start;
        while pos < end.min(len) {
            let want = usize::try_from((end.min(len) - pos).min(buf.len() as u64)).unwrap();
            let got = src.read_at(&mut buf[..want], pos).unwrap();
            assert!(got > 0, "{} shrank while being copied", from.display());
            dst.write_all_at(&buf[..got], pos).unwrap();
            pos += got as u64;
        }
    }
    dst.set_len(len).unwrap();
    dst.set_permissions(meta.permissions()).unwrap();
}

/// The data runs of `file` (`len` bytes) as `(start, length, false)` by
/// `SEEK_DATA`/`SEEK_HOLE`, or `None` where the file system cannot tell.
fn data_runs(file: &std::fs::File, len: u64) -> Option<Vec<(u64, u64, bool)>> {
    use std::os::fd::AsRawFd;
    let seek = |pos: u64, whence: i32| -> Result<u64, std::io::Error> {
        let pos = libc::off_t::try_from(pos).unwrap();
        // SAFETY: lseek on a descriptor `file` keeps open.
        let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(u64::try_from(r).unwrap())
        }
    };
    let mut runs = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let data = match seek(pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(_) => return None,
        };
        let hole = seek(data, libc::SEEK_HOLE).ok()?;
        if hole <= data {
            return None;
        }
        runs.push((data, hole - data, false));
        pos = hole;
    }
    Some(runs)
}

/// Run `args` with each tool in its own copy of the directory `fixture`
/// (`FIXTURE-o{n}` for strata, `FIXTURE-t{n}` for qemu-img) and record, for
/// [`assert_all_same`], any difference in what they print or in the files they
/// leave: the same names, and each pair alike by [`same_image`]. The copies
/// are as sparse as the fixture ([`copy_dir_sparse`]). A file neither tool
/// wrote ([`Untouched`]) is the fixture's in both copies and is not compared
/// again.
pub fn same_in_dir_copies(fixture: &Path, n: usize, args: &[&str]) {
    same_in_dir_copies_planted(fixture, n, args, &|_| {});
}

/// [`same_in_dir_copies`], with `plant` run on strata's copy of the directory
/// after both tools ran: the helper's own tests plant differences there to
/// show they are reported.
pub fn same_in_dir_copies_planted(fixture: &Path, n: usize, args: &[&str], plant: &dyn Fn(&Path)) {
    let parent = fixture.parent().unwrap();
    let base = fixture.file_name().unwrap().to_string_lossy().into_owned();
    let (ours, theirs) = (format!("{base}-o{n}"), format!("{base}-t{n}"));
    for copy in [&ours, &theirs] {
        copy_dir_sparse(fixture, &parent.join(copy));
    }
    let (u_ours, u_theirs) = (
        Untouched::stamp(&parent.join(&ours)),
        Untouched::stamp(&parent.join(&theirs)),
    );
    let what = format!("img {}", args.join(" "));
    let r_ours = outcome(&parent.join(&ours), "strata", args);
    let r_theirs = outcome(&parent.join(&theirs), "qemu-img", args);
    plant(&parent.join(&ours));
    if r_ours != r_theirs {
        differs(format!(
            "`{what}`\n  strata:   {r_ours:?}\n  qemu-img: {r_theirs:?}"
        ));
    }
    let names = |d: &str| {
        let mut v: Vec<String> = std::fs::read_dir(parent.join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (n_ours, n_theirs) = (names(&ours), names(&theirs));
    if n_ours != n_theirs {
        differs(format!("`{what}`: files {n_ours:?} vs {n_theirs:?}"));
        return;
    }
    for f in n_ours {
        if u_ours.holds(&f) && u_theirs.holds(&f) {
            continue;
        }
        let (o, t) = (format!("{ours}/{f}"), format!("{theirs}/{f}"));
        same_image(parent, &o, &t, &format!("`{what}` {f}"));
    }
}

/// The files of a fresh copy of a fixture directory, stamped so that any
/// later write to one shows: each file's modification time is set to
/// [`Untouched::STAMP`] (a time long past, which no write can give: a write
/// sets it to the current time), then its inode, length, modification and
/// change times are recorded. A file [`Untouched::holds`] still has all of
/// these, so it was neither written, truncated, replaced nor had its times
/// set again since: it is the fixture's file, byte for byte.
pub struct Untouched {
    dir: PathBuf,
    files: std::collections::HashMap<String, [i64; 6]>,
}

impl Untouched {
    /// 2001-09-09, the modification time every file of the copy gets.
    pub const STAMP: std::time::Duration = std::time::Duration::from_secs(1_000_000_000);

    fn identity(path: &Path) -> Option<[i64; 6]> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).ok()?;
        Some([
            i64::try_from(m.ino()).ok()?,
            i64::try_from(m.size()).ok()?,
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        ])
    }

    /// Stamp every regular file of `dir` and record what it is now.
    pub fn stamp(dir: &Path) -> Untouched {
        let mut files = std::collections::HashMap::new();
        let when = std::time::UNIX_EPOCH + Self::STAMP;
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if !e.file_type().unwrap().is_file() {
                continue;
            }
            // The owner may set a file's times through any descriptor.
            let f = std::fs::File::open(e.path()).unwrap();
            f.set_times(
                std::fs::FileTimes::new()
                    .set_modified(when)
                    .set_accessed(when),
            )
            .unwrap();
            drop(f);
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = Self::identity(&e.path()) {
                files.insert(name, id);
            }
        }
        Untouched {
            dir: dir.to_path_buf(),
            files,
        }
    }

    /// `name` was stamped and is still the file that was stamped, unchanged.
    pub fn holds(&self, name: &str) -> bool {
        let stamp_secs = i64::try_from(Self::STAMP.as_secs()).unwrap();
        match (self.files.get(name), Self::identity(&self.dir.join(name))) {
            (Some(then), Some(now)) => then == &now && now[2] == stamp_secs && now[3] == 0,
            _ => false,
        }
    }
}

/// Write `bytes` at offset `at` of `dir/file` in place (a planted fault).
pub fn put(dir: &Path, file: &str, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(file))
        .unwrap();
    f.write_all_at(bytes, at).unwrap();
}
