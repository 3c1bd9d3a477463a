//! A warning that `panic_on_warn=1` makes fatal is taken back to the
//! warning (`repair_kernel::warn`): the repair kernel unwinds the panic's
//! first frames with the vmlinux's own call-frame rules and resumes at the
//! return from `check_panic_on_warn`, as the kernel runs without
//! panic_on_warn, and the task that warned gets a pending SIGKILL.
//!
//! The oracles are the guest's own: its console shows the warning finish
//! (`__warn` prints its end marker only after `check_panic_on_warn`
//! returns) and no `Kernel panic`; the shell that waits for the warning
//! child sees it die of SIGKILL (137); the guest answers and its
//! bystander's records verify.
//!
//! On the 6.12 LKDTM kernel with `slub_debug=FZPU`, SLUB's consistency
//! check warns with the slab's list lock held: a kill there (the old
//! verdict) left the lock held and the next allocations of that cache hung
//! or crashed. Here the same overflow runs twice: the second could not get
//! past the lock if the first had left it held. On the 6.1 LKDTM kernel
//! (no `vpanic`: the trap is `panic`'s first byte) a plain WARN().

mod support;

use harness::{Guest, GuestConfig, Kernel};
use support::symbol;
use loader::access::GuestAccess;
use loader::flow::{Mode, Session};
use loader::gdb::GdbGuest;
use loader::ram::{RamFile, WithRam};
use repair_kernel::contract::Action;
use repair_kernel::verdict::{CrashKind, Reason};
use std::time::Duration;

type Backend = WithRam<GdbGuest, RamFile>;

fn boot(kernel: Kernel, extra: &[&str]) -> (Guest, Backend, Session) {
    let mut cfg = GuestConfig::new(kernel).append("oops=panic").append("panic_on_warn=1").with_ram_file();
    for w in extra {
        cfg = cfg.append(w);
    }
    let guest = Guest::boot(&cfg).unwrap();
    let image = repair_guest::kit::kit_image(kernel).unwrap();
    let (mut g, mut session) = repair_guest::kit::attach(&guest, image, Default::default()).expect("attach");
    session.arm(&mut g).unwrap();
    g.resume().unwrap();
    (guest, g, session)
}

