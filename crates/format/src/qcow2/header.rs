//! The qcow2 header: parsing with every field checked against QEMU's limits, header
//! extensions (kept byte for byte when unknown), and serialisation.

use super::compress::CompressionType;
use crate::units::{header_u32, index};
use crate::{Error, ErrorKind, Result};
use std::os::unix::ffi::OsStrExt;

pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 104;
/// With the compression-type byte, padded to a multiple of 8.
pub const V3_HEADER_LEN_COMPRESSION: u32 = 112;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
pub const MAX_BACKING_NAME: u64 = 1023;
/// Longest backing format name QEMU accepts in the header extension.
pub const MAX_BACKING_FORMAT: usize = 15;
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
/// The fixed part of a snapshot table entry, in bytes.
const SNAPSHOT_HEADER_LEN: u64 = 40;
/// Host cluster offsets must stay below 2^56.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;

pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION: u64 = 1 << 3;
    pub const EXTL2: u64 = 1 << 4;
    /// Bits this implementation understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}
pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

pub mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const CRYPTO: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// One entry of the feature-name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// The bitmaps header extension (the directory itself is parsed elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// The full disk encryption header extension: where the LUKS area lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoExt {
    pub offset: u64,
    pub length: u64,
}

/// `crypt_method` values.
pub mod crypt {
    pub const NONE: u32 = 0;
    /// The legacy AES-CBC format (read only).
    pub const AES: u32 = 1;
    pub const LUKS: u32 = 2;
}

/// A parsed and validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// The backing file name: bytes, as QEMU keeps it (it need not be UTF-8).
    pub backing_file: Option<std::ffi::OsString>,
    pub backing_format: Option<String>,
    pub feature_names: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExt>,
    /// The LUKS area of a LUKS-encrypted image.
    pub crypto: Option<CryptoExt>,
    /// Extensions strata does not interpret, kept to be written back unchanged.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

