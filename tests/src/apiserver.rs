//! A small Kubernetes API server for tests: it speaks the real list/watch
//! protocol (as kube-rs, client-go and kubectl use it) for the kinds Weir
//! reads, and gives the test direct control over objects and failures.
//!
//! Protocol, as the real API server behaves:
//! - `GET /api/v1/services`, `/api/v1/namespaces/<ns>/services`, likewise
//!   `pods`, `namespaces`, `nodes`, `/apis/discovery.k8s.io/v1/endpointslices`
//!   and `/apis/networking.k8s.io/v1/networkpolicies`: a `…List` whose
//!   `metadata.resourceVersion` is the store's current version. `limit` and
//!   `continue` are accepted and everything is returned in one page;
//!   `labelSelector` (`k=v`, `k!=v`, `k`, `!k`) and `fieldSelector`
//!   (`metadata.name`, `metadata.namespace`, `spec.nodeName`) filter.
//! - `?watch=true&resourceVersion=N`: a chunked stream of JSON lines
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK","object":{...}}` with every
//!   change after N. Without N (or N=0) the current objects come first as
//!   ADDED. `allowWatchBookmarks=true` adds a BOOKMARK every
//!   [`ApiServer::set_bookmark_interval`]; `timeoutSeconds` ends the stream.
//! - A watch from a version older than the history kept (see
//!   [`ApiServer::compact`]) gets what the real server sends: HTTP 200 and an
//!   `ERROR` event holding a `Status` with code 410, reason `Expired`. A
//!   watch that falls behind a compaction gets the same.
//!
//! Resource versions are one counter over all kinds, as etcd revisions are.
//!
//! Failures a test can inject: [`ApiServer::disconnect_watches`] (every watch
//! connection is cut; clients resume from their resourceVersion),
//! [`ApiServer::stop`] / [`ApiServer::start`] (the server goes away, with
//! connections refused, and comes back on the same address), and
//! [`ApiServer::compact`] (history dropped, so the next resumed watch gets
//! 410 and the client must list again).
//!
//! The server is plain threads and blocking sockets: one thread per listener
//! and per connection. Each listener can live in a network namespace (the
//! agent runs inside a node namespace and cannot reach the test's loopback).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// How often blocked threads wake up to look at stop flags.
const POLL: Duration = Duration::from_millis(50);

/// The kinds the server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Namespace,
    NetworkPolicy,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 6] =
        [Kind::Service, Kind::EndpointSlice, Kind::Pod, Kind::Namespace, Kind::NetworkPolicy, Kind::Node];

    pub fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Node => "Node",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            _ => "v1",
        }
    }

    /// The URL prefix of the kind's API group.
    fn prefix(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1",
            Kind::NetworkPolicy => "/apis/networking.k8s.io/v1",
            _ => "/api/v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::Node => "nodes",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node)
    }

    /// The kind of an object from its `apiVersion` and `kind`.
    pub fn of(object: &Value) -> Result<Kind> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
            .with_context(|| format!("unsupported object {api_version}/{kind}"))
    }
}

/// What identifies an object: kind, namespace ("" for cluster-scoped), name.
type Key = (Kind, String, String);

