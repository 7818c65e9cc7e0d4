//! The S3 [`Backend`]: a repository in a bucket of any S3-compatible object store
//! (AWS, Garage, MinIO, Ceph RGW), in restic's layout under an optional prefix:
//! `PREFIX/config`, `PREFIX/keys/ID`, `PREFIX/data/XX/ID`, and so on. restic opens
//! the same repository with the same `s3:` location.
//!
//! Locations are written as restic writes them:
//! `s3:http://HOST[:PORT]/BUCKET[/PREFIX]`, `s3:https://...`, or
//! `s3:HOST[:PORT]/BUCKET[/PREFIX]` (HTTPS). Credentials and the region come
//! from the usual variables: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION` (or `AWS_REGION`; default
//! `us-east-1`). Requests use path-style addressing, which every S3-compatible
//! server accepts.
//!
//! Contracts (those of [`Backend`]): a PUT is atomic, so a file is either absent or
//! whole under its name; it is durable when the server acknowledges it. The backend
//! is blocking: each call runs on a runtime the backend owns, so it must not be
//! called from inside an async task (use `spawn_blocking`).

use crate::backend::{Backend, FileType, Handle};
use crate::error::{Error, ErrorKind, Result};
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use std::time::Duration;

/// A parsed `s3:` repository location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// `http://host:port` or `https://host`.
    pub endpoint: String,
    pub bucket: String,
    /// The key prefix inside the bucket, without leading or trailing slashes
    /// (empty: the bucket's root).
    pub prefix: String,
}

impl S3Location {
    /// Parse restic's `s3:` location syntax. `None` when `location` is not an
    /// `s3:` location at all; an error when it is one but malformed.
    pub fn parse(location: &str) -> Option<Result<S3Location>> {
        let rest = location.strip_prefix("s3:")?;
        Some(Self::parse_rest(location, rest))
    }

    fn parse_rest(location: &str, rest: &str) -> Result<S3Location> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::Invalid,
                format!(
                    "repository '{location}': {why} (expected s3:http://HOST[:PORT]/BUCKET[/PREFIX] \
                     or s3:HOST/BUCKET[/PREFIX] for HTTPS)"
                ),
            )
        };
        let (scheme, rest) = if let Some(r) = rest.strip_prefix("http://") {
            ("http", r)
        } else if let Some(r) = rest.strip_prefix("https://") {
            ("https", r)
        } else if rest.contains("://") {
            return Err(bad("only http:// and https:// endpoints are supported"));
        } else {
            ("https", rest)
        };
        let mut parts = rest.splitn(3, '/');
        let host = parts.next().unwrap_or_default();
        let bucket = parts.next().unwrap_or_default();
        let prefix = parts.next().unwrap_or_default().trim_matches('/');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        if prefix.split('/').any(|c| c == "." || c == "..") {
            return Err(bad("the prefix may not contain '.' or '..' components"));
        }
        Ok(S3Location {
            endpoint: format!("{scheme}://{host}"),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }
}

/// A repository in an S3 bucket.
pub struct S3Backend {
    location: S3Location,
    store: AmazonS3,
    runtime: tokio::runtime::Runtime,
}

