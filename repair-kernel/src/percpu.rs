//! Per-CPU state: the current task, the preempt count and the runqueue,
//! after arch/x86/include/asm/current.h, asm/preempt.h and kernel/sched.

use crate::layout::Item;
use crate::mem::{Error, Gva, PhysMem};
use crate::kmem::Kernel;
use crate::task::Task;

/// `PREEMPT_MASK`: preempt_disable() nesting.
pub const PREEMPT_MASK: u32 = 0x0000_00ff;
/// `SOFTIRQ_MASK`: softirq serving (`SOFTIRQ_OFFSET`) and BH-disable nesting.
pub const SOFTIRQ_MASK: u32 = 0x0000_ff00;
/// `SOFTIRQ_OFFSET`: set while a softirq is being served.
pub const SOFTIRQ_OFFSET: u32 = 0x0000_0100;
/// `HARDIRQ_MASK`.
pub const HARDIRQ_MASK: u32 = 0x000f_0000;
/// `NMI_MASK`.
pub const NMI_MASK: u32 = 0x00f0_0000;
/// `PREEMPT_NEED_RESCHED` (x86 keeps it inverted in `__preempt_count`).
pub const PREEMPT_NEED_RESCHED: u32 = 0x8000_0000;

/// `nr_cpu_ids` (`unsigned int`).
pub fn nr_cpu_ids<M: PhysMem + ?Sized>(k: &Kernel<'_, M>) -> Result<u32, Error> {
    k.read_u32(k.sym(Item::SymNrCpuIds)?)
}

/// Checks a CPU index against `nr_cpu_ids` (when readable) and `NR_CPUS`.
pub fn check_cpu<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, cpu: u32) -> Result<(), Error> {
    let limit = nr_cpu_ids(k).unwrap_or(crate::kmem::MAX_CPUS).min(crate::kmem::MAX_CPUS);
    if cpu >= limit {
        return Err(Error::Absurd("cpu index", cpu as u64));
    }
    Ok(())
}

/// Address of a CPU's current-task pointer: `&pcpu_hot.current_task`
/// (6.2+ and some backports) or `&current_task`.
fn current_task_ptr<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, cpu: u32) -> Result<Gva, Error> {
    match (k.opt(Item::PcpuHot), k.opt(Item::PcpuHotCurrentTask)) {
        (Some(_), Some(off)) => k.per_cpu_ptr(Item::PcpuHot, off, cpu),
        _ => k.per_cpu_ptr(Item::PcpuCurrentTask, 0, cpu),
    }
}

/// `per_cpu(current_task, cpu)` (`struct task_struct *`): the task running
/// on `cpu`.
pub fn current_task<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, cpu: u32) -> Result<Task, Error> {
    check_cpu(k, cpu)?;
    let t = k.read_ptr(current_task_ptr(k, cpu)?)?;
    if t.is_null() {
        return Err(Error::NullPointer);
    }
    if !crate::task::is_kernel_addr(t) {
        return Err(Error::Absurd("current task pointer", t.0));
    }
    Ok(Task(t))
}

/// `per_cpu(__preempt_count, cpu)` (`int`), raw: on x86 the
/// `PREEMPT_NEED_RESCHED` bit is inverted; see [`preempt_count`].
pub fn preempt_count_raw<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, cpu: u32) -> Result<u32, Error> {
    check_cpu(k, cpu)?;
    let p = match (k.opt(Item::PcpuHot), k.opt(Item::PcpuHotPreemptCount)) {
        (Some(_), Some(off)) => k.per_cpu_ptr(Item::PcpuHot, off, cpu)?,
        _ => k.per_cpu_ptr(Item::PcpuPreemptCount, 0, cpu)?,
    };
    k.read_u32(p)
}

/// `preempt_count()` of `cpu`: the raw count without `PREEMPT_NEED_RESCHED`.
pub fn preempt_count<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, cpu: u32) -> Result<u32, Error> {
    Ok(preempt_count_raw(k, cpu)? & !PREEMPT_NEED_RESCHED)
}

/// `cpu_rq(cpu)` (`struct rq *`).
pub fn cpu_rq<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, cpu: u32) -> Result<Gva, Error> {
    check_cpu(k, cpu)?;
    k.per_cpu_ptr(Item::PcpuRunqueues, 0, cpu)
}

/// `cpu_rq(cpu)->curr` (`struct task_struct __rcu *`).
pub fn rq_curr<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, cpu: u32) -> Result<Task, Error> {
    let rq = cpu_rq(k, cpu)?;
    Ok(Task(k.read_ptr(k.member(rq, Item::RqCurr)?)?))
}

/// `cpu_rq(cpu)->nr_switches` (`u64`): context switches on `cpu`, what a
/// hang detector watches.
pub fn rq_nr_switches<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, cpu: u32) -> Result<u64, Error> {
    let rq = cpu_rq(k, cpu)?;
    k.read_u64(k.member(rq, Item::RqNrSwitches)?)
}

/// `per_cpu(nbcon_pcpu_emergency_nesting, cpu)` (`unsigned int`, 6.12+):
/// how deep `cpu` is in nbcon emergency sections; `None` where the kernel
/// has no such variable.
pub fn nbcon_emergency_nesting<M: PhysMem + ?Sized>(k: &Kernel<'_, M>, cpu: u32) -> Option<Result<(Gva, u32), Error>> {
    k.opt(Item::PcpuNbconEmergencyNesting)?;
    Some(check_cpu(k, cpu).and_then(|_| {
        let p = k.per_cpu_ptr(Item::PcpuNbconEmergencyNesting, 0, cpu)?;
        Ok((p, k.read_u32(p)?))
    }))
}

/// Whether `preempt_count` shows spinlocks and `preempt_disable()`
/// sections: only with `CONFIG_PREEMPT_COUNT`, which the vmlinux shows by
/// `preempt_schedule` (`CONFIG_PREEMPTION`) or `__might_resched` /
/// `___might_sleep` (`CONFIG_DEBUG_ATOMIC_SLEEP`).
pub fn preempt_count_tracks_locks<M: PhysMem + ?Sized>(k: &Kernel<'_, M>) -> bool {
    [Item::SymPreemptSchedule, Item::SymMightResched, Item::SymMightSleepOld].iter().any(|&i| k.opt(i).is_some())
}

/// `panic_cpu` (`atomic_t`, -1 when no CPU panics); `None` when the layout
/// lacks it.
pub fn panic_cpu<M: PhysMem + ?Sized>(k: &Kernel<'_, M>) -> Option<Result<i32, Error>> {
    let a = k.sym(Item::SymPanicCpu).ok()?;
    Some(k.read_i32(a))
}
