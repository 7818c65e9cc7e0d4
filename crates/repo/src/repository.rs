//! A repository: its backend, master key, config and index. `init` makes one,
//! `open` unlocks one with a password; files other than keys are sealed with the
//! master key, and every file read is checked against its name (the SHA-256 of its
//! stored bytes) and its MAC before use.

use crate::backend::{Backend, FileType, Handle};
use crate::crypto::{Key, MAC_LEN, PLAIN_START};
use crate::error::{Error, ErrorKind, Result};
use crate::host;
use crate::id::Id;
use crate::index::{BlobLocation, Index, IndexFile};
use crate::pack::BlobType;
use crate::scratch::{aligned_window, BlobScratch};
use crate::time::Timestamp;
use crate::tree::{Snapshot, Tree};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The repository format version strata writes (compression supported).
pub const VERSION: u32 = 2;

/// Encoding byte of a compressed unpacked file (JSON compressed with zstd).
const ENCODING_ZSTD: u8 = 2;
/// The largest blob read (restic's chunks are at most 8 MiB, strata's 4 MiB); an
/// index claiming more is damaged, and is not allowed to make a reader allocate it.
const MAX_BLOB: u32 = 256 << 20;
/// zstd level for metadata and blobs (zstd's default).
pub(crate) const ZSTD_LEVEL: i32 = 3;

/// The `config` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub version: u32,
    pub id: String,
    pub chunker_polynomial: String,
}

/// A key file: scrypt parameters and the sealed master key.
#[derive(Debug, Serialize, Deserialize)]
struct KeyFile {
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    username: String,
    kdf: String,
    #[serde(rename = "N")]
    n: u64,
    r: u32,
    p: u32,
    #[serde(default)]
    created: String,
    data: String,
    salt: String,
}

/// scrypt cost for new keys (restic's defaults are of this order).
#[derive(Debug, Clone, Copy)]
pub struct KdfParams {
    pub n: u64,
    pub r: u32,
    pub p: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams {
            n: 1 << 15,
            r: 8,
            p: 1,
        }
    }
}

/// An open repository.
pub struct Repository {
    backend: Arc<dyn Backend>,
    key: Key,
    config: Config,
    index: Index,
    lock_wait: std::time::Duration,
}

impl Repository {
    /// Create a repository on `backend` with one key for `password`.
    pub fn init(backend: Arc<dyn Backend>, password: &str, kdf: KdfParams) -> Result<Repository> {
        backend.create()?;
        let key = Key::random()?;
        let mut salt = [0u8; 64];
        crate::crypto::fill_random(&mut salt)?;
        let user_key = Key::derive(password.as_bytes(), &salt, kdf.n, kdf.r, kdf.p)?;
        let master = serde_json::to_vec(&key.to_json()).expect("json");
        let keyfile = KeyFile {
            hostname: host::hostname(),
            username: host::username(),
            kdf: "scrypt".into(),
            n: kdf.n,
            r: kdf.r,
            p: kdf.p,
            created: Timestamp::now().rfc3339(),
            data: B64.encode(user_key.seal(&master)?),
            salt: B64.encode(salt),
        };
        let bytes = serde_json::to_vec(&keyfile).expect("json");
        backend.write(
            &Handle::new(FileType::Key, Id::hash(&bytes).to_string()),
            &bytes,
        )?;
        let config = Config {
            version: VERSION,
            id: Id::random()?.to_string(),
            chunker_polynomial: format!("{:x}", crate::poly::random_polynomial()?),
        };
        // The config is sealed but never compressed: its version says whether
        // the reader understands compression.
        let plain = serde_json::to_vec(&config).expect("json");
        backend.write(&Handle::config(), &key.seal(&plain)?)?;
        Ok(Repository {
            backend,
            key,
            config,
            index: Index::default(),
            lock_wait: std::time::Duration::ZERO,
        })
    }

