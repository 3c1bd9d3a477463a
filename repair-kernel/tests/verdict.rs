//! Each branch of the decision, through `run` on an in-memory guest.
mod common;
use common::*;

use repair_kernel::contract::{Action, RunStatus};
use repair_kernel::layout::Item;
use repair_kernel::verdict::{CrashKind, Reason};

fn check(out: &repair_kernel::contract::ContractOut, action: Action, reason: Reason) {
    assert_eq!(out.status, RunStatus::Done as u32);
    assert_eq!(Action::from_u32(out.action), Some(action), "{}", str_of(&out.reason));
    assert_eq!(Reason::from_u32(out.reason_code), Some(reason), "{}", str_of(&out.reason));
    assert!(!str_of(&out.reason).is_empty());
}

#[test]
fn sysrq_crash_in_process_context_is_killed() {
    let mut g = scene();
    let regs = g.regs;
    let out = g.run();
    check(&out, Action::Kill, Reason::KillDirectPanic);
    assert_eq!((out.pid, out.tgid, str_of(&out.comm)), (73, 73, "crasher"));
    assert_eq!(str_of(&out.message), "sysrq triggered crash");
    assert_eq!(CrashKind::from_u32(out.crash_kind), Some(CrashKind::SysrqCrash));
    assert_eq!(out.nr_tasks, 5);
    // Resume: rewind_stack_and_make_dead(SIGKILL), everything else as trapped.
    assert_eq!(out.resume.rip, rt(REWIND));
    assert_eq!(out.resume.rdi, 9);
    let mut expect = regs;
    expect.rip = rt(REWIND);
    expect.rdi = 9;
    assert_eq!(out.resume, expect);
    assert!(str_of(&out.reason).starts_with("killing pid 73 (crasher) with SIGKILL"), "{}", str_of(&out.reason));
}

#[test]
fn oops_panic_in_process_context_is_killed() {
    let mut g = scene();
    let t = g.tasks[2];
    g.set_percpu(0, PCPU_CURRENT_TASK, t);
    g.crash_oops(t);
    let out = g.run();
    check(&out, Action::Kill, Reason::KillAfterOops);
    assert_eq!(str_of(&out.comm), "sh");
    assert_eq!(str_of(&out.message), "Fatal exception");
    assert_eq!(CrashKind::from_u32(out.crash_kind), Some(CrashKind::OopsPanic));
    assert_eq!(out.resume.rflags, 0x46);
}

#[test]
fn oops_end_without_its_size_uses_a_bound() {
    let mut g = scene();
    g.layout.set(Item::SymOopsEndSize, u64::MAX); // absent
    let t = g.tasks[2];
    g.crash_oops(t);
    let out = g.run();
    check(&out, Action::Kill, Reason::KillAfterOops);
}

#[test]
fn preempt_count_raised_in_process_context_still_kills_and_says_so() {
    let mut g = scene();
    g.set_preempt_count(0, 1);
    let out = g.run();
    check(&out, Action::Kill, Reason::KillDirectPanic);
    assert!(str_of(&out.reason).contains("preempt_count=0x1"), "{}", str_of(&out.reason));
}

#[test]
fn interrupt_contexts_are_declined() {
    for (pc, reason, word) in [
        (0x10000, Reason::DeclineHardirq, "hardirq"),
        (0x100, Reason::DeclineSoftirq, "softirq"),
        (0x100000, Reason::DeclineNmi, "NMI"),
        (0x200, Reason::DeclineBhDisabled, "bottom halves"),
    ] {
        let mut g = scene();
        g.set_preempt_count(0, pc);
        let out = g.run();
        check(&out, Action::Decline, reason);
        let why = str_of(&out.reason);
        assert!(why.contains(word) && why.contains(&format!("{pc:#x}")), "{why}");
        // Declined: resume is the trapped state untouched.
        assert_eq!(out.resume, g.regs);
    }
    let mut g = scene();
    g.set_preempt_count(0, 0x10000);
    let out = g.run();
    assert_eq!(
        str_of(&out.reason),
        "panic in hardirq context (preempt_count=0x10000): killing a task cannot unwind an interrupt; letting the panic complete"
    );
}

