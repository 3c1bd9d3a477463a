//! The repair kernel's brain, as a `#![no_std]` library: walkers over a
//! crashed Linux kernel's memory and the decision of what to do about it.
//!
//! The same code runs in two places: on the host (tests, the loader's
//! read-only `diagnose`) over any [`mem::PhysMem`], and inside the crashed
//! guest as the bare-metal unikernel (`repair-kernel/unikernel`), over the
//! guest's RAM mapped by page tables the loader built.
//!
//! ```no_run
//! use repair_kernel::{contract::{ContractIn, ContractOut}, mem::SliceMem};
//! fn repair(ram: &mut [u8], input: &ContractIn) -> ContractOut {
//!     let mut out = ContractOut::empty();
//!     repair_kernel::run(&mut SliceMem::new(ram), input, &mut out);
//!     out
//! }
//! ```
#![no_std]

pub mod arch;
pub mod contract;
pub mod fmtbuf;
pub mod frame;
pub mod integrity;
pub mod kmem;
pub mod layout;
pub mod mem;
pub mod panic;
pub mod percpu;
pub mod printk;
pub mod slab;
pub mod task;
pub mod verdict;
pub mod warn;

use contract::{set_field, Action, ContractIn, ContractOut, RunStatus};
use fmtbuf::FmtBuf;
use integrity::IntegrityInput;
use kmem::Kernel;
use layout::Item;
use mem::{Clipped, Gva, PhysMem};
use task::TaskInfo;
use verdict::{CrashContext, CrashKind};

pub use arch::x86_64::pgtable::Paging;

/// Runs the repair kernel's walk and decision on the crashed guest: fills
/// every field of `out` (status `Done`). Never panics, and every walk is
/// bounded (the task walk by `input.max_tasks`).
///
/// `input.read_only` is honoured by changing nothing in guest memory; the
/// verdict is still the one that would be taken (`action`, `resume`), and
/// applying it is the loader's choice.
pub fn run<M: PhysMem + ?Sized>(mem: &mut M, input: &ContractIn, out: &mut ContractOut) {
    run_with(mem, input, None, out)
}

/// [`run`], plus the integrity check (and restore, unless read-only) of
/// kernel text and rodata against the image's snapshot.
pub fn run_with<M: PhysMem + ?Sized>(
    mem: &mut M,
    input: &ContractIn,
    integrity: Option<&IntegrityInput<'_>>,
    out: &mut ContractOut,
) {
    *out = ContractOut::empty();
    out.status = RunStatus::Running as u32;
    out.cpu = input.cpu;
    let limit = if input.ram_end == 0 { u64::MAX } else { input.ram_end };
    let mut clipped = Clipped { inner: mem, limit };
    let regs = input.crashed;
    let paging = Paging::from_regs(regs.cr3, regs.cr4);
    let mut k = Kernel::new(&mut clipped, paging, &input.layout, input.kaslr_slide);

    let mut corrupt_pages = 0;
    if let Some(ii) = integrity {
        let read_only = input.read_only != 0;
        let rep = integrity::check_pages(&mut k, ii, !read_only, |m| {
            // Read-only: count what a real run could not restore.
            if !(m.restored || (read_only && m.restorable)) {
                corrupt_pages += 1;
            }
        });
        out.pages_restored = rep.restored;
    }

    let ctx = crash_context(&k, input, out, corrupt_pages);
    out.crash_kind = ctx.kind as u32;
    if let Ok(n) = ctx.task_list {
        out.nr_tasks = n;
    }
    if let Ok(cur) = &ctx.current {
        out.pid = cur.pid;
        out.tgid = cur.tgid;
        out.comm = cur.comm;
    }
    let mut why = [0u8; contract::REASON_LEN];
    let mut w = FmtBuf::new(&mut why);
    let mut v = verdict::decide(&ctx, &mut w);
    v = allocator_check(&k, &ctx, v, &mut w);
    if v.reason == verdict::Reason::WarningResumedKill {
        use core::fmt::Write;
        let done = match (&ctx.current, input.read_only != 0) {
            (_, true) => Ok(()),
            (Ok(cur), false) => task::make_sigkill_pending(&mut k, cur.task),
            (Err(e), false) => Err(*e),
        };
        if let Err(e) = done {
            // The warning still goes on; the task is not killed.
            let _ = write!(w, "; but SIGKILL could not be made pending ({e}): nobody is killed");
            v.reason = verdict::Reason::WarningResumed;
        }
    }
    if v.action == Action::Kill {
        undo_panic_state(&mut k, &ctx, input.read_only != 0, &mut w);
        if !ctx.preempt_count_tracks_locks {
            use core::fmt::Write;
            // Neither preempt_schedule nor __might_resched in the vmlinux.
            let _ = write!(w, "; no CONFIG_PREEMPT_COUNT here: a held spinlock cannot be ruled out");
        }
    }
    let n = w.len();
    set_field(&mut out.reason, &why[..n]);
    out.action = v.action as u32;
    out.reason_code = v.reason as u32;
    out.resume = if matches!(v.action, Action::Kill | Action::ResumeWarning) { v.resume } else { regs };
    out.status = RunStatus::Done as u32;
}

