//! The hang watch of the program: the sampler [`loader::watch::watch`]
//! makes for each kernel instance, as `repair-guest watch --hangs` and the
//! crash campaign build it.

use loader::access::CpuState;
use loader::flow::Session;
use loader::hang::{self, HangConfig, HangLayout, Sampler, HangError};
use loader::qmp::Qmp;
use loader::ram::RamFile;
use loader::watch::HangWatch;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The hang policy from the options: report after `threshold` without
/// progress, certain after `kill_after` (default: the guest's soft-lockup
/// limit) or, with `at_detection`, at once.
pub fn hang_config(threshold: Duration, kill_after: Option<Duration>, at_detection: bool) -> HangConfig {
    let mut cfg = if at_detection { HangConfig::at_detection() } else { HangConfig::default() };
    if let Some(k) = kill_after {
        cfg = cfg.with_kill_after(k);
    }
    cfg.cpu_threshold = threshold;
    cfg.blocked_threshold = threshold;
    cfg
}

/// QEMU's vCPU threads (QMP `query-cpus-fast`, else the threads' names),
/// so no-progress time is counted in CPU time each vCPU really got; and in
/// words, how they were found.
pub fn vcpu_threads(qmp: &mut Qmp, qemu_pid: Option<u32>, nr_vcpus: u32) -> (Option<Vec<PathBuf>>, String) {
    let Some(pid) = qemu_pid else { return (None, "unknown (no QEMU pid): wall time".into()) };
    match hang::vcpu_threads_from_qmp(qmp, pid) {
        Ok(t) => {
            let how = format!("query-cpus-fast: {} vCPU threads", t.len());
            (Some(t), how)
        }
        Err(e) => {
            tracing::warn!("vCPU threads from query-cpus-fast: {e}; trying thread names");
            match hang::qemu_vcpu_threads(pid, nr_vcpus) {
                Some(t) => (Some(t), format!("thread names (QMP: {e})")),
                None => (None, format!("unknown ({e}): wall time")),
            }
        }
    }
}

/// What the sampler is made of.
#[derive(Debug, Clone)]
pub struct SamplerSpec {
    /// The file backing guest RAM (each sampler maps it anew), and its map
    /// as the attach learnt it (QEMU's own, with QMP).
    pub ram_file: PathBuf,
    pub ram_regions: Vec<loader::ram::RamRegion>,
    pub nr_vcpus: u32,
    pub cfg: HangConfig,
    pub vcpu_threads: Option<Vec<PathBuf>>,
    /// The layout at link-time addresses; default: the session's image's.
    pub layout: Option<HangLayout>,
}

/// The hang watch: a sampler made for each kernel instance (its own mapping
/// of the RAM file, the kernel's page tables, the layout at the session's
/// slide). `act`: act on certain hangs, else only report them.
/// `kill_after`, when given, receives the kill-after in force and where it
/// came from, each time a sampler is made.
pub fn hang_watch(spec: SamplerSpec, act: bool, kill_after: Option<Arc<Mutex<String>>>) -> HangWatch {
    let make = move |session: &Session, regs: &CpuState| -> Result<Sampler<RamFile>, HangError> {
        let ram = RamFile::open_with_layout(&spec.ram_file, spec.ram_regions.clone())?;
        let layout = match &spec.layout {
            Some(l) => l.slid(session.slide.slide),
            None => HangLayout::from_image(&session.image, session.slide.slide)?,
        };
        let mut s = Sampler::new(ram, regs, layout, spec.nr_vcpus, spec.cfg);
        s.vcpu_threads = spec.vcpu_threads.clone();
        if let Some(k) = &kill_after {
            *k.lock().unwrap_or_else(|e| e.into_inner()) = s.kill_after_source.clone();
        }
        Ok(s)
    };
    HangWatch { make: Box::new(make), act }
}
