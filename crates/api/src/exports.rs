//! NBD exports (`/api/v1/exports`): an image on the server (with its backing
//! chain), or a snapshot of the backup repository read-only (as `strata
//! backup serve`), served by strata's NBD server on a Unix socket or a TCP
//! address until stopped; list, show, stop, and the live operations of
//! `strata nbd serve --control` (snapshot, snapshot-external, commit, stream,
//! list) on a running export, carried out by the same function
//! (`strata_nbd::control::handle`). Exports live as long as the process: a
//! restarted server has none.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use strata_nbd::{Export, ExportConfig, Server, ServerConfig};

use crate::error::ApiError;
use crate::run::{blocking, chain, json_body, located};
use crate::AppState;

/// Requests each export carries out concurrently per connection.
const WORKERS: usize = 4;

/// An export to start: exactly one of `image` and `backup`, exactly one of
/// `socket` and `address`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportCreate {
    /// An image file on the server.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub image: Option<PathBuf>,
    /// With `image`: its format (probed when left out).
    #[serde(default)]
    pub format: Option<String>,
    /// With `image`: refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// A snapshot of the backup repository (an ID prefix or `latest`),
    /// exported read-only.
    #[serde(default)]
    pub backup: Option<String>,
    /// The export name clients ask for ("" by default).
    #[serde(default)]
    pub name: String,
    /// Listen on this Unix socket (created; it must not exist).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub socket: Option<PathBuf>,
    /// Listen on this TCP address (`HOST:PORT`; port 0 picks a free one).
    #[serde(default)]
    pub address: Option<String>,
}

/// A running export.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ExportRecord {
    pub id: String,
    /// The export name.
    pub name: String,
    /// What it serves: `image PATH` or `backup SNAPSHOT-ID`.
    pub source: String,
    pub read_only: bool,
    /// Where it listens: an NBD URL clients take (`nbd+unix:///NAME?socket=PATH`
    /// or `nbd://HOST:PORT/NAME`).
    pub url: String,
    /// The chain as served now, top first, with each layer's internal
    /// snapshots (shown by `GET /api/v1/exports/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub export: Option<Value>,
}

/// A live operation, as the control socket takes it: `command` is
/// `snapshot` (with `name`), `snapshot-external` (with `overlay`), `commit`,
/// `stream` or `list`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    pub command: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub overlay: Option<String>,
}

/// One running export: its NBD server, listener thread and (for a backup)
/// the repository lock kept fresh while it serves.
struct Running {
    record: ExportRecord,
    server: Arc<Server>,
    listener: Option<JoinHandle<()>>,
    socket: Option<PathBuf>,
    keeper: Option<strata_repo::lock::LockKeeper>,
}

impl Running {
    /// Cut the clients, flush and close the export, stop listening.
    fn stop(mut self) -> Result<(), String> {
        let r = self.server.shutdown().map_err(|e| chain(&e));
        if let Some(t) = self.listener.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
        if let Some(k) = self.keeper.take() {
            let _ = k.stop();
        }
        r
    }
}

/// The running exports of this server process.
#[derive(Clone, Default)]
pub struct Exports {
    running: Arc<Mutex<HashMap<String, Running>>>,
}

impl Exports {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stop every export (at server shutdown): each one's clients are cut
    /// (they read EOF), its images flushed, closed and unlocked, its socket
    /// removed and its repository lock released. Returns the failures, each
    /// naming its export.
    pub fn stop_all(&self) -> Vec<String> {
        let running: Vec<Running> = self.lock().drain().map(|(_, r)| r).collect();
        running
            .into_iter()
            .filter_map(|r| {
                let what = format!("export '{}' ({})", r.record.name, r.record.source);
                r.stop().err().map(|e| format!("{what}: {e}"))
            })
            .collect()
    }

    fn record(&self, id: &str) -> Result<(ExportRecord, Arc<Server>), ApiError> {
        let map = self.lock();
        let r = map.get(id).ok_or_else(|| no_such(id))?;
        Ok((r.record.clone(), r.server.clone()))
    }
}

fn no_such(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no export '{id}'"))
}

fn conflict(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, msg)
}

/// The export routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/exports", get(list).post(create))
        .route("/api/v1/exports/{id}", get(show).delete(stop))
        .route("/api/v1/exports/{id}/control", post(control))
}

/// Where an export listens.
enum Listen {
    Unix(PathBuf, UnixListener),
    Tcp(TcpListener),
}

