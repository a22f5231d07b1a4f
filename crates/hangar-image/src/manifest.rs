//! The image manifest: what files an image has and which chunks make them.
//!
//! JSON, self-checking: `manifest_hash` is the blake3 of the manifest
//! serialised with `manifest_hash` absent. Field order is fixed by the
//! structs, entries are sorted by path, so the same image always gives the
//! same manifest bytes.

use serde::{Deserialize, Serialize};

use crate::ImageError;

/// Name in the `format` field.
pub const FORMAT_NAME: &str = "hangar-image";
/// Format version 1: every chunk is its own object under [`CHUNK_PREFIX`].
pub const FORMAT_VERSION: u32 = 1;
/// Format version 2: chunks are packed into pack objects under [`PACK_PREFIX`];
/// each data chunk names its pack and offset.
pub const FORMAT_VERSION_PACKED: u32 = 2;
/// Store folder of the chunks: chunk `h` is at `chunks/<h>`.
pub const CHUNK_PREFIX: &str = "chunks";
/// Store folder of the packs: pack `p` is at `packs/<p>`.
pub const PACK_PREFIX: &str = "packs";
/// Store folder of the pack indexes: the index of pack `p` is at `packidx/<p>`.
pub const INDEX_PREFIX: &str = "packidx";
/// Largest chunk length a manifest may declare (a guard against a manifest
/// that would make us allocate without bound).
pub const MAX_CHUNK_LEN: u64 = 64 * 1024 * 1024;

/// Store key of the chunk with this hash.
pub fn chunk_key(hash: &str) -> String {
    format!("{CHUNK_PREFIX}/{hash}")
}

/// Store key of the pack with this id.
pub fn pack_key(id: &str) -> String {
    format!("{PACK_PREFIX}/{id}")
}

/// Store key of the index of the pack with this id.
pub fn index_key(id: &str) -> String {
    format!("{INDEX_PREFIX}/{id}")
}

/// True for 64 lower-case hex digits (a blake3 name).
pub fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Content-defined chunking parameters (FastCDC 2020, normalisation level 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkParams {
    /// Minimum chunk length in bytes.
    pub min: u32,
    /// Target average chunk length in bytes.
    pub avg: u32,
    /// Maximum chunk length in bytes.
    pub max: u32,
}

impl Default for ChunkParams {
    /// 256 KiB / 1 MiB / 4 MiB. One MiB on average keeps the cost of a
    /// small guest write (it re-uploads about one average chunk on each side
    /// of the change) low, while a 100 GiB image still has only about 100k
    /// chunks; 4 MiB bounds the memory a transfer holds per chunk in flight.
    fn default() -> Self {
        ChunkParams { min: 256 * 1024, avg: 1024 * 1024, max: 4 * 1024 * 1024 }
    }
}

impl ChunkParams {
    /// The packed format's chunks: 16 KiB / 64 KiB / 256 KiB. Guest file
    /// systems change in 4 KiB blocks scattered over extents; a change costs
    /// about one average chunk around it, and packs keep the object count
    /// and request rate of such small chunks sane.
    pub fn packed() -> Self {
        ChunkParams { min: 16 * 1024, avg: 64 * 1024, max: 256 * 1024 }
    }
}

/// One pack an image uses (format 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRef {
    /// The pack's name: blake3 of its bytes and a random salt (64 hex digits);
    /// the pack is at [`pack_key`].
    pub id: String,
    /// Size of the pack object.
    pub size: u64,
}

/// One chunk in a pack index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// blake3 of the uncompressed bytes.
    pub hash: String,
    /// Offset of the stored (zstd) bytes in the pack.
    pub at: u64,
    /// Length of the stored bytes.
    pub stored: u64,
    /// Uncompressed length.
    pub length: u64,
}

/// The index of one pack, stored at [`index_key`] after the pack itself:
/// a pack without an index is an unfinished upload, never used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackIndex {
    /// The pack's id.
    pub pack: String,
    /// The pack's size.
    pub size: u64,
    /// Its chunks, by offset.
    pub chunks: Vec<IndexEntry>,
}

