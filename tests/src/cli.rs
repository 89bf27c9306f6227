//! Driving `weir` (the CLI) with `-o json` and parsing its output into the
//! rows the contract describes, plus the polling helpers tests use instead of
//! sleeping: agent state is always awaited by polling the CLI.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::agent::binary;

/// How often [`wait_until`] re-evaluates its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// `weir lb list` row: one frontend and its backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbService {
    pub service_id: u32,
    pub frontend: Frontend,
    pub flags: Vec<String>,
    pub backends: Vec<LbBackend>,
}

/// A service frontend: ClusterIP, port, protocol (`TCP`/`UDP`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frontend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
}

/// One backend of a frontend, in its slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbBackend {
    pub slot: u32,
    pub backend_id: u32,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    pub state: String,
}

/// An address and port in a conntrack entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtAddr {
    pub address: Ipv4Addr,
    pub port: u16,
}

/// `weir ct list` row. For `kind == "service"`: source = client, destination
/// = ClusterIP:port, nat = chosen backend. For `kind == "flow"`: source =
/// client (or the hairpin address), destination = backend, nat = the
/// ClusterIP:port replies are rewritten to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtEntry {
    pub kind: String,
    pub protocol: String,
    pub source: CtAddr,
    pub destination: CtAddr,
    pub state: String,
    pub expires_in_seconds: i64,
    pub nat: CtAddr,
    pub client_address: Option<Ipv4Addr>,
    pub service_id: u32,
    pub backend_id: u32,
    pub flags: Vec<String>,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

/// `weir metrics list` row: a non-zero counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metric {
    pub code: u32,
    pub reason: String,
    pub drop: bool,
    pub packets: u64,
    pub bytes: u64,
}

/// Metric codes from the contract.
pub mod codes {
    pub const SERVICE_NEW: u32 = 1;
    pub const SERVICE_ESTABLISHED: u32 = 2;
    pub const REVERSE_NAT: u32 = 3;
    pub const HAIRPIN_NEW: u32 = 4;
    /// Socket LB: a connect()/sendmsg() translated to a backend.
    pub const SOCK_LB_TRANSLATED: u32 = 7;
    /// XDP: sent back out of the device it came in on.
    pub const XDP_TX: u32 = 9;
    /// XDP: translated for a local backend and passed to the stack.
    pub const XDP_TO_STACK: u32 = 10;
    /// XDP: left to the tc program.
    pub const XDP_TO_TC: u32 = 11;
    /// A frontend exists but has no backend.
    pub const NO_BACKEND: u32 = 158;
    /// Destination in the service CIDR but no such frontend ("Is a ClusterIP").
    pub const IS_A_CLUSTER_IP: u32 = 174;
}

/// The `weir` CLI, pointed at one bpffs root.
#[derive(Debug, Clone)]
pub struct Cli {
    bin: PathBuf,
    bpffs_root: PathBuf,
}

impl Cli {
    /// Uses `$WEIR_CLI_BIN`, else `target/<profile>/weir` next to the tests.
    pub fn new(bpffs_root: &Path) -> Result<Cli> {
        Ok(Cli { bin: binary("WEIR_CLI_BIN", "weir")?, bpffs_root: bpffs_root.to_owned() })
    }

