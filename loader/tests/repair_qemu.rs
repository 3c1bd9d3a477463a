//! The repair flow end to end on real guests under QEMU (TCG, 2 vCPUs,
//! KASLR on): crashes trapped at `panic`, the repair kernel run inside the
//! guest, verdicts applied or declined, and the guest's own account (its
//! console, its processes, its bystander's data) as the oracle.

use harness::{Guest, GuestConfig, Kernel};
use loader::access::GuestAccess;
use loader::flow::{FlowConfig, Mode, Outcome, Session};
use loader::gdb::GdbGuest;
use loader::ram::{RamFile, WithRam};
use repair_kernel::contract::Action;
use std::time::Duration;

type Backend = WithRam<GdbGuest, RamFile>;

fn boot(cfg: GuestConfig) -> Guest {
    Guest::boot(&cfg.with_ram_file()).unwrap_or_else(|e| panic!("boot: {e}"))
}

/// Attaches the flow to a booted guest: gdbstub for control, RAM file for
/// memory.
fn attach(guest: &Guest) -> (Backend, Session) {
    let image = repair_guest::kit::kit_image(guest.kernel()).expect("repair image of the kit kernel");
    let (mut g, mut session) = repair_guest::kit::attach(guest, image, FlowConfig::default()).expect("attach");
    session.arm(&mut g).unwrap();
    g.resume().unwrap();
    (g, session)
}

/// Waits for the trap at `panic` and runs the repair kernel.
fn trap_and_repair(g: &mut Backend, session: &Session, mode: Mode) -> Outcome {
    let stop = g.wait_stop(Some(Duration::from_secs(90))).unwrap().expect("a trap at panic");
    assert_eq!(stop.rip, session.panic_addr().unwrap(), "stopped elsewhere: {stop:?}");
    session.repair(g, stop.vcpu, mode).unwrap()
}

/// All of guest RAM, for before/after comparisons.
fn ram_snapshot(guest: &Guest) -> Vec<u8> {
    std::fs::read(guest.ram_file().unwrap()).unwrap()
}

fn differing_pages(a: &[u8], b: &[u8]) -> Vec<u64> {
    a.chunks(4096).zip(b.chunks(4096)).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| (i as u64) << 12).collect()
}

#[test]
fn sysrq_c_child_is_killed_and_the_guest_carries_on() {
    let mut guest = boot(GuestConfig::new(Kernel::Debian));
    let (mut g, session) = attach(&guest);
    assert!(session.slide.from_page_tables, "slide {:#x}", session.slide);

    let before = guest.ping(Duration::from_secs(30)).unwrap();
    let crash = guest.crash("sysrq-c").unwrap();
    let stop = g.wait_stop(Some(Duration::from_secs(90))).unwrap().expect("trap at panic");
    assert_eq!(stop.rip, session.panic_addr().unwrap());
    let at_trap = ram_snapshot(&guest);
    let outcome = session.repair(&mut g, stop.vcpu, Mode::Repair).unwrap();
    // Just before resume, RAM is as it was at the trap: the kill changes
    // registers only, and the borrowed range is restored byte for byte.
    let before_resume = ram_snapshot(&guest);
    assert_eq!(differing_pages(&at_trap, &before_resume), Vec::<u64>::new());

    eprintln!("verdict: {:?} / {} / {} / {:?}", outcome.action(), outcome.message(), outcome.reason(), outcome.timings);
    assert_eq!(outcome.action(), Action::Kill, "{}", outcome.reason());
    assert_eq!(outcome.message(), "sysrq triggered crash");
    assert_eq!(outcome.out.pid as u32, crash.pid);
    assert_eq!(outcome.comm(), "sh");
    assert!(outcome.applied);
    g.resume().unwrap();

    let status = guest.wait_crash_exit(&crash, Duration::from_secs(60)).unwrap();
    assert_eq!(status, 137, "console:\n{}", guest.console_tail(40));
    let after = guest.ping(Duration::from_secs(30)).unwrap();
    assert!(after > before, "bystander stalled: {before} -> {after}");
    let v = guest.verify_bystander().unwrap();
    assert!(v.ok, "{v:?}");
    let r = guest.run("echo alive", Duration::from_secs(30)).unwrap();
    assert_eq!(r.output, ["alive"]);
    assert!(!guest.console().contains("Kernel panic"), "the panic went on:\n{}", guest.console_tail(30));
}

