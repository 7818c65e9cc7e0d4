//! Malformed and out-of-range requests: each gets the answer the NBD
//! specification prescribes (an error code, an option error, or the hard
//! disconnect it allows), while a second, well-behaved client keeps working
//! after every case.

mod common;
use common::*;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use strata_nbd::proto::*;

const SIZE: u64 = 16 << 20;

struct Env<'a> {
    sock: &'a Path,
}

impl Env<'_> {
    fn neg(&self) -> UnixStream {
        Client::negotiating(self.sock)
    }
    fn simple(&self, export: &str) -> Client {
        Client::connect(self.sock, export, Mode::Simple, &[])
    }
    fn structured(&self, export: &str) -> Client {
        Client::connect(self.sock, export, Mode::Structured, &[])
    }
    fn extended(&self, export: &str) -> Client {
        Client::connect(self.sock, export, Mode::Extended, &[])
    }
}

/// Send one option and return the reply type.
fn opt(s: &mut UnixStream, o: u32, data: &[u8]) -> u32 {
    Client::send_opt(s, o, data);
    let (ro, typ, _) = Client::opt_reply(s).expect("option reply");
    assert_eq!(ro, o, "reply to another option");
    typ
}

fn expect_err(c: &mut Client, flags: u16, typ: u16, off: u64, len: u64, payload: &[u8], e: u32) {
    let r = c.call(flags, typ, off, len, payload);
    assert_eq!(
        r.error, e,
        "expected error {e}, got {} ({})",
        r.error, r.message
    );
    if c.mode == Mode::Structured && typ == CMD_READ {
        assert!(!r.simple, "a read error must come as a structured chunk");
    }
    // The connection goes on: a good read still works.
    c.read(0, 4096).expect("connection usable after the error");
}

