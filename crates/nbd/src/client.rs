//! A small blocking NBD client over a Unix socket or TCP: the fixed newstyle
//! handshake with structured replies and metadata contexts, then reads, writes,
//! write-zeroes, trims, flushes and block-status queries. Enough to read a
//! point-in-time export of a running VM with the `base:allocation` and
//! `qemu:dirty-bitmap:NAME` contexts QEMU offers with it, or to use any export
//! as a disk (see [`crate::storage`]).

use crate::proto::*;
use crate::tls::ClientTls;
use crate::url::{Address, NbdUrl};
use crate::{Error, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The connection under the protocol.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// A TLS session over one of the others, after `NBD_OPT_STARTTLS`.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Stream>>),
    /// Only while the socket moves into a TLS session.
    Closed,
}

fn closed() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::NotConnected)
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Closed => Err(closed()),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::Closed => Err(closed()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Closed => Err(closed()),
        }
    }
}

/// The largest single request this client sends.
const MAX_REQUEST: u64 = 16 << 20;

/// One connection to one export.
pub struct Client {
    sock: Stream,
    size: u64,
    /// The metadata contexts the server agreed to: (name, id).
    contexts: Vec<(String, u32)>,
    /// The transmission flags the server gave with the export.
    flags: u16,
    handle: u64,
}

/// One block-status extent: its length and the context's flags for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub len: u64,
    pub flags: u32,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(format!("NBD server: {}", msg.into()))
}

impl Client {
    /// Connect to the Unix socket `path`, negotiate structured replies and the
    /// metadata contexts `contexts` (those the server does not offer are simply
    /// absent: see [`Client::has_context`]), and open export `export`.
    pub fn connect_unix(path: &Path, export: &str, contexts: &[&str]) -> Result<Client> {
        Self::start(
            Stream::Unix(UnixStream::connect(path)?),
            export,
            contexts,
            None,
        )
    }

    /// [`Client::connect_unix`] to the server and export `url` names.
    /// A refused or failed connection is [`Error::Connect`], naming the address.
    pub fn connect(url: &NbdUrl, contexts: &[&str]) -> Result<Client> {
        Self::connect_with(url, contexts, None)
    }

    /// [`Client::connect`], securing the connection with TLS first when `tls`
    /// is given (`NBD_OPT_STARTTLS`, then the rest of the handshake inside the
    /// session). A server that refuses is an error in qemu-img's words.
    pub fn connect_with(
        url: &NbdUrl,
        contexts: &[&str],
        tls: Option<&ClientTls>,
    ) -> Result<Client> {
        let failed = |source| Error::Connect {
            addr: url.address.to_string(),
            source,
        };
        let sock = match &url.address {
            // An empty path names no socket; QEMU's connect is refused there.
            Address::Unix(path) if path.as_os_str().is_empty() => {
                const ECONNREFUSED: i32 = 111;
                return Err(failed(std::io::Error::from_raw_os_error(ECONNREFUSED)));
            }
            Address::Unix(path) => Stream::Unix(UnixStream::connect(path).map_err(failed)?),
            Address::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).map_err(failed)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        Self::start(sock, &url.export, contexts, tls)
    }

    fn start(
        sock: Stream,
        export: &str,
        contexts: &[&str],
        tls: Option<&ClientTls>,
    ) -> Result<Client> {
        let mut c = Client {
            sock,
            size: 0,
            contexts: Vec::new(),
            flags: 0,
            handle: 0,
        };
        c.handshake(export, contexts, tls)?;
        Ok(c)
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server exports the disk read-only.
    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }

