//! Brings the load-balancer maps from what they hold to what they should
//! hold with the fewest writes, in an order that never shows the datapath a
//! frontend pointing at a slot or backend that is not written yet.
//!
//! [`LbState`] mirrors the three maps exactly as written. It is rebuilt from
//! the maps themselves when the agent starts ([`LbState::adopt`]), so a
//! restarted agent keeps every service and backend id, and a reconciliation
//! that finds nothing to change writes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ipnetwork::Ipv4Network;

use tracing::warn;
use weir_abi::lb::{
    BACKEND_STATE_ACTIVE, BACKEND_STATE_TERMINATING, Backend, MaglevKey, SVC_FLAG_AFFINITY, SVC_FLAG_MAGLEV,
    Service, ServiceKey, SlotKey,
};

use super::{
    BackendAddr, Frontend, maglev,
    translate::{Desired, FrontendSpec},
};

/// A failed map write.
#[derive(Debug, thiserror::Error)]
#[error("{op} on map {map} failed: {reason}")]
pub struct MapWriteError {
    pub map: &'static str,
    pub op: &'static str,
    pub reason: String,
    /// The map has no room left (E2BIG): raise its size with the agent's flags.
    pub full: bool,
}

/// The writes a reconciliation needs. Deleting an absent key is not an error.
pub trait LbMaps {
    fn put_service(&mut self, key: &ServiceKey, value: &Service) -> Result<(), MapWriteError>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapWriteError>;
    fn put_slot(&mut self, key: &SlotKey, backend_id: u32) -> Result<(), MapWriteError>;
    fn delete_slot(&mut self, key: &SlotKey) -> Result<(), MapWriteError>;
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<(), MapWriteError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), MapWriteError>;
    fn put_source_range(&mut self, service_id: u32, range: Ipv4Network) -> Result<(), MapWriteError>;
    fn put_maglev(&mut self, key: MaglevKey, backend_id: u32) -> Result<(), MapWriteError>;
    fn delete_maglev(&mut self, key: MaglevKey) -> Result<(), MapWriteError>;
    fn delete_source_range(&mut self, service_id: u32, range: Ipv4Network) -> Result<(), MapWriteError>;
}

/// What one reconciliation did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub writes: usize,
    pub deletes: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Frontends that could not be fully programmed, with the reason. They
    /// are retried on the next reconciliation.
    pub errors: Vec<(String, MapWriteError)>,
}

#[derive(Debug, Clone)]
struct ServiceEntry {
    service_id: u32,
    /// The services-map value as written; `None` while only slots have been
    /// written (a new frontend, or one whose write failed).
    written: Option<Service>,
    /// Backend id per slot as written (index 0 = slot 1). Zero marks a slot
    /// found missing when adopting the maps.
    slots: Vec<u32>,
    /// The spec this frontend was last fully programmed from: a
    /// reconciliation that finds the same spec has nothing to do for it
    /// (with 10,000 services, one endpoint change touches one frontend's
    /// work, not every frontend's). `None` after adoption or a failure.
    applied: Option<FrontendSpec>,
}

/// Mirror of the load-balancer maps.
#[derive(Debug, Default)]
pub struct LbState {
    services: BTreeMap<ServiceKey, ServiceEntry>,
    /// Slots found in the maps for no known service (a crash mid-write).
    orphan_slots: Vec<SlotKey>,
    backends: HashMap<u32, Backend>,
    backend_ids: HashMap<BackendAddr, u32>,
    /// Every service id in use, for allocation in constant time.
    service_ids: HashSet<u32>,
    /// `loadBalancerSourceRanges` entries as written, by service id.
    source_ranges: BTreeMap<u32, BTreeSet<Ipv4Network>>,
    /// Maglev tables as written (backend id per entry), by service id.
    maglev: HashMap<u32, Vec<u32>>,
    /// Entries of each Maglev table (prime).
    maglev_table_size: u32,
    next_service_id: u32,
    next_backend_id: u32,
}

fn key_of(frontend: &Frontend) -> ServiceKey {
    ServiceKey::with_scope(
        u32::from_ne_bytes(frontend.address.octets()),
        frontend.port.to_be(),
        frontend.proto,
        frontend.scope,
    )
}

fn addr_of(backend: &Backend) -> BackendAddr {
    BackendAddr {
        address: backend.address_be.to_ne_bytes().into(),
        port: u16::from_be(backend.port_be),
        proto: backend.proto,
    }
}

