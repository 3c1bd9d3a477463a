//! The example VMM on `/dev/kvm`: a Debian guest crashed with sysrq-c is
//! trapped at `panic` under QEMU and dumped there; the VMM loads it into
//! its own KVM VM, embeds the repairer, runs the crashed vCPU, takes the
//! debug exit at `panic`, and the repair kernel kills the offender through
//! the embedding API; the guest kernel then runs on from
//! `rewind_stack_and_make_dead`.
//!
//! Without `/dev/kvm` this fails; `CRASH_REPAIR_SKIP_KVM=1` skips it,
//! saying why.

use examples::kvm_vmm::Vmm;
use harness::{GuestConfig, Kernel};
use loader::flow::Mode;
use loader::kvm::vcpu::RunExit;
use loader::replay::Verdict;
use repair_kernel::layout::Item;
use std::time::Duration;

#[test]
fn the_example_vmm_repairs_through_the_embedding_api() {
    if let Some(why) = loader::kvm::skip_reason().expect("/dev/kvm") {
        eprintln!("{why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("sysrq-c.elf");
    let c = repair_guest::replay::capture_at_trap(&GuestConfig::new(Kernel::Debian), "sysrq-c", &dump).expect("capture");

    let image = repair_guest::kit::kit_image(Kernel::Debian).unwrap();
    let mut vmm = Vmm::from_dump(&dump, image).expect("VMM with the repairer embedded");
    let rewind = vmm.repairer().session().symbol(Item::SymRewindStackAndMakeDead).unwrap();
    // A dump has no MSRs: the LSTAR cross-check of the slide cannot say.
    assert_eq!(vmm.repairer().lstar_matches_slide().unwrap(), None);
    let vcpu = vmm.crashed_vcpu().unwrap();
    let r = vmm.run(vcpu, Mode::Repair, Duration::from_secs(2)).expect("VMM run");
    eprintln!("{:?}", r.after);
    let o = &r.outcome;
    assert_eq!(r.trap_rip, vmm.repairer().session().panic_addr().unwrap().0);
    assert!(o.applied, "{}", o.reason());
    assert_eq!(o.out.pid as u32, c.crashed_pid);
    assert_eq!(o.comm(), "sh");
    assert_eq!(r.resumed_at, rewind.0, "the vCPU resumes at rewind_stack_and_make_dead");
    // The verdict is the QEMU backend's (its diagnose run on the held guest).
    let v = Verdict::of(o);
    assert_eq!(v.status, "done");
    assert_eq!(v, Verdict::of(&c.qemu));
    // The guest kernel ran on from the kill. Under this machine's PVM it may
    // stop on an instruction PVM cannot emulate; it must not triple-fault.
    match r.after {
        Some(RunExit::Shutdown) | Some(RunExit::FailEntry(_)) => panic!("the guest died after the repair: {:?}", r.after),
        _ => {}
    }
}
