//! Crash replay on `/dev/kvm`: real crashes are trapped at `panic` in QEMU
//! (TCG) guests, dumped there with QMP `dump-guest-memory`, diagnosed there
//! by the QEMU backend, then replayed in a fresh in-process KVM VM; the
//! verdict and diagnosis must be the same.
//!
//! Without `/dev/kvm` these tests fail; `CRASH_REPAIR_SKIP_KVM=1` skips
//! them, saying why. `CRASH_REPAIR_KEEP_DUMPS=DIR` keeps the dumps there.

use harness::{GuestConfig, Kernel};
use loader::replay::{self, CoreDump, ReplayOptions, Verdict};
use std::path::PathBuf;

fn replay_matches(kernel: Kernel, append: &[&str], crash: &str) {
    if let Some(why) = loader::kvm::skip_reason().expect("/dev/kvm") {
        eprintln!("{why}");
        return;
    }
    let mut cfg = GuestConfig::new(kernel);
    for a in append {
        cfg = cfg.append(a);
    }
    let tmp = tempfile::tempdir().unwrap();
    let dump = match std::env::var_os("CRASH_REPAIR_KEEP_DUMPS") {
        Some(d) => {
            std::fs::create_dir_all(&d).unwrap();
            PathBuf::from(d).join(format!("{}-{}.elf", kernel.dir_name(), crash.to_lowercase()))
        }
        None => tmp.path().join("dump.elf"),
    };
    let c = replay::capture_at_trap(&cfg, crash, &dump).expect("capture the crash at the trap");
    let qemu = Verdict::of(&c.qemu);

    let d = CoreDump::open(&c.dump).expect("parse the dump");
    let image = loader::demo::kit_image(kernel).unwrap();
    let r = replay::replay(&d, image, &ReplayOptions::default()).expect("replay under KVM");
    let kvm = Verdict::of(&r.outcome);
    eprintln!("{crash}: QEMU {qemu:?}");
    eprintln!("{crash}: KVM  {kvm:?}");
    eprintln!(
        "{crash}: repair kernel run (flow Timings.run): QEMU TCG {:.1} ms, KVM {:.1} ms ({})",
        c.qemu.timings.run, r.outcome.timings.run, r.caps
    );
    assert_eq!(kvm.status, "Some(Done)");
    assert_eq!(kvm.pid as u32, c.crashed_pid, "the offender is the crashing child");
    assert_eq!(kvm, qemu, "replayed verdict and diagnosis equal the QEMU backend's");
    assert!(!r.outcome.applied, "diagnose mode applies nothing");
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