    /// Whether the server agreed to the metadata context `name`.
    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.iter().any(|(n, _)| n == name)
    }

    fn handshake(
        &mut self,
        export: &str,
        contexts: &[&str],
        tls: Option<&ClientTls>,
    ) -> Result<()> {
        if self.u64()? != NBDMAGIC || self.u64()? != IHAVEOPT {
            return Err(invalid("not a newstyle NBD server"));
        }
        let flags = self.u16()?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(invalid("no fixed newstyle negotiation"));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.sock.write_all(&cflags.to_be_bytes())?;
        if let Some(tls) = tls {
            self.starttls(tls)?;
        }
        self.option(OPT_STRUCTURED_REPLY, &[])?;
        let (ty, _) = self.option_reply(OPT_STRUCTURED_REPLY)?;
        // A server that wants TLS first refuses every option; its answer to
        // NBD_OPT_GO below is the one reported.
        let structured = ty == REP_ACK;
        if !structured && ty != REP_ERR_TLS_REQD {
            return Err(invalid("structured replies refused"));
        }
        let contexts = if structured { contexts } else { &[] };
        let name = export.as_bytes();
        if !contexts.is_empty() {
            let mut data = Vec::new();
            put_str(&mut data, name)?;
            data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                put_str(&mut data, q.as_bytes())?;
            }
            self.option(OPT_SET_META_CONTEXT, &data)?;
            loop {
                let (ty, d) = self.option_reply(OPT_SET_META_CONTEXT)?;
                match ty {
                    REP_ACK => break,
                    REP_META_CONTEXT if d.len() >= 4 => {
                        let id = u32::from_be_bytes(d[..4].try_into().expect("4 bytes"));
                        let n = String::from_utf8_lossy(&d[4..]).into_owned();
                        self.contexts.push((n, id));
                    }
                    // A refusal (of the export, say): no contexts, and the
                    // export's own refusal comes with OPT_GO below.
                    ty if ty & (1 << 31) != 0 => break,
                    _ => return Err(invalid(format!("unexpected meta context reply {ty}"))),
                }
            }
        }
        let mut data = Vec::new();
        put_str(&mut data, name)?;
        data.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &data)?;
        loop {
            let (ty, d) = self.option_reply(OPT_GO)?;
            match ty {
                REP_ACK => break,
                REP_INFO if d.len() >= 12 && d[..2] == INFO_EXPORT.to_be_bytes() => {
                    self.size = u64::from_be_bytes(d[2..10].try_into().expect("8 bytes"));
                    self.flags = u16::from_be_bytes(d[10..12].try_into().expect("2 bytes"));
                }
                REP_INFO => {}
                REP_ERR_UNKNOWN => {
                    return Err(Error::ExportUnavailable {
                        export: export.to_string(),
                        reason: String::from_utf8_lossy(&d).into_owned(),
                    })
                }
                ty => return Err(refused(OPT_GO, ty, &d)),
            }
        }
        Ok(())
    }

    /// `NBD_OPT_STARTTLS`, then the TLS handshake; the socket is the session's
    /// from then on.
    fn starttls(&mut self, tls: &ClientTls) -> Result<()> {
        self.option(OPT_STARTTLS, &[])?;
        let (ty, d) = self.option_reply(OPT_STARTTLS)?;
        if ty != REP_ACK {
            return Err(refused(OPT_STARTTLS, ty, &d));
        }
        let name = match (&tls.server_name, tls.verify) {
            (Some(n), _) => n.clone(),
            (None, crate::tls::Verify::Peer) => {
                return Err(Error::Invalid(
                    "No hostname for certificate validation".into(),
                ))
            }
            // Not checked: any syntactically valid name does.
            (None, crate::tls::Verify::None) => "localhost".into(),
        };
        let name =
            rustls::pki_types::ServerName::try_from(name).map_err(|e| Error::Tls(e.to_string()))?;
        let conn = rustls::ClientConnection::new(tls.config.clone(), name)
            .map_err(|e| Error::Tls(e.to_string()))?;
        let plain = std::mem::replace(&mut self.sock, Stream::Closed);
        let mut s = rustls::StreamOwned::new(conn, plain);
        while s.conn.is_handshaking() {
            s.conn
                .complete_io(&mut s.sock)
                .map_err(|e| tls_failure(e, tls.server_name.as_deref()))?;
        }
        self.sock = Stream::Tls(Box::new(s));
        Ok(())
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.sock.write_all(&m)?;
        Ok(())
    }

    /// One option reply: (type, data); an error reply is returned as its type.
    fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>)> {
        let magic = match self.u64() {
            Err(Error::Io(e)) if matches!(self.sock, Stream::Tls(_)) => {
                return Err(Error::Invalid(format!(
                    "Failed to read option reply: {}",
                    tls_read_failure(&e)
                )))
            }
            r => r?,
        };
        if magic != REPLY_MAGIC || self.u32()? != opt {
            return Err(invalid("bad option reply"));
        }
        let ty = self.u32()?;
        let len = self.u32()?;
        if len > MAX_OPTION_LEN {
            return Err(invalid("option reply too long"));
        }
        let mut d = vec![0; len as usize];
        self.sock.read_exact(&mut d)?;
        Ok((ty, d))
    }

    fn request(&mut self, ty: u16, flags: u16, offset: u64, len: u32) -> Result<u64> {
        self.request_with(ty, flags, offset, len, &[])
    }

    /// Send one request, `payload` (a write's data) right after its header.
    fn request_with(
        &mut self,
        ty: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<u64> {
        self.handle += 1;
        let mut m = Vec::with_capacity(28);
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&self.handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.sock.write_all(&m)?;
        Ok(self.handle)
    }

    /// Read structured reply chunks for `handle` until the last one, giving each
    /// (type, payload) to `chunk`.
    fn replies(
        &mut self,
        handle: u64,
        mut chunk: impl FnMut(u16, &[u8]) -> Result<()>,
    ) -> Result<()> {
        // An error chunk fails the request, but the chunks after it are read
        // all the same, so the connection stays in step.
        let mut failed = None;
        loop {
            let magic = self.u32()?;
            if magic == SIMPLE_REPLY_MAGIC {
                let err = self.u32()?;
                if self.u64()? != handle {
                    return Err(invalid("reply to an unknown request"));
                }
                return if err == 0 {
                    chunk(REPLY_TYPE_NONE, &[])
                } else {
                    Err(remote_error(err))
                };
            }
            if magic != STRUCTURED_REPLY_MAGIC {
                return Err(invalid("bad reply magic"));
            }
            let flags = self.u16()?;
            let ty = self.u16()?;
            if self.u64()? != handle {
                return Err(invalid("reply to an unknown request"));
            }
            let len = self.u32()?;
            if len > MAX_PAYLOAD + 64 {
                return Err(invalid("reply too long"));
            }
            let mut d = vec![0; len as usize];
            self.sock.read_exact(&mut d)?;
            if ty & (1 << 15) != 0 {
                let err = d
                    .get(..4)
                    .map_or(EIO, |e| u32::from_be_bytes(e.try_into().expect("4")));
                failed.get_or_insert(remote_error(err));
            } else if failed.is_none() {
                if let Err(e) = chunk(ty, &d) {
                    failed = Some(e);
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return failed.map_or(Ok(()), Err);
            }
        }
    }

    /// Fill `buf` with the export's bytes at `offset`.
    pub fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_REQUEST as usize);
            let base = offset + done as u64;
            let part = &mut buf[done..done + n];
            let h = self.request(CMD_READ, 0, base, n as u32)?;
            self.replies(h, |ty, d| {
                let at = |o: u64, l: u64| -> Result<std::ops::Range<usize>> {
                    let s = o.checked_sub(base).filter(|s| s + l <= n as u64);
                    let s = s.ok_or_else(|| invalid("read reply outside the request"))?;
                    Ok(s as usize..(s + l) as usize)
                };
                match ty {
                    REPLY_TYPE_OFFSET_DATA if d.len() >= 8 => {
                        let o = u64::from_be_bytes(d[..8].try_into().expect("8"));
                        part[at(o, d.len() as u64 - 8)?].copy_from_slice(&d[8..]);
                    }
                    REPLY_TYPE_OFFSET_HOLE if d.len() >= 12 => {
                        let o = u64::from_be_bytes(d[..8].try_into().expect("8"));
                        let l = u32::from_be_bytes(d[8..12].try_into().expect("4"));
                        part[at(o, l.into())?].fill(0);
                    }
                    REPLY_TYPE_NONE => {}
                    _ => return Err(invalid(format!("unexpected read reply {ty}"))),
                }
                Ok(())
            })?;
            done += n;
        }
        Ok(())
    }

    /// Write `buf` at `offset`.
    pub fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        for (i, part) in buf.chunks(MAX_REQUEST as usize).enumerate() {
            let at = offset + i as u64 * MAX_REQUEST;
            let h = self.request_with(CMD_WRITE, 0, at, part.len() as u32, part)?;
            self.replies(h, |_, _| Ok(()))?;
        }
        Ok(())
    }

    /// Whether the server takes write-zeroes requests (else [`Self::write_zeroes`]
    /// writes zero bytes).
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & FLAG_SEND_WRITE_ZEROES != 0
    }

    /// Make `len` bytes at `offset` read as zeroes: with the server's
    /// write-zeroes when it has one (`may_trim`: it may punch a hole), else by
    /// writing zero bytes.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        let fast = self.can_write_zeroes();
        let step = if fast { 1 << 30 } else { MAX_REQUEST };
        let zeroes = if fast {
            Vec::new()
        } else {
            vec![0; step as usize]
        };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            if fast {
                let flags = if may_trim { 0 } else { CMD_FLAG_NO_HOLE };
                let h = self.request(CMD_WRITE_ZEROES, flags, offset + done, n as u32)?;
                self.replies(h, |_, _| Ok(()))?;
            } else {
                self.write(&zeroes[..n as usize], offset + done)?;
            }
            done += n;
        }
        Ok(())
    }

    /// Make every completed write durable (nothing to do when the server says
    /// it has no cache to flush).
    pub fn flush(&mut self) -> Result<()> {
        if self.flags & FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        let h = self.request(CMD_FLUSH, 0, 0, 0)?;
        self.replies(h, |_, _| Ok(()))
    }

    /// The extents of context `name` from `offset` for up to `len` bytes (the
    /// server may answer for less; at least one extent is returned).
    pub fn block_status(&mut self, name: &str, offset: u64, len: u64) -> Result<Vec<StatusExtent>> {
        let id = self
            .contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
            .ok_or_else(|| invalid(format!("context '{name}' was not negotiated")))?;
        let len = len.min(u64::from(u32::MAX) & !0xffff) as u32;
        let h = self.request(CMD_BLOCK_STATUS, 0, offset, len)?;
        let mut out = Vec::new();
        self.replies(h, |ty, d| {
            if ty == REPLY_TYPE_BLOCK_STATUS && d.len() >= 4 {
                if u32::from_be_bytes(d[..4].try_into().expect("4")) == id {
                    for e in d[4..].chunks_exact(8) {
                        out.push(StatusExtent {
                            len: u32::from_be_bytes(e[..4].try_into().expect("4")).into(),
                            flags: u32::from_be_bytes(e[4..].try_into().expect("4")),
                        });
                    }
                }
                Ok(())
            } else if ty == REPLY_TYPE_NONE {
                Ok(())
            } else {
                Err(invalid(format!("unexpected block status reply {ty}")))
            }
        })?;
        if out.is_empty() || out.iter().any(|e| e.len == 0) {
            return Err(invalid("empty block status reply"));
        }
        Ok(out)
    }

    /// Every extent of context `name` over the whole export, in order, as
    /// (offset, length, flags); lengths are clipped to the export's end.
    pub fn map(&mut self, name: &str) -> Result<Vec<(u64, u64, u32)>> {
        let size = self.size;
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            for e in self.block_status(name, pos, size - pos)? {
                let len = e.len.min(size - pos);
                out.push((pos, len, e.flags));
                pos += len;
                if pos >= size {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16> {
        let mut b = [0; 2];
        self.sock.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0; 4];
        self.sock.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut b = [0; 8];
        self.sock.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0);
    }
}

