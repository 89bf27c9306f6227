//! `weir policy get`, `weir ipcache list`, `weir identity list`: the policy
//! maps, with names from the agent's state file where it has them.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::bail;
use aya::maps::{HashMap, MapData, PerCpuHashMap, lpm_trie::LpmTrie};
use serde::Serialize;
use weir_abi::{
    map_name,
    metrics::{Counter, reason_name},
    policy::{
        DIRECTION_INGRESS, ENDPOINT_F_EGRESS_ISOLATED, ENDPOINT_F_INGRESS_ISOLATED, EndpointInfo,
        EndpointMetricKey, IpcacheEntry, IpcacheKey, POLICY_PREFIX_NO_PORT, PolicyEntry, PolicyKey,
    },
    proto,
};

use crate::{
    maps::open,
    output::{Format, print_json},
    statefile::State,
};

#[derive(Debug, Serialize)]
struct EntryRow {
    direction: &'static str,
    identity: u32,
    labels: String,
    protocol: &'static str,
    /// `None`: any port.
    port_first: Option<u16>,
    port_last: Option<u16>,
    rule: String,
}

#[derive(Debug, Serialize)]
struct DropRow {
    code: u32,
    reason: &'static str,
    packets: u64,
}

#[derive(Debug, Serialize)]
struct EndpointRow {
    pod: String,
    ip: Ipv4Addr,
    endpoint_id: u32,
    identity: u32,
    ingress_enforced: bool,
    egress_enforced: bool,
    entries: Vec<EntryRow>,
    drops: Vec<DropRow>,
}

fn port_range(key: &PolicyKey, prefix_len: u32) -> (Option<u16>, Option<u16>) {
    let bits = prefix_len.saturating_sub(POLICY_PREFIX_NO_PORT).min(16);
    if bits == 0 {
        return (None, None);
    }
    let first = u16::from_be(key.dport_be);
    (Some(first), Some(first | u16::MAX.checked_shr(bits).unwrap_or(0)))
}

pub fn get(root: &Path, filter: Option<&str>, format: Format) -> anyhow::Result<()> {
    let endpoints: HashMap<MapData, u32, EndpointInfo> = open(root, map_name::ENDPOINTS)?;
    let policy: LpmTrie<MapData, PolicyKey, PolicyEntry> = open(root, map_name::POLICY)?;
    let drops: PerCpuHashMap<MapData, EndpointMetricKey, Counter> = open(root, map_name::ENDPOINT_METRICS)?;
    let state = State::load(root);

    let mut entries: BTreeMap<u32, Vec<(PolicyKey, u32, PolicyEntry)>> = BTreeMap::new();
    for item in policy.iter() {
        let (key, value) = item?;
        entries.entry(key.data().endpoint_id).or_default().push((key.data(), key.prefix_len(), value));
    }
    let mut drop_rows: BTreeMap<u32, Vec<DropRow>> = BTreeMap::new();
    for item in drops.iter() {
        let (key, per_cpu) = item?;
        let packets = per_cpu.iter().map(|c| c.packets).sum();
        drop_rows.entry(key.endpoint_id).or_default().push(DropRow {
            code: key.reason,
            reason: reason_name(key.reason),
            packets,
        });
    }

    let mut rows = Vec::new();
    for item in endpoints.iter() {
        let (ip_be, info) = item?;
        let ip = Ipv4Addr::from(ip_be.to_ne_bytes());
        let pod = state.endpoints.get(&ip).map_or_else(|| "?".to_owned(), |e| e.pod.clone());
        if let Some(filter) = filter
            && filter != pod
            && filter != ip.to_string()
        {
            continue;
        }
        let mut endpoint_entries: Vec<EntryRow> = entries
            .remove(&info.endpoint_id)
            .unwrap_or_default()
            .into_iter()
            .map(|(key, prefix_len, value)| {
                let (port_first, port_last) = port_range(&key, prefix_len);
                EntryRow {
                    direction: if key.direction == DIRECTION_INGRESS { "Ingress" } else { "Egress" },
                    identity: key.identity,
                    labels: state.describe(key.identity),
                    protocol: proto::name(key.proto),
                    port_first,
                    port_last,
                    rule: state.rule(value.rule).to_owned(),
                }
            })
            .collect();
        endpoint_entries.sort_by(|a, b| {
            (a.direction, a.identity, a.port_first).cmp(&(b.direction, b.identity, b.port_first))
        });
        rows.push(EndpointRow {
            pod,
            ip,
            endpoint_id: info.endpoint_id,
            identity: info.identity,
            ingress_enforced: info.flags & ENDPOINT_F_INGRESS_ISOLATED != 0,
            egress_enforced: info.flags & ENDPOINT_F_EGRESS_ISOLATED != 0,
            entries: endpoint_entries,
            drops: drop_rows.remove(&info.endpoint_id).unwrap_or_default(),
        });
    }
    rows.sort_by(|a, b| a.pod.cmp(&b.pod));
    if let Some(filter) = filter
        && rows.is_empty()
    {
        bail!("no local endpoint {filter} (give NAMESPACE/POD or its IP)");
    }

    match format {
        Format::Json => print_json(&rows),
        Format::Table => {
            for row in &rows {
                let mode = |on: bool| if on { "enforced" } else { "allow-all (not selected by any policy)" };
                println!(
                    "Endpoint {} ({}) id={} identity={}\n  ingress: {}\n  egress:  {}",
                    row.pod,
                    row.ip,
                    row.endpoint_id,
                    row.identity,
                    mode(row.ingress_enforced),
                    mode(row.egress_enforced)
                );
                if !row.entries.is_empty() {
                    println!(
                        "  {:<7} {:<10} {:<12} {:<60} RULE",
                        "POLICY", "DIRECTION", "PORT/PROTO", "LABELS (source:key[=value])"
                    );
                }
                for e in &row.entries {
                    let port = match (e.port_first, e.port_last) {
                        (Some(a), Some(b)) if a == b => format!("{a}/{}", e.protocol),
                        (Some(a), Some(b)) => format!("{a}-{b}/{}", e.protocol),
                        _ => format!("ANY/{}", e.protocol),
                    };
                    println!("  {:<7} {:<10} {:<12} {:<60} {}", "Allow", e.direction, port, e.labels, e.rule);
                }
                for d in &row.drops {
                    println!("  dropped: {} ({}) packets={}", d.reason, d.code, d.packets);
                }
                println!();
            }
            Ok(())
        }
    }
}

