//! End to end on the Debian cloud kernel (KASLR on, 2 vCPUs, TCG): a child
//! that crashes the kernel with sysrq-c is killed, everything else carries on.

use harness::{Guest, GuestConfig, Kernel};
use loader::access::{Endpoint, GuestAccess};
use loader::flow::{FlowConfig, Mode, Session};
use loader::gdb::GdbGuest;
use loader::memory::{RamFile, WithRam};
use repair_kernel::contract::Action;
use std::time::Duration;

fn attach(guest: &Guest) -> (WithRam<GdbGuest, RamFile>, Session) {
    let image = loader::demo::kit_image(Kernel::Debian).expect("repair image of the kit's Debian kernel");
    let gdb = GdbGuest::connect(guest.gdb_addr().parse::<Endpoint>().unwrap()).expect("gdbstub");
    let ram = RamFile::open_pc(&guest.ram_file().unwrap(), 0xe000_0000).unwrap();
    let mut g = WithRam::new(gdb, ram);
    let cfg = FlowConfig { ram_end: Some(512 << 20), ..FlowConfig::default() };
    let session = Session::attach(&mut g, image, cfg).expect("attach");
    (g, session)
}

#[test]
fn sysrq_c_child_is_killed_and_the_guest_carries_on() {
    let mut guest = Guest::boot(&GuestConfig::new(Kernel::Debian).with_ram_file()).unwrap();
    let (mut g, mut session) = attach(&guest);
    assert!(session.slide_from_page_tables, "slide {:#x}", session.slide);
    session.arm(&mut g).unwrap();
    g.resume().unwrap();

    let before = guest.ping(Duration::from_secs(30)).unwrap();
    let crash = guest.crash("sysrq-c").unwrap();
    let stop = g.wait_stop(Some(Duration::from_secs(60))).unwrap().expect("trap at panic");
    assert_eq!(stop.rip.0, session.panic_addr().unwrap());
    let outcome = session.repair(&mut g, stop.vcpu, Mode::Repair).unwrap();
    eprintln!("verdict: {:?} {} / {} / timings {:?}", outcome.action(), outcome.message(), outcome.reason(), outcome.timings);
    assert_eq!(outcome.action(), Action::Kill, "{}", outcome.reason());
    assert_eq!(outcome.message(), "sysrq triggered crash");
    assert_eq!(outcome.out.pid as u32, crash.pid);
    assert_eq!(outcome.comm(), "sh");
    assert!(outcome.applied);
    g.resume().unwrap();

    let status = guest.wait_crash_exit(&crash, Duration::from_secs(60)).unwrap();
    assert_eq!(status, 137, "console:\n{}", guest.console_tail(40));
    let after = guest.ping(Duration::from_secs(30)).unwrap();
    assert!(after > before);
    let v = guest.verify_bystander().unwrap();
    assert!(v.ok, "{v:?}");
    let r = guest.run("echo alive", Duration::from_secs(30)).unwrap();
    assert_eq!(r.output, ["alive"]);
}
