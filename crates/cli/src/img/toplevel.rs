//! The options before the subcommand, read as qemu-img's getopt loop reads them:
//! `-h`/`--help`, `-V`/`--version` and `-T`/`--trace VALUE` (`-TVALUE` attached,
//! `-hX` is `-h`; a long one may be shortened to any prefix, and
//! take `=VALUE`); the first argument that is not an option (or the one after
//! `--`) is the subcommand. Then the subcommand must exist: no argument left is
//! "Not enough arguments", an unknown name "Command not found". Each mistake is
//! worded as qemu-img words it and exits 1; help and version exit 0, on stdout.
//! The help text itself is strata's own.

use super::trace::{Outcome, Trace};
use std::ffi::OsString;

/// What the options before the subcommand lead to.
pub enum Start {
    /// Exit now with this code (help, version, a mistake: already printed).
    Exit(i32),
    /// Run the subcommand: `args[0]` is its (known) name.
    Run { args: Vec<OsString> },
}

/// The long options before the subcommand, and whether each takes a value.
const LONG: &[(&str, bool)] = &[("help", false), ("version", false), ("trace", true)];

enum Opt {
    Help { long: bool },
    Version,
    Trace(String),
}

/// A mistake in the options before the subcommand, worded by getopt: named
/// after the program as run, with the "Try ... --help" line.
fn getopt_mistake(prog: &str, said: &str) -> Start {
    let argv0 = super::invoked_as(prog);
    eprintln!("{argv0}: {said}\nTry '{argv0} --help' for more info");
    Start::Exit(1)
}

/// A mistake qemu-img reports after its options: its bare name, then the
/// "Try" line naming the program as run.
fn command_mistake(prog: &str, said: &str) -> Start {
    eprintln!(
        "{prog}: {said}\nTry '{} --help' for more info",
        super::invoked_as(prog)
    );
    Start::Exit(1)
}

/// Read `--NAME[=VALUE]` (`body` is what follows `--`): the option, or the
/// mistake to report.
fn long_option(body: &str, rest: &mut impl Iterator<Item = String>) -> Result<Opt, String> {
    let (name, attached) = match body.split_once('=') {
        Some((n, v)) => (n, Some(v.to_string())),
        None => (body, None),
    };
    let matches: Vec<&(&str, bool)> = LONG.iter().filter(|(l, _)| l.starts_with(name)).collect();
    let exact = LONG.iter().find(|(l, _)| *l == name);
    let &(full, takes) = match (exact, matches.as_slice()) {
        (Some(e), _) => e,
        (None, [one]) => *one,
        (None, []) => return Err(format!("unrecognized option '--{body}'")),
        (None, many) => {
            let names: Vec<&str> = many.iter().map(|(l, _)| *l).collect();
            return Err(super::usage::ambiguous_option(body, &names));
        }
    };
    match (full, takes, attached) {
        (_, false, Some(_)) => Err(format!("option '--{full}' doesn't allow an argument")),
        ("help", ..) => Ok(Opt::Help { long: true }),
        ("version", ..) => Ok(Opt::Version),
        (_, _, Some(v)) => Ok(Opt::Trace(v)),
        (_, _, None) => rest
            .next()
            .map(Opt::Trace)
            .ok_or_else(|| format!("option '--{full}' requires an argument")),
    }
}

/// Read a cluster of short options (`body` is what follows `-`): each of `-h`,
/// `-V` and `-T` ends the cluster (the rest of it is `-T`'s value), so the
/// first letter decides; or the mistake to report.
fn short_option(body: &str, rest: &mut impl Iterator<Item = String>) -> Result<Opt, String> {
    let mut chars = body.chars();
    match chars.next() {
        Some('h') => Ok(Opt::Help { long: false }),
        Some('V') => Ok(Opt::Version),
        Some('T') => match chars.as_str() {
            "" => rest
                .next()
                .map(Opt::Trace)
                .ok_or_else(|| "option requires an argument -- 'T'".to_string()),
            attached => Ok(Opt::Trace(attached.to_string())),
        },
        Some(c) => Err(format!("invalid option -- '{c}'")),
        None => Err("invalid option -- ''".to_string()),
    }
}

