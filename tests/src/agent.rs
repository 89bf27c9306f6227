//! Running `weir-agent` for one test: a per-test bpffs root, a captured log,
//! SIGKILL on drop, and an explicit kill/restart for the restart test.
//!
//! The agent is started directly (never through `ip netns exec`, which would
//! remount /sys and hide the bpffs): it enters the node namespace itself with
//! `--netns`. Each test gets its own `--bpffs-root` (`/sys/fs/bpf/<prefix><pid>-<n>`),
//! so agents of parallel tests never share a map, and the guard removes that
//! directory (maps, links, sub-directories) when it drops.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cli::{Cli, wait_until};
use crate::manifests::ManifestDir;
use crate::names;
use crate::tempdir::TempDir;
use crate::topology::Node;

/// Where the tests put their bpffs roots (the agent mounts a bpffs here when
/// none is mounted).
pub const BPFFS: &str = "/sys/fs/bpf";

/// How to start an agent, beyond the node and the manifest directory.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Prefix of the bpffs root and log directory names (`weir-t` in tests,
    /// `weir-demo` in the demo).
    pub prefix: String,
    /// Extra command-line arguments, e.g. `["--map-size-services", "65536"]`.
    pub extra_args: Vec<String>,
    /// The `--source` argument (e.g. `kube`, with `--kubeconfig` in
    /// `extra_args`); `None` means `dir:<the manifest directory>`.
    pub source: Option<String>,
}

impl Default for AgentOptions {
    fn default() -> AgentOptions {
        AgentOptions { prefix: names::TEST_PREFIX.to_owned(), extra_args: Vec::new(), source: None }
    }
}

/// A running (or explicitly killed) `weir-agent`. Dropping it SIGKILLs the
/// process and removes its bpffs root, which detaches its programs.
#[derive(Debug)]
pub struct Agent {
    bin: PathBuf,
    args: Vec<String>,
    bpffs_root: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    // Last: the log directory outlives everything that writes to it.
    _log_dir: TempDir,
}

impl Agent {
    /// Starts `weir-agent` for `node`, watching `manifests`.
    pub fn start(node: &Node, manifests: &ManifestDir) -> Result<Agent> {
        Agent::start_with(node, manifests, AgentOptions::default())
    }

    /// Starts `weir-agent` with extra options.
    pub fn start_with(node: &Node, manifests: &ManifestDir, options: AgentOptions) -> Result<Agent> {
        let bin = binary("WEIR_AGENT_BIN", "weir-agent")?;
        let bpffs_root = Path::new(BPFFS).join(names::unique(&options.prefix));
        let log_dir = TempDir::new(&format!("{}log-", options.prefix))?;
        let log_path = log_dir.path().join("agent.log");
        let mut args = vec![
            "--source".to_owned(),
            options.source.clone().unwrap_or_else(|| format!("dir:{}", manifests.path().display())),
            "--node-name".to_owned(),
            node.name().to_owned(),
            "--netns".to_owned(),
            node.netns().name().to_owned(),
            "--bpffs-root".to_owned(),
            bpffs_root.display().to_string(),
        ];
        args.extend(options.extra_args);
        let mut agent = Agent { bin, args, bpffs_root, log_path, child: None, _log_dir: log_dir };
        agent.spawn()?;
        Ok(agent)
    }

    /// The agent's `--bpffs-root`.
    pub fn bpffs_root(&self) -> &Path {
        &self.bpffs_root
    }

    /// The names of the program links pinned under `<bpffs root>/links`
    /// (`<hook>:<ifindex>:<ifname>`, e.g. `xdp:3:uplink`).
    pub fn pinned_link_names(&self) -> Result<Vec<String>> {
        Ok(std::fs::read_dir(self.bpffs_root.join("links"))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect())
    }

    /// A `weir` CLI pointed at this agent's pins.
    pub fn cli(&self) -> Result<Cli> {
        Cli::new(&self.bpffs_root)
    }

