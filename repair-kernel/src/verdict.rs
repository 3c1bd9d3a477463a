//! The decision: may the crashed context be repaired by killing the task
//! that crashed, and with what register state?
//!
//! [`decide`] is pure: it reads a [`CrashContext`] the walkers filled and
//! returns a [`Verdict`] whose explanation an operator can act on. The
//! facts it rests on are DESIGN.md §3: `rewind_stack_and_make_dead(signr)`
//! is what `oops_end` itself does without `panic_on_oops`, and
//! `make_task_dead` panics in interrupt context or for pid 0, while
//! `do_exit` of init panics.

use core::fmt::{self, Write};

use crate::contract::{Action, CpuState};
use crate::fmtbuf::FmtBuf;
use crate::mem::{Error, Gva};
use crate::percpu::{HARDIRQ_MASK, NMI_MASK, SOFTIRQ_MASK, SOFTIRQ_OFFSET, PREEMPT_MASK};
use crate::task::{TaskInfo, PF_EXITING, PF_IDLE, PF_IO_WORKER, PF_KTHREAD, PF_USER_WORKER};
use crate::arch::x86_64::RFLAGS_IF;
use crate::frame::Frame;
use crate::warn::WarnError;

/// `SIGKILL`.
pub const SIGKILL: u64 = 9;

/// What kind of crash was trapped (`ContractOut::crash_kind`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashKind {
    /// Not classified (the run did not get that far).
    Unknown = 0,
    /// The vCPU was not stopped at the entry of `panic`.
    NotAtPanic = 1,
    /// `panic("Fatal exception")` from `oops_end` (an oops with `panic_on_oops`).
    OopsPanic = 2,
    /// `panic("Fatal exception in interrupt")` from `oops_end`.
    OopsInInterrupt = 3,
    /// `panic()` called directly by kernel code.
    DirectPanic = 4,
    /// `panic("sysrq triggered crash")` from `sysrq_handle_crash`.
    SysrqCrash = 5,
    /// The soft-lockup detector's panic (`softlockup_panic`).
    SoftLockup = 6,
    /// The hung-task detector's panic (`hung_task_panic`).
    HungTask = 7,
    /// A warning made fatal: the panic was called by `check_panic_on_warn`
    /// (`panic_on_warn`, or `kernel.warn_limit` reached).
    PanicOnWarn = 8,
}

impl CrashKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        use CrashKind::*;
        Some(match v {
            0 => Unknown, 1 => NotAtPanic, 2 => OopsPanic, 3 => OopsInInterrupt,
            4 => DirectPanic, 5 => SysrqCrash, 6 => SoftLockup, 7 => HungTask,
            8 => PanicOnWarn,
            _ => return None,
        })
    }

    /// Classifies a panic from its caller and message.
    pub fn classify(at_panic: bool, from_oops_end: bool, message: &[u8]) -> Self {
        if !at_panic {
            return CrashKind::NotAtPanic;
        }
        let m = message;
        if m.starts_with(b"Fatal exception in interrupt") {
            CrashKind::OopsInInterrupt
        } else if from_oops_end || m.starts_with(b"Fatal exception") {
            CrashKind::OopsPanic
        } else if m.starts_with(b"sysrq triggered crash") {
            CrashKind::SysrqCrash
        } else if m.starts_with(b"softlockup: hung tasks") {
            CrashKind::SoftLockup
        } else if m.starts_with(b"hung_task: blocked tasks") {
            CrashKind::HungTask
        } else {
            CrashKind::DirectPanic
        }
    }
}

impl fmt::Display for CrashKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CrashKind::Unknown => "unknown",
            CrashKind::NotAtPanic => "not stopped at panic()",
            CrashKind::OopsPanic => "oops with panic_on_oops",
            CrashKind::OopsInInterrupt => "oops in interrupt context",
            CrashKind::DirectPanic => "direct panic()",
            CrashKind::SysrqCrash => "sysrq-c crash",
            CrashKind::SoftLockup => "soft lockup panic",
            CrashKind::HungTask => "hung task panic",
            CrashKind::PanicOnWarn => "warning with panic_on_warn",
        })
    }
}

