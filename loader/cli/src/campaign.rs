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
//! The output is a Markdown table and JSON (`docs/crash-catalogue-<kernel>.{md,json}`);
//! `--side-by-side` renders several runs as one table (`docs/crash-catalogue.md`).

use crate::hangs;
use loader::access::Endpoint;
use loader::flow::FlowConfig;
use loader::hang::{Hang, HangConfig, HangKind, HangLayout, HangPolicy};
use loader::watch::{hang_declined_reason, watch, Event, EventSink, WatchConfig};
use anyhow::{Context, Result};
use harness::{Guest, GuestConfig, Kernel};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
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

/// The types LKDTM gained by 6.12 (linux-source-6.12's
/// drivers/misc/lkdtm/*.c), offered on the 6.12 kernel after the 6.1 ones.
pub const LKDTM_612_EXTRA: &[(&str, &str)] = &[
    ("PANIC_STOP_IRQOFF", "bugs"), ("SMP_CALL_LOCKUP", "bugs"), ("FAM_BOUNDS", "bugs"),
    ("KFENCE_READ_AFTER_FREE", "heap"), ("REFCOUNT_SUB_AND_TEST_ZERO", "refcount"),
];

/// Every type the kernel's LKDTM has.
pub fn lkdtm_types(kernel: Kernel) -> Vec<String> {
    let extra = if kernel == Kernel::Lkdtm612 { LKDTM_612_EXTRA } else { &[] };
    LKDTM_TYPES.iter().chain(extra).map(|(n, _)| n.to_string()).collect()
}

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
    /// The kit's LKDTM kernel to run: [`Kernel::Lkdtm`] (6.1, tinyconfig)
    /// or [`Kernel::Lkdtm612`] (6.12 with Debian's hardening).
    pub kernel: Kernel,
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
    /// Rollback mode: the watch keeps a checkpoint every this long, and
    /// each type is triggered by a child that exists before a checkpoint
    /// (its trigger delayed past one), on a fresh guest; what the crash
    /// comes to is recorded in [`TypeRecord::rollback`].
    pub checkpoint_every: Option<Duration>,
}

impl Default for CampaignConfig {
    fn default() -> Self {
        Self {
            kernel: Kernel::Lkdtm,
            types: lkdtm_types(Kernel::Lkdtm),
            append: Vec::new(),
            type_timeout: Duration::from_secs(8),
            hang: HangConfig::default(),
            repair_hangs: true,
            hang_wait: Duration::from_secs(300),
            fresh_each: false,
            cpu: "qemu64,+smep,+smap".into(),
            verbose: true,
            checkpoint_every: None,
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
    /// Hang: vCPU time the stuck CPU's thread got without progress when
    /// it was reported, and when it was made certain, ms (the load-proof
    /// measure: wall time grows when the host starves QEMU).
    pub hang_detect_vcpu_ms: Option<f64>,
    pub hang_certain_vcpu_ms: Option<f64>,
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
    /// Rollback mode only: what rollback and quarantine made of the crash.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackRecord>,
}

/// What came of one type in rollback mode (`campaign --checkpoint-every`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RollbackRecord {
    /// `rolled back + quarantined`, `declined for good after one
    /// rollback`, `rolled back, not recovered`, `recovered by a kill`,
    /// `not rolled back`.
    pub outcome: String,
    /// Why, in the watch's words (the decline's reason, the quarantine's
    /// message, or what was seen instead).
    pub reason: Option<String>,
    /// Seconds from the child's start to its trigger.
    pub trigger_delay_s: f64,
    /// Checkpoints taken while the type ran, and the longest pause one
    /// cost the guest, ms.
    pub checkpoints: u32,
    pub checkpoint_pause_max_ms: Option<f64>,
    /// The rollback: guest time lost, and how long loading held the guest, ms.
    pub lost_ms: Option<f64>,
    pub rollback_pause_ms: Option<f64>,
    pub quarantined_pid: Option<i32>,
    /// The child was gone from the guest's /proc (or a zombie) afterwards.
    pub child_gone: Option<bool>,
}

impl TypeRecord {
    fn new(name: &str, boot: u32) -> Self {
        let source = LKDTM_TYPES.iter().chain(LKDTM_612_EXTRA).find(|(n, _)| *n == name).map_or("?", |(_, s)| s);
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
            hang_detect_vcpu_ms: None,
            hang_certain_vcpu_ms: None,
            hang_why: None,
            trigger_to_exit_ms: None,
            boot,
            console: Vec::new(),
            notes: Vec::new(),
            rollback: None,
        }
    }

    /// The verdict's fields (a `repaired` or `declined` event).
    fn take_verdict(&mut self, e: &Event) {
        self.crash_kind = e.kind.clone();
        self.panic_message = e.message.clone();
        self.reason_code = e.reason_code.clone();
        self.reason = e.reason.clone();
        self.offender_pid = e.pid;
        self.offender_comm = e.comm.clone();
        self.action = e.action.clone().or_else(|| Some(if e.event == "repaired" { "kill" } else { "decline" }.into()));
        self.repair_ms = e.timings_ms.as_ref().map(|t| t.total);
    }
}

/// The whole campaign.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    /// Which kit kernel and how it was configured.
    pub kernel_config: String,
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

/// What the campaign's watch thread adds to the watch's events: the watch
/// itself ended with an error (the message), so the guest is unwatched.
const WATCH_ENDED: &str = "watch ended";

/// A guest under watch: QEMU, and [`loader::watch::watch`] on its own
/// thread (trap at `panic` through the gdbstub, QMP, the hang sampler over
/// the RAM file), its events arriving on `rx`.
struct Live {
    guest: Guest,
    boot: u32,
    rx: Receiver<Event>,
    stop: Arc<AtomicBool>,
    watch: Option<JoinHandle<()>>,
    /// The kill-after in force, and how the vCPU threads were found.
    kill_after: String,
    vcpu_threads: String,
}

