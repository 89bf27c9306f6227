//! Maglev backend selection measured through the datapath's own lookup: the
//! real `weir_from_pod` program the agent attached to a client pod's veth is
//! run with BPF_PROG_TEST_RUN on crafted TCP SYNs from the pod to a ClusterIP
//! whose service uses Maglev, and the backend is read from the frame the
//! program returns (its destination after DNAT). This proves, over 10,000
//! synthetic flows (4 client pods × 2,500 source ports):
//!
//! - (a) with 10 backends every backend gets a fair share of the flows;
//! - (b) removing one backend (a manifest change the running agent picks up)
//!   remaps few of the same flows, and every flow of the removed backend;
//! - (c) two nodes, each with its own agent, pick the same backend for every
//!   flow.
//!
//! Why BPF_PROG_TEST_RUN rather than real connections: 10,000 connections
//! through network namespaces would take minutes, and a connection's backend
//! is only visible as the server's answer, so each flow would need a live
//! server and a handshake. A test run costs a few microseconds, exercises
//! exactly the lookup (`select_backend` with the flow hash computed from the
//! parsed packet, in the maps the agent wrote), and returns the rewritten
//! frame, so the backend is read from the packet the kernel would forward.
//! The syscalls are made directly (`libc::syscall(SYS_bpf)`): one `bpftool`
//! process per flow would be 10,000 processes per round.
//!
//! The frames and the bpf(2) calls come from the harness
//! (`weir_tests::frames`, `weir_tests::bpf`), shared with `cargo xtask bench`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weir_tests::agent::AgentOptions;
use weir_tests::bpf;
use weir_tests::fixture::{AGENT_TIMEOUT, NAMESPACE, TestBed};
use weir_tests::frames;
use weir_tests::manifests::{Endpoint, ServicePort, endpoint_slice, service};
use weir_tests::netpol_model::pinned_link_prog_id;
use weir_tests::topology::Pod;

/// The ClusterIP and its port; backends listen on `TARGET_PORT`.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 77);
const PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// Client pods (source addresses) and source ports per client.
const CLIENTS: usize = 4;
const PORTS_PER_CLIENT: u16 = 2_500;
const FLOWS: usize = CLIENTS * PORTS_PER_CLIENT as usize;
const FIRST_SOURCE_PORT: u16 = 20_000;
const BACKENDS: u8 = 10;
/// The backend (index into [`backend_ips`]) removed in (b).
const REMOVED: usize = 3;
/// The agent pins its maps directly under its bpffs root, by name
/// (`weir_abi::map_name::CONNTRACK`; the tests crate does not depend on
/// weir-abi, hence the copy).
const CONNTRACK_MAP: &str = "CT4_V1";
/// `CtKey` (`weir_abi::ct`): saddr, daddr, sport, dport, proto, kind, pad.
const CT_KEY_SIZE: u32 = 16;
const CT_KEY_DADDR: std::ops::Range<usize> = 4..8;

/// The backends: addresses only (no pods), as an EndpointSlice may list pods
/// of other nodes. A SYN's translation needs nothing but the maps, and Maglev
/// builds its table from the backend names (addresses), so every node with
/// these manifests builds the same table.
fn backend_ips() -> Vec<Ipv4Addr> {
    (1..=BACKENDS).map(|i| Ipv4Addr::new(10, 244, 7, i)).collect()
}

/// The Service (with the Maglev annotation if `annotate`) and its
/// EndpointSlice listing `backends` in the given order.
fn manifests(backends: &[Ipv4Addr], annotate: bool) -> Vec<Value> {
    let ports = [ServicePort::tcp("http", PORT, TARGET_PORT)];
    let mut svc = service(NAMESPACE, "hashed", &VIP.to_string(), &ports);
    if annotate {
        svc["metadata"]["annotations"] = serde_json::json!({"weir.dev/lb-algorithm": "maglev"});
    }
    let endpoints: Vec<Endpoint> = backends.iter().map(|ip| Endpoint::ready(*ip)).collect();
    vec![svc, endpoint_slice(NAMESPACE, "hashed", "s1", &endpoints, &ports)]
}

/// A client pod and the program the agent attached at its veth's tcx
/// ingress (what the pod sends).
struct Client {
    pod: Pod,
    prog: OwnedFd,
}

/// One node: its agent (in the test bed) and its client pods. Fields drop in
/// order: the pods before the test bed, as the fixture requires.
struct Node {
    clients: Vec<Client>,
    bed: TestBed,
}

