//! `-o help` (or `-o ?`): the option listings of `create`, `convert` and `amend`,
//! laid out as qemu-img lays them out, since scripts read them to learn which
//! options a format takes.
//!
//! The contract, per line: two spaces, `name=<type>` padded to 22 columns, `" - "`
//! and a description. Lines are sorted as qemu-img sorts them (byte order of the
//! whole line). Names, types, order, the header and the closing lines match
//! qemu-img byte for byte; the descriptions are strata's own words.
//!
//! `create` and `convert` list the format's options and, when a target file name
//! is given, the options of the protocol that would hold it (the file, a device
//! or an NBD export), a name listed once (the format's entry wins). Options
//! strata's create does not take are left out even where qemu-img lists them:
//! a listing promises that the option works.

use anyhow::{bail, Result};
use std::path::Path;

/// How qemu-img names an option's value type in a listing.
#[derive(Clone, Copy)]
enum Ty {
    Str,
    Bool,
    Num,
    Size,
}

impl Ty {
    fn label(self) -> &'static str {
        match self {
            Ty::Str => "str",
            Ty::Bool => "bool (on/off)",
            Ty::Num => "num",
            Ty::Size => "size",
        }
    }
}

/// One option: name, value type, description.
type Opt = (&'static str, Ty, &'static str);

const SIZE: Opt = ("size", Ty::Size, "Virtual disk size");

/// The qcow2 format's own create options.
const QCOW2: &[Opt] = &[
    (
        "backing_file",
        Ty::Str,
        "Image the new one is an overlay on (a relative name is taken from the new image's directory)",
    ),
    ("backing_fmt", Ty::Str, "Format of the backing image: qcow2 or raw"),
    (
        "cluster_size",
        Ty::Size,
        "Allocation unit, a power of two from 512 bytes to 2 MiB (default 64 KiB)",
    ),
    ("compat", Ty::Str, "qcow2 version: 0.10 (v2) or 1.1 (v3, the default)"),
    (
        "compression_type",
        Ty::Str,
        "Codec for compressed clusters: zlib (default) or zstd",
    ),
    (
        "data_file",
        Ty::Str,
        "File that holds the guest data, at the guest offsets (created or truncated)",
    ),
    (
        "data_file_raw",
        Ty::Bool,
        "Keep the data file a raw image of the disk (implies metadata preallocation)",
    ),
    (
        "encrypt.cipher-alg",
        Ty::Str,
        "luks: cipher of the disk data (default aes-256)",
    ),
    (
        "encrypt.cipher-mode",
        Ty::Str,
        "luks: cipher mode, xts (default), cbc or ecb",
    ),
    (
        "encrypt.format",
        Ty::Str,
        "Encryption of the guest data: luks, or the legacy aes (weak; for old tools only)",
    ),
    (
        "encrypt.hash-alg",
        Ty::Str,
        "luks: hash of the key derivation (default sha256)",
    ),
    (
        "encrypt.iter-time",
        Ty::Num,
        "luks: milliseconds of key derivation an unlock costs (default 2000)",
    ),
    (
        "encrypt.ivgen-alg",
        Ty::Str,
        "luks: IV generator, plain64 (default), plain or essiv",
    ),
    (
        "encrypt.ivgen-hash-alg",
        Ty::Str,
        "luks: hash of the essiv IV generator",
    ),
    (
        "encrypt.key-secret",
        Ty::Str,
        "Id of the secret object holding the passphrase or key",
    ),
    (
        "encryption",
        Ty::Bool,
        "Old switch for the legacy aes encryption (use encrypt.format)",
    ),
    (
        "extended_l2",
        Ty::Bool,
        "Split each cluster into 32 subclusters (v3 only)",
    ),
    (
        "lazy_refcounts",
        Ty::Bool,
        "Defer refcount updates to a repair after a crash (v3 only)",
    ),
    (
        "preallocation",
        Ty::Str,
        "What to allocate up front: off, metadata, falloc or full",
    ),
    (
        "refcount_bits",
        Ty::Num,
        "Bits per reference count: 1, 2, 4, 8, 16 (default), 32 or 64",
    ),
    SIZE,
];

/// The raw format's own create options (the rest are its file's).
const RAW: &[Opt] = &[SIZE];

