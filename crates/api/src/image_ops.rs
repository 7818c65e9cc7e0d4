//! Images of VM disks as tasks: `POST /api/v1/images/from-snapshot` (the disk
//! as it was at a snapshot) and `POST /api/v1/images/from-vm` (the disk now,
//! while the guest runs). Both answer 202 with the task at once; the task's
//! log ends with the new image's ID, or with why it failed (the image is then
//! `killed`). The CLI's `strata image create-from-*` run the same function.

use std::sync::Mutex;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use strata_jobs::{Cancel, Progress};
use strata_registry::from_vm::{FromVm, Source};
use strata_vm::{Manager, StateDir};

use crate::error::ApiError;
use crate::task_routes::Started;
use crate::tasks::TaskHandle;
use crate::AppState;

fn qcow2() -> String {
    "qcow2".into()
}

/// `POST /api/v1/images/from-snapshot`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FromSnapshotBody {
    pub vm: String,
    pub snapshot: String,
    /// The image's name (default: VM-SNAPSHOT).
    pub name: Option<String>,
    /// `qcow2` (default) or `raw`.
    #[serde(default = "qcow2")]
    pub disk_format: String,
    /// The VM's disk, 0-based.
    #[serde(default)]
    pub disk: usize,
}

/// `POST /api/v1/images/from-vm`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FromVmBody {
    pub vm: String,
    /// Freeze the guest's filesystems through its agent for the instant.
    #[serde(default)]
    pub quiesce: bool,
    /// The image's name (default: VM-TIME).
    pub name: Option<String>,
    /// `qcow2` (default) or `raw`.
    #[serde(default = "qcow2")]
    pub disk_format: String,
    #[serde(default)]
    pub disk: usize,
}

/// A JSON request body, or a 400 saying what is wrong with it.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))
}

/// A task's progress and cancel flag, as a job sees them.
struct TaskProgress {
    task: Mutex<TaskHandle>,
    total: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
    cancel: Cancel,
}

impl Progress for TaskProgress {
    fn set_total(&self, total: u64) {
        self.total
            .store(total.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    fn advance(&self, n: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let done = self.done.fetch_add(n, Relaxed) + n;
        let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
        task.progress(done as f64 / self.total.load(Relaxed).max(1) as f64);
        if task.is_cancelled() {
            self.cancel.cancel();
        }
    }
}

/// Start the task that makes the image `req` asks for.
async fn start(
    st: AppState,
    kind: &'static str,
    req: FromVm,
) -> Result<(StatusCode, Json<Started>), ApiError> {
    let reg = st.registry.clone();
    let tasks = st.tasks.clone();
    let id = tokio::task::spawn_blocking(move || -> Result<String, ApiError> {
        let task = tasks
            .start(kind, &req.vm)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let tid = task.id().to_string();
        std::thread::spawn(move || {
            let p = TaskProgress {
                task: Mutex::new(task),
                total: 1.into(),
                done: 0.into(),
                cancel: Cancel::default(),
            };
            let mgr = Manager::new(StateDir::new(reg.state_dir()));
            let r = reg
                .create_from_vm(&mgr, &req, &p, &p.cancel)
                .map(|rec| format!("image {} is active", rec.id))
                .map_err(|e| e.to_string());
            let task = p.task.into_inner().unwrap_or_else(|p| p.into_inner());
            task.finish(r);
        });
        Ok(tid)
    })
    .await??;
    Ok((StatusCode::ACCEPTED, Json(Started { task: id })))
}

/// Start making an image of a VM's disk as it was at a snapshot.
#[utoipa::path(post, path = "/api/v1/images/from-snapshot", request_body = FromSnapshotBody,
    responses((status = 202, body = Started), (status = 400)))]
pub async fn from_snapshot(
    State(st): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Started>), ApiError> {
    let b: FromSnapshotBody = parse(&body)?;
    let req = FromVm {
        vm: b.vm,
        source: Source::Snapshot(b.snapshot),
        disk: b.disk,
        name: b.name,
        disk_format: b.disk_format,
    };
    start(st, "image-from-snapshot", req).await
}

/// Start making an image of a VM's disk as it is now, while the guest runs.
#[utoipa::path(post, path = "/api/v1/images/from-vm", request_body = FromVmBody,
    responses((status = 202, body = Started), (status = 400)))]
pub async fn from_vm(
    State(st): State<AppState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Started>), ApiError> {
    let b: FromVmBody = parse(&body)?;
    let req = FromVm {
        vm: b.vm,
        source: Source::Live { quiesce: b.quiesce },
        disk: b.disk,
        name: b.name,
        disk_format: b.disk_format,
    };
    start(st, "image-from-vm", req).await
}
