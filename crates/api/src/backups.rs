//! The backup endpoints (`/api/v1/backups`) on the one repository the server
//! was started with (`strata serve --backup-repo R --backup-password-file F`:
//! the password stays on the server, no request carries one). Listing and
//! stats answer at once; create, restore, verify, prune and gc run as tasks
//! with progress, their JSON result (what `strata backup ... --output=json`
//! prints) in the task. Each calls what `strata backup` calls
//! (`strata_repo::ops` and the library below it).

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;
use strata_jobs::Cancel;
use strata_repo::export::{back_up_vm_disk, VmBackup};
use strata_repo::gc::GcOptions;
use strata_repo::ops;
use strata_repo::policy::Policy;
use strata_repo::restore::RestoreOptions;
use strata_repo::Repository;

use crate::error::ApiError;
use crate::run::{blocking, chain, json_body, start_task, TaskProgress};
use crate::task_routes::Started;
use crate::AppState;

/// The repository the backup endpoints work on.
#[derive(Clone)]
pub struct BackupRepo {
    /// A directory or an `s3:` URL.
    pub location: String,
    password: Arc<str>,
}

impl BackupRepo {
    /// The repository at `location` with the password in `password_file`,
    /// opened once to prove both work.
    pub fn open(location: &str, password_file: &std::path::Path) -> strata_repo::Result<Self> {
        let repo = BackupRepo {
            location: location.to_string(),
            password: ops::read_password_file(password_file)?.into(),
        };
        repo.repository()?;
        Ok(repo)
    }

    pub(crate) fn repository(&self) -> strata_repo::Result<Repository> {
        Repository::open(strata_repo::open_location(&self.location)?, &self.password)
    }
}

/// The configured repository, or 503 when the server has none.
pub(crate) fn configured(st: &AppState) -> Result<BackupRepo, ApiError> {
    st.backup.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "No backup repository is configured: start strata serve with --backup-repo and --backup-password-file",
        )
    })
}

/// A backup of a disk image file on the server (`image`), or of a disk of a
/// running VM (`vm`, as `strata backup create --vm`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupCreate {
    /// The image (qcow2 or raw, with its backing chain).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub image: Option<PathBuf>,
    /// A running VM of the server: its disk `disk` is read at a consistent
    /// point, incremental after the first through QEMU's persistent dirty
    /// bitmap (the task's log says whether it was and why not).
    #[serde(default)]
    pub vm: Option<String>,
    /// With `vm`: the disk (0 for the first).
    #[serde(default)]
    pub disk: Option<usize>,
    /// Its format (probed when left out; not with `vm`).
    #[serde(default)]
    pub format: Option<String>,
    /// Read an image another process holds for writing (not with `vm`).
    #[serde(default)]
    pub force_share: bool,
    /// Parent snapshot (an ID prefix or `latest`); with `vm`, the latest
    /// backup of the same VM disk when left out.
    #[serde(default)]
    pub parent: Option<String>,
    /// With `parent`: only these chunks (of the parent's size) changed (`0,5-9`).
    #[serde(default)]
    pub changed_chunks: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Chunk size (`1M`, `2M`, `4M` or `8M`); the parent's, else 4M, when left out.
    #[serde(default)]
    pub chunk_size: Option<String>,
    /// With `image` and `parent`: read only the chunks this persistent qcow2
    /// bitmap of the image marks, and clear it once the snapshot is stored
    /// (the task's log says why when everything was read instead).
    #[serde(default)]
    pub bitmap: Option<String>,
}

/// Where and how to restore a snapshot's disk.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The image to write on the server (created or overwritten).
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// `raw` (sparse, the default) or `qcow2`.
    #[serde(default)]
    pub format: Option<String>,
    /// Restore only `length` bytes from this disk offset.
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub length: Option<u64>,
    /// Write into the existing image `path` at the disk's own offsets.
    #[serde(default)]
    pub existing: bool,
}

/// What a verify reads.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct VerifyRequest {
    /// `n/t` (part n of t) or a percentage (`10%`) of the packs.
    pub read_data_subset: Option<String>,
    /// Snapshots, trees and the index only.
    pub no_read_data: bool,
}

/// A retention policy (at least one rule) and whether to only plan.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PruneRequest {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    /// Say what would be removed; change nothing.
    pub dry_run: bool,
}

/// Whether a gc only counts.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GcRequest {
    pub dry_run: bool,
}

/// The backup routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/backups", get(list).post(create))
        .route("/api/v1/backups/stats", get(stats))
        .route("/api/v1/backups/verify", post(verify))
        .route("/api/v1/backups/prune", post(prune))
        .route("/api/v1/backups/gc", post(gc))
        .route("/api/v1/backups/{id}/restore", post(restore))
}

/// The repository's snapshots (restic's `snapshots --json` shape, as
/// `strata backup list --output=json`).
#[utoipa::path(get, path = "/api/v1/backups",
    responses((status = 200, body = Vec<Object>), (status = 503)))]
