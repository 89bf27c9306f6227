//! Where the agent reads Kubernetes objects from.

pub mod dir;
pub mod validate;

use std::path::PathBuf;

use crate::cluster::Cluster;

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

/// A running source of cluster state.
pub enum Source {
    Dir(dir::DirSource),
}

impl Source {
    pub fn start(spec: &SourceSpec) -> anyhow::Result<Self> {
        match spec {
            SourceSpec::Dir(path) => Ok(Self::Dir(dir::DirSource::new(path.clone()))),
        }
    }

    /// Waits until the cluster state is complete and differs from the last
    /// one returned, and returns all of it. The first call returns once the
    /// source has been read in full: the agent removes nothing before that.
    /// Cancel-safe, so it can sit in a `select!`.
    pub async fn changed(&mut self) -> anyhow::Result<Cluster> {
        match self {
            Self::Dir(dir) => dir.changed().await,
        }
    }
}
