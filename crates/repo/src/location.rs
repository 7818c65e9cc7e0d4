//! Repository locations as restic writes them, turned into a [`Backend`]:
//! a directory (`/srv/repo`, `local:/srv/repo`) or an S3 bucket
//! (`s3:http://HOST:PORT/BUCKET/PREFIX`, see [`crate::s3`]).

use crate::backend::Backend;
use crate::error::{Error, ErrorKind, Result};
use crate::local::LocalBackend;
use crate::s3::{S3Backend, S3Location};
use std::sync::Arc;

/// The backend a location names. Other restic backends (`sftp:`, `rest:`,
/// `b2:`...) are refused by name rather than taken for a directory.
pub fn open_location(location: &str) -> Result<Arc<dyn Backend>> {
    if location.is_empty() {
        return Err(Error::new(
            ErrorKind::Invalid,
            "the repository location is empty",
        ));
    }
    if let Some(s3) = S3Location::parse(location) {
        return Ok(Arc::new(S3Backend::new(s3?)?));
    }
    let path = location.strip_prefix("local:").unwrap_or(location);
    if let Some((scheme, _)) = path.split_once(':') {
        if !scheme.contains('/') {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "repository '{location}': the '{scheme}' backend is not supported \
                     (use a local directory or s3:http://HOST:PORT/BUCKET[/PREFIX])"
                ),
            ));
        }
    }
    Ok(Arc::new(LocalBackend::new(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_s3_buckets_and_unknown_schemes() {
        assert_eq!(open_location("/srv/repo").unwrap().location(), "/srv/repo");
        assert_eq!(
            open_location("local:rel/repo").unwrap().location(),
            "rel/repo"
        );
        assert_eq!(
            open_location("s3:http://127.0.0.1:1/bucket/p")
                .unwrap()
                .location(),
            "s3:http://127.0.0.1:1/bucket/p"
        );
        let e = open_location("sftp:host:/repo").err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("'sftp' backend"), "{e}");
        assert_eq!(open_location("").err().unwrap().kind(), ErrorKind::Invalid);
    }
}
