//! How the operation endpoints (VMs, snapshots, backups) run the library's
//! work: typed JSON bodies and queries with 400s naming what is wrong, short
//! work on blocking threads, long work as a task answered with 202 and the
//! task's `Location`, and the library's errors mapped to HTTP codes by kind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::task_routes::Started;
use crate::tasks::{TaskHandle, Tasks};

/// An error with its causes, `outer: inner: ...` (library errors keep the
/// cause apart from the context they name).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg = format!("{msg}: {s_msg}");
        }
        cur = s.source();
    }
    msg
}

impl From<strata_vm::Error> for ApiError {
    fn from(e: strata_vm::Error) -> ApiError {
        use strata_vm::Error as E;
        let status = match &e {
            E::Invalid(_) => StatusCode::BAD_REQUEST,
            E::NoSuchVm(_) | E::NoSuchSnapshot { .. } => StatusCode::NOT_FOUND,
            E::Exists(_) | E::State(_) | E::Busy(_) | E::Cancelled(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, chain(&e))
    }
}

impl From<strata_repo::Error> for ApiError {
    fn from(e: strata_repo::Error) -> ApiError {
        use strata_repo::ErrorKind as K;
        let status = match e.kind() {
            K::Invalid => StatusCode::BAD_REQUEST,
            K::NotFound => StatusCode::NOT_FOUND,
            K::AlreadyExists | K::Locked | K::Cancelled => StatusCode::CONFLICT,
            K::WrongPassword | K::Corrupt | K::Unsupported | K::Image | K::Io => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, chain(&e))
    }
}

/// Run `f` on a blocking thread.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await?
}

/// A JSON request body of type `T` (an empty body reads as `{}`, so bodies
/// whose fields all have defaults may be left out). A malformed body, a
/// missing or unknown field or a wrong type is a 400 saying which.
pub async fn json_body<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, crate::images::MAX_JSON_BODY)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "Could not read the request body (at most {} bytes): {e}",
                    crate::images::MAX_JSON_BODY
                ),
            )
        })?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}")))
}

/// The query string of `uri` as `T`; a bad or unknown parameter is a 400.
pub fn query<T: DeserializeOwned>(uri: &Uri) -> Result<T, ApiError> {
    axum::extract::Query::<T>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| ApiError::bad_request(format!("Invalid query string: {}", e.body_text())))
}

/// `status` with a JSON body and a `Location` header.
pub fn located(status: StatusCode, location: &str, body: impl serde::Serialize) -> Response {
    let mut resp = (status, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// What a task's work returns: its last log line, or the error that ends it.
pub type Outcome = Result<String, String>;

/// Record a task of `kind` on `target` and run `work` on a thread of its own;
/// answers 202 with the task's ID and `Location: /api/v1/tasks/ID`. The task
/// ends `ok` or `error` by what `work` returns (its result, if it set one,
/// stays in the task either way).
pub async fn start_task(
    tasks: &Tasks,
    kind: &str,
    target: String,
    work: impl FnOnce(&mut TaskHandle) -> Outcome + Send + 'static,
) -> Result<Response, ApiError> {
    let tasks = tasks.clone();
    let kind = kind.to_string();
    let id = blocking(move || {
        let mut task = tasks
            .start(&kind, &target)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let id = task.id().to_string();
        std::thread::spawn(move || {
            let r = work(&mut task);
            task.finish(r);
        });
        Ok(id)
    })
    .await?;
    Ok(located(
        StatusCode::ACCEPTED,
        &format!("/api/v1/tasks/{id}"),
        Started { task: id },
    ))
}

/// A library job's progress reported into a task; a cancel asked of the task
/// reaches the job through `cancel` at its next report.
pub struct TaskProgress<'a> {
    task: Mutex<&'a mut TaskHandle>,
    cancel: &'a strata_jobs::Cancel,
    total: AtomicU64,
    done: AtomicU64,
}

impl<'a> TaskProgress<'a> {
    pub fn new(task: &'a mut TaskHandle, cancel: &'a strata_jobs::Cancel) -> Self {
        TaskProgress {
            task: Mutex::new(task),
            cancel,
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
        }
    }

    /// Add `line` to the task's log.
    pub fn log(&self, line: String) {
        self.task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .log(line);
    }

    fn report(&self) {
        let (done, total) = (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if total > 0 {
            task.progress(done as f64 / total as f64);
        }
        if task.is_cancelled() {
            self.cancel.cancel();
        }
    }
}

impl strata_jobs::Progress for TaskProgress<'_> {
    fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.report();
    }

    fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        self.report();
    }
}
