//! `strata img bitmap`: add, remove, clear, enable, disable and merge persistent
//! dirty bitmaps of a qcow2 image, in the order the operations are given, as
//! qemu-img does (an operation that fails stops the run; those before it stay).

use super::common::{open_qcow2, size_arg, spec_format, warn_probed_raw, Ctx};
use anyhow::{bail, Result};
use std::path::Path;
use strata_format::qcow2::bitmap_edit::Bitmap;
use strata_format::qcow2::Qcow2Image;
use strata_format::Format;

#[derive(clap::Args)]
#[command(disable_help_flag = true)]
pub struct Args {
    /// Operations (--add, --remove, --clear, --enable, --disable, --merge SOURCE),
    /// options (-f FMT, -g GRANULARITY, -b SOURCE_FILE, -F SOURCE_FMT), then the
    /// image and the bitmap name.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

/// The command line, read as qemu-img's getopt loop reads it (options and file
/// names in any order; `--opt=value` and `-fVALUE` forms too).
#[derive(Default, Debug)]
struct Parsed {
    ops: Vec<Op>,
    format: Option<String>,
    granularity: Option<String>,
    source_file: Option<String>,
    source_format: Option<String>,
    naming: super::imgname::Naming,
    positional: Vec<String>,
    /// `-h` or `--help` (or a prefix of it) came before any mistake.
    help: bool,
    /// `--object help` came before any mistake: the object types are listed.
    object_types: bool,
}

fn parse(args: &[String], prog: &str) -> Result<Parsed, String> {
    let try_help = format!(
        "Try '{} bitmap --help' for more info",
        super::invoked_as(prog)
    );
    let mut p = Parsed::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.strip_prefix("--") {
            Some("") => {
                p.positional.extend(it.by_ref().cloned());
                break;
            }
            Some(long) => match long.split_once('=') {
                Some((n, v)) => (format!("--{n}"), Some(v.to_string())),
                None => (a.clone(), None),
            },
            None if a.starts_with('-') && a.len() > 1 => {
                let (n, v) = a.split_at(2);
                (n.to_string(), (!v.is_empty()).then(|| v.to_string()))
            }
            None => {
                p.positional.push(a.clone());
                continue;
            }
        };
        // A long option may be abbreviated to any prefix naming one option
        // alone (getopt_long); messages then name it in full.
        let name = match name.strip_prefix("--") {
            Some(body) => match super::usage::long_option("bitmap", body) {
                Ok(full) => format!("--{full}"),
                Err(names) if names.is_empty() => {
                    return Err(format!(
                        "{prog} bitmap: unrecognized option '{a}'\n{try_help}"
                    ))
                }
                Err(names) => {
                    let said = super::usage::ambiguous_option(&a[2..], &names);
                    return Err(format!("{prog} bitmap: {said}\n{try_help}"));
                }
            },
            None => name,
        };
        if name == "--help" || name == "-h" {
            p.help = true;
            return Ok(p);
        }
        // The long names of the short options.
        let key = match name.as_str() {
            "--granularity" => "-g",
            "--source-file" => "-b",
            "--source-format" => "-F",
            n => n,
        };
        let takes_value = matches!(key, "-f" | "-g" | "-b" | "-F" | "--merge" | "--object");
        let flag = matches!(
            key,
            "--add" | "--remove" | "--clear" | "--enable" | "--disable" | "--image-opts"
        );
        if !takes_value && !flag {
            return Err(match name.strip_prefix("--") {
                Some(_) => format!("{prog} bitmap: unrecognized option '{a}'\n{try_help}"),
                None => format!(
                    "{prog} bitmap: invalid option -- '{}'\n{try_help}",
                    &name[1..]
                ),
            });
        }
        if flag && inline.is_some() {
            return Err(format!(
                "{prog} bitmap: option '{name}' doesn't allow an argument\n{try_help}"
            ));
        }
        let value = if takes_value {
            match inline.or_else(|| it.next().cloned()) {
                Some(v) => Some(v),
                None => {
                    return Err(match name.strip_prefix("--") {
                        Some(_) => {
                            format!(
                                "{prog} bitmap: option '{name}' requires an argument\n{try_help}"
                            )
                        }
                        None => format!(
                            "{prog} bitmap: option requires an argument -- '{}'\n{try_help}",
                            &name[1..]
                        ),
                    })
                }
            }
        } else {
            None
        };
        match key {
            "--add" => p.ops.push(Op::Add),
            "--remove" => p.ops.push(Op::Remove),
            "--clear" => p.ops.push(Op::Clear),
            "--enable" => p.ops.push(Op::Enable),
            "--disable" => p.ops.push(Op::Disable),
            "--merge" => p.ops.push(Op::Merge(value.unwrap_or_default())),
            "-f" => p.format = value,
            // qemu-img reads the size as it meets the option.
            "-g" => {
                if let Some(g) = &value {
                    // Out of range and not a number are worded apart.
                    if let Err(e) = size_arg("granularity", g) {
                        return Err(format!("{prog}: {e}"));
                    }
                }
                p.granularity = value
            }
            "-b" => p.source_file = value,
            "-F" => p.source_format = value,
            // Each object is created as the loop meets it (`help` lists the
            // types and ends the run).
            "--object" => {
                let v = value.unwrap_or_default();
                if super::objects::asks_for_types(&v) {
                    p.object_types = true;
                    return Ok(p);
                }
                p.naming.objects.object.push(v);
                if let Err(e) = p.naming.objects.objects() {
                    return Err(format!("{prog}: {e}"));
                }
            }
            "--image-opts" => p.naming.image_opts = true,
            _ => {}
        }
    }
    Ok(p)
}