pub async fn list(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let cfg = configured(&st)?;
    let v = blocking(move || Ok(ops::snapshots_json(&cfg.repository()?.snapshots()?))).await?;
    Ok(Json(v))
}

/// Sizes, deduplication and compression.
#[utoipa::path(get, path = "/api/v1/backups/stats",
    responses((status = 200, body = Object), (status = 503)))]
pub async fn stats(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let cfg = configured(&st)?;
    let v = blocking(move || {
        let mut repo = cfg.repository()?;
        Ok(ops::stats_json(&strata_repo::stats::stats(&mut repo)?))
    })
    .await?;
    Ok(Json(v))
}

/// Run `work` on the configured repository as a task of `kind`: progress
/// and cancel go through, the JSON it returns becomes the task's result.
async fn repo_task(
    st: &AppState,
    kind: &str,
    target: String,
    work: impl FnOnce(&mut Repository, &TaskProgress, &Cancel) -> strata_repo::Result<(Value, String)>
        + Send
        + 'static,
) -> Result<Response, ApiError> {
    let cfg = configured(st)?;
    start_task(&st.tasks, kind, target, move |task| {
        let mut repo = cfg.repository().map_err(|e| chain(&e))?;
        let cancel = Cancel::default();
        let r = work(&mut repo, &TaskProgress::new(task, &cancel), &cancel);
        let (result, msg) = r.map_err(|e| chain(&e))?;
        let failed = result["problems"].as_array().is_some_and(|p| !p.is_empty());
        task.set_result(result);
        if failed {
            return Err(format!("the repository is damaged: {msg}"));
        }
        Ok(msg)
    })
    .await
}

/// Back up a disk image or a running VM's disk (a task; its result names the
/// new snapshot).
#[utoipa::path(post, path = "/api/v1/backups", request_body = BackupCreate,
    responses((status = 202, body = Started), (status = 400), (status = 404),
              (status = 409), (status = 503)))]
pub async fn create(State(st): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let req: BackupCreate = json_body(body).await?;
    let chunk_size = req
        .chunk_size
        .as_deref()
        .map(strata_repo::chunk::ChunkSize::parse)
        .transpose()?;
    let image = match (req.image, req.vm) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(ApiError::bad_request(
                "give either image (a disk image file) or vm (a running VM)",
            ))
        }
        (None, Some(vm)) => {
            if req.format.is_some()
                || req.force_share
                || req.changed_chunks.is_some()
                || req.bitmap.is_some()
            {
                return Err(ApiError::bad_request(
                    "format, force_share, changed_chunks and bitmap are for an image, not a vm",
                ));
            }
            let args = VmBackup {
                vm,
                disk: req.disk.unwrap_or(0),
                parent: req.parent,
                tags: req.tags,
                chunk_size,
            };
            return vm_backup(&st, args).await;
        }
        (Some(image), None) => image,
    };
    if req.disk.is_some() {
        return Err(ApiError::bad_request("disk is for a vm, not an image"));
    }
    let args = ops::ImageBackup {
        format: req
            .format
            .as_deref()
            .map(|f| {
                f.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "format: unknown format '{f}' (qcow2, raw, luks, vpc, vdi, vhdx or vmdk)"
                    ))
                })
            })
            .transpose()?,
        force_share: req.force_share,
        parent: req.parent,
        changed_chunks: req
            .changed_chunks
            .as_deref()
            .map(ops::parse_chunk_list)
            .transpose()?,
        tags: req.tags,
        image,
        chunk_size,
        bitmap: req.bitmap,
    };
    let target = args.image.display().to_string();
    repo_task(
        &st,
        "backup-create",
        target,
        move |repo, progress, cancel| {
            let (opts, s) = ops::backup_image(repo, &args, progress, cancel)?;
            if let Some(why) = &s.full_read {
                progress.log(format!("reading the whole disk: {why}"));
            }
            let msg = format!("snapshot {} saved", s.snapshot.short());
            Ok((ops::backup_json(&opts.name, &s), msg))
        },
    )
    .await
}

/// The backup of a running VM's disk as a task, after what can be answered
/// at once: the VM exists (404), is not busy and runs (409), has the disk
/// (400).
async fn vm_backup(st: &AppState, args: VmBackup) -> Result<Response, ApiError> {
    configured(st)?;
    let mgr = st.vms.clone();
    let (name, disk) = (args.vm.clone(), args.disk);
    blocking({
        let mgr = mgr.clone();
        move || {
            let status = mgr.status(&name)?;
            if status.def.disks.len() <= disk {
                return Err(ApiError::bad_request(format!(
                    "disk: VM '{name}' has no disk {disk} (it has {})",
                    status.def.disks.len()
                )));
            }
            if status.state != "running" && status.state != "paused" {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("VM '{name}' is {}: only a running VM is backed up this way; back up its disk image instead", status.state),
                ));
            }
            Ok(())
        }
    })
    .await?;
    let target = format!("vm {} disk {}", args.vm, args.disk);
    repo_task(
        st,
        "backup-create",
        target,
        move |repo, progress, cancel| {
            let note = |m: String| progress.log(m);
            let (opts, s) = back_up_vm_disk(repo, &mgr, &args, progress, cancel, &note)?;
            let msg = format!("snapshot {} saved", s.snapshot.short());
            Ok((ops::backup_json(&opts.name, &s), msg))
        },
    )
    .await
}