impl LbState {
    /// Rebuilds the mirror from the maps' current content.
    pub fn adopt(
        services: impl IntoIterator<Item = (ServiceKey, Service)>,
        slots: impl IntoIterator<Item = (SlotKey, u32)>,
        backends: impl IntoIterator<Item = (u32, Backend)>,
        source_ranges: impl IntoIterator<Item = (u32, Ipv4Network)>,
        maglev: impl IntoIterator<Item = (MaglevKey, u32)>,
    ) -> Self {
        let mut state = Self { maglev_table_size: maglev::DEFAULT_TABLE_SIZE, ..Self::default() };
        let mut tables: HashMap<u32, BTreeMap<u32, u32>> = HashMap::new();
        for (key, id) in maglev {
            tables.entry(key.service_id).or_default().insert(key.index, id);
        }
        for (service_id, entries) in tables {
            // A table with a hole (a crash mid-write) is rewritten whole.
            let size = entries.len();
            let dense: Vec<u32> = (0..size as u32).map(|i| entries.get(&i).copied().unwrap_or(0)).collect();
            state.maglev.insert(service_id, dense);
        }
        for (service_id, range) in source_ranges {
            state.source_ranges.entry(service_id).or_default().insert(range);
        }
        let mut by_id: HashMap<u32, ServiceKey> = HashMap::new();
        for (key, svc) in services {
            by_id.insert(svc.service_id, key);
            state.service_ids.insert(svc.service_id);
            state.next_service_id = state.next_service_id.max(svc.service_id);
            state.services.insert(
                key,
                ServiceEntry {
                    service_id: svc.service_id,
                    written: Some(svc),
                    slots: vec![0; usize::from(svc.count)],
                    applied: None,
                },
            );
        }
        for (slot_key, backend_id) in slots {
            let entry = by_id.get(&slot_key.service_id).and_then(|key| state.services.get_mut(key));
            match entry {
                Some(entry) if slot_key.slot >= 1 && (slot_key.slot as usize) <= entry.slots.len() => {
                    entry.slots[slot_key.slot as usize - 1] = backend_id;
                }
                _ => state.orphan_slots.push(slot_key),
            }
        }
        for (id, backend) in backends {
            state.next_backend_id = state.next_backend_id.max(id);
            state.backend_ids.entry(addr_of(&backend)).or_insert(id);
            state.backends.insert(id, backend);
        }
        state
    }

    /// Sets the size of new and rewritten Maglev tables (a prime).
    pub fn set_maglev_table_size(&mut self, size: u32) {
        self.maglev_table_size = size;
    }

    /// The service id of a frontend, as written.
    pub fn service_id(&self, frontend: &Frontend) -> Option<u32> {
        self.services.get(&key_of(frontend)).map(|e| e.service_id)
    }

    /// Number of frontends and backends as written.
    pub fn len(&self) -> (usize, usize) {
        (self.services.len(), self.backends.len())
    }

    fn alloc_service_id(&mut self) -> u32 {
        loop {
            self.next_service_id = self.next_service_id.checked_add(1).unwrap_or(1);
            if self.service_ids.insert(self.next_service_id) {
                return self.next_service_id;
            }
        }
    }

    fn ensure_backend(
        &mut self,
        addr: BackendAddr,
        state: u8,
        maps: &mut impl LbMaps,
        report: &mut SyncReport,
    ) -> Result<u32, MapWriteError> {
        if let Some(id) = self.backend_ids.get(&addr).copied() {
            // Same backend, new state (a pod started terminating): one write.
            if let Some(backend) = self.backends.get_mut(&id)
                && backend.state != state
            {
                let updated = Backend { state, ..*backend };
                maps.put_backend(id, &updated)?;
                report.writes += 1;
                *backend = updated;
            }
            return Ok(id);
        }
        let id = loop {
            self.next_backend_id = self.next_backend_id.checked_add(1).unwrap_or(1);
            if !self.backends.contains_key(&self.next_backend_id) {
                break self.next_backend_id;
            }
        };
        let backend = Backend {
            address_be: u32::from_ne_bytes(addr.address.octets()),
            port_be: addr.port.to_be(),
            proto: addr.proto,
            state,
        };
        maps.put_backend(id, &backend)?;
        report.writes += 1;
        self.backends.insert(id, backend);
        self.backend_ids.insert(addr, id);
        Ok(id)
    }

