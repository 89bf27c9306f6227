//! `weir observe`: flows from the agent's Observer API, with `hubble
//! observe`'s flags, filter semantics and output formats. Unlike the other
//! commands it talks to the running agent (over its unix socket by default,
//! `--server` otherwise), since flows live in the agent's memory.
//!
//! Its flags are hubble's, including `-o compact|dict|json|jsonpb|table`,
//! which the other commands' global `-o table|json` cannot express: `main`
//! hands `weir [global flags] observe …` to [`dispatch`] before parsing.

use std::{
    ffi::OsString,
    fmt::Write as _,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail};
use clap::{ArgAction, CommandFactory as _, FromArgMatches as _, Parser, ValueEnum};
use prost::Message as _;
use serde_json::{Map, Value, json};
use tonic::transport::{Channel, Endpoint, Uri};
use weir_proto::{
    flow::{
        DropReason, EventTypeFilter, Flow, FlowFilter, IpVersion, LostEvent, LostEventSource, TcpFlags,
        TraceObservationPoint, TrafficDirection, Verdict, layer4,
    },
    observer::{
        GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes, observer_client::ObserverClient,
    },
};

/// How long to wait for the agent to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// hubble's default `--last` when neither following nor bounded in time.
const DEFAULT_LAST: u64 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// One line per flow, as `hubble observe` prints by default.
    Compact,
    /// `KEY: value` blocks.
    Dict,
    /// One JSON object per line: the GetFlowsResponse (proto field names).
    Json,
    /// Same as json (hubble's name).
    Jsonpb,
    /// Aligned columns (not with --follow).
    Table,
}

/// Observe flows through the agent, like `hubble observe`.
///
/// Filters that apply to either side (--pod, --ip, --port, --label,
/// --service, --identity, --namespace) select flows from or to the value;
/// --from-X and --to-X select one side. Different filters combine with AND,
/// repeated values of one filter with OR. --not negates the filter after it.
#[derive(Debug, Parser)]
#[command(name = "weir observe", version)]
struct Args {
    /// The agent's bpffs root (its --bpffs-root): locates its unix socket.
    #[arg(long, default_value = "/sys/fs/bpf/weir", env = "WEIR_BPFFS_ROOT")]
    bpffs_root: PathBuf,
    /// Observer API address: unix:///path/to/hubble.sock, host:port or
    /// http://host:port (default: the agent's unix socket,
    /// /run/weir/<name of --bpffs-root>/hubble.sock).
    #[arg(long, env = "WEIR_SERVER")]
    server: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Compact)]
    output: Output,
    /// Print the node name in each line.
    #[arg(long)]
    print_node_name: bool,

    /// The last N flows (default 20 unless following or bounded by time).
    #[arg(long, value_name = "N")]
    last: Option<u64>,
    /// The first N flows in the agent's buffer.
    #[arg(long, value_name = "N", conflicts_with_all = ["last", "follow"])]
    first: Option<u64>,
    /// Every flow in the agent's buffer.
    #[arg(long, conflicts_with_all = ["last", "first"])]
    all: bool,
    /// Keep printing flows as they happen.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Flows since a time: RFC 3339 (2024-05-01T10:00:00Z) or relative (30s, 5m, 1h).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Flows until a time: RFC 3339 or relative.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,

    /// Negate the filter that follows.
    #[arg(long, action = ArgAction::Count)]
    not: u8,
    /// Flows from or to pods of this namespace.
    #[arg(short = 'n', long, value_name = "NAMESPACE", action = ArgAction::Append)]
    namespace: Vec<String>,
    #[arg(long, value_name = "NAMESPACE", action = ArgAction::Append)]
    from_namespace: Vec<String>,
    #[arg(long, value_name = "NAMESPACE", action = ArgAction::Append)]
    to_namespace: Vec<String>,
    /// Flows from or to a pod: [namespace/]name-prefix (namespace default, or -n).
    #[arg(long, value_name = "POD", action = ArgAction::Append)]
    pod: Vec<String>,
    #[arg(long, value_name = "POD", action = ArgAction::Append)]
    from_pod: Vec<String>,
    #[arg(long, value_name = "POD", action = ArgAction::Append)]
    to_pod: Vec<String>,
    /// Flows from or to an IP address or CIDR.
    #[arg(long, value_name = "IP", action = ArgAction::Append)]
    ip: Vec<String>,
    #[arg(long, value_name = "IP", action = ArgAction::Append)]
    from_ip: Vec<String>,
    #[arg(long, value_name = "IP", action = ArgAction::Append)]
    to_ip: Vec<String>,
    /// Flows from or to a port.
    #[arg(long, value_name = "PORT", action = ArgAction::Append)]
    port: Vec<String>,
    #[arg(long, value_name = "PORT", action = ArgAction::Append)]
    from_port: Vec<String>,
    #[arg(long, value_name = "PORT", action = ArgAction::Append)]
    to_port: Vec<String>,
    /// Flows from or to endpoints matching a label selector (app=web,tier in (a,b)).
    #[arg(short = 'l', long, value_name = "SELECTOR", action = ArgAction::Append)]
    label: Vec<String>,
    #[arg(long, value_name = "SELECTOR", action = ArgAction::Append)]
    from_label: Vec<String>,
    #[arg(long, value_name = "SELECTOR", action = ArgAction::Append)]
    to_label: Vec<String>,
    /// Flows from or to a service: [namespace/]name-prefix.
    #[arg(long, value_name = "SERVICE", action = ArgAction::Append)]
    service: Vec<String>,
    #[arg(long, value_name = "SERVICE", action = ArgAction::Append)]
    from_service: Vec<String>,
    #[arg(long, value_name = "SERVICE", action = ArgAction::Append)]
    to_service: Vec<String>,
    /// Flows from or to a security identity (a number, or world, host…).
    #[arg(long, value_name = "IDENTITY", action = ArgAction::Append)]
    identity: Vec<String>,
    #[arg(long, value_name = "IDENTITY", action = ArgAction::Append)]
    from_identity: Vec<String>,
    #[arg(long, value_name = "IDENTITY", action = ArgAction::Append)]
    to_identity: Vec<String>,
    /// L4 protocol: tcp, udp, sctp, icmp.
    #[arg(long, value_name = "PROTOCOL", action = ArgAction::Append)]
    protocol: Vec<String>,
    /// FORWARDED or DROPPED (case-insensitive).
    #[arg(long, value_name = "VERDICT", action = ArgAction::Append)]
    verdict: Vec<String>,
    /// A drop reason: POLICY_DENIED, SERVICE_BACKEND_NOT_FOUND, IS_A_CLUSTERIP, or its code.
    #[arg(long, value_name = "REASON", action = ArgAction::Append)]
    drop_reason_desc: Vec<String>,
    /// ingress or egress.
    #[arg(long, value_name = "DIRECTION", action = ArgAction::Append)]
    traffic_direction: Vec<String>,
    /// TCP flags that must all be set: SYN, ACK, RST, FIN, PSH, URG, ECE, CWR, NS (comma-separated).
    #[arg(long, value_name = "FLAGS", action = ArgAction::Append)]
    tcp_flags: Vec<String>,
    /// Event type: trace, drop, or trace:to-endpoint / trace:to-stack / drop:133.
    #[arg(short = 't', long = "type", value_name = "TYPE[:SUBTYPE]", action = ArgAction::Append)]
    event_type: Vec<String>,
    /// Node name pattern (`*` wildcards).
    #[arg(long, value_name = "NAME", action = ArgAction::Append)]
    node_name: Vec<String>,
}

