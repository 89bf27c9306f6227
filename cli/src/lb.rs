//! `weir lb list`: one row per frontend with its backends, like `cilium bpf lb list`.

use std::{collections::BTreeMap, path::Path};

use aya::maps::{HashMap, MapData};
use serde::Serialize;
use weir_abi::{
    lb::{
        BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING, Backend, SCOPE_INTERNAL, SVC_FLAG_AFFINITY,
        SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL, SVC_FLAG_LOADBALANCER, SVC_FLAG_LOCAL, SVC_FLAG_MAGLEV,
        SVC_FLAG_NODEPORT, SVC_FLAG_SOURCE_RANGES, Service, ServiceKey, SlotKey,
    },
    map_name, proto,
};

use crate::{
    maps::open,
    output::{Endpoint, Format, print_json},
};

#[derive(Debug, Serialize)]
struct Frontend {
    address: std::net::Ipv4Addr,
    port: u16,
    protocol: &'static str,
}

#[derive(Debug, Serialize)]
struct BackendRow {
    slot: u32,
    backend_id: u32,
    address: std::net::Ipv4Addr,
    port: u16,
    protocol: &'static str,
    state: &'static str,
}

#[derive(Debug, Serialize)]
struct ServiceRow {
    service_id: u32,
    frontend: Frontend,
    flags: Vec<&'static str>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    affinity_timeout_seconds: Option<u32>,
    backends: Vec<BackendRow>,
}

fn state_name(state: u8) -> &'static str {
    match state {
        BACKEND_STATE_ACTIVE => "active",
        BACKEND_STATE_TERMINATING => "terminating",
        _ => "unknown",
    }
}

pub fn list(root: &Path, format: Format) -> anyhow::Result<()> {
    let services: HashMap<MapData, ServiceKey, Service> = open(root, map_name::SERVICES)?;
    let slots: HashMap<MapData, SlotKey, u32> = open(root, map_name::SLOTS)?;
    let backends: HashMap<MapData, u32, Backend> = open(root, map_name::BACKENDS)?;
    let slots: BTreeMap<SlotKey, u32> = slots.iter().collect::<Result<_, _>>()?;
    let backends: BTreeMap<u32, Backend> = backends.iter().collect::<Result<_, _>>()?;

    let mut rows = Vec::new();
    for entry in services.iter() {
        let (key, svc) = entry?;
        let backends = (1..=u32::from(svc.count))
            .filter_map(|slot| {
                let id = *slots.get(&SlotKey { service_id: svc.service_id, slot })?;
                let be = backends.get(&id)?;
                let ep = Endpoint::from_be(be.address_be, be.port_be);
                Some(BackendRow {
                    slot,
                    backend_id: id,
                    address: ep.address,
                    port: ep.port,
                    protocol: proto::name(be.proto),
                    state: state_name(be.state),
                })
            })
            .collect();
        let ep = Endpoint::from_be(key.address_be, key.port_be);
        let mut flags = Vec::new();
        if svc.flags & SVC_FLAG_CLUSTER_IP != 0 {
            flags.push("ClusterIP");
        }
        if svc.flags & SVC_FLAG_NODEPORT != 0 {
            flags.push("NodePort");
        }
        if svc.flags & SVC_FLAG_LOADBALANCER != 0 {
            flags.push("LoadBalancer");
        } else if svc.flags & SVC_FLAG_EXTERNAL != 0 {
            flags.push("ExternalIP");
        }
        // The traffic policy that applies here: internal for a ClusterIP,
        // external for the rest (Cilium prints "Local" likewise).
        if svc.flags & SVC_FLAG_LOCAL != 0 {
            flags.push(if svc.flags & SVC_FLAG_CLUSTER_IP != 0 { "InternalLocal" } else { "ExternalLocal" });
        }
        // The in-cluster twin of an externalTrafficPolicy=Local address.
        if key.scope == SCOPE_INTERNAL {
            flags.push("internal");
        }
        if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 {
            flags.push("SourceRanges");
        }
        if svc.flags & SVC_FLAG_MAGLEV != 0 {
            flags.push("Maglev");
        }
        let affinity = svc.flags & SVC_FLAG_AFFINITY != 0;
        if affinity {
            flags.push("SessionAffinity");
        }
        rows.push(ServiceRow {
            service_id: svc.service_id,
            frontend: Frontend { address: ep.address, port: ep.port, protocol: proto::name(key.proto) },
            flags,
            affinity_timeout_seconds: affinity.then_some(svc.affinity_timeout),
            backends,
        });
    }
    rows.sort_by_key(|r| {
        (r.frontend.address, r.frontend.port, r.frontend.protocol, r.flags.contains(&"internal"))
    });

    match format {
        Format::Json => print_json(&rows),
        Format::Table => {
            println!("{:<28} {:<40} {:>4}", "SERVICE ADDRESS", "BACKEND ADDRESS (SERVICE ID) (SLOT)", "");
            for row in &rows {
                let frontend =
                    format!("{}:{}/{}", row.frontend.address, row.frontend.port, row.frontend.protocol);
                println!(
                    "{:<28} 0.0.0.0:0 ({}) (0) [{}] backends={}",
                    frontend,
                    row.service_id,
                    row.flags.join(", "),
                    row.backends.len()
                );
                for be in &row.backends {
                    println!(
                        "{:<28} {}:{}/{} ({}) ({}) {}",
                        "", be.address, be.port, be.protocol, row.service_id, be.slot, be.state
                    );
                }
            }
            Ok(())
        }
    }
}
