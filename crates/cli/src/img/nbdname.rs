//! NBD exports as image names, the ways qemu-img takes them: the URLs
//! `nbd://HOST[:PORT]/EXPORT`, `nbd+tcp://...` and
//! `nbd+unix:///EXPORT?socket=PATH`; the legacy `nbd:HOST:PORT[:exportname=E]`
//! and `nbd:unix:PATH[:exportname=E]`; and option lists (`--image-opts`,
//! `json:`) with `driver=nbd` (or `file.driver=nbd` below a format) and
//! `server.type=inet|unix`, `server.host`, `server.port`, `server.path`,
//! `export`, `tls-creds`, `x-dirty-bitmap`. The export is connected to here and
//! handed to the engine as the top image's storage, named by the canonical URL
//! qemu-img reports it under.

use super::objects::Objects;
use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use std::sync::Arc;
use strata_chain::{OpenSpec, ProtocolRefusal, TopStorage};
use strata_format::Format;
use strata_nbd::client::Client;
use strata_nbd::storage::NbdStorage;
use strata_nbd::url::{Address, NbdUrl};

/// The URL schemes (and the legacy prefix) that name an NBD export.
const NBD_PROTOCOLS: [&str; 3] = ["nbd", "nbd+tcp", "nbd+unix"];

/// Whether `protocol` (a file name's prefix before its first colon) names an
/// NBD export.
pub fn is_nbd_protocol(protocol: &[u8]) -> bool {
    NBD_PROTOCOLS.iter().any(|p| p.as_bytes() == protocol)
}

/// What the name says to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    url: NbdUrl,
    /// The `tls-creds` object the connection is secured with.
    tls_creds: Option<String>,
    /// The name the server's certificate must be valid for (`tls-hostname`),
    /// when not the server's host.
    tls_hostname: Option<String>,
    /// The metadata context block status is read from instead of
    /// `base:allocation` (`x-dirty-bitmap`).
    context: Option<String>,
    /// The TCP port as named when that is not the number it resolved to (a
    /// service name such as `nbd`, a number past 65535): QEMU names the
    /// server with it.
    port_name: Option<String>,
}

impl Target {
    /// The name qemu-img reports the export under.
    fn canonical(&self) -> String {
        if let (Address::Tcp { host, .. }, Some(port)) = (&self.url.address, &self.port_name) {
            return match self.url.export.as_str() {
                "" => format!("nbd://{host}:{port}"),
                export => format!("nbd://{host}:{port}/{export}"),
            };
        }
        match &self.url.address {
            Address::Unix(path) if self.url.export.is_empty() => {
                format!("nbd+unix://?socket={}", path.display())
            }
            Address::Unix(path) => {
                format!("nbd+unix:///{}?socket={}", self.url.export, path.display())
            }
            Address::Tcp { host, port } if self.url.export.is_empty() => {
                format!("nbd://{host}:{port}")
            }
            Address::Tcp { host, port } => format!("nbd://{host}:{port}/{}", self.url.export),
        }
    }
}

/// An export opened for the engine: the spec naming it, and its storage.
pub struct Opened {
    pub spec: OpenSpec,
    pub storage: Arc<NbdStorage>,
}

/// The spec for the image argument `typed`, which names an NBD export (see
/// [`names_export`]): `flat` is its option list when given as one (`-f` already
/// applied to the driver), `format` is `-f` for a file name. Connects to the
/// server; every failure is worded as qemu-img words it, naming the image as typed.
pub fn open(
    typed: &str,
    flat: Option<&BTreeMap<String, String>>,
    format: Option<&str>,
    objects: &Objects,
) -> Result<Opened> {
    let (target, format, protocol_top) = match flat {
        Some(flat) => match from_options(flat) {
            None => bail!("Could not open '{typed}': no NBD export named"),
            Some(r) => r.map_err(|e| anyhow!("Could not open '{typed}': {e}"))?,
        },
        None => {
            let target = parse_name(typed).map_err(|e| anyhow!("Could not open '{typed}': {e}"))?;
            match format {
                Some("nbd") => (target, None, true),
                Some(f) => (target, Some(parse_format(f)?), false),
                None => (target, None, false),
            }
        }
    };
    let storage =
        Arc::new(connect(&target, objects).map_err(|e| anyhow!("Could not open '{typed}': {e}"))?);
    let mut spec = OpenSpec::new(target.canonical()).format(format);
    if protocol_top {
        spec = spec.format(Some(Format::Raw));
        spec.protocol_driver = Some("nbd".into());
    }
    spec.display_name = Some(typed.to_string());
    spec.storage = Some(TopStorage(storage.clone()));
    Ok(Opened { spec, storage })
}

