//! The gRPC API Weir's agent serves and its CLI calls: Hubble's `observer`,
//! `flow` and `relay` packages (the subset Weir implements, wire-compatible
//! with Hubble) and `grpc.health.v1`. Generated at build time from `proto/`
//! by protox and tonic-prost-build.

#![allow(clippy::all, missing_docs)]

/// Hubble's `flow` package: `Flow`, `FlowFilter`, `LostEvent`, ...
pub mod flow {
    tonic::include_proto!("flow");
}

/// Hubble's `relay` package (node status events).
pub mod relay {
    tonic::include_proto!("relay");
}

/// Hubble's `observer` package: the `Observer` service.
pub mod observer {
    tonic::include_proto!("observer");
}

/// The standard gRPC health-checking service.
pub mod health {
    tonic::include_proto!("grpc.health.v1");
}

/// The name `hubble status` health-checks.
pub const OBSERVER_HEALTH_SERVICE: &str = "hubble.server.Observer";

/// Where the agent with bpffs root `bpffs_root` serves the Observer API on a
/// unix socket unless told otherwise: `/run/weir/<root's last component>/hubble.sock`
/// (`/run/weir/weir/hubble.sock` for the default root `/sys/fs/bpf/weir`).
/// One directory per root, so agents of several simulated nodes on one
/// machine do not collide; the CLI derives the same path from its
/// `--bpffs-root`.
pub fn default_socket_path(bpffs_root: &std::path::Path) -> std::path::PathBuf {
    let name = bpffs_root.file_name().map_or_else(|| "weir".into(), |n| n.to_string_lossy().into_owned());
    std::path::Path::new("/run/weir").join(name).join("hubble.sock")
}
