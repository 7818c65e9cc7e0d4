//! Helpers for the API tests: a `strata serve` child on a free loopback port,
//! tokens, and plain HTTP/1.1 over a socket (so a test controls every byte,
//! including bodies that stop half way).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::STRATA;

/// A running `strata serve`, killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub url: String,
    pub state: PathBuf,
}

impl Server {
    /// A new backup repository at `repo` (`strata backup init`, its password
    /// file beside it) and `strata serve` on `state` started with it.
    pub fn start_with_backups(state: &Path, repo: &Path) -> Server {
        use super::restic::{run, s, strata, PASSWORD};
        run(strata(&["init", "--repo", s(repo)]));
        let pw = repo.with_extension("password");
        std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
        Server::start(
            state,
            &["--backup-repo", s(repo), "--backup-password-file", s(&pw)],
        )
    }

    /// Start `strata serve` on `state` with extra `args`; waits until it listens.
    pub fn start(state: &Path, args: &[&str]) -> Server {
        Server::start_with(state, args, |_| ())
    }

    /// [`Server::start`] with the command given to `env` first (credentials
    /// of an object store, say).
    pub fn start_with(state: &Path, args: &[&str], env: impl FnOnce(&mut Command)) -> Server {
        let mut cmd = Command::new(STRATA);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state)
            .args(args)
            .stdout(Stdio::piped());
        env(&mut cmd);
        let mut child = cmd.spawn().expect("start strata serve");
        let mut out = child.stdout.take().unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while out.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        let url = line
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("http"))
            .unwrap_or_else(|| panic!("strata serve did not start: {line:?}"))
            .to_string();
        let addr = url.rsplit('/').next().unwrap().parse().unwrap();
        Server {
            child,
            addr,
            url,
            state: state.to_path_buf(),
        }
    }

    /// Start `strata serve` over TLS with a new self-signed certificate for
    /// 127.0.0.1 in `dir`; the server and the certificate (a client's CA file).
    pub fn start_tls(state: &Path, dir: &Path) -> (Server, PathBuf) {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let o = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl must be installed");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let srv = Server::start(
            state,
            &[
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
        );
        assert!(srv.url.starts_with("https://"), "{}", srv.url);
        (srv, cert)
    }

    /// The server's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Create an image with the attributes in `body` (`POST /v2/images`,
    /// which must answer 201); the image as the server shows it.
    pub fn create(&self, token: &str, body: &serde_json::Value) -> serde_json::Value {
        let r = self.req(
            "POST",
            "/v2/images",
            Some(token),
            Some("application/json"),
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    }

    /// Send signal `sig` to the server and wait up to `limit` for it to exit
    /// (a server still running then fails the test); its exit status.
    pub fn stop_with(&mut self, sig: libc::c_int, limit: Duration) -> std::process::ExitStatus {
        // SAFETY: kill(2) on the child this helper started and has not reaped.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(sent, 0);
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "strata serve still runs {limit:?} after signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Send a whole request and read the whole response.
    pub fn req(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        ctype: Option<&str>,
        body: &[u8],
    ) -> Reply {
        let mut s = connect(self.addr);
        let h = head(method, path, token, ctype, Some(body.len() as u64));
        s.write_all(h.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        read_reply(&mut s)
    }

    /// A request with a JSON body.
    pub fn json(&self, method: &str, path: &str, token: &str, body: &serde_json::Value) -> Reply {
        let body = serde_json::to_vec(body).unwrap();
        self.req(method, path, Some(token), Some("application/json"), &body)
    }

    /// Poll task `id` until it is no longer running (within `STRATA_TEST_TASK_WAIT`
    /// seconds, default 180); returns it.
    pub fn wait_task(&self, token: &str, id: &str) -> serde_json::Value {
        let limit = std::env::var("STRATA_TEST_TASK_WAIT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(180);
        let deadline = std::time::Instant::now() + Duration::from_secs(limit);
        loop {
            let r = self.req(
                "GET",
                &format!("/api/v1/tasks/{id}"),
                Some(token),
                None,
                b"",
            );
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let t = r.json();
            if t["state"] != "running" {
                return t;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "task {id} still running: {t}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last line of task `t`'s log (where a finished task says its result
    /// or its error).
    pub fn last_log(t: &serde_json::Value) -> String {
        t["log"]
            .as_array()
            .and_then(|l| l.last())
            .and_then(|l| l.as_str())
            .unwrap_or_else(|| panic!("task without a log line: {t}"))
            .to_string()
    }

    /// Follow a 202 answer to its task (named by `Location`) until it ends.
    pub fn follow(&self, token: &str, started: &Reply) -> serde_json::Value {
        assert_eq!(
            started.status,
            202,
            "{}",
            String::from_utf8_lossy(&started.body)
        );
        let id = started.json()["task"].as_str().unwrap().to_string();
        assert_eq!(
            started.header("location").as_deref(),
            Some(format!("/api/v1/tasks/{id}").as_str())
        );
        self.wait_task(token, &id)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A new token in `state` (`strata token create`).
pub fn token(state: &Path, read_only: bool) -> String {
    let mut c = Command::new(STRATA);
    c.args(["token", "create", "--state-dir"]).arg(state);
    if read_only {
        c.arg("--read-only");
    }
    let o = c.output().expect("strata token create");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

/// An HTTP response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The message of a Glance-shaped error (`{"error": {"message": ...}}`).
    pub fn error_message(&self) -> String {
        let v = self.json();
        assert_eq!(v["error"]["code"].as_u64(), Some(self.status as u64), "{v}");
        v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message: {v}"))
            .to_string()
    }

    /// Require `status`; the body's JSON (`null` when empty).
    pub fn expect(&self, status: u16) -> serde_json::Value {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        if self.body.is_empty() {
            serde_json::Value::Null
        } else {
            self.json()
        }
    }

    /// Require an error answer with `status` whose message contains `needle`
    /// (`what` names the request in the failure).
    pub fn refused(&self, status: u16, needle: &str, what: &dyn std::fmt::Display) {
        assert_eq!(
            self.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&self.body)
        );
        let msg = self.error_message();
        assert!(msg.contains(needle), "{what}: {msg}");
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Head of a request with `Connection: close` (and the token as `X-Auth-Token`).
pub fn head(
    method: &str,
    path: &str,
    token: Option<&str>,
    ctype: Option<&str>,
    len: Option<u64>,
) -> String {
    let mut h = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(t) = token {
        h += &format!("X-Auth-Token: {t}\r\n");
    }
    if let Some(c) = ctype {
        h += &format!("Content-Type: {c}\r\n");
    }
    if let Some(n) = len {
        h += &format!("Content-Length: {n}\r\n");
    }
    h + "\r\n"
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to strata serve");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Read a response to the end of the connection (bodies are not chunked by
/// length here: the server closes after answering).
pub fn read_reply(s: &mut TcpStream) -> Reply {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(&all)));
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let mut body = all[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Reply { status, head, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

/// The digest `tool` (md5sum, sha512sum) prints for `file`.
pub fn hash(tool: &str, file: &Path) -> String {
    let o = Command::new(tool).arg(file).output().expect(tool);
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The status of image `id` as the API shows it.
pub fn status_of(srv: &Server, token: &str, id: &str) -> String {
    let r = srv.req("GET", &format!("/v2/images/{id}"), Some(token), None, b"");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["status"].as_str().unwrap().to_string()
}

/// Create a bare image of `disk_format` named `name`; its ID.
pub fn create_image(srv: &Server, tok: &str, name: &str, disk_format: &str) -> String {
    let body = format!(
        r#"{{"name": "{name}", "disk_format": "{disk_format}", "container_format": "bare"}}"#
    );
    let r = srv.req(
        "POST",
        "/v2/images",
        Some(tok),
        Some("application/json"),
        body.as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_string()
}

/// Wait (bounded) until image `id` shows `want`.
pub fn wait_status(srv: &Server, tok: &str, id: &str, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = status_of(srv, tok, id);
        if s == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "image {id} stayed {s}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
