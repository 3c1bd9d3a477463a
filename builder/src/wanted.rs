//! What to extract from a vmlinux for the repair kernel: every entry of its
//! layout table, [`ITEMS`], the one list of what it needs.
//!
//! This file depends on `repair_kernel` and `symbols` only, so that the
//! `symbols` crate's own tests and its `profile` example (which cannot depend
//! on the builder) include it by path and extract exactly what the builder
//! does.

use repair_kernel::layout::{Kind, ITEMS};
use symbols::WantedList;

/// Symbols the host side reads from the profile, beyond the repair
/// kernel's table: the ORC unwind tables (the loader's backtraces walk them
/// as the kernel's own unwinder does). Optional.
pub const HOST_SYMBOLS: [&str; 3] = ["__start_orc_unwind_ip", "__stop_orc_unwind_ip", "__start_orc_unwind"];

/// Every [`ITEMS`] entry as a name to extract, the optional ones marked so
/// (they are recorded when present, never reported missing), and the
/// [`HOST_SYMBOLS`].
pub fn wanted() -> WantedList {
    let mut w = WantedList::default();
    for s in HOST_SYMBOLS {
        w.symbol(s, true);
    }
    for spec in ITEMS {
        let optional = !spec.required;
        match spec.kind {
            Kind::Symbol | Kind::SymbolSize | Kind::ThreadFlagBit => w.symbol(spec.ty, optional),
            Kind::PerCpu => w.percpu(spec.ty, optional),
            Kind::Size | Kind::Offset | Kind::MemberSize => w.member(spec.ty, spec.member, optional),
            // Read from the vmlinux's call-frame information by the builder.
            Kind::CallFrame => continue,
        };
    }
    // Not read by the repair kernel: the builder's own, for the layouts of
    // the run-time patch tables (`skips::TableFormats`).
    w.member("alt_instr", "instrlen", true);
    w.member("paravirt_patch_site", "len", true);
    w
}
