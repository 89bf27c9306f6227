use which::which;

/// Building this crate has an undeclared dependency on the `bpf-linker`
/// binary: rebuild when it changes (aya-template does the same).
fn main() {
    let bpf_linker = which("bpf-linker").unwrap_or_default();
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
