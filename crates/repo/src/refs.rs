//! What the snapshots reference: every tree and data blob reachable from them,
//! and, for damaged blobs, which snapshots, files and file offsets use them.

use crate::error::{Error, ErrorKind, Result};
use crate::id::Id;
use crate::pack::BlobType;
use crate::repository::Repository;
use crate::tree::Snapshot;
use std::collections::{HashMap, HashSet};

/// The blobs a set of snapshots reaches.
#[derive(Debug, Default)]
pub struct Referenced {
    pub trees: HashSet<Id>,
    pub data: HashSet<Id>,
    /// Logical bytes: the sum of the sizes of every file of every snapshot (a
    /// file in two snapshots counts twice).
    pub logical_bytes: u64,
}

impl Referenced {
    pub fn contains(&self, kind: BlobType, id: &Id) -> bool {
        match kind {
            BlobType::Tree => self.trees.contains(id),
            BlobType::Data => self.data.contains(id),
        }
    }
}

/// Walk every tree of `snapshots`. A tree that cannot be loaded (missing from the
/// index or damaged) is an error naming it and a snapshot that reaches it.
pub fn referenced(repo: &Repository, snapshots: &[(Id, Snapshot)]) -> Result<Referenced> {
    let (r, mut failures) = referenced_lenient(repo, snapshots);
    match failures.pop() {
        Some((_, e)) => Err(e),
        None => Ok(r),
    }
}

/// Like [`referenced`], but a tree that cannot be loaded is listed with its error
/// and the walk goes on.
pub fn referenced_lenient(
    repo: &Repository,
    snapshots: &[(Id, Snapshot)],
) -> (Referenced, Vec<(Id, Error)>) {
    let mut r = Referenced::default();
    let mut failures = Vec::new();
    // Per tree: the sizes of its files and its subtrees, to count each
    // snapshot's logical bytes in full even where trees are shared.
    let mut sizes: HashMap<Id, (u64, Vec<Id>)> = HashMap::new();
    for (sid, snap) in snapshots {
        let mut todo = vec![snap.tree];
        while let Some(t) = todo.pop() {
            if !r.trees.insert(t) {
                continue;
            }
            let tree = match repo.load_tree(&t) {
                Ok(tree) => tree,
                Err(e) => {
                    let e = e.wrap(format_args!(
                        "snapshot {} reaches tree {}",
                        sid.short(),
                        t.short()
                    ));
                    failures.push((t, e));
                    continue;
                }
            };
            let entry = sizes.entry(t).or_default();
            for node in tree.nodes {
                if node.kind == "file" {
                    entry.0 = entry.0.saturating_add(node.size);
                }
                r.data.extend(node.content.into_iter().flatten());
                entry.1.extend(node.subtree);
                todo.extend(node.subtree);
            }
        }
        let mut todo = vec![snap.tree];
        while let Some(t) = todo.pop() {
            if let Some((bytes, subtrees)) = sizes.get(&t) {
                r.logical_bytes = r.logical_bytes.saturating_add(*bytes);
                todo.extend(subtrees);
            }
        }
    }
    (r, failures)
}

/// One use of a blob by a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobUse {
    pub snapshot: Id,
    /// The file's path in the snapshot (`/disk.raw`), or the directory a tree is.
    pub path: String,
    /// Where the blob's bytes start in the file (`None` for a tree, or when an
    /// earlier blob of the file is not in the index, so its length is unknown).
    pub offset: Option<u64>,
}

/// For each of the `wanted` blobs, every snapshot, file and offset using it.
/// Trees that cannot be loaded are skipped (a damaged tree is itself reported
/// through `wanted`).
pub fn users(
    repo: &Repository,
    snapshots: &[(Id, Snapshot)],
    wanted: &HashSet<Id>,
) -> HashMap<Id, Vec<BlobUse>> {
    let mut out: HashMap<Id, Vec<BlobUse>> = HashMap::new();
    for (sid, snap) in snapshots {
        let mut todo = vec![(snap.tree, String::from("/"))];
        while let Some((t, dir)) = todo.pop() {
            if wanted.contains(&t) {
                out.entry(t).or_default().push(BlobUse {
                    snapshot: *sid,
                    path: dir.clone(),
                    offset: None,
                });
            }
            let Ok(tree) = repo.load_tree(&t) else {
                continue;
            };
            for node in tree.nodes {
                let path = format!("{}/{}", dir.trim_end_matches('/'), node.name);
                let mut offset = Some(0u64);
                for id in node.content.iter().flatten() {
                    if wanted.contains(id) {
                        out.entry(*id).or_default().push(BlobUse {
                            snapshot: *sid,
                            path: path.clone(),
                            offset,
                        });
                    }
                    let len = repo
                        .index()
                        .get(BlobType::Data, id)
                        .map(|l| l.plain_length());
                    offset = offset.zip(len).and_then(|(o, l)| o.checked_add(l));
                }
                if let Some(sub) = node.subtree {
                    todo.push((sub, path));
                }
            }
        }
    }
    out
}

/// Every referenced blob must be in the index; the first that is not, as an error.
pub fn require_indexed(repo: &Repository, r: &Referenced) -> Result<()> {
    let kinds = [(BlobType::Tree, &r.trees), (BlobType::Data, &r.data)];
    for (kind, ids) in kinds {
        if let Some(id) = ids.iter().find(|id| !repo.index().contains(kind, id)) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("{kind:?} blob {id} is referenced by a snapshot but missing from the index (run 'strata backup verify')"),
            ));
        }
    }
    Ok(())
}
