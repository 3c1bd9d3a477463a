//! The KVM backend on a tiny hand-made long-mode guest: memory, registers,
//! MSRs, snapshots, breakpoints, runs to a `hlt`, timeouts.
//!
//! Without `/dev/kvm` these tests fail; `CRASH_REPAIR_SKIP_KVM=1` skips
//! them, saying why.

use kvm_bindings::{kvm_segment, KVM_MAX_CPUID_ENTRIES};
use loader::access::{BpKind, GuestAccess, Gpa, Gva, RunOutcome, StopReason, VcpuId};
use loader::kvm::memory::{OwnedMmap, Region};
use loader::kvm::vcpu::{MSR_LSTAR, MSR_KERNEL_GS_BASE};
use loader::kvm::{Caps, GuestMemory, KvmGuest, StagingSlot};
use std::time::{Duration, Instant};

const CODE: u64 = 0x10000;
const RAM: usize = 4 << 20;

fn skip() -> bool {
    match loader::kvm::skip_reason().expect("/dev/kvm") {
        Some(why) => {
            eprintln!("{why}");
            true
        }
        None => false,
    }
}

/// 4 MiB of RAM identity-mapped with 2 MiB pages (PML4 0x1000, PDPT
/// 0x2000, PD 0x3000), `code` at 0x10000, one vCPU in 64-bit mode there
/// with IF=0 and the stack at 0x8000.
fn tiny_guest(code: &[u8]) -> KvmGuest {
    let kvm = loader::kvm::open().unwrap();
    let caps = Caps::probe(&kvm);
    let vm = kvm.create_vm().unwrap();
    let _ = vm.set_tss_address(0xfffb_d000);
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap()).unwrap();
    let mut g = KvmGuest::new(vm, vec![vcpu], GuestMemory::default(), caps);
    g.add_region(0, Region::owned(Gpa(0), OwnedMmap::anonymous(RAM).unwrap())).unwrap();
    g.write_phys(Gpa(0x1000), &(0x2000u64 | 3).to_le_bytes()).unwrap();
    g.write_phys(Gpa(0x2000), &(0x3000u64 | 3).to_le_bytes()).unwrap();
    g.write_phys(Gpa(0x3000), &(0x83u64).to_le_bytes()).unwrap();
    g.write_phys(Gpa(0x3008), &((2u64 << 20) | 0x83).to_le_bytes()).unwrap();
    g.write_phys(Gpa(CODE), code).unwrap();
    let v = g.vcpu(VcpuId(0)).unwrap();
    let mut s = v.sregs().unwrap();
    let seg = |sel: u16, ty: u8, l: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: ty,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.cs = seg(0x10, 0xb, 1);
    s.ds = seg(0x18, 0x3, 0);
    s.es = s.ds;
    s.fs = s.ds;
    s.gs = s.ds;
    s.ss = s.ds;
    s.tr = kvm_segment { type_: 0xb, s: 0, selector: 0x28, limit: 0x67, ..seg(0x28, 0xb, 0) };
    s.cr3 = 0x1000;
    s.cr4 = 1 << 5; // PAE
    s.cr0 = 0x8000_0011; // PG, ET, PE
    s.efer = (1 << 8) | (1 << 10); // LME, LMA
    v.set_sregs(&s).unwrap();
    let mut r = v.regs().unwrap();
    r.rip = CODE;
    r.rsp = 0x8000;
    r.rflags = 0x2;
    v.set_regs(&r).unwrap();
    g
}

/// mov rax, 0x1234; mov edx, 0x501; out dx, al; hlt
const DONE: &[u8] = &[0x48, 0xc7, 0xc0, 0x34, 0x12, 0, 0, 0xba, 0x01, 0x05, 0, 0, 0xee, 0xf4];
const DONE_HLT: u64 = CODE + 13;

#[test]
fn runs_to_the_completion_hlt() {
    if skip() {
        return;
    }
    let mut g = tiny_guest(DONE);
    let t = Instant::now();
    let out = g.run_vcpu_until(VcpuId(0), Gva(DONE_HLT), Duration::from_secs(20)).unwrap();
    eprintln!("a 4-instruction run, with its breakpoint and kick thread: {:?}", t.elapsed());
    assert!(matches!(out, RunOutcome::Reached(e) if e.rip == Gva(DONE_HLT)), "{out:?}");
    let regs = g.get_regs(VcpuId(0)).unwrap();
    assert_eq!(regs.rax, 0x1234);
    assert_eq!(regs.rip, DONE_HLT);
    assert_eq!(regs.cr3, 0x1000);
}

