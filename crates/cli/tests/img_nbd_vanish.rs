//! An NBD server that vanishes (SIGKILL) under `info`, `map`, `compare` and
//! `convert` of its export, qemu-nbd and `strata nbd serve` alike. Where the
//! outcome does not depend on timing (the server gone before the command
//! starts), both tools print the same bytes. Where it does (killed while the
//! command runs), each command ends within a bound, never panics, and either
//! succeeds with the output of an undisturbed run or fails (exit 1; 2, 3 or
//! 4 for compare) in
//! qemu-img's words, which qemu-img itself is checked to use.

mod common;

use common::nbd::{NbdServer, Server, SERVERS};
use common::{assert_all_same, same, STRATA};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Size of the served image in MiB (`STRATA_TEST_VANISH_MB`, 64 by default):
/// large enough that a copy is still running when the server is killed.
fn image_mib() -> usize {
    std::env::var("STRATA_TEST_VANISH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// How long a command may run once its server is gone before it counts as hung.
const BOUND: Duration = Duration::from_secs(30);

/// Serve `d/img.raw` as export `e` on `d/s.sock`.
fn serve(d: &Path, server: Server) -> NbdServer {
    let sock = d.join("s.sock");
    let sock = sock.to_str().unwrap();
    NbdServer::start(
        server,
        &["-f", "raw", "-x", "e", "-k", sock],
        &d.join("img.raw"),
        sock,
    )
}

fn url(d: &Path) -> String {
    format!("nbd+unix:///e?socket={}", d.join("s.sock").display())
}

/// Run `prog` (`strata` for `strata img`) with `args` in `d`, its output to
/// files; call `during` once it runs; fail if it outlives [`BOUND`] after that.
/// Returns exit code, stdout, stderr (program name read as `PROG:`).
fn run_bounded(
    d: &Path,
    prog: &str,
    args: &[&str],
    during: &mut dyn FnMut(),
) -> (Option<i32>, String, String) {
    let mut c = if prog == "strata" {
        let mut c = Command::new(STRATA);
        c.arg("img");
        c
    } else {
        Command::new(prog)
    };
    let (out, err) = (d.join("stdout"), d.join("stderr"));
    let mut child = c
        .args(args)
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{prog} must be installed: {e}"));
    during();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{prog} {args:?} still ran {BOUND:?} after its NBD server was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&err)
        .unwrap()
        .replace("strata img:", "PROG:")
        .replace("qemu-img:", "PROG:");
    (
        status.code(),
        std::fs::read_to_string(&out).unwrap(),
        stderr,
    )
}

/// Whether every line of `stderr` is one of qemu-img's words for an export
/// whose server went away mid-command.
fn worded_as_qemu_img(stderr: &str) -> bool {
    !stderr.is_empty()
        && stderr.lines().all(|l| {
            let l = l.strip_prefix("PROG: ").unwrap_or("");
            let tail = |p: &str| {
                l.strip_prefix(p)
                    .and_then(|r| r.split_once(": "))
                    .is_some_and(|(n, why)| n.parse::<u64>().is_ok() && why == "Input/output error")
            };
            tail("error while reading at byte ")
                || tail("error while reading block status at offset ")
                || l.starts_with("Could not open '")
                || l.starts_with("Error while reading offset ")
                || l.starts_with("Sector allocation test failed for ")
                || l == "Could not read file metadata: Input/output error"
        })
}

fn image(d: &Path) {
    let mib = image_mib();
    let mut bytes = vec![0x5au8; mib << 20];
    // Holes every 4 MiB, so map has extents to walk.
    for (i, chunk) in bytes.chunks_mut(4 << 20).enumerate() {
        if i % 2 == 1 {
            chunk[..1 << 20].fill(0);
        }
    }
    std::fs::write(d.join("img.raw"), &bytes).unwrap();
    std::fs::copy(d.join("img.raw"), d.join("copy.raw")).unwrap();
}

#[test]
fn a_server_killed_before_the_command_is_refused_as_qemu_img_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    image(d);
    for server in SERVERS {
        let mut srv = serve(d, server);
        srv.kill();
        let u = url(d);
        for args in [
            vec!["info", &u],
            vec!["info", "--output=json", &u],
            vec!["map", "--output=json", &u],
            vec!["compare", &u, "copy.raw"],
            vec!["convert", "-O", "raw", &u, "out.raw"],
            vec![
                "convert",
                "-t",
                "writeback",
                "-p",
                "-O",
                "raw",
                &u,
                "out.raw",
            ],
        ] {
            same(d, &args);
        }
        let _ = std::fs::remove_file(d.join("s.sock"));
        assert_all_same();
    }
}

#[test]
fn a_server_killed_mid_command_ends_it_with_a_clear_error_never_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    image(d);
    let (mut kills, mut cut_reads) = (0, 0);
    for server in SERVERS {
        let u = url(d);
        let usages: [Vec<&str>; 4] = [
            vec!["convert", "-O", "raw", &u, "out.raw"],
            vec!["compare", &u, "copy.raw"],
            vec!["map", "--output=json", &u],
            vec!["info", "--output=json", &u],
        ];
        for args in &usages {
            // What an undisturbed run prints.
            let clean = {
                let _srv = serve(d, server);
                run_bounded(d, "strata", args, &mut || {})
            };
            assert_eq!(clean.0, Some(0), "{args:?}: {clean:?}");
            for delay_ms in [0u64, 30, 150] {
                for prog in ["strata", "qemu-img"] {
                    let _ = std::fs::remove_file(d.join("out.raw"));
                    let mut srv = serve(d, server);
                    let got = run_bounded(d, prog, args, &mut || {
                        std::thread::sleep(Duration::from_millis(delay_ms));
                        srv.kill();
                    });
                    kills += 1;
                    let what = format!("{prog} {args:?} ({server:?} killed after {delay_ms} ms)");
                    assert!(!got.2.contains("panicked"), "{what}: {got:?}");
                    if prog == "strata" && got.2.contains("error while reading at byte") {
                        cut_reads += 1;
                    }
                    // compare fails with 2 opening, 3 asking allocation, 4
                    // reading (1 means "different"); the others with 1.
                    let failed: &[i32] = if args[0] == "compare" {
                        &[2, 3, 4]
                    } else {
                        &[1]
                    };
                    match got.0 {
                        Some(0) => assert_eq!(got.1, clean.1, "{what}"),
                        Some(c) if failed.contains(&c) => {
                            assert!(worded_as_qemu_img(&got.2), "{what}: {got:?}")
                        }
                        _ => panic!("{what}: {got:?}"),
                    }
                    let _ = std::fs::remove_file(d.join("s.sock"));
                }
            }
        }
    }
    assert!(kills >= 48);
    // Some kills must have cut a copy mid-read, or nothing above was tested.
    assert!(cut_reads > 0, "no kill landed while a copy was reading");
}
