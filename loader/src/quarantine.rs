//! Quarantine after a rollback: the task that crashed the kernel (known
//! from the diagnosis of the declined crash) is made to die at a safe
//! point of its own, with SIGKILL made pending as the kernel itself makes
//! it pending (`kernel/signal.c`: `sigaddset(&pending->signal, SIGKILL)`,
//! then `signal_wake_up()` sets `TIF_SIGPENDING`).
//!
//! What the kernel then does with it (6.1, read in its sources):
//! - On its way back to user mode (`exit_to_user_mode_loop`, after a
//!   syscall, an interrupt or an exception), `TIF_SIGPENDING` leads to
//!   `get_signal()`. The bit alone, without a `sigqueue` entry, is what a
//!   queue that ran out of entries leaves: `collect_signal()` takes it as
//!   an `SI_USER` signal from pid 0. SIGKILL cannot be blocked or caught:
//!   `do_group_exit(SIGKILL)`, and the parent sees status 137.
//! - A task running in user mode dies at its next interrupt (the tick).
//! - A task in a syscall finishes that syscall first; if the syscall is the
//!   one that crashes, the crash recurs, and the watcher declines it for
//!   good (`checkpoint::Rollback`).
//! - A task in `TASK_INTERRUPTIBLE` or `TASK_KILLABLE` sleep is not woken
//!   from here (waking means the scheduler's run queues, which we do not
//!   write from outside): it dies when its wait ends (its timer, its data,
//!   a child's exit), and `signal_pending()` makes any later interruptible
//!   wait return at once. Until then it sleeps, harming nothing: the
//!   `quarantined` event says which state it was found in.
//! - Init (`SIGNAL_UNKILLABLE` does not stop a SIGKILL the kernel finds
//!   pending, and its death panics) and kernel threads (which never return
//!   to user mode) are refused.

use crate::access::GuestAccess;
use crate::flow::Session;
use crate::guestmem::GuestPhys;
use repair_kernel::arch::x86_64::pgtable::Paging;
use repair_kernel::kmem::Kernel;
use repair_kernel::layout::Item;
use repair_kernel::mem::{Error as MemError, Gva, PhysMem};
use repair_kernel::task::{self, Task, TaskInfo};

/// `PF_KTHREAD`.
const PF_KTHREAD: u32 = 0x0020_0000;
/// `PF_EXITING`.
const PF_EXITING: u32 = 0x0000_0004;
/// At most this many processes are walked looking for the offender.
const MAX_TASKS: u32 = 1 << 16;

/// Why a task could not be quarantined.
#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error("no process with pid {0} at the checkpoint (it had not started yet, or it is a thread, not a process)")]
    NotFound(i32),
    #[error("pid 1 (init) cannot be quarantined: its death panics the kernel")]
    Init,
    #[error("pid {pid} ({comm}) is a kernel thread: it never returns to user mode, where a pending SIGKILL is acted on")]
    KernelThread { pid: i32, comm: String },
    #[error("the repair image does not locate {0:?} (rebuild it with this build-repair-image)")]
    Layout(Item),
    #[error("reading the guest's task list: {0}")]
    Memory(MemError),
    #[error(transparent)]
    Access(#[from] crate::access::AccessError),
}

impl From<MemError> for QuarantineError {
    fn from(e: MemError) -> Self {
        match e {
            MemError::MissingLayout(i) => QuarantineError::Layout(i),
            e => QuarantineError::Memory(e),
        }
    }
}

/// A task made to die at its next return to user mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    pub pid: i32,
    pub comm: String,
    /// `ps`'s state letter when it was found (`R`, `S`, `D`, ...).
    pub state: char,
    /// Already dying (`PF_EXITING`): nothing was written.
    pub already_exiting: bool,
    /// Its `task_struct`.
    pub task: Gva,
}

/// The thread-group leader with this pid, walking `init_task.tasks` as
/// `for_each_process` does (bounded, validated).
pub fn find_process<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, pid: i32) -> Result<Option<Task>, MemError> {
    let mut found = None;
    let mut err = None;
    task::for_each_process(k, MAX_TASKS, |t| match task::task_pid(k, t) {
        Ok(p) if p == pid => {
            found = Some(t);
            false
        }
        Ok(_) => true,
        Err(e) => {
            err = Some(e);
            false
        }
    })?;
    match err {
        Some(e) => Err(e),
        None => Ok(found),
    }
}

/// Makes SIGKILL pending for process `pid` of a stopped guest (after a
/// rollback: the checkpoint's tasks). Reads the task list through vCPU 0's
/// page tables (every address space maps the kernel's half).
pub fn quarantine<G: GuestAccess + ?Sized>(guest: &mut G, session: &Session, pid: i32) -> Result<Quarantined, QuarantineError> {
    if pid == 1 {
        return Err(QuarantineError::Init);
    }
    let vcpu = *guest.vcpus()?.first().ok_or_else(|| crate::access::AccessError::Other("no vCPU".into()))?;
    let regs = guest.get_regs(vcpu)?;
    let layout = session.image.layout;
    let mut mem = GuestPhys::new(guest, session.ram_end);
    let mut k = Kernel::new(&mut mem, Paging::from_regs(regs.cr3, regs.cr4), &layout, session.slide.slide);
    let t = find_process(&k, pid)?.ok_or(QuarantineError::NotFound(pid))?;
    let info = TaskInfo::read(&k, t)?;
    let comm = info.comm_str().to_string();
    if info.flags & PF_KTHREAD != 0 {
        return Err(QuarantineError::KernelThread { pid, comm });
    }
    let state = info.state_char();
    if info.flags & PF_EXITING != 0 {
        return Ok(Quarantined { pid, comm, state, already_exiting: true, task: t.0 });
    }
    // SIGKILL in the pending set, TIF_SIGPENDING (its bit read from the
    // kernel's code by the builder: 2 up to 6.x, 1 on 7.x).
    task::make_sigkill_pending(&mut k, t)?;
    Ok(Quarantined { pid, comm, state, already_exiting: false, task: t.0 })
}

/// The process to quarantine for the crash `o` whose offender was `pid`:
/// the crashed task's thread group (`tgid`) when the verdict declined it as
/// a worker thread of a user process (an io_uring or vhost worker runs its
/// owner's request; the worker cannot be ended without hanging its owner,
/// see `repair_kernel::verdict`, while the owner, killed at the checkpoint,
/// exits cleanly with its workers); `pid` otherwise.
pub fn process_of(o: &crate::flow::Outcome, pid: i32) -> i32 {
    let worker = repair_kernel::verdict::Reason::from_u32(o.out.reason_code)
        == Some(repair_kernel::verdict::Reason::DeclineUserWorker);
    if worker && pid == o.out.pid && o.out.tgid > 0 {
        o.out.tgid
    } else {
        pid
    }
}
