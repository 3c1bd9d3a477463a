//! x86_64: the only places of the repair kernel that touch the CPU directly.
//! Each `unsafe` block here is small and says what it relies on.

pub mod entry;
pub mod tables;

use core::arch::asm;

/// Reads CR2 (the faulting address of the last page fault).
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effect; we run at CPL 0.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Copies `len` bytes from address `src` to address `dst` with `rep movsb`.
///
/// Addresses are plain integers rather than pointers so that guest-physical
/// address 0 (a valid page of RAM) is no special case for the compiler.
///
/// # Safety
/// Both ranges must be mapped (readable, resp. writable) in the current page
/// tables, and `dst` must not overlap memory the caller holds references to.
pub unsafe fn copy_bytes(src: u64, dst: u64, len: usize) {
    // SAFETY: the caller guarantees both ranges are mapped and that writing
    // `dst` breaks no Rust aliasing rule; DF is clear (cleared at entry and
    // never set), so `rep movsb` copies forwards.
    unsafe {
        asm!(
            "rep movsb",
            inout("rsi") src => _,
            inout("rdi") dst => _,
            inout("rcx") len => _,
            options(nostack, preserves_flags)
        )
    };
}
