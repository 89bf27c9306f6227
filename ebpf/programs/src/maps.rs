//! Every map the programs use, pinned by name under the agent's bpffs root.
//! Sizes here are defaults; the agent sets the real ones at load time.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use weir_abi::{
    capacity,
    config::Config,
    ct::{CtEntry, CtKey},
    lb::{AffinityEntry, AffinityKey, Backend, MaglevKey, Service, ServiceKey, SlotKey, SourceRangeKey},
    metrics::Counter,
    policy::{EndpointInfo, EndpointMetricKey, IpcacheEntry, IpcacheKey, PolicyEntry, PolicyKey},
    sock::{SockRevNatEntry, SockRevNatKey},
};

#[map(name = "LB4_SERVICES_V2")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::pinned(capacity::SERVICES, 0);

#[map(name = "LB4_SLOTS_V1")]
pub static SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(capacity::SLOTS, 0);

#[map(name = "LB4_BACKENDS_V1")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(capacity::BACKENDS, 0);

#[map(name = "LB4_AFFINITY_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> = LruHashMap::pinned(capacity::AFFINITY, 0);

#[map(name = "CT4_V1")]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(capacity::CONNTRACK, 0);

#[map(name = "METRICS_V1")]
pub static METRICS: PerCpuArray<Counter> = PerCpuArray::pinned(capacity::METRICS, 0);

#[map(name = "CONFIG_V2")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "IPCACHE_V1")]
pub static IPCACHE: LpmTrie<IpcacheKey, IpcacheEntry> = LpmTrie::pinned(capacity::IPCACHE, 0);

#[map(name = "ENDPOINTS_V1")]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(capacity::ENDPOINTS, 0);

#[map(name = "POLICY_V1")]
pub static POLICY: LpmTrie<PolicyKey, PolicyEntry> = LpmTrie::pinned(capacity::POLICY, 0);

#[map(name = "EP_METRICS_V1")]
pub static ENDPOINT_METRICS: PerCpuHashMap<EndpointMetricKey, Counter> =
    PerCpuHashMap::pinned(capacity::ENDPOINT_METRICS, 0);

#[map(name = "EVENTS_V1")]
pub static EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);

#[map(name = "DEVICES_V1")]
pub static DEVICES: HashMap<u32, u32> = HashMap::pinned(64, 0);

#[map(name = "LB4_SRC_RANGE_V1")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> = LpmTrie::pinned(16_384, 0);

#[map(name = "LB4_MAGLEV_V1")]
pub static MAGLEV: HashMap<MaglevKey, u32> = HashMap::pinned(capacity::MAGLEV, 0);

#[map(name = "LB4_SOCK_REVNAT_V1")]
pub static SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatEntry> =
    LruHashMap::pinned(capacity::SOCK_REVNAT, 0);

/// Per-CPU scratch space for building conntrack entries (too large to keep
/// several on the 512-byte BPF stack). Not pinned: it holds nothing between
/// packets.
#[map(name = "CT_SCRATCH")]
pub static CT_SCRATCH: PerCpuArray<CtEntry> = PerCpuArray::with_max_entries(2, 0);
