//! Hubble's flow filters, evaluated server-side: the result of a request is
//! `whitelist − blacklist`; several filters in a list are alternatives (OR);
//! within one filter every field that is set must match (AND); the values of
//! one field are alternatives (OR). Semantics follow Hubble's
//! (`pkg/hubble/filters`): pod and service names are `[namespace/][prefix]`
//! with `default` as the namespace when none is given, IPs may be CIDRs,
//! labels take Kubernetes selector syntax.
//!
//! Fields Weir does not implement are refused (the caller answers
//! InvalidArgument): silently ignoring one would show unfiltered flows as if
//! they matched.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use weir_proto::flow::{
    DropReason, EventTypeFilter, Flow, FlowFilter, IpVersion, TcpFlags, TrafficDirection, Verdict, layer4,
};

/// A compiled request filter: whitelist minus blacklist.
#[derive(Debug, Default)]
pub struct Filters {
    whitelist: Vec<Compiled>,
    blacklist: Vec<Compiled>,
}

impl Filters {
    pub fn compile(whitelist: &[FlowFilter], blacklist: &[FlowFilter]) -> Result<Self, String> {
        Ok(Self {
            whitelist: whitelist.iter().map(Compiled::new).collect::<Result<_, _>>()?,
            blacklist: blacklist.iter().map(Compiled::new).collect::<Result<_, _>>()?,
        })
    }

    pub fn matches(&self, flow: &Flow) -> bool {
        (self.whitelist.is_empty() || self.whitelist.iter().any(|f| f.matches(flow)))
            && !self.blacklist.iter().any(|f| f.matches(flow))
    }
}

#[derive(Debug)]
struct Compiled {
    checks: Vec<Check>,
}

#[derive(Clone, Copy, Debug)]
enum Side {
    Source,
    Destination,
}

#[derive(Debug)]
enum Check {
    Ip(Side, Vec<IpNetwork>),
    Pod(Side, Vec<NameFilter>),
    Service(Side, Vec<NameFilter>),
    Label(Side, Vec<Selector>),
    Port(Side, Vec<u16>),
    Identity(Side, Vec<u32>),
    Protocol(Vec<Protocol>),
    Verdict(Vec<i32>),
    DropReason(Vec<i32>),
    Direction(Vec<i32>),
    TcpFlags(Vec<TcpFlags>),
    Reply(Vec<bool>),
    NodeName(Vec<String>),
    IpVersion(Vec<i32>),
    EventType(Vec<EventTypeFilter>),
}

fn unsupported(filter: &FlowFilter) -> Option<&'static str> {
    let fields: [(&str, bool); 20] = [
        ("uuid", !filter.uuid.is_empty()),
        ("source_ip_xlated", !filter.source_ip_xlated.is_empty()),
        ("source_fqdn", !filter.source_fqdn.is_empty()),
        ("destination_fqdn", !filter.destination_fqdn.is_empty()),
        ("source_workload", !filter.source_workload.is_empty()),
        ("destination_workload", !filter.destination_workload.is_empty()),
        ("source_cluster_name", !filter.source_cluster_name.is_empty()),
        ("destination_cluster_name", !filter.destination_cluster_name.is_empty()),
        ("interface", !filter.interface.is_empty()),
        ("http_status_code", !filter.http_status_code.is_empty()),
        ("dns_query", !filter.dns_query.is_empty()),
        ("http_method", !filter.http_method.is_empty()),
        ("http_path", !filter.http_path.is_empty()),
        ("http_url", !filter.http_url.is_empty()),
        ("http_header", !filter.http_header.is_empty()),
        ("node_labels", !filter.node_labels.is_empty()),
        ("trace_id", !filter.trace_id.is_empty()),
        ("ip_trace_id", !filter.ip_trace_id.is_empty()),
        ("encrypted", !filter.encrypted.is_empty()),
        (
            "experimental.cel_expression",
            filter.experimental.as_ref().is_some_and(|e| !e.cel_expression.is_empty()),
        ),
    ];
    fields.into_iter().find_map(|(name, set)| set.then_some(name))
}

