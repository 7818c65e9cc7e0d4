//! The VM endpoints (`/api/v1/vms`): list, status, define, start, stop, kill,
//! undefine and exec, each a call of `strata_vm::Manager` on a blocking
//! thread (what `strata vm` calls). A VM another operation holds answers 409
//! after [`VM_LOCK_WAIT`] instead of keeping the caller waiting.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use strata_vm::{Status, VmDef};

use crate::error::ApiError;
use crate::run::{blocking, json_body, located, query};
use crate::AppState;

/// How long a request waits for a VM another operation holds before it is
/// answered 409 (busy).
pub const VM_LOCK_WAIT: Duration = Duration::from_secs(2);

/// The answer of start, stop and kill: what happened, in the CLI's words.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VmAction {
    pub message: String,
    /// A remark on how it was done (start: TCG used because KVM is not usable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// `stop`'s query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StopQuery {
    /// Seconds to wait for the guest to power off before QEMU is told to quit
    /// (default 60).
    pub timeout: Option<u64>,
}

/// A command to run in the guest through its agent.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Seconds to wait for it (default 300).
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// How a guest command ended and what it printed (as UTF-8, invalid bytes
/// replaced).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ExecResult {
    pub exit_code: Option<i64>,
    /// The signal that ended it, if one did.
    pub signal: Option<i64>,
    pub stdout: String,
    pub stderr: String,
}

/// The VM routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/vms", get(list).post(define))
        .route("/api/v1/vms/{name}", get(status).delete(undefine))
        .route("/api/v1/vms/{name}/start", post(start))
        .route("/api/v1/vms/{name}/stop", post(stop))
        .route("/api/v1/vms/{name}/kill", post(kill))
        .route("/api/v1/vms/{name}/exec", post(exec))
}

/// Every defined VM with its state (as `strata vm list --output=json`); a
/// VM another operation holds is listed as `busy`, not waited for.
#[utoipa::path(get, path = "/api/v1/vms",
    responses((status = 200, body = Vec<Status>)))]
pub async fn list(State(st): State<AppState>) -> Result<Json<Vec<Status>>, ApiError> {
    let mgr = st.vms.clone();
    Ok(Json(blocking(move || Ok(mgr.list()?)).await?))
}

/// One VM's state and definition.
#[utoipa::path(get, path = "/api/v1/vms/{name}",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = Status), (status = 404), (status = 409)))]
pub async fn status(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Status>, ApiError> {
    let mgr = st.vms.clone();
    Ok(Json(blocking(move || Ok(mgr.status(&name)?)).await?))
}

/// Define a VM (the body is the definition `strata vm define --file` reads).
#[utoipa::path(post, path = "/api/v1/vms", request_body = VmDef,
    responses((status = 201, body = Status), (status = 400), (status = 409)))]
pub async fn define(State(st): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let def: VmDef = json_body(body).await?;
    let mgr = st.vms.clone();
    let s = blocking(move || {
        let name = def.name.clone();
        mgr.define(def)?;
        Ok(mgr.status(&name)?)
    })
    .await?;
    Ok(located(
        StatusCode::CREATED,
        &format!("/api/v1/vms/{}", s.name),
        s,
    ))
}

/// Start the VM's QEMU, detached.
#[utoipa::path(post, path = "/api/v1/vms/{name}/start",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = VmAction), (status = 404), (status = 409)))]
pub async fn start(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<VmAction>, ApiError> {
    let mgr = st.vms.clone();
    let note = blocking({
        let name = name.clone();
        move || Ok(mgr.start(&name)?)
    })
    .await?;
    Ok(Json(VmAction {
        message: format!("VM '{name}' started"),
        note,
    }))
}

/// Press the power button; quit QEMU if the guest is still up after `timeout`.
#[utoipa::path(post, path = "/api/v1/vms/{name}/stop",
    params(("name" = String, Path, description = "VM name"), StopQuery),
    responses((status = 200, body = VmAction), (status = 404), (status = 409)))]
pub async fn stop(
    State(st): State<AppState>,
    Path(name): Path<String>,
    uri: Uri,
) -> Result<Json<VmAction>, ApiError> {
    let q: StopQuery = query(&uri)?;
    let timeout = q.timeout.unwrap_or(60);
    let mgr = st.vms.clone();
    let clean = blocking({
        let name = name.clone();
        move || Ok(mgr.stop(&name, Duration::from_secs(timeout))?)
    })
    .await?;
    let message = if clean {
        format!("VM '{name}' powered off")
    } else {
        format!("VM '{name}' did not power off within {timeout} s; QEMU was told to quit")
    };
    Ok(Json(VmAction {
        message,
        note: None,
    }))
}

/// Kill the VM's QEMU at once.
#[utoipa::path(post, path = "/api/v1/vms/{name}/kill",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = VmAction), (status = 404), (status = 409)))]
pub async fn kill(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<VmAction>, ApiError> {
    let mgr = st.vms.clone();
    let killed = blocking({
        let name = name.clone();
        move || Ok(mgr.kill(&name)?)
    })
    .await?;
    let message = if killed {
        format!("VM '{name}' killed")
    } else {
        format!("VM '{name}' was not running")
    };
    Ok(Json(VmAction {
        message,
        note: None,
    }))
}

/// Forget a stopped VM that has no snapshots (its own disks are kept; those
/// strata made from images in its directory go with it).
#[utoipa::path(delete, path = "/api/v1/vms/{name}",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 204), (status = 404), (status = 409)))]
pub async fn undefine(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let mgr = st.vms.clone();
    blocking(move || Ok(strata_registry::cache::undefine_vm(&mgr, &name)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Run a command in the guest through its agent and wait for it.
#[utoipa::path(post, path = "/api/v1/vms/{name}/exec", request_body = ExecRequest,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = ExecResult), (status = 400), (status = 404), (status = 409)))]
pub async fn exec(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<ExecResult>, ApiError> {
    let req: ExecRequest = json_body(body).await?;
    let timeout = Duration::from_secs(req.timeout.unwrap_or(300));
    let mgr = st.vms.clone();
    let out = blocking(move || Ok(mgr.exec(&name, &req.command, timeout)?)).await?;
    Ok(Json(ExecResult {
        exit_code: out.exit_code,
        signal: out.signal,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }))
}

/// The VM endpoints' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list, status, define, start, stop, kill, undefine, exec),
    components(schemas(Status, VmDef, strata_vm::Disk, VmAction, ExecRequest, ExecResult))
)]
pub struct VmApi;
