//! Weir's developer tasks, run as `cargo xtask <command>` (an alias in
//! `.cargo/config.toml`). Every command installs what it needs first
//! (`setup`), so a fresh clone on a bare machine needs nothing by hand.

mod bench;
mod cargo;
mod cmd;
mod demo;
mod setup;
mod test;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::cargo::Workspace;
use crate::setup::Verbosity;

#[derive(Debug, Parser)]
#[command(name = "cargo-xtask", bin_name = "cargo xtask", about = "Weir's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what this machine lacks: Debian packages, nightly rust-src,
    /// bpf-linker (idempotent).
    Setup,
    /// Set up, then build `weir-agent` and `weir`.
    Build {
        /// Build with the release profile (into target/release).
        #[arg(long)]
        release: bool,
    },
    /// Set up, run the unit tests, build, then run the privileged
    /// integration tests (needs root).
    Test(test::TestArgs),
    /// Set up, build, then show Weir balancing a ClusterIP between pods in
    /// network namespaces (needs root).
    Demo(demo::DemoArgs),
    /// Set up, build (release), then benchmark Weir against direct pod-IP
    /// traffic and kube-proxy's iptables and nftables rulesets; writes
    /// docs/BENCHMARKS.md and its plots (needs root).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Setup => setup::run(Verbosity::Normal),
        Command::Build { release } => {
            setup::run(Verbosity::Quiet)?;
            Workspace::discover()?.build_binaries(release)?;
            Ok(())
        }
        Command::Test(args) => {
            setup::run(Verbosity::Quiet)?;
            test::run(&Workspace::discover()?, &args)
        }
        Command::Demo(args) => {
            setup::run(Verbosity::Quiet)?;
            let bins = Workspace::discover()?.build_binaries(false)?;
            cmd::require_root("the demo (it creates network namespaces and loads eBPF programs)")?;
            demo::run(&args, &bins)
        }
        Command::Bench(args) => {
            setup::run(Verbosity::Quiet)?;
            bench::run(&args, &Workspace::discover()?)
        }
    }
}
