//! `-T`/`--trace` before the subcommand, taken as qemu-img takes it and honest
//! about what strata has: no QEMU trace events at all.
//!
//! The option is `[enable=]PATTERN[,events=FILE][,file=FILE]` (a `,,` is a
//! comma in a value; the last of a key given twice wins; another key is refused
//! as an invalid parameter). A name that is not a pattern (no `*`) names an event
//! strata does not have, so it gets qemu-img's warning for an event that does not
//! exist; a pattern matches nothing, silently. `events=FILE` reads one name per
//! line the same way (empty lines and `#` comments skipped, `help` lists), warning with the
//! file and line. `help` or `?` lists the events (none) and exits 0. `file=` is
//! the trace output: created empty when the subcommand is dispatched, as qemu-img
//! opens its trace log then.

use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};

/// What the `-T` options asked for, once parsed.
#[derive(Default)]
pub struct Trace {
    /// The trace output file of the last `-T` naming one.
    pub file: Option<PathBuf>,
}

/// What one `-T` option leads to.
pub enum Outcome {
    /// Go on reading the command line.
    Continue,
    /// The event list was asked for and printed: exit 0.
    Listed,
}

/// One item of a QEMU option list.
#[derive(Debug, PartialEq)]
struct Item {
    key: String,
    value: String,
    /// Given as a bare flag (`KEY` for `KEY=on`, `noKEY` for `KEY=off`), a
    /// form QEMU warns is deprecated: the item as typed.
    short_form: Option<String>,
}

/// Split a QEMU option list into its items; the first item without `=` is the
/// value of `implied`, a later one a flag.
fn option_pairs(list: &str, implied: &str) -> Vec<Item> {
    super::common::split_items(list)
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let (key, value, short_form) = match item.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string(), None),
                None if i == 0 => (implied.to_string(), item, None),
                None => match item.strip_prefix("no") {
                    Some(k) => (k.to_string(), "off".to_string(), Some(item.clone())),
                    None => (item.clone(), "on".to_string(), Some(item)),
                },
            };
            Item {
                key,
                value,
                short_form,
            }
        })
        .collect()
}

/// The warning for one event name (or pattern) asked for, if any; `where_` is
/// the `FILE:LINE:` an events file adds after the program's name.
fn enable(prog: &str, where_: &str, name: &str) {
    let name = name.strip_prefix('-').unwrap_or(name);
    if !name.contains('*') {
        eprintln!("{prog}:{where_} warning: trace event '{name}' does not exist");
    }
}

/// Whether `s` asks for the list of events.
fn is_help(s: &str) -> bool {
    s == "help" || s == "?"
}

fn events_file(prog: &str, path: &str) -> Result<Outcome> {
    let text = std::fs::read(path).map_err(|e| {
        anyhow!(
            "{prog}:{path}: {}",
            strata_storage::os_message(&e).trim_end()
        )
    })?;
    for (n, line) in String::from_utf8_lossy(&text).lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if is_help(line) {
            // The list (of no events), and the program ends there.
            return Ok(Outcome::Listed);
        }
        enable(prog, &format!("{path}:{}:", n + 1), line);
    }
    Ok(Outcome::Continue)
}

impl Trace {
    /// Take one `-T` value. An error is the whole message to print (exit 1).
    pub fn option(&mut self, prog: &str, value: &str) -> Result<Outcome> {
        let items = option_pairs(value, "enable");
        for it in &items {
            if let Some(typed) = &it.short_form {
                eprintln!(
                    "{prog}: warning: short-form boolean option '{typed}' deprecated\n\
                     Please use {}={} instead",
                    it.key, it.value
                );
            }
            if !matches!(it.key.as_str(), "enable" | "events" | "file") {
                bail!("{prog}: Invalid parameter '{}'", it.key);
            }
        }
        let last = |key: &str| {
            items
                .iter()
                .rev()
                .find(|it| it.key == key)
                .map(|it| it.value.as_str())
        };
        if let Some(name) = last("enable") {
            if is_help(name) {
                // strata has no trace events: the list is empty.
                return Ok(Outcome::Listed);
            }
            enable(prog, "", name);
        }
        if let Some(path) = last("events") {
            if let Outcome::Listed = events_file(prog, path)? {
                return Ok(Outcome::Listed);
            }
        }
        if let Some(file) = last("file") {
            self.file = (!file.is_empty()).then(|| PathBuf::from(file));
        }
        Ok(Outcome::Continue)
    }

    /// Open the trace output, as qemu-img does before it runs the subcommand.
    pub fn open_output(&self, prog: &str) -> Result<()> {
        if let Some(f) = &self.file {
            create_empty(f).map_err(|e| {
                anyhow!(
                    "{prog}: Error opening logfile {}: {}",
                    f.display(),
                    strata_storage::os_message(&e).trim_end()
                )
            })?;
        }
        Ok(())
    }
}

fn create_empty(f: &Path) -> std::io::Result<()> {
    std::fs::File::create(f).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_lists_take_an_implied_first_key_and_doubled_commas() {
        let p = |s: &str| {
            option_pairs(s, "enable")
                .into_iter()
                .map(|i| (i.key, i.value, i.short_form.is_some()))
                .collect::<Vec<_>>()
        };
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string(), false);
        assert_eq!(p("x"), vec![kv("enable", "x")]);
        assert_eq!(p("x,,y"), vec![kv("enable", "x,y")]);
        assert_eq!(
            p("x,file=f,events=e"),
            vec![kv("enable", "x"), kv("file", "f"), kv("events", "e")]
        );
        assert_eq!(p("enable=a,enable=b").len(), 2);
        assert_eq!(
            p("x,y,noz"),
            vec![
                kv("enable", "x"),
                ("y".into(), "on".into(), true),
                ("z".into(), "off".into(), true)
            ]
        );
        assert_eq!(p(""), vec![]);
    }
}