/// Why a verdict was reached (`ContractOut::reason_code`). Codes below 16
/// are kills, 16 and up declines.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    None = 0,
    /// Panic from `oops_end` in process context: do what the kernel does
    /// without `panic_on_oops`.
    KillAfterOops = 1,
    /// A direct panic in process context (sysrq-c, a driver's `panic()`).
    KillDirectPanic = 2,
    /// A warning made fatal by `panic_on_warn`, taken back to the warning;
    /// the task that warned gets SIGKILL, acted on at its return to user
    /// mode.
    WarningResumedKill = 3,
    /// The same, with nobody killed: the warning came from interrupt
    /// context, a kernel thread, init or the idle task.
    WarningResumed = 4,
    /// The contract or the kernel layout is unusable.
    DeclineBadInput = 16,
    /// The vCPU was not stopped at `panic`'s entry.
    DeclineNotAtPanic = 17,
    /// The crashed CPU's current task or preempt count cannot be read.
    DeclineUnreadable = 18,
    /// Another CPU is already panicking, or this is a panic within a panic.
    DeclinePanicInProgress = 19,
    DeclineNmi = 20,
    DeclineHardirq = 21,
    DeclineSoftirq = 22,
    /// Bottom halves disabled: `in_interrupt()` is true, `make_task_dead`
    /// would panic.
    DeclineBhDisabled = 23,
    DeclineIdleTask = 24,
    DeclineInit = 25,
    DeclineKernelThread = 26,
    /// `PF_EXITING`: a fault during exit, possibly after an earlier repair.
    DeclineExiting = 27,
    /// The task list is corrupt: `do_exit` would walk into it.
    DeclineTaskListCorrupt = 28,
    /// Kernel text or read-only data differs from the snapshot and cannot
    /// be restored.
    DeclineCorruptKernel = 29,
    /// The repair kernel itself faulted (set by the unikernel).
    DeclineFaulted = 30,
    /// The oops faulted inside the slab allocator's own code: the heap is
    /// corrupt, and the task that allocated next is its victim, not its
    /// cause (`slab.rs`).
    DeclineSlabCorrupt = 31,
    /// A worker thread of a user process (`PF_USER_WORKER`, `PF_IO_WORKER`):
    /// its thread function's exit bookkeeping, which its owner waits on at
    /// exit, is skipped by `make_task_dead`.
    DeclineUserWorker = 32,
}

impl Reason {
    pub fn from_u32(v: u32) -> Option<Self> {
        use Reason::*;
        Some(match v {
            0 => None, 1 => KillAfterOops, 2 => KillDirectPanic,
            3 => WarningResumedKill, 4 => WarningResumed,
            16 => DeclineBadInput, 17 => DeclineNotAtPanic, 18 => DeclineUnreadable,
            19 => DeclinePanicInProgress, 20 => DeclineNmi, 21 => DeclineHardirq,
            22 => DeclineSoftirq, 23 => DeclineBhDisabled, 24 => DeclineIdleTask,
            25 => DeclineInit, 26 => DeclineKernelThread, 27 => DeclineExiting,
            28 => DeclineTaskListCorrupt, 29 => DeclineCorruptKernel, 30 => DeclineFaulted,
            31 => DeclineSlabCorrupt,
            32 => DeclineUserWorker,
            _ => return Option::None,
        })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::None => "no verdict",
            Reason::KillAfterOops => "kill: oops in process context",
            Reason::KillDirectPanic => "kill: panic in process context",
            Reason::WarningResumedKill => "warning resumed: SIGKILL at return to user mode",
            Reason::WarningResumed => "warning resumed: nobody killed",
            Reason::DeclineBadInput => "decline: unusable input",
            Reason::DeclineNotAtPanic => "decline: not at panic entry",
            Reason::DeclineUnreadable => "decline: crashed context unreadable",
            Reason::DeclinePanicInProgress => "decline: panic already in progress",
            Reason::DeclineNmi => "decline: NMI context",
            Reason::DeclineHardirq => "decline: hardirq context",
            Reason::DeclineSoftirq => "decline: softirq context",
            Reason::DeclineBhDisabled => "decline: bottom halves disabled",
            Reason::DeclineIdleTask => "decline: idle task",
            Reason::DeclineInit => "decline: init",
            Reason::DeclineKernelThread => "decline: kernel thread",
            Reason::DeclineExiting => "decline: task already exiting",
            Reason::DeclineTaskListCorrupt => "decline: task list corrupt",
            Reason::DeclineCorruptKernel => "decline: kernel text/rodata corrupt",
            Reason::DeclineFaulted => "decline: repair kernel faulted",
            Reason::DeclineSlabCorrupt => "decline: oops in the slab allocator (heap corrupt)",
            Reason::DeclineUserWorker => "decline: worker thread of a user process",
        })
    }
}

