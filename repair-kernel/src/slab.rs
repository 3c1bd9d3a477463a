//! The slab allocator's own code as the place of an oops (mm/slub.c).
//!
//! A use-after-free or an overflow that writes into a free slab object
//! overwrites the freelist pointer stored in it. The writer goes on (LKDTM's
//! WRITE_AFTER_FREE exits 0); the allocation that later follows that
//! pointer faults inside the allocator, in whichever task allocates from
//! that cache next. Killing that task cannot repair the heap: it did
//! nothing wrong, and the next allocation from the cache would fault again.
//! So an oops whose faulting RIP is inside the allocator's code declines the
//! kill ([`Reason::DeclineSlabCorrupt`]), and the panic goes on as it would
//! have without us (or a checkpoint rollback undoes the corruption).
//!
//! "Inside the allocator" is decided by what the vmlinux has: the code
//! ranges of the compile unit `mm/slub.c` from its DWARF, carried in the
//! layout ([`Item::SlubCode0Start`] ...), never by a version number. A
//! BTF-only image has no compile units: the verdict then says the check
//! could not be made. Any fault in that code counts, whatever its cause:
//! the allocator dereferences its own metadata and the pointers callers
//! hand it (`kfree` of a wild pointer faults there too), and in both cases
//! the heap's state is no longer known. The one exception is a `BUG()` of
//! the allocator itself (`ud2` at the faulting RIP): a check that caught a
//! bad call before it changed anything (LKDTM's SLAB_FREE_DOUBLE on a
//! hardened freelist); the caller is the culprit and is killed, as the
//! kernel does without `panic_on_oops`.
//!
//! The oops's registers are the `pt_regs` the exception entry pushed on the
//! task's stack and gave `oops_end`; at `panic`'s entry they are further up
//! the same stack. [`oops_regs`] finds the nearest frame above `rsp` that
//! the CPU itself could have pushed for a kernel-mode exception.

use core::fmt::Write;

use crate::contract::{Action, CpuState};
use crate::fmtbuf::FmtBuf;
use crate::kmem::Kernel;
use crate::layout::Item;
use crate::mem::{Gva, LinkAddr, PhysMem};
use crate::panic::THREAD_SIZE;
use crate::verdict::{Reason, Verdict};

/// `__KERNEL_CS`: the code segment of a fault in kernel mode.
pub const KERNEL_CS: u64 = 0x10;
/// `__KERNEL_DS`: a kernel stack segment (a null selector is the other).
pub const KERNEL_DS: u64 = 0x18;
/// `ud2`, the instruction of `BUG()`: the allocator's own check fired.
pub const UD2: [u8; 2] = [0x0f, 0x0b];
/// RFLAGS bit 1 is always set; bits 22 and up are always clear.
const RFLAGS_FIXED_ONE: u64 = 1 << 1;
const RFLAGS_RESERVED_HIGH: u64 = !((1 << 22) - 1);
/// Most stack words looked at for the frame (one whole stack).
pub const MAX_SCAN_WORDS: u64 = THREAD_SIZE / 8;

/// The allocator's code ranges in the layout, `(start, end)` link-time.
const RANGES: [(Item, Item); 4] = [
    (Item::SlubCode0Start, Item::SlubCode0End),
    (Item::SlubCode1Start, Item::SlubCode1End),
    (Item::SlubCode2Start, Item::SlubCode2End),
    (Item::SlubCode3Start, Item::SlubCode3End),
];

/// Where the oops behind a panic faulted, with respect to the allocator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocatorCheck {
    /// The panic is not the oops path's (`oops_end`): no faulting frame.
    NotAnOops,
    /// No exception frame found on the stack above the panic's.
    NoFrame,
    /// The image has no code ranges of `mm/slub.c` (a BTF-only image).
    NoRanges { rip: Gva },
    /// The oops faulted outside the allocator.
    Outside { rip: Gva },
    /// The oops faulted inside the allocator's code, frame at `regs`.
    Inside { rip: Gva, regs: Gva },
    /// A `BUG()` of the allocator itself fired (`ud2` at `rip`): a check
    /// that caught a bad call (the naive double-free detection of
    /// `set_freepointer`) before it changed the heap; the caller is the
    /// culprit, and the oops kills it without `panic_on_oops`.
    OwnCheck { rip: Gva },
}

