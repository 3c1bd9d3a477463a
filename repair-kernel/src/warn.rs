//! A warning that `panic_on_warn` made fatal, taken back to the warning.
//!
//! `__warn` (every `WARN()`), and the KASAN, KFENCE and UBSAN reports, end
//! by calling `check_panic_on_warn(origin)`, which calls `panic` when
//! `panic_on_warn` is set (or `kernel.warn_limit` is reached). Without
//! panic_on_warn the function returns and the reporter finishes: it prints
//! the end marker, taints the kernel, leaves its nbcon emergency section,
//! and its caller goes on, releasing whatever locks it holds. That is the
//! kernel's own survivable path, and the one a kill cannot give: a task
//! killed inside a warning that fired under a spinlock (SLUB's consistency
//! checks warn under the slab's list lock) leaves the lock held forever.
//!
//! So, stopped at the panic's first instruction with `check_panic_on_warn`
//! on the stack, [`warning_return`] unwinds `vpanic`'s entry, `panic`'s
//! frame (when the trap is in `vpanic`) and `check_panic_on_warn`'s frame
//! with the vmlinux's own call-frame rules ([`crate::frame`]), and gives
//! the register state at the return into `check_panic_on_warn`'s caller:
//! the callee-saved registers restored, `rsp` above the return address,
//! every other register as at the trap (dead across a call). Nothing of the
//! panic has run yet at the trap (`vpanic` claims `panic_cpu`, disables
//! interrupts and stops the other CPUs only after its first instruction).
//!
//! Skipped with the return: the rest of `check_panic_on_warn`, which is the
//! `warn_limit` count (`warn_count` is not raised for this warning).

use core::fmt;

use crate::frame::{Frame, FrameRule};
use crate::kmem::Kernel;
use crate::layout::Item;
use crate::mem::{Error, Gva, PhysMem};
use crate::contract::CpuState;

/// Used when the layout lacks `check_panic_on_warn`'s size: the function
/// is a few dozen bytes in every build seen.
pub const CHECK_PANIC_ON_WARN_SIZE_FALLBACK: u64 = 0x80;

/// Why the warning path could not be returned into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WarnError {
    /// The image has no call-frame rule for this step (a BTF-only image, or
    /// a vmlinux whose call-frame information this cannot follow).
    NoRule(Item),
    /// A return address on the way is not where the chain expects it.
    Unexpected(&'static str, u64),
    /// Guest memory on the way could not be read.
    Memory(Error),
}

impl From<Error> for WarnError {
    fn from(e: Error) -> Self {
        WarnError::Memory(e)
    }
}

impl fmt::Display for WarnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WarnError::NoRule(item) => {
                let s = crate::layout::KernelLayout::spec(item);
                write!(f, "the image has no call-frame rule for {} calling {} (built without the vmlinux's .debug_frame, e.g. from BTF)", s.ty, s.member)
            }
            WarnError::Unexpected(what, v) => write!(f, "{what} ({v:#x})"),
            WarnError::Memory(e) => write!(f, "{e}"),
        }
    }
}

/// True when `ret` lies inside `check_panic_on_warn` or its `.cold` part.
pub fn is_in_check_panic_on_warn<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, ret: Gva) -> bool {
    let parts = [
        (Item::SymCheckPanicOnWarn, Item::SymCheckPanicOnWarnSize),
        (Item::SymCheckPanicOnWarnCold, Item::SymCheckPanicOnWarnColdSize),
    ];
    parts.iter().any(|&(sym, size)| {
        let Ok(start) = k.sym(sym) else { return false };
        let size = k.opt(size).unwrap_or(CHECK_PANIC_ON_WARN_SIZE_FALLBACK);
        start < ret && ret.0 <= start.0.saturating_add(size)
    })
}

fn is_in_panic<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, ret: Gva) -> bool {
    let Ok(start) = k.sym(Item::SymPanic) else { return false };
    let size = k.opt(Item::SymPanicSize).unwrap_or(crate::panic::PANIC_WRAPPER_SIZE_FALLBACK);
    start < ret && ret.0 <= start.0.saturating_add(size)
}

fn rule<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, item: Item) -> Result<FrameRule, WarnError> {
    k.opt(item).and_then(FrameRule::unpack).ok_or(WarnError::NoRule(item))
}

/// The state at the return from `check_panic_on_warn` into its caller,
/// `regs` stopped at the panic's first instruction ([`crate::panic::trap_addr`]).
pub fn warning_return<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, regs: &CpuState) -> Result<Frame, WarnError> {
    // Out of the trapped function's entry: nothing is saved yet.
    let mut f = Frame::of(regs).return_from_entry(k)?;
    if crate::panic::at_vpanic(k, regs) && is_in_panic(k, Gva(f.rip)) {
        f = f.unwind(k, &rule(k, Item::FramePanicCallsVpanic)?)?;
    }
    if !is_in_check_panic_on_warn(k, Gva(f.rip)) {
        return Err(WarnError::Unexpected("the panic was not called from check_panic_on_warn", f.rip));
    }
    f = f.unwind(k, &rule(k, Item::FrameWarnCallsPanic)?)?;
    if !k.is_kernel_text(Gva(f.rip)) {
        return Err(WarnError::Unexpected("check_panic_on_warn's return address is not in kernel text", f.rip));
    }
    Ok(f)
}
