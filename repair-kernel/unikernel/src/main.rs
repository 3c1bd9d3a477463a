//! The bare-metal repair kernel. The loader copies it into a crashed guest,
//! points the vCPU at [`_start`](arch::entry) on page tables it built, and
//! lets it run: it reads the loader's input from the contract block, runs
//! [`repair_kernel::run`] over guest RAM, writes the verdict back into the
//! block, and signals completion (port 0x501, then the `repair_done` halt
//! loop). Any CPU exception or panic ends the run with a "faulted" result
//! instead of taking the guest down.
//!
//! Built for `x86_64-unknown-none` (soft-float: it never touches the
//! guest's FPU/SSE state) by `builder/build.rs`.
#![no_std]
#![no_main]

mod arch;
mod integrity;
mod mem;

use arch::entry::{finish, FaultFrame};
use arch::tables::Global;
use core::fmt::Write;
use repair_kernel::contract::{set_field, Action, Contract, ContractOut, RunStatus, VECTOR_PANIC, VECTOR_STACK_OVERFLOW};


/// Byte the stack's canary page is filled with.
const CANARY: u64 = 0x5a5a_5a5a_5a5a_5a5a;

/// The contract block, once validated (null before).
static CONTRACT: Global<*mut Contract> = Global::new(core::ptr::null_mut());
/// Set on the first fault or panic, so a second one ends the run at once.
static FAULTING: Global<bool> = Global::new(false);

extern "C" {
    static __repair_stack_guard: u8;
    static __repair_stack_bottom: u8;
}

/// Called by `_start` with the contract's virtual address (`rdi`) and the
/// integrity table's (`rsi`, 0 for none), as the loader set them.
#[no_mangle]
extern "C" fn rust_start(contract: *mut Contract, integrity_table: u64) -> ! {
    arch::tables::save_guest_and_load_own();
    fill_canary();

    if contract.is_null() || !(contract as usize).is_multiple_of(core::mem::align_of::<Contract>()) {
        finish(RunStatus::NotRun as u32);
    }
    // SAFETY: the loader mapped the block at this address, readable and
    // writable, for the whole run; nothing else references it while we run.
    let c = unsafe { &mut *contract };
    if !c.is_valid() {
        // Not a block of this build: writing into it could corrupt anything.
        finish(RunStatus::NotRun as u32);
    }
    // SAFETY: single CPU, IF = 0: no concurrent access to the static.
    unsafe { *CONTRACT.get() = contract };

    set_status(&mut c.output, RunStatus::Running);
    c.output.cpu = c.input.cpu;
    let mut mem = mem::IdentityMem::new(&c.input);
    integrity::run(&mut mem, integrity_table, &c.input, &mut c.output);

    if !canary_intact() {
        record_fault(
            &mut c.output,
            VECTOR_STACK_OVERFLOW,
            0,
            0,
            0,
            format_args!("repair kernel stack overflow (16 KiB); its result was discarded"),
        );
        finish(RunStatus::Faulted as u32);
    }
    set_status(&mut c.output, RunStatus::Done);
    finish(RunStatus::Done as u32)
}

/// Called by the exception stubs with the frame they built.
#[no_mangle]
extern "C" fn fault_entry(frame: *const FaultFrame) -> ! {
    // SAFETY: the stub passes its own stack pointer, which points at a full
    // `FaultFrame` it and the CPU just pushed.
    let f = unsafe { *frame };
    let cr2 = arch::read_cr2();
    if let Some(out) = begin_fault() {
        record_fault(
            out,
            f.vector,
            f.error_code,
            f.rip,
            cr2,
            format_args!(
                "repair kernel faulted: {} (vector {}, error {:#x}) at rip {:#x}, cr2 {:#x}",
                vector_name(f.vector),
                f.vector,
                f.error_code,
                f.rip,
                cr2
            ),
        );
    }
    finish(RunStatus::Faulted as u32)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    if let Some(out) = begin_fault() {
        let (file, line) = info.location().map_or(("?", 0), |l| (l.file(), l.line()));
        record_fault(
            out,
            VECTOR_PANIC,
            0,
            0,
            0,
            format_args!("repair kernel panicked at {file}:{line}: {}", info.message()),
        );
    }
    finish(RunStatus::Faulted as u32)
}

/// Marks the run as faulting; `None` if it already was (a fault while
/// recording a fault) or if there is no valid contract block to write to.
fn begin_fault() -> Option<&'static mut ContractOut> {
    // SAFETY: single CPU, IF = 0: the statics are not accessed concurrently.
    // The contract pointer, when set, was validated at entry and stays mapped.
    // The run's own `&mut` to the block is abandoned: control never returns
    // to it (every path from here ends in `finish`).
    unsafe {
        if *FAULTING.get() {
            return None;
        }
        *FAULTING.get() = true;
        let c = *CONTRACT.get();
        if c.is_null() {
            return None;
        }
        Some(&mut (*c).output)
    }
}

fn set_status(out: &mut ContractOut, status: RunStatus) {
    // SAFETY: `out` is a valid, exclusive reference; a volatile write keeps
    // the store even though only the host reads it.
    unsafe { core::ptr::write_volatile(&mut out.status, status as u32) };
}

fn record_fault(
    out: &mut ContractOut,
    vector: u64,
    error_code: u64,
    rip: u64,
    cr2: u64,
    reason: core::fmt::Arguments<'_>,
) {
    out.fault.vector = vector;
    out.fault.error_code = error_code;
    out.fault.rip = rip;
    out.fault.cr2 = cr2;
    // A run that faulted decides nothing: leave the guest as it was.
    out.action = Action::Decline as u32;
    let mut w = FieldWriter { buf: [0; 256], len: 0 };
    let _ = w.write_fmt(reason);
    set_field(&mut out.reason, &w.buf[..w.len]);
    set_status(out, RunStatus::Faulted);
}

fn vector_name(v: u64) -> &'static str {
    const NAMES: [&str; 22] = [
        "#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow",
        "#BR bound range", "#UD invalid opcode", "#NM device not available",
        "#DF double fault", "coprocessor segment overrun", "#TS invalid TSS",
        "#NP segment not present", "#SS stack fault", "#GP general protection",
        "#PF page fault", "reserved", "#MF x87 error", "#AC alignment check",
        "#MC machine check", "#XM SIMD error", "#VE virtualization", "#CP control protection",
    ];
    NAMES.get(v as usize).copied().unwrap_or("exception")
}

/// Formats into a fixed buffer, truncating.
struct FieldWriter {
    buf: [u8; 256],
    len: usize,
}

impl Write for FieldWriter {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

fn canary_range() -> (u64, u64) {
    (
        core::ptr::addr_of!(__repair_stack_guard) as u64,
        core::ptr::addr_of!(__repair_stack_bottom) as u64,
    )
}

fn fill_canary() {
    let (lo, hi) = canary_range();
    let mut a = lo;
    while a < hi {
        // SAFETY: [lo, hi) is the canary page of our own .bss, mapped RW and
        // below the stack in use; nothing holds a reference to it.
        unsafe { core::ptr::write_volatile(a as *mut u64, CANARY) };
        a += 8;
    }
}

fn canary_intact() -> bool {
    let (lo, hi) = canary_range();
    let mut a = lo;
    while a < hi {
        // SAFETY: as in `fill_canary`; reading our own mapped page.
        if unsafe { core::ptr::read_volatile(a as *const u64) } != CANARY {
            return false;
        }
        a += 8;
    }
    true
}
