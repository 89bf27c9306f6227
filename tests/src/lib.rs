//! Weir's network-namespace harness: everything a privileged integration test
//! (or the demo) needs to build a simulated Kubernetes node out of network
//! namespaces, run servers and clients inside its pods, drive `weir-agent`
//! through manifest files, and read the datapath back with `weir`.
//!
//! Every resource is owned by an RAII guard whose `Drop` removes it, so a
//! failing (panicking) test still leaves no namespace, interface, pin or
//! process behind. Guards never panic in `Drop`; they report problems on
//! stderr instead, because a panic during unwinding aborts the test binary.
//!
//! Module map (one concern each):
//! - [`names`]: unique, short names for namespaces, interfaces and pins;
//! - [`cmd`]: running `ip` and friends with useful error messages;
//! - [`ethtool`]: the checksum-offload switch XDP tests need;
//! - [`netns`]: creating namespaces and running code inside them;
//! - [`topology`]: a node namespace and pods wired to it as the contract says;
//! - [`servers`] / [`clients`]: TCP/UDP endpoints that answer with the pod name;
//! - [`manifests`]: Kubernetes YAML written atomically into the watched dir;
//! - [`agent`]: starting, killing and restarting `weir-agent`;
//! - [`cgroup`]: a dedicated cgroup v2 for the socket-LB hooks;
//! - [`cli`]: `weir ... -o json` parsed into typed rows, and [`cli::wait_until`];
//! - [`bpf`]: the few bpf(2) commands tests and benchmarks make directly
//!   (pinned objects, BPF_PROG_TEST_RUN, map walks, tiny programs);
//! - [`frames`]: Ethernet/IPv4/TCP frames for BPF_PROG_TEST_RUN;
//! - [`fixture`]: a ready-made node + manifest dir + agent for tests;
//! - [`xdp_pass`]: an XDP_PASS program for veth peers of XDP_TX devices.

pub mod agent;
pub mod apiserver;
pub mod bpf;
pub mod cgroup;
pub mod cli;
pub mod clients;
pub mod cmd;
pub mod ethtool;
pub mod fixture;
pub mod frames;
pub mod manifests;
pub mod names;
pub mod netns;
pub mod netpol_model;
pub mod servers;
pub mod tempdir;
pub mod topology;
pub mod xdp_pass;

/// Fails early, with a message that says what to do, when the tests run
/// without the privileges they need (namespaces, veths and bpffs need root).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the weir-tests integration tests need root (network namespaces, veth pairs, bpffs); \
         run them through `cargo xtask test` or as root"
    );
}
