//! Compressed-cluster codec (placeholder until the tested version lands).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Zlib),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }
    pub fn as_byte(self) -> u8 {
        match self {
            Self::Zlib => 0,
            Self::Zstd => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

pub fn compress(kind: CompressionType, input: &[u8], max_out: usize) -> Option<Vec<u8>> {
    use flate2::{Compress, Compression, FlushCompress};
    let out = match kind {
        CompressionType::Zlib => {
            let mut c = Compress::new_with_window_bits(Compression::new(6), false, 12);
            let mut out = Vec::with_capacity(max_out + 64);
            c.compress_vec(input, &mut out, FlushCompress::Finish)
                .ok()?;
            if c.total_in() as usize != input.len() {
                return None;
            }
            out
        }
        CompressionType::Zstd => zstd::bulk::compress(input, 0).ok()?,
    };
    (out.len() <= max_out).then_some(out)
}

pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new_with_window_bits(false, 15);
            d.decompress(input, out, flate2::FlushDecompress::Finish)
                .map_err(|e| e.to_string())?;
            if d.total_out() as usize != out.len() {
                return Err("short data".into());
            }
            Ok(())
        }
        CompressionType::Zstd => {
            use std::io::Read;
            let mut dec = zstd::stream::read::Decoder::new(input)
                .map_err(|e| e.to_string())?
                .single_frame();
            dec.read_exact(out).map_err(|e| e.to_string())
        }
    }
}
