//! `repair-guest demo`: the README's main job. Boots the guest kit's Debian
//! guest under QEMU, builds its repair image, watches it, crashes processes
//! in it and shows each repaired and the guest carrying on.

use crate::access::Endpoint;
use crate::flow::{FlowConfig, Session};
use crate::gdb::GdbGuest;
use crate::memory::{RamFile, WithRam};
use crate::watch::{watch, EventSink, WatchConfig};
use anyhow::{bail, Context, Result};
use harness::{Guest, GuestConfig, Kernel, Kit};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Builds (or reuses, keyed by the vmlinux's size and mtime) the repair
/// image of a kit kernel, in the kit directory.
pub fn kit_image(kernel: Kernel) -> Result<builder::RepairImage> {
    let kit = Kit::locate()?;
    let vmlinux = kit.vmlinux(kernel)?;
    let meta = std::fs::metadata(&vmlinux)?;
    let mtime = meta.modified()?.duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let path = kit.dir.join(format!("{}/repair-{}-{mtime}-{}.img", kernel.dir_name(), meta.len(), env!("CARGO_PKG_VERSION")));
    if let Ok(img) = builder::RepairImage::read(&path) {
        if img.unikernel.segments == builder::builtin_unikernel()?.segments {
            return Ok(img);
        }
    }
    let img = builder::build_from_vmlinux(&vmlinux, &builder::BuildOptions::default())
        .with_context(|| format!("building the repair image of {}", vmlinux.display()))?;
    img.write(&path).with_context(|| format!("writing {}", path.display()))?;
    Ok(img)
}

pub fn run(crashes: u32) -> Result<()> {
    println!("== booting the guest kit's Debian cloud kernel under QEMU (TCG, 2 vCPUs, KASLR on)");
    let t = Instant::now();
    let mut guest = Guest::boot(&GuestConfig::new(Kernel::Debian).with_ram_file())?;
    println!("   booted to init in {:.1} s: {}", t.elapsed().as_secs_f64(), guest.wait_for_console("GUEST-KIT READY", Duration::from_secs(1))?);

    println!("== building the repair image for this kernel");
    let image = kit_image(Kernel::Debian)?;
    println!("   {} (build-id {})", image.kernel.release, image.kernel.build_id_hex());

    println!("== attaching: gdbstub {}, RAM file", guest.gdb_addr());
    let gdb = GdbGuest::connect(guest.gdb_addr().parse::<Endpoint>()?)?;
    let ram_path = guest.ram_file().context("the demo guest has a RAM file")?;
    let ram = RamFile::open_pc(&ram_path, 0xe000_0000)?;
    let mut backend = WithRam::new(gdb, ram);
    let cfg = FlowConfig { ram_end: Some(512 << 20), ..FlowConfig::default() };
    let mut session = Session::attach(&mut backend, image, cfg)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let watcher = std::thread::spawn(move || {
        let mut sink = EventSink::stdout();
        watch(&mut backend, &mut session, &mut sink, stop2, WatchConfig::default())
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
