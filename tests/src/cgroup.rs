//! A dedicated cgroup v2 directory for socket-LB tests: the agent attaches
//! its socket hooks there (never to a cgroup other processes live in), and
//! the test process joins it for as long as the guard lives.
//!
//! Joining moves the whole test process (cgroup v2 moves processes, not
//! threads), so a test binary that uses this keeps to one test at a time in
//! the cgroup. Other namespaces' sockets created meanwhile are unaffected:
//! the hooks act only on the node namespace of their agent.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::names;

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a unified
/// system, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(2) == Some(&"cgroup2"))
        .and_then(|fields| fields.get(1).map(PathBuf::from))
        .context("no cgroup2 hierarchy is mounted (the socket LB needs one)")
}

/// The cgroup v2 path of this process, relative to the mount.
fn own_cgroup() -> Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| path.trim_start_matches('/').to_owned())
        .context("this process has no cgroup v2 membership")
}

/// A cgroup `weir-t<pid>-<n>` under the cgroup2 mount, removed on drop.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn create() -> Result<TestCgroup> {
        let path = cgroup2_mount()?.join(names::unique(names::TEST_PREFIX));
        std::fs::create_dir(&path).with_context(|| format!("creating the cgroup {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves this process into the cgroup until the guard drops; sockets
    /// created meanwhile belong to it (and keep belonging to it).
    pub fn join(&self) -> Result<Membership<'_>> {
        let previous = cgroup2_mount()?.join(own_cgroup()?);
        move_process(&self.path)?;
        Ok(Membership { cgroup: self, previous })
    }
}

fn move_process(cgroup: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("moving this process into {}", cgroup.display()))
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir(&self.path) {
            eprintln!("cannot remove the cgroup {}: {err}", self.path.display());
        }
    }
}

/// This process's membership of a [`TestCgroup`]; dropping it moves the
/// process back where it was.
#[derive(Debug)]
pub struct Membership<'a> {
    cgroup: &'a TestCgroup,
    previous: PathBuf,
}

impl Membership<'_> {
    /// Whether this process is in the test cgroup (it is, unless something
    /// moved it out).
    pub fn check(&self) -> Result<()> {
        let now = cgroup2_mount()?.join(own_cgroup()?);
        if now != self.cgroup.path {
            bail!("this process is in {}, not in {}", now.display(), self.cgroup.path.display());
        }
        Ok(())
    }
}

impl Drop for Membership<'_> {
    fn drop(&mut self) {
        if let Err(err) = move_process(&self.previous) {
            eprintln!("{err:#}");
        }
    }
}
