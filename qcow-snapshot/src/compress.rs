//! Decompression of qcow2 compressed clusters (raw deflate and zstd).
//!
//! The caller bounds both sides: the input is at most the compressed descriptor's sector span
//! (itself bounded by the cluster size) and the output is exactly one cluster. A stream that
//! ends early, or fails to decode, is an error; decoding stops once the cluster is full, so
//! trailing bytes (the next compressed cluster's data in the same sector) are ignored.
//!
//! Locking model: none; pure functions.

use std::io::Read;

use crate::format::CompressionType;

/// Why a compressed cluster could not be decompressed.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    /// The deflate stream is invalid.
    #[error("invalid deflate stream: {0}")]
    Deflate(String),
    /// The zstd stream is invalid.
    #[error("invalid zstd stream: {0}")]
    Zstd(String),
    /// The stream ended before a whole cluster was produced.
    #[error("compressed stream produced {got} of {want} bytes")]
    Short { got: usize, want: usize },
}

/// Decompresses `input` into all of `out`.
pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), DecompressError> {
    match kind {
        CompressionType::Zlib => inflate_raw(input, out),
        CompressionType::Zstd => zstd_decode(input, out),
    }
}

fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    let mut d = flate2::Decompress::new(false);
    let mut got = 0usize;
    loop {
        let before_in = d.total_in();
        let before_out = d.total_out();
        let in_pos = usize::try_from(before_in)
            .unwrap_or(usize::MAX)
            .min(input.len());
        let status = d
            .decompress(
                &input[in_pos..],
                &mut out[got..],
                flate2::FlushDecompress::Finish,
            )
            .map_err(|e| DecompressError::Deflate(e.to_string()))?;
        got = usize::try_from(d.total_out())
            .unwrap_or(usize::MAX)
            .min(out.len());
        if got == out.len() {
            return Ok(());
        }
        let progressed = d.total_in() != before_in || d.total_out() != before_out;
        if matches!(status, flate2::Status::StreamEnd) || !progressed {
            return Err(DecompressError::Short {
                got,
                want: out.len(),
            });
        }
    }
}

fn zstd_decode(input: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    let mut src = input;
    let mut got = 0usize;
    // A cluster may be stored as several concatenated frames.
    while got < out.len() {
        if src.is_empty() {
            return Err(DecompressError::Short {
                got,
                want: out.len(),
            });
        }
        let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
            .map_err(|e| DecompressError::Zstd(e.to_string()))?;
        let frame_start = got;
        loop {
            let n = dec
                .read(&mut out[got..])
                .map_err(|e| DecompressError::Zstd(e.to_string()))?;
            if n == 0 {
                break;
            }
            got += n;
            if got == out.len() {
                return Ok(());
            }
        }
        if got == frame_start {
            return Err(DecompressError::Short {
                got,
                want: out.len(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn deflate_raw(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn raw_deflate_cluster_decompresses_and_ignores_trailing_bytes() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut c = deflate_raw(&data);
        c.extend_from_slice(&[0xab; 300]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zlib, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_or_garbage_streams_are_errors_not_panics() {
        let data = vec![7u8; 4096];
        let c = deflate_raw(&data[..1000]);
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Zlib, &c, &mut out).is_err());
        assert!(decompress(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zlib, &[], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[], &mut out).is_err());
    }
}
