//! Where the agent reads Kubernetes objects from.

pub mod dir;
pub mod validate;

use std::path::PathBuf;

/// `--source`: `dir:PATH` reads manifests from a directory.
#[derive(Clone, Debug)]
pub enum SourceSpec {
    Dir(PathBuf),
}

impl std::str::FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(Self::Dir(PathBuf::from(path))),
            _ => Err(format!("unknown source {s:?}: expected dir:PATH")),
        }
    }
}