impl Listen {
    fn open(req: &ExportCreate) -> Result<Listen, ApiError> {
        match (&req.socket, &req.address) {
            (Some(p), None) => {
                if p.symlink_metadata().is_ok() {
                    return Err(conflict(format!("socket: '{}' exists", p.display())));
                }
                let l = UnixListener::bind(p).map_err(|e| {
                    ApiError::bad_request(format!(
                        "socket: cannot listen on '{}': {e}",
                        p.display()
                    ))
                })?;
                Ok(Listen::Unix(p.clone(), l))
            }
            (None, Some(a)) => {
                let addr: SocketAddr = a.parse().map_err(|_| {
                    ApiError::bad_request(format!("address: '{a}' is not HOST:PORT"))
                })?;
                let l = TcpListener::bind(addr)
                    .map_err(|e| conflict(format!("address: cannot listen on {addr}: {e}")))?;
                Ok(Listen::Tcp(l))
            }
            _ => Err(ApiError::bad_request(
                "give either socket (a Unix socket path) or address (HOST:PORT)",
            )),
        }
    }

    fn url(&self, name: &str) -> Result<String, ApiError> {
        Ok(match self {
            Listen::Unix(p, _) => format!("nbd+unix:///{name}?socket={}", p.display()),
            Listen::Tcp(l) => {
                let a = l
                    .local_addr()
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                format!("nbd://{a}/{name}")
            }
        })
    }
}

/// The export `req` asks for, with the lock keeper of a backup's.
fn open_export(
    st: &AppState,
    req: &ExportCreate,
) -> Result<(Export, String, Option<strata_repo::lock::LockKeeper>), ApiError> {
    match (&req.image, &req.backup) {
        (Some(image), None) => {
            if !image.exists() {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("image: '{}' does not exist", image.display()),
                ));
            }
            let mut cfg = ExportConfig::new(req.name.clone(), image.clone());
            cfg.read_only = req.read_only;
            cfg.format = req
                .format
                .as_deref()
                .map(|f| {
                    f.parse().map_err(|_| {
                        ApiError::bad_request(format!(
                            "format: unknown format '{f}' (qcow2, raw, luks, vpc, vdi, vhdx or vmdk)"
                        ))
                    })
                })
                .transpose()?;
            let e = Export::open(&cfg).map_err(|e| conflict(chain(&e)))?;
            Ok((e, format!("image {}", image.display()), None))
        }
        (None, Some(snapshot)) => {
            if req.format.is_some() || req.read_only {
                return Err(ApiError::bad_request(
                    "format and read_only are for an image; a backup is always exported read-only",
                ));
            }
            let repo_err = |e: strata_repo::Error| {
                let status = match e.kind() {
                    strata_repo::ErrorKind::NotFound => StatusCode::NOT_FOUND,
                    strata_repo::ErrorKind::Invalid => StatusCode::BAD_REQUEST,
                    strata_repo::ErrorKind::Locked => StatusCode::CONFLICT,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                ApiError::new(status, chain(&e))
            };
            let mut repo = crate::backups::configured(st)?
                .repository()
                .map_err(repo_err)?;
            let lock = strata_repo::lock::Lock::acquire(&repo, false).map_err(repo_err)?;
            repo.reload_index().map_err(repo_err)?;
            let (id, snap) = repo.find_snapshot(snapshot).map_err(repo_err)?;
            let repo = Arc::new(repo);
            let device =
                strata_repo::device::SnapshotDevice::open(repo.clone(), &snap).map_err(repo_err)?;
            let e = Export::from_device(
                req.name.clone(),
                format!("strata backup snapshot {}", id.short()),
                Arc::new(device),
            )
            .map_err(|e| ApiError::internal(chain(&e)))?;
            Ok((
                e,
                format!("backup {id}"),
                Some(strata_repo::lock::LockKeeper::start(repo, lock)),
            ))
        }
        _ => Err(ApiError::bad_request(
            "give either image (an image file) or backup (a snapshot of the backup repository)",
        )),
    }
}

/// Start an export (201 with it; its `url` is what NBD clients connect to).
#[utoipa::path(post, path = "/api/v1/exports", request_body = ExportCreate,
    responses((status = 201, body = ExportRecord), (status = 400), (status = 404),
              (status = 409), (status = 503)))]
