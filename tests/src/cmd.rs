//! Running external commands (`ip`, mostly) with errors that say what failed.
//!
//! The harness shells out to iproute2 rather than speaking netlink itself: the
//! commands are exactly those in the contract, and a failing one can be pasted
//! into a shell to reproduce it.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `program args...`, waits for it, and returns its stdout. A non-zero
/// exit is an error carrying the full command line and its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output =
        Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("{program}: stdout is not UTF-8"))
}

/// Runs `ip args...` in the caller's network namespace.
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}
