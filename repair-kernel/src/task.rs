//! Tasks: `struct task_struct` and the process list, after
//! include/linux/sched.h and include/linux/sched/signal.h.

use crate::layout::Item;
use crate::mem::{Error, Gva, PhysMem};
use crate::kmem::Kernel;

/// `PF_IDLE`: the idle task.
pub const PF_IDLE: u32 = 0x0000_0002;
/// `PF_EXITING`: in `do_exit()`.
pub const PF_EXITING: u32 = 0x0000_0004;
/// `PF_KTHREAD`: a kernel thread.
pub const PF_KTHREAD: u32 = 0x0020_0000;
/// `PF_IO_WORKER`: an io_uring worker (`create_io_thread`, 5.12+).
pub const PF_IO_WORKER: u32 = 0x0000_0010;
/// `PF_USER_WORKER`: a kernel thread cloned from a user thread (io_uring
/// and vhost workers, 6.4+).
pub const PF_USER_WORKER: u32 = 0x0000_4000;

/// Iteration cap used when the contract gives none (`PID_MAX_DEFAULT` x 2).
pub const DEFAULT_MAX_TASKS: u32 = 65536;

/// `TASK_COMM_LEN`.
pub const TASK_COMM_LEN: usize = 16;

/// `struct task_struct *`, a run-time kernel address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task(pub Gva);

/// True for an address in the kernel half of the address space.
pub fn is_kernel_addr(va: Gva) -> bool {
    va.0 >> 63 == 1
}

/// `&init_task` (`struct task_struct init_task`).
pub fn init_task<M: PhysMem + ?Sized>(k: &Kernel<'_, M>) -> Result<Task, Error> {
    Ok(Task(k.sym(Item::SymInitTask)?))
}

/// `next_task(p)`: `list_entry_rcu(p->tasks.next, struct task_struct, tasks)`.
pub fn next_task<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, t: Task) -> Result<Task, Error> {
    let next = k.read_ptr(k.member(k.member(t.0, Item::TaskTasks)?, Item::ListNext)?)?;
    if !is_kernel_addr(next) {
        return Err(Error::CorruptList(t.0));
    }
    Ok(Task(k.container_of(next, Item::TaskTasks)?))
}

/// `for_each_process(p)`: every thread-group leader on `init_task.tasks`,
/// `init_task` itself excluded (as `ps` does). `f` returns false to stop.
///
/// Validates as drgn's `validate_list_for_each` does: each element's
/// `tasks.prev` must point back at the previous one, a cycle that does not
/// pass through the head is caught (Brent's algorithm), and at most
/// `max_tasks` elements are visited. Returns the number visited. (The prev
/// check alone already catches any cycle that skips the head, as memory
/// does not change under the walk; Brent's check costs nothing and keeps
/// the walk sound if the prev check is ever relaxed.)
pub fn for_each_process<M: PhysMem + ?Sized>(
    k: &Kernel<'_, M>,
    max_tasks: u32,
    mut f: impl FnMut(Task) -> bool,
) -> Result<u32, Error> {
    let max = if max_tasks == 0 { DEFAULT_MAX_TASKS } else { max_tasks };
    let head = init_task(k)?;
    let tasks_off = k.item(Item::TaskTasks)?;
    let prev_off = k.item(Item::ListPrev)?;
    let mut prev = head;
    let mut cur = next_task(k, head)?;
    // Brent: `tortoise` jumps to the hare at each power of two.
    let (mut tortoise, mut power, mut lam) = (head, 1u32, 0u32);
    let mut n = 0u32;
    while cur != head {
        let back = k.read_ptr(cur.0.add(tasks_off + prev_off))?;
        if back != prev.0.add(tasks_off) || cur == tortoise {
            return Err(Error::CorruptList(cur.0));
        }
        if n >= max {
            return Err(Error::TooMany(n));
        }
        n += 1;
        if !f(cur) {
            return Ok(n);
        }
        lam += 1;
        if lam == power {
            tortoise = cur;
            power = power.saturating_mul(2);
            lam = 0;
        }
        prev = cur;
        cur = next_task(k, cur)?;
    }
    Ok(n)
}

/// `task->pid` (`pid_t`).
pub fn task_pid<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, t: Task) -> Result<i32, Error> {
    k.read_i32(k.member(t.0, Item::TaskPid)?)
}

/// `task->tgid` (`pid_t`).
pub fn task_tgid<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, t: Task) -> Result<i32, Error> {
    k.read_i32(k.member(t.0, Item::TaskTgid)?)
}

/// `task->comm` (`char comm[TASK_COMM_LEN]`), NUL-padded.
pub fn task_comm<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, t: Task) -> Result<[u8; TASK_COMM_LEN], Error> {
    let mut c = [0u8; TASK_COMM_LEN];
    k.read(k.member(t.0, Item::TaskComm)?, &mut c)?;
    // The kernel keeps it NUL-terminated; a corrupt one is cut.
    c[TASK_COMM_LEN - 1] = 0;
    if let Some(z) = c.iter().position(|&b| b == 0) {
        c[z..].fill(0);
    }
    Ok(c)
}

/// `READ_ONCE(task->__state)` (`unsigned int`), or `task->state`
/// (`volatile long`) on kernels before 5.14.
pub fn task_state<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, t: Task) -> Result<u32, Error> {
    let off = k
        .opt(Item::TaskStateNew)
        .or_else(|| k.opt(Item::TaskStateOld))
        .ok_or(Error::MissingLayout(Item::TaskStateNew))?;
    k.read_u32(t.0.add(off))
}

