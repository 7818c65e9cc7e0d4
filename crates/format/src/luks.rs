//! The `luks` driver: a LUKS1 header with its key material, then the encrypted
//! disk, as QEMU's `luks` block driver lays a file out.
//!
//! Contracts (QEMU's):
//! - the payload starts `payload_offset` sectors into the file; the disk is the
//!   rest of the file, its size rounded up to whole 512-byte sectors;
//! - each 512-byte sector is encrypted on its own, its IV derived from its
//!   *guest* sector number (the payload offset does not count);
//! - nothing reads as zeroes by itself: an unwritten sector decrypts to noise,
//!   so zeroes are written encrypted and every range is reported as data;
//! - without its secret an image opens only for its metadata (`info`).
//!
//! The header code (parsing, unlocking, key slots) is [`crate::crypto::luks`],
//! shared with LUKS-encrypted qcow2 images.

use crate::crypto::keyslots::KeySlotRequest;
use crate::crypto::luks::{self, LuksCreateOptions, LuksHeader};
use crate::crypto::slot_writes::{self, KeySlotError, LuksArea};
use crate::crypto::{SectorCipher, SECTOR_SIZE};
use crate::error::{request, Operation};
use crate::qcow2::Preallocation;
use crate::qcow2::Unlock;
use crate::units::index;
use crate::{check_range, BlockDevice, Error, ErrorKind, Extent, Result, Status};
use std::sync::{Arc, Mutex, RwLock};
use strata_storage::sync;
use strata_storage::Storage;

/// The error for a `luks` image opened without its secret, in QEMU's words.
pub fn key_required() -> Error {
    Error::new(
        ErrorKind::Key,
        "Parameter 'key-secret' is required for cipher",
    )
}

/// An open `luks` image.
pub struct LuksImage {
    storage: Arc<dyn Storage>,
    header: RwLock<LuksHeader>,
    /// `None` when opened for the metadata only.
    cipher: Option<SectorCipher>,
    /// Bytes before the payload.
    payload: u64,
    size: RwLock<u64>,
    /// Serialises the read-modify-write of partial sectors.
    rmw: Mutex<()>,
}

/// Read `buf` at `off` of the store, zeroes past its end, refusing a range that
/// leaves the header area of `limit` bytes.
fn read_header_area(storage: &dyn Storage, limit: u64, off: u64, buf: &mut [u8]) -> Result<()> {
    if off
        .checked_add(buf.len() as u64)
        .is_none_or(|end| end > limit)
    {
        return Err(Error::invalid(
            "Request for data outside of the LUKS header",
        ));
    }
    storage.read_at(buf, off)?;
    Ok(())
}

impl LuksImage {
    /// Open the image on `storage`: parse and check the header, and unlock the
    /// master key with `unlock` unless `metadata_only`.
    pub fn open(storage: Arc<dyn Storage>, unlock: &Unlock, metadata_only: bool) -> Result<Self> {
        // The secret is asked for before the header is read, as QEMU asks.
        if !metadata_only {
            unlock.secret(key_required)?;
        }
        let mut hdr = vec![0u8; luks::HEADER_LEN];
        storage.read_at(&mut hdr, 0)?;
        let header = LuksHeader::parse(&hdr)?;
        let payload = header.area_len();
        let cipher = match unlock {
            _ if metadata_only => None,
            u => {
                let s = u.secret(key_required)?;
                let mut read = |off: u64, buf: &mut [u8]| {
                    read_header_area(storage.as_ref(), payload, off, buf)
                };
                Some(header.unlock(s, &mut read)?)
            }
        };
        let file = storage.size()?;
        if file < payload {
            // The payload would start past the end of the file (a truncated
            // image, a hostile offset): QEMU's words for a negative size.
            return Err(Error::invalid(
                "Could not refresh total sector count: Input/output error",
            ));
        }
        let size = (file - payload).next_multiple_of(SECTOR_SIZE);
        Ok(LuksImage {
            storage,
            header: RwLock::new(header),
            cipher,
            payload,
            size: RwLock::new(size),
            rmw: Mutex::new(()),
        })
    }

