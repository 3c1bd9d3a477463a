//! `repair-guest campaign`: the crash catalogue. Boots the guest kit's
//! LKDTM kernel with `oops=panic`, watches it, triggers LKDTM crash types
//! one by one from a child process, and records per type what happened:
//! did the kernel crash, did we trap it (or see it hang), what we did, did
//! the guest survive (liveness, bystander data, a new process), how long.
//!
//! One guest serves types as long as they leave it healthy; a type that
//! kills it, hangs it, corrupts the heap, or is declined gets a fresh guest
//! for the next type, so every row is measured on a sound guest.
//!
//! The output is a Markdown table and JSON (`docs/crash-catalogue.{md,json}`).

use loader::access::{AccessError, Endpoint, GuestAccess, StopReason};
use loader::flow::{FlowConfig, FlowError, Mode, Outcome, Session};
use loader::gdb::GdbGuest;
use loader::hang::{self, Hang, HangConfig, HangKind, HangLayout, HangPolicy, Sampler, SamplerMsg};
use loader::ram::{RamFile, WithRam};
use loader::flow::{crash_kind_name, reason_name};
use anyhow::{Context, Result};
use harness::{Guest, GuestConfig, Kernel};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Every LKDTM crash type of Linux 6.1 on x86_64 (drivers/misc/lkdtm/*.c,
/// the `CRASHTYPE()` entries in core.c's category order; PPC_SLB_MULTIHIT
/// is powerpc-only and not offered here), with the file that defines it.
pub const LKDTM_TYPES: &[(&str, &str)] = &[
    ("PANIC", "bugs"), ("BUG", "bugs"), ("WARNING", "bugs"), ("WARNING_MESSAGE", "bugs"), ("EXCEPTION", "bugs"), ("LOOP", "bugs"), ("EXHAUST_STACK", "bugs"), ("CORRUPT_STACK", "bugs"), ("CORRUPT_STACK_STRONG", "bugs"), ("REPORT_STACK", "bugs"), ("REPORT_STACK_CANARY", "bugs"), ("UNALIGNED_LOAD_STORE_WRITE", "bugs"), ("SOFTLOCKUP", "bugs"), ("HARDLOCKUP", "bugs"), ("SPINLOCKUP", "bugs"), ("HUNG_TASK", "bugs"), ("OVERFLOW_SIGNED", "bugs"), ("OVERFLOW_UNSIGNED", "bugs"), ("ARRAY_BOUNDS", "bugs"), ("CORRUPT_LIST_ADD", "bugs"), ("CORRUPT_LIST_DEL", "bugs"), ("STACK_GUARD_PAGE_LEADING", "bugs"), ("STACK_GUARD_PAGE_TRAILING", "bugs"), ("UNSET_SMEP", "bugs"), ("DOUBLE_FAULT", "bugs"), ("CORRUPT_PAC", "bugs"),
    ("SLAB_LINEAR_OVERFLOW", "heap"), ("VMALLOC_LINEAR_OVERFLOW", "heap"), ("WRITE_AFTER_FREE", "heap"), ("READ_AFTER_FREE", "heap"), ("WRITE_BUDDY_AFTER_FREE", "heap"), ("READ_BUDDY_AFTER_FREE", "heap"), ("SLAB_INIT_ON_ALLOC", "heap"), ("BUDDY_INIT_ON_ALLOC", "heap"), ("SLAB_FREE_DOUBLE", "heap"), ("SLAB_FREE_CROSS", "heap"), ("SLAB_FREE_PAGE", "heap"),
    ("WRITE_RO", "perms"), ("WRITE_RO_AFTER_INIT", "perms"), ("WRITE_KERN", "perms"), ("WRITE_OPD", "perms"), ("EXEC_DATA", "perms"), ("EXEC_STACK", "perms"), ("EXEC_KMALLOC", "perms"), ("EXEC_VMALLOC", "perms"), ("EXEC_RODATA", "perms"), ("EXEC_USERSPACE", "perms"), ("EXEC_NULL", "perms"), ("ACCESS_USERSPACE", "perms"), ("ACCESS_NULL", "perms"),
    ("REFCOUNT_INC_OVERFLOW", "refcount"), ("REFCOUNT_ADD_OVERFLOW", "refcount"), ("REFCOUNT_INC_NOT_ZERO_OVERFLOW", "refcount"), ("REFCOUNT_ADD_NOT_ZERO_OVERFLOW", "refcount"), ("REFCOUNT_DEC_ZERO", "refcount"), ("REFCOUNT_DEC_NEGATIVE", "refcount"), ("REFCOUNT_DEC_AND_TEST_NEGATIVE", "refcount"), ("REFCOUNT_SUB_AND_TEST_NEGATIVE", "refcount"), ("REFCOUNT_INC_ZERO", "refcount"), ("REFCOUNT_ADD_ZERO", "refcount"), ("REFCOUNT_INC_SATURATED", "refcount"), ("REFCOUNT_DEC_SATURATED", "refcount"), ("REFCOUNT_ADD_SATURATED", "refcount"), ("REFCOUNT_INC_NOT_ZERO_SATURATED", "refcount"), ("REFCOUNT_ADD_NOT_ZERO_SATURATED", "refcount"), ("REFCOUNT_DEC_AND_TEST_SATURATED", "refcount"), ("REFCOUNT_SUB_AND_TEST_SATURATED", "refcount"), ("ATOMIC_TIMING", "refcount"), ("REFCOUNT_TIMING", "refcount"),
    ("USERCOPY_SLAB_SIZE_TO", "usercopy"), ("USERCOPY_SLAB_SIZE_FROM", "usercopy"), ("USERCOPY_SLAB_WHITELIST_TO", "usercopy"), ("USERCOPY_SLAB_WHITELIST_FROM", "usercopy"), ("USERCOPY_STACK_FRAME_TO", "usercopy"), ("USERCOPY_STACK_FRAME_FROM", "usercopy"), ("USERCOPY_STACK_BEYOND", "usercopy"), ("USERCOPY_VMALLOC", "usercopy"), ("USERCOPY_FOLIO", "usercopy"), ("USERCOPY_KERNEL", "usercopy"),
    ("STACKLEAK_ERASING", "stackleak"),
    ("CFI_FORWARD_PROTO", "cfi"), ("CFI_BACKWARD", "cfi"),
    ("FORTIFY_STR_OBJECT", "fortify"), ("FORTIFY_STR_MEMBER", "fortify"), ("FORTIFY_MEM_OBJECT", "fortify"), ("FORTIFY_MEM_MEMBER", "fortify"), ("FORTIFY_STRSCPY", "fortify"),
];

/// The hang types of the issue: LOOP, SOFTLOCKUP, SPINLOCKUP, HARDLOCKUP,
/// HUNG_TASK.
pub const HANG_TYPES: &[&str] = &["LOOP", "SOFTLOCKUP", "SPINLOCKUP", "HARDLOCKUP", "HUNG_TASK"];

/// Types that only misbehave when triggered a second time.
pub const TWICE: &[&str] = &["SPINLOCKUP"];

/// A small set that covers every outcome class in a few minutes (CI).
pub const QUICK_TYPES: &[&str] = &[
    "PANIC", "BUG", "WARNING", "EXCEPTION", "ACCESS_NULL", "WRITE_RO", "EXEC_DATA",
    "CORRUPT_STACK", "LOOP", "HUNG_TASK", "EXHAUST_STACK", "SLAB_FREE_DOUBLE",
];

/// How to run a campaign.
#[derive(Clone, Debug)]
pub struct CampaignConfig {
    pub types: Vec<String>,
    /// Extra kernel command-line words on top of `oops=panic`.
    pub append: Vec<String>,
    /// How long a type may take to crash, exit or hang.
    pub type_timeout: Duration,
    pub hang: HangConfig,
    /// Kill a task found spinning in the kernel (through the repair
    /// kernel's verdict), as for a crash, once the hang is certain (see
    /// [`HangPolicy`]).
    pub repair_hangs: bool,
    /// After a hang is detected but not certain, how long to wait for it to
    /// become certain or for the task to finish by itself (LKDTM
    /// ATOMIC_TIMING and REFCOUNT_TIMING take 60-95 s of vCPU time under
    /// TCG).
    pub hang_wait: Duration,
    /// A fresh guest for every type.
    pub fresh_each: bool,
    /// QEMU `-cpu` model. The default adds SMEP and SMAP to qemu64, so
    /// EXEC_USERSPACE and ACCESS_USERSPACE fault as on real hardware.
    pub cpu: String,
    /// Progress lines on stderr.
    pub verbose: bool,
}

impl Default for CampaignConfig {
    fn default() -> Self {
        Self {
            types: LKDTM_TYPES.iter().map(|(n, _)| n.to_string()).collect(),
            append: Vec::new(),
            type_timeout: Duration::from_secs(8),
            hang: HangConfig::default(),
            repair_hangs: true,
            hang_wait: Duration::from_secs(300),
            fresh_each: false,
            cpu: "qemu64,+smep,+smap".into(),
            verbose: true,
        }
    }
}

/// What came of one type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Trapped, offender killed, guest alive, bystander intact, new process runs.
    Recovered,
    /// Trapped; the repair kernel declined with a reason; the panic completed.
    Declined,
    /// Hang detected from outside and the spinning task killed; guest fine.
    HangRecovered,
    /// Hang detected from outside; not repaired (with the reason).
    HangDeclined,
    /// Hang detected from outside, never certain, and the task finished by
    /// itself: nothing was killed.
    HangSelfResolved,
    /// Hang detected from outside, never certain within the wait: not
    /// acted on, and the task still runs.
    HangUncertain,
    /// The kernel did not crash: the child exited by itself (a WARN, an
    /// XFAIL, a protection that is not configured).
    NotCrashing,
    /// Trapped and acted on, but a liveness check failed afterwards.
    RepairFailed,
    /// The trigger itself returned, but the corruption it left crashed
    /// other processes afterwards (each trapped and killed): the guest
    /// lives, innocent processes did not.
    Collateral,
    /// The guest died or reset without reaching `panic` (no trap).
    GuestLost,
    /// Nothing observed within the timeout: the child neither exited nor
    /// crashed nor hung visibly.
    NoOutcome,
    /// The campaign itself failed on this type (boot, attach, channel).
    Error,
}

impl Class {
    fn label(self) -> &'static str {
        match self {
            Class::Recovered => "recovered",
            Class::Declined => "declined",
            Class::HangRecovered => "hang: recovered",
            Class::HangDeclined => "hang: declined",
            Class::HangSelfResolved => "hang: detected, finished by itself",
            Class::HangUncertain => "hang: detected, never certain (not acted on)",
            Class::NotCrashing => "no crash",
            Class::RepairFailed => "REPAIR FAILED",
            Class::Collateral => "collateral kills",
            Class::GuestLost => "guest lost (no trap)",
            Class::NoOutcome => "no outcome",
            Class::Error => "campaign error",
        }
    }
}

/// One type's record.
#[derive(Clone, Debug, Serialize)]
pub struct TypeRecord {
    pub name: String,
    pub source: String,
    pub class: Class,
    /// The kernel crashed (trapped at `panic`, or the guest died) or hung.
    pub crashed: bool,
    /// How we saw it: `panic trap`, `hang: stuck CPU n`, `hang: blocked task`.
    pub detected: Option<String>,
    /// `kill`, `decline`, or `none`.
    pub action: Option<String>,
    pub crash_kind: Option<String>,
    pub panic_message: Option<String>,
    pub reason_code: Option<String>,
    pub reason: Option<String>,
    pub offender_pid: Option<i32>,
    pub offender_comm: Option<String>,
    /// The crashing child's pid and its exit status as its parent saw it.
    pub child_pid: Option<u32>,
    pub child_status: Option<i32>,
    pub alive: Option<bool>,
    pub bystander_ok: Option<bool>,
    pub spawn_ok: Option<bool>,
    /// Trap to resume (the repair itself), ms.
    pub repair_ms: Option<f64>,
    /// Hang: from the last progress seen to the verdict, and from the
    /// trigger to the verdict, ms.
    pub hang_detect_ms: Option<f64>,
    pub hang_after_trigger_ms: Option<f64>,
    /// Hang: from the trigger to the report that made it certain, ms, and
    /// the evidence of the last report.
    pub hang_certain_after_trigger_ms: Option<f64>,
    pub hang_why: Option<String>,
    /// Trigger to the child's exit, ms.
    pub trigger_to_exit_ms: Option<f64>,
    /// Which guest boot of the campaign ran the type.
    pub boot: u32,
    /// LKDTM's own words on the console (`lkdtm: ...` lines), and the
    /// guest's oops/panic headline.
    pub console: Vec<String>,
    pub notes: Vec<String>,
}

impl TypeRecord {
    fn new(name: &str, boot: u32) -> Self {
        let source = LKDTM_TYPES.iter().find(|(n, _)| *n == name).map_or("?", |(_, s)| s);
        TypeRecord {
            name: name.into(),
            source: source.into(),
            class: Class::Error,
            crashed: false,
            detected: None,
            action: None,
            crash_kind: None,
            panic_message: None,
            reason_code: None,
            reason: None,
            offender_pid: None,
            offender_comm: None,
            child_pid: None,
            child_status: None,
            alive: None,
            bystander_ok: None,
            spawn_ok: None,
            repair_ms: None,
            hang_detect_ms: None,
            hang_after_trigger_ms: None,
            hang_certain_after_trigger_ms: None,
            hang_why: None,
            trigger_to_exit_ms: None,
            boot,
            console: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn take_outcome(&mut self, o: &Outcome, resume_ms: f64) {
        self.crash_kind = Some(crash_kind_name(o.out.crash_kind));
        self.panic_message = Some(o.message().to_string());
        self.reason_code = Some(reason_name(o.out.reason_code));
        self.reason = Some(o.reason().to_string());
        self.offender_pid = Some(o.out.pid);
        self.offender_comm = Some(o.comm().to_string());
        self.action = Some(if o.applied { "kill" } else { "decline" }.into());
        self.repair_ms = Some(o.timings.total + resume_ms);
    }
}

/// The whole campaign.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub cmdline: String,
    pub cpu: String,
    pub command: String,
    pub hang_threshold_ms: f64,
    pub hang_period_ms: f64,
    pub hang_policy: HangPolicy,
    /// The kill-after in force and where it came from (first boot).
    pub hang_kill_after: String,
    /// How the vCPU threads were found (first boot).
    pub vcpu_threads: String,
    pub boots: u32,
    pub wall_s: f64,
    pub types: Vec<TypeRecord>,
}

/// What the watcher thread tells the campaign.
#[derive(Debug)]
enum Msg {
    Repair { outcome: Box<Outcome>, resume_ms: f64, hang: bool },
    FlowError(String),
    Gone(String),
    Hang(Hang),
    /// A hang repair found nothing to act on (why).
    HangSkipped(String),
    /// The sampler failed (caught and restarted), or QMP did.
    SamplerError(String),
}

/// What the QMP thread is asked.
#[derive(Debug)]
enum QmpReq {
    /// Pause the guest (QMP `stop`) this long, then `cont`.
    Pause(Duration),
}

/// What the campaign asks the watcher thread.
#[derive(Debug)]
enum Req {
    RepairHang { cpu: u32 },
}

type Backend = WithRam<GdbGuest, RamFile>;

/// A guest under watch: QEMU, the watcher thread (gdbstub), the sampler
/// thread (RAM file).
struct Live {
    guest: Guest,
    boot: u32,
    rx: Receiver<Msg>,
    req: Sender<Req>,
    qmp_req: Option<Sender<QmpReq>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The kill-after in force, and how the vCPU threads were found.
    kill_after: String,
    vcpu_threads: String,
}

impl Live {
    fn boot(n: u32, cfg: &CampaignConfig, image: &builder::RepairImage, layout: &HangLayout) -> Result<Live> {
        let mut gc = GuestConfig::new(Kernel::Lkdtm).append("oops=panic").with_ram_file();
        for w in &cfg.append {
            gc = gc.append(w);
        }
        gc.qemu_args.extend(["-cpu".to_string(), cfg.cpu.clone()]);
        let guest = Guest::boot(&gc).context("booting the LKDTM guest")?;
        let gdb = GdbGuest::connect(guest.gdb_addr().parse::<Endpoint>()?).context("gdbstub")?;
        let ram_path = guest.ram_file().context("RAM file")?;
        let ram = RamFile::open_pc_file(&ram_path)?;
        let fc = FlowConfig { ram_end: Some(loader::access::PhysAccess::ram_end(&ram)), ..FlowConfig::default() };
        let mut g = WithRam::new(gdb, ram);
        let mut session = Session::attach(&mut g, image.clone(), fc).context("attach")?;
        let regs = g.get_regs(loader::access::VcpuId(0))?;
        let nr_cpus = session.nr_vcpus;
        let slide = session.slide;
        session.arm(&mut g)?;
        g.resume()?;

        let (tx, rx) = channel();
        let (req_tx, req_rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        // The sampler's pause flag: set by the watcher around its own stops
        // and by the QMP thread while the run state is not `running`.
        let paused = Arc::new(AtomicBool::new(false));
        // A pause by someone else (the QMP thread's `stop`) is in progress:
        // the watcher must not resume the guest when the gdbstub reports it.
        let foreign = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();

        // QEMU's vCPU threads from QMP (`query-cpus-fast`), so no-progress
        // time is counted in CPU time each vCPU really got.
        let mut qmp = loader::qmp::Qmp::connect(&guest.qmp_addr().parse::<Endpoint>()?).context("QMP")?;
        let (vcpu_threads, how) = match hang::vcpu_threads_from_qmp(&mut qmp, guest.qemu_pid()) {
            Ok(t) => {
                let how = format!("query-cpus-fast: {} vCPU threads", t.len());
                (Some(t), how)
            }
            Err(e) => match hang::qemu_vcpu_threads(guest.qemu_pid(), nr_cpus) {
                Some(t) => (Some(t), format!("thread names (QMP: {e})")),
                None => (None, format!("unknown ({e}): wall time")),
            },
        };
        let (qmp_tx, qmp_rx) = channel();
        {
            let (tx, stop, paused, foreign) = (tx.clone(), stop.clone(), paused.clone(), foreign.clone());
            threads.push(std::thread::spawn(move || qmp_thread(qmp, tx, qmp_rx, stop, paused, foreign)));
        }
        {
            let (tx, stop, paused, foreign) = (tx.clone(), stop.clone(), paused.clone(), foreign.clone());
            threads.push(std::thread::spawn(move || watcher(g, session, tx, req_rx, stop, paused, foreign)));
        }
        let sampler_mem = RamFile::open_pc_file(&ram_path)?;
        let mut sampler = Sampler::new(sampler_mem, regs.cr3, regs.cr4, layout.slid(slide), nr_cpus, cfg.hang);
        sampler.vcpu_threads = vcpu_threads;
        let kill_after = sampler.kill_after_source.clone();
        let (srx, shandle) = hang::spawn_sampler_msgs(sampler, paused, stop.clone());
        threads.push(std::thread::spawn(move || {
            for m in srx {
                let m = match m {
                    SamplerMsg::Hang(h) => Msg::Hang(h),
                    SamplerMsg::Error(e) => Msg::SamplerError(e),
                };
                if tx.send(m).is_err() {
                    break;
                }
            }
            let _ = shandle.join();
        }));
        Ok(Live { guest, boot: n, rx, req: req_tx, qmp_req: Some(qmp_tx), stop, threads, kill_after, vcpu_threads: how })
    }

    fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Kill QEMU first: the watcher may be blocked on the gdbstub.
        let _ = self.guest.run_detached_kill();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Kills QEMU without consuming the guest (the harness kills on drop).
trait KillGuest {
    fn run_detached_kill(&mut self) -> std::io::Result<()>;
}

impl KillGuest for Guest {
    fn run_detached_kill(&mut self) -> std::io::Result<()> {
        // SAFETY: kill(2) on the pid of a child we spawned and have not
        // reaped (the harness reaps it when the Guest drops).
        let r = unsafe { libc::kill(self.qemu_pid() as i32, libc::SIGKILL) };
        if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }
}

/// The watcher thread: repairs every trap at `panic`, and hangs on request.
fn watcher(
    mut g: Backend,
    mut session: Session,
    tx: Sender<Msg>,
    req: Receiver<Req>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    foreign: Arc<AtomicBool>,
) {
    let Ok(panic_addr) = session.panic_addr() else { return };
    while !stop.load(Ordering::Relaxed) {
        if let Ok(Req::RepairHang { cpu }) = req.try_recv() {
            paused.store(true, Ordering::Relaxed);
            match hang::repair_hang(&mut g, &mut session, cpu) {
                Ok(hang::HangRepair::Repaired(o, resume_ms)) | Ok(hang::HangRepair::Declined(o, resume_ms)) => {
                    let _ = tx.send(Msg::Repair { outcome: o, resume_ms, hang: true });
                }
                Ok(hang::HangRepair::Skipped(why)) => {
                    let _ = tx.send(Msg::HangSkipped(why));
                }
                Err(e) => {
                    let _ = tx.send(Msg::FlowError(format!("hang repair: {e}")));
                }
            }
            paused.store(false, Ordering::Relaxed);
            continue;
        }
        let ev = match g.wait_stop(Some(Duration::from_millis(50))) {
            Ok(None) => continue,
            Ok(Some(ev)) => ev,
            Err(e) => {
                let _ = tx.send(Msg::Gone(e.to_string()));
                return;
            }
        };
        paused.store(true, Ordering::Relaxed);
        if ev.reason != StopReason::Trap && foreign.load(Ordering::Relaxed) {
            // Someone else's pause (QMP `stop`, which QEMU 7.2 reports to
            // the gdb client): leave the VM to them and go back to
            // listening, sending nothing (any byte would stop the VM once
            // they resume it). The QMP thread clears the pause flag on
            // RESUME.
            g.release_stop();
            paused.store(foreign.load(Ordering::Relaxed), Ordering::Relaxed);
            continue;
        }
        if ev.reason != StopReason::Trap || ev.rip.0 != panic_addr {
            let _ = g.resume();
            paused.store(false, Ordering::Relaxed);
            continue;
        }
        match session.repair(&mut g, ev.vcpu, Mode::Repair) {
            Ok(outcome) => {
                let t = Instant::now();
                if let Err(e) = g.resume() {
                    let _ = tx.send(Msg::Gone(e.to_string()));
                    return;
                }
                let resume_ms = t.elapsed().as_secs_f64() * 1e3;
                let _ = tx.send(Msg::Repair { outcome: Box::new(outcome), resume_ms, hang: false });
            }
            Err(FlowError::Access(AccessError::GuestGone(why))) => {
                let _ = tx.send(Msg::Gone(why));
                return;
            }
            Err(e) => {
                let _ = tx.send(Msg::FlowError(e.to_string()));
                let _ = g.resume();
            }
        }
        paused.store(false, Ordering::Relaxed);
    }
}

/// The QMP thread: the run state from QMP `STOP`/`RESUME` events drives
/// the sampler's pause flag (a paused guest is never hung), and pauses on
/// request (QMP `stop`, then `cont`), as someone else would.
fn qmp_thread(
    mut q: loader::qmp::Qmp,
    tx: Sender<Msg>,
    req: Receiver<QmpReq>,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    foreign: Arc<AtomicBool>,
) {
    let on_events = |q: &mut loader::qmp::Qmp, events: Vec<loader::qmp::QmpEvent>| -> Result<(), AccessError> {
        for e in events {
            match e.name.as_str() {
                // Our own stops are `debug`; any state but running is a pause.
                "STOP" if q.query_status()? != "running" => paused.store(true, Ordering::Relaxed),
                "RESUME" => paused.store(false, Ordering::Relaxed),
                _ => {}
            }
        }
        Ok(())
    };
    while !stop.load(Ordering::Relaxed) {
        let r = (|| -> Result<(), AccessError> {
            if let Ok(QmpReq::Pause(d)) = req.try_recv() {
                foreign.store(true, Ordering::Relaxed);
                q.stop()?;
                let ev = q.take_events();
                on_events(&mut q, ev)?;
                let until = Instant::now() + d;
                while Instant::now() < until {
                    if let Some(e) = q.next_event(Some(until.saturating_duration_since(Instant::now())))? {
                        on_events(&mut q, vec![e])?;
                    }
                }
                q.cont()?;
                foreign.store(false, Ordering::Relaxed);
            }
            if let Some(e) = q.next_event(Some(Duration::from_millis(50)))? {
                on_events(&mut q, vec![e])?;
            }
            let ev = q.take_events();
            on_events(&mut q, ev)
        })();
        if let Err(e) = r {
            foreign.store(false, Ordering::Relaxed);
            if !stop.load(Ordering::Relaxed) {
                let _ = tx.send(Msg::SamplerError(format!("QMP: {e}")));
            }
            return;
        }
    }
}

/// The hang layout of the kit's LKDTM image: the image's table and profile
/// (threads of every process), and `watchdog_thresh` from the kit's
/// System.map when the profile lacks it.
fn hang_layout(image: &builder::RepairImage) -> Result<HangLayout> {
    let mut layout = HangLayout::from_image(image, 0)?;
    if layout.watchdog_thresh.is_none() {
        let map = harness::Kit::locate().ok().and_then(|k| k.system_map(Kernel::Lkdtm).ok());
        let text = map.and_then(|m| std::fs::read_to_string(m).ok()).unwrap_or_default();
        layout.watchdog_thresh = text.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let (a, _, name) = (f.next()?, f.next()?, f.next()?);
            (name == "watchdog_thresh").then(|| u64::from_str_radix(a, 16).ok()).flatten().map(loader::access::Gva)
        });
    }
    Ok(layout)
}

/// Runs the campaign.
pub fn run(cfg: &CampaignConfig, command: &str) -> Result<Report> {
    let start = Instant::now();
    let image = crate::kit::kit_image(Kernel::Lkdtm)?;
    let layout = hang_layout(&image)?;
    let mut report = Report {
        kernel: image.kernel.release.clone(),
        cmdline: format!("console=ttyS0,115200 rdinit=/init panic=0 oops=panic {}", cfg.append.join(" ")).trim().to_string(),
        hang_policy: cfg.hang.policy,
        hang_kill_after: String::new(),
        vcpu_threads: String::new(),
        cpu: cfg.cpu.clone(),
        command: command.to_string(),
        hang_threshold_ms: cfg.hang.cpu_threshold.as_secs_f64() * 1e3,
        hang_period_ms: cfg.hang.period.as_secs_f64() * 1e3,
        boots: 0,
        wall_s: 0.0,
        types: Vec::new(),
    };
    let mut live: Option<Live> = None;
    for (i, name) in cfg.types.iter().enumerate() {
        if live.is_none() {
            report.boots += 1;
            match Live::boot(report.boots, cfg, &image, &layout) {
                Ok(l) => {
                    if report.vcpu_threads.is_empty() {
                        report.hang_kill_after = l.kill_after.clone();
                        report.vcpu_threads = l.vcpu_threads.clone();
                    }
                    live = Some(l)
                }
                Err(e) => {
                    let mut r = TypeRecord::new(name, report.boots);
                    r.notes.push(format!("boot/attach failed: {e:#}"));
                    report.types.push(r);
                    continue;
                }
            }
        }
        let l = live.as_mut().expect("live guest");
        let rec = run_type(l, name, cfg);
        if cfg.verbose {
            eprintln!(
                "[{:>3}/{}] {:<32} {:<22} {} {}",
                i + 1,
                cfg.types.len(),
                name,
                rec.class.label(),
                rec.reason.clone().unwrap_or_default(),
                rec.notes.join("; ")
            );
        }
        let keep = !cfg.fresh_each
            && matches!(rec.class, Class::Recovered | Class::NotCrashing | Class::HangSelfResolved)
            && rec.alive == Some(true)
            && rec.source != "heap";
        report.types.push(rec);
        if !keep {
            if let Some(l) = live.take() {
                l.shutdown();
            }
        }
    }
    if let Some(l) = live.take() {
        l.shutdown();
    }
    report.wall_s = start.elapsed().as_secs_f64();
    Ok(report)
}

fn lkdtm_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            l.contains("lkdtm:")
                || l.contains("Kernel panic")
                || l.contains("BUG:")
                || l.contains("kernel BUG")
                || l.contains("general protection")
                || l.contains("Oops:")
                || l.contains("WARNING:")
                || l.contains("traps:")
        })
        .map(|l| {
            // Drop the printk timestamp.
            let l = l.trim();
            let l = match l.strip_prefix('[').and_then(|r| r.split_once(']')) {
                Some((_, rest)) => rest.trim(),
                None => l,
            };
            l.chars().take(160).collect()
        })
        .take(6)
        .collect()
}

/// Triggers one type on a live guest and classifies what happened.
fn run_type(l: &mut Live, name: &str, cfg: &CampaignConfig) -> TypeRecord {
    let mut r = TypeRecord::new(name, l.boot);
    // Anything left over from the previous type is stale.
    while l.rx.try_recv().is_ok() {}
    let con0 = l.guest.console_len();
    let t0 = Instant::now();
    // SPINLOCKUP takes lkdtm's lock and returns holding it: the second
    // trigger is the one that spins.
    if TWICE.contains(&name) {
        match l.guest.crash(name).and_then(|c| l.guest.wait_crash_exit(&c, cfg.type_timeout)) {
            Ok(s) => r.notes.push(format!("first trigger returned ({s}) holding the lock; the second spins")),
            Err(e) => r.notes.push(format!("first trigger: {e}")),
        }
    }
    let crash = match l.guest.crash(name) {
        Ok(c) => c,
        Err(e) => {
            r.notes.push(format!("trigger failed: {e}"));
            r.alive = Some(false);
            return r;
        }
    };
    r.child_pid = Some(crash.pid);
    let mut deadline = t0 + cfg.type_timeout;
    let mut outcome: Option<(Box<Outcome>, f64, bool)> = None;
    let mut extra_traps = 0u32;
    let mut hang: Option<Hang> = None;
    let mut certain: Option<Hang> = None;
    let mut waiting_for_certainty = false;
    let mut hang_requested = false;
    let mut gone: Option<String> = None;
    let mut flow_err: Option<String> = None;
    loop {
        loop {
            match l.rx.try_recv() {
                Ok(Msg::Repair { outcome: o, resume_ms, hang: h }) => {
                    if outcome.is_none() {
                        outcome = Some((o, resume_ms, h));
                    } else {
                        extra_traps += 1;
                    }
                }
                Ok(Msg::FlowError(e)) => flow_err = Some(e),
                Ok(Msg::Gone(e)) => gone = Some(e),
                Ok(Msg::Hang(h)) => {
                    // The hang to act on: a task spinning on a CPU, or the
                    // child itself. A kernel thread blocked behind a stuck
                    // CPU is a consequence, noted, not the cause. The
                    // episode is reported on detection and again, at most
                    // once, when it becomes certain.
                    let primary = matches!(h.kind, HangKind::StuckCpu { .. }) || h.pid as u32 == crash.pid;
                    let same = hang.as_ref().is_some_and(|x| x.pid == h.pid && x.kind == h.kind);
                    if primary && (hang.is_none() || same) {
                        r.hang_why = Some(h.why.clone());
                        if h.certain && certain.is_none() {
                            r.hang_certain_after_trigger_ms = Some(h.detected.saturating_duration_since(t0).as_secs_f64() * 1e3);
                            certain = Some(h.clone());
                        }
                        if hang.is_none() {
                            hang = Some(h);
                        }
                    } else {
                        r.notes.push(format!("also: {:?} pid {} ({}){}", h.kind, h.pid, h.comm, if h.certain { ", certain" } else { "" }));
                    }
                }
                Ok(Msg::HangSkipped(why)) => r.notes.push(format!("hang repair skipped: {why}")),
                Ok(Msg::SamplerError(e)) => r.notes.push(format!("sampler: {e}")),
                Err(_) => break,
            }
        }
        if r.child_status.is_some() || gone.is_some() || flow_err.is_some() {
            break;
        }
        if let Some((o, _, _)) = &outcome {
            if !o.applied {
                // Declined: the panic completes; nothing more to see.
                std::thread::sleep(Duration::from_millis(300));
                break;
            }
        }
        if let (Some(h), None) = (&hang, &certain) {
            if !waiting_for_certainty && outcome.is_none() && matches!(h.kind, HangKind::StuckCpu { .. }) && !h.kthread {
                // Detected, not certain: act on nothing yet; wait for the
                // certain report or for the task to finish by itself.
                waiting_for_certainty = true;
                deadline = deadline.max(Instant::now() + cfg.hang_wait);
            }
        }
        let to_act = certain.as_ref().or(hang.as_ref().filter(|h| !matches!(h.kind, HangKind::StuckCpu { .. }) || h.kthread));
        if let Some(h) = to_act {
            if !hang_requested && outcome.is_none() {
                hang_requested = true;
                match h.kind {
                    HangKind::StuckCpu { cpu, .. } if cfg.repair_hangs && !h.kthread => {
                        let _ = l.req.send(Req::RepairHang { cpu });
                        deadline = Instant::now() + Duration::from_secs(15);
                    }
                    HangKind::StuckCpu { .. } if h.kthread => {
                        r.notes.push(format!("hang declined: the spinning task {} (pid {}) is a kernel thread", h.comm, h.pid));
                        break;
                    }
                    HangKind::StuckCpu { .. } => break,
                    HangKind::BlockedTask => {
                        r.notes.push(format!(
                            "hang declined: pid {} ({}) sleeps in TASK_UNINTERRUPTIBLE, not running: SIGKILL cannot wake it and \
                             forcing it into do_exit from outside would abandon whatever it waits on",
                            h.pid, h.comm
                        ));
                        break;
                    }
                }
            }
        }
        if Instant::now() > deadline {
            break;
        }
        match l.guest.wait_crash_exit(&crash, Duration::from_millis(150)) {
            Ok(s) => {
                r.child_status = Some(s);
                r.trigger_to_exit_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
            }
            Err(harness::Error::Timeout { .. }) => {}
            Err(e) => gone = Some(e.to_string()),
        }
    }
    // Let the console catch up before reading it.
    std::thread::sleep(Duration::from_millis(100));
    r.console = lkdtm_lines(l.guest.console().get(con0..).unwrap_or(""));

    if let Some(h) = &hang {
        r.crashed = true;
        r.detected = Some(match h.kind {
            HangKind::StuckCpu { cpu, no_ticks } => {
                format!("hang: stuck CPU {cpu}{}", if no_ticks { " (no ticks: IRQs off)" } else { "" })
            }
            HangKind::BlockedTask => "hang: blocked task".into(),
        });
        r.hang_detect_ms = Some(h.detected.duration_since(h.since).as_secs_f64() * 1e3);
        r.hang_after_trigger_ms = Some(h.detected.saturating_duration_since(t0).as_secs_f64() * 1e3);
        if h.pid as u32 != crash.pid {
            r.notes.push(format!("the hung task is pid {} ({}), the child is {}", h.pid, h.comm, crash.pid));
        }
    }
    if let Some((o, resume_ms, was_hang)) = &outcome {
        r.crashed = true;
        if !was_hang {
            r.detected = Some("panic trap".into());
        }
        r.take_outcome(o, *resume_ms);
        if *was_hang {
            r.crash_kind = Some("hang (watcher-injected panic entry)".into());
        }
    }
    if let Some(e) = &flow_err {
        r.crashed = true;
        r.detected.get_or_insert_with(|| "panic trap".into());
        r.notes.push(format!("flow error: {e}"));
    }
    if let Some(e) = &gone {
        r.notes.push(format!("guest gone: {}", e.lines().next().unwrap_or("")));
    }

    // Liveness, when the guest should be alive.
    let declined = outcome.as_ref().is_some_and(|(o, _, _)| !o.applied);
    let mut late: Vec<String> = Vec::new();
    if gone.is_none() && flow_err.is_none() && !declined {
        // A child still running (a blocked or spinning task) may keep a CPU:
        // a shorter wait then.
        let wait = if r.child_status.is_some() { 15 } else { 5 };
        let ping = l.guest.ping(Duration::from_secs(wait));
        r.alive = Some(ping.is_ok());
        if ping.is_ok() {
            r.bystander_ok = Some(l.guest.verify_bystander().map(|v| v.ok).unwrap_or(false));
            r.spawn_ok = Some(
                l.guest
                    .run("echo alive", Duration::from_secs(wait))
                    .map(|x| x.output == ["alive"])
                    .unwrap_or(false),
            );
        }
        // A late crash (heap corruption found by a later allocation) shows here.
        std::thread::sleep(Duration::from_millis(200));
        while let Ok(m) = l.rx.try_recv() {
            if let Msg::Repair { outcome: o, .. } = m {
                late.push(format!("pid {} ({}) {}", o.out.pid, o.comm(), if o.applied { "killed" } else { "declined" }));
            }
        }
    } else {
        r.alive = Some(false);
    }

    if extra_traps > 0 || !late.is_empty() {
        r.notes.push(format!("{} later trap(s) in other processes: {}", extra_traps as usize + late.len(), late.join(", ")));
    }
    let healthy = r.alive == Some(true) && r.bystander_ok == Some(true) && r.spawn_ok == Some(true) && late.is_empty();
    r.class = match (&outcome, &hang) {
        (Some((o, _, true)), _) if o.applied => {
            if healthy && r.child_status == Some(137) { Class::HangRecovered } else { Class::RepairFailed }
        }
        (Some((_, _, true)), _) => Class::HangDeclined,
        (Some((o, _, false)), _) if o.applied => {
            if healthy && r.child_status == Some(137) { Class::Recovered } else { Class::RepairFailed }
        }
        (Some(_), _) => Class::Declined,
        (None, Some(h)) if matches!(h.kind, HangKind::StuckCpu { .. }) && !h.kthread && certain.is_none() => {
            if r.child_status.is_some() && healthy {
                Class::HangSelfResolved
            } else if r.child_status.is_some() {
                Class::RepairFailed
            } else {
                Class::HangUncertain
            }
        }
        (None, Some(_)) => Class::HangDeclined,
        (None, None) if flow_err.is_some() => Class::Declined,
        (None, None) if gone.is_some() => Class::GuestLost,
        (None, None) if r.child_status.is_some() && !late.is_empty() => Class::Collateral,
        (None, None) if r.child_status.is_some() => Class::NotCrashing,
        (None, None) => Class::NoOutcome,
    };
    if r.class == Class::Declined && r.reason.is_none() {
        r.reason = flow_err.clone();
    }
    if r.class == Class::HangDeclined && r.reason.is_none() {
        r.reason = r.notes.iter().find(|n| n.starts_with("hang")).cloned();
    }
    if matches!(r.class, Class::HangSelfResolved | Class::HangUncertain) {
        r.action = Some("none".into());
        r.reason = Some(format!(
            "never certain, so not killed{}: {}",
            match r.trigger_to_exit_ms {
                Some(ms) if r.class == Class::HangSelfResolved => format!("; it finished by itself {:.1} s after the trigger", ms / 1e3),
                _ => format!("; still running after {:.0} s", cfg.hang_wait.as_secs_f64()),
            },
            r.hang_why.clone().unwrap_or_default()
        ));
    }
    r
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("".into(), |x| format!("{x:.0}"))
}

fn yn(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "",
    }
}

/// The reading guide and the analysis, after every table.
const NOTES: &str = r#"
## Reading the table

- **recovered**: trapped at `panic`, the repair kernel's verdict was a kill, the crashing child died with SIGKILL (137), the guest answered, the bystander's checksummed records verified, and a new process ran.
- **hang: recovered**: the sampler (guest RAM, no stop) saw a CPU run the same non-idle task with no context switch and no user time for the threshold (counted in CPU time QEMU's vCPU thread really got: a starved or paused guest is never hung) and reported it at once, not certain; the hang became certain when no timer tick landed for the threshold of vCPU time (IRQs off: HARDLOCKUP) or after the kill-after without progress (the guest's own soft-lockup limit, 2 x `watchdog_thresh` = 20 s) while the task's kernel stack kept cycling through a few states (a spin); only then the watcher paused the guest, made the stuck vCPU look as if it had called `panic()` where it spins (return address and message pushed below its stack pointer) and ran the repair kernel with the usual verdict (interrupt context, init, kernel thread, preempt count): the kill is what an oops at that instruction does without `panic_on_oops`. SPINLOCKUP is triggered twice (the first call takes LKDTM's lock and returns holding it); after its repair that lock stays held, which only LKDTM uses.
- **hang: detected, finished by itself**: reported within a second (no switch, no user time), never certain: the task's kernel stack changed at most samples (ATOMIC_TIMING and REFCOUNT_TIMING count to INT_MAX in a stack variable: 60-95 s of vCPU time under TCG, past the 20 s soft-lockup limit, so a rule on time alone would kill them), so nothing was killed and the task finished by itself. Before the certainty policy both were killed at 500 ms.
- **no crash**: the kernel did not panic: a WARN (WARNING*, REFCOUNT_* saturation, UNSET_SMEP's pinned-CR4 WARN, SLAB_FREE_CROSS), an XFAIL (DOUBLE_FAULT is ia32-only, CORRUPT_PAC arm64-only, WRITE_OPD needs function descriptors, UNALIGNED_LOAD_STORE_WRITE), or a protection this kernel does not have (FORTIFY_SOURCE, CFI, STACKLEAK, UBSAN for OVERFLOW_*/ARRAY_BOUNDS, INIT_ON_ALLOC, KASAN/slub_debug for the heap types). These are honest outcomes of this kernel build, not misses of the watcher: there is nothing to repair at the moment of the trigger.
- The heap types that corrupt silently (WRITE_AFTER_FREE, SLAB_FREE_DOUBLE, ...) may crash *other* processes later; one run of WRITE_AFTER_FREE did (four innocent processes trapped and killed, the class `collateral kills`). Every type from heap.c gets a fresh guest for the next type, so such damage never leaks into another row.
- Variants: `docs/crash-catalogue-rodata-off.md` (`--append rodata=off --fresh-each`: WRITE_KERN really overwrites kernel text) and `docs/crash-catalogue-slub-debug.md` (`--append slub_debug=FZPU --append page_poison=1 --append init_on_free=1`: SLUB checks catch the heap types at free time and report them without a crash; SLAB_FREE_PAGE oopses in process context and is recovered).

