//! Checkpoint and warm-restart costs, measured in one run on the kit's
//! LKDTM guest (QEMU TCG, 2 vCPUs), beside their peers:
//! - checkpoints (QEMU snapshot-save into the watcher's qcow2 node, the
//!   engine of `watch --checkpoint-every`): the pause per checkpoint and
//!   the slowdown of a guest workload at several intervals, for 512 MiB
//!   and 2 GiB guests with a quarter of RAM filled; then the rollback
//!   (snapshot-load) time. Beside VM-uCheckpoint's 6.3% at 50 ms (source).
//! - warm restart (`restart-vmm`, cpr-transfer on the kit's QEMU 10): the
//!   guest's downtime, beside a cold reboot of the same guest to its
//!   bystander, measured in the same run.
//!
//! `cargo bench -p repair-guest --bench checkpoint` (`BENCH_SIZES` in MiB,
//! default `512,2048`; `BENCH_INTERVALS` in s, default `0.5,1,2,5`;
//! `BENCH_WORK` loop iterations of the workload, default 200000).

use harness::{Guest, GuestConfig, Kernel};
use loader::checkpoint::Checkpoints;
use loader::qmp::Qmp;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_list(name: &str, default: &str) -> Vec<f64> {
    std::env::var(name).unwrap_or_else(|_| default.into()).split(',').map(|s| s.trim().parse().expect(name)).collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// Wall time of the guest workload (a shell loop, CPU-bound) in seconds.
fn workload(guest: &mut Guest, work: u64) -> f64 {
    let t = Instant::now();
    let r = guest.run(&format!("i=0; while [ $i -lt {work} ]; do i=$((i+1)); done; echo $i"), Duration::from_secs(1800)).unwrap();
    assert_eq!(r.status, 0, "{r:?}");
    t.elapsed().as_secs_f64()
}

/// Takes checkpoints every `every` until `stop`, as the watcher does
/// (guest stopped, snapshot-save, resumed); returns the pauses in ms.
fn checkpointer(qmp_addr: String, file: std::path::PathBuf, every: Duration, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(Vec<f64>, Vec<f64>)> {
    std::thread::spawn(move || {
        let mut q = Qmp::connect(&qmp_addr.parse().unwrap()).unwrap();
        let mut store = Checkpoints::open(&mut q, &file).unwrap();
        let mut pauses = Vec::new();
        let mut loads = Vec::new();
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                let t = Instant::now();
                q.stop().unwrap();
                store.take(&mut q, t).unwrap();
                q.cont().unwrap();
                pauses.push(t.elapsed().as_secs_f64() * 1e3);
                next = Instant::now() + every;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Rollback time: a checkpoint of the idle guest (its init waiting
        // for the next command, so a rollback replays nothing), loaded
        // three times.
        let t = Instant::now();
        q.stop().unwrap();
        store.take(&mut q, t).unwrap();
        q.cont().unwrap();
        for _ in 0..3 {
            let t = Instant::now();
            q.stop().unwrap();
            store.restore_latest(&mut q).unwrap();
            q.cont().unwrap();
            loads.push(t.elapsed().as_secs_f64() * 1e3);
            std::thread::sleep(Duration::from_millis(500));
        }
        store.close(&mut q);
        (pauses, loads)
    })
}

fn checkpoints(sizes: &[f64], intervals: &[f64], work: u64) {
    println!("## Checkpoints (QEMU snapshot-save, the engine of `watch --checkpoint-every`)\n");
    println!("Workload: a CPU-bound shell loop of {work} iterations in the guest; a quarter of guest RAM filled with non-zero data first.\n");
    println!("| guest | interval | checkpoints | pause mean (ms) | pause max (ms) | paused share | workload (s), without / with | slowdown | rollback (ms, mean of 3) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &mib in sizes {
        let mut cfg = GuestConfig::new(Kernel::Lkdtm).with_ram_file();
        cfg.mem_mib = mib as u32;
        let mut guest = Guest::boot(&cfg).unwrap();
        let fill = (mib as u64) / 4;
        let r = guest.run(&format!("yes crash-repair-checkpoint-bench | head -c {fill}M > /data/fill; echo done"), Duration::from_secs(1800)).unwrap();
        assert_eq!(r.status, 0, "{r:?}");
        for &secs in intervals {
            // Each run with checkpoints right after one without, on a
            // host shared with other work: the pair sees the same load.
            let base = workload(&mut guest, work);
            let stop = Arc::new(AtomicBool::new(false));
            let file = guest.dir().join("bench-ckpt.qcow2");
            let h = checkpointer(guest.qmp_addr(), file, Duration::from_secs_f64(secs), stop.clone());
            let t = workload(&mut guest, work);
            stop.store(true, Ordering::Relaxed);
            let (pauses, loads) = h.join().unwrap();
            println!(
                "| {mib} MiB | {secs} s | {} | {:.0} | {:.0} | {:.1}% | {base:.2} / {t:.2} | {:+.1}% | {:.0} |",
                pauses.len(),
                mean(&pauses),
                max(&pauses),
                pauses.iter().sum::<f64>() / 1e3 / t * 100.0,
                (t / base - 1.0) * 100.0,
                mean(&loads)
            );
        }
        assert!(guest.verify_bystander().unwrap().ok);
    }
    println!("\n`paused share`: the guest's time held stopped for checkpoints over the workload's wall time (what the interval costs whatever the host's load); `slowdown`: the workload's wall time with checkpoints over the run just before without (on a shared host, noisy).");
    println!("\nPeer (source): VM-uCheckpoint, 6.3% overhead at a 50 ms interval (incremental, copy-on-write checkpoints in the hypervisor).\n");
}

fn warm_restart(runs: u32) {
    println!("## Warm restart of QEMU (`restart-vmm`, cpr-transfer, QEMU 10) beside a cold reboot, same guest\n");
    let bin = env!("CARGO_BIN_EXE_repair-guest");
    let mut cfg = GuestConfig::new(Kernel::Lkdtm).with_qemu10().expect("scripts/kit-qemu10").with_ram_file().with_second_qmp().with_reboot();
    cfg.qemu_args.extend(["-machine".to_string(), "aux-ram-share=on".to_string()]);
    let mut guest = Guest::boot(&cfg).unwrap();
    let mut warm = Vec::new();
    let mut qemu_own = Vec::new();
    for i in 0..runs {
        let out = std::process::Command::new(bin)
            .args(["restart-vmm", "--qmp", &guest.qmp2_addr().unwrap()])
            .arg("--dir")
            .arg(guest.dir().join(format!("cpr-{i}")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        warm.push(line["downtime_ms"].as_f64().unwrap());
        qemu_own.push(line["qemu_downtime_ms"].as_f64().unwrap_or(f64::NAN));
        guest.follow_restart(line["new_pid"].as_u64().unwrap() as u32).unwrap();
        assert!(guest.verify_bystander().unwrap().ok);
    }
    // Cold: a reset of the same guest, to its bystander running again.
    let mut cold = Vec::new();
    for _ in 0..runs {
        let from = guest.console_len();
        let t = Instant::now();
        guest.qmp(&serde_json::json!({"execute": "system_reset"})).unwrap();
        guest.wait_for_console_from(from, "GUEST-KIT READY", Duration::from_secs(300)).unwrap();
        cold.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("| | runs | mean (ms) | max (ms) |");
    println!("|---|---|---|---|");
    println!("| warm restart: `migrate` to the new QEMU running | {runs} | {:.0} | {:.0} |", mean(&warm), max(&warm));
    println!("| warm restart: QEMU's own downtime figure | {runs} | {:.0} | {:.0} |", mean(&qemu_own), max(&qemu_own));
    println!("| cold reboot (system_reset) to the bystander running | {runs} | {:.0} | {:.0} |", mean(&cold), max(&cold));
    println!("\nA cold reboot also loses every process; the warm restart loses none (the bystander verified after each).\n");
    println!("Peers (source): Warm-VM reboot (Kourai & Chiba) keeps guests' memory across a VMM reboot; ReHype microreboot < 750 ms.");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let sizes = env_list("BENCH_SIZES", "512,2048");
    let intervals = env_list("BENCH_INTERVALS", "0.5,1,2,5");
    let work = std::env::var("BENCH_WORK").ok().and_then(|w| w.parse().ok()).unwrap_or(200_000);
    println!("# Checkpoint and warm-restart benchmark ({})\n", loader::watch::utc_now());
    checkpoints(&sizes, &intervals, work);
    warm_restart(3);
}
