//! External data files: the qcow2 file keeps the metadata (header, L1/L2 tables,
//! refcounts) and a separate file holds the guest data.
//!
//! The contract, from the qcow2 specification and QEMU's behaviour:
//! - Incompatible bit 2 says the image has an external data file; the header
//!   extension `DATA` names it. The name is used as given: a relative name is taken
//!   from the current directory, as QEMU takes it (not from the image's directory).
//! - A guest cluster lives in the data file at its own guest offset: the L2 entry's
//!   offset is the guest offset. Offset 0 with the COPIED flag is an allocated
//!   cluster (guest cluster 0), not an unallocated one.
//! - Clusters in the data file are not refcounted: the refcounts of the qcow2 file
//!   count only its metadata. Compressed clusters and internal snapshots do not exist
//!   in such images.
//! - Autoclear bit 1 ("raw external data") promises that the data file read alone is
//!   the guest disk: every cluster is mapped (created with metadata preallocation),
//!   zeroes are written into the data file, and a discarded range is punched there.
//! - An image opened for its metadata only (`qemu-img info`) does not open the data
//!   file; any other open needs it and fails with QEMU's message when it is missing.

use super::header::{autoclear, ext, incompat, Header, MAX_HOST_OFFSET};
use super::image::Qcow2Image;
use super::meta::Meta;
use crate::units::{index, ClusterCount, HostOffset};
use crate::{Error, ErrorKind, Result};
use std::path::Path;
use std::sync::Arc;
use strata_storage::{FileStorage, OpenOptions, Storage};

/// Where an open image's guest clusters live.
#[derive(Clone)]
pub(crate) enum DataStore {
    /// In the qcow2 file itself (no external data file).
    Image,
    /// In an external data file, open.
    External {
        storage: Arc<dyn Storage>,
        raw: bool,
    },
    /// An external data file that was not opened (the image was opened for its
    /// metadata only): guest data cannot be read or written.
    Unopened,
}

impl DataStore {
    /// Whether the image keeps its data in an external data file.
    pub fn is_external(&self) -> bool {
        !matches!(self, DataStore::Image)
    }

    /// Whether the data file is a consistent raw image of the disk.
    pub fn is_raw(&self) -> bool {
        matches!(self, DataStore::External { raw: true, .. })
    }

    /// The storage holding guest data: the qcow2 file's own, or the data file.
    pub fn storage<'a>(&'a self, image: &'a Arc<dyn Storage>) -> Result<&'a Arc<dyn Storage>> {
        match self {
            DataStore::Image => Ok(image),
            DataStore::External { storage, .. } => Ok(storage),
            DataStore::Unopened => Err(Error::new(
                ErrorKind::Unsupported,
                "the external data file was not opened (metadata-only open)",
            )),
        }
    }

    /// The data file's storage, when one is open.
    pub fn external(&self) -> Option<&Arc<dyn Storage>> {
        match self {
            DataStore::External { storage, .. } => Some(storage),
            _ => None,
        }
    }
}

/// Whether the header declares an external data file.
pub fn has_data_file(h: &Header) -> bool {
    h.incompatible_features & incompat::DATA_FILE != 0
}

/// Whether the header declares the data file a raw image of the disk.
pub fn is_raw(h: &Header) -> bool {
    h.autoclear_features & autoclear::DATA_FILE_RAW != 0
}

/// The data file name the header extension records (bytes, as stored; QEMU reads
/// the name up to its first NUL byte).
pub fn name(h: &Header) -> Option<Vec<u8>> {
    h.unknown_extensions
        .iter()
        .find(|(ty, _)| *ty == ext::DATA_FILE)
        .map(|(_, data)| {
            let n = data.iter().position(|&c| c == 0).unwrap_or(data.len());
            data[..n].to_vec()
        })
}