/// Triggers `lkdtm_type` from a new child, repairs the trapped panic and
/// checks, by the guest's own account, that the warning finished and the
/// child died of SIGKILL.
fn warning_is_resumed(guest: &mut Guest, g: &mut Backend, session: &Session, lkdtm_type: &str) {
    let from = guest.console_len();
    let crash = guest.crash(lkdtm_type).unwrap();
    let stop = g
        .wait_stop(Some(Duration::from_secs(120)))
        .unwrap()
        .unwrap_or_else(|| panic!("{lkdtm_type}: no trap; console:\n{}", guest.console_tail(30)));
    assert_eq!(stop.rip, session.panic_addr().unwrap());
    let o = session.repair(g, stop.vcpu, Mode::Repair).expect("repair");
    eprintln!("{lkdtm_type}: {:?} {} / {} / {:?}", o.action(), o.message(), o.reason(), o.timings);
    assert_eq!(o.action(), Action::ResumeWarning, "{lkdtm_type}: {}", o.reason());
    assert_eq!(Reason::from_u32(o.out.reason_code), Some(Reason::WarningResumedKill), "{}", o.reason());
    assert_eq!(CrashKind::from_u32(o.out.crash_kind), Some(CrashKind::PanicOnWarn));
    assert!(o.message().contains("panic_on_warn set"), "{}", o.message());
    assert_eq!(o.out.pid as u32, crash.pid);
    assert!(o.applied);
    g.resume().unwrap();

    let status = guest
        .wait_crash_exit(&crash, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{lkdtm_type}: the warning child did not end: {e}"));
    assert_eq!(status, 137, "{lkdtm_type}: console:\n{}", guest.console_tail(40));
    // __warn prints its end marker after check_panic_on_warn returned.
    guest
        .wait_for_console_from(from, "---[ end trace", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{lkdtm_type}: the warning did not finish: {e}"));
    let said = guest.console();
    let said = said.get(from..).unwrap_or_default();
    assert!(said.contains("WARNING: CPU"), "{lkdtm_type}: no warning on the console:\n{said}");
    assert!(!said.contains("Kernel panic"), "{lkdtm_type}: the guest panicked:\n{said}");
}

fn still_healthy(guest: &mut Guest) {
    guest.ping(Duration::from_secs(60)).expect("the guest answers");
    let v = guest.verify_bystander().expect("bystander");
    assert!(v.ok, "bystander: {v:?}");
    let r = guest.run("cat /proc/slabinfo >/dev/null 2>&1; ls / | wc -l", Duration::from_secs(60)).unwrap();
    assert_eq!(r.status, 0, "{r:?}");
}

#[test]
fn a_slub_warning_under_the_list_lock_is_resumed_twice_on_6_12() {
    let (mut guest, mut g, session) = boot(Kernel::Lkdtm612, &["slub_debug=FZPU"]);
    warning_is_resumed(&mut guest, &mut g, &session, "SLAB_LINEAR_OVERFLOW");
    // The same cache again: the first warning's lock was released.
    warning_is_resumed(&mut guest, &mut g, &session, "SLAB_LINEAR_OVERFLOW");
    warning_is_resumed(&mut guest, &mut g, &session, "WARNING");
    still_healthy(&mut guest);
}

#[test]
fn a_warning_is_resumed_from_panics_first_byte_on_6_1() {
    let (mut guest, mut g, session) = boot(Kernel::Lkdtm, &[]);
    warning_is_resumed(&mut guest, &mut g, &session, "WARNING");
    warning_is_resumed(&mut guest, &mut g, &session, "WARNING_MESSAGE");
    still_healthy(&mut guest);
}


/// `struct bug_entry` as pahole reads the vmlinux's DWARF: its size and the
/// offsets of `bug_addr_disp`, `format_disp` (7.x: relative, like the
/// address) and `flags`.
fn bug_entry_layout(kernel: Kernel) -> (u64, u64, Option<u64>, u64) {
    let vmlinux = harness::Kit::locate().unwrap().vmlinux(kernel).unwrap();
    let out = std::process::Command::new("pahole").args(["-C", "bug_entry"]).arg(&vmlinux).output()
        .expect("pahole (dwarves, installed by scripts/guest-kit)");
    let text = String::from_utf8_lossy(&out.stdout);
    let offset = |member: &str| {
        text.lines().find(|l| l.split_whitespace().any(|w| w.trim_end_matches(';') == member)).and_then(|l| {
            l.split("/*").nth(1)?.split_whitespace().next()?.parse::<u64>().ok()
        })
    };
    let size = text.lines().find_map(|l| l.trim().strip_prefix("/* size: ")?.split(',').next()?.parse().ok());
    (size.expect("bug_entry size"), offset("bug_addr_disp").expect("bug_addr_disp"), offset("format_disp"), offset("flags").expect("flags"))
}

/// A real `WARN()` on Debian's stock kernels, which have no LKDTM: the
/// kernel's own warning machinery (`ud2`, `report_bug` finding the
/// `__bug_table` entry, `__warn`, `check_panic_on_warn`) reached from a
/// process. Through the gdbstub, `ud2; ret` is written into
/// `sysrq_handle_loglevel` (after its `endbr64` where IBT has one), and one
/// plain `WARN_ON()` entry of the `__bug_table` (flags just
/// `BUGFLAG_WARNING`, no format with arguments) is pointed at that `ud2`: a process writing
/// `9` to /proc/sysrq-trigger then warns, and the kernel, without
/// panic_on_warn, would step over the `ud2` and return. With
/// `panic_on_warn=1` the warning is taken back to the warning, on Debian's
/// own -O2 code (`check_panic_on_warn.cold`, `vpanic` where it exists).
fn stock_warning_is_resumed(series: harness::Series) {
    let kernel = Kernel::Matrix(series);
    let mut cfg = GuestConfig::new(kernel).append("oops=panic").append("panic_on_warn=1").with_ram_file();
    cfg.boot_timeout = Duration::from_secs(300);
    let mut guest = Guest::boot(&cfg).unwrap_or_else(|e| panic!("{series}: {e}"));
    let image = repair_guest::kit::kit_image(kernel).unwrap();
    let (mut g, mut session) = repair_guest::kit::attach(&guest, image, Default::default()).expect("attach");
    let slide = session.slide.slide;
    let cpu = loader::access::VcpuId(0);
    use loader::access::Gva;

    // The warning site: after endbr64 (IBT), else over the 5-byte NOP of
    // `call __fentry__`.
    let handler = symbol(kernel, "sysrq_handle_loglevel").wrapping_add(slide);
    let mut first = [0u8; 4];
    g.read_virt(cpu, Gva(handler), &mut first).unwrap();
    let site = handler + if first == [0xf3, 0x0f, 0x1e, 0xfa] { 4 } else { 0 };
    g.write_virt(cpu, Gva(site), &[0x0f, 0x0b, 0xc3]).unwrap();

    // One plain WARN_ON() entry of the bug table, pointed at it.
    let (size, addr_off, format_off, flags_off) = bug_entry_layout(kernel);
    let (start, stop) = (symbol(kernel, "__start___bug_table") + slide, symbol(kernel, "__stop___bug_table") + slide);
    let mut entry = None;
    let mut e = start;
    while e + size <= stop {
        let mut b = vec![0u8; size as usize];
        g.read_virt(cpu, Gva(e), &mut b).unwrap();
        let u16_at = |o: u64| u16::from_le_bytes([b[o as usize], b[o as usize + 1]]);
        let i32_at = |o: u64| i32::from_le_bytes(b[o as usize..o as usize + 4].try_into().unwrap());
        // BUGFLAG_WARNING alone in the low byte (not ONCE, DONE, NO_CUT_HERE);
        // the high byte is the taint (TAINT_WARN).
        // 7.x: every entry has a format, printed without arguments unless
        // flagged; a plain WARN_ON's is empty. Take one without `%`.
        let plain_format = |o: u64| {
            let disp = i32_at(o);
            if disp == 0 {
                return true;
            }
            let mut f = [0u8; 64];
            g.read_virt(cpu, Gva((e + o).wrapping_add(disp as i64 as u64)), &mut f).is_ok()
                && !f.split(|&c| c == 0).next().unwrap_or_default().contains(&b'%')
        };
        if u16_at(flags_off) & 0xff == 1 && format_off.is_none_or(plain_format) {
            entry = Some(e);
            break;
        }
        e += size;
    }
    let entry = entry.unwrap_or_else(|| panic!("{series}: no plain WARN_ON entry in __bug_table"));
    let disp = (site as i64 - (entry + addr_off) as i64) as i32;
    g.write_virt(cpu, Gva(entry + addr_off), &disp.to_le_bytes()).unwrap();

    session.arm(&mut g).unwrap();
    g.resume().unwrap();
    let from = guest.console_len();
    let run = guest.run_start("echo 9 > /proc/sysrq-trigger").unwrap();
    let stop = g
        .wait_stop(Some(Duration::from_secs(300)))
        .unwrap()
        .unwrap_or_else(|| panic!("{series}: no trap; console:\n{}", guest.console_tail(40)));
    assert_eq!(stop.rip, session.panic_addr().unwrap());
    let o = session.repair(&mut g, stop.vcpu, Mode::Repair).expect("repair");
    eprintln!("{series}: {:?} {} / {} / {:?}", o.action(), o.message(), o.reason(), o.timings);
    assert_eq!(o.action(), Action::ResumeWarning, "{series}: {}", o.reason());
    assert_eq!(Reason::from_u32(o.out.reason_code), Some(Reason::WarningResumedKill), "{series}: {}", o.reason());
    g.resume().unwrap();
    let status = guest.run_wait(run, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{series}: {e}"));
    assert_eq!(status, 137, "{series}: console:\n{}", guest.console_tail(40));
    guest
        .wait_for_console_from(from, "---[ end trace", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{series}: the warning did not finish: {e}"));
    let said = guest.console();
    let said = said.get(from..).unwrap_or_default();
    // "WARNING: CPU: 0 PID: .. at file:line func" up to 6.x, "WARNING:
    // file:line at func, CPU#0: comm/pid" on 7.x.
    let warned = said.lines().any(|l| l.contains("WARNING: ") && l.contains("sysrq_handle_loglevel"));
    assert!(warned, "{series}: not the warning:\n{said}");
    assert!(!said.contains("Kernel panic"), "{series}: the guest panicked:\n{said}");
    // Detached: the guest goes on.
    drop(g);
    guest.ping(Duration::from_secs(60)).expect("the guest answers");
    let r = guest.run("ls / | wc -l", Duration::from_secs(60)).unwrap();
    assert_eq!(r.status, 0, "{series}: {r:?}");
}

#[test]
fn a_stock_5_10_warning_is_resumed() {
    stock_warning_is_resumed(harness::Series::V5_10);
}

#[test]
fn a_stock_6_1_warning_is_resumed() {
    stock_warning_is_resumed(harness::Series::V6_1);
}

#[test]
fn a_stock_6_12_warning_is_resumed() {
    stock_warning_is_resumed(harness::Series::V6_12);
}

#[test]
fn a_stock_7_warning_is_resumed() {
    stock_warning_is_resumed(harness::Series::V7);
}
