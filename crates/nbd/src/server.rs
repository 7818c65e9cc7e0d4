//! The NBD server: listeners and the transmission phase (the handshake before it
//! is in `handshake`).
//!
//! Threads, not async: each connection has a reader thread that parses requests
//! and a small pool of worker threads that carry them out against the export. The
//! engine below (qcow2, raw) does blocking positional I/O and takes its own locks,
//! so an async runtime would only add a blocking pool in front of the same calls;
//! plain threads keep each request's life easy to follow, and the bounded queue
//! plus a per-connection byte budget bound the memory one client can pin
//! (`BUDGET` bytes of payloads and read buffers, whatever it sends). A TLS
//! connection is served in order by its reader thread alone (a TLS session cannot
//! be read and written from two threads).

use crate::export::{Backend, DetectZeroes, Discard, Export};
use crate::proto::*;
use crate::Result;
use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;
use strata_format::ErrorKind;
use strata_storage::sync;

/// Bytes of request payloads and read buffers one connection may have in flight.
const BUDGET: u64 = 2 * MAX_PAYLOAD as u64;
/// Bytes of write payload buffers a connection keeps for reuse, and the largest
/// buffer kept (larger payloads are rare and get fresh buffers).
const POOL_BYTES: usize = 16 << 20;
const POOL_BUFFER: usize = 4 << 20;
/// Most block status descriptors in one reply chunk.
const MAX_EXTENTS: usize = 1 << 16;
/// How long the accept loop waits for a client before it looks at the shutdown flag.
const ACCEPT_POLL: Duration = Duration::from_millis(200);

/// A connected socket (TCP or Unix).
pub trait Socket: Read + Write + Send + Sync + 'static {
    fn try_clone_box(&self) -> io::Result<Box<dyn Socket>>;
    fn shutdown_both(&self);
    fn peer(&self) -> String;
}

impl Socket for TcpStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Socket>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn peer(&self) -> String {
        self.peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "tcp:?".into())
    }
}

impl Socket for UnixStream {
    fn try_clone_box(&self) -> io::Result<Box<dyn Socket>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_both(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
    fn peer(&self) -> String {
        "unix".into()
    }
}

/// Server-wide settings.
pub struct ServerConfig {
    pub exports: Vec<Arc<Export>>,
    /// TLS settings: when set, clients must STARTTLS before anything else.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Worker threads per connection (requests carried out concurrently).
    pub workers: usize,
    /// Write one line per connect and disconnect to stderr.
    pub log: bool,
}

/// A running server: shared by the listener threads and the connections.
pub struct Server {
    cfg: ServerConfig,
    shutdown: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Box<dyn Socket>>>,
    active: Mutex<usize>,
    idle: Condvar,
}

impl Server {
    pub fn new(cfg: ServerConfig) -> Arc<Server> {
        Arc::new(Server {
            cfg,
            shutdown: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
            active: Mutex::new(0),
            idle: Condvar::new(),
        })
    }

    pub fn exports(&self) -> &[Arc<Export>] {
        &self.cfg.exports
    }

    /// Find an export by name; "" is the first export.
    pub fn find(&self, name: &str) -> Option<&Arc<Export>> {
        self.cfg
            .exports
            .iter()
            .find(|e| e.name == name)
            .or_else(|| name.is_empty().then(|| self.cfg.exports.first()).flatten())
    }