    /// Makes the maps serve exactly `desired`. Frontends whose writes fail
    /// are reported and left as they were; everything else proceeds.
    pub fn reconcile(&mut self, desired: &Desired, maps: &mut impl LbMaps) -> SyncReport {
        let mut report = SyncReport::default();
        for (frontend, spec) in desired {
            let key = key_of(frontend);
            if self.services.get(&key).is_some_and(|e| e.applied.as_ref() == Some(spec)) {
                continue;
            }
            let result = self.sync_frontend(frontend, spec, maps, &mut report);
            if let Some(entry) = self.services.get_mut(&key) {
                entry.applied = result.is_ok().then(|| spec.clone());
            }
            if let Err(err) = result {
                report.errors.push((format!("{frontend} ({})", spec.service), err));
            }
        }

        let wanted: HashSet<ServiceKey> = desired.keys().map(key_of).collect();
        let stale: Vec<ServiceKey> = self.services.keys().filter(|k| !wanted.contains(k)).copied().collect();
        for key in stale {
            if let Err(err) = self.remove_frontend(&key, maps, &mut report) {
                report.errors.push((format!("removing {key:?}"), err));
            }
        }
        for slot in std::mem::take(&mut self.orphan_slots) {
            match maps.delete_slot(&slot) {
                Ok(()) => report.deletes += 1,
                Err(err) => {
                    self.orphan_slots.push(slot);
                    report.errors.push(("orphan slot".to_owned(), err));
                }
            }
        }
        // Maglev tables of no frontend: found in the maps at adoption (a crash
        // between writing a table and its service entry, or while removing
        // them). Gone before the backends they pin are weighed.
        let live: HashSet<u32> = self.services.values().map(|e| e.service_id).collect();
        let orphan_tables: Vec<u32> = self.maglev.keys().filter(|id| !live.contains(id)).copied().collect();
        for service_id in orphan_tables {
            if let Err(err) = self.remove_maglev_table(service_id, maps, &mut report) {
                report.errors.push((format!("orphan Maglev table of service {service_id}"), err));
            }
        }
        // Backends no slot or Maglev entry refers to any more go last, after
        // everything that pointed at them was rewritten. A fully programmed
        // frontend's table holds only backends of its slots; one left half
        // written by a failure may still point at its old backends.
        let complete: HashSet<u32> =
            self.services.values().filter(|e| e.applied.is_some()).map(|e| e.service_id).collect();
        let referenced: HashSet<u32> = self
            .services
            .values()
            .flat_map(|e| e.slots.iter().copied())
            .chain(
                self.maglev
                    .iter()
                    .filter(|(id, _)| !complete.contains(id))
                    .flat_map(|(_, t)| t.iter().copied()),
            )
            .collect();
        let unreferenced: Vec<u32> =
            self.backends.keys().filter(|id| !referenced.contains(id)).copied().collect();
        for id in unreferenced {
            match maps.delete_backend(id) {
                Ok(()) => {
                    report.deletes += 1;
                    if let Some(backend) = self.backends.remove(&id) {
                        let addr = addr_of(&backend);
                        if self.backend_ids.get(&addr) == Some(&id) {
                            self.backend_ids.remove(&addr);
                        }
                    }
                }
                Err(err) => report.errors.push((format!("backend {id}"), err)),
            }
        }
        (report.frontends, report.backends) = self.len();
        report
    }

