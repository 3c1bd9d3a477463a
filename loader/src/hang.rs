//! Hang detection from outside, without stopping the guest.
//!
//! A [`Sampler`] reads the guest's scheduler state through guest RAM (the
//! RAM file QEMU shares, see [`crate::ram::RamFile`]) while every vCPU
//! keeps running, and declares:
//!
//! - a **stuck CPU** when, for longer than the threshold, the CPU's
//!   `rq->curr` is the same non-idle task, `rq->nr_switches` has not moved,
//!   and that task's `utime` has not moved either (so it is not a busy
//!   user-space loop, which is progress): the task spins in the kernel
//!   (LKDTM LOOP, SOFTLOCKUP, SPINLOCKUP; HARDLOCKUP too, and then its
//!   `stime` does not move either, because with IRQs off no tick lands);
//! - a **blocked task** when a thread sits in `TASK_UNINTERRUPTIBLE`
//!   (without `TASK_NOLOAD` or `TASK_WAKEKILL`, as the kernel's hung-task
//!   detector counts it) with no context switch for longer than the
//!   blocked threshold (LKDTM HUNG_TASK). Every thread is scanned, not only
//!   thread-group leaders, when the image's profile has
//!   `task_struct.thread_group`.
//!
//! **Detection is not the verdict.** A hang is reported fast (the threshold,
//! 500 ms by default) with `certain: false`, and reported a second time, at
//! most, when it becomes certain: a CPU stuck with IRQs off (no tick in the
//! threshold of vCPU time) is certain at once; any other stuck CPU only
//! after [`HangConfig::kill_after`] without progress (by default the guest's
//! own soft-lockup limit, 2 x `watchdog_thresh`, 20 s), counted in CPU time
//! the vCPU thread really got, and only while its kernel stack cycles
//! through a few states (a spin) rather than changing at every sample (a
//! long computation such as LKDTM ATOMIC_TIMING, which finishes by itself).
//! Callers act (kill) only on certain hangs.
//!
//! No-progress time is counted in host CPU time the vCPU thread got
//! ([`vcpu_threads_from_qmp`]), so a vCPU the host did not run (an
//! overloaded host) is never a hung one, and a paused guest is never hung:
//! while the shared pause flag is set the sampler forgets what it saw, and
//! every episode starts again after the pause.
//!
//! The guest changes under our feet: every read is bounded, every
//! guest-read number goes through checked arithmetic, a torn read (a task
//! exiting while we walk the list) costs one sample, never a false verdict,
//! because a verdict needs the same facts over many samples.

use crate::access::{translate, AccessError, CpuState, Gpa, Gva, PhysAccess};
use repair_kernel::layout::{Item, KernelLayout};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `TASK_UNINTERRUPTIBLE`, `TASK_WAKEKILL` and `TASK_NOLOAD`
/// (include/linux/sched.h).
const TASK_UNINTERRUPTIBLE: u32 = 0x2;
const TASK_WAKEKILL: u32 = 0x100;
const TASK_NOLOAD: u32 = 0x400;
/// `PF_KTHREAD`.
const PF_KTHREAD: u32 = 0x0020_0000;
/// Cap of the task-list walk (threads included).
const MAX_TASKS: usize = 8192;
/// x86_64 `THREAD_SIZE` without KASAN: the kernel stack hashed as evidence.
const THREAD_SIZE: u64 = 16 << 10;
/// Lowest kernel address: a list pointer below it is a torn read.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
/// Samples of the stack-state window: a stuck CPU whose kernel stack showed
/// a state never seen before in at least half of the last this many samples
/// is computing, not spinning.
const STATE_WINDOW: usize = 25;
/// Distinct stack states remembered per episode.
const MAX_STATES: usize = 8192;
/// The guest's soft-lockup limit when its `watchdog_thresh` is not known.
pub const DEFAULT_SOFTLOCKUP: Duration = Duration::from_secs(20);
/// Linux's hung-task default (`hung_task_timeout_secs`).
pub const DEFAULT_HUNG_TASK: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum HangError {
    #[error("the repair image's layout lacks {0}, which the hang detector reads")]
    Missing(String),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("QEMU's vCPU threads: {0}")]
    VcpuThreads(String),
}

/// Where the scheduler state lives: run-time addresses (KASLR applied) and
/// member offsets, from the vmlinux's DWARF.
#[derive(Clone, Debug)]
pub struct HangLayout {
    /// `__per_cpu_offset[]`, `init_task`: run-time addresses.
    pub per_cpu_offset: Gva,
    pub init_task: Gva,
    /// `init_top_pgt`: the kernel's own top-level page table, run-time.
    pub swapper_pgd: Gva,
    /// Offset of `runqueues` in the per-CPU area.
    pub runqueues: u64,
    /// Run-time `__per_cpu_start` where per-CPU symbols are addresses moved
    /// by KASLR (the vmlinux links `.data..percpu` elsewhere than 0, 6.15+);
    /// `None` where they are zero-based offsets.
    pub per_cpu_start: Option<Gva>,
    pub rq_curr: u64,
    pub rq_nr_switches: u64,
    pub task_pid: u64,
    pub task_comm: u64,
    pub task_state: u64,
    pub task_flags: u64,
    pub task_utime: u64,
    pub task_stime: u64,
    pub task_nvcsw: u64,
    pub task_nivcsw: u64,
    pub task_tasks: u64,
    /// `task_struct.stack`: the stack hashed as evidence of a spin.
    pub task_stack: Option<u64>,
    /// `task_struct.thread_group` (Linux < 6.7): the circular list of a
    /// thread group's threads, walked from each leader so the blocked-task
    /// scan sees every thread. From the image's profile; `None`: leaders
    /// only.
    pub task_thread_group: Option<u64>,
    /// `watchdog_thresh` (an `int`, seconds), run-time address, when the
    /// image's profile (or a System.map) has the symbol.
    pub watchdog_thresh: Option<Gva>,
}

impl HangLayout {
    /// The layout from a repair image's table (the builder resolved it from
    /// the vmlinux's DWARF); `slide` is the KASLR slide the flow found
    /// ([`crate::flow::Session::slide`]), 0 for link-time addresses (then
    /// [`HangLayout::slid`] per boot).
    pub fn from_layout(layout: &KernelLayout, slide: u64) -> Result<HangLayout, HangError> {
        let get = |i: Item| layout.get(i).ok_or_else(|| HangError::Missing(format!("{:?} (rebuild the image with this build-repair-image)", i)));
        let sym = |i: Item| get(i).map(|a| Gva(a.wrapping_add(slide)));
        let state = layout.get(Item::TaskStateNew).or_else(|| layout.get(Item::TaskStateOld));
        Ok(HangLayout {
            per_cpu_offset: sym(Item::SymPerCpuOffset)?,
            init_task: sym(Item::SymInitTask)?,
            swapper_pgd: sym(Item::SymInitTopPgt)?,
            runqueues: get(Item::PcpuRunqueues)?,
            per_cpu_start: layout.get(Item::SymPerCpuStart).filter(|&a| a != 0).map(|a| Gva(a.wrapping_add(slide))),
            rq_curr: get(Item::RqCurr)?,
            rq_nr_switches: get(Item::RqNrSwitches)?,
            task_pid: get(Item::TaskPid)?,
            task_comm: get(Item::TaskComm)?,
            task_state: state.ok_or_else(|| HangError::Missing("task_struct.__state or .state".into()))?,
            task_flags: get(Item::TaskFlags)?,
            task_utime: get(Item::TaskUtime)?,
            task_stime: get(Item::TaskStime)?,
            task_nvcsw: get(Item::TaskNvcsw)?,
            task_nivcsw: get(Item::TaskNivcsw)?,
            task_tasks: get(Item::TaskTasks)?,
            task_stack: layout.get(Item::TaskStack),
            task_thread_group: None,
            watchdog_thresh: None,
        })
    }