/// Runs `weir observe` if that is the subcommand in `std::env::args`
/// (after any global flags); `None` for every other command.
pub fn dispatch() -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().collect();
    let position = observe_position(&args)?;
    let mut rest = args;
    rest.remove(position);
    if let Some(first) = rest.first_mut() {
        *first = "weir observe".into();
    }
    Some(match run(rest) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("weir: {err:#}");
            ExitCode::FAILURE
        }
    })
}

/// The index of the `observe` subcommand: the first word that is not a
/// global flag or a global flag's value.
fn observe_position(args: &[OsString]) -> Option<usize> {
    let mut i = 1;
    while let Some(arg) = args.get(i) {
        let arg = arg.to_str()?;
        match arg {
            "--bpffs-root" | "-o" | "--output" => i += 2,
            _ if arg.starts_with('-') => i += 1,
            "observe" => return Some(i),
            _ => return None,
        }
    }
    None
}

fn run(argv: Vec<OsString>) -> anyhow::Result<()> {
    let matches = Args::command().get_matches_from(argv);
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if args.follow && args.output == Output::Table {
        bail!("-o table cannot be combined with --follow (its columns need every row first)");
    }
    let request = request(&args, &matches)?;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(observe(&args, request))
}

/// The GetFlows request for the flags, as hubble builds it.
fn request(args: &Args, matches: &clap::ArgMatches) -> anyhow::Result<GetFlowsRequest> {
    let now = now_ns();
    let since = args.since.as_deref().map(|s| parse_time(s, now)).transpose()?;
    let until = args.until.as_deref().map(|s| parse_time(s, now)).transpose()?;
    let number = if let Some(n) = args.first {
        n
    } else if let Some(n) = args.last {
        n
    } else if args.all {
        u64::MAX
    } else if args.follow || since.is_some() || until.is_some() {
        0
    } else {
        DEFAULT_LAST
    };
    let (whitelist, blacklist) = filters(args, matches)?;
    Ok(GetFlowsRequest {
        number,
        first: args.first.is_some(),
        follow: args.follow,
        whitelist,
        blacklist,
        since: since.map(timestamp),
        until: until.map(timestamp),
        ..GetFlowsRequest::default()
    })
}

/// Which side(s) of a flow a filter flag applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// Source or destination: two alternative filters.
    Either,
    From,
    To,
    /// Not about one side (protocol, verdict, ...).
    Flow,
}

/// hubble's filter pair: `left` holds the source side of either-side
/// filters, `right` the destination side; everything else is in both.
#[derive(Debug, Default)]
struct Pair {
    left: FlowFilter,
    right: FlowFilter,
    used: bool,
}

impl Pair {
    fn into_filters(self) -> Vec<FlowFilter> {
        if !self.used {
            Vec::new()
        } else if self.left == self.right {
            vec![self.left]
        } else {
            vec![self.left, self.right]
        }
    }
}

/// (argument id, scope) of every filter flag.
const FILTER_FLAGS: &[(&str, Scope)] = &[
    ("namespace", Scope::Either),
    ("from_namespace", Scope::From),
    ("to_namespace", Scope::To),
    ("pod", Scope::Either),
    ("from_pod", Scope::From),
    ("to_pod", Scope::To),
    ("ip", Scope::Either),
    ("from_ip", Scope::From),
    ("to_ip", Scope::To),
    ("port", Scope::Either),
    ("from_port", Scope::From),
    ("to_port", Scope::To),
    ("label", Scope::Either),
    ("from_label", Scope::From),
    ("to_label", Scope::To),
    ("service", Scope::Either),
    ("from_service", Scope::From),
    ("to_service", Scope::To),
    ("identity", Scope::Either),
    ("from_identity", Scope::From),
    ("to_identity", Scope::To),
    ("protocol", Scope::Flow),
    ("verdict", Scope::Flow),
    ("drop_reason_desc", Scope::Flow),
    ("traffic_direction", Scope::Flow),
    ("tcp_flags", Scope::Flow),
    ("event_type", Scope::Flow),
    ("node_name", Scope::Flow),
];

