//! A minimal VMM embedding the repair: `kvm_vmm DUMP IMAGE [--diagnose]
//! [--run-after-ms N]`. It loads a guest crashed at `panic` (a QEMU ELF
//! dump taken at the trap) into its own KVM VM, arms the repairer, runs
//! the crashed vCPU, repairs on the debug exit, and runs the guest on.

use examples::kvm_vmm::Vmm;
use loader::flow::Mode;
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pos: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let (Some(dump), Some(image)) = (pos.first(), pos.get(1)) else {
        anyhow::bail!("usage: kvm_vmm DUMP IMAGE [--diagnose] [--run-after-ms N]");
    };
    let mode = if args.iter().any(|a| a == "--diagnose") { Mode::Diagnose } else { Mode::Repair };
    let run_after = args
        .iter()
        .position(|a| a == "--run-after-ms")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(1000), |s| s.parse::<u64>())?;
    let image = builder::RepairImage::read(image.as_ref())?;
    let mut vmm = Vmm::from_dump(dump.as_ref(), image)?;
    let vcpu = vmm.crashed_vcpu()?;
    println!("VMM: guest loaded from {dump}; {vcpu} is at panic; arming the repairer");
    let r = vmm.run(vcpu, mode, Duration::from_millis(run_after))?;
    let o = &r.outcome;
    println!("VMM: {}", r.caps);
    println!("VMM: trap at {:#x} after {} exits", r.trap_rip, r.exits_before_trap);
    println!("repair: {} {:?} pid {} ({}): {:?}", loader::flow::crash_kind_name(o.out.crash_kind), o.message(), o.out.pid, o.comm(), o.action());
    println!("repair: {}", o.reason());
    println!("repair: applied {}, vCPU resumes at {:#x}; repair kernel run {:.1} ms, total {:.1} ms", o.applied, r.resumed_at, o.timings.run, o.timings.total);
    if let Some(a) = &r.after {
        println!("VMM: ran the guest on for {run_after} ms: {a:?}");
    }
    Ok(())
}
