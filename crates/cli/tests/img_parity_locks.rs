//! strata img and qemu-img next to a live holder of the same file: qemu-nbd
//! (read-write, `-r`, `--shared`, a qcow2 file served `-f raw`),
//! qemu-storage-daemon (an NBD export, writable or not), qemu-system-x86_64
//! (`-machine none -drive ...`) and `strata nbd serve`. Each holder holds a raw
//! image, a qcow2 image, or the qcow2 backing file of the image worked on.
//!
//! Reading subcommands run through both tools one after the other on the same
//! held file (with and without `-U`), which must be left as it was. Writing
//! subcommands run on a fresh copy of the files per tool, each under its own
//! holder. stdout, stderr and the exit code must be alike, byte for byte.
//!
//! One difference is deliberate: QEMU's raw driver shares writing, so qemu-img
//! writes a raw image a qemu-nbd or qemu-storage-daemon is serving writable
//! (`convert -n`, `dd conv=notrunc` into it), and resizes one a qemu-io writes
//! (qemu-io, unlike the servers, shares resizing). strata never writes a file another
//! process writes: it refuses with qemu-img's own lock wording
//! (`Failed to get shared "write" lock`), and the file is left untouched.
//! [`strata_refuses_to_write_a_raw_image_a_writer_serves`] pins that.

mod common;

use common::{assert_all_same, differs, outcome, STRATA};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Lay out the images every case starts from, in `d`: copies of one set made
/// once per test process (each case and each write row gets its own copies).
fn fixture(d: &Path) {
    static TEMPLATE: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let t = TEMPLATE.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        make_fixture(t.path());
        t
    });
    for e in std::fs::read_dir(t.path()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
}

/// The secret of `l.luks`, as a `--object` argument.
const LUKS_SECRET: &str = "secret,id=s,data=pw";
/// `l.luks` opened with its secret, as `--image-opts` names it.
const LUKS_OPTS: &str = "driver=luks,key-secret=s,file.filename=l.luks";

/// Create the images of [`fixture`] in `d`.
fn make_fixture(d: &Path) {
    let sh = |prog: &str, args: &[&str]| {
        let out = Command::new(prog)
            .args(args)
            .current_dir(d)
            .output()
            .unwrap_or_else(|e| panic!("{prog} (QEMU 10) must be installed: {e}"));
        assert!(
            out.status.success(),
            "{prog} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
    );
    sh(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 64k", "base.qcow2"],
    );
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    sh(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 1M 64k", "top.qcow2"],
    );
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "img.qcow2", "4M"],
    );
    sh(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x33 0 64k", "img.qcow2"],
    );
    sh("qemu-img", &["create", "-q", "-f", "raw", "img.raw", "4M"]);
    sh(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x44 0 64k", "img.raw"],
    );
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=df.data",
            "df.qcow2",
            "4M",
        ],
    );
    sh(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x66 0 64k", "df.qcow2"],
    );
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            LUKS_SECRET,
            "-o",
            "key-secret=s,iter-time=10",
            "l.luks",
            "4M",
        ],
    );
    sh(
        "qemu-io",
        &[
            "--object",
            LUKS_SECRET,
            "--image-opts",
            LUKS_OPTS,
            "-c",
            "write -P 0x77 0 64k",
        ],
    );
    sh("qemu-img", &["create", "-q", "-f", "raw", "src.raw", "4M"]);
    sh(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x55 64k 64k", "src.raw"],
    );
}

/// The OFD lock bytes some process holds on `file` (from /proc/locks).
fn lock_bytes(file: &Path) -> Vec<String> {
    let ino = std::fs::metadata(file).unwrap().ino();
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    let mut held: Vec<String> = locks
        .lines()
        .filter(|l| l.contains("OFDLCK"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let id = f.get(5)?;
            (id.rsplit(':').next()? == ino.to_string()).then(|| format!("{}-{}", f[6], f[7]))
        })
        .collect();
    held.sort();
    held
}

/// A process holding an image open until dropped.
struct Holder(Child);