    fn sync_frontend(
        &mut self,
        frontend: &Frontend,
        spec: &FrontendSpec,
        maps: &mut impl LbMaps,
        report: &mut SyncReport,
    ) -> Result<(), MapWriteError> {
        let (backends, state) =
            (&spec.backends, if spec.terminating { BACKEND_STATE_TERMINATING } else { BACKEND_STATE_ACTIVE });
        let key = key_of(frontend);
        if !self.services.contains_key(&key) {
            let service_id = self.alloc_service_id();
            self.services
                .insert(key, ServiceEntry { service_id, written: None, slots: Vec::new(), applied: None });
        }
        let mut want = Vec::with_capacity(backends.len());
        for addr in backends {
            want.push(self.ensure_backend(*addr, state, maps, report)?);
        }
        let entry = self.services.get_mut(&key).expect("inserted above");
        let target = slot_layout(&entry.slots, &want);
        let count = u16::try_from(target.len()).map_err(|_| MapWriteError {
            map: weir_abi::map_name::SERVICES,
            op: "update",
            reason: format!("{} backends exceed the {} slots a service can have", target.len(), u16::MAX),
            full: false,
        })?;

        // 1. Slots first: while they change, the old count still bounds what
        //    the datapath reads.
        for (i, id) in target.iter().enumerate() {
            if entry.slots.get(i) == Some(id) {
                continue;
            }
            maps.put_slot(&SlotKey { service_id: entry.service_id, slot: i as u32 + 1 }, *id)?;
            report.writes += 1;
            match entry.slots.get_mut(i) {
                Some(slot) => *slot = *id,
                None => entry.slots.push(*id),
            }
        }
        // 2. Then the count, which publishes the new slots or retires the tail.
        let (affinity_flag, affinity_timeout) = match spec.affinity_timeout {
            Some(timeout) => (SVC_FLAG_AFFINITY, timeout),
            None => (0, 0),
        };
        // Source ranges before the flag that makes the datapath read them.
        let service_id = entry.service_id;
        let written = self.source_ranges.entry(service_id).or_default();
        for range in &spec.source_ranges {
            if !written.contains(range) {
                maps.put_source_range(service_id, *range)?;
                report.writes += 1;
                written.insert(*range);
            }
        }
        // The Maglev table, likewise before the flag; built from backend
        // names so that every node builds the same one.
        let table_size =
            if self.maglev_table_size == 0 { maglev::DEFAULT_TABLE_SIZE } else { self.maglev_table_size };
        let maglev_size = if spec.maglev && !backends.is_empty() { table_size } else { 0 };
        // (Built only when the frontend's spec changed: `reconcile` skips
        // frontends programmed from the same spec.)
        let written = self.maglev.entry(service_id).or_default();
        if maglev_size != 0 {
            let ids: BTreeMap<String, u32> =
                backends.iter().zip(&want).map(|(addr, id)| (addr.to_string(), *id)).collect();
            let (names, ids): (Vec<String>, Vec<u32>) = ids.into_iter().unzip();
            let want_table = maglev::table(&names, maglev_size).into_iter().map(|i| ids[i]);
            for (index, id) in want_table.enumerate() {
                if written.get(index) != Some(&id) {
                    maps.put_maglev(MaglevKey { service_id, index: index as u32 }, id)?;
                    report.writes += 1;
                    match written.get_mut(index) {
                        Some(slot) => *slot = id,
                        None => written.push(id),
                    }
                }
            }
        }
        let entry = self.services.get_mut(&key).expect("inserted above");
        let value = Service {
            service_id: entry.service_id,
            count,
            flags: spec.flags | affinity_flag | if maglev_size != 0 { SVC_FLAG_MAGLEV } else { 0 },
            affinity_timeout,
            maglev_table_size: maglev_size,
        };
        if entry.written != Some(value) {
            maps.put_service(&key, &value)?;
            report.writes += 1;
            entry.written = Some(value);
        }
        let stale: Vec<Ipv4Network> = self.source_ranges[&service_id]
            .iter()
            .filter(|r| !spec.source_ranges.contains(r))
            .copied()
            .collect();
        for range in stale {
            maps.delete_source_range(service_id, range)?;
            report.deletes += 1;
            self.source_ranges.get_mut(&service_id).map(|set| set.remove(&range));
        }
        let written = self.maglev.entry(service_id).or_default();
        while written.len() > maglev_size as usize {
            let index = written.len() as u32 - 1;
            maps.delete_maglev(MaglevKey { service_id, index })?;
            report.deletes += 1;
            written.pop();
        }
        let entry = self.services.get_mut(&key).expect("inserted above");
        // 3. Then the slots beyond the count, which nothing reads any more.
        while entry.slots.len() > target.len() {
            let slot = entry.slots.len() as u32;
            maps.delete_slot(&SlotKey { service_id: entry.service_id, slot })?;
            report.deletes += 1;
            entry.slots.pop();
        }
        Ok(())
    }

    /// Deletes a Maglev table, last entry first (a failure leaves a shorter
    /// table that the next attempt continues).
    fn remove_maglev_table(
        &mut self,
        service_id: u32,
        maps: &mut impl LbMaps,
        report: &mut SyncReport,
    ) -> Result<(), MapWriteError> {
        while let Some(written) = self.maglev.get_mut(&service_id)
            && !written.is_empty()
        {
            maps.delete_maglev(MaglevKey { service_id, index: written.len() as u32 - 1 })?;
            report.deletes += 1;
            written.pop();
        }
        self.maglev.remove(&service_id);
        Ok(())
    }

