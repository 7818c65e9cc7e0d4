//! The task endpoints (`/api/v1/tasks`) and the operations that start tasks,
//! and the OpenAPI document generated from their types.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::OpenApi;

use crate::error::ApiError;
use crate::tasks::{verify_image, Task, TaskState};
use crate::AppState;
use strata_jobs::CancelAnswer;

/// The answer of an operation that started a task.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Started {
    /// The task's ID: follow it at `/api/v1/tasks/{task}`.
    pub task: String,
}

/// The task list.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TaskList {
    pub tasks: Vec<Task>,
}

fn state_err(e: crate::Error) -> ApiError {
    ApiError::internal(e.to_string())
}

/// Start verifying an image's stored data against its sha512.
#[utoipa::path(post, path = "/api/v1/images/{id}/verify",
    params(("id" = String, Path, description = "image ID")),
    responses((status = 202, body = Started), (status = 404), (status = 409)))]
pub async fn verify(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Started>), ApiError> {
    let reg = st.registry.clone();
    let tasks = st.tasks.clone();
    let started = tokio::task::spawn_blocking(move || -> Result<String, ApiError> {
        let rec = reg.get(&id)?;
        if rec.status != strata_registry::Status::Active {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "Image {id} has no data to verify: its status is {}",
                    rec.status.as_str()
                ),
            ));
        }
        let mut task = tasks.start("image-verify", &id).map_err(state_err)?;
        let tid = task.id().to_string();
        std::thread::spawn(move || {
            let r = verify_image(&reg, &id, &mut task);
            task.finish(r);
        });
        Ok(tid)
    })
    .await??;
    Ok((StatusCode::ACCEPTED, Json(Started { task: started })))
}

/// All tasks, newest first, including those of earlier server runs.
#[utoipa::path(get, path = "/api/v1/tasks", responses((status = 200, body = TaskList)))]
pub async fn list(State(st): State<AppState>) -> Result<Json<TaskList>, ApiError> {
    let tasks = st.tasks.clone();
    let list = tokio::task::spawn_blocking(move || tasks.list())
        .await?
        .map_err(state_err)?;
    Ok(Json(TaskList { tasks: list }))
}

/// One task: state, progress and log.
#[utoipa::path(get, path = "/api/v1/tasks/{id}",
    params(("id" = String, Path, description = "task ID")),
    responses((status = 200, body = Task), (status = 404)))]
pub async fn show(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Task>, ApiError> {
    let tasks = st.tasks.clone();
    let t = tokio::task::spawn_blocking(move || tasks.get(&id).map(|t| (id, t)))
        .await?
        .map_err(state_err)?;
    match t {
        (_, Some(t)) => Ok(Json(t)),
        (id, None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("No task with ID {id}"),
        )),
    }
}

/// Ask a running task to stop. 202: the cancel was taken (the task ends
/// `cancelled`, its log saying what was undone, or `error`); 409: the task is
/// not running in this server, or its operation is past its point of no
/// return (the message says it came too late; the task completes).
#[utoipa::path(delete, path = "/api/v1/tasks/{id}",
    params(("id" = String, Path, description = "task ID")),
    responses((status = 202, description = "the cancel was taken"), (status = 404),
              (status = 409, description = "not running, or past its point of no return")))]
pub async fn cancel(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let Json(t) = show(State(st.clone()), Path(id.clone())).await?;
    let answer = match t.state {
        TaskState::Running => st.tasks.cancel(&id),
        _ => None,
    };
    match answer {
        Some(CancelAnswer::Accepted) => Ok(StatusCode::ACCEPTED),
        Some(CancelAnswer::TooLate) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "Task {id} cannot be cancelled any more: its {} of {} is past the point where stopping would be safe, and it completes",
                t.kind, t.target
            ),
        )),
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("Task {id} is not running in this server"),
        )),
    }
}

/// The API description, generated from the handlers and types above.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "strata API",
        description = "strata's own API under /api/v1 (VMs, snapshots, backups, NBD exports, tasks), and the image registry under /v2 in the shape of OpenStack Glance's image API v2. Every request but this document and version discovery carries a token in X-Auth-Token or Authorization: Bearer; a read-only token may only GET."
    ),
    paths(
        crate::versions,
        verify,
        list,
        show,
        cancel,
        crate::image_ops::from_snapshot,
        crate::image_ops::from_vm
    ),
    components(schemas(
        Task,
        TaskState,
        TaskList,
        Started,
        crate::image_ops::FromSnapshotBody,
        crate::image_ops::FromVmBody
    ))
)]
pub struct ApiDoc;

/// `GET /api/v1/openapi.json`.
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::images::ImageApi::openapi());
    doc.merge(crate::vms::VmApi::openapi());
    doc.merge(crate::snapshots::SnapshotApi::openapi());
    doc.merge(crate::exports::ExportApi::openapi());
    doc.merge(crate::backups::BackupApi::openapi());
    Json(doc)
}
