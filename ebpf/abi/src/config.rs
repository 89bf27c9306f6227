//! Datapath configuration written by the agent into a one-element array, so
//! that it can change without reloading programs.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The service CIDR: traffic to an address in it that matches no
    /// frontend is dropped (as kube-proxy's nftables `cluster-ips-check`).
    /// A zero mask disables the check.
    pub service_cidr_be: u32,
    pub service_mask_be: u32,
    /// Source address used when a pod reaches a service and is itself the
    /// chosen backend (hairpin).
    pub hairpin_addr_be: u32,
    /// Conntrack lifetimes in seconds; zero means the default in
    /// [`crate::ct::lifetime`].
    pub lifetime_tcp_syn: u32,
    pub lifetime_tcp_established: u32,
    pub lifetime_tcp_close: u32,
    pub lifetime_non_tcp: u32,
    /// `CONFIG_F_*`.
    pub flags: u32,
    /// Cookie of the node's network namespace: the socket-LB hooks act only
    /// on sockets there (the cgroup they hang off may hold other
    /// namespaces' processes). Zero disables them.
    pub netns_cookie: u64,
}

/// Emit flow events into the ring buffer.
pub const CONFIG_F_EVENTS: u32 = 1 << 0;
const _: () = assert!(core::mem::size_of::<Config>() == 40);

#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` integers, valid for any bit pattern.
unsafe impl aya::Pod for Config {}
