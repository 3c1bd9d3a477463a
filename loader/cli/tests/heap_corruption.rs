//! A corrupt slab heap, on the real 6.12 LKDTM guest (freelist hardening
//! on): LKDTM's WRITE_AFTER_FREE writes into a freed object and exits 0;
//! the next allocations from that cache follow the corrupt freelist and
//! fault inside the allocator, in whatever process allocates next. Killing
//! that process cannot repair the heap (and it did nothing wrong): the
//! verdict declines, saying so, and the guest's panic goes on exactly as it
//! would have without us. Oracles: the guest's own oops and panic report on
//! its console, and binutils' `addr2line` on the vmlinux for where the
//! faulting function lives.

use harness::{Guest, GuestConfig, Kernel, Kit};
use loader::access::GuestAccess;
use loader::flow::{FlowConfig, Mode};
use repair_kernel::contract::Action;
use repair_kernel::verdict::Reason;
use std::process::Command;
use std::time::Duration;

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
    let crash = guest.crash("WRITE_AFTER_FREE").unwrap();
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap(), 0, "{}", guest.console_tail(30));

    // Other processes allocate until one follows the corrupt freelist.
    let _allocating = guest.run_start("i=0; while [ $i -lt 200 ]; do awk 'BEGIN{x=1}'; i=$((i+1)); done").unwrap();
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
    assert_ne!(o.out.pid as u32, crash.pid, "the trap is in another process");

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
