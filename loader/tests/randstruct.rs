//! Crashes repaired on the kit's hardened kernel (issue 17): structure layout
//! randomization (`RANDSTRUCT_FULL`, `task_struct`'s randomized part
//! shuffled) and full `PREEMPT`. Every offset the repair kernel uses must
//! come from this build's own layout; the guest's own report (its console's
//! `CPU: N PID: P Comm: C` line, the child's exit status) is the oracle.

use harness::{Guest, GuestConfig, Kernel};
use loader::access::GuestAccess;
use loader::flow::{FlowConfig, Mode, Session};
use loader::gdb::GdbGuest;
use loader::ram::{RamFile, WithRam};
use repair_kernel::contract::Action;
use std::time::Duration;

type Backend = WithRam<GdbGuest, RamFile>;

fn boot_and_attach(append: &[&str]) -> (Guest, Backend, Session) {
    let mut cfg = GuestConfig::new(Kernel::Randstruct).with_ram_file();
    for a in append {
        cfg = cfg.append(a);
    }
    let guest = Guest::boot(&cfg).unwrap_or_else(|e| panic!("boot: {e}"));
    let image = repair_guest::kit::kit_image(Kernel::Randstruct).expect("repair image of the randstruct kernel");
    let (mut g, mut session) = repair_guest::kit::attach(&guest, image, FlowConfig::default()).expect("attach");
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
    assert_eq!(stop.rip, session.panic_addr().unwrap(), "{kind}: stopped elsewhere: {stop:?}");
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
    // The CPU is the one the task was on at the trap. This kernel is fully
    // preemptible and panic() runs with IRQs on until its first
    // local_irq_disable(), so between the trap and the guest's own report
    // the task may be preempted and moved to the other CPU (seen on a loaded
    // host): the report's CPU must be one of the guest's, the task the same.
    assert!(report.cpu == p.cpu || report.cpu < 2, "report CPU {} vs the guest's {}", report.cpu, p.cpu);
    assert_eq!((report.pid as u32, report.comm.as_str()), (p.pid, p.comm.as_str()));
    assert_eq!(report.pid as u32, crash.pid);
    assert!(report.tasks.iter().any(|t| t.pid == 1 && t.comm == "init"), "{:?}", report.tasks);
    assert!(report.log_tail.iter().any(|l| l.contains("sysrq: Trigger a crash")), "{:?}", report.log_tail);
}

