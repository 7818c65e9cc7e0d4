//! Live operations under a continuous writer: internal snapshots, external
//! snapshots, commits and streams taken while a client writes a known sequence.
//! Every snapshot must hold exactly a prefix of the writes - at least all those
//! acknowledged before the operation was asked for, at most those sent before it
//! answered - and the final image must hold every acknowledged write.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use strata_chain::OpenSpec;
use strata_format::BlockDevice;

const BLOCK: u64 = 4096;
const NBLK: u64 = 384;

/// The block write `i` goes to (a permutation-like walk over the region, so
/// writes hit partial clusters, new clusters and rewrites).
fn block_of(i: u64) -> u64 {
    (i * 7919 + i / NBLK) % NBLK
}

/// The content of write `i`: its sequence number (1-based) then a filler.
fn content(i: u64) -> Vec<u8> {
    let mut b = vec![(i % 251) as u8; BLOCK as usize];
    b[..8].copy_from_slice(&(i + 1).to_le_bytes());
    b
}

/// The region's expected content after the first `p` writes.
fn state_after(p: u64) -> Vec<u64> {
    let mut s = vec![0u64; NBLK as usize];
    for i in 0..p {
        s[block_of(i) as usize] = i + 1;
    }
    s
}

/// Read the region from a device and decode each block's sequence number,
/// checking the filler (a torn block fails here).
fn observe(dev: &dyn BlockDevice) -> Vec<u64> {
    let mut buf = vec![0u8; (NBLK * BLOCK) as usize];
    dev.read(&mut buf, 0).unwrap();
    buf.chunks(BLOCK as usize)
        .enumerate()
        .map(|(b, c)| {
            let seq = u64::from_le_bytes(c[..8].try_into().unwrap());
            if seq == 0 {
                assert!(c.iter().all(|&x| x == 0), "block {b}: torn zero block");
            } else {
                assert_eq!(c, &content(seq - 1)[..], "block {b}: torn write {seq}");
            }
            seq
        })
        .collect()
}

/// The snapshot must be the state after some prefix p with lo <= p <= hi.
fn check_prefix(what: &str, seen: &[u64], lo: u64, hi: u64) -> u64 {
    let p = seen.iter().copied().max().unwrap_or(0);
    assert_eq!(
        seen,
        &state_after(p)[..],
        "{what}: not a prefix of the writes"
    );
    assert!(
        lo <= p && p <= hi,
        "{what}: holds {p} writes, expected between {lo} (acknowledged before) and {hi} (sent before the answer)"
    );
    p
}

fn open_chain(path: &Path) -> strata_chain::Chain {
    strata_chain::open(&OpenSpec::new(path).force_share(true)).unwrap()
}

/// The internal snapshot `name` of `path`, read through `path`'s backing chain.
fn observe_internal(path: &Path, name: &str) -> Vec<u64> {
    let chain = open_chain(path);
    let devices = strata_jobs::snapshot::view_chain(&chain.devices(), name).unwrap();
    observe(devices[0].as_ref())
}

