//! Ending the node's UDP sockets that the socket LB connected to a backend
//! that has left its service.
//!
//! A connected UDP socket was translated once, at `connect()`: nothing on
//! the packet path can move it to another backend, so it would keep
//! sending to the dead one (Cilium's DNS pain point). Like Cilium, the
//! agent destroys such sockets (`SOCK_DESTROY` over sock_diag netlink,
//! what `ss -K` does): the application's next call fails with
//! ECONNABORTED, and its reconnect picks a live backend.

use std::{collections::HashSet, net::IpAddr};

use anyhow::{Context as _, bail};
use aya::maps::{HashMap, MapData};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_sock_diag::{
    SockDiagDestroy, SockDiagMessage,
    constants::{AF_INET, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use weir_abi::sock::{SockRevNatEntry, SockRevNatKey};

use super::conntrack::StaleUdpBackend;

/// Destroys every UDP socket of this network namespace that is connected to
/// a stale backend through its frontend (per the socket-LB reverse map:
/// sockets a process connected to the pod address itself are left alone).
/// Returns how many were destroyed.
pub fn destroy_stale_udp(
    revnat: &HashMap<MapData, SockRevNatKey, SockRevNatEntry>,
    stale: &HashSet<StaleUdpBackend>,
) -> anyhow::Result<usize> {
    // No socket went through the socket LB (or it is off): nothing to find.
    if revnat.keys().next().is_none() {
        return Ok(0);
    }
    let stale_backends: HashSet<(u32, u16)> = stale.iter().map(|s| s.backend_be).collect();
    let netlink = connect()?;
    let mut destroyed = 0;
    for id in udp_sockets(&netlink)? {
        let (IpAddr::V4(dst), IpAddr::V4(_)) = (id.destination_address, id.source_address) else {
            continue;
        };
        let backend_be = (u32::from_ne_bytes(dst.octets()), id.destination_port.to_be());
        // Only sockets connected to a stale backend are worth a map lookup.
        if !stale_backends.contains(&backend_be) {
            continue;
        }
        let key = SockRevNatKey {
            cookie: u64::from_ne_bytes(id.cookie),
            address_be: backend_be.0,
            port_be: backend_be.1,
            _pad: 0,
        };
        let Ok(entry) = revnat.get(&key, 0) else { continue };
        let frontend_be = (entry.address_be, entry.port_be);
        if stale.contains(&StaleUdpBackend { frontend_be, backend_be }) {
            destroy(&netlink, id)?;
            destroyed += 1;
        }
    }
    Ok(destroyed)
}

fn connect() -> anyhow::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag netlink socket")?;
    socket.bind_auto().context("binding the netlink socket")?;
    socket.connect(&SocketAddr::new(0, 0)).context("connecting the netlink socket")?;
    Ok(socket)
}

fn send<T: NetlinkSerializable>(socket: &Socket, flags: u16, payload: T) -> anyhow::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0).context("sending to sock_diag")?;
    Ok(())
}

fn request(socket_id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family: AF_INET,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    })
}

/// Every IPv4 UDP socket of the current network namespace.
fn udp_sockets(socket: &Socket) -> anyhow::Result<Vec<SocketId>> {
    send(socket, NLM_F_REQUEST | NLM_F_DUMP, request(SocketId::new_v4()))?;
    let mut sockets = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0).context("reading the socket dump")?;
        let mut offset = 0;
        while offset < size {
            let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&buf[offset..size])
                .context("decoding the socket dump")?;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    sockets.push(response.header.socket_id.clone());
                }
                NetlinkPayload::Done(_) => return Ok(sockets),
                NetlinkPayload::Error(err) if err.code.is_some() => {
                    bail!("socket dump failed: {err:?}")
                }
                _ => {}
            }
            if message.header.length == 0 {
                break;
            }
            offset += message.header.length as usize;
        }
    }
}

/// `SOCK_DESTROY` of one socket (identified with its cookie, so a socket
/// that reused the tuple is not hit).
fn destroy(socket: &Socket, id: SocketId) -> anyhow::Result<()> {
    send(socket, NLM_F_REQUEST | NLM_F_ACK, SockDiagDestroy::new(request(id)))?;
    let mut buf = vec![0u8; 8192];
    let size = socket.recv(&mut &mut buf[..], 0).context("reading the destroy acknowledgement")?;
    let message = <NetlinkMessage<SockDiagDestroy>>::deserialize(&buf[..size])
        .context("decoding the destroy acknowledgement")?;
    match message.payload {
        // A socket that closed meanwhile is gone anyway.
        NetlinkPayload::Error(err) if err.code.is_some_and(|c| c.get() != -libc::ENOENT) => {
            bail!("destroying a socket failed: {err:?}")
        }
        _ => Ok(()),
    }
}
