//! The Glance v2 image endpoints. Each handler parses the request, calls the
//! registry on a blocking thread and shapes the answer; the logic is the
//! registry's.

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{Map, Value};
use strata_registry::{ImageRecord, ListQuery, PatchOp};

use crate::error::ApiError;
use crate::AppState;

/// Largest JSON request body (create, patch).
pub const MAX_JSON_BODY: usize = 64 * 1024;
/// Chunks in flight between the disk and the network, each way.
const CHUNKS_IN_FLIGHT: usize = 8;

/// The media type of Glance's JSON patches.
pub const PATCH_MEDIA_TYPE: &str = "application/openstack-images-v2.1-json-patch";

/// An image as the API shows it: its record plus its links.
pub fn image_json(rec: &ImageRecord) -> Value {
    let mut m = rec.to_json();
    m.insert(
        "self".into(),
        Value::String(format!("/v2/images/{}", rec.id)),
    );
    m.insert(
        "file".into(),
        Value::String(format!("/v2/images/{}/file", rec.id)),
    );
    m.insert("schema".into(), Value::String("/v2/schemas/image".into()));
    Value::Object(m)
}

/// The record an API image object describes: [`image_json`] undone (its links
/// dropped, the rest read back as the record), so a remote client shows an
/// image exactly as the registry's own record would be shown.
pub fn image_record(v: Value) -> serde_json::Result<ImageRecord> {
    let mut v = v;
    if let Value::Object(m) = &mut v {
        for link in ["self", "file", "schema"] {
            m.remove(link);
        }
    }
    serde_json::from_value(v)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> strata_registry::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

/// Read a JSON body of at most [`MAX_JSON_BODY`] bytes.
async fn read_json(body: Body) -> Result<Value, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_JSON_BODY)
        .await
        .map_err(|e| {
            if is_length_limit(&e) {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("Request body larger than {MAX_JSON_BODY} bytes"),
                )
            } else {
                ApiError::bad_request(format!("Could not read the request body: {e}"))
            }
        })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("Malformed JSON in request body: {e}")))
}

/// Whether a body error is the length limit of [`axum::body::to_bytes`].
fn is_length_limit(e: &axum::Error) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        if err.to_string().contains("length limit exceeded") {
            return true;
        }
        cur = err.source();
    }
    false
}

fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// Create an image (no data yet: `queued`) from the writable attributes.
#[utoipa::path(post, path = "/v2/images",
    request_body(content = serde_json::Value, content_type = "application/json",
        description = "writable attributes (/v2/schemas/image) and custom properties"),
    responses((status = 201, body = serde_json::Value, description = "the image"),
        (status = 400), (status = 409), (status = 413), (status = 415)))]
pub async fn create(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let mt = media_type(&headers);
    if !mt.is_empty() && mt != "application/json" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Unsupported Content-Type '{mt}': send application/json"),
        ));
    }
    let Value::Object(map) = read_json(body).await? else {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object",
        ));
    };
    let reg = st.registry.clone();
    let rec = blocking(move || reg.create(&map)).await?;
    let location = format!("/v2/images/{}", rec.id);
    let mut resp = (StatusCode::CREATED, Json(image_json(&rec))).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// One image's attributes.
#[utoipa::path(get, path = "/v2/images/{id}",
    params(("id" = String, Path, description = "image ID")),
    responses((status = 200, body = serde_json::Value, description = "the image"), (status = 404)))]
pub async fn show(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let reg = st.registry.clone();
    let rec = blocking(move || reg.get(&id)).await?;
    Ok(Json(image_json(&rec)))
}

/// One page of images, with a `next` link when more follow.
#[utoipa::path(get, path = "/v2/images",
    params(
        ("limit" = Option<u64>, Query, description = "page size (default 25, at most 1000)"),
        ("marker" = Option<String>, Query, description = "the ID after which the page starts"),
        ("sort" = Option<String>, Query, description = "key[:asc|desc],... (or sort_key / sort_dir)"),
        ("tag" = Option<String>, Query, description = "a tag every image listed carries (repeatable)"),
        ("size_min" = Option<u64>, Query, description = "at least this many bytes"),
        ("size_max" = Option<u64>, Query, description = "at most this many bytes"),
    ),
    responses((status = 200, body = serde_json::Value,
        description = "{images, first, schema, next}; any other parameter filters on the attribute it names (`in:a,b` for id, name, status and the formats, `gte:TIME`-style for created_at and updated_at)"),
        (status = 400)))]
