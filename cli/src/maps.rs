//! Opening the agent's pinned maps read-only-in-spirit: the CLI never writes.

use std::path::Path;

use anyhow::{Context as _, bail};
use aya::maps::{Map, MapData, MapError};

/// Opens the pinned map `name` under `root` as a typed map.
pub fn open<T>(root: &Path, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = root.join(name);
    if !path.exists() {
        bail!(
            "no pinned map {} (is weir-agent running, or did it run, with --bpffs-root {}?)",
            path.display(),
            root.display()
        );
    }
    let data = MapData::from_pin(&path).map_err(|err| {
        let denied = matches!(&err, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::EPERM) || e.io_error.raw_os_error() == Some(libc::EACCES));
        if denied {
            anyhow::anyhow!("opening {}: permission denied (reading BPF maps needs root or CAP_BPF)", path.display())
        } else {
            anyhow::Error::new(err).context(format!("opening {}", path.display()))
        }
    })?;
    let map = Map::from_map_data(data).with_context(|| format!("reading {}", path.display()))?;
    T::try_from(map).with_context(|| format!("{} has an unexpected type", path.display()))
}
