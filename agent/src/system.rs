//! The few pieces of the host the agent touches: its network namespace, the
//! bpffs mount, and the routing table.

use std::{
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, setns},
};
use tracing::info;

/// `--netns NAME` is `/run/netns/NAME` (as `ip netns` names them); anything
/// with a slash is a path.
pub fn netns_path(netns: &str) -> PathBuf {
    if netns.contains('/') { PathBuf::from(netns) } else { Path::new("/run/netns").join(netns) }
}

/// Moves the process into a network namespace. Must run before any thread
/// starts: setns only moves the calling thread, and threads created later
/// inherit it. Unlike `ip netns exec`, this leaves the mount namespace
/// alone, so /sys/fs/bpf stays the host's and pins outlive the process.
pub fn enter_netns(netns: &str) -> anyhow::Result<()> {
    let path = netns_path(netns);
    let file = File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))?;
    setns(file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {}", path.display()))
}

/// Mounts a bpffs at /sys/fs/bpf unless one is mounted at or above `root`
/// (machines that boot without one, as Cilium's init container does).
pub fn ensure_bpffs(root: &Path) -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let covered = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, Some(target), Some(fstype)) = (fields.next(), fields.next(), fields.next()) else {
            return false;
        };
        fstype == "bpf" && root.starts_with(target)
    });
    if covered {
        return Ok(());
    }
    let target = Path::new("/sys/fs/bpf");
    if !root.starts_with(target) {
        bail!(
            "no bpffs is mounted above {}; mount one there or use a root under /sys/fs/bpf",
            root.display()
        );
    }
    std::fs::create_dir_all(target).ok();
    mount(Some("bpffs"), target, Some("bpf"), MsFlags::empty(), Some("mode=0700"))
        .context("mounting bpffs at /sys/fs/bpf")?;
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// The node's devices: every interface of this network namespace with an
/// IPv4 address, loopback excepted (pod veths have none on the host side).
/// North-south traffic enters through them, NodePorts listen on their
/// addresses, and the ipcache marks those addresses as the host identity.
pub fn local_devices() -> Vec<(String, Ipv4Addr)> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut out: Vec<(String, Ipv4Addr)> = addrs
        .filter_map(|a| Some((a.interface_name.clone(), a.address?.as_sockaddr_in()?.ip())))
        .filter(|(_, ip)| !ip.is_loopback())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// One row of /proc/net/route.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    iface: String,
    destination: u32,
    mask: u32,
}

/// /proc/net/route prints addresses as the raw network-order word in hex.
fn parse_routes(table: &str) -> Vec<Route> {
    const RTF_UP: u32 = 1;
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let hex = |i: usize| f.get(i).and_then(|s| u32::from_str_radix(s, 16).ok());
            if hex(3)? & RTF_UP == 0 {
                return None;
            }
            Some(Route {
                iface: f[0].to_owned(),
                destination: u32::from_be_bytes(hex(1)?.to_ne_bytes()),
                mask: u32::from_be_bytes(hex(7)?.to_ne_bytes()),
            })
        })
        .collect()
}

fn longest_match(routes: &[Route], ip: Ipv4Addr) -> Option<String> {
    let ip = u32::from(ip);
    routes
        .iter()
        .filter(|r| ip & r.mask == r.destination)
        .max_by_key(|r| r.mask.count_ones())
        .map(|r| r.iface.clone())
}

/// The interface the node routes `ip` through, from the routing table of the
/// agent's network namespace: for a pod, the host side of its veth.
pub struct RouteTable(Vec<Route>);

impl RouteTable {
    pub fn read() -> anyhow::Result<Self> {
        let table = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
        Ok(Self(parse_routes(&table)))
    }

    pub fn interface_for(&self, ip: Ipv4Addr) -> Option<String> {
        longest_match(&self.0, ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
lxc1\t0200F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
eth0\t0000F40A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
down\t0300F40A\t00000000\t0004\t0\t0\t0\tFFFFFFFF\t0\t0\t0
";

    #[test]
    fn picks_the_most_specific_up_route() {
        let routes = RouteTable(parse_routes(TABLE));
        assert_eq!(routes.interface_for("10.244.0.2".parse().unwrap()).as_deref(), Some("lxc1"));
        assert_eq!(
            routes.interface_for("10.244.0.3".parse().unwrap()).as_deref(),
            Some("eth0"),
            "down routes are ignored"
        );
        assert_eq!(routes.interface_for("10.96.0.1".parse().unwrap()), None);
    }
}