    /// The TLS settings clients must upgrade with, if any.
    pub(crate) fn tls_config(&self) -> Option<&Arc<rustls::ServerConfig>> {
        self.cfg.tls.as_ref()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// Stop accepting, cut every connection, wait for their threads, then flush
    /// and close the exports.
    pub fn shutdown(&self) -> Result<()> {
        self.shutdown.store(true, Ordering::SeqCst);
        for s in sync::lock(&self.conns).values() {
            s.shutdown_both();
        }
        let mut n = sync::lock(&self.active);
        while *n > 0 {
            n = sync::wait_timeout(&self.idle, n, Duration::from_millis(100));
        }
        drop(n);
        let mut first = None;
        for e in &self.cfg.exports {
            if let Err(err) = e.close() {
                eprintln!("strata nbd: closing export '{}': {err}", e.name);
                first.get_or_insert(err);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Accept TCP clients until shutdown (call from its own thread).
    pub fn serve_tcp(self: &Arc<Self>, listener: TcpListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        while !self.is_shutting_down() {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    let _ = s.set_nodelay(true);
                    self.spawn_client(Box::new(s));
                }
                Err(e) => self.accept_failed(&e, listener.as_raw_fd()),
            }
        }
        Ok(())
    }

    /// Accept Unix-socket clients until shutdown (call from its own thread).
    pub fn serve_unix(self: &Arc<Self>, listener: UnixListener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        while !self.is_shutting_down() {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    self.spawn_client(Box::new(s));
                }
                Err(e) => self.accept_failed(&e, listener.as_raw_fd()),
            }
        }
        Ok(())
    }

