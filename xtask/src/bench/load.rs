//! Traffic: an echo server in every backend pod, and two clients that run in
//! the client pod. `crr` opens a connection, exchanges one byte, and closes
//! it with an RST (SO_LINGER 0), so neither side keeps a TIME_WAIT socket and
//! the kernel never has to refuse a reused port (the TCP_CRR artefact the
//! IPVS `conn_reuse_mode` discussion is about). `rr` exchanges one byte at a
//! time on one established connection.
//!
//! Everything is single-threaded and sequential, like netperf's TCP_CRR and
//! TCP_RR with one process: a figure is the cost of one connection or one
//! round trip, not a throughput contest between threads. The clients of all
//! configurations take turns, connection by connection, so that the other
//! work on a shared machine weighs on all of them alike.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use weir_tests::topology::Pod;

use super::stats::percentile;

const TIMEOUT: Duration = Duration::from_secs(2);

/// Pins the calling thread to `cpu` (threads it creates inherit it).
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in
    // bounds for any cpu below CPU_SETSIZE, and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("pinning to CPU {cpu}"));
        }
    }
    Ok(())
}

/// An echo server on `0.0.0.0:port` inside a pod: a few threads, each
/// serving one connection at a time (enough for the long-lived
/// request/response connections of two configurations on one node, while
/// new connections keep coming).
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

const SERVER_THREADS: usize = 3;

impl EchoServer {
    /// Serves on `port` in `pod`, on threads pinned to `cpu`.
    pub fn start(pod: &Pod, port: u16, cpu: usize) -> Result<EchoServer> {
        let listener = pod
            .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
            .with_context(|| format!("pod {}: listen on {port}", pod.name()))?;
        // accept() honours SO_RCVTIMEO: wake up to look at the stop flag.
        set_timeout(&listener, libc::SO_RCVTIMEO, Duration::from_millis(100))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..SERVER_THREADS {
            let listener = listener.try_clone()?;
            let stop = stop.clone();
            threads.push(std::thread::Builder::new().name(format!("echo{i}:{}", pod.name())).spawn(
                move || {
                    let _ = pin_current_thread(cpu);
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((stream, _)) = listener.accept() {
                            serve(stream, &stop);
                        }
                    }
                },
            )?);
        }
        Ok(EchoServer { stop, threads })
    }

    /// Tells the threads to stop without waiting for them (dropping waits).
    pub fn signal_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.signal_stop();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

fn set_timeout(socket: &impl AsRawFd, option: libc::c_int, timeout: Duration) -> Result<()> {
    let tv =
        libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: timeout.subsec_micros() as _ };
    // SAFETY: a valid socket and a timeval of the size passed.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(&tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).context("setsockopt");
    }
    Ok(())
}

/// Closes with an RST instead of a FIN: no TIME_WAIT anywhere.
fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a linger struct of the size passed.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// CPU time of the calling thread, in microseconds: its own work and the
/// kernel's packet processing done in its context (a packet sent on a veth
/// is processed by the receiving side's hooks, tc programs or netfilter, in
/// the sender's softirq, usually right away).
fn thread_cpu_us() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
}

/// A client pod and what it connects to (one target picked at random per
/// connection, as a service picks a backend).
pub struct Client<'a> {
    pub pod: &'a Pod,
    pub targets: Vec<SocketAddrV4>,
}

/// One configuration's share of a connection-rate run.
#[derive(Debug, Clone, Serialize)]
pub struct CrrRun {
    pub connections: u64,
    pub errors: u64,
    /// Time spent in this configuration's connections.
    pub seconds: f64,
    /// Connections per second of that time.
    pub rate: f64,
    /// Time spent in connections that failed (timed out or reset).
    pub failed_seconds: f64,
    /// Connections per second of the time spent in those that succeeded: the
    /// cost of a connection, without the timeouts of the failed ones.
    pub completed_rate: f64,
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
    /// The client thread's CPU time per connection (µs).
    pub cpu_us_per_conn: f64,
}

#[derive(Default)]
struct CrrTally {
    connections: u64,
    errors: u64,
    seconds: f64,
    failed_seconds: f64,
    cpu_us: f64,
    connect_us: Vec<f64>,
}

