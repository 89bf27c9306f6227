//! Network namespaces: an RAII guard around `ip netns add/del`, and running
//! code inside a namespace.
//!
//! Namespaces are created with `ip netns add` so that `/run/netns/<name>`
//! exists: the agent's `--netns NAME` and every `ip -n NAME` rely on it.
//!
//! Code runs "inside" a namespace on a fresh thread that `setns(CLONE_NEWNET)`s
//! itself and then exits: the calling thread (and the test binary's other
//! threads) never change namespace. Sockets created by that thread belong to
//! the namespace for their whole life, whichever thread uses them later, so
//! the usual pattern is "create the socket in [`NetNs::run`], use it anywhere".
//! We deliberately avoid `ip netns exec`, which remounts /sys in a private
//! mount namespace and so hides the bpffs at /sys/fs/bpf.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use nix::sched::CloneFlags;

use crate::cmd;

/// `ip netns add` makes /run/netns a shared bind mount the first time it
/// runs; two of them racing (parallel tests) can trip over each other, so the
/// harness serialises namespace creation and deletion within the process.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// A named network namespace, deleted (`ip netns del`) when dropped.
///
/// Deleting only removes the name: the kernel frees the namespace (and the
/// interfaces in it) once the last process, socket or bpf link using it is
/// gone. Drop servers and agents before their namespaces for a prompt cleanup.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// `ip netns add <name>`.
    pub fn create(name: &str) -> Result<NetNs> {
        let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        cmd::ip(&["netns", "add", name])?;
        Ok(NetNs { name: name.to_owned() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, what `setns` and `weir-agent --netns` open.
    pub fn path(&self) -> PathBuf {
        path_of(&self.name)
    }

    /// `ip -n <name> args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        cmd::ip(&full)
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its result.
    /// A panic in `f` is propagated to the caller (so assertions inside work).
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        run_in(&self.path(), f)
    }

    /// Writes a sysctl of this namespace, e.g. `net.ipv4.ip_forward`.
    ///
    /// Network sysctls under /proc/sys/net resolve against the namespace of
    /// the *calling thread*, so writing from a thread inside the namespace
    /// changes the namespace's value and never the root namespace's.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))?
            .with_context(|| format!("{}: cannot set {key}={value}", self.name))
    }

    /// Reads a sysctl of this namespace (see [`NetNs::set_sysctl`]).
    pub fn sysctl(&self, key: &str) -> Result<String> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let value = self
            .run(|| std::fs::read_to_string(&path))?
            .with_context(|| format!("{}: cannot read {key}", self.name))?;
        Ok(value.trim().to_owned())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = cmd::ip(&["netns", "del", &self.name]) {
            eprintln!("weir-tests: {e:#}");
        }
    }
}

/// `/run/netns/<name>`.
pub fn path_of(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Moves the *calling thread* into the network namespace at `path`.
/// Only call this on a thread you own and that ends afterwards.
pub fn enter(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns({}, CLONE_NEWNET)", path.display()))
}

/// Runs `f` on a fresh (scoped) thread inside the namespace at `path` and
/// returns its result; `f` may borrow from the caller.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns:{}", path.display()))
            .spawn_scoped(scope, || -> Result<T> {
                enter(path)?;
                Ok(f())
            })
            .context("cannot spawn a thread")?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
