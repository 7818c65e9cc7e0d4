//! Reusable memory for opening blobs. A restore opens thousands of 4 MiB blobs;
//! fresh buffers for each one (zeroed by the kernel page by page, then copied
//! from one to the next) cost about as much as decrypting them. A
//! [`BlobScratch`] keeps its buffers from blob to blob and places them so that
//! the plaintext starts on an [`ALIGN`]-byte boundary, as direct I/O
//! (`O_DIRECT`) needs of the memory it writes from.

/// The alignment of the plaintext a [`BlobScratch`] hands out: a multiple of
/// every logical block size direct I/O asks for.
pub const ALIGN: usize = 4096;

/// Buffers for opening one blob at a time (one per worker thread).
#[derive(Default)]
pub struct BlobScratch {
    pub(crate) sealed: Vec<u8>,
    pub(crate) plain: Vec<u8>,
    pub(crate) decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl BlobScratch {
    pub fn new() -> Self {
        Self::default()
    }
}

/// A `len`-byte window of `buf` (grown as needed, never shrunk) whose byte
/// `at` lies on an [`ALIGN`] boundary.
pub(crate) fn aligned_window(buf: &mut Vec<u8>, at: usize, len: usize) -> &mut [u8] {
    let need = len + at + ALIGN;
    if buf.len() < need {
        // Grown to the next power of two, so the sizes of a restore's blobs
        // settle on one allocation.
        buf.resize(need.next_power_of_two(), 0);
    }
    let addr = buf.as_ptr() as usize + at;
    let start = (ALIGN - addr % ALIGN) % ALIGN;
    &mut buf[start..start + len]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_put_the_asked_byte_on_an_aligned_address_and_reuse_the_buffer() {
        let mut buf = Vec::new();
        for (at, len) in [(0, 100), (16, 4 << 20), (16, 1 << 20), (0, 4 << 20)] {
            let w = aligned_window(&mut buf, at, len);
            assert_eq!(w.len(), len);
            assert_eq!((w.as_ptr() as usize + at) % ALIGN, 0);
        }
        let cap = buf.capacity();
        aligned_window(&mut buf, 16, 3 << 20);
        assert_eq!(buf.capacity(), cap);
    }
}
