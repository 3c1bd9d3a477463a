//! A corrupt slab heap, on the real 6.12 LKDTM guest (freelist hardening
//! on): LKDTM's WRITE_AFTER_FREE writes into a freed object and exits 0;
//! the next allocations from that cache follow the corrupt freelist and
//! fault inside the allocator, in whatever process allocates next. Killing
//! that process cannot repair the heap (and it did nothing wrong): the
//! verdict declines, saying so, and the guest's panic goes on exactly as it
//! would have without us. Oracles: the guest's own oops and panic report on
//! its console, and binutils' `addr2line` on the vmlinux for where the
//! faulting function lives; with `watch --checkpoint-every`, the watcher's
//! events and QEMU's run state through a second QMP monitor.

mod support;

use harness::{Guest, GuestConfig, Kernel, Kit};
use loader::access::GuestAccess;
use loader::flow::{FlowConfig, Mode};
use repair_kernel::contract::Action;
use repair_kernel::verdict::Reason;
use std::process::Command;
use std::time::Duration;
use support::*;

/// The source file of the function `func` of `vmlinux`, as binutils' `nm`
/// and `addr2line` (not our DWARF reader) give it.
fn source_file_of(vmlinux: &std::path::Path, func: &str) -> String {
    let nm = Command::new("nm").arg(vmlinux).output().expect("nm (binutils; scripts/setup installs it)");
    let text = String::from_utf8_lossy(&nm.stdout);
    let addr = text
        .lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            let (a, _t, n) = (it.next()?, it.next()?, it.next()?);
            (n == func).then(|| a.to_string())
        })
        .unwrap_or_else(|| panic!("{func} not in nm {}", vmlinux.display()));
    let out = Command::new("addr2line").arg("-e").arg(vmlinux).arg(&addr).output().expect("addr2line (binutils)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// LKDTM's WRITE_AFTER_FREE, from a shell in the guest.
const WAF: &str = "echo WRITE_AFTER_FREE > /sys/kernel/debug/provoke-crash/DIRECT";
/// Processes that allocate from kmalloc-1k, one after the other.
const ALLOCATE: &str = "i=0; while [ $i -lt 300 ]; do awk \"BEGIN{x=1}\" | cat; i=$((i+1)); done";

/// The faulting function of the guest's last oops: its `RIP: 0010:func+0x..`
/// line.
fn oops_function(console: &str) -> Option<String> {
    let line = console.lines().rev().find(|l| l.contains("RIP: 0010:"))?;
    let rest = line.split("RIP: 0010:").nth(1)?;
    Some(rest.split('+').next()?.trim().to_string())
}

#[test]
fn after_write_after_free_a_fault_in_the_allocator_is_declined_not_killed() {
    let mut cfg = GuestConfig::new(Kernel::Lkdtm612).append("oops=panic").with_ram_file();
    cfg.boot_timeout = Duration::from_secs(300);
    let mut guest = Guest::boot(&cfg).unwrap();
    let image = repair_guest::kit::kit_image(Kernel::Lkdtm612).unwrap();
    let (mut g, mut session) = repair_guest::kit::attach(&guest, image, FlowConfig::default()).unwrap();
    session.arm(&mut g).unwrap();
    g.resume().unwrap();

    // The offender corrupts the heap and exits normally: nothing traps.
    // On CPU 0, as the processes after it: the freed object is on CPU 0's
    // freelist of kmalloc-1k, which the next two allocations there follow.
    let r = guest.run(&format!("taskset 1 sh -c 'echo $$; {WAF}'"), Duration::from_secs(120)).unwrap();
    assert_eq!(r.status, 0, "{r:?}\n{}", guest.console_tail(30));
    let offender: u32 = r.output[0].trim().parse().unwrap();
    guest.wait_for_console("lkdtm: Attempting bad write to freed memory", Duration::from_secs(30)).unwrap();

    // Other processes allocate (execve's program headers, pipes: kmalloc-1k)
    // until one follows the corrupt freelist.
    let _allocating = guest.run_start(&format!("taskset 1 sh -c '{ALLOCATE}'")).unwrap();
    let stop = match g.wait_stop(Some(Duration::from_secs(240))).unwrap() {
        Some(s) => s,
        None => panic!("no trap after WRITE_AFTER_FREE; console:\n{}", guest.console_tail(40)),
    };
    let o = session.repair(&mut g, stop.vcpu, Mode::Repair).unwrap();
    eprintln!("verdict: {:?} {:?} pid {} ({}): {}", o.action(), Reason::from_u32(o.out.reason_code), o.out.pid, o.comm(), o.reason());
    eprintln!("console:\n{}", guest.console_tail(60));
    assert_eq!(o.action(), Action::Decline, "{}", o.reason());
    assert!(!o.applied);
    assert_eq!(Reason::from_u32(o.out.reason_code), Some(Reason::DeclineSlabCorrupt), "{}", o.reason());
    assert!(o.reason().contains("slab allocator"), "{}", o.reason());
    assert_ne!(o.out.pid as u32, offender, "the trap is in another process");

    // Not killed: the panic completes exactly as it would have without us.
    session.disarm(&mut g).unwrap();
    g.resume().unwrap();
    let p = guest.wait_panic(Duration::from_secs(120)).unwrap();
    assert_eq!(p.pid, o.out.pid as u32, "the guest's own report names the same task");
    assert_eq!(p.comm, o.comm());
    let console = guest.console();
    let func = oops_function(&console).unwrap_or_else(|| panic!("no oops RIP line:\n{}", guest.console_tail(60)));
    let file = source_file_of(&Kit::locate().unwrap().vmlinux(Kernel::Lkdtm612).unwrap(), &func);
    assert!(file.contains("mm/slub.c"), "the guest's oops is in {func} ({file}), not in the allocator");
    assert!(o.reason().contains(&func) || o.reason().contains("mm/slub.c"), "{}", o.reason());
}


#[test]
fn with_checkpoints_the_heaps_victim_is_rolled_back_and_not_quarantined() {
    let mut cfg = GuestConfig::new(Kernel::Lkdtm612).append("oops=panic").with_ram_file().with_second_qmp();
    cfg.boot_timeout = Duration::from_secs(300);
    let mut guest = Guest::boot(&cfg).unwrap();
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &["--checkpoint-every", "2"]);
    // A checkpoint before the corruption; then WRITE_AFTER_FREE from a
    // subshell, and other processes allocating until one faults.
    let r = guest
        .run(
            &format!("taskset 1 sh -c 'sleep 15; {WAF}; {ALLOCATE}' >/dev/null 2>&1 & echo $!"),
            Duration::from_secs(60),
        )
        .unwrap();
    let writer: i64 = r.output[0].trim().parse().unwrap();
    let n = lines_of(&events, "\"checkpoint\"").len();
    wait_event(&events, "\"checkpoint\"", n + 1, Duration::from_secs(120), Some(&mut watcher));
    let text = wait_event(&events, "\"not-quarantined\"", 1, Duration::from_secs(300), Some(&mut watcher));
    let rb = &lines_of(&events, "\"rolled-back\"")[0];
    assert!(rb["reason"].as_str().unwrap().contains("inside the slab allocator (mm/slub.c)"), "{text}");
    assert_ne!(rb["pid"].as_i64(), Some(writer), "the trap is in an allocating process: {text}");
    let nq = &lines_of(&events, "\"not-quarantined\"")[0];
    assert_eq!(nq["pid"], rb["pid"], "{text}");
    // Nothing healthy killed: no kill, no quarantine, whatever came after.
    std::thread::sleep(Duration::from_secs(5));
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(!text.contains("\"quarantined\""), "{text}");
    assert!(lines_of(&events, "\"repaired\"").iter().all(|e| e["action"] != "kill"), "{text}");
    // The guest's own oops of that trap is in the allocator.
    let func = oops_function(&guest.console()).unwrap_or_else(|| panic!("no oops RIP line:\n{}", guest.console_tail(60)));
    let file = source_file_of(&Kit::locate().unwrap().vmlinux(Kernel::Lkdtm612).unwrap(), &func);
    assert!(file.contains("mm/slub.c"), "the guest's oops is in {func} ({file})");
    kill(watcher.id(), libc::SIGTERM);
    assert!(wait_exit(&mut watcher, 120).success());
    // Whatever the rollback led to, QEMU is not left stopped at our trap.
    assert_ne!(status(&mut qmp2(&guest)), "debug");
}