    /// After a failed accept on the non-blocking listener `fd`: wait until a client
    /// is pending (woken at once, so a connecting client waits for no timer), or
    /// [`ACCEPT_POLL`] passes so that shutdown is noticed; back off after a real
    /// error (such as running out of file descriptors).
    fn accept_failed(&self, e: &io::Error, fd: RawFd) {
        match e.kind() {
            io::ErrorKind::WouldBlock => {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call; a failed
                // or interrupted poll only means the loop tries accept again.
                unsafe { libc::poll(&mut p, 1, ACCEPT_POLL.as_millis() as libc::c_int) };
            }
            io::ErrorKind::Interrupted => {}
            _ => {
                eprintln!("strata nbd: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn spawn_client(self: &Arc<Self>, sock: Box<dyn Socket>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = sock.try_clone_box() {
            sync::lock(&self.conns).insert(id, c);
        }
        *sync::lock(&self.active) += 1;
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-client-{id}"))
            .spawn(move || {
                let peer = sock.peer();
                let summary = me.client(sock, id);
                if me.cfg.log {
                    eprintln!("strata nbd: client {id} ({peer}) disconnected: {summary}");
                }
                sync::lock(&me.conns).remove(&id);
                *sync::lock(&me.active) -= 1;
                me.idle.notify_all();
            });
        if spawned.is_err() {
            sync::lock(&self.conns).remove(&id);
            *sync::lock(&self.active) -= 1;
        }
    }

    /// Serve one client from handshake to disconnect; returns a summary for the log.
    fn client(self: &Arc<Self>, sock: Box<dyn Socket>, id: u64) -> String {
        let peer = sock.peer();
        let mut conn = Conn::Plain(sock);
        let neg = match crate::handshake::handshake(self, &mut conn) {
            Ok(Some(n)) => n,
            Ok(None) => return "ended during the handshake".into(),
            Err(e) => return format!("handshake failed: {e}"),
        };
        if self.cfg.log {
            eprintln!(
                "strata nbd: client {id} ({peer}) connected to export '{}'{}{}",
                neg.export.name,
                if neg.tls { " over TLS" } else { "" },
                match neg.mode {
                    Mode::Simple => "",
                    Mode::Structured => ", structured replies",
                    Mode::Extended => ", extended headers",
                }
            );
        }
        let export = neg.export.clone();
        let stats = transmission(self, conn, neg);
        // A client that vanished leaves the image consistent: writes it left
        // unflushed are flushed now. A client that only read (or flushed after its
        // last write) costs no flush: one would wait for whatever else the host
        // has not yet written back of the image file.
        let flushed = if !stats.unflushed {
            String::new()
        } else {
            match export.flush() {
                Ok(()) => String::new(),
                Err(e) => format!(", flush failed: {e}"),
            }
        };
        format!(
            "{} requests, {}{flushed}",
            stats.requests,
            stats.end.as_deref().unwrap_or("clean disconnect")
        )
    }
}

/// A connection before or after STARTTLS.
pub(crate) enum Conn {
    Plain(Box<dyn Socket>),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, Box<dyn Socket>>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// The reply format negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Simple,
    Structured,
    Extended,
}

/// A metadata context a client can select for block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ctx {
    Allocation,
    Depth,
}

/// What the handshake settled for the transmission phase.
pub(crate) struct Negotiated {
    pub(crate) export: Arc<Export>,
    pub(crate) mode: Mode,
    /// Selected metadata contexts, by id.
    pub(crate) contexts: Vec<(u32, Ctx)>,
    pub(crate) tls: bool,
}

pub(crate) fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
pub(crate) fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
pub(crate) fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// One parsed request.
struct Request {
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    /// Effect length (or the payload length of a write).
    len: u64,
    payload: Payload,
    /// Error found while parsing (answered without touching the export).
    early: Option<(u32, &'static str)>,
    /// Bytes of the connection's budget this request holds until it is answered.
    held: u64,
}

/// Write payload buffers kept for reuse by one connection, so a stream of large
/// writes does not zero (and fault in) a fresh buffer for every request. A payload
/// is always filled completely from the socket before use, so what a buffer held
/// before never shows. At most [`POOL_BYTES`] bytes are kept, in buffers of at most
/// [`POOL_BUFFER`] bytes, so an idle connection holds little memory.
#[derive(Default)]
struct PayloadPool(Mutex<(Vec<Vec<u8>>, usize)>);

impl PayloadPool {
    /// A buffer of exactly `len` bytes, its contents to be overwritten.
    fn take(self: &Arc<Self>, len: usize) -> Payload {
        let reused = {
            let mut g = sync::lock(&self.0);
            let (bufs, kept) = &mut *g;
            let found = bufs.iter().position(|b| b.capacity() >= len);
            found.map(|i| {
                let b = bufs.swap_remove(i);
                *kept -= b.capacity();
                b
            })
        };
        let mut data = reused.unwrap_or_default();
        // Shrinking keeps the bytes; only growth is zero-filled.
        data.resize(len, 0);
        Payload {
            data,
            pool: Some(self.clone()),
        }
    }
}

/// A request's payload; its buffer goes back to the connection's pool when the
/// request is done.
#[derive(Default)]
struct Payload {
    data: Vec<u8>,
    pool: Option<Arc<PayloadPool>>,
}

impl Drop for Payload {
    fn drop(&mut self) {
        let Some(pool) = self.pool.take() else { return };
        let data = std::mem::take(&mut self.data);
        let mut g = sync::lock(&pool.0);
        let (bufs, kept) = &mut *g;
        if data.capacity() <= POOL_BUFFER && *kept + data.capacity() <= POOL_BYTES {
            *kept += data.capacity();
            bufs.push(data);
        }
    }
}

/// Bytes of the connection's budget a request holds until its reply is sent.
struct Budget {
    used: Mutex<u64>,
    cv: Condvar,
}

impl Budget {
    fn acquire(&self, n: u64) {
        let n = n.min(BUDGET);
        let mut u = sync::lock(&self.used);
        while *u + n > BUDGET {
            u = sync::wait(&self.cv, u);
        }
        *u += n;
    }
    fn release(&self, n: u64) {
        let n = n.min(BUDGET);
        *sync::lock(&self.used) -= n;
        self.cv.notify_all();
    }
    fn wait_idle(&self) {
        let mut u = sync::lock(&self.used);
        while *u > 0 {
            u = sync::wait(&self.cv, u);
        }
    }
}

struct Stats {
    requests: u64,
    end: Option<String>,
    /// The connection changed the disk after its last successful flush.
    unflushed: bool,
}

/// What the worker side needs.
struct Session {
    export: Arc<Export>,
    mode: Mode,
    contexts: Vec<(u32, Ctx)>,
    out: Mutex<Box<dyn Write + Send>>,
    budget: Budget,
    /// Set when a reply could not be sent: the connection is finished.
    broken: AtomicBool,
    /// Set by every write, zero and trim; cleared as a flush starts (and set
    /// again if it fails), so a change that lands during a flush stays marked.
    unflushed: AtomicBool,
    payloads: Arc<PayloadPool>,
}

fn transmission(server: &Server, conn: Conn, neg: Negotiated) -> Stats {
    let (reader, writer, workers): (Box<dyn Read + Send>, Box<dyn Write + Send>, usize) = match conn
    {
        Conn::Plain(sock) => match sock.try_clone_box() {
            Ok(w) => (Box::new(sock), w_box(w), server.cfg.workers.max(1)),
            Err(e) => {
                return Stats {
                    requests: 0,
                    end: Some(format!("socket: {e}")),
                    unflushed: false,
                }
            }
        },
        Conn::Tls(t) => {
            let shared = Arc::new(Mutex::new(t));
            (
                Box::new(SharedTls(shared.clone())),
                Box::new(SharedTls(shared)),
                0,
            )
        }
    };
    let session = Arc::new(Session {
        export: neg.export,
        mode: neg.mode,
        contexts: neg.contexts,
        out: Mutex::new(Box::new(BufWriter::with_capacity(256 << 10, writer))),
        budget: Budget {
            used: Mutex::new(0),
            cv: Condvar::new(),
        },
        broken: AtomicBool::new(false),
        unflushed: AtomicBool::new(false),
        payloads: Arc::new(PayloadPool::default()),
    });
    let mut reader = BufReader::with_capacity(256 << 10, reader);
    let (tx, rx) = mpsc::sync_channel::<Request>(workers.max(1) * 2);
    let rx = Arc::new(Mutex::new(rx));
    let mut handles = Vec::new();
    for _ in 0..workers {
        let rx = rx.clone();
        let s = session.clone();
        handles.push(std::thread::spawn(move || loop {
            let req = match sync::lock(&rx).recv() {
                Ok(r) => r,
                Err(_) => break,
            };
            let c = req.held;
            execute(&s, req);
            s.budget.release(c);
        }));
    }
    let mut stats = Stats {
        requests: 0,
        end: None,
        unflushed: false,
    };
    loop {
        if session.broken.load(Ordering::SeqCst) {
            stats.end = Some("reply could not be sent".into());
            break;
        }
        let req = match read_request(&mut reader, &session, &mut stats) {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                if stats.end.is_none() {
                    stats.end = Some(if e.kind() == io::ErrorKind::UnexpectedEof {
                        "client went away".into()
                    } else {
                        format!("connection error: {e}")
                    });
                }
                break;
            }
        };
        stats.requests += 1;
        if req.typ == CMD_DISC && req.early.is_none() {
            session.budget.release(req.held);
            break;
        }
        if workers == 0 {
            let c = req.held;
            execute(&session, req);
            session.budget.release(c);
        } else if let Err(mpsc::SendError(r)) = tx.send(req) {
            session.budget.release(r.held);
            break;
        }
    }
    drop(tx);
    for h in handles {
        let _ = h.join();
    }
    session.budget.wait_idle();
    let _ = sync::lock(&session.out).flush();
    stats.unflushed = session.unflushed.load(Ordering::SeqCst);
    stats
}

fn w_box(s: Box<dyn Socket>) -> Box<dyn Write + Send> {
    Box::new(s)
}

type TlsStream = rustls::StreamOwned<rustls::ServerConnection, Box<dyn Socket>>;

/// A TLS stream shared by the (single-threaded) reader and the reply writer.
struct SharedTls(Arc<Mutex<Box<TlsStream>>>);
impl Read for SharedTls {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sync::lock(&self.0).read(buf)
    }
}
impl Write for SharedTls {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sync::lock(&self.0).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        sync::lock(&self.0).flush()
    }
}

