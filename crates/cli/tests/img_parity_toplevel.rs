//! The command line before the subcommand, and the order of what a failing `-p`
//! command prints, run through both tools.
//!
//! Top level: no subcommand, an unknown one, `--` and `-`, getopt's words for
//! options qemu-img does not take or that lack their value, `-T`/`--trace` (strata
//! has no QEMU trace events: every name that is not a pattern gets qemu-img's
//! warning for an event that does not exist, an events file is read line by line,
//! `file=` is created when the subcommand is dispatched), and help and version
//! (each tool's own text; the same stream and exit code). Both as `strata img` and
//! as a program named `qemu-img` run by its path.
//!
//! Progress: with `-p` and stdout not a terminal, a command that fails prints its
//! first figure, then the error, then the closing newline; read through one pipe
//! for both streams, as `2>&1` shows them.

mod common;

use common::{assert_all_same, differs, same, same_in_dir_copies};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Options and subcommand names before anything else: compared on stdout, stderr
/// and exit code.
const TOP: &[&[&str]] = &[
    &[],
    &["foo"],
    &[""],
    &["help"],
    &["-"],
    &["--"],
    &["--", "info"],
    &["-q"],
    &["-x", "info"],
    &["--bogus"],
    &["--help=1"],
    &["-T"],
    &["--trace"],
    &["-T", "x"],
    &["-Tx"],
    &["-T", "-x"],
    &["--tr", "x"],
    &["--trace=x", "info", "nothere.qcow2"],
    &["-T", "x", "-T", "y"],
    &["-T", "x,,y"],
    &["-T", "bdrv_*"],
    &["-T", ""],
    &["-T", "enable=x,enable=y"],
    &["-T", "x,y", "info"],
    &["-T", "x,noy", "info"],
    &["-T", "foo=bar", "info"],
    &["-T", "events=ev.txt", "info"],
    &["-T", "events=nothere", "info"],
    &["-T", "events=", "info"],
    &["-T", "file=/nonexistent/dir/t.log", "info"],
    &["-T", "x", "foo"],
    &["-T", "x", "info", "a.qcow2"],
];

/// Commands whose `-T file=` creates (or not) the trace file: run in copies of
/// the directory, so the files each tool leaves are compared.
const TRACE_FILE: &[&[&str]] = &[
    &["-T", "file=t.log"],
    &["-T", "file=t.log", "foo"],
    &["-T", "x,file=t.log", "info", "a.qcow2"],
    &["-T", "file=t.log", "-T", "file=u.log", "info", "a.qcow2"],
];

fn fixture(dir: &Path) {
    common::qcow2(dir, "a.qcow2", "1M", &[]);
    std::fs::write(dir.join("ev.txt"), "a\n\n# comment\n-b\nc*\n").unwrap();
}

#[test]
fn the_options_before_the_subcommand_are_read_as_qemu_img_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let fx = dir.path().join("fx");
    std::fs::create_dir(&fx).unwrap();
    fixture(&fx);
    for case in TOP {
        same(&fx, case);
    }
    for (n, case) in TRACE_FILE.iter().enumerate() {
        same_in_dir_copies(&fx, n, case);
    }
    assert_all_same();
}

/// The `qemu-img` on PATH, by its full path.
fn qemu_img_path() -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("qemu-img"))
        .find(|p| p.is_file())
        .expect("qemu-img must be installed")
}

/// Run `prog` by path (argv[0] as given) and read its output with the path
/// written ARGV0.
fn by_path(dir: &Path, prog: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let p = prog.to_string_lossy();
    let clean = |b: &[u8]| String::from_utf8_lossy(b).replace(&*p, "ARGV0");
    (o.status.code(), clean(&o.stdout), clean(&o.stderr))
}

#[test]
fn a_strata_named_qemu_img_names_itself_by_the_path_it_was_run_by() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let link = dir.path().join("qemu-img");
    std::os::unix::fs::symlink(common::STRATA, &link).unwrap();
    let real = qemu_img_path();
    for case in [
        &[][..],
        &["foo"],
        &["-q"],
        &["--trace"],
        &["-T", "x"],
        &["info"],
        &["info", "-f"],
    ] {
        let (ours, theirs) = (
            by_path(dir.path(), &link, case),
            by_path(dir.path(), &real, case),
        );
        if ours != theirs {
            differs(format!(
                "{case:?}\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
            ));
        }
    }
    assert_all_same();
}