/// The export the file name `typed` names, connected for an image to be
/// formatted onto it (`create`, `convert` without `-n`, `dd`). QEMU cannot
/// create an image on NBD, so it opens the export as an existing image: one it
/// cannot reach, or that is served read-only, is refused with qemu-img's
/// explanation, unnamed (each command says the name and the step).
pub fn open_device(typed: &str, objects: &Objects) -> Result<Arc<NbdStorage>> {
    let refused = |e: &dyn std::fmt::Display| {
        anyhow!(
            "Protocol driver 'nbd' does not support creating new images, so an existing image \
             must be selected as the target; however, opening the given target as an existing \
             image failed: {e}"
        )
    };
    let target = parse_name(typed).map_err(|e| refused(&e))?;
    let storage = connect(&target, objects).map_err(|e| refused(&e))?;
    if strata_storage::Storage::read_only(&storage) {
        return Err(refused(&"Could not open image: Permission denied"));
    }
    Ok(Arc::new(storage))
}

/// Refuse an export smaller than `size` for a raw image: QEMU's NBD driver
/// cannot grow an export.
pub fn check_fits(device: &NbdStorage, size: u64) -> Result<()> {
    if size > strata_storage::Storage::size(device)? {
        bail!("Cannot grow NBD nodes");
    }
    Ok(())
}

/// The spec of the NBD export `convert` writes into (`name`, with `-O` as
/// `format` unless the target is an option list). Unless `-n`, qemu-img
/// "creates" the image on the export with `create` (the `-o` options), within
/// its size: a raw image is the export itself then (it must be large enough); a
/// qcow2 one is formatted onto it.
pub fn convert_target(
    naming: &super::imgname::Naming,
    name: &std::path::Path,
    format: Option<&str>,
    total: u64,
    create: Option<&BTreeMap<String, String>>,
) -> Result<OpenSpec> {
    if let Some(options) = create {
        let fmt = format.unwrap_or("raw");
        let failed = |why: &dyn std::fmt::Display| {
            anyhow!("{}: error while converting {fmt}: {why}", name.display())
        };
        let typed = name.to_string_lossy();
        let device = open_device(&typed, &naming.objects.objects()?).map_err(|e| failed(&e))?;
        match fmt {
            "raw" => check_fits(&device, total).map_err(|e| failed(&e))?,
            _ => {
                let request = strata_jobs::create::CreateRequest {
                    path: name.to_path_buf(),
                    format: parse_format(fmt)?,
                    size: Some(total),
                    options: options.clone(),
                    unsafe_backing: true,
                };
                strata_jobs::create::prepare(&request)
                    .and_then(|p| p.create_on(device))
                    .map_err(|e| failed(&e))?;
            }
        }
    }
    let Some(nbd) = naming.open_nbd(name, format)? else {
        bail!("Could not open '{}'", name.display());
    };
    Ok(nbd.spec)
}

/// Whether the image argument `typed` (with `flat`, its options when given as
/// an option list) names an NBD export.
pub fn names_export(typed: &str, flat: Option<&BTreeMap<String, String>>) -> bool {
    match flat {
        Some(flat) => from_options(flat).is_some(),
        None => typed
            .split_once(':')
            .is_some_and(|(p, _)| !p.contains('/') && is_nbd_protocol(p.as_bytes())),
    }
}

/// Backing files named by NBD URLs (`nbd://...`, `nbd+unix:///...?socket=`,
/// the legacy `nbd:` forms), as QEMU opens them: connected to, and named by
/// their canonical URL. Registered with the chain layer by [`install`].
struct BackingExports;

impl strata_chain::ProtocolOpener for BackingExports {
    fn claims(&self, name: &str) -> bool {
        names_export(name, None)
    }

