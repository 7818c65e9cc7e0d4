//! `strata image --server URL`: the image registry through the Glance v2 API of
//! `strata serve`, giving the same records (and so the same output) as the
//! local state directory.
//!
//! Uploads stream the file with a progress bar on a terminal; downloads are
//! hashed as they stream and fail at the end, leaving no file, unless the
//! bytes match the image's `os_hash_value` and size. Refusals the registry
//! words (unknown image, wrong state) are shown in its words, as local mode
//! shows them; the server's authentication refusals (401, 403) and transport
//! failures name the server.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::blocking::{Body, Client, RequestBuilder, Response};
use reqwest::{StatusCode, Url};
use serde_json::{Map, Value};
use sha2::{Digest, Sha512};
use strata_registry::{ImageRecord, Status};

use crate::img::progress::Bar;
use crate::serve::{write_verified, ImageStore};
use strata_jobs::Progress;

/// How long to wait for a connection to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A `strata serve` (or any Glance v2 API) reached over HTTP(S).
pub struct Remote {
    client: Client,
    /// The server's URL without a trailing `/`.
    base: String,
    token: String,
}

impl Remote {
    /// A client for the server at `url` with `token`; `ca_file` (PEM) replaces
    /// the system's certificate authorities for https.
    pub fn connect(url: &str, token: Option<String>, ca_file: Option<&Path>) -> Result<Remote> {
        let base = url.trim_end_matches('/').to_string();
        let parsed = Url::parse(&base).with_context(|| format!("invalid server URL '{url}'"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            bail!("invalid server URL '{url}': use http:// or https://");
        }
        let Some(token) = token else {
            bail!("no API token for {base}: give --token or set STRATA_TOKEN (`strata token create` makes one)");
        };
        let mut builder = Client::builder()
            .timeout(None)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca).with_context(|| format!("read {}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("certificates in {}", ca.display()))?;
            if certs.is_empty() {
                bail!("no PEM certificate in {}", ca.display());
            }
            builder = builder.tls_certs_only(certs);
        }
        let client = builder.build().context("set up the HTTP client")?;
        Ok(Remote {
            client,
            base,
            token,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Send a request with the token; a non-success status becomes an error.
    fn send(&self, req: RequestBuilder) -> Result<Response> {
        let resp = req
            .header("X-Auth-Token", &self.token)
            .send()
            .map_err(|e| self.transport(e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(self.refusal(resp))
        }
    }

    fn json(&self, req: RequestBuilder) -> Result<Value> {
        let resp = self.send(req)?;
        let body = resp.bytes().map_err(|e| self.transport(e))?;
        serde_json::from_slice(&body)
            .with_context(|| format!("the answer of {} is not JSON", self.base))
    }

    /// A failure to reach the server or to finish an exchange with it.
    fn transport(&self, e: reqwest::Error) -> anyhow::Error {
        let refused = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
            .filter_map(|e| e.downcast_ref::<std::io::Error>())
            .any(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
        if refused {
            return anyhow!(
                "could not connect to {}: connection refused (is `strata serve` listening there?)",
                self.base
            );
        }
        anyhow::Error::new(e).context(format!("request to {} failed", self.base))
    }

    /// An error status as the user should read it: the registry's own message
    /// for refusals about images (worded as local mode words them), with the
    /// status and server for authentication and server failures.
    fn refusal(&self, resp: Response) -> anyhow::Error {
        let status = resp.status();
        let body = resp.bytes().unwrap_or_default();
        let message = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
        let code = status.as_u16();
        let reason = status.canonical_reason().unwrap_or("");
        match status {
            StatusCode::UNAUTHORIZED => anyhow!(
                "{} refused the token (HTTP {code} {reason}): {message}",
                self.base
            ),
            StatusCode::FORBIDDEN => {
                anyhow!("{} refused (HTTP {code} {reason}): {message}", self.base)
            }
            s if s.is_client_error() && !message.is_empty() => anyhow!(message),
            _ => anyhow!("{} answered HTTP {code} {reason}: {message}", self.base),
        }
    }

    /// The API path of image `id`. An ID that is not a UUID names no image
    /// (the registry's rule), so it is refused here as the registry refuses
    /// it, and nothing like `..` ever reaches a URL.
    fn image_path(id: &str) -> Result<String> {
        if !strata_registry::record::is_valid_id(id) {
            return Err(strata_registry::Error::NotFound(id.to_string()).into());
        }
        Ok(format!("/v2/images/{id}"))
    }
}

fn record(v: Value) -> Result<ImageRecord> {
    strata_api::images::image_record(v).context("the server sent an image that is not one")
}

impl ImageStore for Remote {
    fn list(&self, name: Option<String>, status: Option<String>) -> Result<Vec<ImageRecord>> {
        let mut url = Url::parse(&self.url("/v2/images"))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("limit", &strata_registry::list::MAX_LIMIT.to_string());
            if let Some(n) = &name {
                q.append_pair("name", n);
            }
            if let Some(s) = &status {
                q.append_pair("status", s);
            }
        }
        let mut all = Vec::new();
        loop {
            let mut page = self.json(self.client.get(url.clone()))?;
            let Value::Array(images) = page["images"].take() else {
                bail!("the image list of {} has no 'images'", self.base);
            };
            for v in images {
                all.push(record(v)?);
            }
            match page["next"].as_str() {
                Some(next) => url = Url::parse(&self.url(next))?,
                None => return Ok(all),
            }
        }
    }

    fn get(&self, id: &str) -> Result<ImageRecord> {
        record(self.json(self.client.get(self.url(&Self::image_path(id)?)))?)
    }

    fn delete(&self, id: &str) -> Result<()> {
        self.send(self.client.delete(self.url(&Self::image_path(id)?)))?;
        Ok(())
    }

    fn create_from_file(&self, file: &Path, body: Map<String, Value>) -> Result<ImageRecord> {
        let src = std::fs::File::open(file).with_context(|| format!("open {}", file.display()))?;
        let len = src
            .metadata()
            .with_context(|| format!("stat {}", file.display()))?
            .len();
        let create = self
            .client
            .post(self.url("/v2/images"))
            .header("Content-Type", "application/json")
            .body(serde_json::to_vec(&body)?);
        let created = record(self.json(create)?)?;
        let path = Self::image_path(&created.id)?;
        let bar = Arc::new(Bar::new(true));
        bar.set_total(len);
        let reader = Counted {
            inner: src,
            bar: bar.clone(),
        };
        let body = Body::sized(reader, len);
        self.send(
            self.client
                .put(self.url(&format!("{path}/file")))
                .header("Content-Type", "application/octet-stream")
                .header("x-openstack-image-size", len)
                .body(body),
        )
        .with_context(|| format!("upload {} into image {}", file.display(), created.id))?;
        bar.finish();
        self.get(&created.id)
    }

    fn download(&self, id: &str, file: &Path) -> Result<()> {
        let rec = self.get(id)?;
        if rec.status != Status::Active {
            return Err(strata_registry::Error::no_data(id, rec.status).into());
        }
        let (Some(want), Some(size)) = (rec.os_hash_value.clone(), rec.size) else {
            bail!("image {id} is active but has no sha512 or size to verify against");
        };
        let resp = self.send(
            self.client
                .get(self.url(&format!("{}/file", Self::image_path(id)?))),
        )?;
        if resp.status() == StatusCode::NO_CONTENT {
            let now = self.get(id)?.status;
            return Err(strata_registry::Error::no_data(id, now).into());
        }
        let reader = Verified {
            inner: resp,
            sha: Some(Sha512::new()),
            want,
            size,
            got: 0,
        };
        write_verified(id, reader, file)
    }
}

/// A file read for an upload, advancing the progress bar by what was read.
struct Counted {
    inner: std::fs::File,
    bar: Arc<Bar>,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.advance(n as u64);
        Ok(n)
    }
}

/// A download's body, hashed as it is read. At its end it fails with
/// `InvalidData` instead of reporting EOF unless exactly `size` bytes came
/// and their sha512 is `want`, so nothing unverified is taken for the image.
struct Verified<R> {
    inner: R,
    /// `None` once the end was verified.
    sha: Option<Sha512>,
    want: String,
    size: u64,
    got: u64,
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let Some(sha) = &mut self.sha else {
            return Ok(n);
        };
        if n > 0 {
            sha.update(&buf[..n]);
            self.got += n as u64;
            if self.got > self.size {
                return Err(bad_data(format!(
                    "the server sent more than the image's {} bytes",
                    self.size
                )));
            }
        } else if !buf.is_empty() {
            if self.got != self.size {
                return Err(bad_data(format!(
                    "the server sent {} of the image's {} bytes",
                    self.got, self.size
                )));
            }
            let got = strata_registry::record::hex(&std::mem::take(sha).finalize());
            if got != self.want {
                return Err(bad_data(format!(
                    "image data does not match its sha512 {} (read {got})",
                    self.want
                )));
            }
            self.sha = None;
        }
        Ok(n)
    }
}

fn bad_data(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}
