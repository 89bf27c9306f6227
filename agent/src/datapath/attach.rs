//! Attaching the from-pod program to pod interfaces with tcx links pinned
//! under `<root>/links/`. A pinned link outlives the agent: the datapath
//! keeps running while the agent is stopped, and a restarted agent takes the
//! link back and swaps in its own program atomically (BPF_LINK_UPDATE).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::programs::{
    SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
};
use tracing::{info, warn};

/// Interface index by name in the current network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

pub struct Attachments {
    dir: PathBuf,
    /// Interfaces this agent has attached to (or adopted) since it started.
    current: BTreeMap<String, u32>,
}

fn pin_name(ifname: &str, ifindex: u32) -> String {
    format!("from-pod-{ifindex}-{ifname}")
}

/// `(ifindex, ifname)` from a pin name.
fn parse_pin_name(name: &str) -> Option<(u32, String)> {
    let rest = name.strip_prefix("from-pod-")?;
    let (index, ifname) = rest.split_once('-')?;
    Some((index.parse().ok()?, ifname.to_owned()))
}

impl Attachments {
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        let dir = root.join("links");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir,
            current: BTreeMap::new(),
        })
    }

    /// Makes sure `program` runs at tcx ingress of `ifname`.
    pub fn ensure(&mut self, program: &mut SchedClassifier, ifname: &str) -> anyhow::Result<()> {
        let index = ifindex(ifname).with_context(|| format!("interface {ifname} not found"))?;
        if self.current.get(ifname) == Some(&index) {
            return Ok(());
        }
        let pin = self.dir.join(pin_name(ifname, index));
        if pin.exists() {
            // Left by an earlier run: take it over without a gap.
            let link =
                PinnedLink::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
            let link = SchedClassifierLink::try_from(FdLink::from(link))
                .context("pinned link is not a tcx link")?;
            let id = program
                .attach_to_link(link)
                .context("updating the pinned link")?;
            // The pin keeps the link; dropping our handle must not detach it.
            drop(program.take_link(id)?);
            info!(interface = ifname, "adopted pinned link");
        } else {
            let id = program
                .attach(ifname, TcAttachType::Ingress)
                .with_context(|| format!("attaching to {ifname}"))?;
            let link = FdLink::try_from(program.take_link(id)?).context("tcx link expected")?;
            link.pin(&pin)
                .with_context(|| format!("pinning {}", pin.display()))?;
            info!(interface = ifname, ifindex = index, "attached");
        }
        self.current.insert(ifname.to_owned(), index);
        Ok(())
    }

    /// Removes the pins of links whose interface is gone or is not a local
    /// pod's any more; the kernel detaches a link when its last pin goes.
    pub fn prune(&mut self, keep: &BTreeMap<String, u32>) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = match parse_pin_name(&name) {
                Some((index, ifname)) => {
                    keep.get(&ifname) != Some(&index) || ifindex(&ifname) != Some(index)
                }
                None => true,
            };
            if stale {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => info!(pin = %name, "removed stale link"),
                    Err(err) => warn!(pin = %name, error = %err, "cannot remove stale link"),
                }
                if let Some((_, ifname)) = parse_pin_name(&name) {
                    self.current.remove(&ifname);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pin_names_round_trip() {
        let name = super::pin_name("lxc-ab-1", 42);
        assert_eq!(
            super::parse_pin_name(&name),
            Some((42, "lxc-ab-1".to_owned()))
        );
    }
}
