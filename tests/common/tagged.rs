//! Tagged sectors: every 512-byte sector a crash test writes names the write it came from and
//! the sector it belongs in, so any sector read back after a crash says which write it holds,
//! or that it is garbage (torn, misplaced, metadata, another sector's data).

use super::{fill_pattern, splitmix64, SECTOR};

/// A small deterministic generator (splitmix64 over a counter).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0.wrapping_mul(0xD134_2543_DE82_EF95))
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// High half of the first word of every tagged sector: "VUBC".
pub const MAGIC: u64 = 0x5655_4243;

/// The 512 bytes write `id` puts in `sector`: word 0 = MAGIC << 32 | id, word 1 = sector, the
/// rest the data pattern of that place on the disk for a seed derived from (seed, id).
pub fn fill_sector(out: &mut [u8], seed: u64, id: u32, sector: u64) {
    debug_assert_eq!(out.len(), SECTOR as usize);
    out[0..8].copy_from_slice(&((MAGIC << 32) | u64::from(id)).to_le_bytes());
    out[8..16].copy_from_slice(&sector.to_le_bytes());
    fill_pattern(
        &mut out[16..],
        splitmix64(seed ^ (u64::from(id) << 40)),
        sector * SECTOR + 16,
    );
}

/// The tagged sectors of write `id` over `nsec` sectors from `sector`.
pub fn tagged(seed: u64, id: u32, sector: u64, nsec: u64) -> Vec<u8> {
    let mut v = vec![0u8; (nsec * SECTOR) as usize];
    for (k, s) in v.chunks_mut(SECTOR as usize).enumerate() {
        fill_sector(s, seed, id, sector + k as u64);
    }
    v
}

/// What a never-written sector reads as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initial {
    /// Zeros.
    Zeros,
    /// The backing file holds `fill_sector(.., id 0, ..)` everywhere.
    Backing,
    /// Every sector holds `compressible_sector` (header of write 0, then zeros), stored as
    /// compressed clusters.
    Compressed,
}

/// What `len` bytes of never-written sectors from `first_sector` hold on an image whose
/// never-written sectors read as `initial` (seeded like `fill_sector`).
pub fn initial_contents(initial: Initial, seed: u64, first_sector: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (k, sec) in v.chunks_mut(SECTOR as usize).enumerate() {
        let s = first_sector + k as u64;
        match initial {
            Initial::Zeros => {}
            Initial::Backing => fill_sector(sec, seed, 0, s),
            Initial::Compressed => compressible_sector(sec, s),
        }
    }
    v
}

/// Initial contents of the compressed image: the header of write 0 and zeros.
pub fn compressible_sector(out: &mut [u8], sector: u64) {
    out.fill(0);
    out[0..8].copy_from_slice(&(MAGIC << 32).to_le_bytes());
    out[8..16].copy_from_slice(&sector.to_le_bytes());
}

/// Which write a sector read back holds (0 = the initial contents), or why it is garbage.
pub fn decode(sec: &[u8], seed: u64, sector: u64, initial: Initial) -> Result<u32, String> {
    if initial == Initial::Zeros && sec.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&sec[0..8]);
    let w0 = u64::from_le_bytes(w);
    if w0 >> 32 != MAGIC {
        return Err(format!(
            "garbage (no write header): first bytes {:02x?}",
            &sec[..16]
        ));
    }
    let id = w0 as u32;
    if id == 0 && initial == Initial::Zeros {
        return Err("header of write 0 on an image without backing file".into());
    }
    let mut want = [0u8; SECTOR as usize];
    if id == 0 && initial == Initial::Compressed {
        compressible_sector(&mut want, sector);
    } else {
        fill_sector(&mut want, seed, id, sector);
    }
    if sec != want {
        w.copy_from_slice(&sec[8..16]);
        let hdr_sector = u64::from_le_bytes(w);
        let first = sec
            .iter()
            .zip(want.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(format!(
            "header says write {id} for sector {hdr_sector}, but the sector differs from that \
             write's contents from byte {first} (torn or misplaced data)"
        ));
    }
    Ok(id)
}
