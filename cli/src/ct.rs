//! `weir ct list`: the conntrack table, like `cilium bpf ct list global`.

use std::path::Path;

use aya::maps::{HashMap, MapData};
use nix::time::{ClockId, clock_gettime};
use serde::Serialize;
use weir_abi::{
    ct::{
        CT_F_HAIRPIN, CT_F_NORTH_SOUTH, CT_F_RX_CLOSING, CT_F_SNAT, CT_F_TX_CLOSING, CT_KIND_FLOW,
        CT_KIND_INGRESS, CT_KIND_NAT_REPLY, CT_KIND_SERVICE, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CtEntry,
        CtKey,
    },
    map_name, proto,
};

use crate::{
    maps::open,
    output::{Endpoint, Format, print_json},
};

#[derive(Debug, Serialize)]
struct CtRow {
    kind: &'static str,
    protocol: &'static str,
    source: Endpoint,
    destination: Endpoint,
    state: &'static str,
    expires_in_seconds: i64,
    nat: Endpoint,
    client_address: Option<std::net::Ipv4Addr>,
    service_id: u32,
    backend_id: u32,
    flags: Vec<&'static str>,
    tx_packets: u64,
    tx_bytes: u64,
    rx_packets: u64,
    rx_bytes: u64,
    tx_flags_seen: u8,
    rx_flags_seen: u8,
}

fn row(key: &CtKey, entry: &CtEntry, now: i64) -> CtRow {
    let mut flags = Vec::new();
    for (bit, name) in [
        (CT_F_HAIRPIN, "hairpin"),
        (CT_F_TX_CLOSING, "tx-closing"),
        (CT_F_RX_CLOSING, "rx-closing"),
        (CT_F_SNAT, "snat"),
        (CT_F_NORTH_SOUTH, "north-south"),
    ] {
        if entry.flags & bit != 0 {
            flags.push(name);
        }
    }
    let hairpin = entry.flags & CT_F_HAIRPIN != 0;
    CtRow {
        kind: match key.kind {
            CT_KIND_SERVICE => "service",
            CT_KIND_FLOW => "flow",
            CT_KIND_INGRESS => "ingress",
            CT_KIND_NAT_REPLY => "nat-reply",
            _ => "unknown",
        },
        protocol: proto::name(key.proto),
        source: Endpoint::from_be(key.saddr_be, key.sport_be),
        destination: Endpoint::from_be(key.daddr_be, key.dport_be),
        state: match entry.state {
            CT_STATE_ESTABLISHED => "established",
            CT_STATE_CLOSING => "closing",
            _ => "new",
        },
        expires_in_seconds: i64::from(entry.expires) - now,
        nat: Endpoint::from_be(entry.nat_addr_be, entry.nat_port_be),
        client_address: (key.kind == CT_KIND_FLOW && hairpin)
            .then(|| entry.client_addr_be.to_ne_bytes().into()),
        service_id: entry.service_id,
        backend_id: entry.backend_id,
        flags,
        tx_packets: entry.tx_packets,
        tx_bytes: entry.tx_bytes,
        rx_packets: entry.rx_packets,
        rx_bytes: entry.rx_bytes,
        tx_flags_seen: entry.tx_flags_seen,
        rx_flags_seen: entry.rx_flags_seen,
    }
}

pub fn list(root: &Path, format: Format) -> anyhow::Result<()> {
    let map: HashMap<MapData, CtKey, CtEntry> = open(root, map_name::CONNTRACK)?;
    // The datapath stamps expiry in CLOCK_MONOTONIC seconds.
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC)?.tv_sec();
    let mut rows: Vec<CtRow> = map.iter().flatten().map(|(k, v)| row(&k, &v, now)).collect();
    rows.sort_by(|a, b| (&a.source, &a.destination, a.kind).cmp(&(&b.source, &b.destination, b.kind)));
    match format {
        Format::Json => print_json(&rows),
        Format::Table => {
            for r in &rows {
                let via = match r.kind {
                    "service" => format!("backend={}", r.nat),
                    "flow" if r.service_id != 0 => format!("RevNAT={}", r.nat),
                    _ => String::new(),
                };
                let client = r.client_address.map(|c| format!(" client={c}")).unwrap_or_default();
                println!(
                    "{} {} {} -> {} {} expires={}s {}{} ServiceID={} BackendID={} TxPackets={} TxBytes={} RxPackets={} RxBytes={} TxFlagsSeen={:#04x} RxFlagsSeen={:#04x} Flags=[{}]",
                    r.protocol,
                    r.kind.to_uppercase(),
                    r.source,
                    r.destination,
                    r.state,
                    r.expires_in_seconds,
                    via,
                    client,
                    r.service_id,
                    r.backend_id,
                    r.tx_packets,
                    r.tx_bytes,
                    r.rx_packets,
                    r.rx_bytes,
                    r.tx_flags_seen,
                    r.rx_flags_seen,
                    r.flags.join(" ")
                );
            }
            Ok(())
        }
    }
}

#[derive(Debug, Serialize)]
struct NatRow {
    protocol: &'static str,
    /// The client as it connected.
    client: Endpoint,
    /// The NodePort or external address it connected to.
    frontend: Endpoint,
    /// The backend (on another node) the connection goes to.
    backend: Endpoint,
    /// What the client's address and port were translated to.
    xlate_src: Endpoint,
    expires_in_seconds: i64,
}

/// `weir nat list`: the SNAT translations of north-south connections to
/// backends on other nodes, like `cilium bpf nat list`.
pub fn nat_list(root: &Path, format: Format) -> anyhow::Result<()> {
    let map: HashMap<MapData, CtKey, CtEntry> = open(root, map_name::CONNTRACK)?;
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC)?.tv_sec();
    let mut rows: Vec<NatRow> = map
        .iter()
        .flatten()
        .filter(|(k, v)| k.kind == CT_KIND_SERVICE && v.flags & CT_F_SNAT != 0)
        .map(|(k, v)| NatRow {
            protocol: proto::name(k.proto),
            client: Endpoint::from_be(k.saddr_be, k.sport_be),
            frontend: Endpoint::from_be(k.daddr_be, k.dport_be),
            backend: Endpoint::from_be(v.nat_addr_be, v.nat_port_be),
            xlate_src: Endpoint::from_be(v.client_addr_be, v.aux_port_be),
            expires_in_seconds: i64::from(v.expires) - now,
        })
        .collect();
    rows.sort_by(|a, b| (&a.client, &a.frontend).cmp(&(&b.client, &b.frontend)));
    match format {
        Format::Json => print_json(&rows),
        Format::Table => {
            for r in &rows {
                println!(
                    "{} OUT {} -> {} XLATE_SRC {} (via {}) expires={}s",
                    r.protocol, r.client, r.backend, r.xlate_src, r.frontend, r.expires_in_seconds
                );
            }
            Ok(())
        }
    }
}
