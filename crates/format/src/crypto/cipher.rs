//! Sector encryption: a block cipher in a mode (XTS, CBC, ECB), with an IV per
//! 512-byte sector from an IV generator (plain, plain64, ESSIV), as dm-crypt and
//! QEMU define them.

use super::{HashAlg, SECTOR_SIZE};
use crate::units::index;
use crate::{Error, ErrorKind, Result};
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockCipher, BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256};

/// Block cipher algorithms (the AES family: what QEMU creates by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    Aes128,
    Aes192,
    Aes256,
}

impl CipherAlg {
    /// QEMU's name (`aes-256`): what `encrypt.cipher-alg=` takes and `info` prints.
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "aes-128" => CipherAlg::Aes128,
            "aes-192" => CipherAlg::Aes192,
            "aes-256" => CipherAlg::Aes256,
            _ => return None,
        })
    }
    /// Bytes of key for one instance of the block cipher.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }
    /// The AES variant with a key of `len` bytes.
    pub fn aes_with_key_len(len: usize) -> Option<Self> {
        [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256]
            .into_iter()
            .find(|a| a.key_len() == len)
    }
}

/// Block cipher modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    Ecb,
    Cbc,
    Xts,
}

impl CipherMode {
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
        }
    }
    /// Parse QEMU's name; `ctr` is a mode QEMU knows and strata does not implement.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "ecb" => CipherMode::Ecb,
            "cbc" => CipherMode::Cbc,
            "xts" => CipherMode::Xts,
            "ctr" => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("Cipher mode '{name}' not supported"),
                ))
            }
            _ => {
                return Err(Error::invalid(format!(
                    "Cipher mode '{name}' not supported"
                )))
            }
        })
    }
    /// Key bytes for `alg` in this mode (XTS takes two keys).
    pub fn key_len(self, alg: CipherAlg) -> usize {
        match self {
            CipherMode::Xts => 2 * alg.key_len(),
            _ => alg.key_len(),
        }
    }
}

/// IV generators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGenAlg {
    /// The sector number's low 32 bits, little-endian.
    Plain,
    /// The sector number, 64 bits little-endian.
    Plain64,
    /// The sector number encrypted with a key hashed from the data key.
    Essiv,
}

impl IvGenAlg {
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "plain" => IvGenAlg::Plain,
            "plain64" => IvGenAlg::Plain64,
            "essiv" => IvGenAlg::Essiv,
            _ => {
                return Err(Error::invalid(format!(
                    "IV generator '{name}' not supported"
                )))
            }
        })
    }
}

/// One AES instance of any key size.
#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    fn new(alg: CipherAlg, key: &[u8]) -> Aes {
        match alg {
            CipherAlg::Aes128 => Aes::A128(Aes128::new(GenericArray::from_slice(key))),
            CipherAlg::Aes192 => Aes::A192(Aes192::new(GenericArray::from_slice(key))),
            CipherAlg::Aes256 => Aes::A256(Aes256::new(GenericArray::from_slice(key))),
        }
    }
    fn encrypt_block(&self, b: &mut [u8]) {
        let b = GenericArray::from_mut_slice(b);
        match self {
            Aes::A128(c) => c.encrypt_block(b),
            Aes::A192(c) => c.encrypt_block(b),
            Aes::A256(c) => c.encrypt_block(b),
        }
    }
}

/// A mode over one block cipher: encrypts or decrypts one sector with its IV.
trait Mode: Send + Sync {
    fn encrypt(&self, iv: [u8; 16], sector: &mut [u8]);
    fn decrypt(&self, iv: [u8; 16], sector: &mut [u8]);
}

struct Xts<C: BlockEncrypt + BlockDecrypt + BlockCipher>(xts_mode::Xts128<C>);
struct Cbc<C>(C);
struct Ecb<C>(C);

type Block16 = aes::cipher::consts::U16;

