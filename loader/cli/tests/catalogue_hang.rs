//! Hangs detected from outside by sampling guest RAM (no stop), faster than
//! the guest's own detectors (20 s soft lockup, 120 s hung task), acted on
//! only when certain, and no false hang over a busy workload on a loaded
//! host, across a pause. `bench/hang/run` runs the same with more
//! repetitions and a longer workload.

use repair_guest::campaign::{self, CampaignConfig, Class, WorkloadOptions, HANG_TYPES};
use loader::hang::HangConfig;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One busy-looping thread per host core, for the life of the value: the
/// host is as loaded as a shared CI machine, QEMU's vCPU threads get only
/// part of a core.
struct HostHog {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl HostHog {
    fn start() -> Self {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                    x
                })
            })
            .collect();
        HostHog { stop, threads }
    }
}

impl Drop for HostHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Detection within a second of the last progress, for every hang type,
/// counted in the vCPU time QEMU's thread got (on a host that starves QEMU
/// the wall time is longer, by design: a starved vCPU is not a hung one);
/// the
/// spinning ones (LOOP, SOFTLOCKUP, SPINLOCKUP, HARDLOCKUP) are then
/// recovered under the default policy once certain. HARDLOCKUP (IRQs off)
/// is certain once no tick landed for the threshold of vCPU time (within
/// 2 s of the trigger); the others need the kill-after without
/// progress, shortened here to 3 s of vCPU time (the default, the guest's
/// 20 s soft-lockup limit, would make the test a minute longer).
#[test]
fn every_hang_type_detected_in_under_a_second() {
    let cfg = CampaignConfig {
        types: HANG_TYPES.iter().map(|s| s.to_string()).collect(),
        hang: HangConfig::default().with_kill_after(Duration::from_secs(3)),
        hang_wait: Duration::from_secs(60),
        ..CampaignConfig::default()
    };
    let rep = campaign::run(&cfg, "catalogue_hang test").expect("campaign");
    eprintln!("{}", campaign::markdown(&rep));
    for t in &rep.types {
        let wall = t.hang_after_trigger_ms.unwrap_or_else(|| panic!("{}: no hang detected: {:?}", t.name, t.notes));
        if t.name != "HUNG_TASK" {
            // A sleeping task has no vCPU of its own to count.
            let ms = t.hang_detect_vcpu_ms.unwrap_or_else(|| panic!("{}: the vCPU threads were not known", t.name));
            assert!(ms < 1000.0, "{}: reported after {ms:.0} ms of vCPU time without progress ({wall:.0} ms wall)", t.name);
        } else {
            assert!(wall < 1000.0 * load_factor(), "{}: detected {wall:.0} ms after the trigger", t.name);
        }
        let want = if t.name == "HUNG_TASK" { Class::HangDeclined } else { Class::HangRecovered };
        assert_eq!(t.class, want, "{}: {:?} {:?}", t.name, t.reason, t.notes);
        if t.name == "HARDLOCKUP" {
            let c = t.hang_certain_vcpu_ms.expect("HARDLOCKUP certain, with its vCPU time");
            assert!(c < 2000.0, "HARDLOCKUP (IRQs off) certain only after {c:.0} ms of vCPU time");
        }
    }
}

/// How much slower than an idle host this one is now: the 1-minute load
/// average per core, at least 1. A blocked task's detection is counted in
/// wall time (it runs on no vCPU), which a loaded host stretches.
fn load_factor() -> f64 {
    let load: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse().ok()))
        .unwrap_or(1.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    (load / cores).max(1.0)
}

