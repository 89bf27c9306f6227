//! Where the agent reads Kubernetes objects from.

pub mod dir;
pub mod kube;
pub mod validate;

use std::{path::PathBuf, sync::Arc};

use crate::{cluster::Cluster, health::Health, metrics::Metrics};

/// `--source`: `dir:PATH` reads manifests from a directory; `kube` watches
/// the Kubernetes API server (see [`kube::KubeOptions`] for how it is found).
#[derive(Clone, Debug)]
pub enum SourceSpec {
    Dir(PathBuf),
    Kube,
}

impl std::str::FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(Self::Dir(PathBuf::from(path))),
            None if s == "kube" => Ok(Self::Kube),
            _ => Err(format!("unknown source {s:?}: expected dir:PATH or kube")),
        }
    }
}

/// A running source of cluster state.
pub enum Source {
    Dir(dir::DirSource),
    Kube(Box<kube::KubeSource>),
}

impl Source {
    pub async fn start(
        spec: &SourceSpec,
        kube_options: &kube::KubeOptions,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> anyhow::Result<Self> {
        match spec {
            SourceSpec::Dir(path) => Ok(Self::Dir(dir::DirSource::new(path.clone()))),
            SourceSpec::Kube => {
                Ok(Self::Kube(Box::new(kube::KubeSource::start(kube_options, metrics, health).await?)))
            }
        }
    }

    /// Waits until the cluster state is complete and differs from the last
    /// one returned, and returns all of it. The first call returns once the
    /// source has been read in full: the agent removes nothing before that.
    /// Cancel-safe, so it can sit in a `select!`.
    pub async fn changed(&mut self) -> anyhow::Result<Cluster> {
        match self {
            Self::Dir(dir) => dir.changed().await,
            Self::Kube(kube) => kube.changed().await,
        }
    }

    /// The state last returned by [`Source::changed`] is in the maps.
    pub fn programmed(&mut self) {
        match self {
            Self::Dir(_) => {}
            Self::Kube(kube) => kube.programmed(),
        }
    }
}
