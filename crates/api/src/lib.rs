//! strata's HTTP API (`strata serve`): the image registry in the shape of
//! OpenStack Glance's image API v2 (so its own client works against it),
//! bearer-token authentication with admin and read-only roles, optional TLS.
//!
//! Handlers are thin: they parse, call the library crates on blocking threads
//! and shape the answer. The CLI calls the same library functions.

pub mod backups;
pub mod error;
pub mod exports;
pub mod image_ops;
pub mod images;
pub mod run;
pub mod schema;
pub mod snapshots;
pub mod task_routes;
pub mod tasks;
pub mod tokens;
pub mod vms;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::json;
use strata_registry::Registry;

pub use error::{ApiError, Error, Result};
pub use tokens::{Role, Tokens};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    pub tokens: Tokens,
    pub tasks: tasks::Tasks,
    /// The VMs of the state directory (busy ones answer 409 quickly).
    pub vms: strata_vm::Manager,
    /// The backup repository, when the server was given one.
    pub backup: Option<backups::BackupRepo>,
    /// The NBD exports this process serves.
    pub exports: exports::Exports,
}

impl AppState {
    /// The state of the service whose state directory is `dir` (the registry
    /// is opened, which recovers what a killed server left).
    pub fn open(dir: &Path) -> Result<AppState> {
        let registry =
            Registry::open(dir).map_err(|e| Error::State(format!("open image registry: {e}")))?;
        AppState::with_registry(dir, registry)
    }

    /// The state of the service on `dir` with its registry already opened
    /// (its image data in a store of the caller's choice).
    pub fn with_registry(dir: &Path, registry: Registry) -> Result<AppState> {
        Ok(AppState {
            registry,
            tokens: Tokens::new(dir),
            tasks: tasks::Tasks::open(dir)?,
            vms: strata_vm::Manager::new(strata_vm::StateDir::new(dir))
                .with_lock_wait(vms::VM_LOCK_WAIT),
            backup: None,
            exports: exports::Exports::default(),
        })
    }
}

/// The token a request carries: `X-Auth-Token` (what OpenStack clients send)
/// or `Authorization: Bearer`.
fn bearer(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("x-auth-token").and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_string());
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_string())
}

/// Refuse requests without a valid token (401) and writes with a read-only one
/// (403). Version discovery and the OpenAPI document are open to all.
async fn authenticate(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if matches!(path, "/" | "/versions" | "/api/v1/openapi.json") {
        return next.run(req).await;
    }
    let Some(token) = bearer(req.headers()) else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "This server could not verify that you are authorized to access the document you requested: send a token in X-Auth-Token or Authorization: Bearer",
        )
        .into_response();
    };
    let tokens = st.tokens.clone();
    let role = match tokio::task::spawn_blocking(move || tokens.check(&token)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return ApiError::from(e).into_response(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    match role {
        None => ApiError::new(StatusCode::UNAUTHORIZED, "The token is not valid").into_response(),
        Some(Role::ReadOnly) if !matches!(*req.method(), Method::GET | Method::HEAD) => {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "The token is read-only: it may not change anything",
            )
            .into_response()
        }
        Some(_) => next.run(req).await,
    }
}

/// Version discovery, as Glance answers it (300 Multiple Choices).
#[utoipa::path(get, path = "/versions",
    responses((status = 300, body = serde_json::Value, description = "the API versions (also at /)")))]
pub async fn versions(headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let href = format!("http://{host}/v2/");
    let v = |id: &str, status: &str| json!({"id": id, "status": status, "links": [{"rel": "self", "href": href}]});
    let body = json!({"versions": [
        v("v2.9", "CURRENT"), v("v2.8", "SUPPORTED"), v("v2.7", "SUPPORTED"),
        v("v2.6", "SUPPORTED"), v("v2.5", "SUPPORTED"), v("v2.4", "SUPPORTED"),
        v("v2.3", "SUPPORTED"), v("v2.2", "SUPPORTED"), v("v2.1", "SUPPORTED"),
        v("v2.0", "SUPPORTED"),
    ]});
    (StatusCode::MULTIPLE_CHOICES, Json(body)).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "The resource could not be found.")
}

