//! A QMP client over QEMU's monitor socket.
//!
//! Blocking, with one reader thread per connection: the reader parses every
//! message QEMU sends, files replies under their request id and appends events to
//! a buffer; callers wait on a condition variable with a deadline. Every wait
//! ends with the awaited message, a timeout, or `QemuExited` as soon as the
//! socket closes (QEMU killed or quit), so no call can hang on a dead QEMU.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use strata_storage::sync;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::commands::{JobDismiss, QmpCapabilities, QueryJobs};
use crate::error::{Error, ErrorKind, Result};
use crate::wire::{self, Command};

/// Events kept for waiters at most; older ones are dropped first.
const MAX_BUFFERED_EVENTS: usize = 4096;

/// The time allowed for a command's reply unless a call says otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// When QEMU stamped an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

/// An asynchronous event QEMU sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    /// The event's `data` member (`Null` when it has none).
    pub data: Value,
    pub timestamp: Option<Timestamp>,
}

impl Event {
    /// A string member of the event's data.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }
    /// A boolean member of the event's data.
    pub fn bool(&self, key: &str) -> Option<bool> {
        self.data.get(key).and_then(Value::as_bool)
    }
}

/// QEMU's version, from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

#[derive(Default)]
struct State {
    greeting: Option<Value>,
    replies: HashMap<u64, Map<String, Value>>,
    /// Ids whose caller gave up waiting: their late replies are dropped.
    abandoned: HashSet<u64>,
    events: VecDeque<Event>,
    /// Why the connection ended, once it has.
    closed: Option<Closed>,
}

/// Why the reader stopped.
#[derive(Debug, Clone)]
enum Closed {
    /// The socket ended or failed: QEMU exited or closed the monitor.
    Exited(String),
    /// QEMU sent something that is not a QMP message; replies can no longer be
    /// matched, so the connection is given up.
    Protocol(String),
}

impl Closed {
    fn error(&self, op: &str) -> Error {
        match self {
            Closed::Exited(why) => Error::new(op, ErrorKind::QemuExited(why.clone())),
            Closed::Protocol(why) => Error::protocol(op, why.clone()),
        }
    }
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent data here.
        sync::lock(&self.state)
    }

    /// Wait until `ready` gives a value, the connection closes, or the deadline
    /// passes. `ready` runs before `closed` is looked at, so anything that arrived
    /// before QEMU went away is still delivered.
    fn wait_for<T>(
        &self,
        op: &str,
        timeout: Duration,
        mut ready: impl FnMut(&mut State) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(v) = ready(&mut st) {
                return Ok(v);
            }
            if let Some(closed) = &st.closed {
                return Err(closed.error(op));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(op, ErrorKind::Timeout(timeout)));
            }
            st = sync::wait_timeout(&self.cond, st, deadline - now);
        }
    }
}

/// A QMP connection in command mode. All methods take `&self`: one thread may
/// wait for an event while another issues commands.
pub struct Qmp {
    writer: Mutex<UnixStream>,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    next_id: Mutex<u64>,
    version: Option<QemuVersion>,
    command_timeout: Duration,
}