/// Whitelist and blacklist from the filter flags, in command-line order so
/// that each --not negates the filter right after it.
fn filters(args: &Args, matches: &clap::ArgMatches) -> anyhow::Result<(Vec<FlowFilter>, Vec<FlowFilter>)> {
    let mut occurrences: Vec<(usize, &str, Scope, String)> = Vec::new();
    for (id, scope) in FILTER_FLAGS {
        let (Some(indices), Some(values)) = (matches.indices_of(id), matches.get_many::<String>(id)) else {
            continue;
        };
        occurrences.extend(indices.zip(values).map(|(i, v)| (i, *id, *scope, v.clone())));
    }
    occurrences.sort_by_key(|o| o.0);
    let mut nots: Vec<usize> = if args.not > 0 {
        matches.indices_of("not").map(Iterator::collect).unwrap_or_default()
    } else {
        Vec::new()
    };
    nots.sort_unstable();

    // Namespaces qualify pod names given without one (as hubble's -n does);
    // alone, they select whole namespaces.
    let has_pods = !(args.pod.is_empty() && args.from_pod.is_empty() && args.to_pod.is_empty());
    let namespaces: Vec<&String> = args.namespace.iter().collect();

    let (mut allow, mut deny) = (Pair::default(), Pair::default());
    let mut pending_nots = 0;
    let mut next_not = nots.iter().peekable();
    for (index, id, scope, value) in occurrences {
        while next_not.next_if(|n| **n < index).is_some() {
            pending_nots += 1;
        }
        let pair = if pending_nots > 0 {
            pending_nots -= 1;
            &mut deny
        } else {
            &mut allow
        };
        let values: Vec<String> = match id {
            "namespace" | "from_namespace" | "to_namespace" if has_pods && id == "namespace" => continue,
            "namespace" | "from_namespace" | "to_namespace" => vec![format!("{value}/")],
            "pod" | "from_pod" | "to_pod" if !value.contains('/') && !namespaces.is_empty() => {
                namespaces.iter().map(|ns| format!("{ns}/{value}")).collect()
            }
            _ => vec![value],
        };
        for value in values {
            add(pair, id, scope, &value)?;
        }
    }
    if pending_nots > 0 || next_not.next().is_some() {
        bail!("--not must be followed by a filter");
    }
    Ok((allow.into_filters(), deny.into_filters()))
}

/// Adds one filter value to a pair.
fn add(pair: &mut Pair, id: &str, scope: Scope, value: &str) -> anyhow::Result<()> {
    pair.used = true;
    let field = id.trim_start_matches("from_").trim_start_matches("to_");
    match scope {
        Scope::Either => {
            set_side(&mut pair.left, field, true, value)?;
            set_side(&mut pair.right, field, false, value)?;
        }
        Scope::From | Scope::To => {
            set_side(&mut pair.left, field, scope == Scope::From, value)?;
            set_side(&mut pair.right, field, scope == Scope::From, value)?;
        }
        Scope::Flow => {
            set_flow(&mut pair.left, field, value)?;
            set_flow(&mut pair.right, field, value)?;
        }
    }
    Ok(())
}

fn set_side(filter: &mut FlowFilter, field: &str, source: bool, value: &str) -> anyhow::Result<()> {
    let v = value.to_owned();
    match (field, source) {
        ("namespace" | "pod", true) => filter.source_pod.push(v),
        ("namespace" | "pod", false) => filter.destination_pod.push(v),
        ("ip", true) => filter.source_ip.push(v),
        ("ip", false) => filter.destination_ip.push(v),
        ("port", true) => filter.source_port.push(v),
        ("port", false) => filter.destination_port.push(v),
        ("label", true) => filter.source_label.push(v),
        ("label", false) => filter.destination_label.push(v),
        ("service", true) => filter.source_service.push(v),
        ("service", false) => filter.destination_service.push(v),
        ("identity", true) => filter.source_identity.push(parse_identity(value)?),
        ("identity", false) => filter.destination_identity.push(parse_identity(value)?),
        _ => bail!("internal: unknown filter {field}"),
    }
    Ok(())
}

fn set_flow(filter: &mut FlowFilter, field: &str, value: &str) -> anyhow::Result<()> {
    match field {
        "protocol" => filter.protocol.push(value.to_owned()),
        "verdict" => filter.verdict.push(
            Verdict::from_str_name(&value.to_ascii_uppercase())
                .with_context(|| format!("unknown verdict {value:?} (FORWARDED, DROPPED, ...)"))?
                as i32,
        ),
        "drop_reason_desc" => filter.drop_reason_desc.push(match value.parse::<i32>() {
            Ok(code) => code,
            Err(_) => DropReason::from_str_name(&value.to_ascii_uppercase())
                .with_context(|| format!("unknown drop reason {value:?} (e.g. POLICY_DENIED)"))?
                as i32,
        }),
        "traffic_direction" => filter.traffic_direction.push(
            TrafficDirection::from_str_name(&value.to_ascii_uppercase())
                .filter(|d| *d != TrafficDirection::Unknown)
                .with_context(|| format!("unknown traffic direction {value:?} (ingress, egress)"))?
                as i32,
        ),
        "tcp_flags" => {
            let mut flags = TcpFlags::default();
            for flag in value.split(',').map(|f| f.trim().to_ascii_uppercase()) {
                match flag.as_str() {
                    "FIN" => flags.fin = true,
                    "SYN" => flags.syn = true,
                    "RST" => flags.rst = true,
                    "PSH" => flags.psh = true,
                    "ACK" => flags.ack = true,
                    "URG" => flags.urg = true,
                    "ECE" => flags.ece = true,
                    "CWR" => flags.cwr = true,
                    "NS" => flags.ns = true,
                    other => bail!("unknown TCP flag {other:?}"),
                }
            }
            filter.tcp_flags.push(flags);
        }
        "type" | "event_type" => filter.event_type.push(parse_event_type(value)?),
        "node_name" => filter.node_name.push(value.to_owned()),
        _ => bail!("internal: unknown filter {field}"),
    }
    Ok(())
}