    /// Open the repository on `backend` with `password` and load its index.
    pub fn open(backend: Arc<dyn Backend>, password: &str) -> Result<Repository> {
        let sealed_config = backend.read(&Handle::config()).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "no repository at '{}' (it has no config file)",
                        backend.location()
                    ),
                )
            } else {
                e
            }
        })?;
        let key = Self::unlock(backend.as_ref(), password)?;
        let plain = key
            .open(&sealed_config)
            .ok_or_else(|| Error::corrupt("config: authentication failed"))?;
        let plain = decode_unpacked(plain).map_err(|e| e.wrap("config"))?;
        let config: Config = serde_json::from_slice(&plain)
            .map_err(|e| Error::with_source(ErrorKind::Corrupt, "config does not parse", e))?;
        if config.version != 1 && config.version != 2 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "repository version {} is not supported (1 and 2 are)",
                    config.version
                ),
            ));
        }
        let mut repo = Repository {
            backend,
            key,
            config,
            index: Index::default(),
            lock_wait: std::time::Duration::ZERO,
        };
        repo.reload_index()?;
        Ok(repo)
    }

    /// Try every key file with `password`; the master key of the first that opens.
    fn unlock(backend: &dyn Backend, password: &str) -> Result<Key> {
        let keys = backend.list(FileType::Key)?;
        for (name, _) in &keys {
            let bytes = backend.read(&Handle::new(FileType::Key, name.clone()))?;
            let Ok(kf) = serde_json::from_slice::<KeyFile>(&bytes) else {
                continue;
            };
            if kf.kdf != "scrypt" {
                continue;
            }
            let (Ok(salt), Ok(data)) = (B64.decode(&kf.salt), B64.decode(&kf.data)) else {
                continue;
            };
            let user_key = Key::derive(password.as_bytes(), &salt, kf.n, kf.r, kf.p)?;
            if let Some(master) = user_key.open(&data) {
                let v: serde_json::Value = serde_json::from_slice(&master).map_err(|e| {
                    Error::with_source(
                        ErrorKind::Corrupt,
                        format!("key {name}: master key does not parse"),
                        e,
                    )
                })?;
                return Key::from_json(&v)
                    .ok_or_else(|| Error::corrupt(format!("key {name}: master key is malformed")));
            }
        }
        Err(Error::new(
            ErrorKind::WrongPassword,
            format!(
                "wrong password: none of the {} key(s) of the repository at '{}' opens with it",
                keys.len(),
                backend.location()
            ),
        ))
    }

    /// Another handle on the same repository (backend, master key and config
    /// shared; no key is derived again), for a thread of its own. Its index
    /// is empty until [`Repository::reload_index`].
    pub fn reopen(&self) -> Repository {
        Repository {
            backend: self.backend.clone(),
            key: self.key.clone(),
            config: self.config.clone(),
            index: Index::default(),
            lock_wait: self.lock_wait,
        }
    }

    /// How long taking a lock waits for a conflicting one to go (zero: not at all).
    pub fn lock_wait(&self) -> std::time::Duration {
        self.lock_wait
    }

    pub fn set_lock_wait(&mut self, wait: std::time::Duration) {
        self.lock_wait = wait;
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn key(&self) -> &Key {
        &self.key
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Read all index files again (after other writers added some).
    pub fn reload_index(&mut self) -> Result<()> {
        let mut index = Index::default();
        for (_, file) in self.index_files()? {
            index.add_file(&file);
        }
        self.index = index;
        Ok(())
    }

    /// Every index file of the repository, with its storage ID.
    pub fn index_files(&self) -> Result<Vec<(Id, IndexFile)>> {
        let mut out = Vec::new();
        for (name, _) in self.backend.list(FileType::Index)? {
            let id = Id::parse(&name)?;
            let plain = self.load_unpacked(FileType::Index, &id)?;
            let file: IndexFile = serde_json::from_slice(&plain).map_err(|e| {
                Error::with_source(
                    ErrorKind::Corrupt,
                    format!("index {name} does not parse"),
                    e,
                )
            })?;
            out.push((id, file));
        }
        Ok(out)
    }

    pub(crate) fn add_index(&mut self, file: &IndexFile) {
        self.index.add_file(file);
    }

    /// Seal `json` (compressed, in version 2) and store it as a `kind` file;
    /// returns its storage ID.
    pub fn save_unpacked(&self, kind: FileType, json: &[u8]) -> Result<Id> {
        let plain = if self.config.version >= 2 {
            let mut v = vec![ENCODING_ZSTD];
            v.extend(
                zstd::bulk::compress(json, ZSTD_LEVEL)
                    .map_err(|e| Error::with_source(ErrorKind::Io, "compression failed", e))?,
            );
            v
        } else {
            json.to_vec()
        };
        let sealed = self.key.seal(&plain)?;
        let id = Id::hash(&sealed);
        self.backend
            .write(&Handle::new(kind, id.to_string()), &sealed)?;
        Ok(id)
    }

    /// Read a sealed `kind` file, check its name and MAC, and return its JSON.
    pub fn load_unpacked(&self, kind: FileType, id: &Id) -> Result<Vec<u8>> {
        let h = Handle::new(kind, id.to_string());
        let sealed = self.backend.read(&h)?;
        if Id::hash(&sealed) != *id {
            return Err(Error::corrupt(format!(
                "{h}: content does not match its name (the file is damaged)"
            )));
        }
        let plain = self
            .key
            .open(&sealed)
            .ok_or_else(|| Error::corrupt(format!("{h}: authentication failed")))?;
        decode_unpacked(plain).map_err(|e| e.wrap(&h))
    }

    /// A blob's plaintext, authenticated and checked against its ID.
    pub fn load_blob(&self, kind: BlobType, id: &Id) -> Result<Vec<u8>> {
        let loc = self.locate(kind, id)?;
        let h = Handle::new(FileType::Data, loc.pack.to_string());
        check_blob_length(id, &loc)?;
        let sealed = self
            .backend
            .read_range(&h, loc.offset, loc.length as usize)
            .map_err(|e| e.wrap(format_args!("blob {id}")))?;
        self.open_blob(id, &loc, &sealed)
    }

    /// [`Repository::load_blob`] into `scratch`'s buffers, reused from blob to
    /// blob (no allocation once they have grown to the largest blob): the
    /// blob is read, authenticated and decrypted in place, decompressed into the
    /// second buffer when compressed, and checked against its hash. The
    /// plaintext returned starts on a [`crate::scratch::ALIGN`] boundary.
    pub fn load_blob_into<'s>(
        &self,
        kind: BlobType,
        id: &Id,
        scratch: &'s mut BlobScratch,
    ) -> Result<&'s [u8]> {
        let loc = self.locate(kind, id)?;
        let h = Handle::new(FileType::Data, loc.pack.to_string());
        check_blob_length(id, &loc)?;
        let BlobScratch {
            sealed,
            plain,
            decompressor,
        } = scratch;
        // The ciphertext, and so an uncompressed plaintext, lands aligned.
        let sealed = aligned_window(sealed, PLAIN_START, loc.length as usize);
        self.backend
            .read_range_into(&h, loc.offset, sealed)
            .map_err(|e| e.wrap(format_args!("blob {id}")))?;
        if !self.key.open_in_place(sealed) {
            return Err(auth_failed(id, &loc));
        }
        let body = &sealed[PLAIN_START..sealed.len() - MAC_LEN];
        let plain: &[u8] = match loc.uncompressed_length {
            Some(n) => {
                let out = aligned_window(plain, 0, n as usize);
                let d = match decompressor {
                    Some(d) => d,
                    None => decompressor.insert(zstd::bulk::Decompressor::new().map_err(|e| {
                        Error::with_source(ErrorKind::Io, "no zstd decompressor", e)
                    })?),
                };
                let got = d
                    .decompress_to_buffer(body, &mut out[..])
                    .map_err(|e| not_decompressing(id, &loc, e))?;
                check_decompressed_length(id, &loc, got, n)?;
                out
            }
            None => body,
        };
        check_hash(id, &loc, plain)?;
        Ok(plain)
    }

    /// Where the index has blob `id`.
    fn locate(&self, kind: BlobType, id: &Id) -> Result<BlobLocation> {
        self.index.get(kind, id).copied().ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("blob {id} is not in the repository's index"),
            )
        })
    }

    /// The plaintext of blob `id` from its `sealed` bytes found at `loc`:
    /// authenticated, decompressed to the length the index gives and checked
    /// against its hash.
    pub fn open_blob(&self, id: &Id, loc: &BlobLocation, sealed: &[u8]) -> Result<Vec<u8>> {
        check_blob_length(id, loc)?;
        let plain = self.key.open(sealed).ok_or_else(|| auth_failed(id, loc))?;
        let plain = match loc.uncompressed_length {
            Some(n) => {
                let v = zstd::bulk::decompress(&plain, n as usize)
                    .map_err(|e| not_decompressing(id, loc, e))?;
                check_decompressed_length(id, loc, v.len(), n)?;
                v
            }
            None => plain,
        };
        check_hash(id, loc, &plain)?;
        Ok(plain)
    }

    pub fn load_tree(&self, id: &Id) -> Result<Tree> {
        let plain = self.load_blob(BlobType::Tree, id)?;
        serde_json::from_slice(&plain).map_err(|e| {
            Error::with_source(ErrorKind::Corrupt, format!("tree {id} does not parse"), e)
        })
    }

    /// The pack files stored, by ID, with their sizes (whether an index names
    /// them or not).
    pub fn stored_packs(&self) -> Result<std::collections::HashMap<Id, u64>> {
        Ok(self
            .backend
            .list(FileType::Data)?
            .into_iter()
            .filter_map(|(n, size)| Id::parse(&n).ok().map(|id| (id, size)))
            .collect())
    }

    /// Every snapshot, oldest first.
    pub fn snapshots(&self) -> Result<Vec<(Id, Snapshot)>> {
        let mut out = Vec::new();
        for (name, _) in self.backend.list(FileType::Snapshot)? {
            let id = Id::parse(&name)?;
            out.push((id, self.load_snapshot(&id)?));
        }
        out.sort_by_key(|(id, s)| (s.timestamp(), *id));
        Ok(out)
    }

    pub fn load_snapshot(&self, id: &Id) -> Result<Snapshot> {
        let plain = self.load_unpacked(FileType::Snapshot, id)?;
        serde_json::from_slice(&plain).map_err(|e| {
            Error::with_source(
                ErrorKind::Corrupt,
                format!("snapshot {id} does not parse"),
                e,
            )
        })
    }

    /// The snapshot `spec` names: `latest` (the newest disk backup; snapshots
    /// of the image registry are passed over), or a unique prefix of its ID.
    pub fn find_snapshot(&self, spec: &str) -> Result<(Id, Snapshot)> {
        if spec == "latest" {
            return self
                .snapshots()?
                .into_iter()
                .rfind(|(_, s)| !s.is_image())
                .ok_or_else(|| Error::new(ErrorKind::NotFound, "the repository has no snapshots"));
        }
        let spec_l = spec.to_ascii_lowercase();
        let matches: Vec<String> = self
            .backend
            .list(FileType::Snapshot)?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| !spec_l.is_empty() && n.starts_with(&spec_l))
            .collect();
        match matches.as_slice() {
            [one] => {
                let id = Id::parse(one)?;
                Ok((id, self.load_snapshot(&id)?))
            }
            [] => Err(Error::new(
                ErrorKind::NotFound,
                format!("no snapshot matches '{spec}'"),
            )),
            _ => Err(Error::new(
                ErrorKind::Invalid,
                format!(
                    "'{spec}' matches {} snapshots; give more of the ID",
                    matches.len()
                ),
            )),
        }
    }

    /// Store a snapshot document (after the packs and index it references).
    pub fn save_snapshot(&self, s: &Snapshot) -> Result<Id> {
        self.save_unpacked(FileType::Snapshot, &serde_json::to_vec(s).expect("json"))
    }
}

