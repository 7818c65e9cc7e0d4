//! The values of block node options given by name (an option list, a `json:`
//! name), refused as QEMU's block layer refuses them and at the same point of
//! the open: a node's generic switches and its file's protocol options before
//! the file is opened, the format's own options once it is (so a missing file
//! is said first). Options strata takes without effect (cache sizes, overlap
//! checks, discard modes) are checked all the same: a script relying on QEMU
//! to refuse a typo must see it refused.

use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use strata_format::Format;
use strata_jobs::create::{option_size_error, parse_bool, parse_opt_number, parse_size_u64};

/// Boolean options every node takes, read before its file is opened.
const NODE_BOOLS: [&str; 5] = [
    "auto-read-only",
    "read-only",
    "force-share",
    "cache.no-flush",
    "cache.direct",
];

/// The qcow2 driver's boolean options.
const QCOW2_BOOLS: [&str; 5] = [
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
];

/// The qcow2 driver's size-typed cache options.
const QCOW2_SIZES: [&str; 4] = [
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
];

/// The metadata kinds qcow2's overlap check can be switched on or off for.
const OVERLAP_KINDS: [&str; 9] = [
    "main-header",
    "active-l1",
    "active-l2",
    "refcount-table",
    "refcount-block",
    "snapshot-table",
    "inactive-l1",
    "inactive-l2",
    "bitmap-directory",
];

/// The value of `prefix` + `key` in `opts`.
fn get<'a>(opts: &'a BTreeMap<String, String>, prefix: &str, key: &str) -> Option<&'a str> {
    opts.get(&format!("{prefix}{key}")).map(String::as_str)
}

/// Refuses what QEMU refuses before opening the node whose options are the
/// keys under `prefix` (`""` for the top node, `"file."` for its file): a
/// generic switch that is not on or off, and, on a protocol node
/// (`protocol`), a `locking` or `aio` mode it does not know. Messages name
/// the option without its prefix, as QEMU's do.
pub fn check_node(opts: &BTreeMap<String, String>, prefix: &str, protocol: bool) -> Result<()> {
    for k in NODE_BOOLS {
        if let Some(v) = get(opts, prefix, k) {
            parse_bool(k, v).map_err(|e| anyhow!(e))?;
        }
    }
    if !protocol {
        return Ok(());
    }
    if let Some(v) = get(opts, prefix, "locking") {
        if !matches!(v, "on" | "off" | "auto") {
            bail!("invalid parameter value: {v}");
        }
    }
    if let Some(v) = get(opts, prefix, "aio") {
        if !matches!(v, "threads" | "native" | "io_uring") {
            bail!("invalid parameter value: {v}");
        }
    }
    Ok(())
}

/// Refuses what QEMU refuses once a protocol node's file opened: native AIO
/// without the page cache bypassed, by the node's own `cache.direct` (in
/// `file`) or its parent's (in `parent`, `None` for a top protocol node).
pub fn check_opened_file(
    file: &BTreeMap<String, String>,
    parent: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let direct = file
        .get("cache.direct")
        .or_else(|| parent.and_then(|p| p.get("cache.direct")))
        .is_some_and(|v| parse_bool("cache.direct", v) == Ok(true));
    if file.get("aio").is_some_and(|v| v == "native") && !direct {
        bail!(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
        );
    }
    Ok(())
}

/// Refuses what QEMU refuses once the file of a format node opened: the
/// node's `discard` and `detect-zeroes` modes, then the options of its
/// driver (`format`, `None` when the file could not be probed) that do not
/// parse or do not go together. `opts` are the node's own options (no
/// `file.` keys).
pub fn check_format(opts: &BTreeMap<String, String>, format: Option<Format>) -> Result<()> {
    let discard = opts.get("discard").map(String::as_str);
    if discard.is_some_and(|v| !matches!(v, "ignore" | "off" | "unmap" | "on")) {
        bail!("Invalid discard option");
    }
    if let Some(v) = opts.get("detect-zeroes") {
        if !matches!(v.as_str(), "off" | "on" | "unmap") {
            bail!("invalid parameter value: {v}");
        }
        if v == "unmap" && !matches!(discard, Some("unmap" | "on")) {
            bail!("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap");
        }
    }
    match format {
        Some(Format::Qcow2) => check_qcow2(opts)?,
        Some(Format::Parallels) => check_parallels(opts)?,
        _ => {}
    }
    Ok(())
}

