//! Backups read over NBD: `strata backup create --nbd URL` (any export), and the
//! point-in-time export of a running VM (`--vm`, see `vm.rs`). Ranges the
//! export's `base:allocation` context reports as zeroes are never read; with a
//! `qemu:dirty-bitmap:NAME` context and a parent snapshot, only the chunks
//! (of the parent's size) the bitmap marks are read and the parent's other
//! chunks are reused. A missing context or parent, or a chunk size asked for
//! that is not the parent's, means a full read, said on stderr.

use super::{bar, print_backup, CreateArgs};
use anyhow::{anyhow, Result};
use strata_jobs::Cancel;
use strata_nbd::client::Client;
use strata_nbd::url::NbdUrl;
use strata_repo::disk::BackupOptions;
use strata_repo::export::{
    back_up_export, bitmap_context, contexts, ExportRead, TAG_BITMAP, TAG_NBD,
};
use strata_repo::Repository;

/// Back up the export `client` reads with a progress bar, the notes of how
/// it reads on stderr, and print what it did.
pub(super) fn run_export_backup(
    repo: &mut Repository,
    client: Client,
    how: ExportRead<'_>,
    opts: BackupOptions,
) -> Result<()> {
    let bar = bar();
    let name = opts.name.clone();
    let s = back_up_export(repo, client, how, opts, &bar, &Cancel::default(), &note)?;
    bar.finish();
    print_backup(&name, &s);
    Ok(())
}

/// How a backup reads its source, on stderr.
pub(super) fn note(msg: String) {
    eprintln!("strata backup: {msg}");
}

/// `strata backup create --nbd URL [--bitmap NAME]`: the snapshot is tagged
/// with the URL (and the bitmap), and the latest snapshot with the same tags
/// is the parent unless `--parent` names one.
pub(super) fn create(a: CreateArgs) -> Result<()> {
    let url_text = a.nbd.clone().expect("called with --nbd");
    let url = NbdUrl::parse(&url_text)?;
    let mut repo = a.repo.open()?;
    let mut tags = a.tags.clone();
    tags.push(format!("{TAG_NBD}{url_text}"));
    if let Some(b) = &a.bitmap {
        tags.push(format!("{TAG_BITMAP}{b}"));
    }
    let parent = match &a.parent {
        Some(p) => Some(repo.find_snapshot(p)?.0),
        None => repo
            .snapshots()?
            .into_iter()
            .rev()
            .find(|(_, s)| tags[a.tags.len()..].iter().all(|t| s.tags.contains(t)))
            .map(|(id, _)| id),
    };
    let context = a.bitmap.as_deref().map(bitmap_context);
    let client = Client::connect(&url, &contexts(context.as_deref()))
        .map_err(|e| anyhow!("could not open the NBD export '{url_text}': {e}"))?;
    let name = match url.export.replace('/', "_") {
        e if e.is_empty() => "disk".to_string(),
        e => e,
    };
    let opts = BackupOptions {
        name,
        path: url_text,
        tags,
        parent,
        ..BackupOptions::for_image(std::path::Path::new("disk"))
    };
    let how = ExportRead {
        bitmap_context: context.as_deref(),
        parent,
        full_reason: None,
        no_parent: "there is no previous backup of this export",
        chunk_size: a.chunk_size,
    };
    run_export_backup(&mut repo, client, how, opts)
}
