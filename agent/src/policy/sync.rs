//! Writes the policy maps (ipcache, endpoints, policy entries) with the
//! fewest writes, from a mirror adopted from the maps at start: a label
//! change touches only the entries it changes, and a restart none.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnetwork::Ipv4Network;
use weir_abi::policy::{
    ENDPOINT_F_EGRESS_ISOLATED, ENDPOINT_F_INGRESS_ISOLATED, EndpointInfo, POLICY_F_ALLOW,
    POLICY_PREFIX_NO_PORT, PolicyEntry, PolicyKey,
};

use super::compute::DesiredPolicy;
use crate::lb::sync::MapWriteError;

pub trait PolicyMaps {
    fn put_ipcache(&mut self, prefix: Ipv4Network, identity: u32) -> Result<(), MapWriteError>;
    fn delete_ipcache(&mut self, prefix: Ipv4Network) -> Result<(), MapWriteError>;
    fn put_endpoint(&mut self, ip: Ipv4Addr, info: &EndpointInfo) -> Result<(), MapWriteError>;
    fn delete_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), MapWriteError>;
    fn put_policy(
        &mut self,
        key: &PolicyKey,
        prefix_len: u32,
        entry: &PolicyEntry,
    ) -> Result<(), MapWriteError>;
    fn delete_policy(&mut self, key: &PolicyKey, prefix_len: u32) -> Result<(), MapWriteError>;
}

#[derive(Debug, Default)]
pub struct PolicySyncReport {
    pub writes: usize,
    pub deletes: usize,
    pub errors: Vec<MapWriteError>,
}

/// Mirror of the policy maps as written.
#[derive(Debug, Default)]
pub struct PolicyState {
    ipcache: BTreeMap<Ipv4Network, u32>,
    endpoints: BTreeMap<Ipv4Addr, EndpointInfo>,
    policy: BTreeMap<(PolicyKey, u32), PolicyEntry>,
}

impl PolicyState {
    pub fn adopt(
        ipcache: impl IntoIterator<Item = (Ipv4Network, u32)>,
        endpoints: impl IntoIterator<Item = (Ipv4Addr, EndpointInfo)>,
        policy: impl IntoIterator<Item = ((PolicyKey, u32), PolicyEntry)>,
    ) -> Self {
        Self {
            ipcache: ipcache.into_iter().collect(),
            endpoints: endpoints.into_iter().collect(),
            policy: policy.into_iter().collect(),
        }
    }

    /// Endpoint ids stay with their pod IP; new endpoints get the lowest free id.
    fn endpoint_ids(&self, desired: &DesiredPolicy) -> BTreeMap<Ipv4Addr, u32> {
        let mut used: BTreeSet<u32> = BTreeSet::new();
        let mut ids = BTreeMap::new();
        for ip in desired.endpoints.keys() {
            if let Some(info) = self.endpoints.get(ip) {
                ids.insert(*ip, info.endpoint_id);
                used.insert(info.endpoint_id);
            }
        }
        let mut next = 1;
        for ip in desired.endpoints.keys() {
            if ids.contains_key(ip) {
                continue;
            }
            while used.contains(&next) {
                next += 1;
            }
            used.insert(next);
            ids.insert(*ip, next);
        }
        ids
    }

    pub fn reconcile(&mut self, desired: &DesiredPolicy, maps: &mut impl PolicyMaps) -> PolicySyncReport {
        let mut report = PolicySyncReport::default();
        let ids = self.endpoint_ids(desired);
        let mut want_endpoints = BTreeMap::new();
        let mut want_policy = BTreeMap::new();
        for (ip, ep) in &desired.endpoints {
            let endpoint_id = ids[ip];
            let mut flags = 0;
            if ep.ingress_isolated {
                flags |= ENDPOINT_F_INGRESS_ISOLATED;
            }
            if ep.egress_isolated {
                flags |= ENDPOINT_F_EGRESS_ISOLATED;
            }
            want_endpoints.insert(*ip, EndpointInfo { endpoint_id, identity: ep.identity, flags, _pad: 0 });
            for (entry, rule) in &ep.entries {
                let key = PolicyKey {
                    endpoint_id,
                    direction: entry.direction,
                    proto: entry.proto,
                    _pad: [0; 2],
                    identity: entry.identity,
                    dport_be: entry.port.port.to_be(),
                    _pad2: [0; 2],
                };
                let prefix_len = POLICY_PREFIX_NO_PORT + u32::from(entry.port.bits);
                want_policy.insert((key, prefix_len), PolicyEntry { flags: POLICY_F_ALLOW, rule: *rule });
            }
        }

        // Additions first, in the order that never denies what stays
        // allowed: peers' identities, then allow entries, then the
        // endpoints' isolation flags; removals after, in reverse.
        for (prefix, id) in &desired.ipcache {
            if self.ipcache.get(prefix) != Some(id) {
                match maps.put_ipcache(*prefix, *id) {
                    Ok(()) => {
                        report.writes += 1;
                        self.ipcache.insert(*prefix, *id);
                    }
                    Err(e) => report.errors.push(e),
                }
            }
        }
        for ((key, len), entry) in &want_policy {
            if self.policy.get(&(*key, *len)) != Some(entry) {
                match maps.put_policy(key, *len, entry) {
                    Ok(()) => {
                        report.writes += 1;
                        self.policy.insert((*key, *len), *entry);
                    }
                    Err(e) => report.errors.push(e),
                }
            }
        }
        for (ip, info) in &want_endpoints {
            if self.endpoints.get(ip) != Some(info) {
                match maps.put_endpoint(*ip, info) {
                    Ok(()) => {
                        report.writes += 1;
                        self.endpoints.insert(*ip, *info);
                    }
                    Err(e) => report.errors.push(e),
                }
            }
        }
        let stale: Vec<(PolicyKey, u32)> =
            self.policy.keys().filter(|k| !want_policy.contains_key(k)).copied().collect();
        for (key, len) in stale {
            match maps.delete_policy(&key, len) {
                Ok(()) => {
                    report.deletes += 1;
                    self.policy.remove(&(key, len));
                }
                Err(e) => report.errors.push(e),
            }
        }
        let stale: Vec<Ipv4Addr> =
            self.endpoints.keys().filter(|ip| !want_endpoints.contains_key(ip)).copied().collect();
        for ip in stale {
            match maps.delete_endpoint(ip) {
                Ok(()) => {
                    report.deletes += 1;
                    self.endpoints.remove(&ip);
                }
                Err(e) => report.errors.push(e),
            }
        }
        let stale: Vec<Ipv4Network> =
            self.ipcache.keys().filter(|p| !desired.ipcache.contains_key(p)).copied().collect();
        for prefix in stale {
            match maps.delete_ipcache(prefix) {
                Ok(()) => {
                    report.deletes += 1;
                    self.ipcache.remove(&prefix);
                }
                Err(e) => report.errors.push(e),
            }
        }
        report
    }

