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
    closed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent data here.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
            if let Some(why) = &st.closed {
                return Err(Error::new(op, ErrorKind::QemuExited(why.clone())));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(op, ErrorKind::Timeout(timeout)));
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
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
            let mut n = self.next_id.lock().unwrap_or_else(|p| p.into_inner());
            *n += 1;
            *n
        };
        let line = wire::request_line(name, args, id);
        {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = w.write_all(&line) {
                // A write to a closed monitor means QEMU is gone; say so.
                if let Some(why) = self.shared.lock().closed.clone() {
                    return Err(Error::new(op, ErrorKind::QemuExited(why)));
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
        self.wait_job_status(id, "concluded", timeout)
            .map_err(|e| Error::new(format!("{} (job '{id}')", op_name(command)), e.kind))?;
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
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(Shutdown::Both);
        }
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
            Ok(0) => break "end of stream".to_string(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break e.to_string(),
        }
        let msg: Map<String, Value> = match serde_json::from_slice(&line) {
            Ok(m) => m,
            // Whitespace-only lines are harmless; anything else unparsable ends the
            // connection, since replies could no longer be matched reliably.
            Err(_) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Err(e) => break format!("unparsable message from QEMU: {e}"),
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