/// Read one request (header and payload). `Ok(None)` ends the connection with a
/// hard disconnect the protocol allows (bad magic, oversized payload).
fn read_request(r: &mut impl Read, s: &Session, stats: &mut Stats) -> io::Result<Option<Request>> {
    let magic = read_u32(r)?;
    let extended = s.mode == Mode::Extended;
    let expected = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != expected {
        stats.end = Some(format!("bad request magic {magic:#x}"));
        return Ok(None);
    }
    let flags = read_u16(r)?;
    let typ = read_u16(r)?;
    let cookie = read_u64(r)?;
    let offset = read_u64(r)?;
    let len = if extended {
        read_u64(r)?
    } else {
        read_u32(r)? as u64
    };
    let mut req = Request {
        flags,
        typ,
        cookie,
        offset,
        len,
        payload: Payload::default(),
        early: None,
        held: 0,
    };
    // Which bytes follow the header.
    let payload_len = if extended {
        if flags & CMD_FLAG_PAYLOAD_LEN != 0 || typ == CMD_WRITE {
            // A write's length is its payload length whether or not the client
            // set the flag (QEMU 10's client does not): be liberal in what we take.
            len
        } else {
            0
        }
    } else if typ == CMD_WRITE {
        len
    } else {
        0
    };
    if payload_len > MAX_PAYLOAD as u64 {
        stats.end = Some(format!("request payload of {payload_len} bytes refused"));
        return Ok(None);
    }
    // Held until the reply is sent (at least 1 so an idle wait sees every request).
    let read_buf = if typ == CMD_READ {
        len.min(MAX_PAYLOAD as u64)
    } else {
        0
    };
    req.held = payload_len.max(read_buf).max(1);
    s.budget.acquire(req.held);
    if payload_len > 0 {
        let mut p = s.payloads.take(payload_len as usize);
        if let Err(e) = r.read_exact(&mut p.data) {
            s.budget.release(req.held);
            stats.end = Some("client went away in the middle of a write".into());
            return Err(e);
        }
        req.payload = p;
    }
    Ok(Some(req))
}

