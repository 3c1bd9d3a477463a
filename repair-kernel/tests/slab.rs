//! An oops inside the slab allocator's own code (a corrupt heap) is
//! declined, not killed; elsewhere, or where the check cannot be made, the
//! verdict stands and says what it could not check. Through `run` on an
//! in-memory guest, with the oops's `pt_regs` on the crashed task's stack.
mod common;
use common::*;

use repair_kernel::contract::{Action, ContractOut, CpuState, RunStatus};
use repair_kernel::fmtbuf::FmtBuf;
use repair_kernel::layout::Item;
use repair_kernel::slab::{self, AllocatorCheck};
use repair_kernel::mem::Gva;
use repair_kernel::verdict::{Reason, Verdict};

// struct pt_regs of x86_64.
const R_IP: u64 = 128;
const R_CS: u64 = 136;
const R_FLAGS: u64 = 144;
const R_SP: u64 = 152;
const R_SIZE: u64 = 168;

/// mm/slub.c's code in the fake kernel: its text and a small cold part.
const SLUB: (u64, u64) = (KBASE_LINK + 0x30_0000, KBASE_LINK + 0x30_8000);
const SLUB_COLD: (u64, u64) = (KBASE_LINK + 0x70_0000, KBASE_LINK + 0x70_0400);

fn with_slub_ranges(g: &mut Guest) {
    for (i, v) in [
        (Item::SlubCode0Start, SLUB.0),
        (Item::SlubCode0End, SLUB.1),
        (Item::SlubCode1Start, SLUB_COLD.0),
        (Item::SlubCode1End, SLUB_COLD.1),
        (Item::PtRegsSize, R_SIZE),
        (Item::PtRegsIp, R_IP),
        (Item::PtRegsCs, R_CS),
        (Item::PtRegsFlags, R_FLAGS),
        (Item::PtRegsSp, R_SP),
    ] {
        g.layout.set(i, v);
    }
}

/// An oops of the crasher (pid 73) from `oops_end`, its exception frame
/// `frame_off` bytes above panic's rsp, faulting at link-time `ip`.
fn oops_at(ip: u64, cs: u64) -> Guest {
    let mut g = scene();
    let crasher = g.tasks[4];
    g.crash_oops(crasher);
    let frame = g.regs.rsp + 0x108;
    g.w64(frame + R_IP, rt(ip));
    g.w64(frame + R_CS, cs);
    g.w64(frame + R_FLAGS, 0x10246);
    // The CPU pushed the frame below the interrupted rsp, aligned to 16.
    g.w64(frame + R_SP, frame + R_SIZE + 8);
    g.w64(frame + R_SP + 8, 0x18);
    // A load through a corrupt freelist pointer: `mov (%rsi),%rax`.
    g.wbytes(rt(ip), &[0x48, 0x8b, 0x06]);
    g
}

fn verdict(out: &ContractOut) -> (Option<Action>, Option<Reason>, String) {
    assert_eq!(out.status, RunStatus::Done as u32);
    (Action::from_u32(out.action), Reason::from_u32(out.reason_code), str_of(&out.reason).to_string())
}

#[test]
fn an_oops_in_the_allocator_is_declined_with_the_reason() {
    for ip in [SLUB.0, SLUB.0 + 0x1234, SLUB.1 - 1, SLUB_COLD.0 + 0x10] {
        let mut g = oops_at(ip, 0x10);
        with_slub_ranges(&mut g);
        let out = g.run();
        let (action, reason, why) = verdict(&out);
        assert_eq!(action, Some(Action::Decline), "{ip:#x}: {why}");
        assert_eq!(reason, Some(Reason::DeclineSlabCorrupt), "{why}");
        assert!(why.contains("inside the slab allocator (mm/slub.c): the heap is corrupt"), "{why}");
        assert!(why.contains(&format!("rip {:#x}", rt(ip))), "{why}");
        assert!(why.contains("killing pid 73 (crasher) cannot repair it"), "{why}");
        assert!(why.ends_with("letting the panic complete"), "cut: {why}");
        assert!(!why.contains("killing pid 73 (crasher) with SIGKILL"), "the kill's text is replaced: {why}");
        // Declined: the guest resumes as trapped.
        assert_eq!(out.resume, g.regs);
        assert_eq!(out.pid, 73);
    }
}

#[test]
fn the_allocators_own_bug_check_kills_the_caller_and_says_so() {
    // SLAB_FREE_DOUBLE on a hardened freelist: set_freepointer's BUG_ON.
    let mut g = oops_at(SLUB.0 + 0x80, 0x10);
    with_slub_ranges(&mut g);
    g.wbytes(rt(SLUB.0 + 0x80), &repair_kernel::slab::UD2);
    let (action, reason, why) = verdict(&g.run());
    assert_eq!((action, reason), (Some(Action::Kill), Some(Reason::KillAfterOops)), "{why}");
    assert!(why.contains("a BUG() check in mm/slub.c caught the bad call"), "{why}");
}

#[test]
fn an_oops_executing_data_has_its_frame_found() {
    // EXEC_DATA: the faulting ip is not text; the frame is still the oops's.
    let mut g = oops_at(KBASE_LINK + 0x90_0000, 0x10);
    with_slub_ranges(&mut g);
    let (action, reason, why) = verdict(&g.run());
    assert_eq!((action, reason), (Some(Action::Kill), Some(Reason::KillAfterOops)), "{why}");
    assert!(!why.contains("allocator"), "{why}");
}