impl Compiled {
    fn new(filter: &FlowFilter) -> Result<Self, String> {
        if let Some(field) = unsupported(filter) {
            return Err(format!("the flow filter field {field} is not supported by Weir"));
        }
        let mut checks = Vec::new();
        let sides = [(Side::Source, filter), (Side::Destination, filter)];
        for (side, f) in sides {
            let (ips, pods, services, labels, ports, identities) = match side {
                Side::Source => (
                    &f.source_ip,
                    &f.source_pod,
                    &f.source_service,
                    &f.source_label,
                    &f.source_port,
                    &f.source_identity,
                ),
                Side::Destination => (
                    &f.destination_ip,
                    &f.destination_pod,
                    &f.destination_service,
                    &f.destination_label,
                    &f.destination_port,
                    &f.destination_identity,
                ),
            };
            if !ips.is_empty() {
                checks.push(Check::Ip(side, ips.iter().map(|s| parse_ip(s)).collect::<Result<_, _>>()?));
            }
            if !pods.is_empty() {
                checks.push(Check::Pod(
                    side,
                    pods.iter().map(|s| NameFilter::parse(s)).collect::<Result<_, _>>()?,
                ));
            }
            if !services.is_empty() {
                checks.push(Check::Service(
                    side,
                    services.iter().map(|s| NameFilter::parse(s)).collect::<Result<_, _>>()?,
                ));
            }
            if !labels.is_empty() {
                checks.push(Check::Label(
                    side,
                    labels.iter().map(|s| Selector::parse(s)).collect::<Result<_, _>>()?,
                ));
            }
            if !ports.is_empty() {
                let ports = ports
                    .iter()
                    .map(|p| {
                        p.trim().parse::<u16>().map_err(|_| format!("invalid port in flow filter: {p:?}"))
                    })
                    .collect::<Result<_, _>>()?;
                checks.push(Check::Port(side, ports));
            }
            if !identities.is_empty() {
                checks.push(Check::Identity(side, identities.clone()));
            }
        }
        if !filter.protocol.is_empty() {
            checks.push(Check::Protocol(
                filter.protocol.iter().map(|p| Protocol::parse(p)).collect::<Result<_, _>>()?,
            ));
        }
        if !filter.verdict.is_empty() {
            validate_enum(&filter.verdict, "verdict", |v| Verdict::try_from(v).is_ok())?;
            checks.push(Check::Verdict(filter.verdict.clone()));
        }
        if !filter.drop_reason_desc.is_empty() {
            validate_enum(&filter.drop_reason_desc, "drop_reason_desc", |v| DropReason::try_from(v).is_ok())?;
            checks.push(Check::DropReason(filter.drop_reason_desc.clone()));
        }
        if !filter.traffic_direction.is_empty() {
            validate_enum(&filter.traffic_direction, "traffic_direction", |v| {
                TrafficDirection::try_from(v).is_ok()
            })?;
            checks.push(Check::Direction(filter.traffic_direction.clone()));
        }
        if !filter.tcp_flags.is_empty() {
            checks.push(Check::TcpFlags(filter.tcp_flags.clone()));
        }
        if !filter.reply.is_empty() {
            checks.push(Check::Reply(filter.reply.clone()));
        }
        if !filter.node_name.is_empty() {
            checks.push(Check::NodeName(filter.node_name.clone()));
        }
        if !filter.ip_version.is_empty() {
            validate_enum(&filter.ip_version, "ip_version", |v| IpVersion::try_from(v).is_ok())?;
            checks.push(Check::IpVersion(filter.ip_version.clone()));
        }
        if !filter.event_type.is_empty() {
            checks.push(Check::EventType(filter.event_type.clone()));
        }
        Ok(Self { checks })
    }

    fn matches(&self, flow: &Flow) -> bool {
        self.checks.iter().all(|check| check.matches(flow))
    }
}

fn validate_enum(values: &[i32], field: &str, known: impl Fn(i32) -> bool) -> Result<(), String> {
    match values.iter().find(|v| !known(**v)) {
        Some(v) => Err(format!("unknown {field} value {v} in flow filter")),
        None => Ok(()),
    }
}

fn parse_ip(s: &str) -> Result<IpNetwork, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNetwork::from(ip));
    }
    s.parse::<IpNetwork>().map_err(|_| format!("invalid IP address or CIDR in flow filter: {s:?}"))
}