struct Writer {
    sent: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

fn start_writer(sock: PathBuf, mode: Mode) -> Writer {
    let sent = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (s, a, st) = (sent.clone(), acked.clone(), stop.clone());
    let handle = std::thread::spawn(move || {
        let mut c = Client::connect(&sock, "disk", mode, &[]);
        let mut i = 0u64;
        while !st.load(Ordering::SeqCst) {
            s.store(i + 1, Ordering::SeqCst);
            c.write(block_of(i) * BLOCK, &content(i))
                .unwrap_or_else(|e| panic!("write {i} failed with {e}"));
            i += 1;
            a.store(i, Ordering::SeqCst);
        }
        c.disconnect();
        i
    });
    Writer {
        sent,
        acked,
        stop,
        handle,
    }
}

#[test]
fn snapshots_commits_and_streams_under_a_writer_keep_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qcow2(&base, "16M");
    let srv = TestServer::start(dir.path(), vec![cfg("disk", &base)]);
    let export = srv.export(0).clone();
    let writer = start_writer(srv.sock.clone(), Mode::Structured);
    // A second client reads all along: its reads must never fail.
    let reader_stop = Arc::new(AtomicBool::new(false));
    let rs = reader_stop.clone();
    let rsock = srv.sock.clone();
    let reader = std::thread::spawn(move || {
        let mut c = Client::connect(&rsock, "disk", Mode::Extended, &["base:allocation"]);
        let mut n = 0u64;
        while !rs.load(Ordering::SeqCst) {
            c.read(0, NBLK * BLOCK).expect("concurrent read");
            let r = c.call(0, strata_nbd::proto::CMD_BLOCK_STATUS, 0, 16 << 20, &[]);
            assert_eq!(r.error, 0, "{}", r.message);
            n += 1;
        }
        c.disconnect();
        n
    });
    let wait_for = |n: u64| {
        while writer.acked.load(Ordering::SeqCst) < n {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };
    let mut points = 0;
    let mut last = 0u64;
    let mut overlays = 0;
    let (mut commits, mut streams) = (0, 0);
    for k in 0..40u32 {
        // Let the writer make progress between operations.
        wait_for(last + 25);
        let depth = export.info().chain.len();
        // Over ten steps the chain grows to three images, a commit merges the
        // top into the middle one, it grows again, and a stream flattens it.
        let op = match k % 10 {
            0 | 2 | 4 | 6 | 8 => "snapshot",
            1 | 3 | 7 => "external",
            5 => "commit",
            _ => "stream",
        };
        let op = if (op == "commit" || op == "stream") && depth < 2 {
            "external"
        } else {
            op
        };
        let lo = writer.acked.load(Ordering::SeqCst);
        match op {
            "snapshot" => {
                let name = format!("s{k}");
                export.snapshot(&name).unwrap();
                let hi = writer.sent.load(Ordering::SeqCst);
                let top = PathBuf::from(&export.info().chain[0].path);
                let seen = observe_internal(&top, &name);
                last = check_prefix(&format!("snapshot {name}"), &seen, lo, hi);
                points += 1;
            }
            "external" => {
                overlays += 1;
                let ov = dir.path().join(format!("ov{overlays}.qcow2"));
                export.snapshot_external(&ov).unwrap();
                let hi = writer.sent.load(Ordering::SeqCst);
                let info = export.info();
                assert_eq!(PathBuf::from(&info.chain[0].path), ov);
                // The old top is frozen now: read it (with its chain) while the
                // writer goes on into the overlay.
                let frozen = open_chain(Path::new(&info.chain[1].path));
                let seen = observe(frozen.top().as_ref());
                last = check_prefix(&format!("external snapshot {k}"), &seen, lo, hi);
                points += 1;
            }
            "commit" => {
                export.commit().unwrap();
                commits += 1;
                assert_eq!(export.info().chain.len(), depth - 1);
            }
            "stream" => {
                export.stream().unwrap();
                streams += 1;
                assert_eq!(export.info().chain.len(), 1);
            }
            _ => unreachable!(),
        }
    }
    assert!(points >= 30, "only {points} snapshot points");
    assert_eq!((commits, streams), (4, 4));
    writer.stop.store(true, Ordering::SeqCst);
    let total = writer.handle.join().unwrap();
    reader_stop.store(true, Ordering::SeqCst);
    let reads = reader.join().unwrap();
    assert!(reads > 0);
    let top = PathBuf::from(&export.info().chain[0].path);
    drop(export);
    srv.stop_and_release();
    // The final image holds every write, and every file of the chain checks clean.
    let chain = open_chain(&top);
    assert_eq!(observe(chain.top().as_ref()), state_after(total));
    for l in &chain.layers {
        ok("qemu-img", &["check", "-U", l.path.to_str().unwrap()]);
    }
    drop(chain);
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "qcow2") {
            ok("qemu-img", &["check", p.to_str().unwrap()]);
        }
    }
}
