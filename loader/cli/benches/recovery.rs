//! Recovery latency: from the trap at `panic` to the guest running again,
//! broken down by step, over N sysrq-c crashes of the kit's Debian guest
//! (QEMU TCG, 2 vCPUs), printed beside the reboot time of the same guest
//! to its init, measured in the same run, and the peers' published figures;
//! then the same crashes in the kit's Debian 13 systemd guest
//! (`GuestConfig::distro`, `scripts/kit-distro`; `BENCH_DISTRO=0` skips it).
//!
//! `cargo bench -p repair-guest --bench recovery` (N: `BENCH_CRASHES`, default 20).

use harness::{Guest, GuestConfig, Kernel};
use loader::access::GuestAccess;
use loader::flow::{FlowConfig, Mode};
use std::time::{Duration, Instant};

struct Stats(Vec<f64>);

impl Stats {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }
    fn mean(&self) -> f64 {
        self.0.iter().sum::<f64>() / self.0.len().max(1) as f64
    }
    fn pct(&self, p: f64) -> f64 {
        let v = self.sorted();
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    }
    fn row(&self, name: &str) {
        println!("| {name:<32} | {:>8.2} | {:>8.2} | {:>8.2} | {:>8.2} |", self.mean(), self.pct(0.5), self.pct(0.95), self.pct(1.0));
    }
}

/// The same crashes in the kit's Debian 13 systemd guest
/// (`GuestConfig::distro`, `scripts/kit-distro`): every step's times, and
/// the number of tasks the guest ran. `None` when the kit has no distro
/// rootfs.
/// Every step's times, the guest's task count, and its boot to
/// multi-user (ms): the reboot a repair spares.
type DistroSteps = (Vec<Stats>, usize, f64);

fn distro_steps(n: usize) -> Result<Option<DistroSteps>, Box<dyn std::error::Error>> {
    let cfg = GuestConfig::distro().with_ram_file();
    if harness::Kit::locate()?.distro_initramfs().is_err() {
        return Ok(None);
    }
    let t = Instant::now();
    let mut guest = Guest::boot(&cfg)?;
    guest.run("systemctl is-system-running --wait", Duration::from_secs(180))?;
    let boot_ms = t.elapsed().as_secs_f64() * 1e3;
    // /proc/loadavg's fourth field: runnable/total tasks (threads included).
    let la = guest.run("cat /proc/loadavg", Duration::from_secs(60))?;
    let tasks = la.output.first().and_then(|l| l.split_whitespace().nth(3)?.split('/').nth(1)?.parse().ok()).unwrap_or(0);
    let cols = crash_steps(&mut guest, n, "distro ")?;
    if !guest.verify_bystander()?.ok {
        return Err("distro guest: bystander data damaged".into());
    }
    Ok(Some((cols, tasks, boot_ms)))
}

