//! A temporary directory removed when its guard drops.
//!
//! Small enough not to be worth a dependency; named with [`crate::names`] so a
//! directory left by a crashed run is easy to attribute.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A directory under the system temp dir, removed recursively on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/<prefix><pid>-<n>`.
    pub fn new(prefix: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(crate::names::unique(prefix));
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("weir-tests: cannot remove {}: {e}", self.path.display());
        }
    }
}