/// No hang report at all (certain or not) over a busy workload, with the
/// host deliberately loaded (a busy thread per host core) and the guest
/// paused through QMP for 2 s in the middle.
#[test]
fn busy_workload_raises_no_false_hang() {
    let secs = std::env::var("HANG_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let cfg = CampaignConfig { repair_hangs: false, ..CampaignConfig::default() };
    let hog = HostHog::start();
    let opts = WorkloadOptions { pause: Some((Duration::from_secs(secs / 2), Duration::from_secs(2))), act: false };
    let rep = campaign::run_workload(&campaign::busy_workload(secs), Duration::from_secs(secs + 90), &cfg, &opts).expect("busy run");
    drop(hog);
    eprintln!("{}", serde_json::to_string_pretty(&rep).unwrap());
    assert!(rep.completed, "the workload did not finish");
    assert!(rep.secs >= Duration::from_secs(secs).as_secs_f64());
    assert!(rep.vcpu_threads.starts_with("query-cpus-fast"), "{}", rep.vcpu_threads);
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    assert_eq!(rep.traps, 0);
    assert!(rep.hangs.is_empty(), "false hangs: {:?}", rep.hangs);
}

/// Uninterruptible waits of 1-3 s (writers queued on a tmpfs file's inode
/// lock behind a writer of 96-200 MiB in one `write`): long non-preemptible
/// work and `TASK_UNINTERRUPTIBLE` sleeps that end by themselves. The
/// default policy may report them (not certain) and must act on none.
#[test]
fn uninterruptible_bursts_are_never_acted_on() {
    let cfg = CampaignConfig::default();
    let hog = HostHog::start();
    let workload = "for n in 96 160 200 128 200; do \
           dd if=/dev/zero of=/data/big bs=${n}M count=1 2>/dev/null & w=$!; sleep 0.1; \
           dd if=/dev/zero of=/data/big bs=4k count=1 conv=notrunc 2>/dev/null & v=$!; \
           t0=$(cut -d' ' -f1 /proc/uptime); wait $w $v; t1=$(cut -d' ' -f1 /proc/uptime); \
           echo burst ${n}M $t0 $t1; rm -f /data/big; \
         done; echo busy-done";
    let opts = WorkloadOptions { pause: None, act: true };
    let rep = campaign::run_workload(workload, Duration::from_secs(240), &cfg, &opts).expect("burst run");
    drop(hog);
    eprintln!("{}", serde_json::to_string_pretty(&rep).unwrap());
    assert!(rep.completed, "the workload did not finish: {:?}", rep.output);
    assert!(rep.errors.is_empty(), "{:?}", rep.errors);
    assert!(rep.certain.is_empty(), "acted on: {:?}", rep.certain);
    assert_eq!((rep.acted, rep.traps), (0, 0));
}

/// SMP_CALL_LOCKUP (the 6.12 LKDTM kernel): the target CPU loops in the
/// IPI's handler with interrupts off (over whatever it ran, often the idle
/// task, which the sampler never reports), and the caller spins waiting for
/// the call to complete, preemption off. Killing the caller cannot end the
/// hang (and left it half-exited: `repair failed` in an earlier catalogue);
/// the spin is declined, naming the stuck CPU, and nobody is killed. The
/// hang is real by the guest's own account: its soft-lockup watchdog.
#[test]
fn a_spin_waiting_on_a_cpu_stuck_with_interrupts_off_is_not_killed() {
    let cfg = CampaignConfig {
        kernel: harness::Kernel::Lkdtm612,
        types: vec!["SMP_CALL_LOCKUP".into()],
        hang: HangConfig::default().with_kill_after(Duration::from_secs(3)),
        hang_wait: Duration::from_secs(90),
        type_timeout: Duration::from_secs(30),
        ..CampaignConfig::default()
    };
    let rep = campaign::run(&cfg, "catalogue_hang test").expect("campaign");
    eprintln!("{}", campaign::markdown(&rep));
    let t = &rep.types[0];
    assert_eq!(t.class, Class::HangDeclined, "{:?} {:?} {:?}", t.reason, t.notes, t.console);
    assert_ne!(t.action.as_deref(), Some("kill"), "{:?}", t.reason);
    assert!(t.notes.iter().all(|n| !n.contains("killed")), "{:?}", t.notes);
}