impl PackIndex {
    /// Parses and checks an index: entries inside the pack, in order, not overlapping.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ImageError> {
        let idx: PackIndex =
            serde_json::from_slice(bytes).map_err(|e| ImageError::Manifest(format!("not a pack index: {e}")))?;
        if !is_hash(&idx.pack) {
            return Err(ImageError::Manifest(format!("pack index names a bad pack {:?}", idx.pack)));
        }
        let mut end = 0u64;
        for c in &idx.chunks {
            if !is_hash(&c.hash) || c.at < end || c.stored == 0 || c.length > MAX_CHUNK_LEN {
                return Err(ImageError::Manifest(format!("pack index of {} is inconsistent at {}", idx.pack, c.at)));
            }
            end = c.at.saturating_add(c.stored);
        }
        if end > idx.size {
            return Err(ImageError::Manifest(format!("pack index of {} runs past the pack", idx.pack)));
        }
        Ok(idx)
    }
}

/// One piece of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChunkRef {
    /// Stored bytes: the chunk `hash` (blake3 of the uncompressed bytes).
    Data {
        /// Offset in the file.
        offset: u64,
        /// Uncompressed length.
        length: u64,
        /// Lower-case hex blake3 of the uncompressed bytes.
        hash: String,
        /// Size of the stored (zstd) bytes.
        stored: u64,
        /// Format 2: index of the pack in [`Manifest::packs`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pack: Option<u32>,
        /// Format 2: offset of the stored bytes in that pack.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<u64>,
    },
    /// All zeros, not stored; restored as a sparse region.
    Hole {
        /// Offset in the file.
        offset: u64,
        /// Length of the zero run.
        length: u64,
    },
}

impl ChunkRef {
    /// Offset in the file.
    pub fn offset(&self) -> u64 {
        match self {
            ChunkRef::Data { offset, .. } | ChunkRef::Hole { offset, .. } => *offset,
        }
    }
    /// Length in the file.
    pub fn length(&self) -> u64 {
        match self {
            ChunkRef::Data { length, .. } | ChunkRef::Hole { length, .. } => *length,
        }
    }
}

/// One entry of the image folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    /// A folder.
    Dir {
        /// Relative path, `/`-separated.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Relative path, `/`-separated.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Length in bytes.
        size: u64,
        /// Pieces covering `0..size` in order.
        chunks: Vec<ChunkRef>,
    },
    /// A symbolic link (its target is kept as is).
    Symlink {
        /// Relative path, `/`-separated.
        path: String,
        /// Link target.
        target: String,
    },
}

impl Entry {
    /// The entry's relative path.
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. } | Entry::File { path, .. } | Entry::Symlink { path, .. } => path,
        }
    }
}

/// A whole image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// Chunking used (informative: pulling does not depend on it).
    pub chunking: ChunkParams,
    /// Chunk compression: `zstd`.
    pub compression: String,
    /// Chunk hash: `blake3`.
    pub hash: String,
    /// Entries, sorted by path.
    pub entries: Vec<Entry>,
    /// Sum of file sizes.
    pub total_size: u64,
    /// Bytes of all-zero runs stored as holes.
    pub hole_size: u64,
    /// Number of distinct chunks.
    pub unique_chunks: u64,
    /// Sum of the stored sizes of the distinct chunks.
    pub stored_size: u64,
    /// Format 2: the packs holding the image's chunks, sorted by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<PackRef>,
    /// blake3 of the manifest serialised without this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_hash: Option<String>,
}

impl Manifest {
    /// Serialises the manifest, filling in `manifest_hash`.
    pub fn to_json(&self) -> Result<Vec<u8>, ImageError> {
        let mut m = self.clone();
        m.manifest_hash = None;
        let body = serde_json::to_vec(&m).map_err(|e| ImageError::Manifest(e.to_string()))?;
        m.manifest_hash = Some(blake3::hash(&body).to_hex().to_string());
        // Format 2 has many small chunks: compact JSON (the hash is of the compact form either way).
        if m.is_packed() {
            serde_json::to_vec(&m).map_err(|e| ImageError::Manifest(e.to_string()))
        } else {
            serde_json::to_vec_pretty(&m).map_err(|e| ImageError::Manifest(e.to_string()))
        }
    }

