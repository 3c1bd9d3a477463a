//! Text repair, exercised for real on the kit's LKDTM kernel booted with
//! `rodata=off` (so kernel text is writable, as after a stray write):
//!
//! 1. corrupt a kernel function's text from outside (a `ud2` written over
//!    `lkdtm_WARNING` through the gdbstub), crash a process through it, and
//!    check that the repair restored the page: the same operation then works
//!    for a new process (WARNING only warns);
//! 2. LKDTM WRITE_KERN really overwrites kernel text with `rodata=off`
//!    (here ~300 KB of it: the build puts do_nothing far below
//!    do_overwritten); the repair restores every page byte for byte.
//!
//! The repair image carries a snapshot of the healthy guest's text and
//! rodata (hashes and pristine pages, taken right after boot), staged with
//! the integrity table in a region the guest reserved (`memmap=32M$448M`):
//! megabytes do not fit the borrowed low memory.

use harness::{Guest, GuestConfig, Kernel, Kit};
use loader::access::{translate, GuestAccess, Gva, VcpuId};
use loader::flow::{FlowConfig, Mode, Session};
use loader::gdb::GdbGuest;
use loader::ram::{RamFile, WithRam};
use repair_kernel::contract::Action;
use std::collections::HashMap;
use std::time::Duration;

const STAGE_BASE: u64 = 448 << 20;
const STAGE_SIZE: u64 = 32 << 20;

fn system_map_symbol(name: &str) -> u64 {
    let kit = Kit::locate().unwrap();
    kit.symbol(Kernel::Lkdtm, name).unwrap().unwrap_or_else(|| panic!("{name} not in System.map"))
}

type Backend = WithRam<GdbGuest, RamFile>;

/// Reads a kernel virtual page of the stopped guest.
fn read_page(g: &mut Backend, cr3: u64, cr4: u64, gva: u64) -> Option<[u8; 4096]> {
    let mut rd = |p: loader::access::Gpa| {
        let mut b = [0u8; 8];
        g.read_phys(p, &mut b)?;
        Ok(u64::from_le_bytes(b))
    };
    let pa = translate(&mut rd, cr3, cr4, Gva(gva)).ok()??;
    let mut page = [0u8; 4096];
    g.read_phys(pa, &mut page).ok()?;
    Some(page)
}

/// Boots, attaches with the range the guest reserved for us, takes the
/// healthy snapshot of text and rodata (hashes and pristine pages) and
/// stages it with the integrity table. Returns the snapshot's pages too.
fn boot() -> (Guest, Backend, Session, HashMap<u64, [u8; 4096]>) {
    let guest = Guest::boot(
        &GuestConfig::new(Kernel::Lkdtm)
            .append("oops=panic")
            .append("rodata=off")
            .append(&format!("memmap={}M${}M", STAGE_SIZE >> 20, STAGE_BASE >> 20))
            .with_ram_file(),
    )
    .unwrap();
    let image = repair_guest::kit::kit_image(Kernel::Lkdtm).unwrap();
    let cfg = FlowConfig {
        borrowed_base: loader::access::Gpa(STAGE_BASE),
        borrowed_size: STAGE_SIZE,
        reserved: true,
        integrity: true,
        ..FlowConfig::default()
    };
    let (mut g, mut session) = repair_guest::kit::attach(&guest, image, cfg).expect("attach");
    let stats = loader::snapshot::take_live_snapshot(&mut g, &mut session, true, |_, _| {}).unwrap();
    eprintln!("snapshot: {stats:?}");
    session.replan().expect("staging plan with the integrity table");
    let pages: HashMap<u64, [u8; 4096]> = session.image.pristine.iter().map(|(a, p)| (*a, **p)).collect();
    assert_eq!(pages.len(), stats.pages);
    let t = std::time::Instant::now();
    session.arm(&mut g).unwrap();
    eprintln!("pre-staged {} KiB in {:?}", session.plan.used / 1024, t.elapsed());
    (guest, g, session, pages)
}

/// Waits for the trap, repairs, resumes; returns the outcome.
fn repair_next(g: &mut Backend, session: &Session) -> loader::flow::Outcome {
    let stop = g.wait_stop(Some(Duration::from_secs(60))).unwrap().expect("trap at panic");
    assert_eq!(stop.rip, session.panic_addr().unwrap());
    let o = session.repair(g, stop.vcpu, Mode::Repair).expect("repair");
    eprintln!("verdict: {:?} {} / {} / restored {} / {:?}", o.action(), o.message(), o.reason(), o.out.pages_restored, o.timings);
    g.resume().unwrap();
    o
}