    fn open(
        &self,
        name: &str,
        write: bool,
    ) -> std::result::Result<(Arc<dyn strata_storage::Storage>, String), ProtocolRefusal> {
        let unreachable = |e: &dyn std::fmt::Display| ProtocolRefusal::Unreachable(e.to_string());
        let target = parse_name(name).map_err(|e| unreachable(&e))?;
        let storage = connect(&target, &Objects::default()).map_err(|e| unreachable(&e))?;
        if write && strata_storage::Storage::read_only(&storage) {
            return Err(ProtocolRefusal::ReadOnly(
                "Can't reopen read-only NBD mount as read/write".into(),
            ));
        }
        Ok((Arc::new(storage), target.canonical()))
    }
}

/// Let the chain layer open backing files that name NBD exports.
pub fn install() {
    strata_chain::set_protocol_opener(Box::new(BackingExports));
}

fn parse_format(f: &str) -> Result<Format> {
    f.parse::<Format>()
        .map_err(|_| anyhow!("Unknown driver '{f}'"))
}

/// Why the NBD file name `typed`, given as the image under a filter
/// (`blkdebug::nbd:...`), is not opened: the address mistake or failed
/// connection worded as qemu-img words it, or (an export reached) that strata
/// does not take an export under a filter.
pub fn refusal_under_filter(typed: &str) -> anyhow::Error {
    let target = match parse_name(typed) {
        Ok(t) => t,
        Err(e) => return e,
    };
    match connect(&target, &Objects::default()) {
        Err(e) => e,
        Ok(_) => anyhow!("strata does not support an NBD export under a filter driver yet"),
    }
}

/// Connect as `target` says and wrap the connection as storage.
fn connect(target: &Target, objects: &Objects) -> Result<NbdStorage> {
    let tls = match &target.tls_creds {
        None => None,
        Some(id) => {
            let host = match &target.url.address {
                Address::Tcp { host, .. } => Some(host.as_str()),
                Address::Unix(_) => None,
            };
            Some(super::tlscreds::client(
                objects,
                id,
                host,
                target.tls_hostname.as_deref(),
            )?)
        }
    };
    let context = target
        .context
        .as_deref()
        .unwrap_or(strata_nbd::proto::CONTEXT_BASE_ALLOCATION);
    let client =
        Client::connect_with(&target.url, &[context], tls.as_ref()).map_err(|e| {
            match (e, &target.url.address, &target.port_name) {
                (
                    strata_nbd::Error::Connect { source, .. },
                    Address::Tcp { host, .. },
                    Some(port),
                ) => strata_nbd::Error::Connect {
                    addr: format!("{host}:{port}"),
                    source,
                },
                (e, ..) => e,
            }
        })?;
    if target.context.is_some() && !client.has_context(context) {
        bail!("Could not open image: Invalid argument");
    }
    // Behaves as a block device: a format above may truncate it to less than
    // its size (a qcow2 image shrinking, or formatted onto it), without effect.
    Ok(NbdStorage::new(client, Some(context), target.canonical()).device_like())
}

/// An NBD file name: a URL, or the legacy `nbd:` form.
fn parse_name(name: &str) -> Result<Target> {
    let (url, port_name) = if name.contains("://") {
        let url = NbdUrl::parse(name).map_err(|_| anyhow!("No valid URL specified"))?;
        (url, None)
    } else {
        legacy(name)?
    };
    Ok(Target {
        url,
        tls_creds: None,
        tls_hostname: None,
        context: None,
        port_name,
    })
}

/// `nbd:HOST:PORT[:exportname=E]` or `nbd:unix:PATH[:exportname=E]`, and the
/// port as named when it is not its number (see [`tcp`]).
fn legacy(name: &str) -> Result<(NbdUrl, Option<String>)> {
    const EXPORT: &str = ":exportname=";
    let (spec, export) = match name.find(EXPORT) {
        Some(i) => (&name[..i], Some(&name[i + EXPORT.len()..])),
        None => (name, None),
    };
    let missing = || anyhow!("NBD server address missing");
    if export == Some("") {
        return Err(missing());
    }
    let host_spec = spec.strip_prefix("nbd:").unwrap_or_default();
    if host_spec.is_empty() {
        return Err(missing());
    }
    let (address, port_name) = match host_spec.strip_prefix("unix:") {
        Some(path) => (Address::Unix(path.into()), None),
        None => inet(host_spec)?,
    };
    let url = NbdUrl {
        address,
        export: export.unwrap_or_default().to_string(),
    };
    Ok((url, port_name))
}

