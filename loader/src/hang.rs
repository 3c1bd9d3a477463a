//! Hang detection from outside, without stopping the guest.
//!
//! A [`Sampler`] reads the guest's scheduler state through guest RAM (the
//! RAM file QEMU shares, see [`crate::memory::RamFile`]) while every vCPU
//! keeps running, and declares:
//!
//! - a **stuck CPU** when, for longer than the threshold, the CPU's
//!   `rq->curr` is the same non-idle task, `rq->nr_switches` has not moved,
//!   and that task's `utime` has not moved either (so it is not a busy
//!   user-space loop, which is progress): the task spins in the kernel
//!   (LKDTM LOOP, SOFTLOCKUP, SPINLOCKUP; HARDLOCKUP too, and then its
//!   `stime` does not move either, because with IRQs off no tick lands);
//! - a **blocked task** when a task sits in `TASK_UNINTERRUPTIBLE` (without
//!   `TASK_NOLOAD`, as the kernel's hung-task detector counts it) with no
//!   context switch for longer than the blocked threshold (LKDTM HUNG_TASK).
//!
//! Linux's own detectors need 20 s (soft lockup) and 120 s (hung task);
//! the sampler's thresholds are configurable, 500 ms by default.
//!
//! The guest changes under our feet: every read is bounded, a torn read
//! (a task exiting while we walk the list) costs one sample, never a false
//! verdict, because a verdict needs the same facts over many samples.

use crate::access::{translate, AccessError, Gpa, Gva, PhysAccess};
use std::collections::HashMap;
use repair_kernel::layout::{Item, KernelLayout};
use std::path::Path;
use std::time::{Duration, Instant};

/// `TASK_UNINTERRUPTIBLE` and `TASK_NOLOAD` (include/linux/sched.h).
const TASK_UNINTERRUPTIBLE: u32 = 0x2;
const TASK_NOLOAD: u32 = 0x400;
/// `PF_KTHREAD`.
const PF_KTHREAD: u32 = 0x0020_0000;
/// Cap of the task-list walk.
const MAX_TASKS: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum HangError {
    #[error("the repair image's layout lacks {0}, which the hang detector reads")]
    Missing(String),
    #[error(transparent)]
    Access(#[from] AccessError),
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
        })
    }
}

impl HangLayout {
    /// The same layout for a guest booted with another KASLR slide.
    pub fn slid(&self, slide: u64) -> HangLayout {
        HangLayout {
            per_cpu_offset: Gva(self.per_cpu_offset.0.wrapping_add(slide)),
            init_task: Gva(self.init_task.0.wrapping_add(slide)),
            swapper_pgd: Gva(self.swapper_pgd.0.wrapping_add(slide)),
            ..self.clone()
        }
    }
}

/// Thresholds and the sampling period.
#[derive(Clone, Copy, Debug)]
pub struct HangConfig {
    pub period: Duration,
    /// A CPU without progress this long is stuck.
    pub cpu_threshold: Duration,
    /// A task in `TASK_UNINTERRUPTIBLE` without a switch this long is hung.
    pub blocked_threshold: Duration,
}

