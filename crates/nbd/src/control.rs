//! The control socket: a Unix socket taking one JSON request per line and
//! answering each with one JSON line.
//!
//! Requests (`export` names the export; it may be left out when there is one):
//! - `{"command":"snapshot","name":"S"}`: internal qcow2 snapshot of the top image;
//! - `{"command":"snapshot-external","overlay":"PATH"}`: new overlay, writes go there;
//! - `{"command":"commit"}`: merge the top overlay into its backing file, switch back;
//! - `{"command":"stream"}`: pull the backing chain into the top, drop the backing;
//! - `{"command":"list"}`: the exports, their chains and snapshots;
//! - `{"command":"quit"}`: stop the server (exports flushed and closed).
//!
//! Answers: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use crate::server::Server;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Longest request line accepted.
const MAX_LINE: usize = 64 << 10;

/// Serve the control socket until the server shuts down; a `quit` request sets
/// `quit`.
pub fn serve(server: Arc<Server>, listener: UnixListener, quit: Arc<AtomicBool>) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    while !server.is_shutting_down() && !quit.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, _)) => {
                let server = server.clone();
                let quit = quit.clone();
                std::thread::spawn(move || {
                    let _ = s.set_nonblocking(false);
                    session(&server, s, &quit);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn session(server: &Server, s: UnixStream, quit: &AtomicBool) {
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        match (&mut r).take(MAX_LINE as u64 + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let answer = if line.len() > MAX_LINE {
            json!({"ok": false, "error": "request line too long"})
        } else {
            match serde_json::from_str::<Value>(&line) {
                Ok(v) => handle(server, &v, quit),
                Err(e) => json!({"ok": false, "error": format!("bad JSON: {e}")}),
            }
        };
        let mut out = answer.to_string();
        out.push('\n');
        if w.write_all(out.as_bytes()).is_err() {
            return;
        }
        if quit.load(Ordering::SeqCst) {
            return;
        }
    }
}

use std::io::Read;

/// What kind of failure a control request met: how the HTTP API answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The request is malformed or its arguments unusable (a missing or
    /// empty name, an unknown command, an overlay path that is taken).
    BadRequest,
    /// The request names an export the server does not have.
    NotFound,
    /// The export's state refuses the operation now: read-only, no backing
    /// file, a snapshot name taken, a file another holder locks, a raw top.
    Conflict,
    /// Reading or writing the images failed.
    Io,
}

/// A control request that failed: its kind and the message the control
/// socket answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    pub failure: Failure,
    pub message: String,
}

impl ControlError {
    fn new(failure: Failure, message: impl Into<String>) -> ControlError {
        ControlError {
            failure,
            message: message.into(),
        }
    }
}

/// The kind of failure of a live operation's error.
pub fn failure_of(e: &crate::Error) -> Failure {
    use strata_format::ErrorKind as K;
    use strata_jobs::Error as J;
    if let crate::Error::Jobs(j) = e {
        match j {
            J::SnapshotNameTaken(_)
            | J::NoBackingFile
            | J::NoInternalSnapshots { .. }
            | J::Cancelled => return Failure::Conflict,
            J::SnapshotNameEmpty | J::Invalid(_) => return Failure::BadRequest,
            _ => {}
        }
    }
    match e.kind() {
        K::InvalidArgument | K::OutOfRange | K::NotFound => Failure::BadRequest,
        K::Locked | K::ReadOnly | K::Cancelled | K::Unsupported => Failure::Conflict,
        _ => Failure::Io,
    }
}

/// Carry out one control request, answering as the control socket does:
/// `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
pub fn handle(server: &Server, req: &Value, quit: &AtomicBool) -> Value {
    match execute(server, req, quit) {
        Ok(v) => v,
        Err(e) => json!({"ok": false, "error": e.message}),
    }
}

/// Carry out one control request: its answer (`{"ok":true,...}`), or why it
/// failed, typed (what the HTTP API maps to its status codes).
pub fn execute(server: &Server, req: &Value, quit: &AtomicBool) -> Result<Value, ControlError> {
    let bad = |m: &str| Err(ControlError::new(Failure::BadRequest, m));
    let cmd = req.get("command").and_then(Value::as_str).unwrap_or("");
    if cmd == "quit" {
        quit.store(true, Ordering::SeqCst);
        return Ok(json!({"ok": true}));
    }
    if cmd == "list" {
        let exports: Vec<_> = server.exports().iter().map(|e| e.info()).collect();
        return Ok(json!({"ok": true, "exports": exports}));
    }
    let export = match req.get("export").and_then(Value::as_str) {
        Some(name) => server.exports().iter().find(|e| e.name == name),
        None if server.exports().len() == 1 => server.exports().first(),
        None => return bad("several exports: say which with \"export\""),
    };
    let Some(export) = export else {
        return Err(ControlError::new(Failure::NotFound, "no such export"));
    };
    let str_arg = |k: &str| req.get(k).and_then(Value::as_str).map(String::from);
    let result = match cmd {
        "snapshot" => match str_arg("name") {
            Some(n) => export.snapshot(&n).map(|id| json!({"ok": true, "id": id})),
            None => return bad("snapshot needs \"name\""),
        },
        "snapshot-external" => match str_arg("overlay") {
            Some(p) => export
                .snapshot_external(Path::new(&p))
                .map(|()| json!({"ok": true})),
            None => return bad("snapshot-external needs \"overlay\""),
        },
        "commit" => export.commit().map(|()| json!({"ok": true})),
        "stream" => export.stream().map(|()| json!({"ok": true})),
        other => return bad(&format!("unknown command '{other}'")),
    };
    result.map_err(|e| ControlError::new(failure_of(&e), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn each_live_operation_error_has_the_failure_the_api_answers_with() {
        let io = |k| Error::Io(std::io::Error::from(k));
        let cases: Vec<(Error, Failure)> = vec![
            (Error::Invalid("bad block size".into()), Failure::BadRequest),
            (
                strata_jobs::Error::SnapshotNameEmpty.into(),
                Failure::BadRequest,
            ),
            (
                strata_jobs::Error::Invalid("'x' exists".into()).into(),
                Failure::BadRequest,
            ),
            (io(std::io::ErrorKind::NotFound), Failure::BadRequest),
            (
                strata_jobs::Error::SnapshotNameTaken("s".into()).into(),
                Failure::Conflict,
            ),
            (strata_jobs::Error::NoBackingFile.into(), Failure::Conflict),
            (
                strata_jobs::Error::NoInternalSnapshots { format: "raw" }.into(),
                Failure::Conflict,
            ),
            (strata_jobs::Error::Cancelled.into(), Failure::Conflict),
            (Error::ReadOnlyExport("e".into()), Failure::Conflict),
            (Error::BackingBusy("b".into()), Failure::Conflict),
            (io(std::io::ErrorKind::PermissionDenied), Failure::Io),
            (io(std::io::ErrorKind::Other), Failure::Io),
        ];
        for (e, want) in cases {
            assert_eq!(failure_of(&e), want, "{e}");
        }
    }
}
