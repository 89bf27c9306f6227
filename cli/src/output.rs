//! Output formats shared by all commands.

use serde::Serialize;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Serialize, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub address: std::net::Ipv4Addr,
    pub port: u16,
}

impl Endpoint {
    pub fn from_be(address_be: u32, port_be: u16) -> Self {
        Self { address: address_be.to_ne_bytes().into(), port: u16::from_be(port_be) }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.address, self.port)
    }
}

pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