impl Check {
    fn matches(&self, flow: &Flow) -> bool {
        match self {
            Check::Ip(side, nets) => {
                let Some(ip) = flow.ip.as_ref() else { return false };
                let address = match side {
                    Side::Source => &ip.source,
                    Side::Destination => &ip.destination,
                };
                address.parse::<IpAddr>().is_ok_and(|a| nets.iter().any(|n| n.contains(a)))
            }
            Check::Pod(side, names) => {
                let ep = match side {
                    Side::Source => flow.source.as_ref(),
                    Side::Destination => flow.destination.as_ref(),
                };
                let Some(ep) = ep else { return false };
                NameFilter::any(names, &ep.namespace, &ep.pod_name)
            }
            Check::Service(side, names) => {
                let svc = match side {
                    Side::Source => flow.source_service.as_ref(),
                    Side::Destination => flow.destination_service.as_ref(),
                };
                let Some(svc) = svc else { return false };
                NameFilter::any(names, &svc.namespace, &svc.name)
            }
            Check::Label(side, selectors) => {
                let ep = match side {
                    Side::Source => flow.source.as_ref(),
                    Side::Destination => flow.destination.as_ref(),
                };
                let labels: Vec<Label> =
                    ep.map(|ep| ep.labels.iter().map(|l| Label::parse(l)).collect()).unwrap_or_default();
                selectors.iter().any(|s| s.matches(&labels))
            }
            Check::Port(side, ports) => {
                let Some((sport, dport)) = l4_ports(flow) else { return false };
                let port = match side {
                    Side::Source => sport,
                    Side::Destination => dport,
                };
                ports.contains(&port)
            }
            Check::Identity(side, ids) => {
                let ep = match side {
                    Side::Source => flow.source.as_ref(),
                    Side::Destination => flow.destination.as_ref(),
                };
                ep.is_some_and(|ep| ids.contains(&ep.identity))
            }
            Check::Protocol(protocols) => {
                let actual = match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
                    Some(layer4::Protocol::Tcp(_)) => Protocol::Tcp,
                    Some(layer4::Protocol::Udp(_)) => Protocol::Udp,
                    Some(layer4::Protocol::Sctp(_)) => Protocol::Sctp,
                    Some(layer4::Protocol::IcmPv4(_)) => Protocol::Icmpv4,
                    Some(layer4::Protocol::IcmPv6(_)) => Protocol::Icmpv6,
                    None => return false,
                };
                protocols.iter().any(|p| p.matches(actual))
            }
            Check::Verdict(v) => v.contains(&flow.verdict),
            Check::DropReason(v) => v.contains(&flow.drop_reason_desc),
            Check::Direction(v) => v.contains(&flow.traffic_direction),
            Check::TcpFlags(wanted) => {
                let Some(layer4::Protocol::Tcp(tcp)) = flow.l4.as_ref().and_then(|l| l.protocol.as_ref())
                else {
                    return false;
                };
                let have = tcp.flags.unwrap_or_default();
                wanted.iter().any(|w| flags_subset(w, &have))
            }
            Check::Reply(v) => flow.is_reply.is_some_and(|r| v.contains(&r)),
            Check::NodeName(patterns) => patterns.iter().any(|p| {
                // `cluster/node` patterns: Weir has one cluster.
                let node = p.rsplit_once('/').map_or(p.as_str(), |(_, n)| n);
                glob(node, &flow.node_name)
            }),
            Check::IpVersion(v) => flow.ip.as_ref().is_some_and(|ip| v.contains(&ip.ip_version)),
            Check::EventType(filters) => {
                let Some(et) = flow.event_type.as_ref() else { return false };
                filters
                    .iter()
                    .any(|f| f.r#type == et.r#type && (!f.match_sub_type || f.sub_type == et.sub_type))
            }
        }
    }
}

fn l4_ports(flow: &Flow) -> Option<(u16, u16)> {
    let (s, d) = match flow.l4.as_ref()?.protocol.as_ref()? {
        layer4::Protocol::Tcp(p) => (p.source_port, p.destination_port),
        layer4::Protocol::Udp(p) => (p.source_port, p.destination_port),
        layer4::Protocol::Sctp(p) => (p.source_port, p.destination_port),
        _ => return None,
    };
    Some((s as u16, d as u16))
}

