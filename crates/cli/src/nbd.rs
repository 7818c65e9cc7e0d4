//! `strata nbd`: the NBD server (`serve`, the counterpart of qemu-nbd) and its
//! control client (`ctl`).

use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use strata_format::Format;
use strata_nbd::{DetectZeroes, Discard, Export, ExportConfig, Server, ServerConfig};

#[derive(clap::Args)]
pub struct NbdCli {
    #[command(subcommand)]
    command: NbdCommand,
}

#[derive(clap::Subcommand)]
enum NbdCommand {
    /// Export images (and their backing chains) over NBD.
    Serve(Box<ServeArgs>),
    /// Send a live operation to a running server's control socket.
    Ctl(CtlArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The image to export (named by --export-name).
    file: Option<PathBuf>,
    /// Name of the export of FILE.
    #[arg(short = 'x', long = "export-name", default_value = "")]
    export_name: String,
    /// More exports, as NAME=PATH (repeatable).
    #[arg(long = "export", value_name = "NAME=PATH")]
    exports: Vec<String>,
    /// Format of the image(s) (probed when not given: qcow2 by magic, else raw).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Description of the exports (NBD_INFO_DESCRIPTION).
    #[arg(short = 'D', long = "description", default_value = "")]
    description: String,
    #[command(flatten)]
    listen: ListenArgs,
    /// Control socket for live operations (see `strata nbd ctl`).
    #[arg(long = "control")]
    control: Option<PathBuf>,
    /// TLS certificate chain (PEM); with --tls-key, clients must use TLS.
    #[arg(long = "tls-cert", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long = "tls-key", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Minimum block size advertised and enforced (power of two, 1..65536).
    #[arg(long = "min-block-size", default_value_t = 1)]
    min_block_size: u32,
    /// Requests carried out concurrently per connection.
    #[arg(long = "workers", default_value_t = 4)]
    workers: usize,
    /// What a client's TRIM does, as qemu-nbd's: `ignore` (the default:
    /// nothing) or `unmap` (the range is freed; a write-zeroes may free too).
    #[arg(long = "discard", value_name = "MODE", default_value = "ignore")]
    discard: String,
    /// Whether writes of zero data become write-zeroes, as qemu-nbd's: `off`
    /// (the default), `on`, or `unmap` (may free the range; needs
    /// --discard=unmap).
    #[arg(long = "detect-zeroes", value_name = "MODE", default_value = "off")]
    detect_zeroes: String,
}

/// Where a server listens (shared by every command that serves NBD).
#[derive(clap::Args)]
pub(crate) struct ListenArgs {
    /// Address to listen on for TCP.
    #[arg(short = 'b', long = "bind")]
    pub bind: Option<String>,
    /// TCP port (0 picks a free one; the port is printed).
    #[arg(short = 'p', long = "port")]
    pub port: Option<u16>,
    /// Listen on this Unix socket (then no TCP unless --bind or --port is given).
    #[arg(short = 'k', long = "socket")]
    pub socket: Option<PathBuf>,
}

#[derive(clap::Args)]
struct CtlArgs {
    /// The server's control socket.
    #[arg(long = "socket", short = 's')]
    socket: PathBuf,
    /// The export to act on (needed when the server has several).
    #[arg(long = "export")]
    export: Option<String>,
    /// snapshot NAME | snapshot-external OVERLAY | commit | stream | list | quit
    #[arg(required = true, num_args = 1..=2)]
    command: Vec<String>,
}

pub fn run(cli: NbdCli) -> i32 {
    let r = match cli.command {
        NbdCommand::Serve(a) => serve(*a),
        NbdCommand::Ctl(a) => ctl(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            // The error and its causes, each said once.
            crate::img::Ctx { prog: "strata nbd" }.error(&e);
            1
        }
    }
}

static QUIT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    QUIT.store(true, Ordering::SeqCst);
}