#[test]
fn fatal_exception_in_interrupt_is_declined() {
    let mut g = scene();
    let t = g.tasks[4];
    g.crash_at(t, OOPS_END + 0x80, "Fatal exception in interrupt", &[]);
    let out = g.run();
    check(&out, Action::Decline, Reason::DeclineHardirq);
    assert_eq!(CrashKind::from_u32(out.crash_kind), Some(CrashKind::OopsInInterrupt));
}

#[test]
fn idle_init_and_kernel_threads_are_declined() {
    // Idle: current is init_task (pid 0).
    let mut g = scene();
    let idle = rt(INIT_TASK);
    g.set_percpu(0, PCPU_CURRENT_TASK, idle);
    let out = g.run();
    check(&out, Action::Decline, Reason::DeclineIdleTask);

    let mut g = scene();
    let init = g.tasks[1];
    g.set_percpu(0, PCPU_CURRENT_TASK, init);
    let out = g.run();
    check(&out, Action::Decline, Reason::DeclineInit);
    assert_eq!(out.pid, 1);

    let mut g = scene();
    let kt = g.tasks[5];
    g.set_percpu(0, PCPU_CURRENT_TASK, kt);
    let out = g.run();
    check(&out, Action::Decline, Reason::DeclineKernelThread);
    assert!(str_of(&out.reason).contains("kthreadd"));
}

#[test]
fn a_task_already_exiting_is_declined() {
    let mut g = scene();
    let t = g.tasks[4];
    g.w32(t + T_FLAGS, 0x0040_0104);
    let out = g.run();
    check(&out, Action::Decline, Reason::DeclineExiting);
}

#[test]
fn another_cpu_panicking_or_a_nested_panic_is_declined() {
    for who in [1u32, 0] {
        let mut g = scene();
        g.w32(rt(PANIC_CPU), who);
        let out = g.run();
        check(&out, Action::Decline, Reason::DeclinePanicInProgress);
    }
    // Without panic_cpu in the layout, the check is skipped.
    let mut g = scene();
    g.w32(rt(PANIC_CPU), 1);
    g.layout.set(Item::SymPanicCpu, u64::MAX);
    check(&g.run(), Action::Kill, Reason::KillDirectPanic);
}

#[test]
fn not_at_panic_entry_is_declined() {
    let mut g = scene();
    g.regs.rip = rt(PANIC) + 4;
    let out = g.run();
    check(&out, Action::Decline, Reason::DeclineNotAtPanic);
    assert_eq!(CrashKind::from_u32(out.crash_kind), Some(CrashKind::NotAtPanic));
}

#[test]
fn missing_rewind_symbol_is_declined() {
    let mut g = scene();
    g.layout.set(Item::SymRewindStackAndMakeDead, u64::MAX);
    let out = g.run();
    check(&out, Action::Decline, Reason::DeclineBadInput);
}

#[test]
fn read_only_run_decides_but_writes_nothing() {
    let mut g = scene();
    let mut input = g.input();
    input.read_only = 1;
    let before = g.ram.clone();
    let mut out = repair_kernel::contract::ContractOut::empty();
    repair_kernel::run(&mut repair_kernel::mem::SliceMem::new(&mut g.ram), &input, &mut out);
    check(&out, Action::Kill, Reason::KillDirectPanic);
    assert!(g.ram == before);
}

#[test]
fn explanations_fit_and_codes_have_words() {
    for v in [0, 1, 2, 3, 4, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32] {
        let r = Reason::from_u32(v).unwrap();
        assert_eq!(r as u32, v);
        assert!(!r.to_string().is_empty());
    }
    assert!(Reason::from_u32(5).is_none());
    for v in 0..9 {
        assert!(!CrashKind::from_u32(v).unwrap().to_string().is_empty());
    }
}

/// A link address for `nmi_panic` in the scene's text.
const NMI_PANIC: u64 = KBASE_LINK + 0x6_0000;