/// The hang sampler's view of each CPU (read from guest RAM while the guest
/// runs, through this build's randomized `task_struct` offsets) is the
/// guest's: with a CPU-bound loop pinned to each of the 2 vCPUs, the task
/// the sampler finds running on CPU N is, in most samples, the loop the
/// guest pinned there: its pid (printed by the guest) and comm `sh`, and
/// the guest's own `/proc/PID/stat` says it runs on CPU N. Most, not all:
/// the bystander, kworkers and our own commands run now and then.
#[test]
fn hang_sampler_sees_each_cpus_running_task_as_the_guest_does_on_a_randstruct_preempt_kernel() {
    use loader::hang::{HangConfig, HangLayout, Sampler};
    use std::collections::HashMap;
    use std::time::Instant;

    let mut cfg = GuestConfig::new(Kernel::Randstruct).with_ram_file();
    cfg.cpus = 2;
    let mut guest = Guest::boot(&cfg).unwrap_or_else(|e| panic!("boot: {e}"));
    let image = repair_guest::kit::kit_image(Kernel::Randstruct).expect("repair image of the randstruct kernel");
    let layout = HangLayout::from_image(&image, 0).expect("hang layout of the randstruct image");
    let t = Duration::from_secs(60);

    // A CPU-bound shell loop pinned to each CPU (busybox taskset: a mask).
    let mut loops = Vec::new();
    for cpu in 0..2u32 {
        let cmd = format!("taskset {} sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 & echo $!", 1u32 << cpu);
        let r = guest.run(&cmd, t).unwrap();
        assert_eq!(r.status, 0, "{cmd}: {r:?}");
        let pid: i32 = r.output.last().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("{cmd}: no pid in {r:?}"));
        loops.push(pid);
    }
    // The guest's own view: field 39 of /proc/PID/stat is the CPU the task
    // last ran on (comm, field 2, is `(sh)`: no space to split on).
    let guest_view = |guest: &mut Guest| -> Vec<(String, u32)> {
        loops
            .iter()
            .map(|pid| {
                let r = guest.run(&format!("cut -d' ' -f2,39 /proc/{pid}/stat"), t).unwrap();
                let line = r.output.first().cloned().unwrap_or_else(|| panic!("/proc/{pid}/stat: {r:?}"));
                let (comm, cpu) = line.split_once(' ').unwrap_or_else(|| panic!("/proc/{pid}/stat: {line}"));
                (comm.to_string(), cpu.trim().parse().unwrap_or_else(|_| panic!("/proc/{pid}/stat: {line}")))
            })
            .collect()
    };
    let before = guest_view(&mut guest);
    assert_eq!(before, [("(sh)".to_string(), 0), ("(sh)".to_string(), 1)], "the guest's view of loops {loops:?}");

    // Attach for the slide and page tables, then let the guest go and
    // close the gdbstub: the sampler reads only the RAM file.
    let (slide, regs, nr_cpus) = {
        let (mut g, session) = repair_guest::kit::attach(&guest, image, FlowConfig::default()).expect("attach");
        g.inner.resume_on_drop = true;
        let regs = g.get_regs(loader::access::VcpuId(0)).expect("vCPU 0 registers");
        g.resume().unwrap();
        g.inner.leave(true).expect("leaving the guest running");
        (session.slide, regs, session.nr_vcpus)
    };
    assert_eq!(nr_cpus, 2);
    let mem = RamFile::open_pc_file(&guest.ram_file().unwrap()).unwrap();
    let mut sampler = Sampler::new(mem, &regs, layout.slid(slide.slide), nr_cpus, HangConfig::default());

    // ~20 samples of each CPU over 2 s, the guest running.
    const SAMPLES: usize = 20;
    let mut seen: Vec<HashMap<(i32, String), usize>> = vec![HashMap::new(); 2];
    let start = Instant::now();
    for i in 0..SAMPLES {
        for (cpu, s) in seen.iter_mut().enumerate() {
            let key = match sampler.cpu_current(cpu as u32) {
                Ok(k) => k,
                Err(e) => (-1, format!("error: {e}")),
            };
            *s.entry(key).or_default() += 1;
        }
        let next = Duration::from_millis(100) * (i as u32 + 1);
        std::thread::sleep(next.saturating_sub(start.elapsed()));
    }
    eprintln!("loops {loops:?}; sampler's view over {:?}: {seen:?}", start.elapsed());

    // The guest is alive and the loops still where they were pinned.
    let after = guest_view(&mut guest);
    assert_eq!(after, before, "the guest's view of loops {loops:?} changed");
    for (cpu, (pid, s)) in loops.iter().zip(&seen).enumerate() {
        let want = (*pid, "sh".to_string());
        let (top, n) = s.iter().max_by_key(|(_, n)| **n).map(|(k, n)| (k.clone(), *n)).unwrap();
        assert_eq!(top, want, "CPU {cpu}: the sampler's majority answer vs the loop the guest pinned there: {s:?}");
        assert!(n * 2 > SAMPLES, "CPU {cpu}: the loop in only {n} of {SAMPLES} samples: {s:?}");
    }

    // Gone, or a zombie not yet reaped by init.
    let kill = format!(
        "kill -9 {a} {b}; sleep 1; for p in {a} {b}; do s=$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null); echo ${{s:-gone}}; done",
        a = loops[0],
        b = loops[1]
    );
    let gone = guest.run(&kill, t).unwrap();
    assert!(gone.output.len() == 2 && gone.output.iter().all(|s| s == "gone" || s == "Z"), "the loops outlived kill -9: {gone:?}");
}