    /// [`HangLayout::from_layout`] plus what only the image's profile has:
    /// `task_struct.thread_group` (the profile records every member of
    /// `task_struct`) and `watchdog_thresh` (when the profile's symbol list
    /// has it).
    pub fn from_image(image: &builder::RepairImage, slide: u64) -> Result<HangLayout, HangError> {
        let mut l = HangLayout::from_layout(&image.layout, slide)?;
        if let Ok(p) = symbols::Profile::from_json(&image.profile_json) {
            l.task_thread_group = p.offset("task_struct", "thread_group");
            l.watchdog_thresh = p.symbol("watchdog_thresh").map(|a| Gva(a.wrapping_add(slide)));
        }
        Ok(l)
    }

    /// The same layout for a guest booted with another KASLR slide.
    pub fn slid(&self, slide: u64) -> HangLayout {
        HangLayout {
            per_cpu_offset: Gva(self.per_cpu_offset.0.wrapping_add(slide)),
            init_task: Gva(self.init_task.0.wrapping_add(slide)),
            swapper_pgd: Gva(self.swapper_pgd.0.wrapping_add(slide)),
            per_cpu_start: self.per_cpu_start.map(|a| Gva(a.0.wrapping_add(slide))),
            watchdog_thresh: self.watchdog_thresh.map(|a| Gva(a.0.wrapping_add(slide))),
            ..self.clone()
        }
    }
}

/// When a detected hang counts as certain (the only hangs to act on).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HangPolicy {
    /// Certain with proof only: IRQs off (no tick) for the threshold, or no
    /// progress for [`HangConfig::kill_after`] while the kernel stack
    /// cycles (a spin). The default.
    WhenCertain,
    /// Every detection is certain: act at the threshold (the behaviour
    /// before the policy existed; kills long non-preemptible work too).
    AtDetection,
}

/// Thresholds, the sampling period and the certainty policy.
#[derive(Clone, Copy, Debug)]
pub struct HangConfig {
    pub period: Duration,
    /// A CPU without progress this long is reported (detection).
    pub cpu_threshold: Duration,
    /// A task in `TASK_UNINTERRUPTIBLE` without a switch this long is
    /// reported (detection).
    pub blocked_threshold: Duration,
    /// A stuck CPU (IRQs on) without progress this long, in vCPU CPU time
    /// when the vCPU threads are known, is certain. Default: the kernel's
    /// own soft-lockup limit, 20 s (2 x `watchdog_thresh`, see
    /// `kill_after_from_guest`).
    pub kill_after: Duration,
    /// Replace `kill_after` by 2 x the guest's `watchdog_thresh` when the
    /// layout locates it and it reads 1..=3600 s.
    pub kill_after_from_guest: bool,
    /// A blocked task is certain after this long (wall time): Linux's
    /// hung-task default, 120 s.
    pub blocked_certain_after: Duration,
    pub policy: HangPolicy,
}

impl Default for HangConfig {
    fn default() -> Self {
        Self {
            period: Duration::from_millis(20),
            cpu_threshold: Duration::from_millis(500),
            blocked_threshold: Duration::from_millis(500),
            kill_after: DEFAULT_SOFTLOCKUP,
            kill_after_from_guest: true,
            blocked_certain_after: DEFAULT_HUNG_TASK,
            policy: HangPolicy::WhenCertain,
        }
    }
}

impl HangConfig {
    /// Every detection certain (act at the threshold).
    pub fn at_detection() -> Self {
        Self { policy: HangPolicy::AtDetection, ..Self::default() }
    }

    /// A fixed kill-after (not the guest's `watchdog_thresh`).
    pub fn with_kill_after(self, kill_after: Duration) -> Self {
        Self { kill_after, kill_after_from_guest: false, ..self }
    }
}

/// What was found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum HangKind {
    /// A CPU runs the same task in the kernel without progress.
    /// `no_ticks`: neither utime nor stime moved: interrupts are off.
    StuckCpu { cpu: u32, no_ticks: bool },
    /// A task asleep in `TASK_UNINTERRUPTIBLE` without a switch.
    BlockedTask,
}

/// One hang report. An episode is reported at most twice: on detection
/// (`certain` false unless the evidence already is) and when it becomes
/// certain.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Hang {
    pub kind: HangKind,
    pub pid: i32,
    pub comm: String,
    pub kthread: bool,
    /// Act on it: see [`HangPolicy`]. Only certain hangs are to be killed.
    pub certain: bool,
    /// The evidence, in words.
    pub why: String,
    /// Without progress, ms: wall time, and CPU time the vCPU thread got
    /// when its thread is known.
    pub stalled_ms: f64,
    pub vcpu_ms: Option<f64>,
    /// Time from the first sample without progress to the verdict.
    #[serde(skip)]
    pub since: Instant,
    #[serde(skip)]
    pub detected: Instant,
}

/// What the sampler thread sends.
#[derive(Clone, Debug)]
pub enum SamplerMsg {
    Hang(Hang),
    /// The sampler failed (a panic inside a sample, caught); it was reset
    /// and goes on.
    Error(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CpuSnap {
    curr: u64,
    switches: u64,
    utime: u64,
    stime: u64,
}

/// How far an episode was reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Quiet,
    Detected,
    Certain,
}

#[derive(Debug)]
struct Track<T> {
    snap: T,
    since: Instant,
    /// The vCPU thread's host CPU time at `since`, when known.
    cpu_at: Option<Duration>,
    stage: Stage,
    /// Kernel-stack states seen in the episode, and whether each of the
    /// last samples showed a new one.
    states: HashSet<u64>,
    recent: VecDeque<bool>,
    /// The running task's `stime` when it last moved (a tick landed), and
    /// the vCPU thread's CPU time then: no tick for the threshold of vCPU
    /// time is IRQs off, whatever happened before the lockup began.
    last_tick: (u64, Option<Duration>),
}

impl<T> Track<T> {
    fn new(snap: T, since: Instant, cpu_at: Option<Duration>) -> Self {
        Self { snap, since, cpu_at, stage: Stage::Quiet, states: HashSet::new(), recent: VecDeque::new(), last_tick: (0, cpu_at) }
    }

    fn note_state(&mut self, h: u64) {
        let new = !self.states.contains(&h);
        if new && self.states.len() < MAX_STATES {
            self.states.insert(h);
        }
        self.recent.push_back(new);
        if self.recent.len() > STATE_WINDOW {
            self.recent.pop_front();
        }
    }

