//! restic's authenticated encryption: AES-256 in counter mode, then a Poly1305-AES
//! MAC over the ciphertext, stored as `IV || CIPHERTEXT || MAC` (32 bytes of
//! overhead). The 16-byte random IV is both the counter block (a 128-bit
//! big-endian counter) and the Poly1305-AES nonce. Keys come from the password
//! through scrypt with the parameters a key file records.

use crate::error::{Error, ErrorKind, Result};
use aes::cipher::{BlockEncrypt, KeyInit, KeyIvInit, StreamCipher};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use poly1305::Poly1305;

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

/// Bytes an encrypted file or blob has on top of its plaintext.
pub const OVERHEAD: usize = 32;
const IV_LEN: usize = 16;
/// Where the ciphertext (and, once opened in place, the plaintext) starts.
pub const PLAIN_START: usize = IV_LEN;
/// The MAC closing a sealed file or blob.
pub const MAC_LEN: usize = 16;
/// The most memory a key file's scrypt parameters may ask for (N * r * 128 bytes).
const MAX_KDF_MEMORY: u64 = 1 << 30;

/// Fill `buf` from the operating system's secure random source.
pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("no secure random numbers available: {e}"),
        )
    })
}

/// A repository's master key (or a key derived from a password): 32 bytes for
/// AES-256 and the two 16-byte halves of the Poly1305-AES key.
#[derive(Clone)]
pub struct Key {
    encrypt: [u8; 32],
    mac_k: [u8; 16],
    mac_r: [u8; 16],
}

impl Key {
    /// A fresh random key.
    pub fn random() -> Result<Key> {
        let mut b = [0u8; 64];
        fill_random(&mut b)?;
        Ok(Key::from_bytes(&b))
    }

    /// The first 32 bytes encrypt, the next 16 are the MAC's AES key `k`, the last
    /// 16 its `r` (as a key derived by scrypt is split).
    fn from_bytes(b: &[u8; 64]) -> Key {
        let mut k = Key {
            encrypt: [0; 32],
            mac_k: [0; 16],
            mac_r: [0; 16],
        };
        k.encrypt.copy_from_slice(&b[..32]);
        k.mac_k.copy_from_slice(&b[32..48]);
        k.mac_r.copy_from_slice(&b[48..]);
        k
    }

    /// Derive the key a key file's `data` is sealed with from `password`.
    pub fn derive(password: &[u8], salt: &[u8], n: u64, r: u32, p: u32) -> Result<Key> {
        let bad = |m: String| Error::new(ErrorKind::Unsupported, m);
        if !n.is_power_of_two() || n < 2 {
            return Err(bad(format!("scrypt N={n} is not a power of two")));
        }
        // A key file is input: refuse costs that would exhaust memory or time.
        let memory = n.checked_mul(u64::from(r)).and_then(|v| v.checked_mul(128));
        if memory.is_none_or(|m| m > MAX_KDF_MEMORY) || p > 16 {
            return Err(bad(format!(
                "scrypt parameters N={n} r={r} p={p} exceed the limits (1 GiB of memory, p <= 16)"
            )));
        }
        let params = scrypt::Params::new(n.trailing_zeros() as u8, r, p, 64)
            .map_err(|e| bad(format!("scrypt parameters N={n} r={r} p={p}: {e}")))?;
        let mut out = [0u8; 64];
        scrypt::scrypt(password, salt, &params, &mut out)
            .map_err(|e| bad(format!("scrypt failed: {e}")))?;
        Ok(Key::from_bytes(&out))
    }

    fn mac(&self, iv: &[u8; IV_LEN], ciphertext: &[u8]) -> [u8; MAC_LEN] {
        // Poly1305-AES: the one-time pad half of the Poly1305 key is AES_k(nonce).
        let mut s = aes::Block::from(*iv);
        aes::Aes128::new(&self.mac_k.into()).encrypt_block(&mut s);
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(&self.mac_r);
        key[16..].copy_from_slice(&s);
        Poly1305::new(&key.into())
            .compute_unpadded(ciphertext)
            .into()
    }