/// Big-endian fields of on-disk structures.
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }
    /// Bytes per L2 entry: 8, or 16 with extended L2.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    /// L2 entries in one L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }
    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let per_l1 = self.cluster_size() * self.l2_entries();
        size.div_ceil(per_l1)
    }

    /// The header area of the image on `storage`: its first cluster, as
    /// large as the header's cluster-size field says (the first page when
    /// that field is out of range), or the whole file when it is shorter.
    pub fn read_area(storage: &dyn strata_storage::Storage) -> Result<Vec<u8>> {
        let file_size = storage.size()?;
        let mut first = vec![0u8; index(file_size.min(4096))];
        storage.read_at(&mut first, 0)?;
        if first.len() >= 24 {
            let bits = u32::from_be_bytes(first[20..24].try_into().expect("4 bytes"));
            if bits <= MAX_CLUSTER_BITS && (1u64 << bits) > first.len() as u64 {
                first = vec![0u8; index(file_size.min(1 << bits))];
                storage.read_at(&mut first, 0)?;
            }
        }
        Ok(first)
    }

    /// The validated header of the image on `storage`, as an open reads it,
    /// without opening the image: no table is read, nothing is written and
    /// nothing is reported (for a look at the backing file's name).
    pub fn read(storage: &dyn strata_storage::Storage) -> Result<Header> {
        Header::parse(&Header::read_area(storage)?, storage.size()?)
    }

    /// Parse and validate the header found in `buf` (the image's first bytes: at least
    /// the first cluster, or the whole file if it is shorter). `file_size` bounds offsets.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header> {
        Self::parse_inner(buf, file_size, true)
    }

    /// Parse the header for a consistency check: tables may start past the end
    /// of the file, the refcount table may be missing (no clusters, as QEMU's
    /// check accepts it: the check reports every cluster in use and its
    /// repair rebuilds the table), and the snapshot table's count and offset
    /// are not judged here (the check reports them, see
    /// [`Header::snapshot_table_fault`]).
    pub fn parse_for_check(buf: &[u8]) -> Result<Header> {
        Self::parse_inner(buf, u64::MAX, false)
    }

    fn parse_inner(buf: &[u8], file_size: u64, snapshots: bool) -> Result<Header> {
        // A file shorter than the magic reads as zeroes past its end (as QEMU's
        // reads do): not qcow2 either.
        if buf.len() < 4 || be32(buf, 0) != MAGIC {
            return Err(Error::invalid("Image is not in qcow2 format"));
        }
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Error::invalid(
                "Image is not in qcow2 format (file too short for a header)",
            ));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::invalid(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            // QEMU counts whole 512-byte sectors: a size off that grid is rounded
            // down (and written back so when the header is rewritten).
            size: be64(buf, 24) / 512 * 512,
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            bitmaps: None,
            crypto: None,
            unknown_extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return Err(Error::invalid("qcow2 header exceeds the file size"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN {
                return Err(Error::invalid("qcow2 header too short"));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(Error::invalid("qcow2 header exceeds cluster size"));
            }
            if h.header_length as usize > buf.len() {
                return Err(Error::invalid("qcow2 header exceeds the file size"));
            }
        }
        // QEMU's order from here: the backing file offset, the compression type,
        // then the fixed fields (extensions after them).
        if h.backing_file_offset > cluster_size {
            return Err(Error::invalid("Invalid backing file offset"));
        }
        if h.header_length > V3_HEADER_LEN {
            let ct = buf[104];
            h.compression_type = CompressionType::from_byte(ct).ok_or_else(|| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!("qcow2: unknown compression type: {ct}"),
                )
            })?;
        }
        h.validate_fixed(file_size, snapshots)?;
        h.parse_extensions(buf)?;
        h.parse_backing_name(buf)?;
        Ok(h)
    }

    fn validate_fixed(&self, file_size: u64, snapshots: bool) -> Result<()> {
        let cs = self.cluster_size();
        // Unknown incompatible features are refused after the extensions are parsed,
        // so the error can use the image's own feature names.
        if self.crypt_method > crypt::LUKS {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("Unsupported encryption method {}", self.crypt_method),
            ));
        }
        if self.refcount_order > 6 {
            return Err(Error::invalid(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        let compression_bit = self.incompatible_features & incompat::COMPRESSION != 0;
        if compression_bit != (self.compression_type != CompressionType::Zlib) {
            return Err(Error::invalid(if compression_bit {
                "qcow2: Compression type incompatible feature bit must not be set"
            } else {
                "qcow2: Compression type incompatible feature bit must be set"
            }));
        }
        if self.extended_l2() && cs / 32 < 512 {
            return Err(Error::invalid(format!(
                "extended L2 entries need clusters of at least 16 KiB, got {cs} bytes"
            )));
        }
        if self.version == 2 && self.incompatible_features != 0 {
            return Err(Error::invalid("version 2 image with feature bits"));
        }
        // The tables, as QEMU validates them (its limits and words), then what
        // strata requires beyond that (see [`check_table`]).
        // A check (`snapshots` false) opens an image without a refcount table,
        // as QEMU's does, so that its repair can rebuild one.
        if self.refcount_table_clusters == 0 && snapshots {
            return Err(Error::invalid(
                "Image does not contain a reference count table",
            ));
        }
        let rt_bytes = validate_table(
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters),
            cs,
            MAX_REFTABLE_BYTES,
            cs,
            "Reference count table",
        )?;
        if snapshots {
            self.validate_snapshot_table(u64::from(self.nb_snapshots))?;
        }
        let l1_bytes = validate_table(
            self.l1_table_offset,
            u64::from(self.l1_size),
            8,
            MAX_L1_BYTES,
            cs,
            "Active L1 table",
        )?;
        // QEMU caps the virtual size where the L1 index of its end no longer fits
        // a C int.
        let needed = self.l1_entries_for(self.size);
        if self.size > (i64::MAX as u64) - 511 || needed > i32::MAX as u64 {
            return Err(Error::invalid("Image is too big"));
        }
        if u64::from(self.l1_size) < needed {
            return Err(Error::invalid("L1 table is too small"));
        }
        if rt_bytes > 0 {
            check_table(
                self.refcount_table_offset,
                rt_bytes,
                cs,
                file_size,
                "Reference count table",
            )?;
        }
        if self.l1_size > 0 {
            check_table(
                self.l1_table_offset,
                l1_bytes,
                cs,
                file_size,
                "Active L1 table",
            )?;
        }
        if self.nb_snapshots > 0 && snapshots {
            let min = u64::from(self.nb_snapshots) * SNAPSHOT_HEADER_LEN;
            // Past the end of the file is not refused: as in QEMU, the table
            // then reads as zeros (entries with no ID, name or L1 table).
            check_table(self.snapshots_offset, min, cs, u64::MAX, "Snapshot table")?;
        }
        Ok(())
    }

    /// QEMU's limits on a snapshot table of `count` entries at the header's
    /// offset, in its words.
    fn validate_snapshot_table(&self, count: u64) -> Result<u64> {
        validate_table(
            self.snapshots_offset,
            count,
            SNAPSHOT_HEADER_LEN,
            SNAPSHOT_HEADER_LEN * u64::from(MAX_SNAPSHOTS),
            self.cluster_size(),
            "Snapshot table",
        )
    }

    /// What makes the snapshot table unreadable, judged as a check judges it:
    /// first more entries than the limit, then (for at most the limit's entries)
    /// an offset off the cluster grid or a table that would end past `i64::MAX`.
    pub fn snapshot_table_fault(&self) -> SnapshotTableFault {
        let overhanging = self.nb_snapshots.saturating_sub(MAX_SNAPSHOTS);
        let kept = self.nb_snapshots - overhanging;
        let unreadable = self.nb_snapshots > 0
            && self
                .snapshots_offset
                .checked_add(u64::from(self.nb_snapshots) * SNAPSHOT_HEADER_LEN)
                .is_none_or(|end| end > MAX_REQUEST_END);
        SnapshotTableFault {
            overhanging,
            offset_invalid: self.validate_snapshot_table(u64::from(kept)).is_err(),
            unreadable,
        }
    }

    /// [`Header::snapshot_table_fault`] of the table cut to its first 65536
    /// entries, as a full repair cuts it before it reads the table.
    pub fn snapshot_table_fault_within_limit(&self) -> SnapshotTableFault {
        let mut kept = self.clone();
        kept.nb_snapshots = kept.nb_snapshots.min(MAX_SNAPSHOTS);
        kept.snapshot_table_fault()
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        let cs = index(self.cluster_size());
        let ext_end = if self.backing_file_offset > 0 {
            index(self.backing_file_offset).min(cs)
        } else {
            cs
        };
        let limit = ext_end.min(buf.len());
        let mut at = self.header_length as usize;
        let mut seen_backing_fmt = false;
        loop {
            if at >= limit {
                break;
            }
            // As QEMU reads them: an extension header that does not fit, or whose
            // length runs past the limit, is refused, even the end marker; past
            // the end of a short file the bytes read as zeroes (the end marker).
            if at + 8 > ext_end {
                return Err(Error::invalid("Header extension too large"));
            }
            if at + 8 > limit {
                break;
            }
            let ty = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            at += 8;
            let end = at
                .checked_add(len)
                .filter(|&e| e <= limit)
                .ok_or_else(|| Error::invalid("Header extension too large"))?;
            if ty == ext::END {
                break;
            }
            let data = &buf[at..end];
            match ty {
                ext::BACKING_FORMAT => {
                    if seen_backing_fmt {
                        return Err(Error::invalid("duplicate backing format extension"));
                    }
                    seen_backing_fmt = true;
                    if data.len() > MAX_BACKING_FORMAT {
                        return Err(Error::invalid(format!(
                            "backing format name of {} bytes is too long (the limit is {MAX_BACKING_FORMAT})",
                            data.len()
                        )));
                    }
                    let s = std::str::from_utf8(data)
                        .map_err(|_| Error::invalid("backing format name is not UTF-8"))?;
                    self.backing_format = Some(s.trim_end_matches('\0').to_string());
                }
                ext::FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let name = &entry[2..];
                        let n = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                        self.feature_names.push(FeatureName {
                            kind: entry[0],
                            bit: entry[1],
                            name: String::from_utf8_lossy(&name[..n]).into_owned(),
                        });
                    }
                }
                ext::BITMAPS => {
                    if data.len() != 24 {
                        return Err(Error::invalid(format!(
                            "bitmaps extension has {} bytes, expected 24",
                            data.len()
                        )));
                    }
                    let b = BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    };
                    if self.autoclear_features & autoclear::BITMAPS != 0 {
                        if b.nb_bitmaps > 65535 {
                            return Err(Error::invalid(format!(
                                "too many persistent bitmaps ({}; the limit is 65535)",
                                b.nb_bitmaps
                            )));
                        }
                        if b.directory_size > 1024 * 65535 {
                            return Err(Error::invalid("bitmap directory too large"));
                        }
                        if !b.directory_offset.is_multiple_of(self.cluster_size()) {
                            return Err(Error::invalid(
                                "bitmap directory offset is not cluster-aligned",
                            ));
                        }
                    }
                    self.bitmaps = Some(b);
                }
                ext::CRYPTO => {
                    if self.crypt_method != crypt::LUKS {
                        return Err(Error::invalid(
                            "CRYPTO header extension only expected with LUKS encryption method",
                        ));
                    }
                    if data.len() != 16 {
                        return Err(Error::invalid(format!(
                            "CRYPTO header extension size {}, but expected size 16",
                            data.len()
                        )));
                    }
                    let c = CryptoExt {
                        offset: be64(data, 0),
                        length: be64(data, 8),
                    };
                    if !c.offset.is_multiple_of(self.cluster_size()) {
                        return Err(Error::invalid(format!(
                            "Encryption header offset '{}' is not a multiple of cluster size '{}'",
                            c.offset,
                            self.cluster_size()
                        )));
                    }
                    self.crypto = Some(c);
                }
                _ => self.unknown_extensions.push((ty, data.to_vec())),
            }
            at = end.checked_add(7).map(|e| e & !7).unwrap_or(usize::MAX);
        }
        if self.crypt_method == crypt::LUKS && self.crypto.is_none() {
            return Err(Error::invalid("Missing CRYPTO header for crypt method 2"));
        }
        // Now that names are known, refuse unknown incompatible features.
        let unknown = self.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "qcow2 feature(s): {}",
                self.feature_list(unknown)
            )));
        }
        Ok(())
    }

    /// The incompatible bits in `mask` as QEMU names them: the names the image's
    /// feature-name table gives (in its order, at most 46 characters each), then
    /// the bits it does not name as one hexadecimal mask.
    pub fn feature_list(&self, mask: u64) -> String {
        let mut rest = mask;
        let mut names = Vec::new();
        for f in self.feature_names.iter().filter(|f| f.kind == 0) {
            let bit = 1u64.checked_shl(u32::from(f.bit)).unwrap_or(0);
            if rest & bit != 0 {
                names.push(f.name.chars().take(46).collect::<String>());
                rest &= !bit;
            }
        }
        if rest != 0 {
            names.push(format!("Unknown incompatible feature: {rest:x}"));
        }
        names.join(", ")
    }

    fn parse_backing_name(&mut self, buf: &[u8]) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let len = u64::from(self.backing_file_size);
        // The offset is at most a cluster (checked first thing).
        if len > MAX_BACKING_NAME.min(self.cluster_size() - self.backing_file_offset) {
            return Err(Error::invalid("Backing file name too long"));
        }
        let end = self
            .backing_file_offset
            .checked_add(len)
            .filter(|&e| e <= self.cluster_size())
            .ok_or_else(|| Error::invalid("Backing file name is not inside the first cluster"))?;
        if index(end) > buf.len() {
            return Err(Error::invalid(
                "Backing file name lies past the end of the file",
            ));
        }
        let raw = &buf[index(self.backing_file_offset)..index(end)];
        if raw.contains(&0) {
            return Err(Error::invalid("Backing file name contains a NUL byte"));
        }
        if !raw.is_empty() {
            use std::os::unix::ffi::OsStringExt;
            self.backing_file = Some(std::ffi::OsString::from_vec(raw.to_vec()));
        }
        Ok(())
    }

    /// Serialise the whole header area: fixed fields, extensions, backing file name.
    /// Fails if it does not fit in the first cluster.
    pub fn serialize(&mut self) -> Result<Vec<u8>> {
        let cs = index(self.cluster_size());
        let mut out = Vec::with_capacity(512);
        let put32 = |o: &mut Vec<u8>, v: u32| o.extend_from_slice(&v.to_be_bytes());
        let put64 = |o: &mut Vec<u8>, v: u64| o.extend_from_slice(&v.to_be_bytes());
        put32(&mut out, MAGIC);
        put32(&mut out, self.version);
        put64(&mut out, 0); // backing offset, patched below
        put32(&mut out, 0); // backing size, patched below
        put32(&mut out, self.cluster_bits);
        put64(&mut out, self.size);
        put32(&mut out, self.crypt_method);
        put32(&mut out, self.l1_size);
        put64(&mut out, self.l1_table_offset);
        put64(&mut out, self.refcount_table_offset);
        put32(&mut out, self.refcount_table_clusters);
        put32(&mut out, self.nb_snapshots);
        put64(&mut out, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut out, self.incompatible_features);
            put64(&mut out, self.compatible_features);
            put64(&mut out, self.autoclear_features);
            put32(&mut out, self.refcount_order);
            put32(&mut out, self.header_length);
            if self.header_length > V3_HEADER_LEN {
                out.push(self.compression_type.as_byte());
                out.resize(self.header_length as usize, 0);
            }
        }
        // Every extension strata writes is a few hundred bytes at most (the
        // feature table, bitmap and backing-format records), far inside u32.
        let put_ext = |o: &mut Vec<u8>, ty: u32, data: &[u8]| {
            o.extend_from_slice(&ty.to_be_bytes());
            #[allow(clippy::cast_possible_truncation)] // see above
            o.extend_from_slice(&(data.len() as u32).to_be_bytes());
            o.extend_from_slice(data);
            while !o.len().is_multiple_of(8) {
                o.push(0);
            }
        };
        // The extensions in the order QEMU writes them (backing format, data
        // file, encryption, feature names, bitmaps, then the unknown ones as read),
        // so that a header both tools rewrite comes out the same bytes.
        if let Some(fmt) = &self.backing_format {
            put_ext(&mut out, ext::BACKING_FORMAT, fmt.as_bytes());
        }
        let (data_file, unknown): (Vec<_>, Vec<_>) = self
            .unknown_extensions
            .iter()
            .partition(|(ty, _)| *ty == ext::DATA_FILE);
        for (ty, data) in data_file {
            put_ext(&mut out, *ty, data);
        }
        if let Some(c) = self.crypto {
            let mut d = Vec::with_capacity(16);
            d.extend_from_slice(&c.offset.to_be_bytes());
            d.extend_from_slice(&c.length.to_be_bytes());
            put_ext(&mut out, ext::CRYPTO, &d);
        }
        // The feature-name table is informational, and QEMU's own, whatever
        // table the file held (as QEMU, only with clusters over 4 KiB); like
        // QEMU, leave it out when it would not fit in the first cluster with the
        // other extensions and the backing file name.
        let names = if self.version >= 3 && cs > 4096 {
            Header::default_feature_names()
        } else {
            Vec::new()
        };
        let name_len = self.backing_file.as_ref().map_or(0, |n| n.len());
        let later: usize = self.bitmaps.map_or(0, |_| 32)
            + unknown
                .iter()
                .map(|(_, d)| 8 + d.len().next_multiple_of(8))
                .sum::<usize>();
        let table_len = 8 + 48 * names.len();
        if !names.is_empty() && out.len() + table_len + later + 8 + name_len <= cs {
            let mut d = Vec::with_capacity(48 * names.len());
            for f in &names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                d.extend_from_slice(&e);
            }
            put_ext(&mut out, ext::FEATURE_TABLE, &d);
        }
        if let Some(b) = self.bitmaps {
            let mut d = Vec::with_capacity(24);
            d.extend_from_slice(&b.nb_bitmaps.to_be_bytes());
            d.extend_from_slice(&0u32.to_be_bytes());
            d.extend_from_slice(&b.directory_size.to_be_bytes());
            d.extend_from_slice(&b.directory_offset.to_be_bytes());
            put_ext(&mut out, ext::BITMAPS, &d);
        }
        for (ty, data) in unknown {
            put_ext(&mut out, *ty, data);
        }
        put_ext(&mut out, ext::END, &[]);
        if let Some(name) = &self.backing_file {
            if name.len() as u64 > MAX_BACKING_NAME {
                return Err(Error::invalid_argument(
                    "Backing file name too long (limit 1023 bytes)",
                ));
            }
            self.backing_file_offset = out.len() as u64;
            self.backing_file_size = header_u32(name.len() as u64, "backing file name length")?;
            out.extend_from_slice(name.as_bytes());
        } else {
            self.backing_file_offset = 0;
            self.backing_file_size = 0;
        }
        out[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        out[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        if out.len() > cs {
            return Err(Error::invalid_argument(
                "header, extensions and backing file name do not fit in the first cluster",
            ));
        }
        Ok(out)
    }

    /// The feature-name table QEMU writes into v3 images.
    pub fn default_feature_names() -> Vec<FeatureName> {
        let f = |kind, bit, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        };
        vec![
            f(0, 0, "dirty bit"),
            f(0, 1, "corrupt bit"),
            f(0, 2, "external data file"),
            f(0, 3, "compression type"),
            f(0, 4, "extended L2 entries"),
            f(1, 0, "lazy refcounts"),
            f(2, 0, "bitmaps"),
            f(2, 1, "raw external data"),
        ]
    }
}