/// Read the options before the subcommand of `args` (the arguments after the
/// program's name) and check the subcommand's name against `commands`.
pub fn start(args: Vec<OsString>, prog: &'static str, commands: &[String]) -> Start {
    let mut trace = Trace::default();
    let mut it = args.into_iter().peekable();
    while let Some(arg) = it.peek().map(|a| a.to_string_lossy().into_owned()) {
        if arg == "--" {
            it.next();
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            break;
        }
        it.next();
        let mut values = std::iter::from_fn(|| it.next().map(|a| a.to_string_lossy().into_owned()));
        let opt = match arg.strip_prefix("--") {
            Some(body) => long_option(body, &mut values),
            None => short_option(&arg[1..], &mut values),
        };
        match opt {
            Err(said) => return getopt_mistake(prog, &said),
            Ok(opt) => match opt {
                Opt::Help { long } => return help(prog, long),
                Opt::Version => {
                    print!("{}", super::version_text(prog));
                    return Start::Exit(0);
                }
                Opt::Trace(v) => match trace.option(prog, &v) {
                    Ok(Outcome::Continue) => {}
                    Ok(Outcome::Listed) => return Start::Exit(0),
                    Err(e) => {
                        eprintln!("{e}");
                        return Start::Exit(1);
                    }
                },
            },
        }
    }
    let args: Vec<OsString> = it.collect();
    let Some(name) = args.first().map(|a| a.to_string_lossy().into_owned()) else {
        return command_mistake(prog, "Not enough arguments");
    };
    if let Err(e) = trace.open_output(prog) {
        eprintln!("{e}");
        return Start::Exit(1);
    }
    if !commands.contains(&name) {
        return command_mistake(prog, &format!("Command not found: {name}"));
    }
    Start::Run { args }
}

/// strata's own help for `strata img` (short for `-h`, long for `--help`), on
/// stdout, exit 0, as qemu-img prints its help.
fn help(prog: &'static str, long: bool) -> Start {
    use clap::CommandFactory;
    let mut cmd = super::ImgCli::command().name(prog).bin_name(prog);
    let text = if long {
        cmd.render_long_help()
    } else {
        cmd.render_help()
    };
    print!("{text}");
    Start::Exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_more() -> impl Iterator<Item = String> {
        std::iter::empty()
    }

    #[test]
    fn long_options_take_unique_prefixes_and_attached_values() {
        assert!(matches!(
            long_option("he", &mut no_more()),
            Ok(Opt::Help { long: true })
        ));
        assert!(matches!(long_option("v", &mut no_more()), Ok(Opt::Version)));
        assert!(matches!(long_option("tr=x", &mut no_more()), Ok(Opt::Trace(v)) if v == "x"));
        assert_eq!(
            long_option("trace", &mut no_more()).err().unwrap(),
            "option '--trace' requires an argument"
        );
        assert_eq!(
            long_option("help=1", &mut no_more()).err().unwrap(),
            "option '--help' doesn't allow an argument"
        );
        assert_eq!(
            long_option("bogus", &mut no_more()).err().unwrap(),
            "unrecognized option '--bogus'"
        );
    }

    #[test]
    fn a_short_cluster_is_decided_by_its_first_letter() {
        let mut next = vec!["v".to_string()].into_iter();
        assert!(matches!(short_option("T", &mut next), Ok(Opt::Trace(v)) if v == "v"));
        assert!(matches!(short_option("Tx", &mut no_more()), Ok(Opt::Trace(v)) if v == "x"));
        assert!(matches!(
            short_option("hq", &mut no_more()),
            Ok(Opt::Help { long: false })
        ));
        assert_eq!(
            short_option("q", &mut no_more()).err().unwrap(),
            "invalid option -- 'q'"
        );
        assert_eq!(
            short_option("T", &mut no_more()).err().unwrap(),
            "option requires an argument -- 'T'"
        );
    }
}