impl<C> Mode for Xts<C>
where
    C: BlockEncrypt + BlockDecrypt + BlockCipher<BlockSize = Block16> + Send + Sync,
{
    fn encrypt(&self, iv: [u8; 16], sector: &mut [u8]) {
        self.0.encrypt_sector(sector, iv);
    }
    fn decrypt(&self, iv: [u8; 16], sector: &mut [u8]) {
        self.0.decrypt_sector(sector, iv);
    }
}

impl<C> Mode for Cbc<C>
where
    C: BlockEncrypt + BlockDecrypt + BlockCipher<BlockSize = Block16> + Clone + Send + Sync,
{
    fn encrypt(&self, iv: [u8; 16], sector: &mut [u8]) {
        use cbc::cipher::{BlockEncryptMut, InnerIvInit};
        let mut enc = cbc::Encryptor::<C>::inner_iv_init(self.0.clone(), &iv.into());
        for b in sector.chunks_exact_mut(16) {
            enc.encrypt_block_mut(GenericArray::from_mut_slice(b));
        }
    }
    fn decrypt(&self, iv: [u8; 16], sector: &mut [u8]) {
        use cbc::cipher::{BlockDecryptMut, InnerIvInit};
        let mut dec = cbc::Decryptor::<C>::inner_iv_init(self.0.clone(), &iv.into());
        for b in sector.chunks_exact_mut(16) {
            dec.decrypt_block_mut(GenericArray::from_mut_slice(b));
        }
    }
}

impl<C> Mode for Ecb<C>
where
    C: BlockEncrypt + BlockDecrypt + BlockCipher<BlockSize = Block16> + Send + Sync,
{
    fn encrypt(&self, _iv: [u8; 16], sector: &mut [u8]) {
        for b in sector.chunks_exact_mut(16) {
            self.0.encrypt_block(GenericArray::from_mut_slice(b));
        }
    }
    fn decrypt(&self, _iv: [u8; 16], sector: &mut [u8]) {
        for b in sector.chunks_exact_mut(16) {
            self.0.decrypt_block(GenericArray::from_mut_slice(b));
        }
    }
}

fn mode_for<C>(mode: CipherMode, key: &[u8]) -> Box<dyn Mode>
where
    C: BlockEncrypt
        + BlockDecrypt
        + BlockCipher<BlockSize = Block16>
        + KeyInit
        + Clone
        + Send
        + Sync
        + 'static,
{
    match mode {
        CipherMode::Xts => {
            let (data, tweak) = key.split_at(key.len() / 2);
            Box::new(Xts(xts_mode::Xts128::new(
                C::new(GenericArray::from_slice(data)),
                C::new(GenericArray::from_slice(tweak)),
            )))
        }
        CipherMode::Cbc => Box::new(Cbc(C::new(GenericArray::from_slice(key)))),
        CipherMode::Ecb => Box::new(Ecb(C::new(GenericArray::from_slice(key)))),
    }
}

enum IvGen {
    Plain,
    Plain64,
    Essiv(Box<Aes>),
}

/// Encrypts and decrypts whole 512-byte sectors with one key.
pub struct SectorCipher {
    mode: Box<dyn Mode>,
    ivgen: IvGen,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SectorCipher")
    }
}