/// Cilium's reserved identities, by number.
const RESERVED_IDENTITIES: &[(u32, &str)] = &[
    (0, "unknown"),
    (1, "host"),
    (2, "world"),
    (3, "unmanaged"),
    (4, "health"),
    (5, "init"),
    (6, "remote-node"),
    (7, "kube-apiserver"),
    (8, "ingress"),
    (9, "world-ipv4"),
    (10, "world-ipv6"),
];

fn parse_identity(value: &str) -> anyhow::Result<u32> {
    if let Ok(id) = value.parse() {
        return Ok(id);
    }
    RESERVED_IDENTITIES
        .iter()
        .find(|(_, name)| *name == value)
        .map(|(id, _)| *id)
        .with_context(|| format!("unknown identity {value:?}"))
}

/// Monitor message types and trace observation points, as hubble names them.
const EVENT_TYPES: &[(i32, &str)] = &[
    (1, "drop"),
    (2, "debug"),
    (3, "capture"),
    (4, "trace"),
    (5, "policy-verdict"),
    (7, "trace-sock"),
    (129, "l7"),
    (130, "agent"),
];
const TRACE_POINTS: &[&str] = &[
    "to-endpoint",
    "to-proxy",
    "to-host",
    "to-stack",
    "to-overlay",
    "from-endpoint",
    "from-proxy",
    "from-host",
    "from-stack",
    "from-overlay",
    "from-network",
    "to-network",
    "from-crypto",
    "to-crypto",
];

fn parse_event_type(value: &str) -> anyhow::Result<EventTypeFilter> {
    let (kind, sub) = value.split_once(':').map_or((value, None), |(k, s)| (k, Some(s)));
    let r#type = match kind.parse::<i32>() {
        Ok(n) => n,
        Err(_) => EVENT_TYPES
            .iter()
            .find(|(_, name)| *name == kind)
            .map(|(n, _)| *n)
            .with_context(|| format!("unknown event type {kind:?} (trace, drop, ...)"))?,
    };
    let sub_type = match sub {
        None => None,
        Some(s) => Some(match s.parse::<i32>() {
            Ok(n) => n,
            Err(_) if r#type == 4 => TRACE_POINTS
                .iter()
                .position(|p| *p == s)
                .with_context(|| format!("unknown trace observation point {s:?}"))?
                as i32,
            Err(_) if r#type == 1 => DropReason::from_str_name(&s.to_ascii_uppercase())
                .with_context(|| format!("unknown drop reason {s:?}"))?
                as i32,
            Err(_) => bail!("unknown sub-type {s:?} of {kind}"),
        }),
    };
    Ok(EventTypeFilter { r#type, match_sub_type: sub_type.is_some(), sub_type: sub_type.unwrap_or(0) })
}

fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128)
}

fn timestamp(ns: i128) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000) as i64,
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// RFC 3339, or a duration before `now` (`30s`, `5m`, `1h30m`, `250ms`).
fn parse_time(value: &str, now: i128) -> anyhow::Result<i128> {
    if let Ok(ts) = value.parse::<jiff::Timestamp>() {
        return Ok(ts.as_nanosecond());
    }
    let ago = parse_duration(value).with_context(|| {
        format!("invalid time {value:?}: use RFC 3339 (2024-05-01T10:00:00Z) or a duration (30s, 5m)")
    })?;
    Ok(now - ago as i128)
}

/// A Go-style duration: number-unit pairs, units ns, us, ms, s, m, h.
fn parse_duration(value: &str) -> Option<u128> {
    let mut total = 0u128;
    let mut rest = value.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += (number * scale) as u128;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// Where the Observer API is.
#[derive(Debug, Clone)]
enum Server {
    Unix(PathBuf),
    Tcp(String),
}

impl Server {
    fn from_args(args: &Args) -> Self {
        match args.server.as_deref() {
            None | Some("") => Server::Unix(weir_proto::default_socket_path(&args.bpffs_root)),
            Some(s) => match s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")) {
                Some(path) => Server::Unix(PathBuf::from(path)),
                None if s.contains("://") => Server::Tcp(s.to_owned()),
                None => Server::Tcp(format!("http://{s}")),
            },
        }
    }
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Server::Unix(path) => write!(f, "unix://{}", path.display()),
            Server::Tcp(uri) => f.write_str(uri),
        }
    }
}

async fn connect(server: &Server) -> anyhow::Result<Channel> {
    let down = |err: &dyn std::fmt::Display| {
        anyhow!(
            "cannot reach the Weir agent's Observer API at {server}: {err}; is weir-agent running \
             (with this --bpffs-root)? --server selects another address"
        )
    };
    match server {
        Server::Unix(path) => {
            let path = path.clone();
            let endpoint = Endpoint::from_static("http://weir-agent").connect_timeout(CONNECT_TIMEOUT);
            let connector = tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            });
            endpoint.connect_with_connector(connector).await.map_err(|e| down(&error_chain(&e)))
        }
        Server::Tcp(uri) => {
            let endpoint = Endpoint::from_shared(uri.clone())
                .with_context(|| format!("invalid --server {uri:?}"))?
                .connect_timeout(CONNECT_TIMEOUT);
            endpoint.connect().await.map_err(|e| down(&error_chain(&e)))
        }
    }
}

/// An error with its causes, `a: b: c`.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            let _ = write!(text, ": {cause_text}");
        }
        source = cause.source();
    }
    text
}

async fn observe(args: &Args, request: GetFlowsRequest) -> anyhow::Result<()> {
    let server = Server::from_args(args);
    let channel = connect(&server).await?;
    let mut client = ObserverClient::new(channel).max_decoding_message_size(64 << 20);
    let mut stream =
        client.get_flows(request).await.map_err(|status| status_error(&server, status))?.into_inner();
    let mut printer = Printer::new(args.output, args.print_node_name);
    loop {
        let next = tokio::select! {
            next = stream.message() => next,
            _ = tokio::signal::ctrl_c() => break,
        };
        match next {
            Ok(Some(response)) => printer.response(&response)?,
            Ok(None) => break,
            Err(status) => {
                printer.finish()?;
                return Err(status_error(&server, status));
            }
        }
    }
    printer.finish()
}