/// The luks format's own create options.
const LUKS: &[Opt] = &[
    (
        "cipher-alg",
        Ty::Str,
        "Cipher of the disk data (default aes-256)",
    ),
    (
        "cipher-mode",
        Ty::Str,
        "Cipher mode: xts (default), cbc or ecb",
    ),
    (
        "detached-header",
        Ty::Bool,
        "Header in a file of its own (only off is supported)",
    ),
    (
        "hash-alg",
        Ty::Str,
        "Hash of the key derivation (default sha256)",
    ),
    (
        "iter-time",
        Ty::Num,
        "Milliseconds of key derivation an unlock costs (default 2000)",
    ),
    (
        "ivgen-alg",
        Ty::Str,
        "IV generator: plain64 (default), plain or essiv",
    ),
    ("ivgen-hash-alg", Ty::Str, "Hash of the essiv IV generator"),
    (
        "key-secret",
        Ty::Str,
        "Id of the secret object holding the passphrase",
    ),
    SIZE,
];

/// The file protocol's create options (a regular file).
const FILE: &[Opt] = &[
    (
        "extent_size_hint",
        Ty::Size,
        "Hint for the file system's extent size (0: none)",
    ),
    (
        "nocow",
        Ty::Bool,
        "Ask the file system not to copy on write (btrfs)",
    ),
    (
        "preallocation",
        Ty::Str,
        "What to allocate up front: off, falloc or full",
    ),
    SIZE,
];

/// The create options of a protocol that formats what is already there (a
/// block or character device, an NBD export).
const EXISTING: &[Opt] = &[
    (
        "preallocation",
        Ty::Str,
        "What to allocate up front: only off",
    ),
    SIZE,
];

/// The qcow2 format's amend options.
const QCOW2_AMEND: &[Opt] = &[
    (
        "backing_file",
        Ty::Str,
        "Backing file name (only the current one; see rebase)",
    ),
    (
        "backing_fmt",
        Ty::Str,
        "Backing file format (only the current one; see rebase)",
    ),
    ("compat", Ty::Str, "qcow2 version: 0.10 (v2) or 1.1 (v3)"),
    (
        "data_file",
        Ty::Str,
        "Name of the external data file (images that have one; empty: forget it)",
    ),
    (
        "data_file_raw",
        Ty::Bool,
        "off: the data file need no longer be a raw image of the disk",
    ),
    (
        "encrypt.iter-time",
        Ty::Num,
        "Milliseconds of PBKDF2 work to unlock the added key slot",
    ),
    (
        "encrypt.keyslot",
        Ty::Num,
        "The key slot (0-7) to add or erase",
    ),
    (
        "encrypt.new-secret",
        Ty::Str,
        "Id of the secret the added key slot opens with",
    ),
    (
        "encrypt.old-secret",
        Ty::Str,
        "Erase every key slot this secret opens",
    ),
    (
        "encrypt.state",
        Ty::Str,
        "active: add a key slot; inactive: erase key slots",
    ),
    (
        "lazy_refcounts",
        Ty::Bool,
        "Defer refcount updates to a repair after a crash (v3 only)",
    ),
    (
        "refcount_bits",
        Ty::Num,
        "Bits per reference count: 1, 2, 4, 8, 16, 32 or 64",
    ),
    SIZE,
];

/// The vpc (VHD) format's create options.
const VPC: &[Opt] = &[
    (
        "force_size",
        Ty::Bool,
        "Keep the size as given instead of rounding it to a disk geometry (cylinders, heads, sectors)",
    ),
    SIZE,
    (
        "subformat",
        Ty::Str,
        "dynamic (the default: blocks allocated as written) or fixed (the whole disk, then a footer)",
    ),
];

/// The vdi (VirtualBox) format's create options.
const VDI: &[Opt] = &[
    SIZE,
    (
        "static",
        Ty::Bool,
        "Allocate every block when the image is made (default off)",
    ),
];

/// The qed (QEMU Enhanced Disk) format's create options.
const QED: &[Opt] = &[
    (
        "backing_file",
        Ty::Str,
        "Image the new one is an overlay on (a relative name is taken from the new image's directory)",
    ),
    (
        "backing_fmt",
        Ty::Str,
        "Format of the backing image (recorded only when raw; others are probed)",
    ),
    (
        "cluster_size",
        Ty::Size,
        "Allocation unit, a power of two from 4 KiB to 64 MiB (default 64 KiB)",
    ),
    SIZE,
    (
        "table_size",
        Ty::Size,
        "L1 and L2 table size in clusters, a power of two from 1 to 16 (default 4)",
    ),
];

/// The parallels format's create options.
const PARALLELS: &[Opt] = &[
    (
        "cluster_size",
        Ty::Size,
        "Allocation unit, rounded up to whole 512-byte sectors (default 1 MiB)",
    ),
    SIZE,
];

