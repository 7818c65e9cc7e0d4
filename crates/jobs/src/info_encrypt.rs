//! The `encrypt` block `info` shows for an encrypted qcow2 image (and the
//! format-specific block of a `luks` image): QEMU's
//! QCryptoBlockInfo (`format`, then for LUKS the algorithms, offsets, key
//! iterations, UUID and the eight key slots), members in QEMU's schema order.

use serde::Serialize;
use strata_format::crypto::luks::LuksHeader;
use strata_format::crypto::SECTOR_SIZE;
use strata_format::qcow2::EncryptionInfo;

/// The encryption of an image, tagged by format.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "format", rename_all = "lowercase")]
pub enum EncryptInfo {
    Aes {},
    Luks(LuksInfo),
}

/// A LUKS header as `info` reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LuksInfo {
    pub cipher_alg: String,
    pub cipher_mode: String,
    pub ivgen_alg: String,
    /// Only for the ESSIV generator, as QEMU reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ivgen_hash_alg: Option<String>,
    pub hash_alg: String,
    pub detached_header: bool,
    /// Bytes of the LUKS area.
    pub payload_offset: u64,
    pub master_key_iters: u32,
    pub uuid: String,
    pub slots: Vec<LuksSlotInfo>,
}

/// One key slot: iterations and stripes only for an active one.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LuksSlotInfo {
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iters: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripes: Option<u32>,
    pub key_offset: u64,
}

impl EncryptInfo {
    pub fn of(e: &EncryptionInfo) -> EncryptInfo {
        match e {
            EncryptionInfo::Aes => EncryptInfo::Aes {},
            EncryptionInfo::Luks(h) => EncryptInfo::Luks(luks(h)),
        }
    }
}

/// What `info` shows of a LUKS header (a qcow2 image's or a `luks` image's).
pub fn luks(h: &LuksHeader) -> LuksInfo {
    LuksInfo {
        cipher_alg: h.cipher_alg.name().into(),
        cipher_mode: h.cipher_mode.name().into(),
        ivgen_alg: h.ivgen_alg.name().into(),
        ivgen_hash_alg: (h.ivgen_alg == strata_format::crypto::IvGenAlg::Essiv)
            .then(|| h.ivgen_hash_alg.map(|a| a.name().to_string()))
            .flatten(),
        hash_alg: h.hash_alg.name().into(),
        detached_header: false,
        payload_offset: h.area_len(),
        master_key_iters: h.master_key_iterations,
        uuid: h.uuid.clone(),
        slots: h
            .slots
            .iter()
            .map(|s| LuksSlotInfo {
                active: s.active,
                iters: s.active.then_some(s.iterations),
                stripes: s.active.then_some(s.stripes),
                key_offset: u64::from(s.key_offset) * SECTOR_SIZE,
            })
            .collect(),
    }
}
