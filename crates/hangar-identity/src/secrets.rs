//! Server secrets kept in the data folder (JWT signing key, API-key pepper): generated
//! once, written atomically with mode 0600, read back on every start.

use std::fs;
use std::path::Path;

use crate::error::{IdentityError, Result};

/// Read the secret at `path`, or generate `len` random bytes into it.
pub fn load_or_generate(path: &Path, len: usize) -> Result<Vec<u8>> {
    load_or_create_with(path, || {
        let mut buf = vec![0u8; len];
        aws_lc_rs::rand::fill(&mut buf).map_err(|_| IdentityError::Internal("no randomness".into()))?;
        Ok(buf)
    })
}

/// Read the file at `path`, or create it with what `make` returns.
pub fn load_or_create_with(path: &Path, make: impl FnOnce() -> Result<Vec<u8>>) -> Result<Vec<u8>> {
    match fs::read(path) {
        Ok(b) if !b.is_empty() => return Ok(b),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(IdentityError::Internal(format!("cannot read {}: {e}", path.display()))),
    }
    let bytes = make()?;
    write_private(path, &bytes)?;
    Ok(bytes)
}

/// Write a file readable only by its owner: temp file, fsync, rename, fsync the folder.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    hangar_store::sealed::write_private(path, bytes)
        .map_err(|e| IdentityError::Internal(format!("cannot write {}: {e}", path.display())))
}
