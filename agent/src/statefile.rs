//! What the maps cannot say by themselves — which namespace and labels an
//! identity stands for, which pod an endpoint is, which policy rule an entry
//! came from — written for `weir` to read, also while the agent is down.
//! bpffs holds only BPF objects, so the file lives under /run/weir/<name of
//! the bpffs root>/state.json; the CLI derives the same path.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::Serialize;
use weir_abi::policy::EndpointInfo;

use crate::policy::{compute::DesiredPolicy, identity::IdentityKey};

/// `/run/weir/<last component of the bpffs root>/state.json`.
pub fn path(bpffs_root: &Path) -> PathBuf {
    let name =
        bpffs_root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "weir".into());
    Path::new("/run/weir").join(name).join("state.json")
}

#[derive(Serialize)]
struct Endpoint<'a> {
    pod: &'a str,
    endpoint_id: u32,
    identity: u32,
    ingress_isolated: bool,
    egress_isolated: bool,
}

#[derive(Serialize)]
struct State<'a> {
    node: &'a str,
    identities: &'a BTreeMap<u32, IdentityKey>,
    cidr_identities: BTreeMap<u32, String>,
    endpoints: BTreeMap<Ipv4Addr, Endpoint<'a>>,
    /// Rule id n is `rules[n - 1]`.
    rules: &'a [String],
}

pub fn render(node: &str, desired: &DesiredPolicy, written: &BTreeMap<Ipv4Addr, EndpointInfo>) -> String {
    let endpoints = desired
        .endpoints
        .iter()
        .filter_map(|(ip, ep)| {
            let info = written.get(ip)?;
            Some((
                *ip,
                Endpoint {
                    pod: &ep.pod,
                    endpoint_id: info.endpoint_id,
                    identity: ep.identity,
                    ingress_isolated: ep.ingress_isolated,
                    egress_isolated: ep.egress_isolated,
                },
            ))
        })
        .collect();
    let state = State {
        node,
        identities: &desired.identities,
        cidr_identities: desired.cidr_identities.iter().map(|(id, c)| (*id, c.to_string())).collect(),
        endpoints,
        rules: &desired.rules,
    };
    serde_json::to_string_pretty(&state).unwrap_or_default()
}

/// Atomically replaces the state file.
pub fn write(bpffs_root: &Path, content: &str) -> anyhow::Result<()> {
    let path = path(bpffs_root);
    let dir = path.parent().context("state path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))
}
