//! A two-instruction XDP program (`return XDP_PASS`) for the far end of a
//! veth that receives XDP_TX frames.
//!
//! veth hands XDP frames to its peer's XDP ring, but only schedules the
//! peer to read that ring when the peer runs an XDP program itself; without
//! one, the frames wait for unrelated traffic. A physical NIC has no such
//! peer. Loaded with the raw bpf(2) syscall ([`crate::bpf`]; no object file
//! to ship).

use std::os::fd::OwnedFd;

use anyhow::{Context, Result};

use crate::bpf;

/// `enum xdp_action`.
const XDP_PASS: u32 = 2;
/// `enum bpf_attach_type`.
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// Attaches `XDP_PASS` natively to `ifname` in the current network
/// namespace; the returned link detaches it when dropped (or when the
/// device goes with its namespace).
pub fn attach(ifname: &str) -> Result<OwnedFd> {
    let prog = bpf::prog_load(bpf::BPF_PROG_TYPE_XDP, &bpf::return_insns(XDP_PASS), "xdp_pass")
        .context("loading an XDP_PASS program")?;
    let ifindex = nix::net::if_::if_nametoindex(ifname).with_context(|| format!("interface {ifname}"))?;
    bpf::link_create(&prog, ifindex, BPF_XDP, XDP_FLAGS_DRV_MODE)
        .with_context(|| format!("attaching XDP_PASS to {ifname}"))
}
