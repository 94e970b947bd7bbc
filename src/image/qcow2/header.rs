//! The qcow2 header: parsing and validation of the fixed fields and the header extensions, and
//! the byte offsets of the fields we patch in place when we update the header.
//!
//! We never re-serialize the whole header of an existing image: updates patch single fields in
//! the first cluster, so every header extension (known or not) and the backing file name stay
//! byte for byte what they were.

use std::collections::HashMap;

/// Byte offset of `incompatible_features` (v3).
pub const OFF_INCOMPATIBLE: u64 = 72;
/// Byte offset of `autoclear_features` (v3).
pub const OFF_AUTOCLEAR: u64 = 88;
/// Byte offset of `refcount_table_offset`.
pub const OFF_REFCOUNT_TABLE: u64 = 48;
/// Byte offset of `refcount_table_clusters`.
pub const OFF_REFCOUNT_TABLE_CLUSTERS: u64 = 56;

/// Incompatible feature: the image was not closed cleanly; refcounts may be wrong.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image is corrupt and must not be written.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression_type field is meaningful.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: 128-bit L2 entries with subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible feature bit this implementation knows.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Autoclear feature: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature: the external data file is a consistent raw image (`data_file_raw`).
pub const AUTOCLEAR_DATA_RAW: u64 = 1 << 1;

/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Largest L1 table we accept, in bytes (qemu's limit too).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table we accept, in bytes (qemu's limit too).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest number of internal snapshots we accept.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Compression used by compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (zlib without header), the default.
    Zlib,
    /// Zstandard frames.
    Zstd,
}

/// The persistent-bitmaps extension fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
}