fn key_of(object: &Value) -> Result<Key> {
    let kind = Kind::of(object)?;
    let name = object["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .context("object without metadata.name")?
        .to_owned();
    let namespace = if kind.namespaced() {
        object["metadata"]["namespace"].as_str().unwrap_or("default").to_owned()
    } else {
        String::new()
    };
    Ok((kind, namespace, name))
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: Kind,
    kind_of_event: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Store {
    /// The last resource version handed out.
    rv: u64,
    /// Watches from a version older than this get 410 Gone.
    oldest: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Event>,
    next_uid: u64,
}

#[derive(Debug)]
struct Connection {
    stream: TcpStream,
    /// The kind being watched, while the connection streams a watch.
    watching: Option<Kind>,
}

#[derive(Debug)]
struct Listener {
    address: SocketAddr,
    netns: Option<PathBuf>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    /// Signalled on every change, disconnect and stop.
    changed: Condvar,
    connections: Mutex<HashMap<u64, Connection>>,
    next_connection: AtomicU64,
    /// Bumped by disconnects: watches started under an older epoch end.
    epoch: AtomicU64,
    stopped: AtomicBool,
    bookmark_interval_ms: AtomicU64,
    /// Requests served, by (kind, "list"|"watch").
    requests: Mutex<HashMap<(Kind, &'static str), u64>>,
    /// Lists of these kinds are answered only after a delay.
    list_delays: Mutex<HashMap<Kind, Duration>>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn connections(&self) -> MutexGuard<'_, HashMap<u64, Connection>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, kind: Kind, what: &'static str) {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry((kind, what)).or_default() += 1;
    }
}

/// The test API server. Dropping it closes every listener and connection.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    listeners: Mutex<Vec<Listener>>,
}

impl ApiServer {
    /// A server with an empty store and no listener yet (see
    /// [`ApiServer::listen`]).
    pub fn new() -> ApiServer {
        ApiServer {
            shared: Arc::new(Shared {
                store: Mutex::new(Store { rv: 1, oldest: 1, ..Store::default() }),
                changed: Condvar::new(),
                connections: Mutex::new(HashMap::new()),
                next_connection: AtomicU64::new(0),
                epoch: AtomicU64::new(0),
                stopped: AtomicBool::new(false),
                bookmark_interval_ms: AtomicU64::new(1000),
                requests: Mutex::new(HashMap::new()),
                list_delays: Mutex::new(HashMap::new()),
            }),
            listeners: Mutex::new(Vec::new()),
        }
    }

    /// Listens on a free port of 127.0.0.1 inside the network namespace at
    /// `netns` (`None`: the caller's), and returns the address. One server
    /// may listen in several namespaces (one per simulated node).
    pub fn listen(&self, netns: Option<&Path>) -> Result<SocketAddr> {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let mut listener = Listener {
            address,
            netns: netns.map(Path::to_owned),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        self.open(&mut listener)?;
        let address = listener.address;
        self.lock_listeners().push(listener);
        Ok(address)
    }

    /// The URL of a listener's address.
    pub fn url(address: SocketAddr) -> String {
        format!("http://{address}")
    }

    fn lock_listeners(&self) -> MutexGuard<'_, Vec<Listener>> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self, listener: &mut Listener) -> Result<()> {
        let address = listener.address;
        let bind = move || TcpListener::bind(address);
        let socket = match &listener.netns {
            Some(path) => crate::netns::run_in(path, bind)?,
            None => bind(),
        }
        .with_context(|| format!("test API server: cannot listen on {address}"))?;
        socket.set_nonblocking(true)?;
        listener.address = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        listener.stop = stop.clone();
        let shared = self.shared.clone();
        listener.thread = Some(
            std::thread::Builder::new()
                .name(format!("apiserver:{}", listener.address))
                .spawn(move || accept_loop(&socket, &stop, &shared))?,
        );
        Ok(())
    }

    /// Goes away: listeners close (new connections are refused) and every
    /// open connection is cut. The store is kept and may be changed while
    /// the server is down.
    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        for listener in self.lock_listeners().iter_mut() {
            listener.stop.store(true, Ordering::SeqCst);
            if let Some(thread) = listener.thread.take() {
                let _ = thread.join();
            }
        }
        self.cut(|_| true);
    }

    /// Comes back on the same addresses after [`ApiServer::stop`].
    pub fn start(&self) -> Result<()> {
        self.shared.stopped.store(false, Ordering::SeqCst);
        let mut listeners = self.lock_listeners();
        for listener in listeners.iter_mut() {
            if listener.thread.is_none() {
                self.open(listener)?;
            }
        }
        Ok(())
    }

    /// Cuts every watch connection, as a load balancer or an API server
    /// restart would. Clients resume watching from their resourceVersion.
    pub fn disconnect_watches(&self) {
        self.cut(|c| c.watching.is_some());
    }

    fn cut(&self, which: impl Fn(&Connection) -> bool) {
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for connection in self.shared.connections().values() {
            if which(connection) {
                let _ = connection.stream.shutdown(Shutdown::Both);
            }
        }
        let _guard = self.shared.store();
        self.shared.changed.notify_all();
    }

    /// Drops the whole history: a watch resuming from any version before now
    /// gets `410 Gone` and its client must list again. Watches that are
    /// behind are ended with the same error.
    pub fn compact(&self) {
        let mut store = self.shared.store();
        store.oldest = store.rv;
        store.history.clear();
        self.shared.changed.notify_all();
    }

    /// How often watches that asked for bookmarks get one.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.bookmark_interval_ms.store(interval.as_millis().max(1) as u64, Ordering::SeqCst);
    }

    /// Delays every list of `kind` by `delay` (`None`: no delay), e.g. to
    /// hold a client's initial sync of one kind while others complete.
    pub fn set_list_delay(&self, kind: Kind, delay: Option<Duration>) {
        let mut delays = self.shared.list_delays.lock().unwrap_or_else(|e| e.into_inner());
        match delay {
            Some(delay) => delays.insert(kind, delay),
            None => delays.remove(&kind),
        };
    }

    /// The current resource version.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Watch streams open right now, by kind.
    pub fn active_watches(&self) -> BTreeMap<Kind, usize> {
        let mut watches = BTreeMap::new();
        for connection in self.shared.connections().values() {
            if let Some(kind) = connection.watching {
                *watches.entry(kind).or_default() += 1;
            }
        }
        watches
    }

    /// How many list (`"list"`) or watch (`"watch"`) requests of `kind` were
    /// served so far.
    pub fn requests(&self, kind: Kind, what: &str) -> u64 {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((k, w), _)| *k == kind && *w == what)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Creates an object (`apiVersion`, `kind`, `metadata.name` and, for
    /// namespaced kinds, `metadata.namespace` required). Fails if it exists.
    /// Returns the new resource version.
    pub fn create(&self, object: Value) -> Result<u64> {
        let key = key_of(&object)?;
        let mut store = self.shared.store();
        if store.objects.contains_key(&key) {
            bail!("{} {}/{} already exists", key.0.kind(), key.1, key.2);
        }
        Ok(self.write(&mut store, key, object, "ADDED"))
    }

    /// Replaces an existing object. Fails if it does not exist.
    pub fn update(&self, object: Value) -> Result<u64> {
        let key = key_of(&object)?;
        let mut store = self.shared.store();
        if !store.objects.contains_key(&key) {
            bail!("{} {}/{} does not exist", key.0.kind(), key.1, key.2);
        }
        Ok(self.write(&mut store, key, object, "MODIFIED"))
    }

    /// Creates or replaces an object.
    pub fn apply(&self, object: Value) -> Result<u64> {
        let key = key_of(&object)?;
        let mut store = self.shared.store();
        let event = if store.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        Ok(self.write(&mut store, key, object, event))
    }

    /// Deletes an object (`namespace` is ignored for cluster-scoped kinds).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<u64> {
        let namespace = if kind.namespaced() { namespace } else { "" };
        let key = (kind, namespace.to_owned(), name.to_owned());
        let mut store = self.shared.store();
        let Some(mut object) = store.objects.remove(&key) else {
            bail!("{} {namespace}/{name} does not exist", kind.kind());
        };
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        store.history.push(Event { rv, kind, kind_of_event: "DELETED", object });
        self.shared.changed.notify_all();
        Ok(rv)
    }

    /// Deletes an object described by its manifest.
    pub fn delete_object(&self, object: &Value) -> Result<u64> {
        let (kind, namespace, name) = key_of(object)?;
        self.delete(kind, &namespace, &name)
    }

    /// The stored object, with the metadata the server filled in.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let namespace = if kind.namespaced() { namespace } else { "" };
        self.shared.store().objects.get(&(kind, namespace.to_owned(), name.to_owned())).cloned()
    }

    fn write(&self, store: &mut Store, key: Key, mut object: Value, event: &'static str) -> u64 {
        store.rv += 1;
        let rv = store.rv;
        let previous = store.objects.get(&key);
        let uid = match previous.and_then(|p| p["metadata"]["uid"].as_str()) {
            Some(uid) => uid.to_owned(),
            None => {
                store.next_uid += 1;
                format!("00000000-0000-4000-8000-{:012x}", store.next_uid)
            }
        };
        let created = previous
            .and_then(|p| p["metadata"]["creationTimestamp"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(now_rfc3339);
        // As the real server: the generation counts changes of the spec.
        let generation = match previous {
            Some(p) if p["spec"] == object["spec"] => p["metadata"]["generation"].as_u64().unwrap_or(1),
            Some(p) => p["metadata"]["generation"].as_u64().map_or(1, |g| g + 1),
            None => 1,
        };
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let meta = &mut object["metadata"];
        if key.0.namespaced() {
            meta["namespace"] = json!(key.1);
        }
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = json!(uid);
        meta["creationTimestamp"] = json!(created);
        meta["generation"] = json!(generation);
        store.objects.insert(key.clone(), object.clone());
        store.history.push(Event { rv, kind: key.0, kind_of_event: event, object });
        self.shared.changed.notify_all();
        rv
    }
}

impl Default for ApiServer {
    fn default() -> Self {
        ApiServer::new()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The current time as the API server writes timestamps.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now(), false)
}

/// `time` as RFC 3339 in UTC, with nanoseconds when `nanos` (as
/// `endpoints.kubernetes.io/last-change-trigger-time` is written).
pub fn rfc3339(time: SystemTime, nanos: bool) -> String {
    let since = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (hour, minute, second) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if nanos {
        format!(
            "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:09}Z",
            since.subsec_nanos()
        )
    } else {
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
    }
}

/// Writes a kubeconfig for `address` (plain HTTP, no credentials) to `path`.
pub fn write_kubeconfig(path: &Path, address: SocketAddr) -> Result<()> {
    let text = format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: weir-test\n  cluster:\n    server: {}\n\
         contexts:\n\
         - name: weir-test\n  context:\n    cluster: weir-test\n    user: weir-test\n\
         current-context: weir-test\n\
         users:\n\
         - name: weir-test\n  user: {{}}\n",
        ApiServer::url(address)
    );
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, shared: &Arc<Shared>) {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = shared.clone();
                let id = shared.next_connection.fetch_add(1, Ordering::SeqCst);
                let Ok(clone) = stream.try_clone() else {
                    continue;
                };
                shared.connections().insert(id, Connection { stream: clone, watching: None });
                threads.push(std::thread::spawn(move || {
                    let _ = serve_connection(stream, id, &shared);
                    shared.connections().remove(&id);
                }));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL / 5),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => std::thread::sleep(POLL),
        }
        threads.retain(|t| !t.is_finished());
    }
    // Closing the listener refuses new connections; the connection threads
    // end when the server cuts their sockets.
}

