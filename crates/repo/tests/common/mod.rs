//! Helpers shared by the repository tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use strata_repo::{KdfParams, LocalBackend, Repository};

pub const PASSWORD: &str = "correct horse";
pub const MIB: u64 = 1 << 20;

/// Cheap scrypt parameters: these tests are about the format, not the KDF's cost.
pub fn kdf() -> KdfParams {
    KdfParams {
        n: 1024,
        r: 8,
        p: 1,
    }
}

/// A new repository in `dir/repo`.
pub fn new_repo(dir: &Path) -> Repository {
    Repository::init(
        Arc::new(LocalBackend::new(dir.join("repo"))),
        PASSWORD,
        kdf(),
    )
    .unwrap()
}

/// Deterministic incompressible bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
