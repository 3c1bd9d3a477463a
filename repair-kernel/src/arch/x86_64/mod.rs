//! x86_64: paging and register conventions.
pub mod pgtable;

/// RFLAGS.IF: interrupts enabled.
pub const RFLAGS_IF: u64 = 1 << 9;
/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// EFER.NXE: the NX bit of page-table entries is honoured.
pub const EFER_NXE: u64 = 1 << 11;