/// One parsed request head.
struct Request {
    method: String,
    /// The client sent `Connection: close`.
    close: bool,
    path: String,
    query: HashMap<String, String>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut content_length = 0usize;
    let mut close = false;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(None);
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.trim().eq_ignore_ascii_case("close");
            }
        }
    }
    if content_length > 0 {
        let mut body = vec![0; content_length];
        reader.read_exact(&mut body)?;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Ok(Some(Request { method, close, path: path.to_owned(), query }))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which objects a request addresses.
struct Target {
    kind: Kind,
    namespace: Option<String>,
}

fn route(path: &str) -> Option<Target> {
    for kind in Kind::ALL {
        let Some(rest) = path.strip_prefix(kind.prefix()) else {
            continue;
        };
        let segments: Vec<&str> = rest.trim_matches('/').split('/').collect();
        match segments.as_slice() {
            [plural] if *plural == kind.plural() => {
                return Some(Target { kind, namespace: None });
            }
            ["namespaces", namespace, plural] if kind.namespaced() && *plural == kind.plural() => {
                return Some(Target { kind, namespace: Some((*namespace).to_owned()) });
            }
            _ => {}
        }
    }
    None
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    stream.write_all(&out)
}

fn serve_connection(stream: TcpStream, id: u64, shared: &Arc<Shared>) -> Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader)? {
        if shared.stopped.load(Ordering::SeqCst) {
            return Ok(());
        }
        if request.method != "GET" {
            respond(&mut writer, 405, &status(405, "MethodNotAllowed", "the test API server is read-only"))?;
            if request.close {
                break;
            }
            continue;
        }
        let Some(target) = route(&request.path) else {
            respond(
                &mut writer,
                404,
                &status(404, "NotFound", &format!("the server could not find {}", request.path)),
            )?;
            if request.close {
                break;
            }
            continue;
        };
        let selector = Selector::parse(&request.query);
        if request.query.get("watch").is_some_and(|w| w == "true" || w == "1") {
            shared.count(target.kind, "watch");
            if let Some(c) = shared.connections().get_mut(&id) {
                c.watching = Some(target.kind);
            }
            let result = watch(&mut writer, shared, &target, &selector, &request.query);
            if let Some(c) = shared.connections().get_mut(&id) {
                c.watching = None;
            }
            result?;
            // A watch response ends the connection's use: the client opens
            // another for the next request (as with the real server when
            // the stream is closed).
            return Ok(());
        }
        shared.count(target.kind, "list");
        let delay = shared.list_delays.lock().unwrap_or_else(|e| e.into_inner()).get(&target.kind).copied();
        if let Some(delay) = delay {
            std::thread::sleep(delay);
        }
        let body = {
            let store = shared.store();
            let items: Vec<&Value> = store
                .objects
                .iter()
                .filter(|((kind, namespace, _), object)| {
                    *kind == target.kind
                        && target.namespace.as_ref().is_none_or(|n| n == namespace)
                        && selector.matches(object)
                })
                .map(|(_, object)| object)
                .collect();
            json!({
                "kind": format!("{}List", target.kind.kind()),
                "apiVersion": target.kind.api_version(),
                "metadata": { "resourceVersion": store.rv.to_string() },
                "items": items,
            })
        };
        respond(&mut writer, 200, &body)?;
        if request.close {
            break;
        }
    }
    Ok(())
}