/// `HOST:PORT` (`[V6]:PORT`), the port required: the host ends at the first
/// colon (the port is the rest), as QEMU's address parser reads it. A port
/// is resolved as QEMU resolves it (see [`tcp`]).
fn inet(spec: &str) -> Result<(Address, Option<String>)> {
    let (host, port) = match spec.strip_prefix('[') {
        Some(v6) => v6
            .split_once("]:")
            .filter(|(h, p)| !h.is_empty() && !p.is_empty())
            .ok_or_else(|| anyhow!("error parsing IPv6 address '{spec}'"))?,
        None => spec
            .split_once(':')
            .filter(|(_, p)| !p.is_empty())
            .ok_or_else(|| anyhow!("error parsing address '{spec}'"))?,
    };
    tcp(host, port)
}

/// The TCP address `host` port `port`, the port resolved by the system's
/// resolver as QEMU resolves it: a service name it knows (`nbd`), a number
/// (past 65535 too: it wraps), else refused in the resolver's words. Also
/// the port as named when that is not how its number is written: QEMU names
/// the server with it.
fn tcp(host: &str, port: &str) -> Result<(Address, Option<String>)> {
    let number = strata_nbd::url::service_port(port)
        .map_err(|why| anyhow!("address resolution failed for {host}:{port}: {why}"))?;
    let named = (number.to_string() != port).then(|| port.to_string());
    let address = Address::Tcp {
        host: host.to_string(),
        port: number,
    };
    Ok((address, named))
}

/// The NBD driver's own options (those below `server.` are checked apart).
const NBD_OPTIONS: [&str; 10] = [
    "export",
    "tls-creds",
    "tls-hostname",
    "x-dirty-bitmap",
    "reconnect-delay",
    "open-timeout",
    "host",
    "port",
    "path",
    "filename",
];

/// The target an option list names, when its protocol layer is NBD: the top
/// itself (`driver=nbd`: the nbd node is the image) or the `file` child of a
/// format. `None` when the list names no NBD export.
#[allow(clippy::type_complexity)]
fn from_options(flat: &BTreeMap<String, String>) -> Option<Result<(Target, Option<Format>, bool)>> {
    let driver = flat.get("driver").map(String::as_str);
    if driver == Some("nbd") {
        let opts = flat
            .iter()
            .filter(|(k, _)| k.as_str() != "driver")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        return Some(nbd_options(&opts).map(|t| (t, Some(Format::Raw), true)));
    }
    if flat.get("file.driver").map(String::as_str) != Some("nbd") {
        return None;
    }
    let opts: BTreeMap<String, String> = flat
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("file.")?.to_string(), v.clone())))
        .filter(|(k, _)| k != "driver")
        .collect();
    Some((|| {
        let format = match driver {
            None => None,
            Some(d) => Some(parse_format(d)?),
        };
        if let Some(k) = flat.keys().find(|k| {
            !k.starts_with("file.") && !["driver", "file"].contains(&k.as_str()) && {
                !super::imgname::is_common_option(k)
            }
        }) {
            let name = format.map_or("raw", Format::name);
            bail!("Block format '{name}' does not support the option '{k}'");
        }
        Ok((nbd_options(&opts)?, format, false))
    })())
}

/// The members of an `inet` server address besides `type`.
const INET_MEMBERS: [&str; 11] = [
    "host",
    "port",
    "numeric",
    "to",
    "ipv4",
    "ipv6",
    "keep-alive",
    "keep-alive-count",
    "keep-alive-idle",
    "keep-alive-interval",
    "mptcp",
];

