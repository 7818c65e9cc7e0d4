//! A client for QEMU's guest agent (qemu-ga), over the host end of its
//! virtio-serial port (a unix socket chardev).
//!
//! The channel has no greeting and survives agent restarts, so it can hold stale
//! replies or half a message: [`Agent::sync`] sends `guest-sync-delimited` with a
//! fresh id after a 0xFF byte (which resets the agent's parser), then skips
//! everything up to the 0xFF byte the agent puts before its reply and up to the
//! reply carrying that id. Every request carries an id and replies with another
//! id are skipped. A call that timed out leaves the channel unsynchronised; the
//! next call syncs again first. Re-sync explicitly after a snapshot load, a
//! restore, or an agent restart.

use std::io::{BufRead, BufReader, ErrorKind as IoKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, ErrorKind, Result};
use crate::wire::{self, command, Command, Empty};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// The time allowed for a reply unless a call says otherwise.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often `exec` polls `guest-exec-status`.
const EXEC_POLL: Duration = Duration::from_millis(50);

/// Bytes per `guest-file-read` / `guest-file-write` call.
const FILE_CHUNK: usize = 256 * 1024;

/// A connection to a guest agent.
pub struct Agent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    synced: bool,
    timeout: Duration,
}

/// What `guest-exec-status` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExecStatus {
    pub exited: bool,
    #[serde(default)]
    pub exitcode: Option<i64>,
    #[serde(default)]
    pub signal: Option<i64>,
    #[serde(default)]
    pub out_data: Option<String>,
    #[serde(default)]
    pub err_data: Option<String>,
    #[serde(default)]
    pub out_truncated: bool,
    #[serde(default)]
    pub err_truncated: bool,
}

/// A finished guest command: its exit code (or the signal that ended it) and
/// its decoded output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// The guest's filesystem freeze state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeStatus {
    Thawed,
    Frozen,
}

/// `guest-ping`.
#[derive(Debug, Clone, Serialize)]
pub struct GuestPing {}
command!(GuestPing, "guest-ping", Empty);

/// `guest-exec`: start a program (not through a shell) with output captured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestExec {
    pub path: String,
    pub arg: Vec<String>,
    pub capture_output: bool,
}
#[derive(Debug, Clone, Deserialize)]
pub struct ExecPid {
    pub pid: i64,
}
command!(GuestExec, "guest-exec", ExecPid);

/// `guest-exec-status`.
#[derive(Debug, Clone, Serialize)]
pub struct GuestExecStatus {
    pub pid: i64,
}
command!(GuestExecStatus, "guest-exec-status", ExecStatus);

/// `guest-fsfreeze-freeze`: the number of filesystems frozen.
#[derive(Debug, Clone, Serialize)]
pub struct GuestFsfreezeFreeze {}
command!(GuestFsfreezeFreeze, "guest-fsfreeze-freeze", u64);

/// `guest-fsfreeze-thaw`: the number of filesystems thawed.
#[derive(Debug, Clone, Serialize)]
pub struct GuestFsfreezeThaw {}
command!(GuestFsfreezeThaw, "guest-fsfreeze-thaw", u64);

/// `guest-fsfreeze-status`.
#[derive(Debug, Clone, Serialize)]
pub struct GuestFsfreezeStatus {}
command!(GuestFsfreezeStatus, "guest-fsfreeze-status", FreezeStatus);

/// `guest-file-open`: a handle for `path` opened with fopen-style `mode`.
#[derive(Debug, Clone, Serialize)]
pub struct GuestFileOpen {
    pub path: String,
    pub mode: String,
}
command!(GuestFileOpen, "guest-file-open", i64);

/// `guest-file-read`.
#[derive(Debug, Clone, Serialize)]
pub struct GuestFileRead {
    pub handle: i64,
    pub count: u64,
}
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileRead {
    pub count: u64,
    pub buf_b64: String,
    pub eof: bool,
}
command!(GuestFileRead, "guest-file-read", FileRead);

/// `guest-file-write`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestFileWrite {
    pub handle: i64,
    pub buf_b64: String,
}
#[derive(Debug, Clone, Deserialize)]
pub struct FileWrite {
    pub count: u64,
    pub eof: bool,
}
command!(GuestFileWrite, "guest-file-write", FileWrite);

/// `guest-file-close`.
#[derive(Debug, Clone, Serialize)]
pub struct GuestFileClose {
    pub handle: i64,
}
command!(GuestFileClose, "guest-file-close", Empty);

