//! The `encrypt.*` options of a qcow2 create: QEMU's checks, in its order and words,
//! after the "Formatting" line (the values, the secret), giving the LUKS settings
//! of the new image. The legacy AES format (`encryption=on`, `encrypt.format=aes`)
//! is created as qemu-img creates it (see [`aes_password`]).

use std::collections::BTreeMap;
use strata_format::crypto::luks::LuksCreateOptions;
use strata_format::crypto::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
use strata_format::qcow2::encryption::LuksEncrypt;

/// QEMU's names of each enumeration (what it accepts at all), for its
/// "does not accept value" refusal.
const CIPHER_ALGS: &[&str] = &[
    "aes-128",
    "aes-192",
    "aes-256",
    "des",
    "3des",
    "cast5-128",
    "serpent-128",
    "serpent-192",
    "serpent-256",
    "twofish-128",
    "twofish-192",
    "twofish-256",
    "sm4",
];
const CIPHER_MODES: &[&str] = &["ecb", "cbc", "xts", "ctr"];
const IVGEN_ALGS: &[&str] = &["plain", "plain64", "essiv"];
const HASH_ALGS: &[&str] = &[
    "md5",
    "sha1",
    "sha224",
    "sha256",
    "sha384",
    "sha512",
    "ripemd160",
    "sm3",
];

/// The value of `PREFIXNAME`, checked against QEMU's enumeration.
fn enum_value<'a>(
    opts: &'a BTreeMap<String, String>,
    prefix: &str,
    name: &str,
    accepted: &[&str],
) -> Result<Option<&'a str>, String> {
    match opts.get(&format!("{prefix}{name}")) {
        None => Ok(None),
        Some(v) if accepted.contains(&v.as_str()) => Ok(Some(v)),
        Some(v) => Err(format!("Parameter '{name}' does not accept value '{v}'")),
    }
}

/// A value QEMU accepts that strata does not implement.
fn not_implemented(what: &str, v: &str) -> String {
    format!("{what} '{v}' is not supported by strata")
}

/// The LUKS encryption the `-o` map asks for (`None`: a clear image, or the
/// legacy AES format, whose options and secret are checked here).
pub(crate) fn luks_options(
    opts: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, Vec<u8>>,
) -> Result<Option<LuksEncrypt>, String> {
    match encrypt_format(opts)? {
        None => Ok(None),
        Some("aes") => {
            // QEMU checks the values, then looks the secret up.
            luks_values(opts, "encrypt.")?;
            key_password(opts, "encrypt.", secrets)?;
            Ok(None)
        }
        Some(_) => luks_settings(opts, "encrypt.", secrets).map(Some),
    }
}

/// The password of the legacy AES format the `-o` map asks for (`None`: a
/// clear or LUKS image). qemu-img 10 still creates such images (only QEMU's
/// system emulators refuse them); call after [`luks_options`] accepted the map.
pub(crate) fn aes_password(
    opts: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, Vec<u8>>,
) -> Result<Option<Vec<u8>>, String> {
    match encrypt_format(opts)? {
        Some("aes") => key_password(opts, "encrypt.", secrets).map(|p| Some(p.clone())),
        _ => Ok(None),
    }
}

/// Whether the `-o` map asks for an encrypted image (LUKS or the legacy AES).
pub(crate) fn encrypted(opts: &BTreeMap<String, String>) -> bool {
    encrypt_format(opts).is_ok_and(|f| f.is_some())
}

/// The encryption format (`luks` or `aes`) the `-o` map asks for, `None` for a
/// clear image.
fn encrypt_format(opts: &BTreeMap<String, String>) -> Result<Option<&'static str>, String> {
    let legacy = opts
        .get("encryption")
        .is_some_and(|v| crate::create::parse_bool("encryption", v) == Ok(true));
    let format = match opts.get("encrypt.format").map(String::as_str) {
        None if legacy => "aes",
        None if opts.keys().any(|k| k.starts_with("encrypt.")) => {
            return Err("Parameter 'encrypt.format' is missing".into())
        }
        None => return Ok(None),
        Some("luks") => "luks",
        Some("aes") => "aes",
        Some(f) => return Err(format!("Parameter 'format' does not accept value '{f}'")),
    };
    Ok(Some(format))
}