    /// The stack changed to a new state in at least half of a full window.
    fn computing(&self) -> bool {
        self.recent.len() >= STATE_WINDOW && self.recent.iter().filter(|n| **n).count() * 2 >= self.recent.len()
    }
}

/// Host CPU time of a thread: `schedstat` (ns) beside the given
/// `/proc/PID/task/TID/stat` when the host has it, else the stat file's
/// utime + stime (clock ticks).
pub fn thread_cpu_time(stat: &Path) -> Option<Duration> {
    if let Ok(text) = std::fs::read_to_string(stat.with_file_name("schedstat")) {
        if let Some(ns) = text.split_whitespace().next().and_then(|f| f.parse::<u64>().ok()) {
            return Some(Duration::from_nanos(ns));
        }
    }
    let text = std::fs::read_to_string(stat).ok()?;
    // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    let rest = text.get(text.rfind(')')?.checked_add(2)?..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()?.checked_add(f.get(12)?.parse::<u64>().ok()?)?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks.checked_mul(1000)? / hz))
}

/// The stat files of QEMU's vCPU threads named `CPU n/TCG` or `CPU n/KVM`,
/// in vCPU order. Those names exist only with `-name ...,debug-threads=on`:
/// prefer [`vcpu_threads_from_qmp`]; this is the fallback without QMP.
pub fn qemu_vcpu_threads(qemu_pid: u32, nr_cpus: u32) -> Option<Vec<PathBuf>> {
    let mut out = vec![None; nr_cpus as usize];
    for e in std::fs::read_dir(format!("/proc/{qemu_pid}/task")).ok()?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if let Some(n) = comm.trim().strip_prefix("CPU ").and_then(|r| r.split('/').next()).and_then(|n| n.parse::<usize>().ok()) {
            if n < out.len() {
                out[n] = Some(e.path().join("stat"));
            }
        }
    }
    out.into_iter().collect()
}

/// The stat files (`/proc/QEMU_PID/task/TID/stat`) of QEMU's vCPU threads
/// in vCPU order, from QMP `query-cpus-fast` (each entry's `cpu-index` and
/// `thread-id`): works without `debug-threads=on`. Refused when vCPUs share
/// a host thread (single-threaded TCG, `-accel tcg,thread=single`): that
/// thread's CPU time says nothing of one vCPU.
#[cfg(feature = "qemu")]
pub fn vcpu_threads_from_qmp(qmp: &mut crate::qmp::Qmp, qemu_pid: u32) -> Result<Vec<PathBuf>, HangError> {
    let r = qmp.execute("query-cpus-fast", None)?;
    vcpu_threads_from_reply(&r, qemu_pid)
}

#[cfg(any(feature = "qemu", test))]
fn vcpu_threads_from_reply(r: &serde_json::Value, qemu_pid: u32) -> Result<Vec<PathBuf>, HangError> {
    let bad = |why: String| HangError::VcpuThreads(why);
    let list = r.as_array().ok_or_else(|| bad(format!("query-cpus-fast returned {r}")))?;
    let mut by_index: Vec<(u64, u64)> = Vec::new();
    for c in list {
        let idx = c["cpu-index"].as_u64().ok_or_else(|| bad(format!("no cpu-index in {c}")))?;
        let tid = c["thread-id"].as_u64().ok_or_else(|| bad(format!("no thread-id in {c}")))?;
        by_index.push((idx, tid));
    }
    if by_index.is_empty() {
        return Err(bad("query-cpus-fast lists no vCPU".into()));
    }
    by_index.sort_unstable();
    for (i, (idx, _)) in by_index.iter().enumerate() {
        if *idx != i as u64 {
            return Err(bad(format!("cpu-index {idx} where {i} was expected (hot-unplugged vCPUs?)")));
        }
    }
    let tids: HashSet<u64> = by_index.iter().map(|(_, t)| *t).collect();
    if tids.len() != by_index.len() {
        return Err(bad("vCPUs share a host thread (single-threaded TCG): per-vCPU CPU time is unknown".into()));
    }
    let paths: Vec<PathBuf> = by_index.iter().map(|(_, tid)| PathBuf::from(format!("/proc/{qemu_pid}/task/{tid}/stat"))).collect();
    if let Some(p) = paths.iter().find(|p| thread_cpu_time(p).is_none()) {
        return Err(bad(format!("{} is not readable (QEMU on another host, or another pid namespace?)", p.display())));
    }
    Ok(paths)
}

/// Samples a running guest's scheduler state through a [`PhysAccess`].
#[derive(Debug)]
pub struct Sampler<M> {
    mem: M,
    cr3: u64,
    cr4: u64,
    pub layout: HangLayout,
    pub cfg: HangConfig,
    nr_cpus: u32,
    pages: HashMap<u64, u64>,
    cpus: Vec<Option<Track<CpuSnap>>>,
    blocked: HashMap<u64, Track<u64>>,
    /// Stat files of the vCPU threads: with them, "no progress for the
    /// threshold" is counted in host CPU time the vCPU actually got, so a
    /// vCPU the host did not run (an overloaded host) is not a hung one.
    pub vcpu_threads: Option<Vec<PathBuf>>,
    /// The kill-after in force, and where it came from.
    pub kill_after: Duration,
    pub kill_after_source: String,
    /// Samples taken and samples lost to torn reads.
    pub samples: u64,
    pub torn: u64,
}

impl<M: PhysAccess> Sampler<M> {
    /// `regs`: a vCPU's registers, read once while the guest was stopped;
    /// its page tables (CR3, CR4) lead to the kernel's (the kernel half is
    /// shared by every address space).
    pub fn new(mem: M, regs: &CpuState, layout: HangLayout, nr_cpus: u32, cfg: HangConfig) -> Self {
        let (cr3, cr4) = (regs.cr3, regs.cr4);
        let mut s = Self {
            mem,
            cr3,
            cr4,
            layout,
            cfg,
            nr_cpus,
            pages: HashMap::new(),
            cpus: (0..nr_cpus).map(|_| None).collect(),
            blocked: HashMap::new(),
            vcpu_threads: None,
            kill_after: cfg.kill_after,
            kill_after_source: String::new(),
            samples: 0,
            torn: 0,
        };
        // The CR3 a vCPU had when the guest was stopped may be a process's
        // page tables, freed (and reused) once that process exits: from now
        // on, walk the kernel's own, which live as long as the kernel.
        if let Ok(pgd) = s.phys(s.layout.swapper_pgd.0) {
            s.cr3 = pgd.0 & !0xfff;
            s.pages.clear();
        }
        s.read_kill_after();
        s
    }

    /// The kill-after in force: 2 x the guest's `watchdog_thresh` when
    /// wanted and readable, else the configured one.
    fn read_kill_after(&mut self) {
        self.kill_after = self.cfg.kill_after;
        self.kill_after_source = format!("{} s (configured)", self.cfg.kill_after.as_secs_f64());
        if !self.cfg.kill_after_from_guest {
            return;
        }
        self.kill_after_source = format!("{} s (the soft-lockup default; the image does not locate watchdog_thresh)", self.cfg.kill_after.as_secs_f64());
        if let Some(a) = self.layout.watchdog_thresh {
            match self.u32(a.0) {
                Ok(t) if (1..=3600).contains(&t) => {
                    self.kill_after = Duration::from_secs(2 * u64::from(t));
                    self.kill_after_source = format!("{} s (2 x the guest's watchdog_thresh)", 2 * t);
                }
                Ok(0) => {
                    // The guest's soft-lockup detector is off: keep ours.
                    self.kill_after_source = format!("{} s (the guest's watchdog_thresh is 0: its detector is off)", self.cfg.kill_after.as_secs_f64());
                }
                _ => {}
            }
        }
    }

    /// Forgets every episode: after the guest was stopped (a repair, a
    /// pause), absence of progress says nothing, so baselines restart.
    pub fn reset(&mut self) {
        self.cpus.iter_mut().for_each(|c| *c = None);
        self.blocked.clear();
    }