/// Every flag set in `wanted` is set in `have`.
fn flags_subset(wanted: &TcpFlags, have: &TcpFlags) -> bool {
    let pairs = [
        (wanted.fin, have.fin),
        (wanted.syn, have.syn),
        (wanted.rst, have.rst),
        (wanted.psh, have.psh),
        (wanted.ack, have.ack),
        (wanted.urg, have.urg),
        (wanted.ece, have.ece),
        (wanted.cwr, have.cwr),
        (wanted.ns, have.ns),
    ];
    pairs.iter().all(|(w, h)| !w || *h)
}

/// `*` matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(text) = text.strip_prefix(head) else { return false };
            (0..=text.len()).filter(|i| text.is_char_boundary(*i)).any(|i| glob(rest, &text[i..]))
        }
    }
}

/// `namespace/prefix`, `namespace/` (the whole namespace) or `prefix` (in
/// `default`), as Hubble's `ParseNamespaceName`.
#[derive(Debug)]
struct NameFilter {
    namespace: String,
    prefix: String,
}

impl NameFilter {
    fn parse(s: &str) -> Result<Self, String> {
        let (namespace, prefix) = match s.split_once('/') {
            Some((ns, rest)) => (ns, rest.split('/').next().unwrap_or_default()),
            None if s.is_empty() => ("", ""),
            None => ("default", s),
        };
        if namespace.is_empty() && prefix.is_empty() {
            return Err(format!("invalid filter, must be [namespace/][<name>], got {s:?}"));
        }
        Ok(Self { namespace: namespace.to_owned(), prefix: prefix.to_owned() })
    }

    fn any(filters: &[NameFilter], namespace: &str, name: &str) -> bool {
        if namespace.is_empty() && name.is_empty() {
            return false;
        }
        filters.iter().any(|f| f.namespace == namespace && name.starts_with(&f.prefix))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmpv4,
    Icmpv6,
    /// ICMP of either family.
    Icmp,
    /// An L7 protocol (http, dns, kafka): Weir reports no L7 flows.
    L7,
}

impl Protocol {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            "icmp" => Protocol::Icmp,
            "icmpv4" => Protocol::Icmpv4,
            "icmpv6" => Protocol::Icmpv6,
            "http" | "dns" | "kafka" => Protocol::L7,
            other => return Err(format!("unknown protocol in flow filter: {other:?}")),
        })
    }

    fn matches(self, actual: Protocol) -> bool {
        self == actual || (self == Protocol::Icmp && matches!(actual, Protocol::Icmpv4 | Protocol::Icmpv6))
    }
}

/// A flow label: `source:key=value` (Cilium's form; the source is optional).
#[derive(Debug)]
struct Label<'a> {
    source: Option<&'a str>,
    key: &'a str,
    value: &'a str,
}

impl<'a> Label<'a> {
    fn parse(s: &'a str) -> Self {
        let (kv_source, kv) = split_source(s);
        let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
        Label { source: kv_source, key, value }
    }
}

/// `k8s:app` → (Some("k8s"), "app"). Kubernetes label keys have no `:`.
fn split_source(s: &str) -> (Option<&str>, &str) {
    match s.split_once(':') {
        Some((source, rest)) => (Some(source), rest),
        None => (None, s),
    }
}

/// A Kubernetes label selector (`a=b,c!=d,e in (f,g),h notin (i),j,!k`),
/// with Cilium's optional `source:` prefix on keys (`any:` or none matches
/// every source).
#[derive(Debug)]
struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug)]
struct Requirement {
    source: Option<String>,
    key: String,
    op: Op,
}

#[derive(Debug)]
enum Op {
    Exists,
    NotExists,
    In(Vec<String>),
    NotIn(Vec<String>),
}