pub fn run(args: Args, ctx: &Ctx) -> Result<i32> {
    let p = match parse(&args.args, ctx.prog) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("{msg}");
            return Ok(1);
        }
    };
    if p.object_types {
        print!("{}", super::objects::types_list());
        return Ok(0);
    }
    if p.help {
        println!(
            "Usage: {} bitmap [-f FMT] [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] \
             {{--add|--remove|--clear|--enable|--disable|--merge SOURCE}}... FILENAME BITMAP",
            ctx.prog
        );
        return Ok(0);
    }
    if p.ops.is_empty() {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    // A granularity of 0 is qemu-img's "none given": the default with --add,
    // and no refusal of the other operations.
    let granularity = match &p.granularity {
        Some(g) => Some(size_arg("granularity", g)?).filter(|&g| g != 0),
        None => None,
    };
    if granularity.is_some() && !p.ops.contains(&Op::Add) {
        bail!("granularity only supported with --add");
    }
    if p.source_format.is_some() && p.source_file.is_none() {
        bail!("-F only supported with -b");
    }
    if p.source_file.is_some() && !p.ops.iter().any(|o| matches!(o, Op::Merge(_))) {
        bail!("Merge bitmap source file only supported with --merge");
    }
    let [file, name] = p.positional.as_slice() else {
        bail!("Expecting filename and bitmap name");
    };
    let target = open_target(
        &p.naming
            .writable_spec(Path::new(file), p.format.as_deref())?,
    )?;
    // The source file is a file name even with --image-opts (which names the
    // image only), as qemu-img opens it; -F gives its format.
    let plain = super::imgname::Naming {
        image_opts: false,
        ..p.naming.clone()
    };
    // A source in a format without persistent bitmaps (raw, or a qcow2 file
    // read as raw) opens as qemu-img opens it and holds none: a merge from it
    // fails when its turn comes, after the operations before it.
    let source_set = match &p.source_file {
        Some(s) => {
            let spec = plain.spec(Path::new(s), p.source_format.as_deref(), false)?;
            match spec_format(&spec)? {
                Format::Qcow2 => {
                    let src = open_alone(&spec, false)?;
                    let size = strata_format::BlockDevice::virtual_size(&src);
                    Some((src.read_bitmaps()?, size))
                }
                format => {
                    let src = strata_chain::open_top(&spec, format, false).map_err(|e| {
                        super::common::open_error(&spec.path, &spec.shown_name(), &e)
                    })?;
                    Some((Vec::new(), src.virtual_size()))
                }
            }
        }
        None => None,
    };
    let img = match target {
        Target::Qcow2(img) => *img,
        // An image of a format without persistent bitmaps holds none and
        // can store none: its first operation fails, as in qemu-img (naming
        // the node by the name QEMU makes up for it).
        Target::Other(dev, node) => {
            let refuse = |_: u64| -> Result<(), String> {
                Err(format!(
                    "Can't store persistent bitmaps to {}: Operation not supported",
                    super::common::generated_node_name(node)
                ))
            };
            let mut none = Vec::new();
            for op in &p.ops {
                let applied = apply(
                    &mut none,
                    op,
                    name,
                    granularity,
                    dev.virtual_size(),
                    source_set
                        .as_ref()
                        .map(|(set, size)| (set.as_slice(), *size)),
                    &refuse,
                );
                if let Err(e) = applied {
                    bail!("Operation {} on bitmap {name} failed: {e}", op.name());
                }
            }
            return Ok(0);
        }
    };
    let size = strata_format::BlockDevice::virtual_size(&img);
    let mut set = img.read_bitmaps()?;
    let v2 = img.header().version < 3;
    let mut failure = None;
    // qemu-img removes a bitmap from the file at once (the other operations
    // change the set it stores when it closes the image).
    let mut removed = Vec::new();
    let cluster_size = img.header().cluster_size();
    // Whether a new bitmap of this granularity can be stored in the file, in
    // QEMU's order of checks, naming the image by the node name QEMU makes up.
    let can_store = |g: u64| -> Result<(), String> {
        let why = persistence_refusal(v2, size, cluster_size, g, name);
        match why {
            Some(why) => Err(format!(
                "Can't make bitmap '{name}' persistent in '{}': {why}",
                super::common::generated_node_name(1)
            )),
            None => Ok(()),
        }
    };
    for op in &p.ops {
        let applied = apply(
            &mut set,
            op,
            name,
            granularity,
            size,
            source_set
                .as_ref()
                .map(|(set, size)| (set.as_slice(), *size)),
            &can_store,
        );
        if let Err(e) = applied {
            failure = Some(format!(
                "Operation {} on bitmap {name} failed: {e}",
                op.name()
            ));
            break;
        }
        if *op == Op::Remove {
            removed.push(name.clone());
        }
    }
    img.store_bitmaps_as_qemu_removing(&set, &removed)?;
    img.close()?;
    match failure {
        Some(msg) => bail!(msg),
        None => Ok(0),
    }
}