    /// The log file (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far, with ANSI colour codes removed.
    pub fn log(&self) -> String {
        let raw = std::fs::read(&self.log_path).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(&raw))
    }

    /// Waits until a log line satisfies `matches` and returns that line.
    pub fn wait_for_log_line(
        &mut self,
        timeout: Duration,
        what: &str,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let mut found = None;
        wait_until(timeout, what, || {
            self.ensure_running()?;
            found = self.log().lines().find(|l| matches(l)).map(str::to_owned);
            Ok(found.is_some())
        })
        .with_context(|| format!("agent log:\n{}", self.log()))?;
        Ok(found.unwrap_or_default())
    }

    /// The ids of the bpf links pinned under this agent's bpffs root (the
    /// tcx links that keep its programs attached while it is down), from
    /// `bpftool -j -f link show`, which resolves pin paths.
    ///
    /// A link exists in the kernel (and the program runs) a moment before
    /// the agent pins it; killing the agent in between detaches it. Tests
    /// that kill the agent first wait for every pod's link to be pinned.
    pub fn pinned_links(&self) -> Result<Vec<u32>> {
        #[derive(serde::Deserialize)]
        struct Link {
            id: u32,
            #[serde(default)]
            pinned: Vec<PathBuf>,
        }
        let json = crate::cmd::run("bpftool", &["-j", "-f", "link", "show"])?;
        let links: Vec<Link> = serde_json::from_str(&json).context("parsing `bpftool -j -f link show`")?;
        Ok(links
            .into_iter()
            .filter(|l| l.pinned.iter().any(|p| p.starts_with(&self.bpffs_root)))
            .map(|l| l.id)
            .collect())
    }

    /// Fails (with the log) if the agent process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("the agent is not running (killed by the test)");
        };
        if let Some(status) = child.try_wait()? {
            self.child = None;
            bail!("weir-agent exited ({status}); log:\n{}", self.log());
        }
        Ok(())
    }

    /// SIGKILLs the agent and reaps it; pins, programs and links stay.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL on Unix: no chance to clean up, which
            // is what the restart test wants.
            child.kill().context("cannot SIGKILL weir-agent")?;
            child.wait().context("cannot reap weir-agent")?;
        }
        Ok(())
    }

    /// Kills the agent if it runs, then starts it again with the same
    /// arguments (log appended).
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        writeln!(log, "=== weir-tests: starting {} {}", self.bin.display(), self.args.join(" "))?;
        let stderr: File = log.try_clone()?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("weir-tests: {e:#}");
        }
        // The log is the first thing one wants when a test fails. libtest
        // only shows a test's stderr when it fails (or with --nocapture),
        // and a test returning `Err` is not panicking here, so always print.
        eprintln!(
            "----- weir-agent log ({}) -----\n{}\n----- end of weir-agent log -----",
            self.log_path.display(),
            tail(&self.log(), 200)
        );
        match std::fs::remove_dir_all(&self.bpffs_root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("weir-tests: cannot remove {}: {e}", self.bpffs_root.display()),
        }
        // The agent's state file and Hubble socket live in
        // /run/weir/<name of the bpffs root>/.
        if let Some(name) = self.bpffs_root.file_name() {
            let _ = std::fs::remove_dir_all(Path::new("/run/weir").join(name));
        }
    }
}

/// The path of a workspace binary: `$<env_var>` if set, else next to the
/// test executable's directory (`target/debug/deps/<test>` →
/// `target/debug/<name>`).
pub fn binary(env_var: &str, name: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("cannot find the test executable")?;
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .with_context(|| format!("cannot derive the {name} path from {}", exe.display()))?;
    if !path.exists() {
        bail!(
            "{} does not exist: build it first (`cargo build -p {}`) or set {env_var}",
            path.display(),
            if name == "weir" { "weir-cli" } else { name }
        );
    }
    Ok(path)
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), in case the agent's
/// logger colours its output even into a file.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colours() {
        assert_eq!(strip_ansi("\u{1b}[33m WARN\u{1b}[0m \u{1b}[2mfile\u{1b}[0m=a.yaml"), " WARN file=a.yaml");
    }
}