impl Default for HangConfig {
    fn default() -> Self {
        Self {
            period: Duration::from_millis(20),
            cpu_threshold: Duration::from_millis(500),
            blocked_threshold: Duration::from_millis(500),
        }
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

/// One hang, reported once per episode.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Hang {
    pub kind: HangKind,
    pub pid: i32,
    pub comm: String,
    pub kthread: bool,
    /// Time from the first sample without progress to the verdict.
    #[serde(skip)]
    pub since: Instant,
    #[serde(skip)]
    pub detected: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CpuSnap {
    curr: u64,
    switches: u64,
    utime: u64,
    stime: u64,
}

#[derive(Debug)]
struct Track<T> {
    snap: T,
    since: Instant,
    /// The vCPU thread's host CPU time at `since`, when known.
    cpu_at: Option<Duration>,
    reported: bool,
}

/// Host CPU time (utime + stime) of a thread, from `/proc/PID/task/TID/stat`.
pub fn thread_cpu_time(stat: &Path) -> Option<Duration> {
    let text = std::fs::read_to_string(stat).ok()?;
    // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// The stat files of QEMU's vCPU threads (named `CPU n/TCG` or `CPU n/KVM`),
/// in vCPU order.
pub fn qemu_vcpu_threads(qemu_pid: u32, nr_cpus: u32) -> Option<Vec<std::path::PathBuf>> {
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
    pub vcpu_threads: Option<Vec<std::path::PathBuf>>,
    /// Samples taken and samples lost to torn reads.
    pub samples: u64,
    pub torn: u64,
}

impl<M: PhysAccess> Sampler<M> {
    /// `cr3`/`cr4`: any kernel page tables of the guest (the kernel half is
    /// shared by every address space), read once while the guest was stopped.
    pub fn new(mem: M, cr3: u64, cr4: u64, layout: HangLayout, nr_cpus: u32, cfg: HangConfig) -> Self {
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
        s
    }

    /// Forgets every episode: after the guest was stopped on purpose (a
    /// repair), absence of progress says nothing.
    pub fn reset(&mut self) {
        self.cpus.iter_mut().for_each(|c| *c = None);
        self.blocked.clear();
    }

    /// Kernel virtual to physical; kernel mappings (image, direct map,
    /// per-CPU areas) do not move, so translations are cached per page.
    fn phys(&mut self, gva: u64) -> Result<Gpa, AccessError> {
        let page = gva & !0xfff;
        if let Some(p) = self.pages.get(&page) {
            return Ok(Gpa(p + (gva & 0xfff)));
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
        Ok(Gpa(pa.0 + (gva & 0xfff)))
    }

    fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        // Never across a page: callers read small fields.
        let pa = self.phys(gva)?;
        if (gva & 0xfff) as usize + buf.len() > 0x1000 {
            let first = 0x1000 - (gva & 0xfff) as usize;
            self.mem.read_phys(pa, &mut buf[..first])?;
            let pa2 = self.phys(gva + first as u64)?;
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

    fn comm(&mut self, task: u64) -> String {
        let mut b = [0u8; 16];
        if self.read(task + self.layout.task_comm, &mut b).is_err() {
            return "?".into();
        }
        let n = b.iter().position(|&c| c == 0).unwrap_or(16);
        String::from_utf8_lossy(&b[..n]).into_owned()
    }

    /// The running task of `cpu` and its counters.
    fn cpu_snap(&mut self, cpu: u32) -> Result<(CpuSnap, i32), AccessError> {
        let l = self.layout.clone();
        let base = self.u64(l.per_cpu_offset.0 + 8 * cpu as u64)?;
        let rq = base.wrapping_add(l.runqueues);
        let curr = self.u64(rq + l.rq_curr)?;
        let switches = self.u64(rq + l.rq_nr_switches)?;
        let pid = self.u32(curr + l.task_pid)? as i32;
        let utime = self.u64(curr + l.task_utime)?;
        let stime = self.u64(curr + l.task_stime)?;
        Ok((CpuSnap { curr, switches, utime, stime }, pid))
    }

    /// One sample: returns the hangs that crossed their threshold now.
    pub fn sample(&mut self, now: Instant) -> Vec<Hang> {
        self.samples += 1;
        let mut found = Vec::new();
        for cpu in 0..self.nr_cpus {
            let (snap, pid) = match self.cpu_snap(cpu) {
                Ok(s) => s,
                Err(_) => {
                    self.torn += 1;
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
                self.cpus[idx] = Some(Track { snap, since: now, cpu_at: cpu_now, reported: false });
                continue;
            }
            let (since, reported, old, cpu_at) = {
                let t = self.cpus[idx].as_ref().expect("tracked");
                (t.since, t.reported, t.snap, t.cpu_at)
            };
            // The vCPU must have run for (nearly) the threshold: host CPU
            // time is counted in 10 ms ticks, allow two of slack.
            let ran = match (cpu_at, cpu_now) {
                (Some(a), Some(b)) => b.saturating_sub(a) + Duration::from_millis(20) >= self.cfg.cpu_threshold,
                _ => true,
            };
            if !reported && ran && now.duration_since(since) >= self.cfg.cpu_threshold {
                let flags = self.u32(snap.curr + self.layout.task_flags).unwrap_or(0);
                found.push(Hang {
                    kind: HangKind::StuckCpu { cpu, no_ticks: old.stime == snap.stime },
                    pid,
                    comm: self.comm(snap.curr),
                    kthread: flags & PF_KTHREAD != 0,
                    since,
                    detected: now,
                });
                if let Some(t) = self.cpus[idx].as_mut() {
                    t.reported = true;
                }
            }
        }
        if let Err(()) = self.scan_blocked(now, &mut found) {
            self.torn += 1;
        }
        found
    }

    /// Walks the process list (`init_task.tasks`) for tasks asleep in
    /// `TASK_UNINTERRUPTIBLE` without a switch.
    fn scan_blocked(&mut self, now: Instant, found: &mut Vec<Hang>) -> Result<(), ()> {
        let l = self.layout.clone();
        let head = l.init_task.0 + l.task_tasks;
        let mut seen = Vec::new();
        let mut pos = self.u64(head).map_err(|_| ())?;
        let mut n = 0;
        while pos != head {
            n += 1;
            if n > MAX_TASKS || pos < 0xffff_8000_0000_0000 {
                return Err(());
            }
            let task = pos - l.task_tasks;
            let state = self.u32(task + l.task_state).map_err(|_| ())?;
            if state & TASK_UNINTERRUPTIBLE != 0 && state & TASK_NOLOAD == 0 {
                let sw = self.u64(task + l.task_nvcsw).map_err(|_| ())?.wrapping_add(self.u64(task + l.task_nivcsw).map_err(|_| ())?);
                seen.push(task);
                let t = self.blocked.entry(task).or_insert(Track { snap: sw, since: now, cpu_at: None, reported: false });
                if t.snap != sw {
                    *t = Track { snap: sw, since: now, cpu_at: None, reported: false };
                } else if !t.reported && now.duration_since(t.since) >= self.cfg.blocked_threshold {
                    t.reported = true;
                    let since = t.since;
                    let pid = self.u32(task + l.task_pid).map_err(|_| ())? as i32;
                    let flags = self.u32(task + l.task_flags).unwrap_or(0);
                    found.push(Hang {
                        kind: HangKind::BlockedTask,
                        pid,
                        comm: self.comm(task),
                        kthread: flags & PF_KTHREAD != 0,
                        since,
                        detected: now,
                    });
                }
            }
            pos = self.u64(pos).map_err(|_| ())?;
        }
        self.blocked.retain(|k, _| seen.contains(k));
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
        let msg_at = (orig.rsp - 8 - HANG_MESSAGE.len() as u64) & !0xf;
        let new_rsp = msg_at - 8;
        let mut saved = vec![0u8; (orig.rsp - new_rsp) as usize];
        g.read_virt(vcpu, Gva(new_rsp), &mut saved)?;
        let mut frame = orig.rip.to_le_bytes().to_vec();
        frame.extend_from_slice(HANG_MESSAGE);
        g.write_virt(vcpu, Gva(new_rsp), &frame)?;
        let mut fake = orig;
        fake.rsp = new_rsp;
        fake.rip = panic;
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

/// Runs `sampler` on its own thread every `cfg.period` until `stop`, sending
/// each hang found; while `paused` (the guest is stopped on purpose) it
/// forgets what it saw, since absence of progress then says nothing.
pub fn spawn_sampler<M: PhysAccess + Send + 'static>(
    mut sampler: Sampler<M>,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (std::sync::mpsc::Receiver<Hang>, std::thread::JoinHandle<()>) {
    use std::sync::atomic::Ordering;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let period = sampler.cfg.period;
        while !stop.load(Ordering::Relaxed) {
            if paused.load(Ordering::Relaxed) {
                sampler.reset();
            } else {
                for h in sampler.sample(Instant::now()) {
                    if tx.send(h).is_err() {
                        return;
                    }
                }
            }
            std::thread::sleep(period);
        }
    });
    (rx, handle)
}