/// The refusal of `server.type=fd,server.str=FD` (a socket inherited from the
/// parent process), in qemu-img's words: a number that does not parse as a C
/// `int` ("Unable to parse FD number ..."), or a descriptor that is not an
/// open socket. strata does not speak NBD over an inherited descriptor, so an
/// open socket is refused too, in its own words.
fn inherited_socket(fd: &str) -> anyhow::Error {
    let digits = fd.trim_start_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b');
    let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
    if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return anyhow!("Unable to parse FD number {fd}");
    }
    let Ok(n) = digits.strip_prefix('+').unwrap_or(digits).parse::<i32>() else {
        return anyhow!("Unable to parse FD number {fd}: Numerical result out of range");
    };
    // SAFETY: `stat` is plain old data, for which all zero bytes are valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat only writes the buffer it is given; any number is a
    // valid argument (a closed or negative one fails with EBADF).
    let status = unsafe { libc::fstat(n, &mut st) };
    let is_socket = status == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK;
    if is_socket {
        anyhow!("NBD over an inherited file descriptor ('{fd}') is not supported by strata")
    } else {
        anyhow!("File descriptor '{fd}' is not a socket")
    }
}

/// A vsock address's number as QEMU reads it: decimal, an optional `+`, at
/// most `u32::MAX`.
fn vsock_number(s: &str) -> Option<u32> {
    let digits = s.strip_prefix('+').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The refusal of `server.type=vsock` (a virtio socket to context `cid`,
/// port `port`): numbers QEMU cannot read and a connection that fails are
/// refused in qemu-img's words (the system's reason for the failure, as
/// qemu-img gives it). strata does not speak NBD over vsock, so a
/// connection that succeeds is closed and refused in its own words.
fn vsock_refusal(cid: &str, port: &str) -> anyhow::Error {
    let Some(cid_n) = vsock_number(cid) else {
        return anyhow!("Failed to parse cid '{cid}'");
    };
    let Some(port_n) = vsock_number(port) else {
        return anyhow!("Failed to parse port '{port}'");
    };
    // SAFETY: socket() takes no pointers; a negative result is an error.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return anyhow!(
            "Failed to create socket: {}",
            strata_storage::os_message(&e)
        );
    }
    // SAFETY: sockaddr_vm is plain old data, for which all zero bytes are valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid_n;
    addr.svm_port = port_n;
    // SAFETY: `addr` is a valid sockaddr_vm of the length given; `fd` is the
    // socket just created, closed below on every path.
    let status = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    let err = (status != 0).then(std::io::Error::last_os_error);
    // SAFETY: `fd` is ours and not used after this.
    unsafe { libc::close(fd) };
    match err {
        Some(e) => anyhow!(
            "Failed to connect to '{cid}:{port}': {}",
            strata_storage::os_message(&e)
        ),
        None => anyhow!("NBD over vsock ('{cid}:{port}') is not supported by strata"),
    }
}

/// The NBD driver's options (without `driver`) as a target, refused with
/// qemu-img's messages.
fn nbd_options(opts: &BTreeMap<String, String>) -> Result<Target> {
    if let Some(k) = opts.keys().find(|k| {
        !k.starts_with("server.")
            && !NBD_OPTIONS.contains(&k.as_str())
            && !super::imgname::is_common_option(k)
    }) {
        bail!("Block protocol 'nbd' doesn't support the option '{k}'");
    }
    let get = |k: &str| opts.get(k).cloned();
    let export = get("export").unwrap_or_default();
    let server_type = get("server.type");
    // A member the address type has no use for ("server.host" of a unix
    // address), refused after the missing ones, as QEMU's option parser does.
    let unexpected = |allowed: &[&str]| -> Result<()> {
        match opts
            .keys()
            .filter_map(|k| k.strip_prefix("server."))
            .find(|m| *m != "type" && !allowed.contains(m))
        {
            Some(m) => bail!("Parameter '{m}' is unexpected"),
            None => Ok(()),
        }
    };
    let (address, port_name) = match server_type.as_deref() {
        Some("fd") => {
            let fd = get("server.str").ok_or_else(|| anyhow!("Parameter 'str' is missing"))?;
            unexpected(&["str"])?;
            return Err(inherited_socket(&fd));
        }
        Some("unix") => {
            let path = get("server.path").ok_or_else(|| anyhow!("Parameter 'path' is missing"))?;
            unexpected(&["path", "abstract", "tight"])?;
            (Address::Unix(path.into()), None)
        }
        Some("inet") => {
            let host = get("server.host").ok_or_else(|| anyhow!("Parameter 'host' is missing"))?;
            let port = get("server.port").ok_or_else(|| anyhow!("Parameter 'port' is missing"))?;
            unexpected(&INET_MEMBERS)?;
            tcp(&host, &port)?
        }
        Some("vsock") => {
            let cid = get("server.cid").ok_or_else(|| anyhow!("Parameter 'cid' is missing"))?;
            let port = get("server.port").ok_or_else(|| anyhow!("Parameter 'port' is missing"))?;
            unexpected(&["cid", "port"])?;
            return Err(vsock_refusal(&cid, &port));
        }
        Some(t) => bail!("Parameter 'type' does not accept value '{t}'"),
        None => match (get("path"), get("host")) {
            (Some(path), None) => (Address::Unix(path.into()), None),
            (None, Some(host)) => match get("port") {
                Some(p) => tcp(&host, &p)?,
                None => {
                    let port = strata_nbd::url::DEFAULT_PORT;
                    (Address::Tcp { port, host }, None)
                }
            },
            _ => bail!("NBD server address missing"),
        },
    };
    Ok(Target {
        url: NbdUrl { address, export },
        tls_creds: get("tls-creds"),
        tls_hostname: get("tls-hostname"),
        context: get("x-dirty-bitmap"),
        port_name,
    })
}

