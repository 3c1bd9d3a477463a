//! `repair-guest watch`: stay attached, repair each crash, report each event
//! as one JSON line.

use crate::access::{GuestAccess, StopEvent, StopReason};
use crate::flow::{FlowError, Mode, Outcome, Session, Timings};
use crate::hang::{self, Hang, HangKind, HangRepair, Sampler};
use crate::memory::RamFile;
use repair_kernel::contract::Action;
use repair_kernel::verdict::{CrashKind, Reason};
use serde::Serialize;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One line of the event stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Event {
    /// `attached`, `crash`, `hang`, `repaired`, `declined`, `error`,
    /// `detached`.
    pub event: &'static str,
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
}

/// Name of a crash kind code, for events and reports.
pub fn crash_kind_name(code: u32) -> String {
    match CrashKind::from_u32(code) {
        Some(k) => format!("{k}"),
        None => format!("unknown ({code})"),
    }
}

/// Name of a reason code.
pub fn reason_name(code: u32) -> String {
    match Reason::from_u32(code) {
        Some(r) => format!("{r}"),
        None => format!("unknown ({code})"),
    }
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
            action: Some(match o.action() {
                Action::Kill => "kill".into(),
                Action::Decline => "decline".into(),
                Action::None => "none".into(),
            }),
            reason: Some(o.reason().to_string()),
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
        Event {
            event: "hang",
            kind: Some(kind),
            message: Some(format!(
                "no progress for {} ms",
                h.detected.saturating_duration_since(h.since).as_millis()
            )),
            cpu,
            pid: Some(h.pid),
            comm: Some(h.comm.clone()),
            ..Default::default()
        }
    }

    /// A hang not acted on, with the reason.
    fn hang_declined(h: &Hang, reason: String) -> Self {
        Event { event: "declined", action: Some("decline".into()), reason: Some(reason), ..Event::hang(h) }
    }
}

/// Hang detection for [`watch`]: a sampler over guest RAM (no stop).
#[derive(Debug)]
pub struct HangWatch {
    pub sampler: Sampler<RamFile>,
}

/// Where events go.
#[derive(Debug)]
pub struct EventSink {
    out: Box<dyn WriteDebug>,
}

trait WriteDebug: Write + std::fmt::Debug + Send {}
impl<T: Write + std::fmt::Debug + Send> WriteDebug for T {}

impl EventSink {
    pub fn stdout() -> Self {
        Self { out: Box::new(std::io::stdout()) }
    }
    pub fn file(f: std::fs::File) -> Self {
        Self { out: Box::new(f) }
    }
    pub fn emit(&mut self, e: &Event) {
        if let Ok(line) = serde_json::to_string(e) {
            let _ = writeln!(self.out, "{line}");
            let _ = self.out.flush();
        }
    }
}

/// How the watch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchEnd {
    /// Asked to stop (SIGINT, or the stop flag).
    Stopped,
    /// `--max-repairs` reached.
    MaxRepairs,
    /// The guest went away.
    GuestGone,
}

/// Watches a running, armed guest: on each stop at `panic`, runs the repair
/// kernel and applies its verdict; every other stop (a user's own
/// breakpoint, an interrupt) is resumed. Returns when `stop` is set, when
/// `max_repairs` repairs were made, or when the guest goes away.
pub fn watch<G: GuestAccess + ?Sized>(
    guest: &mut G,
    session: &mut Session,
    events: &mut EventSink,
    max_repairs: Option<u32>,
    stop: Arc<AtomicBool>,
    hangs: Option<HangWatch>,
) -> Result<WatchEnd, FlowError> {
    let paused = Arc::new(AtomicBool::new(false));
    let sampler_stop = Arc::new(AtomicBool::new(false));
    let sampler = hangs.map(|h| hang::spawn_sampler(h.sampler, paused.clone(), sampler_stop.clone()));
    let end = watch_loop(guest, session, events, max_repairs, &stop, sampler.as_ref().map(|s| &s.0), &paused);
    sampler_stop.store(true, Ordering::Relaxed);
    if let Some((_, handle)) = sampler {
        let _ = handle.join();
    }
    end
}

