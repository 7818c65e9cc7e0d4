//! LUKS anti-forensic splitting: a key is spread over `stripes` blocks so that
//! losing any one block of the stored material loses the key.

use super::HashAlg;

/// The diffusion step: each digest-sized chunk `i` of `block` becomes
/// `hash(be32(i) || chunk)`, the last chunk truncated to its length.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let dl = hash.digest_len();
    for (i, chunk) in block.chunks_mut(dl).enumerate() {
        // A block is one key (at most 64 bytes): its chunk index fits u32.
        let iv = u32::try_from(i).expect("chunk index").to_be_bytes();
        let d = hash.digest(&[&iv, chunk]);
        let n = chunk.len();
        chunk.copy_from_slice(&d[..n]);
    }
}

fn xor_into(acc: &mut [u8], other: &[u8]) {
    for (a, b) in acc.iter_mut().zip(other) {
        *a ^= b;
    }
}

/// Split `key` into `stripes` blocks of `key.len()` bytes: all but the last are
/// `random`, the last makes [`merge`] give back the key.
pub(crate) fn split(hash: HashAlg, key: &[u8], stripes: usize, random: &[u8]) -> Vec<u8> {
    let n = key.len();
    let mut out = random[..n * (stripes - 1)].to_vec();
    let mut d = vec![0u8; n];
    for s in out.chunks(n) {
        xor_into(&mut d, s);
        diffuse(hash, &mut d);
    }
    xor_into(&mut d, key);
    out.extend_from_slice(&d);
    out
}

/// The key stored as `material` (`stripes` blocks of `key_len` bytes).
pub(crate) fn merge(hash: HashAlg, material: &[u8], key_len: usize, stripes: usize) -> Vec<u8> {
    let mut d = vec![0u8; key_len];
    let blocks: Vec<&[u8]> = material.chunks(key_len).take(stripes).collect();
    for s in &blocks[..stripes - 1] {
        xor_into(&mut d, s);
        diffuse(hash, &mut d);
    }
    xor_into(&mut d, blocks[stripes - 1]);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_gives_back_what_split_spread() {
        let key: Vec<u8> = (0..64).collect();
        let random: Vec<u8> = (0..=255u8).cycle().step_by(7).take(64 * 9).collect();
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            let m = split(hash, &key, 10, &random);
            assert_eq!(m.len(), 640);
            assert_eq!(merge(hash, &m, 64, 10), key);
            let mut bad = m.clone();
            bad[3] ^= 1;
            assert_ne!(merge(hash, &bad, 64, 10), key);
        }
    }
}
