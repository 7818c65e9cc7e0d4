//! `strata img info`: an image's format, sizes, backing file, snapshots and format
//! details, as qemu-img prints them (text, or `--output=json`).

use super::common::{human_size, open_chain, open_spec, Ctx, OutputFormat};
use super::{qjson, snapshot};
use anyhow::{bail, Result};
use serde_json::Value;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use strata_jobs::info::{chain_info, layer_info, ImageInfo};

#[derive(clap::Args)]
pub struct Args {
    /// `--object` definitions and `--image-opts`.
    #[command(flatten)]
    naming: super::imgname::Naming,
    /// Image format (probed from the top image when omitted; backing files never are).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Output format.
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human, value_name = "OFMT")]
    output: OutputFormat,
    /// Show every image of the backing chain, top first.
    #[arg(short = 'b', long = "backing-chain")]
    backing_chain: bool,
    /// Open without locks, to inspect an image in use.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    #[arg(value_parser = super::common::any_file_name())]
    filename: PathBuf,
}

pub fn run(args: Args, _ctx: &Ctx) -> Result<i32> {
    let spec = args
        .naming
        .metadata_spec(&args.filename, args.format.as_deref(), args.force_share)?
        .open_backing(args.backing_chain)
        // As qemu-img: an encrypted image shows its header without its secret.
        .metadata_only(true);
    // qemu-img's info opens no backing file through the options.
    if let Some(f) = spec.format.or_else(|| strata_chain::probe_spec(&spec).ok()) {
        super::imgname::refuse_backing_options(&spec, f)?;
    }
    let chain = match strata_chain::open(&spec) {
        Ok(c) => c,
        Err(strata_chain::Error::Loop { .. }) if args.backing_chain => {
            if let Some(again) = repeated_name(&args, 1024)? {
                bail!(
                    "Backing file '{}' creates an infinite loop.",
                    again.display()
                );
            }
            open_chain(&spec)?
        }
        // qemu-img opens each image of the chain on its own: a backing file that
        // fails is reported as itself failing to open.
        Err(e) if args.backing_chain && e.failed_backing().is_some() => {
            let (path, inner) = e.failed_backing().expect("checked");
            return Err(super::common::open_error(
                path,
                &path.display().to_string(),
                inner,
            ));
        }
        Err(_) => open_chain(&spec)?,
    };
    let name = spec.path.as_os_str();
    let mut infos = if args.backing_chain {
        chain_info(&chain, name)?
    } else {
        vec![layer_info(&chain.layers[0], name)?]
    };
    if let Some(json) = super::imgname::json_name(&spec, chain.layers[0].format) {
        infos[0].filename = json.into();
    }
    // Layers on NBD exports: the top named as one, or backing files named by
    // NBD URLs.
    let remote: Vec<bool> = chain
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| (i == 0 && spec.storage.is_some()) || strata_chain::is_protocol_name(&l.path))
        .collect();
    infos = infos
        .into_iter()
        .zip(&remote)
        .map(|(i, &r)| if r { super::nbdname::info_view(i) } else { i })
        .collect();
    if spec.blkdebug.is_some() {
        let top = infos.remove(0);
        infos.insert(0, super::blkdebug::info_view(top, &spec)?);
    } else if let Some(driver) = &spec.protocol_driver {
        infos = infos
            .into_iter()
            .map(|i| protocol_view(i, driver))
            .collect();
    }
    match args.output {
        OutputFormat::Json => {
            let mut v = if args.backing_chain {
                serde_json::to_value(&infos)?
            } else {
                serde_json::to_value(&infos[0])?
            };
            match v.as_array_mut() {
                Some(list) => list
                    .iter_mut()
                    .zip(&remote)
                    .filter(|(_, &r)| r)
                    .for_each(|(v, _)| super::nbdname::json_view(v)),
                None if remote[0] => super::nbdname::json_view(&mut v),
                None => {}
            }
            // QEMU's host_cdrom node reports neither a dirty flag nor
            // protocol-specific data.
            if spec.protocol_driver.as_deref() == Some("host_cdrom") {
                let nodes = match &mut v {
                    serde_json::Value::Array(a) => a.iter_mut().collect(),
                    one => vec![one],
                };
                for n in nodes.into_iter().filter_map(|n| n.as_object_mut()) {
                    n.shift_remove("format-specific");
                    n.shift_remove("dirty-flag");
                }
            }
            // QEMU's parallels driver has no driver information, where the
            // dirty flag comes from.
            let nodes: Vec<&mut serde_json::Value> = match &mut v {
                serde_json::Value::Array(a) => a.iter_mut().collect(),
                one => vec![one],
            };
            for n in nodes.into_iter().filter_map(|n| n.as_object_mut()) {
                if n.get("format").and_then(|f| f.as_str()) == Some("parallels") {
                    n.shift_remove("dirty-flag");
                }
            }
            println!("{}", qjson::to_string(&v));
        }
        OutputFormat::Human => {
            // File names are printed as the bytes they are (they need not be UTF-8).
            let texts: Vec<Vec<u8>> = infos.iter().map(|i| dump(i, 0, false)).collect();
            std::io::stdout().write_all(&texts.join(&b'\n'))?;
        }
    }
    Ok(0)
}

/// An image opened by a protocol driver alone (`-f file`): the file node is the
/// image, reported under the driver's name.
fn protocol_view(info: ImageInfo, driver: &str) -> ImageInfo {
    match info.children.into_iter().next() {
        Some(child) => ImageInfo {
            filename: info.filename,
            format: driver.to_string(),
            ..child.info
        },
        None => ImageInfo {
            children: Vec::new(),
            ..info
        },
    }
}

