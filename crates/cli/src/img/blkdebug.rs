//! QEMU's blkdebug driver named on qemu-img's command line: the
//! `blkdebug:CONFIG:FILE` file name (an empty CONFIG for no config file) and
//! the option form (`driver=blkdebug,config=PATH,image.filename=FILE`, inline
//! `inject-error.*`/`set-state.*` rules, `align` and QEMU's other limits),
//! turned into what the filter is over (a file, or a format node whose guest
//! data it passes on) and its [`BlkdebugConfig`]. Mistakes get QEMU's messages.

use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use strata_chain::OpenSpec;
use strata_jobs::info::{ChildInfo, ImageInfo};
use strata_storage::BlkdebugConfig;

/// The blkdebug driver's own options (a key, or a prefix ending in '.').
const OPTIONS: [&str; 12] = [
    "config",
    "x-image",
    "align",
    "max-transfer",
    "opt-write-zero",
    "max-write-zero",
    "opt-discard",
    "max-discard",
    "inject-error.",
    "set-state.",
    "take-child-perms.",
    "unshare-child-perms.",
];

/// The file and rules of `blkdebug:CONFIG:FILE` (`rest` follows the prefix).
pub fn from_filename(rest: &str) -> Result<(PathBuf, BlkdebugConfig)> {
    let Some((config, image)) = rest.split_once(':') else {
        bail!("blkdebug requires both config file and image path");
    };
    let config = (!config.is_empty()).then_some(config);
    let rules = BlkdebugConfig::new(config, Vec::new())?;
    Ok((PathBuf::from(image), rules))
}

/// What a blkdebug node filters: a file, or a format node (an image opened
/// by a format driver, whose guest data the filter passes on), as its options
/// (`driver`, `file.filename`...) or its spec.
#[derive(Debug)]
pub enum Under<N> {
    File(PathBuf),
    Node(N),
}

/// The format drivers strata opens under a filter.
const FORMAT_DRIVERS: [&str; 3] = ["qcow2", "raw", "luks"];

/// What a blkdebug node filters and its rules, from the node's options
/// (`known` tells the generic node options every driver takes).
pub fn from_options(
    mut opts: BTreeMap<String, String>,
    known: impl Fn(&str) -> bool,
) -> Result<(Under<BTreeMap<String, String>>, BlkdebugConfig)> {
    if let Some(k) = opts
        .keys()
        .find(|k| !own(k) && !known(k) && !k.starts_with("image."))
    {
        bail!("Block protocol 'blkdebug' doesn't support the option '{k}'");
    }
    let image = take_prefixed(&mut opts, "image.");
    let under = match image.get("driver").map(String::as_str) {
        Some(d) if FORMAT_DRIVERS.contains(&d) => Under::Node(image),
        Some(d) if !["file", "host_device"].contains(&d) => bail!("Unknown protocol '{d}'"),
        _ => match (image.get("filename"), opts.get("x-image")) {
            (Some(f), _) | (None, Some(f)) => Under::File(PathBuf::from(f)),
            (None, None) => bail!("A block device must be specified for \"image\""),
        },
    };
    let inline = rule_groups(&mut opts, "inject-error")
        .into_iter()
        .chain(rule_groups(&mut opts, "set-state"))
        .collect();
    let config = BlkdebugConfig::new(opts.get("config").map(String::as_str), inline)?;
    check_limits(&opts)?;
    Ok((under, config))
}

fn own(key: &str) -> bool {
    OPTIONS.iter().any(|k| match k.strip_suffix('.') {
        Some(prefix) => key.strip_prefix(prefix).is_some_and(|r| r.starts_with('.')),
        None => key == *k,
    })
}

/// The options below `prefix`, with it taken off (removed from `opts`).
fn take_prefixed(opts: &mut BTreeMap<String, String>, prefix: &str) -> BTreeMap<String, String> {
    let keys: Vec<String> = opts
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    keys.into_iter()
        .filter_map(|k| Some((k[prefix.len()..].to_string(), opts.remove(&k)?)))
        .collect()
}

/// The inline rules of one group: `group.KEY=V` is one rule, `group.N.KEY=V`
/// one rule per index N (in index order).
fn rule_groups(
    opts: &mut BTreeMap<String, String>,
    group: &str,
) -> Vec<(String, Vec<(String, String)>)> {
    let sub = take_prefixed(opts, &format!("{group}."));
    if sub.is_empty() {
        return Vec::new();
    }
    let mut indexed: BTreeMap<u64, Vec<(String, String)>> = BTreeMap::new();
    let mut plain = Vec::new();
    for (k, v) in sub {
        match k
            .split_once('.')
            .and_then(|(i, rest)| Some((i.parse().ok()?, rest)))
        {
            Some((i, rest)) => indexed.entry(i).or_default().push((rest.to_string(), v)),
            None => plain.push((k, v)),
        }
    }
    let mut groups: Vec<_> = indexed
        .into_values()
        .map(|o| (group.to_string(), o))
        .collect();
    if !plain.is_empty() {
        groups.push((group.to_string(), plain));
    }
    groups
}