/// The vhdx (Hyper-V) format's create options.
const VHDX: &[Opt] = &[
    (
        "block_size",
        Ty::Size,
        "Allocation unit, 1 MiB to 256 MiB, a power of two; 0 picks one from the disk size",
    ),
    (
        "block_state_zero",
        Ty::Bool,
        "Mark new blocks as reading zeroes (default on; keep it on when converting to a dynamic image)",
    ),
    ("log_size", Ty::Size, "Size of the metadata log, at least 1 MiB"),
    ("size", Ty::Size, "Virtual disk size, at most 64 TiB"),
    (
        "subformat",
        Ty::Str,
        "dynamic (the default: blocks allocated as written) or fixed (every block allocated)",
    ),
];

/// The vmdk (VMware) format's create options.
const VMDK: &[Opt] = &[
    (
        "adapter_type",
        Ty::Str,
        "Disk controller the descriptor names: ide (default), lsilogic, buslogic or legacyESX",
    ),
    ("backing_file", Ty::Str, "Parent image of a delta disk"),
    ("backing_fmt", Ty::Str, "Format of the parent image: vmdk only"),
    ("compat6", Ty::Bool, "Virtual hardware version 6"),
    ("hwversion", Ty::Str, "Virtual hardware version the descriptor names"),
    SIZE,
    (
        "subformat",
        Ty::Str,
        "Extent layout: monolithicSparse (default), monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat or streamOptimized",
    ),
    ("toolsversion", Ty::Str, "VMware Tools version the descriptor names"),
    (
        "zeroed_grain",
        Ty::Bool,
        "Record zero writes as zeroed grains instead of writing zeroes (sparse extents)",
    ),
];

/// The luks format's amend options (its key slots).
const LUKS_AMEND: &[Opt] = &[
    (
        "iter-time",
        Ty::Num,
        "Milliseconds of PBKDF2 work to unlock the added key slot",
    ),
    ("keyslot", Ty::Num, "The key slot (0-7) to add or erase"),
    (
        "new-secret",
        Ty::Str,
        "Id of the secret the added key slot opens with",
    ),
    (
        "old-secret",
        Ty::Str,
        "Erase every key slot this secret opens",
    ),
    (
        "state",
        Ty::Str,
        "active: add a key slot; inactive: erase key slots",
    ),
];

/// Whether the `-o` arguments ask for a listing, as qemu-img decides: an item
/// without `=` whose name is `help` or `?` (`help=on` is an ordinary option
/// named help; in `help,,x` the name ends at the first comma, so it asks).
/// The arguments are joined with commas, as qemu-img joins repeated `-o`.
pub fn has_help_option(lists: &[String]) -> bool {
    let joined = lists.join(",");
    let mut rest = joined.as_str();
    while !rest.is_empty() {
        let name_end = rest.find([',', '=']).unwrap_or(rest.len());
        let name = &rest[..name_end];
        if rest[name_end..].starts_with('=') {
            // name=value: the value runs to the first single comma.
            rest = skip_value(&rest[name_end + 1..]);
        } else {
            if name == "help" || name == "?" {
                return true;
            }
            rest = rest[name_end..].strip_prefix(',').unwrap_or("");
        }
    }
    false
}

/// What follows an option value that starts `s`: past the first comma that is
/// not doubled (`,,` is a comma inside the value).
fn skip_value(s: &str) -> &str {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b',' {
            if b.get(i + 1) == Some(&b',') {
                i += 2;
                continue;
            }
            return &s[i + 1..];
        }
        i += 1;
    }
    ""
}

/// A format driver's own create options, by the name `-f`/`-O` gives.
fn format_options(fmt: &str) -> Result<&'static [Opt]> {
    Ok(match fmt {
        "qcow2" => QCOW2,
        "raw" => RAW,
        "luks" => LUKS,
        "vpc" => VPC,
        "vdi" => VDI,
        "vhdx" => VHDX,
        "vmdk" => VMDK,
        "qed" => QED,
        "parallels" => PARALLELS,
        "file" => FILE,
        other => match super::imgname::creation_refusal(other) {
            Some(m) => bail!("{m}"),
            None => bail!("Unknown file format '{other}'"),
        },
    })
}

/// The create options of the protocol that would hold `filename`, found as
/// qemu-img finds it: a device first (by what the name is on disk), then a
/// `protocol:` prefix (a colon before any slash), else a plain file.
fn protocol_options(filename: &str) -> Result<&'static [Opt]> {
    use std::os::unix::fs::FileTypeExt;
    let is_device = std::fs::metadata(filename)
        .map(|m| m.file_type().is_block_device() || m.file_type().is_char_device())
        .unwrap_or(false);
    if is_device || filename.starts_with("/dev/cdrom") {
        return Ok(EXISTING);
    }
    let Some(end) = filename.find([':', '/']) else {
        return Ok(FILE);
    };
    if !filename[end..].starts_with(':') {
        return Ok(FILE);
    }
    let protocol = &filename[..end];
    match protocol {
        "file" => Ok(FILE),
        "host_device" => Ok(EXISTING),
        p if super::nbdname::is_nbd_protocol(p.as_bytes()) => Ok(EXISTING),
        "null-co" | "null-aio" | "blkdebug" | "blkverify" => {
            bail!("Protocol driver '{protocol}' does not support image creation")
        }
        // Refused as create refuses the name.
        _ => match super::imgname::output_path(Path::new(filename)) {
            Err(e) => Err(e),
            Ok(_) => Ok(FILE),
        },
    }
}

