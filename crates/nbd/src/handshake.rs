//! The fixed newstyle handshake: the greeting, then option haggling until the
//! client picks an export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! [`handshake`] reads one option at a time and hands it to the function for its
//! type; each returns a [`Step`]: go on haggling, enter transmission, or close the
//! connection without a reply (what the protocol asks for malformed or hostile
//! input that has no error reply). What the options settle (reply mode, metadata
//! contexts, TLS) accumulates in [`Haggle`].

use crate::export::Export;
use crate::proto::*;
use crate::server::{read_u32, read_u64, Conn, Ctx, Mode, Negotiated, Server, Socket};
use std::io::{self, Read, Write};
use std::sync::Arc;

/// What one option leads to.
enum Step {
    /// Read the next option.
    Next,
    /// The client chose an export: the transmission phase starts.
    Go(Negotiated),
    /// End the connection (the client aborted, or sent what only a close answers).
    Close,
}

/// What the haggling has settled so far.
struct Haggle {
    /// The client asked for the 124 zero bytes after `NBD_OPT_EXPORT_NAME` to go.
    no_zeroes: bool,
    mode: Mode,
    /// Contexts set by `NBD_OPT_SET_META_CONTEXT`, by id...
    contexts: Vec<(u32, Ctx)>,
    /// ...for this export (they apply only if the client then picks it).
    meta_export: Option<*const Export>,
    tls: bool,
}

/// Run the handshake on `conn`. `Ok(None)`: the client aborted or was refused
/// with a hard disconnect. A TLS upgrade replaces `conn` with the TLS session.
pub(crate) fn handshake(server: &Server, conn: &mut Conn) -> io::Result<Option<Negotiated>> {
    let Some(no_zeroes) = greet(conn)? else {
        return Ok(None);
    };
    let mut h = Haggle {
        no_zeroes,
        mode: Mode::Simple,
        contexts: Vec::new(),
        meta_export: None,
        tls: false,
    };
    loop {
        conn.flush()?;
        if server.is_shutting_down() {
            return Ok(None);
        }
        let Some((opt, data)) = read_option(conn)? else {
            return Ok(None);
        };
        match h.option(server, conn, opt, data)? {
            Step::Next => {}
            Step::Go(n) => return Ok(Some(n)),
            Step::Close => return Ok(None),
        }
    }
}

/// Send the server's greeting and read the client's flags. `Some(no_zeroes)`
/// when the flags are ones this server knows; `None` (close, as the protocol
/// requires) otherwise.
fn greet(conn: &mut Conn) -> io::Result<Option<bool>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    conn.write_all(&hello)?;
    conn.flush()?;
    let cflags = read_u32(conn)?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Ok(None);
    }
    Ok(Some(cflags & FLAG_C_NO_ZEROES != 0))
}

/// Read one option: its type and data. `None` (close) for a bad magic or an
/// option longer than any valid one (treated as an attack).
fn read_option(conn: &mut Conn) -> io::Result<Option<(u32, Vec<u8>)>> {
    if read_u64(conn)? != IHAVEOPT {
        return Ok(None);
    }
    let opt = read_u32(conn)?;
    let len = read_u32(conn)?;
    if len > MAX_OPTION_LEN {
        return Ok(None);
    }
    let mut data = vec![0u8; len as usize];
    conn.read_exact(&mut data)?;
    Ok(Some((opt, data)))
}