/// The image the operations apply to: a qcow2 image, or an image of a
/// format that stores no bitmaps, held open (and locked) as qemu-img holds it.
enum Target {
    Qcow2(Box<Qcow2Image>),
    /// An image of another format, with the number QEMU's name for its node
    /// would carry (see [`node_number`]).
    Other(std::sync::Arc<dyn strata_format::BlockDevice>, u64),
}

/// Which node QEMU names `n` when it opens the image `spec` names: nodes are
/// numbered as they are opened, a format's file before the format, a filter
/// (blkdebug) before what it filters. A protocol driver as the format is the
/// first; a format over its file the second; over blkdebug over a file the
/// third (filter, file, format); over blkdebug over a format node, the fourth.
fn node_number(spec: &strata_chain::OpenSpec) -> u64 {
    match (&spec.protocol_driver, &spec.blkdebug, &spec.filtered) {
        (Some(_), _, _) => 0,
        (None, Some(_), Some(_)) => 3,
        (None, Some(_), None) => 2,
        (None, None, _) => 1,
    }
}

/// Open the image `spec` names for writing, in its format (given or probed).
fn open_target(spec: &strata_chain::OpenSpec) -> Result<Target> {
    let format = spec_format(spec)?;
    if format == Format::Qcow2 {
        return Ok(Target::Qcow2(Box::new(open_alone(spec, true)?)));
    }
    super::imgname::refuse_backing_options(spec, format)?;
    warn_probed_raw(spec);
    strata_chain::open_top(spec, format, true)
        .map(|dev| Target::Other(dev, node_number(spec)))
        .map_err(|e| super::common::open_error(&spec.path, &spec.shown_name(), &e))
}

/// Open the qcow2 image `spec` names (its format given or probed as qcow2)
/// without its backing file, as qemu-img's bitmap opens it: options for one
/// are left over, and refused.
fn open_alone(spec: &strata_chain::OpenSpec, write: bool) -> Result<Qcow2Image> {
    super::imgname::refuse_backing_options(spec, Format::Qcow2)?;
    if write {
        warn_probed_raw(spec);
    }
    open_qcow2(spec, write)
}

/// QEMU's limits for a persistent bitmap: bytes of bitmap data, and
/// bitmap-table entries (each maps one cluster of data).
const MAX_BITMAP_BYTES: u64 = 0x2000_0000;
const MAX_BITMAP_TABLE_ENTRIES: u64 = 0x0800_0000;