impl Selector {
    fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid label selector in flow filter: {s:?}");
        let mut requirements = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                return Err(bad());
            }
            let (key, op) = if let Some(key) = part.strip_prefix('!') {
                (key.trim(), Op::NotExists)
            } else if let Some((key, value)) = part.split_once("!=") {
                (key.trim(), Op::NotIn(vec![value.trim().to_owned()]))
            } else if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (key.trim(), Op::In(vec![value.trim().to_owned()]))
            } else if let Some((key, values)) = split_set(part, " notin ") {
                (key, Op::NotIn(values.ok_or_else(bad)?))
            } else if let Some((key, values)) = split_set(part, " in ") {
                (key, Op::In(values.ok_or_else(bad)?))
            } else {
                (part, Op::Exists)
            };
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(bad());
            }
            let (source, key) = split_source(key);
            let source = source.filter(|s| *s != "any").map(str::to_owned);
            requirements.push(Requirement { source, key: key.to_owned(), op });
        }
        if requirements.is_empty() {
            return Err(bad());
        }
        Ok(Self { requirements })
    }

    fn matches(&self, labels: &[Label<'_>]) -> bool {
        self.requirements.iter().all(|r| {
            let mut found = labels
                .iter()
                .filter(|l| l.key == r.key && (r.source.is_none() || l.source == r.source.as_deref()));
            match &r.op {
                Op::Exists => found.next().is_some(),
                Op::NotExists => found.next().is_none(),
                Op::In(values) => found.any(|l| values.iter().any(|v| v == l.value)),
                Op::NotIn(values) => !found.any(|l| values.iter().any(|v| v == l.value)),
            }
        })
    }
}