impl Qmp {
    /// Connect to QEMU's QMP socket, read the greeting and enter command mode.
    /// The socket may not exist yet (QEMU still starting): connecting is retried
    /// until `timeout`, which also bounds the greeting and `qmp_capabilities`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let op = format!("QMP connect to {}", path.display());
        let deadline = Instant::now() + timeout;
        let stream = wire::connect_retry(&op, path, deadline)?;
        let read_half = stream.try_clone().map_err(|e| Error::io(&op, e))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
        });
        let reader = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("qmp-reader".into())
                .spawn(move || read_loop(read_half, &shared))
                .map_err(|e| Error::io(&op, e))?
        };
        let mut qmp = Qmp {
            writer: Mutex::new(stream),
            shared,
            reader: Some(reader),
            next_id: Mutex::new(1),
            version: None,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let greeting = qmp
            .shared
            .wait_for(&format!("{op} (greeting)"), remaining, |st| {
                st.greeting.take()
            })?;
        qmp.version = greeting
            .pointer("/QMP/version/qemu")
            .and_then(|v| QemuVersion::deserialize(v).ok());
        let remaining = deadline.saturating_duration_since(Instant::now());
        qmp.execute_timeout(&QmpCapabilities {}, remaining)?;
        Ok(qmp)
    }

    /// QEMU's version as its greeting announced it.
    pub fn version(&self) -> Option<QemuVersion> {
        self.version
    }

    /// Change the time `execute` and `execute_value` allow for a reply.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// Run a typed command and decode its reply, within the command timeout.
    pub fn execute<C: Command>(&self, cmd: &C) -> Result<C::Reply> {
        self.execute_timeout(cmd, self.command_timeout)
    }

    /// Run a typed command, allowing `timeout` for the reply.
    pub fn execute_timeout<C: Command>(&self, cmd: &C, timeout: Duration) -> Result<C::Reply> {
        let op = op_name(C::NAME);
        let args = wire::arguments(&op, cmd)?;
        let v = self.execute_raw(C::NAME, args.as_ref(), timeout)?;
        wire::decode(&op, v)
    }

    /// Run any command by name with JSON arguments (`None` for none) and return
    /// the `return` member of its reply.
    pub fn execute_value(&self, name: &str, args: Option<Value>) -> Result<Value> {
        self.execute_raw(name, args.as_ref(), self.command_timeout)
    }

    fn execute_raw(&self, name: &str, args: Option<&Value>, timeout: Duration) -> Result<Value> {
        let op = op_name(name);
        let id = {
            let mut n = sync::lock(&self.next_id);
            *n += 1;
            *n
        };
        let line = wire::request_line(name, args, id);
        {
            let mut w = sync::lock(&self.writer);
            if let Err(e) = w.write_all(&line) {
                // A write to a closed monitor means QEMU is gone; say so.
                if let Some(closed) = self.shared.lock().closed.clone() {
                    return Err(closed.error(&op));
                }
                return Err(match e.kind() {
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                        Error::new(op, ErrorKind::QemuExited(e.to_string()))
                    }
                    _ => Error::io(op, e),
                });
            }
        }
        let reply = self
            .shared
            .wait_for(&op, timeout, |st| st.replies.remove(&id));
        match reply {
            Ok(r) => wire::reply_value(&op, name, r),
            Err(e) => {
                self.shared.lock().abandoned.insert(id);
                Err(e)
            }
        }
    }

    /// Wait for the first buffered or future event that `pred` accepts, and take
    /// it out of the buffer (other events stay for other waiters). `what` names
    /// the wait in errors.
    pub fn wait_event(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event> {
        let op = format!("waiting for {what}");
        self.shared.wait_for(&op, timeout, |st| {
            let i = st.events.iter().position(&mut pred)?;
            st.events.remove(i)
        })
    }

    /// Wait for an event by name (the first one buffered or to come).
    pub fn wait_event_named(&self, name: &str, timeout: Duration) -> Result<Event> {
        self.wait_event(&format!("event {name}"), timeout, |e| e.name == name)
    }

    /// Take every buffered event, oldest first.
    pub fn take_events(&self) -> Vec<Event> {
        self.shared.lock().events.drain(..).collect()
    }

    /// Wait for `JOB_STATUS_CHANGE` of job `id` to `status`.
    pub fn wait_job_status(&self, id: &str, status: &str, timeout: Duration) -> Result<Event> {
        self.wait_event(
            &format!("job '{id}' to reach status {status} (JOB_STATUS_CHANGE)"),
            timeout,
            |e| {
                e.name == "JOB_STATUS_CHANGE"
                    && e.str("id") == Some(id)
                    && e.str("status") == Some(status)
            },
        )
    }

    /// Wait for job `id` to conclude, read its error from `query-jobs`, and
    /// dismiss it. `command` is the command that started the job, for messages.
    /// The job is dismissed whether it succeeded or failed.
    pub fn finish_job(&self, command: &str, id: &str, timeout: Duration) -> Result<()> {
        self.finish_job_polling(command, id, timeout, || {})
    }

    /// [`Qmp::finish_job`], calling `between` every 50 ms while the job runs
    /// (to cancel it with `job-cancel`, say).
    pub fn finish_job_polling(
        &self,
        command: &str,
        id: &str,
        timeout: Duration,
        mut between: impl FnMut(),
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            match self.wait_job_status(id, "concluded", slice) {
                Ok(_) => break,
                Err(e) if e.is_timeout() && Instant::now() < deadline => between(),
                Err(e) => {
                    let kind = match e.kind {
                        ErrorKind::Timeout(_) => ErrorKind::Timeout(timeout),
                        k => k,
                    };
                    return Err(Error::new(
                        format!("{} (job '{id}')", op_name(command)),
                        kind,
                    ));
                }
            }
        }
        let jobs = self.execute(&QueryJobs {})?;
        let error = jobs.into_iter().find(|j| j.id == id).and_then(|j| j.error);
        self.execute(&JobDismiss { id: id.to_string() })?;
        match error {
            None => Ok(()),
            Some(desc) => Err(Error::new(
                op_name(command),
                ErrorKind::JobFailed {
                    job: id.to_string(),
                    desc,
                },
            )),
        }
    }

    /// Start a job with `cmd` (whose arguments name the job `job_id`) and wait
    /// for it to conclude, as [`Qmp::finish_job`] does.
    pub fn run_job<C: Command>(&self, cmd: &C, job_id: &str, timeout: Duration) -> Result<()> {
        self.execute(cmd)?;
        self.finish_job(C::NAME, job_id, timeout)
    }

    /// Wait for `BLOCK_JOB_READY` of job (device) `id`.
    pub fn wait_block_job_ready(&self, id: &str, timeout: Duration) -> Result<Event> {
        self.wait_event(&format!("BLOCK_JOB_READY of job '{id}'"), timeout, |e| {
            e.name == "BLOCK_JOB_READY" && e.str("device") == Some(id)
        })
    }

    /// Wait for `VSERPORT_CHANGE` of serial port device `id` with `open` as given
    /// (open = true: a guest program, such as the agent, opened the port).
    pub fn wait_vserport(&self, id: &str, open: bool, timeout: Duration) -> Result<Event> {
        self.wait_event(
            &format!("VSERPORT_CHANGE of port '{id}' to open={open}"),
            timeout,
            |e| {
                e.name == "VSERPORT_CHANGE"
                    && e.str("id") == Some(id)
                    && e.bool("open") == Some(open)
            },
        )
    }

    /// True once the connection has closed (QEMU exited or closed the monitor).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        let _ = sync::lock(&self.writer).shutdown(Shutdown::Both);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

