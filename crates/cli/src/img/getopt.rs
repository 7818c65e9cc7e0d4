//! qemu-img's option loop, replayed before clap reads the command line.
//!
//! qemu-img reads its arguments with `getopt_long` in one pass and judges some
//! option values as it meets them (a size, a rate, a mode...): the first value
//! it refuses ends the run before any option typed after it is looked at, and
//! before the file names are counted. clap reads the whole line first and
//! reports its own mistakes (an unknown option, a file name too many) before
//! any value is judged. [`refusal`] walks the line the way getopt does, over
//! the options clap declares, and returns the first value qemu-img would
//! refuse in its loop; it stops (and lets clap and the subcommand speak) at
//! anything getopt itself would refuse, at `-h`/`--help`, and at `--`.

use super::common::Ctx;
use anyhow::{bail, Result};

/// An option as getopt hands it over: its key (clap's long name, or the short
/// letter of an option without one) and its value, if it takes one.
#[derive(Debug, PartialEq, Eq)]
struct Met {
    key: String,
    value: Option<String>,
}

/// Where getopt stopped handing options over before the end of the line.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The last argument is an option that takes a value: `-X` or `--NAME`
    /// as typed.
    MissingValue(String),
    /// An option getopt does not know, as typed: `--NAME[=V]`, or `-X`.
    Unknown(String),
    /// `--NAME=VALUE` for an option that takes no value: `--NAME` in full.
    NoValueAllowed(String),
    /// Anything else (help, `--`, an option clap and qemu-img spell apart).
    Other,
}

/// The options of `args` (the subcommand's, after its name) in the order
/// getopt hands them over, up to the first one getopt would refuse or that
/// asks for help (and why it stopped there); file names are skipped as
/// getopt permutes them to the end.
#[cfg(test)]
fn options(cmd: &clap::Command, sub: &str, args: &[String]) -> Vec<Met> {
    walk(cmd, sub, args).0
}

fn walk(cmd: &clap::Command, sub: &str, args: &[String]) -> (Vec<Met>, Option<Stop>) {
    let mut met = Vec::new();
    let mut it = args.iter();
    let mut file_seen = false;
    let takes_value = |a: &clap::Arg| a.get_action().takes_values();
    let key = |a: &clap::Arg| match a.get_long() {
        Some(l) => l.to_string(),
        None => a.get_short().map(String::from).unwrap_or_default(),
    };
    while let Some(a) = it.next() {
        if a == "--" {
            return (met, None);
        }
        if let Some(body) = a.strip_prefix("--") {
            // getopt knows qemu-img's long options; clap says which take a value.
            let long = match super::usage::long_option(sub, body) {
                Ok(long) => long,
                // Unknown to clap as well (not one of strata's own options).
                Err(names)
                    if names.is_empty()
                        && super::usage::long_option(sub, "help").is_ok()
                        && !cmd.get_arguments().any(|x| {
                            let name = body.split('=').next().unwrap_or(body);
                            x.get_long().is_some_and(|l| l.starts_with(name))
                        }) =>
                {
                    return (met, Some(Stop::Unknown(a.clone())))
                }
                Err(_) => return (met, Some(Stop::Other)),
            };
            if long == "help" {
                return (met, Some(Stop::Other));
            }
            let Some(arg) = cmd.get_arguments().find(|x| x.get_long() == Some(long)) else {
                return (met, Some(Stop::Other));
            };
            let inline = body.split_once('=').map(|(_, v)| v.to_string());
            let value = match (takes_value(arg), inline) {
                (true, Some(v)) => Some(v),
                (true, None) => match it.next() {
                    Some(v) => Some(v.clone()),
                    None => return (met, Some(Stop::MissingValue(format!("--{long}")))),
                },
                (false, None) => None,
                (false, Some(_)) => return (met, Some(Stop::NoValueAllowed(format!("--{long}")))),
            };
            met.push(Met {
                key: key(arg),
                value,
            });
            continue;
        }
        let Some(cluster) = a.strip_prefix('-').filter(|c| !c.is_empty()) else {
            // resize's first file name may be followed by a negative size,
            // which is no option (`-` and a digit).
            if sub == "resize" && !file_seen {
                let mut ahead = it.clone();
                if ahead.next().is_some_and(|n| {
                    n.len() > 1 && n.starts_with('-') && n.as_bytes()[1].is_ascii_digit()
                }) {
                    it = ahead;
                }
            }
            file_seen = true;
            continue;
        };
        for (i, c) in cluster.char_indices() {
            if c == 'h' {
                return (met, Some(Stop::Other));
            }
            let Some(arg) = cmd.get_arguments().find(|x| x.get_short() == Some(c)) else {
                return (met, Some(Stop::Unknown(format!("-{c}"))));
            };
            if !takes_value(arg) {
                met.push(Met {
                    key: key(arg),
                    value: None,
                });
                continue;
            }
            let rest = &cluster[i + c.len_utf8()..];
            let value = if rest.is_empty() {
                match it.next() {
                    Some(v) => v.clone(),
                    None => return (met, Some(Stop::MissingValue(format!("-{c}")))),
                }
            } else {
                rest.to_string()
            };
            met.push(Met {
                key: key(arg),
                value: Some(value),
            });
            break;
        }
    }
    (met, None)
}

