//! Conntrack garbage collection. The datapath only marks entries with an
//! expiry time; the agent deletes the dead ones (as Cilium's agent does), so
//! the LRU map evicts live connections only under real pressure.

use aya::maps::{HashMap, MapData};
use nix::time::{ClockId, clock_gettime};
use std::collections::HashSet;

use weir_abi::ct::{CT_F_HAIRPIN, CT_KIND_FLOW, CT_KIND_SERVICE, CtEntry, CtKey};

/// Seconds of CLOCK_MONOTONIC: the clock behind `bpf_ktime_get_ns`.
pub fn now_secs() -> u32 {
    clock_gettime(ClockId::CLOCK_MONOTONIC).map(|t| t.tv_sec() as u32).unwrap_or(0)
}

/// Outcome of one GC pass.
#[derive(Debug, Default, Clone, Copy)]
pub struct GcReport {
    pub scanned: usize,
    pub deleted: usize,
}

/// Deletes every entry that expired before `now`.
pub fn collect_garbage(map: &mut HashMap<MapData, CtKey, CtEntry>, now: u32) -> GcReport {
    let mut report = GcReport::default();
    let mut expired = Vec::new();
    // Iteration tolerates entries vanishing underneath (LRU eviction).
    for (key, entry) in map.iter().flatten() {
        report.scanned += 1;
        if entry.expires < now {
            expired.push(key);
        }
    }
    for key in expired {
        // Look again right before deleting: a packet may have revived the
        // entry since the scan (the race behind cilium#46298). This narrows
        // the window to one syscall; it cannot close it.
        if !map.get(&key, 0).is_ok_and(|e| e.expires < now) {
            continue;
        }
        if map.remove(&key).is_ok() {
            report.deleted += 1;
        }
    }
    report
}

/// A (frontend, backend) pair whose UDP flows must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StaleUdpBackend {
    pub frontend_be: (u32, u16),
    pub backend_be: (u32, u16),
}

/// Deletes the conntrack entries of UDP flows that a service sends to a
/// backend that left it, so the next datagram picks a live backend at once
/// (kube-proxy's `CleanStaleEntries`; without it a DNS client keeps talking
/// to a deleted CoreDNS pod until its flow idles out — cilium#27300).
pub fn flush_stale_udp(
    map: &mut HashMap<MapData, CtKey, CtEntry>,
    stale: &HashSet<StaleUdpBackend>,
    hairpin_be: u32,
) -> usize {
    let mut doomed = Vec::new();
    for (key, entry) in map.iter().flatten() {
        if key.proto != weir_abi::proto::UDP || key.kind != CT_KIND_SERVICE {
            continue;
        }
        let pair = StaleUdpBackend {
            frontend_be: (key.daddr_be, key.dport_be),
            backend_be: (entry.nat_addr_be, entry.nat_port_be),
        };
        if stale.contains(&pair) {
            doomed.push(key);
            let src_be = if entry.flags & CT_F_HAIRPIN != 0 { hairpin_be } else { key.saddr_be };
            doomed.push(CtKey {
                saddr_be: src_be,
                daddr_be: entry.nat_addr_be,
                sport_be: key.sport_be,
                dport_be: entry.nat_port_be,
                proto: key.proto,
                kind: CT_KIND_FLOW,
                _pad: [0; 2],
            });
        }
    }
    doomed.iter().filter(|key| map.remove(key).is_ok()).count()
}
