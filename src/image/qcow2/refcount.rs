//! On-disk refcount blocks: encoding and decoding for every refcount width (1 to 64 bits).

/// Decodes the refcounts of one refcount block.
pub fn decode_block(bytes: &[u8], order: u32) -> Vec<u64> {
    let bits = 1usize << order;
    let n = bytes.len() * 8 / bits;
    (0..n)
        .map(|i| match order {
            0..=2 => {
                let per_byte = 8 / bits;
                let byte = bytes[i / per_byte];
                let shift = (i % per_byte) * bits;
                u64::from((byte >> shift) & ((1u16 << bits) - 1) as u8)
            }
            _ => {
                let w = bits / 8;
                bytes[i * w..i * w + w]
                    .iter()
                    .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
            }
        })
        .collect()
}

/// Encodes refcounts into one refcount block (`out` is the whole block).
///
/// Runs at every flush that changed refcounts, over a whole block (32768 entries for 64 KiB
/// blocks of 16-bit refcounts): each width has its own loop with a fixed-size store, so no
/// entry costs a `memcpy` call (a variable-length copy per entry was a large share of the
/// worker's time on small writes with flushes: docs/PERFORMANCE.md, "Cheap refcount
/// write-back"), and zero entries are skipped.
pub fn encode_block(values: &[u64], order: u32, out: &mut [u8]) {
    out.fill(0);
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let mask = ((1u16 << bits) - 1) as u8;
            for (i, &v) in values.iter().enumerate() {
                if v != 0 {
                    out[i / per_byte] |= ((v as u8) & mask) << ((i % per_byte) * bits);
                }
            }
        }
        3 => {
            for (o, &v) in out.iter_mut().zip(values) {
                *o = v as u8;
            }
        }
        4 => encode_fixed::<2>(values, out, |v| (v as u16).to_be_bytes()),
        5 => encode_fixed::<4>(values, out, |v| (v as u32).to_be_bytes()),
        _ => encode_fixed::<8>(values, out, u64::to_be_bytes),
    }
}

/// Stores `enc(v)` for each nonzero value into consecutive `W`-byte slots of `out`.
fn encode_fixed<const W: usize>(values: &[u64], out: &mut [u8], enc: impl Fn(u64) -> [u8; W]) {
    for (slot, &v) in out.chunks_exact_mut(W).zip(values) {
        if v != 0 {
            slot.copy_from_slice(&enc(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_width() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            let vals: Vec<u64> = (0..n as u64).map(|i| (i * 7919) & max).collect();
            encode_block(&vals, order, &mut block);
            assert_eq!(decode_block(&block, order), vals, "order {order}");
        }
    }

    #[test]
    fn sub_byte_layout_is_lsb_first() {
        let mut block = vec![0u8; 2];
        encode_block(&[1, 0, 0, 0, 0, 0, 0, 1], 0, &mut block);
        assert_eq!(block[0], 0x81);
        encode_block(&[3, 1], 2, &mut block);
        assert_eq!(block[0], 0x13);
        encode_block(&[0x102], 4, &mut block);
        assert_eq!(block, vec![1, 2]);
    }
}