impl Haggle {
    /// Answer one option. Before TLS on a server that requires it, only
    /// `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` are served: `NBD_OPT_EXPORT_NAME`
    /// (which has no error reply) closes, any other option is refused with
    /// `NBD_REP_ERR_TLS_REQD`.
    fn option(
        &mut self,
        server: &Server,
        conn: &mut Conn,
        opt: u32,
        data: Vec<u8>,
    ) -> io::Result<Step> {
        if server.tls_config().is_some() && !self.tls && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Ok(Step::Close);
            }
            opt_error(conn, opt, REP_ERR_TLS_REQD, "TLS is required")?;
            return Ok(Step::Next);
        }
        match opt {
            OPT_EXPORT_NAME => self.export_name(server, conn, data),
            OPT_ABORT => {
                let _ = opt_reply(conn, opt, REP_ACK, &[]);
                let _ = conn.flush();
                Ok(Step::Close)
            }
            OPT_LIST => list(server, conn, &data).map(|()| Step::Next),
            OPT_STARTTLS => self.starttls(server, conn, &data),
            OPT_INFO | OPT_GO => self.info_or_go(server, conn, opt, &data),
            OPT_STRUCTURED_REPLY => self.structured_reply(conn, &data).map(|()| Step::Next),
            OPT_EXTENDED_HEADERS => self.extended_headers(conn, &data).map(|()| Step::Next),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self
                .meta_context(server, conn, opt, &data)
                .map(|()| Step::Next),
            _ => opt_error(conn, opt, REP_ERR_UNSUP, "unknown option").map(|()| Step::Next),
        }
    }

    /// Enter transmission on `export`. Metadata contexts set for another export
    /// do not carry over.
    fn go(&mut self, export: Arc<Export>) -> Step {
        if self.meta_export != Some(Arc::as_ptr(&export)) {
            self.contexts.clear();
        }
        Step::Go(Negotiated {
            export,
            mode: self.mode,
            contexts: std::mem::take(&mut self.contexts),
            tls: self.tls,
        })
    }

    /// `NBD_OPT_EXPORT_NAME`, the old way to pick an export: size and flags (and
    /// 124 zero bytes unless the client asked them away), then transmission. It
    /// has no error reply: an unknown export, a name that is not UTF-8 or a use
    /// after extended headers closes the connection.
    fn export_name(&mut self, server: &Server, conn: &mut Conn, data: Vec<u8>) -> io::Result<Step> {
        if self.mode == Mode::Extended {
            return Ok(Step::Close);
        }
        let Ok(name) = String::from_utf8(data) else {
            return Ok(Step::Close);
        };
        let Some(export) = server.find(&name).cloned() else {
            return Ok(Step::Close);
        };
        let mut m = Vec::with_capacity(134);
        m.extend_from_slice(&export.size().to_be_bytes());
        m.extend_from_slice(&transmission_flags(&export, self.mode).to_be_bytes());
        if !self.no_zeroes {
            m.extend_from_slice(&[0u8; 124]);
        }
        conn.write_all(&m)?;
        conn.flush()?;
        Ok(self.go(export))
    }

    /// `NBD_OPT_STARTTLS`: acknowledge, then run the TLS handshake on the socket
    /// and carry on over the TLS session. Everything negotiated before it is
    /// forgotten (a man in the middle could have chosen it).
    fn starttls(&mut self, server: &Server, conn: &mut Conn, data: &[u8]) -> io::Result<Step> {
        let opt = OPT_STARTTLS;
        let Some(cfg) = server.tls_config().cloned() else {
            opt_error(conn, opt, REP_ERR_UNSUP, "TLS is not configured")?;
            return Ok(Step::Next);
        };
        if self.tls {
            opt_error(conn, opt, REP_ERR_INVALID, "TLS is already active")?;
            return Ok(Step::Next);
        }
        if !data.is_empty() {
            opt_error(conn, opt, REP_ERR_INVALID, "STARTTLS takes no data")?;
            return Ok(Step::Next);
        }
        opt_reply(conn, opt, REP_ACK, &[])?;
        conn.flush()?;
        let Some(upgraded) = upgrade_to_tls(conn, cfg)? else {
            return Ok(Step::Close);
        };
        *conn = upgraded;
        self.tls = true;
        self.mode = Mode::Simple;
        self.contexts.clear();
        self.meta_export = None;
        Ok(Step::Next)
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: describe the export (see [`export_info`]);
    /// for GO, then enter transmission. A malformed request or an unknown export
    /// gets an error reply and the haggling goes on.
    fn info_or_go(
        &mut self,
        server: &Server,
        conn: &mut Conn,
        opt: u32,
        data: &[u8],
    ) -> io::Result<Step> {
        let Some((name, reqs)) = parse_info_request(data) else {
            opt_error(conn, opt, REP_ERR_INVALID, "malformed INFO/GO request")?;
            return Ok(Step::Next);
        };
        let Some(export) = server.find(&name).cloned() else {
            opt_error(conn, opt, REP_ERR_UNKNOWN, "no such export")?;
            return Ok(Step::Next);
        };
        export_info(conn, opt, &export, self.mode, &reqs)?;
        if opt == OPT_GO {
            conn.flush()?;
            return Ok(self.go(export));
        }
        Ok(Step::Next)
    }

    /// `NBD_OPT_STRUCTURED_REPLY`: structured replies, unless extended headers
    /// (which include them) are already on.
    fn structured_reply(&mut self, conn: &mut Conn, data: &[u8]) -> io::Result<()> {
        let opt = OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            opt_error(conn, opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
        } else if self.mode == Mode::Extended {
            opt_error(
                conn,
                opt,
                REP_ERR_EXT_HEADER_REQD,
                "extended headers already negotiated",
            )
        } else {
            self.mode = Mode::Structured;
            opt_reply(conn, opt, REP_ACK, &[])
        }
    }

    /// `NBD_OPT_EXTENDED_HEADERS`: 64-bit request and reply headers.
    fn extended_headers(&mut self, conn: &mut Conn, data: &[u8]) -> io::Result<()> {
        let opt = OPT_EXTENDED_HEADERS;
        if !data.is_empty() {
            opt_error(conn, opt, REP_ERR_INVALID, "EXTENDED_HEADERS takes no data")
        } else {
            self.mode = Mode::Extended;
            opt_reply(conn, opt, REP_ACK, &[])
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: answer one
    /// `NBD_REP_META_CONTEXT` per context the queries match (an empty LIST
    /// matches all); SET also selects them for that export, replacing any earlier
    /// selection even when it fails. Needs structured replies.
    fn meta_context(
        &mut self,
        server: &Server,
        conn: &mut Conn,
        opt: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            self.contexts.clear();
            self.meta_export = None;
        }
        if self.mode == Mode::Simple {
            return opt_error(
                conn,
                opt,
                REP_ERR_INVALID,
                "structured replies must be negotiated first",
            );
        }
        let Some((name, queries)) = parse_meta(data) else {
            return opt_error(conn, opt, REP_ERR_INVALID, "malformed context request");
        };
        let Some(export) = server.find(&name).cloned() else {
            return opt_error(conn, opt, REP_ERR_UNKNOWN, "no such export");
        };
        if let Some(q) = queries.iter().find(|q| !q.contains(':')) {
            return opt_error(
                conn,
                opt,
                REP_ERR_INVALID,
                &format!("query '{q}' has no namespace"),
            );
        }
        let mut found: Vec<Ctx> = Vec::new();
        if queries.is_empty() && !set {
            found = vec![Ctx::Allocation, Ctx::Depth];
        }
        for q in &queries {
            for c in match_query(q, !set) {
                if !found.contains(&c) {
                    found.push(c);
                }
            }
        }
        for c in &found {
            let id = match c {
                Ctx::Allocation => 1u32,
                Ctx::Depth => 2u32,
            };
            let mut d = if set { id } else { 0 }.to_be_bytes().to_vec();
            d.extend_from_slice(ctx_name(*c).as_bytes());
            opt_reply(conn, opt, REP_META_CONTEXT, &d)?;
            if set {
                self.contexts.push((id, *c));
            }
        }
        if set {
            self.meta_export = Some(Arc::as_ptr(&export));
        }
        opt_reply(conn, opt, REP_ACK, &[])
    }
}

/// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export (name and description).
fn list(server: &Server, conn: &mut Conn, data: &[u8]) -> io::Result<()> {
    if !data.is_empty() {
        return opt_error(conn, OPT_LIST, REP_ERR_INVALID, "LIST takes no data");
    }
    for e in server.exports() {
        let mut d = Vec::new();
        d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
        d.extend_from_slice(e.name.as_bytes());
        d.extend_from_slice(e.description.as_bytes());
        opt_reply(conn, OPT_LIST, REP_SERVER, &d)?;
    }
    opt_reply(conn, OPT_LIST, REP_ACK, &[])
}

/// Move the plain socket of `conn` into a TLS session and run the TLS handshake.
/// `None` when `conn` is already a TLS session (nothing to upgrade).
fn upgrade_to_tls(conn: &mut Conn, cfg: Arc<rustls::ServerConfig>) -> io::Result<Option<Conn>> {
    let plain = std::mem::replace(conn, Conn::Plain(Box::new(NullSocket)));
    let Conn::Plain(sock) = plain else {
        return Ok(None);
    };
    let sc = rustls::ServerConnection::new(cfg).map_err(|e| io::Error::other(e.to_string()))?;
    let mut stream = rustls::StreamOwned::new(sc, sock);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| io::Error::other(format!("TLS handshake: {e}")))?;
    }
    Ok(Some(Conn::Tls(Box::new(stream))))
}