    /// Format `storage` as a `luks` image of `size` bytes: the header with key
    /// slot 0 opened by `password`, then the payload, preallocated as asked
    /// (`metadata` is QEMU's refusal). The header is written and flushed before
    /// the file takes its final size.
    pub fn create(
        storage: Arc<dyn Storage>,
        size: u64,
        opts: &LuksCreateOptions,
        password: &[u8],
        prealloc: Preallocation,
    ) -> Result<Self> {
        if prealloc == Preallocation::Metadata {
            return Err(Error::invalid_argument(
                "Unsupported preallocation mode: metadata",
            ));
        }
        let (header, area, _) = luks::create(opts, password)?;
        let payload = header.area_len();
        let end = payload
            .checked_add(size)
            .ok_or_else(|| Error::out_of_range("The image size is too large"))?;
        storage.set_size(0)?;
        // The file is sized (and preallocated) before the header is written,
        // as QEMU sizes it: a size the file system cannot hold leaves the file
        // empty, refused in QEMU's words.
        crate::raw::fill(storage.as_ref(), payload, size, prealloc)
            .and_then(|()| Ok(storage.set_size(end)?))
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EFBIG) => Error::invalid("The requested file size is too large"),
                _ => e,
            })?;
        // The unused slots' material is zeroes: left as a hole, as QEMU leaves it.
        let used = area.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        storage.write_at(&area[..used], 0)?;
        storage.flush()?;
        Self::open(storage, &Unlock::Secret(password.into()), false)
    }

    /// The header the image opened with.
    pub fn header(&self) -> LuksHeader {
        sync::read(&self.header).clone()
    }

    /// Bytes before the payload.
    pub fn payload_offset(&self) -> u64 {
        self.payload
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn cipher(&self) -> Result<&SectorCipher> {
        self.cipher.as_ref().ok_or_else(key_required)
    }

    fn err(&self, e: impl Into<Error>) -> Error {
        e.into().at(self.storage.path())
    }

    /// Decrypt whole sectors around `[offset, offset + buf.len())` and copy the
    /// range out.
    fn read_sectors(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cipher = self.cipher()?;
        let head = offset % SECTOR_SIZE;
        let start = offset - head;
        let len = (head + buf.len() as u64).next_multiple_of(SECTOR_SIZE);
        let mut tmp = vec![0u8; index(len)];
        self.storage
            .read_at(&mut tmp, self.payload + start)
            .map_err(|e| self.err(e))?;
        cipher.decrypt(start / SECTOR_SIZE, &mut tmp);
        let head = index(head);
        buf.copy_from_slice(&tmp[head..head + buf.len()]);
        Ok(())
    }

    /// Encrypt and write `data` at guest `offset`; partial sectors at either end
    /// are read, merged and written whole.
    fn write_sectors(&self, data: &[u8], offset: u64) -> Result<()> {
        let cipher = self.cipher()?;
        let head = offset % SECTOR_SIZE;
        let start = offset - head;
        let len = (head + data.len() as u64).next_multiple_of(SECTOR_SIZE);
        let aligned = head == 0 && len == data.len() as u64;
        let _guard = (!aligned).then(|| sync::lock(&self.rmw));
        let mut tmp = vec![0u8; index(len)];
        if !aligned {
            self.read_sectors(&mut tmp, start)?;
        }
        let h = index(head);
        tmp[h..h + data.len()].copy_from_slice(data);
        cipher.encrypt(start / SECTOR_SIZE, &mut tmp);
        self.storage
            .write_at(&tmp, self.payload + start)
            .map_err(|e| self.err(e))
    }
}

impl LuksArea for LuksImage {
    fn read_area(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        read_header_area(self.storage.as_ref(), self.payload, off, buf)
    }
    fn write_area(&self, off: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let size = self.storage.size()?;
        if off
            .checked_add(len)
            .is_none_or(|end| end > self.payload || end > size)
        {
            return Err(Error::invalid(
                "Request for data outside of the LUKS header",
            ));
        }
        self.storage.write_at(data, off)?;
        self.storage.flush()?;
        Ok(())
    }
}

impl LuksImage {
    /// Add or erase key slots as `req` asks (`amend -o state=...`), in the
    /// crash-safe order of [`crate::crypto::slot_writes`]. `unlock` is the
    /// password the image was opened with, `secret` gives secret values by
    /// id, `force` is `--force`. The image must be open for writing.
    pub fn change_key_slots(
        &self,
        req: &KeySlotRequest,
        unlock: &[u8],
        secret: &dyn Fn(&str) -> Result<Vec<u8>>,
        force: bool,
    ) -> std::result::Result<(), KeySlotError> {
        let h = self.header();
        let updated = slot_writes::change(self, &h, req, unlock, secret, force)?;
        *sync::write(&self.header) = updated;
        Ok(())
    }
}

