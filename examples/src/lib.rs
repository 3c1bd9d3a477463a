//! Runnable examples; see the `examples/` binaries.
//!
//! - [`kvm_vmm`]: a minimal VMM over `kvm-ioctls` that embeds the repair
//!   through [`loader::kvm::Repairer`] (`cargo run -p examples --example
//!   kvm_vmm -- DUMP IMAGE`).

pub mod kvm_vmm;
