//! `cargo xtask demo`: placeholder, to be replaced by the real demo.

use clap::Args;

use crate::cargo::Binaries;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many requests to send to the ClusterIP in each phase.
    #[arg(long, default_value_t = 30)]
    pub requests: u32,
}

/// Runs the demo with the freshly built `weir-agent` and `weir` at `bins`.
pub fn run(args: &DemoArgs, bins: &Binaries) -> anyhow::Result<()> {
    let _ = (args, bins);
    anyhow::bail!("demo not written yet")
}