#[test]
fn an_endless_loop_times_out() {
    if skip() {
        return;
    }
    let mut g = tiny_guest(&[0xeb, 0xfe]);
    let t = Instant::now();
    let out = g.run_vcpu_until(VcpuId(0), Gva(0xdead), Duration::from_millis(300)).unwrap();
    assert!(matches!(out, RunOutcome::TimedOut(e) if e.rip == Gva(CODE)), "{out:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "kicked out in {:?}", t.elapsed());
}

#[test]
fn hardware_breakpoint_stops_and_resume_steps_over_it() {
    if skip() {
        return;
    }
    // nop; nop; nop; hlt
    let mut g = tiny_guest(&[0x90, 0x90, 0x90, 0xf4]);
    if !g.caps().guest_debug {
        let e = g.set_breakpoint(Gva(CODE + 2), BpKind::Hardware).unwrap_err();
        eprintln!("no KVM_CAP_SET_GUEST_DEBUG here: {e}");
        return;
    }
    assert!(g.set_breakpoint(Gva(CODE + 2), BpKind::Software).is_err(), "software breakpoints are refused");
    g.set_breakpoint(Gva(CODE + 2), BpKind::Hardware).unwrap();
    g.resume().unwrap();
    let stop = g.wait_stop(Some(Duration::from_secs(20))).unwrap().expect("stop at the breakpoint");
    assert_eq!((stop.vcpu, stop.rip, stop.reason), (VcpuId(0), Gva(CODE + 2), StopReason::Trap));
    // Resuming steps over it to the hlt: nothing wakes a halted vCPU.
    g.resume().unwrap();
    assert_eq!(g.wait_stop(Some(Duration::from_millis(500))).unwrap(), None);
    g.pause().unwrap();
    assert_eq!(g.get_regs(VcpuId(0)).unwrap().rip, CODE + 4);
    g.clear_breakpoint(Gva(CODE + 2), BpKind::Hardware).unwrap();
}

#[test]
fn registers_msrs_and_fpu_round_trip_through_a_snapshot() {
    if skip() {
        return;
    }
    let mut g = tiny_guest(DONE);
    let caps = *g.caps();
    let legacy = g.legacy_xsave_ok();
    let v = g.vcpu(VcpuId(0)).unwrap();
    v.set_msrs(&[(MSR_LSTAR, 0xffff_ffff_8180_0000), (MSR_KERNEL_GS_BASE, 0x7f00_0000_1000)]).unwrap();
    let snap = v.snapshot(&caps, legacy).unwrap();
    assert!(snap.msrs.contains(&(MSR_LSTAR, 0xffff_ffff_8180_0000)), "{:?}", snap.msrs);

    let mut st = g.get_regs(VcpuId(0)).unwrap();
    assert_eq!(st.kernel_gs_base, 0x7f00_0000_1000);
    st.rbx = 42;
    st.rip = CODE + 7;
    st.kernel_gs_base = 5;
    st.gs_base = 0x1000;
    g.set_regs(VcpuId(0), &st).unwrap();
    assert_eq!(g.get_regs(VcpuId(0)).unwrap(), st);
    let mut bad = st;
    bad.cs = 0x33;
    assert!(g.set_regs(VcpuId(0), &bad).is_err(), "a selector change is refused");

    let v = g.vcpu(VcpuId(0)).unwrap();
    let mut fpu = v.fpu().unwrap();
    fpu.xmm[0] = [7; 16];
    v.set_fpu(&fpu).unwrap();
    v.set_msrs(&[(MSR_LSTAR, 1 << 47 | 0xffff_0000_0000_0000)]).unwrap();
    v.restore(&snap).unwrap();
    let after = v.snapshot(&caps, legacy).unwrap();
    assert_eq!(after.regs, snap.regs);
    assert_eq!(after.sregs, snap.sregs);
    assert_eq!(after.msrs, snap.msrs);
    assert_ne!(v.fpu().unwrap().xmm[0], [7; 16], "the FPU state came back");
}

#[test]
fn memory_virtual_access_and_the_staging_slot() {
    if skip() {
        return;
    }
    let mut g = tiny_guest(DONE);
    let mut b = [0u8; 2];
    g.read_virt(VcpuId(0), Gva(CODE + 12), &mut b).unwrap();
    assert_eq!(b, [0xee, 0xf4]);
    g.write_virt(VcpuId(0), Gva(0x1f_fffe), &[1, 2, 3, 4]).unwrap();
    let mut c = [0u8; 4];
    g.read_phys(Gpa(0x1f_fffe), &mut c).unwrap();
    assert_eq!(c, [1, 2, 3, 4]);
    assert!(g.read_phys(Gpa(RAM as u64), &mut c).is_err(), "nothing above RAM yet");

    let st = StagingSlot::above_ram(g.memory(), 1);
    assert_eq!(st.gpa, RAM as u64);
    assert!(g.add_staging(StagingSlot { slot: 2, gpa: 0x10_0000, size: 0x20_0000 }).is_err(), "overlaps RAM");
    g.add_staging(st).unwrap();
    assert_eq!(g.ram_end(), RAM as u64, "the staging slot is not RAM");
    g.write_phys(Gpa(st.gpa + 8), &[9]).unwrap();
    // The vCPU sees the slot too (identity map of the first 4 MiB only, so
    // through a physical read of the host side here).
    let mut d = [0u8; 1];
    g.read_phys(Gpa(st.gpa + 8), &mut d).unwrap();
    assert_eq!(d, [9]);
    assert!(g.signal_pause() <= 1);
}

#[test]
fn a_vcpu_lent_to_the_vmm_runs_on_its_thread_and_comes_back() {
    if skip() {
        return;
    }
    // nop; nop; nop; hlt
    let mut g = tiny_guest(&[0x90, 0x90, 0x90, 0xf4]);
    if !g.caps().guest_debug {
        return;
    }
    g.set_breakpoint(Gva(CODE + 2), BpKind::Hardware).unwrap();
    let mut v = g.take_vcpu(VcpuId(0)).unwrap();
    assert!(g.get_regs(VcpuId(0)).is_err(), "a lent vCPU is refused");
    assert!(g.take_vcpu(VcpuId(0)).is_err());
    // The VMM's vCPU thread: runs until the debug exit.
    let v = std::thread::spawn(move || {
        match v.fd.run().unwrap() {
            kvm_ioctls::VcpuExit::Debug(d) => assert_eq!(d.pc, CODE + 2),
            other => panic!("{other:?}"),
        }
        v
    })
    .join()
    .unwrap();
    g.put_vcpu(v).unwrap();
    assert_eq!(g.get_regs(VcpuId(0)).unwrap().rip, CODE + 2);
    g.step_over_breakpoint(VcpuId(0)).unwrap();
    assert_eq!(g.get_regs(VcpuId(0)).unwrap().rip, CODE + 3);
}