/// The parsed and validated qcow2 header.
#[derive(Clone, Debug)]
pub struct Header {
    /// Format version, 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header structure (72 for v2).
    pub header_length: u32,
    /// Compression type of compressed clusters.
    pub compression: Compression,
    /// Backing file name, if any (raw bytes as stored).
    pub backing_file: Option<String>,
    /// Backing file format from its header extension, if present.
    pub backing_format: Option<String>,
    /// External data file name from its header extension, if present.
    pub data_file: Option<String>,
    /// Bitmaps extension, if present.
    pub bitmaps: Option<BitmapsExt>,
    /// Feature names from the feature name table: (type, bit) -> name.
    pub feature_names: HashMap<(u8, u8), String>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Why a header is refused: what is wrong with it, in words for the user (the messages are
/// many and each names its field, so they are not split into variants nobody matches on).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HeaderError(String);

impl From<String> for HeaderError {
    fn from(m: String) -> Self {
        HeaderError(m)
    }
}

impl From<&str> for HeaderError {
    fn from(m: &str) -> Self {
        HeaderError(m.to_owned())
    }
}

fn string_of(bytes: &[u8], what: &str) -> Result<String, HeaderError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8").into())
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// True with 128-bit L2 entries.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Guest clusters mapped by one L2 table.
    pub fn l2_entries(&self) -> u64 {
        let entry = if self.extended_l2() { 16 } else { 8 };
        self.cluster_size() / entry
    }

    /// Name of a feature bit for messages: from the image's feature table if present.
    pub fn feature_name(&self, kind: u8, bit: u8) -> String {
        match self.feature_names.get(&(kind, bit)) {
            Some(n) => format!("bit {bit} ({n})"),
            None => format!("bit {bit}"),
        }
    }

    /// Parses and validates the header from the start of the file. `head` holds the first
    /// bytes of the file (at least the first cluster or the whole file if shorter);
    /// `file_len` is the file size. Errors describe the problem for the user.
    pub fn parse(head: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        if head.len() < 72 {
            return Err(format!(
                "file is too short for a qcow2 header ({} bytes)",
                head.len()
            )
            .into());
        }
        if head[..4] != *b"QFI\xfb" {
            return Err("no qcow2 magic".into());
        }
        let version = be32(head, 4);
        if version != 2 && version != 3 {
            return Err(format!("unsupported qcow2 version {version}").into());
        }
        let cluster_bits = be32(head, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(format!("cluster_bits {cluster_bits} out of range (9..=21)").into());
        }
        let cluster_size = 1u64 << cluster_bits;
        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
            if head.len() < 104 {
                return Err("file is too short for a version 3 header".into());
            }
            (
                be64(head, 72),
                be64(head, 80),
                be64(head, 88),
                be32(head, 96),
                be32(head, 100),
            )
        } else {
            (0, 0, 0, 4, 72)
        };
        if version == 3 {
            if header_length < 104 || !header_length.is_multiple_of(8) {
                return Err(format!(
                    "header_length {header_length} invalid (at least 104, multiple of 8)"
                )
                .into());
            }
            if u64::from(header_length) > cluster_size || header_length as usize > head.len() {
                return Err(format!(
                    "header_length {header_length} exceeds the first cluster or the file"
                )
                .into());
            }
        }
        if refcount_order > 6 {
            return Err(format!("refcount_order {refcount_order} out of range (0..=6)").into());
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(head, 24),
            l1_size: be32(head, 36),
            l1_table_offset: be64(head, 40),
            refcount_table_offset: be64(head, 48),
            refcount_table_clusters: be32(head, 56),
            nb_snapshots: be32(head, 60),
            snapshots_offset: be64(head, 64),
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            compression: Compression::Zlib,
            backing_file: None,
            backing_format: None,
            data_file: None,
            bitmaps: None,
            feature_names: HashMap::new(),
        };
        // Where the backing file name lies, before the extensions: like qemu, the extension
        // area ends at the name (qemu before 1.1 wrote it right after the extensions, with no
        // end marker), and the name may overlap neither the header nor the extensions.
        let cluster_end = (cluster_size as usize).min(head.len());
        let bfo = be64(head, 8);
        let bfs = u64::from(be32(head, 16));
        let ext_end = if bfo == 0 {
            cluster_end
        } else {
            if bfs == 0 || bfs > 1023 {
                return Err(
                    format!("backing file name length {bfs} out of range (1..=1023)").into(),
                );
            }
            let header_end = if version == 3 { header_length } else { 72 };
            if bfo < u64::from(header_end) {
                return Err(format!(
                    "backing file name at offset {bfo} overlaps the {header_end}-byte header"
                )
                .into());
            }
            bfo.checked_add(bfs)
                .filter(|&e| e <= cluster_end as u64)
                .ok_or("backing file name lies outside the first cluster")?;
            bfo as usize
        };
        // Extensions first, so error messages about feature bits can use the name table.
        let bound = if bfo == 0 {
            "the first cluster"
        } else {
            "the backing file name"
        };
        h.parse_extensions(&head[..ext_end], bound)?;

        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|b| unknown & (1 << b) != 0)
                .map(|b| h.feature_name(0, b))
                .collect();
            return Err(format!("unknown incompatible feature {}", names.join(", ")).into());
        }
        if version == 3 && header_length > 104 {
            let ct = head[104];
            let bit = incompatible & INCOMPAT_COMPRESSION != 0;
            h.compression = match (ct, bit) {
                (0, false) => Compression::Zlib,
                (1, true) => Compression::Zstd,
                (0, true) => {
                    return Err("compression type bit set but compression_type is 0".into())
                }
                (t, true) => return Err(format!("unknown compression_type {t}").into()),
                (t, false) => {
                    return Err(format!(
                        "compression_type {t} without the compression type feature bit"
                    )
                    .into())
                }
            };
        } else if incompatible & INCOMPAT_COMPRESSION != 0 {
            return Err("compression type bit set but the header has no compression_type".into());
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err("extended L2 entries need cluster_bits >= 14".into());
        }
        let crypt = be32(head, 32);
        if crypt != 0 {
            return Err(
                format!("encrypted images (crypt_method {crypt}) are not supported").into(),
            );
        }

        // Backing file name (its place was checked above).
        if bfo != 0 {
            h.backing_file = Some(string_of(
                &head[ext_end..ext_end + bfs as usize],
                "backing file name",
            )?);
        }

        // Virtual size and the L1 table.
        if h.size > (1u64 << 62) {
            return Err(format!("virtual size {} is too large", h.size).into());
        }
        let guest_per_l2 = cluster_size * h.l2_entries();
        let l1_needed = h.size.div_ceil(guest_per_l2);
        if u64::from(h.l1_size) < l1_needed {
            return Err(format!(
                "L1 table too small for the virtual size ({} entries, {} needed)",
                h.l1_size, l1_needed
            )
            .into());
        }
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(format!("L1 table size {} entries is too large", h.l1_size).into());
        }
        check_area(
            "L1 table",
            h.l1_table_offset,
            l1_bytes,
            cluster_size,
            file_len,
            h.l1_size != 0,
        )?;
        // Refcount table.
        let rt_bytes = u64::from(h.refcount_table_clusters) * cluster_size;
        if h.refcount_table_clusters == 0 {
            return Err("refcount table has zero clusters".into());
        }
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(format!(
                "refcount table of {} clusters is too large",
                h.refcount_table_clusters
            )
            .into());
        }
        check_area(
            "refcount table",
            h.refcount_table_offset,
            rt_bytes,
            cluster_size,
            file_len,
            true,
        )?;
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(format!("too many snapshots ({})", h.nb_snapshots).into());
        }
        if h.nb_snapshots > 0 {
            check_area(
                "snapshot table",
                h.snapshots_offset,
                1,
                cluster_size,
                file_len,
                true,
            )?;
        }
        if let Some(b) = h.bitmaps {
            if b.nb_bitmaps == 0 || b.nb_bitmaps > 65535 {
                return Err(format!("bitmaps extension: bad bitmap count {}", b.nb_bitmaps).into());
            }
            if b.directory_size == 0 || b.directory_size > 64 << 20 {
                return Err(
                    format!("bitmaps extension: bad directory size {}", b.directory_size).into(),
                );
            }
            check_area(
                "bitmap directory",
                b.directory_offset,
                b.directory_size,
                cluster_size,
                file_len,
                true,
            )?;
        } else if h.autoclear & AUTOCLEAR_BITMAPS != 0 {
            // Spec: an error; harmless to ignore for reading, and we clear it before writing.
            log::warn!("bitmaps autoclear bit set without a bitmaps extension");
        }
        Ok(h)
    }

    /// Parses the extensions in `area` (the first cluster up to the backing file name, if
    /// any; `bound` names that end for messages). As in qemu, the extensions end at an end
    /// marker or exactly at the end of the area.
    fn parse_extensions(&mut self, area: &[u8], bound: &str) -> Result<(), HeaderError> {
        let mut off = self.header_length as usize;
        if self.version == 2 {
            off = 72;
        }
        // Bounded by the area: each extension takes at least 8 bytes.
        while off < area.len() {
            if off + 8 > area.len() {
                return Err(format!("header extensions run past {bound}").into());
            }
            let ty = be32(area, off);
            let len = be32(area, off + 4) as usize;
            if ty == 0 {
                return Ok(());
            }
            let data_start = off + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= area.len())
                .ok_or_else(|| format!("header extension {ty:#x} runs past {bound}"))?;
            let data = &area[data_start..data_end];
            match ty {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(string_of(data, "backing format")?);
                }
                EXT_DATA_FILE => {
                    self.data_file = Some(string_of(data, "data file name")?);
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_bytes = &e[2..48];
                        let end = name_bytes.iter().position(|&c| c == 0).unwrap_or(46);
                        let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
                        self.feature_names.insert((e[0], e[1]), name);
                    }
                }
                EXT_BITMAPS => {
                    if data.len() < 24 {
                        return Err("bitmaps extension too short".into());
                    }
                    self.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                }
                _ => {}
            }
            off = data_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }
}

