//! QEMU's blkdebug driver on strata's storage: a filter that fails operations
//! by rules, triggered by the events the format engine above announces
//! ([`DebugEvent`]).
//!
//! The rules are QEMU's: `[inject-error]` (event, errno, sector, once,
//! immediately, state, iotype) and `[set-state]` (event, state, new_state),
//! from a config file in QEMU's syntax and/or inline options. Their semantics
//! follow QEMU's driver:
//! - the filter has a state, 1 when opened; a rule with a `state` other than 0
//!   applies only in that state (the state before the event);
//! - when an event fires, the `[inject-error]` rules for it that apply replace
//!   the active set (an event with none leaves the active set as it is); the
//!   first `[set-state]` rule for it that applies sets the next state;
//! - every read, write, write-zeroes, discard, flush and block-status query is
//!   checked against the active rules in order: the first whose `iotype` covers
//!   it and whose `sector` lies in its range (no sector: every request) fails
//!   it with its errno (changing nothing); a `once` rule is then gone for good;
//! - opening fires `none`, and each write is announced as `pwritev` (or
//!   `pwritev_zero`) before and `pwritev_done` after it, as QEMU's block layer
//!   does for the node it writes.

use crate::{DebugEvent, Error, Result, Storage};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A mistake in a blkdebug configuration, worded as QEMU words it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// The kinds of request a rule can fail (QEMU's `BlkdebugIOType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

const IO_TYPES: [(&str, IoType); 6] = [
    ("read", IoType::Read),
    ("write", IoType::Write),
    ("write-zeroes", IoType::WriteZeroes),
    ("discard", IoType::Discard),
    ("flush", IoType::Flush),
    ("block-status", IoType::BlockStatus),
];

impl IoType {
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// Requests a rule fails when it names no `iotype`: all but block-status.
const DEFAULT_IO_MASK: u8 = 0b01_1111;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Inject {
        errno: i32,
        once: bool,
        /// The byte offset (`sector` * 512) a request must cover, if any.
        offset: Option<u64>,
        io_mask: u8,
    },
    SetState(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    event: DebugEvent,
    /// 0: any state.
    state: i64,
    action: Action,
}

/// The keys of each group, with the type QEMU parses their values as.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Number,
    Bool,
}

const INJECT_KEYS: [(&str, Kind); 8] = [
    ("event", Kind::Str),
    ("state", Kind::Number),
    ("iotype", Kind::Str),
    ("errno", Kind::Number),
    ("sector", Kind::Number),
    ("once", Kind::Bool),
    ("immediately", Kind::Bool),
    ("delay-ns", Kind::Number),
];

const SET_STATE_KEYS: [(&str, Kind); 3] = [
    ("event", Kind::Str),
    ("state", Kind::Number),
    ("new_state", Kind::Number),
];

/// One `[group]` of options, in the order given.
type Group = (String, Vec<(String, String)>);

/// A blkdebug configuration: its rules and the config file they partly came
/// from (reports name it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlkdebugConfig {
    /// The config file as named (`blkdebug:CONFIG:FILE`, `config=`).
    pub config_file: Option<String>,
    rules: Vec<Rule>,
}

impl BlkdebugConfig {
    /// The configuration from a config file (if any) and inline groups
    /// (`inject-error.*`/`set-state.*` options, already split into groups),
    /// refused with QEMU's messages.
    pub fn new(
        config_file: Option<&str>,
        inline: Vec<(String, Vec<(String, String)>)>,
    ) -> Result<Self, ConfigError> {
        let mut groups = match config_file {
            Some(f) => {
                let text = std::fs::read(f).map_err(|e| {
                    bad(format!(
                        "Could not read blkdebug config file: {}",
                        crate::os_message(&e)
                    ))
                })?;
                parse_config_text(&String::from_utf8_lossy(&text))?
            }
            None => Vec::new(),
        };
        groups.extend(inline);
        for (group, opts) in &groups {
            check_group(group, opts)?;
        }
        // All inject-error rules first, then the set-state ones (QEMU's order).
        let mut rules = Vec::new();
        for wanted in ["inject-error", "set-state"] {
            for (group, opts) in groups.iter().filter(|(g, _)| g == wanted) {
                rules.push(rule(group, opts)?);
            }
        }
        Ok(BlkdebugConfig {
            config_file: config_file.map(String::from),
            rules,
        })
    }
}

