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
/// Current format version.
pub const FORMAT_VERSION: u32 = 1;
/// Store folder of the chunks: chunk `h` is at `chunks/<h>`.
pub const CHUNK_PREFIX: &str = "chunks";
/// Largest chunk length a manifest may declare (a guard against a manifest
/// that would make us allocate without bound).
pub const MAX_CHUNK_LEN: u64 = 64 * 1024 * 1024;

/// Store key of the chunk with this hash.
pub fn chunk_key(hash: &str) -> String {
    format!("{CHUNK_PREFIX}/{hash}")
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
        /// Size of the stored (zstd) object.
        stored: u64,
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
        serde_json::to_vec_pretty(&m).map_err(|e| ImageError::Manifest(e.to_string()))
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
        if self.format_version != FORMAT_VERSION {
            return bad(format!("format version {} is not supported", self.format_version));
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
                    if let ChunkRef::Data { hash, length, .. } = c {
                        if *length > MAX_CHUNK_LEN {
                            return bad(format!("{path}: chunk of {length} bytes is too long"));
                        }
                        if hash.len() != 64 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                            return bad(format!("{path}: bad chunk hash {hash:?}"));
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
                        ChunkRef::Data { offset: 0, length: 10, hash: "0".repeat(64), stored: 5 },
                        ChunkRef::Hole { offset: 10, length: 20 },
                    ],
                },
                Entry::Symlink { path: "b".into(), target: "a/f".into() },
            ],
            total_size: 30,
            hole_size: 20,
            unique_chunks: 1,
            stored_size: 5,
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
}
