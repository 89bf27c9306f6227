//! From a datapath [`FlowEvent`] (addresses, ports, codes) to a Hubble
//! [`Flow`] a person can read: pods, namespaces, labels, identities and
//! service names from the agent's [`Names`], wall-clock time, and the monitor
//! event type and observation point Hubble's printers expect.

use std::{
    collections::HashMap,
    ffi::CStr,
    net::Ipv4Addr,
    path::Path,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use prost::Message as _;
use weir_abi::{
    events::{
        DIRECTION_EGRESS, DIRECTION_INGRESS, EVENT_DROP, EVENT_F_REPLY, EVENT_F_TRANSLATED, FlowEvent,
        OBSERVED_TO_POD,
    },
    lb::{Service as BpfService, ServiceKey},
    map_name, proto,
};
use weir_proto::flow::{
    self, CiliumEventType, Emitter, Endpoint, Flow, FlowType, Ip, IpVersion, Layer4, NetworkInterface,
    Service, TcpFlags, TraceObservationPoint, TrafficDirection, Verdict, layer4,
};

use crate::names::Names;

/// Monitor message types (Cilium's `pkg/monitor/api`), as Hubble's printers
/// read `event_type.type`.
pub mod message_type {
    pub const DROP: i32 = 1;
    pub const TRACE: i32 = 4;
}

/// Monitor trace sub-types (observation points) as `event_type.sub_type`;
/// the proto enum [`TraceObservationPoint`] numbers them differently.
pub mod trace_point {
    pub const TO_ENDPOINT: i32 = 0;
    pub const TO_STACK: i32 = 3;
}

/// Cilium's reserved identities, for addresses that are no pod.
pub mod identity {
    pub const WORLD: u32 = 2;
}

/// TCP header flag bits (byte 13 of the header).
mod tcp_bit {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// Keys of the `google.protobuf.Struct` in `Flow.extensions`.
pub const EXT_ORIGINAL_DESTINATION_IP: &str = "original_destination_ip";
pub const EXT_ORIGINAL_DESTINATION_PORT: &str = "original_destination_port";

/// Converts `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) to wall-clock time with
/// the offset between the two clocks measured once, at start: later wall
/// clock steps do not reorder flows.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// Wall-clock nanoseconds since the epoch minus monotonic nanoseconds.
    offset_ns: i128,
}

impl WallClock {
    pub fn now() -> Self {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
        Self { offset_ns: wall - monotonic_ns() as i128 }
    }

    #[cfg(test)]
    pub fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// Wall-clock nanoseconds since the epoch of a monotonic timestamp.
    pub fn wall_ns(&self, monotonic_ns: u64) -> i128 {
        self.offset_ns + monotonic_ns as i128
    }
}

pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

pub fn timestamp(wall_ns: i128) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: wall_ns.div_euclid(1_000_000_000) as i64,
        nanos: wall_ns.rem_euclid(1_000_000_000) as i32,
    }
}

pub fn timestamp_ns(ts: &prost_types::Timestamp) -> i128 {
    ts.seconds as i128 * 1_000_000_000 + ts.nanos as i128
}

/// Everything the conversion needs besides the event and the names.
pub struct Enricher {
    clock: WallClock,
    /// The pinned services map, to name the frontend a dropped packet
    /// addressed (drops carry no service id).
    services: Option<BpfHashMap<MapData, ServiceKey, BpfService>>,
    interfaces: HashMap<u32, String>,
    /// Endpoints already built from `names` (address and datapath identity
    /// → endpoint): a flow's endpoints are cloned, not formatted anew.
    endpoints: HashMap<(Ipv4Addr, u32), Endpoint>,
    /// The names `endpoints` were built from.
    names: Option<Arc<Names>>,
}

impl Enricher {
    pub fn new(clock: WallClock, bpffs_root: &Path) -> Self {
        let services = MapData::from_pin(bpffs_root.join(map_name::SERVICES))
            .ok()
            .and_then(|data| BpfHashMap::try_from(Map::HashMap(data)).ok());
        if services.is_none() {
            tracing::debug!("cannot open the pinned services map; drops will not name their service");
        }
        Self { clock, services, interfaces: HashMap::new(), endpoints: HashMap::new(), names: None }
    }

