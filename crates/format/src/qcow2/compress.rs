//! The qcow2 compressed-cluster codec, with QEMU's on-disk conventions.
//!
//! - `zlib` (header compression type 0, and the only choice for version 2 images) is a
//!   *raw* deflate stream: no zlib header or trailer, written with a 4 KiB window
//!   (window bits 12) at the default level 6.
//! - `zstd` (compression type 1) is one zstd frame at zstd's default level.
//!
//! A compressed cluster's size is only known to whole 512-byte sectors, so what the
//! reader is handed may carry trailing bytes after the stream. Decompression therefore
//! stops as soon as the output cluster is full, and fails when the stream ends first.
//!
//! Codec contexts are kept per thread and reused, since a convert compresses many
//! clusters on a few threads.

use std::cell::RefCell;

/// The header's `compression_type` byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

impl CompressionType {
    /// The type a header byte names (0 zlib, 1 zstd), or `None` for an unknown one.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Zlib),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }

    /// The header byte for this type.
    pub fn as_byte(self) -> u8 {
        match self {
            Self::Zlib => 0,
            Self::Zstd => 1,
        }
    }

    /// The name used by `-o compression_type=` and in `info` output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

/// zlib level QEMU uses (`Z_DEFAULT_COMPRESSION`).
const ZLIB_LEVEL: u32 = 6;
/// Window bits QEMU compresses with (a negative value in zlib's API: raw deflate).
const ZLIB_WINDOW_BITS: u8 = 12;
/// Window bits for reading: 15 reads every raw deflate stream, including QEMU's.
const ZLIB_READ_WINDOW_BITS: u8 = 15;

thread_local! {
    static DEFLATE: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
    static INFLATE: RefCell<Option<flate2::Decompress>> = const { RefCell::new(None) };
    static ZSTD_C: RefCell<Option<zstd::zstd_safe::CCtx<'static>>> = const { RefCell::new(None) };
    static ZSTD_D: RefCell<Option<zstd::stream::raw::Decoder<'static>>> = const { RefCell::new(None) };
}

/// Compress one cluster into at most `max_out` bytes.
///
/// Returns `None` when the compressed form would be larger than `max_out` bytes; the
/// cluster is then written uncompressed. QEMU's rule is "compressed only if smaller than
/// the cluster", so callers pass `max_out = cluster_size - 1`.
pub fn compress(kind: CompressionType, input: &[u8], max_out: usize) -> Option<Vec<u8>> {
    if max_out == 0 {
        return None;
    }
    // One spare byte: deflate reports the end of a stream that fills its buffer
    // exactly only on a further call.
    let mut out = vec![0u8; max_out + 1];
    let n = match kind {
        CompressionType::Zlib => deflate(input, &mut out)?,
        CompressionType::Zstd => zstd_compress(input, &mut out)?,
    };
    if n > max_out {
        return None;
    }
    out.truncate(n);
    Some(out)
}

fn deflate(input: &[u8], out: &mut [u8]) -> Option<usize> {
    use flate2::{Compress, Compression, FlushCompress, Status};
    DEFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let c = slot.get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::new(ZLIB_LEVEL), false, ZLIB_WINDOW_BITS)
        });
        c.reset();
        // One call with Finish: the stream ends inside `out` or does not fit.
        match c.compress(input, out, FlushCompress::Finish) {
            // At most `out.len()`, a usize.
            Ok(Status::StreamEnd) => usize::try_from(c.total_out()).ok(),
            _ => {
                // zlib-rs 0.6 panics ("buf.len() must fit in remaining()") in a later
                // stream when a compressor whose stream was left unfinished is reset
                // and reused. Only a finished compressor is kept.
                *slot = None;
                None
            }
        }
    })
}

fn zstd_compress(input: &[u8], out: &mut [u8]) -> Option<usize> {
    use zstd::zstd_safe::{zstd_sys::ZSTD_EndDirective, CCtx, InBuffer, OutBuffer, ResetDirective};
    ZSTD_C.with(|cell| {
        let mut slot = cell.borrow_mut();
        // A fresh context compresses at zstd's default level (3), as QEMU's does.
        let c = slot.get_or_insert_with(CCtx::create);
        c.reset(ResetDirective::SessionOnly).ok()?;
        // As QEMU: one streaming call that ends the frame. zstd buffers internally, so
        // a frame that exactly fills `out` still fits; a non-zero return means output
        // is left over, so it does not fit.
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(out);
        match c.compress_stream2(&mut outb, &mut inb, ZSTD_EndDirective::ZSTD_e_end) {
            Ok(0) => Some(outb.pos()),
            _ => None,
        }
    })
}

