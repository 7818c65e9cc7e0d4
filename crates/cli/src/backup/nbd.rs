//! Backups read over NBD: `strata backup create --nbd URL` (any export), and the
//! point-in-time export of a running VM (`--vm`, see `vm.rs`). Ranges the
//! export's `base:allocation` context reports as zeroes are never read; with a
//! `qemu:dirty-bitmap:NAME` context and a parent snapshot, only the chunks
//! (of the parent's size) the bitmap marks are read and the parent's other
//! chunks are reused. A missing context or parent, or a chunk size asked for
//! that is not the parent's, means a full read, said on stderr.

use super::{run_backup, CreateArgs};
use anyhow::{anyhow, Result};
use std::collections::BTreeSet;
use std::sync::Mutex;
use strata_nbd::client::Client;
use strata_nbd::proto::{CONTEXT_BASE_ALLOCATION as BASE_ALLOCATION, STATE_ZERO};
use strata_nbd::url::NbdUrl;
use strata_repo::chunk::{self, ChunkSize};
use strata_repo::disk::{BackupOptions, DiskSource, Incremental};
use strata_repo::{Id, Repository};

/// The tag prefixes of an NBD export backup.
pub(super) const TAG_NBD: &str = "nbd:";
pub(super) const TAG_BITMAP: &str = "bitmap:";

/// The context name of QEMU's dirty bitmap `name`.
pub(super) fn bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// The contexts to ask for: allocation, and the bitmap's when there is one.
pub(super) fn contexts(bitmap_context: Option<&str>) -> Vec<&str> {
    std::iter::once(BASE_ALLOCATION)
        .chain(bitmap_context)
        .collect()
}

/// How an export is read.
pub(super) struct ExportRead<'a> {
    /// The dirty bitmap context asked for, if any.
    pub bitmap_context: Option<&'a str>,
    /// The parent snapshot whose unmarked chunks are reused.
    pub parent: Option<Id>,
    /// Why everything is read even with a parent (no usable bitmap), if known.
    pub full_reason: Option<String>,
    /// What the parent's absence means, for the message.
    pub no_parent: &'a str,
    /// The chunk size asked for (else the parent's, else the default).
    pub chunk_size: Option<ChunkSize>,
}

/// Back up the export `client` is connected to: only the chunks the bitmap
/// marks when the parent and the bitmap allow it, else everything (with the
/// reason on stderr); never the ranges allocation reports as zeroes.
pub(super) fn back_up_export(
    repo: &mut Repository,
    mut client: Client,
    how: ExportRead<'_>,
    mut opts: BackupOptions,
) -> Result<()> {
    let plan = chunk::plan(repo, how.parent.as_ref(), how.chunk_size)?;
    opts.chunk_size = plan.size;
    let reason = match (how.parent, how.bitmap_context) {
        (None, _) => Some(how.no_parent.to_string()),
        (Some(_), _) if plan.full_read.is_some() => plan.full_read,
        (Some(_), Some(c)) if client.has_context(c) => None,
        (Some(_), Some(c)) => Some(format!("the server does not offer '{c}'")),
        (Some(_), None) => how.full_reason,
    };
    let size = client.size();
    match (reason, how.parent) {
        (None, Some(parent)) => {
            let context = how.bitmap_context.unwrap_or_default();
            let changed = changed_chunks(&mut client, context, plan.size)?;
            eprintln!(
                "strata backup: incremental: {} of {} chunks changed since snapshot {}",
                changed.len(),
                plan.size.count(size),
                parent.short()
            );
            opts.incremental = Some(Incremental { parent, changed });
        }
        (reason, _) => {
            if let Some(r) = reason {
                eprintln!("strata backup: reading the whole disk: {r}");
            }
        }
    }
    let zeroes = if client.has_context(BASE_ALLOCATION) {
        client
            .map(BASE_ALLOCATION)?
            .into_iter()
            .filter(|&(_, _, flags)| flags & STATE_ZERO != 0)
            .map(|(o, l, _)| (o, l))
            .collect()
    } else {
        Vec::new()
    };
    let client = Mutex::new(client);
    let src = DiskSource::from_reader_with_zeroes(
        size,
        Box::new(move |buf, offset| {
            let mut c = client.lock().map_err(|_| "the NBD connection failed")?;
            c.read(buf, offset).map_err(Into::into)
        }),
        zeroes,
    );
    run_backup(repo, &src, &opts)
}

/// The indexes of the chunks of size `cs` the dirty bitmap `context` marks anywhere.
fn changed_chunks(client: &mut Client, context: &str, cs: ChunkSize) -> Result<BTreeSet<u64>> {
    let mut out = BTreeSet::new();
    for (pos, len, flags) in client.map(context)? {
        if flags & 1 != 0 {
            out.extend(cs.covering(pos, len));
        }
    }
    Ok(out)
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
    back_up_export(&mut repo, client, how, opts)
}