    /// Runs `weir <args> --bpffs-root <root>` and returns its raw output,
    /// whatever the exit status (for tests of the CLI's own errors).
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.bin)
            .args(args)
            .arg("--bpffs-root")
            .arg(&self.bpffs_root)
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))
    }

    /// Runs `weir <args> -o json` and parses its stdout as `T`.
    pub fn json<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        let output = self.output(&full)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "`weir {} --bpffs-root {}` failed ({}): {}",
                full.join(" "),
                self.bpffs_root.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        serde_json::from_str(&stdout)
            .with_context(|| format!("`weir {}`: unexpected JSON: {stdout}", full.join(" ")))
    }

    /// `weir lb list -o json`.
    pub fn lb_list(&self) -> Result<Vec<LbService>> {
        self.json(&["lb", "list"])
    }

    /// `weir ct list -o json`.
    pub fn ct_list(&self) -> Result<Vec<CtEntry>> {
        self.json(&["ct", "list"])
    }

    /// `weir metrics list -o json`.
    pub fn metrics(&self) -> Result<Vec<Metric>> {
        self.json(&["metrics", "list"])
    }

    /// Packets counted under metric `code` (0 when the counter is absent,
    /// since the CLI lists non-zero counters only).
    pub fn metric_packets(&self, code: u32) -> Result<u64> {
        Ok(self.metrics()?.iter().filter(|m| m.code == code).map(|m| m.packets).sum())
    }

    /// The `lb list` row for one frontend, if present.
    pub fn service(&self, address: Ipv4Addr, port: u16, protocol: &str) -> Result<Option<LbService>> {
        // The external entry; an `internal` twin (eTP=Local) is not it.
        Ok(self.lb_list()?.into_iter().find(|s| {
            s.frontend.address == address
                && s.frontend.port == port
                && s.frontend.protocol == protocol
                && !s.flags.iter().any(|f| f == "internal")
        }))
    }

    /// Waits until the frontend exists with exactly the backend addresses
    /// `backends` (in any order) and returns its row. An empty `backends`
    /// waits for a frontend without backends.
    pub fn wait_for_backends(
        &self,
        timeout: Duration,
        address: Ipv4Addr,
        port: u16,
        protocol: &str,
        backends: &[Ipv4Addr],
    ) -> Result<LbService> {
        let mut want: Vec<Ipv4Addr> = backends.to_vec();
        want.sort();
        wait_for(
            timeout,
            &format!("{protocol} {address}:{port} to have backends {want:?} in `weir lb list`"),
            || {
                let Some(service) = self.service(address, port, protocol)? else {
                    return Ok(None);
                };
                let mut have: Vec<Ipv4Addr> = service.backends.iter().map(|b| b.address).collect();
                have.sort();
                Ok((have == want).then_some(service))
            },
        )
    }

    /// Waits until no frontend has `address` any more.
    pub fn wait_for_no_frontend(&self, timeout: Duration, address: Ipv4Addr) -> Result<()> {
        wait_until(timeout, &format!("{address} to leave `weir lb list`"), || {
            Ok(!self.lb_list()?.iter().any(|s| s.frontend.address == address))
        })
    }
}

/// Like [`wait_for`], polling every `interval` instead of every 100 ms: for
/// conditions that are expensive to evaluate (a `weir lb list` of 10,000
/// rows), so that polling does not steal the CPU the agent needs.
pub fn wait_for_every<T>(
    interval: Duration,
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match condition() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_error {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow::anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        std::thread::sleep(interval);
    }
}

/// Polls `condition` every 100 ms until it returns `Ok(Some(value))`, and
/// returns the value; fails after `timeout` with `what` and the last error the
/// condition returned (errors count as "not yet": the agent may not have
/// created its pins yet).
pub fn wait_for<T>(timeout: Duration, what: &str, condition: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    wait_for_every(POLL_INTERVAL, timeout, what, condition)
}

/// Polls `condition` every 100 ms until it returns `Ok(true)`; see [`wait_for`].
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> Result<bool>) -> Result<()> {
    wait_for(timeout, what, || Ok(condition()?.then_some(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_examples() {
        let lb: Vec<LbService> = serde_json::from_str(
            r#"[{"service_id":1,"frontend":{"address":"10.96.0.10","port":80,"protocol":"TCP"},"flags":["ClusterIP"],
                "backends":[{"slot":1,"backend_id":1,"address":"10.244.0.3","port":8080,"protocol":"TCP","state":"active"}]}]"#,
        )
        .unwrap();
        assert_eq!(lb[0].backends[0].address, Ipv4Addr::new(10, 244, 0, 3));
        let ct: Vec<CtEntry> = serde_json::from_str(
            r#"[{"kind":"service","protocol":"TCP","source":{"address":"10.244.0.2","port":40000},
                 "destination":{"address":"10.96.0.10","port":80},"state":"established","expires_in_seconds":21000,
                 "nat":{"address":"10.244.0.3","port":8080},"client_address":null,"service_id":1,"backend_id":1,
                 "flags":[],"tx_packets":3,"tx_bytes":180,"rx_packets":2,"rx_bytes":120}]"#,
        )
        .unwrap();
        assert_eq!(ct[0].nat.port, 8080);
        let m: Vec<Metric> = serde_json::from_str(
            r#"[{"code":158,"reason":"Service backend not found","drop":true,"packets":2,"bytes":120}]"#,
        )
        .unwrap();
        assert_eq!(m[0].code, codes::NO_BACKEND);
    }

    #[test]
    fn wait_for_times_out_with_the_last_error() {
        let err = wait_for::<()>(Duration::from_millis(250), "nothing", || anyhow::bail!("still broken"))
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("timed out") && text.contains("still broken"), "{text}");
        let mut n = 0;
        assert_eq!(
            wait_for(Duration::from_secs(2), "third try", || {
                n += 1;
                Ok((n == 3).then_some(n))
            })
            .unwrap(),
            3
        );
    }
}
