//! `repair-guest watch`: stay attached, repair each crash, report each event
//! as one JSON line.

use crate::access::{AccessError, CpuState, GuestAccess, Gva, StopEvent, StopReason, VcpuId};
use crate::checkpoint::Decision;
use crate::flow::{crash_kind_name, reason_name, FlowError, Mode, Outcome, Session, Timings};
use crate::hang::{self, Hang, HangKind, HangRepair, Sampler, SamplerMsg};
use crate::kaslr::KaslrError;
use crate::ram::RamFile;
use crate::qmp::Qmp;
use crate::supervise::TrapRecorder;
use serde::Serialize;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One line of the event stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Event {
    /// `attached`, `crash`, `hang`, `repaired`, `declined`, `error`,
    /// `paused`, `resumed`, `reset`, `rearmed`, `refused`, `detached`;
    /// with checkpoints: `checkpoint`, `rolled-back`, `quarantined`.
    pub event: &'static str,
    /// UTC, RFC 3339 with milliseconds; set by [`EventSink::emit`].
    pub time: String,
    /// The guest's name (`--name`, else QMP `query-name`, else the socket
    /// path); set by [`EventSink::emit`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Pages of kernel text or rodata the repair kernel restored from the
    /// healthy snapshot (with --integrity).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages_restored: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings_ms: Option<Timings>,
    /// The QEMU run state behind a `paused` event (`paused`, `io-error`,
    /// `guest-panicked`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// A `hang`: whether it is certain (the default policy acts only then),
    /// with the evidence in `reason`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certain: Option<bool>,
    /// The new KASLR slide of a `rearmed` event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slide: Option<String>,
    /// The crashed vCPU's backtrace at the trap (`crash`, `repaired`,
    /// `declined`), as the repair kernel's walker read it from the guest:
    /// run-time addresses, with the link-time address for `addr2line`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backtrace: Option<Vec<String>>,
    /// The kernel log's last lines at the trap. A direct `panic()` has
    /// printed nothing to the console yet when the trap fires: this is
    /// where its message and the lines before it are kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<Vec<String>>,
    /// `checkpoint`: how long the guest was held stopped for it;
    /// `rolled-back`: how long the rollback held it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
    /// `rolled-back`: the guest time lost (it ran this long after the
    /// checkpoint it went back to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_ms: Option<f64>,
    /// `checkpoint`, `rolled-back`: the checkpoint's tag in QEMU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// For a program that drives the watch (not written): the verdict's
    /// reason code (`repaired`, `declined`), and the sampler's report
    /// behind a `hang` (and a hang's `declined`), with its instants.
    #[serde(skip)]
    pub reason_code: Option<String>,
    #[serde(skip)]
    pub hang: Option<Hang>,
}

impl Event {
    fn simple(event: &'static str, message: impl Into<String>) -> Self {
        Event { event, message: Some(message.into()), ..Default::default() }
    }

    /// The `crash` event: what the repair kernel found, before acting.
    pub fn crash(o: &Outcome) -> Self {
        Event {
            event: "crash",
            kind: Some(crash_kind_name(o.out.crash_kind)),
            message: Some(o.message().to_string()),
            cpu: Some(o.vcpu.0),
            pid: Some(o.out.pid),
            comm: Some(o.comm().to_string()),
            ..Default::default()
        }
    }

    /// `repaired` or `declined`, with the verdict's words and the timings.
    pub fn verdict(o: &Outcome, resume_ms: f64) -> Self {
        let mut timings = o.timings.clone();
        timings.total += resume_ms;
        Event {
            event: if o.applied { "repaired" } else { "declined" },
            action: Some(o.action().name().into()),
            reason: Some(o.reason().to_string()),
            reason_code: Some(reason_name(o.out.reason_code)),
            pages_restored: (o.out.pages_restored > 0).then_some(o.out.pages_restored),
            timings_ms: Some(timings),
            ..Event::crash(o)
        }
    }
}

impl Event {
    /// The `hang` event: what the sampler saw, before acting.
    pub fn hang(h: &Hang) -> Self {
        let (kind, cpu) = match h.kind {
            HangKind::StuckCpu { cpu, no_ticks } => {
                (format!("stuck CPU{}", if no_ticks { " (no ticks: IRQs off)" } else { "" }), Some(cpu))
            }
            HangKind::BlockedTask => ("blocked task".to_string(), None),
        };
        let vcpu = h.vcpu_ms.map(|v| format!(" ({v:.0} ms of vCPU time)")).unwrap_or_default();
        Event {
            event: "hang",
            kind: Some(kind),
            message: Some(format!("no progress for {:.0} ms{vcpu}", h.stalled_ms)),
            cpu,
            pid: Some(h.pid),
            comm: Some(h.comm.clone()),
            certain: Some(h.certain),
            reason: Some(h.why.clone()),
            hang: Some(h.clone()),
            ..Default::default()
        }
    }

