//! Decompression of compressed clusters (raw deflate or zstd).

use std::io::{self, Read};

use super::header::Compression;

/// Decompresses `input` into exactly `out.len()` bytes (one cluster). Trailing input after
/// the cluster's data is ignored, as the format allows.
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> io::Result<()> {
    let r = match kind {
        Compression::Zlib => flate2::read::DeflateDecoder::new(input).read_exact(out),
        Compression::Zstd => {
            zstd::stream::read::Decoder::with_buffer(input).and_then(|mut d| d.read_exact(out))
        }
    };
    r.map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("qcow2: corrupt compressed cluster ({kind:?}): {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn deflate_round_trip_and_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let mut c = enc.finish().unwrap();
        c.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 65536];
        decompress(Compression::Zlib, &c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(Compression::Zlib, &[0xff; 100], &mut out).is_err());
        assert!(decompress(Compression::Zstd, &[0xff; 100], &mut out).is_err());
    }

    #[test]
    fn zstd_round_trip() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 7) as u8).collect();
        let c = zstd::bulk::compress(&data, 1).unwrap();
        let mut out = vec![0u8; 65536];
        decompress(Compression::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }
}
