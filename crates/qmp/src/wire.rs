//! The JSON message shapes QMP and the guest agent share: a request is
//! `{"execute": NAME, "arguments": {...}, "id": N}` on one line; a reply carries
//! either `"return"` or `"error": {"class", "desc"}` (and the request's `id`).

use std::io;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, ErrorKind, Result};

/// A command: its wire name, its arguments (the fields of the type, serialised
/// with serde) and the type of its reply.
pub trait Command: Serialize {
    /// The name QEMU knows the command by, e.g. `query-status`.
    const NAME: &'static str;
    /// What the command returns (`Empty` for `{}`).
    type Reply: DeserializeOwned;
}

/// Declare that type `$ty` is the command `$name` replying `$reply`.
macro_rules! command {
    ($ty:ty, $name:literal, $reply:ty) => {
        impl $crate::wire::Command for $ty {
            const NAME: &'static str = $name;
            type Reply = $reply;
        }
    };
}
pub(crate) use command;

/// Connect to a unix socket, retrying until `deadline` while it does not exist
/// yet or refuses (QEMU still starting). `op` names the connection in errors.
pub(crate) fn connect_retry(op: &str, path: &Path, deadline: Instant) -> Result<UnixStream> {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::io(op, e)),
        }
    }
}

/// The reply of commands that return `{}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Empty {}

/// A command's arguments as a JSON object, or `None` when it has none (unit
/// structs and empty structs send no `arguments` member).
pub(crate) fn arguments<C: Command>(op: &str, cmd: &C) -> Result<Option<Value>> {
    let v = serde_json::to_value(cmd)
        .map_err(|e| Error::protocol(op, format!("cannot encode arguments: {e}")))?;
    Ok(match v {
        Value::Null => None,
        Value::Object(ref m) if m.is_empty() => None,
        other => Some(other),
    })
}

/// One request line, newline included.
pub(crate) fn request_line(name: &str, args: Option<&Value>, id: u64) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("execute".into(), Value::from(name));
    if let Some(a) = args {
        m.insert("arguments".into(), a.clone());
    }
    m.insert("id".into(), Value::from(id));
    let mut line = serde_json::to_vec(&Value::Object(m)).expect("a JSON value always encodes");
    line.push(b'\n');
    line
}

/// The `"return"` member of a reply, or the command's error.
pub(crate) fn reply_value(op: &str, command: &str, mut reply: Map<String, Value>) -> Result<Value> {
    if let Some(v) = reply.remove("return") {
        return Ok(v);
    }
    match reply.remove("error") {
        Some(Value::Object(e)) => {
            let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            Err(Error::new(
                op,
                ErrorKind::CommandFailed {
                    command: command.to_string(),
                    class: text("class"),
                    desc: text("desc"),
                },
            ))
        }
        _ => Err(Error::protocol(
            op,
            format!("reply has neither return nor error: {reply:?}"),
        )),
    }
}

/// Decode a reply value into the command's reply type.
pub(crate) fn decode<T: DeserializeOwned>(op: &str, v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::protocol(op, format!("unexpected reply: {e}")))
}