impl S3Backend {
    /// Connect (lazily: no request is made until the first call) to the bucket
    /// named by `location`, with credentials and region from the environment.
    pub fn new(location: S3Location) -> Result<S3Backend> {
        let mut builder = AmazonS3Builder::from_env()
            .with_endpoint(&location.endpoint)
            .with_bucket_name(&location.bucket)
            .with_allow_http(location.endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false)
            .with_retry(RetryConfig {
                max_retries: 4,
                retry_timeout: Duration::from_secs(30),
                ..RetryConfig::default()
            });
        let region = ["AWS_DEFAULT_REGION", "AWS_REGION"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|r| !r.is_empty()));
        if let Some(region) = region {
            builder = builder.with_region(region);
        }
        let store = builder.build().map_err(|e| {
            Error::with_source(
                ErrorKind::Invalid,
                format!(
                    "could not set up the S3 client for bucket '{}' at {}: set \
                     AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_DEFAULT_REGION)",
                    location.bucket, location.endpoint
                ),
                e,
            )
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("strata-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io("could not start the S3 client's I/O threads", e))?;
        Ok(S3Backend {
            location,
            store,
            runtime,
        })
    }

    /// The object key of a repository file.
    fn key(&self, h: &Handle) -> ObjectPath {
        let rel = match h.kind {
            FileType::Config => "config".to_string(),
            FileType::Data => {
                let prefix = h.name.get(..2).unwrap_or("00");
                format!("data/{prefix}/{}", h.name)
            }
            k => format!("{}/{}", k.dir(), h.name),
        };
        self.under_prefix(&rel)
    }

    fn under_prefix(&self, rel: &str) -> ObjectPath {
        if self.location.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.location.prefix))
        }
    }

    /// Turn an object store error into a repository error naming the object.
    fn err(&self, what: &str, h: &Handle, e: object_store::Error) -> Error {
        let kind = match e {
            object_store::Error::NotFound { .. } => ErrorKind::NotFound,
            object_store::Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            _ => ErrorKind::Io,
        };
        Error::with_source(kind, format!("could not {what} {}", self.describe(h)), e)
    }

    fn describe(&self, h: &Handle) -> String {
        format!("'{}' in {}", self.key(h), self.location())
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        let l = &self.location;
        if l.prefix.is_empty() {
            format!("s3:{}/{}", l.endpoint, l.bucket)
        } else {
            format!("s3:{}/{}/{}", l.endpoint, l.bucket, l.prefix)
        }
    }

    /// Object stores have no directories: creating the repository only checks
    /// that the bucket answers and holds no repository yet. The bucket itself
    /// must exist (buckets are an administrator's business on most servers).
    fn create(&self) -> Result<()> {
        match self.stat(&Handle::config()) {
            Ok(_) => Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "a repository already exists at '{}' (it has a config file)",
                    self.location()
                ),
            )),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // A listing fails clearly when the bucket is missing or the
                // credentials are refused, before any key is derived.
                self.list(FileType::Key).map(|_| ())
            }
            Err(e) => Err(e),
        }
    }

    fn list(&self, kind: FileType) -> Result<Vec<(String, u64)>> {
        if kind == FileType::Config {
            return match self.stat(&Handle::config()) {
                Ok(size) => Ok(vec![("config".to_string(), size)]),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(e),
            };
        }
        let prefix = self.under_prefix(kind.dir());
        let metas: Vec<_> = self
            .runtime
            .block_on(self.store.list(Some(&prefix)).try_collect())
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Io,
                    format!("could not list '{prefix}/' in {}", self.location()),
                    e,
                )
            })?;
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?.to_string();
                let hex = name.len() == 64 && name.bytes().all(|c| c.is_ascii_hexdigit());
                hex.then_some((name, m.size))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn read(&self, h: &Handle) -> Result<Vec<u8>> {
        let key = self.key(h);
        let bytes = self
            .runtime
            .block_on(async { self.store.get(&key).await?.bytes().await })
            .map_err(|e| self.err("read", h, e))?;
        Ok(bytes.to_vec())
    }

    fn read_range(&self, h: &Handle, offset: u64, len: usize) -> Result<Vec<u8>> {
        let end = offset.checked_add(len as u64).ok_or_else(|| {
            Error::new(
                ErrorKind::Invalid,
                format!("a read of {len} bytes at offset {offset} overflows"),
            )
        })?;
        let key = self.key(h);
        let bytes = self
            .runtime
            .block_on(self.store.get_range(&key, offset..end))
            .map_err(|e| self.err(&format!("read {len} bytes at offset {offset} of"), h, e))?;
        if bytes.len() != len {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{} is short: {} bytes at offset {offset} where {len} were expected",
                    self.describe(h),
                    bytes.len()
                ),
            ));
        }
        Ok(bytes.to_vec())
    }

    fn write(&self, h: &Handle, data: &[u8]) -> Result<()> {
        let key = self.key(h);
        let payload = PutPayload::from(data.to_vec());
        self.runtime
            .block_on(self.store.put(&key, payload))
            .map_err(|e| self.err("write", h, e))?;
        Ok(())
    }

    fn remove(&self, h: &Handle) -> Result<()> {
        let key = self.key(h);
        self.runtime
            .block_on(self.store.delete(&key))
            .map_err(|e| self.err("remove", h, e))
    }

    fn stat(&self, h: &Handle) -> Result<u64> {
        let key = self.key(h);
        let meta = self
            .runtime
            .block_on(self.store.head(&key))
            .map_err(|e| self.err("stat", h, e))?;
        Ok(meta.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<S3Location> {
        S3Location::parse(s).expect("an s3: location")
    }

    #[test]
    fn locations_parse_as_restic_writes_them() {
        assert_eq!(
            parse("s3:http://127.0.0.1:3900/backups/vm/disks").unwrap(),
            S3Location {
                endpoint: "http://127.0.0.1:3900".into(),
                bucket: "backups".into(),
                prefix: "vm/disks".into(),
            }
        );
        let l = parse("s3:s3.example.org/b/").unwrap();
        assert_eq!(l.endpoint, "https://s3.example.org");
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("b", ""));
        assert!(S3Location::parse("/srv/repo").is_none());
        assert!(S3Location::parse("sftp:host:/repo").is_none());
    }

    #[test]
    fn malformed_locations_are_refused_with_the_expected_form() {
        for bad in [
            "s3:",
            "s3:http://host",
            "s3:http:///bucket",
            "s3:ftp://host/bucket",
            "s3:http://host/bucket/../x",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Invalid, "{bad}");
            assert!(e.to_string().contains("s3:http://HOST"), "{bad}: {e}");
        }
    }
}
