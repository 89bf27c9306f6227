//! The kernel side as the agent sees it: programs loaded with their maps
//! pinned under the bpffs root, typed handles on those maps, and the links
//! that attach the programs to pod interfaces.

pub mod attach;
pub mod conntrack;
pub mod sockets;
pub mod socklb;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SchedClassifier, Xdp},
};
use ipnetwork::Ipv4Network;
use weir_abi::{
    config::Config,
    ct::{CtEntry, CtKey},
    lb::{Backend, MaglevKey, Service, ServiceKey, SlotKey, SourceRangeKey},
    map_name,
    policy::{EndpointInfo, IpcacheEntry, IpcacheKey, PolicyEntry, PolicyKey},
    sock::{SockRevNatEntry, SockRevNatKey},
};

use self::attach::Hook;
use crate::{
    lb::sync::{LbMaps, LbState, MapWriteError},
    policy::sync::{PolicyMaps, PolicyState},
};

/// The compiled programs (built by build.rs with aya-build).
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir"));

/// The program attached at tcx ingress of each local pod's host-side veth.
pub const FROM_POD_PROGRAM: &str = "weir_from_pod";
/// The program attached at tcx egress of each local pod's host-side veth.
pub const TO_POD_PROGRAM: &str = "weir_to_pod";
/// The program attached at tcx ingress of the node's devices.
pub const FROM_NETDEV_PROGRAM: &str = "weir_from_netdev";
/// The program attached as native XDP to the node's devices.
pub const XDP_FROM_NETDEV_PROGRAM: &str = "weir_xdp_from_netdev";

/// Map capacities (entries).
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub slots: u32,
    pub backends: u32,
    pub conntrack: u32,
    pub ipcache: u32,
    pub policy: u32,
}