fn op_name(command: &str) -> String {
    format!("guest agent {command}")
}

impl Agent {
    /// Connect to the agent's chardev socket and synchronise, retrying the
    /// connection (the socket may not exist yet) and the sync until `timeout`.
    /// QEMU serves one client per chardev socket: while another connection is
    /// open, a second one is accepted by the kernel but never answered, so its
    /// sync times out. Callers serialise their agent use (per-VM lock).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Agent> {
        let op = format!("guest agent connect to {}", path.display());
        let deadline = Instant::now() + timeout;
        let stream = wire::connect_retry(&op, path, deadline)?;
        let writer = stream.try_clone().map_err(|e| Error::io(&op, e))?;
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64 ^ d.as_secs())
            .unwrap_or(1);
        let mut agent = Agent {
            reader: BufReader::new(stream),
            writer,
            // Ids stay well inside the range every JSON parser reads exactly.
            next_id: (seed ^ u64::from(std::process::id())) & 0x3fff_ffff,
            synced: false,
            timeout: DEFAULT_AGENT_TIMEOUT,
        };
        agent.sync(deadline.saturating_duration_since(Instant::now()))?;
        Ok(agent)
    }

    /// Change the time calls allow for a reply.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Synchronise the channel (see the module doc): after this, the next reply
    /// read answers the next request sent. The sync request is repeated every
    /// second until `timeout`, since an agent that is still starting drops it.
    pub fn sync(&mut self, timeout: Duration) -> Result<()> {
        let op = op_name("guest-sync-delimited");
        let deadline = Instant::now() + timeout;
        self.synced = false;
        loop {
            let id = self.fresh_id();
            let mut req = vec![0xFF];
            req.extend(wire::request_line(
                "guest-sync-delimited",
                Some(&serde_json::json!({ "id": id })),
                id,
            ));
            self.writer
                .write_all(&req)
                .map_err(|e| self.write_error(&op, e))?;
            let attempt_end = deadline.min(Instant::now() + Duration::from_secs(1));
            loop {
                match self.read_delimited(&op, attempt_end) {
                    Ok(msg) if msg.get("return").and_then(Value::as_u64) == Some(id) => {
                        self.synced = true;
                        return Ok(());
                    }
                    Ok(_) => continue,
                    Err(e) if e.is_timeout() => break,
                    Err(e) => return Err(e),
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::new(op, ErrorKind::Timeout(timeout)));
            }
        }
    }

    /// Run a typed agent command within the default timeout.
    pub fn execute<C: Command>(&mut self, cmd: &C) -> Result<C::Reply> {
        self.execute_timeout(cmd, self.timeout)
    }

    /// Run a typed agent command, allowing `timeout` for the reply.
    pub fn execute_timeout<C: Command>(&mut self, cmd: &C, timeout: Duration) -> Result<C::Reply> {
        let op = op_name(C::NAME);
        let args = wire::arguments(&op, cmd)?;
        let v = self.execute_raw(C::NAME, args.as_ref(), timeout)?;
        wire::decode(&op, v)
    }

    /// Run any agent command by name and return its `return` member.
    pub fn execute_value(&mut self, name: &str, args: Option<Value>) -> Result<Value> {
        self.execute_raw(name, args.as_ref(), self.timeout)
    }

    fn execute_raw(
        &mut self,
        name: &str,
        args: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let op = op_name(name);
        let deadline = Instant::now() + timeout;
        if !self.synced {
            self.sync(timeout)?;
        }
        let id = self.fresh_id();
        let line = wire::request_line(name, args, id);
        self.writer
            .write_all(&line)
            .map_err(|e| self.write_error(&op, e))?;
        loop {
            let msg = match self.read_line(&op, deadline) {
                Ok(m) => m,
                Err(e) => {
                    self.synced = false;
                    if e.is_timeout() {
                        return Err(Error::new(op, ErrorKind::Timeout(timeout)));
                    }
                    return Err(e);
                }
            };
            match msg.get("id").and_then(Value::as_u64) {
                Some(got) if got == id => return wire::reply_value(&op, name, msg),
                // A late reply to an earlier request.
                _ => continue,
            }
        }
    }

    /// `guest-ping`.
    pub fn ping(&mut self) -> Result<()> {
        self.execute(&GuestPing {}).map(|_| ())
    }

    /// Start `path` with `args` in the guest, output captured; returns its pid.
    pub fn exec_start(&mut self, path: &str, args: &[&str]) -> Result<i64> {
        let cmd = GuestExec {
            path: path.to_string(),
            arg: args.iter().map(|a| a.to_string()).collect(),
            capture_output: true,
        };
        Ok(self.execute(&cmd)?.pid)
    }

    /// `guest-exec-status` of a process started with `exec_start`.
    pub fn exec_status(&mut self, pid: i64) -> Result<ExecStatus> {
        self.execute(&GuestExecStatus { pid })
    }

    /// Run `path` with `args` in the guest and wait up to `timeout` for it to
    /// exit; returns its exit code and decoded output.
    pub fn exec(&mut self, path: &str, args: &[&str], timeout: Duration) -> Result<ExecOutput> {
        let op = op_name("guest-exec-status");
        let deadline = Instant::now() + timeout;
        let pid = self.exec_start(path, args)?;
        loop {
            let st = self.exec_status(pid)?;
            if st.exited {
                let decode = |d: &Option<String>| match d {
                    None => Ok(Vec::new()),
                    Some(s) => B64
                        .decode(s)
                        .map_err(|e| Error::protocol(&op, format!("bad base64 output: {e}"))),
                };
                return Ok(ExecOutput {
                    exit_code: st.exitcode,
                    signal: st.signal,
                    stdout: decode(&st.out_data)?,
                    stderr: decode(&st.err_data)?,
                });
            }
            if Instant::now() + EXEC_POLL > deadline {
                return Err(Error::new(
                    format!("{op} (pid {pid}, {path})"),
                    ErrorKind::Timeout(timeout),
                ));
            }
            std::thread::sleep(EXEC_POLL);
        }
    }

    /// Freeze the guest's filesystems; returns how many were frozen.
    pub fn fsfreeze_freeze(&mut self) -> Result<u64> {
        self.execute(&GuestFsfreezeFreeze {})
    }

    /// Thaw the guest's filesystems; returns how many were thawed.
    pub fn fsfreeze_thaw(&mut self) -> Result<u64> {
        self.execute(&GuestFsfreezeThaw {})
    }

    pub fn fsfreeze_status(&mut self) -> Result<FreezeStatus> {
        self.execute(&GuestFsfreezeStatus {})
    }

    pub fn file_open(&mut self, path: &str, mode: &str) -> Result<i64> {
        self.execute(&GuestFileOpen {
            path: path.to_string(),
            mode: mode.to_string(),
        })
    }

    /// Read up to `count` bytes; the flag is true at end of file.
    pub fn file_read(&mut self, handle: i64, count: u64) -> Result<(Vec<u8>, bool)> {
        let r = self.execute(&GuestFileRead { handle, count })?;
        let data = B64.decode(&r.buf_b64).map_err(|e| {
            Error::protocol(
                op_name(GuestFileRead::NAME),
                format!("bad base64 data: {e}"),
            )
        })?;
        if data.len() as u64 != r.count {
            return Err(Error::protocol(
                op_name(GuestFileRead::NAME),
                format!("count {} but {} bytes of data", r.count, data.len()),
            ));
        }
        Ok((data, r.eof))
    }

    /// Write all of `data`; returns the count the agent reports.
    pub fn file_write(&mut self, handle: i64, data: &[u8]) -> Result<u64> {
        let r = self.execute(&GuestFileWrite {
            handle,
            buf_b64: B64.encode(data),
        })?;
        Ok(r.count)
    }

    pub fn file_close(&mut self, handle: i64) -> Result<()> {
        self.execute(&GuestFileClose { handle }).map(|_| ())
    }

    /// Create or replace the guest file `path` with `data` (closed, and so
    /// flushed to the guest's page cache, before this returns).
    pub fn write_file(&mut self, path: &str, data: &[u8]) -> Result<()> {
        let h = self.file_open(path, "w")?;
        let written = data.chunks(FILE_CHUNK).try_for_each(|c| {
            let n = self.file_write(h, c)?;
            if n != c.len() as u64 {
                return Err(Error::protocol(
                    op_name(GuestFileWrite::NAME),
                    format!("short write to {path}: {n} of {} bytes", c.len()),
                ));
            }
            Ok(())
        });
        // Close on every path, so no handle leaks in the agent.
        let closed = self.file_close(h);
        written.and(closed)
    }

    /// The whole content of the guest file `path`.
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>> {
        let h = self.file_open(path, "r")?;
        let mut out = Vec::new();
        let read = loop {
            match self.file_read(h, FILE_CHUNK as u64) {
                Ok((d, eof)) => {
                    let empty = d.is_empty();
                    out.extend(d);
                    if eof || empty {
                        break Ok(());
                    }
                }
                Err(e) => break Err(e),
            }
        };
        let closed = self.file_close(h);
        read.and(closed).map(|_| out)
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id = (self.next_id + 1) & 0x3fff_ffff;
        self.next_id
    }

    fn write_error(&mut self, op: &str, e: std::io::Error) -> Error {
        self.synced = false;
        match e.kind() {
            IoKind::BrokenPipe | IoKind::ConnectionReset => {
                Error::new(op, ErrorKind::QemuExited(format!("agent channel: {e}")))
            }
            _ => Error::io(op, e),
        }
    }

    /// Skip to the next 0xFF byte, then read the message after it.
    fn read_delimited(&mut self, op: &str, deadline: Instant) -> Result<Map<String, Value>> {
        loop {
            let mut byte = [0u8];
            self.set_deadline(op, deadline)?;
            match self.reader.read(&mut byte) {
                Ok(0) => return Err(closed(op)),
                Ok(_) if byte[0] == 0xFF => return self.read_line(op, deadline),
                Ok(_) => continue,
                Err(e) => return Err(read_error(op, e, deadline)),
            }
        }
    }

    /// Read one complete JSON message (one line) before `deadline`.
    fn read_line(&mut self, op: &str, deadline: Instant) -> Result<Map<String, Value>> {
        let mut line = Vec::new();
        loop {
            self.set_deadline(op, deadline)?;
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => return Err(closed(op)),
                Ok(_) if line.ends_with(b"\n") => {
                    if line.iter().all(u8::is_ascii_whitespace) {
                        line.clear();
                        continue;
                    }
                    // A 0xFF inside a line is the tail of an earlier sync.
                    let start = line.iter().rposition(|&b| b == 0xFF).map_or(0, |i| i + 1);
                    return serde_json::from_slice(&line[start..]).map_err(|e| {
                        self.synced = false;
                        Error::protocol(op, format!("unparsable reply: {e}"))
                    });
                }
                Ok(_) => continue,
                Err(e) => return Err(read_error(op, e, deadline)),
            }
        }
    }

    fn set_deadline(&mut self, op: &str, deadline: Instant) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::new(op, ErrorKind::Timeout(Duration::ZERO)));
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| Error::io(op, e))
    }
}

