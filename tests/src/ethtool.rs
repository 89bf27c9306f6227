//! The ethtool setting the XDP tests need, set with the ethtool ioctl (the
//! `ethtool` binary is not part of a bare machine): TX checksum offload off
//! on a "wire" link's sender. A packet from a real wire always carries a
//! complete checksum, while a locally generated one on a veth carries a
//! partial one for offload, which XDP cannot tell apart.
//!
//! Call these inside the namespace of the device (e.g. from `NetNs::run`).

use std::os::fd::AsRawFd as _;

use anyhow::{Context, Result, bail};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// `ETHTOOL_STXCSUM`: set TX checksum offload.
pub const SET_TX_CHECKSUM: u32 = 0x17;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` member of its union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

/// Turns the setting `cmd` on or off for device `dev`.
pub fn set(dev: &str, cmd: u32, on: bool) -> Result<()> {
    if dev.len() >= 16 {
        bail!("interface name {dev} too long");
    }
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").context("opening a socket for ethtool")?;
    let mut value = EthtoolValue { cmd, data: u32::from(on) };
    let mut req = IfReq { name: [0; 16], data: &mut value, _pad: [0; 16] };
    req.name[..dev.len()].copy_from_slice(dev.as_bytes());
    // SAFETY: a valid socket and an ifreq whose data points at a live ethtool_value.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("ethtool {cmd:#x} on {dev}"));
    }
    Ok(())
}