impl Node {
    /// A test bed whose agent serves the Maglev service with `backends`
    /// (listed in that order), with [`CLIENTS`] client pods, once `weir lb
    /// list` shows the backends with the Maglev flag and the programs are
    /// attached to every pod.
    fn new(options: AgentOptions, backends: &[Ipv4Addr], annotate: bool) -> Result<Node> {
        let mut bed = TestBed::with_options(options)?;
        let pods: Vec<Pod> =
            (0..CLIENTS).map(|i| bed.add_pod(&format!("client{i}"))).collect::<Result<_>>()?;
        bed.manifests().write("hashed.yaml", &manifests(backends, annotate))?;
        let row = bed.cli().wait_for_backends(AGENT_TIMEOUT, VIP, PORT, "TCP", backends)?;
        ensure!(row.flags.iter().any(|f| f == "Maglev"), "`weir lb list` shows Maglev: {row:?}");
        bed.wait_attached()?;
        let clients = pods
            .into_iter()
            .map(|pod| {
                let id = pinned_link_prog_id(&bed, "from-pod", pod.host_interface())?;
                Ok(Client { prog: bpf::prog_fd_by_id(id)?, pod })
            })
            .collect::<Result<_>>()?;
        Ok(Node { clients, bed })
    }

    fn flows(&self) -> Vec<(usize, Ipv4Addr, u16)> {
        self.clients
            .iter()
            .enumerate()
            .flat_map(|(c, client)| {
                (0..PORTS_PER_CLIENT).map(move |p| (c, client.pod.ip(), FIRST_SOURCE_PORT + p))
            })
            .collect()
    }

    /// Runs the SYN of every flow through its client's program and returns
    /// the backend each was translated to, in flow order.
    fn round(&self) -> Result<Vec<Ipv4Addr>> {
        let flows = self.flows();
        ensure!(flows.len() == FLOWS);
        flows
            .iter()
            .map(|&(c, src, sport)| {
                let frame = frames::tcp(src, sport, VIP, PORT, frames::SYN);
                let mut out = [0u8; 256];
                let run = bpf::test_run(&self.clients[c].prog, &frame, &mut out, 1)?;
                let what = format!("{src}:{sport} → {VIP}:{PORT}");
                bpf::expect_pass(&what, &run)?;
                let out = &out[..run.size_out];
                let backend =
                    frames::destination(out).with_context(|| format!("{what}: output {out:02x?}"))?;
                ensure!(backend != VIP, "{what}: dst IP hasn't been NATed");
                // The translated SYN, byte for byte: only the destination
                // address and port changed, and both checksums are right.
                ensure!(
                    out == frames::tcp(src, sport, backend, TARGET_PORT, frames::SYN),
                    "{what}: not the SYN DNATed to {backend}:{TARGET_PORT}: {out:02x?}"
                );
                Ok(backend)
            })
            .collect()
    }

    /// Empties the agent's pinned conntrack map, and checks that no entry
    /// for the ClusterIP is left.
    ///
    /// Why: the first SYN of a flow leaves a service entry in conntrack, and
    /// the datapath sends every later packet of that tuple to the recorded
    /// backend, even one that has left the service since (an open connection
    /// must not move; only a SYN on a closed or expired entry picks again).
    /// Sending the same SYNs again would measure conntrack, not Maglev
    /// (without this, every flow of the removed backend stays on it and (b)
    /// fails). Alternatives: new source ports are new flows (not "the same
    /// 10,000 flows"); waiting out the SYN lifetime (60 s) costs a minute per
    /// round; closing each flow with a RST first would make the result
    /// depend on conntrack's close handling as well. The synthetic flows
    /// never existed beyond their one packet and nothing else runs on this
    /// test node, so dropping every entry (like `conntrack -F`) forgets
    /// exactly them.
    fn clear_conntrack(&self) -> Result<usize> {
        let map = bpf::obj_get(&self.bed.agent().bpffs_root().join(CONNTRACK_MAP))?;
        let key_size = bpf::map_key_size(&map)?;
        ensure!(key_size == CT_KEY_SIZE, "{CONNTRACK_MAP} keys are {key_size} bytes, CtKey is {CT_KEY_SIZE}");
        let keys = bpf::map_keys(&map, key_size as usize)?;
        for key in &keys {
            match bpf::map_delete(&map, key) {
                Ok(()) => {}
                // The agent's GC may have removed it meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).context("BPF_MAP_DELETE_ELEM on the conntrack map"),
            }
        }
        let left = bpf::map_keys(&map, key_size as usize)?
            .into_iter()
            .filter(|k| k[CT_KEY_DADDR] == VIP.octets())
            .count();
        ensure!(left == 0, "{left} conntrack entries for {VIP} survived the clearing");
        Ok(keys.len())
    }
}

/// Flows per backend, as a share of all flows.
fn shares(backends: &[Ipv4Addr], chosen: &[Ipv4Addr]) -> BTreeMap<Ipv4Addr, f64> {
    let mut counts: BTreeMap<Ipv4Addr, usize> = backends.iter().map(|b| (*b, 0)).collect();
    for b in chosen {
        *counts.entry(*b).or_default() += 1;
    }
    counts.into_iter().map(|(b, n)| (b, 100.0 * n as f64 / chosen.len() as f64)).collect()
}

fn print_shares(what: &str, shares: &BTreeMap<Ipv4Addr, f64>) {
    let text: Vec<String> = shares.iter().map(|(b, s)| format!("{b} {s:.2}%")).collect();
    println!("{what}: {}", text.join(", "));
}