/// Splits on commas outside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// `key in (a, b)` → `("key", Some(["a", "b"]))`; `None` values when the set
/// is malformed.
fn split_set<'a>(part: &'a str, op: &str) -> Option<(&'a str, Option<Vec<String>>)> {
    let (key, rest) = part.split_once(op)?;
    let values = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .map(|inner| inner.split(',').map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).collect());
    Some((key.trim(), values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_proto::flow::{Endpoint, Ip, Layer4, Service, Tcp};

    fn flow(src: (&str, &str, &str), dst: (&str, &str, &str), dport: u32, verdict: Verdict) -> Flow {
        let ep = |(ns, pod, _ip): (&str, &str, &str)| Endpoint {
            namespace: ns.into(),
            pod_name: pod.into(),
            labels: vec![format!("k8s:app={pod}"), format!("k8s:io.kubernetes.pod.namespace={ns}")],
            identity: if pod.is_empty() { 2 } else { 1000 },
            ..Endpoint::default()
        };
        Flow {
            ip: Some(Ip {
                source: src.2.into(),
                destination: dst.2.into(),
                ip_version: IpVersion::IPv4 as i32,
                ..Ip::default()
            }),
            source: Some(ep(src)),
            destination: Some(ep(dst)),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp {
                    source_port: 40000,
                    destination_port: dport,
                    flags: Some(TcpFlags { syn: true, ..TcpFlags::default() }),
                })),
            }),
            verdict: verdict as i32,
            is_reply: Some(false),
            node_name: "node-a".into(),
            ..Flow::default()
        }
    }

    fn web() -> Flow {
        let mut f = flow(
            ("default", "client", "10.244.0.10"),
            ("prod", "web-1", "10.244.0.11"),
            8080,
            Verdict::Forwarded,
        );
        f.destination_service = Some(Service { name: "web".into(), namespace: "prod".into() });
        f
    }

    fn check(filter: FlowFilter, flow: &Flow) -> bool {
        Filters::compile(&[filter], &[]).unwrap().matches(flow)
    }

    #[test]
    fn pods_and_namespaces() {
        let f = web();
        assert!(check(FlowFilter { source_pod: vec!["client".into()], ..Default::default() }, &f));
        assert!(check(FlowFilter { source_pod: vec!["default/cl".into()], ..Default::default() }, &f));
        assert!(check(FlowFilter { destination_pod: vec!["prod/".into()], ..Default::default() }, &f));
        assert!(!check(FlowFilter { destination_pod: vec!["web".into()], ..Default::default() }, &f));
        assert!(!check(FlowFilter { source_pod: vec!["prod/".into()], ..Default::default() }, &f));
        assert!(
            Filters::compile(&[FlowFilter { source_pod: vec!["".into()], ..Default::default() }], &[])
                .is_err()
        );
    }

    #[test]
    fn ips_ports_protocols_verdicts() {
        let f = web();
        assert!(check(FlowFilter { destination_ip: vec!["10.244.0.0/24".into()], ..Default::default() }, &f));
        assert!(!check(FlowFilter { source_ip: vec!["10.244.0.11".into()], ..Default::default() }, &f));
        assert!(check(FlowFilter { destination_port: vec!["8080".into()], ..Default::default() }, &f));
        assert!(!check(FlowFilter { source_port: vec!["8080".into()], ..Default::default() }, &f));
        assert!(check(FlowFilter { protocol: vec!["TCP".into()], ..Default::default() }, &f));
        assert!(!check(FlowFilter { protocol: vec!["udp".into(), "http".into()], ..Default::default() }, &f));
        assert!(check(FlowFilter { verdict: vec![Verdict::Forwarded as i32], ..Default::default() }, &f));
        assert!(!check(FlowFilter { verdict: vec![Verdict::Dropped as i32], ..Default::default() }, &f));
        assert!(check(FlowFilter { reply: vec![false], ..Default::default() }, &f));
        assert!(check(
            FlowFilter {
                tcp_flags: vec![TcpFlags { syn: true, ..TcpFlags::default() }],
                ..Default::default()
            },
            &f
        ));
        assert!(!check(
            FlowFilter {
                tcp_flags: vec![TcpFlags { syn: true, ack: true, ..TcpFlags::default() }],
                ..Default::default()
            },
            &f
        ));
        assert!(check(FlowFilter { node_name: vec!["node-*".into()], ..Default::default() }, &f));
        assert!(
            Filters::compile(
                &[FlowFilter { destination_port: vec!["http".into()], ..Default::default() }],
                &[]
            )
            .is_err()
        );
        assert!(
            Filters::compile(
                &[FlowFilter { source_ip: vec!["10.0.0.300".into()], ..Default::default() }],
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn services_and_labels() {
        let f = web();
        assert!(check(FlowFilter { destination_service: vec!["prod/web".into()], ..Default::default() }, &f));
        assert!(!check(FlowFilter { destination_service: vec!["web".into()], ..Default::default() }, &f));
        assert!(!check(FlowFilter { source_service: vec!["prod/".into()], ..Default::default() }, &f));
        for (selector, want) in [
            ("app=web-1", true),
            ("k8s:app=web-1", true),
            ("any:app==web-1", true),
            ("app!=web-1", false),
            ("app in (a, web-1)", true),
            ("app notin (web-1)", false),
            ("app", true),
            ("!app", false),
            ("app=web-1,io.kubernetes.pod.namespace=prod", true),
            ("app=web-1,io.kubernetes.pod.namespace=default", false),
            ("reserved:app=web-1", false),
        ] {
            assert_eq!(
                check(FlowFilter { destination_label: vec![selector.into()], ..Default::default() }, &f),
                want,
                "{selector}"
            );
        }
        assert!(
            Filters::compile(
                &[FlowFilter { source_label: vec!["app in a".into()], ..Default::default() }],
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn lists_and_negation() {
        let f = web();
        let ns = |n: &str| FlowFilter { source_pod: vec![format!("{n}/")], ..Default::default() };
        let dropped = FlowFilter { verdict: vec![Verdict::Dropped as i32], ..Default::default() };
        // OR between filters, minus the blacklist.
        assert!(Filters::compile(&[ns("kube-system"), ns("default")], &[]).unwrap().matches(&f));
        assert!(!Filters::compile(&[ns("default")], &[ns("default")]).unwrap().matches(&f));
        assert!(Filters::compile(&[], std::slice::from_ref(&dropped)).unwrap().matches(&f));
        // AND within one filter.
        let both = FlowFilter { verdict: dropped.verdict.clone(), ..ns("default") };
        assert!(!Filters::compile(&[both], &[]).unwrap().matches(&f));
    }

    #[test]
    fn unsupported_fields_are_refused() {
        let err =
            Filters::compile(&[FlowFilter { source_fqdn: vec!["a.com".into()], ..Default::default() }], &[])
                .unwrap_err();
        assert!(err.contains("source_fqdn"), "{err}");
        assert!(
            Filters::compile(&[], &[FlowFilter { http_method: vec!["GET".into()], ..Default::default() }])
                .is_err()
        );
    }
}