    /// Encrypt and authenticate `plaintext` under a fresh random IV.
    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
        self.seal_into(plaintext, &mut out)?;
        Ok(out)
    }

    /// [`Key::seal`] appending to `out` (one copy of `plaintext`, encrypted
    /// where it lands).
    pub fn seal_into(&self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let mut iv = [0u8; IV_LEN];
        fill_random(&mut iv)?;
        out.reserve(plaintext.len() + OVERHEAD);
        let start = out.len();
        out.extend_from_slice(&iv);
        out.extend_from_slice(plaintext);
        let ct = &mut out[start + IV_LEN..];
        Aes256Ctr::new(&self.encrypt.into(), &iv.into()).apply_keystream(ct);
        let mac = self.mac(&iv, ct);
        out.extend_from_slice(&mac);
        Ok(())
    }

    /// Check the MAC of `IV || CIPHERTEXT || MAC` and decrypt it. `None` when the
    /// bytes are too short or fail authentication (wrong key or damaged data).
    pub fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        let iv = self.authenticate(sealed)?;
        let mut out = sealed[IV_LEN..sealed.len() - MAC_LEN].to_vec();
        Aes256Ctr::new(&self.encrypt.into(), &iv.into()).apply_keystream(&mut out);
        Some(out)
    }

    /// [`Key::open`] without a copy: check the MAC and decrypt the ciphertext
    /// where it lies; the plaintext is then `sealed[PLAIN_START..sealed.len() -
    /// MAC_LEN]`. `false` (and `sealed` unchanged) when it fails authentication.
    pub fn open_in_place(&self, sealed: &mut [u8]) -> bool {
        let Some(iv) = self.authenticate(sealed) else {
            return false;
        };
        let end = sealed.len() - MAC_LEN;
        Aes256Ctr::new(&self.encrypt.into(), &iv.into()).apply_keystream(&mut sealed[IV_LEN..end]);
        true
    }

    /// The IV of `sealed` when it is long enough and its MAC is right.
    fn authenticate(&self, sealed: &[u8]) -> Option<[u8; IV_LEN]> {
        if sealed.len() < OVERHEAD {
            return None;
        }
        let iv: [u8; IV_LEN] = sealed[..IV_LEN].try_into().ok()?;
        let (ct, mac) = sealed[IV_LEN..].split_at(sealed.len() - OVERHEAD);
        let want = self.mac(&iv, ct);
        // Compare without an early exit.
        if want.iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0 {
            return None;
        }
        Some(iv)
    }

    /// The master key as restic's key files hold it (`{"mac":{"k","r"},"encrypt"}`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mac": { "k": B64.encode(self.mac_k), "r": B64.encode(self.mac_r) },
            "encrypt": B64.encode(self.encrypt),
        })
    }

    /// Parse the master key JSON of a key file.
    pub fn from_json(v: &serde_json::Value) -> Option<Key> {
        fn field<const N: usize>(v: &serde_json::Value) -> Option<[u8; N]> {
            B64.decode(v.as_str()?).ok()?.try_into().ok()
        }
        Some(Key {
            encrypt: field(&v["encrypt"])?,
            mac_k: field(&v["mac"]["k"])?,
            mac_r: field(&v["mac"]["r"])?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_data_opens_and_any_flipped_bit_is_refused() {
        let key = Key::random().unwrap();
        let sealed = key.seal(b"hello, repository").unwrap();
        assert_eq!(sealed.len(), 17 + OVERHEAD);
        assert_eq!(key.open(&sealed).unwrap(), b"hello, repository");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert!(key.open(&bad).is_none(), "flip at byte {i} accepted");
        }
        assert!(Key::random().unwrap().open(&sealed).is_none());
    }

    #[test]
    fn opening_in_place_gives_the_plaintext_and_refuses_a_flipped_bit() {
        let key = Key::random().unwrap();
        let mut sealed = b"prefix:".to_vec();
        key.seal_into(b"hello, in place", &mut sealed).unwrap();
        let mut sealed = sealed.split_off(7);
        let mut bad = sealed.clone();
        bad[20] ^= 1;
        assert!(!key.open_in_place(&mut bad));
        assert!(key.open_in_place(&mut sealed));
        assert_eq!(
            &sealed[PLAIN_START..sealed.len() - MAC_LEN],
            b"hello, in place"
        );
    }

    #[test]
    fn poly1305_aes_matches_the_papers_test_vector() {
        // Test vector from "The Poly1305-AES message-authentication code" (appendix B, 2nd).
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let mut key = Key::from_bytes(&[0u8; 64]);
        key.mac_k
            .copy_from_slice(&hex("ec074c835580741701425b623235add6"));
        key.mac_r
            .copy_from_slice(&hex("851fc40c3467ac0be05cc20404f3f700"));
        let nonce: [u8; 16] = hex("fb447350c4e868c52ac3275cf9d4327e").try_into().unwrap();
        let mac = key.mac(&nonce, &hex("f3f6"));
        assert_eq!(mac.to_vec(), hex("f4c633c3044fc145f84f335cb81953de"));
    }

    #[test]
    fn key_files_asking_for_too_much_memory_are_refused() {
        let e = Key::derive(b"pw", b"salt", 1 << 30, 8, 1).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(Key::derive(b"pw", b"salt", 1 << 10, 8, 17).is_err());
        assert!(Key::derive(b"pw", b"salt", 1000, 8, 1).is_err());
    }

    #[test]
    fn master_key_json_round_trips() {
        let key = Key::random().unwrap();
        let back = Key::from_json(&key.to_json()).unwrap();
        let sealed = key.seal(b"x").unwrap();
        assert_eq!(back.open(&sealed).unwrap(), b"x");
    }
}