fn closed(op: &str) -> Error {
    Error::new(
        op,
        ErrorKind::QemuExited("the agent channel closed".to_string()),
    )
}

fn read_error(op: &str, e: std::io::Error, deadline: Instant) -> Error {
    match e.kind() {
        IoKind::WouldBlock | IoKind::TimedOut => Error::new(
            op,
            ErrorKind::Timeout(deadline.saturating_duration_since(Instant::now())),
        ),
        IoKind::ConnectionReset => closed(op),
        _ => Error::io(op, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn sync_skips_stale_output_up_to_the_delimited_reply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut w, _) = listener.accept().unwrap();
            let mut r = BufReader::new(w.try_clone().unwrap());
            // The request starts with the 0xFF that resets the agent's parser.
            let mut first = [0u8];
            r.read_exact(&mut first).unwrap();
            assert_eq!(first[0], 0xFF);
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).unwrap();
            let req: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(req["execute"], "guest-sync-delimited");
            let id = req["arguments"]["id"].as_u64().unwrap();
            // Half a stale message, a stale reply, an old sync's answer, then ours.
            write!(w, "{{\"return\": {{\"pid\"").unwrap();
            writeln!(w, "\n{{\"return\": {{}}, \"id\": 3}}").unwrap();
            w.write_all(b"\xff{\"return\": 12}\n").unwrap();
            w.write_all(b"\xff").unwrap();
            writeln!(w, "{{\"return\": {id}}}").unwrap();
            // Then a ping, answered after a reply to some other id.
            line.clear();
            r.read_until(b'\n', &mut line).unwrap();
            let req: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(req["execute"], "guest-ping");
            writeln!(w, "{{\"return\": {{}}, \"id\": 99999999999}}").unwrap();
            writeln!(w, "{{\"return\": {{}}, \"id\": {}}}", req["id"]).unwrap();
            let _ = r.read_until(b'\n', &mut line);
        });
        let mut agent = Agent::connect(&path, Duration::from_secs(5)).unwrap();
        agent.ping().unwrap();
    }
}