    #[cfg(test)]
    pub fn for_tests(clock: WallClock) -> Self {
        Self { clock, services: None, interfaces: HashMap::new(), endpoints: HashMap::new(), names: None }
    }

    /// The flow an event describes, as Hubble would show it.
    pub fn flow(&mut self, ev: &FlowEvent, names: &Arc<Names>) -> Flow {
        if !self.names.as_ref().is_some_and(|n| Arc::ptr_eq(n, names)) || self.endpoints.len() > 65536 {
            self.endpoints.clear();
            self.names = Some(names.clone());
        }
        let saddr = Ipv4Addr::from(ev.saddr_be.to_ne_bytes());
        let daddr = Ipv4Addr::from(ev.daddr_be.to_ne_bytes());
        let sport = u16::from_be(ev.sport_be);
        let dport = u16::from_be(ev.dport_be);
        let dropped = ev.kind == EVENT_DROP;
        let reply = ev.flags & EVENT_F_REPLY != 0;

        let (event_type, observation_point) = if dropped {
            (CiliumEventType { r#type: message_type::DROP, sub_type: i32::from(ev.reason) }, None)
        } else {
            match ev.observed {
                OBSERVED_TO_POD => (
                    CiliumEventType { r#type: message_type::TRACE, sub_type: trace_point::TO_ENDPOINT },
                    Some(TraceObservationPoint::ToEndpoint),
                ),
                // OBSERVED_FROM_POD: handed to the node's stack after
                // translation.
                _ => (
                    CiliumEventType { r#type: message_type::TRACE, sub_type: trace_point::TO_STACK },
                    Some(TraceObservationPoint::ToStack),
                ),
            }
        };

        let translated = ev.flags & EVENT_F_TRANSLATED != 0;
        let mut destination_service = None;
        if translated && let Some(svc) = names.services.get(&ev.service_id) {
            destination_service = Some(Service { name: svc.name.clone(), namespace: svc.namespace.clone() });
        } else if dropped && let Some(id) = self.frontend(ev.daddr_be, ev.dport_be, ev.proto) {
            destination_service = names
                .services
                .get(&id)
                .map(|svc| Service { name: svc.name.clone(), namespace: svc.namespace.clone() });
        }
        let extensions = translated.then(|| {
            original_destination(
                Ipv4Addr::from(ev.orig_daddr_be.to_ne_bytes()),
                u16::from_be(ev.orig_dport_be),
            )
        });

        let wall = self.clock.wall_ns(ev.timestamp_ns);
        let interface = (ev.ifindex != 0)
            .then(|| NetworkInterface { index: ev.ifindex, name: self.interface_name(ev.ifindex) });
        Flow {
            time: Some(timestamp(wall)),
            verdict: if dropped { Verdict::Dropped } else { Verdict::Forwarded } as i32,
            drop_reason: if dropped { u32::from(ev.reason) } else { 0 },
            drop_reason_desc: if dropped { i32::from(ev.reason) } else { 0 },
            ip: Some(Ip {
                source: saddr.to_string(),
                destination: daddr.to_string(),
                ip_version: IpVersion::IPv4 as i32,
                ..Ip::default()
            }),
            l4: layer4(ev.proto, sport, dport, ev.tcp_flags),
            source: Some(self.endpoint(saddr, ev.src_identity, names)),
            destination: Some(self.endpoint(daddr, ev.dst_identity, names)),
            r#type: FlowType::L3L4 as i32,
            node_name: names.node_name.clone(),
            reply,
            event_type: Some(event_type),
            destination_service,
            traffic_direction: match ev.direction {
                DIRECTION_INGRESS => TrafficDirection::Ingress,
                DIRECTION_EGRESS => TrafficDirection::Egress,
                _ => TrafficDirection::Unknown,
            } as i32,
            trace_observation_point: observation_point.map_or(0, |p| p as i32),
            is_reply: Some(reply),
            interface,
            emitter: Some(Emitter { name: "Weir".into(), version: env!("CARGO_PKG_VERSION").into() }),
            summary: summary(ev.proto, ev.tcp_flags),
            extensions,
            ..Flow::default()
        }
    }

    fn endpoint(&mut self, address: Ipv4Addr, identity: u32, names: &Names) -> Endpoint {
        self.endpoints
            .entry((address, identity))
            .or_insert_with(|| endpoint(address, identity, names))
            .clone()
    }

    /// The service id of frontend `address:port/proto`, from the pinned map.
    fn frontend(&self, address_be: u32, port_be: u16, proto: u8) -> Option<u32> {
        let map = self.services.as_ref()?;
        map.get(&ServiceKey::new(address_be, port_be, proto), 0).ok().map(|s| s.service_id)
    }

    fn interface_name(&mut self, index: u32) -> String {
        if let Some(name) = self.interfaces.get(&index) {
            return name.clone();
        }
        let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
        // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname writes at most.
        let ptr = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
        if ptr.is_null() {
            return String::new();
        }
        // SAFETY: on success, `buf` holds a NUL-terminated name.
        let name = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
        if self.interfaces.len() > 4096 {
            self.interfaces.clear();
        }
        self.interfaces.insert(index, name.clone());
        name
    }
}

fn original_destination(address: Ipv4Addr, port: u16) -> prost_types::Any {
    use prost_types::{Struct, Value, value::Kind};
    let fields = [
        (
            EXT_ORIGINAL_DESTINATION_IP.to_owned(),
            Value { kind: Some(Kind::StringValue(address.to_string())) },
        ),
        (EXT_ORIGINAL_DESTINATION_PORT.to_owned(), Value { kind: Some(Kind::NumberValue(f64::from(port))) }),
    ];
    let value = Struct { fields: fields.into_iter().collect() };
    prost_types::Any {
        type_url: "type.googleapis.com/google.protobuf.Struct".into(),
        value: value.encode_to_vec(),
    }
}

/// The ClusterIP and port a translated flow's client addressed, from
/// `Flow.extensions` (`weir observe` reads it the same way).
#[cfg(test)]
pub fn original_destination_of(flow: &Flow) -> Option<(String, u16)> {
    use prost_types::value::Kind;
    let any = flow.extensions.as_ref()?;
    if !any.type_url.ends_with("google.protobuf.Struct") {
        return None;
    }
    let value = prost_types::Struct::decode(any.value.as_slice()).ok()?;
    let ip = match value.fields.get(EXT_ORIGINAL_DESTINATION_IP)?.kind.as_ref()? {
        Kind::StringValue(ip) => ip.clone(),
        _ => return None,
    };
    let port = match value.fields.get(EXT_ORIGINAL_DESTINATION_PORT)?.kind.as_ref()? {
        Kind::NumberValue(port) => *port as u16,
        _ => return None,
    };
    Some((ip, port))
}

/// An endpoint: the pod at `address` if one is known, else what its
/// identity says, else the world.
fn endpoint(address: Ipv4Addr, event_identity: u32, names: &Names) -> Endpoint {
    if let Some(pod) = names.pods.get(&address) {
        let identity = if pod.identity != 0 { pod.identity } else { event_identity };
        return Endpoint {
            identity,
            namespace: pod.namespace.clone(),
            labels: pod_labels(&pod.namespace, &pod.labels),
            pod_name: pod.name.clone(),
            ..Endpoint::default()
        };
    }
    match names.identities.get(&event_identity) {
        // A pod identity: [namespace, key=value...] (e.g. the hairpin
        // address stands for a pod reaching its own service).
        Some(labels) if labels.first().is_some_and(|l| !l.contains(':')) => Endpoint {
            identity: event_identity,
            namespace: labels[0].clone(),
            labels: pod_labels(&labels[0], &labels[1..]),
            ..Endpoint::default()
        },
        // A CIDR identity: `cidr:a.b.c.d/n`.
        Some(labels) => Endpoint {
            identity: event_identity,
            labels: labels.iter().cloned().chain(["reserved:world".to_owned()]).collect(),
            ..Endpoint::default()
        },
        None if event_identity != 0 => Endpoint { identity: event_identity, ..Endpoint::default() },
        None => Endpoint {
            identity: identity::WORLD,
            labels: vec!["reserved:world".to_owned()],
            ..Endpoint::default()
        },
    }
}

/// Cilium's label form: `k8s:key=value`, plus the namespace label.
fn pod_labels(namespace: &str, labels: &[String]) -> Vec<String> {
    let mut out: Vec<String> = labels.iter().map(|l| format!("k8s:{l}")).collect();
    out.push(format!("k8s:io.kubernetes.pod.namespace={namespace}"));
    out.sort();
    out
}

fn layer4(protocol: u8, sport: u16, dport: u16, tcp_flags: u8) -> Option<Layer4> {
    let (source_port, destination_port) = (u32::from(sport), u32::from(dport));
    let protocol = match protocol {
        proto::TCP => {
            layer4::Protocol::Tcp(flow::Tcp { source_port, destination_port, flags: Some(flags(tcp_flags)) })
        }
        proto::UDP => layer4::Protocol::Udp(flow::Udp { source_port, destination_port }),
        proto::SCTP => layer4::Protocol::Sctp(flow::Sctp { source_port, destination_port }),
        _ => return None,
    };
    Some(Layer4 { protocol: Some(protocol) })
}

pub fn flags(bits: u8) -> TcpFlags {
    TcpFlags {
        fin: bits & tcp_bit::FIN != 0,
        syn: bits & tcp_bit::SYN != 0,
        rst: bits & tcp_bit::RST != 0,
        psh: bits & tcp_bit::PSH != 0,
        ack: bits & tcp_bit::ACK != 0,
        urg: bits & tcp_bit::URG != 0,
        ece: bits & tcp_bit::ECE != 0,
        cwr: bits & tcp_bit::CWR != 0,
        ns: false,
    }
}

/// Hubble's summary: `TCP Flags: SYN, ACK` (its flag order), `UDP`, `SCTP`.
pub fn summary(protocol: u8, tcp_flags: u8) -> String {
    match protocol {
        proto::TCP => {
            let f = flags(tcp_flags);
            let names: Vec<&str> = [
                (f.syn, "SYN"),
                (f.ack, "ACK"),
                (f.rst, "RST"),
                (f.fin, "FIN"),
                (f.psh, "PSH"),
                (f.urg, "URG"),
                (f.ece, "ECE"),
                (f.cwr, "CWR"),
                (f.ns, "NS"),
            ]
            .into_iter()
            .filter_map(|(set, name)| set.then_some(name))
            .collect();
            format!("TCP Flags: {}", names.join(", "))
        }
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        other => format!("IP protocol {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{PodName, ServiceName};
    use weir_abi::events::{EVENT_NEW_CONNECTION, OBSERVED_FROM_POD};

    fn be(ip: [u8; 4]) -> u32 {
        u32::from_ne_bytes(ip)
    }

    fn names() -> Names {
        let mut names = Names { node_name: "node-a".into(), ..Names::default() };
        for (ip, name, identity) in [([10, 244, 0, 10], "client", 300), ([10, 244, 0, 11], "server", 301)] {
            names.pods.insert(
                Ipv4Addr::from(ip),
                PodName {
                    namespace: "default".into(),
                    name: name.into(),
                    labels: vec![format!("app={name}")],
                    node_name: "node-a".into(),
                    identity,
                },
            );
        }
        names.services.insert(7, ServiceName { namespace: "default".into(), name: "web".into() });
        names
    }

    #[test]
    fn translated_connection() {
        let ev = FlowEvent {
            timestamp_ns: 5_000_000_123,
            kind: EVENT_NEW_CONNECTION,
            proto: proto::TCP,
            tcp_flags: tcp_bit::SYN,
            observed: OBSERVED_FROM_POD,
            direction: DIRECTION_EGRESS,
            flags: EVENT_F_TRANSLATED,
            saddr_be: be([10, 244, 0, 10]),
            daddr_be: be([10, 244, 0, 11]),
            sport_be: 40000u16.to_be(),
            dport_be: 8080u16.to_be(),
            orig_daddr_be: be([10, 96, 0, 10]),
            orig_dport_be: 80u16.to_be(),
            src_identity: 300,
            dst_identity: 301,
            service_id: 7,
            ..FlowEvent::default()
        };
        let mut enricher = Enricher::for_tests(WallClock::with_offset(1_000_000_000_000_000_000));
        let flow = enricher.flow(&ev, &Arc::new(names()));
        assert_eq!(flow.verdict, Verdict::Forwarded as i32);
        assert_eq!(flow.time, Some(prost_types::Timestamp { seconds: 1_000_000_005, nanos: 123 }));
        let (src, dst) = (flow.source.as_ref().unwrap(), flow.destination.as_ref().unwrap());
        assert_eq!((src.namespace.as_str(), src.pod_name.as_str(), src.identity), ("default", "client", 300));
        assert_eq!((dst.pod_name.as_str(), dst.identity), ("server", 301));
        assert!(src.labels.contains(&"k8s:app=client".to_owned()));
        assert_eq!(
            flow.destination_service,
            Some(Service { name: "web".into(), namespace: "default".into() })
        );
        assert_eq!(original_destination_of(&flow), Some(("10.96.0.10".into(), 80)));
        assert_eq!(flow.event_type, Some(CiliumEventType { r#type: 4, sub_type: 3 }));
        assert_eq!(flow.trace_observation_point, TraceObservationPoint::ToStack as i32);
        assert_eq!(flow.traffic_direction, TrafficDirection::Egress as i32);
        assert_eq!(flow.is_reply, Some(false));
        assert_eq!(flow.summary, "TCP Flags: SYN");
        assert_eq!(flow.node_name, "node-a");
        match flow.l4.and_then(|l| l.protocol) {
            Some(layer4::Protocol::Tcp(tcp)) => {
                assert_eq!((tcp.source_port, tcp.destination_port), (40000, 8080));
                assert!(tcp.flags.unwrap().syn);
            }
            other => panic!("not TCP: {other:?}"),
        }
    }

    #[test]
    fn drop_to_unknown_address() {
        let ev = FlowEvent {
            kind: EVENT_DROP,
            reason: 174,
            proto: proto::UDP,
            observed: OBSERVED_FROM_POD,
            direction: DIRECTION_EGRESS,
            saddr_be: be([10, 244, 0, 10]),
            daddr_be: be([10, 96, 0, 99]),
            sport_be: 5000u16.to_be(),
            dport_be: 53u16.to_be(),
            ..FlowEvent::default()
        };
        let mut enricher = Enricher::for_tests(WallClock::with_offset(0));
        let flow = enricher.flow(&ev, &Arc::new(names()));
        assert_eq!(flow.verdict, Verdict::Dropped as i32);
        assert_eq!(flow.drop_reason_desc, flow::DropReason::IsAClusterip as i32);
        assert_eq!(flow.event_type, Some(CiliumEventType { r#type: 1, sub_type: 174 }));
        assert_eq!(flow.destination.as_ref().unwrap().identity, identity::WORLD);
        assert_eq!(flow.destination_service, None);
        assert_eq!(flow.summary, "UDP");
    }

    #[test]
    fn summaries_follow_hubble() {
        assert_eq!(summary(proto::TCP, tcp_bit::SYN | tcp_bit::ACK), "TCP Flags: SYN, ACK");
        assert_eq!(summary(proto::TCP, tcp_bit::FIN | tcp_bit::ACK), "TCP Flags: ACK, FIN");
    }
}