pub struct Datapath {
    // Keeps the programs loaded for attaching; maps were taken out of it.
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, Service>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    config: Array<MapData, Config>,
    ipcache: LpmTrie<MapData, IpcacheKey, IpcacheEntry>,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    policy: LpmTrie<MapData, PolicyKey, PolicyEntry>,
    events: Option<RingBuf<MapData>>,
    devices: HashMap<MapData, u32, u32>,
    /// What the last successful `set_devices` wrote.
    devices_written: Option<BTreeMap<u32, Ipv4Addr>>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    maglev: HashMap<MapData, MaglevKey, u32>,
    sock_revnat: HashMap<MapData, SockRevNatKey, SockRevNatEntry>,
    root: PathBuf,
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T> {
    let map = ebpf.take_map(name).with_context(|| format!("map {name} missing from the programs"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Datapath {
    /// Loads the programs. Maps already pinned under `root` (by an earlier
    /// run of the agent) are reused with their content, so a restart keeps
    /// every service and every conntrack entry.
    pub fn load(root: &Path, sizes: MapSizes) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(root)
            .map_max_entries(map_name::SERVICES, sizes.services)
            .map_max_entries(map_name::SLOTS, sizes.slots)
            .map_max_entries(map_name::BACKENDS, sizes.backends)
            .map_max_entries(map_name::CONNTRACK, sizes.conntrack)
            .map_max_entries(map_name::IPCACHE, sizes.ipcache)
            .map_max_entries(map_name::POLICY, sizes.policy)
            .load(PROGRAMS)
            .context("loading the eBPF programs")?;
        for name in [FROM_POD_PROGRAM, TO_POD_PROGRAM, FROM_NETDEV_PROGRAM] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()
                .context("program type")?;
            program.load().with_context(|| format!("verifying {name}"))?;
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(XDP_FROM_NETDEV_PROGRAM)
            .context("the XDP program is missing")?
            .try_into()
            .context("program type")?;
        xdp.load().context("verifying the XDP program")?;
        socklb::load(&mut ebpf)?;
        Ok(Self {
            services: take(&mut ebpf, map_name::SERVICES)?,
            slots: take(&mut ebpf, map_name::SLOTS)?,
            backends: take(&mut ebpf, map_name::BACKENDS)?,
            conntrack: take(&mut ebpf, map_name::CONNTRACK)?,
            config: take(&mut ebpf, map_name::CONFIG)?,
            ipcache: take(&mut ebpf, map_name::IPCACHE)?,
            endpoints: take(&mut ebpf, map_name::ENDPOINTS)?,
            policy: take(&mut ebpf, map_name::POLICY)?,
            events: Some(take(&mut ebpf, map_name::EVENTS)?),
            devices: take(&mut ebpf, map_name::DEVICES)?,
            devices_written: None,
            source_ranges: take(&mut ebpf, map_name::SOURCE_RANGES)?,
            maglev: take(&mut ebpf, map_name::MAGLEV)?,
            sock_revnat: take(&mut ebpf, map_name::SOCK_REVNAT)?,
            ebpf,
            root: root.to_owned(),
        })
    }

    /// The flow-event ring buffer, for the one reader that consumes it.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn program(&mut self, hook: Hook) -> anyhow::Result<&mut SchedClassifier> {
        let name = match hook {
            Hook::FromPod => FROM_POD_PROGRAM,
            Hook::ToPod => TO_POD_PROGRAM,
            Hook::FromNetdev => FROM_NETDEV_PROGRAM,
            Hook::XdpFromNetdev => anyhow::bail!("{XDP_FROM_NETDEV_PROGRAM} is not a tc program"),
        };
        let program = self.ebpf.program_mut(name).with_context(|| format!("program {name} missing"))?;
        Ok(program.try_into()?)
    }

    pub fn xdp_program(&mut self) -> anyhow::Result<&mut Xdp> {
        let program = self.ebpf.program_mut(XDP_FROM_NETDEV_PROGRAM).context("the XDP program is missing")?;
        Ok(program.try_into()?)
    }

    /// Attaches the socket-LB programs to `cgroup`, or, with `None`,
    /// detaches those of an earlier run.
    pub fn set_socket_lb(&mut self, cgroup: Option<&Path>) -> anyhow::Result<()> {
        match cgroup {
            Some(cgroup) => socklb::attach(&mut self.ebpf, &self.root, cgroup),
            None => socklb::detach(&self.root),
        }
    }

    /// The socket-LB reverse translations (socket cookie, backend → frontend).
    pub fn sock_revnat(&self) -> &HashMap<MapData, SockRevNatKey, SockRevNatEntry> {
        &self.sock_revnat
    }

    pub fn write_config(&mut self, config: &Config) -> anyhow::Result<()> {
        self.config.set(0, config, 0).context("writing the datapath configuration")
    }

    /// Rebuilds the load-balancer mirror from the pinned maps.
    pub fn adopt_lb_state(&self) -> anyhow::Result<LbState> {
        let services = self.services.iter().collect::<Result<Vec<_>, _>>().context("reading services")?;
        let slots = self.slots.iter().collect::<Result<Vec<_>, _>>().context("reading slots")?;
        let backends = self.backends.iter().collect::<Result<Vec<_>, _>>().context("reading backends")?;
        let ranges = self
            .source_ranges
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .context("reading source ranges")?
            .into_iter()
            .filter_map(|(k, _)| {
                let data = k.data();
                let addr = Ipv4Addr::from(data.address_be.to_ne_bytes());
                let prefix = k.prefix_len().checked_sub(32)? as u8;
                Some((u32::from_be(data.service_id_be), Ipv4Network::new(addr, prefix).ok()?))
            });
        let maglev = self.maglev.iter().collect::<Result<Vec<_>, _>>().context("reading Maglev tables")?;
        Ok(LbState::adopt(services, slots, backends, ranges, maglev))
    }

    /// Makes the devices map hold exactly `devices` (ifindex → address).
    /// Called every second by the attach retry: unchanged devices cost no
    /// map access.
    pub fn set_devices(&mut self, devices: &BTreeMap<u32, Ipv4Addr>) -> anyhow::Result<()> {
        if self.devices_written.as_ref() == Some(devices) {
            return Ok(());
        }
        let current: Vec<u32> = self.devices.keys().collect::<Result<_, _>>()?;
        for ifindex in current.iter().filter(|i| !devices.contains_key(i)) {
            ignore_absent(self.devices.remove(ifindex))?;
        }
        for (ifindex, address) in devices {
            let address_be = u32::from_ne_bytes(address.octets());
            if self.devices.get(ifindex, 0).ok() != Some(address_be) {
                self.devices.insert(ifindex, address_be, 0)?;
            }
        }
        self.devices_written = Some(devices.clone());
        Ok(())
    }

    /// Rebuilds the policy mirror from the pinned maps.
    pub fn adopt_policy_state(&self) -> anyhow::Result<PolicyState> {
        let ipcache = self
            .ipcache
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .context("reading the ipcache")?
            .into_iter()
            .filter_map(|(k, v)| {
                let addr = Ipv4Addr::from(k.data().address_be.to_ne_bytes());
                Some((Ipv4Network::new(addr, k.prefix_len() as u8).ok()?, v.identity))
            });
        let endpoints = self
            .endpoints
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .context("reading endpoints")?
            .into_iter()
            .map(|(ip, info)| (Ipv4Addr::from(ip.to_ne_bytes()), info));
        let policy = self
            .policy
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .context("reading policy entries")?
            .into_iter()
            .map(|(k, v)| ((k.data(), k.prefix_len()), v));
        Ok(PolicyState::adopt(ipcache.collect::<Vec<_>>(), endpoints, policy))
    }

    pub fn conntrack_mut(&mut self) -> &mut HashMap<MapData, CtKey, CtEntry> {
        &mut self.conntrack
    }
}

fn write_error(map: &'static str, op: &'static str, err: MapError) -> MapWriteError {
    let full = matches!(&err, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG));
    MapWriteError { map, op, reason: err.to_string(), full }
}

fn ignore_absent(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        other => other,
    }
}

