//! Loading kube-proxy's rulesets into a node namespace, timed: always
//! `ip netns exec <node> …`, never in the root namespace.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// How one load went.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub seconds: f64,
    /// Peak resident memory of the loading process (KiB).
    pub peak_rss_kib: u64,
}

/// Runs `ip netns exec <netns> <program> <args…>` and waits for it, up to
/// `timeout`: `Ok(None)` when it had to be killed.
pub fn run_in(netns: &str, program: &str, args: &[&str], timeout: Duration) -> Result<Option<Load>> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, program]).args(args).stdin(Stdio::null()).stdout(Stdio::null());
    cmd.stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {program} in {netns}"))?;
    let pid = child.id() as libc::pid_t;
    // `ip netns exec` execs the program (no fork), so the child's rusage
    // is the program's own.
    loop {
        let mut status = 0;
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: our own child; status and usage are valid out-pointers.
        let ret = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, usage.as_mut_ptr()) };
        if ret == pid {
            let seconds = started.elapsed().as_secs_f64();
            // SAFETY: wait4 filled it in for the reaped child.
            let usage = unsafe { usage.assume_init() };
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            // The child is reaped: std must not wait for it again.
            std::mem::forget(child);
            if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                bail!(
                    "`{program} {}` in {netns} failed (status {status}): {}",
                    args.join(" "),
                    stderr.trim()
                );
            }
            return Ok(Some(Load { seconds, peak_rss_kib: usage.ru_maxrss as u64 }));
        }
        if ret < 0 {
            return Err(std::io::Error::last_os_error()).context("wait4");
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `iptables-restore FILE` in the node (replaces the filter and nat tables).
pub fn iptables_restore(netns: &str, file: &Path, timeout: Duration) -> Result<Option<Load>> {
    run_in(netns, "iptables-restore", &[&file.to_string_lossy()], timeout)
}

/// `nft -f FILE` in the node.
pub fn nft_load(netns: &str, file: &Path, timeout: Duration) -> Result<Option<Load>> {
    run_in(netns, "nft", &["-f", &file.to_string_lossy()], timeout)
}

/// Removes kube-proxy's nftables table from the node, if there.
pub fn nft_delete_table(netns: &str) -> Result<()> {
    let _ = run_in(netns, "nft", &["delete", "table", "ip", "kube-proxy"], Duration::from_secs(600));
    Ok(())
}

/// The first line of `program --version`.
pub fn version(program: &str) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}
