//! Links the repair kernel at its fixed virtual base with `link.ld`.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    // The target is static-pie by default; the code stays PIC (the `kernel`
    // code model cannot address 0x80_0000_0000 absolutely) but the link is a
    // plain static executable at the script's fixed addresses, so every
    // absolute pointer is resolved by the linker and no relocation is left.
    println!("cargo:rustc-link-arg-bins=--no-pie");
    println!("cargo:rustc-link-arg-bins=-T{dir}/link.ld");
    println!("cargo:rustc-link-arg-bins=--no-dynamic-linker");
    println!("cargo:rustc-link-arg-bins=-znorelro");
    println!("cargo:rustc-link-arg-bins=--build-id=none");
}
