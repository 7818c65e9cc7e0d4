//! Load: 32 clients against one `strata serve` on loopback at once, each
//! looping create → upload a random body (64 KiB–4 MiB, seeded per client) →
//! read the record → download whole and by one `Range` → compare bytes and the
//! record's md5/sha512 with ones computed here; every few rounds a client lists
//! a page and deletes its oldest image (then sees 404 for it). Every status
//! code must be the expected one, every checksum right, a floor of rounds must
//! be done, and the server's peak RSS (VmHWM) must stay under a bound that does
//! not grow with the data moved.
//!
//! `STRATA_LOAD_SECS` sets the duration; the default is 60 s (on a shared
//! 2-core machine the whole test takes about 62 s, about 1 300 rounds and
//! 6 GiB moved).

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::api::{connect, head, read_reply, token, Reply, Server};
use md5::{Digest, Md5};
use sha2::Sha512;

const CLIENTS: u64 = 32;
const MIN_BODY: u64 = 64 << 10;
const MAX_BODY: u64 = 4 << 20;
const OCTETS: Option<&str> = Some("application/octet-stream");
/// Rounds (create + upload + 2 downloads) per second all clients together must
/// at least finish; about 22 are done on a shared 2-core machine.
const MIN_ROUNDS_PER_SEC: u64 = 2;
/// Peak server RSS allowed. Observed 48 MiB after 2.4 GiB moved and 63 MiB
/// after 6 GiB with 32 clients: the bound, about twice that, is a constant that
/// does not depend on the duration or the data moved.
const MAX_HWM_KIB: u64 = 128 << 10;
/// Images a client keeps before deleting its oldest (bounds the disk used).
const KEPT: usize = 3;

/// xorshift64*: a small seeded generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn expect(r: &Reply, want: u16, what: &str) {
    assert_eq!(
        r.status,
        want,
        "{what}: {}",
        String::from_utf8_lossy(&r.body[..r.body.len().min(400)])
    );
}

/// `GET path` with a `Range: bytes=a-b` header.
fn get_range(srv: &Server, tok: &str, path: &str, a: u64, b: u64) -> Reply {
    let mut s = connect(srv.addr);
    let h = head("GET", path, Some(tok), None, None);
    let h = format!(
        "{}Range: bytes={a}-{b}\r\n\r\n",
        h.strip_suffix("\r\n").unwrap()
    );
    s.write_all(h.as_bytes()).unwrap();
    read_reply(&mut s)
}

/// The peak resident set of process `pid` in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// One client's loop until `until`; counts finished rounds in `rounds` and
/// bytes moved in `moved`.
fn client(
    srv: &Server,
    tok: &str,
    seed: u64,
    until: Instant,
    rounds: &AtomicU64,
    moved: &AtomicU64,
) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut kept: Vec<String> = Vec::new();
    let mut n = 0u64;
    while Instant::now() < until {
        let name = format!("load-{seed}-{n}");
        let img = srv.create(
            tok,
            &serde_json::json!({"name": name, "disk_format": "raw", "container_format": "bare"}),
        );
        let id = img["id"].as_str().unwrap().to_string();
        let path = format!("/v2/images/{id}/file");
        let len = MIN_BODY + rng.below(MAX_BODY - MIN_BODY + 1);
        let body = rng.bytes(len as usize);
        let r = srv.req("PUT", &path, Some(tok), OCTETS, &body);
        expect(&r, 204, "upload");

        let rec = srv.req("GET", &format!("/v2/images/{id}"), Some(tok), None, b"");
        expect(&rec, 200, "show");
        let rec = rec.json();
        assert_eq!(rec["status"], "active", "{rec}");
        assert_eq!(rec["size"], len, "{rec}");
        assert_eq!(rec["checksum"], hex(&Md5::digest(&body)), "md5 of {id}");
        assert_eq!(rec["os_hash_algo"], "sha512", "{rec}");
        assert_eq!(
            rec["os_hash_value"],
            hex(&Sha512::digest(&body)),
            "sha512 of {id}"
        );

        let whole = srv.req("GET", &path, Some(tok), None, b"");
        expect(&whole, 200, "download");
        assert!(whole.body == body, "download of {id} differs");

        let a = rng.below(len);
        let b = a + rng.below(len - a);
        let part = get_range(srv, tok, &path, a, b);
        expect(&part, 206, "range download");
        assert_eq!(
            part.header("content-range"),
            Some(format!("bytes {a}-{b}/{len}"))
        );
        assert!(
            part.body[..] == body[a as usize..=b as usize],
            "range {a}-{b} of {id} differs"
        );

        kept.push(id);
        n += 1;
        if n.is_multiple_of(4) {
            let page = srv.req("GET", "/v2/images?limit=25", Some(tok), None, b"");
            expect(&page, 200, "list");
            let page = page.json();
            let shown = page["images"].as_array().expect("images array").len();
            assert!((1..=25).contains(&shown), "{shown} images in a page");
        }
        if kept.len() > KEPT {
            let old = kept.remove(0);
            let r = srv.req("DELETE", &format!("/v2/images/{old}"), Some(tok), None, b"");
            expect(&r, 204, "delete");
            let r = srv.req("GET", &format!("/v2/images/{old}"), Some(tok), None, b"");
            expect(&r, 404, "show after delete");
        }
        rounds.fetch_add(1, Ordering::Relaxed);
        moved.fetch_add(len * 2 + (b - a + 1), Ordering::Relaxed);
    }
}

#[test]
fn thirty_two_clients_upload_and_download_with_right_checksums_and_bounded_server_memory() {
    let secs: u64 = std::env::var("STRATA_LOAD_SECS")
        .ok()
        .map(|s| s.parse().expect("STRATA_LOAD_SECS is a number of seconds"))
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let tok = token(dir.path(), false);
    let srv = Server::start(dir.path(), &[]);
    let rounds = AtomicU64::new(0);
    let moved = AtomicU64::new(0);
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    std::thread::scope(|s| {
        for seed in 0..CLIENTS {
            let (srv, tok, rounds, moved) = (&srv, &tok, &rounds, &moved);
            s.spawn(move || client(srv, tok, seed, until, rounds, moved));
        }
    });
    let rounds = rounds.into_inner();
    let moved = moved.into_inner();
    let hwm = peak_rss_kib(srv.pid());
    eprintln!(
        "{rounds} rounds, {} MiB moved in {:.1} s, server peak RSS {} MiB",
        moved >> 20,
        start.elapsed().as_secs_f64(),
        hwm >> 10
    );
    let floor = MIN_ROUNDS_PER_SEC * secs.max(1);
    assert!(
        rounds >= floor,
        "only {rounds} rounds in {secs} s (floor {floor})"
    );
    assert!(
        hwm < MAX_HWM_KIB,
        "server peak RSS {hwm} KiB over the bound {MAX_HWM_KIB} KiB"
    );
}