/// Decompress one cluster: fill all of `out` from the stream at the start of `input`.
///
/// `input` may run past the end of the stream (to the next sector boundary, or beyond);
/// those bytes are ignored. An error when the stream is corrupt, ends before `out` is
/// full, or (zstd) its frame holds more than `out.len()` bytes.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    if out.is_empty() {
        return Ok(());
    }
    match kind {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => zstd_decompress(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use flate2::{Decompress, FlushDecompress};
    INFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = slot
            .get_or_insert_with(|| Decompress::new_with_window_bits(false, ZLIB_READ_WINDOW_BITS));
        d.reset(false);
        // As QEMU: one call with Finish. Running out of output space with input left
        // (a buffer error) is success as long as the output is full.
        let r = d.decompress(input, out, FlushDecompress::Finish);
        // At most `out.len()`, a usize.
        let filled = usize::try_from(d.total_out()).unwrap_or(usize::MAX);
        match r {
            Ok(_) if filled == out.len() => Ok(()),
            Ok(_) => Err(format!(
                "deflate stream ended after {filled} of {} bytes",
                out.len()
            )),
            Err(e) => Err(format!("invalid deflate stream: {e}")),
        }
    })
}

fn zstd_decompress(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    ZSTD_D.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Decoder::new().map_err(|e| format!("zstd decoder: {e}"))?);
        }
        let d = slot.as_mut().expect("set above");
        d.reinit().map_err(|e| format!("zstd decoder: {e}"))?;
        let total = out.len();
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(out);
        // zstd's hint: 0 once a frame is fully decoded and flushed.
        let mut hint = 1usize;
        while outb.pos() < total {
            let (in_before, out_before) = (inb.pos(), outb.pos());
            hint = d
                .run(&mut inb, &mut outb)
                .map_err(|e| format!("invalid zstd data: {e}"))?;
            if inb.pos() == in_before && outb.pos() == out_before {
                return Err(format!(
                    "zstd data ended after {} of {total} bytes",
                    outb.pos()
                ));
            }
        }
        if hint != 0 {
            // The output is full; let the decoder read the frame's end (a checksum, or
            // an empty last block) if that is all that is left.
            hint = d
                .run(&mut inb, &mut outb)
                .map_err(|e| format!("invalid zstd data: {e}"))?;
            if hint != 0 {
                return Err(format!("zstd frame holds more than {total} bytes"));
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [CompressionType; 2] = [CompressionType::Zlib, CompressionType::Zstd];

    /// Compressible but not trivial: text-like runs with a counter.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| b"strata qcow2 cluster "[i % 21] ^ (i / 4096).to_le_bytes()[0])
            .collect()
    }

    /// xorshift noise: does not compress.
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed.to_le_bytes()[0]
            })
            .collect()
    }

    #[test]
    fn type_bytes_and_names() {
        for k in KINDS {
            assert_eq!(CompressionType::from_byte(k.as_byte()), Some(k));
        }
        assert_eq!(CompressionType::Zlib.as_byte(), 0);
        assert_eq!(CompressionType::Zstd.as_byte(), 1);
        assert_eq!(CompressionType::Zlib.name(), "zlib");
        assert_eq!(CompressionType::Zstd.name(), "zstd");
        assert_eq!(CompressionType::from_byte(2), None);
        assert_eq!(CompressionType::from_byte(255), None);
    }

    #[test]
    fn round_trips_at_every_cluster_size() {
        for k in KINDS {
            for bits in 9..=21 {
                let cs = 1usize << bits;
                for data in [vec![0u8; cs], pattern(cs)] {
                    let c = compress(k, &data, cs - 1).expect("compressible");
                    assert!(c.len() < cs);
                    let mut out = vec![0xaau8; cs];
                    decompress(k, &c, &mut out).unwrap();
                    assert_eq!(out, data, "{k:?} cluster size {cs}");
                }
            }
        }
    }

    #[test]
    fn zlib_is_raw_deflate_readable_with_a_4k_window() {
        let data = pattern(65536);
        let c = compress(CompressionType::Zlib, &data, 65535).unwrap();
        // No zlib header: a zlib stream starts with 0x78 and a checksummed second byte.
        let zlib_header = c.len() >= 2 && (u16::from(c[0]) << 8 | u16::from(c[1])) % 31 == 0;
        assert!(!(zlib_header && c[0] & 0x0f == 8));
        // QEMU inflates with window bits 12; the stream must be valid for that.
        let mut d = flate2::Decompress::new_with_window_bits(false, 12);
        let mut out = vec![0u8; 65536];
        let st = d
            .decompress(&c, &mut out, flate2::FlushDecompress::Finish)
            .unwrap();
        assert_eq!(st, flate2::Status::StreamEnd);
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_is_one_standard_frame() {
        let data = pattern(65536);
        let c = compress(CompressionType::Zstd, &data, 65535).unwrap();
        assert_eq!(&c[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
        assert_eq!(zstd::bulk::decompress(&c, 65536).unwrap(), data);
    }

    #[test]
    fn incompressible_input_returns_none() {
        for k in KINDS {
            let data = noise(65536, 0x1234_5678_9abc_def1);
            assert!(compress(k, &data, 65535).is_none(), "{k:?}");
            assert!(compress(k, &data[..512], 511).is_none(), "{k:?}");
        }
    }

    #[test]
    fn max_out_is_an_inclusive_bound() {
        for k in KINDS {
            let data = pattern(65536);
            let n = compress(k, &data, 65535).unwrap().len();
            assert_eq!(compress(k, &data, n).map(|c| c.len()), Some(n), "{k:?}");
            assert!(compress(k, &data, n - 1).is_none(), "{k:?}");
            assert!(compress(k, &data, 0).is_none(), "{k:?}");
        }
    }

    #[test]
    fn many_incompressible_clusters_in_a_row() {
        // Reusing a reset zlib-rs compressor after unfinished streams used to panic
        // after some 15 such 4 KiB clusters.
        for k in KINDS {
            for i in 0..64 {
                assert!(compress(k, &noise(4096, 1000 + i), 4095).is_none());
            }
            let data = pattern(4096);
            let c = compress(k, &data, 4095).unwrap();
            let mut out = vec![0u8; 4096];
            decompress(k, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn contexts_are_reusable_after_a_failure() {
        for k in KINDS {
            assert!(compress(k, &noise(4096, 99), 100).is_none());
            let data = pattern(4096);
            let c = compress(k, &data, 4095).unwrap();
            let mut out = vec![0u8; 4096];
            assert!(decompress(k, &c[..c.len() / 2], &mut out).is_err());
            decompress(k, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn trailing_garbage_is_ignored() {
        for k in KINDS {
            let data = pattern(65536);
            let c = compress(k, &data, 65535).unwrap();
            for garbage in [0u8, 0xff, 0x28] {
                let mut input = c.clone();
                // Up to the next sector boundary, and a whole sector more.
                let padded = (c.len() / 512 + 2) * 512;
                input.resize(padded, garbage);
                let mut out = vec![0u8; 65536];
                decompress(k, &input, &mut out).unwrap();
                assert_eq!(out, data, "{k:?} garbage {garbage:#x}");
            }
            let mut input = c.clone();
            input.extend(noise(700, 7));
            let mut out = vec![0u8; 65536];
            decompress(k, &input, &mut out).unwrap();
            assert_eq!(out, data, "{k:?} noise");
        }
    }

    #[test]
    fn truncated_input_errors() {
        for k in KINDS {
            let data = pattern(65536);
            let c = compress(k, &data, 65535).unwrap();
            // (Deflate can fill the cluster before its final end-of-block code, and
            // then, as in QEMU, a stream cut there still reads fine.)
            for cut in [0, 1, c.len() / 3, c.len() / 2] {
                let mut out = vec![0u8; 65536];
                assert!(
                    decompress(k, &c[..cut], &mut out).is_err(),
                    "{k:?} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn zstd_missing_last_byte_errors() {
        let data = pattern(65536);
        let c = compress(CompressionType::Zstd, &data, 65535).unwrap();
        let mut out = vec![0u8; 65536];
        assert!(decompress(CompressionType::Zstd, &c[..c.len() - 1], &mut out).is_err());
    }

    #[test]
    fn short_stream_errors() {
        // A complete stream that holds less than the cluster.
        for k in KINDS {
            let data = pattern(4096);
            let c = compress(k, &data, 4095).unwrap();
            let mut out = vec![0u8; 8192];
            assert!(decompress(k, &c, &mut out).is_err(), "{k:?}");
            let mut padded = c.clone();
            padded.resize(c.len() + 512, 0);
            assert!(decompress(k, &padded, &mut out).is_err(), "{k:?} padded");
        }
    }

    #[test]
    fn zstd_frame_larger_than_the_cluster_errors() {
        let data = pattern(8192);
        let c = compress(CompressionType::Zstd, &data, 8191).unwrap();
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zstd, &c, &mut out).is_err());
    }

    #[test]
    fn zstd_frame_with_checksum_is_read() {
        let data = pattern(65536);
        let mut enc = zstd::bulk::Compressor::new(3).unwrap();
        enc.include_checksum(true).unwrap();
        let c = enc.compress(&data).unwrap();
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn corrupt_input_errors() {
        for k in KINDS {
            let mut out = vec![0u8; 4096];
            assert!(decompress(k, &noise(2048, 5), &mut out).is_err(), "{k:?}");
            assert!(decompress(k, &[0xffu8; 512], &mut out).is_err(), "{k:?}");
        }
    }
}
