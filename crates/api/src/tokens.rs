//! API tokens: random secrets given once to the operator, kept only as their
//! SHA-256 in `tokens.json` of the state directory (replaced atomically), each
//! with a role.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Reads only (GET and HEAD).
    ReadOnly,
}

/// One stored token: its hash, never the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEntry {
    /// A short public name for the token (the first hex digits of its hash).
    pub id: String,
    pub sha256: String,
    pub role: Role,
    pub created_at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

/// The token file of a state directory.
#[derive(Debug, Clone)]
pub struct Tokens {
    path: PathBuf,
}

fn digest(secret: &str) -> String {
    strata_registry::record::hex(&Sha256::digest(secret.as_bytes()))
}

impl Tokens {
    pub fn new(state_dir: &Path) -> Tokens {
        Tokens {
            path: state_dir.join("tokens.json"),
        }
    }

    /// The stored tokens (none if the file does not exist).
    pub fn entries(&self) -> Result<Vec<TokenEntry>> {
        match std::fs::read(&self.path) {
            Ok(d) => serde_json::from_slice::<TokenFile>(&d)
                .map(|f| f.tokens)
                .map_err(|e| Error::State(format!("{}: {e}", self.path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(Error::State(format!("read {}: {e}", self.path.display()))),
        }
    }

    /// Make a new token with `role`; returns the secret (shown once).
    pub fn create(&self, role: Role) -> Result<String> {
        let mut raw = [0u8; 32];
        getrandom::getrandom(&mut raw).map_err(|e| Error::State(format!("random bytes: {e}")))?;
        let secret = strata_registry::record::hex(&raw);
        let sha256 = digest(&secret);
        let mut tokens = self.entries()?;
        tokens.push(TokenEntry {
            id: sha256[..12].to_string(),
            sha256,
            role,
            created_at: strata_registry::record::now(),
        });
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::State(format!("create {}: {e}", dir.display())))?;
        }
        let data = serde_json::to_vec_pretty(&TokenFile { tokens })
            .map_err(|e| Error::State(e.to_string()))?;
        strata_vm::state::write_atomic(&self.path, &data)
            .map_err(|e| Error::State(e.to_string()))?;
        Ok(secret)
    }

    /// The role of `secret`, if it is a stored token.
    pub fn check(&self, secret: &str) -> Result<Option<Role>> {
        let h = digest(secret);
        Ok(self
            .entries()?
            .into_iter()
            .find(|t| t.sha256 == h)
            .map(|t| t.role))
    }
}