/// A request the server failed, as the error it sent (EIO for one it does not name).
fn remote_error(errno: u32) -> Error {
    let errno = match errno {
        EPERM | EIO | ENOMEM | EINVAL | ENOSPC | EOVERFLOW | ENOTSUP | ESHUTDOWN => errno,
        _ => EIO,
    };
    Error::Io(std::io::Error::from_raw_os_error(errno as i32))
}

/// The name of option `opt` in messages.
fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "export name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured reply",
        OPT_LIST_META_CONTEXT => "list meta context",
        OPT_SET_META_CONTEXT => "set meta context",
        OPT_EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// The error for option `opt` refused with reply type `ty` and the server's
/// message `msg`, worded as qemu-img words it.
fn refused(opt: u32, ty: u32, msg: &[u8]) -> Error {
    let name = option_name(opt);
    let mut m = match ty {
        REP_ERR_POLICY => format!("Denied by server for option {opt:x} ({name})"),
        REP_ERR_INVALID => format!("Invalid data length for option {opt:x} ({name})"),
        REP_ERR_PLATFORM => format!("Server lacks support for option {opt:x} ({name})"),
        REP_ERR_TLS_REQD => format!(
            "TLS negotiation required before option {opt:x} ({name})\nDid you forget a valid tls-creds?"
        ),
        REP_ERR_SHUTDOWN => format!("Server shutting down before option {opt:x} ({name})"),
        REP_ERR_UNSUP if opt == OPT_STARTTLS => "Server don't support STARTTLS option".into(),
        _ => format!("Unknown error code when asking for option {opt:x} ({name})"),
    };
    // qemu-img reports the server's own words except for an unsupported STARTTLS.
    if !msg.is_empty() && ty != REP_ERR_UNSUP {
        m.push_str("\nserver reported: ");
        m.push_str(&String::from_utf8_lossy(msg));
    }
    Error::Invalid(m)
}

