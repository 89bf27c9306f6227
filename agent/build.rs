//! Builds the eBPF programs (ebpf/programs) for the BPF target with nightly
//! and bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! `cargo xtask setup` installs what this needs on a bare machine.

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let root_dir = format!("{manifest_dir}/../ebpf/programs");
    println!("cargo:rerun-if-changed={root_dir}/src");
    println!("cargo:rerun-if-changed={manifest_dir}/../ebpf/abi/src");
    aya_build::build_ebpf(
        [Package { name: "weir-ebpf", root_dir: &root_dir, ..Default::default() }],
        Toolchain::default(),
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` to install nightly rust-src and bpf-linker")
}
