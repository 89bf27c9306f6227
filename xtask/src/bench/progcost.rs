//! Per-packet program cost with BPF_PROG_TEST_RUN, on the programs the agent
//! attached (the same maps, as full as the benchmark made them).
//!
//! The new-connection path changes state (it inserts conntrack entries), so
//! it is measured one packet per run (`repeat = 1`), each with a source port
//! never used before; the kernel's duration then includes its timer reads,
//! which the empty program's figure shows. The established path is measured
//! with large repeat counts on a tuple whose first packet ran before.
//! Source ports stay below 32768, out of the kernel's ephemeral range, so a
//! tuple of the real traffic never collides with a measured one.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use weir_tests::bpf::{self, TestRun};
use weir_tests::frames::{self, ACK, SYN};

use super::services::{BACKEND_PORT, CLIENT_IP, SERVICE_PORT, backend_ip};
use super::stats::percentile;

/// The agent's from-pod and to-pod programs.
pub struct Programs {
    pub from_pod_id: u32,
    pub to_pod_id: u32,
    from_pod: OwnedFd,
    to_pod: OwnedFd,
}

impl Programs {
    /// Finds the programs behind the links pinned under `root/links` for the
    /// host interface `ifname` (all pods share the same two programs).
    pub fn open(root: &Path, ifname: &str) -> Result<Programs> {
        let links = root.join("links");
        let find = |hook: &str| -> Result<(u32, OwnedFd)> {
            let entry = std::fs::read_dir(&links)
                .with_context(|| format!("reading {}", links.display()))?
                .flatten()
                .find(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with(&format!("{hook}:")) && name.ends_with(&format!(":{ifname}"))
                })
                .with_context(|| format!("no {hook} link pinned for {ifname} in {}", links.display()))?;
            bpf::prog_of_pinned_link(&entry.path())
        };
        let (from_pod_id, from_pod) = find("from-pod")?;
        let (to_pod_id, to_pod) = find("to-pod")?;
        Ok(Programs { from_pod_id, to_pod_id, from_pod, to_pod })
    }
}

/// Median and 99th percentile of one path's per-packet cost (ns).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cost {
    pub p50_ns: f64,
    pub p99_ns: f64,
    pub samples: usize,
}

impl Cost {
    fn of(samples: &[f64]) -> Cost {
        Cost { p50_ns: percentile(samples, 50.0), p99_ns: percentile(samples, 99.0), samples: samples.len() }
    }
}

/// How many packets to run.
#[derive(Debug, Clone, Copy)]
pub struct Effort {
    /// One-packet runs per new-connection path.
    pub new_samples: usize,
    /// Repetitions per established-path run, and how many such runs.
    pub repeat: u32,
    pub batches: usize,
}

/// Source ports per path, never reused within one benchmark process.
#[derive(Debug, Default)]
pub struct Ports {
    next: [u32; 8],
}

impl Ports {
    fn take(&mut self, path: usize) -> Result<u16> {
        let n = self.next[path];
        self.next[path] += 1;
        if n >= 31_000 {
            bail!("out of fresh source ports for test-run path {path}");
        }
        Ok(1024 + n as u16)
    }
}

/// Every path's cost at one state of the maps.
#[derive(Debug, Clone, Serialize)]
pub struct Costs {
    /// Harness overhead: an empty classifier, one packet per run / repeated.
    pub empty_new: Cost,
    pub empty_established: Cost,
    /// from-pod: SYN to the ClusterIP (frontend lookup, backend pick, two
    /// conntrack inserts, DNAT, egress policy when isolated).
    pub service_new: Cost,
    /// from-pod: later packet of that connection (conntrack hit, DNAT).
    pub service_established: Cost,
    /// from-pod at the backend: the reply (reverse NAT).
    pub service_reply: Cost,
    /// from-pod: SYN straight to a pod IP (no service).
    pub direct_new: Cost,
    /// to-pod: first packet into the backend (ingress policy, conntrack insert).
    pub to_pod_new: Cost,
    /// to-pod: later packet (conntrack hit).
    pub to_pod_established: Cost,
    /// to-pod: first packet from an address no policy allows (dropped when
    /// the backend is isolated; every policy lookup misses).
    pub to_pod_denied: Cost,
}

