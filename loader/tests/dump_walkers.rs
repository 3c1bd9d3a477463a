//! The repair kernel's walkers run on the host over a memory image of a real
//! crashed guest (QEMU `dump-guest-memory` at the trap, captured at test
//! time, not committed), checked against the guest's own account: its `ps`
//! before the crash, and the panic report and log it prints after. Once for
//! every kernel of the kit, the randomized-layout, full-PREEMPT one
//! included: a layout item the walkers take from anywhere but this build's
//! own profile shows up here as a wrong pid, comm or task list.

use harness::{Guest, GuestConfig, Kernel};
use loader::access::{Endpoint, GuestAccess};
use loader::flow::{FlowConfig, Mode, Session};
use loader::gdb::GdbGuest;
use loader::replay::CoreDump;
use repair_kernel::contract::{field_str, ContractOut};
use repair_kernel::mem::SliceMem;
use repair_kernel::task::{self, TaskInfo};
use std::collections::BTreeMap;
use std::time::Duration;

/// Processes that come and go on their own (the bystander's helpers, the
/// shells its awk forks, workqueue threads): not part of the comparison.
fn transient(comm: &str, ppid: i32, bystander: i32) -> bool {
    matches!(comm, "usleep" | "ps") || comm.starts_with("kworker/") || ppid == bystander
}

#[test]
fn walkers_on_a_crash_dump_match_the_guests_ps_panic_and_log() {
    walkers_on_a_crash_dump(Kernel::Debian);
}

#[test]
fn walkers_on_a_crash_dump_of_the_lkdtm_kernel() {
    walkers_on_a_crash_dump(Kernel::Lkdtm);
}

#[test]
fn walkers_on_a_crash_dump_of_the_randstruct_preempt_kernel() {
    walkers_on_a_crash_dump(Kernel::Randstruct);
}

/// Every kernel of the kit has its test above.
#[test]
fn every_kit_kernel_is_covered() {
    assert_eq!(Kernel::ALL, [Kernel::Debian, Kernel::Lkdtm, Kernel::Randstruct]);
}

fn walkers_on_a_crash_dump(kernel: Kernel) {
    // Every log record on the console, whatever its level, so the console
    // holds the whole log.
    let mut guest = Guest::boot(&GuestConfig::new(kernel).append("ignore_loglevel")).unwrap();
    let image = repair_guest::kit::kit_image(kernel).unwrap();
    let mut g = GdbGuest::connect(guest.gdb_addr().parse::<Endpoint>().unwrap()).unwrap();
    // No RAM file: the flow probes where RAM ends through the gdbstub.
    let mut session = Session::attach(&mut g, image, FlowConfig::default()).unwrap();
    session.arm(&mut g).unwrap();
    g.resume().unwrap();

    // The guest's own ps, just before the crash.
    let ps = guest.run("ps -o pid,ppid,comm", Duration::from_secs(60)).unwrap();
    let rows: Vec<(i32, i32, String)> = ps
        .output
        .iter()
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?, it.next()?.to_string()))
        })
        .collect();
    assert!(rows.len() > 5, "{ps:?}");
    let bystander = rows.iter().find(|r| r.2 == "awk").map(|r| r.0).expect("the bystander in ps");
    // `ps` itself, and the shell that ran it if it did not exec, have
    // exited by the crash.
    let wrapper = rows.iter().find(|r| r.2 == "ps").map(|r| r.1).unwrap();
    let theirs: BTreeMap<i32, String> = rows
        .into_iter()
        .filter(|(p, pp, c)| {
            let gone = transient(c, *pp, bystander) || (*p == wrapper && c == "sh");
            !gone
        })
        .map(|(p, _, c)| (p, c))
        .collect();

    let crash = guest.crash("sysrq-c").unwrap();
    let stop = g.wait_stop(Some(Duration::from_secs(90))).unwrap().expect("trap at panic");
    let regs = g.get_regs(stop.vcpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dump_path = dir.path().join("crash.elf");
    let mut qmp = loader::qmp::Qmp::connect(&guest.qmp_addr().parse::<Endpoint>().unwrap()).unwrap();
    qmp.dump_guest_memory(&dump_path).unwrap();

    // The memory image, as RAM from physical address 0.
    let dump = CoreDump::open(&dump_path).unwrap();
    let end = dump.ram_ranges().iter().map(|r| r.1).filter(|&e| e <= 1 << 32).max().unwrap();
    let mut ram = vec![0u8; end as usize];
    dump.fill(0, &mut ram).unwrap();
    let mut mem = SliceMem::new(&mut ram);
    let input = session.contract_input(stop.vcpu, &regs, Mode::Diagnose);

    let mut out = ContractOut::empty();
    repair_kernel::run(&mut mem, &input, &mut out);
    let k = repair_kernel::kernel_view(&mut mem, &input);
    let mut ours = BTreeMap::new();
    let mut our_ppid = BTreeMap::new();
    task::for_each_process(&k, 4096, |t| {
        let info = TaskInfo::read(&k, t).unwrap();
        ours.insert(info.pid, info.comm_str().to_string());
        our_ppid.insert(info.pid, info.parent_pid);
        true
    })
    .unwrap();
    let mut log = vec![0u8; 64 * 1024];
    let n = repair_kernel::printk::log_tail(&k, 30, &mut log).unwrap();
    let log_tail: Vec<String> = String::from_utf8_lossy(&log[..n]).lines().map(str::to_string).collect();

    // Let the panic complete as it would have without us: the guest's own
    // report is the oracle.
    session.disarm(&mut g).unwrap();
    g.resume().unwrap();
    let p = guest.wait_panic(Duration::from_secs(120)).unwrap();
    assert_eq!(field_str(&out.message), p.message);
    assert_eq!(out.cpu, p.cpu);
    assert_eq!(out.pid as u32, p.pid);
    assert_eq!(out.pid as u32, crash.pid);
    assert_eq!(field_str(&out.comm), p.comm);

    // The task list is the guest's ps (plus the crashing child).
    assert_eq!(ours.get(&(crash.pid as i32)).map(String::as_str), Some("sh"));
    ours.retain(|p, c| !transient(c, our_ppid[p], bystander) && *p != crash.pid as i32);
    assert_eq!(ours, theirs, "task list (ours) vs the guest's ps");

    // The log tail is what the console printed, in order.
    let console = guest.console();
    let mut from = 0;
    let lines: Vec<&String> = log_tail.iter().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 10, "{log_tail:?}");
    for l in lines {
        let at = console[from..].find(l.as_str()).unwrap_or_else(|| panic!("log line {l:?} not on the console after byte {from}"));
        from += at + l.len();
    }
}