pub async fn list(
    State(st): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let raw = raw.unwrap_or_default();
    let pairs: Vec<(String, String)> = serde_urlencoded_pairs(&raw)?;
    let q = ListQuery::from_pairs(&pairs)?;
    let reg = st.registry.clone();
    let q2 = q.clone();
    let page = blocking(move || reg.list(&q2)).await?;
    let mut out = Map::new();
    out.insert(
        "images".into(),
        Value::Array(page.images.iter().map(image_json).collect()),
    );
    out.insert("first".into(), Value::String("/v2/images".into()));
    out.insert("schema".into(), Value::String("/v2/schemas/images".into()));
    if let (true, Some(last)) = (page.more, page.images.last()) {
        let mut kept: Vec<(String, String)> =
            pairs.into_iter().filter(|(k, _)| k != "marker").collect();
        kept.push(("marker".into(), last.id.clone()));
        let qs = kept
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        out.insert("next".into(), Value::String(format!("/v2/images?{qs}")));
    }
    Ok(Json(Value::Object(out)))
}

/// Decode `application/x-www-form-urlencoded` query pairs.
fn serde_urlencoded_pairs(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    let q: axum::extract::Query<Vec<(String, String)>> = axum::extract::Query::try_from_uri(
        &format!("/?{raw}")
            .parse()
            .map_err(|_| ApiError::bad_request("Malformed query string"))?,
    )
    .map_err(|e| ApiError::bad_request(format!("Malformed query string: {e}")))?;
    Ok(q.0)
}

/// Percent-encode a query component.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':' | b',') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parse a Glance JSON patch (top-level attribute paths only).
fn parse_patch(v: Value) -> Result<Vec<PatchOp>, ApiError> {
    let Value::Array(items) = v else {
        return Err(ApiError::bad_request(
            "A JSON patch must be a list of operations",
        ));
    };
    let mut ops = Vec::new();
    for item in items {
        let Value::Object(mut m) = item else {
            return Err(ApiError::bad_request(
                "Each patch operation must be an object",
            ));
        };
        let op = m
            .get("op")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let path = m
            .get("path")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ApiError::bad_request("Each patch operation needs a string 'path'"))?;
        let key = path
            .strip_prefix('/')
            .filter(|k| !k.is_empty() && !k.contains('/'))
            .ok_or_else(|| {
                ApiError::bad_request(format!("Invalid JSON pointer for this resource: '{path}'"))
            })?
            .replace("~1", "/")
            .replace("~0", "~");
        let mut value = || {
            m.remove("value")
                .ok_or_else(|| ApiError::bad_request(format!("Operation '{op}' needs a 'value'")))
        };
        ops.push(match op.as_str() {
            "add" => PatchOp::Add(key, value()?),
            "replace" => PatchOp::Replace(key, value()?),
            "remove" => PatchOp::Remove(key),
            other => {
                return Err(ApiError::bad_request(format!(
                    "Operation '{other}' is not supported: use add, replace or remove"
                )))
            }
        });
    }
    Ok(ops)
}

/// Change attributes with a JSON patch (add, replace, remove).
#[utoipa::path(patch, path = "/v2/images/{id}",
    params(("id" = String, Path, description = "image ID")),
    request_body(content = serde_json::Value, content_type = "application/openstack-images-v2.1-json-patch"),
    responses((status = 200, body = serde_json::Value, description = "the image"),
        (status = 400), (status = 403), (status = 404), (status = 409), (status = 415)))]
pub async fn update(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let mt = media_type(&headers);
    if mt != PATCH_MEDIA_TYPE && mt != "application/openstack-images-v2.0-json-patch" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Unsupported Content-Type '{mt}': send {PATCH_MEDIA_TYPE}"),
        ));
    }
    let ops = parse_patch(read_json(body).await?)?;
    let reg = st.registry.clone();
    let rec = blocking(move || reg.update(&id, &ops)).await?;
    Ok(Json(image_json(&rec)))
}

/// Delete an image and its data (403 while it is `protected`).
#[utoipa::path(delete, path = "/v2/images/{id}",
    params(("id" = String, Path, description = "image ID")),
    responses((status = 204), (status = 403), (status = 404), (status = 409)))]