fn status_error(server: &Server, status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::InvalidArgument => anyhow!("the agent refused the request: {}", status.message()),
        tonic::Code::Unavailable => anyhow!(
            "cannot reach the Weir agent's Observer API at {server}: {}; is weir-agent running?",
            error_chain(&status)
        ),
        _ => anyhow!("the agent's Observer API at {server} failed: {}", error_chain(&status)),
    }
}

struct Printer {
    output: Output,
    node_name: bool,
    /// Table rows, printed at the end.
    rows: Vec<[String; 6]>,
}

impl Printer {
    fn new(output: Output, node_name: bool) -> Self {
        Self { output, node_name, rows: Vec::new() }
    }

    fn response(&mut self, response: &GetFlowsResponse) -> anyhow::Result<()> {
        use std::io::Write as _;
        match &response.response_types {
            Some(ResponseTypes::Flow(flow)) => {
                let mut out = std::io::stdout().lock();
                match self.output {
                    Output::Compact => writeln!(out, "{}", compact(flow, self.node_name))?,
                    Output::Dict => {
                        writeln!(out, "------------")?;
                        write!(out, "{}", dict(flow, self.node_name))?;
                    }
                    Output::Json | Output::Jsonpb => writeln!(out, "{}", response_json(response))?,
                    Output::Table => {
                        let (src, dst) = hostnames(flow);
                        self.rows.push([
                            format_time(flow.time.as_ref()),
                            src,
                            dst,
                            flow_type(flow),
                            verdict(flow),
                            flow.summary.clone(),
                        ]);
                    }
                }
                out.flush()?;
            }
            Some(ResponseTypes::LostEvents(lost)) => match self.output {
                Output::Json | Output::Jsonpb => println!("{}", response_json(response)),
                _ => eprintln!("{}", lost_line(lost)),
            },
            Some(ResponseTypes::NodeStatus(_)) | None => {}
        }
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        if self.output != Output::Table {
            return Ok(());
        }
        let header = ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"].map(String::from);
        let mut widths = header.clone().map(|h| h.len());
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:width$}   ");
                }
            }
            println!("{}", line.trim_end());
        }
        self.rows.clear();
        Ok(())
    }
}

/// hubble's `EVENTS LOST: SOURCE CPU(n) count`.
fn lost_line(lost: &LostEvent) -> String {
    let source =
        LostEventSource::try_from(lost.source).map_or("UNKNOWN_LOST_EVENT_SOURCE", |s| s.as_str_name());
    let cpu = lost.cpu.map_or_else(String::new, |c| format!(" CPU({c})"));
    format!("EVENTS LOST: {source}{cpu} {}", lost.num_events_lost)
}

/// hubble's `Jan _2 15:04:05.000`, in local time.
fn format_time(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts else { return "N/A".into() };
    let Ok(t) = jiff::Timestamp::new(ts.seconds, ts.nanos) else { return "N/A".into() };
    t.to_zoned(jiff::tz::TimeZone::system()).strftime("%b %e %H:%M:%S%.3f").to_string()
}

fn identity_name(id: u32) -> String {
    RESERVED_IDENTITIES
        .iter()
        .find(|(n, _)| *n == id)
        .map_or_else(|| format!("ID:{id}"), |(_, name)| (*name).to_owned())
}

fn ports(flow: &Flow) -> (u32, u32) {
    match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(p)) => (p.source_port, p.destination_port),
        Some(layer4::Protocol::Udp(p)) => (p.source_port, p.destination_port),
        Some(layer4::Protocol::Sctp(p)) => (p.source_port, p.destination_port),
        _ => (0, 0),
    }
}

/// `ns/pod:port`, else `ns/service:port`, else `ip:port` (hubble's rule).
fn hostnames(flow: &Flow) -> (String, String) {
    let (sport, dport) = ports(flow);
    let ip = flow.ip.clone().unwrap_or_default();
    let host = |address: &str,
                port: u32,
                ep: Option<&weir_proto::flow::Endpoint>,
                svc: Option<&weir_proto::flow::Service>| {
        let name = match (ep, svc) {
            (Some(ep), _) if !ep.pod_name.is_empty() => join(&ep.namespace, &ep.pod_name),
            (_, Some(svc)) if !svc.name.is_empty() => join(&svc.namespace, &svc.name),
            _ => address.to_owned(),
        };
        if port == 0 { name } else { format!("{name}:{port}") }
    };
    (
        host(&ip.source, sport, flow.source.as_ref(), flow.source_service.as_ref()),
        host(&ip.destination, dport, flow.destination.as_ref(), flow.destination_service.as_ref()),
    )
}

fn join(namespace: &str, name: &str) -> String {
    if namespace.is_empty() { name.to_owned() } else { format!("{namespace}/{name}") }
}

/// The TYPE column: the observation point of a trace, the reason of a drop.
fn flow_type(flow: &Flow) -> String {
    let Some(et) = flow.event_type else { return "UNKNOWN".into() };
    match et.r#type {
        4 => TRACE_POINTS.get(et.sub_type as usize).map_or_else(|| "UNKNOWN".into(), |p| (*p).to_owned()),
        1 => drop_reason_text(et.sub_type as u32),
        _ => "UNKNOWN".into(),
    }
}