/// Everything the decision looks at, filled by the walkers.
#[derive(Clone, Copy, Debug)]
pub struct CrashContext {
    /// The crashed vCPU and its registers at the trap.
    pub cpu: u32,
    pub regs: CpuState,
    /// Run-time address of `rewind_stack_and_make_dead`, if known.
    pub rewind: Option<Gva>,
    /// Stopped at the first instruction of `panic`.
    pub at_panic_entry: bool,
    /// `panic`'s return address lies in `oops_end`.
    pub from_oops_end: bool,
    /// `panic`'s return address lies in `nmi_panic`, which set `panic_cpu`
    /// to this CPU before calling it.
    pub from_nmi_panic: bool,
    /// Whether the preempt count shows held spinlocks (the kernel has
    /// `CONFIG_PREEMPT_COUNT`); when not, a held lock cannot be ruled out.
    pub preempt_count_tracks_locks: bool,
    pub kind: CrashKind,
    /// `preempt_count()` of the crashed CPU (NEED_RESCHED masked), or why not.
    pub preempt_count: Result<u32, Error>,
    /// The crashed CPU's current task, or why not.
    pub current: Result<TaskInfo, Error>,
    /// `panic_cpu`, when the layout has it.
    pub panic_cpu: Option<Result<i32, Error>>,
    /// The process-list walk: number of processes, or why it failed.
    pub task_list: Result<u32, Error>,
    /// Kernel pages still differing from the snapshot after any restore.
    pub corrupt_pages: u32,
    /// The `PF_*` flags that mark a user process's worker thread on this
    /// kernel (`task::user_worker_flags`); 0 where it has none.
    pub user_worker_flags: u32,
    /// PREEMPT_RT: the crashed task's `softirq_disable_cnt`, or why not;
    /// `None` where the kernel has no such member (not RT).
    pub softirq_disable_cnt: Option<Result<u32, Error>>,
    /// The panic was called by `check_panic_on_warn`: the state at the
    /// return into its caller, or why it could not be found. `None` for any
    /// other panic.
    pub warning: Option<Result<Frame, WarnError>>,
}

/// The decision.
#[derive(Clone, Copy, Debug)]
pub struct Verdict {
    pub action: Action,
    pub reason: Reason,
    /// For `Kill`: the state to resume the crashed vCPU with.
    pub resume: CpuState,
}

impl Verdict {
    fn decline(reason: Reason) -> Self {
        Self { action: Action::Decline, reason, resume: CpuState::default() }
    }
}

