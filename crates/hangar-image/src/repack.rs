//! Converting an image of format 1 (one object per chunk) to the packed
//! format 2 in place.

use std::path::Path;
use std::sync::Arc;

use hangar_blobstore::BlobStore;
use tracing::info;

use crate::manifest::{ChunkRef, Manifest, chunk_key};
use crate::{ImageFormat, PullOptions, PushOptions, PushReport, Result, pull, push};

/// Converts the image whose manifest is at `manifest_key` to the packed
/// format: pulls it into a temp folder under `work_dir` (through
/// `pull_opts`' cache, if any), pushes it back packed with `push_opts`
/// (its manifest replaces the old one at the same key, last), and removes
/// the temp folder. Answers the old manifest and the push's report, or
/// `None` when the image is packed already. The old chunk objects stay:
/// [`delete_unused_chunks`] removes those no other image needs.
pub async fn repack(
    store: Arc<dyn BlobStore>,
    manifest_key: &str,
    work_dir: &Path,
    pull_opts: &PullOptions,
    push_opts: &PushOptions,
) -> Result<Option<(Manifest, PushReport)>> {
    let old = Manifest::from_json(&store.get(manifest_key).await?)?;
    if old.is_packed() {
        return Ok(None);
    }
    std::fs::create_dir_all(work_dir).map_err(crate::io_err("create", work_dir))?;
    let tmp = tempdir_in(work_dir)?;
    let image = tmp.0.join("image");
    let pulled = pull(store.clone(), manifest_key, &image, pull_opts).await;
    let result = match pulled {
        Ok(_) => {
            let opts = PushOptions { format: ImageFormat::Packed, ..push_opts.clone() };
            push(store, &image, manifest_key, &opts).await
        }
        Err(e) => Err(e),
    };
    drop(tmp);
    let report = result?;
    info!(manifest_key, packs = report.packs_uploaded, "image repacked");
    Ok(Some((old, report)))
}

/// A folder removed when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir_in(dir: &Path) -> Result<TempDir> {
    let p = dir.join(format!(".repack-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&p).map_err(crate::io_err("create", &p))?;
    Ok(TempDir(p))
}

/// Deletes the chunk objects (format 1) of `old` that no manifest of `keep`
/// uses. Returns how many were deleted.
pub async fn delete_unused_chunks(store: &dyn BlobStore, old: &Manifest, keep: &[Manifest]) -> Result<u64> {
    if old.is_packed() {
        return Ok(0);
    }
    let used: std::collections::HashSet<String> = keep.iter().flat_map(Manifest::object_keys).collect();
    let mut deleted = 0;
    let mut seen = std::collections::HashSet::new();
    for (_, _, chunks) in old.files() {
        for c in chunks {
            if let ChunkRef::Data { hash, .. } = c {
                let key = chunk_key(hash);
                if !used.contains(&key) && seen.insert(key.clone()) {
                    store.delete(&key).await?;
                    deleted += 1;
                }
            }
        }
    }
    Ok(deleted)
}
