//! `cargo xtask test`: unit tests, then the privileged integration tests in
//! `tests/` against freshly built binaries.

use std::path::Path;

use anyhow::{Context as _, Result};
use clap::Args;

use crate::cargo::Workspace;
use crate::cmd;

/// Prefix of the network namespaces the integration tests create.
const TEST_NETNS_PREFIX: &str = "weir-t";

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Passed to the integration test binaries after `--test-threads=2`,
    /// e.g. a test name filter: `cargo xtask test -- hairpin`.
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn run(ws: &Workspace, args: &TestArgs) -> Result<()> {
    let mut count = cmd::TestCount::default();
    let result = run_all(ws, args, &mut count);
    // One closing line for whoever reads the end of the log (CI does).
    println!("tests: {} passed, {} failed", count.passed, count.failed);
    result
}

fn run_all(ws: &Workspace, args: &TestArgs, count: &mut cmd::TestCount) -> Result<()> {
    cmd::run_tests(
        ws.cargo().args(["test", "--workspace", "--exclude", "weir-tests", "--exclude", "weir-ebpf"]),
        count,
    )
    .context("unit tests failed")?;

    let bins = ws.build_binaries(false)?;

    cmd::require_root("the integration tests (they create network namespaces and load eBPF programs)")?;
    remove_leftover_namespaces()?;

    cmd::run_tests(
        ws.cargo()
            .args(["test", "-p", "weir-tests", "--", "--test-threads=2"])
            .args(&args.args)
            .env("WEIR_AGENT_BIN", &bins.agent)
            .env("WEIR_CLI_BIN", &bins.cli),
        count,
    )
    .context("integration tests failed")?;

    crate::bench::smoke(ws, &bins).context("`cargo xtask bench --smoke` failed")?;
    Ok(())
}

/// Deletes network namespaces named `weir-t*` that a crashed earlier run
/// left behind (a test normally removes its own). The harness names them
/// `weir-t<pid>-<n>[-…]` (tests/src/names.rs); those whose process is still
/// alive belong to a run in progress and are kept. Nothing else is touched.
fn remove_leftover_namespaces() -> Result<()> {
    let list =
        cmd::stdout(cmd::new("ip").args(["netns", "list"])).context("cannot list network namespaces")?;
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    for name in leftover_namespaces(&list, alive) {
        cmd::run(cmd::new("ip").args(["netns", "delete", name]))
            .with_context(|| format!("cannot delete leftover network namespace {name}"))?;
    }
    Ok(())
}

/// Names in `ip netns list` output (`NAME` or `NAME (id: N)` per line) that
/// start with the tests' prefix and do not carry the pid of a live process.
fn leftover_namespaces(list: &str, alive: impl Fn(u32) -> bool) -> Vec<&str> {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| {
            let Some(rest) = name.strip_prefix(TEST_NETNS_PREFIX) else {
                return false;
            };
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            !pid.is_some_and(&alive)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dead_runs_test_namespaces_are_leftovers() {
        let list = "weir-t12-0 (id: 3)\nweir-t12-0-client\nweir-t77-1-backend (id: 4)\n\
                    weir-tx\nweir-demo-node (id: 2)\nblue\nmy-weir-t1 (id: 0)\n";
        let alive = |pid| pid == 77;
        assert_eq!(leftover_namespaces(list, alive), ["weir-t12-0", "weir-t12-0-client", "weir-tx"]);
    }
}
