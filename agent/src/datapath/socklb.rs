//! Socket LB for the node's own processes (kubelet, hostNetwork pods): the
//! four cgroup sock_addr programs (see the kernel side, `sock.rs`) attached
//! to a cgroup v2 directory with links pinned under `<root>/socklb/`, so
//! they keep translating while the agent is down.
//!
//! The programs act only on sockets in the network namespace whose cookie
//! the agent writes into the config: a cgroup can hold processes of other
//! namespaces (other simulated nodes, containers), and those are left alone.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use tracing::info;

/// The programs, by the name of their hook.
pub const PROGRAMS: [&str; 4] =
    ["weir_sock_connect4", "weir_sock_sendmsg4", "weir_sock_recvmsg4", "weir_sock_getpeername4"];

fn pin_dir(root: &Path) -> PathBuf {
    root.join("socklb")
}

/// Loads (verifies) the socket-LB programs.
pub fn load(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for name in PROGRAMS {
        program(ebpf, name)?.load().with_context(|| format!("verifying {name}"))?;
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut CgroupSockAddr> {
    let program = ebpf.program_mut(name).with_context(|| format!("program {name} missing"))?;
    program.try_into().with_context(|| format!("{name} is not a cgroup sock_addr program"))
}

/// Attaches the programs to `cgroup` and pins the links, replacing the
/// links of an earlier run: the new link is pinned under a temporary name
/// and renamed over the old pin, which detaches the old one. For that
/// instant both run, which is harmless: the second sees a backend address,
/// not a service.
pub fn attach(ebpf: &mut Ebpf, root: &Path, cgroup: &Path) -> anyhow::Result<()> {
    let dir = pin_dir(root);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let cgroup_dir =
        File::open(cgroup).with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
    for name in PROGRAMS {
        let program = program(ebpf, name)?;
        // A bpf_link on a cgroup always coexists with other programs
        // (systemd's, another agent's); the kernel wants no flags for it.
        let id = program
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        let link = FdLink::try_from(program.take_link(id)?).context("a bpf_link expected")?;
        let pin = dir.join(name);
        let staged = dir.join(format!("{name}_new")); // bpffs names cannot hold a dot
        let _ = std::fs::remove_file(&staged);
        link.pin(&staged).with_context(|| format!("pinning {}", staged.display()))?;
        std::fs::rename(&staged, &pin).with_context(|| format!("replacing {}", pin.display()))?;
    }
    info!(cgroup = %cgroup.display(), "socket LB attached");
    Ok(())
}

/// Removes the pins of an earlier run (socket LB now disabled), which
/// detaches its programs.
pub fn detach(root: &Path) -> anyhow::Result<()> {
    let dir = pin_dir(root);
    if !dir.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    info!("socket LB detached");
    Ok(())
}

/// The cookie of the current network namespace (`SO_NETNS_COOKIE`, Linux
/// 5.14), the value `bpf_get_netns_cookie` returns for its sockets.
pub fn netns_cookie() -> anyhow::Result<u64> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").context("opening a socket")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an output buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("reading the network namespace cookie");
    }
    Ok(cookie)
}