impl Holder {
    /// Start `prog args` in `d` and return once it holds its locks on `held`
    /// (the set seen twice in a row, 50 ms apart) and, for a server, once its
    /// socket `sock` exists.
    /// A holder that takes its locks in steps (qemu-nbd opening a LUKS image
    /// reads first and takes its final locks only after the key derivation)
    /// names its final lock bytes in `expect`; it is ready once it holds them.
    fn start(
        d: &Path,
        prog: &str,
        args: &[String],
        held: &Path,
        sock: Option<&Path>,
        expect: &[&str],
    ) -> Holder {
        let child = Command::new(prog)
            .args(args)
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{prog} (QEMU 10) must be installed: {e}"));
        let mut h = Holder(child);
        let start = Instant::now();
        let mut last = Vec::new();
        loop {
            if let Some(status) = h.0.try_wait().unwrap() {
                panic!("{prog} {args:?} exited early ({status})");
            }
            let now = lock_bytes(held);
            let ready = sock.is_none_or(|s| s.exists());
            let ready = ready && (expect.is_empty() || now == expect);
            if ready && !now.is_empty() && now == last {
                return h;
            }
            last = now;
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{prog} {args:?} never locked {}",
                held.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One holder: the program, its arguments, the file it holds (the image worked
/// on, or its backing file), the image worked on and its format.
struct Case {
    name: &'static str,
    prog: &'static str,
    args: Vec<String>,
    held: &'static str,
    image: &'static str,
    /// The lock bytes the holder ends up with, when it takes them in steps
    /// (see [`Holder::start`]); empty: whatever set it keeps.
    expect: &'static [&'static str],
}

impl Case {
    /// The worked-on image's format, as its name says.
    fn format(&self) -> &'static str {
        if self.image.ends_with(".raw") {
            "raw"
        } else if self.image.ends_with(".luks") {
            "luks"
        } else {
            "qcow2"
        }
    }
}

const SOCK: &str = "h.sock";

fn nbd(name: &'static str, flags: &[&str], held: &'static str, image: &'static str) -> Case {
    let mut args: Vec<String> = vec!["-t".into(), "-k".into(), SOCK.into()];
    args.extend(flags.iter().map(|s| s.to_string()));
    args.push(held.into());
    Case {
        name,
        prog: "qemu-nbd",
        args,
        held,
        image,
        expect: &[],
    }
}

/// qemu-nbd serving `l.luks` (opened with its secret), read-write or `-r`.
fn nbd_luks(name: &'static str, read_only: bool) -> Case {
    let mut flags = vec!["--object", LUKS_SECRET, "--image-opts", LUKS_OPTS];
    if read_only {
        flags.insert(0, "-r");
    }
    let mut c = nbd(name, &flags, "l.luks", "l.luks");
    // `nbd` appends the held file as the image name; the options name it here.
    c.args.pop();
    c.expect = if read_only {
        &["100-100", "203-203"]
    } else {
        &["100-101", "203-203"]
    };
    c
}

fn storage_daemon(name: &'static str, held: &'static str, fmt: &str, writable: bool) -> Case {
    let ro = if writable { "off" } else { "on" };
    Case {
        name,
        prog: "qemu-storage-daemon",
        args: vec![
            "--blockdev".into(),
            format!("driver=file,node-name=f,filename={held},read-only={ro}"),
            "--blockdev".into(),
            format!("driver={fmt},file=f,node-name=d,read-only={ro}"),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={SOCK}"),
            "--export".into(),
            format!(
                "nbd,id=e,node-name=d,writable={}",
                if writable { "on" } else { "off" }
            ),
        ],
        held,
        image: held,
        expect: &[],
    }
}

fn vm(name: &'static str, held: &'static str, fmt: &str, readonly: bool) -> Case {
    let ro = if readonly { "on" } else { "off" };
    Case {
        name,
        prog: "qemu-system-x86_64",
        args: [
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-drive",
            &format!("file={held},if=none,format={fmt},readonly={ro}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        held,
        image: held,
        expect: &[],
    }
}

fn strata_nbd(name: &'static str, flags: &[&str], held: &'static str) -> Case {
    let mut c = nbd(name, flags, held, held);
    c.prog = STRATA;
    c.args.remove(0);
    c.args.insert(0, "serve".into());
    c.args.insert(0, "nbd".into());
    c
}

/// qemu-io holding `held` (as `fmt`, read-only with `-r` in `flags`) while
/// it sleeps.
fn qemu_io(name: &'static str, flags: &[&str], held: &'static str, fmt: &str) -> Case {
    let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    args.extend(["-f", fmt, "-c", "sleep 600000", held].map(String::from));
    Case {
        name,
        prog: "qemu-io",
        args,
        held,
        image: held,
        expect: &[],
    }
}

impl Case {
    fn start(&self, d: &Path) -> Holder {
        let sock = !matches!(self.prog, "qemu-system-x86_64" | "qemu-io");
        let sock = sock.then(|| d.join(SOCK));
        let _ = std::fs::remove_file(d.join(SOCK));
        // qemu-nbd takes its socket by absolute name only.
        let abs = d.join(SOCK).to_str().unwrap().to_string();
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| if a == SOCK { abs.clone() } else { a.clone() })
            .collect();
        Holder::start(
            d,
            self.prog,
            &args,
            &d.join(self.held),
            sock.as_deref(),
            self.expect,
        )
    }

    /// The subcommands that only read the image, `-U` given or not.
    fn reads(&self, u: bool) -> Vec<Vec<String>> {
        let (i, f) = (self.image, self.format());
        if f == "luks" {
            return luks_reads(u);
        }
        let u = if u { "-U" } else { "" };
        let cmds = [
            format!("info {u} {i}"),
            format!("info {u} -f {f} {i}"),
            format!("info {u} --backing-chain -f {f} {i}"),
            format!("check {u} -f {f} {i}"),
            format!("map {u} -f {f} {i}"),
            format!("measure {u} -O qcow2 -f {f} {i}"),
            format!("compare {u} -f {f} -F raw {i} src.raw"),
            format!("compare {u} -F {f} -f raw src.raw {i}"),
            format!("convert {u} -f {f} -O raw {i} out.raw"),
            format!("dd {u} -f {f} if={i} of=dd.raw"),
            format!("snapshot {u} -l {i}"),
            format!("create -f qcow2 {u} -b {i} -F {f} out.qcow2"),
        ];
        let mut cmds: Vec<Vec<String>> = cmds.iter().map(|c| split(c)).collect();
        if !u.is_empty() {
            // force-share given as an option instead of -U.
            cmds.push(split(&format!(
                "info --image-opts driver={f},file.driver=file,file.filename={i},force-share=on"
            )));
            cmds.push(split(&format!(
                r#"map json:{{"driver":"{f}","force-share":true,"file":{{"driver":"file","filename":"{i}"}}}}"#
            )));
        }
        cmds
    }

    /// The subcommands that write the image (or try to).
    fn writes(&self) -> Vec<Vec<String>> {
        let (i, f) = (self.image, self.format());
        if f == "luks" {
            return luks_writes();
        }
        let mut cmds = vec![
            format!("check -r leaks -f {f} {i}"),
            format!("convert -n -f raw -O {f} src.raw {i}"),
            format!("resize -f {f} {i} 8M"),
            format!("snapshot -c s2 {i}"),
            format!("commit -f {f} {i}"),
            format!("rebase -u -f {f} -b src.raw -F raw {i}"),
        ];
        if f == "qcow2" {
            // (On raw, qemu-img names an automatic node, `#blockNNN`.)
            cmds.push(format!("bitmap --add {i} b1"));
            cmds.push(format!("amend -f {f} -o compat=0.10 {i}"));
            cmds.push(format!("rebase -f {f} -b src.raw -F raw {i}"));
        }
        cmds.iter().map(|c| split(c)).collect()
    }
}

/// [`Case::reads`] of `l.luks`, opened with its secret where it is read.
fn luks_reads(u: bool) -> Vec<Vec<String>> {
    let u = if u { "-U" } else { "" };
    let (s, o) = (LUKS_SECRET, LUKS_OPTS);
    let json = r#"json:{"driver":"luks","key-secret":"s","file":{"filename":"l.luks"}}"#;
    [
        format!("info {u} l.luks"),
        format!("info {u} -f luks l.luks"),
        format!("check {u} --object {s} --image-opts {o}"),
        format!("map {u} --object {s} --image-opts {o}"),
        format!("measure {u} --object {s} -O qcow2 --image-opts {o}"),
        format!("compare {u} --object {s} --image-opts {o} driver=raw,file.filename=src.raw"),
        format!("convert {u} --object {s} --image-opts {o} -O raw out.raw"),
        format!("dd {u} --object {s} -f luks if={json} of=dd.raw"),
        format!("snapshot {u} -l l.luks"),
    ]
    .iter()
    .map(|c| split(c))
    .collect()
}

/// [`Case::writes`] of `l.luks`.
fn luks_writes() -> Vec<Vec<String>> {
    let (s, o) = (LUKS_SECRET, LUKS_OPTS);
    [
        format!("resize --object {s} --image-opts {o} 8M"),
        format!("resize --shrink --object {s} --image-opts {o} 2M"),
        format!("convert -n --object {s} --target-image-opts -f raw src.raw {o}"),
        format!("amend --object {s} --image-opts {o} -o state=active,keyslot=1,new-secret=s,iter-time=10"),
        format!("snapshot -c s2 --object {s} --image-opts {o}"),
        format!("commit --object {s} --image-opts {o}"),
        format!("rebase -u --object {s} -b src.raw -F raw --image-opts {o}"),
        format!("check -r leaks --object {s} --image-opts {o}"),
    ]
    .iter()
    .map(|c| split(c))
    .collect()
}

fn split(c: &str) -> Vec<String> {
    c.split_whitespace().map(str::to_string).collect()
}

/// One run's outcome, with the run's output files removed afterwards.
fn run(d: &Path, prog: &str, args: &[String]) -> (Option<i32>, String, String) {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = outcome(d, prog, &a);
    for f in ["out.raw", "out.qcow2", "dd.raw"] {
        let _ = std::fs::remove_file(d.join(f));
    }
    r
}

fn held_bytes(d: &Path, case: &Case) -> Vec<Vec<u8>> {
    [case.held, case.image]
        .iter()
        .map(|f| std::fs::read(d.join(f)).unwrap())
        .collect()
}

/// Whether `case`'s holder writes its raw image, so that qemu-img (sharing
/// writes as QEMU's raw driver does) writes it too where strata refuses.
fn raw_writer_serves(case: &Case) -> bool {
    matches!(case.format(), "raw" | "luks") && case.name.contains("rw")
}

/// A write qemu-img lets through next to a raw writer (raw shares writing),
/// which strata refuses; see the module documentation.
fn writes_raw_data(case: &Case, args: &[String]) -> bool {
    args[0] == "convert" || (args[0] == "resize" && case.prog == "qemu-io")
}

/// Run every row of `case` with both tools; the differences found.
/// Whether `case`'s holder writes the data file of the image worked on and
/// shares writing it (qemu-io), so that qemu-img writes the image where strata
/// refuses; see [`strata_refuses_to_write_an_image_whose_data_file_a_writer_holds`].
fn data_file_writer(case: &Case) -> bool {
    case.held == "df.data" && case.prog == "qemu-io" && case.name.contains("rw")
}

fn check_case(case: &Case) -> Vec<String> {
    let mut found = Vec::new();
    let mut differs = |what: String| found.push(what);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    {
        let _h = case.start(d);
        let before = held_bytes(d, case);
        for u in [false, true] {
            for args in case.reads(u) {
                let ours = run(d, "strata", &args);
                let theirs = run(d, "qemu-img", &args);
                if ours != theirs {
                    differs(format!(
                        "[{}] `img {}`\n  strata:   {ours:?}\n  qemu-img: {theirs:?}",
                        case.name,
                        args.join(" ")
                    ));
                }
            }
        }
        assert!(
            before == held_bytes(d, case),
            "[{}] a read changed the held image",
            case.name
        );
    }
    for args in case.writes() {
        if raw_writer_serves(case) && writes_raw_data(case, &args) || data_file_writer(case) {
            continue;
        }
        // Each tool on its own copies under its own holder, both at once.
        let one = |prog: &str| {
            let sub = tempfile::tempdir().unwrap();
            let s = sub.path();
            fixture(s);
            let _h = case.start(s);
            let before = held_bytes(s, case);
            let r = run(s, prog, &args);
            if prog == "strata" && r.0 != Some(0) {
                assert!(
                    before == held_bytes(s, case),
                    "[{}] strata `img {}` failed but changed the image",
                    case.name,
                    args.join(" ")
                );
            }
            r
        };
        let results = std::thread::scope(|t| {
            let ours = t.spawn(|| one("strata"));
            let theirs = one("qemu-img");
            vec![ours.join().unwrap(), theirs]
        });
        if results[0] != results[1] {
            differs(format!(
                "[{}] `img {}`\n  strata:   {:?}\n  qemu-img: {:?}",
                case.name,
                args.join(" "),
                results[0],
                results[1]
            ));
        }
    }
    found
}

/// [`check_case`] for every holder, all at once (each in its own directory,
/// with its own socket), the differences gathered for [`assert_all_same`].
fn check_cases(cases: &[Case]) {
    let found: Vec<Vec<String>> = std::thread::scope(|t| {
        let runs: Vec<_> = cases.iter().map(|c| t.spawn(|| check_case(c))).collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for what in found.into_iter().flatten() {
        differs(what);
    }
    assert_all_same();
}

#[test]
fn a_raw_image_qemu_nbd_serves_is_read_and_refused_as_qemu_img_does() {
    check_cases(&[
        nbd("qemu-nbd rw raw", &["-f", "raw"], "img.raw", "img.raw"),
        nbd(
            "qemu-nbd -r raw",
            &["-r", "-f", "raw"],
            "img.raw",
            "img.raw",
        ),
        nbd(
            "qemu-nbd rw --shared=2 raw",
            &["--shared=2", "-f", "raw"],
            "img.raw",
            "img.raw",
        ),
    ]);
}

#[test]
fn a_qcow2_image_qemu_nbd_serves_is_read_and_refused_as_qemu_img_does() {
    check_cases(&[
        nbd(
            "qemu-nbd rw qcow2",
            &["-f", "qcow2"],
            "img.qcow2",
            "img.qcow2",
        ),
        nbd(
            "qemu-nbd -r qcow2",
            &["-r", "-f", "qcow2"],
            "img.qcow2",
            "img.qcow2",
        ),
        nbd(
            "qemu-nbd rw -f raw on qcow2",
            &["-f", "raw"],
            "img.qcow2",
            "img.qcow2",
        ),
        nbd(
            "qemu-nbd -r -f raw on qcow2",
            &["-r", "-f", "raw"],
            "img.qcow2",
            "img.qcow2",
        ),
    ]);
}

#[test]
fn an_image_whose_backing_file_qemu_nbd_serves_is_locked_as_qemu_img_finds_it() {
    check_cases(&[
        nbd(
            "qemu-nbd rw base",
            &["-f", "qcow2"],
            "base.qcow2",
            "top.qcow2",
        ),
        nbd(
            "qemu-nbd -r base",
            &["-r", "-f", "qcow2"],
            "base.qcow2",
            "top.qcow2",
        ),
    ]);
}

#[test]
fn an_image_whose_backing_file_a_storage_daemon_or_qemu_holds_is_locked_as_qemu_img_finds_it() {
    let over_it = |mut c: Case| {
        c.image = "top.qcow2";
        c
    };
    check_cases(&[
        over_it(storage_daemon("qsd rw base", "base.qcow2", "qcow2", true)),
        over_it(storage_daemon("qsd ro base", "base.qcow2", "qcow2", false)),
        over_it(vm("vm rw base", "base.qcow2", "qcow2", false)),
        over_it(vm("vm ro base", "base.qcow2", "qcow2", true)),
    ]);
}

#[test]
fn images_a_storage_daemon_exports_are_locked_as_qemu_img_finds_them() {
    check_cases(&[
        storage_daemon("qsd rw raw", "img.raw", "raw", true),
        storage_daemon("qsd ro raw", "img.raw", "raw", false),
        storage_daemon("qsd rw qcow2", "img.qcow2", "qcow2", true),
        storage_daemon("qsd ro qcow2", "img.qcow2", "qcow2", false),
    ]);
}

#[test]
fn images_a_running_qemu_holds_as_drives_are_locked_as_qemu_img_finds_them() {
    check_cases(&[
        vm("vm rw raw", "img.raw", "raw", false),
        vm("vm ro raw", "img.raw", "raw", true),
        vm("vm rw qcow2", "img.qcow2", "qcow2", false),
        vm("vm ro qcow2", "img.qcow2", "qcow2", true),
    ]);
}

#[test]
fn images_strata_nbd_serve_serves_are_locked_as_qemu_nbd_locks_them() {
    // Both tools must meet strata's server as they meet qemu-nbd: the same
    // refusals and the same reads (compared with qemu-img, as above).
    check_cases(&[
        strata_nbd("strata nbd rw raw", &["-f", "raw"], "img.raw"),
        strata_nbd("strata nbd -r raw", &["-r", "-f", "raw"], "img.raw"),
        strata_nbd("strata nbd rw qcow2", &["-f", "qcow2"], "img.qcow2"),
        strata_nbd("strata nbd -r qcow2", &["-r", "-f", "qcow2"], "img.qcow2"),
    ]);
}

#[test]
fn strata_refuses_to_write_a_raw_image_a_writer_serves() {
    // qemu-img writes here (QEMU's raw driver shares writing); strata refuses
    // with qemu-img's wording for a lock conflict and leaves the file alone.
    for case in [
        nbd("qemu-nbd rw raw", &["-f", "raw"], "img.raw", "img.raw"),
        storage_daemon("qsd rw raw", "img.raw", "raw", true),
        qemu_io("qemu-io rw raw", &[], "img.raw", "raw"),
        nbd_luks("qemu-nbd rw luks", false),
    ] {
        for args in case
            .writes()
            .into_iter()
            .filter(|a| writes_raw_data(&case, a))
        {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            fixture(d);
            let _h = case.start(d);
            let before = held_bytes(d, &case);
            let theirs = run(d, "qemu-img", &args);
            assert_eq!(
                theirs.0,
                Some(0),
                "[{}] qemu-img `{}` no longer writes next to a raw writer: {theirs:?}",
                case.name,
                args.join(" ")
            );
            std::fs::write(d.join(case.image), &before[1]).unwrap();
            let ours = run(d, "strata", &args);
            let shown = if case.format() == "luks" {
                LUKS_OPTS
            } else {
                case.image
            };
            assert_eq!(
                ours,
                (
                    Some(1),
                    String::new(),
                    format!(
                        "PROG: Could not open '{shown}': Failed to get shared \"write\" lock\n\
                         Is another process using the image [{}]?\n",
                        case.image
                    )
                ),
                "[{}] strata `{}`",
                case.name,
                args.join(" ")
            );
            assert!(
                before == held_bytes(d, &case),
                "strata wrote a served raw image"
            );
        }
    }
}

#[test]
fn images_qemu_io_holds_are_locked_as_qemu_img_finds_them() {
    check_cases(
        &[
            qemu_io("qemu-io rw qcow2", &[], "img.qcow2", "qcow2"),
            qemu_io("qemu-io -r qcow2", &["-r"], "img.qcow2", "qcow2"),
            qemu_io("qemu-io rw raw", &[], "img.raw", "raw"),
            qemu_io("qemu-io -r raw", &["-r"], "img.raw", "raw"),
            qemu_io("qemu-io rw base", &[], "base.qcow2", "qcow2"),
        ]
        .map(|mut c| {
            if c.held == "base.qcow2" {
                c.image = "top.qcow2";
            }
            c
        }),
    );
}

#[test]
fn an_image_whose_data_file_another_process_holds_is_locked_as_qemu_img_finds_it() {
    let over_it = |mut c: Case| {
        c.image = "df.qcow2";
        c
    };
    check_cases(&[
        nbd(
            "qemu-nbd rw df.qcow2",
            &["-f", "qcow2"],
            "df.qcow2",
            "df.qcow2",
        ),
        nbd(
            "qemu-nbd -r df.qcow2",
            &["-r", "-f", "qcow2"],
            "df.qcow2",
            "df.qcow2",
        ),
        over_it(nbd(
            "qemu-nbd -r data file",
            &["-r", "-f", "raw"],
            "df.data",
            "df.qcow2",
        )),
        over_it(qemu_io("qemu-io -r data file", &["-r"], "df.data", "raw")),
        over_it(storage_daemon("qsd ro data file", "df.data", "raw", false)),
    ]);
}

#[test]
fn a_luks_image_qemu_nbd_serves_is_read_and_refused_as_qemu_img_does() {
    // QEMU's luks driver locks its file as raw does: a reader shares writing,
    // so info, check, map, compare and dd go on next to a writer (convert's
    // source shares no writing and is refused); a resize needs the resize
    // permission qemu-nbd does not share, and a key update (amend) shares
    // neither reading nor writing. The one write qemu-img lets through next to
    // the read-write server (`convert -n`) is pinned in
    // `strata_refuses_to_write_a_raw_image_a_writer_serves`.
    check_cases(&[
        nbd_luks("qemu-nbd rw luks", false),
        nbd_luks("qemu-nbd -r luks", true),
    ]);
}

#[test]
fn an_image_whose_data_file_a_writer_holds_is_read_and_refused_as_qemu_img_does() {
    // qemu-img locks the data file as raw is locked: reads go on next to a
    // writer of it, except convert's (which shares no writing), and every write
    // of the image needs the data file's resize permission the servers keep.
    let over_it = |mut c: Case| {
        c.image = "df.qcow2";
        c
    };
    check_cases(&[
        over_it(nbd(
            "qemu-nbd rw data file",
            &["-f", "raw"],
            "df.data",
            "df.qcow2",
        )),
        over_it(storage_daemon("qsd rw data file", "df.data", "raw", true)),
        over_it(qemu_io("qemu-io rw data file", &[], "df.data", "raw")),
    ]);
}

#[test]
fn strata_refuses_to_write_an_image_whose_data_file_a_writer_holds() {
    // qemu-io writes the data file and shares writing it; qemu-img's qcow2
    // writer shares writing its data file too, so it resizes, amends, repairs
    // and converts into the image. strata never writes a file another process
    // writes: every write of the image is either refused alike or refused with
    // the data file's write lock, and nothing changes.
    let case = qemu_io("qemu-io rw data file", &[], "df.data", "raw");
    let case = Case {
        image: "df.qcow2",
        ..case
    };
    for args in case.writes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fixture(d);
        let _h = case.start(d);
        let before = held_bytes(d, &case);
        let ours = run(d, "strata", &args);
        assert!(
            before == held_bytes(d, &case),
            "strata `{}` wrote an image whose data file a writer holds",
            args.join(" ")
        );
        drop(_h);
        let theirs = {
            let sub = tempfile::tempdir().unwrap();
            fixture(sub.path());
            let _h = case.start(sub.path());
            run(sub.path(), "qemu-img", &args)
        };
        if ours != theirs {
            assert_eq!(
                ours,
                (
                    Some(1),
                    String::new(),
                    "PROG: Could not open 'df.qcow2': Failed to get shared \"write\" lock\n\
                     Is another process using the image [df.data]?\n"
                        .to_string()
                ),
                "[{}] strata `{}` (qemu-img: {theirs:?})",
                case.name,
                args.join(" ")
            );
        }
    }
}
