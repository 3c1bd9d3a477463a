//! The repair kernel's entry, its exception stubs and its completion point.
//!
//! ABI (what the loader provides, see `builder/DESIGN.md`):
//! - `rip = _start`, `rsp = __repair_stack_top` (16-byte aligned),
//!   `rdi` = virtual address of the [`Contract`](repair_kernel::contract::Contract),
//!   `rsi` = virtual address of the staged integrity table, or 0,
//! - IF = 0, CPL 0, long mode, CS = 0x10 (Linux's `__KERNEL_CS`),
//! - CR3 = the loader's page tables: guest RAM identity-mapped in PML4 slot 0
//!   and this image's window at its link base.
//!
//! Completion: `out 0x501, al` (al = the run status; a `KVM_EXIT_IO` for the
//! KVM backend, ignored by QEMU) and then `repair_done`, a `hlt` loop where
//! the gdbstub backend sets its breakpoint.

use core::arch::global_asm;

global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
    .type _start, @function
_start:
    cld
    xor ebp, ebp
    and rsp, -16
    call {start}
    ud2

    .section .text.repair_done, "ax"
    // rdi = run status byte. The guest's GDTR and IDTR are already back.
    .global repair_finish
    .type repair_finish, @function
repair_finish:
    mov eax, edi
    mov edx, 0x501
    out dx, al
    .global repair_done
    .type repair_done, @function
repair_done:
    hlt
    jmp repair_done

    // One 16-byte stub per CPU exception vector 0-31, in vector order:
    // `tables::load_own` points IDT entry N at repair_fault_stubs + 16 * N.
    // Each leaves [vector, error code, rip, cs, rflags, rsp, ss] on the stack.
    .macro repair_fault_stub vector, has_error
    .balign 16
    .if \has_error == 0
    push 0
    .endif
    push \vector
    jmp repair_fault_common
    .endm

    .section .text.faults, "ax"
    .balign 16
    .global repair_fault_stubs
repair_fault_stubs:
    repair_fault_stub 0, 0
    repair_fault_stub 1, 0
    repair_fault_stub 2, 0
    repair_fault_stub 3, 0
    repair_fault_stub 4, 0
    repair_fault_stub 5, 0
    repair_fault_stub 6, 0
    repair_fault_stub 7, 0
    repair_fault_stub 8, 1
    repair_fault_stub 9, 0
    repair_fault_stub 10, 1
    repair_fault_stub 11, 1
    repair_fault_stub 12, 1
    repair_fault_stub 13, 1
    repair_fault_stub 14, 1
    repair_fault_stub 15, 0
    repair_fault_stub 16, 0
    repair_fault_stub 17, 1
    repair_fault_stub 18, 0
    repair_fault_stub 19, 0
    repair_fault_stub 20, 0
    repair_fault_stub 21, 1
    repair_fault_stub 22, 0
    repair_fault_stub 23, 0
    repair_fault_stub 24, 0
    repair_fault_stub 25, 0
    repair_fault_stub 26, 0
    repair_fault_stub 27, 0
    repair_fault_stub 28, 0
    repair_fault_stub 29, 1
    repair_fault_stub 30, 1
    repair_fault_stub 31, 0
    .balign 16
    .global repair_fault_stubs_end
repair_fault_stubs_end:

repair_fault_common:
    cld
    mov rdi, rsp
    and rsp, -16
    call {fault}
    ud2
"#,
    start = sym crate::rust_start,
    fault = sym crate::fault_entry,
);

/// The frame the exception stubs leave on the stack.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FaultFrame {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

extern "C" {
    /// Start of the 32 exception stubs (16 bytes each).
    static repair_fault_stubs: u8;
    /// End of the stubs: `repair_fault_stubs + 32 * 16`.
    static repair_fault_stubs_end: u8;
    /// Takes the run status in `dil`, signals completion, halts forever.
    fn repair_finish(status: u32) -> !;
}

/// Address of exception vector `vector`'s stub.
pub fn fault_stub(vector: usize) -> u64 {
    let base = core::ptr::addr_of!(repair_fault_stubs) as u64;
    let end = core::ptr::addr_of!(repair_fault_stubs_end) as u64;
    debug_assert_eq!(end - base, 32 * 16);
    let _ = end;
    base + 16 * vector as u64
}

/// Restores the guest's descriptor tables, signals completion and halts.
pub fn finish(status: u32) -> ! {
    super::tables::restore_guest();
    // SAFETY: `repair_finish` only does port output and halts; it needs no
    // stack and never returns.
    unsafe { repair_finish(status) }
}