/// Connect, exchange one byte, close with RST: for `duration`, one
/// connection for each client in turn (the starting one rotating), so that
/// every configuration is measured under the same conditions, interleaved
/// connection by connection. One thread does it all, entering each client's
/// network namespace before creating its socket.
pub fn crr(clients: &[Client], duration: Duration, seed: u64, cpu: usize) -> Result<Vec<CrrRun>> {
    let netns: Vec<std::fs::File> = clients
        .iter()
        .map(|c| {
            std::fs::File::open(c.pod.netns().path()).with_context(|| format!("opening {}", c.pod.name()))
        })
        .collect::<Result<_>>()?;
    let tallies = std::thread::scope(|scope| {
        let handle = scope.spawn(|| -> Result<Vec<CrrTally>> {
            pin_current_thread(cpu)?;
            let mut tallies: Vec<CrrTally> = clients.iter().map(|_| CrrTally::default()).collect();
            let mut rng = seed | 1;
            let start = Instant::now();
            let mut round = 0usize;
            while start.elapsed() < duration {
                for k in 0..clients.len() {
                    let i = (k + round) % clients.len();
                    // SAFETY: a valid namespace descriptor; this thread is
                    // ours and ends with the scope.
                    if unsafe { libc::setns(netns[i].as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error()).context("setns");
                    }
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let targets = &clients[i].targets;
                    let target = targets[(rng % targets.len() as u64) as usize];
                    let tally = &mut tallies[i];
                    let cpu0 = thread_cpu_us();
                    let t0 = Instant::now();
                    match TcpStream::connect_timeout(&SocketAddr::V4(target), TIMEOUT) {
                        Ok(mut stream) => {
                            let connected = t0.elapsed();
                            let _ = stream.set_nodelay(true);
                            let _ = stream.set_read_timeout(Some(TIMEOUT));
                            let mut byte = [0u8; 1];
                            let ok =
                                stream.write_all(b"x").and_then(|()| stream.read_exact(&mut byte)).is_ok();
                            set_linger_zero(&stream);
                            drop(stream);
                            if ok {
                                tally.connections += 1;
                                tally.connect_us.push(connected.as_secs_f64() * 1e6);
                            } else {
                                tally.errors += 1;
                                tally.failed_seconds += t0.elapsed().as_secs_f64();
                            }
                        }
                        Err(_) => {
                            tally.errors += 1;
                            tally.failed_seconds += t0.elapsed().as_secs_f64();
                        }
                    }
                    tally.seconds += t0.elapsed().as_secs_f64();
                    tally.cpu_us += thread_cpu_us() - cpu0;
                }
                round += 1;
            }
            Ok(tallies)
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })?;
    clients
        .iter()
        .zip(tallies)
        .map(|(c, t)| {
            if t.connections == 0 {
                bail!(
                    "no connection from {} to {:?} succeeded ({} errors)",
                    c.pod.name(),
                    c.targets,
                    t.errors
                );
            }
            Ok(CrrRun {
                connections: t.connections,
                errors: t.errors,
                seconds: t.seconds,
                rate: t.connections as f64 / t.seconds,
                failed_seconds: t.failed_seconds,
                completed_rate: t.connections as f64 / (t.seconds - t.failed_seconds),
                connect_p50_us: percentile(&t.connect_us, 50.0),
                connect_p99_us: percentile(&t.connect_us, 99.0),
                cpu_us_per_conn: t.cpu_us / t.connections as f64,
            })
        })
        .collect()
}

/// One configuration's share of a request/response run.
#[derive(Debug, Clone, Serialize)]
pub struct RrRun {
    pub round_trips: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// `round_trips` one-byte exchanges per client, each on one established
/// connection, interleaved round trip by round trip.
pub fn rr(clients: &[Client], round_trips: u64, cpu: usize) -> Result<Vec<RrRun>> {
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            pin_current_thread(cpu)?;
            rr_on_this_thread(clients, round_trips)
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn rr_on_this_thread(clients: &[Client], round_trips: u64) -> Result<Vec<RrRun>> {
    let mut streams = Vec::new();
    for c in clients {
        let target = c.targets[0];
        let stream = c
            .pod
            .run(|| TcpStream::connect_timeout(&SocketAddr::V4(target), TIMEOUT))?
            .with_context(|| format!("{}: connect to {target}", c.pod.name()))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        streams.push(stream);
    }
    let mut byte = [0u8; 1];
    // The first packets of a connection are not the steady state.
    for (stream, c) in streams.iter_mut().zip(clients) {
        for _ in 0..10 {
            stream.write_all(b"x").and_then(|()| stream.read_exact(&mut byte)).with_context(|| {
                format!("{}: request/response warm-up with {}", c.pod.name(), c.targets[0])
            })?;
        }
    }
    let mut rtt_us: Vec<Vec<f64>> =
        streams.iter().map(|_| Vec::with_capacity(round_trips as usize)).collect();
    for round in 0..round_trips as usize {
        for k in 0..streams.len() {
            let i = (k + round) % streams.len();
            let t0 = Instant::now();
            streams[i].write_all(b"x").context("RR send")?;
            streams[i].read_exact(&mut byte).context("RR receive")?;
            rtt_us[i].push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    for stream in &streams {
        set_linger_zero(stream);
    }
    Ok(rtt_us
        .iter()
        .map(|v| RrRun { round_trips, p50_us: percentile(v, 50.0), p99_us: percentile(v, 99.0) })
        .collect())
}

/// One connection and one byte back: is `target` reachable from `pod`?
pub fn probe(pod: &Pod, target: SocketAddrV4) -> Result<()> {
    let mut stream = pod
        .run(|| TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_millis(500)))?
        .with_context(|| format!("{}: connect to {target}", pod.name()))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut byte = [0u8; 1];
    stream.write_all(b"x")?;
    stream.read_exact(&mut byte).with_context(|| format!("{}: no echo from {target}", pod.name()))?;
    set_linger_zero(&stream);
    Ok(())
}