#[derive(Debug, Serialize)]
struct IpcacheRow {
    prefix: String,
    identity: u32,
    labels: String,
}

pub fn ipcache_list(root: &Path, format: Format) -> anyhow::Result<()> {
    let ipcache: LpmTrie<MapData, IpcacheKey, IpcacheEntry> = open(root, map_name::IPCACHE)?;
    let state = State::load(root);
    let mut rows = Vec::new();
    for item in ipcache.iter() {
        let (key, value) = item?;
        let addr = Ipv4Addr::from(key.data().address_be.to_ne_bytes());
        rows.push((
            (u32::from(addr), key.prefix_len()),
            IpcacheRow {
                prefix: format!("{addr}/{}", key.prefix_len()),
                identity: value.identity,
                labels: state.describe(value.identity),
            },
        ));
    }
    rows.sort_by_key(|(k, _)| *k);
    let rows: Vec<IpcacheRow> = rows.into_iter().map(|(_, r)| r).collect();
    match format {
        Format::Json => print_json(&rows),
        Format::Table => {
            println!("{:<20} {:<10} LABELS", "IP PREFIX/ADDRESS", "IDENTITY");
            for r in &rows {
                println!("{:<20} {:<10} {}", r.prefix, r.identity, r.labels);
            }
            Ok(())
        }
    }
}

#[derive(Debug, Serialize)]
struct IdentityRow {
    identity: u32,
    labels: String,
}

pub fn identity_list(root: &Path, format: Format) -> anyhow::Result<()> {
    let state = State::load(root);
    let mut rows: Vec<IdentityRow> = [1, 2]
        .into_iter()
        .chain(state.identities.keys().copied())
        .chain(state.cidr_identities.keys().copied())
        .map(|identity| IdentityRow { identity, labels: state.describe(identity) })
        .collect();
    rows.sort_by_key(|r| r.identity);
    match format {
        Format::Json => print_json(&rows),
        Format::Table => {
            println!("{:<10} LABELS", "ID");
            for r in &rows {
                println!("{:<10} {}", r.identity, r.labels);
            }
            Ok(())
        }
    }
}