/// The service's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(versions))
        .route("/versions", get(versions))
        .route("/v2/schemas/image", get(images::image_schema))
        .route("/v2/schemas/images", get(images::images_schema))
        .route("/v2/images", get(images::list).post(images::create))
        .route(
            "/v2/images/{id}",
            get(images::show)
                .patch(images::update)
                .delete(images::delete),
        )
        .route(
            "/v2/images/{id}/file",
            get(images::download).put(images::upload),
        )
        .route(
            "/v2/images/{id}/tags/{tag}",
            put(images::add_tag).delete(images::remove_tag),
        )
        .route("/api/v1/openapi.json", get(task_routes::openapi))
        .route("/api/v1/tasks", get(task_routes::list))
        .route(
            "/api/v1/tasks/{id}",
            get(task_routes::show).delete(task_routes::cancel),
        )
        .route(
            "/api/v1/images/{id}/verify",
            axum::routing::post(task_routes::verify),
        )
        .merge(vms::routes())
        .merge(snapshots::routes())
        .merge(backups::routes())
        .merge(exports::routes())
        .route(
            "/api/v1/images/from-snapshot",
            axum::routing::post(image_ops::from_snapshot),
        )
        .route(
            "/api/v1/images/from-vm",
            axum::routing::post(image_ops::from_vm),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "The method is not allowed for this resource.",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .with_state(state)
}

/// Where and how to serve.
#[derive(Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// PEM certificate chain and key: TLS when both are given.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Largest image accepted (bytes); the registry's default when `None`.
    pub max_image_size: Option<u64>,
    /// The backup repository's location and password file.
    pub backup: Option<(String, PathBuf)>,
    /// The registry, opened by the caller (with its image store); the state
    /// directory's own when `None`.
    pub registry: Option<Registry>,
}

/// Serve until SIGINT or SIGTERM, then stop: HTTP requests in progress get
/// 5 s to finish, running tasks are cancelled and waited for (see
/// [`tasks::Tasks::stop_all`], [`tasks::stop_grace`]), and every NBD export
/// is stopped cleanly (see [`exports::Exports::stop_all`]). `ready` is called with the bound address
/// once the server accepts connections.
pub fn serve(opts: ServeOptions, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let mut state = match opts.registry.clone() {
        Some(reg) => AppState::with_registry(&opts.state_dir, reg)?,
        None => AppState::open(&opts.state_dir)?,
    };
    if let Some(max) = opts.max_image_size {
        state.registry = state.registry.with_max_image_size(max);
    }
    if let Some((location, password_file)) = &opts.backup {
        let repo = backups::BackupRepo::open(location, password_file).map_err(|e| {
            Error::State(format!("backup repository {location}: {}", run::chain(&e)))
        })?;
        state.backup = Some(repo);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Serve(format!("start the runtime: {e}")))?;
    let exports = state.exports.clone();
    let tasks = state.tasks.clone();
    let served = rt.block_on(async move {
        let app = router(state).into_make_service();
        let listener = std::net::TcpListener::bind(opts.listen)
            .map_err(|e| Error::Serve(format!("listen on {}: {e}", opts.listen)))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Serve(e.to_string()))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Serve(e.to_string()))?;
        let handle = axum_server::Handle::new();
        let h2 = handle.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            h2.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
        });
        ready(addr);
        match opts.tls {
            None => axum_server::from_tcp(listener)
                .handle(handle)
                .serve(app)
                .await
                .map_err(|e| Error::Serve(e.to_string())),
            Some((cert, key)) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let cfg = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key)
                    .await
                    .map_err(|e| {
                        Error::Serve(format!(
                            "TLS certificate {} / key {}: {e}",
                            cert.display(),
                            key.display()
                        ))
                    })?;
                axum_server::from_tcp_rustls(listener, cfg)
                    .handle(handle)
                    .serve(app)
                    .await
                    .map_err(|e| Error::Serve(e.to_string()))
            }
        }
    });
    let cut = tasks.stop_all(tasks::stop_grace());
    if !cut.is_empty() {
        eprintln!(
            "strata serve: {} task(s) still running after {:?} were cut (shown interrupted after a restart): {}",
            cut.len(),
            tasks::stop_grace(),
            cut.join(", ")
        );
    }
    let failed = exports.stop_all();
    served?;
    match failed.is_empty() {
        true => Ok(()),
        false => Err(Error::Serve(format!(
            "stopping the NBD exports: {}",
            failed.join("; ")
        ))),
    }
}

async fn shutdown_signal() {
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}