/// Checks that `[offset, offset + len)` is cluster aligned and within the file.
fn check_area(
    what: &str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
    required: bool,
) -> Result<(), HeaderError> {
    if !required {
        return Ok(());
    }
    if offset == 0 || !offset.is_multiple_of(cluster_size) {
        return Err(format!("{what} offset {offset:#x} is not cluster aligned or zero").into());
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(format!(
            "{what} at {offset:#x} ({len} bytes) extends past the end of the file ({file_len} bytes)"
        ).into()),
    }
}

/// Builds the first cluster of a fresh, empty version 3 image: `cluster_bits`, 16-bit
/// refcounts, the header followed by an empty extension area.
pub fn build_fresh(
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_offset: u64,
    rt_offset: u64,
    rt_clusters: u32,
) -> Vec<u8> {
    let mut h = vec![0u8; 1 << cluster_bits];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
    h[24..32].copy_from_slice(&size.to_be_bytes());
    h[36..40].copy_from_slice(&l1_size.to_be_bytes());
    h[40..48].copy_from_slice(&l1_offset.to_be_bytes());
    h[48..56].copy_from_slice(&rt_offset.to_be_bytes());
    h[56..60].copy_from_slice(&rt_clusters.to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&112u32.to_be_bytes());
    // Bytes 104..112: compression_type 0 (zlib) and padding; then the end-of-extensions
    // marker (already zero).
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> Vec<u8> {
        let mut h = build_fresh(16, 1 << 30, 2, 3 << 16, 1 << 16, 1);
        h.truncate(1 << 16);
        h
    }

    const LEN: u64 = 4 << 16;

    fn put32(h: &mut [u8], off: usize, v: u32) {
        h[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn put64(h: &mut [u8], off: usize, v: u64) {
        h[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }

    /// Writes a header extension at `at`; returns where the next one starts.
    fn put_ext(h: &mut [u8], at: usize, ty: u32, data: &[u8]) -> usize {
        put32(h, at, ty);
        put32(h, at + 4, data.len() as u32);
        h[at + 8..at + 8 + data.len()].copy_from_slice(data);
        at + 8 + data.len().next_multiple_of(8)
    }

    /// Names a backing file `name` stored at `at`.
    fn put_backing(h: &mut [u8], at: usize, name: &[u8]) {
        put64(h, 8, at as u64);
        put32(h, 16, name.len() as u32);
        h[at..at + name.len()].copy_from_slice(name);
    }

    /// A header edit: a big-endian value written at a byte offset.
    #[derive(Clone, Copy)]
    enum Set {
        W32(usize, u32),
        W64(usize, u64),
        Byte(usize, u8),
    }
    use Set::{Byte, W32, W64};

    fn apply(h: &mut [u8], edits: &[Set]) {
        for e in edits {
            match *e {
                W32(at, v) => put32(h, at, v),
                W64(at, v) => put64(h, at, v),
                Byte(at, v) => h[at] = v,
            }
        }
    }

    fn assert_refused(name: &str, h: &[u8], want: &str) {
        match Header::parse(h, LEN) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => assert!(e.to_string().contains(want), "{name}: {e:?} lacks {want:?}"),
        }
    }

    /// Every fixed header field with an out-of-range value: the fresh header with the edits
    /// must be refused with a message naming the field.
    #[test]
    fn out_of_range_fields_are_refused_naming_the_field() {
        let max_l1 = (MAX_L1_BYTES / 8) as u32;
        let cases: &[(&str, &[Set], &str)] = &[
            ("version 0", &[W32(4, 0)], "unsupported qcow2 version 0"),
            ("version 1", &[W32(4, 1)], "unsupported qcow2 version 1"),
            (
                "cluster_bits 8",
                &[W32(20, 8)],
                "cluster_bits 8 out of range",
            ),
            (
                "cluster_bits 22",
                &[W32(20, 22)],
                "cluster_bits 22 out of range",
            ),
            (
                "extended L2 with 8 KiB clusters",
                &[W32(20, 13), W64(72, INCOMPAT_EXTL2)],
                "extended L2 entries need cluster_bits >= 14",
            ),
            ("size 2^62 + 1", &[W64(24, (1 << 62) + 1)], "virtual size"),
            (
                "size u64::MAX",
                &[W64(24, u64::MAX)],
                "virtual size 18446744073709551615",
            ),
            (
                "size beyond what the L1 maps with 512-byte clusters",
                &[W32(20, 9), W64(24, 1 << 40)],
                "L1 table too small for the virtual size (2 entries, 33554432 needed)",
            ),
            ("crypt_method 2 (LUKS)", &[W32(32, 2)], "crypt_method 2"),
            (
                "l1_size over 32 MiB",
                &[W32(36, max_l1 + 1)],
                "L1 table size 4194305",
            ),
            ("l1_table_offset 0", &[W64(40, 0)], "L1 table offset 0x0"),
            (
                "L1 table running past the end of the file",
                &[W32(36, 8193)],
                "L1 table at 0x30000 (65544 bytes) extends past the end of the file",
            ),
            (
                "refcount_table_offset unaligned",
                &[W64(48, 0x10200)],
                "refcount table offset 0x10200 is not cluster aligned",
            ),
            (
                "refcount_table_offset 0",
                &[W64(48, 0)],
                "refcount table offset 0x0",
            ),
            (
                "refcount_table_clusters 0",
                &[W32(56, 0)],
                "refcount table has zero",
            ),
            (
                "refcount_table_clusters u32::MAX",
                &[W32(56, u32::MAX)],
                "refcount table of 4294967295 clusters is too large",
            ),
            (
                "refcount table running past the end of the file",
                &[W32(56, 4)],
                "refcount table at 0x10000 (262144 bytes) extends past the end of the file",
            ),
            (
                "nb_snapshots 65537",
                &[W32(60, 65537)],
                "too many snapshots (65537)",
            ),
            (
                "snapshots_offset 0",
                &[W32(60, 1)],
                "snapshot table offset 0x0 is not",
            ),
            (
                "snapshots_offset unaligned",
                &[W32(60, 1), W64(64, 0x10008)],
                "snapshot table offset 0x10008 is not cluster aligned",
            ),
            (
                "snapshots_offset at the end of the file",
                &[W32(60, 1), W64(64, LEN)],
                "snapshot table at 0x40000 (1 bytes) extends past the end of the file",
            ),
            (
                "incompatible bit 63",
                &[W64(72, 1 << 63)],
                "unknown incompatible feature bit 63",
            ),
            (
                "refcount_order u32::MAX",
                &[W32(96, u32::MAX)],
                "refcount_order 4294967295",
            ),
            (
                "header_length 96",
                &[W32(100, 96)],
                "header_length 96 invalid",
            ),
            (
                "header_length 108",
                &[W32(100, 108)],
                "header_length 108 invalid",
            ),
            (
                "header_length > cluster",
                &[W32(100, 65544)],
                "header_length 65544 exceeds",
            ),
            (
                "compression_type 2",
                &[W64(72, INCOMPAT_COMPRESSION), Byte(104, 2)],
                "unknown compression_type 2",
            ),
            (
                "zstd without the compression type bit",
                &[Byte(104, 1)],
                "compression_type 1 without the compression type feature bit",
            ),
            (
                "compression type bit with compression_type 0",
                &[W64(72, INCOMPAT_COMPRESSION)],
                "compression type bit set but compression_type is 0",
            ),
            (
                "compression type bit with a 104-byte header",
                &[W32(100, 104), W64(72, INCOMPAT_COMPRESSION)],
                "the header has no compression_type",
            ),
            (
                "extension length running past the cluster by one byte",
                &[W32(112, 0x1234_5678), W32(116, 65536 - 120 + 1)],
                "header extension 0x12345678 runs past the first cluster",
            ),
            (
                "backing_file_offset u64::MAX",
                &[W64(8, u64::MAX), W32(16, 4)],
                "backing file name lies outside the first cluster",
            ),
            (
                "backing_file_offset + size past the cluster",
                &[W64(8, 65536 - 3), W32(16, 4)],
                "backing file name lies outside the first cluster",
            ),
            (
                "backing_file_size 0",
                &[W64(8, 4096)],
                "backing file name length 0 out of",
            ),
            (
                "backing_file_size 1024",
                &[W64(8, 4096), W32(16, 1024)],
                "backing file name length 1024 out of range",
            ),
            (
                "backing file name in the header",
                &[W64(8, 8), W32(16, 8)],
                "backing file name at offset 8 overlaps the 112-byte header",
            ),
        ];
        for (name, edits, want) in cases {
            let mut h = fresh();
            apply(&mut h, edits);
            assert_refused(name, &h, want);
        }
    }

    /// Every header extension we parse, and the backing file name, with bad contents or in a
    /// bad place: refused with a message naming it.
    #[test]
    fn bad_extensions_and_backing_names_are_refused() {
        let dir = |nb: u32, size: u64, offset: u64| {
            let mut d = vec![0u8; 24];
            put32(&mut d, 0, nb);
            put64(&mut d, 8, size);
            put64(&mut d, 16, offset);
            d
        };
        let exts: &[(&str, u32, Vec<u8>, &str)] = &[
            (
                "backing format not UTF-8",
                EXT_BACKING_FORMAT,
                b"qc\xffw2".to_vec(),
                "backing format is not valid UTF-8",
            ),
            (
                "data file name not UTF-8",
                EXT_DATA_FILE,
                b"\xc3(.raw".to_vec(),
                "data file name is not valid UTF-8",
            ),
            (
                "bitmaps extension of 16 bytes",
                EXT_BITMAPS,
                vec![0; 16],
                "bitmaps extension too short",
            ),
            (
                "no bitmaps",
                EXT_BITMAPS,
                dir(0, 64, 2 << 16),
                "bad bitmap count 0",
            ),
            (
                "65536 bitmaps",
                EXT_BITMAPS,
                dir(65536, 64, 2 << 16),
                "bad bitmap count 65536",
            ),
            (
                "empty bitmap directory",
                EXT_BITMAPS,
                dir(1, 0, 2 << 16),
                "bad directory size 0",
            ),
            (
                "huge bitmap directory",
                EXT_BITMAPS,
                dir(1, u64::MAX, 2 << 16),
                "bad directory size 18446744073709551615",
            ),
            (
                "unaligned bitmap directory",
                EXT_BITMAPS,
                dir(1, 64, 0x20100),
                "bitmap directory offset 0x20100 is not cluster aligned",
            ),
            (
                "bitmap directory past the end",
                EXT_BITMAPS,
                dir(1, 64, !0xffff),
                "bitmap directory at 0xffffffffffff0000 (64 bytes) extends past the end",
            ),
        ];
        for (name, ty, data, want) in exts {
            let mut h = fresh();
            put_ext(&mut h, 112, *ty, data);
            assert_refused(name, &h, want);
        }
        // The backing file name: not UTF-8; overlapping an extension's data; cutting an
        // extension's header (the extension area ends where the name starts).
        let fmt_end = 112 + 8 + 8;
        let names: &[(&str, usize, &[u8], &str)] = &[
            (
                "name not UTF-8",
                4096,
                b"b\xffse",
                "backing file name is not valid UTF-8",
            ),
            (
                "name inside an extension",
                fmt_end - 4,
                b"base.qcow2",
                "header extension 0xe2792aca runs past the backing file name",
            ),
            (
                "name cutting an extension header",
                fmt_end + 4,
                b"base.qcow2",
                "header extensions run past the backing file name",
            ),
        ];
        for (name, at, bytes, want) in names {
            let mut h = fresh();
            assert_eq!(put_ext(&mut h, 112, EXT_BACKING_FORMAT, b"qcow2"), fmt_end);
            put_backing(&mut h, *at, bytes);
            assert_refused(name, &h, want);
        }
    }

    /// Values at the edges of the valid ranges, and fields an implementation must ignore or
    /// carry along, are accepted.
    #[test]
    fn edge_values_are_accepted() {
        type Edit = fn(&mut Vec<u8>);
        type Check = fn(&Header) -> bool;
        let cases: &[(&str, Edit, Check)] = &[
            ("size 0", |h| put64(h, 24, 0), |h| h.size == 0),
            (
                "cluster_bits 9",
                |h| {
                    put32(h, 20, 9);
                    put64(h, 24, 64 << 10);
                },
                |h| h.cluster_size() == 512 && h.l2_entries() == 64,
            ),
            (
                "extended L2 with 16 KiB clusters",
                |h| {
                    put32(h, 20, 14);
                    put64(h, 72, INCOMPAT_EXTL2);
                    put64(h, 24, 16 << 20);
                },
                |h| h.extended_l2() && h.l2_entries() == 1024,
            ),
            (
                "unknown compatible and autoclear bits",
                |h| {
                    put64(h, 80, 1 << 40);
                    put64(h, 88, 1 << 33);
                },
                |h| h.compatible == 1 << 40 && h.autoclear == 1 << 33,
            ),
            (
                "refcount_order 6",
                |h| put32(h, 96, 6),
                |h| h.refcount_bits() == 64,
            ),
            (
                "refcount_order 0",
                |h| put32(h, 96, 0),
                |h| h.refcount_bits() == 1,
            ),
            (
                "zstd",
                |h| {
                    put64(h, 72, INCOMPAT_COMPRESSION);
                    h[104] = 1;
                },
                |h| h.compression == Compression::Zstd,
            ),
            (
                "l1_size larger than the virtual size needs",
                |h| put32(h, 36, 8192),
                |h| h.l1_size == 8192,
            ),
            (
                "backing file name of 1023 bytes at the end of the cluster",
                |h| put_backing(h, 65536 - 1023, &[b'n'; 1023]),
                |h| h.backing_file.as_ref().map(String::len) == Some(1023),
            ),
            (
                "extensions ending exactly at the backing file name, without an end marker",
                |h| {
                    let next = put_ext(h, 112, EXT_BACKING_FORMAT, b"qcow2");
                    put_backing(h, next, b"base.qcow2");
                },
                |h| {
                    h.backing_format.as_deref() == Some("qcow2")
                        && h.backing_file.as_deref() == Some("base.qcow2")
                },
            ),
        ];
        for (name, edit, check) in cases {
            let mut h = fresh();
            edit(&mut h);
            match Header::parse(&h, LEN) {
                Ok(parsed) => assert!(check(&parsed), "{name}: {parsed:?}"),
                Err(e) => panic!("{name}: refused: {e}"),
            }
        }
    }

    #[test]
    fn fresh_header_parses() {
        let h = Header::parse(&fresh(), LEN).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.size, 1 << 30);
    }

    #[test]
    fn truncated_header_is_refused() {
        let h = fresh();
        assert!(Header::parse(&h[..50], LEN)
            .unwrap_err()
            .to_string()
            .contains("too short"));
        assert!(Header::parse(&h[..90], LEN)
            .unwrap_err()
            .to_string()
            .contains("too short"));
    }

    #[test]
    fn bad_magic_and_version() {
        let mut h = fresh();
        h[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert!(Header::parse(&h, LEN)
            .unwrap_err()
            .to_string()
            .contains("version 4"));
        h[0] = b'X';
        assert!(Header::parse(&h, LEN)
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }

    #[test]
    fn cluster_bits_30_is_refused() {
        let mut h = fresh();
        h[20..24].copy_from_slice(&30u32.to_be_bytes());
        assert!(Header::parse(&h, LEN)
            .unwrap_err()
            .to_string()
            .contains("cluster_bits 30"));
    }

    #[test]
    fn huge_l1_is_refused() {
        let mut h = fresh();
        h[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Header::parse(&h, LEN)
            .unwrap_err()
            .to_string()
            .contains("too large"));
        let mut h = fresh();
        h[24..32].copy_from_slice(&(1u64 << 50).to_be_bytes());
        assert!(Header::parse(&h, LEN)
            .unwrap_err()
            .to_string()
            .contains("L1 table too small"));
    }

    #[test]
    fn offsets_past_eof_are_refused() {
        let mut h = fresh();
        h[40..48].copy_from_slice(&(100u64 << 16).to_be_bytes());
        assert!(Header::parse(&h, LEN)
            .unwrap_err()
            .to_string()
            .contains("past the end"));
        let mut h = fresh();
        h[48..56].copy_from_slice(&u64::MAX.wrapping_sub(65535).to_be_bytes());
        assert!(Header::parse(&h, LEN)
            .unwrap_err()
            .to_string()
            .contains("refcount table"));
        let mut h = fresh();
        h[40..48].copy_from_slice(&12345u64.to_be_bytes());
        assert!(Header::parse(&h, LEN)
            .unwrap_err()
            .to_string()
            .contains("aligned"));
    }

    #[test]
    fn unknown_incompatible_bit_is_named() {
        let mut h = fresh();
        h[72..80].copy_from_slice(&(1u64 << 7).to_be_bytes());
        assert_eq!(
            Header::parse(&h, LEN).unwrap_err().to_string(),
            "unknown incompatible feature bit 7"
        );
        // With a feature name table entry for it, the name appears.
        let mut ext = vec![0u8; 8 + 48];
        ext[0..4].copy_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
        ext[4..8].copy_from_slice(&48u32.to_be_bytes());
        ext[8] = 0;
        ext[9] = 7;
        ext[10..19].copy_from_slice(b"frobnicat");
        h[112..112 + ext.len()].copy_from_slice(&ext);
        assert_eq!(
            Header::parse(&h, LEN).unwrap_err().to_string(),
            "unknown incompatible feature bit 7 (frobnicat)"
        );
    }

    #[test]
    fn extension_running_past_cluster_is_refused() {
        let mut h = fresh();
        h[112..116].copy_from_slice(&0x1234u32.to_be_bytes());
        h[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Header::parse(&h, LEN)
            .unwrap_err()
            .to_string()
            .contains("past the first cluster"));
    }

    #[test]
    fn refcount_order_and_encryption() {
        let mut h = fresh();
        h[96..100].copy_from_slice(&7u32.to_be_bytes());
        assert!(Header::parse(&h, LEN)
            .unwrap_err()
            .to_string()
            .contains("refcount_order 7"));
        let mut h = fresh();
        h[32..36].copy_from_slice(&1u32.to_be_bytes());
        assert!(Header::parse(&h, LEN)
            .unwrap_err()
            .to_string()
            .contains("encrypted"));
    }

    #[test]
    fn bad_backing_name_is_refused() {
        let mut h = fresh();
        h[8..16].copy_from_slice(&65530u64.to_be_bytes());
        h[16..20].copy_from_slice(&100u32.to_be_bytes());
        assert!(Header::parse(&h, LEN)
            .unwrap_err()
            .to_string()
            .contains("backing file name"));
    }
}
