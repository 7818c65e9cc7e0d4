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

/// Carry out one control request.
pub fn handle(server: &Server, req: &Value, quit: &AtomicBool) -> Value {
    let cmd = req.get("command").and_then(Value::as_str).unwrap_or("");
    if cmd == "quit" {
        quit.store(true, Ordering::SeqCst);
        return json!({"ok": true});
    }
    if cmd == "list" {
        let exports: Vec<_> = server.exports().iter().map(|e| e.info()).collect();
        return json!({"ok": true, "exports": exports});
    }
    let export = match req.get("export").and_then(Value::as_str) {
        Some(name) => server.exports().iter().find(|e| e.name == name),
        None if server.exports().len() == 1 => server.exports().first(),
        None => return json!({"ok": false, "error": "several exports: say which with \"export\""}),
    };
    let Some(export) = export else {
        return json!({"ok": false, "error": "no such export"});
    };
    let str_arg = |k: &str| req.get(k).and_then(Value::as_str).map(String::from);
    let result = match cmd {
        "snapshot" => match str_arg("name") {
            Some(n) => export.snapshot(&n).map(|id| json!({"ok": true, "id": id})),
            None => return json!({"ok": false, "error": "snapshot needs \"name\""}),
        },
        "snapshot-external" => match str_arg("overlay") {
            Some(p) => export
                .snapshot_external(Path::new(&p))
                .map(|()| json!({"ok": true})),
            None => return json!({"ok": false, "error": "snapshot-external needs \"overlay\""}),
        },
        "commit" => export.commit().map(|()| json!({"ok": true})),
        "stream" => export.stream().map(|()| json!({"ok": true})),
        other => return json!({"ok": false, "error": format!("unknown command '{other}'")}),
    };
    match result {
        Ok(v) => v,
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}
