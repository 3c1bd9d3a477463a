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

use harness::{Guest, GuestConfig, Kernel};
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