/// Restore a snapshot's disk (or a range of it) to an image on the server (a
/// task).
#[utoipa::path(post, path = "/api/v1/backups/{id}/restore", request_body = RestoreRequest,
    params(("id" = String, Path, description = "snapshot ID prefix or `latest`")),
    responses((status = 202, body = Started), (status = 400), (status = 503)))]
pub async fn restore(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: RestoreRequest = json_body(body).await?;
    if req.offset.is_some() && req.length.is_none() {
        return Err(ApiError::bad_request("offset needs a length"));
    }
    let opts = RestoreOptions {
        format: ops::restore_format(req.format.as_deref())?,
        range: req.length.map(|len| (req.offset.unwrap_or(0), len)),
        existing: req.existing,
    };
    let path = req.path;
    let target = format!("{id} -> {}", path.display());
    repo_task(
        &st,
        "backup-restore",
        target,
        move |repo, progress, cancel| {
            let (sid, s) = ops::restore_snapshot(repo, &id, &path, &opts, progress, cancel)?;
            let msg = format!(
                "restored snapshot {} to {} ({} bytes, {} written)",
                sid.short(),
                path.display(),
                s.size,
                s.bytes_written
            );
            Ok((ops::restore_json(&sid, &path, &s), msg))
        },
    )
    .await
}

/// Check the repository (a task that ends in error when it finds damage;
/// the problems are in its result).
#[utoipa::path(post, path = "/api/v1/backups/verify", request_body = VerifyRequest,
    responses((status = 202, body = Started), (status = 400), (status = 503)))]
pub async fn verify(State(st): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let req: VerifyRequest = json_body(body).await?;
    let subset = ops::verify_subset(req.read_data_subset.as_deref(), req.no_read_data)?;
    let target = configured(&st)?.location;
    repo_task(
        &st,
        "backup-verify",
        target,
        move |repo, progress, cancel| {
            let r = strata_repo::verify::verify(repo, subset, progress, cancel)?;
            let msg = format!(
                "{} snapshots, {} packs: {} read, {} problems",
                r.snapshots,
                r.packs,
                r.packs_read,
                r.problems.len()
            );
            Ok((ops::verify_json(&r), msg))
        },
    )
    .await
}

/// Forget the snapshots a policy does not keep, then collect garbage (a
/// task; `dry_run` only plans).
#[utoipa::path(post, path = "/api/v1/backups/prune", request_body = PruneRequest,
    responses((status = 202, body = Started), (status = 400), (status = 503)))]
pub async fn prune(State(st): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let req: PruneRequest = json_body(body).await?;
    let policy = Policy {
        last: req.keep_last,
        hourly: req.keep_hourly,
        daily: req.keep_daily,
        weekly: req.keep_weekly,
        monthly: req.keep_monthly,
        yearly: req.keep_yearly,
    };
    if policy.is_empty() {
        return Err(ApiError::bad_request(
            "no keep rule given: set at least one of keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly",
        ));
    }
    let opts = GcOptions {
        dry_run: req.dry_run,
        ..GcOptions::default()
    };
    let target = configured(&st)?.location;
    repo_task(
        &st,
        "backup-prune",
        target,
        move |repo, progress, cancel| {
            let s = strata_repo::gc::prune(repo, &policy, &opts, progress, cancel)?;
            let removed = s.plan.iter().filter(|p| !p.keep).count();
            let msg = format!(
                "{removed} snapshots {}removed, {} kept",
                if opts.dry_run { "would be " } else { "" },
                s.plan.len() - removed
            );
            Ok((ops::prune_json(&s, opts.dry_run), msg))
        },
    )
    .await
}

/// Remove data no snapshot references (a task; `dry_run` only counts).
#[utoipa::path(post, path = "/api/v1/backups/gc", request_body = GcRequest,
    responses((status = 202, body = Started), (status = 400), (status = 503)))]
pub async fn gc(State(st): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let req: GcRequest = json_body(body).await?;
    let opts = GcOptions {
        dry_run: req.dry_run,
        ..GcOptions::default()
    };
    let target = configured(&st)?.location;
    repo_task(&st, "backup-gc", target, move |repo, progress, cancel| {
        let s = strata_repo::gc::gc(repo, &opts, progress, cancel)?;
        let msg = format!(
            "{} packs removed, {} repacked, {} bytes freed{}",
            s.packs_removed,
            s.packs_repacked,
            s.bytes_freed,
            if opts.dry_run { " (dry run)" } else { "" }
        );
        Ok((ops::gc_json(&s), msg))
    })
    .await
}

/// The backup endpoints' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list, stats, create, restore, verify, prune, gc),
    components(schemas(BackupCreate, RestoreRequest, VerifyRequest, PruneRequest, GcRequest))
)]
pub struct BackupApi;