    /// Kernel virtual to physical; kernel mappings (image, direct map,
    /// per-CPU areas) do not move, so translations are cached per page.
    fn phys(&mut self, gva: u64) -> Result<Gpa, AccessError> {
        let page = gva & !0xfff;
        if let Some(p) = self.pages.get(&page) {
            return Ok(Gpa(p.wrapping_add(gva & 0xfff)));
        }
        if self.pages.len() > 65536 {
            self.pages.clear();
        }
        let mem = &mut self.mem;
        let mut rd = |g: Gpa| {
            let mut b = [0u8; 8];
            mem.read_phys(g, &mut b)?;
            Ok(u64::from_le_bytes(b))
        };
        let pa = translate(&mut rd, self.cr3, self.cr4, Gva(page))?.ok_or(AccessError::NotMapped(Gva(gva)))?;
        self.pages.insert(page, pa.0);
        Ok(Gpa(pa.0.wrapping_add(gva & 0xfff)))
    }

    fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        // Small fields; a field across a page is read in two parts.
        let pa = self.phys(gva)?;
        if (gva & 0xfff) as usize + buf.len() > 0x1000 {
            let first = 0x1000 - (gva & 0xfff) as usize;
            self.mem.read_phys(pa, &mut buf[..first])?;
            let next = gva.checked_add(first as u64).ok_or(AccessError::NotMapped(Gva(gva)))?;
            let pa2 = self.phys(next)?;
            return self.mem.read_phys(pa2, &mut buf[first..]);
        }
        self.mem.read_phys(pa, buf)
    }

    fn u64(&mut self, gva: u64) -> Result<u64, AccessError> {
        let mut b = [0u8; 8];
        self.read(gva, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn u32(&mut self, gva: u64) -> Result<u32, AccessError> {
        let mut b = [0u8; 4];
        self.read(gva, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// `base + off` for a guest-read base: an overflow is a torn read.
    fn at(base: u64, off: u64) -> Result<u64, AccessError> {
        base.checked_add(off).ok_or(AccessError::NotMapped(Gva(base)))
    }

    fn comm(&mut self, task: u64) -> String {
        let mut b = [0u8; 16];
        let Ok(a) = Self::at(task, self.layout.task_comm) else { return "?".into() };
        if self.read(a, &mut b).is_err() {
            return "?".into();
        }
        let n = b.iter().position(|&c| c == 0).unwrap_or(16);
        String::from_utf8_lossy(&b[..n]).into_owned()
    }

    /// The running task of `cpu` and its counters.
    fn cpu_snap(&mut self, cpu: u32) -> Result<(CpuSnap, i32), AccessError> {
        let l = self.layout.clone();
        let base = self.u64(Self::at(l.per_cpu_offset.0, 8 * u64::from(cpu))?)?;
        let start = l.per_cpu_start.map_or(0, |a| a.0);
        let rq = base.wrapping_add(start).wrapping_add(l.runqueues);
        let curr = self.u64(Self::at(rq, l.rq_curr)?)?;
        let switches = self.u64(Self::at(rq, l.rq_nr_switches)?)?;
        let pid = self.u32(Self::at(curr, l.task_pid)?)? as i32;
        let utime = self.u64(Self::at(curr, l.task_utime)?)?;
        let stime = self.u64(Self::at(curr, l.task_stime)?)?;
        Ok((CpuSnap { curr, switches, utime, stime }, pid))
    }

    /// The task running on `cpu` as the sampler reads it (the same reads a
    /// sample makes, nothing else): its pid (0: idle) and comm (`?` when
    /// the name could not be read). Read-only; no episode is touched.
    pub fn cpu_current(&mut self, cpu: u32) -> Result<(i32, String), AccessError> {
        let (snap, pid) = self.cpu_snap(cpu)?;
        Ok((pid, self.comm(snap.curr)))
    }

    /// A hash of `task`'s whole kernel stack (`THREAD_SIZE`), page by page.
    fn stack_hash(&mut self, task: u64) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let off = self.layout.task_stack?;
        let stack = self.u64(Self::at(task, off).ok()?).ok()?;
        if stack < KERNEL_HALF || stack & 0xfff != 0 {
            return None;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut page = [0u8; 4096];
        for i in 0..THREAD_SIZE / 4096 {
            let a = stack.checked_add(i * 4096)?;
            let pa = self.phys(a).ok()?;
            self.mem.read_phys(pa, &mut page).ok()?;
            page.hash(&mut h);
        }
        Some(h.finish())
    }

    /// One sample: returns the hang reports due now (detections, and
    /// episodes that became certain).
    pub fn sample(&mut self, now: Instant) -> Vec<Hang> {
        self.samples = self.samples.wrapping_add(1);
        let mut found = Vec::new();
        for cpu in 0..self.nr_cpus {
            let (snap, pid) = match self.cpu_snap(cpu) {
                Ok(s) => s,
                Err(_) => {
                    self.torn = self.torn.wrapping_add(1);
                    continue;
                }
            };
            let idx = cpu as usize;
            // Idle (pid 0) is not a hang; a switch or user time is progress.
            let progress = match &self.cpus[idx] {
                None => true,
                Some(t) => pid == 0 || t.snap.curr != snap.curr || t.snap.switches != snap.switches || t.snap.utime != snap.utime,
            };
            let cpu_now = self.vcpu_threads.as_ref().and_then(|t| t.get(idx)).and_then(|p| thread_cpu_time(p));
            if progress {
                let mut t = Track::new(snap, now, cpu_now);
                t.last_tick = (snap.stime, cpu_now);
                self.cpus[idx] = Some(t);
                continue;
            }
            if let Some(t) = self.cpus[idx].as_mut() {
                if t.last_tick.0 != snap.stime {
                    t.last_tick = (snap.stime, cpu_now);
                }
            }
            // In an episode: the stack's state, evidence of spin or work.
            if let Some(h) = self.stack_hash(snap.curr) {
                if let Some(t) = self.cpus[idx].as_mut() {
                    t.note_state(h);
                }
            }
            if let Some(h) = self.judge_cpu(cpu, snap, pid, cpu_now, now) {
                found.push(h);
            }
        }
        if let Err(()) = self.scan_blocked(now, &mut found) {
            self.torn = self.torn.wrapping_add(1);
        }
        found
    }

    /// The report due for a CPU without progress since its track began.
    fn judge_cpu(&mut self, cpu: u32, snap: CpuSnap, pid: i32, cpu_now: Option<Duration>, now: Instant) -> Option<Hang> {
        let idx = cpu as usize;
        let t = self.cpus[idx].as_ref()?;
        if t.stage == Stage::Certain {
            return None;
        }
        let stalled = now.saturating_duration_since(t.since);
        // Time the vCPU really ran: host CPU time when its thread is known
        // (counted in ns, or 10 ms ticks: allow 20 ms of slack).
        let vcpu = match (t.cpu_at, cpu_now) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let ran = vcpu.map_or(stalled, |v| v.saturating_add(Duration::from_millis(20)).min(stalled));
        if ran < self.cfg.cpu_threshold {
            return None;
        }
        // IRQs off: no tick in the threshold of vCPU time (known only with
        // the vCPU's thread), or none in the whole episode.
        let tickless = match (t.last_tick.1, cpu_now) {
            (Some(a), Some(b)) => b.saturating_sub(a).saturating_add(Duration::from_millis(20)) >= self.cfg.cpu_threshold,
            _ => false,
        };
        let no_ticks = t.snap.stime == snap.stime || tickless;
        let spin_states = t.states.len();
        let computing = t.computing();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let ran_words = match vcpu {
            Some(v) => format!("{:.0} ms of vCPU time ({:.0} ms wall)", ms(v), ms(stalled)),
            None => format!("{:.0} ms wall (vCPU threads unknown)", ms(stalled)),
        };
        let (certain, why) = match self.cfg.policy {
            HangPolicy::AtDetection => (true, format!("no context switch and no user time for {ran_words}; policy: act at detection")),
            HangPolicy::WhenCertain if tickless => (
                true,
                format!(
                    "no context switch and no user time for {ran_words}, and no timer tick in the last {:.0} ms of vCPU time: IRQs are off (a hard lockup)",
                    ms(cpu_now.unwrap_or_default().saturating_sub(t.last_tick.1.unwrap_or_default()))
                ),
            ),
            HangPolicy::WhenCertain if ran >= self.kill_after && !computing => (
                true,
                format!(
                    "no context switch and no user time for {ran_words}, the kill-after of {}; its kernel stack cycles through {spin_states} state(s): a spin",
                    self.kill_after_source
                ),
            ),
            HangPolicy::WhenCertain => (
                false,
                format!(
                    "no context switch and no user time for {ran_words}; {}: not certain before {} without progress{}",
                    if no_ticks { "IRQs look off, but the vCPU's own CPU time is unknown" } else { "timer ticks still land (IRQs on)" },
                    self.kill_after_source,
                    if computing { " (its kernel stack changes at most samples: it computes)" } else { "" }
                ),
            ),
        };
        let stage = if certain { Stage::Certain } else { Stage::Detected };
        if stage <= t.stage {
            return None;
        }
        let since = t.since;
        let flags = Self::at(snap.curr, self.layout.task_flags).and_then(|a| self.u32(a)).unwrap_or(0);
        let comm = self.comm(snap.curr);
        if let Some(t) = self.cpus[idx].as_mut() {
            t.stage = stage;
        }
        Some(Hang {
            kind: HangKind::StuckCpu { cpu, no_ticks },
            pid,
            comm,
            kthread: flags & PF_KTHREAD != 0,
            certain,
            why,
            stalled_ms: ms(stalled),
            vcpu_ms: vcpu.map(ms),
            since,
            detected: now,
        })
    }

    /// Walks the process list (`init_task.tasks`), and each process's
    /// threads (`thread_group`) when the layout has it, for threads asleep
    /// in `TASK_UNINTERRUPTIBLE` without a switch.
    fn scan_blocked(&mut self, now: Instant, found: &mut Vec<Hang>) -> Result<(), ()> {
        let l = self.layout.clone();
        let head = Self::at(l.init_task.0, l.task_tasks).map_err(|_| ())?;
        let mut seen = HashSet::new();
        let mut pos = self.u64(head).map_err(|_| ())?;
        let mut n = 0usize;
        while pos != head {
            n += 1;
            if n > MAX_TASKS || pos < KERNEL_HALF {
                return Err(());
            }
            let leader = pos.checked_sub(l.task_tasks).ok_or(())?;
            self.check_blocked(leader, now, &mut seen, found)?;
            if let Some(tg) = l.task_thread_group {
                let thead = Self::at(leader, tg).map_err(|_| ())?;
                let mut t = self.u64(thead).map_err(|_| ())?;
                while t != thead {
                    n += 1;
                    if n > MAX_TASKS || t < KERNEL_HALF {
                        return Err(());
                    }
                    let task = t.checked_sub(tg).ok_or(())?;
                    self.check_blocked(task, now, &mut seen, found)?;
                    t = self.u64(t).map_err(|_| ())?;
                }
            }
            pos = self.u64(pos).map_err(|_| ())?;
        }
        self.blocked.retain(|k, _| seen.contains(k));
        Ok(())
    }

    fn check_blocked(&mut self, task: u64, now: Instant, seen: &mut HashSet<u64>, found: &mut Vec<Hang>) -> Result<(), ()> {
        let l = self.layout.clone();
        let rd32 = |s: &mut Self, off: u64| Self::at(task, off).and_then(|a| s.u32(a)).map_err(|_| ());
        let rd64 = |s: &mut Self, off: u64| Self::at(task, off).and_then(|a| s.u64(a)).map_err(|_| ());
        let state = rd32(self, l.task_state)?;
        if state & TASK_UNINTERRUPTIBLE == 0 || state & (TASK_NOLOAD | TASK_WAKEKILL) != 0 {
            return Ok(());
        }
        let sw = rd64(self, l.task_nvcsw)?.wrapping_add(rd64(self, l.task_nivcsw)?);
        if !seen.insert(task) {
            return Ok(()); // listed twice: a torn walk; judged once
        }
        let t = self.blocked.entry(task).or_insert_with(|| Track::new(sw, now, None));
        if t.snap != sw {
            *t = Track::new(sw, now, None);
            return Ok(());
        }
        let stalled = now.saturating_duration_since(t.since);
        if stalled < self.cfg.blocked_threshold || t.stage == Stage::Certain {
            return Ok(());
        }
        let ms = stalled.as_secs_f64() * 1e3;
        let (certain, why) = match self.cfg.policy {
            HangPolicy::AtDetection => (true, format!("in TASK_UNINTERRUPTIBLE without a switch for {ms:.0} ms; policy: act at detection")),
            HangPolicy::WhenCertain if stalled >= self.cfg.blocked_certain_after => (
                true,
                format!("in TASK_UNINTERRUPTIBLE without a switch for {ms:.0} ms, past the hung-task limit of {} s", self.cfg.blocked_certain_after.as_secs_f64()),
            ),
            HangPolicy::WhenCertain => (
                false,
                format!(
                    "in TASK_UNINTERRUPTIBLE without a switch for {ms:.0} ms: I/O or a lock may still end it; not certain before {} s",
                    self.cfg.blocked_certain_after.as_secs_f64()
                ),
            ),
        };
        let stage = if certain { Stage::Certain } else { Stage::Detected };
        if stage <= t.stage {
            return Ok(());
        }
        t.stage = stage;
        let since = t.since;
        let pid = rd32(self, l.task_pid)? as i32;
        let flags = rd32(self, l.task_flags).unwrap_or(0);
        found.push(Hang {
            kind: HangKind::BlockedTask,
            pid,
            comm: self.comm(task),
            kthread: flags & PF_KTHREAD != 0,
            certain,
            why,
            stalled_ms: ms,
            vcpu_ms: None,
            since,
            detected: now,
        });
        Ok(())
    }
}

/// What a hang repair did.
#[derive(Debug)]
pub enum HangRepair {
    /// The repair kernel's verdict was a kill and it was applied.
    Repaired(Box<crate::flow::Outcome>, f64),
    /// The repair kernel declined; the vCPU was put back as it was.
    Declined(Box<crate::flow::Outcome>, f64),
    /// Nothing to act on (the CPU was in user mode at every attempt).
    Skipped(String),
}

/// The message a hang repair hands to the repair kernel as `panic`'s
/// argument (it classifies the crash as a direct panic in process context).
const HANG_MESSAGE: &[u8] = b"hang detected from outside by the watcher\0";

/// Repairs a CPU stuck in the kernel as for a crash: pauses the guest and
/// makes the stuck vCPU look as if it had just called `panic(msg)` from
/// where it spins (the return address and the message pushed on its
/// kernel stack, below its stack pointer, which is free: the kernel is
/// built without a red zone), then runs the repair kernel on it with the
/// usual verdict: interrupt context, init, kernel threads, preempt count
/// and the rest are checked exactly as for a crash. A kill resumes the
/// vCPU in `rewind_stack_and_make_dead(SIGKILL)`, which is what an oops at
/// that instruction would have done without `panic_on_oops`. A decline
/// puts back the registers and the stack bytes. When the vCPU was caught
/// in an interrupt (the verdict says hardirq/softirq) or in user mode, the
/// guest runs 20 ms and it tries again, up to 5 times.
pub fn repair_hang<G: crate::access::GuestAccess + ?Sized>(
    g: &mut G,
    session: &mut crate::flow::Session,
    cpu: u32,
) -> Result<HangRepair, crate::flow::FlowError> {
    use crate::access::VcpuId;
    use repair_kernel::verdict::Reason;
    let vcpu = VcpuId(cpu);
    let panic = session.panic_addr()?;
    if let Some(why) = another_cpu_stuck_irqs_off(g, cpu)? {
        return Ok(HangRepair::Skipped(why));
    }
    let mut last = String::from("no attempt");
    for attempt in 0..5 {
        if attempt > 0 {
            g.resume()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        g.pause()?;
        let orig = g.get_regs(vcpu)?;
        if orig.cs & 3 != 0 {
            last = format!("CPU {cpu} was in user mode (rip {:#x}): not stuck in the kernel", orig.rip);
            continue;
        }
        // Fake the call: [new_rsp] = return address, message above it.
        let Some(msg_at) = orig.rsp.checked_sub(8 + HANG_MESSAGE.len() as u64).map(|a| a & !0xf).filter(|a| *a >= 8) else {
            last = format!("CPU {cpu}'s stack pointer {:#x} leaves no room for a call frame", orig.rsp);
            continue;
        };
        let new_rsp = msg_at - 8;
        let mut saved = vec![0u8; (orig.rsp - new_rsp) as usize];
        g.read_virt(vcpu, Gva(new_rsp), &mut saved)?;
        let mut frame = orig.rip.to_le_bytes().to_vec();
        frame.extend_from_slice(HANG_MESSAGE);
        g.write_virt(vcpu, Gva(new_rsp), &frame)?;
        let mut fake = orig;
        fake.rsp = new_rsp;
        fake.rip = panic.0;
        fake.rdi = msg_at;
        g.set_regs(vcpu, &fake)?;
        let put_back = |g: &mut G| -> Result<(), crate::flow::FlowError> {
            g.set_regs(vcpu, &orig)?;
            g.write_virt(vcpu, Gva(new_rsp), &saved)?;
            Ok(())
        };
        let outcome = match session.repair(g, vcpu, crate::flow::Mode::Repair) {
            Ok(o) => o,
            Err(e) => {
                put_back(g)?;
                g.resume()?;
                return Err(e);
            }
        };
        if outcome.applied {
            let t = Instant::now();
            g.resume()?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            return Ok(HangRepair::Repaired(Box::new(outcome), ms));
        }
        put_back(g)?;
        let transient = matches!(
            Reason::from_u32(outcome.out.reason_code),
            Some(Reason::DeclineHardirq | Reason::DeclineSoftirq | Reason::DeclineNmi)
        );
        if !transient || attempt == 4 {
            g.resume()?;
            return Ok(HangRepair::Declined(Box::new(outcome), 0.0));
        }
        last = outcome.reason().to_string();
    }
    g.resume()?;
    Ok(HangRepair::Skipped(last))
}

/// Rounds of [`another_cpu_stuck_irqs_off`], and the guest's run time
/// between them.
const STUCK_ROUNDS: usize = 3;
const STUCK_GAP: Duration = Duration::from_millis(20);
/// How far from where it was first seen a vCPU may be found and still
/// count as stuck there (a `cpu_relax()` loop is a few bytes, a handler's
/// spin a few dozen).
const STUCK_RIP_SLACK: u64 = 256;

/// Why a spin on `cpu` is not to be acted on: another vCPU sits in the
/// kernel with interrupts off at the same place in each of a few pauses
/// [`STUCK_GAP`] apart (a CPU stuck in an interrupt handler: LKDTM's
/// SMP_CALL_LOCKUP, whose caller then spins waiting for the IPI's
/// completion). The spinner most likely waits on that CPU, and killing it
/// cannot end the hang: the kernel's own course is left to run. Such a CPU
/// may be running the idle task, which the sampler never reports. Leaves
/// the guest running.
fn another_cpu_stuck_irqs_off<G: crate::access::GuestAccess + ?Sized>(
    g: &mut G,
    cpu: u32,
) -> Result<Option<String>, crate::flow::FlowError> {
    let vcpus = g.vcpus()?;
    let mut stuck: Option<Vec<(u32, u64)>> = None;
    for round in 0..STUCK_ROUNDS {
        if round > 0 {
            std::thread::sleep(STUCK_GAP);
        }
        g.pause()?;
        let mut now = Vec::new();
        let mut read = || -> Result<(), crate::flow::FlowError> {
            for v in vcpus.iter().filter(|v| v.0 != cpu) {
                let r = g.get_regs(*v)?;
                if r.cs & 3 == 0 && r.rflags & repair_kernel::arch::x86_64::RFLAGS_IF == 0 {
                    now.push((v.0, r.rip));
                }
            }
            Ok(())
        };
        let read = read();
        g.resume()?;
        read?;
        stuck = Some(match stuck {
            None => now,
            Some(before) => before
                .into_iter()
                .filter(|&(c, rip)| now.iter().any(|&(c2, rip2)| c2 == c && rip2.abs_diff(rip) <= STUCK_RIP_SLACK))
                .collect(),
        });
        if stuck.as_ref().is_some_and(Vec::is_empty) {
            return Ok(None);
        }
    }
    Ok(stuck.and_then(|s| s.first().copied()).map(|(other, rip)| {
        format!(
            "CPU {other} sits in the kernel with interrupts off at rip {rip:#x} across {STUCK_ROUNDS} pauses {} ms apart \
             (stuck in an interrupt handler or an IRQs-off loop): the spin on CPU {cpu} most likely waits on it (an IPI's \
             completion, a lock it holds), and killing the spinning task cannot end the hang",
            STUCK_GAP.as_millis()
        )
    }))
}

/// Runs `sampler` on its own thread every `cfg.period` until `stop`,
/// sending every report ([`SamplerMsg::Hang`]) and every failure
/// ([`SamplerMsg::Error`]): a panic inside a sample is caught, reported
/// (once, then at most every 10 s with a count) and the sampler reset; the
/// thread never dies silently. While `paused` (the guest is stopped: the
/// caller's own stops, or QMP `STOP` until `RESUME`) it forgets what it saw,
/// since absence of progress then says nothing; every episode starts again
/// after the pause.
pub fn spawn_sampler_msgs<M: PhysAccess + Send + 'static>(
    mut sampler: Sampler<M>,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (std::sync::mpsc::Receiver<SamplerMsg>, std::thread::JoinHandle<()>) {
    use std::sync::atomic::Ordering;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("hang-sampler".into())
        .spawn(move || {
            let period = sampler.cfg.period;
            let mut was_paused = false;
            let mut panics = 0u64;
            let mut last_report: Option<Instant> = None;
            while !stop.load(Ordering::Relaxed) {
                if paused.load(Ordering::Relaxed) {
                    if !was_paused {
                        sampler.reset();
                    }
                    was_paused = true;
                } else {
                    if was_paused {
                        // No episode spans a pause.
                        sampler.reset();
                        was_paused = false;
                    }
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sampler.sample(Instant::now())));
                    match r {
                        Ok(hangs) => {
                            for h in hangs {
                                if tx.send(SamplerMsg::Hang(h)).is_err() {
                                    return;
                                }
                            }
                        }
                        Err(p) => {
                            panics += 1;
                            let what = p
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| p.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "a non-string panic".into());
                            sampler.reset();
                            if last_report.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                                last_report = Some(Instant::now());
                                let msg = format!("the hang sampler panicked ({panics} time(s) so far): {what}; it was reset and goes on");
                                if tx.send(SamplerMsg::Error(msg)).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
                std::thread::sleep(period);
            }
        })
        .expect("spawning the hang sampler thread");
    (rx, handle)
}

/// [`spawn_sampler_msgs`] for callers that take only hangs: every report
/// is forwarded, sampler failures go to the log (`tracing::error!`). Prefer
/// [`spawn_sampler_msgs`], whose receiver sees the failures.
pub fn spawn_sampler<M: PhysAccess + Send + 'static>(
    sampler: Sampler<M>,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (std::sync::mpsc::Receiver<Hang>, std::thread::JoinHandle<()>) {
    let (rx, inner) = spawn_sampler_msgs(sampler, paused, stop);
    let (tx, out) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        for m in rx {
            match m {
                SamplerMsg::Hang(h) => {
                    if tx.send(h).is_err() {
                        break;
                    }
                }
                SamplerMsg::Error(e) => tracing::error!("{e}"),
            }
        }
        let _ = inner.join();
    });
    (out, handle)
}

#[cfg(test)]
mod tests {
    //! The sampler over a fake guest: page tables mapping a direct map at
    //! `DIRECT` onto a small RAM, a per-CPU area, run queues and tasks.
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    const DIRECT: u64 = 0xffff_8880_0000_0000;
    const RAM: usize = 4 << 20;
    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PCPU: u64 = 0x10000; // __per_cpu_offset[]
    const AREA: u64 = 0x20000; // per-CPU areas, 0x1000 each
    const INIT: u64 = 0x40000; // init_task
    const TASK0: u64 = 0x50000; // tasks, 0x1000 apart; stacks at 0x100000 + 0x4000 * n
    const RUNQ: u64 = 0x100;
    const THRESH: u64 = 0x30000; // watchdog_thresh

    #[derive(Clone)]
    struct Ram(Arc<std::sync::Mutex<Vec<u8>>>, Arc<AtomicBool>);

    impl PhysAccess for Ram {
        fn read_phys(&mut self, gpa: Gpa, buf: &mut [u8]) -> Result<(), AccessError> {
            if self.1.load(std::sync::atomic::Ordering::Relaxed) {
                panic!("injected sampler panic");
            }
            let m = self.0.lock().unwrap();
            let a = gpa.0 as usize;
            let b = a.checked_add(buf.len()).filter(|b| *b <= m.len()).ok_or(AccessError::OutOfRam { gpa, len: buf.len() })?;
            buf.copy_from_slice(&m[a..b]);
            Ok(())
        }
        fn write_phys(&mut self, _: Gpa, _: &[u8]) -> Result<(), AccessError> {
            Err(AccessError::Unsupported("write".into()))
        }
        fn ram_end(&self) -> u64 {
            RAM as u64
        }
    }

    impl Ram {
        fn w64(&self, pa: u64, v: u64) {
            self.0.lock().unwrap()[pa as usize..pa as usize + 8].copy_from_slice(&v.to_le_bytes());
        }
        fn w32(&self, pa: u64, v: u32) {
            self.0.lock().unwrap()[pa as usize..pa as usize + 4].copy_from_slice(&v.to_le_bytes());
        }
    }

    fn layout() -> HangLayout {
        HangLayout {
            per_cpu_offset: Gva(DIRECT + PCPU),
            init_task: Gva(DIRECT + INIT),
            swapper_pgd: Gva(DIRECT + PML4),
            runqueues: RUNQ,
            per_cpu_start: None,
            rq_curr: 0x10,
            rq_nr_switches: 0x18,
            task_pid: 0x100,
            task_comm: 0x110,
            task_state: 0x18,
            task_flags: 0x2c,
            task_utime: 0x200,
            task_stime: 0x208,
            task_nvcsw: 0x210,
            task_nivcsw: 0x218,
            task_tasks: 0x300,
            task_stack: Some(0x20),
            task_thread_group: Some(0x310),
            watchdog_thresh: Some(Gva(DIRECT + THRESH)),
        }
    }

    fn task(n: u64) -> u64 {
        TASK0 + 0x1000 * n
    }

    /// A guest with 2 CPUs and `ntasks` processes (task 0 is init_task's
    /// successor), each alone in its thread group, all idle-ish.
    fn guest(ntasks: u64) -> Ram {
        let ram = Ram(Arc::new(std::sync::Mutex::new(vec![0u8; RAM])), Arc::new(AtomicBool::new(false)));
        // PML4[273] (DIRECT) -> PDPT; PDPT[0]: 1 GiB page at 0.
        ram.w64(PML4 + 8 * ((DIRECT >> 39) & 511), PDPT | 3);
        ram.w64(PDPT, 0x83);
        ram.w32(THRESH, 10);
        let l = layout();
        for cpu in 0..2u64 {
            let area = AREA + 0x1000 * cpu;
            ram.w64(PCPU + 8 * cpu, DIRECT + area);
            ram.w64(area + RUNQ + l.rq_curr, DIRECT + INIT); // idle (pid 0)
        }
        // The process list: init_task -> task(0) -> ... -> init_task.
        let node = |t: u64| DIRECT + t + l.task_tasks;
        let mut prev = INIT;
        for n in 0..ntasks {
            let t = task(n);
            ram.w64(prev + l.task_tasks, node(t));
            ram.w32(t + l.task_pid, 100 + n as u32);
            ram.w64(t + 0x20, DIRECT + 0x100000 + 0x4000 * n);
            let tg = DIRECT + t + 0x310;
            ram.w64(t + 0x310, tg);
            prev = t;
        }
        ram.w64(prev + l.task_tasks, node(INIT));
        ram
    }

    fn run_on(ram: &Ram, cpu: u64, n: u64) {
        ram.w64(AREA + 0x1000 * cpu + RUNQ + 0x10, DIRECT + task(n));
    }

    fn sampler(ram: &Ram, cfg: HangConfig) -> Sampler<Ram> {
        Sampler::new(ram.clone(), &CpuState { cr3: PML4, ..CpuState::default() }, layout(), 2, cfg)
    }

    #[test]
    fn stuck_cpu_reported_at_detection_then_once_certain_never_more() {
        let ram = guest(2);
        run_on(&ram, 1, 0);
        let mut s = sampler(&ram, HangConfig::default().with_kill_after(Duration::from_secs(2)));
        let t0 = Instant::now();
        let mut reports = Vec::new();
        let mut stime = 0u64;
        for i in 0..200u64 {
            // Ticks land (stime moves), nothing else does: a spin with IRQs on.
            stime += 4_000_000;
            ram.w64(task(0) + 0x208, stime);
            for h in s.sample(t0 + Duration::from_millis(20 * i)) {
                reports.push((i, h));
            }
        }
        assert_eq!(reports.len(), 2, "{reports:?}");
        let (i, first) = &reports[0];
        assert!(!first.certain, "{first:?}");
        assert_eq!(first.kind, HangKind::StuckCpu { cpu: 1, no_ticks: false });
        assert_eq!((*i, first.pid), (25, 100));
        let (j, second) = &reports[1];
        assert!(second.certain && second.why.contains("kill-after"), "{second:?}");
        assert_eq!(*j, 100);
    }

    #[test]
    fn watchdog_thresh_sets_kill_after_unless_fixed() {
        let ram = guest(1);
        let s = sampler(&ram, HangConfig::default());
        assert_eq!(s.kill_after, Duration::from_secs(20));
        assert!(s.kill_after_source.contains("watchdog_thresh"), "{}", s.kill_after_source);
        ram.w32(THRESH, 0);
        let s = sampler(&ram, HangConfig::default());
        assert_eq!(s.kill_after, DEFAULT_SOFTLOCKUP);
        let s = sampler(&ram, HangConfig::default().with_kill_after(Duration::from_secs(3)));
        assert_eq!(s.kill_after, Duration::from_secs(3));
    }

    #[test]
    fn a_stack_that_keeps_changing_is_work_not_a_spin() {
        let ram = guest(1);
        run_on(&ram, 0, 0);
        let mut s = sampler(&ram, HangConfig::default().with_kill_after(Duration::from_secs(1)));
        let t0 = Instant::now();
        let mut reports = Vec::new();
        for i in 0..300u64 {
            ram.w64(task(0) + 0x208, 4_000_000 * i);
            // A counter on the task's stack, as LKDTM ATOMIC_TIMING's.
            ram.w64(0x100000 + 0x3f00, i);
            reports.extend(s.sample(t0 + Duration::from_millis(20 * i)));
        }
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(!reports[0].certain);
    }

    #[test]
    fn irqs_off_is_certain_at_detection_only_when_the_vcpu_ran() {
        let dir = tempfile::tempdir().unwrap();
        let stat = |cpu: u32| dir.path().join(format!("{cpu}/stat"));
        let set = |cpu: u32, ns: u64| {
            std::fs::create_dir_all(dir.path().join(cpu.to_string())).unwrap();
            std::fs::write(dir.path().join(format!("{cpu}/schedstat")), format!("{ns} 0 0\n")).unwrap();
            std::fs::write(stat(cpu), "1 (x) R 0 0 0 0 0 0 0 0 0 0 0 0\n").unwrap();
        };
        let ram = guest(1);
        run_on(&ram, 0, 0);
        set(0, 0);
        set(1, 0);
        let mut s = sampler(&ram, HangConfig::default());
        s.vcpu_threads = Some(vec![stat(0), stat(1)]);
        let t0 = Instant::now();
        // The host starves the vCPU for 2 s: no tick, no progress, and no
        // report either (it did not run).
        for i in 0..100u64 {
            assert!(s.sample(t0 + Duration::from_millis(20 * i)).is_empty());
        }
        // Now it runs (20 ms of CPU per sample) with no tick: IRQs off.
        let mut reports = Vec::new();
        for i in 100..200u64 {
            set(0, 20_000_000 * (i - 99));
            reports.extend(s.sample(t0 + Duration::from_millis(20 * i)));
        }
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert!(reports[0].certain && reports[0].why.contains("IRQs are off"), "{:?}", reports[0]);
        assert_eq!(reports[0].kind, HangKind::StuckCpu { cpu: 0, no_ticks: true });
        assert!(reports[0].vcpu_ms.unwrap() >= 480.0);
    }

    #[test]
    fn a_pause_restarts_every_episode() {
        let ram = guest(1);
        run_on(&ram, 0, 0);
        let mut s = sampler(&ram, HangConfig::default());
        let t0 = Instant::now();
        for i in 0..20u64 {
            assert!(s.sample(t0 + Duration::from_millis(20 * i)).is_empty());
        }
        s.reset(); // what the thread does while paused
        for i in 0..20u64 {
            assert!(s.sample(t0 + Duration::from_millis(2400 + 20 * i)).is_empty(), "an episode spanned the pause");
        }
    }

    #[test]
    fn blocked_threads_beyond_the_leader_are_found() {
        let ram = guest(2);
        let l = layout();
        // task(5) is a thread of task(1)'s group, not on the process list.
        let t = task(5);
        let (lead, th) = (DIRECT + task(1) + 0x310, DIRECT + t + 0x310);
        ram.w64(task(1) + 0x310, th);
        ram.w64(t + 0x310, lead);
        ram.w32(t + l.task_pid, 777);
        ram.w32(t + l.task_state, TASK_UNINTERRUPTIBLE);
        // A killable sleeper (TASK_KILLABLE) is not counted.
        ram.w32(task(0) + l.task_state, TASK_UNINTERRUPTIBLE | TASK_WAKEKILL);
        let mut s = sampler(&ram, HangConfig::default());
        let t0 = Instant::now();
        let mut reports = Vec::new();
        for i in 0..40u64 {
            reports.extend(s.sample(t0 + Duration::from_millis(20 * i)));
        }
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!((reports[0].kind.clone(), reports[0].pid, reports[0].certain), (HangKind::BlockedTask, 777, false));
    }

    #[test]
    fn garbage_guest_memory_never_panics() {
        // Every pointer the sampler follows is random: checked arithmetic,
        // torn reads, no panic (this runs in debug builds too).
        let ram = guest(3);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut s = sampler(&ram, HangConfig::default());
        let t0 = Instant::now();
        for round in 0..300u64 {
            for _ in 0..16 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (0x10000 + (x % 0x60000)) & !7;
                let v = match x % 4 {
                    0 => u64::MAX - (x % 64),
                    1 => DIRECT + (x % (RAM as u64)),
                    2 => x,
                    _ => 0xffff_ffff_ffff_f000 | (x & 0xfff),
                };
                ram.w64(at, v);
            }
            let _ = s.sample(t0 + Duration::from_millis(20 * round));
        }
        assert!(s.torn > 0);
    }

    #[test]
    fn a_panicking_sample_is_reported_and_the_sampler_goes_on() {
        let ram = guest(1);
        run_on(&ram, 0, 0);
        let s = sampler(&ram, HangConfig { period: Duration::from_millis(5), ..HangConfig::default() });
        let (paused, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let boom = ram.1.clone();
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        boom.store(true, std::sync::atomic::Ordering::Relaxed);
        let (rx, handle) = spawn_sampler_msgs(s, paused, stop.clone());
        let first = rx.recv_timeout(Duration::from_secs(5)).expect("a report of the panic");
        boom.store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(matches!(&first, SamplerMsg::Error(e) if e.contains("injected sampler panic")), "{first:?}");
        // It goes on: the spin on CPU 0 is reported afterwards.
        let next = rx.recv_timeout(Duration::from_secs(10)).expect("the sampler kept sampling");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        handle.join().unwrap();
        std::panic::set_hook(prev);
        assert!(matches!(next, SamplerMsg::Hang(Hang { kind: HangKind::StuckCpu { cpu: 0, .. }, .. })), "{next:?}");
    }

    #[test]
    fn vcpu_threads_from_a_query_cpus_fast_reply() {
        let me = std::process::id();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u64;
        let r = serde_json::json!([
            {"cpu-index": 1, "thread-id": tid, "props": {}},
            {"cpu-index": 0, "thread-id": me, "props": {}},
        ]);
        let p = vcpu_threads_from_reply(&r, me).unwrap();
        assert_eq!(p, vec![PathBuf::from(format!("/proc/{me}/task/{me}/stat")), PathBuf::from(format!("/proc/{me}/task/{tid}/stat"))]);
        let shared = serde_json::json!([{"cpu-index": 0, "thread-id": me}, {"cpu-index": 1, "thread-id": me}]);
        assert!(vcpu_threads_from_reply(&shared, me).is_err());
        assert!(thread_cpu_time(&p[0]).is_some());
    }
}