/// Where a blob is, for messages about it.
fn blob_at(id: &Id, loc: &BlobLocation) -> String {
    format!("blob {id} (pack {}, offset {})", loc.pack, loc.offset)
}

fn auth_failed(id: &Id, loc: &BlobLocation) -> Error {
    Error::corrupt(format!(
        "{}: authentication failed, the stored bytes were changed",
        blob_at(id, loc)
    ))
}

fn not_decompressing(id: &Id, loc: &BlobLocation, e: std::io::Error) -> Error {
    Error::with_source(
        ErrorKind::Corrupt,
        format!("{}: does not decompress", blob_at(id, loc)),
        e,
    )
}

fn check_decompressed_length(id: &Id, loc: &BlobLocation, got: usize, want: u32) -> Result<()> {
    if got != want as usize {
        return Err(Error::corrupt(format!(
            "{}: decompresses to {got} bytes, the index says {want}",
            blob_at(id, loc)
        )));
    }
    Ok(())
}

fn check_hash(id: &Id, loc: &BlobLocation, plain: &[u8]) -> Result<()> {
    if Id::hash(plain) != *id {
        return Err(Error::corrupt(format!(
            "{}: content does not match its hash",
            blob_at(id, loc)
        )));
    }
    Ok(())
}

/// A blob longer than any writer makes is damage, and is not allowed to make a
/// reader allocate its claimed length.
fn check_blob_length(id: &Id, loc: &BlobLocation) -> Result<()> {
    if loc.length > MAX_BLOB || loc.uncompressed_length.is_some_and(|u| u > MAX_BLOB) {
        return Err(Error::corrupt(format!(
            "blob {id} (pack {}, offset {}): a length over {} MiB is given",
            loc.pack,
            loc.offset,
            MAX_BLOB >> 20
        )));
    }
    Ok(())
}

/// Strip the encoding of an unpacked file's plaintext: JSON as is (version 1, or a
/// version 2 file starting with `[` or `{`), or encoding 2 (zstd-compressed JSON).
fn decode_unpacked(plain: Vec<u8>) -> Result<Vec<u8>> {
    match plain.first() {
        Some(b'[') | Some(b'{') => Ok(plain),
        Some(&ENCODING_ZSTD) => zstd::stream::decode_all(&plain[1..])
            .map_err(|e| Error::with_source(ErrorKind::Corrupt, "does not decompress", e)),
        Some(v) => Err(Error::new(
            ErrorKind::Unsupported,
            format!("unknown encoding version {v}"),
        )),
        None => Err(Error::corrupt("empty file")),
    }
}
