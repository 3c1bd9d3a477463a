//! The QMP client against a real QEMU: greeting, commands, errors, HMP,
//! memory saves, and the events the watcher relies on (STOP, RESUME,
//! GUEST_PANICKED, SHUTDOWN).

#[path = "gdb_support/mod.rs"]
mod support;

use std::time::Duration;

use loader::access::{AccessError, GuestAccess, Gpa, VcpuId};
use loader::gdb::GdbGuest;
use loader::qmp::Qmp;
use support::{Opts, Qemu};

#[test]
fn commands_errors_status_and_events() {
    let mut q = Qemu::start(Opts::default());
    let mut qmp = Qmp::connect(&q.qmp).unwrap();
    assert_eq!(qmp.version.0, 7, "tested on QEMU 7.2");
    assert_eq!(qmp.query_status().unwrap(), "prelaunch");
    assert_eq!(qmp.ram_size().unwrap(), 64 << 20);
    assert_eq!(qmp.peer_pid(), Some(q.pid()));

    let e = qmp.execute("no-such-command", None).unwrap_err();
    assert!(matches!(&e, AccessError::Qmp { class, .. } if class == "CommandNotFound"), "{e}");

    qmp.cont().unwrap();
    let ev = qmp.wait_event("RESUME", Duration::from_secs(5)).unwrap().expect("RESUME");
    assert!(ev.timestamp_us > 0);
    assert_eq!(qmp.query_status().unwrap(), "running");
    qmp.stop().unwrap();
    assert!(qmp.wait_event("STOP", Duration::from_secs(5)).unwrap().is_some());
    assert_eq!(qmp.query_status().unwrap(), "paused");
    assert_eq!(qmp.next_event(Some(Duration::from_millis(50))).unwrap(), None);

    let regs = qmp.hmp("info registers").unwrap();
    assert!(regs.contains("CR3="), "{regs}");

    qmp.pmemsave(0xf_fff0, 16, &q.path("reset-vector")).unwrap();
    assert_eq!(std::fs::read(q.path("reset-vector")).unwrap().len(), 16);
    qmp.dump_guest_memory(&q.path("core")).unwrap();
    let core = std::fs::read(q.path("core")).unwrap();
    assert_eq!(&core[..4], b"\x7fELF");

    let _ = qmp.execute("quit", None);
    let ev = qmp.wait_event("SHUTDOWN", Duration::from_secs(5));
    assert!(matches!(ev, Ok(Some(_)) | Err(AccessError::GuestGone(_))), "{ev:?}");
    assert!(q.wait_exit(Duration::from_secs(5)));
    // Afterwards: an error naming the cause, not a hang.
    let e = qmp.query_status().unwrap_err();
    assert!(matches!(e, AccessError::GuestGone(_) | AccessError::Io { .. }), "{e}");
}

/// A guest that pokes the pvpanic port (the harness's QEMU has the
/// device): QMP reports GUEST_PANICKED.
#[test]
fn guest_panicked_event_from_pvpanic() {
    let q = Qemu::start(Opts::default());
    let mut g = GdbGuest::connect(q.gdb.clone()).unwrap();
    let mut qmp = Qmp::connect(&q.qmp).unwrap();
    // 16-bit: mov dx, 0x505; mov al, 1; out dx, al; jmp $
    let code = [0xba, 0x05, 0x05, 0xb0, 0x01, 0xee, 0xeb, 0xfe];
    g.write_phys(Gpa(0x1000), &code).unwrap();
    let mut r = g.get_regs(VcpuId(0)).unwrap();
    r.cs = 0;
    r.rip = 0x1000;
    g.set_regs(VcpuId(0), &r).unwrap();
    g.resume().unwrap();
    let ev = qmp.wait_event("GUEST_PANICKED", Duration::from_secs(10)).unwrap().expect("GUEST_PANICKED");
    // QEMU's default panic action powers the VM off: the gdbstub client
    // sees the guest go away, as an error and without hanging.
    assert_eq!(ev.data["action"], "poweroff", "{:?}", ev.data);
    let mut r = Ok(None);
    for _ in 0..50 {
        r = g.wait_stop(Some(Duration::from_millis(100)));
        if !matches!(r, Ok(None)) {
            break;
        }
    }
    assert!(matches!(r, Err(AccessError::GuestGone(_))), "{r:?}");
}