    /// A hang not acted on, with the reason.
    fn hang_declined(h: &Hang, reason: String) -> Self {
        Event { event: "declined", action: Some("decline".into()), reason: Some(reason), ..Event::hang(h) }
    }
}

/// Hang detection for [`watch`]: a sampler over guest RAM (no stop). The
/// sampler is made anew for each kernel instance (at attach, and after a
/// reset re-armed the trap with a new KASLR slide).
pub struct HangWatch {
    /// Makes the sampler for the session's current slide; `regs` are a
    /// stopped vCPU's (any kernel page tables will do to find the kernel's).
    pub make: MakeSampler,
    /// Act on certain hangs; false: only report them.
    pub act: bool,
}

/// See [`HangWatch::make`].
pub type MakeSampler = Box<dyn FnMut(&Session, &CpuState) -> Result<Sampler<RamFile>, hang::HangError> + Send>;

impl std::fmt::Debug for HangWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HangWatch")
    }
}

/// Where events go: JSON lines to a writer, or the events themselves to a
/// channel (a program that drives the watch, like the crash campaign).
/// Each event gets the time and the guest's name here.
#[derive(Debug)]
pub struct EventSink {
    out: Box<dyn WriteDebug>,
    channel: Option<std::sync::mpsc::Sender<Event>>,
    /// Stamped on every event.
    pub guest: Option<String>,
    failing: bool,
}

trait WriteDebug: Write + std::fmt::Debug + Send {}
impl<T: Write + std::fmt::Debug + Send> WriteDebug for T {}

impl EventSink {
    pub fn stdout() -> Self {
        Self::new(Box::new(std::io::stdout()))
    }
    pub fn file(f: std::fs::File) -> Self {
        Self::new(Box::new(f))
    }
    /// Events as values, to `tx` (nothing is written).
    pub fn channel(tx: std::sync::mpsc::Sender<Event>) -> Self {
        Self { channel: Some(tx), ..Self::new(Box::new(std::io::sink())) }
    }
    fn new(out: Box<dyn WriteDebug>) -> Self {
        Self { out, channel: None, guest: None, failing: false }
    }
    /// Writes one event line. A write error is reported on stderr (once
    /// until writing works again) and watching goes on: an event sink that
    /// filled its disk must not take the guest's protection with it.
    pub fn emit(&mut self, e: &Event) {
        let mut e = e.clone();
        e.time = utc_now();
        if e.guest.is_none() {
            e.guest = self.guest.clone();
        }
        if let Some(tx) = &self.channel {
            // A receiver that went away wants no more events.
            let _ = tx.send(e);
            return;
        }
        let Ok(line) = serde_json::to_string(&e) else { return };
        let r = writeln!(self.out, "{line}").and_then(|()| self.out.flush());
        match r {
            Ok(()) => self.failing = false,
            Err(err) if !self.failing => {
                self.failing = true;
                eprintln!("repair-guest: cannot write events ({err}); watching goes on. Lost event: {line}");
            }
            Err(_) => {}
        }
    }
}

/// Now, UTC, as `2026-11-30T05:31:07.123Z`.
pub fn utc_now() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// How the watch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchEnd {
    /// Asked to stop (a signal, or the stop flag).
    Stopped,
    /// `--max-repairs` reached.
    MaxRepairs,
    /// The guest went away.
    GuestGone,
    /// The guest moved to a new QEMU process (a CPR migration completed,
    /// `repair-guest restart-vmm`): attach to it at the same addresses.
    Migrated,
}

/// What [`watch`] needs besides the guest and the session.
#[derive(Default)]
pub struct WatchConfig {
    /// Detach after this many repairs.
    pub max_repairs: Option<u32>,
    /// QEMU's QMP, for run states: an operator's pause is told from ours by
    /// it, resumes and resets are seen through its events. Without it, a
    /// stop reported to the gdb client with a signal other than SIGTRAP is
    /// taken for someone else's pause, and resets go unseen.
    pub qmp: Option<Qmp>,
    /// The guest was paused by someone else when we attached: it stays
    /// paused until they resume it.
    pub found_paused: bool,
    pub hangs: Option<HangWatch>,
    /// Read the crashed vCPU's backtrace and the log tail into the crash's
    /// events (cheap with guest RAM mapped; slow through a gdbstub alone).
    pub crash_context: bool,
    /// The trap and whether we hold the guest stopped, kept for a
    /// supervisor to clean up after this process should it die.
    pub record: TrapRecorder,
    /// Checkpoints, and rollback (with quarantine) of crashes the repair
    /// kernel declines (`checkpoint`); needs `qmp`.
    pub rollback: Option<crate::checkpoint::Rollback>,
}

