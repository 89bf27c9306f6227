//! weir: inspect Weir's datapath from its pinned maps. Works with the agent
//! stopped, like `cilium bpf lb list` and `cilium bpf ct list global`.

mod ct;
mod lb;
mod maps;
mod metrics;
mod output;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::output::Format;

#[derive(Debug, Parser)]
#[command(name = "weir", version, about = "Inspect Weir's eBPF datapath")]
struct Cli {
    /// The agent's bpffs root (its --bpffs-root).
    #[arg(
        long,
        global = true,
        default_value = "/sys/fs/bpf/weir",
        env = "WEIR_BPFFS_ROOT"
    )]
    bpffs_root: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Service load-balancer maps.
    Lb {
        #[command(subcommand)]
        command: ListOnly,
    },
    /// Connection tracking table.
    Ct {
        #[command(subcommand)]
        command: ListOnly,
    },
    /// Datapath counters by reason (forwarding events and drops).
    Metrics {
        #[command(subcommand)]
        command: ListOnly,
    },
}

#[derive(Debug, Subcommand)]
enum ListOnly {
    /// List all entries.
    List,
}

fn main() -> ExitCode {
    // Die quietly when the reader of our output goes away (`weir ct list | head`).
    // SAFETY: setting a signal disposition before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lb {
            command: ListOnly::List,
        } => lb::list(&cli.bpffs_root, cli.output),
        Command::Ct {
            command: ListOnly::List,
        } => ct::list(&cli.bpffs_root, cli.output),
        Command::Metrics {
            command: ListOnly::List,
        } => metrics::list(&cli.bpffs_root, cli.output),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("weir: {err:#}");
            ExitCode::FAILURE
        }
    }
}