/// The name under which qemu-img meets an image of the chain a second time: it
/// opens each image alone and follows the backing names, each resolved against
/// the name it reached the image by, until one repeats (as a string). `None`
/// when no name repeats within `limit` images.
fn repeated_name(args: &Args, limit: usize) -> Result<Option<PathBuf>> {
    let mut seen = std::collections::HashSet::new();
    let mut path = args.filename.clone();
    let mut format = args.format.clone();
    for _ in 0..limit {
        if !seen.insert(path.clone()) {
            return Ok(Some(path));
        }
        let spec = open_spec(&path, format.as_deref(), args.force_share)?.open_backing(false);
        let chain = open_chain(&spec)?;
        let top = &chain.layers[0];
        let Some(next) = top.backing_path.clone() else {
            return Ok(None);
        };
        format = top.backing_format.clone();
        path = next;
    }
    Ok(None)
}

/// qemu-img's text dump of one node (and its children, indented), as bytes: file
/// names are printed as they are.
pub fn dump(info: &ImageInfo, level: usize, protocol: bool) -> Vec<u8> {
    dump_node(info, level, protocol, "")
}

/// [`dump`] of a node whose children are named below `path` (`/file`, then
/// `/file/image`); a child with children of its own is shown as an image, a
/// leaf as a protocol node.
fn dump_node(info: &ImageInfo, level: usize, protocol: bool, path: &str) -> Vec<u8> {
    let pad = "    ".repeat(level);
    let mut s = Vec::new();
    let name = |n: &std::ffi::OsStr| n.as_bytes().to_vec();
    let disk = info
        .actual_size
        .map(human_size)
        .unwrap_or_else(|| "unavailable".into());
    if protocol {
        let _ = write!(s, "{pad}filename: ");
        s.extend(name(&info.filename));
        s.push(b'\n');
        let _ = writeln!(s, "{pad}protocol type: {}", info.format);
        let _ = writeln!(
            s,
            "{pad}file length: {} ({} bytes)",
            human_size(info.virtual_size),
            info.virtual_size
        );
    } else {
        let _ = write!(s, "{pad}image: ");
        s.extend(name(&info.filename));
        s.push(b'\n');
        let _ = writeln!(s, "{pad}file format: {}", info.format);
        let _ = writeln!(
            s,
            "{pad}virtual size: {} ({} bytes)",
            human_size(info.virtual_size),
            info.virtual_size
        );
    }
    let _ = writeln!(s, "{pad}disk size: {disk}");
    if info.encrypted == Some(true) {
        let _ = writeln!(s, "{pad}encrypted: yes");
    }
    if let Some(cs) = info.cluster_size {
        let _ = writeln!(s, "{pad}cluster_size: {cs}");
    }
    if info.dirty_flag {
        let _ = writeln!(s, "{pad}cleanly shut down: no");
    }
    if let Some(b) = &info.backing_filename {
        let _ = write!(s, "{pad}backing file: ");
        s.extend(name(b));
        match &info.full_backing_filename {
            None => s.extend_from_slice(b" (cannot determine actual path)"),
            Some(full) if full != b => {
                s.extend_from_slice(b" (actual path: ");
                s.extend(name(full));
                s.push(b')');
            }
            Some(_) => {}
        }
        s.push(b'\n');
    }
    if let Some(f) = &info.backing_filename_format {
        let _ = writeln!(s, "{pad}backing file format: {f}");
    }
    if !info.snapshots.is_empty() {
        s.extend_from_slice(snapshot::format_info_list(&info.snapshots).as_bytes());
    }
    if let Some(fs) = &info.format_specific {
        let v = serde_json::to_value(fs).unwrap_or(Value::Null);
        if let Some(Value::Object(data)) = v.get("data") {
            if !data.is_empty() {
                let _ = writeln!(s, "{pad}Format specific information:");
                dump_dict(&mut s, data, level + 1);
            }
        }
    }
    for child in &info.children {
        let child_path = format!("{path}/{}", child.name);
        let _ = writeln!(s, "{pad}Child node '{child_path}':");
        let leaf = child.info.children.is_empty();
        s.extend(dump_node(&child.info, level + 1, leaf, &child_path));
    }
    s
}

/// QEMU's text dump of a dictionary: `key: value`, dashes shown as spaces, nested
/// containers on their own lines, keys in QEMU's order.
fn dump_dict(s: &mut Vec<u8>, m: &serde_json::Map<String, Value>, level: usize) {
    for k in qjson::key_order(m) {
        let key = k.replace('-', " ");
        dump_entry(s, &key, &m[k], level);
    }
}

fn dump_entry(s: &mut Vec<u8>, key: &str, v: &Value, level: usize) {
    let pad = "    ".repeat(level);
    match v {
        Value::Object(m) => {
            let _ = writeln!(s, "{pad}{key}:");
            dump_dict(s, m, level + 1);
        }
        Value::Array(a) => {
            let _ = writeln!(s, "{pad}{key}:");
            for (i, item) in a.iter().enumerate() {
                dump_entry(s, &format!("[{i}]"), item, level + 1);
            }
        }
        Value::String(t) => {
            let _ = writeln!(s, "{pad}{key}: {t}");
        }
        other => {
            let _ = writeln!(s, "{pad}{key}: {other}");
        }
    }
}
