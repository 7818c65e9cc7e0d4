//! Test helpers: an in-process server, a raw NBD client speaking the wire
//! protocol byte by byte, and runners for the real QEMU/libnbd tools.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;
use strata_nbd::proto::*;
use strata_nbd::{Export, ExportConfig, Server, ServerConfig};

/// Run a tool; a missing tool fails the test.
pub fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (it is required by this test): {e}"))
}

/// Run a tool and require success.
pub fn ok(tool: &str, args: &[&str]) -> String {
    let o = run(tool, args);
    assert!(
        o.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A server running in this process on a Unix socket and a TCP port.
pub struct TestServer {
    pub server: Arc<Server>,
    weak: std::sync::Weak<Server>,
    pub sock: PathBuf,
    pub port: u16,
    threads: Vec<std::thread::JoinHandle<()>>,
    stopped: bool,
}

impl TestServer {
    pub fn start(dir: &Path, exports: Vec<ExportConfig>) -> TestServer {
        Self::start_with(dir, exports, None)
    }

    pub fn start_with(
        dir: &Path,
        exports: Vec<ExportConfig>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> TestServer {
        let exports = exports
            .iter()
            .map(|c| Arc::new(Export::open(c).expect("open export")))
            .collect();
        let server = Server::new(ServerConfig {
            exports,
            tls,
            workers: 4,
            log: false,
        });
        let sock = dir.join(format!("nbd-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let ul = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let tl = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tl.local_addr().unwrap().port();
        let (s1, s2) = (server.clone(), server.clone());
        let threads = vec![
            std::thread::spawn(move || s1.serve_unix(ul).unwrap()),
            std::thread::spawn(move || s2.serve_tcp(tl).unwrap()),
        ];
        TestServer {
            weak: Arc::downgrade(&server),
            server,
            sock,
            port,
            threads,
            stopped: false,
        }
    }

    pub fn export(&self, i: usize) -> &Arc<Export> {
        &self.server.exports()[i]
    }

    /// nbd+unix URI of an export.
    pub fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    /// nbd:// TCP URI of an export.
    pub fn tcp_uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    /// Stop: cut connections, flush and close the exports.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.server.shutdown().expect("clean shutdown");
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }

    /// Stop, and wait until the exports are dropped (their files unlocked).
    pub fn stop_and_release(mut self) {
        self.stop();
        let weak = self.weak.clone();
        drop(self);
        while weak.strong_count() > 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            let _ = self.server.shutdown();
        }
    }
}

/// Create a qcow2 image with qemu-img.
pub fn qcow2(path: &Path, size: &str) {
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), size],
    );
}

pub fn cfg(name: &str, path: &Path) -> ExportConfig {
    ExportConfig::new(name, path)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Simple,
    Structured,
    Extended,
}

/// One reply, reassembled.
#[derive(Debug, Default)]
pub struct Reply {
    pub cookie: u64,
    /// 0 on success.
    pub error: u32,
    pub message: String,
    /// Read data (holes filled with zeroes), when the request was a read.
    pub data: Vec<u8>,
    pub holes: usize,
    pub data_chunks: usize,
    /// Block status: (context id, [(length, flags)]).
    pub status: Vec<(u32, Vec<(u64, u64)>)>,
    /// The reply used the simple form.
    pub simple: bool,
}

/// A raw NBD client: every byte it sends is chosen by the test.
pub struct Client {
    pub s: UnixStream,
    pub mode: Mode,
    pub size: u64,
    pub tflags: u16,
    pub contexts: Vec<(u32, String)>,
    next: u64,
    pending: HashMap<u64, (u16, u64, u64)>,
}

