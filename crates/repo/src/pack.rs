//! Pack files: `EncryptedBlob1 || ... || EncryptedBlobN || EncryptedHeader ||
//! Header_Length`. The header lists, per blob, its type byte, encrypted length,
//! plaintext length (compressed types only) and plaintext SHA-256; it is sealed
//! like any file and its sealed length closes the pack as a little-endian u32.

use crate::crypto::{Key, OVERHEAD};
use crate::error::{Error, Result};
use crate::id::Id;
use serde::{Deserialize, Serialize};

/// The two kinds of blobs; a version 2 repository keeps them in separate packs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobType {
    Data,
    Tree,
}

/// Where a blob sits in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedBlob {
    pub id: Id,
    pub kind: BlobType,
    /// Offset of the sealed blob in the pack.
    pub offset: u64,
    /// Length of the sealed blob.
    pub length: u32,
    /// Plaintext length when the blob is zstd-compressed.
    pub uncompressed_length: Option<u32>,
}

const ENTRY: usize = 1 + 4 + 32;
const ENTRY_COMPRESSED: usize = ENTRY + 4;

/// Accumulates sealed blobs of one type into a pack held in memory.
pub struct PackWriter {
    pub kind: BlobType,
    buf: Vec<u8>,
    blobs: Vec<PackedBlob>,
}

impl PackWriter {
    pub fn new(kind: BlobType) -> Self {
        Self::with_buffer(kind, Vec::new())
    }

    /// A writer filling `buf` (cleared; a buffer of a pack written before, or
    /// one with the capacity a full pack needs, so the pack is never moved
    /// while it grows).
    pub fn with_buffer(kind: BlobType, mut buf: Vec<u8>) -> Self {
        buf.clear();
        PackWriter {
            kind,
            buf,
            blobs: Vec::new(),
        }
    }

    /// Bytes of blob data so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Append one sealed blob.
    pub fn add(&mut self, id: Id, sealed: &[u8], uncompressed_length: Option<u32>) -> Result<()> {
        let length = u32::try_from(sealed.len())
            .map_err(|_| Error::new(crate::ErrorKind::Invalid, "blob larger than 4 GiB"))?;
        self.blobs.push(PackedBlob {
            id,
            kind: self.kind,
            offset: self.buf.len() as u64,
            length,
            uncompressed_length,
        });
        self.buf.extend_from_slice(sealed);
        Ok(())
    }

    /// Seal the header onto the blobs: the pack's bytes, its storage ID and its blobs.
    pub fn finish(mut self, key: &Key) -> Result<(Vec<u8>, Id, Vec<PackedBlob>)> {
        let mut header = Vec::with_capacity(self.blobs.len() * ENTRY_COMPRESSED);
        for b in &self.blobs {
            let type_byte = match (b.kind, b.uncompressed_length.is_some()) {
                (BlobType::Data, false) => 0u8,
                (BlobType::Tree, false) => 1,
                (BlobType::Data, true) => 2,
                (BlobType::Tree, true) => 3,
            };
            header.push(type_byte);
            header.extend_from_slice(&b.length.to_le_bytes());
            if let Some(u) = b.uncompressed_length {
                header.extend_from_slice(&u.to_le_bytes());
            }
            header.extend_from_slice(&b.id.0);
        }
        let sealed = key.seal(&header)?;
        self.buf.extend_from_slice(&sealed);
        self.buf
            .extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        let id = Id::hash(&self.buf);
        Ok((self.buf, id, self.blobs))
    }
}

/// Read the blob list of a pack from its trailing header (`tail` is the end of
/// the pack, at least the header and its length; `pack_len` the whole length).
pub fn parse_header(key: &Key, pack: &[u8]) -> Result<Vec<PackedBlob>> {
    let bad = |m: &str| Error::corrupt(format!("pack header: {m}"));
    if pack.len() < 4 + OVERHEAD {
        return Err(bad("pack too short"));
    }
    let hlen = u32::from_le_bytes(pack[pack.len() - 4..].try_into().unwrap()) as usize;
    let hstart = pack
        .len()
        .checked_sub(4 + hlen)
        .ok_or_else(|| bad("header length larger than the pack"))?;
    let header = key
        .open(&pack[hstart..pack.len() - 4])
        .ok_or_else(|| bad("authentication failed"))?;
    let mut blobs = Vec::new();
    let mut pos = 0usize;
    let mut offset = 0u64;
    while pos < header.len() {
        let t = header[pos];
        let compressed = t & 2 != 0;
        let kind = if t & 1 == 0 {
            BlobType::Data
        } else {
            BlobType::Tree
        };
        let size = if compressed { ENTRY_COMPRESSED } else { ENTRY };
        if t > 3 || pos + size > header.len() {
            return Err(bad("malformed entry"));
        }
        let e = &header[pos..pos + size];
        let length = u32::from_le_bytes(e[1..5].try_into().unwrap());
        let uncompressed_length =
            compressed.then(|| u32::from_le_bytes(e[5..9].try_into().unwrap()));
        let id = Id(e[size - 32..].try_into().unwrap());
        blobs.push(PackedBlob {
            id,
            kind,
            offset,
            length,
            uncompressed_length,
        });
        offset += u64::from(length);
        pos += size;
    }
    if offset != hstart as u64 {
        return Err(bad("blob lengths do not add up to the pack's size"));
    }
    Ok(blobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_pack_parses_back_to_its_blobs() {
        let key = Key::random().unwrap();
        let mut w = PackWriter::new(BlobType::Data);
        let a = key.seal(b"aaaa").unwrap();
        let b = key.seal(b"bb").unwrap();
        w.add(Id::hash(b"aaaa"), &a, None).unwrap();
        w.add(Id::hash(b"bbbbbbbb"), &b, Some(8)).unwrap();
        let (bytes, id, blobs) = w.finish(&key).unwrap();
        assert_eq!(id, Id::hash(&bytes));
        assert_eq!(parse_header(&key, &bytes).unwrap(), blobs);
        assert_eq!(blobs[1].offset, a.len() as u64);
        let expected = a.len() + b.len() + OVERHEAD + ENTRY + ENTRY_COMPRESSED + 4;
        assert_eq!(bytes.len(), expected);
    }
}
