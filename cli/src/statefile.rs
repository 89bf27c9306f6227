//! The agent's state file (see agent/src/statefile.rs): names for what the
//! maps hold as numbers. Optional: without it the CLI prints numbers.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct Identity {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

impl Identity {
    /// `k8s:io.kubernetes.pod.namespace=NS,k8s:k=v` (Cilium's spelling).
    pub fn labels_string(&self) -> String {
        let mut s = format!("k8s:io.kubernetes.pod.namespace={}", self.namespace);
        for (k, v) in &self.labels {
            s.push_str(&format!(",k8s:{k}={v}"));
        }
        s
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct Endpoint {
    pub pod: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct State {
    #[serde(default)]
    pub identities: BTreeMap<u32, Identity>,
    #[serde(default)]
    pub cidr_identities: BTreeMap<u32, String>,
    #[serde(default)]
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    #[serde(default)]
    pub rules: Vec<String>,
}

/// `/run/weir/<last component of the bpffs root>/state.json`.
fn path(bpffs_root: &Path) -> PathBuf {
    let name =
        bpffs_root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "weir".into());
    Path::new("/run/weir").join(name).join("state.json")
}

impl State {
    pub fn load(bpffs_root: &Path) -> Self {
        std::fs::read_to_string(path(bpffs_root))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default()
    }

    /// What an identity stands for, in words.
    pub fn describe(&self, identity: u32) -> String {
        match identity {
            0 => "ANY".to_owned(),
            1 => "reserved:host".to_owned(),
            2 => "reserved:world".to_owned(),
            id => {
                if let Some(identity) = self.identities.get(&id) {
                    identity.labels_string()
                } else if let Some(cidr) = self.cidr_identities.get(&id) {
                    format!("cidr:{cidr}")
                } else {
                    format!("identity:{id}")
                }
            }
        }
    }

    pub fn rule(&self, rule: u32) -> &str {
        rule.checked_sub(1).and_then(|i| self.rules.get(i as usize)).map_or("-", String::as_str)
    }
}
