//! Service load balancing: what the maps should hold (`translate`) and how to
//! get them there with the fewest writes (`sync`).

pub mod maglev;
pub mod sync;
pub mod translate;

use std::net::Ipv4Addr;

/// A frontend: one (address, port, protocol) in one lookup scope
/// (`weir_abi::lb::SCOPE_*`: external, or the in-cluster twin of an
/// `externalTrafficPolicy: Local` address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// A backend: one (endpoint IP, target port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub address: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.address, self.port, weir_abi::proto::name(self.proto))?;
        if self.scope == weir_abi::lb::SCOPE_INTERNAL {
            write!(f, " (internal)")?;
        }
        Ok(())
    }
}

impl std::fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.address, self.port, weir_abi::proto::name(self.proto))
    }
}