/// Drop reasons as Cilium's monitor prints them.
fn drop_reason_text(code: u32) -> String {
    let text = match code {
        130 => "Invalid source mac",
        131 => "Invalid destination mac",
        132 => "Invalid source ip",
        133 => "Policy denied",
        134 => "Invalid packet",
        135 => "CT: Truncated or invalid header",
        136 => "CT: Missing TCP ACK flag",
        137 => "CT: Unknown L4 protocol",
        139 => "Unsupported L3 protocol",
        140 => "Missed tail call",
        141 => "Error writing to packet",
        142 => "Unknown L4 protocol",
        151 => "Stale or unroutable IP",
        155 => "CT: Map insertion failed",
        157 => "IP fragmentation not supported",
        158 => "Service backend not found",
        163 => "Unknown connection tracking state",
        167 => "No mapping for NAT masquerade",
        169 => "FIB lookup failed",
        174 => "Is a ClusterIP",
        181 => "Policy denied by denylist",
        190 => "No conntrack map found",
        196 => "TTL exceeded",
        198 => "Rate limited",
        _ => match weir_abi::metrics::reason_name(code) {
            "Unknown" => return format!("Drop reason {code}"),
            name => name,
        },
    };
    text.to_owned()
}

fn verdict(flow: &Flow) -> String {
    Verdict::try_from(flow.verdict).map_or_else(|_| flow.verdict.to_string(), |v| v.as_str_name().to_owned())
}

/// The service a translated flow went through: `ns/name (clusterip:port)`.
fn translation(flow: &Flow) -> Option<String> {
    let svc = flow.destination_service.as_ref()?;
    let (ip, port) = original_destination(flow)?;
    Some(format!("{} ({ip}:{port})", join(&svc.namespace, &svc.name)))
}

/// The ClusterIP and port from Weir's `Flow.extensions` (a google.protobuf.Struct).
fn original_destination(flow: &Flow) -> Option<(String, u16)> {
    use prost_types::value::Kind;
    let any = flow.extensions.as_ref()?;
    if !any.type_url.ends_with("google.protobuf.Struct") {
        return None;
    }
    let value = prost_types::Struct::decode(any.value.as_slice()).ok()?;
    let Kind::StringValue(ip) = value.fields.get("original_destination_ip")?.kind.clone()? else {
        return None;
    };
    let Kind::NumberValue(port) = value.fields.get("original_destination_port")?.kind.clone()? else {
        return None;
    };
    Some((ip, port as u16))
}

/// hubble's compact line:
/// `time [node]: src (id) -> dst (id) TYPE VERDICT (summary)`, then, for a
/// connection a service translated, ` via service ns/name (clusterip:port)`.
fn compact(flow: &Flow, node_name: bool) -> String {
    let (mut src, mut dst) = hostnames(flow);
    let ids = |ep: &Option<weir_proto::flow::Endpoint>| identity_name(ep.as_ref().map_or(0, |e| e.identity));
    let (mut src_id, mut dst_id) = (ids(&flow.source), ids(&flow.destination));
    let arrow = match flow.is_reply {
        None => "<>",
        Some(true) => {
            std::mem::swap(&mut src, &mut dst);
            std::mem::swap(&mut src_id, &mut dst_id);
            "<-"
        }
        Some(false) => "->",
    };
    let node = if node_name { format!(" [{}]", flow.node_name) } else { String::new() };
    let mut line = format!(
        "{}{node}: {src} ({src_id}) {arrow} {dst} ({dst_id}) {} {} ({})",
        format_time(flow.time.as_ref()),
        flow_type(flow),
        verdict(flow),
        flow.summary
    );
    if let Some(via) = translation(flow) {
        let _ = write!(line, " via service {via}");
    }
    line
}

fn dict(flow: &Flow, node_name: bool) -> String {
    let (src, dst) = hostnames(flow);
    let mut out = format!("  TIMESTAMP: {}\n", format_time(flow.time.as_ref()));
    if node_name {
        let _ = writeln!(out, "       NODE: {}", flow.node_name);
    }
    let _ = writeln!(out, "     SOURCE: {src}");
    let _ = writeln!(out, "DESTINATION: {dst}");
    let _ = writeln!(out, "       TYPE: {}", flow_type(flow));
    let _ = writeln!(out, "    VERDICT: {}", verdict(flow));
    let _ = writeln!(out, "    SUMMARY: {}", flow.summary);
    if let Some(via) = translation(flow) {
        let _ = writeln!(out, "    SERVICE: {via}");
    }
    out
}

// JSON as protobuf's canonical JSON mapping with the proto field names
// (what `hubble observe -o json` prints): enums by name, default values
// left out, Timestamps in RFC 3339, 64-bit integers as strings.

fn response_json(response: &GetFlowsResponse) -> Value {
    let mut obj = Map::new();
    match &response.response_types {
        Some(ResponseTypes::Flow(flow)) => {
            obj.insert("flow".into(), flow_json(flow));
        }
        Some(ResponseTypes::LostEvents(lost)) => {
            let mut l = Map::new();
            put_enum(&mut l, "source", lost.source, |v| {
                LostEventSource::try_from(v).ok().map(|s| s.as_str_name())
            });
            if lost.num_events_lost != 0 {
                l.insert("num_events_lost".into(), json!(lost.num_events_lost.to_string()));
            }
            if let Some(cpu) = lost.cpu {
                l.insert("cpu".into(), json!(cpu));
            }
            obj.insert("lost_events".into(), Value::Object(l));
        }
        _ => {}
    }
    if !response.node_name.is_empty() {
        obj.insert("node_name".into(), json!(response.node_name));
    }
    if let Some(ts) = &response.time {
        obj.insert("time".into(), json!(rfc3339(ts)));
    }
    Value::Object(obj)
}

fn rfc3339(ts: &prost_types::Timestamp) -> String {
    jiff::Timestamp::new(ts.seconds, ts.nanos).map_or_else(|_| String::new(), |t| t.to_string())
}

fn put_enum(obj: &mut Map<String, Value>, key: &str, value: i32, name: impl Fn(i32) -> Option<&'static str>) {
    if value != 0 {
        obj.insert(key.into(), name(value).map_or_else(|| json!(value), |n| json!(n)));
    }
}

fn put_str(obj: &mut Map<String, Value>, key: &str, value: &str) {
    if !value.is_empty() {
        obj.insert(key.into(), json!(value));
    }
}