/// Lines of `opts` as qemu-img prints them, sorted as it sorts them.
fn lines(opts: &[&[Opt]]) -> String {
    let mut seen: Vec<&str> = Vec::new();
    let mut lines = Vec::new();
    for (name, ty, help) in opts.iter().flat_map(|o| o.iter()) {
        if seen.contains(name) {
            continue;
        }
        seen.push(name);
        lines.push(format!(
            "  {:<22} - {help}\n",
            format!("{name}=<{}>", ty.label())
        ));
    }
    lines.sort();
    lines.concat()
}

/// The listing `create -f fmt -o help [filename]` (and `convert -O fmt -o help
/// ... [target]`) prints, or qemu-img's refusal of the format or the target's
/// protocol.
pub fn create_help(fmt: &str, filename: Option<&str>) -> Result<String> {
    let own = format_options(fmt)?;
    Ok(match filename {
        Some(f) => format!("Supported options:\n{}", lines(&[own, protocol_options(f)?])),
        None => format!(
            "Supported {fmt} options:\n{}\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n",
            lines(&[own])
        ),
    })
}

/// The amend options of the format driver `fmt`, or qemu-img's refusal of a
/// driver without any (or of a driver it does not have).
fn amend_options(fmt: &str) -> Result<&'static [Opt]> {
    Ok(match fmt {
        "qcow2" => QCOW2_AMEND,
        "luks" => LUKS_AMEND,
        "raw" | "file" | "host_device" | "host_cdrom" | "nbd" | "blkdebug" | "blkverify"
        | "null-co" | "null-aio" | "vpc" | "vdi" | "vhdx" | "vmdk" | "qed" | "parallels" => {
            bail!("Format driver '{fmt}' does not support option amendment")
        }
        other => bail!("Unknown file format '{other}'"),
    })
}

/// Whether creating (or measuring) a `fmt` image on a file takes the option
/// `name`: the format's own options and the file protocol's.
pub fn creatable(fmt: &str, name: &str) -> bool {
    let known = |opts: &[Opt]| opts.iter().any(|(n, _, _)| *n == name);
    format_options(fmt).is_ok_and(known) || known(FILE)
}

/// Whether `amend` of a `fmt` image takes the option `name`.
pub fn amendable(fmt: &str, name: &str) -> bool {
    amend_options(fmt).is_ok_and(|opts| opts.iter().any(|(n, _, _)| *n == name))
}

/// The listing `amend -o help` prints for the format driver `fmt`, or
/// qemu-img's refusal of it.
pub fn amend_help(fmt: &str) -> Result<String> {
    let opts = amend_options(fmt)?;
    Ok(format!("Amend options for '{fmt}':\n{}", lines(&[opts])))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asks(lists: &[&str]) -> bool {
        has_help_option(&lists.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn help_is_asked_by_a_flag_item_named_help_or_question_mark() {
        assert!(asks(&["help"]));
        assert!(asks(&["?"]));
        assert!(asks(&["size=1,help"]));
        assert!(asks(&["size=1", "help"]));
        assert!(asks(&["help,,x"]));
        assert!(asks(&["a=b,,help,?"]));
        assert!(!asks(&["help=on"]));
        assert!(!asks(&["?=1"]));
        assert!(!asks(&["x=help"]));
        assert!(!asks(&["a=b,,help"]));
        assert!(!asks(&["nohelp"]));
        assert!(!asks(&[]));
    }

    #[test]
    fn listing_pads_names_to_22_columns_and_sorts_whole_lines() {
        let out = lines(&[&[("zz", Ty::Num, "z"), ("a", Ty::Bool, "a")]]);
        assert_eq!(
            out,
            "  a=<bool (on/off)>      - a\n  zz=<num>               - z\n"
        );
    }

    #[test]
    fn format_entries_win_over_the_protocols_of_the_same_name() {
        let out = create_help("qcow2", Some("x.qcow2")).unwrap();
        assert_eq!(out.matches("  preallocation=").count(), 1);
        assert!(out.contains("metadata"));
    }
}