/// QEMU's checks of `align` and the request limits: sizes, `align` a power of
/// two, the others multiples of the alignment (512 when none is given).
fn check_limits(opts: &BTreeMap<String, String>) -> Result<()> {
    const INT_MAX: u64 = i32::MAX as u64;
    let size = |k: &str| -> Result<u64> {
        match opts.get(k) {
            None => Ok(0),
            Some(v) => super::common::option_size(k, v),
        }
    };
    let align = size("align")?;
    if align != 0 && (align >= INT_MAX || !align.is_power_of_two()) {
        bail!("Cannot meet constraints with align {align}");
    }
    let align = align.max(512);
    let aligned = |k: &str, base: u64| -> Result<u64> {
        let v = size(k)?;
        if v != 0 && (v >= INT_MAX || v % base != 0) {
            return Err(anyhow!("Cannot meet constraints with {k} {v}"));
        }
        Ok(v)
    };
    aligned("max-transfer", align)?;
    let owz = aligned("opt-write-zero", align)?;
    aligned("max-write-zero", owz.max(align))?;
    let od = aligned("opt-discard", align)?;
    aligned("max-discard", od.max(align))?;
    Ok(())
}

/// The name QEMU gives a blkdebug node (and the format node above it) in
/// reports: `blkdebug:CONFIG:FILE`, CONFIG empty without a config file.
pub fn node_name(spec: &OpenSpec) -> Option<String> {
    let config = spec.blkdebug.as_ref()?;
    Some(format!(
        "blkdebug:{}:{}",
        config.config_file.as_deref().unwrap_or(""),
        spec.path.display()
    ))
}

/// `info`'s report of an image behind a blkdebug filter, as QEMU's: the
/// filter is a node of its own (no disk size) between the format (or the top,
/// when the filter is the image) and the file, which is its child `image`.
pub fn info_view(mut info: ImageInfo, spec: &OpenSpec) -> Result<ImageInfo> {
    let Some(name) = node_name(spec) else {
        return Ok(info);
    };
    if let Some(inner) = &spec.filtered {
        return node_view(info, spec, inner, name);
    }
    let Some(file) = info.children.pop() else {
        return Ok(info);
    };
    let mut image = file.info;
    image.filename = spec.path.clone().into_os_string();
    image.actual_size = std::fs::metadata(&spec.path)
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
    let filter = ImageInfo {
        filename: name.clone().into(),
        format: "blkdebug".into(),
        actual_size: None,
        format_specific: None,
        children: vec![ChildInfo {
            name: "image".into(),
            info: image.clone(),
        }],
        ..image
    };
    Ok(above_filter(info, filter, spec, name))
}

/// The report of the top above the blkdebug node `filter`: the filter itself
/// when it is the top, else the top (named as the filter) with it as its file.
fn above_filter(
    mut info: ImageInfo,
    filter: ImageInfo,
    spec: &OpenSpec,
    name: String,
) -> ImageInfo {
    if spec.protocol_driver.is_some() {
        return filter;
    }
    info.filename = name.into();
    info.children = vec![ChildInfo {
        name: "file".into(),
        info: filter,
    }];
    info
}

/// [`info_view`] of a filter over the format node `inner`: the filter (no
/// disk size; the node's size and cluster size) has the node's own report as
/// its child `image`, and the top above it takes the cluster size too (QEMU's
/// filters and raw pass the question down).
fn node_view(
    mut info: ImageInfo,
    spec: &OpenSpec,
    inner: &OpenSpec,
    name: String,
) -> Result<ImageInfo> {
    let mut inner = inner.clone();
    inner.force_share |= spec.force_share;
    inner.metadata_only = true;
    let chain = strata_chain::open(&inner)?;
    // Each image of the node's chain has the one below as its child `backing`.
    let mut image: Option<ImageInfo> = None;
    for layer in chain.layers.iter().rev() {
        let mut info = strata_jobs::info::layer_info(layer, layer.path.as_os_str())?;
        if let Some(below) = image.take() {
            info.children.insert(
                0,
                ChildInfo {
                    name: "backing".into(),
                    info: below,
                },
            );
        }
        image = Some(info);
    }
    let image = image.expect("a chain has a top");
    let filter = ImageInfo {
        filename: name.clone().into(),
        format: "blkdebug".into(),
        dirty_flag: false,
        actual_size: None,
        virtual_size: image.virtual_size,
        cluster_size: image.cluster_size,
        encrypted: None,
        backing_filename: None,
        full_backing_filename: None,
        backing_filename_format: None,
        snapshots: Vec::new(),
        format_specific: None,
        children: vec![ChildInfo {
            name: "image".into(),
            info: image,
        }],
    };
    info.actual_size = None;
    info.cluster_size = filter.cluster_size;
    Ok(above_filter(info, filter, spec, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::img::common::option_map as opts;

    #[test]
    fn the_filename_form_needs_both_parts_and_may_leave_out_the_config() {
        let (path, config) = from_filename(":a.qcow2").unwrap();
        assert_eq!(path, PathBuf::from("a.qcow2"));
        assert_eq!(config.config_file, None);
        assert_eq!(
            from_filename("a.qcow2").unwrap_err().to_string(),
            "blkdebug requires both config file and image path"
        );
    }

    #[test]
    fn option_mistakes_get_qemu_messages() {
        let err = |o: &[(&str, &str)]| from_options(opts(o), |_| false).unwrap_err().to_string();
        assert_eq!(
            err(&[("image.filename", "a"), ("foo", "1")]),
            "Block protocol 'blkdebug' doesn't support the option 'foo'"
        );
        assert_eq!(err(&[]), "A block device must be specified for \"image\"");
        assert_eq!(
            err(&[("image.filename", "a"), ("align", "3")]),
            "Cannot meet constraints with align 3"
        );
        assert_eq!(
            err(&[("image.filename", "a"), ("inject-error.0.event", "x")]),
            "invalid parameter value: x"
        );
        let (_, c) = from_options(
            opts(&[
                ("image.filename", "a"),
                ("inject-error.event", "l2_load"),
                ("set-state.1.event", "l1_update"),
                ("align", "4096"),
            ]),
            |_| false,
        )
        .unwrap();
        assert_eq!(c.config_file, None);
    }
}