/// A read from a TLS session that failed, in qemu-img's words: the server
/// hung up (it may refuse the client's certificate so) or reset the connection.
fn tls_read_failure(e: &std::io::Error) -> String {
    let cut = e.kind() == std::io::ErrorKind::UnexpectedEof
        || e.get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .is_some_and(|r| matches!(r, rustls::Error::AlertReceived(_)));
    if cut {
        "Cannot read from TLS channel: The TLS connection was non-properly terminated.".into()
    } else {
        format!(
            "Unable to read from socket: {}",
            strata_storage::os_message(e)
        )
    }
}

/// A failed TLS handshake, worded as qemu-img words the usual causes;
/// `host` is the name the certificate was checked against.
fn tls_failure(e: std::io::Error, host: Option<&str>) -> Error {
    use rustls::CertificateError as C;
    let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return Error::Io(e);
    };
    let msg = match r {
        // A CA of the issuer's name whose key did not sign it is no issuer either.
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            "The certificate hasn't got a known issuer".to_string()
        }
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => {
            format!(
                "Certificate does not match the hostname {}",
                host.unwrap_or_default()
            )
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "The certificate has expired".to_string()
        }
        other => other.to_string(),
    };
    Error::Invalid(msg)
}

/// Append a 32-bit length and `s`.
fn put_str(out: &mut Vec<u8>, s: &[u8]) -> Result<()> {
    let n = u32::try_from(s.len()).map_err(|_| invalid("name too long"))?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(s);
    Ok(())
}