/// Bytes written per step when zeroes are written encrypted.
const ZERO_CHUNK: u64 = 1 << 20;

impl BlockDevice for LuksImage {
    fn format_name(&self) -> &'static str {
        "luks"
    }
    fn virtual_size(&self) -> u64 {
        *sync::read(&self.size)
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        request(Operation::Read, Some(offset), || {
            check_range(offset, buf.len() as u64, self.virtual_size())?;
            self.read_sectors(buf, offset)
        })
    }
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        request(Operation::Write, Some(offset), || {
            check_range(offset, buf.len() as u64, self.virtual_size())?;
            self.write_sectors(buf, offset)
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        request(Operation::WriteZeroes, Some(offset), || {
            check_range(offset, len, self.virtual_size())?;
            let zeros = vec![0u8; index(len.min(ZERO_CHUNK))];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(ZERO_CHUNK);
                self.write_sectors(&zeros[..index(n)], at)?;
                at += n;
            }
            Ok(())
        })
    }
    /// QEMU's `luks` driver passes no discard down: nothing changes.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        request(Operation::Discard, Some(offset), || {
            check_range(offset, len, self.virtual_size())
        })
    }
    fn flush(&self) -> Result<()> {
        request(Operation::Flush, None, || {
            self.storage.flush().map_err(|e| self.err(e))
        })
    }
    /// Every range is data at no offset the host file could be read at directly
    /// (the file holds ciphertext), as QEMU reports a `luks` image.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        request(Operation::BlockStatus, Some(offset), || {
            check_range(offset, len, self.virtual_size())?;
            Ok(Extent {
                offset,
                len,
                status: Status::Data {
                    host_offset: None,
                    compressed: false,
                },
            })
        })
    }
    fn backing(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }
    fn set_backing(&self, _backing: Option<Arc<dyn BlockDevice>>) {}
    fn read_only(&self) -> bool {
        self.storage.read_only()
    }
    fn allocated_bytes(&self) -> Result<Option<u64>> {
        self.storage.allocated_bytes().map_err(|e| self.err(e))
    }
    fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        request(Operation::Resize, None, || {
            let cur = self.virtual_size();
            if new_size < cur && !allow_shrink {
                return Err(Error::invalid_argument(format!(
                    "Shrinking the image from {cur} to {new_size} bytes was not allowed"
                )));
            }
            let end = self
                .payload
                .checked_add(new_size)
                .ok_or_else(|| Error::out_of_range("The image size is too large"))?;
            self.storage.set_size(end).map_err(|e| self.err(e))?;
            *sync::write(&self.size) = new_size.next_multiple_of(SECTOR_SIZE);
            Ok(())
        })
    }
    fn path(&self) -> Option<std::path::PathBuf> {
        self.storage.path().map(|p| p.to_path_buf())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Whether `buf`, the first bytes of a file, start with the LUKS magic.
pub fn probe(buf: &[u8]) -> bool {
    buf.starts_with(&luks::MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_storage::MemStorage;

    fn quick() -> LuksCreateOptions {
        LuksCreateOptions {
            iter_time_ms: 1,
            ..Default::default()
        }
    }

    #[test]
    fn data_written_reads_back_after_reopen_and_is_ciphertext_in_the_file() {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let img =
            LuksImage::create(s.clone(), 1 << 20, &quick(), b"pw", Preallocation::Off).unwrap();
        assert_eq!(img.virtual_size(), 1 << 20);
        img.write(&[7u8; 700], 300).unwrap();
        let again =
            LuksImage::open(s.clone(), &Unlock::Secret(b"pw".as_slice().into()), false).unwrap();
        let mut buf = vec![0u8; 1000];
        again.read(&mut buf, 0).unwrap();
        assert_eq!(&buf[300..], &[7u8; 700][..]);
        let mut raw = vec![0u8; 700];
        s.read_at(&mut raw, again.payload_offset() + 300).unwrap();
        assert_ne!(raw, vec![7u8; 700]);
    }

    #[test]
    fn opening_without_the_secret_is_refused_in_qemus_words() {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
        LuksImage::create(s.clone(), 4096, &quick(), b"pw", Preallocation::Off).unwrap();
        let e = LuksImage::open(s.clone(), &Unlock::None, false)
            .err()
            .unwrap();
        assert_eq!(e.message(), "Parameter 'key-secret' is required for cipher");
        assert!(LuksImage::open(s, &Unlock::None, true).is_ok());
    }
}