/// The exception frame (`struct pt_regs`) of a kernel-mode fault nearest
/// above `rsp`, below `stack_top` (or within one stack's worth of words):
/// `cs` is `__KERNEL_CS`, `flags` a possible RFLAGS, `ss` (pushed right
/// above `sp`) a kernel stack selector (0 or `__KERNEL_DS`), and the
/// interrupted `sp` is where the CPU's push started (the frame's end,
/// aligned down to 16 bytes). `ip` may be anything: an oops executing data
/// or user memory faults there. Returns the frame's address and `ip`.
/// Bounded by [`MAX_SCAN_WORDS`]; stops at an unreadable word.
pub fn oops_regs<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, rsp: Gva, stack_top: Option<Gva>) -> Option<(Gva, Gva)> {
    let size = k.opt(Item::PtRegsSize)?;
    let (ip_off, cs_off, fl_off, sp_off) =
        (k.opt(Item::PtRegsIp)?, k.opt(Item::PtRegsCs)?, k.opt(Item::PtRegsFlags)?, k.opt(Item::PtRegsSp)?);
    let ss_off = sp_off.saturating_add(8);
    if size == 0 || size > 4096 || [ip_off, cs_off, fl_off, ss_off].iter().any(|&o| o.saturating_add(8) > size) {
        return None;
    }
    let mut a = rsp.0 & !7;
    for _ in 0..MAX_SCAN_WORDS {
        let end = a.checked_add(size)?;
        if stack_top.is_some_and(|top| end > top.0) {
            return None;
        }
        let word = |off: u64| k.read_u64(Gva(a.wrapping_add(off)));
        // The cs slot first: unreadable ends the scan, a mismatch moves on.
        let cs = word(cs_off).ok()?;
        if cs == KERNEL_CS {
            let (ip, fl, sp, ss) = (word(ip_off).ok()?, word(fl_off).ok()?, word(sp_off).ok()?, word(ss_off).ok()?);
            let plausible_flags = fl & RFLAGS_FIXED_ONE != 0 && fl & RFLAGS_RESERVED_HIGH == 0;
            if plausible_flags && sp & !15 == end && (ss == 0 || ss == KERNEL_DS) {
                return Some((Gva(a), Gva(ip)));
            }
        }
        a = a.checked_add(8)?;
    }
    None
}

/// True when run-time address `rip` is in one of the allocator's code
/// ranges; `None` when the layout has none.
pub fn in_allocator<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, rip: Gva) -> Option<bool> {
    let mut any = false;
    for (s, e) in RANGES {
        let (Some(s), Some(e)) = (k.opt(s), k.opt(e)) else { continue };
        any = true;
        let (s, e) = (k.link(LinkAddr(s)), k.link(LinkAddr(e)));
        if s <= rip && rip < e {
            return Some(true);
        }
    }
    any.then_some(false)
}

/// Where the oops behind this panic faulted. `regs` are the registers at
/// the trap (at `panic`'s entry), `stack_top` the top of the current
/// task's stack when `rsp` is on it.
pub fn check<M: PhysMem + ?Sized>(
    k: &Kernel<'_, M>,
    from_oops_end: bool,
    regs: &CpuState,
    stack_top: Option<Gva>,
) -> AllocatorCheck {
    if !from_oops_end {
        return AllocatorCheck::NotAnOops;
    }
    let Some((frame, rip)) = oops_regs(k, Gva(regs.rsp), stack_top) else {
        return AllocatorCheck::NoFrame;
    };
    match in_allocator(k, rip) {
        None => AllocatorCheck::NoRanges { rip },
        Some(false) => AllocatorCheck::Outside { rip },
        Some(true) => {
            let mut insn = [0u8; 2];
            if k.read(rip, &mut insn).is_ok() && insn == UD2 {
                AllocatorCheck::OwnCheck { rip }
            } else {
                AllocatorCheck::Inside { rip, regs: frame }
            }
        }
    }
}

/// Applies the check to a verdict: a kill of a task whose oops faulted in
/// the allocator becomes a decline, its explanation rewritten in `why`; a
/// kill the check could not be made for says so. Declines, and kills the
/// check clears, are left as they are. `pid` and `comm` name the task the
/// kill was for.
pub fn apply(check: AllocatorCheck, v: Verdict, pid: i32, comm: &str, why: &mut FmtBuf<'_>) -> Verdict {
    if v.action != Action::Kill {
        return v;
    }
    match check {
        AllocatorCheck::Inside { rip, .. } => {
            // The contract's reason holds 256 bytes: this fits with any comm.
            why.clear();
            let _ = write!(
                why,
                "the oops faulted at rip {:#x} inside the slab allocator (mm/slub.c): the heap is corrupt; killing \
                 pid {pid} ({comm}) cannot repair it and the next allocation would fault again; letting the panic complete",
                rip.0
            );
            Verdict { action: Action::Decline, reason: Reason::DeclineSlabCorrupt, resume: CpuState::default() }
        }
        AllocatorCheck::NoRanges { .. } => {
            let _ = write!(why, "; slab allocator check not made (image lacks mm/slub.c ranges, e.g. BTF-only)");
            v
        }
        AllocatorCheck::NoFrame => {
            let _ = write!(why, "; slab allocator check not made (no exception frame found)");
            v
        }
        AllocatorCheck::OwnCheck { .. } => {
            let _ = write!(why, "; a BUG() check in mm/slub.c caught the bad call");
            v
        }
        AllocatorCheck::NotAnOops | AllocatorCheck::Outside { .. } => v,
    }
}