#[test]
fn twenty_crashes_in_a_row_are_each_repaired() {
    let mut guest = boot(GuestConfig::new(Kernel::Debian));
    let (mut g, session) = attach(&guest);
    let mut last = guest.ping(Duration::from_secs(30)).unwrap();
    for i in 0..20 {
        let crash = guest.crash("sysrq-c").unwrap();
        let o = trap_and_repair(&mut g, &session, Mode::Repair);
        assert_eq!(o.action(), Action::Kill, "crash {i}: {}", o.reason());
        assert_eq!(o.out.pid as u32, crash.pid, "crash {i}");
        g.resume().unwrap();
        assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(60)).unwrap(), 137, "crash {i}");
        let n = guest.ping(Duration::from_secs(30)).unwrap();
        assert!(n >= last, "crash {i}: bystander went back {last} -> {n}");
        last = n;
    }
    let v = guest.verify_bystander().unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(guest.run("echo alive", Duration::from_secs(30)).unwrap().output, ["alive"]);
}

#[test]
fn diagnose_matches_the_guests_own_report_and_changes_nothing() {
    let mut guest = boot(GuestConfig::new(Kernel::Debian));
    let (mut g, mut session) = attach(&guest);
    let kit = harness::Kit::locate().unwrap();
    let sym = loader::symbolize::Symbolizer::from_vmlinux(&kit.vmlinux(Kernel::Debian).unwrap()).unwrap();

    let crash = guest.crash("sysrq-c").unwrap();
    let stop = g.wait_stop(Some(Duration::from_secs(90))).unwrap().expect("trap");
    let before = ram_snapshot(&guest);
    let regs_before = g.get_regs(stop.vcpu).unwrap();
    let report = loader::report::diagnose(&mut g, &session, stop.vcpu, Some(&sym), 40).unwrap();
    assert_eq!(differing_pages(&before, &ram_snapshot(&guest)), Vec::<u64>::new(), "diagnose changed guest RAM");
    assert_eq!(g.get_regs(stop.vcpu).unwrap(), regs_before, "diagnose changed registers");
    eprintln!("{}", repair_guest::render::render_text(&report));

    // Let the panic complete, exactly as it would have without us, and
    // compare with the guest's own report.
    session.disarm(&mut g).unwrap();
    g.resume().unwrap();
    let p = guest.wait_panic(Duration::from_secs(60)).unwrap();
    assert_eq!(report.message, p.message);
    assert_eq!(report.pid as u32, p.pid);
    assert_eq!(report.pid as u32, crash.pid);
    assert_eq!(report.comm, p.comm);
    assert_eq!(report.cpu, p.cpu);
    // The guest's trace starts inside panic (dump_stack_lvl, panic); ours
    // starts at panic's entry. From `panic` on, the top frames agree.
    let ours: Vec<&str> = report.backtrace.iter().filter_map(|f| f.function.as_deref()).collect();
    let theirs: Vec<&str> = p.call_trace.iter().map(String::as_str).skip_while(|f| *f != "panic").collect();
    assert!(theirs.len() >= 4, "guest trace {:?}", p.call_trace);
    assert_eq!(&ours[..4], &theirs[..4], "ours {ours:?} vs guest {theirs:?}");
    assert!(report.backtrace[0].text.contains("kernel/panic.c"), "{:?}", report.backtrace[0]);
    // The task list has the guest's own processes.
    assert!(report.tasks.iter().any(|t| t.pid == 1 && t.comm == "init"), "{:?}", report.tasks);
    assert!(report.tasks.iter().any(|t| t.pid as u32 == crash.pid));
    // The log tail ends with the guest's last messages before the panic.
    assert!(report.log_tail.iter().any(|l| l.contains("sysrq: Trigger a crash")), "{:?}", report.log_tail);
}

