//! The snapshot endpoints (`/api/v1/vms/{name}/snapshots`): the tree, one
//! snapshot, create, revert and delete, through `strata_vm::Manager` as
//! `strata vm snapshot` does. Quick ones answer at once (a disk-only create,
//! a metadata-only delete); the others (a create that may save memory, a
//! revert, a delete that may merge data) run as tasks: 202 with the task's
//! `Location`, the outcome in its state, log and result.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use strata_vm::{CreateOptions, DeleteOptions, Kind, Manager, Snapshot, SnapshotInfo};

use crate::error::ApiError;
use crate::run::{blocking, chain, json_body, located, query, start_task};
use crate::task_routes::Started;
use crate::AppState;

/// A snapshot to create.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// The new snapshot's name.
    pub name: String,
    /// Disks only: a running VM's memory is not saved (answered at once).
    #[serde(default)]
    pub disk_only: bool,
    /// Freeze the guest's filesystems through its agent around the snapshot
    /// (a running VM, with `disk_only`).
    #[serde(default)]
    pub quiesce: bool,
    /// `internal` or `external`; chosen from the VM's state when left out.
    #[serde(default)]
    pub kind: Option<Kind>,
    /// External with memory: pause the guest only while the disks switch.
    #[serde(default)]
    pub background: bool,
}

/// How to revert.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RevertRequest {
    /// Allow restarting a running VM (needed for a disk-only snapshot).
    pub force: bool,
}

/// The snapshot routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/vms/{name}/snapshots", get(list).post(create))
        .route(
            "/api/v1/vms/{name}/snapshots/{snap}",
            get(show).delete(delete),
        )
        .route("/api/v1/vms/{name}/snapshots/{snap}/revert", post(revert))
}

/// The snapshot tree, each with its parent (as `strata vm snapshot list
/// --output=json`).
#[utoipa::path(get, path = "/api/v1/vms/{name}/snapshots",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = Vec<Snapshot>), (status = 404), (status = 409)))]
pub async fn list(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Snapshot>>, ApiError> {
    let mgr = st.vms.clone();
    Ok(Json(
        blocking(move || Ok(mgr.record(&name)?.snapshots)).await?,
    ))
}

/// One snapshot with its children and whether it is current.
#[utoipa::path(get, path = "/api/v1/vms/{name}/snapshots/{snap}",
    params(("name" = String, Path, description = "VM name"),
           ("snap" = String, Path, description = "snapshot name")),
    responses((status = 200, body = SnapshotInfo), (status = 404), (status = 409)))]
pub async fn show(
    State(st): State<AppState>,
    Path((name, snap)): Path<(String, String)>,
) -> Result<Json<SnapshotInfo>, ApiError> {
    let mgr = st.vms.clone();
    Ok(Json(
        blocking(move || Ok(mgr.record(&name)?.snapshot_info(&snap)?)).await?,
    ))
}

/// Check before a task starts what can be answered at once: the VM exists
/// and is not busy, and (for `snap`) the snapshot exists.
async fn precheck(mgr: &Manager, name: &str, snap: Option<&str>) -> Result<(), ApiError> {
    let (mgr, name, snap) = (mgr.clone(), name.to_string(), snap.map(str::to_string));
    blocking(move || {
        let rec = mgr.record(&name)?;
        if let Some(s) = snap {
            rec.snapshot(&s)?;
        }
        Ok(())
    })
    .await
}

/// Create a snapshot: 201 with it when `disk_only`, else a task (202) whose
/// result is the snapshot.
#[utoipa::path(post, path = "/api/v1/vms/{name}/snapshots", request_body = SnapshotCreate,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 201, body = Snapshot), (status = 202, body = Started),
              (status = 400), (status = 404), (status = 409)))]
pub async fn create(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: SnapshotCreate = json_body(body).await?;
    let opts = CreateOptions {
        disk_only: req.disk_only,
        quiesce: req.quiesce,
        kind: req.kind,
        background: req.background,
    };
    let snap = req.name;
    let mgr = st.vms.clone();
    if opts.disk_only {
        let location = format!("/api/v1/vms/{name}/snapshots/{snap}");
        let s = blocking(move || Ok(mgr.snapshot_create(&name, &snap, opts)?)).await?;
        return Ok(located(StatusCode::CREATED, &location, s));
    }
    strata_vm::state::check_name("snapshot", &snap)?;
    precheck(&mgr, &name, None).await?;
    let target = format!("{name}/{snap}");
    start_task(&st.tasks, "vm-snapshot-create", target, move |task| {
        let s = mgr
            .snapshot_create_cancellable(&name, &snap, opts, &task.cancel_flag())
            .map_err(|e| chain(&e))?;
        task.set_result(serde_json::to_value(&s).unwrap_or_default());
        Ok(format!(
            "snapshot '{snap}' of VM '{name}' created ({} {})",
            s.kind.name(),
            if s.memory { "full" } else { "disk-only" }
        ))
    })
    .await
}

/// Revert the VM to a snapshot (a task).
#[utoipa::path(post, path = "/api/v1/vms/{name}/snapshots/{snap}/revert",
    request_body = RevertRequest,
    params(("name" = String, Path, description = "VM name"),
           ("snap" = String, Path, description = "snapshot name")),
    responses((status = 202, body = Started), (status = 400), (status = 404), (status = 409)))]
pub async fn revert(
    State(st): State<AppState>,
    Path((name, snap)): Path<(String, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: RevertRequest = json_body(body).await?;
    let mgr = st.vms.clone();
    precheck(&mgr, &name, Some(&snap)).await?;
    let target = format!("{name}/{snap}");
    start_task(&st.tasks, "vm-snapshot-revert", target, move |task| {
        mgr.snapshot_revert_cancellable(&name, &snap, req.force, &task.cancel_flag())
            .map_err(|e| chain(&e))?;
        Ok(format!("VM '{name}' reverted to snapshot '{snap}'"))
    })
    .await
}

/// Delete a snapshot (with `children`, its descendants too): 204 at once
/// when `metadata_only`, else a task that merges its data into its
/// neighbours.
#[utoipa::path(delete, path = "/api/v1/vms/{name}/snapshots/{snap}",
    params(("name" = String, Path, description = "VM name"),
           ("snap" = String, Path, description = "snapshot name"), DeleteOptions),
    responses((status = 202, body = Started), (status = 204), (status = 400),
              (status = 404), (status = 409)))]
pub async fn delete(
    State(st): State<AppState>,
    Path((name, snap)): Path<(String, String)>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let opts: DeleteOptions = query(&uri)?;
    let mgr = st.vms.clone();
    if opts.metadata_only {
        blocking(move || Ok(mgr.snapshot_delete(&name, &snap, opts)?)).await?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    precheck(&mgr, &name, Some(&snap)).await?;
    let target = format!("{name}/{snap}");
    start_task(&st.tasks, "vm-snapshot-delete", target, move |task| {
        mgr.snapshot_delete_cancellable(&name, &snap, opts, &task.cancel_flag())
            .map_err(|e| chain(&e))?;
        Ok(format!("snapshot '{snap}' of VM '{name}' deleted"))
    })
    .await
}

/// The snapshot endpoints' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list, show, create, revert, delete),
    components(schemas(
        Snapshot,
        SnapshotInfo,
        Kind,
        strata_vm::record::MemoryLayout,
        SnapshotCreate,
        RevertRequest
    ))
)]
pub struct SnapshotApi;
