//! Descriptor tables: the guest's GDTR and IDTR are saved at entry and
//! restored before completion; in between, ours are loaded.
//!
//! Our GDT has Linux's selector layout (0x10 = 64-bit kernel code, 0x18 =
//! kernel data), so the CS the guest was running with stays valid and no
//! segment register is ever reloaded. Our IDT sends vectors 0-31 to stubs
//! that end the run with a "faulted at X" result.

use core::arch::asm;
use core::cell::UnsafeCell;

/// Operand of `lgdt`/`lidt`/`sgdt`/`sidt`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TablePointer {
    pub limit: u16,
    pub base: u64,
}

/// A gate of the 64-bit IDT.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

/// Linux's `__KERNEL_CS`.
const KERNEL_CS: u16 = 0x10;
/// Present, DPL 0, 64-bit interrupt gate (IF stays 0 in the handler).
const INTERRUPT_GATE: u8 = 0x8e;

/// Linux's GDT layout (arch/x86/include/asm/segment.h, 64-bit). Accessed bits
/// are preset so the CPU never writes to the table.
const GDT_INIT: [u64; 16] = [
    0,
    0x00cf_9b00_0000_ffff, // 0x08 KERNEL32_CS
    0x00af_9b00_0000_ffff, // 0x10 KERNEL_CS
    0x00cf_9300_0000_ffff, // 0x18 KERNEL_DS
    0x00cf_fb00_0000_ffff, // 0x23 USER32_CS
    0x00cf_f300_0000_ffff, // 0x2b USER_DS
    0x00af_fb00_0000_ffff, // 0x33 USER_CS
    0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// A mutable static for a single CPU running with interrupts off.
pub struct Global<T>(UnsafeCell<T>);
// SAFETY: the repair kernel runs on one CPU with IF = 0 and no threads; the
// only re-entry is an exception stub, which reads but never races a write
// in progress to the same `Global` (each is written once, at entry).
unsafe impl<T> Sync for Global<T> {}
impl<T> Global<T> {
    pub const fn new(v: T) -> Self {
        Self(UnsafeCell::new(v))
    }
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

static GDT: Global<[u64; 16]> = Global::new(GDT_INIT);
static IDT: Global<[Gate; 32]> = Global::new([Gate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
}; 32]);
static GUEST_GDTR: Global<TablePointer> = Global::new(TablePointer { limit: 0, base: 0 });
static GUEST_IDTR: Global<TablePointer> = Global::new(TablePointer { limit: 0, base: 0 });
static SAVED: Global<bool> = Global::new(false);

/// Saves the guest's GDTR and IDTR, then loads ours. Called once, at entry.
pub fn save_guest_and_load_own() {
    // SAFETY: `sgdt`/`sidt` store 10 bytes into the `TablePointer` statics,
    // which are exactly 10 bytes (packed) and only touched here and in
    // `restore_guest`.
    unsafe {
        asm!("sgdt [{}]", in(reg) GUEST_GDTR.get(), options(nostack, preserves_flags));
        asm!("sidt [{}]", in(reg) GUEST_IDTR.get(), options(nostack, preserves_flags));
        *SAVED.get() = true;
    }

    // SAFETY: no exception can be taken while the IDT is being filled (IF =
    // 0 and the writes are to our own mapped .bss), and no reference to it
    // exists elsewhere.
    let idt = unsafe { &mut *IDT.get() };
    for (vector, gate) in idt.iter_mut().enumerate() {
        let addr = super::entry::fault_stub(vector);
        *gate = Gate {
            offset_low: addr as u16,
            selector: KERNEL_CS,
            ist: 0,
            type_attr: INTERRUPT_GATE,
            offset_mid: (addr >> 16) as u16,
            offset_high: (addr >> 32) as u32,
            reserved: 0,
        };
    }
    let gdtr = TablePointer { limit: (16 * 8 - 1) as u16, base: GDT.get() as u64 };
    let idtr = TablePointer { limit: (32 * 16 - 1) as u16, base: IDT.get() as u64 };
    // SAFETY: both tables are statics of this image, mapped for its whole
    // run, and well formed. Loading a GDT changes no segment register; the
    // selectors in use (CS 0x10) have the same meaning in ours.
    unsafe {
        asm!("lgdt [{}]", in(reg) &gdtr, options(readonly, nostack, preserves_flags));
        asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags));
    }
}

/// Puts the guest's GDTR and IDTR back (if they were saved).
pub fn restore_guest() {
    // SAFETY: the statics hold what `sgdt`/`sidt` stored at entry; loading
    // them restores the guest's exact table registers. Nothing after this
    // point may fault (an exception would go through the guest's IDT).
    unsafe {
        if *SAVED.get() {
            asm!("lgdt [{}]", in(reg) GUEST_GDTR.get(), options(readonly, nostack, preserves_flags));
            asm!("lidt [{}]", in(reg) GUEST_IDTR.get(), options(readonly, nostack, preserves_flags));
        }
    }
}