/// Why a new persistent bitmap named `name` with `granularity` (a power of
/// two, at least 512) cannot be stored in a qcow2 image of `size` bytes with
/// `cluster_size` clusters, in qemu-img's words and order; `None` if it can.
fn persistence_refusal(
    v2: bool,
    size: u64,
    cluster_size: u64,
    granularity: u64,
    name: &str,
) -> Option<&'static str> {
    if v2 {
        return Some("Cannot store dirty bitmaps in qcow2 v2 files");
    }
    let bytes = size.div_ceil(granularity).div_ceil(8);
    let table_room = MAX_BITMAP_TABLE_ENTRIES.saturating_mul(cluster_size);
    if bytes > MAX_BITMAP_BYTES || bytes > table_room {
        return Some("Too much space will be occupied by the bitmap. Use larger granularity");
    }
    if name.len() > 1023 {
        return Some("Name length exceeds maximum (1023 characters)");
    }
    None
}

fn find<'a>(set: &'a mut [Bitmap], name: &str) -> Result<&'a mut Bitmap, String> {
    set.iter_mut()
        .find(|b| b.name == name)
        .ok_or_else(|| format!("Dirty bitmap '{name}' not found"))
}

/// One operation on the in-memory set, with qemu-img's reasons for refusing.
fn apply(
    set: &mut Vec<Bitmap>,
    op: &Op,
    name: &str,
    granularity: Option<u64>,
    size: u64,
    source: Option<(&[Bitmap], u64)>,
    can_store: &dyn Fn(u64) -> Result<(), String>,
) -> Result<(), String> {
    match op {
        Op::Add => {
            if name.is_empty() {
                return Err("Bitmap name cannot be empty".into());
            }
            let g = granularity.unwrap_or(65536);
            if !g.is_power_of_two() || !(512..=1 << 31).contains(&g) {
                return Err("Granularity must be power of 2 and at least 512".into());
            }
            can_store(g)?;
            if set.iter().any(|b| b.name == name) {
                return Err(format!("Bitmap already exists: {name}"));
            }
            set.push(Bitmap::new(name, g.trailing_zeros() as u8, true, size));
        }
        Op::Remove => {
            find(set, name)?;
            set.retain(|b| b.name != name);
        }
        Op::Clear => find(set, name)?.bits.fill(0),
        Op::Enable => find(set, name)?.enabled = true,
        Op::Disable => find(set, name)?.enabled = false,
        Op::Merge(src) => {
            // The target bitmap is looked up before the source, as in qemu-img.
            find(set, name)?;
            // Without -b the source is in the image itself, as it is now.
            let (from_set, from_size) = source.unwrap_or((set.as_slice(), size));
            let from = from_set
                .iter()
                .find(|b| &b.name == src)
                .cloned()
                .ok_or_else(|| format!("Dirty bitmap '{src}' not found"))?;
            // A bitmap covers its whole disk: disks of other sizes do not merge.
            if from_size != size {
                return Err(format!(
                    "Bitmaps are of different sizes (destination size is {size}, \
                     source size is {from_size}) and can't be merged"
                ));
            }
            find(set, name)?.merge_from(&from);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn operations_keep_their_order_and_options_may_follow_the_names() {
        let p = parse(
            &strings(&[
                "--add",
                "-g",
                "4k",
                "a.qcow2",
                "--merge=b0",
                "bm",
                "--disable",
            ]),
            "qemu-img",
        )
        .unwrap();
        assert_eq!(p.ops, vec![Op::Add, Op::Merge("b0".into()), Op::Disable]);
        assert_eq!(p.granularity.as_deref(), Some("4k"));
        assert_eq!(p.positional, strings(&["a.qcow2", "bm"]));
    }

    #[test]
    fn unknown_options_are_worded_as_getopt_words_them() {
        let e = parse(&strings(&["-U", "a"]), "qemu-img").unwrap_err();
        assert!(
            e.starts_with("qemu-img bitmap: invalid option -- 'U'"),
            "{e}"
        );
        let e = parse(&strings(&["--add=x"]), "qemu-img").unwrap_err();
        assert!(
            e.contains("option '--add' doesn't allow an argument"),
            "{e}"
        );
    }
}
