//! Socket-level load balancing for processes in the node's own network
//! namespace (kubelet, hostNetwork pods): what kube-proxy's OUTPUT-chain
//! rules give them, done as Cilium's socket LB does it.
//!
//! `connect4` (TCP, connected UDP) and `sendmsg4` (unconnected UDP) replace a
//! service address with a backend's before the kernel routes anything, so
//! the connection is made to the backend directly: no per-packet NAT, no
//! conntrack entry, and the packets look like any host-to-pod traffic.
//! `recvmsg4` and `getpeername4` put the service address back, so the
//! application sees the address it asked for. The reverse translation is
//! keyed by socket cookie and backend (LB4_SOCK_REVNAT).
//!
//! The hooks hang off a cgroup, which can hold processes of any network
//! namespace: they act only on sockets in the node's namespace (its cookie
//! is in the config), and leave everything else alone.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use weir_abi::{
    metrics::{SOCK_LB_REFUSED, SOCK_LB_TRANSLATED},
    proto,
    sock::{SockRevNatEntry, SockRevNatKey},
};

use crate::{
    conntrack::now_secs,
    lb,
    maps::{CONFIG, SOCK_REVNAT},
    metrics::count,
};

/// What a cgroup sock_addr program returns: 1 lets the call proceed, 0
/// fails it (with the error set by `bpf_set_retval`, else EPERM).
const PROCEED: i32 = 1;
const REJECT: i32 = 0;
/// kube-proxy rejects connections to a service without endpoints with an
/// ICMP port unreachable, which a client sees as "connection refused".
const ECONNREFUSED: i32 = 111;

/// Whether this socket lives in the node's network namespace.
#[inline(always)]
fn in_node_netns(ctx: &SockAddrContext) -> bool {
    // SAFETY: copied out at once.
    let cookie = CONFIG.get_ptr(0).map(|c| unsafe { (*c).netns_cookie }).unwrap_or(0);
    // SAFETY: the helper reads the context the kernel handed us.
    cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cookie
}

/// `connect4` and `sendmsg4`: service address → backend address.
#[inline(always)]
pub fn translate_to_backend(ctx: &SockAddrContext) -> i32 {
    if !in_node_netns(ctx) {
        return PROCEED;
    }
    let sa = ctx.sock_addr;
    // SAFETY: fields of the context the kernel handed us.
    let (address_be, port_be, protocol) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol) };
    let proto = match protocol {
        6 => proto::TCP,
        17 => proto::UDP,
        _ => return PROCEED,
    };
    let Some(service) = lb::lookup_service_internal(address_be, port_be, proto) else {
        return PROCEED;
    };
    // SAFETY: the helper reads the context the kernel handed us.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Affinity is per client address; every socket here has the node's, so
    // the node is one client (as under kube-proxy). The flow hash for
    // Maglev is the socket's: there is no 5-tuple yet.
    let hash = (cookie ^ (cookie >> 32)) as u32;
    let (_, backend) = match lb::select_backend(&service, 0, now_secs(), hash) {
        Ok(chosen) => chosen,
        Err(_) => {
            count(SOCK_LB_REFUSED, 0);
            // SAFETY: a helper with a plain integer argument.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            return REJECT;
        }
    };
    let key = SockRevNatKey { cookie, address_be: backend.address_be, port_be: backend.port_be, _pad: 0 };
    let entry = SockRevNatEntry { address_be, port_be, _pad: 0 };
    // Without it replies would show the backend's address: tolerable, so a
    // full map does not fail the connect (it is an LRU anyway).
    let _ = SOCK_REVNAT.insert(&key, &entry, 0);
    // SAFETY: writable fields of the context (connect4/sendmsg4).
    unsafe {
        (*sa).user_ip4 = backend.address_be;
        (*sa).user_port = u32::from(backend.port_be);
    }
    count(SOCK_LB_TRANSLATED, 0);
    PROCEED
}

/// `recvmsg4` and `getpeername4`: backend address → service address.
#[inline(always)]
pub fn translate_to_service(ctx: &SockAddrContext) -> i32 {
    if !in_node_netns(ctx) {
        return PROCEED;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the helper reads the context the kernel handed us.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: fields of the context the kernel handed us.
    let (address_be, port_be) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    let key = SockRevNatKey { cookie, address_be, port_be, _pad: 0 };
    // SAFETY: copied out at once.
    if let Some(entry) = SOCK_REVNAT.get_ptr(&key).map(|e| unsafe { *e }) {
        // SAFETY: writable fields of the context (recvmsg4/getpeername4).
        unsafe {
            (*sa).user_ip4 = entry.address_be;
            (*sa).user_port = u32::from(entry.port_be);
        }
    }
    PROCEED
}
