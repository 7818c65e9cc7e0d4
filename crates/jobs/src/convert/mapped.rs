//! Read-only memory maps of source files, so convert copies data from the page
//! cache straight into the target (one copy instead of two through a buffer).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use strata_format::BlockDevice;

/// A whole file mapped read-only and shared.
///
/// Only the bytes that existed when it was mapped are handed out. The file must not
/// shrink while mapped (touching pages past its end raises SIGBUS): convert maps only
/// sources it opened with QEMU's locks, which keep cooperating writers out.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and never changes after creation; sharing the
// pointer between threads only allows concurrent reads of the same bytes.
unsafe impl Send for Mapping {}
// SAFETY: as above, `&Mapping` only gives out shared slices of read-only memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `file` as it is now. `None` when it is empty or cannot be mapped (the
    /// caller then reads through the image driver).
    pub(crate) fn new(file: &File) -> Option<Mapping> {
        let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
        if len == 0 {
            return None;
        }
        // SAFETY: a fresh shared read-only mapping of an open descriptor; the kernel
        // picks the address. The result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: `p..p+len` is the mapping just made. The advice only tunes
        // readahead; its failure is harmless.
        unsafe {
            libc::madvise(p, len, libc::MADV_SEQUENTIAL);
        }
        Some(Mapping {
            ptr: NonNull::new(p.cast())?,
            len,
        })
    }

    /// The bytes at `[off, off+len)` of the file, if all of them were mapped.
    pub(crate) fn get(&self, off: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(off).ok()?;
        let end = start.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `start..end` lies inside the live mapping, which is readable for
        // as long as `self` is borrowed.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), len) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region `new` mapped; no slice of it outlives
        // `self` (they borrow it).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Map the file behind an image layer whose block status reports host offsets in
/// that file: a raw image or a qcow2 image (or a snapshot view of one).
pub(crate) fn map_layer(dev: &Arc<dyn BlockDevice>) -> Option<Mapping> {
    Mapping::new(dev.host_file()?.file()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn mapping_hands_out_only_bytes_inside_the_file() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"0123456789").unwrap();
        let m = Mapping::new(&f).unwrap();
        assert_eq!(m.get(2, 3), Some(&b"234"[..]));
        assert_eq!(m.get(0, 10), Some(&b"0123456789"[..]));
        assert_eq!(m.get(8, 3), None);
        assert_eq!(m.get(u64::MAX, 1), None);
    }

    #[test]
    fn empty_file_is_not_mapped() {
        let f = tempfile::tempfile().unwrap();
        assert!(Mapping::new(&f).is_none());
    }
}
