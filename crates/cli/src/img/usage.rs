//! Command-line mistakes worded as qemu-img words them. clap finds the mistake; this
//! module says it the way scripts and users of qemu-img expect (getopt's messages
//! for options, the subcommand's own message for missing or extra file names,
//! and the "Try ... --help" line), with qemu-img's exit code 1.

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// The message for a wrong number of file names, and whether qemu-img follows it
/// with the "Try ... --help" line.
fn file_count_message(sub: &str) -> Option<(&'static str, bool)> {
    Some(match sub {
        "info" | "map" | "check" | "snapshot" | "commit" | "rebase" | "stream" | "bench" => {
            ("Expecting one image file name", true)
        }
        "compare" => ("Expecting two image file names", true),
        "resize" => ("Expecting image file name and size", true),
        "create" => ("Expecting image file name", true),
        "convert" => ("Must specify image file name", false),
        "measure" => ("Either --size N or one filename must be specified.", false),
        _ => return None,
    })
}

/// qemu-img's words for a file name beyond those a subcommand takes, where they
/// differ from its words for too few (`extra` is the first one too many).
fn extra_file_message(sub: &str, extra: &str) -> Option<String> {
    match sub {
        "create" => Some(format!("Unexpected argument: {extra}")),
        "resize" => Some("Extra argument(s) in command line".into()),
        _ => None,
    }
}

/// `check`'s repair mode as typed (`-r MODE`, `-rMODE`, `--repair MODE`,
/// `--repair=MODE`), when it is neither `leaks` nor `all`: qemu-img refuses it
/// as it reads the options, before it counts the file names (`-r FILE` took the
/// file name as the mode).
fn bad_repair_mode(args: &[String]) -> Option<&str> {
    let mut it = args.iter().skip(1);
    let mut mode = None;
    while let Some(a) = it.next() {
        mode = match a.as_str() {
            "-r" | "--repair" => it.next().map(String::as_str),
            _ => match a.strip_prefix("--repair=") {
                Some(m) => Some(m),
                None => a.strip_prefix("-r").filter(|m| !m.is_empty()).or(mode),
            },
        };
    }
    mode.filter(|m| !matches!(*m, "leaks" | "all"))
}

/// `check`'s first bad repair mode when it is typed before the first bad
/// `--output` value: qemu-img judges options in the order typed and stops at
/// the first it refuses.
fn repair_refused_before_output(args: &[String]) -> Option<&str> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mode = match a.as_str() {
            "-r" | "--repair" => it.next().map(String::as_str),
            "--output" => match it.next().map(String::as_str) {
                Some("human" | "json") => None,
                _ => return None,
            },
            _ if a.starts_with("--output=") => match &a["--output=".len()..] {
                "human" | "json" => None,
                _ => return None,
            },
            _ => a
                .strip_prefix("--repair=")
                .or_else(|| a.strip_prefix("-r").filter(|m| !m.is_empty())),
        };
        if let Some(m) = mode.filter(|m| !matches!(*m, "leaks" | "all")) {
            return Some(m);
        }
    }
    None
}

fn context(e: &clap::Error, kind: ContextKind) -> Option<String> {
    match e.get(kind)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) => v.first().cloned(),
        _ => None,
    }
}