#[test]
fn corrupted_text_is_restored_and_the_next_caller_works() {
    let (mut guest, mut g, session, pages) = boot();
    let slide = session.slide.slide;

    // 1. ud2 over lkdtm_WARNING's first instruction, from outside.
    let warning = system_map_symbol("lkdtm_WARNING");
    g.write_virt(VcpuId(0), Gva(warning + slide), &[0x0f, 0x0b]).unwrap();
    g.resume().unwrap();
    let crash = guest.crash("WARNING").unwrap();
    let o = repair_next(&mut g, &session);
    assert_eq!(o.action(), Action::Kill, "{}", o.reason());
    assert!(o.out.pages_restored >= 1, "the corrupted page was not restored");
    assert_eq!(o.out.pid as u32, crash.pid);
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(60)).unwrap(), 137);
    // The same operation, a new process: it only warns now.
    let again = guest.crash("WARNING").unwrap();
    let status = guest.wait_crash_exit(&again, Duration::from_secs(60)).unwrap_or_else(|e| panic!("the second WARNING did not return: {e}"));
    assert_eq!(status, 0, "console:\n{}", guest.console_tail(30));

    // 2. WRITE_KERN really writes kernel text (rodata=off). In this build
    // do_nothing lies 300 KB below do_overwritten, so LKDTM's memcpy
    // overwrites ~75 pages of text and usually faults on the way: the
    // repair must restore every one of them. If it does not fault, the
    // next crash's repair must.
    let target = system_map_symbol("do_overwritten");
    let link_page = target & !0xfff;
    let w = guest.crash("WRITE_KERN").unwrap();
    let regs = match g.wait_stop(Some(Duration::from_secs(20))).unwrap() {
        Some(stop) => {
            assert_eq!(stop.rip, session.panic_addr().unwrap());
            let regs = g.get_regs(VcpuId(0)).unwrap();
            let o = session.repair(&mut g, stop.vcpu, Mode::Repair).expect("repair");
            eprintln!("WRITE_KERN: {:?} {} / {} / restored {}", o.action(), o.message(), o.reason(), o.out.pages_restored);
            assert_eq!(o.action(), Action::Kill, "{}", o.reason());
            assert!(o.out.pages_restored >= 1, "nothing restored");
            g.resume().unwrap();
            assert_eq!(guest.wait_crash_exit(&w, Duration::from_secs(60)).unwrap(), 137);
            regs
        }
        None => {
            assert_eq!(guest.wait_crash_exit(&w, Duration::from_secs(60)).unwrap(), 0);
            g.pause().unwrap();
            let regs = g.get_regs(VcpuId(0)).unwrap();
            let now = read_page(&mut g, regs.cr3, regs.cr4, link_page + slide).unwrap();
            assert_ne!(&now[..], &pages[&link_page][..], "WRITE_KERN left the text as it was");
            g.resume().unwrap();
            let crash = guest.crash("PANIC").unwrap();
            let o = repair_next(&mut g, &session);
            assert_eq!(o.action(), Action::Kill, "{}", o.reason());
            assert!(o.out.pages_restored >= 1);
            assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(60)).unwrap(), 137);
            regs
        }
    };
    g.pause().unwrap();
    // The kernel's text is mapped alike in every address space: read it
    // through the page tables the vCPU runs on now, not those of the
    // crashed process, which its exit has freed.
    let _ = regs;
    let now_regs = g.get_regs(VcpuId(0)).unwrap();
    let after = read_page(&mut g, now_regs.cr3, now_regs.cr4, link_page + slide).unwrap();
    assert_eq!(&after[..], &pages[&link_page][..], "do_overwritten's page is not pristine after the repair");
    g.resume().unwrap();
    // The text LKDTM's memcpy ran over works again for a new process.
    let again = guest.crash("WARNING").unwrap();
    assert_eq!(guest.wait_crash_exit(&again, Duration::from_secs(60)).unwrap(), 0);

    assert!(guest.ping(Duration::from_secs(30)).is_ok());
    assert!(guest.verify_bystander().unwrap().ok);
    assert_eq!(guest.run("echo alive", Duration::from_secs(30)).unwrap().output, ["alive"]);
}
