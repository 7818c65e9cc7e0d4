//! `strata backup create --vm NAME`: a backup of a running VM's disk from a
//! consistent point QEMU holds (see `strata_vm::backup`), read over QEMU's NBD
//! export. The snapshot's tags name the VM, the disk and the dirty bitmap that
//! records from its point on; the next backup of the same disk takes the latest
//! such snapshot as its parent and reads only the chunks the bitmap marks.
//! Without a usable bitmap it reads everything and says why on stderr.

use super::nbd::{back_up_export, bitmap_context, contexts, ExportRead, TAG_BITMAP};
use super::CreateArgs;
use anyhow::{anyhow, Result};
use strata_nbd::client::Client;
use strata_repo::chunk::ChunkSize;
use strata_repo::disk::BackupOptions;
use strata_repo::{Id, Repository};
use strata_vm::backup::BackupPoint;
use strata_vm::{Manager, StateDir};

/// The tag prefixes of a VM disk backup.
const TAG_VM: &str = "vm:";
const TAG_DISK: &str = "disk:";

pub(super) fn create(a: CreateArgs) -> Result<()> {
    let name = a.vm.clone().expect("called with --vm");
    let mut repo = a.repo.open()?;
    let (vm_tag, disk_tag) = (format!("{TAG_VM}{name}"), format!("{TAG_DISK}{}", a.disk));
    let parent = match &a.parent {
        Some(p) => Some(repo.find_snapshot(p)?),
        None => repo
            .snapshots()?
            .into_iter()
            .rev()
            .find(|(_, s)| s.tags.contains(&vm_tag) && s.tags.contains(&disk_tag)),
    };
    let since = parent.as_ref().and_then(|(_, s)| {
        s.tags
            .iter()
            .find_map(|t| t.strip_prefix(TAG_BITMAP).map(str::to_string))
    });
    let mgr = Manager::new(StateDir::resolve(a.state_dir.clone()));
    let parent_id = parent.map(|(id, _)| id);
    mgr.backup_point(&name, a.disk, since.as_deref(), |point| {
        let mut tags = a.tags.clone();
        tags.extend([vm_tag.clone(), disk_tag.clone()]);
        if let Some(b) = &point.bitmap {
            tags.push(format!("{TAG_BITMAP}{b}"));
        }
        back_up_point(&mut repo, point, parent_id, tags, a.chunk_size)
    })?
}

/// Read the point through its export: only the changed chunks when the parent
/// and the bitmap of changes allow it, else everything (said on stderr).
fn back_up_point(
    repo: &mut Repository,
    point: &BackupPoint,
    parent: Option<Id>,
    tags: Vec<String>,
    chunk_size: Option<ChunkSize>,
) -> Result<()> {
    let context = point.changes.as_deref().map(bitmap_context);
    let client = Client::connect_unix(&point.socket, &point.export, &contexts(context.as_deref()))?;
    if client.size() != point.size {
        return Err(anyhow!(
            "the export shows {} bytes where the disk has {}",
            client.size(),
            point.size
        ));
    }
    let mut opts = BackupOptions::for_image(&point.disk_file);
    opts.tags = tags;
    opts.parent = parent;
    let how = ExportRead {
        bitmap_context: context.as_deref(),
        parent,
        full_reason: point.full_reason.clone(),
        no_parent: "there is no previous backup of this disk",
        chunk_size,
    };
    back_up_export(repo, client, how, opts)
}