    fn remove_frontend(
        &mut self,
        key: &ServiceKey,
        maps: &mut impl LbMaps,
        report: &mut SyncReport,
    ) -> Result<(), MapWriteError> {
        let Some(entry) = self.services.get_mut(key) else {
            return Ok(());
        };
        // Half removed, it must be programmed again if it comes back.
        entry.applied = None;
        if entry.written.is_some() {
            maps.delete_service(key)?;
            report.deletes += 1;
            entry.written = None;
        }
        while !entry.slots.is_empty() {
            let slot = entry.slots.len() as u32;
            maps.delete_slot(&SlotKey { service_id: entry.service_id, slot })?;
            report.deletes += 1;
            entry.slots.pop();
        }
        let service_id = entry.service_id;
        self.remove_maglev_table(service_id, maps, report)?;
        for range in self.source_ranges.remove(&service_id).unwrap_or_default() {
            if let Err(err) = maps.delete_source_range(service_id, range) {
                self.source_ranges.entry(service_id).or_default().insert(range);
                return Err(err);
            }
            report.deletes += 1;
        }
        if let Some(entry) = self.services.remove(key) {
            self.service_ids.remove(&entry.service_id);
        }
        Ok(())
    }
}

/// The new slot order: backends that stay keep their slot, holes left by
/// removed backends are filled from the tail (so at most one other backend
/// moves per removal), and new backends are appended.
fn slot_layout(current: &[u32], want: &[u32]) -> Vec<u32> {
    let wanted: HashSet<u32> = want.iter().copied().collect();
    let mut seen = HashSet::new();
    let mut slots = current.to_vec();
    let mut i = 0;
    while i < slots.len() {
        if wanted.contains(&slots[i]) && seen.insert(slots[i]) {
            i += 1;
        } else {
            slots.swap_remove(i);
        }
    }
    for id in want {
        if seen.insert(*id) {
            slots.push(*id);
        }
    }
    slots
}