#[test]
fn a_crash_of_init_is_declined_and_the_panic_completes() {
    let mut guest = boot(GuestConfig::new(Kernel::Debian));
    let (mut g, session) = attach(&guest);
    guest.crash_init().unwrap();
    let o = trap_and_repair(&mut g, &session, Mode::Repair);
    assert_eq!(o.action(), Action::Decline, "{}", o.reason());
    assert!(!o.applied);
    assert_eq!(o.out.pid, 1);
    assert!(o.reason().contains("init"), "{}", o.reason());
    g.resume().unwrap();
    let p = guest.wait_panic(Duration::from_secs(60)).unwrap();
    assert_eq!(p.message, "sysrq triggered crash");
    assert_eq!(p.pid, 1);
}

#[test]
fn a_panic_in_interrupt_context_is_declined_and_the_panic_completes() {
    // The soft-lockup watchdog panics from its hrtimer, in hardirq context.
    let mut guest = boot(
        GuestConfig::new(Kernel::Lkdtm).append("softlockup_panic=1").append("watchdog_thresh=1"),
    );
    let (mut g, session) = attach(&guest);
    let _spinner = guest.crash("SOFTLOCKUP").unwrap();
    let o = trap_and_repair(&mut g, &session, Mode::Repair);
    assert_eq!(o.action(), Action::Decline, "{} / {}", o.message(), o.reason());
    assert!(!o.applied);
    assert!(o.reason().contains("irq"), "{}", o.reason());
    g.resume().unwrap();
    let p = guest.wait_panic(Duration::from_secs(60)).unwrap();
    assert!(p.message.contains("softlockup"), "{}", p.message);
    assert_eq!(o.message(), p.message);
}

#[test]
fn a_live_snapshot_matches_and_corrupted_text_is_reported() {
    let guest = boot(GuestConfig::new(Kernel::Debian));
    let image = repair_guest::kit::kit_image(Kernel::Debian).unwrap();
    let (mut g, mut session) = repair_guest::kit::attach(&guest, image, FlowConfig::default()).unwrap();
    let kit = harness::Kit::locate().unwrap();
    let sym = loader::symbolize::Symbolizer::from_vmlinux(&kit.vmlinux(Kernel::Debian).unwrap()).unwrap();

    let stats = loader::snapshot::take_live_snapshot(&mut g, &mut session, false, |_, _| {}).unwrap();
    assert!(stats.pages > 2000, "{stats:?}");
    let vcpu = loader::access::VcpuId(0);
    let healthy = loader::report::diagnose(&mut g, &session, vcpu, Some(&sym), 10).unwrap();
    assert_eq!(healthy.integrity.snapshot, "live guest");
    assert_eq!(healthy.integrity.mismatched, 0, "{:?}", healthy.integrity.pages);
    assert!(healthy.integrity.checked as usize >= stats.pages);

    // Corrupt one kernel function's text from outside (through the
    // gdbstub, so QEMU drops its translations of it).
    let link = sym.address_of("sysrq_handle_crash").unwrap();
    let gva = loader::access::Gva(session.slide.run_addr(link).0 + 2);
    g.write_virt(vcpu, gva, &[0x0f, 0x0b, 0x0f, 0x0b]).unwrap();
    let hurt = loader::report::diagnose(&mut g, &session, vcpu, Some(&sym), 10).unwrap();
    assert_eq!(hurt.integrity.mismatched, 1, "{:?}", hurt.integrity.pages);
    assert!(hurt.integrity.pages[0].starts_with(&format!("{:#x}", (link + 2) & !0xfff)), "{:?}", hurt.integrity.pages);
}