    /// Endpoint id by pod IP, as written.
    pub fn endpoints(&self) -> &BTreeMap<Ipv4Addr, EndpointInfo> {
        &self.endpoints
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{
        compute::{EntryKey, LocalEndpoint},
        ports::PortPrefix,
    };

    #[derive(Default)]
    struct MemMaps {
        ipcache: BTreeMap<Ipv4Network, u32>,
        endpoints: BTreeMap<Ipv4Addr, EndpointInfo>,
        policy: BTreeMap<(PolicyKey, u32), PolicyEntry>,
        writes: usize,
    }

    impl PolicyMaps for MemMaps {
        fn put_ipcache(&mut self, prefix: Ipv4Network, identity: u32) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.ipcache.insert(prefix, identity);
            Ok(())
        }
        fn delete_ipcache(&mut self, prefix: Ipv4Network) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.ipcache.remove(&prefix);
            Ok(())
        }
        fn put_endpoint(&mut self, ip: Ipv4Addr, info: &EndpointInfo) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.endpoints.insert(ip, *info);
            Ok(())
        }
        fn delete_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.endpoints.remove(&ip);
            Ok(())
        }
        fn put_policy(
            &mut self,
            key: &PolicyKey,
            len: u32,
            entry: &PolicyEntry,
        ) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.policy.insert((*key, len), *entry);
            Ok(())
        }
        fn delete_policy(&mut self, key: &PolicyKey, len: u32) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.policy.remove(&(*key, len));
            Ok(())
        }
    }

    fn desired(entries: &[(u32, u16)]) -> DesiredPolicy {
        let mut d = DesiredPolicy::default();
        let ip: Ipv4Addr = "10.244.0.2".parse().unwrap();
        d.ipcache.insert(Ipv4Network::from(ip), 300);
        let entries = entries
            .iter()
            .map(|(identity, port)| {
                (
                    EntryKey {
                        direction: 0,
                        proto: 6,
                        identity: *identity,
                        port: PortPrefix { port: *port, bits: 16 },
                    },
                    1,
                )
            })
            .collect();
        d.endpoints.insert(
            ip,
            LocalEndpoint {
                pod: "x/a".into(),
                identity: 300,
                ingress_isolated: true,
                entries,
                ..Default::default()
            },
        );
        d
    }

    #[test]
    fn one_change_one_write_and_restart_writes_nothing() {
        let mut maps = MemMaps::default();
        let mut state = PolicyState::default();
        state.reconcile(&desired(&[(301, 80), (302, 80)]), &mut maps);
        assert_eq!((maps.ipcache.len(), maps.endpoints.len(), maps.policy.len()), (1, 1, 2));
        let before = maps.writes;
        state.reconcile(&desired(&[(301, 80), (302, 80), (303, 80)]), &mut maps);
        assert_eq!(maps.writes - before, 1, "one new peer identity is one policy write");
        let before = maps.writes;
        state.reconcile(&desired(&[(301, 80), (303, 80)]), &mut maps);
        assert_eq!(maps.writes - before, 1);

        let mut restarted =
            PolicyState::adopt(maps.ipcache.clone(), maps.endpoints.clone(), maps.policy.clone());
        let before = maps.writes;
        let report = restarted.reconcile(&desired(&[(301, 80), (303, 80)]), &mut maps);
        assert_eq!((maps.writes - before, report.writes, report.deletes), (0, 0, 0));
    }
}