/// Logs the outcome of a reconciliation that had errors.
pub fn log_errors(report: &SyncReport) {
    for (what, err) in &report.errors {
        if err.full {
            warn!(%what, error = %err, "map full: frontend not fully programmed; raise the map size");
        } else {
            warn!(%what, error = %err, "frontend not fully programmed; will retry");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// In-memory maps with the kernel's semantics that matter here: a
    /// capacity per map (E2BIG when full), and a count of every write.
    #[derive(Default)]
    struct MemMaps {
        services: BTreeMap<ServiceKey, Service>,
        slots: BTreeMap<SlotKey, u32>,
        backends: BTreeMap<u32, Backend>,
        service_capacity: Option<usize>,
        ranges: BTreeSet<(u32, Ipv4Network)>,
        maglev: BTreeMap<MaglevKey, u32>,
        /// Maglev entry writes that succeed before the next one fails.
        maglev_budget: Option<usize>,
        writes: usize,
    }

    fn full(map: &'static str) -> MapWriteError {
        MapWriteError { map, op: "update", reason: "E2BIG".into(), full: true }
    }

    impl LbMaps for MemMaps {
        fn put_service(&mut self, key: &ServiceKey, value: &Service) -> Result<(), MapWriteError> {
            if !self.services.contains_key(key) && Some(self.services.len()) == self.service_capacity {
                return Err(full("services"));
            }
            self.writes += 1;
            self.services.insert(*key, *value);
            Ok(())
        }
        fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.services.remove(key);
            Ok(())
        }
        fn put_slot(&mut self, key: &SlotKey, backend_id: u32) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.slots.insert(*key, backend_id);
            Ok(())
        }
        fn delete_slot(&mut self, key: &SlotKey) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.slots.remove(key);
            Ok(())
        }
        fn put_backend(&mut self, id: u32, value: &Backend) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.backends.insert(id, *value);
            Ok(())
        }
        fn delete_backend(&mut self, id: u32) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.backends.remove(&id);
            Ok(())
        }
        fn put_maglev(&mut self, key: MaglevKey, backend_id: u32) -> Result<(), MapWriteError> {
            match &mut self.maglev_budget {
                Some(0) => return Err(full("maglev")),
                Some(left) => *left -= 1,
                None => {}
            }
            self.writes += 1;
            self.maglev.insert(key, backend_id);
            Ok(())
        }
        fn delete_maglev(&mut self, key: MaglevKey) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.maglev.remove(&key);
            Ok(())
        }
        fn put_source_range(&mut self, service_id: u32, range: Ipv4Network) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.ranges.insert((service_id, range));
            Ok(())
        }
        fn delete_source_range(&mut self, service_id: u32, range: Ipv4Network) -> Result<(), MapWriteError> {
            self.writes += 1;
            self.ranges.remove(&(service_id, range));
            Ok(())
        }
    }

    impl MemMaps {
        /// What the datapath would serve: for each frontend, the backends
        /// reachable through slots 1..=count. Panics on a dangling reference.
        fn served(&self) -> BTreeMap<Frontend, BTreeSet<BackendAddr>> {
            self.services
                .iter()
                .map(|(key, svc)| {
                    let frontend = Frontend {
                        address: key.address_be.to_ne_bytes().into(),
                        port: u16::from_be(key.port_be),
                        proto: key.proto,
                        scope: key.scope,
                    };
                    let backends = (1..=u32::from(svc.count))
                        .map(|slot| {
                            let id = self.slots[&SlotKey { service_id: svc.service_id, slot }];
                            addr_of(&self.backends[&id])
                        })
                        .collect();
                    (frontend, backends)
                })
                .collect()
        }

        fn adopt(&self) -> LbState {
            LbState::adopt(
                self.services.iter().map(|(k, v)| (*k, *v)),
                self.slots.iter().map(|(k, v)| (*k, *v)),
                self.backends.iter().map(|(k, v)| (*k, *v)),
                self.ranges.iter().copied(),
                self.maglev.iter().map(|(k, v)| (*k, *v)),
            )
        }
    }

    fn frontend(ip: &str, port: u16) -> Frontend {
        Frontend { address: ip.parse().unwrap(), port, proto: 6, scope: 0 }
    }

    fn backends(n: impl IntoIterator<Item = u8>) -> BTreeSet<BackendAddr> {
        n.into_iter().map(|i| BackendAddr { address: [10, 244, 0, i].into(), port: 8080, proto: 6 }).collect()
    }

    fn desired(entries: &[(Frontend, BTreeSet<BackendAddr>)]) -> Desired {
        entries
            .iter()
            .map(|(f, b)| {
                (
                    *f,
                    FrontendSpec {
                        service: "default/svc".into(),
                        backends: b.clone(),
                        flags: weir_abi::lb::SVC_FLAG_CLUSTER_IP,
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    fn assert_serves(maps: &MemMaps, want: &Desired) {
        let served = maps.served();
        let want: BTreeMap<Frontend, BTreeSet<BackendAddr>> =
            want.iter().map(|(f, s)| (*f, s.backends.clone())).collect();
        assert_eq!(served, want);
        let referenced: BTreeSet<u32> = maps.slots.values().copied().collect();
        assert_eq!(referenced, maps.backends.keys().copied().collect(), "no unreferenced backend is left");
    }

    #[test]
    fn programs_from_scratch() {
        let (mut maps, mut state) = (MemMaps::default(), LbState::default());
        let want = desired(&[
            (frontend("10.96.0.1", 80), backends(1..=3)),
            (frontend("10.96.0.2", 53), backends([2])),
        ]);
        let report = state.reconcile(&want, &mut maps);
        assert!(report.errors.is_empty());
        assert_serves(&maps, &want);
        assert_eq!((report.frontends, report.backends), (2, 3), "10.244.0.2:8080 is shared, stored once");
    }

    #[test]
    fn an_unchanged_state_writes_nothing() {
        let (mut maps, mut state) = (MemMaps::default(), LbState::default());
        let want = desired(&[(frontend("10.96.0.1", 80), backends(1..=3))]);
        state.reconcile(&want, &mut maps);
        let before = maps.writes;
        let report = state.reconcile(&want, &mut maps);
        assert_eq!((maps.writes - before, report.writes, report.deletes), (0, 0, 0));
    }

    #[test]
    fn adding_one_endpoint_is_three_writes() {
        let (mut maps, mut state) = (MemMaps::default(), LbState::default());
        state.reconcile(&desired(&[(frontend("10.96.0.1", 80), backends(1..=3))]), &mut maps);
        let before = maps.writes;
        let want = desired(&[(frontend("10.96.0.1", 80), backends(1..=4))]);
        state.reconcile(&want, &mut maps);
        assert_eq!(maps.writes - before, 3, "backend + slot + service count");
        assert_serves(&maps, &want);
    }

    #[test]
    fn removing_one_endpoint_moves_at_most_one_other() {
        let (mut maps, mut state) = (MemMaps::default(), LbState::default());
        state.reconcile(&desired(&[(frontend("10.96.0.1", 80), backends(1..=4))]), &mut maps);
        let slots_before = maps.slots.clone();
        let before = maps.writes;
        let want = desired(&[(frontend("10.96.0.1", 80), backends([1, 3, 4]))]);
        state.reconcile(&want, &mut maps);
        assert!(
            maps.writes - before <= 4,
            "slot refill + count + tail slot + backend, got {}",
            maps.writes - before
        );
        assert_serves(&maps, &want);
        let unchanged = maps.slots.iter().filter(|(k, v)| slots_before.get(k) == Some(v)).count();
        assert_eq!(unchanged, 2, "backends in slots 1 and 3 keep their slot");
    }

    #[test]
    fn removing_a_frontend_keeps_shared_backends() {
        let (mut maps, mut state) = (MemMaps::default(), LbState::default());
        state.reconcile(
            &desired(&[
                (frontend("10.96.0.1", 80), backends(1..=2)),
                (frontend("10.96.0.2", 80), backends(2..=3)),
            ]),
            &mut maps,
        );
        let want = desired(&[(frontend("10.96.0.2", 80), backends(2..=3))]);
        state.reconcile(&want, &mut maps);
        assert_serves(&maps, &want);
        assert_eq!(maps.backends.len(), 2);
    }

    #[test]
    fn a_frontend_without_backends_has_count_zero() {
        let (mut maps, mut state) = (MemMaps::default(), LbState::default());
        state.reconcile(&desired(&[(frontend("10.96.0.1", 80), backends(1..=2))]), &mut maps);
        let want = desired(&[(frontend("10.96.0.1", 80), BTreeSet::new())]);
        state.reconcile(&want, &mut maps);
        assert_eq!(maps.services.values().next().unwrap().count, 0);
        assert!(maps.slots.is_empty() && maps.backends.is_empty());
    }

    #[test]
    fn maglev_tables_are_written_and_follow_backend_changes() {
        let (mut maps, mut state) = (MemMaps::default(), LbState::default());
        state.set_maglev_table_size(251);
        let mut want = desired(&[(frontend("10.96.0.1", 80), backends(1..=4))]);
        want.values_mut().for_each(|s| s.maglev = true);
        state.reconcile(&want, &mut maps);
        let svc = *maps.services.values().next().unwrap();
        assert_eq!((svc.flags & SVC_FLAG_MAGLEV, svc.maglev_table_size), (SVC_FLAG_MAGLEV, 251));
        assert_eq!(maps.maglev.len(), 251);
        let before = maps.maglev.clone();

        let mut fewer = desired(&[(frontend("10.96.0.1", 80), backends([1, 2, 4]))]);
        fewer.values_mut().for_each(|s| s.maglev = true);
        state.reconcile(&fewer, &mut maps);
        let changed = maps.maglev.iter().filter(|(k, v)| before.get(k) != Some(v)).count();
        assert!(changed < 251 / 3 + 30, "only about the removed backend's quarter moves: {changed}");
        assert_serves(&maps, &fewer);

        let restarted_writes = {
            let mut restarted = maps.adopt();
            restarted.set_maglev_table_size(251);
            let before = maps.writes;
            restarted.reconcile(&fewer, &mut maps);
            maps.writes - before
        };
        assert_eq!(restarted_writes, 0, "a restart adopts the table");

        state.reconcile(&desired(&[]), &mut maps);
        assert!(maps.maglev.is_empty(), "removing the frontend removes its table");
    }

    #[test]
    fn a_maglev_table_left_half_written_keeps_its_backends_and_is_repaired() {
        let (mut maps, mut state) = (MemMaps::default(), LbState::default());
        state.set_maglev_table_size(251);
        let mut four = desired(&[(frontend("10.96.0.1", 80), backends(1..=4))]);
        four.values_mut().for_each(|s| s.maglev = true);
        state.reconcile(&four, &mut maps);
        // By backend address: a backend that leaves and comes back gets a new id.
        let table = |maps: &MemMaps| -> Vec<BackendAddr> {
            maps.maglev.values().map(|id| addr_of(&maps.backends[id])).collect()
        };
        let table_of_four = table(&maps);
        let report = state.reconcile(&four, &mut maps);
        assert_eq!((report.writes, report.deletes), (0, 0), "nothing changed, nothing written");

        // Moving to three backends fails after a few entries...
        let mut three = desired(&[(frontend("10.96.0.1", 80), backends([1, 2, 4]))]);
        three.values_mut().for_each(|s| s.maglev = true);
        maps.maglev_budget = Some(5);
        let report = state.reconcile(&three, &mut maps);
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        assert_ne!(table(&maps), table_of_four);

        // (`table` panics on an entry whose backend was deleted.) Going back
        // to the four rewrites those entries.
        maps.maglev_budget = None;
        state.reconcile(&four, &mut maps);
        assert_eq!(table(&maps), table_of_four);
    }

    #[test]
    fn an_orphan_maglev_table_found_at_adoption_is_removed_with_its_backends() {
        let mut maps = MemMaps::default();
        let mut state = LbState::default();
        state.set_maglev_table_size(251);
        let mut want = desired(&[(frontend("10.96.0.1", 80), backends(1..=4))]);
        want.values_mut().for_each(|s| s.maglev = true);
        state.reconcile(&want, &mut maps);
        // A crash after the table, before (or after removing) the service
        // entry and its slots.
        maps.services.clear();
        maps.slots.clear();
        let mut restarted = maps.adopt();
        let report = restarted.reconcile(&desired(&[]), &mut maps);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(maps.maglev.is_empty(), "the orphan table is deleted");
        assert!(maps.backends.is_empty(), "and so are the backends only it referred to");
    }

    #[test]
    fn a_restarted_agent_adopts_the_maps_and_writes_nothing() {
        let mut maps = MemMaps::default();
        let want = desired(&[
            (frontend("10.96.0.1", 80), backends(1..=3)),
            (frontend("10.96.0.2", 80), backends(3..=5)),
        ]);
        LbState::default().reconcile(&want, &mut maps);
        let (services, slots, backends_before) =
            (maps.services.clone(), maps.slots.clone(), maps.backends.clone());

        let mut restarted = maps.adopt();
        let report = restarted.reconcile(&want, &mut maps);
        assert_eq!((report.writes, report.deletes), (0, 0));
        assert_eq!(
            (maps.services.clone(), maps.slots.clone(), maps.backends.clone()),
            (services, slots, backends_before)
        );

        // And it goes on allocating ids that do not collide with adopted ones.
        let more = desired(&[
            (frontend("10.96.0.1", 80), backends(1..=3)),
            (frontend("10.96.0.2", 80), backends(3..=6)),
            (frontend("10.96.0.3", 80), backends([7])),
        ]);
        restarted.reconcile(&more, &mut maps);
        assert_serves(&maps, &more);
    }

    #[test]
    fn adopting_cleans_up_after_a_crash_mid_write() {
        let mut maps = MemMaps::default();
        let want = desired(&[(frontend("10.96.0.1", 80), backends(1..=2))]);
        LbState::default().reconcile(&want, &mut maps);
        // Slots and a backend of a frontend whose service entry was never written.
        maps.slots.insert(SlotKey { service_id: 99, slot: 1 }, 42);
        maps.backends.insert(42, Backend { address_be: 1, port_be: 1, proto: 6, state: 0 });
        let mut restarted = maps.adopt();
        restarted.reconcile(&want, &mut maps);
        assert_serves(&maps, &want);
    }

    #[test]
    fn a_full_map_fails_one_frontend_and_serves_the_others() {
        let mut maps = MemMaps { service_capacity: Some(1), ..Default::default() };
        let mut state = LbState::default();
        let want = desired(&[
            (frontend("10.96.0.1", 80), backends([1])),
            (frontend("10.96.0.2", 80), backends([2])),
        ]);
        let report = state.reconcile(&want, &mut maps);
        assert_eq!(report.errors.len(), 1);
        assert!(report.errors[0].1.full);
        assert_eq!(maps.served().len(), 1);

        maps.service_capacity = None;
        let report = state.reconcile(&want, &mut maps);
        assert!(report.errors.is_empty(), "retried once there is room");
        assert_serves(&maps, &want);
    }
}
