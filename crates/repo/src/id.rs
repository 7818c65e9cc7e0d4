//! Storage and blob IDs: SHA-256 hashes, written as lower-case hex.

use crate::error::{Error, ErrorKind, Result};
use sha2::{Digest, Sha256};
use std::fmt;

/// A SHA-256 hash naming a file (of its stored bytes) or a blob (of its plaintext).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(pub [u8; 32]);

impl Id {
    /// The hash of `data`.
    pub fn hash(data: &[u8]) -> Id {
        Id(Sha256::digest(data).into())
    }

    /// 32 random bytes (a repository ID).
    pub fn random() -> Result<Id> {
        let mut b = [0u8; 32];
        crate::crypto::fill_random(&mut b)?;
        Ok(Id(b))
    }

    /// Parse 64 hex digits.
    pub fn parse(s: &str) -> Result<Id> {
        let bytes = s.as_bytes();
        let bad = || Error::new(ErrorKind::Corrupt, format!("'{s}' is not a valid ID"));
        if bytes.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(bad)?;
            let lo = hex_val(pair[1]).ok_or_else(bad)?;
            out[i] = hi << 4 | lo;
        }
        Ok(Id(out))
    }

    /// The first 8 hex digits, as restic shows IDs.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

impl serde::Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Id, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Id::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_through_hex() {
        let id = Id::hash(b"strata");
        assert_eq!(Id::parse(&id.to_string()).unwrap(), id);
        assert_eq!(id.short().len(), 8);
        assert!(Id::parse("abc").is_err());
        assert!(Id::parse(&"g".repeat(64)).is_err());
    }
}
