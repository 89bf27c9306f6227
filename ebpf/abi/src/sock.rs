//! Socket-level load balancing (Cilium's `lb4_reverse_sk`): the connect and
//! sendmsg hooks translate a service address to a backend once, in the
//! socket; the recvmsg and getpeername hooks translate the backend back to
//! the service address the application asked for.

/// Reverse translation of one socket's backend: (socket cookie, backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub address_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevNatKey>() == 16);

/// The service frontend a socket connected or sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatEntry {
    pub address_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockRevNatEntry>() == 8);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain `repr(C)` integers with explicit padding, valid for any bit pattern.
    unsafe impl aya::Pod for SockRevNatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevNatEntry {}
}
