//! weir: inspect Weir's datapath from its pinned maps. Works with the agent
//! stopped, like `cilium bpf lb list` and `cilium bpf ct list global`.

mod ct;
mod lb;
mod maps;
mod metrics;
mod observe;
mod output;
mod policy;
mod statefile;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::output::Format;

#[derive(Debug, Parser)]
#[command(name = "weir", version, about = "Inspect Weir's eBPF datapath")]
struct Cli {
    /// The agent's bpffs root (its --bpffs-root).
    #[arg(long, global = true, default_value = "/sys/fs/bpf/weir", env = "WEIR_BPFFS_ROOT")]
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
    /// SNAT translations of north-south connections to remote backends.
    Nat {
        #[command(subcommand)]
        command: ListOnly,
    },
    /// Datapath counters by reason (forwarding events and drops).
    Metrics {
        #[command(subcommand)]
        command: ListOnly,
    },
    /// NetworkPolicy entries per local endpoint.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The ipcache: CIDR → security identity.
    Ipcache {
        #[command(subcommand)]
        command: ListOnly,
    },
    /// Security identities: identity → namespace and labels.
    Identity {
        #[command(subcommand)]
        command: ListOnly,
    },
    /// Observe flows through the running agent, like `hubble observe` (see `weir observe --help`).
    #[command(disable_help_flag = true)]
    Observe {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Show what each endpoint allows, and why (like `cilium bpf policy get`).
    Get {
        /// NAMESPACE/POD or pod IP; all local endpoints when absent.
        endpoint: Option<String>,
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
    // `weir observe` has hubble's flags (its own -o); it is parsed apart.
    if let Some(code) = observe::dispatch() {
        return code;
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lb { command: ListOnly::List } => lb::list(&cli.bpffs_root, cli.output),
        Command::Ct { command: ListOnly::List } => ct::list(&cli.bpffs_root, cli.output),
        Command::Nat { command: ListOnly::List } => ct::nat_list(&cli.bpffs_root, cli.output),
        Command::Metrics { command: ListOnly::List } => metrics::list(&cli.bpffs_root, cli.output),
        Command::Policy { command: PolicyCommand::Get { endpoint } } => {
            policy::get(&cli.bpffs_root, endpoint.as_deref(), cli.output)
        }
        Command::Ipcache { command: ListOnly::List } => policy::ipcache_list(&cli.bpffs_root, cli.output),
        Command::Identity { command: ListOnly::List } => policy::identity_list(&cli.bpffs_root, cli.output),
        Command::Observe { .. } => Err(anyhow::anyhow!("put global flags before `observe`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("weir: {err:#}");
            ExitCode::FAILURE
        }
    }
}