/// `task->flags` (`unsigned int`, `PF_*`).
pub fn task_flags<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, t: Task) -> Result<u32, Error> {
    k.read_u32(k.member(t.0, Item::TaskFlags)?)
}

/// The `PF_*` flags that mark a worker thread of a user process on this
/// kernel: `PF_IO_WORKER` where `kernel_clone_args.io_thread` exists,
/// `PF_USER_WORKER` where `kernel_clone_args.user_worker` does (the
/// numbers are defines, not in DWARF; the members say the flags exist).
pub fn user_worker_flags<M: PhysMem + ?Sized>(k: &Kernel<'_, M>) -> u32 {
    let mut f = 0;
    if k.opt(Item::KcaIoThread).is_some() {
        f |= PF_IO_WORKER;
    }
    if k.opt(Item::KcaUserWorker).is_some() {
        f |= PF_USER_WORKER;
    }
    f
}

/// `task->softirq_disable_cnt` (`int`, PREEMPT_RT only: the task's
/// bottom-half disable count, RT's `softirq_count()`); `None` where the
/// kernel has no such member.
pub fn task_softirq_disable_cnt<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, t: Task) -> Option<Result<u32, Error>> {
    k.opt(Item::TaskSoftirqDisableCnt)?;
    Some(k.member(t.0, Item::TaskSoftirqDisableCnt).and_then(|a| k.read_u32(a)))
}

/// `task->exit_state` (`int`, `EXIT_ZOMBIE` 0x20, `EXIT_DEAD` 0x10).
pub fn task_exit_state<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, t: Task) -> Result<u32, Error> {
    k.read_u32(k.member(t.0, Item::TaskExitState)?)
}

/// `task->real_parent` (`struct task_struct __rcu *`).
pub fn real_parent<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, t: Task) -> Result<Task, Error> {
    Ok(Task(k.read_ptr(k.member(t.0, Item::TaskRealParent)?)?))
}

/// `task->stack` (`void *`), the bottom of the task's kernel stack.
pub fn task_stack<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, t: Task) -> Result<Gva, Error> {
    k.read_ptr(k.member(t.0, Item::TaskStack)?)
}

/// `task->mm` (`struct mm_struct *`); NULL for kernel threads.
pub fn task_mm<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, t: Task) -> Result<Gva, Error> {
    k.read_ptr(k.member(t.0, Item::TaskMm)?)
}

/// `task_state_to_char()`: the letter `ps` shows for a state.
pub fn task_state_to_char(state: u32, exit_state: u32) -> u8 {
    // TASK_REPORT bits in fs/proc/array.c order: R S D T t X Z P I.
    const LETTERS: &[u8; 9] = b"RSDTtXZPI";
    let s = (state | exit_state) & 0x7f;
    if state == 0x0402 {
        // TASK_IDLE = TASK_UNINTERRUPTIBLE | TASK_NOLOAD
        return b'I';
    }
    if s == 0 {
        return b'R';
    }
    // fls(): the highest reported bit wins.
    let bit = (32 - s.leading_zeros()) as usize;
    LETTERS.get(bit).copied().unwrap_or(b'?')
}

/// A summary of one task, read in one go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskInfo {
    pub task: Task,
    pub pid: i32,
    pub tgid: i32,
    pub comm: [u8; TASK_COMM_LEN],
    pub state: u32,
    pub flags: u32,
    pub exit_state: u32,
    pub parent_pid: i32,
}

impl TaskInfo {
    /// Reads every field; the parent pid is -1 when unreadable.
    pub fn read<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, t: Task) -> Result<Self, Error> {
        let parent_pid = real_parent(k, t).and_then(|p| task_pid(k, p)).unwrap_or(-1);
        Ok(Self {
            task: t,
            pid: task_pid(k, t)?,
            tgid: task_tgid(k, t)?,
            comm: task_comm(k, t)?,
            state: task_state(k, t)?,
            flags: task_flags(k, t)?,
            exit_state: task_exit_state(k, t)?,
            parent_pid,
        })
    }

    /// The command name as text.
    pub fn comm_str(&self) -> &str {
        crate::contract::field_str(&self.comm)
    }

    /// The `ps` state letter.
    pub fn state_char(&self) -> char {
        task_state_to_char(self.state, self.exit_state) as char
    }
}

/// `SIGKILL`'s bit in the first word of a `sigset_t`.
const SIGKILL_BIT: u64 = 1 << (9 - 1);

/// Makes SIGKILL pending for `t` as `send_signal` + `signal_wake_up` would
/// (`sigaddset(&t->pending.signal, SIGKILL)`, then `TIF_SIGPENDING`, whose
/// bit the image read from `signal_wake_up_state`'s code): the
/// task dies at its next return to user mode, after the kernel code it is
/// in has finished and released what it holds. Only with every vCPU of the
/// guest stopped: no CPU of its own races the writes.
pub fn make_sigkill_pending<M: PhysMem + ?Sized>(k: &mut Kernel<'_, M>, t: Task) -> Result<(), Error> {
    let sig = k.member(t.0, Item::TaskPendingSignal)?;
    let flags = k.member(t.0, Item::TaskThreadInfoFlags)?;
    // TIF_SIGPENDING: bit 2 up to 6.x, 1 with the generic TIF bits (7.x).
    let bit = k.item(Item::TifSigpending)?;
    if bit >= 64 {
        return Err(Error::Absurd("TIF_SIGPENDING bit", bit));
    }
    let s = k.read_u64(sig)?;
    let f = k.read_u64(flags)?;
    k.write(sig, &(s | SIGKILL_BIT).to_le_bytes())?;
    k.write(flags, &(f | 1 << bit).to_le_bytes())
}