pub fn u32be(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

impl Client {
    /// Connect and read the greeting; returns the socket ready for client flags.
    pub fn greet(sock: &Path) -> UnixStream {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        s
    }

    /// Greet and send the usual client flags.
    pub fn negotiating(sock: &Path) -> UnixStream {
        let mut s = Self::greet(sock);
        s.write_all(&u32be(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
            .unwrap();
        s
    }

    pub fn send_opt(s: &mut UnixStream, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).unwrap();
    }

    /// Read one option reply: (option, reply type, data).
    pub fn opt_reply(s: &mut UnixStream) -> std::io::Result<(u32, u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        assert_eq!(&h[..8], &REPLY_MAGIC.to_be_bytes(), "option reply magic");
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d)?;
        Ok((opt, typ, d))
    }

    /// Data of an INFO/GO request.
    pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Data of a LIST/SET_META_CONTEXT request.
    pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Full handshake with NBD_OPT_GO.
    pub fn connect(sock: &Path, export: &str, mode: Mode, contexts: &[&str]) -> Client {
        let mut s = Self::negotiating(sock);
        match mode {
            Mode::Simple => {}
            Mode::Structured => {
                Self::send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]);
                assert_eq!(Self::opt_reply(&mut s).unwrap().1, REP_ACK);
            }
            Mode::Extended => {
                Self::send_opt(&mut s, OPT_EXTENDED_HEADERS, &[]);
                assert_eq!(Self::opt_reply(&mut s).unwrap().1, REP_ACK);
            }
        }
        let mut ctx = Vec::new();
        if !contexts.is_empty() {
            Self::send_opt(
                &mut s,
                OPT_SET_META_CONTEXT,
                &Self::meta_data(export, contexts),
            );
            loop {
                let (_, typ, d) = Self::opt_reply(&mut s).unwrap();
                if typ == REP_ACK {
                    break;
                }
                assert_eq!(typ, REP_META_CONTEXT);
                let id = u32::from_be_bytes(d[..4].try_into().unwrap());
                ctx.push((id, String::from_utf8(d[4..].to_vec()).unwrap()));
            }
        }
        Self::send_opt(&mut s, OPT_GO, &Self::go_data(export, &[INFO_BLOCK_SIZE]));
        let mut size = 0;
        let mut tflags = 0;
        loop {
            let (_, typ, d) = Self::opt_reply(&mut s).unwrap();
            if typ == REP_ACK {
                break;
            }
            assert_eq!(typ, REP_INFO, "GO failed with {typ:#x}");
            if u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT {
                size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                tflags = u16::from_be_bytes([d[10], d[11]]);
            }
        }
        Client {
            s,
            mode,
            size,
            tflags,
            contexts: ctx,
            next: 1,
            pending: HashMap::new(),
        }
    }

    /// Send a request (header as the mode wants, then `payload`); returns its cookie.
    pub fn send(&mut self, flags: u16, typ: u16, offset: u64, len: u64, payload: &[u8]) -> u64 {
        let cookie = self.next;
        self.next += 1;
        let mut m = Vec::with_capacity(32 + payload.len());
        if self.mode == Mode::Extended {
            m.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        } else {
            m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&typ.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        if self.mode == Mode::Extended {
            m.extend_from_slice(&len.to_be_bytes());
        } else {
            m.extend_from_slice(&(len as u32).to_be_bytes());
        }
        m.extend_from_slice(payload);
        self.s.write_all(&m).unwrap();
        self.pending.insert(cookie, (typ, offset, len));
        cookie
    }

    fn rd(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }

    /// Read the next complete reply (all its chunks).
    pub fn reply(&mut self) -> std::io::Result<Reply> {
        let mut r = Reply::default();
        let mut assembled: Option<Vec<u8>> = None;
        loop {
            let magic = u32::from_be_bytes(self.rd(4)?.try_into().unwrap());
            if magic == SIMPLE_REPLY_MAGIC {
                assert_ne!(self.mode, Mode::Extended, "simple reply in extended mode");
                let h = self.rd(12)?;
                r.error = u32::from_be_bytes(h[..4].try_into().unwrap());
                r.cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                r.simple = true;
                let (typ, _, len) = self.pending.remove(&r.cookie).expect("known cookie");
                if typ == CMD_READ && r.error == 0 {
                    assert_ne!(self.mode, Mode::Structured, "simple read reply");
                    r.data = self.rd(len as usize)?;
                }
                return Ok(r);
            }
            let (flags, typ, cookie, len) = match magic {
                STRUCTURED_REPLY_MAGIC => {
                    assert_eq!(self.mode, Mode::Structured);
                    let h = self.rd(16)?;
                    (
                        u16::from_be_bytes([h[0], h[1]]),
                        u16::from_be_bytes([h[2], h[3]]),
                        u64::from_be_bytes(h[4..12].try_into().unwrap()),
                        u32::from_be_bytes(h[12..16].try_into().unwrap()) as u64,
                    )
                }
                EXTENDED_REPLY_MAGIC => {
                    assert_eq!(self.mode, Mode::Extended);
                    let h = self.rd(28)?;
                    (
                        u16::from_be_bytes([h[0], h[1]]),
                        u16::from_be_bytes([h[2], h[3]]),
                        u64::from_be_bytes(h[4..12].try_into().unwrap()),
                        u64::from_be_bytes(h[20..28].try_into().unwrap()),
                    )
                }
                other => panic!("bad reply magic {other:#x}"),
            };
            r.cookie = cookie;
            let (rtyp, roff, rlen) = *self.pending.get(&cookie).expect("known cookie");
            if rtyp == CMD_READ && assembled.is_none() {
                assembled = Some(vec![0u8; rlen as usize]);
            }
            let p = self.rd(len as usize)?;
            match typ {
                REPLY_TYPE_NONE => {}
                REPLY_TYPE_OFFSET_DATA => {
                    let off = u64::from_be_bytes(p[..8].try_into().unwrap());
                    let a = assembled.as_mut().unwrap();
                    let at = (off - roff) as usize;
                    a[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                    r.data_chunks += 1;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    r.holes += 1;
                }
                REPLY_TYPE_BLOCK_STATUS => {
                    let id = u32::from_be_bytes(p[..4].try_into().unwrap());
                    let d = p[4..]
                        .chunks(8)
                        .map(|c| {
                            (
                                u32::from_be_bytes(c[..4].try_into().unwrap()) as u64,
                                u32::from_be_bytes(c[4..].try_into().unwrap()) as u64,
                            )
                        })
                        .collect();
                    r.status.push((id, d));
                }
                REPLY_TYPE_BLOCK_STATUS_EXT => {
                    let id = u32::from_be_bytes(p[..4].try_into().unwrap());
                    let n = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
                    let d: Vec<_> = p[8..]
                        .chunks(16)
                        .map(|c| {
                            (
                                u64::from_be_bytes(c[..8].try_into().unwrap()),
                                u64::from_be_bytes(c[8..].try_into().unwrap()),
                            )
                        })
                        .collect();
                    assert_eq!(d.len(), n);
                    r.status.push((id, d));
                }
                t if t & 0x8000 != 0 => {
                    r.error = u32::from_be_bytes(p[..4].try_into().unwrap());
                    let n = u16::from_be_bytes([p[4], p[5]]) as usize;
                    r.message = String::from_utf8_lossy(&p[6..6 + n]).into_owned();
                }
                t => panic!("unknown chunk type {t}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                self.pending.remove(&cookie);
                let _ = rlen;
                if r.error == 0 {
                    if let Some(a) = assembled {
                        r.data = a;
                    }
                }
                return Ok(r);
            }
        }
    }

    /// Send and wait for the reply.
    pub fn call(&mut self, flags: u16, typ: u16, offset: u64, len: u64, payload: &[u8]) -> Reply {
        let c = self.send(flags, typ, offset, len, payload);
        let r = self.reply().expect("reply");
        assert_eq!(r.cookie, c);
        r
    }

    pub fn read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, u32> {
        let r = self.call(0, CMD_READ, offset, len, &[]);
        if r.error != 0 {
            Err(r.error)
        } else {
            Ok(r.data)
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        let flags = if self.mode == Mode::Extended {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        let r = self.call(flags, CMD_WRITE, offset, data.len() as u64, data);
        if r.error != 0 {
            Err(r.error)
        } else {
            Ok(())
        }
    }

    /// Whether the server has closed the connection (EOF within the timeout).
    pub fn closed(s: &mut UnixStream) -> bool {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    pub fn disconnect(mut self) {
        self.send(0, CMD_DISC, 0, 0, &[]);
        assert!(
            Self::closed(&mut self.s),
            "server keeps the connection after DISC"
        );
    }
}
