//! Backup repositories in restic's documented format, version 2 (zstd
//! compression): `config`, `keys/`, `data/XX/` packs, `index/`, `snapshots/` and
//! `locks/`, sealed with AES-256-CTR and Poly1305-AES under keys derived with
//! scrypt. restic itself can list, check and restore what strata writes, and
//! strata restores what restic wrote.
//!
//! Disks are stored as one file node per snapshot in fixed chunks (4 MiB
//! unless a backup asks for another [`chunk::ChunkSize`]; [`disk`]); [`restore`] writes them back to raw or qcow2 images.

pub mod backend;
pub mod chunk;
pub mod crypto;
pub mod device;
pub mod disk;
mod error;
pub mod export;
pub mod gc;
mod host;
pub mod id;
pub mod image_bitmap;
pub mod index;
pub mod local;
pub mod location;
pub mod lock;
pub mod ops;
pub mod pack;
pub mod policy;
mod poly;
pub mod refs;
pub mod repository;
pub mod restore;
pub mod s3;
pub mod scratch;
pub mod stats;
pub mod stream;
pub mod time;
pub mod tree;
pub mod verify;
pub mod writer;

pub use backend::{Backend, FileType, Handle};
pub use error::{Error, ErrorKind, Result};
pub use id::Id;
pub use local::LocalBackend;
pub use location::open_location;
pub use repository::{KdfParams, Repository};