fn put_u32(obj: &mut Map<String, Value>, key: &str, value: u32) {
    if value != 0 {
        obj.insert(key.into(), json!(value));
    }
}

fn endpoint_json(ep: &weir_proto::flow::Endpoint) -> Value {
    let mut o = Map::new();
    put_u32(&mut o, "ID", ep.id);
    put_u32(&mut o, "identity", ep.identity);
    put_str(&mut o, "cluster_name", &ep.cluster_name);
    put_str(&mut o, "namespace", &ep.namespace);
    if !ep.labels.is_empty() {
        o.insert("labels".into(), json!(ep.labels));
    }
    put_str(&mut o, "pod_name", &ep.pod_name);
    Value::Object(o)
}

fn ports_json(source_port: u32, destination_port: u32) -> Map<String, Value> {
    let mut o = Map::new();
    put_u32(&mut o, "source_port", source_port);
    put_u32(&mut o, "destination_port", destination_port);
    o
}

fn flow_json(flow: &Flow) -> Value {
    let mut o = Map::new();
    if let Some(ts) = &flow.time {
        o.insert("time".into(), json!(rfc3339(ts)));
    }
    put_str(&mut o, "uuid", &flow.uuid);
    put_enum(&mut o, "verdict", flow.verdict, |v| Verdict::try_from(v).ok().map(|x| x.as_str_name()));
    put_u32(&mut o, "drop_reason", flow.drop_reason);
    if let Some(ip) = &flow.ip {
        let mut i = Map::new();
        put_str(&mut i, "source", &ip.source);
        put_str(&mut i, "source_xlated", &ip.source_xlated);
        put_str(&mut i, "destination", &ip.destination);
        put_enum(&mut i, "ipVersion", ip.ip_version, |v| {
            IpVersion::try_from(v).ok().map(|x| x.as_str_name())
        });
        o.insert("IP".into(), Value::Object(i));
    }
    if let Some(protocol) = flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        let (key, body) = match protocol {
            layer4::Protocol::Tcp(t) => {
                let mut b = ports_json(t.source_port, t.destination_port);
                if let Some(f) = &t.flags {
                    let mut fl = Map::new();
                    for (set, name) in [
                        (f.fin, "FIN"),
                        (f.syn, "SYN"),
                        (f.rst, "RST"),
                        (f.psh, "PSH"),
                        (f.ack, "ACK"),
                        (f.urg, "URG"),
                        (f.ece, "ECE"),
                        (f.cwr, "CWR"),
                        (f.ns, "NS"),
                    ] {
                        if set {
                            fl.insert(name.into(), json!(true));
                        }
                    }
                    b.insert("flags".into(), Value::Object(fl));
                }
                ("TCP", b)
            }
            layer4::Protocol::Udp(u) => ("UDP", ports_json(u.source_port, u.destination_port)),
            layer4::Protocol::Sctp(s) => ("SCTP", ports_json(s.source_port, s.destination_port)),
            layer4::Protocol::IcmPv4(i) => {
                let mut b = Map::new();
                put_u32(&mut b, "type", i.r#type);
                put_u32(&mut b, "code", i.code);
                ("ICMPv4", b)
            }
            layer4::Protocol::IcmPv6(i) => {
                let mut b = Map::new();
                put_u32(&mut b, "type", i.r#type);
                put_u32(&mut b, "code", i.code);
                ("ICMPv6", b)
            }
        };
        o.insert("l4".into(), json!({ key: body }));
    }
    if let Some(ep) = &flow.source {
        o.insert("source".into(), endpoint_json(ep));
    }
    if let Some(ep) = &flow.destination {
        o.insert("destination".into(), endpoint_json(ep));
    }
    put_enum(&mut o, "Type", flow.r#type, |v| {
        weir_proto::flow::FlowType::try_from(v).ok().map(|x| x.as_str_name())
    });
    put_str(&mut o, "node_name", &flow.node_name);
    if flow.reply {
        o.insert("reply".into(), json!(true));
    }
    if let Some(et) = &flow.event_type {
        let mut e = Map::new();
        if et.r#type != 0 {
            e.insert("type".into(), json!(et.r#type));
        }
        if et.sub_type != 0 {
            e.insert("sub_type".into(), json!(et.sub_type));
        }
        o.insert("event_type".into(), Value::Object(e));
    }
    for (key, svc) in
        [("source_service", &flow.source_service), ("destination_service", &flow.destination_service)]
    {
        if let Some(svc) = svc {
            let mut s = Map::new();
            put_str(&mut s, "name", &svc.name);
            put_str(&mut s, "namespace", &svc.namespace);
            o.insert(key.into(), Value::Object(s));
        }
    }
    put_enum(&mut o, "traffic_direction", flow.traffic_direction, |v| {
        TrafficDirection::try_from(v).ok().map(|x| x.as_str_name())
    });
    put_enum(&mut o, "trace_observation_point", flow.trace_observation_point, |v| {
        TraceObservationPoint::try_from(v).ok().map(|x| x.as_str_name())
    });
    put_enum(&mut o, "drop_reason_desc", flow.drop_reason_desc, |v| {
        DropReason::try_from(v).ok().map(|x| x.as_str_name())
    });
    if let Some(reply) = flow.is_reply {
        o.insert("is_reply".into(), json!(reply));
    }
    if let Some(iface) = &flow.interface {
        let mut i = Map::new();
        put_u32(&mut i, "index", iface.index);
        put_str(&mut i, "name", &iface.name);
        o.insert("interface".into(), Value::Object(i));
    }
    if let Some(emitter) = &flow.emitter {
        o.insert("emitter".into(), json!({ "name": emitter.name, "version": emitter.version }));
    }
    put_str(&mut o, "Summary", &flow.summary);
    if let Some((ip, port)) = original_destination(flow) {
        o.insert(
            "extensions".into(),
            json!({
                "@type": "type.googleapis.com/google.protobuf.Struct",
                "value": { "original_destination_ip": ip, "original_destination_port": port }
            }),
        );
    }
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> (Args, clap::ArgMatches) {
        let argv: Vec<OsString> =
            std::iter::once("weir observe").chain(args.iter().copied()).map(Into::into).collect();
        let matches = Args::command().try_get_matches_from(argv).unwrap();
        (Args::from_arg_matches(&matches).unwrap(), matches)
    }

    fn req(args: &[&str]) -> GetFlowsRequest {
        let (args, matches) = parse(args);
        request(&args, &matches).unwrap()
    }

    #[test]
    fn finds_the_subcommand_after_global_flags() {
        let argv = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(observe_position(&argv(&["weir", "observe", "-f"])), Some(1));
        assert_eq!(
            observe_position(&argv(&["weir", "--bpffs-root", "/x", "-o", "json", "observe"])),
            Some(5)
        );
        assert_eq!(observe_position(&argv(&["weir", "lb", "list"])), None);
        assert_eq!(observe_position(&argv(&["weir", "--bpffs-root", "observe", "lb"])), None);
    }

    #[test]
    fn either_side_filters_make_two_filters() {
        let r = req(&["--pod", "default/web", "--protocol", "tcp"]);
        assert_eq!(r.number, DEFAULT_LAST);
        assert_eq!(r.whitelist.len(), 2);
        assert_eq!(r.whitelist[0].source_pod, vec!["default/web"]);
        assert_eq!(r.whitelist[1].destination_pod, vec!["default/web"]);
        assert!(r.whitelist.iter().all(|f| f.protocol == vec!["tcp"]));
        assert!(r.blacklist.is_empty());
    }

    #[test]
    fn namespaces_select_or_qualify() {
        let r = req(&["-n", "prod"]);
        assert_eq!(r.whitelist[0].source_pod, vec!["prod/"]);
        assert_eq!(r.whitelist[1].destination_pod, vec!["prod/"]);
        let r = req(&["-n", "prod", "--from-pod", "web"]);
        assert_eq!(
            r.whitelist,
            vec![FlowFilter { source_pod: vec!["prod/web".into()], ..Default::default() }]
        );
    }

    #[test]
    fn not_negates_the_next_filter() {
        let r = req(&["--from-pod", "a", "--not", "--verdict", "dropped", "--to-port", "80", "-f"]);
        assert_eq!(r.number, 0);
        assert!(r.follow);
        assert_eq!(
            r.whitelist,
            vec![FlowFilter {
                source_pod: vec!["a".into()],
                destination_port: vec!["80".into()],
                ..Default::default()
            }]
        );
        assert_eq!(
            r.blacklist,
            vec![FlowFilter { verdict: vec![Verdict::Dropped as i32], ..Default::default() }]
        );
    }

    #[test]
    fn selectors_and_times() {
        let r = req(&[
            "--last",
            "5",
            "--tcp-flags",
            "SYN,ACK",
            "-t",
            "trace:to-endpoint",
            "--drop-reason-desc",
            "policy_denied",
        ]);
        assert_eq!(r.number, 5);
        let f = &r.whitelist[0];
        assert!(f.tcp_flags[0].syn && f.tcp_flags[0].ack && !f.tcp_flags[0].fin);
        assert_eq!(f.event_type, vec![EventTypeFilter { r#type: 4, match_sub_type: true, sub_type: 0 }]);
        assert_eq!(f.drop_reason_desc, vec![133]);
        assert_eq!(parse_duration("1h30m"), Some(5400 * 1_000_000_000));
        assert_eq!(parse_duration("250ms"), Some(250_000_000));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_time("2024-05-01T10:00:00Z", 0).unwrap(), 1_714_557_600 * 1_000_000_000);
        assert_eq!(parse_time("10s", 20_000_000_000).unwrap(), 10_000_000_000);
        let r = req(&["--since", "1m"]);
        assert_eq!(r.number, 0);
        assert!(r.since.is_some());
    }

    #[test]
    fn compact_reads_like_hubble() {
        use weir_proto::flow::{CiliumEventType, Endpoint, Ip, Layer4, Service, Tcp};
        let flow = Flow {
            time: Some(prost_types::Timestamp { seconds: 0, nanos: 0 }),
            verdict: Verdict::Forwarded as i32,
            ip: Some(Ip {
                source: "10.244.0.10".into(),
                destination: "10.244.0.11".into(),
                ..Default::default()
            }),
            l4: Some(Layer4 {
                protocol: Some(layer4::Protocol::Tcp(Tcp {
                    source_port: 51708,
                    destination_port: 8080,
                    flags: Some(TcpFlags { syn: true, ..Default::default() }),
                })),
            }),
            source: Some(Endpoint {
                identity: 803098,
                namespace: "default".into(),
                pod_name: "c".into(),
                ..Default::default()
            }),
            destination: Some(Endpoint { identity: 2, ..Default::default() }),
            event_type: Some(CiliumEventType { r#type: 4, sub_type: 0 }),
            destination_service: Some(Service { name: "web".into(), namespace: "default".into() }),
            is_reply: Some(false),
            summary: "TCP Flags: SYN".into(),
            ..Default::default()
        };
        let line = compact(&flow, false);
        let rest = line.split_once(": ").unwrap().1;
        assert_eq!(
            rest,
            "default/c:51708 (ID:803098) -> default/web:8080 (world) to-endpoint FORWARDED (TCP Flags: SYN)"
        );
        let json = flow_json(&flow);
        assert_eq!(json["l4"]["TCP"]["flags"]["SYN"], json!(true));
        assert_eq!(json["verdict"], json!("FORWARDED"));
        assert_eq!(json["is_reply"], json!(false));
        assert_eq!(json["destination_service"]["name"], json!("web"));
        assert_eq!(
            flow_type(&Flow {
                event_type: Some(CiliumEventType { r#type: 1, sub_type: 174 }),
                ..Default::default()
            }),
            "Is a ClusterIP"
        );
    }
}