fn serve(a: ServeArgs) -> Result<i32> {
    let format = a
        .format
        .as_deref()
        .map(|f| f.parse::<Format>())
        .transpose()
        .map_err(|e| anyhow!("{e}"))?;
    let discard: Discard = a.discard.parse()?;
    let detect_zeroes: DetectZeroes = a.detect_zeroes.parse()?;
    if detect_zeroes == DetectZeroes::Unmap && discard != Discard::Unmap {
        bail!("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap");
    }
    let mut configs = Vec::new();
    let mk = |name: &str, path: PathBuf| ExportConfig {
        name: name.to_string(),
        path,
        format,
        read_only: a.read_only,
        description: a.description.clone(),
        min_block: a.min_block_size,
        discard,
        detect_zeroes,
    };
    if let Some(f) = &a.file {
        configs.push(mk(&a.export_name, f.clone()));
    }
    for e in &a.exports {
        let (name, path) = e
            .split_once('=')
            .ok_or_else(|| anyhow!("--export wants NAME=PATH, not '{e}'"))?;
        configs.push(mk(name, PathBuf::from(path)));
    }
    if configs.is_empty() {
        bail!("nothing to export: give an image file or --export NAME=PATH");
    }
    let mut names = std::collections::HashSet::new();
    for c in &configs {
        if !names.insert(c.name.clone()) {
            bail!("export name '{}' given twice", c.name);
        }
    }
    let exports = configs
        .iter()
        .map(|c| {
            Export::open(c)
                .map(Arc::new)
                .with_context(|| format!("cannot export '{}'", c.path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let tls = a.tls_cert.zip(a.tls_key);
    run_server(
        exports,
        Listen {
            bind: a.listen.bind,
            port: a.listen.port,
            socket: a.listen.socket,
            control: a.control,
            tls,
            workers: a.workers,
            prog: "strata nbd",
        },
    )
}

/// Where and how a server listens.
pub(crate) struct Listen {
    /// TCP address (with or without `port`, TCP is used when no socket is given).
    pub bind: Option<String>,
    pub port: Option<u16>,
    pub socket: Option<PathBuf>,
    /// Control socket for live operations.
    pub control: Option<PathBuf>,
    /// TLS certificate chain and key (PEM): clients must then use TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub workers: usize,
    /// The program name in messages.
    pub prog: &'static str,
}

/// Serve `exports` until SIGINT or SIGTERM (or a control `quit`); then shut
/// down, removing the sockets made.
pub(crate) fn run_server(exports: Vec<Arc<Export>>, l: Listen) -> Result<i32> {
    let prog = l.prog;
    let tls = match &l.tls {
        Some((cert, key)) => Some(strata_nbd::tls::server_config(cert, key)?),
        None => None,
    };
    let server = Server::new(ServerConfig {
        exports,
        tls,
        workers: l.workers.clamp(1, 64),
        log: true,
    });
    // SAFETY: `on_signal` is an `extern "C" fn(c_int)` that only stores to an atomic,
    // which is async-signal-safe; SIG_IGN is a valid disposition.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut threads = Vec::new();
    let quit = Arc::new(AtomicBool::new(false));
    let want_tcp = l.socket.is_none() || l.bind.is_some() || l.port.is_some();
    if want_tcp {
        let addr = format!(
            "{}:{}",
            l.bind.as_deref().unwrap_or("0.0.0.0"),
            l.port.unwrap_or(10809)
        );
        let listener =
            TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!("{prog}: listening on tcp {}", listener.local_addr()?);
        let s = server.clone();
        threads.push(std::thread::spawn(move || {
            if let Err(e) = s.serve_tcp(listener) {
                eprintln!("{prog}: tcp listener: {e}");
            }
        }));
    }
    let mut cleanup = Vec::new();
    if let Some(p) = &l.socket {
        let listener = listen_unix(p)?;
        cleanup.push(p.clone());
        eprintln!("{prog}: listening on unix {}", p.display());
        let s = server.clone();
        threads.push(std::thread::spawn(move || {
            if let Err(e) = s.serve_unix(listener) {
                eprintln!("{prog}: unix listener: {e}");
            }
        }));
    }
    if let Some(p) = &l.control {
        let listener = listen_unix(p)?;
        cleanup.push(p.clone());
        let s = server.clone();
        let q = quit.clone();
        threads.push(std::thread::spawn(move || {
            strata_nbd::control::serve(s, listener, q)
        }));
    }
    eprintln!("{prog}: ready");
    while !QUIT.load(Ordering::SeqCst) && !quit.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{prog}: shutting down");
    let r = server.shutdown();
    for t in threads {
        let _ = t.join();
    }
    for p in cleanup {
        let _ = std::fs::remove_file(p);
    }
    r?;
    Ok(0)
}

/// Listen on the Unix socket `path`. A socket left there by a server that died
/// (a connection to it is refused: nobody listens) is replaced, as qemu-nbd
/// replaces it; a socket a server is listening on is refused, and so is anything
/// at `path` that is not a socket (it is never removed).
fn listen_unix(path: &Path) -> Result<UnixListener> {
    let cannot = || format!("cannot listen on '{}'", path.display());
    match UnixListener::bind(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
        r => return r.with_context(cannot),
    }
    let is_socket = std::fs::symlink_metadata(path)
        .with_context(cannot)?
        .file_type()
        .is_socket();
    if !is_socket {
        bail!("{}: the path exists and is not a socket", cannot());
    }
    match UnixStream::connect(path) {
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            std::fs::remove_file(path).with_context(cannot)?;
            UnixListener::bind(path).with_context(cannot)
        }
        Ok(_) => bail!("{}: a server is listening on it", cannot()),
        Err(e) => Err(e).with_context(cannot),
    }
}

fn ctl(a: CtlArgs) -> Result<i32> {
    let cmd = a.command[0].as_str();
    let arg = a.command.get(1);
    let mut req = serde_json::Map::new();
    req.insert("command".into(), cmd.into());
    match (cmd, arg) {
        ("snapshot", Some(n)) => {
            req.insert("name".into(), n.as_str().into());
        }
        ("snapshot-external", Some(p)) => {
            // Relative to the caller's directory, not the server's.
            let p = std::path::absolute(p).context("overlay path")?;
            req.insert("overlay".into(), p.display().to_string().into());
        }
        ("commit" | "stream" | "list" | "quit", None) => {}
        ("snapshot", None) => bail!("snapshot needs a NAME"),
        ("snapshot-external", None) => bail!("snapshot-external needs an OVERLAY path"),
        _ => bail!(
            "unknown control command '{}' (snapshot NAME, snapshot-external OVERLAY, commit, stream, list, quit)",
            a.command.join(" ")
        ),
    }
    if let Some(e) = &a.export {
        req.insert("export".into(), e.as_str().into());
    }
    let mut s = UnixStream::connect(&a.socket)
        .with_context(|| format!("cannot connect to '{}'", a.socket.display()))?;
    let mut line = serde_json::Value::Object(req).to_string();
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    let v: serde_json::Value =
        serde_json::from_str(&answer).context("the server's answer is not JSON")?;
    if v.get("ok").and_then(|o| o.as_bool()) == Some(true) {
        println!("{}", serde_json::to_string_pretty(&v)?);
        Ok(0)
    } else {
        let msg = v.get("error").and_then(|e| e.as_str()).unwrap_or("failed");
        eprintln!("strata nbd ctl: {cmd}: {msg}");
        Ok(1)
    }
}