## Text repair

With `rodata=off`, WRITE_KERN's `memcpy` really writes kernel text (in this build `do_nothing` lies 300 KB below `do_overwritten`, so it writes far more than one function) and faults part way. The campaign's watcher uses the plain image (no text snapshot staged, to keep repairs in the tens of ms): it kills the writer and the guest lives, **but the text stays corrupted** — the row says "recovered" for the process, not for the kernel. Text repair is the watcher's `--reserve BASE:SIZE --integrity` mode, exercised by `loader/tests/catalogue_text.rs`: at attach, the flow reads the healthy guest's text and rodata (1806 pages, hashes and pristine pages) and pre-stages them once, with the integrity table, in a region the guest reserved (`memmap=32M$448M`). (1) a `ud2` written over `lkdtm_WARNING` through the gdbstub crashes the next WARNING caller; the repair restores the page (pages_restored = 1) and kills the caller; a new process's WARNING then only warns (exit 0). (2) WRITE_KERN's overwrite is restored byte for byte (`do_overwritten`'s page equals the snapshot afterwards) and WARNING works again. Cost: pre-staging 7.5 MB once through the RAM file, ~9 ms; each repair then ~0.55 s, the repair kernel hashing every page under TCG.

## The hard cases (DESIGN §2), what a sound recovery needs

- **EXHAUST_STACK** (declined, reason: NMI context, preempt_count=0x110000). With VMAP_STACK the recursion hits the guard page; the #PF cannot be delivered on the exhausted stack, so it becomes a #DF on its IST stack; `exc_double_fault` enters with `irqentry_nmi_enter()` (NMI + HARDIRQ bits), `die()` → `oops_end` → `panic("Fatal exception in interrupt")`. Killing the task is in principle what the kernel would want (the task's frames are intact; only the room is gone; `rewind_stack_and_make_dead` moves RSP to the task stack top anyway), but `make_task_dead` panics on `in_interrupt()`. A sound recovery would have to undo `irqentry_nmi_enter` first: subtract NMI_OFFSET+HARDIRQ_OFFSET from the per-CPU preempt count, leave RCU's NMI nesting (`ct_nmi_exit`: `context_tracking.dynticks_nmi_nesting`), restore lockdep/ftrace NMI state when configured, and leave the #DF IST stack (nothing to restore: its TSS pointer is fixed). The repair kernel can read and write all of it, but each is a per-version internal of entry code with no validation that the nesting was exactly one #DF deep; it declines until that check exists.
- **Soft-lockup panic from the hrtimer** (`softlockup_panic=1`): `watchdog_timer_fn` panics in hardirq context, after 20 s. The verdict declines hardirq (killing `current` would return into an interrupt frame never exited: HARDIRQ count, RCU irq nesting, `hrtimer_cpu_base.running`/`in_hrtirq`; the APIC EOI was already sent by `sysvec_apic_timer_interrupt` before the handler ran, so EOI is not the obstacle). The sound path is the one the campaign takes: the sampler reports the stuck CPU in ~0.5 s, and once certain (20 s of vCPU time, the guest's own limit, or at once with IRQs off) the kill happens in the interrupted process context, before the guest's detector would panic in hardirq. HARDLOCKUP (IRQs off: no ticks at all, flagged "no ticks") is handled the same way; the guest's own NMI watchdog is off in KVM guests anyway.
- **HUNG_TASK** (declined): the task sleeps in TASK_UNINTERRUPTIBLE and is not running; there is no CPU to redirect, SIGKILL does not wake it, and making it exit from outside would abandon whatever it waits on (a lock, I/O). Detected in ~0.5 s (kernel: 120 s) and reported with pid and comm.
- **SLAB_FREE_DOUBLE** (no crash in 6.1 without slub_debug; DESIGN §2 saw a hang once): SLUB puts the object on the freelist twice; two later allocations share it and the damage appears anywhere, later, in whoever allocates. Nothing traps at the double free itself. A sound recovery needs detection at the free (slub_debug=F does it and refuses the free, see the slub-debug variant; `CONFIG_SLAB_FREELIST_HARDENED` BUGs on the naive case in process context, which is then recoverable) or a freelist walk of the cache from the repair kernel to find and unlink the duplicate before any reuse; after the fact, the only honest answer is to decline.
"#;

/// The Markdown table and its summary.
pub fn markdown(rep: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let count = |c: Class| rep.types.iter().filter(|t| t.class == c).count();
    let _ = writeln!(s, "# The crash catalogue: every LKDTM type, measured\n");
    let _ = writeln!(s, "Generated by `{}` ({:.0} s, {} guest boots). Kernel: the guest kit's LKDTM kernel `{}` under QEMU TCG (`-cpu {}`), 2 vCPUs, 512 MiB, KASLR on; command line `{}`.\n", rep.command, rep.wall_s, rep.boots, rep.kernel, rep.cpu, rep.cmdline);
    let _ = writeln!(s, "Each type is written to `/sys/kernel/debug/provoke-crash/DIRECT` by a new child of the guest's init while the watcher is attached (hardware breakpoint at `panic`) and the hang sampler reads guest RAM every {:.0} ms (threshold {:.0} ms; no-progress time counted in CPU time of the vCPU threads, found by {}). Hang policy: {}.\n", rep.hang_period_ms, rep.hang_threshold_ms, rep.vcpu_threads, match rep.hang_policy {
        HangPolicy::WhenCertain => format!("report at detection, act only when certain (IRQs off for the threshold, or no progress for the kill-after of {} while the kernel stack cycles)", rep.hang_kill_after),
        HangPolicy::AtDetection => "act at detection".to_string(),
    });
    let _ = writeln!(s, "## Summary\n");
    let _ = writeln!(s, "| outcome | types |\n|---|---|");
    for c in [Class::Recovered, Class::HangRecovered, Class::Declined, Class::HangDeclined, Class::HangSelfResolved, Class::HangUncertain, Class::NotCrashing, Class::Collateral, Class::RepairFailed, Class::GuestLost, Class::NoOutcome, Class::Error] {
        let n = count(c);
        if n > 0 {
            let names: Vec<&str> = rep.types.iter().filter(|t| t.class == c).map(|t| t.name.as_str()).collect();
            let _ = writeln!(s, "| {} | {} ({}) |", c.label(), n, names.join(", "));
        }
    }
    let _ = writeln!(s, "| total | {} |\n", rep.types.len());
    let hangs: Vec<&TypeRecord> = rep.types.iter().filter(|t| t.hang_detect_ms.is_some()).collect();
    if !hangs.is_empty() {
        let _ = writeln!(s, "Hangs detected from outside: {}; latency from the last progress seen to the verdict: {}; from the trigger: {}.\n",
            hangs.len(),
            hangs.iter().map(|t| format!("{} {} ms", t.name, opt_ms(t.hang_detect_ms))).collect::<Vec<_>>().join(", "),
            hangs.iter().map(|t| format!("{} {} ms", t.name, opt_ms(t.hang_after_trigger_ms))).collect::<Vec<_>>().join(", "));
    }
    let _ = writeln!(s, "## Per type\n");
    let _ = writeln!(s, "Columns: crashed (the kernel reached `panic`, died, or hung); detected (how we saw it); action; child (the crashing child's exit status, 137 = SIGKILL); alive / bystander / spawn (the guest answers, the bystander's checksummed data is intact, a new process runs); repair ms (trap to resume); boot (which guest of the campaign).\n");
    let _ = writeln!(s, "| type | file | outcome | crashed | detected | action | child | alive | bystander | spawn | repair ms | boot | reason / what the kernel said |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for t in &rep.types {
        let mut why = Vec::new();
        if let Some(r) = &t.reason {
            why.push(r.clone());
        }
        if t.class == Class::NotCrashing || t.class == Class::GuestLost || t.class == Class::NoOutcome {
            why.extend(t.console.iter().take(2).cloned());
        }
        if let Some(m) = &t.panic_message {
            if !m.is_empty() && t.class != Class::Recovered {
                why.push(format!("panic: \"{m}\""));
            }
        }
        why.extend(t.notes.iter().filter(|n| t.reason.as_ref().is_none_or(|r| r != *n)).cloned());
        let cell = why.join("; ").replace('|', "\\|");
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.name,
            t.source,
            t.class.label(),
            if t.crashed { "yes" } else { "no" },
            t.detected.clone().unwrap_or_default(),
            t.action.clone().unwrap_or_default(),
            t.child_status.map_or("".into(), |c| c.to_string()),
            yn(t.alive),
            yn(t.bystander_ok),
            yn(t.spawn_ok),
            opt_ms(t.repair_ms),
            t.boot,
            cell
        );
    }
    s.push_str(NOTES);
    s
}

/// `repair-guest campaign`.
#[derive(clap::Args, Debug, Clone)]
pub struct CampaignArgs {
    /// Types to trigger (comma-separated); default: every LKDTM type.
    #[arg(long, value_delimiter = ',')]
    pub types: Vec<String>,
    /// Only the quick subset (one type per outcome class).
    #[arg(long)]
    pub quick: bool,
    /// Only the hang types.
    #[arg(long)]
    pub hangs: bool,
    /// Extra guest kernel command-line words (on top of oops=panic).
    #[arg(long, value_name = "WORD")]
    pub append: Vec<String>,
    /// Seconds a type may take to crash, exit or hang.
    #[arg(long, default_value_t = 8.0)]
    pub timeout: f64,
    /// Hang threshold in ms (no progress this long).
    #[arg(long, default_value_t = 500)]
    pub hang_ms: u64,
    /// Hang sampling period in ms.
    #[arg(long, default_value_t = 20)]
    pub period_ms: u64,
    /// Detect hangs but never repair them.
    #[arg(long)]
    pub no_repair_hangs: bool,
    /// A stuck CPU (IRQs on) is certain, so killed, after this long without
    /// progress (vCPU time); default: the guest's soft-lockup limit
    /// (2 x watchdog_thresh, 20 s).
    #[arg(long)]
    pub kill_after_ms: Option<u64>,
    /// Act on every hang at detection (the old policy), not only when certain.
    #[arg(long)]
    pub act_at_detection: bool,
    /// Seconds to wait, after a hang that is not certain, for it to become
    /// certain or to finish by itself.
    #[arg(long, default_value_t = 300.0)]
    pub hang_wait: f64,
    /// A fresh guest for every type.
    #[arg(long)]
    pub fresh_each: bool,
    /// QEMU -cpu model.
    #[arg(long, default_value = "qemu64,+smep,+smap")]
    pub cpu: String,
    /// Write DIR/NAME.md and DIR/NAME.json.
    #[arg(long, value_name = "DIR")]
    pub out: Option<std::path::PathBuf>,
    /// Output file stem.
    #[arg(long, default_value = "crash-catalogue")]
    pub name: String,
}

/// Runs `repair-guest campaign`.
pub fn cli(a: &CampaignArgs) -> Result<()> {
    let mut cfg = CampaignConfig::default();
    if a.quick {
        cfg.types = QUICK_TYPES.iter().map(|s| s.to_string()).collect();
    } else if a.hangs {
        cfg.types = HANG_TYPES.iter().map(|s| s.to_string()).collect();
    }
    if !a.types.is_empty() {
        cfg.types = a.types.clone();
    }
    cfg.append = a.append.clone();
    cfg.type_timeout = Duration::from_secs_f64(a.timeout);
    cfg.hang.cpu_threshold = Duration::from_millis(a.hang_ms);
    cfg.hang.blocked_threshold = Duration::from_millis(a.hang_ms);
    cfg.hang.period = Duration::from_millis(a.period_ms);
    cfg.repair_hangs = !a.no_repair_hangs;
    if let Some(ms) = a.kill_after_ms {
        cfg.hang = cfg.hang.with_kill_after(Duration::from_millis(ms));
    }
    if a.act_at_detection {
        cfg.hang.policy = HangPolicy::AtDetection;
    }
    cfg.hang_wait = Duration::from_secs_f64(a.hang_wait);
    cfg.fresh_each = a.fresh_each;
    cfg.cpu = a.cpu.clone();
    let command = std::iter::once("repair-guest".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let rep = run(&cfg, &command)?;
    let md = markdown(&rep);
    let json = serde_json::to_string_pretty(&rep)?;
    match &a.out {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(format!("{}.md", a.name)), &md)?;
            std::fs::write(dir.join(format!("{}.json", a.name)), json + "\n")?;
            eprintln!("wrote {}/{}.{{md,json}}", dir.display(), a.name);
        }
        None => print!("{md}"),
    }
    Ok(())
}

