//! The chunker polynomial of a repository's config: a random irreducible
//! polynomial of degree 53 over GF(2), as restic's content-defined chunker needs
//! (strata's fixed-size disk chunks do not use it; restic uses it to back up into
//! the same repository).

use crate::error::Result;

const DEGREE: u32 = 53;

fn deg(p: u64) -> u32 {
    63 - p.leading_zeros()
}

/// `p` modulo `f` (f non-zero).
fn reduce(mut p: u64, f: u64) -> u64 {
    let df = deg(f);
    while p != 0 && deg(p) >= df {
        p ^= f << (deg(p) - df);
    }
    p
}

/// `a * b mod f`, for `a`, `b` already reduced modulo `f` (deg f ≤ 62).
fn mulmod(mut a: u64, mut b: u64, f: u64) -> u64 {
    let df = deg(f);
    let mut r = 0;
    while b != 0 {
        if b & 1 == 1 {
            r ^= a;
        }
        b >>= 1;
        a <<= 1;
        if a >> df & 1 == 1 {
            a ^= f;
        }
    }
    r
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        let r = reduce(a, b);
        a = b;
        b = r;
    }
    a
}

/// Whether `f`, of prime degree 53, is irreducible (Rabin's test: x^(2^53) ≡ x mod f
/// and f shares no factor with x^2 - x).
pub fn is_irreducible(f: u64) -> bool {
    if f == 0 || deg(f) != DEGREE {
        return false;
    }
    let x = 2u64;
    let mut p = x;
    for _ in 0..DEGREE {
        p = mulmod(p, p, f);
    }
    p == x && gcd(f, mulmod(x, x, f) ^ x) == 1
}

/// A random irreducible polynomial of degree 53.
pub fn random_polynomial() -> Result<u64> {
    loop {
        let mut b = [0u8; 8];
        crate::crypto::fill_random(&mut b)?;
        let f = (u64::from_le_bytes(b) & ((1 << DEGREE) - 1)) | 1 << DEGREE | 1;
        if is_irreducible(f) {
            return Ok(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restics_documented_polynomial_is_irreducible_and_products_are_not() {
        assert!(is_irreducible(0x25b468838dcb75));
        // (x^52 + ... ) * (x + 1) has degree 53 but a factor.
        assert!(!is_irreducible(mulmod(
            0x1b468838dcb75 | 1 << 52,
            3,
            u64::MAX >> 1
        )));
        let f = random_polynomial().unwrap();
        assert!(is_irreducible(f) && deg(f) == 53);
    }
}