    /// Parses, checks the hash and validates a manifest.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ImageError> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ImageError::Manifest(format!("not a manifest: {e}")))?;
        let claimed = m.manifest_hash.clone().ok_or_else(|| ImageError::Manifest("manifest_hash missing".into()))?;
        let mut bare = m.clone();
        bare.manifest_hash = None;
        let body = serde_json::to_vec(&bare).map_err(|e| ImageError::Manifest(e.to_string()))?;
        let actual = blake3::hash(&body).to_hex().to_string();
        if actual != claimed {
            return Err(ImageError::Manifest(format!(
                "manifest hash mismatch: says {claimed}, content hashes to {actual}"
            )));
        }
        m.validate()?;
        Ok(m)
    }

    /// Checks the structure: format, safe unique paths, chunks covering each
    /// file exactly, sane lengths and hashes.
    pub fn validate(&self) -> Result<(), ImageError> {
        let bad = |msg: String| Err(ImageError::Manifest(msg));
        if self.format != FORMAT_NAME {
            return bad(format!("format {:?} is not {FORMAT_NAME}", self.format));
        }
        let packed = match self.format_version {
            FORMAT_VERSION => false,
            FORMAT_VERSION_PACKED => true,
            v => return bad(format!("format version {v} is not supported")),
        };
        if !packed && !self.packs.is_empty() {
            return bad("a format 1 manifest names packs".into());
        }
        for p in &self.packs {
            if !is_hash(&p.id) {
                return bad(format!("bad pack id {:?}", p.id));
            }
        }
        if self.compression != "zstd" || self.hash != "blake3" {
            return bad(format!("unsupported compression/hash {}/{}", self.compression, self.hash));
        }
        let mut previous: Option<&str> = None;
        for e in &self.entries {
            let path = e.path();
            validate_path(path)?;
            if let Some(p) = previous
                && p >= path
            {
                return bad(format!("entries not sorted or duplicated at {path:?}"));
            }
            previous = Some(path);
            if let Entry::File { size, chunks, .. } = e {
                let mut at = 0u64;
                for c in chunks {
                    if c.offset() != at || c.length() == 0 {
                        return bad(format!("{path}: chunk at {} does not follow {at}", c.offset()));
                    }
                    if let ChunkRef::Data { hash, length, stored, pack, at: pack_at, .. } = c {
                        if *length > MAX_CHUNK_LEN {
                            return bad(format!("{path}: chunk of {length} bytes is too long"));
                        }
                        if !is_hash(hash) {
                            return bad(format!("{path}: bad chunk hash {hash:?}"));
                        }
                        match (packed, pack, pack_at) {
                            (false, None, None) => {}
                            (true, Some(i), Some(a)) => {
                                let p = self.packs.get(*i as usize);
                                if p.is_none_or(|p| a.checked_add(*stored).is_none_or(|end| end > p.size)) {
                                    return bad(format!("{path}: chunk {hash} lies outside its pack"));
                                }
                            }
                            _ => return bad(format!("{path}: chunk {hash} has no place in the format's layout")),
                        }
                    }
                    at = at
                        .checked_add(c.length())
                        .ok_or_else(|| ImageError::Manifest(format!("{path}: size overflow")))?;
                }
                if at != *size {
                    return bad(format!("{path}: chunks cover {at} bytes of {size}"));
                }
            }
        }
        Ok(())
    }

    /// True for the packed format (version 2).
    pub fn is_packed(&self) -> bool {
        self.format_version == FORMAT_VERSION_PACKED
    }

    /// Store keys of the objects that hold this image's chunks: its chunk
    /// objects (format 1), or its packs and their indexes (format 2).
    pub fn object_keys(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        if self.is_packed() {
            for p in &self.packs {
                out.insert(pack_key(&p.id));
                out.insert(index_key(&p.id));
            }
        } else {
            for (_, _, chunks) in self.files() {
                for c in chunks {
                    if let ChunkRef::Data { hash, .. } = c {
                        out.insert(chunk_key(hash));
                    }
                }
            }
        }
        out
    }

    /// The regular files, with their index in `entries`.
    pub fn files(&self) -> impl Iterator<Item = (&str, u64, &[ChunkRef])> {
        self.entries.iter().filter_map(|e| match e {
            Entry::File { path, size, chunks, .. } => Some((path.as_str(), *size, chunks.as_slice())),
            _ => None,
        })
    }
}