/// QEMU's config file syntax: `[group]` lines open a group, `key = "value"`
/// lines fill it; lines starting with `#` and empty lines are skipped. Like
/// QEMU's scanner, a line whose first word is followed by anything but `=
/// "value"` still sets that word, to what could be read (often nothing).
fn parse_config_text(text: &str) -> Result<Vec<Group>, ConfigError> {
    let mut groups: Vec<Group> = Vec::new();
    for line in text.split_inclusive('\n') {
        if line.starts_with('\n') || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            if let Some(end) = rest.find(']') {
                let name = rest[..end].split_whitespace().next().unwrap_or("");
                if !name.is_empty() {
                    let name: String = name.chars().take(63).collect();
                    groups.push((name, Vec::new()));
                    continue;
                }
            }
        }
        let trimmed = line.trim_start();
        let Some(key) = trimmed.split_whitespace().next() else {
            return Err(bad("parse error"));
        };
        let key: String = key.chars().take(63).collect();
        let value = quoted_value(&trimmed[key.len()..]);
        let Some((_, opts)) = groups.last_mut() else {
            return Err(bad("no group defined"));
        };
        opts.push((key, value));
    }
    Ok(groups)
}

/// The value of ` = "value"` (as much as is there: empty when the quote is
/// missing, the rest of the line when the closing quote is).
fn quoted_value(rest: &str) -> String {
    let Some(rest) = rest.trim_start().strip_prefix('=') else {
        return String::new();
    };
    let Some(rest) = rest.trim_start().strip_prefix('"') else {
        return String::new();
    };
    let end = rest.find('"').unwrap_or(rest.len());
    rest[..end]
        .trim_end_matches('\n')
        .chars()
        .take(1023)
        .collect()
}

/// Refuse an unknown group, an unknown key or a value of the wrong type.
fn check_group(group: &str, opts: &[(String, String)]) -> Result<(), ConfigError> {
    let keys: &[(&str, Kind)] = match group {
        "inject-error" => &INJECT_KEYS,
        "set-state" => &SET_STATE_KEYS,
        other => return Err(bad(format!("There is no option group '{other}'"))),
    };
    for (k, v) in opts {
        let Some((_, kind)) = keys.iter().find(|(name, _)| name == k) else {
            return Err(bad(format!("Invalid parameter '{k}'")));
        };
        match kind {
            Kind::Str => {}
            Kind::Number => {
                number(v).ok_or_else(|| bad(format!("Parameter '{k}' expects a number")))?;
            }
            Kind::Bool => {
                boolean(v).ok_or_else(|| bad(format!("Parameter '{k}' expects 'on' or 'off'")))?;
            }
        }
    }
    Ok(())
}

/// A number as QEMU's option parser reads one: decimal, `0x` hexadecimal or
/// `0` octal, a leading `-` negating it modulo 2^64.
fn number(v: &str) -> Option<u64> {
    let t = v.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let n = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse().ok()?
    };
    Some(if neg { n.wrapping_neg() } else { n })
}

