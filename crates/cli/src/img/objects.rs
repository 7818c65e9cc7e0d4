//! `--object TYPE,id=ID,...`: the user-creatable objects qemu-img takes on every
//! subcommand. Secrets (`secret,id=ID,data=STR|file=PATH[,format=raw|base64]`)
//! are kept by id for the images that name them (`encrypt.key-secret=ID`); the
//! other object types qemu-img knows are kept with their properties for the
//! features that use them. Mistakes get qemu-img's messages.

use super::common::split_items;
use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The object types qemu-img can create (`qemu-img info --object help`).
const QEMU_IMG_TYPES: [&str; 12] = [
    "authz-list",
    "authz-list-file",
    "authz-simple",
    "main-loop",
    "pr-manager-helper",
    "secret",
    "secret_keyring",
    "thread-context",
    "throttle-group",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-creds-x509",
];

/// Whether object definition `def` asks for the list of object types: its
/// first item is `help` (`--object help`, `--object help,id=x`).
pub fn asks_for_types(def: &str) -> bool {
    split_items(def).first().is_some_and(|t| t == "help")
}

/// The list of object types qemu-img prints for `--object help`.
pub fn types_list() -> String {
    let mut out = String::from("List of user creatable objects:\n");
    for t in QEMU_IMG_TYPES {
        out.push_str(&format!("  {t}\n"));
    }
    out
}

/// The `--object` options of a command line.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ObjectArgs {
    /// A user-creatable object, as qemu-img takes it: for an encryption key,
    /// `secret,id=ID,data=STRING` or `secret,id=ID,file=PATH` (`format=base64`
    /// when the value is base64).
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
}

/// An object that is not a secret: its type and properties (`id` and `qom-type`
/// left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub qom_type: String,
    pub props: BTreeMap<String, String>,
}

/// The objects of a command line, by id.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    /// Secret values by id (decoded when given as base64).
    pub secrets: Arc<BTreeMap<String, Vec<u8>>>,
    /// The other objects by id (TLS credentials for NBD connections, say).
    pub others: BTreeMap<String, Object>,
}

impl ObjectArgs {
    /// Create the objects, in the order given; the first mistake is refused with
    /// qemu-img's message (ids are unique across all types).
    pub fn objects(&self) -> Result<Objects> {
        let mut secrets = BTreeMap::new();
        let mut others = BTreeMap::new();
        for def in &self.object {
            let (qom_type, id, props) = parse_def(def)?;
            if secrets.contains_key(&id) || others.contains_key(&id) {
                bail!("attempt to add duplicate property '{id}' to object (type 'container')");
            }
            super::tlscreds::check(&qom_type, &props)?;
            if qom_type == "secret" {
                secrets.insert(id, secret_value(&props)?);
            } else {
                others.insert(id, Object { qom_type, props });
            }
        }
        Ok(Objects {
            secrets: Arc::new(secrets),
            others,
        })
    }

    /// The secrets alone (see [`ObjectArgs::objects`]).
    pub fn secrets(&self) -> Result<Arc<BTreeMap<String, Vec<u8>>>> {
        Ok(self.objects()?.secrets)
    }
}

/// Split an object definition into its type, id and other properties. The type
/// is the first item when it has no `=` (or `qom-type=`); later items must be
/// `key=value`; a key given twice keeps its last value.
fn parse_def(def: &str) -> Result<(String, String, BTreeMap<String, String>)> {
    let mut props = BTreeMap::new();
    let mut qom_type = None;
    for (i, item) in split_items(def).into_iter().enumerate() {
        match item.split_once('=') {
            Some((k, v)) => {
                if k.is_empty() {
                    bail!("Invalid parameter ''");
                }
                props.insert(k.to_string(), v.to_string());
            }
            None if i == 0 => qom_type = Some(item),
            None => bail!("Expected '=' after parameter '{item}'"),
        }
    }
    let qom_type = match props.remove("qom-type").or(qom_type) {
        Some(t) => t,
        None => bail!("Parameter 'qom-type' is missing"),
    };
    if !QEMU_IMG_TYPES.contains(&qom_type.as_str()) {
        bail!("Parameter 'qom-type' does not accept value '{qom_type}'");
    }
    let Some(id) = props.remove("id") else {
        bail!("Parameter 'id' is missing");
    };
    if !is_identifier(&id) {
        bail!("Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.");
    }
    Ok((qom_type, id, props))
}