/// A warning made fatal by `panic_on_warn`, with the state at the return
/// into the warning path found ([`crate::warn`]): resume there, as the
/// kernel does without panic_on_warn, and give the task that warned a
/// SIGKILL it acts on at its return to user mode, when it is a user task
/// in process context (an interrupt's warning is not the interrupted
/// task's doing; init's death panics; a kernel thread never returns to
/// user mode).
fn decide_warning(ctx: &CrashContext, frame: &Frame, why: &mut FmtBuf<'_>) -> Verdict {
    let resume = frame.apply(&ctx.regs);
    let _ = write!(why, "a warning made fatal by panic_on_warn: resuming it as the kernel does without panic_on_warn (check_panic_on_warn returns to {:#x})", frame.rip);
    let interrupt = [(NMI_MASK, "NMI"), (HARDIRQ_MASK, "hardirq"), (SOFTIRQ_OFFSET, "softirq")];
    let no_kill = match (&ctx.preempt_count, &ctx.current) {
        (Err(e), _) => Some(Err(*e)),
        (_, Err(e)) => Some(Err(*e)),
        (Ok(pc), Ok(cur)) => {
            if let Some((_, name)) = interrupt.iter().find(|(m, _)| pc & m != 0) {
                let _ = write!(why, "; nobody is killed: it fired in {name} context (preempt_count={pc:#x}), not by the interrupted task");
                Some(Ok(()))
            } else if cur.pid == 0 || cur.flags & PF_IDLE != 0 {
                let _ = write!(why, "; nobody is killed: it fired in the idle task");
                Some(Ok(()))
            } else if cur.tgid == 1 {
                let _ = write!(why, "; nobody is killed: it fired in init (pid {}), whose death panics", cur.pid);
                Some(Ok(()))
            } else if cur.flags & PF_KTHREAD != 0 {
                let _ = write!(why, "; nobody is killed: it fired in kernel thread {} (pid {}), which never returns to user mode", cur.comm_str(), cur.pid);
                Some(Ok(()))
            } else if cur.flags & ctx.user_worker_flags != 0 {
                // An io_uring or vhost worker never returns to user mode
                // either; its process is not the warning's cause.
                let _ = write!(why, "; nobody is killed: it fired in {} (pid {}), a worker thread of process {}", cur.comm_str(), cur.pid, cur.tgid);
                Some(Ok(()))
            } else if cur.flags & PF_EXITING != 0 {
                let _ = write!(why, "; nobody is killed: pid {} ({}) is already exiting", cur.pid, cur.comm_str());
                Some(Ok(()))
            } else {
                let _ = write!(why, "; pid {} ({}) gets SIGKILL, acted on when it returns to user mode", cur.pid, cur.comm_str());
                None
            }
        }
    };
    let reason = match no_kill {
        None => Reason::WarningResumedKill,
        Some(Err(e)) => {
            let _ = write!(why, "; nobody is killed: the crashed context is unreadable ({e})");
            Reason::WarningResumed
        }
        Some(Ok(())) => Reason::WarningResumed,
    };
    Verdict { action: Action::ResumeWarning, reason, resume }
}

