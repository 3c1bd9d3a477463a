//! Crashes repaired on the kit's hardened kernel (issue 17): structure layout
//! randomization (`RANDSTRUCT_FULL`, `task_struct`'s randomized part
//! shuffled) and full `PREEMPT`. Every offset the repair kernel uses must
//! come from this build's own layout; the guest's own report (its console's
//! `CPU: N PID: P Comm: C` line, the child's exit status) is the oracle.

use harness::{Guest, GuestConfig, Kernel};
use loader::access::{Endpoint, GuestAccess};
use loader::flow::{FlowConfig, Mode, Session};
use loader::gdb::GdbGuest;
use loader::memory::{RamFile, WithRam};
use repair_kernel::contract::Action;
use std::time::Duration;

type Backend = WithRam<GdbGuest, RamFile>;

fn boot_and_attach(append: &[&str]) -> (Guest, Backend, Session) {
    let mut cfg = GuestConfig::new(Kernel::Randstruct).with_ram_file();
    for a in append {
        cfg = cfg.append(a);
    }
    let guest = Guest::boot(&cfg).unwrap_or_else(|e| panic!("boot: {e}"));
    let image = loader::demo::kit_image(Kernel::Randstruct).expect("repair image of the randstruct kernel");
    let gdb = GdbGuest::connect(guest.gdb_addr().parse::<Endpoint>().unwrap()).expect("gdbstub");
    let ram = RamFile::open_pc(&guest.ram_file().unwrap(), 0xe000_0000).unwrap();
    let mut g = WithRam::new(gdb, ram);
    let cfg = FlowConfig { ram_end: Some(512 << 20), ..FlowConfig::default() };
    let mut session = Session::attach(&mut g, image, cfg).expect("attach");
    session.arm(&mut g).unwrap();
    g.resume().unwrap();
    (guest, g, session)
}

/// Crashes a child with `kind`, repairs it, and checks the verdict against
/// the guest: the child is killed (137), the guest carries on.
fn crash_and_repair(guest: &mut Guest, g: &mut Backend, session: &Session, kind: &str, oops: bool) {
    let before = guest.ping(Duration::from_secs(60)).unwrap();
    let crash = guest.crash(kind).unwrap();
    let stop = g.wait_stop(Some(Duration::from_secs(120))).unwrap().expect("a trap at panic");
    assert_eq!(stop.rip.0, session.panic_addr().unwrap(), "{kind}: stopped elsewhere: {stop:?}");
    let o = session.repair(g, stop.vcpu, Mode::Repair).unwrap();
    eprintln!("{kind}: {:?} pid {} comm {} cpu {}: {} / {}", o.action(), o.out.pid, o.comm(), o.out.cpu, o.message(), o.reason());
    assert_eq!(o.action(), Action::Kill, "{kind}: {}", o.reason());
    assert!(o.applied, "{kind}");
    assert_eq!(o.out.pid as u32, crash.pid, "{kind}: the offender is the crashing child");
    assert_eq!(o.comm(), "sh", "{kind}");
    if oops {
        // The oops report, printed before oops_end called panic, is the
        // guest's own diagnosis.
        let (cpu, pid, comm) = harness::last_cpu_line(&guest.console()).expect("the oops's CPU line");
        assert_eq!((o.out.cpu, o.out.pid as u32, o.comm()), (cpu, pid, comm.as_str()), "{kind}: ours vs the guest's");
    }
    g.resume().unwrap();
    let status = guest.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap();
    assert_eq!(status, 137, "{kind}: console:\n{}", guest.console_tail(40));
    let after = guest.ping(Duration::from_secs(60)).unwrap();
    assert!(after >= before, "{kind}: bystander went back {before} -> {after}");
}

#[test]
fn sysrq_c_and_lkdtm_crashes_of_children_are_repaired_on_a_randstruct_preempt_kernel() {
    let (mut guest, mut g, session) = boot_and_attach(&["oops=panic"]);
    crash_and_repair(&mut guest, &mut g, &session, "sysrq-c", false);
    for kind in ["BUG", "EXCEPTION", "ACCESS_NULL"] {
        crash_and_repair(&mut guest, &mut g, &session, kind, true);
    }
    let v = guest.verify_bystander().unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(guest.run("echo alive", Duration::from_secs(60)).unwrap().output, ["alive"]);
    assert!(!guest.console().contains("Kernel panic"), "a panic went on:\n{}", guest.console_tail(30));
}

#[test]
fn diagnosis_matches_the_guests_own_panic_report_on_a_randstruct_preempt_kernel() {
    let (mut guest, mut g, mut session) = boot_and_attach(&[]);
    let crash = guest.crash("sysrq-c").unwrap();
    let stop = g.wait_stop(Some(Duration::from_secs(120))).unwrap().expect("trap");
    let report = loader::report::diagnose(&mut g, &session, stop.vcpu, None, 40).unwrap();
    session.disarm(&mut g).unwrap();
    g.resume().unwrap();
    let p = guest.wait_panic(Duration::from_secs(120)).unwrap();
    assert_eq!(report.message, p.message);
    assert_eq!((report.cpu, report.pid as u32, report.comm.as_str()), (p.cpu, p.pid, p.comm.as_str()));
    assert_eq!(report.pid as u32, crash.pid);
    assert!(report.tasks.iter().any(|t| t.pid == 1 && t.comm == "init"), "{:?}", report.tasks);
    assert!(report.log_tail.iter().any(|l| l.contains("sysrq: Trigger a crash")), "{:?}", report.log_tail);
}