/// The parallels driver's own options: how the file grows.
fn check_parallels(opts: &BTreeMap<String, String>) -> Result<()> {
    if let Some(v) = opts.get("prealloc-mode") {
        if !matches!(v.as_str(), "falloc" | "truncate") {
            bail!("invalid parameter value: {v}");
        }
    }
    if let Some(v) = opts.get("prealloc-size") {
        if parse_size_u64(v).is_none() {
            bail!("{}", option_size_error("prealloc-size", v));
        }
    }
    Ok(())
}

/// The qcow2 driver's own options: switches, cache sizes, the cache's clean
/// interval and the overlap checks.
fn check_qcow2(opts: &BTreeMap<String, String>) -> Result<()> {
    for k in QCOW2_BOOLS {
        if let Some(v) = opts.get(k) {
            parse_bool(k, v).map_err(|e| anyhow!(e))?;
        }
    }
    for k in QCOW2_SIZES {
        if let Some(v) = opts.get(k) {
            if parse_size_u64(v).is_none() {
                bail!("{}", option_size_error(k, v));
            }
        }
    }
    if let Some(v) = opts.get("cache-clean-interval") {
        let secs = parse_opt_number("cache-clean-interval", v).map_err(|e| anyhow!(e))?;
        if secs > u64::from(u32::MAX) {
            bail!("Cache clean interval too big");
        }
    }
    let template = opts
        .get("overlap-check")
        .or_else(|| opts.get("overlap-check.template"));
    if let Some(v) = template {
        if !matches!(v.as_str(), "none" | "constant" | "cached" | "all") {
            bail!("Unsupported value '{v}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all");
        }
    }
    for kind in OVERLAP_KINDS {
        let k = format!("overlap-check.{kind}");
        if let Some(v) = opts.get(&k) {
            parse_bool(&k, v).map_err(|e| anyhow!(e))?;
        }
    }
    if QCOW2_SIZES
        .iter()
        .filter(|k| **k != "l2-cache-entry-size")
        .all(|k| opts.contains_key(*k))
    {
        bail!("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::img::common::option_map as opts;

    #[test]
    fn switches_take_every_spelling_qemu_takes_and_name_the_unprefixed_key() {
        for v in ["on", "off", "yes", "no", "true", "false", "y", "n"] {
            check_node(
                &opts(&[("read-only", v), ("file.read-only", v)]),
                "file.",
                true,
            )
            .unwrap();
        }
        let e = check_node(&opts(&[("file.read-only", "maybe")]), "file.", true).unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'read-only' expects 'on' or 'off'");
        let e = check_node(&opts(&[("file.locking", "maybe")]), "file.", true).unwrap_err();
        assert_eq!(e.to_string(), "invalid parameter value: maybe");
    }

    #[test]
    fn protocol_modes_are_checked_on_protocol_nodes_only() {
        check_node(&opts(&[("locking", "maybe")]), "", false).unwrap();
        check_node(&opts(&[("aio", "native")]), "", true).unwrap();
        let native = opts(&[("aio", "native")]);
        let e = check_opened_file(&native, None).unwrap_err();
        assert!(e.to_string().starts_with("aio=native was specified"));
        check_opened_file(&native, Some(&opts(&[("cache.direct", "on")]))).unwrap();
    }

    #[test]
    fn qcow2_options_are_refused_in_qemus_words() {
        let cases = [
            (
                "lazy-refcounts",
                "maybe",
                "Parameter 'lazy-refcounts' expects 'on' or 'off'",
            ),
            (
                "cache-size",
                "-1",
                "Value '-1' is out of range for parameter 'cache-size'",
            ),
            (
                "cache-clean-interval",
                "x",
                "Parameter 'cache-clean-interval' expects a number",
            ),
            ("cache-clean-interval", "-1", "Cache clean interval too big"),
            ("discard", "maybe", "Invalid discard option"),
            ("detect-zeroes", "maybe", "invalid parameter value: maybe"),
        ];
        for (k, v, want) in cases {
            let e = check_format(&opts(&[(k, v)]), Some(Format::Qcow2)).unwrap_err();
            assert_eq!(e.to_string(), want, "{k}={v}");
        }
        check_format(
            &opts(&[("cache-size", "1k"), ("cache-clean-interval", "0x10")]),
            Some(Format::Qcow2),
        )
        .unwrap();
        // Not the qcow2 driver's: raw takes none of them (its unknown-option
        // refusal says so later).
        check_format(&opts(&[("lazy-refcounts", "maybe")]), Some(Format::Raw)).unwrap();
    }
}