/// Map an engine error to the NBD error a client gets.
fn errno(e: &strata_format::Error, write: bool) -> u32 {
    // The storage failed: only running out of space is worth telling apart.
    if let Some(s) = e.storage_error() {
        return match s.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
            _ => EIO,
        };
    }
    match e.kind() {
        ErrorKind::OutOfRange if write => ENOSPC,
        ErrorKind::OutOfRange | ErrorKind::InvalidArgument => EINVAL,
        ErrorKind::ReadOnly => EPERM,
        _ => EIO,
    }
}

/// Validate a request against the protocol and the export; `Err` is the error
/// the spec prescribes.
fn validate(s: &Session, req: &Request) -> std::result::Result<(), (u32, &'static str)> {
    if let Some(e) = req.early {
        return Err(e);
    }
    let ex = &s.export;
    let allowed = match req.typ {
        CMD_READ => {
            CMD_FLAG_FUA
                | if s.mode != Mode::Simple {
                    CMD_FLAG_DF
                } else {
                    0
                }
        }
        CMD_WRITE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_TRIM | CMD_FLUSH | CMD_CACHE | CMD_DISC => CMD_FLAG_FUA,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return Err((EINVAL, "unknown command")),
    };
    let allowed = if s.mode == Mode::Extended && req.typ == CMD_WRITE {
        allowed | CMD_FLAG_PAYLOAD_LEN
    } else {
        allowed
    };
    if req.flags & !allowed != 0 {
        return Err((EINVAL, "flag not valid for this command"));
    }
    if req.flags & CMD_FLAG_PAYLOAD_LEN != 0 && req.typ != CMD_WRITE {
        return Err((EINVAL, "this command takes no payload"));
    }
    let writes = matches!(req.typ, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
    if writes && ex.read_only {
        return Err((EPERM, "the export is read-only"));
    }
    if req.typ == CMD_FLUSH {
        if req.offset != 0 || req.len != 0 {
            return Err((EINVAL, "flush takes no offset or length"));
        }
        return Ok(());
    }
    let end = req.offset.checked_add(req.len);
    if end.is_none_or(|e| e > ex.size()) {
        return Err(if matches!(req.typ, CMD_WRITE | CMD_WRITE_ZEROES) {
            (ENOSPC, "request goes past the end of the export")
        } else {
            (EINVAL, "request goes past the end of the export")
        });
    }
    let mb = ex.min_block as u64;
    if mb > 1 && (!req.offset.is_multiple_of(mb) || !req.len.is_multiple_of(mb)) {
        return Err((EINVAL, "request not aligned to the minimum block size"));
    }
    match req.typ {
        CMD_READ if req.len > MAX_PAYLOAD as u64 => {
            Err((EOVERFLOW, "read larger than the maximum payload"))
        }
        CMD_BLOCK_STATUS if s.contexts.is_empty() => {
            Err((EINVAL, "no metadata context was negotiated"))
        }
        CMD_BLOCK_STATUS if req.len == 0 => Err((EINVAL, "block status of zero length")),
        _ => Ok(()),
    }
}

/// Carry out one request and send its reply.
fn execute(s: &Session, req: Request) {
    let r = match validate(s, &req) {
        Err((e, msg)) => send_error(s, &req, e, msg),
        Ok(()) => run(s, &req),
    };
    if r.is_err() {
        s.broken.store(true, Ordering::SeqCst);
    }
}

fn run(s: &Session, req: &Request) -> io::Result<()> {
    let ex = &s.export;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let gate = ex.io();
    if let Some(msg) = &gate.failed {
        let msg = msg.clone();
        drop(gate);
        return send_error(s, req, EIO, &msg);
    }
    let top = gate.top();
    let write_result = |r: strata_format::Result<()>, b: &Backend| -> strata_format::Result<()> {
        r?;
        if fua {
            b.top().flush()?;
        }
        Ok(())
    };
    match req.typ {
        CMD_READ => {
            if req.len == 0 {
                drop(gate);
                return send_ok(s, req);
            }
            match gate.reads_as_zero(req.offset, req.len) {
                Ok(true) if s.mode != Mode::Simple => {
                    drop(gate);
                    return send_hole(s, req);
                }
                _ => {}
            }
            let mut buf = vec![0u8; req.len as usize];
            let r = top.read(&mut buf, req.offset);
            drop(gate);
            match r {
                Ok(()) => send_data(s, req, &buf),
                Err(e) => send_error(s, req, errno(&e, false), &e.to_string()),
            }
        }
        CMD_WRITE => {
            let data = &req.payload.data;
            // As qemu-nbd's --detect-zeroes: zero data becomes a write-zeroes,
            // which may free the range only under --detect-zeroes=unmap (which
            // Export::open allows with --discard=unmap alone).
            let r = if ex.detect_zeroes != DetectZeroes::Off
                && !data.is_empty()
                && data.iter().all(|&b| b == 0)
            {
                let may_unmap = ex.detect_zeroes == DetectZeroes::Unmap;
                top.write_zeroes(req.offset, data.len() as u64, may_unmap)
            } else {
                top.write(data, req.offset)
            };
            let r = write_result(r, &gate);
            // Marked once done: a flush that started earlier may not cover it.
            s.unflushed.store(true, Ordering::SeqCst);
            ex.mark_dirty(req.offset, req.payload.data.len() as u64);
            ex.wrote(&gate, req.payload.data.len() as u64);
            drop(gate);
            reply_result(s, req, r, true)
        }
        CMD_WRITE_ZEROES => {
            // As qemu-nbd: under its default --discard=ignore a write of zeroes
            // never frees what the image allocated, NO_HOLE flag or not (a raw
            // file keeps its blocks, a qcow2 image its clusters); under
            // --discard=unmap it may, unless the client asked for NO_HOLE.
            let may_unmap = ex.discard == Discard::Unmap && req.flags & CMD_FLAG_NO_HOLE == 0;
            let r = if req.flags & CMD_FLAG_FAST_ZERO != 0 {
                // Fast zero: done only if it costs no data writes, else ENOTSUP
                // with nothing changed (the client then writes the zeroes its own way).
                match top.write_zeroes_fast(req.offset, req.len, may_unmap) {
                    Ok(false) => {
                        drop(gate);
                        return send_error(s, req, ENOTSUP, "zeroing this range would write data");
                    }
                    r => r.map(|_| ()),
                }
            } else {
                top.write_zeroes(req.offset, req.len, may_unmap)
            };
            let r = write_result(r, &gate);
            // Marked once done: a flush that started earlier may not cover it.
            s.unflushed.store(true, Ordering::SeqCst);
            ex.mark_dirty(req.offset, req.len);
            drop(gate);
            reply_result(s, req, r, true)
        }
        CMD_TRIM if ex.discard == Discard::Ignore => {
            // As qemu-nbd's default --discard=ignore: the (validated) trim
            // succeeds and changes nothing.
            let r = write_result(Ok(()), &gate);
            drop(gate);
            reply_result(s, req, r, true)
        }
        CMD_TRIM => {
            let r = write_result(top.discard(req.offset, req.len), &gate);
            // Marked once done: a flush that started earlier may not cover it.
            s.unflushed.store(true, Ordering::SeqCst);
            ex.mark_dirty(req.offset, req.len);
            drop(gate);
            reply_result(s, req, r, true)
        }
        CMD_FLUSH => {
            s.unflushed.store(false, Ordering::SeqCst);
            let r = top.flush();
            if r.is_err() {
                s.unflushed.store(true, Ordering::SeqCst);
            }
            drop(gate);
            reply_result(s, req, r, false)
        }
        CMD_CACHE => {
            drop(gate);
            send_ok(s, req)
        }
        CMD_BLOCK_STATUS => {
            let r = block_status(s, &gate, req);
            drop(gate);
            match r {
                Ok(chunks) => send_block_status(s, req, &chunks),
                Err(e) => send_error(s, req, errno(&e, false), &e.to_string()),
            }
        }
        _ => {
            drop(gate);
            send_error(s, req, EINVAL, "unknown command")
        }
    }
}

fn reply_result(
    s: &Session,
    req: &Request,
    r: strata_format::Result<()>,
    write: bool,
) -> io::Result<()> {
    match r {
        Ok(()) => send_ok(s, req),
        Err(e) => send_error(s, req, errno(&e, write), &e.to_string()),
    }
}

type Extents = Vec<(u64, u32)>;

fn block_status(
    s: &Session,
    b: &Backend,
    req: &Request,
) -> strata_format::Result<Vec<(u32, Extents)>> {
    let size = s.export.size();
    let end = req.offset + req.len;
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mb = s.export.min_block as u64;
    let mut out = Vec::new();
    for &(id, ctx) in &s.contexts {
        let mut ext: Extents = Vec::new();
        let mut pos = req.offset;
        while pos < end && ext.len() < MAX_EXTENTS {
            // Compact replies carry 32-bit lengths.
            let ask = (end - pos).min(if s.mode == Mode::Extended {
                u64::MAX
            } else {
                u32::MAX as u64 + 1 - mb.max(512)
            });
            let q = match ctx {
                Ctx::Allocation => b.allocation(pos, ask),
                Ctx::Depth => b.depth(pos, ask),
            }?;
            let (mut len, mut flags) = q;
            if mb > 1 {
                let rounded = len - len % mb;
                if rounded == 0 {
                    len = mb.min(size - pos);
                    flags = 0;
                } else {
                    len = rounded;
                }
            }
            if len == 0 {
                break;
            }
            match ext.last_mut() {
                Some(last) if last.1 == flags && !one => last.0 += len,
                _ => ext.push((len, flags)),
            }
            pos += len;
            if one {
                break;
            }
        }
        out.push((id, ext));
    }
    Ok(out)
}

fn chunk_header(s: &Session, req: &Request, flags: u16, typ: u16, len: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(32);
    if s.mode == Mode::Extended {
        h.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&typ.to_be_bytes());
        h.extend_from_slice(&req.cookie.to_be_bytes());
        h.extend_from_slice(&req.offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
    } else {
        h.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&typ.to_be_bytes());
        h.extend_from_slice(&req.cookie.to_be_bytes());
        h.extend_from_slice(&(len as u32).to_be_bytes());
    }
    h
}