/// Each subcommand's long options in the order qemu-img's getopt table lists
/// them: getopt names the candidates of an ambiguous prefix in this order.
const QEMU_LONG_OPTIONS: &[(&str, &[&str])] = &[
    (
        "create",
        &[
            "help",
            "quiet",
            "object",
            "format",
            "backing",
            "backing-format",
            "backing-unsafe",
            "options",
        ],
    ),
    (
        "info",
        &[
            "help",
            "format",
            "output",
            "backing-chain",
            "object",
            "image-opts",
            "force-share",
        ],
    ),
    (
        "map",
        &[
            "help",
            "format",
            "output",
            "object",
            "image-opts",
            "force-share",
            "start-offset",
            "max-length",
        ],
    ),
    (
        "check",
        &[
            "help",
            "quiet",
            "format",
            "cache",
            "repair",
            "output",
            "object",
            "image-opts",
            "force-share",
        ],
    ),
    (
        "compare",
        &[
            "help",
            "quiet",
            "object",
            "cache",
            "image-opts",
            "a-format",
            "left-format",
            "b-format",
            "right-format",
            "force-share",
            "strict",
            "progress",
        ],
    ),
    (
        "measure",
        &[
            "help",
            "target-format",
            "format",
            "image-opts",
            "options",
            "snapshot",
            "object",
            "output",
            "size",
            "force-share",
        ],
    ),
    (
        "resize",
        &[
            "help",
            "quiet",
            "object",
            "format",
            "image-opts",
            "preallocation",
            "shrink",
        ],
    ),
    (
        "convert",
        &[
            "help",
            "quiet",
            "object",
            "image-opts",
            "source-image-opts",
            "source-format",
            "source-cache",
            "snapshot",
            "sparse-size",
            "output-format",
            "options",
            "output-cache",
            "backing",
            "backing-format",
            "force-share",
            "target-image-opts",
            "salvage",
            "target-is-zero",
            "bitmaps",
            "skip-broken-bitmaps",
            "rate",
            "parallel",
            "oob-writes",
            "copy-range-offloading",
        ],
    ),
    (
        "snapshot",
        &[
            "help",
            "quiet",
            "object",
            "format",
            "image-opts",
            "force-share",
            "list",
            "apply",
            "create",
            "delete",
        ],
    ),
    (
        "commit",
        &[
            "help",
            "quiet",
            "object",
            "format",
            "image-opts",
            "cache",
            "drop",
            "base",
            "progress",
            "rate",
        ],
    ),
    (
        "rebase",
        &[
            "help",
            "quiet",
            "progress",
            "object",
            "image-opts",
            "force-share",
            "format",
            "cache",
            "compress",
            "backing",
            "backing-format",
            "backing-cache",
            "backing-unsafe",
        ],
    ),
    (
        "amend",
        &[
            "help",
            "quiet",
            "progress",
            "object",
            "format",
            "cache",
            "options",
            "image-opts",
            "force",
        ],
    ),
    (
        "bitmap",
        &[
            "help",
            "object",
            "image-opts",
            "add",
            "remove",
            "clear",
            "enable",
            "disable",
            "merge",
            "granularity",
            "source-file",
            "source-format",
        ],
    ),
    (
        "dd",
        &[
            "help",
            "object",
            "format",
            "output-format",
            "image-opts",
            "force-share",
        ],
    ),
    (
        "bench",
        &[
            "help",
            "format",
            "image-opts",
            "cache",
            "count",
            "depth",
            "offset",
            "buffer-size",
            "step-size",
            "aio",
            "native",
            "write",
            "pattern",
            "flush-interval",
            "no-drain",
            "force-share",
        ],
    ),
];

/// getopt's refusal of `--BODY` (as typed, `=value` and all) when its name is a
/// prefix of several long options (`names`, in table order).
pub fn ambiguous_option(body: &str, names: &[&str]) -> String {
    let listed: Vec<String> = names.iter().map(|n| format!("'--{n}'")).collect();
    format!(
        "option '--{body}' is ambiguous; possibilities: {}",
        listed.join(" ")
    )
}

/// The long option of qemu-img's `sub` that `--BODY` (`=value` and all)
/// names, as getopt_long reads it: the option named in full, or the one option
/// it is a prefix of. Otherwise the options it is a prefix of, in table order:
/// none (unrecognized, or a subcommand without a table) or several (ambiguous).
pub fn long_option(sub: &str, body: &str) -> Result<&'static str, Vec<&'static str>> {
    let Some((_, table)) = QEMU_LONG_OPTIONS.iter().find(|(s, _)| *s == sub) else {
        return Err(Vec::new());
    };
    let name = body.split('=').next().unwrap_or(body);
    if let Some(exact) = table.iter().find(|l| **l == name) {
        return Ok(exact);
    }
    let found: Vec<&'static str> = table
        .iter()
        .copied()
        .filter(|l| l.starts_with(name))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        _ => Err(found),
    }
}

/// The long options of qemu-img's `sub` that `--BODY` abbreviates, when there
/// are several and none is named in full (getopt then refuses it as ambiguous).
fn ambiguous_candidates(sub: &str, body: &str) -> Option<Vec<&'static str>> {
    long_option(sub, body).err().filter(|found| found.len() > 1)
}

/// The option as typed, without clap's value name (`-f <FMT>` -> `-f`).
fn option_name(arg: &str) -> &str {
    let name = arg.split([' ', '=']).next().unwrap_or(arg);
    // clap marks an option that may be repeated (counted) with `...`.
    name.strip_suffix("...").unwrap_or(name)
}