/// The judgement qemu-img passes on `value` of option `key` of `sub` as its
/// loop meets it; `Ok` for options it only stores.
fn judge(sub: &str, key: &str, value: &str, ctx: &Ctx) -> Result<()> {
    use super::bench::{counted, ranged};
    use super::common::{check_option_lists, parse_rate, size_arg};
    let try_help = format!(
        "Try '{} {sub} --help' for more info",
        super::invoked_as(ctx.prog)
    );
    let int_max = i32::MAX as u64;
    match (sub, key) {
        ("create" | "amend" | "convert" | "measure", "options") => {
            check_option_lists(&[value.to_string()])
        }
        ("info" | "map" | "check" | "measure", "output") => match value {
            "human" | "json" => Ok(()),
            _ => bail!("--output expects 'human' or 'json' not '{value}'\n{try_help}"),
        },
        ("check", "repair") => match value {
            "leaks" | "all" => Ok(()),
            _ => bail!("--repair (-r) expects 'leaks' or 'all' not '{value}'\n{try_help}"),
        },
        ("commit", "rate") => size_arg("rate limit", value).map(drop),
        ("convert", "rate") => parse_rate(Some(value)).map(drop),
        ("convert", "sparse-size") => super::convert::sparse_size_arg(value).map(drop),
        ("convert", "parallel") => super::convert::workers_arg(value).map(drop),
        // Its refusal prints warnings and a line of its own: called only when
        // it refuses, so that an accepted value warns once, where it is used.
        ("convert" | "measure", "snapshot") if snapshot_refused(value) => {
            super::measure::snapshot_key(value, ctx).map(drop)
        }
        ("map", "start-offset") => size_arg("start offset", value).map(drop),
        ("map", "max-length") => size_arg("max length", value).map(drop),
        ("measure", "size") => size_arg("image size", value).map(drop),
        ("resize", "preallocation") => match value {
            "off" => Ok(()),
            p => p
                .parse::<strata_format::qcow2::Preallocation>()
                .map(drop)
                .map_err(|_| anyhow::anyhow!("Invalid preallocation mode '{p}'")),
        },
        ("bench", "count") => counted("request count", Some(value), 1, int_max, 0).map(drop),
        ("bench", "depth") => counted("queue depth", Some(value), 1, int_max, 0).map(drop),
        ("bench", "offset") => ranged("offset", Some(value), 0, i64::MAX as u64, 0).map(drop),
        ("bench", "buffer-size") => ranged("buffer size", Some(value), 1, int_max, 0).map(drop),
        ("bench", "step-size") => ranged("step size", Some(value), 0, int_max, 0).map(drop),
        ("bench", "pattern") => counted("pattern byte", Some(value), 0, 255, 0).map(drop),
        ("bench", "flush-interval") => {
            counted("flush interval", Some(value), 0, int_max, 0).map(drop)
        }
        ("bench", "cache") if !super::convert::is_cache_mode(value) => bail!("Invalid cache mode"),
        ("bench", "aio") if !matches!(value, "threads" | "native" | "io_uring") => {
            bail!("Invalid aio option: {value}")
        }
        _ => Ok(()),
    }
}

/// Whether [`super::measure::snapshot_key`] refuses `param`: an option list
/// (it starts with `snapshot.`) with a key other than `snapshot.id` and
/// `snapshot.name`.
fn snapshot_refused(param: &str) -> bool {
    param.starts_with("snapshot.")
        && super::common::split_items(param).iter().any(|item| {
            let k = item.split_once('=').map_or(item.as_str(), |(k, _)| k);
            k != "snapshot.id" && k != "snapshot.name"
        })
}

/// snapshot's actions: qemu-img refuses a second one (the same one too) as it
/// meets it.
fn is_snapshot_action(key: &str) -> bool {
    matches!(
        key,
        "list" | "c" | "create" | "a" | "apply" | "d" | "delete"
    )
}

/// How a run ends inside qemu-img's option loop: what it prints on stdout and
/// stderr, and its exit code.
#[derive(Debug, PartialEq, Eq)]
pub struct Said {
    pub out: String,
    pub err: String,
    pub code: i32,
}

