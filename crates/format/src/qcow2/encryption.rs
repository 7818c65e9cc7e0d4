//! Encrypted qcow2 images: the encryption an image records (LUKS, or the legacy
//! AES format), unlocked with the caller's secret, and the sector arithmetic of
//! QEMU's data path.
//!
//! QEMU's rules, which this module keeps:
//! - Data clusters hold ciphertext, 512-byte sector by sector. LUKS images number
//!   the sectors by *host* offset (the position in the image file), legacy AES
//!   images by *guest* offset.
//! - Compressed clusters are not encrypted; zero and unallocated clusters hold no
//!   data and read as zeroes (or from the backing file) without decryption.
//! - Without a secret an image opens only for its metadata (`info`); any data
//!   access then fails, as QEMU refuses such opens.

use super::header::{crypt, CryptoExt, Header};
use crate::crypto::{self, luks::LuksHeader, SectorCipher, SECTOR_SIZE};
use crate::units::index;
use crate::{Error, Result};
use std::sync::Arc;
use strata_storage::Storage;

/// The secret an encrypted image is opened with.
#[derive(Debug, Clone, Default)]
pub enum Unlock {
    /// None given: an encrypted image is refused (QEMU's "key-secret is required"),
    /// unless it is opened for its metadata only.
    #[default]
    None,
    /// The password (LUKS) or key (legacy AES).
    Secret(Arc<[u8]>),
    /// The options name a secret by an id nothing defines: an encrypted image
    /// is refused ("No secret with id"), a clear one opens, as QEMU looks the
    /// secret up only to decrypt.
    Unknown(String),
}

impl Unlock {
    /// The secret, or the refusal of an encrypted image that needs one.
    pub fn secret(&self, required: impl FnOnce() -> Error) -> Result<&Arc<[u8]>> {
        match self {
            Unlock::None => Err(required()),
            Unlock::Secret(s) => Ok(s),
            Unlock::Unknown(id) => Err(unknown_secret(id)),
        }
    }
}

/// QEMU's refusal of a secret id no `--object secret` defines.
pub fn unknown_secret(id: &str) -> Error {
    Error::invalid_argument(format!("No secret with id '{id}'"))
}

/// What `info` shows of an image's encryption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncryptionInfo {
    /// The legacy AES format.
    Aes,
    Luks(Box<LuksHeader>),
}

/// The encryption of an open image.
pub(crate) struct Encryption {
    pub(crate) info: EncryptionInfo,
    /// `None` when opened for the metadata only.
    cipher: Option<SectorCipher>,
}

impl Encryption {
    /// The encryption `h` records, unlocked as `unlock` says; `None` for a clear image.
    /// Opened for its `metadata_only`, the LUKS header is read and checked but no
    /// secret is needed or used: data clusters can be neither read nor written.
    pub(crate) fn open(
        storage: &dyn Storage,
        h: &Header,
        unlock: &Unlock,
        metadata_only: bool,
    ) -> Result<Option<Encryption>> {
        if h.crypt_method == crypt::NONE {
            return Ok(None);
        }
        let secret = match unlock {
            _ if metadata_only => None,
            u => Some(u.secret(crypto::key_required)?),
        };
        if h.crypt_method == crypt::AES {
            // qemu-img and qemu-io read and write the legacy format (only QEMU's
            // system emulators refuse it); so does strata.
            let cipher = secret.map(|s| crypto::legacy::cipher(s)).transpose()?;
            return Ok(Some(Encryption {
                info: EncryptionInfo::Aes,
                cipher,
            }));
        }
        let ext = h
            .crypto
            .ok_or_else(|| Error::invalid("Missing CRYPTO header for crypt method 2"))?;
        let file_size = storage.size()?;
        let mut read = |off: u64, buf: &mut [u8]| read_area(storage, ext, file_size, off, buf);
        let mut hdr = vec![0u8; crypto::luks::HEADER_LEN];
        read(0, &mut hdr)?;
        let luks = LuksHeader::parse(&hdr)?;
        let cipher = secret.map(|s| luks.unlock(s, &mut read)).transpose()?;
        Ok(Some(Encryption {
            info: EncryptionInfo::Luks(Box::new(luks)),
            cipher,
        }))
    }

    /// Whether IVs count host sectors (LUKS) rather than guest sectors (legacy).
    fn host_iv(&self) -> bool {
        matches!(self.info, EncryptionInfo::Luks(_))
    }

    fn cipher(&self) -> Result<&SectorCipher> {
        self.cipher.as_ref().ok_or_else(crypto::key_required)
    }