fn watch_loop<G: GuestAccess + ?Sized>(
    guest: &mut G,
    session: &mut Session,
    events: &mut EventSink,
    max_repairs: Option<u32>,
    stop: &AtomicBool,
    hangs: Option<&std::sync::mpsc::Receiver<Hang>>,
    paused: &AtomicBool,
) -> Result<WatchEnd, FlowError> {
    session.arm(guest)?;
    let panic_addr = session.panic_addr()?;
    events.emit(&Event {
        event: "attached",
        message: Some(format!(
            "{} (KASLR slide {:#x}); trap armed at panic {:#x}",
            session.image.kernel.release, session.slide, panic_addr
        )),
        ..Default::default()
    });
    if !guest.is_running() {
        guest.resume()?;
    }
    let mut repairs = 0u32;
    loop {
        if stop.load(Ordering::Relaxed) {
            if guest.is_running() {
                guest.pause()?;
            }
            session.disarm(guest)?;
            guest.resume()?;
            events.emit(&Event::simple("detached", "stopped on request; the guest runs on"));
            return Ok(WatchEnd::Stopped);
        }
        if let Some(rx) = hangs {
            while let Ok(h) = rx.try_recv() {
                if act_on_hang(guest, session, events, &h, paused)? {
                    repairs += 1;
                }
            }
        }
        // Short waits while the sampler may report hangs.
        let wait = if hangs.is_some() { 20 } else { 200 };
        let ev = match guest.wait_stop(Some(Duration::from_millis(wait))) {
            Ok(None) => continue,
            Ok(Some(ev)) => ev,
            Err(crate::access::AccessError::GuestGone(why)) => {
                events.emit(&Event::simple("detached", format!("the guest went away: {why}")));
                return Ok(WatchEnd::GuestGone);
            }
            Err(e) => return Err(e.into()),
        };
        if !is_trap_at(&ev, panic_addr) {
            guest.resume()?;
            continue;
        }
        paused.store(true, Ordering::Relaxed);
        let repaired = session.repair(guest, ev.vcpu, Mode::Repair);
        paused.store(false, Ordering::Relaxed);
        match repaired {
            Ok(outcome) => {
                events.emit(&Event::crash(&outcome));
                let t = std::time::Instant::now();
                guest.resume()?;
                let resume_ms = t.elapsed().as_secs_f64() * 1e3;
                events.emit(&Event::verdict(&outcome, resume_ms));
                if outcome.applied {
                    repairs += 1;
                }
            }
            Err(FlowError::Access(crate::access::AccessError::GuestGone(why))) => {
                events.emit(&Event::simple("detached", format!("the guest went away: {why}")));
                return Ok(WatchEnd::GuestGone);
            }
            Err(e) => {
                // The flow restored the guest as it was at the trap: let the
                // panic take its course, as it would have without us.
                events.emit(&Event { event: "error", cpu: Some(ev.vcpu.0), ..Event::simple("error", e.to_string()) });
                guest.resume()?;
            }
        }
        if max_repairs.is_some_and(|m| repairs >= m) {
            guest.pause()?;
            session.disarm(guest)?;
            guest.resume()?;
            events.emit(&Event::simple("detached", format!("{repairs} repairs made (--max-repairs)")));
            return Ok(WatchEnd::MaxRepairs);
        }
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
    events.emit(&Event::hang(h));
    let cpu = match h.kind {
        HangKind::BlockedTask => {
            events.emit(&Event::hang_declined(
                h,
                format!(
                    "pid {} ({}) sleeps in TASK_UNINTERRUPTIBLE, not running: SIGKILL cannot wake it and forcing it \
                     into do_exit from outside would abandon whatever it waits on",
                    h.pid, h.comm
                ),
            ));
            return Ok(false);
        }
        HangKind::StuckCpu { .. } if h.kthread => {
            events.emit(&Event::hang_declined(h, format!("the spinning task {} (pid {}) is a kernel thread", h.comm, h.pid)));
            return Ok(false);
        }
        HangKind::StuckCpu { cpu, .. } => cpu,
    };
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

fn is_trap_at(ev: &StopEvent, addr: u64) -> bool {
    ev.reason == StopReason::Trap && ev.rip.0 == addr
}
