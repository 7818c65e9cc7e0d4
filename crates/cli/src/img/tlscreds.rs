//! `--object tls-creds-x509,id=ID,dir=DIR[,endpoint=client|server][,verify-peer=on|off]`:
//! X.509 credentials in a directory (`ca-cert.pem`, and `client-cert.pem` +
//! `client-key.pem` or `server-cert.pem` + `server-key.pem`), checked when the
//! object is created as qemu-img checks them, and turned into the TLS settings
//! of an NBD connection that names them (`tls-creds=ID`).

use super::objects::{Object, Objects};
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use strata_nbd::tls::{ClientTls, Verify};

/// The properties a `tls-creds-x509` object takes.
const X509_PROPS: [&str; 7] = [
    "dir",
    "endpoint",
    "verify-peer",
    "priority",
    "sanity-check",
    "passwordid",
    "loaded",
];

/// One credential file of `dir`.
fn file(dir: &str, name: &str) -> PathBuf {
    Path::new(&format!("{dir}/{name}")).to_path_buf()
}

/// Refuse a `tls-creds-x509` object qemu-img would refuse to create: unknown
/// properties, bad values, no `dir`, a credential file that cannot be read.
/// Other object types pass.
pub fn check(qom_type: &str, props: &BTreeMap<String, String>) -> Result<()> {
    if qom_type != "tls-creds-x509" {
        return Ok(());
    }
    if let Some(k) = props.keys().find(|k| !X509_PROPS.contains(&k.as_str())) {
        bail!("Parameter '{k}' is unexpected");
    }
    let server = is_server(props)?;
    verify(props)?;
    let Some(dir) = props.get("dir") else {
        bail!("Missing 'dir' property value");
    };
    let readable = |name: &str| -> Result<PathBuf> {
        let p = file(dir, name);
        if let Err(e) = std::fs::File::open(&p) {
            bail!(
                "Unable to access credentials {}: {}",
                p.display(),
                strata_storage::os_message(&e)
            );
        }
        Ok(p)
    };
    let ca = readable("ca-cert.pem")?;
    if strata_nbd::tls::count_certs(&ca) == 0 {
        bail!("Unable to import CA certificate list {}", ca.display());
    }
    if server {
        readable("server-cert.pem")?;
        readable("server-key.pem")?;
    }
    Ok(())
}

fn is_server(props: &BTreeMap<String, String>) -> Result<bool> {
    match props.get("endpoint").map(String::as_str) {
        None | Some("client") => Ok(false),
        Some("server") => Ok(true),
        Some(v) => bail!("Parameter 'endpoint' does not accept value '{v}'"),
    }
}

fn verify(props: &BTreeMap<String, String>) -> Result<Verify> {
    match props.get("verify-peer").map(String::as_str) {
        None => Ok(Verify::Peer),
        Some(v) => match strata_jobs::create::parse_bool("verify-peer", v) {
            Ok(true) => Ok(Verify::Peer),
            Ok(false) => Ok(Verify::None),
            Err(e) => bail!("{e}"),
        },
    }
}

/// The TLS settings for a connection to `host` (a TCP server's host; `None` for
/// a Unix socket) secured with the credentials `id`; `hostname` is the
/// `tls-hostname` option, checked against the certificate instead of `host`.
pub fn client(
    objects: &Objects,
    id: &str,
    host: Option<&str>,
    hostname: Option<&str>,
) -> Result<ClientTls> {
    let obj: &Object = match objects.others.get(id) {
        Some(o) if o.qom_type.starts_with("tls-creds") => o,
        Some(_) => bail!("Object with id '{id}' is not TLS credentials"),
        None if objects.secrets.contains_key(id) => {
            bail!("Object with id '{id}' is not TLS credentials")
        }
        None => bail!("No TLS credentials with id '{id}'"),
    };
    if obj.qom_type != "tls-creds-x509" {
        bail!(
            "TLS credentials of type '{}' are not supported by strata",
            obj.qom_type
        );
    }
    if is_server(&obj.props)? {
        bail!("Expected TLS credentials for a client endpoint");
    }
    let verify = verify(&obj.props)?;
    let server_name = hostname.or(host).map(str::to_string);
    let dir = obj.props.get("dir").map(String::as_str).unwrap_or_default();
    let (cert, key) = (file(dir, "client-cert.pem"), file(dir, "client-key.pem"));
    let identity = (cert.exists() && key.exists()).then_some((cert.as_path(), key.as_path()));
    let config = strata_nbd::tls::client_config(&file(dir, "ca-cert.pem"), identity, verify)?;
    Ok(ClientTls {
        config,
        server_name,
        verify,
    })
}
