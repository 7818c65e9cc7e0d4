//! Snapshot, tree and node documents in restic's JSON shapes. Fields restic writes
//! that strata does not use are tolerated on reading.

use crate::id::Id;
use serde::{Deserialize, Serialize};

/// One entry of a tree: a file (with its content blobs) or a directory (with its
/// subtree); other types (symlinks, devices) are carried but not restored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub mode: u64,
    #[serde(default)]
    pub mtime: String,
    #[serde(default)]
    pub atime: String,
    #[serde(default)]
    pub ctime: String,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    #[serde(default)]
    pub inode: u64,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub links: u64,
    #[serde(default)]
    pub content: Option<Vec<Id>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<Id>,
}

/// A directory listing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tree {
    #[serde(default)]
    pub nodes: Vec<Node>,
}

impl Tree {
    /// The tree blob's plaintext as restic writes it: the JSON document and a newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("trees serialize");
        v.push(b'\n');
        v
    }
}

/// A snapshot document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Id>,
    pub tree: Id,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<Id>,
}

/// The tag of a snapshot that holds an image of strata's image registry
/// (beside `image-id=ID`). Such snapshots are the registry's to forget: disk
/// listings and `latest` pass over them and prune always keeps them.
pub const IMAGE_TAG: &str = "strata-image";

/// The prefix of the tag naming the registry image a snapshot holds.
pub const IMAGE_ID_TAG: &str = "image-id=";

impl Snapshot {
    /// Whether the snapshot holds an image of the image registry.
    pub fn is_image(&self) -> bool {
        self.tags.iter().any(|t| t == IMAGE_TAG)
    }

    /// The snapshot time, for ordering (the epoch if unparsable).
    pub fn timestamp(&self) -> crate::time::Timestamp {
        crate::time::Timestamp::parse(&self.time)
            .unwrap_or(crate::time::Timestamp { secs: 0, nanos: 0 })
    }
}