/// The name and the information types an INFO or GO request asks for; `None`
/// when the data is malformed.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut d = OptData(data);
    let n = d.u32()? as usize;
    let name = String::from_utf8(d.take(n)?.to_vec()).ok()?;
    let count = d.u16()?;
    let mut reqs = Vec::new();
    for _ in 0..count {
        reqs.push(d.u16()?);
    }
    d.0.is_empty().then_some((name, reqs))
}

/// The `NBD_REP_INFO` replies for `export`, then the final ACK: size and flags
/// always, the name and description when asked for (the description only when
/// there is one), and the block sizes always.
fn export_info(
    conn: &mut Conn,
    opt: u32,
    export: &Export,
    mode: Mode,
    reqs: &[u16],
) -> io::Result<()> {
    opt_reply(conn, opt, REP_INFO, &info_export(export, mode))?;
    if reqs.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(export.name.as_bytes());
        opt_reply(conn, opt, REP_INFO, &d)?;
    }
    if reqs.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(export.description.as_bytes());
        opt_reply(conn, opt, REP_INFO, &d)?;
    }
    opt_reply(conn, opt, REP_INFO, &block_size_info(export))?;
    opt_reply(conn, opt, REP_ACK, &[])
}

/// One option reply: magic, option, reply type, length, data.
fn opt_reply(w: &mut impl Write, opt: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&typ.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m)
}