fn write_chunk(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    stream.write_all(&out)
}

fn event_line(kind_of_event: &str, object: &Value) -> Vec<u8> {
    let mut line =
        serde_json::to_vec(&json!({ "type": kind_of_event, "object": object })).unwrap_or_default();
    line.push(b'\n');
    line
}

fn gone(rv: u64, oldest: u64) -> Vec<u8> {
    event_line("ERROR", &status(410, "Expired", &format!("too old resource version: {rv} ({oldest})")))
}

fn watch(
    stream: &mut TcpStream,
    shared: &Arc<Shared>,
    target: &Target,
    selector: &Selector,
    query: &HashMap<String, String>,
) -> Result<()> {
    let epoch = shared.epoch.load(Ordering::SeqCst);
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|b| b == "true" || b == "1");
    let timeout = query.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).map(Duration::from_secs);
    let started = Instant::now();
    let from: u64 = query.get("resourceVersion").and_then(|rv| rv.parse().ok()).unwrap_or(0);
    stream.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    let relevant = |kind: Kind, object: &Value| {
        kind == target.kind
            && target
                .namespace
                .as_ref()
                .is_none_or(|n| object["metadata"]["namespace"].as_str() == Some(n.as_str()))
            && selector.matches(object)
    };
    // Position: the last resource version this watch has covered.
    let mut position;
    {
        let store = shared.store();
        if from == 0 {
            // No version: the current state first, as ADDED events.
            let mut out = Vec::new();
            for ((kind, _, _), object) in &store.objects {
                if relevant(*kind, object) {
                    out.extend(event_line("ADDED", object));
                }
            }
            position = store.rv;
            drop(store);
            if !out.is_empty() {
                write_chunk(stream, &out)?;
            }
        } else if from < store.oldest {
            let line = gone(from, store.oldest);
            drop(store);
            write_chunk(stream, &line)?;
            stream.write_all(b"0\r\n\r\n")?;
            return Ok(());
        } else {
            position = from;
        }
    }
    let mut last_bookmark = Instant::now();
    loop {
        let interval = Duration::from_millis(shared.bookmark_interval_ms.load(Ordering::SeqCst));
        let mut out = Vec::new();
        let mut expired = None;
        {
            let mut store = shared.store();
            loop {
                if shared.stopped.load(Ordering::SeqCst) || shared.epoch.load(Ordering::SeqCst) != epoch {
                    return Ok(());
                }
                if position < store.oldest && position < store.rv {
                    expired = Some(gone(position, store.oldest));
                    break;
                }
                // History is ordered by resource version.
                let start = store.history.partition_point(|e| e.rv <= position);
                if start < store.history.len() {
                    for event in &store.history[start..] {
                        if relevant(event.kind, &event.object) {
                            out.extend(event_line(event.kind_of_event, &event.object));
                        }
                    }
                    position = store.rv;
                    break;
                }
                if timeout.is_some_and(|t| started.elapsed() >= t) {
                    break;
                }
                if bookmarks && last_bookmark.elapsed() >= interval {
                    break;
                }
                store = shared.changed.wait_timeout(store, POLL).unwrap_or_else(|e| e.into_inner()).0;
            }
            if bookmarks && out.is_empty() && expired.is_none() && last_bookmark.elapsed() >= interval {
                position = position.max(store.rv);
                out = event_line(
                    "BOOKMARK",
                    &json!({
                        "kind": target.kind.kind(),
                        "apiVersion": target.kind.api_version(),
                        "metadata": { "resourceVersion": position.to_string() },
                    }),
                );
                last_bookmark = Instant::now();
            }
        }
        if let Some(line) = expired {
            write_chunk(stream, &line)?;
            stream.write_all(b"0\r\n\r\n")?;
            return Ok(());
        }
        if !out.is_empty() {
            write_chunk(stream, &out)?;
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            stream.write_all(b"0\r\n\r\n")?;
            return Ok(());
        }
    }
}