/// Rounds over which every path's samples are spread, so that a burst of
/// other work on the machine falls on all paths and all program sets alike.
const ROUNDS: usize = 5;

/// Measures every path of every program set (each with the ClusterIP its
/// client reaches), interleaved round by round on a thread pinned to the
/// benchmark CPU: program sets compared with each other (sizes, policy
/// counts, flow events on and off) see the same machine.
pub fn measure(sets: &[(&Programs, Ipv4Addr)], plan: &super::Plan, ports: &mut Ports) -> Result<Vec<Costs>> {
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| -> Result<Vec<Costs>> {
            super::load::pin_current_thread(plan.cpu)?;
            let mut samplers = sets.iter().map(|_| Sampler::new()).collect::<Result<Vec<_>>>()?;
            for _ in 0..ROUNDS {
                for (sampler, (progs, cluster_ip)) in samplers.iter_mut().zip(sets) {
                    sampler.round(progs, *cluster_ip, plan.effort, ports)?;
                }
            }
            Ok(samplers.iter().map(Sampler::costs).collect())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Samples (ns) per path, in the order of [`Costs`].
struct Sampler {
    empty: OwnedFd,
    s: [Vec<f64>; 9],
}

impl Sampler {
    fn new() -> Result<Sampler> {
        Ok(Sampler { empty: bpf::load_empty_classifier()?, s: Default::default() })
    }

    /// One round: a share of the samples of every path.
    fn round(
        &mut self,
        progs: &Programs,
        cluster_ip: Ipv4Addr,
        effort: Effort,
        ports: &mut Ports,
    ) -> Result<()> {
        let mut out = vec![0u8; 256];
        let backend = backend_ip(0);
        let stranger = Ipv4Addr::new(192, 0, 2, 1);
        let per_round = effort.new_samples.div_ceil(ROUNDS);
        let batches = effort.batches.div_ceil(ROUNDS);
        let s = &mut self.s;
        let one = |prog: &OwnedFd, frame: &[u8], out: &mut Vec<u8>| -> Result<TestRun> {
            bpf::test_run(prog, frame, out, 1)
        };
        let repeated = |prog: &OwnedFd, frame: &[u8], out: &mut Vec<u8>, into: &mut Vec<f64>| -> Result<()> {
            for _ in 0..batches {
                into.push(f64::from(bpf::test_run(prog, frame, out, effort.repeat)?.duration_ns));
            }
            Ok(())
        };

        // The empty program.
        let frame = frames::tcp(CLIENT_IP, 1, cluster_ip, SERVICE_PORT, SYN);
        for _ in 0..per_round {
            s[0].push(f64::from(one(&self.empty, &frame, &mut out)?.duration_ns));
        }
        repeated(&self.empty, &frame, &mut out, &mut s[1])?;

        // Through the service: new, established, reply.
        let mut last = None;
        for _ in 0..per_round {
            let sport = ports.take(0)?;
            let frame = frames::tcp(CLIENT_IP, sport, cluster_ip, SERVICE_PORT, SYN);
            let run = one(&progs.from_pod, &frame, &mut out)?;
            bpf::expect_pass("from-pod, SYN to the ClusterIP", &run)?;
            s[2].push(f64::from(run.duration_ns));
            last = Some((sport, run));
        }
        let (sport, run) = last.context("no samples")?;
        let translated = &out[..run.size_out];
        let chosen = frames::destination(translated).context("short output")?;
        if chosen == cluster_ip || frames::destination_port(translated) != Some(BACKEND_PORT) {
            bail!("from-pod did not translate {cluster_ip}:{SERVICE_PORT} (got {chosen})");
        }
        let frame = frames::tcp(CLIENT_IP, sport, cluster_ip, SERVICE_PORT, ACK);
        repeated(&progs.from_pod, &frame, &mut out, &mut s[3])?;
        let reply = frames::tcp(chosen, BACKEND_PORT, CLIENT_IP, sport, ACK);
        repeated(&progs.from_pod, &reply, &mut out, &mut s[4])?;
        if frames::source(&out) != Some(cluster_ip) {
            bail!("from-pod did not reverse-translate the reply from {chosen} to {cluster_ip}");
        }

        // Straight to a pod.
        for _ in 0..per_round {
            let frame = frames::tcp(CLIENT_IP, ports.take(1)?, backend, BACKEND_PORT, SYN);
            let run = one(&progs.from_pod, &frame, &mut out)?;
            bpf::expect_pass("from-pod, SYN to a pod IP", &run)?;
            s[5].push(f64::from(run.duration_ns));
        }

        // Into the backend: new, established.
        let mut sport = 0;
        for _ in 0..per_round {
            sport = ports.take(2)?;
            let frame = frames::tcp(CLIENT_IP, sport, backend, BACKEND_PORT, SYN);
            let run = one(&progs.to_pod, &frame, &mut out)?;
            bpf::expect_pass("to-pod, SYN from the client", &run)?;
            s[6].push(f64::from(run.duration_ns));
        }
        let frame = frames::tcp(CLIENT_IP, sport, backend, BACKEND_PORT, ACK);
        repeated(&progs.to_pod, &frame, &mut out, &mut s[7])?;

        // From a stranger (a world address): every policy lookup misses.
        for _ in 0..per_round {
            let frame = frames::tcp(stranger, ports.take(3)?, backend, BACKEND_PORT, SYN);
            s[8].push(f64::from(one(&progs.to_pod, &frame, &mut out)?.duration_ns));
        }
        Ok(())
    }

    fn costs(&self) -> Costs {
        let s = &self.s;
        Costs {
            empty_new: Cost::of(&s[0]),
            empty_established: Cost::of(&s[1]),
            service_new: Cost::of(&s[2]),
            service_established: Cost::of(&s[3]),
            service_reply: Cost::of(&s[4]),
            direct_new: Cost::of(&s[5]),
            to_pod_new: Cost::of(&s[6]),
            to_pod_established: Cost::of(&s[7]),
            to_pod_denied: Cost::of(&s[8]),
        }
    }
}

/// `(run_time_ns, run_cnt)` of a program, from `bpftool -j prog show id N`
/// (non-zero while the kernel's run-time statistics are on).
pub fn runtime_stats(id: u32) -> Result<(u64, u64)> {
    let out =
        crate::cmd::stdout(crate::cmd::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]))?;
    let json: serde_json::Value = serde_json::from_str(&out).context("parsing bpftool prog show")?;
    let get = |k: &str| json.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    Ok((get("run_time_ns"), get("run_cnt")))
}

/// The ids of the maps a program uses and their memory (`bytes_memlock`).
pub fn map_memory(prog_id: u32) -> Result<Vec<(String, u64)>> {
    let out = crate::cmd::stdout(crate::cmd::new("bpftool").args([
        "-j",
        "prog",
        "show",
        "id",
        &prog_id.to_string(),
    ]))?;
    let json: serde_json::Value = serde_json::from_str(&out).context("parsing bpftool prog show")?;
    let ids: Vec<u64> = json
        .get("map_ids")
        .and_then(serde_json::Value::as_array)
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default();
    let mut maps = Vec::new();
    for id in ids {
        let out = crate::cmd::stdout(crate::cmd::new("bpftool").args([
            "-j",
            "map",
            "show",
            "id",
            &id.to_string(),
        ]))?;
        let map: serde_json::Value = serde_json::from_str(&out).context("parsing bpftool map show")?;
        let name = map.get("name").and_then(serde_json::Value::as_str).unwrap_or("?").to_owned();
        let bytes = map.get("bytes_memlock").and_then(serde_json::Value::as_u64).unwrap_or(0);
        maps.push((name, bytes));
    }
    maps.sort();
    Ok(maps)
}
