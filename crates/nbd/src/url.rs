//! NBD URLs as QEMU and libnbd write them: `nbd://HOST[:PORT][/EXPORT]` (TCP,
//! port 10809 by default; `[ADDR]` for IPv6) and
//! `nbd+unix:///[EXPORT]?socket=PATH` (a Unix socket). The export name and the
//! socket path are percent-decoded.

use crate::{Error, Result};
use std::path::PathBuf;

/// The NBD port assigned by IANA.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    /// The address as connection messages name it: `HOST:PORT` or the socket path.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A parsed NBD URL: the server and the export's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    pub address: Address,
    pub export: String,
}

fn bad(url: &str, why: &str) -> Error {
    Error::Invalid(format!(
        "invalid NBD URL '{url}': {why} (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
    ))
}

impl NbdUrl {
    pub fn parse(url: &str) -> Result<NbdUrl> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad(url, "no scheme"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = decode(url, path)?;
        let params: Vec<(&str, &str)> = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .collect();
        let address = match scheme {
            "nbd" | "nbd+tcp" => {
                if let Some((k, _)) = params.first() {
                    return Err(bad(url, &format!("unknown parameter '{k}'")));
                }
                tcp_address(url, authority)?
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(url, "a Unix socket URL names no host"));
                }
                let mut socket = None;
                for (k, v) in params {
                    match k {
                        "socket" => socket = Some(PathBuf::from(decode(url, v)?)),
                        _ => return Err(bad(url, &format!("unknown parameter '{k}'"))),
                    }
                }
                Address::Unix(socket.ok_or_else(|| bad(url, "no ?socket=PATH"))?)
            }
            s => return Err(bad(url, &format!("unknown scheme '{s}'"))),
        };
        Ok(NbdUrl { address, export })
    }
}

/// `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT`.
fn tcp_address(url: &str, authority: &str) -> Result<Address> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad(url, "unclosed '['"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad(url, "no host"));
    }
    // Digits only (no sign); none, or 0, means the default port, as in QEMU.
    let port = match port {
        Some(p) if !p.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(bad(url, &format!("bad port '{p}'")))
        }
        Some(p) if p.bytes().all(|b| b == b'0') => DEFAULT_PORT,
        Some(p) => p
            .parse()
            .map_err(|_| bad(url, &format!("bad port '{p}'")))?,
        None => DEFAULT_PORT,
    };
    Ok(Address::Tcp {
        host: host.to_string(),
        port,
    })
}

/// The TCP port the service `service` names, resolved as the system's
/// resolver (`getaddrinfo`) resolves it for a stream socket, as QEMU resolves
/// the port of an `nbd:HOST:PORT` name: a number (taken modulo 65536, as the
/// resolver takes it), or a service name from the services database
/// (`nbd` is 10809). The error is the resolver's words.
pub fn service_port(service: &str) -> std::result::Result<u16, String> {
    let c = std::ffi::CString::new(service)
        .map_err(|_| "Servname not supported for ai_socktype".to_string())?;
    // SAFETY: `hints` is zeroed but for the socket type, as getaddrinfo
    // wants; `res` is freed once read, and only read when the call succeeded.
    unsafe {
        let mut hints: libc::addrinfo = std::mem::zeroed();
        hints.ai_socktype = libc::SOCK_STREAM;
        hints.ai_family = libc::AF_INET;
        let mut res: *mut libc::addrinfo = std::ptr::null_mut();
        let rc = libc::getaddrinfo(std::ptr::null(), c.as_ptr(), &hints, &mut res);
        if rc != 0 {
            let why = std::ffi::CStr::from_ptr(libc::gai_strerror(rc));
            return Err(why.to_string_lossy().into_owned());
        }
        let addr = (*res).ai_addr as *const libc::sockaddr_in;
        let port = u16::from_be((*addr).sin_port);
        libc::freeaddrinfo(res);
        Ok(port)
    }
}

/// Percent-decode `s` (a part of `url`, for messages).
fn decode(url: &str, s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(url, "bad percent escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(url, "not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUrl {
        NbdUrl {
            address: Address::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn tcp_urls_give_host_port_and_export() {
        let p = |u| NbdUrl::parse(u).unwrap();
        assert_eq!(p("nbd://example.org"), tcp("example.org", 10809, ""));
        assert_eq!(
            p("nbd://10.0.0.1:1234/vm%201"),
            tcp("10.0.0.1", 1234, "vm 1")
        );
        assert_eq!(p("nbd+tcp://h/a/b"), tcp("h", 10809, "a/b"));
        assert_eq!(p("nbd://[::1]:99/x"), tcp("::1", 99, "x"));
        // No port, or port 0, is the default one; leading zeros are read past.
        assert_eq!(p("nbd://h:0/x"), tcp("h", 10809, "x"));
        assert_eq!(p("nbd://h:/x"), tcp("h", 10809, "x"));
        assert_eq!(p("nbd://h:0099/x"), tcp("h", 99, "x"));
    }

    #[test]
    fn unix_urls_give_the_socket_and_export() {
        let u = NbdUrl::parse("nbd+unix:///disk0?socket=/run/a%20b.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/run/a b.sock".into()));
        assert_eq!(u.export, "disk0");
        let u = NbdUrl::parse("nbd+unix://?socket=s").unwrap();
        assert_eq!(u.export, "");
    }

    #[test]
    fn malformed_urls_are_refused_with_the_reason() {
        for (u, why) in [
            ("disk.qcow2", "no scheme"),
            ("http://h/x", "unknown scheme"),
            ("nbd+unix:///x", "no ?socket"),
            ("nbd+unix://host/x?socket=s", "names no host"),
            ("nbd://h:port/x", "bad port"),
            ("nbd://h:+1/x", "bad port"),
            ("nbd://h:65536/x", "bad port"),
            ("nbd://:1/x", "no host"),
            ("nbd://h/x?socket=s", "unknown parameter"),
            ("nbd://h/%zz", "percent"),
        ] {
            let e = NbdUrl::parse(u).unwrap_err().to_string();
            assert!(e.contains(why), "{u}: {e}");
        }
    }
}