/// An error reply to an option, with a message for humans.
fn opt_error(w: &mut impl Write, opt: u32, typ: u32, msg: &str) -> io::Result<()> {
    opt_reply(w, opt, typ, msg.as_bytes())
}

/// A cursor over an option's data that fails instead of reading past the end.
struct OptData<'a>(&'a [u8]);

impl<'a> OptData<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).ok()
    }
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
fn info_export(export: &Export, mode: Mode) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&export.size().to_be_bytes());
    d.extend_from_slice(&transmission_flags(export, mode).to_be_bytes());
    d
}

/// The transmission flags of `export` under `mode`.
fn transmission_flags(export: &Export, mode: Mode) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    // Every connection shares one device, and a flush flushes that device: a flush
    // on any connection covers the writes completed on all of them.
    f |= FLAG_CAN_MULTI_CONN;
    if export.read_only {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if mode != Mode::Simple {
        f |= FLAG_SEND_DF;
    }
    f
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
fn block_size_info(export: &Export) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&export.min_block.to_be_bytes());
    d.extend_from_slice(&PREFERRED_BLOCK.max(export.min_block).to_be_bytes());
    d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    d
}

/// Parse metadata context queries; `None` when the data is malformed.
fn parse_meta(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut d = OptData(data);
    let name = d.string()?;
    let n = d.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(d.string()?);
    }
    if !d.0.is_empty() {
        return None;
    }
    Some((name, queries))
}

/// Which contexts a query designates (`list` allows the namespace-only form).
fn match_query(q: &str, list: bool) -> Vec<Ctx> {
    match q {
        CONTEXT_BASE_ALLOCATION => vec![Ctx::Allocation],
        CONTEXT_ALLOCATION_DEPTH => vec![Ctx::Depth],
        "base:" if list => vec![Ctx::Allocation],
        "qemu:" if list => vec![Ctx::Depth],
        _ => vec![],
    }
}

/// A context's name on the wire.
fn ctx_name(c: Ctx) -> &'static str {
    match c {
        Ctx::Allocation => CONTEXT_BASE_ALLOCATION,
        Ctx::Depth => CONTEXT_ALLOCATION_DEPTH,
    }
}

/// Placeholder while a socket moves into a TLS session.
struct NullSocket;
impl Read for NullSocket {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
}
impl Write for NullSocket {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::BrokenPipe.into())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
impl Socket for NullSocket {
    fn try_clone_box(&self) -> io::Result<Box<dyn Socket>> {
        Ok(Box::new(NullSocket))
    }
    fn shutdown_both(&self) {}
    fn peer(&self) -> String {
        String::new()
    }
}