pub async fn delete(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let reg = st.registry.clone();
    blocking(move || reg.delete(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Add a tag.
#[utoipa::path(put, path = "/v2/images/{id}/tags/{tag}",
    params(("id" = String, Path, description = "image ID"), ("tag" = String, Path)),
    responses((status = 204), (status = 400), (status = 404)))]
pub async fn add_tag(
    State(st): State<AppState>,
    Path((id, tag)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let reg = st.registry.clone();
    blocking(move || reg.add_tag(&id, &tag)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Remove a tag.
#[utoipa::path(delete, path = "/v2/images/{id}/tags/{tag}",
    params(("id" = String, Path, description = "image ID"), ("tag" = String, Path)),
    responses((status = 204), (status = 404)))]
pub async fn remove_tag(
    State(st): State<AppState>,
    Path((id, tag)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let reg = st.registry.clone();
    blocking(move || reg.remove_tag(&id, &tag)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /v2/images/{id}/file`: stream the body into the registry. The bytes
/// pass through a small bounded channel to a blocking writer, so memory stays
/// bounded whatever the size. A body that ends early or fails leaves the
/// image `queued` (the upload is dropped).
#[utoipa::path(put, path = "/v2/images/{id}/file",
    params(("id" = String, Path, description = "image ID")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the image's data"),
    responses((status = 204, description = "the image is active"), (status = 400), (status = 404),
        (status = 409), (status = 413), (status = 415)))]
pub async fn upload(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let mt = media_type(&headers);
    if !mt.is_empty() && mt != "application/octet-stream" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Unsupported Content-Type '{mt}': send application/octet-stream"),
        ));
    }
    let expected = match headers.get("x-openstack-image-size") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("x-openstack-image-size must be an integer")
                })?,
        ),
    };
    let reg = st.registry.clone();
    let upload = blocking(move || reg.begin_upload(&id, expected)).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(CHUNKS_IN_FLIGHT);
    let writer = tokio::task::spawn_blocking(move || {
        let mut upload = upload;
        while let Some(b) = rx.blocking_recv() {
            upload.write(&b)?;
        }
        Ok::<_, strata_registry::Error>(upload)
    });
    let mut stream = body.into_data_stream();
    let mut cut = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => {
                if tx.send(b).await.is_err() {
                    break; // the writer failed: its error is reported below
                }
            }
            Err(e) => {
                cut = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let upload = writer.await??;
    if let Some(e) = cut {
        drop(upload);
        return Err(ApiError::bad_request(format!(
            "The upload ended early ({e}); the image is queued again"
        )));
    }
    blocking(move || upload.finish()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v2/images/{id}/file`: the data, whole (verified against its SHA-512
/// while it streams: the last chunk is sent only once the hash matches, so a
/// mismatch breaks the connection short of the announced length rather than
/// finish a damaged download) or one `Range`.
#[utoipa::path(get, path = "/v2/images/{id}/file",
    params(("id" = String, Path, description = "image ID")),
    responses((status = 200, body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 204, description = "the image has no data"), (status = 206, description = "the Range asked for"),
        (status = 404), (status = 416)))]
pub async fn download(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let range_header = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let reg = st.registry.clone();
    let (rec, reader, range) = blocking(move || {
        let rec = reg.get(&id)?;
        let range = match &range_header {
            Some(h) => strata_registry::resolve_range(h, rec.size.unwrap_or(0))?,
            None => None,
        };
        let (rec, reader) = reg.download(&id, range)?;
        Ok((rec, reader, range))
    })
    .await?;
    let len = reader.len();
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || pump(reader, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(md5) = rec
        .checksum
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        if range.is_none() {
            h.insert("content-md5", md5);
        }
    }
    if let Some((a, b)) = range {
        let cr = format!("bytes {a}-{b}/{}", rec.size.unwrap_or(0));
        if let Ok(v) = HeaderValue::from_str(&cr) {
            h.insert(header::CONTENT_RANGE, v);
        }
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(resp)
}

/// Send `reader`'s chunks (shared with the response, not copied) into `tx`
/// until the end, an error (sent on, so the response breaks) or the client
/// going away.
fn pump(
    mut reader: strata_registry::Download,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) {
    loop {
        match reader.next_chunk() {
            Ok(None) => return,
            Ok(Some(c)) => {
                if tx.blocking_send(Ok(Bytes::from_owner(c))).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
}

/// The image schemas glanceclient reads (`GET /v2/schemas/image`).
#[utoipa::path(get, path = "/v2/schemas/image",
    responses((status = 200, body = serde_json::Value, description = "JSON schema of an image")))]
pub async fn image_schema() -> Json<Value> {
    Json(crate::schema::image())
}

/// `GET /v2/schemas/images`.
#[utoipa::path(get, path = "/v2/schemas/images",
    responses((status = 200, body = serde_json::Value, description = "JSON schema of a list")))]
pub async fn images_schema() -> Json<Value> {
    Json(crate::schema::images())
}

/// The Glance endpoints' part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    list,
    create,
    show,
    update,
    delete,
    upload,
    download,
    add_tag,
    remove_tag,
    image_schema,
    images_schema
))]
pub struct ImageApi;
