//! `repair-guest demo`: the README's main job. Boots the guest kit's Debian
//! guest under QEMU, builds its repair image, watches it, crashes processes
//! in it and shows each repaired and the guest carrying on.

use crate::kit::kit_image;
use anyhow::{bail, Result};
use harness::{Guest, GuestConfig, Kernel};
use loader::attach::QemuGuest;
use loader::flow::FlowConfig;
use loader::watch::{watch, EventSink, WatchConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn run(crashes: u32) -> Result<()> {
    println!("== booting the guest kit's Debian cloud kernel under QEMU (TCG, 2 vCPUs, KASLR on)");
    let t = Instant::now();
    let mut guest = Guest::boot(&GuestConfig::new(Kernel::Debian).with_ram_file())?;
    println!("   booted to init in {:.1} s: {}", t.elapsed().as_secs_f64(), guest.wait_for_console("GUEST-KIT READY", Duration::from_secs(1))?);

    println!("== building the repair image for this kernel");
    let image = kit_image(Kernel::Debian)?;
    println!("   {} (build-id {})", image.kernel.release, image.kernel.build_id_hex());

    println!("== attaching: gdbstub {}, RAM file", guest.gdb_addr());
    let spec = QemuGuest { gdb: Some(guest.gdb_addr().parse()?), qmp: None, ram_file: guest.ram_file() };
    let mut attached = spec.connect()?;
    let mut session = attached.session(image, FlowConfig::default())?;
    let mut backend = attached.backend;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let watcher = std::thread::spawn(move || {
        let mut sink = EventSink::stdout();
        watch(backend.guest(), &mut session, &mut sink, stop2, WatchConfig::default())
    });

    // Let the bystander get going, so its records visibly carry on.
    let mut before = guest.ping(Duration::from_secs(30))?;
    let t = Instant::now();
    while before < 20 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(250));
        before = guest.ping(Duration::from_secs(30))?;
    }
    println!("== the guest runs: the bystander has written {before} checksummed records");
    for i in 1..=crashes {
        println!("== crash {i}/{crashes}: a child writes 'c' to /proc/sysrq-trigger");
        let crash = guest.crash("sysrq-c")?;
        let status = guest.wait_crash_exit(&crash, Duration::from_secs(60))?;
        let n = guest.ping(Duration::from_secs(30))?;
        println!(
            "   the child (pid {}) exited with status {status}{}; the bystander is at {n} records",
            crash.pid,
            if status == 137 { " (SIGKILL): the crash was repaired" } else { "" }
        );
        if status != 137 {
            bail!("the crashing child was not killed (status {status}); console tail:\n{}", guest.console_tail(30));
        }
    }
    let after = guest.ping(Duration::from_secs(30))?;
    let v = guest.verify_bystander()?;
    let spawn = guest.run("echo a new process; uptime", Duration::from_secs(30))?;
    println!("== the guest carries on: bystander {before} -> {after} records, data {} ({}); a new process says {:?}",
        if v.ok { "intact" } else { "DAMAGED" }, v.detail, spawn.output);
    stop.store(true, Ordering::Relaxed);
    let end = watcher.join().map_err(|_| anyhow::anyhow!("the watcher thread panicked"))??;
    println!("== done ({end:?}); no reboot, {crashes} crashes repaired");
    if !v.ok {
        bail!("bystander data damaged: {}", v.detail);
    }
    Ok(())
}