fn simple(req: &Request, err: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&err.to_be_bytes());
    h.extend_from_slice(&req.cookie.to_be_bytes());
    h
}

fn send(s: &Session, parts: &[&[u8]]) -> io::Result<()> {
    let mut w = sync::lock(&s.out);
    for p in parts {
        w.write_all(p)?;
    }
    w.flush()
}

fn send_ok(s: &Session, req: &Request) -> io::Result<()> {
    match s.mode {
        Mode::Simple => send(s, &[&simple(req, 0)]),
        Mode::Structured if req.typ != CMD_READ => send(s, &[&simple(req, 0)]),
        _ => send(
            s,
            &[&chunk_header(s, req, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)],
        ),
    }
}

fn send_error(s: &Session, req: &Request, err: u32, msg: &str) -> io::Result<()> {
    if s.mode == Mode::Simple {
        return send(s, &[&simple(req, err)]);
    }
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let mut p = Vec::with_capacity(6 + msg.len());
    p.extend_from_slice(&err.to_be_bytes());
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg);
    let h = chunk_header(s, req, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, p.len() as u64);
    send(s, &[&h, &p])
}

fn send_data(s: &Session, req: &Request, data: &[u8]) -> io::Result<()> {
    if s.mode == Mode::Simple {
        return send(s, &[&simple(req, 0), data]);
    }
    let h = chunk_header(
        s,
        req,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        8 + data.len() as u64,
    );
    send(s, &[&h, &req.offset.to_be_bytes(), data])
}