/// The busy workload of the false-positive benchmark: a user-space spin, a
/// syscall-heavy copy (1 MiB reads of /dev/zero: long stretches in the
/// kernel without a switch, the case closest to a hang), a fork/exec
/// storm, tmpfs writes, and sleepers, all at once, for `secs` seconds.
pub fn busy_workload(secs: u64) -> String {
    format!(
        "awk 'BEGIN{{for(;;);}}' & a=$!; \
         dd if=/dev/zero of=/dev/null bs=1M count=1000000 2>/dev/null & b=$!; \
         (while :; do ls /proc >/dev/null; cat /proc/self/stat >/dev/null; done) & c=$!; \
         (while :; do dd if=/dev/urandom of=/data/busy bs=64k count=16 2>/dev/null; rm -f /data/busy; done) & d=$!; \
         (while :; do sleep 0.1; done) & e=$!; \
         sleep {secs}; kill $a $b $c $d $e; wait; echo busy-done"
    )
}

/// What the false-positive run saw.
#[derive(Clone, Debug, Serialize)]
pub struct BusyReport {
    pub secs: f64,
    pub period_ms: f64,
    pub threshold_ms: f64,
    pub hang_policy: HangPolicy,
    pub kill_after: String,
    pub vcpu_threads: String,
    pub workload: String,
    pub completed: bool,
    /// The workload's output lines.
    pub output: Vec<String>,
    /// Every hang the sampler reported, certain or not.
    pub hangs: Vec<String>,
    /// The reports that were certain (the only ones acted on).
    pub certain: Vec<String>,
    /// Hang repairs requested (certain hangs, with `act`).
    pub acted: u32,
    /// Traps at panic during the run (there should be none), repairs
    /// included.
    pub traps: u32,
    /// A QMP pause in the run: (after, for) in ms.
    pub pause_ms: Option<(f64, f64)>,
    /// Sampler or QMP failures.
    pub errors: Vec<String>,
}