/// Decides, writing the operator's explanation into `why`.
pub fn decide(ctx: &CrashContext, why: &mut FmtBuf<'_>) -> Verdict {
    let r = &ctx.regs;
    if !ctx.at_panic_entry {
        let _ = write!(why, "vCPU {} is at rip {:#x}, not at the entry of panic(): the repair kernel only repairs a trapped panic; the guest is left as it was", ctx.cpu, r.rip);
        return Verdict::decline(Reason::DeclineNotAtPanic);
    }
    // No other panic in progress (that one may be stopping the CPUs).
    let no_other_panic = matches!(ctx.panic_cpu, None | Some(Ok(-1)));
    if let (Some(Ok(frame)), true, 0) = (&ctx.warning, no_other_panic, ctx.corrupt_pages) {
        return decide_warning(ctx, frame, why);
    }
    let Some(rewind) = ctx.rewind else {
        let _ = write!(why, "the kernel layout lacks rewind_stack_and_make_dead: rebuild the repair image with a complete profile; letting the panic complete");
        return Verdict::decline(Reason::DeclineBadInput);
    };
    let pc = match ctx.preempt_count {
        Ok(pc) => pc,
        Err(e) => {
            let _ = write!(why, "cannot read the preempt count of CPU {}: {e}; without it interrupt context cannot be ruled out; letting the panic complete", ctx.cpu);
            return Verdict::decline(Reason::DeclineUnreadable);
        }
    };
    let cur = match &ctx.current {
        Ok(c) => c,
        Err(e) => {
            let _ = write!(why, "cannot read the current task of CPU {}: {e}; there is nothing safe to kill; letting the panic complete", ctx.cpu);
            return Verdict::decline(Reason::DeclineUnreadable);
        }
    };
    match ctx.panic_cpu {
        Some(Ok(-1)) | None => {}
        // nmi_panic claimed panic_cpu for this CPU, then called panic: not
        // a panic within a panic (a kill releases it).
        Some(Ok(c)) if c >= 0 && c as u32 == ctx.cpu && ctx.from_nmi_panic => {}
        Some(Ok(c)) if c >= 0 && c as u32 == ctx.cpu => {
            let _ = write!(why, "panic within a panic on CPU {c} (panic_cpu is already this CPU): the first panic's state is unknown; letting the panic complete");
            return Verdict::decline(Reason::DeclinePanicInProgress);
        }
        Some(Ok(c)) => {
            let _ = write!(why, "CPU {c} is already panicking (panic_cpu={c}) and may have stopped the other CPUs; resuming this one cannot bring the guest back; letting the panic complete");
            return Verdict::decline(Reason::DeclinePanicInProgress);
        }
        Some(Err(e)) => {
            let _ = write!(why, "cannot read panic_cpu: {e}; letting the panic complete");
            return Verdict::decline(Reason::DeclineUnreadable);
        }
    }
    let ctxs: [(u32, Reason, &str); 3] = [
        (NMI_MASK, Reason::DeclineNmi, "NMI"),
        (HARDIRQ_MASK, Reason::DeclineHardirq, "hardirq"),
        (SOFTIRQ_OFFSET, Reason::DeclineSoftirq, "softirq"),
    ];
    for (mask, reason, name) in ctxs {
        if pc & mask != 0 {
            let _ = write!(why, "panic in {name} context (preempt_count={pc:#x}): killing a task cannot unwind an interrupt; letting the panic complete");
            return Verdict::decline(reason);
        }
    }
    if ctx.kind == CrashKind::OopsInInterrupt {
        let _ = write!(why, "oops_end found the oops in interrupt context (\"Fatal exception in interrupt\", preempt_count={pc:#x}): killing a task cannot unwind an interrupt; letting the panic complete");
        return Verdict::decline(Reason::DeclineHardirq);
    }
    if pc & SOFTIRQ_MASK != 0 {
        let _ = write!(why, "panic with bottom halves disabled (preempt_count={pc:#x}): in_interrupt() is true, so make_task_dead would panic anyway; letting the panic complete");
        return Verdict::decline(Reason::DeclineBhDisabled);
    }
    if let Some(v) = rt_bottom_halves(ctx, why) {
        return v;
    }
    let comm = cur.comm_str();
    if cur.pid == 0 || cur.flags & PF_IDLE != 0 {
        let _ = write!(why, "the crashed task is the idle task of CPU {} (pid {}, {comm}): it cannot exit; letting the panic complete", ctx.cpu, cur.pid);
        return Verdict::decline(Reason::DeclineIdleTask);
    }
    if cur.tgid == 1 {
        let _ = write!(why, "the crashed task is init (pid {}, {comm}): its exit panics the kernel; letting the panic complete", cur.pid);
        return Verdict::decline(Reason::DeclineInit);
    }
    if cur.flags & PF_KTHREAD != 0 {
        let _ = write!(why, "the crashed task is kernel thread {comm} (pid {}): others may wait on it forever; letting the panic complete", cur.pid);
        return Verdict::decline(Reason::DeclineKernelThread);
    }
    if let Some(v) = user_worker(ctx, cur, why) {
        return v;
    }
    if cur.flags & PF_EXITING != 0 || cur.exit_state != 0 {
        let _ = write!(why, "pid {} ({comm}) crashed while already exiting (flags={:#x}, exit_state={:#x}): a recursive fault, perhaps after an earlier repair; letting the panic complete", cur.pid, cur.flags, cur.exit_state);
        return Verdict::decline(Reason::DeclineExiting);
    }
    if let Err(e) = ctx.task_list {
        let _ = write!(why, "the task list is corrupt ({e}): do_exit of pid {} would walk into it; letting the panic complete", cur.pid);
        return Verdict::decline(Reason::DeclineTaskListCorrupt);
    }
    if ctx.corrupt_pages != 0 {
        let _ = write!(why, "{} kernel text/rodata pages differ from the healthy snapshot and were not restored: the next caller would crash again; rebuild the image with pristine pages; letting the panic complete", ctx.corrupt_pages);
        return Verdict::decline(Reason::DeclineCorruptKernel);
    }

    let reason = if ctx.from_oops_end || ctx.kind == CrashKind::OopsPanic {
        let _ = write!(why, "killing pid {} ({comm}) with SIGKILL: the oops came from process context, so rewind_stack_and_make_dead is what the kernel does without panic_on_oops", cur.pid);
        Reason::KillAfterOops
    } else {
        let _ = write!(why, "killing pid {} ({comm}) with SIGKILL: {} in process context; rewind_stack_and_make_dead ends the task", cur.pid, ctx.kind);
        Reason::KillDirectPanic
    };
    if pc & PREEMPT_MASK != 0 {
        let _ = write!(why, "; preempt_count={pc:#x} (a lock or RCU read section may be held; make_task_dead resets the count)");
    }

    if r.rflags & RFLAGS_IF == 0 && !ctx.from_oops_end {
        let _ = write!(why, "; IRQs were off (make_task_dead re-enables them)");
    }
    if ctx.softirq_disable_cnt.is_some() {
        let _ = write!(why, "; PREEMPT_RT: a held spinlock (an rt_mutex, not in preempt_count) cannot be ruled out");
    }
    if let Some(Err(e)) = &ctx.warning {
        let _ = write!(why, "; could not return into the warning instead: {e}");
    }
    // A function entry: rewind_stack_and_make_dead switches to the task's
    // stack top itself, so every other register stays as at the trap.
    let mut resume = *r;
    resume.rip = rewind.0;
    resume.rdi = SIGKILL;
    Verdict { action: Action::Kill, reason, resume }
}

