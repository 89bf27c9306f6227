//! Servers that run inside a pod and answer every request with the pod's
//! name, so a client can tell which backend the load balancer picked.
//!
//! Each server is a guard: dropping it stops its threads and closes its
//! sockets (the threads poll a stop flag at least every [`POLL`]), so a test
//! leaves nothing listening and no socket keeping a namespace alive.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::topology::Pod;

/// How often server threads wake up to check whether they should stop.
const POLL: Duration = Duration::from_millis(50);

/// How long an HTTP server waits for a complete request head.
const HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a TCP server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpMode {
    /// For every `\n`-terminated line received, write `<pod name>\n`; the
    /// connection stays open, so one long-lived connection can be probed
    /// again and again (before/after an agent restart, an endpoint removal).
    Lines,
    /// HTTP/1.0: answer any request with `200 OK` and body `<pod name>\n`,
    /// then close (for the demo and for curl).
    Http,
}

/// State shared between a server guard and its threads.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    requests: AtomicUsize,
    peers: Mutex<Vec<SocketAddr>>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn record_peer(&self, peer: SocketAddr) {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A TCP server listening on `0.0.0.0:<port>` inside a pod.
#[derive(Debug)]
pub struct TcpServer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    /// Binds in `pod`'s namespace and serves on background threads (one per
    /// connection).
    pub fn start(pod: &Pod, port: u16, mode: TcpMode) -> Result<TcpServer> {
        let listener = pod
            .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
            .with_context(|| format!("pod {}: cannot listen on TCP port {port}", pod.name()))?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let name = pod.name().to_owned();
        let thread = std::thread::Builder::new().name(format!("tcp:{name}:{port}")).spawn({
            let shared = shared.clone();
            move || accept_loop(listener, mode, &name, &shared)
        })?;
        Ok(TcpServer { shared, thread: Some(thread) })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.peers().len()
    }

    /// Lines (or HTTP requests) answered so far.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// The source address of every accepted connection, in order: what the
    /// backend sees (e.g. the hairpin SNAT address).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.shared.peers()
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, mode: TcpMode, name: &str, shared: &Arc<Shared>) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stopping() {
        if !readable(&listener, POLL) {
            continue;
        }
        // Drain the backlog: several connections may be waiting.
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    shared.record_peer(peer);
                    let name = name.to_owned();
                    let shared = shared.clone();
                    connections.push(std::thread::spawn(move || {
                        let _ = serve_tcp(stream, mode, &name, &shared);
                    }));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // WouldBlock: backlog drained. Anything else: retry after poll.
                Err(_) => break,
            }
        }
        connections.retain(|c| !c.is_finished());
    }
    drop(listener);
    for c in connections {
        let _ = c.join();
    }
}

/// Serves one connection until the peer closes it or the server stops.
fn serve_tcp(mut stream: TcpStream, mode: TcpMode, name: &str, shared: &Shared) -> std::io::Result<()> {
    // Accepted sockets do not inherit O_NONBLOCK on Linux, but be explicit:
    // we rely on the read timeout to notice `stop`.
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    let started = Instant::now();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !shared.stopping() {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                if mode == TcpMode::Http && started.elapsed() > HTTP_REQUEST_TIMEOUT {
                    break;
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        match mode {
            TcpMode::Lines => {
                let lines = buf[..n].iter().filter(|&&b| b == b'\n').count();
                if lines > 0 {
                    // Count before answering: a client that got its answer
                    // must see the count include it.
                    shared.requests.fetch_add(lines, Ordering::Relaxed);
                    let reply = format!("{name}\n").repeat(lines);
                    stream.write_all(reply.as_bytes())?;
                }
            }
            TcpMode::Http => {
                head.extend_from_slice(&buf[..n]);
                if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                    let body = format!("{name}\n");
                    let reply = format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    shared.requests.fetch_add(1, Ordering::Relaxed);
                    stream.write_all(reply.as_bytes())?;
                    break;
                }
            }
        }
    }
    Ok(())
}

/// A UDP server bound to `0.0.0.0:<port>` inside a pod: every datagram is
/// answered, to its source, with `<pod name>\n`.
#[derive(Debug)]
pub struct UdpServer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl UdpServer {
    pub fn start(pod: &Pod, port: u16) -> Result<UdpServer> {
        let socket = pod
            .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)))?
            .with_context(|| format!("pod {}: cannot bind UDP port {port}", pod.name()))?;
        socket.set_read_timeout(Some(POLL))?;
        let shared = Arc::new(Shared::default());
        let name = pod.name().to_owned();
        let thread = std::thread::Builder::new().name(format!("udp:{name}:{port}")).spawn({
            let shared = shared.clone();
            move || {
                let mut buf = [0u8; 2048];
                while !shared.stopping() {
                    if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                        shared.record_peer(peer);
                        shared.requests.fetch_add(1, Ordering::Relaxed);
                        let _ = socket.send_to(format!("{name}\n").as_bytes(), peer);
                    }
                }
            }
        })?;
        Ok(UdpServer { shared, thread: Some(thread) })
    }

    /// Datagrams received (and answered) so far.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// The source address of every datagram received, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.shared.peers()
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits up to `timeout` for `listener` to have a connection to accept.
fn readable(listener: &TcpListener, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and the
    // count (1) matches; `listener` keeps the descriptor open.
    let ready = unsafe { libc::poll(&mut pfd, 1, millis) };
    ready > 0 && pfd.revents & libc::POLLIN != 0
}
