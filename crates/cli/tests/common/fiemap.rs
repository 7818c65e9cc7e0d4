//! How much room a file takes on the file system, by FIEMAP.

use std::path::Path;

/// Bytes of `path` the file system holds data blocks for (allocated extents,
/// written or not), after flushing the file's delayed allocations.
pub fn extent_bytes(path: &Path) -> u64 {
    extents(path)
        .unwrap_or_else(|| {
            panic!(
                "FIEMAP of {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            )
        })
        .iter()
        .map(|&(_, length, _)| length)
        .sum()
}

/// The extents of `path` as `(logical start, length, unwritten)`, after
/// flushing the file's delayed allocations, or `None` where the file system
/// has no FIEMAP. Unwritten extents are preallocated room that reads as zeroes.
pub fn extents(path: &Path) -> Option<Vec<(u64, u64, bool)>> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Extent {
        logical: u64,
        physical: u64,
        length: u64,
        reserved64: [u64; 2],
        flags: u32,
        reserved: [u32; 3],
    }
    #[repr(C)]
    struct Fiemap {
        start: u64,
        length: u64,
        flags: u32,
        mapped: u32,
        count: u32,
        reserved: u32,
        extents: [Extent; 64],
    }
    const FS_IOC_FIEMAP: u64 = 0xC020_660B;
    const FIEMAP_FLAG_SYNC: u32 = 1;
    const FIEMAP_EXTENT_LAST: u32 = 1;
    const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
    let file = std::fs::File::open(path).unwrap();
    let mut all = Vec::new();
    let mut start = 0u64;
    loop {
        let mut fm = Fiemap {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped: 0,
            count: 64,
            reserved: 0,
            extents: [Extent::default(); 64],
        };
        // SAFETY: the descriptor is open and `fm` is a `struct fiemap` with
        // room for the `count` extents the kernel may fill in.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, &mut fm) };
        if r != 0 {
            return None;
        }
        let got = &fm.extents[..fm.mapped as usize];
        for e in got {
            all.push((e.logical, e.length, e.flags & FIEMAP_EXTENT_UNWRITTEN != 0));
        }
        match got.last() {
            Some(e) if e.flags & FIEMAP_EXTENT_LAST == 0 => {
                start = e.logical.checked_add(e.length).unwrap()
            }
            _ => return Some(all),
        }
    }
}

/// Preallocate `length` bytes of `file` from `start` (unwritten room that
/// reads as zeroes) without changing its length.
pub fn preallocate(file: &std::fs::File, start: u64, length: u64) {
    use std::os::fd::AsRawFd;
    let (start, length) = (
        libc::off_t::try_from(start).unwrap(),
        libc::off_t::try_from(length).unwrap(),
    );
    // SAFETY: fallocate on a descriptor `file` keeps open.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, start, length) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
}