#[test]
fn a_panic_called_by_nmi_panic_is_not_nested_and_the_kill_releases_panic_cpu() {
    let mut g = scene();
    let t = g.tasks[2];
    g.set_percpu(0, PCPU_CURRENT_TASK, t);
    g.crash_at(t, NMI_PANIC + 0x30, "Hard LOCKUP", &[]);
    g.layout.set(Item::SymNmiPanic, NMI_PANIC);
    g.layout.set(Item::SymNmiPanicSize, 0x80);
    g.w32(rt(PANIC_CPU), 0); // nmi_panic claimed it for CPU 0
    let out = g.run();
    check(&out, Action::Kill, Reason::KillDirectPanic);
    assert!(str_of(&out.reason).contains("released panic_cpu"), "{}", str_of(&out.reason));
    assert_eq!(g.rbytes(rt(PANIC_CPU), 4), (-1i32).to_le_bytes());
    // Without nmi_panic in the layout it is a panic within a panic.
    let mut g = scene();
    g.crash_at(g.tasks[2], NMI_PANIC + 0x30, "Hard LOCKUP", &[]);
    g.w32(rt(PANIC_CPU), 0);
    check(&g.run(), Action::Decline, Reason::DeclinePanicInProgress);
}

#[test]
fn the_kill_leaves_the_nbcon_emergency_sections_of_the_stack() {
    const NESTING: u64 = 0x2_1c50;
    for read_only in [false, true] {
        let mut g = scene();
        g.layout.set(Item::PcpuNbconEmergencyNesting, NESTING);
        let a = g.percpu_area(0) + NESTING;
        g.w32(a, 2);
        let mut input = g.input();
        input.read_only = read_only as u32;
        let mut out = repair_kernel::contract::ContractOut::empty();
        repair_kernel::run(&mut repair_kernel::mem::SliceMem::new(&mut g.ram), &input, &mut out);
        check(&out, Action::Kill, Reason::KillDirectPanic);
        let why = str_of(&out.reason).to_string();
        assert!(why.contains("2 nbcon emergency section(s)"), "{why}");
        assert_eq!(g.rbytes(a, 4), if read_only { 2u32 } else { 0 }.to_le_bytes());
    }
}

#[test]
fn without_preempt_count_the_verdict_says_what_it_cannot_rule_out() {
    let mut g = scene();
    let out = g.run();
    assert!(str_of(&out.reason).contains("no CONFIG_PREEMPT_COUNT"), "{}", str_of(&out.reason));
    let mut g = scene();
    g.layout.set(Item::SymPreemptSchedule, KBASE_LINK + 0x7_0000);
    let out = g.run();
    assert!(!str_of(&out.reason).contains("CONFIG_PREEMPT_COUNT"), "{}", str_of(&out.reason));
}

/// `task_struct.softirq_disable_cnt` in the scene's layout (PREEMPT_RT).
const T_SOFTIRQ_DISABLE_CNT: u64 = 0x5c0;

#[test]
fn user_workers_are_declined_where_the_kernel_has_them() {
    // An io_uring worker of the crasher (6.4+: PF_IO_WORKER|PF_USER_WORKER,
    // the flags of create_io_thread's thread).
    let worker = |g: &mut Guest| {
        let t = g.add_task(TaskSpec { pid: 74, tgid: 73, comm: "iou-wrk-73", flags: 0x0040_4150, state: 0 });
        g.set_percpu(0, PCPU_CURRENT_TASK, t);
        g.crash_direct(t, "sysrq triggered crash", &[]);
    };
    let mut g = scene();
    worker(&mut g);
    g.layout.set(Item::KcaIoThread, 0x40);
    g.layout.set(Item::KcaUserWorker, 0x40);
    let out = g.run();
    check(&out, Action::Decline, Reason::DeclineUserWorker);
    let why = str_of(&out.reason);
    assert!(why.starts_with("iou-wrk-73 (pid 74) is an io_uring thread (PF_IO_WORKER) of process 73"), "{why}");
    assert!(why.contains("io_worker_exit"), "{why}");
    // A vhost worker: PF_USER_WORKER only.
    let mut g = scene();
    let t = g.add_task(TaskSpec { pid: 80, tgid: 79, comm: "vhost-79", flags: 0x0040_4040, state: 0 });
    g.set_percpu(0, PCPU_CURRENT_TASK, t);
    g.crash_direct(t, "sysrq triggered crash", &[]);
    g.layout.set(Item::KcaIoThread, 0x40);
    g.layout.set(Item::KcaUserWorker, 0x40);
    let out = g.run();
    check(&out, Action::Decline, Reason::DeclineUserWorker);
    assert!(str_of(&out.reason).contains("PF_USER_WORKER"), "{}", str_of(&out.reason));
    // A kernel whose kernel_clone_args has neither member gives the bits no
    // meaning: the task is a process, as before.
    let mut g = scene();
    worker(&mut g);
    check(&g.run(), Action::Kill, Reason::KillDirectPanic);
}

