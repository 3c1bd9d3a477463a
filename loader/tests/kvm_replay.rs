//! Crash replay on `/dev/kvm`: real crashes are trapped at `panic` in QEMU
//! (TCG) guests, dumped there with QMP `dump-guest-memory`, diagnosed there
//! by the QEMU backend, then replayed in a fresh in-process KVM VM; the
//! verdict and diagnosis must be the same.
//!
//! Without `/dev/kvm` these tests fail; `CRASH_REPAIR_SKIP_KVM=1` skips
//! them, saying why. `CRASH_REPAIR_KEEP_DUMPS=DIR` keeps the dumps there.

use harness::{Guest, GuestConfig, Kernel};
use loader::access::{Endpoint, GuestAccess};
use loader::flow::{FlowConfig, Mode, Session, Timings};
use loader::gdb::GdbGuest;
use loader::memory::{RamFile, WithRam};
use loader::replay::{self, CoreDump, ReplayOptions, Verdict};
use std::path::PathBuf;
use std::time::Duration;

/// A crash trapped and dumped, with the QEMU backend's verdict on it.
struct Captured {
    _dir: Option<tempfile::TempDir>,
    dump: PathBuf,
    verdict: Verdict,
    timings: Timings,
    crashed_pid: u32,
}

fn capture(kernel: Kernel, append: &[&str], crash: &str) -> Captured {
    let mut cfg = GuestConfig::new(kernel).with_ram_file();
    for a in append {
        cfg = cfg.append(a);
    }
    let mut guest = Guest::boot(&cfg).expect("boot the kit guest under QEMU");
    let image = loader::demo::kit_image(kernel).expect("repair image of the kit kernel");
    let gdb = GdbGuest::connect(guest.gdb_addr().parse::<Endpoint>().unwrap()).expect("gdbstub");
    let ram = RamFile::open_pc(&guest.ram_file().unwrap(), 0xe000_0000).unwrap();
    let mut g = WithRam::new(gdb, ram);
    let fcfg = FlowConfig { ram_end: Some(512 << 20), ..FlowConfig::default() };
    let mut session = Session::attach(&mut g, image, fcfg).expect("attach");
    session.arm(&mut g).unwrap();
    g.resume().unwrap();
    let handle = guest.crash(crash).expect("crash");
    let stop = g.wait_stop(Some(Duration::from_secs(120))).unwrap().expect("trap at panic");
    assert_eq!(stop.rip.0, session.panic_addr().unwrap(), "stopped at panic");

    let (dir, dump) = match std::env::var_os("CRASH_REPAIR_KEEP_DUMPS") {
        Some(d) => {
            std::fs::create_dir_all(&d).unwrap();
            (None, PathBuf::from(d).join(format!("{}-{}.elf", kernel.dir_name(), crash.to_lowercase())))
        }
        None => {
            let t = tempfile::tempdir().unwrap();
            let p = t.path().join("dump.elf");
            (Some(t), p)
        }
    };
    let _ = std::fs::remove_file(&dump);
    let mut qmp = loader::qmp::Qmp::connect_timeout(&guest.qmp_addr().parse().unwrap(), Duration::from_secs(300)).unwrap();
    qmp.execute(
        "dump-guest-memory",
        Some(serde_json::json!({ "paging": false, "protocol": format!("file:{}", dump.display()) })),
    )
    .expect("dump-guest-memory");

    let outcome = session.repair(&mut g, stop.vcpu, Mode::Diagnose).expect("QEMU-backend diagnose run");
    assert!(!outcome.applied);
    Captured {
        _dir: dir,
        dump,
        verdict: Verdict::of(&outcome),
        timings: outcome.timings,
        crashed_pid: handle.pid,
    }
}

fn replay_matches(kernel: Kernel, append: &[&str], crash: &str) {
    if let Some(why) = loader::kvm::skip_reason().expect("/dev/kvm") {
        eprintln!("{why}");
        return;
    }
    let c = capture(kernel, append, crash);
    let dump = CoreDump::open(&c.dump).expect("parse the dump");
    let image = loader::demo::kit_image(kernel).unwrap();
    let r = replay::replay(&dump, image, &ReplayOptions::default()).expect("replay under KVM");
    let v = Verdict::of(&r.outcome);
    eprintln!("{crash}: QEMU {:?}", c.verdict);
    eprintln!("{crash}: KVM  {v:?}");
    eprintln!(
        "{crash}: repair kernel run: QEMU TCG {:.1} ms, KVM {:.1} ms ({})",
        c.timings.run, r.outcome.timings.run, r.caps
    );
    assert_eq!(v.status, "Some(Done)");
    assert_eq!(v.pid as u32, c.crashed_pid, "the offender is the crashing child");
    assert_eq!(v, c.verdict, "replayed verdict and diagnosis equal the QEMU backend's");
    assert!(!r.outcome.applied);
}

#[test]
fn sysrq_c_debian_replays_the_same_verdict() {
    replay_matches(Kernel::Debian, &[], "sysrq-c");
}

#[test]
fn lkdtm_exception_oops_panic_replays_the_same_verdict() {
    replay_matches(Kernel::Lkdtm, &["oops=panic"], "EXCEPTION");
}

#[test]
fn lkdtm_bug_replays_the_same_verdict() {
    replay_matches(Kernel::Lkdtm, &["oops=panic"], "BUG");
}