/// `n` sysrq-c crashes from children of `guest` (a kit Debian-kernel guest
/// with a RAM file), each repaired: the times of save, stage, run, verdict,
/// restore, resume, and trap to running. `what` names the guest in errors.
fn crash_steps(guest: &mut Guest, n: usize, what: &str) -> Result<Vec<Stats>, Box<dyn std::error::Error>> {
    let image = repair_guest::kit::kit_image(Kernel::Debian)?;
    let (mut g, mut session) = repair_guest::kit::attach(guest, image, FlowConfig::default())?;
    session.arm(&mut g)?;
    g.resume()?;
    let mut cols: Vec<Stats> = (0..7).map(|_| Stats(Vec::new())).collect();
    for i in 0..n {
        let crash = guest.crash("sysrq-c")?;
        let stop = g.wait_stop(Some(Duration::from_secs(90)))?.ok_or("no trap")?;
        let t0 = Instant::now();
        let o = session.repair(&mut g, stop.vcpu, Mode::Repair)?;
        let t_resume = Instant::now();
        g.resume()?;
        let resume = t_resume.elapsed().as_secs_f64() * 1e3;
        let total = t0.elapsed().as_secs_f64() * 1e3;
        if !o.applied {
            return Err(format!("{what}crash {i} not repaired: {}", o.reason()).into());
        }
        let status = guest.wait_crash_exit(&crash, Duration::from_secs(60))?;
        if status != 137 {
            return Err(format!("{what}crash {i}: child exit {status}").into());
        }
        let t = &o.timings;
        for (c, v) in cols.iter_mut().zip([t.save, t.stage, t.run, t.verdict, t.restore, resume, total]) {
            c.0.push(v);
        }
    }
    Ok(cols)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let n: usize = std::env::var("BENCH_CRASHES").ok().and_then(|v| v.parse().ok()).unwrap_or(20);

    // Reboot of the same guest to init: QEMU start to the init's ready marker.
    let mut reboot = Stats(Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        let g = Guest::boot(&GuestConfig::new(Kernel::Debian))?;
        reboot.0.push(t.elapsed().as_secs_f64() * 1e3);
        g.shutdown()?;
    }

    let mut guest = Guest::boot(&GuestConfig::new(Kernel::Debian).with_ram_file())?;
    let names = ["save", "stage", "run (repair kernel in the guest)", "verdict", "restore", "resume", "trap to running (total)"];
    let cols = crash_steps(&mut guest, n, "")?;
    let alive = guest.verify_bystander()?;

    println!("\nrecovery latency over {n} sysrq-c crashes, Debian 6.1 cloud kernel, QEMU TCG, 2 vCPUs (ms)\n");
    println!("| {:<32} | {:>8} | {:>8} | {:>8} | {:>8} |", "step", "mean", "p50", "p95", "max");
    println!("|{:-<34}|{:-<10}|{:-<10}|{:-<10}|{:-<10}|", "", "", "", "", "");
    for (c, name) in cols.iter().zip(names) {
        c.row(name);
    }
    // The same crashes in a Debian 13 systemd guest (hundreds of tasks
    // rather than a busybox init's few dozen): `BENCH_DISTRO=0` skips it.
    let distro = if std::env::var("BENCH_DISTRO").as_deref() == Ok("0") { None } else { distro_steps(n)? };
    match &distro {
        Some((dcols, tasks, _)) => {
            println!("\nthe same {n} crashes in the Debian 13 systemd guest ({tasks} tasks), same kernel (ms)\n");
            println!("| {:<32} | {:>8} | {:>8} | {:>8} | {:>8} |", "step", "mean", "p50", "p95", "max");
            println!("|{:-<34}|{:-<10}|{:-<10}|{:-<10}|{:-<10}|", "", "", "", "", "");
            for (c, name) in dcols.iter().zip(names) {
                c.row(name);
            }
        }
        None => println!("\n(no Debian 13 systemd guest row: scripts/kit-distro builds its rootfs)"),
    }
    println!("\n| peer                                               | figure (ms) |");
    println!("|----------------------------------------------------|-------------|");
    println!("| reboot of the same guest to init (this run, mean of 3) | {:>7.0} |", reboot.mean());
    if let Some((_, _, boot_ms)) = &distro {
        println!("| boot of the Debian 13 systemd guest to multi-user (this run) | {boot_ms:>7.0} |");
    }
    println!("| Jann et al. 2012, OS repair image (published)      | < 3000      |");
    println!("| ReHype hypervisor microreboot (published)          | < 750       |");
    println!("| Firecracker snapshot restore (published)           | 5-8         |");
    let ours = cols.last().map(|c| c.mean()).unwrap_or(0.0);
    println!("\nours: {ours:.1} ms trap-to-running; {:.0}x faster than a reboot to init of this tiny guest; bystander data {}",
        reboot.mean() / ours, if alive.ok { "intact" } else { "DAMAGED" });
    Ok(())
}