impl std::fmt::Debug for WatchConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchConfig")
            .field("max_repairs", &self.max_repairs)
            .field("qmp", &self.qmp.is_some())
            .field("found_paused", &self.found_paused)
            .field("hangs", &self.hangs.is_some())
            .field("crash_context", &self.crash_context)
            .finish()
    }
}

/// Watches a guest: arms the trap at `panic`, repairs each crash (on every
/// vCPU that reaches the trap), and keeps the first law: a stop we did not
/// make is left alone, a reset lifts the trap until the new kernel is up and
/// re-arms it, and every way out removes the trap and leaves the guest
/// running (or paused, if someone else paused it). Returns when `stop` is
/// set, when `max_repairs` repairs were made, or when the guest goes away.
pub fn watch<G: GuestAccess + ?Sized>(
    guest: &mut G,
    session: &mut Session,
    events: &mut EventSink,
    stop: Arc<AtomicBool>,
    cfg: WatchConfig,
) -> Result<WatchEnd, FlowError> {
    let mut w = Watcher {
        guest,
        session,
        events,
        stop: &stop,
        cfg,
        sampler: None,
        paused: Arc::new(AtomicBool::new(false)),
        foreign_pause: false,
        rearm_at: None,
        reset_at: None,
        repairs: 0,
        migrated: false,
    };
    let end = w.run();
    w.stop_sampler();
    // The checkpoints go with the watch: QEMU's node and its file.
    if let (Some(r), Some(q)) = (w.cfg.rollback.take(), w.cfg.qmp.as_mut()) {
        r.store.close(q);
    }
    end
}

/// The running sampler thread.
struct SamplerThread {
    rx: std::sync::mpsc::Receiver<SamplerMsg>,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

struct Watcher<'a, G: ?Sized> {
    guest: &'a mut G,
    session: &'a mut Session,
    events: &'a mut EventSink,
    stop: &'a AtomicBool,
    cfg: WatchConfig,
    sampler: Option<SamplerThread>,
    /// Shared with the sampler: the guest is not running on its own (our
    /// repair, someone's pause, a reset), so no progress means nothing.
    paused: Arc<AtomicBool>,
    /// Someone else paused the guest (and we left it so).
    foreign_pause: bool,
    /// After a reset: when to try re-arming next.
    rearm_at: Option<Instant>,
    reset_at: Option<Instant>,
    repairs: u32,
    /// QMP reported a completed migration: the guest lives on in another
    /// QEMU, and losing this one is no loss of the guest.
    migrated: bool,
}