/// A label and field selector (the subset real clients use).
#[derive(Debug, Default)]
struct Selector {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

#[derive(Debug)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl Selector {
    fn parse(query: &HashMap<String, String>) -> Selector {
        let parse = |text: Option<&String>| -> Vec<Requirement> {
            text.map(String::as_str)
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|term| {
                    if let Some((k, v)) = term.split_once("!=") {
                        Requirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
                    } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                        Requirement::Equals(k.trim().to_owned(), v.trim().to_owned())
                    } else if let Some(k) = term.strip_prefix('!') {
                        Requirement::NotExists(k.trim().to_owned())
                    } else {
                        Requirement::Exists(term.to_owned())
                    }
                })
                .collect()
        };
        Selector { labels: parse(query.get("labelSelector")), fields: parse(query.get("fieldSelector")) }
    }

    fn matches(&self, object: &Value) -> bool {
        let label = |key: &str| object["metadata"]["labels"][key].as_str().map(str::to_owned);
        let field = |key: &str| {
            let mut value = object;
            for part in key.split('.') {
                value = &value[part];
            }
            value.as_str().map(str::to_owned)
        };
        let check = |requirements: &[Requirement], get: &dyn Fn(&str) -> Option<String>| {
            requirements.iter().all(|r| match r {
                Requirement::Equals(k, v) => get(k).as_deref() == Some(v.as_str()),
                Requirement::NotEquals(k, v) => get(k).as_deref() != Some(v.as_str()),
                Requirement::Exists(k) => get(k).is_some(),
                Requirement::NotExists(k) => get(k).is_none(),
            })
        };
        check(&self.labels, &label) && check(&self.fields, &field)
    }
}