/// QEMU's identifiers: letters, digits, '-', '.', '_', starting with a letter.
fn is_identifier(id: &str) -> bool {
    id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

/// A secret's value from its `data=` or `file=` (a file's bytes as they are,
/// trailing newline included), decoded when `format=base64`.
fn secret_value(props: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    if let Some(k) = props
        .keys()
        .find(|k| !["data", "file", "format", "keyid", "iv", "loaded"].contains(&k.as_str()))
    {
        bail!("Parameter '{k}' is unexpected");
    }
    let base64 = match props.get("format").map(String::as_str) {
        None | Some("raw") => false,
        Some("base64") => true,
        Some(other) => bail!("Parameter 'format' does not accept value '{other}'"),
    };
    if let Some(k) = props.get("keyid") {
        bail!("No secret with id '{k}'");
    }
    let raw = match (props.get("data"), props.get("file")) {
        (Some(_), Some(_)) => bail!("'file' and 'data' are mutually exclusive"),
        (None, None) => bail!("Either 'file' or 'data' must be provided"),
        (Some(d), None) => d.as_bytes().to_vec(),
        (None, Some(f)) => std::fs::read(f).map_err(|e| {
            anyhow!(
                "Unable to read {f}: Failed to open file \u{201c}{f}\u{201d}: {}",
                strata_storage::os_message(&e)
            )
        })?,
    };
    if base64 {
        decode_base64(&raw)
    } else {
        Ok(raw)
    }
}

/// Base64 as QEMU reads a secret: characters outside the alphabet are refused,
/// padding is skipped and bits short of a whole byte at the end are dropped.
fn decode_base64(text: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => continue,
            _ => bail!("Base64 data contains invalid characters"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(defs: &[&str]) -> Result<Objects> {
        ObjectArgs {
            object: defs.iter().map(|d| d.to_string()).collect(),
        }
        .objects()
    }

    #[test]
    fn secrets_are_kept_by_id_from_data_file_or_base64() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("key");
        std::fs::write(&f, b"from file\n").unwrap();
        let file_def = format!("secret,id=f,file={}", f.display());
        let o = objects(&[
            "secret,id=d,data=a,,b",
            &file_def,
            "secret,id=b,data=c2VjcmV0,format=base64",
            "qom-type=secret,id=q,data=x,format=raw",
            "tls-creds-anon,id=tls0,endpoint=client",
        ])
        .unwrap();
        assert_eq!(o.secrets["d"], b"a,b");
        assert_eq!(o.secrets["f"], b"from file\n");
        assert_eq!(o.secrets["b"], b"secret");
        assert_eq!(o.secrets["q"], b"x");
        assert_eq!(o.others["tls0"].qom_type, "tls-creds-anon");
        assert_eq!(o.others["tls0"].props["endpoint"], "client");
    }

    #[test]
    fn mistakes_get_qemu_img_messages() {
        let cases: [(&[&str], &str); 13] = [
            (
                &["secret,id=s0,data=a", "secret,id=s0,data=b"],
                "attempt to add duplicate property 's0' to object (type 'container')",
            ),
            (&["secret,data=a"], "Parameter 'id' is missing"),
            (&["secret,id=s0"], "Either 'file' or 'data' must be provided"),
            (
                &["secret,id=s0,data=a,file=b"],
                "'file' and 'data' are mutually exclusive",
            ),
            (&["secret,id=s0,data=a,foo=bar"], "Parameter 'foo' is unexpected"),
            (
                &["secret,id=s0,data=a,format=hex"],
                "Parameter 'format' does not accept value 'hex'",
            ),
            (
                &["bogus,id=s0"],
                "Parameter 'qom-type' does not accept value 'bogus'",
            ),
            (&["id=s0"], "Parameter 'qom-type' is missing"),
            (&[""], "Parameter 'qom-type' is missing"),
            (
                &["secret,id=0s,data=a"],
                "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
            ),
            (&["secret,id=s0,data"], "Expected '=' after parameter 'data'"),
            (
                &["secret,id=s0,data=a b,format=base64"],
                "Base64 data contains invalid characters",
            ),
            (
                &["secret,id=s0,file=/nonexistent/key"],
                "Unable to read /nonexistent/key: Failed to open file \u{201c}/nonexistent/key\u{201d}: No such file or directory",
            ),
        ];
        for (defs, message) in cases {
            assert_eq!(objects(defs).unwrap_err().to_string(), message, "{defs:?}");
        }
    }

    #[test]
    fn base64_padding_and_trailing_bits_are_dropped() {
        assert_eq!(decode_base64(b"YWJj").unwrap(), b"abc");
        assert_eq!(decode_base64(b"YWI=").unwrap(), b"ab");
        assert_eq!(decode_base64(b"YQ==").unwrap(), b"a");
        assert_eq!(decode_base64(b"Y").unwrap(), b"");
    }
}