fn send_hole(s: &Session, req: &Request) -> io::Result<()> {
    let h = chunk_header(s, req, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 12);
    let mut p = req.offset.to_be_bytes().to_vec();
    p.extend_from_slice(&(req.len as u32).to_be_bytes());
    send(s, &[&h, &p])
}

fn send_block_status(s: &Session, req: &Request, chunks: &[(u32, Extents)]) -> io::Result<()> {
    let mut msg = Vec::new();
    for (i, (id, ext)) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let flags = if last { REPLY_FLAG_DONE } else { 0 };
        let mut p = id.to_be_bytes().to_vec();
        if s.mode == Mode::Extended {
            p.extend_from_slice(&(ext.len() as u32).to_be_bytes());
            for &(len, st) in ext {
                p.extend_from_slice(&len.to_be_bytes());
                p.extend_from_slice(&(st as u64).to_be_bytes());
            }
            msg.extend(chunk_header(
                s,
                req,
                flags,
                REPLY_TYPE_BLOCK_STATUS_EXT,
                p.len() as u64,
            ));
        } else {
            for &(len, st) in ext {
                p.extend_from_slice(&(len as u32).to_be_bytes());
                p.extend_from_slice(&st.to_be_bytes());
            }
            msg.extend(chunk_header(
                s,
                req,
                flags,
                REPLY_TYPE_BLOCK_STATUS,
                p.len() as u64,
            ));
        }
        msg.extend(p);
    }
    send(s, &[&msg])
}