#[test]
fn preempt_rt_bottom_halves_come_from_the_task_and_the_kill_says_what_it_cannot_rule_out() {
    let rt_scene = |cnt: u32| {
        let mut g = scene();
        g.layout.set(Item::TaskSoftirqDisableCnt, T_SOFTIRQ_DISABLE_CNT);
        let t = g.tasks[4];
        g.w32(t + T_SOFTIRQ_DISABLE_CNT, cnt);
        g
    };
    let out = rt_scene(0).run();
    check(&out, Action::Kill, Reason::KillDirectPanic);
    let why = str_of(&out.reason);
    assert!(why.contains("PREEMPT_RT: a held spinlock (an rt_mutex, not in preempt_count) cannot be ruled out"), "{why}");
    // Bottom halves disabled (local_bh_disable: SOFTIRQ_DISABLE_OFFSET),
    // with preempt_count clean as RT leaves it.
    let out = rt_scene(0x200).run();
    check(&out, Action::Decline, Reason::DeclineBhDisabled);
    assert!(str_of(&out.reason).contains("softirq_disable_cnt=0x200"), "{}", str_of(&out.reason));
    // Serving a softirq.
    check(&rt_scene(0x100).run(), Action::Decline, Reason::DeclineSoftirq);
    // Not RT: the same bits mean nothing and no RT note is written.
    let mut g = scene();
    let t = g.tasks[4];
    g.w32(t + T_SOFTIRQ_DISABLE_CNT, 0x200);
    let out = g.run();
    check(&out, Action::Kill, Reason::KillDirectPanic);
    assert!(!str_of(&out.reason).contains("PREEMPT_RT"), "{}", str_of(&out.reason));
}

// --- a warning made fatal by panic_on_warn (repair_kernel::warn) ---------

const CHECK_PANIC_ON_WARN: u64 = KBASE_LINK + 0x10_1000;
const WARN_CALLER: u64 = KBASE_LINK + 0x10_2000;
const T_PENDING: u64 = 0x800;

/// `check_panic_on_warn` at +0x1c calls `panic`: the trap at panic's entry,
/// with check_panic_on_warn's frame above it (CFA = rsp + 0x18 at the call,
/// rbx saved at CFA-16), returning into `__warn` at WARN_CALLER + 0x50.
fn warning_scene() -> Guest {
    let mut g = scene();
    g.layout.set(Item::SymCheckPanicOnWarn, CHECK_PANIC_ON_WARN);
    g.layout.set(Item::SymCheckPanicOnWarnSize, 0x40);
    let rule = repair_kernel::frame::FrameRule { cfa_reg: 7, cfa_words: 3, saved: [2, 0, 0, 0, 0, 0] };
    g.layout.set(Item::FrameWarnCallsPanic, rule.pack());
    g.layout.set(Item::TaskPendingSignal, T_PENDING);
    g.layout.set(Item::TaskThreadInfoFlags, 0);
    g.layout.set(Item::TifSigpending, 2);
    let t = g.tasks[4];
    let origin = g.rodata_str("kernel");
    g.crash_at(t, CHECK_PANIC_ON_WARN + 0x21, "%s: panic_on_warn set ...\n", &[origin]);
    let rsp = g.regs.rsp;
    // After panic's return address: check_panic_on_warn's frame.
    g.w64(rsp + 8 + 0x10, rt(WARN_CALLER + 0x50)); // CFA - 8
    g.w64(rsp + 8 + 0x08, 0x1111_2222); // rbx at CFA - 16
    g.regs.rbx = 0xbad;
    g
}

#[test]
fn a_panic_on_warn_warning_resumes_into_the_warning_and_sigkills_the_task() {
    let mut g = warning_scene();
    let regs = g.regs;
    let t = g.tasks[4];
    let out = g.run();
    check(&out, Action::ResumeWarning, Reason::WarningResumedKill);
    assert_eq!(CrashKind::from_u32(out.crash_kind), Some(CrashKind::PanicOnWarn));
    assert_eq!(str_of(&out.message), "kernel: panic_on_warn set ...");
    let mut expect = regs;
    expect.rip = rt(WARN_CALLER + 0x50);
    expect.rsp = regs.rsp + 8 + 0x18;
    expect.rbx = 0x1111_2222;
    assert_eq!(out.resume, expect);
    // SIGKILL pending (sigset bit 8), TIF_SIGPENDING (the image's bit 2).
    assert_eq!(g.r64(t + T_PENDING), 0x100);
    assert_eq!(g.r64(t) & 0x4, 0x4);
    assert!(str_of(&out.reason).contains("pid 73 (crasher) gets SIGKILL"), "{}", str_of(&out.reason));
}