fn op_name(command: &str) -> String {
    format!("QMP {command}")
}

/// The reader thread: parse each line QEMU sends and file it.
fn read_loop(stream: UnixStream, shared: &Shared) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let why = loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break Closed::Exited("end of stream".to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Closed::Exited(e.to_string()),
        }
        let msg: Map<String, Value> = match serde_json::from_slice(&line) {
            Ok(m) => m,
            // Whitespace-only lines are harmless; anything else unparsable ends the
            // connection, since replies could no longer be matched reliably.
            Err(_) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Err(e) => break Closed::Protocol(format!("unparsable message from QEMU: {e}")),
        };
        file_message(shared, msg);
    };
    shared.lock().closed = Some(why);
    shared.cond.notify_all();
}

fn file_message(shared: &Shared, mut msg: Map<String, Value>) {
    let mut st = shared.lock();
    if msg.contains_key("QMP") {
        st.greeting = Some(Value::Object(msg));
    } else if let Some(Value::String(name)) = msg.remove("event") {
        let timestamp = msg
            .remove("timestamp")
            .and_then(|t| Timestamp::deserialize(t).ok());
        let data = msg.remove("data").unwrap_or(Value::Null);
        if st.events.len() >= MAX_BUFFERED_EVENTS {
            st.events.pop_front();
        }
        st.events.push_back(Event {
            name,
            data,
            timestamp,
        });
    } else if let Some(id) = msg.get("id").and_then(Value::as_u64) {
        if !st.abandoned.remove(&id) {
            st.replies.insert(id, msg);
        }
    }
    // Replies without an id answer nothing this client sent; they are dropped.
    drop(st);
    shared.cond.notify_all();
}