    /// Read `buf.len()` guest bytes at guest offset `guest`, stored at `host`, and
    /// decrypt them: whole sectors are read around the range.
    pub(crate) fn read(
        &self,
        storage: &dyn Storage,
        host: u64,
        guest: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let cipher = self.cipher()?;
        let head = host % SECTOR_SIZE;
        let start = host - head;
        let len = (head + buf.len() as u64).next_multiple_of(SECTOR_SIZE);
        let mut tmp = vec![0u8; index(len)];
        storage.read_at(&mut tmp, start)?;
        let first = if self.host_iv() { start } else { guest - head };
        cipher.decrypt(first / SECTOR_SIZE, &mut tmp);
        let head = index(head);
        buf.copy_from_slice(&tmp[head..head + buf.len()]);
        Ok(())
    }

    /// Encrypt `data` (whole sectors) stored at host offset `host` for guest
    /// offset `guest`: the IVs count host sectors (LUKS) or guest sectors (legacy).
    pub(crate) fn seal(&self, host: u64, guest: u64, data: &[u8]) -> Result<Vec<u8>> {
        let cipher = self.cipher()?;
        let first = if self.host_iv() { host } else { guest };
        debug_assert!(
            first.is_multiple_of(SECTOR_SIZE) && (data.len() as u64).is_multiple_of(SECTOR_SIZE)
        );
        let mut out = data.to_vec();
        cipher.encrypt(first / SECTOR_SIZE, &mut out);
        Ok(out)
    }
}

/// Read `buf` at `off` inside the LUKS area `ext`: past the area is refused, past
/// the end of the file reads zeroes (as QEMU reads a file).
pub(crate) fn read_area(
    storage: &dyn Storage,
    ext: CryptoExt,
    file_size: u64,
    off: u64,
    buf: &mut [u8],
) -> Result<()> {
    let len = buf.len() as u64;
    if off.checked_add(len).is_none_or(|e| e > ext.length) {
        return Err(Error::invalid(
            "Request for data outside of extension header",
        ));
    }
    let at = ext
        .offset
        .checked_add(off)
        .filter(|a| {
            a.checked_add(len)
                .is_some_and(|e| e <= super::header::MAX_HOST_OFFSET)
        })
        .ok_or_else(|| Error::invalid("Could not read encryption header: Input/output error"))?;
    buf.fill(0);
    if at < file_size {
        let n = index((file_size - at).min(len));
        storage.read_at(&mut buf[..n], at)?;
    }
    Ok(())
}

/// A new image's LUKS encryption: QEMU's `encrypt.*` create options and the
/// password of key slot 0.
#[derive(Clone)]
pub struct LuksEncrypt {
    pub options: crypto::luks::LuksCreateOptions,
    pub password: Arc<[u8]>,
}

impl std::fmt::Debug for LuksEncrypt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuksEncrypt")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl super::Qcow2Image {
    /// Encrypt a new, still empty image: write a LUKS area into newly allocated
    /// clusters and make it durable (refcounts included), then name it in the
    /// header (crypt_method and the extension) in one write. A crash before the
    /// header write leaks the area's clusters; it never leaves a header naming
    /// an area that is not there.
    pub(crate) fn install_luks(&mut self, enc: &LuksEncrypt) -> Result<()> {
        let (luks, area, cipher) = crypto::luks::create(&enc.options, &enc.password)?;
        {
            let mut m = self.lock()?;
            let bits = m.h.cluster_bits;
            let len = area.len() as u64;
            let host = m.alloc_clusters(crate::units::ClusterCount::for_bytes(len, bits))?;
            let mut padded = area;
            padded.resize(index(len.next_multiple_of(m.cluster_size())), 0);
            m.storage.write_at(&padded, host.get())?;
            m.flush_metadata()?;
            m.storage.flush()?;
            let mut h = m.h.clone();
            h.crypt_method = crypt::LUKS;
            h.crypto = Some(CryptoExt {
                offset: host.get(),
                length: len,
            });
            let bytes = h.serialize()?;
            m.storage.write_at(&bytes, 0)?;
            m.storage.flush()?;
            m.h = h;
        }
        self.crypt = Some(Arc::new(Encryption {
            info: EncryptionInfo::Luks(Box::new(luks)),
            cipher: Some(cipher),
        }));
        Ok(())
    }

    /// Encrypt a new, still empty image with the legacy AES format keyed by
    /// `password`: as QEMU's create, only the header's crypt_method changes (the
    /// key lives outside the file), in one durable header write.
    pub(crate) fn install_aes(&mut self, password: &[u8]) -> Result<()> {
        let cipher = crypto::legacy::cipher(password)?;
        {
            let mut m = self.lock()?;
            m.flush_metadata()?;
            m.storage.flush()?;
            let mut h = m.h.clone();
            h.crypt_method = crypt::AES;
            let bytes = h.serialize()?;
            m.storage.write_at(&bytes, 0)?;
            m.storage.flush()?;
            m.h = h;
        }
        self.crypt = Some(Arc::new(Encryption {
            info: EncryptionInfo::Aes,
            cipher: Some(cipher),
        }));
        Ok(())
    }
}