/// `info` of an image on an NBD export, as qemu-img reports it: the protocol
/// node is `nbd`, with no disk size nor format-specific part.
pub fn info_view(mut info: strata_jobs::info::ImageInfo) -> strata_jobs::info::ImageInfo {
    for child in &mut info.children {
        if child.name == "file" {
            child.info.format = "nbd".into();
            child.info.format_specific = None;
            child.info.actual_size = None;
        }
    }
    info.actual_size = None;
    info
}

/// The JSON of [`info_view`]: the dirty flag only where the format has one
/// (qcow2), as QEMU's NBD and raw drivers give none over NBD.
pub fn json_view(v: &mut serde_json::Value) {
    if let Some(list) = v.as_array_mut() {
        list.iter_mut().for_each(json_view);
        return;
    }
    let Some(m) = v.as_object_mut() else { return };
    if m.get("format").and_then(|f| f.as_str()) != Some("qcow2") {
        m.remove("dirty-flag");
    }
    if let Some(children) = m.get_mut("children").and_then(|c| c.as_array_mut()) {
        for c in children {
            if let Some(info) = c.get_mut("info") {
                json_view(info);
            }
        }
    }
}

/// One run of `map` on a raw image over NBD, from the server's block status:
/// present where it holds data or reads as zeroes, mapped to the same offset.
pub fn map_entry(
    s: &NbdStorage,
    offset: u64,
    len: u64,
) -> strata_jobs::Result<strata_jobs::map::MapEntry> {
    let (a, n) = s.allocation(offset, len)?;
    let present = a.data || a.zero;
    Ok(strata_jobs::map::MapEntry {
        start: offset,
        length: n,
        depth: 0,
        present,
        zero: a.zero,
        data: a.data,
        compressed: false,
        offset: present.then_some(offset),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(path: &str, export: &str) -> NbdUrl {
        NbdUrl {
            address: Address::Unix(path.into()),
            export: export.into(),
        }
    }

    #[test]
    fn urls_and_legacy_names_give_one_canonical_name() {
        let t = |n: &str| parse_name(n).unwrap();
        for n in ["nbd+unix:///ex?socket=/s", "nbd:unix:/s:exportname=ex"] {
            assert_eq!(t(n).url, unix("/s", "ex"), "{n}");
            assert_eq!(t(n).canonical(), "nbd+unix:///ex?socket=/s");
        }
        for n in [
            "nbd://127.0.0.1:1234/ex",
            "nbd+tcp://127.0.0.1:1234/ex",
            "nbd:127.0.0.1:1234:exportname=ex",
        ] {
            assert_eq!(t(n).canonical(), "nbd://127.0.0.1:1234/ex", "{n}");
        }
        assert_eq!(t("nbd://h/e").canonical(), "nbd://h:10809/e");
        assert_eq!(t("nbd:unix:/s").canonical(), "nbd+unix://?socket=/s");
    }

    #[test]
    fn legacy_ports_resolve_as_the_system_resolver_takes_them() {
        let t = |n: &str| parse_name(n).unwrap();
        let port = |n: &str| match t(n).url.address {
            Address::Tcp { port, .. } => port,
            Address::Unix(_) => unreachable!(),
        };
        // Past 65535 wraps (70000 is 4464); the name keeps the port as written.
        assert_eq!(port("nbd:h:70000"), 4464);
        assert_eq!(t("nbd:h:70000:exportname=e").canonical(), "nbd://h:70000/e");
        assert_eq!(port("nbd:h:+1234"), 1234);
        assert_eq!(t("nbd:h:1234").canonical(), "nbd://h:1234");
        assert_eq!(
            parse_name("nbd:h:-1").unwrap_err().to_string(),
            "address resolution failed for h:-1: Servname not supported for ai_socktype"
        );
    }

    #[test]
    fn bad_names_get_qemu_img_messages() {
        let e = |n: &str| parse_name(n).unwrap_err().to_string();
        assert_eq!(e("nbd+unix:///ex"), "No valid URL specified");
        assert_eq!(e("nbd://h:xx/e"), "No valid URL specified");
        assert_eq!(e("nbd:"), "NBD server address missing");
        assert_eq!(e("nbd:unix:/s:exportname="), "NBD server address missing");
    }

    #[test]
    fn option_lists_name_the_server_the_export_and_the_context() {
        let flat = |s: &[(&str, &str)]| -> BTreeMap<String, String> {
            s.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let (t, f, top) = from_options(&flat(&[
            ("driver", "nbd"),
            ("server.type", "unix"),
            ("server.path", "/s"),
            ("export", "ex"),
            ("x-dirty-bitmap", "qemu:dirty-bitmap:b0"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((t.url, f, top), (unix("/s", "ex"), Some(Format::Raw), true));
        assert_eq!(t.context.as_deref(), Some("qemu:dirty-bitmap:b0"));
        let (t, f, top) = from_options(&flat(&[
            ("driver", "qcow2"),
            ("file.driver", "nbd"),
            ("file.server.type", "inet"),
            ("file.server.host", "h"),
            ("file.server.port", "99"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(t.canonical(), "nbd://h:99");
        assert_eq!((f, top), (Some(Format::Qcow2), false));
        assert!(from_options(&flat(&[("driver", "qcow2"), ("file.filename", "a")])).is_none());
        let e = |s: &[(&str, &str)]| from_options(&flat(s)).unwrap().unwrap_err().to_string();
        assert_eq!(
            e(&[("driver", "nbd"), ("foo", "bar")]),
            "Block protocol 'nbd' doesn't support the option 'foo'"
        );
        assert_eq!(e(&[("driver", "nbd")]), "NBD server address missing");
        assert_eq!(
            e(&[("driver", "nbd"), ("server.type", "unix")]),
            "Parameter 'path' is missing"
        );
        assert_eq!(
            e(&[
                ("driver", "nbd"),
                ("server.type", "inet"),
                ("server.host", "h")
            ]),
            "Parameter 'port' is missing"
        );
        assert_eq!(
            e(&[("driver", "nbd"), ("server.type", "x")]),
            "Parameter 'type' does not accept value 'x'"
        );
        let fd = |n: &str| e(&[("driver", "nbd"), ("server.type", "fd"), ("server.str", n)]);
        assert_eq!(fd("abc"), "Unable to parse FD number abc");
        assert_eq!(fd(""), "Unable to parse FD number ");
        assert_eq!(fd("0x5"), "Unable to parse FD number 0x5");
        assert_eq!(
            fd("2147483648"),
            "Unable to parse FD number 2147483648: Numerical result out of range"
        );
        assert_eq!(fd("-1"), "File descriptor '-1' is not a socket");
        assert_eq!(fd(" +987654"), "File descriptor ' +987654' is not a socket");
        assert_eq!(
            e(&[
                ("driver", "nbd"),
                ("server.type", "fd"),
                ("server.path", "p")
            ]),
            "Parameter 'str' is missing"
        );
        assert_eq!(
            e(&[
                ("driver", "nbd"),
                ("server.type", "unix"),
                ("server.path", "p"),
                ("server.host", "h")
            ]),
            "Parameter 'host' is unexpected"
        );
    }
}
