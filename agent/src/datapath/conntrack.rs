//! Conntrack garbage collection. The datapath only marks entries with an
//! expiry time; the agent deletes the dead ones (as Cilium's agent does), so
//! the LRU map evicts live connections only under real pressure.

use aya::maps::{HashMap, MapData};
use nix::time::{ClockId, clock_gettime};
use weir_abi::ct::{CtEntry, CtKey};

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
