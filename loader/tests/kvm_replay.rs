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
    let c = repair_guest::replay::capture_at_trap(&cfg, crash, &dump).expect("capture the crash at the trap");
    let qemu = Verdict::of(&c.qemu);

    let d = CoreDump::open(&c.dump).expect("parse the dump");
    let image = repair_guest::kit::kit_image(kernel).unwrap();
    let r = replay::replay(&d, image, &ReplayOptions::default()).expect("replay under KVM");
    let kvm = Verdict::of(&r.outcome);
    eprintln!("{crash}: QEMU {qemu:?}");
    eprintln!("{crash}: KVM  {kvm:?}");
    eprintln!(
        "{crash}: repair kernel run (flow Timings.run): QEMU TCG {:.1} ms, KVM {:.1} ms ({})",
        c.qemu.timings.run, r.outcome.timings.run, r.caps
    );
    assert_eq!(kvm.status, "done");
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

/// The repair kernel's run time (flow `Timings.run`) on the same crash
/// state, QEMU TCG vs this machine's KVM, `N` runs each. Ignored by
/// default (a measurement, not a check): `cargo test -p loader --test
/// kvm_replay -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check: run with --ignored --nocapture"]
fn measure_run_times_tcg_vs_kvm() {
    use loader::access::GuestAccess;
    use loader::flow::{FlowConfig, Mode, Session};
    const N: usize = 7;
    if let Some(why) = loader::kvm::skip_reason().expect("/dev/kvm") {
        eprintln!("{why}");
        return;
    }
    let stats = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        format!("min {:.1} ms, median {:.1} ms, max {:.1} ms", v[0], v[v.len() / 2], v[v.len() - 1])
    };
    for (kernel, append, crash) in
        [(Kernel::Debian, &[][..], "sysrq-c"), (Kernel::Lkdtm, &["oops=panic"][..], "BUG")]
    {
        let mut cfg = GuestConfig::new(kernel).with_ram_file();
        for a in append {
            cfg = cfg.append(a);
        }
        let mut guest = harness::Guest::boot(&cfg).unwrap();
        let image = repair_guest::kit::kit_image(kernel).unwrap();
        let (mut g, mut session) = repair_guest::kit::attach(&guest, image.clone(), FlowConfig::default()).unwrap();
        session.arm(&mut g).unwrap();
        g.resume().unwrap();
        guest.crash(crash).unwrap();
        let stop = g.wait_stop(Some(std::time::Duration::from_secs(120))).unwrap().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dump = tmp.path().join("dump.elf");
        let mut qmp =
            loader::qmp::Qmp::connect_timeout(&guest.qmp_addr().parse().unwrap(), std::time::Duration::from_secs(300))
                .unwrap();
        qmp.execute("dump-guest-memory", Some(serde_json::json!({ "paging": false, "protocol": format!("file:{}", dump.display()) })))
            .unwrap();
        let tcg: Vec<f64> =
            (0..N).map(|_| session.repair(&mut g, stop.vcpu, Mode::Diagnose).unwrap().timings.run).collect();
        drop(g);
        drop(guest);
        let d = CoreDump::open(&dump).unwrap();
        let kvm: Vec<f64> = (0..N)
            .map(|_| replay::replay(&d, image.clone(), &ReplayOptions::default()).unwrap().outcome.timings.run)
            .collect();
        // Warm: the same KVM VM, the repair kernel run again and again (the
        // first run of a fresh VM pays for faulting in every page it reads).
        let mut kg = replay::load_into_kvm(&d).unwrap();
        let st = loader::kvm::StagingSlot::above_ram(kg.memory(), 8);
        kg.add_staging(st).unwrap();
        let kcfg = FlowConfig {
            borrowed_base: loader::access::Gpa(st.gpa),
            borrowed_size: st.size,
            ram_end: Some(st.gpa + st.size),
            run_timeout: std::time::Duration::from_secs(60),
            ..FlowConfig::default()
        };
        let ks = Session::attach(&mut kg, image.clone(), kcfg).unwrap();
        let v = loader::report::crashed_vcpu(&mut kg, ks.panic_addr().unwrap()).unwrap();
        let warm: Vec<f64> = (0..N).map(|_| ks.repair(&mut kg, v, Mode::Diagnose).unwrap().timings.run).collect();
        eprintln!("{crash} ({}): repair kernel run, QEMU TCG (gdbstub):       {}", kernel.dir_name(), stats(tcg));
        eprintln!("{crash} ({}): repair kernel run, KVM, fresh VM each run: {}", kernel.dir_name(), stats(kvm));
        eprintln!("{crash} ({}): repair kernel run, KVM, same VM (warm):    {} (first {:.1} ms)", kernel.dir_name(), stats(warm.clone()), warm[0]);
    }
}