/// (a) and (b) on one node, Maglev enabled for every service with the
/// agent's `--lb-algorithm maglev` (no annotation).
#[test]
fn maglev_spreads_10000_flows_evenly_and_remaps_few_when_a_backend_leaves() -> Result<()> {
    let started = Instant::now();
    let options = AgentOptions {
        extra_args: vec!["--lb-algorithm".into(), "maglev".into()],
        ..AgentOptions::default()
    };
    let backends = backend_ips();
    let node = Node::new(options, &backends, false)?;

    // (a) An even spread.
    let before = node.round()?;
    let spread = shares(&backends, &before);
    print_shares("10 backends, share of 10,000 flows", &spread);
    ensure!(spread.len() == backends.len(), "flows went to addresses that are no backend: {spread:?}");
    for (b, share) in &spread {
        ensure!((6.0..=14.0).contains(share), "backend {b} got {share:.2}% of the flows, not 6-14%");
    }
    // The choice is a function of the flow: the same SYNs again (conntrack
    // cleared, so the lookup runs again) land on the same backends.
    let pinned = node.clear_conntrack()?;
    println!("conntrack entries after one round: {pinned} (cleared)");
    ensure!(node.round()? == before, "the same flows, looked up again, chose other backends");
    node.clear_conntrack()?;

    // (b) One backend leaves the EndpointSlice.
    let removed = backends[REMOVED];
    let remaining: Vec<Ipv4Addr> = backends.iter().copied().filter(|b| *b != removed).collect();
    node.bed.manifests().write("hashed.yaml", &manifests(&remaining, false))?;
    node.bed.cli().wait_for_backends(AGENT_TIMEOUT, VIP, PORT, "TCP", &remaining)?;
    let after = node.round()?;
    ensure!(!after.contains(&removed), "a flow still goes to the removed backend {removed}");
    print_shares("9 backends, share of the same flows", &shares(&remaining, &after));
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    let on_removed = before.iter().filter(|b| **b == removed).count();
    let moved_off_removed =
        before.iter().zip(&after).filter(|(a, b)| **a == removed && **b != removed).count();
    let remap = 100.0 * moved as f64 / FLOWS as f64;
    println!(
        "removing {removed}: {moved} of {FLOWS} flows remapped ({remap:.2}%); {on_removed} were on it \
         ({:.2}%), {moved_off_removed} of them moved; {} flows of other backends moved",
        100.0 * on_removed as f64 / FLOWS as f64,
        moved - moved_off_removed,
    );
    ensure!(moved_off_removed == on_removed, "every flow of the removed backend moves");
    ensure!((5.0..=15.0).contains(&remap), "{remap:.2}% of the flows remapped, not 5-15%");
    println!("run time: {:.1?}", started.elapsed());
    Ok(())
}

/// (c) Two nodes, each with its own agent and the Maglev annotation on the
/// service, choose the same backend for every flow. The second node first
/// sees only the last five backends, then all ten listed in reverse order (as
/// another watch could deliver them): its agent numbers backends as it learns
/// them, so the two nodes give the same backend different ids. The table
/// depends only on the backend names, so the choice must not change.
#[test]
fn two_nodes_choose_the_same_backend_for_each_of_10000_flows() -> Result<()> {
    let started = Instant::now();
    let backends = backend_ips();
    let reversed: Vec<Ipv4Addr> = backends.iter().rev().copied().collect();
    let one = Node::new(AgentOptions::default(), &backends, true)?;
    let two = Node::new(AgentOptions::default(), &backends[5..], true)?;
    two.bed.manifests().write("hashed.yaml", &manifests(&reversed, true))?;
    two.bed.cli().wait_for_backends(AGENT_TIMEOUT, VIP, PORT, "TCP", &backends)?;
    let ips = |n: &Node| n.clients.iter().map(|c| c.pod.ip()).collect::<Vec<_>>();
    ensure!(ips(&one) == ips(&two), "the clients have the same addresses on both nodes");
    let ids = |n: &Node| -> Result<Vec<(Ipv4Addr, u32)>> {
        let row = n.bed.cli().service(VIP, PORT, "TCP")?.context("no frontend")?;
        let mut ids: Vec<_> = row.backends.iter().map(|b| (b.address, b.backend_id)).collect();
        ids.sort();
        Ok(ids)
    };
    println!("backend ids, node 1: {:?}", ids(&one)?);
    println!("backend ids, node 2: {:?}", ids(&two)?);

    let (first, second) = (one.round()?, two.round()?);
    print_shares("node 1, share of 10,000 flows", &shares(&backends, &first));
    print_shares("node 2, share of 10,000 flows", &shares(&backends, &second));
    let same = first.iter().zip(&second).filter(|(a, b)| a == b).count();
    println!("the two nodes agree on {same} of {FLOWS} flows");
    println!("run time: {:.1?}", started.elapsed());
    ensure!(same == FLOWS, "the nodes disagree on {} of {FLOWS} flows", FLOWS - same);
    Ok(())
}