/// What qemu-img prints for the first mistake its option loop finds in `args`
/// (the subcommand's name, then its arguments), given clap's declaration `cmd`
/// of the subcommands, and how it exits: a value it refuses as it meets it
/// (`--object` definitions too, which it creates there), or where getopt
/// stops at an option it does not know or one lacking its value; also
/// `--object help`, which lists the object types and exits 0 there. `None`
/// when the loop ends the run nowhere (clap and the subcommand then judge the
/// line).
pub fn refusal(cmd: &clap::Command, args: &[String], ctx: &Ctx) -> Option<Said> {
    let failed = |err: String| Said {
        out: String::new(),
        err,
        code: 1,
    };
    refused(cmd, args, ctx).map(|r| match r {
        Ok(said) => said,
        Err(err) => failed(err),
    })
}

/// [`refusal`]'s walk: `Err` with the text of a refusal that exits 1.
fn refused(cmd: &clap::Command, args: &[String], ctx: &Ctx) -> Option<Result<Said, String>> {
    let (sub, rest) = args.split_first()?;
    let sub_cmd = cmd.find_subcommand(sub)?;
    let prog = ctx.prog;
    let argv0 = super::invoked_as(prog);
    let try_help = format!("Try '{argv0} {sub} --help' for more info");
    let (met, stop) = walk(sub_cmd, sub, rest);
    let mut actions = 0usize;
    let mut objects = super::objects::ObjectArgs::default();
    for m in met {
        if sub == "snapshot" && is_snapshot_action(&m.key) {
            actions += 1;
            if actions > 1 {
                return Some(Err(format!(
                    "{prog}: Cannot mix '-l', '-a', '-c', '-d'\n{try_help}\n"
                )));
            }
        }
        match (m.key.as_str(), &m.value) {
            // Each object is created as it is met (ids unique across them).
            ("object", Some(v)) => {
                if super::objects::asks_for_types(v) {
                    return Some(Ok(Said {
                        out: super::objects::types_list(),
                        err: String::new(),
                        code: 0,
                    }));
                }
                objects.object.push(v.clone());
                if let Err(e) = objects.objects() {
                    return Some(Ok(Said {
                        out: String::new(),
                        err: format!("{prog}: {e}\n"),
                        // compare exits 2 on every error but a difference.
                        code: if sub == "compare" { 2 } else { 1 },
                    }));
                }
            }
            (key, Some(v)) => {
                if let Err(e) = judge(sub, key, v, ctx) {
                    return Some(Err(format!("{prog}: {e}\n")));
                }
            }
            _ => {}
        }
    }
    // bitmap reads its own line (its operations are no clap options).
    if sub == "bitmap" {
        return None;
    }
    match stop? {
        Stop::MissingValue(o) => Some(Err(match o.strip_prefix("--") {
            Some(_) => format!("{argv0} {sub}: option '{o}' requires an argument\n{try_help}\n"),
            None => format!(
                "{argv0} {sub}: option requires an argument -- '{}'\n{try_help}\n",
                &o[1..]
            ),
        })),
        Stop::Unknown(o) => Some(Err(match o.strip_prefix("--") {
            Some(_) => format!("{argv0} {sub}: unrecognized option '{o}'\n{try_help}\n"),
            None => format!(
                "{argv0} {sub}: invalid option -- '{}'\n{try_help}\n",
                &o[1..]
            ),
        })),
        Stop::NoValueAllowed(o) => Some(Err(format!(
            "{argv0} {sub}: option '{o}' doesn't allow an argument\n{try_help}\n"
        ))),
        Stop::Other => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn met(args: &[&str]) -> Vec<(String, Option<String>)> {
        let cmd = super::super::ImgCli::command();
        let sub = cmd.find_subcommand(args[0]).unwrap();
        let a: Vec<String> = args[1..].iter().map(|s| s.to_string()).collect();
        options(sub, args[0], &a)
            .into_iter()
            .map(|m| (m.key, m.value))
            .collect()
    }

    #[test]
    fn options_are_read_as_getopt_reads_them() {
        let v = |k: &str, v: Option<&str>| (k.to_string(), v.map(String::from));
        assert_eq!(
            met(&["commit", "-qr", "1M", "img", "--rate=2", "-pr3"]),
            vec![
                v("quiet", None),
                v("rate", Some("1M")),
                v("rate", Some("2")),
                v("progress", None),
                v("rate", Some("3"))
            ]
        );
        // An abbreviated long option is the option it abbreviates.
        assert_eq!(
            met(&["resize", "--pre", "x"]),
            vec![v("preallocation", Some("x"))]
        );
    }

    #[test]
    fn reading_stops_where_getopt_refuses_or_helps() {
        assert!(met(&["commit", "--zzz", "-r", "x"]).is_empty());
        assert!(met(&["commit", "-Z", "-r", "x"]).is_empty());
        assert!(met(&["commit", "-h", "-r", "x"]).is_empty());
        assert!(met(&["commit", "--", "-r", "x"]).is_empty());
        assert!(met(&["commit", "--quiet=1", "-r", "x"]).is_empty());
        assert!(met(&["commit", "-r"]).is_empty());
    }
}