/// Record `name` as the data file name (or remove the record), keeping the place of
/// the other extensions.
pub fn set_name(h: &mut Header, name: Option<&[u8]>) {
    let slot = h
        .unknown_extensions
        .iter()
        .position(|(ty, _)| *ty == ext::DATA_FILE);
    match (slot, name) {
        (Some(i), Some(n)) => h.unknown_extensions[i].1 = n.to_vec(),
        (Some(i), None) => {
            h.unknown_extensions.remove(i);
        }
        // QEMU writes the data file name before its other extensions.
        (None, Some(n)) => h.unknown_extensions.insert(0, (ext::DATA_FILE, n.to_vec())),
        (None, None) => {}
    }
}

/// The header's data file settings as a full open needs them: the name to open, or
/// `None` for an image without a data file. QEMU's errors for a raw bit without a
/// data file and for a data file bit without a name.
pub fn required_name(h: &Header) -> Result<Option<Vec<u8>>> {
    if !has_data_file(h) {
        if is_raw(h) {
            return Err(Error::invalid("data-file-raw requires a data file"));
        }
        return Ok(None);
    }
    match name(h) {
        Some(n) if !n.is_empty() => Ok(Some(n)),
        _ => Err(Error::invalid("'data-file' is required for this image")),
    }
}

/// How a data file opened for reading is locked, as QEMU locks the data child of
/// a qcow2 node under qemu-img.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DataFileLock {
    /// An ordinary reader: consistent-read held, everything shared, as QEMU's
    /// data child passes a reader's sharing through (a data file another
    /// process writes can still be read, as qemu-img reads it).
    #[default]
    Shared,
    /// A reader that others must not change meanwhile (`convert`'s sources):
    /// neither writing nor resizing shared, so a data file another process
    /// writes is refused, as qemu-img refuses it.
    NoShare,
    /// No locks at all (`-U` / `force-share`).
    ForceShare,
}

impl DataFileLock {
    /// The lock of a reader that takes no locks under `force_share` (`-U`) and
    /// lets no one change the file meanwhile under `no_share` (`convert`'s
    /// sources); any other reader shares everything.
    pub fn for_reader(force_share: bool, no_share: bool) -> DataFileLock {
        if force_share {
            DataFileLock::ForceShare
        } else if no_share {
            DataFileLock::NoShare
        } else {
            DataFileLock::Shared
        }
    }
}

/// Open the data file `name` (taken from the current directory when relative).
///
/// For reading it is locked as `lock` says. For writing it holds consistent
/// read, write and resize and shares neither writing nor resizing: QEMU's qcow2
/// writer shares writing of its data file, but strata never writes a file
/// another process writes, so it refuses one with qemu-img's wording for a lock
/// conflict (`Failed to get shared "write" lock`). Next to a holder that shares
/// no resize (a qemu-nbd), both refuse alike, for the resize lock.
pub fn open(name: &[u8], read_only: bool, lock: DataFileLock) -> Result<Arc<dyn Storage>> {
    use std::os::unix::ffi::OsStrExt;
    let path = Path::new(std::ffi::OsStr::from_bytes(name));
    let opts = match (read_only, lock) {
        (true, DataFileLock::Shared) => OpenOptions::read().raw(true),
        (true, DataFileLock::NoShare) => OpenOptions::read(),
        (true, DataFileLock::ForceShare) => OpenOptions::read().force_share(true),
        (false, _) => OpenOptions::write(),
    };
    let s = FileStorage::open(path, opts)?;
    Ok(Arc::new(s))
}

/// Create the data file `name` (taken from the current directory when relative), or
/// open it if it exists; the caller truncates it, as QEMU's create does.
pub fn create_file(name: &str) -> Result<Arc<dyn Storage>> {
    let s = FileStorage::create(Path::new(name))?;
    Ok(Arc::new(s))
}