/// The password of the secret a `-o` map names under `{prefix}key-secret`,
/// with QEMU's words when the key is missing or names no secret.
fn key_password<'a>(
    opts: &BTreeMap<String, String>,
    prefix: &str,
    secrets: &'a BTreeMap<String, Vec<u8>>,
) -> Result<&'a Vec<u8>, String> {
    let id = opts
        .get(&format!("{prefix}key-secret"))
        .ok_or_else(|| format!("Parameter '{prefix}key-secret' is required for cipher"))?;
    secrets
        .get(id)
        .ok_or_else(|| format!("No secret with id '{id}'"))
}

/// The LUKS settings of a `-o` map whose LUKS keys carry `prefix` (`encrypt.`
/// for qcow2, none for the `luks` format): QEMU's checks in its order, the
/// secret last.
pub(crate) fn luks_settings(
    opts: &BTreeMap<String, String>,
    prefix: &str,
    secrets: &BTreeMap<String, Vec<u8>>,
) -> Result<LuksEncrypt, String> {
    let (cipher, mode, ivgen, ivhash, hash) = luks_values(opts, prefix)?;
    let password = key_password(opts, prefix, secrets)?;
    let d = LuksCreateOptions::default();
    let cipher_alg = match cipher {
        None => d.cipher_alg,
        Some(c) => CipherAlg::parse(c).ok_or_else(|| not_implemented("Cipher algorithm", c))?,
    };
    let cipher_mode = match mode {
        None => d.cipher_mode,
        Some(m) => CipherMode::parse(m).map_err(|_| not_implemented("Cipher mode", m))?,
    };
    let ivgen_alg = match ivgen {
        None => d.ivgen_alg,
        Some(g) => IvGenAlg::parse(g).map_err(|e| e.message().to_string())?,
    };
    let hash_of = |h: &str| HashAlg::parse(h).map_err(|_| not_implemented("Hash algorithm", h));
    // As QEMU: ESSIV defaults its hash to sha256; other generators keep one given.
    let ivgen_hash_alg = match ivhash {
        Some(h) => Some(hash_of(h)?),
        None if ivgen_alg == IvGenAlg::Essiv => Some(HashAlg::Sha256),
        None => None,
    };
    let hash_alg = hash.map(hash_of).transpose()?.unwrap_or(d.hash_alg);
    let iter_time_ms = match opts.get(&format!("{prefix}iter-time")) {
        // The parse stage checked it is a number.
        Some(v) => v.parse().unwrap_or(d.iter_time_ms),
        None => d.iter_time_ms,
    };
    if ivgen_alg == IvGenAlg::Essiv {
        let len = ivgen_hash_alg.map_or(32, HashAlg::digest_len);
        if CipherAlg::aes_with_key_len(len).is_none() {
            return Err(format!("No AES cipher with key size {len} available"));
        }
    }
    Ok(LuksEncrypt {
        options: LuksCreateOptions {
            cipher_alg,
            cipher_mode,
            ivgen_alg,
            ivgen_hash_alg,
            hash_alg,
            iter_time_ms,
        },
        password: password.as_slice().into(),
    })
}

/// The enumerated LUKS values of the map (cipher, mode, IV generator, its
/// hash, hash), each checked against QEMU's names.
type LuksValues<'a> = (
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

fn luks_values<'a>(
    opts: &'a BTreeMap<String, String>,
    prefix: &str,
) -> Result<LuksValues<'a>, String> {
    Ok((
        enum_value(opts, prefix, "cipher-alg", CIPHER_ALGS)?,
        enum_value(opts, prefix, "cipher-mode", CIPHER_MODES)?,
        enum_value(opts, prefix, "ivgen-alg", IVGEN_ALGS)?,
        enum_value(opts, prefix, "ivgen-hash-alg", HASH_ALGS)?,
        enum_value(opts, prefix, "hash-alg", HASH_ALGS)?,
    ))
}

/// Bytes of the LUKS area the `-o` map asks for, as `measure` counts it: 0 for
/// a clear image and for the legacy AES format (whose key lives outside the
/// file). The options are checked as a create checks them, secret included.
pub fn measured_luks_area(
    opts: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, Vec<u8>>,
) -> Result<u64, String> {
    Ok(luks_options(opts, secrets)?
        .map_or(0, |e| strata_format::crypto::luks::area_len_for(&e.options)))
}

/// Bytes of the header and key material of a `luks` image the `-o` map asks
/// for, as `measure -O luks` counts them (options and secret checked as a
/// create checks them).
pub fn measured_luks_header(
    opts: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, Vec<u8>>,
) -> Result<u64, String> {
    luks_settings(opts, "", secrets).map(|e| strata_format::crypto::luks::area_len_for(&e.options))
}
