//! Attaching the programs to pod interfaces with tcx links pinned under
//! `<root>/links/`. A pinned link outlives the agent: the datapath keeps
//! running while the agent is stopped, and a restarted agent takes the link
//! back and swaps in its own program atomically (BPF_LINK_UPDATE).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::programs::{
    SchedClassifier, TcAttachType, Xdp,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
    xdp::{XdpLink, XdpMode},
};
use tracing::{info, warn};

/// Where on a pod's host-side veth a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    /// tcx ingress: packets the pod sends.
    FromPod,
    /// tcx egress: packets on their way into the pod.
    ToPod,
    /// tcx ingress of a node device: north-south traffic.
    FromNetdev,
    /// XDP (native) on a node device: north-south traffic, before tc.
    XdpFromNetdev,
}

impl Hook {
    /// The hooks on a pod's host-side veth.
    pub const POD: [Hook; 2] = [Hook::FromPod, Hook::ToPod];
    pub const ALL: [Hook; 4] = [Hook::FromPod, Hook::ToPod, Hook::FromNetdev, Hook::XdpFromNetdev];

    fn name(self) -> &'static str {
        match self {
            Hook::FromPod => "from-pod",
            Hook::ToPod => "to-pod",
            Hook::FromNetdev => "from-netdev",
            Hook::XdpFromNetdev => "xdp",
        }
    }

    /// Where a tc hook attaches (`None` for XDP).
    fn tc_attach_type(self) -> Option<TcAttachType> {
        match self {
            Hook::FromPod | Hook::FromNetdev => Some(TcAttachType::Ingress),
            Hook::ToPod => Some(TcAttachType::Egress),
            Hook::XdpFromNetdev => None,
        }
    }
}

/// A program whose links [`Attachments::ensure`] manages: tc or XDP.
pub trait LinkProgram {
    /// Swaps this program into a pinned link (BPF_LINK_UPDATE); the pin
    /// keeps the link, so our handle is let go without detaching it.
    fn adopt(&mut self, link: FdLink) -> anyhow::Result<()>;
    /// Attaches this program at `hook` of `ifname`; the caller pins the link.
    fn attach_new(&mut self, hook: Hook, ifname: &str) -> anyhow::Result<FdLink>;
}

impl LinkProgram for SchedClassifier {
    fn adopt(&mut self, link: FdLink) -> anyhow::Result<()> {
        let link = SchedClassifierLink::try_from(link).context("pinned link is not a tcx link")?;
        let id = self.attach_to_link(link).context("updating the pinned link")?;
        drop(self.take_link(id)?);
        Ok(())
    }

    fn attach_new(&mut self, hook: Hook, ifname: &str) -> anyhow::Result<FdLink> {
        let attach_type = hook.tc_attach_type().context("not a tc hook")?;
        let id = self
            .attach(ifname, attach_type)
            .with_context(|| format!("attaching {} to {ifname}", hook.name()))?;
        FdLink::try_from(self.take_link(id)?).context("tcx link expected")
    }
}

impl LinkProgram for Xdp {
    fn adopt(&mut self, link: FdLink) -> anyhow::Result<()> {
        let link = XdpLink::try_from(link).context("pinned link is not an XDP link")?;
        let id = self.attach_to_link(link).context("updating the pinned XDP link")?;
        drop(self.take_link(id)?);
        Ok(())
    }

    fn attach_new(&mut self, _hook: Hook, ifname: &str) -> anyhow::Result<FdLink> {
        let id = self
            .attach(ifname, XdpMode::Driver)
            .with_context(|| format!("attaching native XDP to {ifname}"))?;
        FdLink::try_from(self.take_link(id)?).context("an XDP bpf_link expected")
    }
}

/// Interface index by name in the current network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

pub struct Attachments {
    dir: PathBuf,
    /// (hook, interface) this agent has attached to or adopted, with the ifindex.
    current: BTreeMap<(Hook, String), u32>,
}

/// `hook:ifindex:ifname`; interface names cannot contain ':'.
fn pin_name(hook: Hook, ifname: &str, ifindex: u32) -> String {
    format!("{}:{ifindex}:{ifname}", hook.name())
}

fn parse_pin_name(name: &str) -> Option<(Hook, u32, String)> {
    let mut parts = name.splitn(3, ':');
    let hook_name = parts.next()?;
    let hook = Hook::ALL.into_iter().find(|h| h.name() == hook_name)?;
    let index = parts.next()?.parse().ok()?;
    Some((hook, index, parts.next()?.to_owned()))
}

impl Attachments {
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        let dir = root.join("links");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir, current: BTreeMap::new() })
    }

    /// Makes sure `program` runs at `hook` of `ifname`: takes over the pinned
    /// link of an earlier run without a gap, or attaches and pins a new one.
    /// For XDP this fails when the driver cannot run it natively (the
    /// caller then relies on tc alone).
    pub fn ensure(&mut self, hook: Hook, program: &mut impl LinkProgram, ifname: &str) -> anyhow::Result<()> {
        let index = ifindex(ifname).with_context(|| format!("interface {ifname} not found"))?;
        let slot = (hook, ifname.to_owned());
        if self.current.get(&slot) == Some(&index) {
            return Ok(());
        }
        let pin = self.dir.join(pin_name(hook, ifname, index));
        if pin.exists() {
            let link = PinnedLink::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
            program.adopt(FdLink::from(link))?;
            info!(interface = ifname, hook = hook.name(), "adopted pinned link");
        } else {
            let link = program.attach_new(hook, ifname)?;
            link.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?;
            info!(interface = ifname, ifindex = index, hook = hook.name(), "attached");
        }
        self.current.insert(slot, index);
        Ok(())
    }

    /// Removes the XDP link of `ifname`, if any (acceleration turned off).
    pub fn remove_xdp(&mut self, ifname: &str) {
        let Some(index) = ifindex(ifname) else { return };
        let pin = self.dir.join(pin_name(Hook::XdpFromNetdev, ifname, index));
        if std::fs::remove_file(&pin).is_ok() {
            info!(interface = ifname, "removed XDP link");
        }
        self.current.remove(&(Hook::XdpFromNetdev, ifname.to_owned()));
    }

    /// Removes the pins of links whose interface is gone or is not a local
    /// pod's any more; the kernel detaches a link when its last pin goes.
    pub fn prune(&mut self, keep: &BTreeSet<(String, u32)>) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let parsed = parse_pin_name(&name);
            let stale = match &parsed {
                Some((_, index, ifname)) => {
                    !keep.contains(&(ifname.clone(), *index)) || ifindex(ifname) != Some(*index)
                }
                None => true,
            };
            if !stale {
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => info!(pin = %name, "removed stale link"),
                Err(err) => warn!(pin = %name, error = %err, "cannot remove stale link"),
            }
            if let Some((hook, _, ifname)) = parsed {
                self.current.remove(&(hook, ifname));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        let name = pin_name(Hook::ToPod, "lxc-ab.1", 42);
        assert_eq!(parse_pin_name(&name), Some((Hook::ToPod, 42, "lxc-ab.1".to_owned())));
        assert_eq!(parse_pin_name("from-pod-2-lxc"), None, "foreign pins are not ours to parse");
    }
}