/// The data store for an image whose header is `h`: the qcow2 file itself, the data
/// file `given` (tests, crash sweeps), the file the header names, or nothing opened
/// when `metadata_only`.
pub(crate) fn store_for(
    h: &Header,
    given: Option<Arc<dyn Storage>>,
    read_only: bool,
    lock: DataFileLock,
    metadata_only: bool,
) -> Result<DataStore> {
    if metadata_only {
        return Ok(if has_data_file(h) {
            DataStore::Unopened
        } else {
            DataStore::Image
        });
    }
    let raw = is_raw(h);
    if let Some(storage) = given {
        if !has_data_file(h) {
            return Err(Error::invalid_argument(
                "'data-file' can only be set for images with an external data file",
            ));
        }
        return Ok(DataStore::External { storage, raw });
    }
    match required_name(h)? {
        None => Ok(DataStore::Image),
        Some(n) => Ok(DataStore::External {
            storage: open(&n, read_only, lock)?,
            raw,
        }),
    }
}

/// A compressed entry in an image with a data file: corruption (such images
/// cannot hold compressed clusters).
pub(crate) fn compressed_cluster(guest: u64) -> Error {
    Error::corrupt(format!(
        "Compressed cluster entry found in image with external data file (guest offset 0x{guest:x})"
    ))
}

/// Compressed writes into an image with a data file are refused, as QEMU refuses
/// them (ENOTSUP).
pub(crate) fn compressed_write_refused() -> Error {
    Error::new(ErrorKind::Unsupported, "Operation not supported")
}

impl Qcow2Image {
    /// The storage guest data is read from and written to.
    pub(crate) fn data_storage(&self) -> Result<&Arc<dyn Storage>> {
        self.data.storage(&self.storage).map_err(|e| self.err(e))
    }

    /// Host offsets for `n` new data clusters from guest cluster `gc` on: in a data
    /// file, the guest offsets themselves (nothing is refcounted); otherwise
    /// clusters allocated in the image file.
    pub(crate) fn alloc_data(&self, m: &mut Meta, gc: u64, n: u64) -> Result<HostOffset> {
        if !self.data.is_external() {
            return m.alloc_clusters(ClusterCount(n));
        }
        let cs = m.cluster_size();
        let start = gc.checked_mul(cs);
        let end = gc.checked_add(n).and_then(|e| e.checked_mul(cs));
        match (start, end) {
            (Some(s), Some(e)) if e <= MAX_HOST_OFFSET => Ok(HostOffset(s)),
            _ => Err(Error::invalid_argument(format!(
                "guest cluster {gc} lies beyond what a data file can map"
            ))),
        }
    }

    /// The data file's part of a resize from `old` to `new` bytes, after the
    /// metadata's: the data file takes the new size exactly (as QEMU truncates
    /// it), and a raw data file's new clusters are mapped at once, so the data file
    /// stays the whole disk. A data file that grows from empty gets its first
    /// block written with zeroes, as QEMU's file driver writes it (tools probe
    /// the alignment there), so both leave the same disk usage.
    pub(crate) fn resize_data_file(&self, old: u64, new: u64) -> Result<()> {
        let Some(data) = self.data.external() else {
            return Ok(());
        };
        let was_empty = data.size().map_err(|e| self.err(e))? == 0;
        data.set_size(new).map_err(|e| self.err(e))?;
        if was_empty && new > 0 {
            data.write_at(&vec![0u8; index(new.min(4096))], 0)
                .map_err(|e| self.err(e))?;
        }
        if self.data.is_raw() && new > old {
            self.preallocate_range(super::create::Preallocation::Metadata, old, new)?;
        }
        Ok(())
    }

    /// Internal snapshots are refused in an image with a data file (its clusters
    /// are not refcounted, so they cannot be shared), as QEMU refuses them.
    pub(crate) fn refuse_internal_snapshots(&self) -> Result<()> {
        if self.data.is_external() {
            return Err(self.err(Error::new(
                ErrorKind::Unsupported,
                "Operation not supported",
            )));
        }
        Ok(())
    }

