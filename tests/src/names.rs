//! Unique, short names for the things a test creates.
//!
//! Tests run in parallel threads of one binary, and several test binaries may
//! run at once (or leave debris after a crash), so every name carries the
//! process id and a per-process counter. Interface names are limited to 15
//! bytes (IFNAMSIZ - 1), so they use only the counter: they need to be unique
//! inside their node namespace, not on the machine.

use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of everything the integration tests create (namespaces, pins, temp dirs).
pub const TEST_PREFIX: &str = "weir-t";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn next() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// `<prefix><pid>-<n>`, e.g. `weir-t4242-7`: unique on this machine while the
/// process lives.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}-{}", std::process::id(), next())
}

/// A host-side veth name, `lxc<n>`, unique within this process and short
/// enough for IFNAMSIZ whatever the counter reaches.
pub fn host_interface() -> String {
    let name = format!("lxc{}", next());
    debug_assert!(name.len() <= 15, "interface name {name} exceeds IFNAMSIZ");
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_short() {
        let a = unique(TEST_PREFIX);
        let b = unique(TEST_PREFIX);
        assert_ne!(a, b);
        assert!(a.starts_with("weir-t"));
        assert!(host_interface().len() <= 15);
    }
}
