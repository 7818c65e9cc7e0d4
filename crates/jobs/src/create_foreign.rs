//! `create -f vpc|vdi|vhdx|vmdk|qed`: the `-o` options of the formats of other
//! tools ([`Format::is_foreign`]), checked, shown in the "Formatting ..." line
//! and turned into each driver's [`CreateOptions`](strata_format::vpc::CreateOptions)
//! as qemu-img does.
//!
//! qemu-img takes the file protocol's options (`nocow`, `preallocation`,
//! `extent_size_hint`) after the format's own: they are listed and shown,
//! and the formats' drivers write their files without preallocating them.

use crate::create::{option_size_error, parse_bool, parse_size};
use std::collections::BTreeMap;
use strata_format::{parallels, qed, vdi, vhdx, vmdk, vpc, Format};

/// How a `-o` value is typed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ty {
    Size,
    Bool,
    Str,
}

/// One `-o` option: its key, type, and the default the summary line shows
/// when it is not given.
type Key = (&'static str, Ty, Option<&'static str>);

const VPC: &[Key] = &[
    ("size", Ty::Size, None),
    ("subformat", Ty::Str, None),
    ("force_size", Ty::Bool, None),
];
const VDI: &[Key] = &[("size", Ty::Size, None), ("static", Ty::Bool, Some("off"))];
const VHDX: &[Key] = &[
    ("size", Ty::Size, None),
    ("log_size", Ty::Size, Some("1048576")),
    ("block_size", Ty::Size, Some("0")),
    ("subformat", Ty::Str, None),
    ("block_state_zero", Ty::Bool, None),
];
const VMDK: &[Key] = &[
    ("size", Ty::Size, None),
    ("adapter_type", Ty::Str, None),
    ("backing_file", Ty::Str, None),
    ("backing_fmt", Ty::Str, None),
    ("compat6", Ty::Bool, Some("off")),
    ("hwversion", Ty::Str, Some("undefined")),
    ("toolsversion", Ty::Str, None),
    ("subformat", Ty::Str, None),
    ("zeroed_grain", Ty::Bool, None),
];
const QED: &[Key] = &[
    ("size", Ty::Size, None),
    ("backing_file", Ty::Str, None),
    ("backing_fmt", Ty::Str, None),
    ("cluster_size", Ty::Size, Some("65536")),
    ("table_size", Ty::Size, None),
];
const PARALLELS: &[Key] = &[
    ("size", Ty::Size, None),
    ("cluster_size", Ty::Size, Some("1048576")),
];
/// The file protocol's options, after the format's.
const FILE: &[Key] = &[
    ("nocow", Ty::Bool, None),
    ("preallocation", Ty::Str, None),
    ("extent_size_hint", Ty::Size, None),
];

fn keys(format: Format) -> &'static [Key] {
    match format {
        Format::Vpc => VPC,
        Format::Vdi => VDI,
        Format::Vhdx => VHDX,
        Format::Qed => QED,
        Format::Parallels => PARALLELS,
        _ => VMDK,
    }
}

/// Check the keys and typed values of `opts` (unknown keys, bad booleans and
/// sizes) as qemu-img does before its summary line; the message is qemu-img's.
pub fn check(format: Format, opts: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in opts {
        let Some(&(_, ty, _)) = keys(format).iter().chain(FILE).find(|e| e.0 == k) else {
            return Err(format!("Invalid parameter '{k}'"));
        };
        match ty {
            Ty::Bool => {
                parse_bool(k, v)?;
            }
            Ty::Size => {
                parse_size(v).ok_or_else(|| option_size_error(k, v))?;
            }
            Ty::Str => {}
        }
    }
    Ok(())
}

/// The summary line's options after `fmt=FORMAT `: `size=N`, then each option
/// given (or with a default to show) in the driver's order, then the file
/// protocol's; sizes as numbers, other values as typed.
pub fn summary(format: Format, size: u64, opts: &BTreeMap<String, String>) -> String {
    let mut parts = vec![format!("size={size}")];
    for &(k, ty, default) in keys(format).iter().chain(FILE).skip(1) {
        let shown = match (opts.get(k), ty) {
            (Some(v), Ty::Size) => parse_size(v).map(|n| n.to_string()),
            (Some(v), _) => Some(v.clone()),
            (None, _) => default.map(str::to_string),
        };
        if let Some(v) = shown {
            parts.push(format!("{k}={v}"));
        }
    }
    parts.join(" ")
}

