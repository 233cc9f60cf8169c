use which::which;

/// Rebuild the programs when bpf-linker changes: the linker is part of the
/// toolchain that decides what the verifier sees.
fn main() {
    if let Ok(path) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