/// How to run a workload under watch.
#[derive(Clone, Debug, Default)]
pub struct WorkloadOptions {
    /// Pause the guest through QMP (`stop`, then `cont`) after the first
    /// duration, for the second, as someone else would.
    pub pause: Option<(Duration, Duration)>,
    /// Act on certain hangs (a stuck CPU of a user task: the repair
    /// kernel's verdict), as the watcher does; otherwise only report.
    pub act: bool,
}

/// Boots a guest, runs [`busy_workload`] for `secs` with the sampler
/// watching (hang repair off), and returns every hang it declared.
pub fn busy_false_positives(secs: u64, cfg: &CampaignConfig) -> Result<BusyReport> {
    run_workload(&busy_workload(secs), Duration::from_secs(secs + 60), cfg, &WorkloadOptions::default())
}

/// Boots a guest and runs `workload` (a shell command, through the guest's
/// command channel) with the watcher and the sampler attached; reports
/// every hang the sampler raised and what was done about it.
pub fn run_workload(workload: &str, timeout: Duration, cfg: &CampaignConfig, opts: &WorkloadOptions) -> Result<BusyReport> {
    let image = crate::kit::kit_image(Kernel::Lkdtm)?;
    let layout = hang_layout(&image)?;
    let mut l = Live::boot(1, cfg, &image, &layout)?;
    // The messages are handled on another thread while the command runs.
    let (_keep, dummy) = channel();
    let rx = std::mem::replace(&mut l.rx, dummy);
    let req = l.req.clone();
    let done = Arc::new(AtomicBool::new(false));
    let act = opts.act;
    let collector = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut out = (Vec::new(), Vec::new(), 0u32, 0u32, Vec::new());
            loop {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(Msg::Hang(h)) => {
                        let line = format!(
                            "{:?} pid {} ({}) after {:.0} ms without progress{}: {}",
                            h.kind,
                            h.pid,
                            h.comm,
                            h.stalled_ms,
                            if h.certain { ", CERTAIN" } else { "" },
                            h.why
                        );
                        if h.certain {
                            out.1.push(line.clone());
                            if let (true, HangKind::StuckCpu { cpu, .. }, false) = (act, &h.kind, h.kthread) {
                                out.2 += 1;
                                let _ = req.send(Req::RepairHang { cpu: *cpu });
                            }
                        }
                        out.0.push(line);
                    }
                    Ok(Msg::Repair { .. }) | Ok(Msg::FlowError(_)) => out.3 += 1,
                    Ok(Msg::SamplerError(e)) | Ok(Msg::Gone(e)) | Ok(Msg::HangSkipped(e)) => out.4.push(e),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if done.load(Ordering::Relaxed) {
                            return out;
                        }
                    }
                    Err(_) => return out,
                }
            }
        })
    };
    let pauser = opts.pause.and_then(|(after, d)| {
        let q = l.qmp_req.clone()?;
        Some(std::thread::spawn(move || {
            std::thread::sleep(after);
            let _ = q.send(QmpReq::Pause(d));
        }))
    });
    let t = Instant::now();
    let res = l.guest.run(workload, timeout);
    let elapsed = t.elapsed().as_secs_f64();
    if let Some(p) = pauser {
        let _ = p.join();
    }
    // Reports raised at the very end still count.
    std::thread::sleep(cfg.hang.cpu_threshold + Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    let (hangs, certain, acted, traps, errors) = collector.join().map_err(|_| anyhow::anyhow!("the collector panicked"))?;
    let output = res.as_ref().map(|r| r.output.clone()).unwrap_or_else(|e| vec![format!("run failed: {e}")]);
    let rep = BusyReport {
        secs: elapsed,
        period_ms: cfg.hang.period.as_secs_f64() * 1e3,
        threshold_ms: cfg.hang.cpu_threshold.as_secs_f64() * 1e3,
        hang_policy: cfg.hang.policy,
        kill_after: l.kill_after.clone(),
        vcpu_threads: l.vcpu_threads.clone(),
        workload: workload.to_string(),
        completed: output.iter().any(|o| o == "busy-done"),
        output,
        hangs,
        certain,
        acted,
        traps,
        pause_ms: opts.pause.map(|(a, d)| (a.as_secs_f64() * 1e3, d.as_secs_f64() * 1e3)),
        errors,
    };
    l.shutdown();
    Ok(rep)
}