type Case = (&'static str, fn(&Env));

fn cases() -> Vec<Case> {
    vec![
        ("unknown client flags: server closes", |e| {
            let mut s = Client::greet(e.sock);
            s.write_all(&u32be(1 << 7)).unwrap();
            assert!(Client::closed(&mut s));
        }),
        ("bad option magic: hard disconnect", |e| {
            let mut s = e.neg();
            s.write_all(&[0u8; 16]).unwrap();
            assert!(Client::closed(&mut s));
        }),
        ("option longer than 64 KiB: hard disconnect", |e| {
            let mut s = e.neg();
            let mut m = IHAVEOPT.to_be_bytes().to_vec();
            m.extend_from_slice(&OPT_GO.to_be_bytes());
            m.extend_from_slice(&u32be(1 << 30));
            s.write_all(&m).unwrap();
            assert!(Client::closed(&mut s));
        }),
        ("unknown option: ERR_UNSUP, haggling goes on", |e| {
            let mut s = e.neg();
            assert_eq!(opt(&mut s, 99, b"xyz"), REP_ERR_UNSUP);
            assert_eq!(opt(&mut s, OPT_STRUCTURED_REPLY, &[]), REP_ACK);
        }),
        ("LIST with data: ERR_INVALID", |e| {
            let mut s = e.neg();
            assert_eq!(opt(&mut s, OPT_LIST, b"x"), REP_ERR_INVALID);
        }),
        ("INFO with a name longer than the data: ERR_INVALID", |e| {
            let mut s = e.neg();
            let mut d = u32be(100).to_vec();
            d.extend_from_slice(b"disk");
            assert_eq!(opt(&mut s, OPT_INFO, &d), REP_ERR_INVALID);
        }),
        ("INFO with trailing bytes: ERR_INVALID", |e| {
            let mut s = e.neg();
            let mut d = Client::go_data("disk", &[]);
            d.push(0);
            assert_eq!(opt(&mut s, OPT_INFO, &d), REP_ERR_INVALID);
        }),
        ("INFO for an unknown export: ERR_UNKNOWN", |e| {
            let mut s = e.neg();
            assert_eq!(
                opt(&mut s, OPT_INFO, &Client::go_data("nope", &[])),
                REP_ERR_UNKNOWN
            );
        }),
        (
            "GO for an unknown export: ERR_UNKNOWN, then a good GO works",
            |e| {
                let mut s = e.neg();
                assert_eq!(
                    opt(&mut s, OPT_GO, &Client::go_data("nope", &[])),
                    REP_ERR_UNKNOWN
                );
                Client::send_opt(&mut s, OPT_GO, &Client::go_data("disk", &[]));
                loop {
                    let (_, t, _) = Client::opt_reply(&mut s).unwrap();
                    if t == REP_ACK {
                        break;
                    }
                    assert_eq!(t, REP_INFO);
                }
            },
        ),
        ("STRUCTURED_REPLY with data: ERR_INVALID", |e| {
            let mut s = e.neg();
            assert_eq!(opt(&mut s, OPT_STRUCTURED_REPLY, b"x"), REP_ERR_INVALID);
        }),
        ("EXTENDED_HEADERS with data: ERR_INVALID", |e| {
            let mut s = e.neg();
            assert_eq!(opt(&mut s, OPT_EXTENDED_HEADERS, b"xy"), REP_ERR_INVALID);
        }),
        (
            "STRUCTURED_REPLY after EXTENDED_HEADERS: ERR_EXT_HEADER_REQD",
            |e| {
                let mut s = e.neg();
                assert_eq!(opt(&mut s, OPT_EXTENDED_HEADERS, &[]), REP_ACK);
                assert_eq!(
                    opt(&mut s, OPT_STRUCTURED_REPLY, &[]),
                    REP_ERR_EXT_HEADER_REQD
                );
            },
        ),
        (
            "SET_META_CONTEXT before structured replies: ERR_INVALID",
            |e| {
                let mut s = e.neg();
                let d = Client::meta_data("disk", &["base:allocation"]);
                assert_eq!(opt(&mut s, OPT_SET_META_CONTEXT, &d), REP_ERR_INVALID);
            },
        ),
        (
            "SET_META_CONTEXT with a query count past the data: ERR_INVALID",
            |e| {
                let mut s = e.neg();
                assert_eq!(opt(&mut s, OPT_STRUCTURED_REPLY, &[]), REP_ACK);
                let mut d = Client::meta_data("disk", &["base:allocation"]);
                d[8..12].copy_from_slice(&u32be(5));
                assert_eq!(opt(&mut s, OPT_SET_META_CONTEXT, &d), REP_ERR_INVALID);
            },
        ),
        ("SET_META_CONTEXT for an unknown export: ERR_UNKNOWN", |e| {
            let mut s = e.neg();
            assert_eq!(opt(&mut s, OPT_STRUCTURED_REPLY, &[]), REP_ACK);
            let d = Client::meta_data("nope", &["base:allocation"]);
            assert_eq!(opt(&mut s, OPT_SET_META_CONTEXT, &d), REP_ERR_UNKNOWN);
        }),
        ("META_CONTEXT query without a namespace: ERR_INVALID", |e| {
            let mut s = e.neg();
            assert_eq!(opt(&mut s, OPT_STRUCTURED_REPLY, &[]), REP_ACK);
            let d = Client::meta_data("disk", &["allocation"]);
            assert_eq!(opt(&mut s, OPT_LIST_META_CONTEXT, &d), REP_ERR_INVALID);
        }),
        ("unknown namespace selects nothing: plain ACK", |e| {
            let mut s = e.neg();
            assert_eq!(opt(&mut s, OPT_STRUCTURED_REPLY, &[]), REP_ACK);
            let d = Client::meta_data("disk", &["x-unknown:thing"]);
            assert_eq!(opt(&mut s, OPT_SET_META_CONTEXT, &d), REP_ACK);
        }),
        ("STARTTLS without TLS configured: ERR_UNSUP", |e| {
            let mut s = e.neg();
            assert_eq!(opt(&mut s, OPT_STARTTLS, &[]), REP_ERR_UNSUP);
        }),
        ("EXPORT_NAME of an unknown export: hard disconnect", |e| {
            let mut s = e.neg();
            Client::send_opt(&mut s, OPT_EXPORT_NAME, b"nope");
            assert!(Client::closed(&mut s));
        }),
        ("EXPORT_NAME after EXTENDED_HEADERS: hard disconnect", |e| {
            let mut s = e.neg();
            assert_eq!(opt(&mut s, OPT_EXTENDED_HEADERS, &[]), REP_ACK);
            Client::send_opt(&mut s, OPT_EXPORT_NAME, b"disk");
            assert!(Client::closed(&mut s));
        }),
        ("ABORT: ACK, then the server closes", |e| {
            let mut s = e.neg();
            assert_eq!(opt(&mut s, OPT_ABORT, &[]), REP_ACK);
            assert!(Client::closed(&mut s));
        }),
        ("option truncated by a vanishing client", |e| {
            let mut s = e.neg();
            let mut m = IHAVEOPT.to_be_bytes().to_vec();
            m.extend_from_slice(&OPT_GO.to_be_bytes());
            m.extend_from_slice(&u32be(100));
            m.extend_from_slice(b"dis");
            s.write_all(&m).unwrap();
            drop(s);
        }),
        ("read past the end: EINVAL", |e| {
            expect_err(
                &mut e.simple("disk"),
                0,
                CMD_READ,
                SIZE - 512,
                1024,
                &[],
                EINVAL,
            )
        }),
        ("read whose end overflows 64 bits: EINVAL", |e| {
            expect_err(
                &mut e.extended("disk"),
                0,
                CMD_READ,
                u64::MAX - 10,
                4096,
                &[],
                EINVAL,
            )
        }),
        ("write past the end: ENOSPC, payload consumed", |e| {
            expect_err(
                &mut e.simple("disk"),
                0,
                CMD_WRITE,
                SIZE - 512,
                1024,
                &[7u8; 1024],
                ENOSPC,
            )
        }),
        ("write zeroes past the end: ENOSPC", |e| {
            expect_err(
                &mut e.simple("disk"),
                0,
                CMD_WRITE_ZEROES,
                SIZE,
                4096,
                &[],
                ENOSPC,
            )
        }),
        ("trim past the end: EINVAL", |e| {
            expect_err(
                &mut e.simple("disk"),
                0,
                CMD_TRIM,
                SIZE - 4096,
                8192,
                &[],
                EINVAL,
            )
        }),
        ("cache past the end: EINVAL", |e| {
            expect_err(&mut e.simple("disk"), 0, CMD_CACHE, SIZE, 1, &[], EINVAL)
        }),
        ("unknown command: EINVAL", |e| {
            expect_err(&mut e.simple("disk"), 0, 42, 0, 4096, &[], EINVAL)
        }),
        ("unknown command flag: EINVAL", |e| {
            expect_err(
                &mut e.structured("disk"),
                1 << 9,
                CMD_READ,
                0,
                4096,
                &[],
                EINVAL,
            )
        }),
        ("NO_HOLE on a write: EINVAL", |e| {
            expect_err(
                &mut e.simple("disk"),
                CMD_FLAG_NO_HOLE,
                CMD_WRITE,
                0,
                512,
                &[1u8; 512],
                EINVAL,
            )
        }),
        ("DF without structured replies: EINVAL", |e| {
            expect_err(
                &mut e.simple("disk"),
                CMD_FLAG_DF,
                CMD_READ,
                0,
                4096,
                &[],
                EINVAL,
            )
        }),
        ("REQ_ONE on a read: EINVAL", |e| {
            expect_err(
                &mut e.structured("disk"),
                CMD_FLAG_REQ_ONE,
                CMD_READ,
                0,
                4096,
                &[],
                EINVAL,
            )
        }),
        ("FAST_ZERO on a trim: EINVAL", |e| {
            expect_err(
                &mut e.simple("disk"),
                CMD_FLAG_FAST_ZERO,
                CMD_TRIM,
                0,
                4096,
                &[],
                EINVAL,
            )
        }),
        ("flush with an offset: EINVAL", |e| {
            expect_err(&mut e.simple("disk"), 0, CMD_FLUSH, 4096, 0, &[], EINVAL)
        }),
        (
            "read larger than 32 MiB: EOVERFLOW, in an error chunk",
            |e| {
                let mut c = e.structured("big");
                expect_err(&mut c, 0, CMD_READ, 0, (32 << 20) + 4096, &[], EOVERFLOW)
            },
        ),
        ("block status without a negotiated context: EINVAL", |e| {
            expect_err(
                &mut e.structured("disk"),
                0,
                CMD_BLOCK_STATUS,
                0,
                4096,
                &[],
                EINVAL,
            )
        }),
        ("block status of length zero: EINVAL", |e| {
            let mut c = Client::connect(e.sock, "disk", Mode::Structured, &["base:allocation"]);
            expect_err(&mut c, 0, CMD_BLOCK_STATUS, 0, 0, &[], EINVAL)
        }),
        ("block status past the end: EINVAL", |e| {
            let mut c = Client::connect(e.sock, "disk", Mode::Extended, &["base:allocation"]);
            expect_err(&mut c, 0, CMD_BLOCK_STATUS, SIZE - 4096, 8192, &[], EINVAL)
        }),
        (
            "block status with a payload it does not take: EINVAL, payload consumed",
            |e| {
                let mut c = Client::connect(e.sock, "disk", Mode::Extended, &["base:allocation"]);
                let mut p = 4096u64.to_be_bytes().to_vec();
                p.extend_from_slice(&u32be(1));
                expect_err(
                    &mut c,
                    CMD_FLAG_PAYLOAD_LEN,
                    CMD_BLOCK_STATUS,
                    0,
                    12,
                    &p,
                    EINVAL,
                )
            },
        ),
        ("PAYLOAD_LEN in compact mode: EINVAL", |e| {
            expect_err(
                &mut e.structured("disk"),
                CMD_FLAG_PAYLOAD_LEN,
                CMD_READ,
                0,
                4096,
                &[],
                EINVAL,
            )
        }),
        ("write on a read-only export: EPERM", |e| {
            expect_err(
                &mut e.simple("ro"),
                0,
                CMD_WRITE,
                0,
                512,
                &[1u8; 512],
                EPERM,
            )
        }),
        ("write zeroes on a read-only export: EPERM", |e| {
            expect_err(
                &mut e.simple("ro"),
                0,
                CMD_WRITE_ZEROES,
                0,
                4096,
                &[],
                EPERM,
            )
        }),
        ("trim on a read-only export: EPERM", |e| {
            expect_err(&mut e.structured("ro"), 0, CMD_TRIM, 0, 4096, &[], EPERM)
        }),
        (
            "read misaligned to the 512-byte minimum block: EINVAL",
            |e| expect_err(&mut e.simple("aligned"), 0, CMD_READ, 100, 512, &[], EINVAL),
        ),
        (
            "write of a length off the minimum block: EINVAL, payload consumed",
            |e| {
                expect_err(
                    &mut e.simple("aligned"),
                    0,
                    CMD_WRITE,
                    512,
                    100,
                    &[3u8; 100],
                    EINVAL,
                )
            },
        ),
        ("write payload over 32 MiB: hard disconnect", |e| {
            let mut c = e.simple("disk");
            c.send(0, CMD_WRITE, 0, (32 << 20) + 512, &[]);
            assert!(Client::closed(&mut c.s));
        }),
        ("bad request magic: hard disconnect", |e| {
            let mut c = e.simple("disk");
            c.s.write_all(&[0x55u8; 28]).unwrap();
            assert!(Client::closed(&mut c.s));
        }),
        (
            "extended request with the compact magic: hard disconnect",
            |e| {
                let mut c = e.extended("disk");
                c.mode = Mode::Simple;
                c.send(0, CMD_READ, 0, 4096, &[]);
                assert!(Client::closed(&mut c.s));
            },
        ),
        ("request header truncated by a vanishing client", |e| {
            let mut c = e.simple("disk");
            c.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
            c.s.write_all(&[0u8; 6]).unwrap();
        }),
        ("write payload truncated by a vanishing client", |e| {
            let mut c = e.simple("disk");
            c.send(0, CMD_WRITE, 1 << 20, 65536, &[9u8; 1000]);
        }),
        (
            "vanishing with writes in flight: they are flushed, the image stays sound",
            |e| {
                let mut c = e.extended("disk");
                for i in 0..32u64 {
                    c.send(
                        CMD_FLAG_PAYLOAD_LEN,
                        CMD_WRITE,
                        (2 << 20) + i * 65536,
                        65536,
                        &[0x42u8; 65536],
                    );
                }
            },
        ),
        ("a zero-length read succeeds with no data", |e| {
            let mut c = e.structured("disk");
            let r = c.call(0, CMD_READ, 4096, 0, &[]);
            assert_eq!(r.error, 0);
            assert!(r.data.is_empty());
        }),
        (
            "FAST_ZERO write zeroes is served (zeroes are fast here)",
            |e| {
                let mut c = e.simple("disk");
                let r = c.call(
                    CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
                    CMD_WRITE_ZEROES,
                    3 << 20,
                    65536,
                    &[],
                );
                assert_eq!(r.error, 0);
            },
        ),
        (
            "FAST_ZERO over part of a cluster holding data: ENOTSUP, nothing changed",
            |e| {
                let mut c = e.structured("disk");
                let off = 5 << 20;
                c.write(off, &[0x77u8; 65536]).expect("write");
                expect_err(
                    &mut c,
                    CMD_FLAG_FAST_ZERO,
                    CMD_WRITE_ZEROES,
                    off + 512,
                    4096,
                    &[],
                    ENOTSUP,
                );
                assert_eq!(c.read(off, 65536).unwrap(), vec![0x77u8; 65536]);
                // Without the flag the same request writes the zeroes.
                let r = c.call(0, CMD_WRITE_ZEROES, off + 512, 4096, &[]);
                assert_eq!(r.error, 0);
                assert_eq!(c.read(off + 512, 4096).unwrap(), vec![0u8; 4096]);
            },
        ),
        (
            "FAST_ZERO over whole clusters holding data: done by metadata",
            |e| {
                let mut c = e.structured("disk");
                let off = 6 << 20;
                c.write(off, &[0x55u8; 131072]).expect("write");
                let r = c.call(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, off, 131072, &[]);
                assert_eq!(r.error, 0, "{}", r.message);
                assert_eq!(c.read(off, 131072).unwrap(), vec![0u8; 131072]);
            },
        ),
    ]
}

#[test]
fn every_bad_request_gets_the_specified_answer_while_another_client_works() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    qcow2(&disk, "16M");
    let ro = dir.path().join("ro.qcow2");
    qcow2(&ro, "1M");
    let aligned = dir.path().join("aligned.raw");
    std::fs::write(&aligned, vec![0u8; 1 << 20]).unwrap();
    let big = dir.path().join("big.qcow2");
    qcow2(&big, "64M");
    let mut ro_cfg = cfg("ro", &ro);
    ro_cfg.read_only = true;
    let mut al_cfg = cfg("aligned", &aligned);
    al_cfg.min_block = 512;
    let srv = TestServer::start(
        dir.path(),
        vec![cfg("disk", &disk), ro_cfg, al_cfg, cfg("big", &big)],
    );
    let env = Env { sock: &srv.sock };
    // The well-behaved client, connected for the whole test.
    let mut good = Client::connect(&srv.sock, "disk", Mode::Structured, &["base:allocation"]);
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failed = Vec::new();
    for (i, (name, case)) in cases.iter().enumerate() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&env)));
        if r.is_err() {
            failed.push(*name);
        }
        // The other client is undisturbed.
        let off = (8 << 20) + i as u64 * 4096;
        let data = vec![i as u8 + 1; 4096];
        good.write(off, &data).expect("good client write");
        assert_eq!(
            good.read(off, 4096).expect("good client read"),
            data,
            "after {name}"
        );
        let st = good.call(0, CMD_BLOCK_STATUS, off, 4096, &[]);
        assert_eq!(st.error, 0);
    }
    assert!(failed.is_empty(), "cases failed: {failed:#?}");
    good.disconnect();
    srv.stop_and_release();
    ok("qemu-img", &["check", disk.to_str().unwrap()]);
    // The writes of the client that vanished with requests in flight: each
    // 64 KiB write is there whole or not at all (unacknowledged, so either is
    // allowed), and the image checks clean.
    let raw = dir.path().join("disk.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            disk.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let bytes = std::fs::read(&raw).unwrap();
    for (i, c) in bytes[2 << 20..4 << 20].chunks(65536).enumerate() {
        assert!(
            c.iter().all(|&b| b == 0x42) || c.iter().all(|&b| b == 0),
            "write {i} of the vanished client is torn"
        );
    }
}