/// qemu-img's text for `e` (a clap parse error of `prog sub ...`), or `None` to
/// let clap speak (help, version, and mistakes qemu-img has no words for).
pub fn qemu_img_message(e: &clap::Error, prog: &str, args: &[String]) -> Option<String> {
    let sub = args.first()?.as_str();
    // getopt names the program as it was run (a path, if run by one); qemu-img's
    // own messages use its bare name.
    let argv0 = super::invoked_as(prog);
    let try_help = format!("Try '{argv0} {sub} --help' for more info");
    let counted = |(msg, with_try): (&str, bool)| {
        if with_try {
            format!("{prog}: {msg}\n{try_help}\n")
        } else {
            format!("{prog}: {msg}\n")
        }
    };
    match e.kind() {
        ErrorKind::UnknownArgument => {
            let arg = context(e, ContextKind::InvalidArg)?;
            if arg.starts_with("--") {
                // As typed, with any `=value` (clap reports the name alone).
                let prefix = format!("{arg}=");
                let arg = args.iter().find(|a| a.starts_with(&prefix)).unwrap_or(&arg);
                if let Some(names) = ambiguous_candidates(sub, &arg[2..]) {
                    let said = ambiguous_option(&arg[2..], &names);
                    return Some(format!("{argv0} {sub}: {said}\n{try_help}\n"));
                }
                Some(format!(
                    "{argv0} {sub}: unrecognized option '{arg}'\n{try_help}\n"
                ))
            } else if arg.starts_with('-') && arg.len() > 1 {
                let c = arg.chars().nth(1)?;
                Some(format!(
                    "{argv0} {sub}: invalid option -- '{c}'\n{try_help}\n"
                ))
            } else if let Some(msg) = extra_file_message(sub, &arg) {
                Some(format!("{prog}: {msg}\n{try_help}\n"))
            } else {
                file_count_message(sub).map(counted)
            }
        }
        ErrorKind::MissingRequiredArgument | ErrorKind::TooFewValues
            if sub == "check" && bad_repair_mode(args).is_some() =>
        {
            let mode = bad_repair_mode(args)?;
            Some(format!(
                "{prog}: --repair (-r) expects 'leaks' or 'all' not '{mode}'\n{try_help}\n"
            ))
        }
        // Only positionals (the file names) are required; a missing option
        // value is an InvalidValue, below.
        ErrorKind::MissingRequiredArgument | ErrorKind::TooFewValues => {
            file_count_message(sub).map(counted)
        }
        ErrorKind::InvalidValue => {
            let arg = context(e, ContextKind::InvalidArg)?;
            let value = context(e, ContextKind::InvalidValue).unwrap_or_default();
            let name = option_name(&arg);
            if value.is_empty() {
                // The option lacking its value is the last argument typed: getopt
                // names a short one by its letter (clap names its long form),
                // a long one by its full name.
                let typed = args.last().map(String::as_str).unwrap_or(name);
                return Some(match typed.strip_prefix("--") {
                    Some(_) => {
                        format!("{argv0} {sub}: option '{name}' requires an argument\n{try_help}\n")
                    }
                    None => format!(
                        "{argv0} {sub}: option requires an argument -- '{}'\n{try_help}\n",
                        typed.chars().last().unwrap_or('?')
                    ),
                });
            }
            if name == "--output" && sub == "check" {
                if let Some(mode) = repair_refused_before_output(args) {
                    return Some(format!(
                        "{prog}: --repair (-r) expects 'leaks' or 'all' not '{mode}'\n{try_help}\n"
                    ));
                }
            }
            (name == "--output").then(|| {
                format!("{prog}: --output expects 'human' or 'json' not '{value}'\n{try_help}\n")
            })
        }
        // `--NAME=VALUE` for an option that takes no value: getopt names the
        // option in full.
        ErrorKind::TooManyValues => {
            let arg = context(e, ContextKind::InvalidArg)?;
            let name = option_name(&arg);
            name.starts_with("--").then(|| {
                format!("{argv0} {sub}: option '{name}' doesn't allow an argument\n{try_help}\n")
            })
        }
        ErrorKind::ArgumentConflict if sub == "snapshot" => Some(format!(
            "{prog}: Cannot mix '-l', '-a', '-c', '-d'\n{try_help}\n"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_repair_mode_typed_is_the_one_judged() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(bad_repair_mode(&a(&["check", "-r", "img"])), Some("img"));
        assert_eq!(bad_repair_mode(&a(&["check", "--repair=x"])), Some("x"));
        assert_eq!(bad_repair_mode(&a(&["check", "-rfoo"])), Some("foo"));
        assert_eq!(
            bad_repair_mode(&a(&["check", "-r", "x", "-r", "all"])),
            None
        );
        assert_eq!(bad_repair_mode(&a(&["check", "-q", "img"])), None);
    }

    #[test]
    fn a_repair_mode_typed_before_a_bad_output_is_refused_first() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let f = |v: &[&str]| repair_refused_before_output(&a(v)).map(str::to_string);
        assert_eq!(
            f(&["check", "-r", "x", "--output=y", "i"]),
            Some("x".into())
        );
        assert_eq!(f(&["check", "--output", "y", "-r", "x", "i"]), None);
        assert_eq!(f(&["check", "-rall", "--output=y", "i"]), None);
    }

    #[test]
    fn option_names_lose_their_value_names() {
        assert_eq!(option_name("-f <FMT>"), "-f");
        assert_eq!(option_name("--output <OFMT>"), "--output");
        assert_eq!(option_name("--output=<OFMT>"), "--output");
        assert_eq!(option_name("--list..."), "--list");
    }
}
