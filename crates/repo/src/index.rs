//! Index files (which blob is where) and the in-memory index built from them.

use crate::id::Id;
use crate::pack::{BlobType, PackedBlob};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// An index file's JSON document.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct IndexFile {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supersedes: Vec<Id>,
    pub packs: Vec<IndexPack>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexPack {
    pub id: Id,
    pub blobs: Vec<IndexBlob>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexBlob {
    pub id: Id,
    #[serde(rename = "type")]
    pub kind: BlobType,
    pub offset: u64,
    pub length: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncompressed_length: Option<u32>,
}

impl IndexPack {
    pub fn new(pack: Id, blobs: &[PackedBlob]) -> Self {
        IndexPack {
            id: pack,
            blobs: blobs
                .iter()
                .map(|b| IndexBlob {
                    id: b.id,
                    kind: b.kind,
                    offset: b.offset,
                    length: b.length,
                    uncompressed_length: b.uncompressed_length,
                })
                .collect(),
        }
    }
}

/// Where to find a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: Id,
    pub offset: u64,
    pub length: u32,
    pub uncompressed_length: Option<u32>,
}

impl BlobLocation {
    /// The plaintext length.
    pub fn plain_length(&self) -> u64 {
        match self.uncompressed_length {
            Some(u) => u64::from(u),
            None => u64::from(self.length).saturating_sub(crate::crypto::OVERHEAD as u64),
        }
    }
}

/// Every blob of the repository, by type and ID.
#[derive(Debug, Default)]
pub struct Index {
    blobs: HashMap<(BlobType, Id), BlobLocation>,
}

impl Index {
    pub fn add_file(&mut self, file: &IndexFile) {
        for p in &file.packs {
            for b in &p.blobs {
                self.blobs.insert(
                    (b.kind, b.id),
                    BlobLocation {
                        pack: p.id,
                        offset: b.offset,
                        length: b.length,
                        uncompressed_length: b.uncompressed_length,
                    },
                );
            }
        }
    }

    pub fn get(&self, kind: BlobType, id: &Id) -> Option<&BlobLocation> {
        self.blobs.get(&(kind, *id))
    }

    pub fn contains(&self, kind: BlobType, id: &Id) -> bool {
        self.blobs.contains_key(&(kind, *id))
    }

    /// Number of blobs of `kind`.
    pub fn count(&self, kind: BlobType) -> usize {
        self.blobs.keys().filter(|(k, _)| *k == kind).count()
    }
}
