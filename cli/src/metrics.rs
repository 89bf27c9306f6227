//! `weir metrics list`: datapath counters summed over CPUs, like `cilium bpf metrics list`.

use std::path::Path;

use aya::maps::{MapData, PerCpuArray};
use serde::Serialize;
use weir_abi::{
    map_name,
    metrics::{Counter, is_drop, reason_name},
};

use crate::{
    maps::open,
    output::{Format, print_json},
};

#[derive(Debug, Serialize)]
struct MetricRow {
    code: u32,
    reason: &'static str,
    drop: bool,
    packets: u64,
    bytes: u64,
}

pub fn list(root: &Path, format: Format) -> anyhow::Result<()> {
    let map: PerCpuArray<MapData, Counter> = open(root, map_name::METRICS)?;
    let mut rows = Vec::new();
    for code in 0..map.len() {
        let per_cpu = map.get(&code, 0)?;
        let (packets, bytes) = per_cpu.iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
        if packets > 0 {
            rows.push(MetricRow { code, reason: reason_name(code), drop: is_drop(code), packets, bytes });
        }
    }
    match format {
        Format::Json => print_json(&rows),
        Format::Table => {
            // As wide as the longest reason shown, so that the columns line up.
            let width = rows.iter().map(|r| r.reason.len()).max().unwrap_or(0).max(34);
            println!("{:<6} {:<width$} {:<9} {:>12} {:>14}", "CODE", "REASON", "VERDICT", "PACKETS", "BYTES");
            for r in &rows {
                let verdict = if r.drop { "DROPPED" } else { "FORWARDED" };
                println!(
                    "{:<6} {:<width$} {:<9} {:>12} {:>14}",
                    r.code, r.reason, verdict, r.packets, r.bytes
                );
            }
            Ok(())
        }
    }
}