    /// `amend -o data_file=NAME,data_file_raw=off`: record another data file name
    /// (an empty one removes the record) or drop the raw promise. A name is taken
    /// only by an image that has a data file, and the raw promise cannot be made
    /// afresh (QEMU's refusals, before anything changes). One header write.
    pub fn amend_data_file(&self, name: Option<&str>, raw: Option<bool>) -> Result<()> {
        self.check_writable()?;
        let _excl = self.exclusive();
        let mut m = self.lock()?;
        if name.is_some() && !has_data_file(&m.h) {
            return Err(self.err(Error::invalid_argument(
                "data-file can only be set for images that use an external data file",
            )));
        }
        if raw == Some(true) && !is_raw(&m.h) {
            return Err(self.err(Error::invalid_argument(
                "data-file-raw cannot be set on existing images",
            )));
        }
        let mut h = m.h.clone();
        if let Some(n) = name {
            set_name(&mut h, (!n.is_empty()).then_some(n.as_bytes()));
        }
        if raw == Some(false) {
            h.autoclear_features &= !autoclear::DATA_FILE_RAW;
        }
        if h == m.h {
            return Ok(());
        }
        let r = m
            .flush_metadata()
            .and_then(|()| super::amend::write_header(&mut m, h));
        r.map_err(|e| self.err(e))
    }

    /// Whether the image keeps its guest data in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.data.is_external()
    }

    /// The data file name the image records (bytes, as stored), if it has one.
    pub fn data_file_name(&self) -> Option<Vec<u8>> {
        let h = self.peek();
        has_data_file(&h.h).then(|| name(&h.h)).flatten()
    }

    /// Whether the image declares its data file a raw image of the disk.
    pub fn data_file_raw(&self) -> bool {
        is_raw(&self.peek().h)
    }

    /// The qcow2 file itself (the metadata), whether or not the data lives there.
    pub fn image_file(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The open data file, when the image has one and it was opened.
    pub fn data_file_storage(&self) -> Option<&Arc<dyn Storage>> {
        self.data.external()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        let img = crate::qcow2::create(
            Arc::new(strata_storage::MemStorage::new()),
            &crate::qcow2::CreateOptions {
                size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        let mut h = img.header();
        h.unknown_extensions.push((0x1234_5678, vec![1, 2, 3]));
        h
    }

    #[test]
    fn the_name_is_recorded_first_and_read_back_up_to_its_first_nul() {
        let mut h = header();
        assert_eq!(name(&h), None);
        set_name(&mut h, Some(b"d.raw\0junk"));
        assert_eq!(h.unknown_extensions[0].0, ext::DATA_FILE);
        assert_eq!(name(&h).as_deref(), Some(&b"d.raw"[..]));
        set_name(&mut h, Some(b"e.raw"));
        assert_eq!(name(&h).as_deref(), Some(&b"e.raw"[..]));
        assert_eq!(h.unknown_extensions.len(), 2);
        set_name(&mut h, None);
        assert_eq!(h.unknown_extensions, vec![(0x1234_5678, vec![1, 2, 3])]);
    }

    #[test]
    fn a_full_open_needs_a_name_and_a_raw_bit_needs_a_data_file() {
        let mut h = header();
        assert_eq!(required_name(&h).unwrap(), None);
        h.autoclear_features |= autoclear::DATA_FILE_RAW;
        let e = required_name(&h).unwrap_err();
        assert_eq!(e.message(), "data-file-raw requires a data file");
        h.incompatible_features |= incompat::DATA_FILE;
        let e = required_name(&h).unwrap_err();
        assert_eq!(e.message(), "'data-file' is required for this image");
        set_name(&mut h, Some(b""));
        assert!(required_name(&h).is_err());
        set_name(&mut h, Some(b"x"));
        assert_eq!(required_name(&h).unwrap().as_deref(), Some(&b"x"[..]));
        // Metadata-only opens need none of it.
        assert!(matches!(
            store_for(&h, None, true, DataFileLock::Shared, true).unwrap(),
            DataStore::Unopened
        ));
    }
}
