//! The workspace (root and target directory, from `cargo metadata`) and the
//! cargo invocations that build Weir's binaries.

use std::env;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, ensure};
use serde::Deserialize;

use crate::cmd;

/// The cargo workspace xtask belongs to.
#[derive(Debug)]
pub struct Workspace {
    /// The directory holding the workspace's `Cargo.toml`.
    pub root: PathBuf,
    /// Where cargo puts build output (honours `CARGO_TARGET_DIR` and config).
    pub target_dir: PathBuf,
}

/// Paths of the built binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `weir-agent`.
    pub agent: PathBuf,
    /// `weir` (the CLI).
    pub cli: PathBuf,
}

#[derive(Deserialize)]
struct Metadata {
    workspace_root: PathBuf,
    target_directory: PathBuf,
}

impl Workspace {
    /// Asks cargo where the workspace and its target directory are.
    pub fn discover() -> Result<Self> {
        // xtask always lives one level below the workspace root.
        let start = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let json =
            cmd::stdout(cargo().args(["metadata", "--format-version", "1", "--no-deps"]).current_dir(&start))
                .context("could not read the workspace's metadata")?;
        let meta: Metadata =
            serde_json::from_str(&json).context("could not parse `cargo metadata` output")?;
        Ok(Self { root: meta.workspace_root, target_dir: meta.target_directory })
    }

    /// A cargo command that runs in the workspace root.
    pub fn cargo(&self) -> Command {
        let mut cmd = cargo();
        cmd.current_dir(&self.root);
        cmd
    }

    /// Builds `weir-agent` and `weir` (debug, or release) and returns their
    /// absolute paths.
    pub fn build_binaries(&self, release: bool) -> Result<Binaries> {
        let mut build = self.cargo();
        build.args(["build", "-p", "weir-agent", "-p", "weir-cli"]);
        if release {
            build.arg("--release");
        }
        cmd::run(&mut build).context("building the agent and the CLI failed")?;
        let dir = self.target_dir.join(if release { "release" } else { "debug" });
        let bins = Binaries { agent: dir.join("weir-agent"), cli: dir.join("weir") };
        for bin in [&bins.agent, &bins.cli] {
            ensure!(bin.is_file(), "cargo built, but {} is missing", bin.display());
        }
        Ok(bins)
    }
}

/// The cargo that runs xtask (cargo sets `$CARGO` for `cargo run`), or
/// `cargo` from `PATH`.
pub fn cargo() -> Command {
    cmd::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}