/// The oops behind a kill faulted inside the slab allocator: the heap is
/// corrupt, the kill is declined (`slab.rs`).
fn allocator_check<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, ctx: &CrashContext, v: verdict::Verdict, why: &mut FmtBuf<'_>) -> verdict::Verdict {
    let Ok(cur) = &ctx.current else { return v };
    let top = panic::task_stack_top(k, cur.task, Gva(ctx.regs.rsp));
    let check = slab::check(k, ctx.from_oops_end, &ctx.regs, top);
    slab::apply(check, v, cur.pid, cur.comm_str(), why)
}

/// What the panic path left on this CPU that the kill abandons, undone
/// (unless read-only) and said: `panic_cpu` claimed by `nmi_panic` for this
/// CPU (while it is held, other CPUs' panics stop and 6.12+ drops their
/// printk), and an nbcon emergency section entered by `__warn` or another
/// emergency printer on the task's stack (6.12+; `make_task_dead` resets
/// the preempt count those sections raised, not their nesting).
fn undo_panic_state<M: PhysMem + ?Sized>(k: &mut Kernel<'_, M>, ctx: &CrashContext, read_only: bool, why: &mut FmtBuf<'_>) {
    use core::fmt::Write;
    let verb = if read_only { "would release" } else { "released" };
    if let (Some(Ok(c)), Ok(at)) = (ctx.panic_cpu, k.sym(Item::SymPanicCpu)) {
        if c >= 0 && c as u32 == ctx.cpu {
            let ok = read_only || k.write(at, &(-1i32).to_le_bytes()).is_ok();
            let _ = write!(why, "; {} panic_cpu (held by nmi_panic)", if ok { verb } else { "could not release" });
        }
    }
    if let Some(Ok((at, n))) = percpu::nbcon_emergency_nesting(k, ctx.cpu) {
        if n != 0 && n < 64 {
            let ok = read_only || k.write(at, &0u32.to_le_bytes()).is_ok();
            let _ = write!(why, "; {} {n} nbcon emergency section(s)", if ok { if read_only { "would leave" } else { "left" } } else { "could not leave" });
        }
    }
}

/// Walks everything the decision needs; also writes the panic message.
fn crash_context<M: PhysMem + ?Sized>(
    k: &Kernel<'_, M>,
    input: &ContractIn,
    out: &mut ContractOut,
    corrupt_pages: u32,
) -> CrashContext {
    let regs = input.crashed;
    let cpu = input.cpu;
    let at_panic_entry = panic::at_panic_entry(k, &regs);
    let mut msg_len = 0;
    let mut from_oops_end = false;
    let mut from_nmi_panic = false;
    let mut from_warning = false;
    if at_panic_entry {
        let mut msg = [0u8; contract::MESSAGE_LEN];
        msg_len = panic::panic_message(k, &regs, &mut msg).unwrap_or(0);
        set_field(&mut out.message, &msg[..msg_len]);
        let caller = panic::panic_caller(k, &regs);
        from_oops_end = caller.as_ref().map(|&ret| panic::is_in_oops_end(k, ret)).unwrap_or(false);
        from_nmi_panic = caller.as_ref().map(|&ret| panic::is_in_nmi_panic(k, ret)).unwrap_or(false);
        from_warning = caller.map(|ret| warn::is_in_check_panic_on_warn(k, ret)).unwrap_or(false);
    }
    let kind = if from_warning {
        CrashKind::PanicOnWarn
    } else {
        CrashKind::classify(at_panic_entry, from_oops_end, &out.message[..msg_len])
    };
    let current = percpu::current_task(k, cpu).and_then(|t| TaskInfo::read(k, t));
    let softirq_disable_cnt = current.as_ref().ok().and_then(|c| task::task_softirq_disable_cnt(k, c.task));
    CrashContext {
        cpu,
        regs,
        rewind: k.sym(Item::SymRewindStackAndMakeDead).ok(),
        at_panic_entry,
        from_oops_end,
        from_nmi_panic,
        preempt_count_tracks_locks: percpu::preempt_count_tracks_locks(k),
        kind,
        preempt_count: percpu::preempt_count(k, cpu),
        current,
        panic_cpu: percpu::panic_cpu(k),
        task_list: task::for_each_process(k, input.max_tasks, |_| true),
        corrupt_pages,
        user_worker_flags: task::user_worker_flags(k),
        softirq_disable_cnt,
        warning: from_warning.then(|| warn::warning_return(k, &regs)),
    }
}

/// The crashed kernel as the contract describes it, for host-side
/// diagnosis (`ps`, log tail, backtrace) with the walkers of this crate.
pub fn kernel_view<'m, M: PhysMem + ?Sized>(mem: &'m mut M, input: &'m ContractIn) -> Kernel<'m, M> {
    let paging = Paging::from_regs(input.crashed.cr3, input.crashed.cr4);
    Kernel::new(mem, paging, &input.layout, input.kaslr_slide)
}

/// The crashed task's backtrace candidates: return addresses into kernel
/// text found on the stack at the trap, innermost first.
pub fn backtrace<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, input: &ContractIn, out: &mut [Gva]) -> usize {
    let rsp = Gva(input.crashed.rsp);
    let top = percpu::current_task(k, input.cpu).ok().and_then(|t| panic::task_stack_top(k, t, rsp));
    panic::stack_return_addresses(k, rsp, top, (panic::THREAD_SIZE / 8) as usize, out)
}