/// Help and version: each tool's own text, on stdout, exit 0, after any trace
/// warnings; `-T help` lists the events on stdout (strata has none) and exits 0.
#[test]
fn help_version_and_the_event_list_exit_0_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    std::fs::write(dir.path().join("evh.txt"), "a\nhelp\nb\n").unwrap();
    // (arguments, whether they ask for the event list)
    let cases: &[(&[&str], bool)] = &[
        (&["-h"], false),
        (&["--help"], false),
        (&["--he"], false),
        (&["-h", "foo"], false),
        (&["-hq"], false),
        (&["-V"], false),
        (&["--version"], false),
        (&["--v"], false),
        (&["-T", "x", "-h"], false),
        (&["-T", "x", "--version"], false),
        (&["-T", "help"], true),
        (&["--trace=help"], true),
        (&["-T", "enable=?"], true),
        (&["-T", "events=evh.txt", "info"], true),
    ];
    for &(case, lists) in cases {
        let (ours, theirs) = (
            common::outcome(dir.path(), "strata", case),
            common::outcome(dir.path(), "qemu-img", case),
        );
        // The code and stderr are the same; stdout is each tool's own.
        if (ours.0, &ours.2) != (theirs.0, &theirs.2) || ours.0 != Some(0) {
            differs(format!(
                "{case:?}\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
            ));
        }
        if lists {
            // strata has no trace events; qemu-img lists its own.
            assert!(ours.1.is_empty(), "{case:?}: {}", ours.1);
            assert!(!theirs.1.is_empty(), "{case:?}");
        } else {
            assert!(!ours.1.is_empty() && !theirs.1.is_empty(), "{case:?}");
        }
    }
    assert_all_same();
}

/// `prog args` in `dir` with stdout and stderr on one file, as `2>&1` merges them.
fn merged(dir: &Path, prog: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = dir.join(".merged");
    let f = std::fs::File::create(&out).unwrap();
    let mut c = if prog == "strata" {
        let mut c = Command::new(common::STRATA);
        c.arg("img");
        c
    } else {
        Command::new(prog)
    };
    let status = c
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .status()
        .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"));
    let text = std::fs::read_to_string(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    (status.code(), text.replace("strata img", "qemu-img"))
}

/// `-p` commands that fail (and two that succeed, for the newline's place
/// after their last words), each tool in its own copy of the fixture.
const PROGRESS: &[&str] = &[
    "convert -p -n -O raw a.qcow2 missing.raw",
    "convert -p -O raw nothere.qcow2 o.raw",
    "convert -p -O raw -f raw nothere o.raw",
    "convert -p -O qcow2 -o bogus=1 a.qcow2 o.qcow2",
    "convert -p -O raw a.qcow2 /nonexistent/o.raw",
    "commit -p nothere.qcow2",
    "commit -p a.qcow2",
    "commit -p -b x.qcow2 t.qcow2",
    "rebase -p -b nothere.qcow2 -F qcow2 t.qcow2",
    "rebase -p -b a.qcow2 -F qcow2 nothere.qcow2",
    "rebase -p -u -b a.qcow2 nothere.qcow2",
    "compare -p a.qcow2 nothere.qcow2",
    "compare -p nothere.qcow2 a.qcow2",
    "compare -p a.qcow2 a.qcow2",
    "amend -p -o compat=0.10 nothere.qcow2",
    "amend -p -o bogus=1 a.qcow2",
    "amend -p -o compat=0.10 r64.qcow2",
    "amend -p -o size=512k a.qcow2",
];

#[test]
fn a_failing_progress_command_ends_its_line_after_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let fx = dir.path().join("fx");
    std::fs::create_dir(&fx).unwrap();
    fixture(&fx);
    common::qcow2(&fx, "t.qcow2", "1M", &["-b", "a.qcow2", "-F", "qcow2"]);
    common::qcow2(&fx, "r64.qcow2", "1M", &["-o", "refcount_bits=64"]);
    for (n, case) in PROGRESS.iter().enumerate() {
        let args: Vec<&str> = case.split_whitespace().collect();
        let (o, t) = (
            dir.path().join(format!("o{n}")),
            dir.path().join(format!("t{n}")),
        );
        common::copy_dir(&fx, &o);
        common::copy_dir(&fx, &t);
        let (ours, theirs) = (merged(&o, "strata", &args), merged(&t, "qemu-img", &args));
        if ours != theirs {
            differs(format!(
                "`{case}` 2>&1\n  strata:   {ours:?}\n  qemu-img: {theirs:?}"
            ));
        }
    }
    assert_all_same();
}
