//! Disk encryption as QEMU applies it to qcow2 images: LUKS1 ([`luks`]) and the
//! legacy AES format (crypt_method 1, [`legacy`]).
//!
//! Both encrypt 512-byte sectors independently ([`SectorCipher`]): each sector with
//! an IV derived from its sector number. Which number that is (the host offset for
//! LUKS, the guest offset for the legacy format) is the image's business, not this
//! module's.

mod afsplit;
mod cipher;
pub mod keyslots;
pub mod legacy;
pub mod luks;
pub mod slot_writes;

pub use cipher::{CipherAlg, CipherMode, IvGenAlg, SectorCipher};

use crate::{Error, ErrorKind, Result};

/// Bytes per encrypted sector (both formats).
pub const SECTOR_SIZE: u64 = 512;

/// The hash algorithms of QEMU's LUKS headers that strata implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    /// Parse a name as QEMU spells it (`sha256`). Names QEMU knows but strata does
    /// not implement (`md5`, `ripemd160`, `sm3`) are unsupported; others invalid.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            "md5" | "ripemd160" | "sm3" => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("Hash algorithm '{name}' not supported"),
                ))
            }
            _ => {
                return Err(Error::invalid(format!(
                    "Hash algorithm '{name}' not supported"
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: sha2::Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            HashAlg::Sha1 => run::<sha1::Sha1>(parts),
            HashAlg::Sha224 => run::<sha2::Sha224>(parts),
            HashAlg::Sha256 => run::<sha2::Sha256>(parts),
            HashAlg::Sha384 => run::<sha2::Sha384>(parts),
            HashAlg::Sha512 => run::<sha2::Sha512>(parts),
        }
    }

    /// PBKDF2 with HMAC of this hash: fills `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out),
        }
    }
}

/// Fill `buf` from the operating system's random source.
pub(crate) fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf)
        .map_err(|e| Error::new(ErrorKind::Io, format!("Unable to read random bytes: {e}")))
}

/// The error for an encrypted image opened without its secret, in QEMU's words.
pub fn key_required() -> Error {
    Error::new(
        ErrorKind::Key,
        "Parameter 'encrypt.key-secret' is required for cipher",
    )
}
