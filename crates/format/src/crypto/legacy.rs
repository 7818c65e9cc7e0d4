//! The legacy qcow2 encryption (crypt_method 1): AES-128-CBC over 512-byte
//! sectors with plain64 IVs, the key being the password's first 16 bytes
//! (zero-padded). It has no key check: a wrong password reads garbage. strata
//! reads it and, as QEMU, never writes it.

use super::cipher::{CipherAlg, CipherMode, IvGenAlg, SectorCipher};
use crate::Result;

/// The data cipher of a legacy AES image for `password`.
pub fn cipher(password: &[u8]) -> Result<SectorCipher> {
    let mut key = [0u8; 16];
    let n = password.len().min(16);
    key[..n].copy_from_slice(&password[..n]);
    SectorCipher::new(
        CipherAlg::Aes128,
        CipherMode::Cbc,
        IvGenAlg::Plain64,
        None,
        &key,
    )
}