/// A relative path is safe: non-empty `/`-separated components, none empty,
/// `.` or `..`, no NUL.
pub fn validate_path(path: &str) -> Result<(), ImageError> {
    let ok =
        !path.is_empty() && !path.contains('\0') && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if ok { Ok(()) } else { Err(ImageError::Manifest(format!("unsafe path {path:?}"))) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            chunking: ChunkParams::default(),
            compression: "zstd".into(),
            hash: "blake3".into(),
            entries: vec![
                Entry::Dir { path: "a".into(), mode: 0o755 },
                Entry::File {
                    path: "a/f".into(),
                    mode: 0o644,
                    size: 30,
                    chunks: vec![
                        ChunkRef::Data { offset: 0, length: 10, hash: "0".repeat(64), stored: 5, pack: None, at: None },
                        ChunkRef::Hole { offset: 10, length: 20 },
                    ],
                },
                Entry::Symlink { path: "b".into(), target: "a/f".into() },
            ],
            total_size: 30,
            hole_size: 20,
            unique_chunks: 1,
            stored_size: 5,
            packs: Vec::new(),
            manifest_hash: None,
        }
    }

    #[test]
    fn round_trips_and_detects_tampering() {
        let json = sample().to_json().unwrap();
        let back = Manifest::from_json(&json).unwrap();
        assert_eq!(back.entries, sample().entries);
        let tampered = String::from_utf8(json).unwrap().replace("\"size\": 30", "\"size\": 31");
        let err = Manifest::from_json(tampered.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("hash mismatch"), "{err}");
    }

    #[test]
    fn rejects_unsafe_or_inconsistent_manifests() {
        let mut m = sample();
        m.entries.push(Entry::Dir { path: "../escape".into(), mode: 0o755 });
        assert!(m.validate().is_err());
        let mut m = sample();
        if let Entry::File { size, .. } = &mut m.entries[1] {
            *size = 40;
        }
        assert!(m.validate().unwrap_err().to_string().contains("cover"));
        let mut m = sample();
        m.entries.swap(0, 2);
        assert!(m.validate().is_err());
    }

    #[test]
    fn packed_manifests_place_every_chunk_in_a_pack() {
        let mut m = sample();
        m.format_version = FORMAT_VERSION_PACKED;
        assert!(m.validate().is_err(), "a packed manifest with a chunk in no pack");
        m.packs.push(PackRef { id: "1".repeat(64), size: 100 });
        if let Entry::File { chunks, .. } = &mut m.entries[1]
            && let ChunkRef::Data { pack, at, .. } = &mut chunks[0]
        {
            *pack = Some(0);
            *at = Some(95);
        }
        m.validate().unwrap();
        let json = m.to_json().unwrap();
        let back = Manifest::from_json(&json).unwrap();
        assert_eq!((back.packs, back.entries), (m.packs.clone(), m.entries.clone()));
        assert_eq!(
            m.object_keys().into_iter().collect::<Vec<_>>(),
            vec![index_key(&"1".repeat(64)), pack_key(&"1".repeat(64))]
        );
        if let Entry::File { chunks, .. } = &mut m.entries[1]
            && let ChunkRef::Data { at, .. } = &mut chunks[0]
        {
            *at = Some(96);
        }
        assert!(m.validate().unwrap_err().to_string().contains("outside its pack"));
        // A format 1 manifest's JSON is unchanged by the new optional fields.
        let v1 = String::from_utf8(sample().to_json().unwrap()).unwrap();
        assert!(!v1.contains("packs") && !v1.contains("\"at\""), "{v1}");
    }
}