/// A blocking HTTP GET of `url_path` at `address` from the caller's network
/// namespace; returns (status, body). For the agent's /healthz and /metrics.
pub fn http_get(address: SocketAddr, url_path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, timeout)
        .with_context(|| format!("cannot connect to {address}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(
        format!("GET {url_path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).with_context(|| format!("reading the answer to GET {url_path}"))?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) =
        response.split_once("\r\n\r\n").with_context(|| format!("malformed HTTP response: {response:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("malformed status line: {head:?}"))?;
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    Ok((code, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, ip: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]},
        })
    }

    /// One raw request on a fresh connection; returns the raw response.
    fn raw_get(address: SocketAddr, target: &str, read_for: Duration) -> String {
        let mut stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        stream.write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
        let deadline = Instant::now() + read_for;
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        while Instant::now() < deadline {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn lists_and_watches_with_resource_versions() {
        let server = ApiServer::new();
        let address = server.listen(None).unwrap();
        server.create(service("a", "10.96.0.1")).unwrap();
        let rv = server.create(service("b", "10.96.0.2")).unwrap();
        assert!(server.create(service("b", "10.96.0.2")).is_err());

        let (code, body) = http_get(
            address,
            "/api/v1/services?limit=500&resourceVersion=0&resourceVersionMatch=NotOlderThan",
            Duration::from_secs(2),
        )
        .unwrap();
        assert_eq!(code, 200, "{body}");
        let list: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(list["kind"], "ServiceList");
        assert_eq!(list["metadata"]["resourceVersion"], rv.to_string());
        assert_eq!(list["items"].as_array().unwrap().len(), 2);

        let (_, body) = http_get(
            address,
            "/api/v1/namespaces/default/services?labelSelector=app%3Da",
            Duration::from_secs(2),
        )
        .unwrap();
        let list: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), 1);

        // A watch from `rv` sees later changes only.
        let watcher = std::thread::spawn(move || {
            raw_get(
                address,
                &format!("/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=1"),
                Duration::from_millis(1500),
            )
        });
        std::thread::sleep(Duration::from_millis(200));
        let mut changed = service("a", "10.96.0.1");
        changed["spec"]["ports"][0]["port"] = json!(81);
        server.update(changed).unwrap();
        server.delete(Kind::Service, "default", "b").unwrap();
        let stream = watcher.join().unwrap();
        assert!(stream.contains(r#""type":"MODIFIED""#), "{stream}");
        assert!(stream.contains(r#""type":"DELETED""#), "{stream}");
        assert!(!stream.contains(r#""type":"ADDED""#), "{stream}");

        // After compaction, resuming from `rv` is 410 Gone.
        server.compact();
        let stream = raw_get(
            address,
            &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
            Duration::from_millis(300),
        );
        assert!(stream.contains(r#""type":"ERROR""#), "{stream}");
        assert!(stream.contains(r#""code":410"#), "{stream}");
        assert!(stream.contains(r#""reason":"Expired""#), "{stream}");
    }

    #[test]
    fn bookmarks_disconnects_and_restarts() {
        let server = ApiServer::new();
        server.set_bookmark_interval(Duration::from_millis(100));
        let address = server.listen(None).unwrap();
        let rv = server.resource_version();
        let stream = raw_get(
            address,
            &format!("/api/v1/nodes?watch=true&allowWatchBookmarks=true&resourceVersion={rv}"),
            Duration::from_millis(400),
        );
        assert!(stream.contains(r#""type":"BOOKMARK""#), "{stream}");

        let watcher = std::thread::spawn(move || {
            raw_get(address, "/apis/discovery.k8s.io/v1/endpointslices?watch=true", Duration::from_secs(5))
        });
        let deadline = Instant::now() + Duration::from_secs(2);
        while !server.active_watches().contains_key(&Kind::EndpointSlice) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(server.active_watches()[&Kind::EndpointSlice], 1);
        let cut = Instant::now();
        server.disconnect_watches();
        watcher.join().unwrap();
        assert!(cut.elapsed() < Duration::from_secs(2), "the watch was not cut");

        server.stop();
        assert!(TcpStream::connect(address).is_err(), "still listening");
        server.start().unwrap();
        let (code, _) = http_get(address, "/api/v1/pods", Duration::from_secs(2)).unwrap();
        assert_eq!(code, 200);
        let (code, body) = http_get(address, "/api/v1/secrets", Duration::from_secs(2)).unwrap();
        assert_eq!(code, 404, "{body}");
    }

    #[test]
    fn formats_times() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        assert_eq!(rfc3339(t, true), "2023-11-14T22:13:20.123456789Z");
        assert_eq!(rfc3339(t, false), "2023-11-14T22:13:20Z");
        assert_eq!(percent_decode("app%3Dweb%2Cx"), "app=web,x");
    }
}
