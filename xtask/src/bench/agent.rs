//! `weir-agent` for the benchmark: like the test harness's agent guard (a
//! fresh bpffs root per start, SIGKILL and pin removal on drop), plus what a
//! benchmark needs: its pid (for RSS), when it started, and its log lines
//! with their timestamps, without printing the whole log on every restart.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};
use weir_tests::{manifests::ManifestDir, names, tempdir::TempDir, topology::Node};

use super::PREFIX;

pub struct BenchAgent {
    child: Option<Child>,
    root: PathBuf,
    log_path: PathBuf,
    /// When the process was spawned.
    pub started: Instant,
    _log_dir: TempDir,
}

impl BenchAgent {
    /// Starts the agent for `node` on `manifests`, on a fresh bpffs root,
    /// pinned to `cpu` (all its threads: they inherit it).
    pub fn start(
        bin: &Path,
        node: &Node,
        manifests: &ManifestDir,
        extra: &[String],
        cpu: usize,
    ) -> Result<BenchAgent> {
        let root = Path::new("/sys/fs/bpf").join(names::unique(PREFIX));
        let log_dir = TempDir::new(PREFIX)?;
        let log_path = log_dir.path().join("agent.log");
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--source")
            .arg(format!("dir:{}", manifests.path().display()))
            .args(["--node-name", node.name(), "--netns", node.name(), "--bpffs-root"])
            .arg(&root)
            .args(extra)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: the hook only makes a syscall (async-signal-safe) between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        Ok(BenchAgent { child: Some(child), root, log_path, started, _log_dir: log_dir })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        let raw = std::fs::read(&self.log_path).unwrap_or_default();
        weir_tests::agent::strip_ansi(&String::from_utf8_lossy(&raw))
    }

    fn ensure_running(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            self.child = None;
            bail!("weir-agent exited ({status}); log:\n{}", tail(&self.log(), 40));
        }
        Ok(())
    }

    /// Waits until the `nth` (0-based) log line containing `needle` appears
    /// and returns it; polls every 2 ms.
    pub fn wait_line(&mut self, timeout: Duration, needle: &str, nth: usize) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().filter(|l| l.contains(needle)).nth(nth) {
                return Ok(line.to_owned());
            }
            self.ensure_running()?;
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {needle:?} in the agent log:\n{}",
                    tail(&log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// How many log lines contain `needle`.
    pub fn count_lines(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `count` links are pinned under the bpffs root (two per
    /// local pod once every program is attached).
    pub fn wait_links(&mut self, count: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let have = std::fs::read_dir(self.root.join("links")).map(|d| d.count()).unwrap_or(0);
            if have >= count {
                return Ok(());
            }
            self.ensure_running()?;
            if Instant::now() > deadline {
                bail!(
                    "only {have} of {count} links pinned after {timeout:?}; log:\n{}",
                    tail(&self.log(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// CPU time of all the agent's threads so far (µs), from
    /// /proc/<pid>/task/*/schedstat (nanosecond resolution).
    pub fn cpu_us(&self) -> f64 {
        let Some(pid) = self.pid() else { return f64::NAN };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return f64::NAN };
        tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .sum::<f64>()
            / 1e3
    }

    /// `(VmRSS, VmHWM)` in KiB from /proc/<pid>/status.
    pub fn memory_kib(&self) -> Result<(u64, u64)> {
        let pid = self.pid().context("the agent is not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.root)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("bench: cannot remove {}: {e}", self.root.display());
        }
        // The agent's state file and Hubble socket: /run/weir/<name of the
        // bpffs root>/.
        if let Some(name) = self.root.file_name() {
            let _ = std::fs::remove_dir_all(Path::new("/run/weir").join(name));
        }
    }
}

/// The value of `key=NUMBER` in a tracing log line.
pub fn field(line: &str, key: &str) -> Option<f64> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let value: String = line[start..].chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    value.parse().ok()
}

/// The timestamp that starts a tracing line (`2026-12-07T14:52:59.123456Z`).
pub fn timestamp(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let sec: f64 = t.next()?.parse().ok()?;
    // Days since the epoch (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + min * 60;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_secs_f64(sec))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_and_timestamps() {
        let line = "2026-12-07T14:52:59.250000Z  INFO weir_agent::node: load-balancer maps updated frontends=3 writes=12 elapsed_ms=17";
        assert_eq!(field(line, "elapsed_ms"), Some(17.0));
        assert_eq!(field(line, "writes"), Some(12.0));
        let t = timestamp(line).unwrap().duration_since(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(t.as_secs(), 1_796_655_179);
        assert_eq!(t.subsec_millis(), 250);
    }
}
