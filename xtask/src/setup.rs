//! `cargo xtask setup`: installs what a bare machine lacks to build and test
//! Weir, following ../shared/TOOLCHAIN.md. Every step checks first and does
//! nothing when its part is already in place, so running it again is cheap;
//! `build`, `test` and `demo` run it implicitly.

use std::fs;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd;

/// Debian packages the tests and the demo use (`ip`, `iptables`, `nft`,
/// `bpftool`, `ping`).
const DEBIAN_PACKAGES: &[&str] = &["iproute2", "iptables", "nftables", "bpftool", "iputils-ping"];

/// The bpf-linker release line that works with our pinned aya and with
/// nightly's LLVM 22 (TOOLCHAIN.md, section 2).
const BPF_LINKER_VERSION: &str = "0.13";

/// How much `setup` says about steps that had nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// One line per step (`cargo xtask setup`).
    Normal,
    /// Only steps that install something print (implicit setup).
    Quiet,
}

/// What a step did.
enum Outcome {
    AlreadyInPlace,
    Installed,
}

/// Runs every step in order, printing one line per step.
pub fn run(verbosity: Verbosity) -> Result<()> {
    step("Debian packages", verbosity, debian_packages)?;
    step("nightly rust-src", verbosity, nightly_rust_src)?;
    step(&format!("bpf-linker {BPF_LINKER_VERSION}"), verbosity, bpf_linker)?;
    Ok(())
}

fn step(thing: &str, verbosity: Verbosity, f: impl FnOnce() -> Result<Outcome>) -> Result<()> {
    match f().with_context(|| format!("setup of {thing} failed"))? {
        Outcome::AlreadyInPlace => {
            if verbosity == Verbosity::Normal {
                println!("{thing}: already in place");
            }
        }
        Outcome::Installed => println!("{thing}: installed"),
    }
    Ok(())
}

/// (a) `apt-get install` the packages that `dpkg-query` does not report as
/// installed, after one `apt-get update`.
fn debian_packages() -> Result<Outcome> {
    let mut missing = Vec::new();
    for &package in DEBIAN_PACKAGES {
        let out = cmd::probe(cmd::new("dpkg-query").args(["-W", "-f=${Status}", package]))
            .context("dpkg-query is needed (this setup expects Debian 12)")?;
        if !String::from_utf8_lossy(&out.stdout).contains("install ok installed") {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(Outcome::AlreadyInPlace);
    }
    if !cmd::is_root() {
        bail!(
            "missing Debian packages ({}); installing them needs root: \
             run `cargo xtask setup` as root",
            missing.join(", ")
        );
    }
    cmd::run(cmd::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
    cmd::run(
        cmd::new("apt-get").args(["install", "-y"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(Outcome::Installed)
}

/// (b) nightly's `rust-src`, for `-Z build-std=core`.
fn nightly_rust_src() -> Result<Outcome> {
    let installed = cmd::stdout(cmd::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("cannot list nightly's components; is the nightly toolchain installed (`rustup toolchain install nightly`)?")?;
    // Lines look like `rust-src` (target-independent) or `rustc-x86_64-…`.
    if installed.lines().any(|l| l.trim() == "rust-src") {
        return Ok(Outcome::AlreadyInPlace);
    }
    cmd::run(cmd::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    Ok(Outcome::Installed)
}

/// (c) bpf-linker 0.13, dynamically linked against the nightly toolchain's
/// own libLLVM through a prefix of links (no LLVM 22 package exists here).
/// It counts as in place only when `bpf-linker --version` runs and prints
/// 0.13.x: a nightly update removes the libLLVM the binary was linked with,
/// and then it no longer starts and is rebuilt.
fn bpf_linker() -> Result<Outcome> {
    if bpf_linker_works()? {
        return Ok(Outcome::AlreadyInPlace);
    }
    let prefix = llvm_prefix()?;
    make_llvm_prefix(&prefix)?;
    cmd::run(
        crate::cargo::cargo()
            .args(["install", "bpf-linker", "--version"])
            .arg(format!("~{BPF_LINKER_VERSION}"))
            // --force: a same-version binary that no longer runs must be replaced.
            .args(["--force", "--locked", "--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", &prefix),
    )?;
    ensure!(
        bpf_linker_works()?,
        "bpf-linker was installed but `bpf-linker --version` still does not print {BPF_LINKER_VERSION}.x; \
         is {} on PATH?",
        cmd::cargo_bin_dir().map_or_else(|| "cargo's bin directory".to_owned(), |d| d.display().to_string())
    );
    Ok(Outcome::Installed)
}

fn bpf_linker_works() -> Result<bool> {
    let Ok(out) = cmd::new("bpf-linker").arg("--version").output() else {
        return Ok(false); // not installed (or not executable)
    };
    let version = String::from_utf8_lossy(&out.stdout);
    Ok(out.status.success() && version.trim().starts_with(&format!("bpf-linker {BPF_LINKER_VERSION}.")))
}

/// `$HOME/.cache/weir/llvm-prefix`: a lasting place, since the installed
/// bpf-linker loads libLLVM through it (rpath).
fn llvm_prefix() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("$HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/weir/llvm-prefix"))
}

/// (Re)creates the prefix bpf-linker's build script looks at: a do-nothing
/// `bin/llvm-config` (it only checks that the file exists) and
/// `lib/libLLVM.so` plus `lib/libLLVM.so.<version>` linking to nightly's
/// libLLVM.
fn make_llvm_prefix(prefix: &Path) -> Result<()> {
    let sysroot = cmd::stdout(cmd::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .context("cannot find the nightly toolchain's sysroot")?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let mut libs = Vec::new();
    for entry in fs::read_dir(&lib_dir).with_context(|| format!("cannot read {}", lib_dir.display()))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("libLLVM.so.") {
            libs.push(entry.path());
        }
    }
    let [so] = libs.as_slice() else {
        bail!("expected exactly one libLLVM.so.* in {}, found {libs:?}", lib_dir.display());
    };
    let so_name = so.file_name().context("libLLVM path has no file name")?;

    if prefix.exists() {
        fs::remove_dir_all(prefix).with_context(|| format!("cannot remove {}", prefix.display()))?;
    }
    let bin = prefix.join("bin");
    let lib = prefix.join("lib");
    for dir in [&bin, &lib] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let llvm_config = bin.join("llvm-config");
    fs::write(&llvm_config, "#!/bin/sh\nexit 0\n")
        .with_context(|| format!("cannot write {}", llvm_config.display()))?;
    fs::set_permissions(&llvm_config, fs::Permissions::from_mode(0o755))?;
    for link in [lib.join("libLLVM.so"), lib.join(so_name)] {
        symlink(so, &link).with_context(|| format!("cannot link {} to {}", link.display(), so.display()))?;
    }
    eprintln!("llvm prefix {} -> {}", prefix.display(), so.display());
    Ok(())
}
