//! Moving bytes between request buffers (guest memory slices) and the image: the pieces of a
//! request that fall into one cluster, and the file I/O on them through [`HostFile`].

use std::io;

use crate::image::storage::HostFile;
use crate::image::GuestSlice;

/// Reads `buf.len()` bytes at `off`; bytes past the end of the file read as zeros.
pub fn read_bytes(file: &HostFile, off: u64, buf: &mut [u8]) -> io::Result<()> {
    file.read_at(off, buf)
}

/// Writes all of `buf` at `off`.
pub fn write_bytes(file: &HostFile, off: u64, buf: &[u8]) -> io::Result<()> {
    file.write_at(off, buf)
}

/// Writes request bytes `[pos, pos + n)` of `bufs` to `file` at offset `at`, straight from
/// guest memory.
pub fn write_pieces(
    file: &HostFile,
    at: u64,
    bufs: &[GuestSlice<'_>],
    pos: u64,
    n: u64,
) -> io::Result<()> {
    for_each_piece(bufs, pos, n, |p, pp| file.write_slice(at + pp, &p))
}

/// Calls `f(piece, pos)` for each piece of the guest buffers covering bytes
/// `[start, start + len)` of the request, where `pos` is the piece's offset from `start`.
pub fn for_each_piece<'a>(
    bufs: &[GuestSlice<'a>],
    start: u64,
    len: u64,
    mut f: impl FnMut(GuestSlice<'a>, u64) -> io::Result<()>,
) -> io::Result<()> {
    let end = start + len;
    let mut base = 0u64;
    for b in bufs {
        let blen = b.len() as u64;
        let (lo, hi) = (start.max(base), end.min(base + blen));
        if lo < hi {
            let piece = b
                .subslice((lo - base) as usize, (hi - lo) as usize)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            f(piece, lo - start)?;
        }
        base += blen;
        if base >= end {
            break;
        }
    }
    Ok(())
}

/// Fills bytes `[start, start + len)` of the request's buffers with zeros.
pub fn zero_pieces(bufs: &[GuestSlice<'_>], start: u64, len: u64) -> io::Result<()> {
    for_each_piece(bufs, start, len, |p, _| {
        // SAFETY: the piece is valid writable guest memory of p.len() bytes while its guard
        // lives.
        unsafe { std::ptr::write_bytes(p.ptr_guard_mut().as_ptr(), 0, p.len()) };
        Ok(())
    })
}

/// Copies `src` into bytes `[start, start + src.len())` of the request's buffers.
pub fn copy_to_pieces(bufs: &[GuestSlice<'_>], start: u64, src: &[u8]) -> io::Result<()> {
    for_each_piece(bufs, start, src.len() as u64, |p, pos| {
        p.copy_from(&src[pos as usize..pos as usize + p.len()]);
        Ok(())
    })
}

/// Copies bytes `[start, start + dst.len())` of the request's buffers into `dst`.
pub fn copy_from_pieces(bufs: &[GuestSlice<'_>], start: u64, dst: &mut [u8]) -> io::Result<()> {
    for_each_piece(bufs, start, dst.len() as u64, |p, pos| {
        p.copy_to(&mut dst[pos as usize..pos as usize + p.len()]);
        Ok(())
    })
}

/// Byte ranges `(start, end)` of a `len`-byte metadata cluster to write for the dirty-piece
/// mask `pieces` (bit k: bytes `k * piece..(k + 1) * piece`), adjacent pieces merged into
/// one run and the last one cut at `len`.
pub fn piece_runs(pieces: u64, piece: usize, len: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = len.div_ceil(piece).min(64);
    let mut k = 0;
    std::iter::from_fn(move || {
        while k < n && pieces & (1u64 << k) == 0 {
            k += 1;
        }
        if k >= n {
            return None;
        }
        let first = k;
        while k < n && pieces & (1u64 << k) != 0 {
            k += 1;
        }
        Some((first * piece, (k * piece).min(len)))
    })
}

#[cfg(test)]
mod piece_tests {
    use super::piece_runs;

    #[test]
    fn piece_runs_merge_neighbours_and_stop_at_the_end() {
        let runs = |p, piece, len| piece_runs(p, piece, len).collect::<Vec<_>>();
        assert_eq!(runs(0, 4096, 65536), vec![]);
        assert_eq!(runs(0b1011, 4096, 65536), vec![(0, 8192), (12288, 16384)]);
        assert_eq!(runs(1 << 15, 4096, 65536), vec![(61440, 65536)]);
        assert_eq!(runs(u64::MAX, 4096, 65536), vec![(0, 65536)]);
        // A table smaller than a piece is one short piece.
        assert_eq!(runs(u64::MAX, 4096, 512), vec![(0, 512)]);
        assert_eq!(runs(1, 4096, 2048), vec![(0, 2048)]);
        // 2 MiB table, 64 pieces of 32 KiB.
        assert_eq!(
            runs(1 << 63, 32768, 2 << 20),
            vec![((2 << 20) - 32768, 2 << 20)]
        );
    }
}