/// The end of the furthest request QEMU's block layer accepts: `i64::MAX`
/// rounded down to its largest alignment (2^30).
const MAX_REQUEST_END: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// What is wrong with a snapshot table's place in the header (see
/// [`Header::snapshot_table_fault`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotTableFault {
    /// Entries past the limit of 65536.
    pub overhanging: u32,
    /// The offset is not cluster aligned, or the table would end past `i64::MAX`.
    pub offset_invalid: bool,
    /// The table (its entries read as empty, as they read past the end of the
    /// file) would end past the last byte QEMU's block layer lets a request
    /// reach, so reading it fails.
    pub unreadable: bool,
}

impl SnapshotTableFault {
    /// Whether nothing is wrong.
    pub fn is_none(&self) -> bool {
        self.overhanging == 0 && !self.offset_invalid && !self.unreadable
    }
}

/// QEMU's validation of a table of `entries` entries of `entry_len` bytes at
/// `offset`, with its words: more than `max_bytes` is "NAME too large"; an
/// offset off the cluster grid, or whose table would end past `i64::MAX`, is
/// "NAME offset invalid". Returns the table's length in bytes.
fn validate_table(
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
    what: &str,
) -> Result<u64> {
    if entries > max_bytes / entry_len {
        return Err(Error::invalid(format!("{what} too large")));
    }
    let len = entries * entry_len;
    if (i64::MAX as u64) - len < offset || !offset.is_multiple_of(cluster_size) {
        return Err(Error::invalid(format!("{what} offset invalid")));
    }
    Ok(len)
}

/// A table at `offset` of `len` bytes must be cluster-aligned, must not overflow, and
/// must start below 2^56. (QEMU lets tables extend past the end of the file; reads
/// there give zeroes. Offsets far past the end are still refused as implausible.)
pub fn check_table(
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_size: u64,
    what: &str,
) -> Result<()> {
    if !offset.is_multiple_of(cluster_size) {
        return Err(Error::invalid(format!(
            "{what} offset 0x{offset:x} is not cluster-aligned"
        )));
    }
    let end = offset
        .checked_add(len)
        .ok_or_else(|| Error::invalid(format!("{what} offset 0x{offset:x} + size overflows")))?;
    if end > MAX_HOST_OFFSET {
        return Err(Error::invalid(format!(
            "{what} at 0x{offset:x} lies beyond the 2^56 limit"
        )));
    }
    if offset == 0 {
        return Err(Error::invalid(format!("{what} overlaps the image header")));
    }
    if offset >= file_size.max(cluster_size) {
        return Err(Error::invalid(format!(
            "{what} at 0x{offset:x} starts past the end of the file ({file_size} bytes)"
        )));
    }
    Ok(())
}