impl LbMaps for Datapath {
    fn put_service(&mut self, key: &ServiceKey, value: &Service) -> Result<(), MapWriteError> {
        self.services.insert(key, value, 0).map_err(|e| write_error(map_name::SERVICES, "update", e))
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapWriteError> {
        ignore_absent(self.services.remove(key)).map_err(|e| write_error(map_name::SERVICES, "delete", e))
    }
    fn put_slot(&mut self, key: &SlotKey, backend_id: u32) -> Result<(), MapWriteError> {
        self.slots.insert(key, backend_id, 0).map_err(|e| write_error(map_name::SLOTS, "update", e))
    }
    fn delete_slot(&mut self, key: &SlotKey) -> Result<(), MapWriteError> {
        ignore_absent(self.slots.remove(key)).map_err(|e| write_error(map_name::SLOTS, "delete", e))
    }
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<(), MapWriteError> {
        self.backends.insert(id, value, 0).map_err(|e| write_error(map_name::BACKENDS, "update", e))
    }
    fn put_maglev(&mut self, key: MaglevKey, backend_id: u32) -> Result<(), MapWriteError> {
        self.maglev.insert(key, backend_id, 0).map_err(|e| write_error(map_name::MAGLEV, "update", e))
    }
    fn delete_maglev(&mut self, key: MaglevKey) -> Result<(), MapWriteError> {
        ignore_absent(self.maglev.remove(&key)).map_err(|e| write_error(map_name::MAGLEV, "delete", e))
    }
    fn put_source_range(&mut self, service_id: u32, range: Ipv4Network) -> Result<(), MapWriteError> {
        self.source_ranges
            .insert(&source_range_key(service_id, range), 1, 0)
            .map_err(|e| write_error(map_name::SOURCE_RANGES, "update", e))
    }
    fn delete_source_range(&mut self, service_id: u32, range: Ipv4Network) -> Result<(), MapWriteError> {
        ignore_absent(self.source_ranges.remove(&source_range_key(service_id, range)))
            .map_err(|e| write_error(map_name::SOURCE_RANGES, "delete", e))
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapWriteError> {
        ignore_absent(self.backends.remove(&id)).map_err(|e| write_error(map_name::BACKENDS, "delete", e))
    }
}

fn source_range_key(service_id: u32, range: Ipv4Network) -> Key<SourceRangeKey> {
    let data = SourceRangeKey {
        service_id_be: service_id.to_be(),
        address_be: u32::from_ne_bytes(range.network().octets()),
    };
    Key::new(32 + u32::from(range.prefix()), data)
}

fn ipcache_key(prefix: Ipv4Network) -> Key<IpcacheKey> {
    Key::new(
        u32::from(prefix.prefix()),
        IpcacheKey { address_be: u32::from_ne_bytes(prefix.network().octets()) },
    )
}

impl PolicyMaps for Datapath {
    fn put_ipcache(&mut self, prefix: Ipv4Network, identity: u32) -> Result<(), MapWriteError> {
        self.ipcache
            .insert(&ipcache_key(prefix), IpcacheEntry { identity, _pad: 0 }, 0)
            .map_err(|e| write_error(map_name::IPCACHE, "update", e))
    }
    fn delete_ipcache(&mut self, prefix: Ipv4Network) -> Result<(), MapWriteError> {
        ignore_absent(self.ipcache.remove(&ipcache_key(prefix)))
            .map_err(|e| write_error(map_name::IPCACHE, "delete", e))
    }
    fn put_endpoint(&mut self, ip: Ipv4Addr, info: &EndpointInfo) -> Result<(), MapWriteError> {
        self.endpoints
            .insert(u32::from_ne_bytes(ip.octets()), info, 0)
            .map_err(|e| write_error(map_name::ENDPOINTS, "update", e))
    }
    fn delete_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), MapWriteError> {
        ignore_absent(self.endpoints.remove(&u32::from_ne_bytes(ip.octets())))
            .map_err(|e| write_error(map_name::ENDPOINTS, "delete", e))
    }
    fn put_policy(
        &mut self,
        key: &PolicyKey,
        prefix_len: u32,
        entry: &PolicyEntry,
    ) -> Result<(), MapWriteError> {
        self.policy
            .insert(&Key::new(prefix_len, *key), entry, 0)
            .map_err(|e| write_error(map_name::POLICY, "update", e))
    }
    fn delete_policy(&mut self, key: &PolicyKey, prefix_len: u32) -> Result<(), MapWriteError> {
        ignore_absent(self.policy.remove(&Key::new(prefix_len, *key)))
            .map_err(|e| write_error(map_name::POLICY, "delete", e))
    }
}