impl SectorCipher {
    /// A cipher for `key` (of `mode.key_len(alg)` bytes). ESSIV hashes the key with
    /// `essiv_hash` and uses AES with a key of the digest's length.
    pub fn new(
        alg: CipherAlg,
        mode: CipherMode,
        ivgen: IvGenAlg,
        essiv_hash: Option<HashAlg>,
        key: &[u8],
    ) -> Result<SectorCipher> {
        if key.len() != mode.key_len(alg) {
            return Err(Error::invalid(format!(
                "Algorithm {} with key size {} bytes not supported",
                alg.name(),
                key.len()
            )));
        }
        let ivgen = match ivgen {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv => {
                let hash = essiv_hash
                    .ok_or_else(|| Error::invalid("Missing IV generator hash specification"))?;
                let salt = hash.digest(&[key]);
                let ess = CipherAlg::aes_with_key_len(salt.len()).ok_or_else(|| {
                    Error::new(
                        ErrorKind::Unsupported,
                        format!("No AES cipher with key size {} available", salt.len()),
                    )
                })?;
                IvGen::Essiv(Box::new(Aes::new(ess, &salt)))
            }
        };
        let mode = match alg {
            CipherAlg::Aes128 => mode_for::<Aes128>(mode, key),
            CipherAlg::Aes192 => mode_for::<Aes192>(mode, key),
            CipherAlg::Aes256 => mode_for::<Aes256>(mode, key),
        };
        Ok(SectorCipher { mode, ivgen })
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match &self.ivgen {
            // plain keeps the low 32 bits of the sector number, by definition.
            IvGen::Plain => iv[..4].copy_from_slice(&sector.to_le_bytes()[..4]),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt_block(&mut iv);
            }
        }
        iv
    }

    /// Encrypt `buf` in place, sector by sector; its first sector is number
    /// `sector`. A last partial sector (key material of some key sizes ends in
    /// one) is a shorter unit with its own IV; its length must be a multiple of 16.
    pub fn encrypt(&self, sector: u64, buf: &mut [u8]) {
        for (i, s) in buf.chunks_mut(index(SECTOR_SIZE)).enumerate() {
            self.mode.encrypt(self.iv(sector.wrapping_add(i as u64)), s);
        }
    }

    /// Decrypt `buf` in place, as [`SectorCipher::encrypt`] encrypted it.
    pub fn decrypt(&self, sector: u64, buf: &mut [u8]) {
        for (i, s) in buf.chunks_mut(index(SECTOR_SIZE)).enumerate() {
            self.mode.decrypt(self.iv(sector.wrapping_add(i as u64)), s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IEEE 1619 XTS-AES-256 test vector 10, first sector (number 0xff).
    #[test]
    fn xts_plain64_matches_the_ieee_1619_vector() {
        let mut key = Vec::new();
        key.extend_from_slice(&hex(
            "2718281828459045235360287471352662497757247093699959574966967627",
        ));
        key.extend_from_slice(&hex(
            "3141592653589793238462643383279502884197169399375105820974944592",
        ));
        let c = SectorCipher::new(
            CipherAlg::Aes256,
            CipherMode::Xts,
            IvGenAlg::Plain64,
            None,
            &key,
        )
        .unwrap();
        let mut buf: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
        c.encrypt(0xff, &mut buf);
        assert_eq!(&buf[..16], &hex("1c3b3a102f770386e4836c99e370cf9b")[..]);
        c.decrypt(0xff, &mut buf);
        assert!(buf
            .iter()
            .enumerate()
            .all(|(i, &b)| usize::from(b) == i % 256));
    }

    #[test]
    fn each_ivgen_gives_its_own_ciphertext_and_decrypts_back() {
        let key = [7u8; 32];
        let mut outs = Vec::new();
        for (mode, ivgen) in [
            (CipherMode::Cbc, IvGenAlg::Plain),
            (CipherMode::Cbc, IvGenAlg::Plain64),
            (CipherMode::Cbc, IvGenAlg::Essiv),
            (CipherMode::Ecb, IvGenAlg::Plain64),
        ] {
            let c = SectorCipher::new(CipherAlg::Aes256, mode, ivgen, Some(HashAlg::Sha256), &key)
                .unwrap();
            let mut buf = vec![0u8; 1024];
            c.encrypt(1 << 32, &mut buf);
            outs.push(buf.clone());
            c.decrypt(1 << 32, &mut buf);
            assert!(buf.iter().all(|&b| b == 0));
        }
        // plain truncates sector 2^32 to 0, plain64 does not.
        assert_ne!(outs[0], outs[1]);
        assert_ne!(outs[1], outs[2]);
        // ECB: both sectors alike.
        assert_eq!(outs[3][..512], outs[3][512..]);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
