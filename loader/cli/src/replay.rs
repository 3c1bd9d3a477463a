//! `repair-guest replay`, and the capture of a crash at the trap that the
//! replay tests and the KVM example compare against.

use anyhow::{ensure, Context};
use loader::attach::QemuGuest;
use loader::flow::{FlowConfig, Mode, Outcome, Timings};
use loader::kvm::Caps;
use loader::replay::{replay, CoreDump, ReplayOptions, Verdict};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A crash trapped at `panic` in a QEMU guest, dumped, and diagnosed there
/// by the QEMU backend: the reference a replay is compared with.
#[derive(Debug)]
pub struct Captured {
    pub dump: PathBuf,
    /// The QEMU backend's [`Mode::Diagnose`] run on the held guest.
    pub qemu: Outcome,
    /// The pid of the guest process that crashed the kernel.
    pub crashed_pid: u32,
}

/// Boots a kit guest under QEMU (TCG, RAM file), traps the crash `crash`
/// (a harness crash kind: `sysrq-c`, an LKDTM type) at the entry of
/// `panic`, writes a QMP `dump-guest-memory` ELF dump to `dump` while the
/// guest is held there, then runs the repair kernel on the held guest with
/// the QEMU backend in [`Mode::Diagnose`]. For tests and examples.
pub fn capture_at_trap(cfg: &harness::GuestConfig, crash: &str, dump: &Path) -> anyhow::Result<Captured> {
    let cfg = cfg.clone().with_ram_file();
    let mut guest = harness::Guest::boot(&cfg).context("booting the kit guest under QEMU")?;
    let image = crate::kit::kit_image(cfg.kernel)?;
    let spec = QemuGuest { gdb: Some(guest.gdb_addr().parse()?), qmp: None, ram_file: guest.ram_file() };
    let mut attached = spec.connect()?;
    let mut session = attached.session(image, FlowConfig::default())?;
    let g = attached.guest();
    session.arm(g)?;
    g.resume()?;
    let handle = guest.crash(crash)?;
    let stop = g.wait_stop(Some(Duration::from_secs(120)))?.context("no trap at panic within 120 s")?;
    ensure!(stop.rip == session.panic_addr()?, "stopped at {} instead of panic", stop.rip);
    let _ = std::fs::remove_file(dump);
    let mut qmp = loader::qmp::Qmp::connect_timeout(&guest.qmp_addr().parse()?, Duration::from_secs(300))?;
    qmp.execute(
        "dump-guest-memory",
        Some(serde_json::json!({ "paging": false, "protocol": format!("file:{}", dump.display()) })),
    )
    .with_context(|| format!("QMP dump-guest-memory to {}", dump.display()))?;
    let qemu = session.repair(g, stop.vcpu, Mode::Diagnose)?;
    Ok(Captured { dump: dump.to_path_buf(), qemu, crashed_pid: handle.pid })
}

#[derive(serde::Serialize)]
struct JsonReport<'a> {
    dump: &'a Path,
    backend: &'static str,
    kvm: &'a Caps,
    vcpus: usize,
    crashed_vcpu: u32,
    kaslr_slide: String,
    ram_end: String,
    memory: Vec<String>,
    staging: String,
    verdict: Verdict,
    applied: bool,
    timings_ms: &'a Timings,
}

/// `repair-guest replay DUMP --image IMAGE [--json]`.
pub fn run(dump: &Path, image: &Path, json: bool) -> anyhow::Result<()> {
    let img = builder::RepairImage::read(image).with_context(|| format!("reading the repair image {}", image.display()))?;
    let d = CoreDump::open(dump)?;
    let r = replay(&d, img, &ReplayOptions::default())
        .with_context(|| format!("replaying {} with {}", dump.display(), image.display()))?;
    let v = Verdict::of(&r.outcome);
    if json {
        let rep = JsonReport {
            dump,
            backend: "kvm",
            kvm: &r.caps,
            vcpus: r.nr_vcpus,
            crashed_vcpu: r.outcome.vcpu.0,
            kaslr_slide: format!("{:#x}", r.slide),
            ram_end: format!("{:#x}", r.ram_end),
            memory: r.ram_ranges.iter().map(|(s, e)| format!("{s:#x}-{e:#x}")).collect(),
            staging: format!("{:#x}+{:#x} (slot {})", r.staging.gpa, r.staging.size, r.staging.slot),
            verdict: v,
            applied: r.outcome.applied,
            timings_ms: &r.outcome.timings,
        };
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!("replay of {} under in-process KVM ({} vCPUs, RAM {:#x}, KASLR slide {:#x})", dump.display(), r.nr_vcpus, r.ram_end, r.slide);
        println!("  {}", r.caps);
        let blocks: Vec<String> = r.ram_ranges.iter().map(|(s, e)| format!("{s:#x}-{e:#x}")).collect();
        println!("  memory blocks {}; repair kernel staged in slot {} at {:#x}+{:#x}", blocks.join(", "), r.staging.slot, r.staging.gpa, r.staging.size);
        println!("crash:    {} on CPU {}: {:?}", v.crash_kind, r.outcome.vcpu.0, v.message);
        println!("offender: pid {} (tgid {}) {:?}", v.pid, v.tgid, v.comm);
        println!("tasks:    {}", v.nr_tasks);
        println!("verdict:  {} ({}, code {}): {}", v.action, v.reason_name, v.reason_code, v.reason);
        println!("          (diagnose mode: reported, not applied)");
        let t = &r.outcome.timings;
        println!("timings:  run {:.1} ms, total {:.1} ms (stage {:.1}, verdict {:.1}, restore {:.1})", t.run, t.total, t.stage, t.verdict, t.restore);
    }
    Ok(())
}