fn boolean(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// The last value given for `key` in a group.
fn get<'a>(opts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    opts.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A checked group as a rule.
fn rule(group: &str, opts: &[(String, String)]) -> Result<Rule, ConfigError> {
    let num = |k: &str, default: u64| get(opts, k).and_then(number).unwrap_or(default);
    let Some(event) = get(opts, "event") else {
        return Err(bad("Missing event name for rule"));
    };
    let event = DebugEvent::from_name(event)
        .ok_or_else(|| bad(format!("invalid parameter value: {event}")))?;
    let state = num("state", 0) as i64;
    let action = if group == "inject-error" {
        let io_mask = match get(opts, "iotype") {
            None => DEFAULT_IO_MASK,
            Some(t) => IO_TYPES
                .iter()
                .find(|(name, _)| *name == t)
                .map(|(_, io)| io.bit())
                .ok_or_else(|| bad(format!("invalid parameter value: {t}")))?,
        };
        let sector = num("sector", u64::MAX) as i64;
        Action::Inject {
            errno: num("errno", libc::EIO as u64) as i32,
            once: get(opts, "once").and_then(boolean).unwrap_or(false),
            offset: (sector != -1).then(|| (sector as u64).wrapping_mul(512)),
            io_mask,
        }
    } else {
        Action::SetState(num("new_state", 0) as i64)
    };
    Ok(Rule {
        event,
        state,
        action,
    })
}

/// The changing part of a filter: its state, the active rules (indices into
/// the config's rules, first checked first) and the `once` rules used up.
#[derive(Debug)]
struct Live {
    state: i64,
    active: Vec<usize>,
    gone: Vec<bool>,
}

/// A storage behind QEMU's blkdebug driver (see the module doc).
#[derive(Debug)]
pub struct BlkdebugStorage<S> {
    inner: S,
    config: Arc<BlkdebugConfig>,
    live: Mutex<Live>,
    /// Whether a format driver above sends the filter its events: not when
    /// the filter is itself the image's top node (`-f blkdebug`).
    hears_events: bool,
}

impl<S: Storage> BlkdebugStorage<S> {
    /// The filter over `inner`, in state 1, after its `none` event.
    pub fn new(inner: S, config: Arc<BlkdebugConfig>) -> Self {
        let live = Live {
            state: 1,
            active: Vec::new(),
            gone: vec![false; config.rules.len()],
        };
        let s = BlkdebugStorage {
            inner,
            config,
            live: Mutex::new(live),
            hears_events: true,
        };
        s.debug_event(DebugEvent::None);
        s
    }

    /// The filter as the image's top node (QEMU's `-f blkdebug`): no format
    /// driver above it raises events, so only its `none` event (at open)
    /// triggers rules; the raw reader strata puts above it is not heard.
    pub fn top_node(inner: S, config: Arc<BlkdebugConfig>) -> Self {
        let mut s = Self::new(inner, config);
        s.hears_events = false;
        s
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        // The state is a few integers, consistent after any panic.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fail a request of `len` bytes at `offset` if an active rule says so.
    fn check(&self, offset: u64, len: u64, io: IoType) -> Result<()> {
        let mut live = self.live();
        let hit = live.active.iter().enumerate().find_map(|(pos, &i)| {
            let Action::Inject {
                errno,
                once,
                offset: at,
                io_mask,
            } = self.config.rules[i].action
            else {
                return None;
            };
            let covers = match at {
                None => true,
                Some(at) => len > 0 && at >= offset && at - offset < len,
            };
            (covers && io_mask & io.bit() != 0).then_some((pos, i, errno, once))
        });
        let Some((pos, i, errno, once)) = hit else {
            return Ok(());
        };
        if once {
            live.active.remove(pos);
            live.gone[i] = true;
        }
        if errno == 0 {
            return Ok(());
        }
        Err(Error::Rule(std::io::Error::from_raw_os_error(errno)))
    }
}

impl<S: Storage> Storage for BlkdebugStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64, IoType::Read)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.debug_event(DebugEvent::Pwritev);
        self.check(offset, buf.len() as u64, IoType::Write)?;
        self.inner.write_at(buf, offset)?;
        self.debug_event(DebugEvent::PwritevDone);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.debug_event(DebugEvent::PwritevZero);
        self.check(offset, len, IoType::WriteZeroes)?;
        self.inner.write_zeroes(offset, len)?;
        self.debug_event(DebugEvent::PwritevDone);
        Ok(())
    }
    fn write_zeroes_fast(&self, offset: u64, len: u64) -> Result<bool> {
        self.debug_event(DebugEvent::PwritevZero);
        self.check(offset, len, IoType::WriteZeroes)?;
        let done = self.inner.write_zeroes_fast(offset, len)?;
        self.debug_event(DebugEvent::PwritevDone);
        Ok(done)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, IoType::Discard)?;
        self.inner.discard(offset, len)
    }
    /// A write of zeroes for the rules and events, whichever way it zeroes.
    fn write_zeroes_unmap(&self, offset: u64, len: u64) -> Result<bool> {
        self.debug_event(DebugEvent::PwritevZero);
        self.check(offset, len, IoType::WriteZeroes)?;
        let done = self.inner.write_zeroes_unmap(offset, len)?;
        self.debug_event(DebugEvent::PwritevDone);
        Ok(done)
    }
    fn flush(&self) -> Result<()> {
        self.check(0, 0, IoType::Flush)?;
        self.inner.flush()
    }
    fn size(&self) -> Result<u64> {
        self.inner.size()
    }
    fn set_size(&self, size: u64) -> Result<()> {
        self.inner.set_size(size)
    }
    fn preallocate(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.preallocate(offset, len)
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        // QEMU's filter reports no disk usage of its own.
        Ok(None)
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn probe_data(&self, offset: u64, max_len: u64) -> Result<(bool, u64)> {
        self.check(offset, max_len, IoType::BlockStatus)?;
        self.inner.probe_data(offset, max_len)
    }
    fn watches_requests(&self) -> bool {
        true
    }
    fn debug_event(&self, event: DebugEvent) {
        if !self.hears_events {
            return;
        }
        let mut live = self.live();
        let before = live.state;
        let mut next = before;
        let mut injected = 0;
        // QEMU keeps each event's rules newest first and walks them in that
        // order: the active set ends up in the order given, and the first
        // set-state rule given is the last to set the state.
        for (i, r) in self.config.rules.iter().enumerate().rev() {
            if r.event != event || live.gone[i] || (r.state != 0 && r.state != before) {
                continue;
            }
            match r.action {
                Action::Inject { .. } => {
                    injected += 1;
                    if injected == 1 {
                        live.active.clear();
                    }
                    live.active.insert(0, i);
                }
                Action::SetState(n) => next = n,
            }
        }
        live.state = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStorage;

    fn filter(text: &str) -> BlkdebugStorage<MemStorage> {
        let groups = parse_config_text(text).unwrap();
        for (g, o) in &groups {
            check_group(g, o).unwrap();
        }
        let mut rules = Vec::new();
        for wanted in ["inject-error", "set-state"] {
            for (g, o) in groups.iter().filter(|(g, _)| g == wanted) {
                rules.push(rule(g, o).unwrap());
            }
        }
        let config = BlkdebugConfig {
            config_file: None,
            rules,
        };
        let m = MemStorage::new();
        m.write_at(&[7u8; 4096], 0).unwrap();
        BlkdebugStorage::new(m, Arc::new(config))
    }

    fn errno(r: Result<()>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn a_rule_fails_requests_only_after_its_event_and_until_another_replaces_it() {
        let s = filter("[inject-error]\nevent = \"l2_load\"\nerrno = \"28\"\n");
        let mut b = [0u8; 512];
        s.read_at(&mut b, 0).unwrap();
        s.debug_event(DebugEvent::L2Load);
        assert_eq!(errno(s.read_at(&mut b, 0)), Some(libc::ENOSPC));
        assert_eq!(errno(s.flush()), Some(libc::ENOSPC));
        // Still active: not `once`, and no other inject rule fired.
        assert_eq!(errno(s.write_at(&b, 0)), Some(libc::ENOSPC));
        s.debug_event(DebugEvent::ReadAio);
        assert_eq!(errno(s.read_at(&mut b, 0)), Some(libc::ENOSPC));
    }

    #[test]
    fn once_sector_and_iotype_narrow_what_fails() {
        let s = filter(
            "[inject-error]\nevent = \"none\"\nsector = \"2\"\nonce = \"on\"\niotype = \"write\"\n",
        );
        let b = [1u8; 512];
        let mut r = [0u8; 2048];
        s.read_at(&mut r, 0).unwrap();
        s.write_at(&b, 0).unwrap();
        assert_eq!(errno(s.write_at(&[1u8; 2048], 0)), Some(libc::EIO));
        // Nothing was written by the failed write, and the rule is used up.
        s.read_at(&mut r, 0).unwrap();
        assert_eq!(r[1024], 7);
        s.write_at(&[1u8; 2048], 0).unwrap();
        s.debug_event(DebugEvent::None);
        s.write_at(&[1u8; 2048], 0).unwrap();
    }

    #[test]
    fn set_state_rules_gate_inject_rules_by_the_state_before_the_event() {
        let s = filter(concat!(
            "[set-state]\nstate = \"1\"\nevent = \"l1_update\"\nnew_state = \"2\"\n",
            "[inject-error]\nstate = \"2\"\nevent = \"l1_update\"\n",
            "[inject-error]\nstate = \"2\"\nevent = \"flush_to_disk\"\n",
        ));
        s.debug_event(DebugEvent::FlushToDisk);
        s.flush().unwrap();
        // The first l1_update moves to state 2 but its own inject rule wants 2
        // already.
        s.debug_event(DebugEvent::L1Update);
        s.flush().unwrap();
        s.debug_event(DebugEvent::FlushToDisk);
        assert_eq!(errno(s.flush()), Some(libc::EIO));
    }

    #[test]
    fn writes_announce_pwritev_and_a_zero_errno_fails_nothing() {
        let s = filter("[inject-error]\nevent = \"pwritev\"\nonce = \"on\"\n");
        assert_eq!(errno(s.write_at(&[1u8; 512], 0)), Some(libc::EIO));
        s.write_at(&[1u8; 512], 0).unwrap();
        let s = filter("[inject-error]\nevent = \"none\"\nerrno = \"0\"\n");
        s.flush().unwrap();
    }

    #[test]
    fn config_mistakes_get_qemu_messages() {
        let cases = [
            ("event = \"read_aio\"\n", "no group defined"),
            (
                "[inject-errorx]\nevent = \"x\"\n",
                "There is no option group 'inject-errorx'",
            ),
            ("[inject-error]\nfoo = \"1\"\n", "Invalid parameter 'foo'"),
            (
                "[inject-error]\nerrno = \"x\"\n",
                "Parameter 'errno' expects a number",
            ),
            (
                "[inject-error]\nonce = \"x\"\n",
                "Parameter 'once' expects 'on' or 'off'",
            ),
            (
                "[inject-error]\nerrno = \"5\"\n",
                "Missing event name for rule",
            ),
            (
                "[inject-error]\nevent = \"bogus\"\n",
                "invalid parameter value: bogus",
            ),
            (
                "[inject-error]\nevent = read_aio\n",
                "invalid parameter value: ",
            ),
            (
                "[inject-error]\nevent = \"none\"\niotype = \"x\"\n",
                "invalid parameter value: x",
            ),
            ("[set-state]\n  \n", "parse error"),
        ];
        for (text, want) in cases {
            let got = parse_config_text(text).and_then(|groups| {
                for (g, o) in &groups {
                    check_group(g, o)?;
                }
                for (g, o) in &groups {
                    rule(g, o)?;
                }
                Ok(())
            });
            assert_eq!(got.unwrap_err().0, want, "{text:?}");
        }
        assert_eq!(number("0x10"), Some(16));
        assert_eq!(number("010"), Some(8));
        assert_eq!(number("-1"), Some(u64::MAX));
        assert_eq!(number("1k"), None);
    }
}