/// A boolean option already checked by [`check`].
fn flag(opts: &BTreeMap<String, String>, k: &str, default: bool) -> bool {
    opts.get(k)
        .and_then(|v| parse_bool(k, v).ok())
        .unwrap_or(default)
}

/// A size option already checked by [`check`].
fn size_of(opts: &BTreeMap<String, String>, k: &str, default: u64) -> u64 {
    opts.get(k).and_then(|v| parse_size(v)).unwrap_or(default)
}

/// `subformat=` of vpc and vhdx: `dynamic` (the default) or `fixed`.
fn fixed(opts: &BTreeMap<String, String>) -> Result<bool, String> {
    match opts.get("subformat").map(String::as_str) {
        None | Some("dynamic") => Ok(false),
        Some("fixed") => Ok(true),
        Some(v) => Err(format!("Parameter 'subformat' does not accept value '{v}'")),
    }
}

/// A driver's typed create options.
#[derive(Debug, Clone)]
pub enum Options {
    Vpc(vpc::CreateOptions),
    Vdi(vdi::CreateOptions),
    Vhdx(vhdx::CreateOptions),
    Vmdk(vmdk::CreateOptions),
    Qed(qed::CreateOptions),
    Parallels(parallels::CreateOptions),
}

/// The typed options of `opts` (checked by [`check`]), refusing the values
/// the driver refuses before it writes anything, in qemu-img's words.
pub fn options(format: Format, opts: &BTreeMap<String, String>) -> Result<Options, String> {
    Ok(match format {
        Format::Vpc => Options::Vpc(vpc::CreateOptions {
            fixed: fixed(opts)?,
            force_size: flag(opts, "force_size", false),
        }),
        Format::Vdi => Options::Vdi(vdi::CreateOptions {
            static_image: flag(opts, "static", false),
        }),
        Format::Vhdx => {
            let d = vhdx::CreateOptions::default();
            Options::Vhdx(vhdx::CreateOptions {
                log_size: size_of(opts, "log_size", d.log_size),
                block_size: size_of(opts, "block_size", d.block_size),
                fixed: fixed(opts)?,
                block_state_zero: flag(opts, "block_state_zero", d.block_state_zero),
            })
        }
        Format::Qed => {
            let d = qed::CreateOptions::default();
            Options::Qed(qed::CreateOptions {
                cluster_size: size_of(opts, "cluster_size", d.cluster_size),
                table_size: size_of(opts, "table_size", d.table_size),
                backing_file: opts.get("backing_file").map(|b| b.as_bytes().to_vec()),
                backing_fmt: opts.get("backing_fmt").cloned(),
            })
        }
        Format::Parallels => Options::Parallels(parallels::CreateOptions {
            cluster_size: size_of(
                opts,
                "cluster_size",
                parallels::CreateOptions::default().cluster_size,
            ),
        }),
        _ => {
            // QEMU's vmdk takes only a vmdk parent, and says so first.
            if opts.get("backing_fmt").is_some_and(|f| f != "vmdk") {
                return Err("backing_file must be a vmdk image".into());
            }
            let d = vmdk::CreateOptions::default();
            Options::Vmdk(vmdk::CreateOptions {
                subformat: opts.get("subformat").cloned().unwrap_or(d.subformat),
                adapter_type: opts.get("adapter_type").cloned().unwrap_or(d.adapter_type),
                compat6: flag(opts, "compat6", false),
                hwversion: opts
                    .get("hwversion")
                    .filter(|v| v.as_str() != "undefined")
                    .cloned(),
                toolsversion: opts.get("toolsversion").cloned(),
                zeroed_grain: flag(opts, "zeroed_grain", false),
                backing_file: opts.get("backing_file").cloned(),
            })
        }
    })
}

/// Write the new image with its driver (see each driver's `create`).
pub fn create(
    storage: std::sync::Arc<dyn strata_storage::Storage>,
    path: &std::path::Path,
    size: u64,
    opts: &Options,
) -> strata_format::Result<()> {
    let path = Some(path);
    match opts {
        Options::Vpc(o) => vpc::create(storage, path, size, o),
        Options::Vdi(o) => vdi::create(storage, path, size, o),
        Options::Vhdx(o) => vhdx::create(storage, path, size, o),
        Options::Vmdk(o) => vmdk::create(storage, path, size, o),
        Options::Qed(o) => qed::create(storage, path, size, o),
        Options::Parallels(o) => parallels::create(storage, path, size, o),
    }
}