#[cfg(test)]
mod tests {
    //! The client against a scripted fake QEMU, for message orders a real QEMU
    //! rarely produces on demand.

    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake monitor: greets, accepts qmp_capabilities, then runs `script`
    /// with the request lines reader and the writer.
    fn fake_qemu(
        script: impl FnOnce(&mut BufReader<UnixStream>, &mut UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut w, _) = listener.accept().unwrap();
            let mut r = BufReader::new(w.try_clone().unwrap());
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 10, \"minor\": 0, \"micro\": 2}}, \"capabilities\": []}}\r\n").unwrap();
            let id = request_id(&mut r);
            reply(&mut w, id, "{}");
            script(&mut r, &mut w);
            // Stay open until the client hangs up.
            let _ = r.read_until(b'\n', &mut Vec::new());
        });
        (dir, path)
    }

    fn request_id(r: &mut BufReader<UnixStream>) -> u64 {
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).unwrap();
        let v: Value = serde_json::from_slice(&line).unwrap();
        v["id"].as_u64().unwrap()
    }

    fn reply(w: &mut UnixStream, id: u64, ret: &str) {
        write!(w, "{{\"return\": {ret}, \"id\": {id}}}\r\n").unwrap();
    }

    #[test]
    fn events_sent_before_a_reply_stay_buffered_for_later_waits() {
        let (_d, path) = fake_qemu(|r, w| {
            let id = request_id(r);
            w.write_all(
                b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n",
            )
            .unwrap();
            w.write_all(b"{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"id\": \"j\", \"status\": \"concluded\"}}\r\n")
                .unwrap();
            reply(w, id, "{\"running\": false, \"status\": \"paused\"}");
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.version().unwrap().major, 10);
        let st = qmp.execute(&crate::commands::QueryStatus {}).unwrap();
        assert_eq!(st.status, "paused");
        let short = Duration::from_millis(10);
        let job = qmp.wait_job_status("j", "concluded", short).unwrap();
        assert_eq!(job.str("status"), Some("concluded"));
        let stop = qmp.wait_event_named("STOP", short).unwrap();
        assert_eq!(stop.timestamp.unwrap().microseconds, 2);
        // Each event is delivered once.
        assert!(qmp
            .wait_event_named("STOP", short)
            .unwrap_err()
            .is_timeout());
    }

    #[test]
    fn a_late_reply_to_a_timed_out_command_is_not_taken_for_the_next() {
        let (_d, path) = fake_qemu(|r, w| {
            let first = request_id(r);
            let second = request_id(r);
            reply(w, first, "\"late\"");
            reply(w, second, "\"fresh\"");
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        qmp.set_command_timeout(Duration::from_millis(100));
        let e = qmp.execute_value("first", None).unwrap_err();
        assert!(e.is_timeout() && e.to_string().contains("QMP first"), "{e}");
        qmp.set_command_timeout(Duration::from_secs(5));
        assert_eq!(qmp.execute_value("second", None).unwrap(), "fresh");
    }

    #[test]
    fn an_unparsable_message_is_a_protocol_error_naming_the_command() {
        let (_d, path) = fake_qemu(|r, w| {
            request_id(r);
            w.write_all(b"this is not json\r\n").unwrap();
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let e = qmp.execute_value("query-status", None).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::Protocol(_)), "{e}");
        assert!(e.to_string().contains("query-status"), "{e}");
    }

    #[test]
    fn an_error_reply_is_command_failed_with_class_and_description() {
        let (_d, path) = fake_qemu(|r, w| {
            let id = request_id(r);
            write!(w, "{{\"error\": {{\"class\": \"DeviceNotFound\", \"desc\": \"no disk9\"}}, \"id\": {id}}}\r\n").unwrap();
        });
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let e = qmp
            .execute(&crate::commands::BlockdevDel {
                node_name: "disk9".into(),
            })
            .unwrap_err();
        assert_eq!(e.to_string(), "QMP blockdev-del: DeviceNotFound: no disk9");
        assert!(
            matches!(e.kind, ErrorKind::CommandFailed { ref command, .. } if command == "blockdev-del")
        );
    }
}