#[test]
fn a_warning_in_a_kernel_thread_resumes_with_nobody_killed() {
    let mut g = warning_scene();
    let k = g.tasks[5];
    g.set_percpu(0, PCPU_CURRENT_TASK, k);
    let out = g.run();
    check(&out, Action::ResumeWarning, Reason::WarningResumed);
    assert_eq!(g.r64(k + T_PENDING), 0);
    assert!(str_of(&out.reason).contains("kernel thread kthreadd"), "{}", str_of(&out.reason));
}

#[test]
fn a_warning_in_hardirq_context_resumes_with_nobody_killed() {
    let mut g = warning_scene();
    let area = g.percpu_area(0);
    g.w32(area + PCPU_PREEMPT_COUNT, 0x8001_0000);
    let t = g.tasks[4];
    let out = g.run();
    check(&out, Action::ResumeWarning, Reason::WarningResumed);
    assert_eq!(g.r64(t + T_PENDING), 0);
    assert!(str_of(&out.reason).contains("hardirq"), "{}", str_of(&out.reason));
}

#[test]
fn without_a_frame_rule_the_warning_task_is_killed_as_before() {
    let mut g = warning_scene();
    g.layout.set(Item::FrameWarnCallsPanic, u64::MAX);
    let out = g.run();
    check(&out, Action::Kill, Reason::KillDirectPanic);
    assert!(str_of(&out.reason).contains("could not return into the warning"), "{}", str_of(&out.reason));
    assert_eq!(out.resume.rip, rt(REWIND));
}

#[test]
fn a_hostile_return_address_is_not_resumed_into() {
    // check_panic_on_warn's return address outside kernel text.
    let mut g = warning_scene();
    let rsp = g.regs.rsp;
    g.w64(rsp + 8 + 0x10, 0x4141_4141_4141);
    let out = g.run();
    check(&out, Action::Kill, Reason::KillDirectPanic);
    assert!(str_of(&out.reason).contains("not in kernel text"), "{}", str_of(&out.reason));
    // A frame rule that points below the stack pointer, or a mile above.
    for rule in [
        repair_kernel::frame::FrameRule { cfa_reg: 6, cfa_words: 2, saved: [0; 6] },
        repair_kernel::frame::FrameRule { cfa_reg: 7, cfa_words: 255, saved: [255, 0, 0, 0, 0, 0] },
    ] {
        let mut g = warning_scene();
        g.regs.rbp = 8; // rbp-based: far below rsp
        g.layout.set(Item::FrameWarnCallsPanic, rule.pack());
        let out = g.run();
        assert_ne!(Action::from_u32(out.action), Some(Action::ResumeWarning), "{rule:?}: {}", str_of(&out.reason));
    }
}

#[test]
fn without_the_sigpending_bit_the_warning_resumes_and_nobody_is_killed() {
    let mut g = warning_scene();
    g.layout.set(Item::TifSigpending, u64::MAX);
    let t = g.tasks[4];
    let out = g.run();
    check(&out, Action::ResumeWarning, Reason::WarningResumed);
    assert_eq!(g.r64(t + T_PENDING), 0);
    assert!(str_of(&out.reason).contains("SIGKILL could not be made pending"), "{}", str_of(&out.reason));
}

#[test]
fn a_warning_in_a_user_worker_resumes_with_nobody_killed() {
    let mut g = warning_scene();
    // PF_IO_WORKER (0x10) on the warning task, on a kernel that has it.
    g.layout.set(Item::KcaIoThread, 0x40);
    let t = g.tasks[4];
    let flags = g.r64(t + T_FLAGS) as u32;
    g.w32(t + T_FLAGS, flags | 0x10);
    let out = g.run();
    check(&out, Action::ResumeWarning, Reason::WarningResumed);
    assert_eq!(g.r64(t + T_PENDING), 0);
    assert!(str_of(&out.reason).contains("a worker thread of process"), "{}", str_of(&out.reason));
}