impl<G: GuestAccess + ?Sized> Watcher<'_, G> {
    fn run(&mut self) -> Result<WatchEnd, FlowError> {
        self.undo_interrupted_repair()?;
        let panic_addr = self.arm()?;
        self.events.emit(&Event {
            event: "attached",
            message: Some(format!(
                "{} (KASLR slide {:#x}); trap armed at panic {:#x}",
                self.session.image.kernel.release, self.session.slide, panic_addr
            )),
            ..Default::default()
        });
        self.start_sampler()?;
        // A crash may already wait at our trap: a watcher that died left the
        // guest stopped there (QEMU keeps a client's breakpoints after it
        // goes), or another vCPU reached it as we attached.
        if !self.trapped_vcpus()?.is_empty() {
            self.handle_traps(None)?;
        } else if self.cfg.found_paused {
            self.leave_foreign_pause("paused".into());
        } else {
            self.guest.resume()?;
        }
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return self.detach("stopped on request; the guest runs on").map(|()| WatchEnd::Stopped);
            }
            if let Some(end) = self.poll_qmp()? {
                return Ok(end);
            }
            if self.rearm_at.is_some_and(|t| Instant::now() >= t) {
                self.try_rearm()?;
            }
            self.poll_hangs()?;
            self.poll_checkpoint()?;
            if self.cfg.max_repairs.is_some_and(|m| self.repairs >= m) {
                let why = format!("{} repairs made (--max-repairs)", self.repairs);
                return self.detach(&why).map(|()| WatchEnd::MaxRepairs);
            }
            // Short waits: QMP events, hangs and the stop flag are polled
            // between them.
            let wait = if self.sampler.is_some() { 20 } else { 100 };
            let ev = match self.guest.wait_stop(Some(Duration::from_millis(wait))) {
                Ok(None) => continue,
                Ok(Some(ev)) => ev,
                Err(AccessError::GuestGone(why)) => return Ok(self.gone(&why)),
                Err(e) => return Err(e.into()),
            };
            match self.on_stop(ev) {
                Err(FlowError::Access(AccessError::GuestGone(why))) => return Ok(self.gone(&why)),
                r => r?,
            }
        }
    }

    /// Says so when the attach undid a repair a killed watcher had left
    /// half done (see [`crate::journal`]).
    fn undo_interrupted_repair(&mut self) -> Result<(), FlowError> {
        if let Some(vcpu) = self.session.undone_repair.take() {
            self.events.emit(&Event {
                cpu: Some(vcpu.0),
                ..Event::simple("error", "the last watcher died during a repair; the guest was put back as it was at the trap")
            });
        }
        Ok(())
    }

    fn gone(&mut self, why: &str) -> WatchEnd {
        // The gdbstub may close (the old QEMU quit) before the QMP events
        // saying why were read: they are still in the socket.
        if let Some(q) = self.cfg.qmp.as_mut().filter(|_| !self.migrated) {
            while let Ok(Some(e)) = q.next_event(Some(Duration::from_millis(1))) {
                if e.name == "MIGRATION" && e.data["status"] == "completed" {
                    self.migrated = true;
                }
            }
            // Without QEMU's migration events (capability `events` off),
            // its run state says so while it lives.
            if !self.migrated && q.query_status().is_ok_and(|s| s == "postmigrate") {
                self.migrated = true;
            }
        }
        if self.migrated {
            self.events.emit(&Event::simple("detached", format!("following the guest: {why}")));
            return WatchEnd::Migrated;
        }
        self.events.emit(&Event::simple("detached", format!("the guest went away: {why}")));
        WatchEnd::GuestGone
    }

    fn arm(&mut self) -> Result<Gva, FlowError> {
        self.session.arm(self.guest)?;
        let addr = self.session.panic_addr()?;
        self.cfg.record.set_trap(Some(addr));
        Ok(addr)
    }

    /// The vCPUs sitting at the entry of `panic`: trapped there, or about
    /// to be (all-stop reports one vCPU per stop).
    fn trapped_vcpus(&mut self) -> Result<Vec<VcpuId>, FlowError> {
        let panic = self.session.panic_addr()?;
        let mut at = Vec::new();
        for v in self.guest.vcpus()? {
            if self.guest.get_regs(v)?.rip == panic.0 {
                at.push(v);
            }
        }
        Ok(at)
    }

    fn on_stop(&mut self, ev: StopEvent) -> Result<(), FlowError> {
        let panic = self.session.panic_addr()?;
        if ev.reason == StopReason::Trap && ev.rip == panic && self.rearm_at.is_none() {
            return self.handle_traps(Some(ev.vcpu));
        }
        // Not at our trap. QMP tells a debug stop (ours: a second vCPU's
        // report of the same trap, or one overtaken by a reset) from any
        // other run state (someone else's pause); without it, the stop's
        // signal does: QEMU reports a QMP `stop` as SIGINT.
        let ours = match &mut self.cfg.qmp {
            Some(q) => q.query_status()? == "debug",
            None => ev.reason == StopReason::Trap,
        };
        if !ours {
            let status = match &mut self.cfg.qmp {
                Some(q) => q.query_status().unwrap_or_else(|_| "paused".into()),
                None => "paused".into(),
            };
            self.leave_foreign_pause(status);
            return Ok(());
        }
        if self.rearm_at.is_none() && !self.trapped_vcpus()?.is_empty() {
            return self.handle_traps(None);
        }
        self.guest.resume()?;
        Ok(())
    }

    /// Someone else paused the guest: say so, and leave it to them.
    fn leave_foreign_pause(&mut self, status: String) {
        if !self.foreign_pause {
            self.foreign_pause = true;
            self.paused.store(true, Ordering::Relaxed);
            self.events.emit(&Event {
                event: "paused",
                message: Some("the guest was paused by someone else; it stays paused until they resume it".into()),
                status: Some(status),
                ..Default::default()
            });
        }
        self.guest.release_stop();
    }

    /// Repairs (or declines) the crash of every vCPU at the trap, then
    /// resumes the guest. `first` is the vCPU the stop was reported for.
    /// No vCPU at the trap is resumed before it was decided: a declined
    /// one steps over the trap into its panic, as it would have without us.
    fn handle_traps(&mut self, first: Option<VcpuId>) -> Result<(), FlowError> {
        self.paused.store(true, Ordering::Relaxed);
        self.cfg.record.set_held(true);
        let mut vcpus: Vec<VcpuId> = first.into_iter().collect();
        for v in self.trapped_vcpus()? {
            if !vcpus.contains(&v) {
                vcpus.push(v);
            }
        }
        let mut decided = Vec::new();
        let mut rollback = None;
        let mut for_good = Vec::new();
        for v in vcpus {
            let context = if self.cfg.crash_context { crash_context(self.guest, self.session, v) } else { None };
            // With rollback preferred, the repair kernel looks first and
            // acts only if the policy says kill.
            let mode = match &self.cfg.rollback {
                Some(r) if !r.policy.kill_at_once() => Mode::Diagnose,
                _ => Mode::Repair,
            };
            match self.session.repair(self.guest, v, mode) {
                Ok(o) => {
                    let mut e = Event::crash(&o);
                    if let Some((bt, log)) = &context {
                        e.backtrace = Some(bt.clone());
                        e.log_tail = Some(log.clone());
                    }
                    self.events.emit(&e);
                    let o = match self.cfg.rollback.as_mut().map(|r| r.decide(&o)) {
                        None | Some(Decision::Verdict) => o,
                        Some(Decision::Kill) => match self.session.repair(self.guest, v, Mode::Repair) {
                            Ok(o) => o,
                            Err(e @ FlowError::Access(AccessError::GuestGone(_))) => return Err(e),
                            Err(e) => {
                                self.events.emit(&Event { cpu: Some(v.0), ..Event::simple("error", e.to_string()) });
                                continue;
                            }
                        },
                        Some(Decision::Rollback { quarantine }) => {
                            rollback.get_or_insert((o, quarantine));
                            continue;
                        }
                        Some(Decision::DeclineForGood(why)) => {
                            let mut e = Event::verdict(&o, 0.0);
                            e.reason = Some(format!("{why}; the repair kernel: {}", o.reason()));
                            e.action = Some("decline".into());
                            e.reason_code = Some("recurred-after-rollback".into());
                            if let Some((bt, log)) = context {
                                e.backtrace = Some(bt);
                                e.log_tail = Some(log);
                            }
                            for_good.push(e);
                            continue;
                        }
                    };
                    decided.push((o, context));
                }
                Err(e @ FlowError::Access(AccessError::GuestGone(_))) => return Err(e),
                Err(e) => {
                    // The flow restored the vCPU as it was at the trap: its
                    // panic takes its course, as it would have without us.
                    self.events.emit(&Event { cpu: Some(v.0), ..Event::simple("error", e.to_string()) });
                }
            }
        }
        if let Some((o, quarantine)) = rollback {
            self.roll_back(&o, quarantine)?;
        }
        let t = Instant::now();
        self.guest.resume()?;
        let resume_ms = t.elapsed().as_secs_f64() * 1e3;
        self.cfg.record.set_held(false);
        self.paused.store(self.foreign_pause, Ordering::Relaxed);
        for e in for_good {
            self.events.emit(&e);
        }
        for (o, context) in decided {
            let mut e = Event::verdict(&o, resume_ms);
            if let Some((bt, log)) = context {
                e.backtrace = Some(bt);
                e.log_tail = Some(log);
            }
            self.events.emit(&e);
            if o.applied {
                self.repairs += 1;
            }
        }
        Ok(())
    }

    /// Stops the guest for work of ours, unless it is already stopped by
    /// someone else (then it is only marked so). Returns whether we stopped
    /// it, for [`Watcher::release`].
    fn hold(&mut self) -> Result<bool, FlowError> {
        if !self.guest.is_running() {
            return Ok(false);
        }
        if let Some(q) = &mut self.cfg.qmp {
            // `debug` while we believe the guest running: our gdbstub
            // stopped it (a vCPU reached the trap) and its stop reply is on
            // the way; the pause below reads it (QEMU ignores the 0x03 of a
            // stopped VM), so the trap is seen, not mistaken for a pause of
            // someone else's.
            let status = q.query_status()?;
            if status != "running" && status != "debug" {
                self.guest.assume_stopped();
                return Ok(false);
            }
        }
        self.cfg.record.set_held(true);
        self.guest.pause()?;
        Ok(true)
    }

    fn release(&mut self, we_stopped: bool) -> Result<(), FlowError> {
        if we_stopped {
            self.guest.resume()?;
            self.cfg.record.set_held(false);
        } else {
            self.guest.release_stop();
        }
        Ok(())
    }

    /// Removes the trap and leaves the guest running (or paused, if someone
    /// else paused it).
    fn detach(&mut self, why: &str) -> Result<(), FlowError> {
        let we = self.hold()?;
        self.session.disarm(self.guest)?;
        self.cfg.record.set_trap(None);
        self.release(we)?;
        self.events.emit(&Event::simple("detached", why));
        Ok(())
    }

    /// Drains QMP's events: someone's pause and resume, resets, shutdown.
    fn poll_qmp(&mut self) -> Result<Option<WatchEnd>, FlowError> {
        let Some(q) = &mut self.cfg.qmp else { return Ok(None) };
        let mut names = Vec::new();
        let mut gone = None;
        loop {
            match q.next_event(Some(Duration::from_millis(1))) {
                Ok(Some(e)) => names.push(e),
                Ok(None) => break,
                Err(AccessError::GuestGone(why)) => {
                    gone = Some(why);
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        // A completed migration (CPR: the guest now runs in a new QEMU; the
        // old one is left in postmigrate, or quits): nothing more to do here.
        if names.iter().any(|e| e.name == "MIGRATION" && e.data["status"] == "completed") {
            self.migrated = true;
            return Ok(Some(self.gone("its QEMU handed it over to a new QEMU process (migration completed)")));
        }
        if let Some(why) = gone {
            return Ok(Some(self.gone(&why)));
        }
        for e in names {
            match e.name.as_str() {
                // Our own stops raise STOP too; only a run state other than
                // running or debug while we believe it running is someone
                // else's pause (QEMU 10 tells the gdb client nothing of it).
                "STOP" if !self.foreign_pause && self.guest.is_running() => {
                    let Some(q) = &mut self.cfg.qmp else { break };
                    let status = q.query_status()?;
                    if status != "running" && status != "debug" {
                        self.leave_foreign_pause(status);
                    }
                }
                "RESUME" if self.foreign_pause => self.resync()?,
                "RESET" => self.on_reset(&e.data)?,
                _ => {}
            }
        }
        Ok(None)
    }

    /// Someone resumed the guest they had paused. QEMU 10's gdbstub sends
    /// a stop reply only while a `c` or `0x03` of ours is outstanding, and
    /// the one for their `stop` used it up: without a new one, our next trap
    /// would stop the guest in silence. So stop it briefly ourselves and
    /// continue it (a trap it reached meanwhile is handled then).
    fn resync(&mut self) -> Result<(), FlowError> {
        let Some(q) = &mut self.cfg.qmp else { return Ok(()) };
        let status = q.query_status()?;
        match status.as_str() {
            "running" => {
                self.guest.pause()?;
            }
            "debug" => self.guest.assume_stopped(),
            _ => return Ok(()), // paused again, or another state: still theirs
        }
        self.foreign_pause = false;
        self.paused.store(self.rearm_at.is_some(), Ordering::Relaxed);
        self.events.emit(&Event::simple("resumed", "the guest was resumed; watching goes on"));
        if self.rearm_at.is_none() && !self.trapped_vcpus()?.is_empty() {
            return self.handle_traps(None);
        }
        self.guest.resume()?;
        Ok(())
    }

    /// The guest reset: its next kernel has a new KASLR slide, so the trap
    /// (a breakpoint at the old `panic`) is lifted at once and set again
    /// once the new kernel is up.
    fn on_reset(&mut self, data: &serde_json::Value) -> Result<(), FlowError> {
        let reason = data.get("reason").and_then(|r| r.as_str()).unwrap_or("reset").to_string();
        self.paused.store(true, Ordering::Relaxed);
        self.stop_sampler();
        let we = self.hold()?;
        if let Err(e) = self.session.disarm(self.guest) {
            tracing::warn!("removing the old trap after a reset: {e}");
            self.session.forget_trap();
        }
        self.cfg.record.set_trap(None);
        self.release(we)?;
        self.events.emit(&Event {
            event: "reset",
            message: Some(format!("the guest reset ({reason}); no trap until its kernel is up again")),
            ..Default::default()
        });
        self.rearm_at = Some(Instant::now() + Duration::from_millis(500));
        self.reset_at = Some(Instant::now());
        Ok(())
    }

    /// After a reset: if the new kernel is up, check it is the image's
    /// build, re-arm and restart the sampler; if it is another kernel,
    /// refuse (the caller exits, leaving the guest running untrapped).
    fn try_rearm(&mut self) -> Result<(), FlowError> {
        if self.foreign_pause {
            return Ok(());
        }
        let we = self.hold()?;
        match self.session.reattach(self.guest) {
            Ok(()) => {
                let addr = self.arm()?;
                let regs = self.guest.get_regs(VcpuId(0))?;
                self.release(we)?;
                self.rearm_at = None;
                self.events.emit(&Event {
                    event: "rearmed",
                    message: Some(format!(
                        "the kernel is up again after {} ms; trap armed at panic {addr:#x}",
                        self.reset_at.map_or(0, |t| t.elapsed().as_millis())
                    )),
                    slide: Some(format!("{:#x}", self.session.slide)),
                    ..Default::default()
                });
                self.start_sampler_with(&regs);
                self.paused.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e @ FlowError::Kaslr(KaslrError::BannerMismatch { .. })) => {
                self.release(we)?;
                self.events.emit(&Event::simple("refused", format!("another kernel booted after the reset; not watching it: {e}")));
                Err(e)
            }
            Err(FlowError::Kaslr(KaslrError::NothingMapped { .. }))
            | Err(FlowError::Access(AccessError::NotMapped(_) | AccessError::OutOfRam { .. })) => {
                // Firmware, boot loader or decompressor: not up yet.
                self.release(we)?;
                self.rearm_at = Some(Instant::now() + Duration::from_millis(500));
                Ok(())
            }
            Err(e) => {
                self.release(we)?;
                Err(e)
            }
        }
    }

    fn start_sampler(&mut self) -> Result<(), FlowError> {
        if self.cfg.hangs.is_none() {
            return Ok(());
        }
        let regs = self.guest.get_regs(VcpuId(0))?;
        self.start_sampler_with(&regs);
        Ok(())
    }

    fn start_sampler_with(&mut self, regs: &CpuState) {
        let Some(h) = &mut self.cfg.hangs else { return };
        match (h.make)(self.session, regs) {
            Ok(s) => {
                let stop = Arc::new(AtomicBool::new(false));
                let (rx, handle) = hang::spawn_sampler_msgs(s, self.paused.clone(), stop.clone());
                self.sampler = Some(SamplerThread { rx, stop, handle });
            }
            Err(why) => self.events.emit(&Event::simple("error", format!("hang detection is off: {why}"))),
        }
    }

    /// Takes a checkpoint when one is due: the guest is held stopped for
    /// it (never one someone else paused, never while a reset is pending).
    fn poll_checkpoint(&mut self) -> Result<(), FlowError> {
        let now = Instant::now();
        match &self.cfg.rollback {
            Some(r) if r.due(now) && !self.foreign_pause && self.rearm_at.is_none() => {}
            _ => return Ok(()),
        }
        let stopped_at = Instant::now();
        if !self.hold()? {
            return Ok(());
        }
        // A crash that reached the trap as we stopped the guest comes first.
        if !self.trapped_vcpus()?.is_empty() {
            return self.handle_traps(None);
        }
        self.paused.store(true, Ordering::Relaxed);
        let (Some(r), Some(q)) = (&mut self.cfg.rollback, &mut self.cfg.qmp) else {
            return self.release(true);
        };
        let taken = r.store.take(q, stopped_at).map(|c| (c.tag.clone(), c.pause));
        r.scheduled(Instant::now(), taken.is_ok());
        let released = self.release(true);
        self.paused.store(self.foreign_pause, Ordering::Relaxed);
        match taken {
            Ok((tag, pause)) => self.events.emit(&Event {
                event: "checkpoint",
                checkpoint: Some(tag),
                pause_ms: Some(pause.as_secs_f64() * 1e3),
                ..Default::default()
            }),
            Err(e) => self.events.emit(&Event::simple("error", format!("checkpoint not taken: {e}; watching goes on"))),
        }
        released
    }

    /// Rolls the held guest back to its newest checkpoint, then quarantines
    /// the offender there. If QEMU fails to load it, the guest is as QEMU
    /// left it (the trap state, unless the load failed midway) and goes on.
    fn roll_back(&mut self, o: &Outcome, quarantine: Option<i32>) -> Result<(), FlowError> {
        if self.cfg.rollback.is_none() || self.cfg.qmp.is_none() {
            return Ok(());
        }
        self.stop_sampler();
        let (Some(r), Some(q)) = (&mut self.cfg.rollback, &mut self.cfg.qmp) else { return Ok(()) };
        let lost = r.lost();
        let t = Instant::now();
        let loaded = r.store.restore_latest(q);
        let pause_ms = t.elapsed().as_secs_f64() * 1e3;
        // The guest runs a whole interval from here before the next
        // checkpoint: a crash before it is this one's recurrence.
        r.scheduled(Instant::now(), false);
        match loaded {
            Ok(c) => self.events.emit(&Event {
                event: "rolled-back",
                message: Some(format!(
                    "the VM is back at checkpoint {}: {} of guest time lost",
                    c.tag,
                    lost.map_or("?".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
                )),
                reason: Some(o.reason().to_string()),
                checkpoint: Some(c.tag),
                lost_ms: lost.map(|d| d.as_secs_f64() * 1e3),
                pause_ms: Some(pause_ms),
                ..Event::crash(o)
            }),
            Err(e) => {
                self.events.emit(&Event::simple("error", format!("rollback failed: {e}; the guest goes on as QEMU left it")));
                self.start_sampler()?;
                return Ok(());
            }
        }
        if let Some(pid) = quarantine.map(|p| crate::quarantine::process_of(o, p)) {
            match crate::quarantine::quarantine(self.guest, self.session, pid) {
                Ok(qd) => self.events.emit(&Event {
                    event: "quarantined",
                    message: Some(if qd.already_exiting {
                        format!("pid {} ({}) was already exiting at the checkpoint", qd.pid, qd.comm)
                    } else {
                        format!(
                            "SIGKILL pending for pid {} ({}), found in state {}: it dies on its next return to user mode",
                            qd.pid, qd.comm, qd.state
                        )
                    }),
                    pid: Some(qd.pid),
                    comm: Some(qd.comm),
                    status: Some(qd.state.to_string()),
                    ..Default::default()
                }),
                Err(e) => self.events.emit(&Event {
                    pid: Some(pid),
                    ..Event::simple("error", format!("not quarantined: {e}; the rollback stands"))
                }),
            }
        } else if o.out.reason_code == repair_kernel::verdict::Reason::DeclineSlabCorrupt as u32 {
            // checkpoint::spare_heap_victim: the corrupt heap's victim.
            self.events.emit(&Event {
                pid: Some(o.out.pid),
                comm: Some(o.comm().to_string()),
                ..Event::simple(
                    "not-quarantined",
                    format!("pid {} ({}) faulted in the slab allocator on a heap someone else corrupted: it is not the cause and is not killed", o.out.pid, o.comm()),
                )
            });
        }
        self.start_sampler()
    }

    fn stop_sampler(&mut self) {
        if let Some(s) = self.sampler.take() {
            s.stop.store(true, Ordering::Relaxed);
            let _ = s.handle.join();
        }
    }

    /// Reports what the sampler found; acts only on a certain hang (the
    /// sampler's policy decides what is certain: see `hang::HangPolicy`).
    fn poll_hangs(&mut self) -> Result<(), FlowError> {
        let msgs: Vec<SamplerMsg> = match &self.sampler {
            Some(s) => s.rx.try_iter().collect(),
            None => return Ok(()),
        };
        for m in msgs {
            let h = match m {
                SamplerMsg::Hang(h) => h,
                SamplerMsg::Error(e) => {
                    self.events.emit(&Event::simple("error", format!("hang sampler: {e}; it was reset and goes on")));
                    continue;
                }
            };
            if self.foreign_pause || self.rearm_at.is_some() {
                continue;
            }
            self.events.emit(&Event::hang(&h));
            if !h.certain || !self.cfg.hangs.as_ref().is_some_and(|w| w.act) {
                continue;
            }
            self.cfg.record.set_held(true);
            let acted = act_on_hang(self.guest, self.session, self.events, &h, &self.paused);
            self.cfg.record.set_held(false);
            if acted? {
                self.repairs += 1;
            }
        }
        Ok(())
    }
}

/// The crashed vCPU's backtrace and the log tail, read (without changing
/// anything) while the guest is held at the trap.
fn crash_context<G: GuestAccess + ?Sized>(
    guest: &mut G,
    session: &Session,
    vcpu: VcpuId,
) -> Option<(Vec<String>, Vec<String>)> {
    match crate::report::diagnose(guest, session, vcpu, None, 20) {
        Ok(r) => Some((r.backtrace.into_iter().map(|f| f.text).collect(), r.log_tail)),
        Err(e) => {
            tracing::warn!("reading the crash's backtrace and log: {e}");
            None
        }
    }
}
/// Why a hang is not for a repair whatever its certainty (a blocked task,
/// a kernel thread), or None: a user task spinning in the kernel.
pub fn hang_declined_reason(h: &Hang) -> Option<String> {
    match h.kind {
        HangKind::BlockedTask => Some(format!(
            "pid {} ({}) sleeps in TASK_UNINTERRUPTIBLE, not running: SIGKILL cannot wake it and forcing it \
             into do_exit from outside would abandon whatever it waits on",
            h.pid, h.comm
        )),
        HangKind::StuckCpu { .. } if h.kthread => Some(format!("the spinning task {} (pid {}) is a kernel thread", h.comm, h.pid)),
        HangKind::StuckCpu { .. } => None,
    }
}

/// Acts on one hang the sampler reported: a kernel-mode spin of a user
/// task is repaired as a crash at that instruction would be (the repair
/// kernel's usual verdict); anything else is declined with the reason.
/// Returns true when a repair was applied.
fn act_on_hang<G: GuestAccess + ?Sized>(
    guest: &mut G,
    session: &mut Session,
    events: &mut EventSink,
    h: &Hang,
    paused: &AtomicBool,
) -> Result<bool, FlowError> {
    if let Some(why) = hang_declined_reason(h) {
        events.emit(&Event::hang_declined(h, why));
        return Ok(false);
    }
    let HangKind::StuckCpu { cpu, .. } = h.kind else { return Ok(false) };
    paused.store(true, Ordering::Relaxed);
    let r = hang::repair_hang(guest, session, cpu);
    paused.store(false, Ordering::Relaxed);
    match r? {
        HangRepair::Repaired(o, resume_ms) => {
            events.emit(&Event::verdict(&o, resume_ms));
            Ok(true)
        }
        HangRepair::Declined(o, resume_ms) => {
            events.emit(&Event::verdict(&o, resume_ms));
            Ok(false)
        }
        HangRepair::Skipped(why) => {
            events.emit(&Event::hang_declined(h, why));
            Ok(false)
        }
    }
}