impl Live {
    /// Boots a guest and starts the watch; `act`: repair certain hangs.
    fn boot(n: u32, cfg: &CampaignConfig, image: &builder::RepairImage, layout: &HangLayout, act: bool) -> Result<Live> {
        let mut gc = GuestConfig::new(cfg.kernel).append("oops=panic").with_ram_file().with_second_qmp();
        for w in &cfg.append {
            gc = gc.append(w);
        }
        gc.qemu_args.extend(["-cpu".to_string(), cfg.cpu.clone()]);
        let guest = Guest::boot(&gc).context("booting the LKDTM guest")?;
        let ram_path = guest.ram_file().context("RAM file")?;
        let (mut g, mut session) = crate::kit::attach(&guest, image.clone(), FlowConfig::default())?;
        let mut qmp = loader::qmp::Qmp::connect(&guest.qmp_addr().parse::<Endpoint>()?).context("QMP")?;
        let (vcpu_threads, how) = hangs::vcpu_threads(&mut qmp, Some(guest.qemu_pid()), session.nr_vcpus);
        let kill_after = Arc::new(Mutex::new(String::new()));
        let spec = hangs::SamplerSpec {
            ram_file: ram_path,
            ram_regions: g.mem.regions().to_vec(),
            nr_vcpus: session.nr_vcpus,
            cfg: cfg.hang,
            vcpu_threads,
            layout: Some(layout.clone()),
        };
        let hang_watch = hangs::hang_watch(spec, act, Some(kill_after.clone()));
        let rollback = match cfg.checkpoint_every {
            Some(every) => {
                let file = std::env::temp_dir().join(format!("repair-guest-ckpt-campaign-{}.qcow2", guest.qemu_pid()));
                let store = loader::checkpoint::Checkpoints::open(&mut qmp, &file)
                    .with_context(|| format!("opening the checkpoint store {}", file.display()))?;
                Some(loader::checkpoint::Rollback::new(store, every, loader::checkpoint::Prefer::Kill))
            }
            None => None,
        };
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let watch = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut sink = EventSink::channel(tx.clone());
                let wc = WatchConfig { qmp: Some(qmp), hangs: Some(hang_watch), crash_context: false, rollback, ..WatchConfig::default() };
                if let Err(e) = watch(&mut g, &mut session, &mut sink, stop, wc) {
                    let _ = tx.send(Event { event: WATCH_ENDED, message: Some(e.to_string()), ..Event::default() });
                }
            })
        };
        let mut l = Live { guest, boot: n, rx, stop, watch: Some(watch), kill_after: String::new(), vcpu_threads: how };
        // The trap is armed and the sampler made before any trigger.
        let until = Instant::now() + Duration::from_secs(60);
        let why = match l.rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(e) if e.event == "attached" => None,
            Ok(e) => Some(format!("{}: {}", e.event, e.message.unwrap_or_default())),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = why {
            l.shutdown();
            anyhow::bail!("the watch did not start: {why}");
        }
        while Instant::now() < until {
            let k = kill_after.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if !k.is_empty() {
                l.kill_after = k;
                return Ok(l);
            }
            if let Ok(e) = l.rx.recv_timeout(Duration::from_millis(10)) {
                let why = format!("{}: {}", e.event, e.message.unwrap_or_default());
                l.shutdown();
                anyhow::bail!("the hang watch did not start: {why}");
            }
        }
        l.shutdown();
        anyhow::bail!("the hang sampler was not made within 60 s")
    }

    /// The watch still runs (it ends when the guest goes or on an error).
    fn watching(&self) -> bool {
        self.watch.as_ref().is_some_and(|w| !w.is_finished())
    }

    fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Kill QEMU first: the watch may be blocked on the gdbstub.
        let _ = self.guest.run_detached_kill();
        if let Some(w) = self.watch.take() {
            let _ = w.join();
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

/// The hang layout of the kit's LKDTM image: the image's table and profile
/// (threads of every process), and `watchdog_thresh` from the kit's
/// System.map when the profile lacks it.
fn hang_layout(image: &builder::RepairImage, kernel: Kernel) -> Result<HangLayout> {
    let mut layout = HangLayout::from_image(image, 0)?;
    if layout.watchdog_thresh.is_none() {
        let map = harness::Kit::locate().ok().and_then(|k| k.system_map(kernel).ok());
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
    let image = crate::kit::kit_image(cfg.kernel)?;
    let layout = hang_layout(&image, cfg.kernel)?;
    let mut report = Report {
        kernel: image.kernel.release.clone(),
        kernel_config: match cfg.kernel {
            Kernel::Lkdtm612 => "linux-source-6.12, tinyconfig + guest/lkdtm.config + guest/lkdtm-6.12.config: Debian 6.12's hardening, debug and preemption options".into(),
            _ => "linux-source-6.1, tinyconfig + guest/lkdtm.config".into(),
        },
        cmdline: format!("console=ttyS0,115200 rdinit=/init {} oops=panic {}", harness::BASE_APPEND.join(" "), cfg.append.join(" ")).trim().to_string(),
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
            match Live::boot(report.boots, cfg, &image, &layout, cfg.repair_hangs) {
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
        let rec = match cfg.checkpoint_every {
            Some(every) => run_rollback_type(l, name, cfg, every),
            None => run_type(l, name, cfg),
        };
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
            && cfg.checkpoint_every.is_none()
            && l.watching()
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

/// A verdict on a crash or a hang (not a hang declined without a repair
/// kernel run, which has no timings).
fn is_verdict(e: &Event) -> bool {
    matches!(e.event, "repaired" | "declined") && e.timings_ms.is_some()
}

/// The watch's events of one type, as the campaign reads them.
#[derive(Default)]
struct Seen {
    /// The first verdict, and whether it was on a hang (no `crash` event
    /// before it: the watch reports a trap's crash, then its verdict).
    outcome: Option<(Event, bool)>,
    /// `crash` events still without their verdict.
    open_crashes: u32,
    extra_traps: u32,
    hang: Option<Hang>,
    certain: Option<Hang>,
    gone: Option<String>,
    flow_err: Option<String>,
}

impl Seen {
    /// Takes one event of the watch; `r` gets the notes and the hang's
    /// evidence and timing.
    fn take(&mut self, e: Event, r: &mut TypeRecord, child: u32, t0: Instant) {
        match e.event {
            "crash" => self.open_crashes += 1,
            _ if is_verdict(&e) => {
                let on_hang = self.open_crashes == 0;
                self.open_crashes = self.open_crashes.saturating_sub(1);
                if self.outcome.is_none() {
                    self.outcome = Some((e, on_hang));
                } else {
                    self.extra_traps += 1;
                }
            }
            // A hang's repair found nothing to act on (a blocked task or a
            // kernel thread the campaign already declined at detection).
            "declined" if e.hang.as_ref().is_some_and(|h| hang_declined_reason(h).is_none()) => {
                r.notes.push(format!("hang repair skipped: {}", e.reason.unwrap_or_default()));
            }
            "error" if e.cpu.is_some() => self.flow_err = e.message,
            "error" => r.notes.push(format!("sampler: {}", e.message.unwrap_or_default())),
            WATCH_ENDED => self.flow_err = Some(format!("watch: {}", e.message.unwrap_or_default())),
            "detached" | "reset" => {
                let m = e.message.unwrap_or_default();
                self.gone = Some(m.strip_prefix("the guest went away: ").unwrap_or(&m).to_string());
            }
            "paused" | "resumed" => r.notes.push(format!("{}: {}", e.event, e.message.unwrap_or_default())),
            "hang" => {
                let Some(h) = e.hang else { return };
                // The hang to act on: a task spinning on a CPU, or the
                // child itself. A kernel thread blocked behind a stuck CPU
                // is a consequence, noted, not the cause. The episode is
                // reported on detection and again, at most once, when it
                // becomes certain (IRQs found off by then, for one).
                let primary = matches!(h.kind, HangKind::StuckCpu { .. }) || h.pid as u32 == child;
                let same = self.hang.as_ref().is_some_and(|x| {
                    x.pid == h.pid
                        && match (&x.kind, &h.kind) {
                            (HangKind::StuckCpu { cpu: a, .. }, HangKind::StuckCpu { cpu: b, .. }) => a == b,
                            (a, b) => a == b,
                        }
                });
                if primary && (self.hang.is_none() || same) {
                    r.hang_why = Some(h.why.clone());
                    if h.certain && self.certain.is_none() {
                        r.hang_certain_after_trigger_ms = Some(h.detected.saturating_duration_since(t0).as_secs_f64() * 1e3);
                        r.hang_certain_vcpu_ms = h.vcpu_ms;
                        self.certain = Some(h.clone());
                    }
                    if self.hang.is_none() {
                        self.hang = Some(h);
                    }
                } else {
                    r.notes.push(format!("also: {:?} pid {} ({}){}", h.kind, h.pid, h.comm, if h.certain { ", certain" } else { "" }));
                }
            }
            _ => {}
        }
    }
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
    // The first trigger may itself crash the kernel: with panic_on_warn,
    // its child's exit with the lock held is "scheduling while atomic".
    // Then that crash, and the watch's verdict on it, are the type's.
    let mut first_crashed = None;
    if TWICE.contains(&name) {
        match l.guest.crash(name) {
            Ok(c) => match l.guest.wait_crash_exit(&c, cfg.type_timeout) {
                Ok(s) => r.notes.push(format!("first trigger returned ({s}) holding the lock; the second spins")),
                Err(e) => {
                    r.notes.push(format!("first trigger did not return: {}", e.to_string().lines().next().unwrap_or("")));
                    first_crashed = Some(c);
                }
            },
            Err(e) => r.notes.push(format!("first trigger: {e}")),
        }
    }
    let crash = match first_crashed.map_or_else(|| l.guest.crash(name), Ok) {
        Ok(c) => c,
        Err(e) => {
            r.notes.push(format!("trigger failed: {e}"));
            r.alive = Some(false);
            return r;
        }
    };
    r.child_pid = Some(crash.pid);
    let mut deadline = t0 + cfg.type_timeout;
    let mut seen = Seen::default();
    let mut waiting_for_certainty = false;
    let mut hang_acted = false;
    loop {
        while let Ok(e) = l.rx.try_recv() {
            seen.take(e, &mut r, crash.pid, t0);
        }
        if r.child_status.is_some() || seen.gone.is_some() || seen.flow_err.is_some() {
            break;
        }
        if let Some((e, _)) = &seen.outcome {
            if e.event == "declined" {
                // Declined: the panic completes; nothing more to see.
                std::thread::sleep(Duration::from_millis(300));
                break;
            }
        }
        if let (Some(h), None) = (&seen.hang, &seen.certain) {
            if !waiting_for_certainty && seen.outcome.is_none() && hang_declined_reason(h).is_none() {
                // Detected, not certain: the watch acts on nothing yet;
                // wait for the certain report or for the task to finish by
                // itself.
                waiting_for_certainty = true;
                deadline = deadline.max(Instant::now() + cfg.hang_wait);
            }
        }
        // A blocked task or a kernel thread is declined at detection (the
        // watch would only decline it once certain: 120 s for a blocked
        // task); a user task's spin once the watch found it certain.
        let to_act = seen.certain.as_ref().or(seen.hang.as_ref().filter(|h| hang_declined_reason(h).is_some()));
        if let Some(h) = to_act {
            if !hang_acted && seen.outcome.is_none() {
                hang_acted = true;
                match hang_declined_reason(h) {
                    Some(why) => {
                        r.notes.push(format!("hang declined: {why}"));
                        break;
                    }
                    // The watch repairs it: wait for the verdict.
                    None if cfg.repair_hangs => deadline = Instant::now() + Duration::from_secs(15),
                    None => break,
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
            Err(e) => seen.gone = Some(e.to_string()),
        }
    }
    // Let the console catch up before reading it.
    std::thread::sleep(Duration::from_millis(100));
    r.console = lkdtm_lines(l.guest.console().get(con0..).unwrap_or(""));

    if let Some(h) = &seen.hang {
        r.crashed = true;
        r.detected = Some(match seen.certain.as_ref().unwrap_or(h).kind {
            HangKind::StuckCpu { cpu, no_ticks } => {
                format!("hang: stuck CPU {cpu}{}", if no_ticks { " (no ticks: IRQs off)" } else { "" })
            }
            HangKind::BlockedTask => "hang: blocked task".into(),
        });
        r.hang_detect_ms = Some(h.detected.duration_since(h.since).as_secs_f64() * 1e3);
        r.hang_after_trigger_ms = Some(h.detected.saturating_duration_since(t0).as_secs_f64() * 1e3);
        r.hang_detect_vcpu_ms = h.vcpu_ms;
        if h.pid as u32 != crash.pid {
            r.notes.push(format!("the hung task is pid {} ({}), the child is {}", h.pid, h.comm, crash.pid));
        }
    }
    let applied = |e: &Event| e.event == "repaired";
    if let Some((e, was_hang)) = &seen.outcome {
        r.crashed = true;
        if !was_hang {
            r.detected = Some("panic trap".into());
        }
        r.take_verdict(e);
        if *was_hang {
            r.crash_kind = Some("hang (watcher-injected panic entry)".into());
        }
    }
    if let Some(e) = &seen.flow_err {
        r.crashed = true;
        r.detected.get_or_insert_with(|| "panic trap".into());
        r.notes.push(format!("flow error: {e}"));
    }
    if let Some(e) = &seen.gone {
        r.notes.push(format!("guest gone: {}", e.lines().next().unwrap_or("")));
    }

    // Liveness, when the guest should be alive.
    let declined = seen.outcome.as_ref().is_some_and(|(e, _)| !applied(e));
    let mut late: Vec<String> = Vec::new();
    // A later crash the repair kernel declined (the heap's victim, whose
    // oops faulted in the allocator): the type's verdict, with its reason.
    let mut late_declined: Option<(String, Option<String>)> = None;
    let mut late_killed = false;
    if seen.gone.is_none() && seen.flow_err.is_none() && !declined {
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
        while let Ok(e) = l.rx.try_recv() {
            if is_verdict(&e) {
                let what = if applied(&e) { "killed" } else { "declined" };
                let who = format!("pid {} ({})", e.pid.unwrap_or(0), e.comm.clone().unwrap_or_default());
                if applied(&e) {
                    late_killed = true;
                } else if late_declined.is_none() {
                    late_declined = Some((format!("a later crash, in {who}: {}", e.reason.clone().unwrap_or_default()), e.reason_code.clone()));
                }
                late.push(format!("{who} {what}"));
            }
        }
    } else {
        r.alive = Some(false);
    }

    if seen.extra_traps > 0 || !late.is_empty() {
        r.notes.push(format!("{} later trap(s) in other processes: {}", seen.extra_traps as usize + late.len(), late.join(", ")));
    }
    let healthy = r.alive == Some(true) && r.bystander_ok == Some(true) && r.spawn_ok == Some(true) && late.is_empty();
    r.class = match (&seen.outcome, &seen.hang) {
        (Some((e, true)), _) if applied(e) => {
            if healthy && r.child_status == Some(137) { Class::HangRecovered } else { Class::RepairFailed }
        }
        (Some((_, true)), _) => Class::HangDeclined,
        (Some((e, false)), _) if applied(e) => {
            if healthy && r.child_status == Some(137) { Class::Recovered } else { Class::RepairFailed }
        }
        (Some(_), _) => Class::Declined,
        (None, Some(h)) if hang_declined_reason(h).is_none() && seen.certain.is_none() => {
            if r.child_status.is_some() && healthy {
                Class::HangSelfResolved
            } else if r.child_status.is_some() {
                Class::RepairFailed
            } else {
                Class::HangUncertain
            }
        }
        (None, Some(_)) => Class::HangDeclined,
        (None, None) if seen.flow_err.is_some() => Class::Declined,
        (None, None) if seen.gone.is_some() => Class::GuestLost,
        (None, None) if r.child_status.is_some() && !late.is_empty() && !late_killed && late_declined.is_some() => {
            if let Some((why, code)) = late_declined.take() {
                r.action = Some("decline".into());
                r.reason = Some(why);
                r.reason_code = code;
            }
            Class::Declined
        }
        (None, None) if r.child_status.is_some() && !late.is_empty() => Class::Collateral,
        (None, None) if r.child_status.is_some() => Class::NotCrashing,
        (None, None) => Class::NoOutcome,
    };
    if r.class == Class::Declined && r.reason.is_none() {
        r.reason = seen.flow_err.clone();
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

/// The process `pid` is gone from the guest or a zombie (None: the guest
/// did not answer).
fn child_gone(guest: &mut Guest, pid: u32) -> Option<bool> {
    let r = guest.run(&format!("cut -d' ' -f3 /proc/{pid}/stat 2>/dev/null"), Duration::from_secs(60)).ok()?;
    let st = r.output.first().map(|s| s.trim().to_string()).unwrap_or_default();
    Some(st.is_empty() || st == "Z")
}

/// Rollback mode: triggers `name` from a child that sleeps past a
/// checkpoint first, so the newest checkpoint holds the offender, and
/// records what the watch's rollback and quarantine made of the crash.
fn run_rollback_type(l: &mut Live, name: &str, cfg: &CampaignConfig, every: Duration) -> TypeRecord {
    let mut r = TypeRecord::new(name, l.boot);
    let mut rb = RollbackRecord::default();
    while l.rx.try_recv().is_ok() {}
    let con0 = l.guest.console_len();
    // Long enough for a checkpoint begun after the child exists to be
    // taken under load (each pauses the guest up to ~1.5 s under TCG).
    let delay = (every.as_secs_f64() * 4.0 + 12.0).ceil().max(20.0);
    rb.trigger_delay_s = delay;
    let cmd = format!("(sleep {delay}; echo {name} > /sys/kernel/debug/provoke-crash/DIRECT) >/dev/null 2>&1 & echo $!");
    let child = match l.guest.run(&cmd, Duration::from_secs(60)).map(|o| o.output.first().and_then(|p| p.trim().parse::<u32>().ok())) {
        Ok(Some(pid)) => pid,
        other => {
            r.notes.push(format!("trigger failed: {other:?}"));
            r.alive = Some(false);
            rb.outcome = "campaign error".into();
            r.rollback = Some(rb);
            return r;
        }
    };
    r.child_pid = Some(child);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(delay) + cfg.type_timeout + Duration::from_secs(180);
    let (mut rolled, mut quarantined, mut verdict, mut gone, mut hang_why) = (false, false, None::<Event>, None::<String>, None::<String>);
    let mut quiet_since: Option<Instant> = None;
    loop {
        while let Ok(e) = l.rx.try_recv() {
            match e.event {
                "crash" if r.panic_message.is_none() => r.panic_message = e.message.clone(),
                "checkpoint" => {
                    rb.checkpoints += 1;
                    rb.checkpoint_pause_max_ms = match (rb.checkpoint_pause_max_ms, e.pause_ms) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, b) => a.or(b),
                    };
                }
                "rolled-back" => {
                    rolled = true;
                    r.crashed = true;
                    r.detected = Some("panic trap".into());
                    rb.lost_ms = e.lost_ms;
                    rb.rollback_pause_ms = e.pause_ms;
                    r.crash_kind = e.kind.clone();
                    r.reason_code = e.reason_code.clone();
                    r.reason = e.reason.clone();
                    r.offender_pid = e.pid;
                    r.offender_comm = e.comm.clone();
                    r.action = Some("rollback".into());
                    rb.reason = e.reason.clone();
                }
                "quarantined" => {
                    quarantined = true;
                    rb.quarantined_pid = e.pid;
                    quiet_since = Some(Instant::now());
                }
                _ if is_verdict(&e) && verdict.is_none() => {
                    r.crashed = true;
                    r.detected = Some("panic trap".into());
                    r.take_verdict(&e);
                    verdict = Some(e);
                }
                "hang" => {
                    if let Some(h) = e.hang {
                        if let Some(why) = hang_declined_reason(&h) {
                            r.crashed = true;
                            r.detected = Some(format!("hang: {:?}", h.kind));
                            hang_why = Some(why);
                        }
                    }
                }
                "error" => r.notes.push(e.message.unwrap_or_default()),
                WATCH_ENDED | "detached" | "reset" => gone = Some(e.message.unwrap_or_default()),
                _ => {}
            }
        }
        // Done: a verdict, the guest gone, a hang declined at detection,
        // or a quarantine followed by 10 s without a recurrence.
        if verdict.is_some() || gone.is_some() || hang_why.is_some() || quiet_since.is_some_and(|q| q.elapsed() > Duration::from_secs(10)) {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    r.console = lkdtm_lines(l.guest.console().get(con0..).unwrap_or(""));
    let declined = verdict.as_ref().is_some_and(|e| e.event == "declined");
    if gone.is_none() && !declined {
        // The quarantined child dies at its wake-up: give it time.
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            rb.child_gone = child_gone(&mut l.guest, child);
            if rb.child_gone != Some(false) || Instant::now() > until || !rolled {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let ping = l.guest.ping(Duration::from_secs(15));
        r.alive = Some(ping.is_ok());
        if ping.is_ok() {
            r.bystander_ok = Some(l.guest.verify_bystander().map(|v| v.ok).unwrap_or(false));
            r.spawn_ok = Some(l.guest.run("echo alive", Duration::from_secs(15)).map(|x| x.output == ["alive"]).unwrap_or(false));
        }
    } else {
        r.alive = Some(false);
    }
    let healthy = r.alive == Some(true) && r.bystander_ok == Some(true) && r.spawn_ok == Some(true);
    let (outcome, class) = match (&verdict, rolled) {
        (Some(e), true) if e.event == "declined" => ("declined for good after one rollback", Class::Declined),
        (Some(e), false) if e.event == "declined" => ("declined, not rolled back", Class::Declined),
        (Some(_), _) if healthy => ("recovered by a kill", Class::Recovered),
        (Some(_), _) => ("kill, not recovered", Class::RepairFailed),
        (None, true) if quarantined && healthy && rb.child_gone == Some(true) => ("rolled back + quarantined", Class::Recovered),
        (None, true) => ("rolled back, not recovered", Class::RepairFailed),
        (None, false) if hang_why.is_some() => ("hang: declined, not rolled back", Class::HangDeclined),
        (None, false) if gone.is_some() => ("guest lost", Class::GuestLost),
        (None, false) => ("no outcome", Class::NoOutcome),
    };
    rb.outcome = outcome.into();
    r.class = class;
    if let Some(e) = &verdict {
        rb.reason = e.reason.clone();
    } else if let Some(why) = &hang_why {
        r.reason = Some(format!("hang declined: {why}"));
        rb.reason = Some(format!("{why}; the watch rolls back only a crash trapped at panic, and a hang declined at detection is not one"));
    } else if class != Class::Recovered {
        rb.reason = rb.reason.take().or_else(|| gone.clone()).or_else(|| r.notes.first().cloned());
    }
    if let Some(g) = gone {
        r.notes.push(format!("guest gone: {}", g.lines().next().unwrap_or("")));
    }
    r.rollback = Some(rb);
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

- **recovered**: trapped at `panic`, the repair kernel's verdict was a kill (or, for a warning that `panic_on_warn` made fatal, the warning resumed as without panic_on_warn and the warning task given a pending SIGKILL: `resume-warning`), the crashing child died with SIGKILL (137), the guest answered, the bystander's checksummed records verified, and a new process ran.
- **hang: recovered**: the sampler (guest RAM, no stop) saw a CPU run the same non-idle task with no context switch and no user time for the threshold (counted in CPU time QEMU's vCPU thread really got: a starved or paused guest is never hung) and reported it at once, not certain; the hang became certain when no timer tick landed for the threshold of vCPU time (IRQs off: HARDLOCKUP) or after the kill-after without progress (the guest's own soft-lockup limit, 2 x `watchdog_thresh` = 20 s) while the task's kernel stack kept cycling through a few states (a spin); only then the watcher paused the guest, made the stuck vCPU look as if it had called `panic()` where it spins (return address and message pushed below its stack pointer) and ran the repair kernel with the usual verdict (interrupt context, init, kernel thread, preempt count): the kill is what an oops at that instruction does without `panic_on_oops`. SPINLOCKUP is triggered twice (the first call takes LKDTM's lock and returns holding it); after its repair that lock stays held, which only LKDTM uses.
- **hang: detected, finished by itself**: reported within a second (no switch, no user time), never certain: the task's kernel stack changed at most samples (ATOMIC_TIMING and REFCOUNT_TIMING count to INT_MAX in a stack variable: 60-95 s of vCPU time under TCG, past the 20 s soft-lockup limit, so a rule on time alone would kill them), so nothing was killed and the task finished by itself. Before the certainty policy both were killed at 500 ms.
- **no crash**: the kernel did not panic: a WARN (WARNING*, REFCOUNT_* saturation, UNSET_SMEP's pinned-CR4 WARN, SLAB_FREE_CROSS), an XFAIL (DOUBLE_FAULT is ia32-only, CORRUPT_PAC arm64-only, WRITE_OPD needs function descriptors, UNALIGNED_LOAD_STORE_WRITE), or a protection this kernel does not have (FORTIFY_SOURCE, CFI, STACKLEAK, UBSAN for OVERFLOW_*/ARRAY_BOUNDS, INIT_ON_ALLOC, KASAN/slub_debug for the heap types). These are honest outcomes of this kernel build, not misses of the watcher: there is nothing to repair at the moment of the trigger.
- The heap types that corrupt silently (WRITE_AFTER_FREE, SLAB_FREE_DOUBLE, ...) may crash *other* processes later; one run of WRITE_AFTER_FREE did (four innocent processes trapped and killed, the class `collateral kills`). Such a later oops that faults inside the slab allocator's own code (`mm/slub.c`) is now declined, not killed (the heap's victim is not its cause): the type is then `declined`, its reason the later crash's. Every type from heap.c gets a fresh guest for the next type, so such damage never leaks into another row.
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
    let _ = writeln!(s, "Generated by `{}` ({:.0} s, {} guest boots). Kernel: the guest kit's LKDTM kernel `{}` ({}) under QEMU TCG (`-cpu {}`), 2 vCPUs, 512 MiB, KASLR on; command line `{}`.\n", rep.command, rep.wall_s, rep.boots, rep.kernel, rep.kernel_config, rep.cpu, rep.cmdline);
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
    let rolled: Vec<(&TypeRecord, &RollbackRecord)> = rep.types.iter().filter_map(|t| t.rollback.as_ref().map(|r| (t, r))).collect();
    if !rolled.is_empty() {
        let _ = writeln!(s, "\n## Rollback and quarantine\n");
        let _ = writeln!(s, "Run with `--checkpoint-every`: each type on a fresh guest whose watch keeps a checkpoint at that interval; the child sleeps past a checkpoint before its trigger. Columns: checkpoints taken while the type ran and the longest pause one cost; guest time the rollback lost; how long loading the checkpoint held the guest; the quarantined pid; the child gone afterwards.\n");
        let _ = writeln!(s, "| type | rollback outcome | trigger delay s | checkpoints | longest checkpoint pause ms | lost ms | load ms | quarantined | child gone | reason |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for (t, r) in rolled {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
                t.name,
                r.outcome,
                r.trigger_delay_s,
                r.checkpoints,
                opt_ms(r.checkpoint_pause_max_ms),
                opt_ms(r.lost_ms),
                opt_ms(r.rollback_pause_ms),
                r.quarantined_pid.map_or("".into(), |p| p.to_string()),
                yn(r.child_gone),
                r.reason.clone().unwrap_or_default().replace('|', "\\|")
            );
        }
    }
    s.push_str(NOTES);
    s
}

/// `repair-guest campaign`.
#[derive(clap::Args, Debug, Clone)]
pub struct CampaignArgs {
    /// The kit's LKDTM kernel: `lkdtm` (6.1, tinyconfig) or `lkdtm-6.12`
    /// (6.12 with the hardening, debug and preemption options of Debian's
    /// 6.12 cloud config).
    #[arg(long, default_value = "lkdtm", value_parser = ["lkdtm", "lkdtm-6.12"])]
    pub kernel: String,
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
    /// Run nothing: render the JSON reports of earlier campaigns side by
    /// side (one column each, LABEL=FILE.json, comma-separated) as the
    /// Markdown NAME.md in --out: per type, the outcome, the repair time, the
    /// reason of a decline.
    #[arg(long, value_name = "LABEL=JSON", value_delimiter = ',')]
    pub side_by_side: Vec<String>,
    /// Rollback mode: the watch keeps a checkpoint every SECS seconds
    /// (`watch --checkpoint-every`, `--prefer kill`), and each type runs on
    /// a fresh guest, triggered by a child that sleeps past a checkpoint
    /// first (20 s or more), so the checkpoint holds the offender. The
    /// report records, per type, whether the crash was rolled back and its
    /// offender quarantined, or declined for good, with the reason.
    #[arg(long, value_name = "SECS")]
    pub checkpoint_every: Option<f64>,
    /// The types an earlier campaign's JSON report found declined (crash
    /// or hang), as the type list (with --checkpoint-every: what the
    /// repair kernel declines, tried with rollback).
    #[arg(long, value_name = "JSON", conflicts_with = "types")]
    pub declined_from: Option<std::path::PathBuf>,
}

/// Renders campaign reports (their JSON) side by side: one row per type
/// of any report, one column per report.
pub fn side_by_side(reports: &[(String, serde_json::Value)]) -> String {
    use std::fmt::Write;
    let mut names: Vec<String> = Vec::new();
    for (_, r) in reports {
        for t in r["types"].as_array().into_iter().flatten() {
            if let Some(n) = t["name"].as_str() {
                if !names.iter().any(|x| x == n) {
                    names.push(n.to_string());
                }
            }
        }
    }
    let mut s = String::new();
    let _ = writeln!(s, "# The crash catalogue, kernel by kernel\n");
    let _ = writeln!(s, "Rendered by `repair-guest campaign --side-by-side` from the campaigns' own JSON reports:\n");
    for (label, r) in reports {
        let _ = writeln!(
            s,
            "- **{label}**: kernel `{}` ({}), command line `{}`; `{}` ({:.0} s, {} guest boots).",
            r["kernel"].as_str().unwrap_or("?"),
            r["kernel_config"].as_str().unwrap_or("linux-source-6.1, tinyconfig + guest/lkdtm.config"),
            r["cmdline"].as_str().unwrap_or("?"),
            r["command"].as_str().unwrap_or("?"),
            r["wall_s"].as_f64().unwrap_or(0.0),
            r["boots"].as_u64().unwrap_or(0)
        );
    }
    let _ = writeln!(s, "\nEach cell: outcome, and for a repair the time from trap to resume in ms; a decline's reason follows the table. `-`: not run in that campaign.\n");
    if reports.iter().any(|(_, r)| r["types"].as_array().into_iter().flatten().any(|t| t["rollback"].is_object())) {
        let _ = writeln!(s, "A rollback column (`campaign --checkpoint-every`) runs each type on a fresh guest with the watch keeping checkpoints, from a child that sleeps past one first: **rolled back + quarantined** means the repair kernel declined the crash, the VM went back to the newest checkpoint (the guest time lost and the load's pause follow), the offender got a pending SIGKILL there and died at its wake-up, and the guest answered, its bystander's records verified and a new process ran; **declined for good after one rollback** means the crash came back after the rollback and its panic completed.\n");
    }
    let _ = writeln!(s, "## Summary\n");
    let _ = write!(s, "| outcome |");
    for (label, _) in reports {
        let _ = write!(s, " {label} |");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "|---|{}", "---|".repeat(reports.len()));
    let classes = [
        "recovered",
        "hang: recovered",
        "declined",
        "hang: declined",
        "hang: detected, finished by itself",
        "no crash",
        "collateral kills",
        "rolled back + quarantined",
        "declined for good after one rollback",
        "hang: declined, not rolled back",
        "declined, not rolled back",
    ];
    for c in classes.iter().copied().chain(std::iter::once("other")) {
        let _ = write!(s, "| {c} |");
        for (_, r) in reports {
            let n = r["types"].as_array().into_iter().flatten().filter(|t| {
                let k = class_label(t);
                if c == "other" { !classes.contains(&k.as_str()) } else { k == c }
            }).count();
            let _ = write!(s, " {n} |");
        }
        let _ = writeln!(s);
    }
    let _ = write!(s, "| total |");
    for (_, r) in reports {
        let _ = write!(s, " {} |", r["types"].as_array().map_or(0, |a| a.len()));
    }
    let _ = writeln!(s, "\n\n## Per type\n");
    let _ = write!(s, "| type |");
    for (label, _) in reports {
        let _ = write!(s, " {label} |");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "|---|{}", "---|".repeat(reports.len()));
    let mut declines = Vec::new();
    for n in &names {
        let _ = write!(s, "| {n} |");
        for (label, r) in reports {
            let t = r["types"].as_array().into_iter().flatten().find(|t| t["name"] == n.as_str());
            let cell = match t {
                None => "-".to_string(),
                Some(t) => {
                    let c = class_label(t);
                    let rb = &t["rollback"];
                    if c.contains("declined") {
                        let why = rb["reason"].as_str().or(t["reason"].as_str()).unwrap_or("?");
                        declines.push(format!("- {n}, {label}: {why}"));
                    }
                    match (t["repair_ms"].as_f64(), rb["lost_ms"].as_f64()) {
                        (_, Some(lost)) if c.starts_with("rolled back") => {
                            format!("{c}, {lost:.0} ms of guest time lost, {:.0} ms to load", rb["rollback_pause_ms"].as_f64().unwrap_or(f64::NAN))
                        }
                        (Some(ms), _) if c.contains("recovered") => format!("{c}, {ms:.0} ms"),
                        _ => c,
                    }
                }
            };
            let _ = write!(s, " {cell} |");
        }
        let _ = writeln!(s);
    }
    if !declines.is_empty() {
        let _ = writeln!(s, "\n## Declines and their reasons\n");
        for d in declines {
            let _ = writeln!(s, "{d}");
        }
    }
    s
}

fn class_label(t: &serde_json::Value) -> String {
    if let Some(o) = t["rollback"]["outcome"].as_str() {
        return o.to_string();
    }
    match t["class"].as_str().unwrap_or("?") {
        "recovered" => "recovered",
        "declined" => "declined",
        "hang_recovered" => "hang: recovered",
        "hang_declined" => "hang: declined",
        "hang_self_resolved" => "hang: detected, finished by itself",
        "not_crashing" => "no crash",
        "collateral" => "collateral kills",
        other => return other.replace('_', " "),
    }
    .to_string()
}

/// Runs `repair-guest campaign`.
pub fn cli(a: &CampaignArgs) -> Result<()> {
    if !a.side_by_side.is_empty() {
        let mut reports = Vec::new();
        for spec in &a.side_by_side {
            let (label, path) = spec.rsplit_once('=').with_context(|| format!("--side-by-side {spec:?}: expected LABEL=FILE.json"))?;
            let text = std::fs::read_to_string(path).with_context(|| format!("reading the campaign report {path}"))?;
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{path} is not a campaign's JSON report"))?;
            reports.push((label.to_string(), v));
        }
        let md = side_by_side(&reports);
        match &a.out {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                std::fs::write(dir.join(format!("{}.md", a.name)), &md)?;
                eprintln!("wrote {}/{}.md", dir.display(), a.name);
            }
            None => print!("{md}"),
        }
        return Ok(());
    }
    let mut cfg = CampaignConfig::default();
    if a.kernel == "lkdtm-6.12" {
        cfg.kernel = Kernel::Lkdtm612;
        cfg.types = lkdtm_types(cfg.kernel);
    }
    if a.quick {
        cfg.types = QUICK_TYPES.iter().map(|s| s.to_string()).collect();
    } else if a.hangs {
        cfg.types = HANG_TYPES.iter().map(|s| s.to_string()).collect();
    }
    if !a.types.is_empty() {
        cfg.types = a.types.clone();
    }
    if let Some(path) = &a.declined_from {
        let text = std::fs::read_to_string(path).with_context(|| format!("--declined-from: reading the campaign report {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("--declined-from: {} is not a campaign's JSON report", path.display()))?;
        cfg.types = v["types"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| matches!(t["class"].as_str(), Some("declined" | "hang_declined")))
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .collect();
        if cfg.types.is_empty() {
            anyhow::bail!("--declined-from {}: the report has no declined type", path.display());
        }
    }
    if let Some(secs) = a.checkpoint_every {
        if !(secs.is_finite() && secs >= 0.1) {
            anyhow::bail!("--checkpoint-every {secs}: give an interval of at least 0.1 seconds");
        }
        cfg.checkpoint_every = Some(Duration::from_secs_f64(secs));
    }
    cfg.append = a.append.clone();
    cfg.type_timeout = Duration::from_secs_f64(a.timeout);
    cfg.hang = hangs::hang_config(Duration::from_millis(a.hang_ms), a.kill_after_ms.map(Duration::from_millis), a.act_at_detection);
    cfg.hang.period = Duration::from_millis(a.period_ms);
    cfg.repair_hangs = !a.no_repair_hangs;
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
    let image = crate::kit::kit_image(cfg.kernel)?;
    let layout = hang_layout(&image, cfg.kernel)?;
    let mut l = Live::boot(1, cfg, &image, &layout, opts.act)?;
    // The events are taken on another thread while the command runs.
    let (_keep, dummy) = channel();
    let rx = std::mem::replace(&mut l.rx, dummy);
    let done = Arc::new(AtomicBool::new(false));
    let act = opts.act;
    #[derive(Default)]
    struct Seen {
        hangs: Vec<String>,
        certain: Vec<String>,
        acted: u32,
        traps: u32,
        errors: Vec<String>,
        paused: bool,
        resumed: bool,
    }
    let collector = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut out = Seen::default();
            loop {
                let e = match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(e) => e,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !done.load(Ordering::Relaxed) => continue,
                    Err(_) => return out,
                };
                let msg = e.message.clone().unwrap_or_default();
                match (e.event, &e.hang) {
                    ("hang", Some(h)) => {
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
                            out.certain.push(line.clone());
                            // The watch repairs it.
                            if act && hang_declined_reason(h).is_none() {
                                out.acted += 1;
                            }
                        }
                        out.hangs.push(line);
                    }
                    _ if is_verdict(&e) => out.traps += 1,
                    ("error", _) if e.cpu.is_some() => out.traps += 1,
                    // A repair of a certain hang that found nothing to act on.
                    ("declined", Some(h)) if hang_declined_reason(h).is_none() => {
                        out.errors.push(format!("hang repair skipped: {}", e.reason.unwrap_or_default()))
                    }
                    ("error", _) | ("detached", _) | ("reset", _) | (WATCH_ENDED, _) => out.errors.push(format!("{}: {msg}", e.event)),
                    ("paused", _) => out.paused = true,
                    ("resumed", _) => out.resumed = true,
                    _ => {}
                }
            }
        })
    };
    // Someone else's pause, through the second QMP monitor (the watch
    // holds the first).
    let pauser = match (opts.pause, l.guest.qmp2_addr()) {
        (Some((after, d)), Some(addr)) => {
            let mut q = loader::qmp::Qmp::connect(&addr.parse::<Endpoint>()?).context("the second QMP monitor")?;
            Some(std::thread::spawn(move || -> Result<(), loader::access::AccessError> {
                std::thread::sleep(after);
                q.stop()?;
                std::thread::sleep(d);
                q.cont()
            }))
        }
        _ => None,
    };
    let t = Instant::now();
    let res = l.guest.run(workload, timeout);
    let elapsed = t.elapsed().as_secs_f64();
    let pause_err = match pauser.map(|p| p.join()) {
        Some(Ok(Err(e))) => Some(format!("QMP pause: {e}")),
        Some(Err(_)) => Some("the QMP pause thread panicked".to_string()),
        _ => None,
    };
    // Reports raised at the very end still count.
    std::thread::sleep(cfg.hang.cpu_threshold + Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    let mut seen = collector.join().map_err(|_| anyhow::anyhow!("the collector panicked"))?;
    seen.errors.extend(pause_err);
    if opts.pause.is_some() && !(seen.paused && seen.resumed) {
        seen.errors.push(format!("the watch saw the QMP pause: {}, the resume: {}", seen.paused, seen.resumed));
    }
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
        hangs: seen.hangs,
        certain: seen.certain,
        acted: seen.acted,
        traps: seen.traps,
        pause_ms: opts.pause.map(|(a, d)| (a.as_secs_f64() * 1e3, d.as_secs_f64() * 1e3)),
        errors: seen.errors,
    };
    l.shutdown();
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rollback report's types get their own outcome labels, counted in
    /// the summary, with the guest time lost in the cell and the reason of
    /// a decline for good after the table.
    #[test]
    fn side_by_side_renders_the_rollback_column() {
        let plain = serde_json::json!({"types": [
            {"name": "EXHAUST_STACK", "class": "declined", "reason": "NMI context"},
            {"name": "PANIC", "class": "recovered", "repair_ms": 11.2},
        ]});
        let rb = serde_json::json!({"types": [
            {"name": "EXHAUST_STACK", "class": "recovered", "reason": "NMI context",
             "rollback": {"outcome": "rolled back + quarantined", "lost_ms": 1909.1, "rollback_pause_ms": 63.9}},
            {"name": "IRQ_THING", "class": "declined",
             "rollback": {"outcome": "declined for good after one rollback", "reason": "came back after the rollback"}},
        ]});
        let md = side_by_side(&[("6.1".into(), plain), ("6.1 rollback".into(), rb)]);
        assert!(md.contains("| EXHAUST_STACK | declined | rolled back + quarantined, 1909 ms of guest time lost, 64 ms to load |"), "{md}");
        assert!(md.contains("| PANIC | recovered, 11 ms | - |"), "{md}");
        assert!(md.contains("| rolled back + quarantined | 0 | 1 |"), "{md}");
        assert!(md.contains("| declined for good after one rollback | 0 | 1 |"), "{md}");
        assert!(md.contains("| other | 0 | 0 |"), "{md}");
        assert!(md.contains("- IRQ_THING, 6.1 rollback: came back after the rollback"), "{md}");
        assert!(md.contains("A rollback column"), "{md}");
    }
}