/// PREEMPT_RT keeps bottom-half state in the task, not in `preempt_count`:
/// `softirq_count()` is `current->softirq_disable_cnt & SOFTIRQ_MASK`, and
/// `make_task_dead`'s `in_interrupt()` reads it. Serving a softirq, or with
/// bottom halves disabled (the per-CPU `softirq_ctrl.lock` then held by
/// this task), the kill cannot go through; `None` to go on.
fn rt_bottom_halves(ctx: &CrashContext, why: &mut FmtBuf<'_>) -> Option<Verdict> {
    let cnt = match ctx.softirq_disable_cnt? {
        Ok(c) => c,
        Err(e) => {
            let _ = write!(why, "cannot read the crashed task's softirq_disable_cnt (PREEMPT_RT keeps bottom-half state there, not in preempt_count): {e}; letting the panic complete");
            return Some(Verdict::decline(Reason::DeclineUnreadable));
        }
    };
    if cnt & SOFTIRQ_OFFSET != 0 {
        let _ = write!(why, "panic in softirq context (PREEMPT_RT: the task's softirq_disable_cnt={cnt:#x}): killing the task cannot unwind the softirq; letting the panic complete");
        return Some(Verdict::decline(Reason::DeclineSoftirq));
    }
    if cnt & SOFTIRQ_MASK != 0 {
        let _ = write!(why, "panic with bottom halves disabled (PREEMPT_RT: the task's softirq_disable_cnt={cnt:#x}): in_interrupt() is true, so make_task_dead would panic anyway, and the CPU's softirq lock is held; letting the panic complete");
        return Some(Verdict::decline(Reason::DeclineBhDisabled));
    }
    None
}

/// A worker thread of a user process (io_uring's `iou-wrk-*`/`iou-sqp-*`,
/// vhost's): not a kernel thread, yet not the process either. The kernel's
/// own oops path (`make_task_dead` then `do_exit`) skips the thread
/// function's exit bookkeeping: io_uring's `io_worker_exit` (the worker
/// stays on its io-wq's lists with a dangling task pointer, the in-flight
/// request never completes, `worker_refs` never drops) and vhost's
/// `complete(&vtsk->exited)`; the SQPOLL thread's unlock of `sqd->lock`,
/// which it holds while it runs (`io_sq_thread_stop` takes it).
/// The owner then never finishes its exit
/// (`io_uring_cancel_generic` waits on the request, `io_wq_exit_workers`
/// wakes the freed task and waits on `worker_done`; `vhost_task_stop`
/// waits on `exited`), and killing the owner as well ends the same way.
/// Declined; `None` for any other task.
fn user_worker(ctx: &CrashContext, cur: &TaskInfo, why: &mut FmtBuf<'_>) -> Option<Verdict> {
    let f = cur.flags & ctx.user_worker_flags;
    if f == 0 {
        return None;
    }
    let (kind, exit) = if f & PF_IO_WORKER != 0 {
        // io-wq's workers and the SQPOLL thread (`io_sq_thread`, which
        // runs holding `sqd->lock`, taken by its owner's exit) alike.
        ("an io_uring thread (PF_IO_WORKER)", "its exit bookkeeping (io_worker_exit; SQPOLL's unlock of sqd->lock)")
    } else {
        debug_assert!(f & PF_USER_WORKER != 0);
        ("a user worker (PF_USER_WORKER)", "its thread function's exit")
    };
    let _ = write!(why, "{} (pid {}) is {kind} of process {}: killing it skips {exit}, so that process could never finish exiting; letting the panic complete", cur.comm_str(), cur.pid, cur.tgid);
    Some(Verdict::decline(Reason::DeclineUserWorker))
}
