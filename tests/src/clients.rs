//! Clients that run inside a pod, talk to `ip:port` (a ClusterIP or a pod IP)
//! and report which pod answered (the servers in [`crate::servers`] answer
//! with their pod name).
//!
//! Sockets are created on a thread inside the pod's namespace and then used
//! from the caller's thread: a socket belongs to the namespace it was created
//! in, whichever thread uses it.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cli::wait_for;
use crate::netns::NetNs;
use crate::topology::Pod;

/// A reasonable timeout for one request inside a namespace: generous, since a
/// loaded CI machine may be slow, but bounded so a dropped packet fails fast
/// enough for tests that expect drops.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP connection from a pod, kept open so it can carry data repeatedly.
#[derive(Debug)]
pub struct TcpConn {
    stream: TcpStream,
    timeout: Duration,
    pending: Vec<u8>,
}

impl TcpConn {
    /// Connects from `pod` to `addr`, failing after `timeout` (e.g. when the
    /// SYN is dropped).
    pub fn connect(pod: &Pod, addr: SocketAddrV4, timeout: Duration) -> Result<TcpConn> {
        let stream = pod
            .run(|| TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout))?
            .with_context(|| format!("pod {}: TCP connect to {addr}", pod.name()))?;
        TcpConn::from_stream(stream, timeout)
    }

    /// Wraps a stream connected elsewhere (e.g. from a namespace that is not
    /// a pod's, such as an external client's).
    pub fn from_stream(stream: TcpStream, timeout: Duration) -> Result<TcpConn> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(TcpConn { stream, timeout, pending: Vec::new() })
    }

    /// Sends one line and returns the answering pod's name (a
    /// [`crate::servers::TcpMode::Lines`] server answers every line).
    pub fn exchange(&mut self) -> Result<String> {
        self.stream.write_all(b"ping\n").context("TCP send")?;
        self.read_line()
    }

    /// The client side of the connection (pod IP, ephemeral port).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// The server side as the client sees it (the ClusterIP when going
    /// through a service).
    pub fn peer_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.peer_addr()?)
    }

    fn read_line(&mut self) -> Result<String> {
        let deadline = Instant::now() + self.timeout;
        let mut buf = [0u8; 1024];
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return Ok(String::from_utf8_lossy(&line).trim().to_owned());
            }
            if Instant::now() >= deadline {
                bail!("no answer within {:?}", self.timeout);
            }
            match self.stream.read(&mut buf) {
                Ok(0) => bail!("connection closed by the peer"),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("no answer within {:?}", self.timeout)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("TCP receive"),
            }
        }
    }
}

/// One request on a fresh TCP connection: connect, send a line, read the
/// answer, close. Returns the answering pod's name.
pub fn tcp_request(pod: &Pod, addr: SocketAddrV4, timeout: Duration) -> Result<String> {
    let mut conn = TcpConn::connect(pod, addr, timeout)?;
    conn.exchange().with_context(|| format!("pod {}: request to {addr}", pod.name()))
}

/// The answer to a UDP request, with the address it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpReply {
    /// The answering pod's name.
    pub name: String,
    /// The reply's source address, as seen by the client. Through a service
    /// this must be the ClusterIP:port (reverse NAT), or an unconnected
    /// socket would see a stranger answer.
    pub from: SocketAddr,
}

/// Sends one datagram from `pod` to `addr` on an *unconnected* socket (so a
/// reply from any source is received, and its source can be checked) and
/// returns the first reply.
pub fn udp_request(pod: &Pod, addr: SocketAddrV4, timeout: Duration) -> Result<UdpReply> {
    let socket = pod
        .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?
        .with_context(|| format!("pod {}: UDP bind", pod.name()))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"ping\n", addr).with_context(|| format!("pod {}: UDP send to {addr}", pod.name()))?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("pod {}: no UDP answer from {addr} within {timeout:?}", pod.name()))?;
    Ok(UdpReply { name: String::from_utf8_lossy(&buf[..n]).trim().to_owned(), from })
}

/// `GET /` over HTTP/1.0 from `pod` to `addr`; returns the body (the
/// answering pod's name for a [`crate::servers::TcpMode::Http`] server).
pub fn http_get(pod: &Pod, addr: SocketAddrV4, timeout: Duration) -> Result<String> {
    http_get_in(pod.netns(), &format!("pod {}", pod.name()), addr, timeout)
}

/// [`http_get`] from a namespace that is not a pod's (an external client).
pub fn http_get_from(ns: &NetNs, addr: SocketAddrV4, timeout: Duration) -> Result<String> {
    http_get_in(ns, ns.name(), addr, timeout)
}

fn http_get_in(ns: &NetNs, who: &str, addr: SocketAddrV4, timeout: Duration) -> Result<String> {
    let mut stream = ns
        .run(|| TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout))?
        .with_context(|| format!("{who}: TCP connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response).with_context(|| format!("{who}: HTTP response from {addr}"))?;
    let (head, body) =
        response.split_once("\r\n\r\n").with_context(|| format!("malformed HTTP response: {response:?}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("HTTP error from {addr}: {head}");
    }
    Ok(body.trim().to_owned())
}

/// A TCP connection from a namespace that is not a pod's (an external
/// client, the node itself).
pub fn connect_from(ns: &NetNs, target: SocketAddrV4, timeout: Duration) -> Result<TcpConn> {
    let stream = ns
        .run(move || TcpStream::connect_timeout(&target.into(), timeout))?
        .with_context(|| format!("{}: TCP connect to {target}", ns.name()))?;
    TcpConn::from_stream(stream, timeout)
}

/// [`connect_from`], retried until it connects or `wait` passes (the agent
/// attaches to new devices within a second of programming the maps).
pub fn connect_when_ready(ns: &NetNs, target: SocketAddrV4, wait: Duration) -> Result<TcpConn> {
    wait_for(
        wait,
        &format!("a connection to {target}"),
        || Ok(connect_from(ns, target, DEFAULT_TIMEOUT).ok()),
    )
}

/// One request on each of `n` new connections; how many each pod answered.
pub fn tally(n: usize, mut request: impl FnMut() -> Result<String>) -> Result<BTreeMap<String, usize>> {
    let mut answers = BTreeMap::new();
    for i in 0..n {
        let name = request().with_context(|| format!("new connection {i} of {n}"))?;
        *answers.entry(name).or_insert(0) += 1;
    }
    Ok(answers)
}
