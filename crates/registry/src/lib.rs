//! strata's image registry: images with Glance v2's attributes and statuses,
//! recorded in a directory of the state directory, their data there too or
//! in a backup repository.
//!
//! - `data`: where the bytes are: files, or snapshots of a backup repository
//!   sharing chunks with disk backups;
//! - [`record`]: an image's attributes, validation of what clients set;
//! - [`store`]: the directory, atomic record writes, recovery, create, update,
//!   tags, delete;
//! - [`upload`]: streaming uploads, checksummed as they arrive;
//! - `chunks`: shared buffers and the threads that hash them beside the I/O;
//! - `digests`: MD5 and SHA-512, the fastest implementations in the build;
//! - [`download`]: reading data back, verified against its SHA-512; ranges;
//! - [`list`]: filters, sorting and paging; [`filter`]: the filters beyond equality;
//! - [`deploy`]: VM disks from images (thin clones on a verified cache, copies);
//! - [`cache`]: the images' local copies thin clones rest on, and who reads them;
//! - [`from_vm`]: images of VM disks, at a snapshot or live;
//! - [`index`]: the records in memory for lists, kept in step with the files;
//! - [`inspect`]: the data checked against its disk format by strata's engine.
//!
//! The CLI's local mode and the HTTP API call these same functions.

pub mod cache;
mod chunks;
mod data;
pub mod deploy;
mod digests;
pub mod download;
mod error;
pub mod filter;
pub mod from_vm;
pub mod index;
pub mod inspect;
pub mod list;
pub mod record;
pub mod store;
pub mod upload;

pub use chunks::Chunk;
pub use data::{recorded_store, StoreLocation};
pub use download::{resolve_range, Download};
pub use error::{Error, ErrorKind, Result};
pub use list::{ListQuery, Page};
pub use record::{ImageRecord, Status, Visibility};
pub use store::{PatchOp, Registry};
pub use upload::Upload;
