//! NBD helpers of the backup tests: `qemu-nbd` serving an image (a missing
//! qemu-nbd fails the test), and a proxy that counts the bytes its clients ask
//! to read, so a test measures what a backup read without trusting it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `qemu-nbd` serving one image read-only until dropped.
pub struct QemuNbd {
    child: Child,
}

impl QemuNbd {
    /// Serve `image` (qcow2) as `export` with `args` (e.g. `-k SOCK` or
    /// `-p PORT`, `-B BITMAP`); returns once `ready` (a socket path or a TCP
    /// address) accepts connections.
    pub fn start(image: &Path, export: &str, args: &[&str], ready: &str) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args(["-r", "-t", "-f", "qcow2", "-x", export])
            .args(args)
            .arg(image)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("qemu-nbd did not start ({e}); scripts/install-deps.sh installs it")
            });
        let srv = QemuNbd { child };
        wait_listening("qemu-nbd", ready);
        srv
    }
}

/// Wait until `ready` (a socket path or a TCP address) accepts connections.
fn wait_listening(server: &str, ready: &str) {
    let start = Instant::now();
    while !(if ready.starts_with('/') {
        UnixStream::connect(ready).is_ok()
    } else {
        TcpStream::connect(ready).is_ok()
    }) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{server} never listened on {ready}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Which NBD server a test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// QEMU's `qemu-nbd` (persistent: it serves one client after another).
    Qemu,
    /// `strata nbd serve`.
    Strata,
}

/// Both servers, for tests that must pass against each.
pub const SERVERS: [Server; 2] = [Server::Qemu, Server::Strata];

/// An NBD server process serving until dropped.
pub struct NbdServer {
    child: Child,
}

impl NbdServer {
    /// Start `server` with `args` (the flags both take alike: `-f`, `-x`, `-k`,
    /// `-p`, `-b`, `-r`) serving `image`; returns once `ready` (a socket path or
    /// a TCP address) accepts connections.
    pub fn start(server: Server, args: &[&str], image: &Path, ready: &str) -> NbdServer {
        let mut cmd = match server {
            Server::Qemu => {
                let mut c = Command::new("qemu-nbd");
                c.arg("-t");
                c
            }
            Server::Strata => {
                let mut c = Command::new(super::STRATA);
                c.args(["nbd", "serve"]);
                c
            }
        };
        let child = cmd
            .args(args)
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{server:?} NBD server did not start: {e}"));
        let srv = NbdServer { child };
        wait_listening(&format!("{server:?}"), ready);
        srv
    }
}

impl NbdServer {
    /// SIGKILL the server now (a server vanishing under its clients).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port on 127.0.0.1 nothing listens on (free when asked).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Unix-socket proxy in front of an NBD server (a Unix socket path or a TCP
/// address) that forwards every byte and adds up the lengths of the read
/// requests its clients send.
pub struct CountingProxy {
    pub socket: PathBuf,
    read: Arc<AtomicU64>,
}

impl CountingProxy {
    pub fn start(socket: PathBuf, upstream: String) -> CountingProxy {
        let listener = UnixListener::bind(&socket).unwrap();
        let read = Arc::new(AtomicU64::new(0));
        let counter = read.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let (up_r, up_w): (Box<dyn Read + Send>, Box<dyn Write + Send>) =
                    if upstream.starts_with('/') {
                        let s = UnixStream::connect(&upstream).unwrap();
                        (Box::new(s.try_clone().unwrap()), Box::new(s))
                    } else {
                        let s = TcpStream::connect(&upstream).unwrap();
                        (Box::new(s.try_clone().unwrap()), Box::new(s))
                    };
                let mut back = client.try_clone().unwrap();
                let mut up_r = up_r;
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up_r, &mut back);
                });
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let _ = forward_counting(client, up_w, &counter);
                });
            }
        });
        CountingProxy { socket, read }
    }

    /// The bytes asked to be read since the last call.
    pub fn take_read(&self) -> u64 {
        self.read.swap(0, Ordering::SeqCst)
    }

    /// The nbd+unix URL of `export` through the proxy.
    pub fn url(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

/// Copy `n` bytes from `r` to `w`, and return them.
fn pass(r: &mut impl Read, w: &mut impl Write, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)?;
    w.write_all(&b)?;
    Ok(b)
}

/// Forward a client's side of the protocol: its flags, its options up to
/// NBD_OPT_EXPORT_NAME or NBD_OPT_GO, then requests, counting read lengths.
fn forward_counting(
    mut c: UnixStream,
    mut up: Box<dyn Write + Send>,
    read: &AtomicU64,
) -> std::io::Result<()> {
    pass(&mut c, &mut up, 4)?;
    loop {
        let h = pass(&mut c, &mut up, 16)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        pass(&mut c, &mut up, len as usize)?;
        if opt == 1 || opt == 7 {
            break;
        }
    }
    loop {
        let h = pass(&mut c, &mut up, 28)?;
        let ty = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap());
        match ty {
            0 => {
                read.fetch_add(len.into(), Ordering::SeqCst);
            }
            1 => {
                pass(&mut c, &mut up, len as usize)?;
            }
            _ => {}
        }
    }
}

/// Run `args` with both tools, each against its own copy of `image` (in `d`)
/// served by `server` as export `e` on the one socket `d/e.sock`, one tool after
/// the other, so both name the export alike: `{URL}` in an argument stands for
/// its URL, `{SOCK}` for the socket's path. Differences in what they print, and
/// in what QEMU reads from the two copies afterwards, are recorded for
/// [`super::assert_all_same`].
pub fn same_on_export(d: &Path, server: Server, image: &str, args: &[&str]) {
    let sock = d.join("e.sock");
    let sock = sock.to_str().unwrap();
    let url = format!("nbd+unix:///e?socket={sock}");
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("{URL}", &url).replace("{SOCK}", sock))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let copies = ["o-exported", "t-exported"];
    let mut outcomes = Vec::new();
    for (prog, copy) in ["strata", "qemu-img"].into_iter().zip(copies) {
        std::fs::copy(d.join(image), d.join(copy)).unwrap();
        let _srv = NbdServer::start(
            server,
            &["-f", "raw", "-x", "e", "-k", sock],
            &d.join(copy),
            sock,
        );
        outcomes.push(super::outcome(d, prog, &args));
    }
    let what = format!("`img {}` ({server:?} serving {image})", args.join(" "));
    if outcomes[0] != outcomes[1] {
        super::differs(format!(
            "{what}\n  strata:   {:?}\n  qemu-img: {:?}",
            outcomes[0], outcomes[1]
        ));
    }
    let qcow2 = std::fs::read(d.join(copies[1]))
        .unwrap()
        .starts_with(b"QFI\xfb");
    if qcow2 {
        super::same_image(d, copies[0], copies[1], &what);
    } else if std::fs::read(d.join(copies[0])).unwrap() != std::fs::read(d.join(copies[1])).unwrap()
    {
        super::differs(format!("{what}: the exports' bytes differ"));
    }
}