pub async fn create(State(st): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let req: ExportCreate = json_body(body).await?;
    let state = st.clone();
    let record = blocking(move || {
        // The export first: a refused one leaves no socket behind.
        let (export, source, keeper) = open_export(&state, &req)?;
        let listen = match Listen::open(&req) {
            Ok(l) => l,
            Err(e) => {
                let _ = export.close();
                if let Some(k) = keeper {
                    let _ = k.stop();
                }
                return Err(e);
            }
        };
        let record = ExportRecord {
            id: strata_registry::record::new_id().map_err(|e| ApiError::internal(e.to_string()))?,
            name: req.name.clone(),
            source,
            read_only: export.read_only,
            url: listen.url(&req.name)?,
            export: None,
        };
        let server = Server::new(ServerConfig {
            exports: vec![Arc::new(export)],
            tls: None,
            workers: WORKERS,
            log: false,
        });
        let s = server.clone();
        let (listener, socket) = match listen {
            Listen::Unix(p, l) => (
                std::thread::spawn(move || {
                    let _ = s.serve_unix(l);
                }),
                Some(p),
            ),
            Listen::Tcp(l) => (
                std::thread::spawn(move || {
                    let _ = s.serve_tcp(l);
                }),
                None,
            ),
        };
        state.exports.lock().insert(
            record.id.clone(),
            Running {
                record: record.clone(),
                server,
                listener: Some(listener),
                socket,
                keeper,
            },
        );
        Ok(record)
    })
    .await?;
    Ok(located(
        StatusCode::CREATED,
        &format!("/api/v1/exports/{}", record.id),
        record,
    ))
}

/// The running exports.
#[utoipa::path(get, path = "/api/v1/exports",
    responses((status = 200, body = Vec<ExportRecord>)))]
pub async fn list(State(st): State<AppState>) -> Json<Vec<ExportRecord>> {
    let mut out: Vec<_> = st
        .exports
        .lock()
        .values()
        .map(|r| r.record.clone())
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Json(out)
}

/// One export with the chain it serves now.
#[utoipa::path(get, path = "/api/v1/exports/{id}",
    params(("id" = String, Path, description = "export ID")),
    responses((status = 200, body = ExportRecord), (status = 404)))]
pub async fn show(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ExportRecord>, ApiError> {
    let (mut record, server) = st.exports.record(&id)?;
    let info = blocking(move || Ok(server.exports().first().map(|e| e.info()))).await?;
    record.export = info.map(|i| serde_json::to_value(i).unwrap_or_default());
    Ok(Json(record))
}

/// Stop an export: its clients are cut, the image flushed and closed.
#[utoipa::path(delete, path = "/api/v1/exports/{id}",
    params(("id" = String, Path, description = "export ID")),
    responses((status = 204), (status = 404), (status = 500)))]
pub async fn stop(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let running = st.exports.lock().remove(&id).ok_or_else(|| no_such(&id))?;
    blocking(move || running.stop().map_err(ApiError::internal)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A live operation on a running export (what `strata nbd ctl` sends to a
/// server's control socket); the answer is the control socket's.
#[utoipa::path(post, path = "/api/v1/exports/{id}/control", request_body = ControlRequest,
    params(("id" = String, Path, description = "export ID")),
    responses((status = 200, body = Object),
              (status = 400, description = "bad arguments (a missing or empty name, an overlay path that is taken)"),
              (status = 404, description = "no such export"),
              (status = 409, description = "the export refuses it now (read-only, no backing file, a name taken, a lock)"),
              (status = 500, description = "reading or writing the images failed")))]
pub async fn control(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let req: ControlRequest = json_body(body).await?;
    let needs = |field: &str, v: &Option<String>| match v {
        Some(_) => Ok(()),
        None => Err(ApiError::bad_request(format!(
            "{} needs {field}",
            req.command
        ))),
    };
    match req.command.as_str() {
        "snapshot" => needs("name", &req.name)?,
        "snapshot-external" => needs("overlay", &req.overlay)?,
        "commit" | "stream" | "list" => {}
        "quit" => {
            return Err(ApiError::bad_request(
                "command: stop an export with DELETE /api/v1/exports/{id}",
            ))
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "command: unknown command '{other}' (snapshot, snapshot-external, commit, stream or list)"
            )))
        }
    }
    let (_, server) = st.exports.record(&id)?;
    let mut wire = serde_json::json!({"command": req.command});
    if let Some(n) = req.name {
        wire["name"] = n.into();
    }
    if let Some(o) = req.overlay {
        wire["overlay"] = o.into();
    }
    let answer = blocking(move || {
        strata_nbd::control::execute(&server, &wire, &AtomicBool::new(false)).map_err(control_error)
    })
    .await?;
    Ok(Json(answer))
}

/// A failed live operation as an HTTP error: 400 bad arguments, 404 an
/// unknown export, 409 the export's state refuses it, 500 I/O.
fn control_error(e: strata_nbd::control::ControlError) -> ApiError {
    use strata_nbd::control::Failure;
    let status = match e.failure {
        Failure::BadRequest => StatusCode::BAD_REQUEST,
        Failure::NotFound => StatusCode::NOT_FOUND,
        Failure::Conflict => StatusCode::CONFLICT,
        Failure::Io => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.message)
}

/// The export endpoints' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(create, list, show, stop, control),
    components(schemas(ExportCreate, ExportRecord, ControlRequest))
)]
pub struct ExportApi;