#[test]
fn an_oops_elsewhere_is_killed_as_before() {
    for ip in [SLUB.0 - 1, SLUB.1, SLUB_COLD.1, KBASE_LINK + 0x20_0000] {
        let mut g = oops_at(ip, 0x10);
        with_slub_ranges(&mut g);
        let (action, reason, why) = verdict(&g.run());
        assert_eq!((action, reason), (Some(Action::Kill), Some(Reason::KillAfterOops)), "{ip:#x}: {why}");
        assert!(!why.contains("allocator"), "{why}");
    }
}

#[test]
fn without_the_allocators_ranges_the_kill_says_the_check_could_not_be_made() {
    // A BTF-only image: no compile units, no ranges.
    let mut g = oops_at(SLUB.0 + 0x40, 0x10);
    with_slub_ranges(&mut g);
    for i in [Item::SlubCode0Start, Item::SlubCode0End, Item::SlubCode1Start, Item::SlubCode1End] {
        g.layout.set(i, u64::MAX);
    }
    let (action, reason, why) = verdict(&g.run());
    assert_eq!((action, reason), (Some(Action::Kill), Some(Reason::KillAfterOops)), "{why}");
    assert!(why.contains("slab allocator check not made (image lacks mm/slub.c ranges"), "{why}");
}

#[test]
fn frames_the_cpu_could_not_have_pushed_are_not_taken_for_the_oops() {
    // A user-mode frame (cs 0x33): no kernel-mode exception frame at all.
    let mut g = oops_at(SLUB.0 + 0x40, 0x33);
    with_slub_ranges(&mut g);
    let (action, _, why) = verdict(&g.run());
    assert_eq!(action, Some(Action::Kill), "{why}");
    assert!(why.contains("slab allocator check not made (no exception frame found)"), "{why}");

    // A kernel cs, but the saved sp is not where the push started.
    let mut g = oops_at(SLUB.0 + 0x40, 0x10);
    with_slub_ranges(&mut g);
    let frame = g.regs.rsp + 0x108;
    g.w64(frame + R_SP, frame + 0x1000);
    let (action, _, why) = verdict(&g.run());
    assert_eq!(action, Some(Action::Kill), "{why}");

    // Reserved RFLAGS bits set.
    let mut g = oops_at(SLUB.0 + 0x40, 0x10);
    with_slub_ranges(&mut g);
    g.w64(frame + R_FLAGS, 0xdead_0000_0000_0246);
    let (action, _, why) = verdict(&g.run());
    assert_eq!(action, Some(Action::Kill), "{why}");

    // A user stack selector above sp.
    let mut g = oops_at(SLUB.0 + 0x40, 0x10);
    with_slub_ranges(&mut g);
    g.w64(frame + R_SP + 8, 0x2b);
    let (action, _, why) = verdict(&g.run());
    assert_eq!(action, Some(Action::Kill), "{why}");
}

#[test]
fn a_direct_panic_is_not_an_oops_and_is_not_checked() {
    let mut g = scene();
    with_slub_ranges(&mut g);
    // A frame in the allocator on the stack, but the panic is sysrq-c's.
    let frame = g.regs.rsp + 0x108;
    g.w64(frame + R_IP, rt(SLUB.0 + 0x40));
    g.w64(frame + R_CS, 0x10);
    g.w64(frame + R_FLAGS, 0x246);
    g.w64(frame + R_SP, frame + R_SIZE + 8);
    let (action, reason, why) = verdict(&g.run());
    assert_eq!((action, reason), (Some(Action::Kill), Some(Reason::KillDirectPanic)), "{why}");
    assert!(!why.contains("allocator"), "{why}");
}

#[test]
fn the_decision_alone() {
    let kill = Verdict { action: Action::Kill, reason: Reason::KillAfterOops, resume: CpuState { rip: 1, ..CpuState::default() } };
    let decline = Verdict { action: Action::Decline, reason: Reason::DeclineInit, resume: CpuState::default() };
    let inside = AllocatorCheck::Inside { rip: Gva(0xffff_ffff_a130_0040), regs: Gva(0xffff_c900_0001_3f08) };
    let mut buf = [0u8; 1024];

    let mut w = FmtBuf::new(&mut buf);
    let _ = core::fmt::Write::write_str(&mut w, "killing pid 9 (awk) with SIGKILL");
    let v = slab::apply(inside, kill, 9, "awk", &mut w);
    assert_eq!((v.action, v.reason), (Action::Decline, Reason::DeclineSlabCorrupt));
    assert_eq!(v.resume, CpuState::default());
    let why = std::str::from_utf8(w.as_bytes()).unwrap().to_string();
    assert!(why.starts_with("the oops faulted at rip 0xffffffffa1300040"), "{why}");
    assert!(why.contains("killing pid 9 (awk) cannot repair it"), "{why}");

    // A decline stays the decline it was, its text untouched.
    let mut w = FmtBuf::new(&mut buf);
    let _ = core::fmt::Write::write_str(&mut w, "init");
    let v = slab::apply(inside, decline, 1, "init", &mut w);
    assert_eq!((v.action, v.reason), (Action::Decline, Reason::DeclineInit));
    assert_eq!(w.as_bytes(), b"init");

    // Outside the allocator, or not an oops: the kill stands, unchanged.
    for c in [AllocatorCheck::Outside { rip: Gva(5) }, AllocatorCheck::NotAnOops] {
        let mut w = FmtBuf::new(&mut buf);
        let _ = core::fmt::Write::write_str(&mut w, "k");
        let v = slab::apply(c, kill, 9, "awk", &mut w);
        assert_eq!((v.action, v.reason, v.resume.rip), (Action::Kill, Reason::KillAfterOops, 1));
        assert_eq!(w.as_bytes(), b"k");
    }
}
