//! A two-instruction XDP program (`return XDP_PASS`) for the far end of a
//! veth that receives XDP_TX frames.
//!
//! veth hands XDP frames to its peer's XDP ring, but only schedules the
//! peer to read that ring when the peer runs an XDP program itself; without
//! one, the frames wait for unrelated traffic. A physical NIC has no such
//! peer. Loaded with the raw bpf(2) syscall (no object file to ship).

use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::{Context, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// `bpf_attr` is a union of up to 144 bytes here; every command reads its
/// own prefix and needs the rest zeroed.
#[repr(C, align(8))]
struct Attr([u8; 144]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 144])
    }
    fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<OwnedFd> {
    // SAFETY: a bpf_attr-sized, zero-padded buffer whose pointers outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches `XDP_PASS` natively to `ifname` in the current network
/// namespace; the returned link detaches it when dropped (or when the
/// device goes with its namespace).
pub fn attach(ifname: &str) -> Result<OwnedFd> {
    // r0 = 2 (XDP_PASS); exit
    let insns: [u64; 2] = [0x0000_0002_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    let mut attr = Attr::new();
    attr.put_u32(0, BPF_PROG_TYPE_XDP);
    attr.put_u32(4, insns.len() as u32);
    attr.put_u64(8, insns.as_ptr() as u64);
    attr.put_u64(16, license.as_ptr() as u64);
    let prog = bpf(BPF_PROG_LOAD, &mut attr).context("loading an XDP_PASS program")?;
    let ifindex = nix::net::if_::if_nametoindex(ifname).with_context(|| format!("interface {ifname}"))?;
    let mut attr = Attr::new();
    use std::os::fd::AsRawFd as _;
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(4, ifindex);
    attr.put_u32(8, BPF_XDP);
    attr.put_u32(12, XDP_FLAGS_DRV_MODE);
    bpf(BPF_LINK_CREATE, &mut attr).with_context(|| format!("attaching XDP_PASS to {ifname}"))
}
