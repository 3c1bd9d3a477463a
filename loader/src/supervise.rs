//! The watcher's supervisor: a small parent that outlives its worker.
//!
//! QEMU's gdbstub keeps a client's breakpoints, and the VM's run state,
//! when the client goes (7.2 and 10.0: the chardev's close event does
//! nothing; see `loader/DESIGN.md`). A watcher killed with SIGKILL would
//! leave its trap at `panic` armed with nobody listening: the guest's next
//! panic would freeze it in `debug`, where without us it would have
//! completed. So `repair-guest watch` runs the watch in a worker process
//! and stays its parent:
//! - the worker records its trap (and whether it holds the guest stopped)
//!   in a small file as it changes ([`TrapRecord`]);
//! - a worker that dies (a signal, a panic, an internal error) is started
//!   again (a microreboot of the watcher, within a second); the new one
//!   finds a crash that waits at the old trap and repairs it;
//! - when it may not be restarted (`--restarts 0`, or too many deaths in a
//!   minute), the supervisor removes the trap and resumes the guest if the
//!   stop was ours ([`rescue`]);
//! - the worker gets SIGTERM if the supervisor dies (`PR_SET_PDEATHSIG`),
//!   and then detaches cleanly.
//!
//! Without `--gdb`, the worker opens QEMU's gdbstub through QMP on a private
//! socket ([`crate::attach::QmpGdbstub`]) and closes it when it leaves; a
//! restarted worker takes over the one its predecessor left open. When the
//! supervisor gives up, or its last worker is gone and left it open, the
//! supervisor removes the trap through it and closes it
//! ([`rescue_via_qmp`]). If both are killed at once (SIGKILL), the next
//! watcher run with `--qmp` alone takes it over, and closes it when it goes.

use crate::access::{AccessError, Endpoint, Gva};
use crate::gdb::GdbGuest;
use crate::qmp::Qmp;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The environment variable that names the worker's [`TrapRecord`] file.
pub const TRAP_FILE_ENV: &str = "REPAIR_GUEST_TRAP_FILE";

/// The repair journal of a supervised worker (see [`crate::journal`]):
/// beside its trap record. `None` outside a supervisor.
pub fn journal_path() -> Option<PathBuf> {
    std::env::var_os(TRAP_FILE_ENV).map(|p| PathBuf::from(p).with_file_name("journal"))
}

/// What a worker leaves for its supervisor: the trap's address, and whether
/// the guest is held stopped by us right now. One line, `TRAP HELD`, both in
/// hex / 0-1, rewritten whole on each change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrapRecord {
    pub trap: Option<Gva>,
    pub held: bool,
}

impl TrapRecord {
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let line = format!("{:#x} {}\n", self.trap.map_or(0, |a| a.0), u8::from(self.held));
        // Written in place: a torn read is a short line, read as "no trap";
        // the supervisor only reads it once the writer is dead.
        std::fs::write(path, line)
    }

    pub fn read(path: &Path) -> TrapRecord {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut words = text.split_whitespace();
        let trap = words
            .next()
            .and_then(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
            .filter(|&a| a != 0)
            .map(Gva);
        let held = words.next() == Some("1");
        TrapRecord { trap, held }
    }
}

/// How the supervisor runs its worker.
#[derive(Debug)]
pub struct Supervisor {
    /// The worker's command line (`repair-guest watch ... --supervised`).
    pub worker: Command,
    /// Deaths tolerated within a minute before giving up; 0: never restart.
    pub restarts: u32,
    /// The gdbstub; `None`: the worker opens one through QMP (`qmp` is then
    /// required), and the supervisor closes it when the watch ends.
    pub gdb: Option<Endpoint>,
    pub qmp: Option<Endpoint>,
    /// The worker's trap record.
    pub trap_file: PathBuf,
}

/// What happened to the supervised watch, for the caller's events.
#[derive(Debug)]
pub enum SupervisorNote {
    /// The worker died and was started again.
    Restarted { pid: u32, how: String },
    /// The worker died for good; the guest was left as [`rescue`] says.
    GaveUp { pid: u32, how: String, rescue: Result<String, AccessError> },
    /// The last worker ended and left the gdbstub it opened through QMP
    /// open; the supervisor cleaned up as [`rescue_via_qmp`] says.
    ClosedGdbstub { pid: u32, what: Result<String, AccessError> },
}

/// Exit codes a worker ends with that mean "done, do not restart": success,
/// bad input, a refused image, the guest gone (see `repair-guest --help`).
fn final_code(code: i32) -> bool {
    matches!(code, 0 | 2 | 3 | 4)
}

fn describe(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => st.to_string(),
    }
}

impl Supervisor {
    /// Runs the worker until it ends for good; returns the exit code to end
    /// with. `stop` (set by a signal) is passed on to the worker as SIGTERM.
    pub fn run(&mut self, stop: &AtomicBool, mut note: impl FnMut(SupervisorNote)) -> std::io::Result<i32> {
        let mut deaths: Vec<Instant> = Vec::new();
        self.worker.env(TRAP_FILE_ENV, &self.trap_file);
        // SAFETY: the closure only calls prctl, async-signal-safe, between
        // fork and exec.
        unsafe {
            self.worker.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        loop {
            let _ = std::fs::remove_file(&self.trap_file);
            let mut child = self.worker.spawn()?;
            let pid = child.id();
            let mut forwarded = false;
            let status = loop {
                if let Some(st) = child.try_wait()? {
                    break st;
                }
                if stop.load(Ordering::Relaxed) && !forwarded {
                    // SAFETY: kill has no memory-safety preconditions; pid
                    // is our child, not yet reaped.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                    forwarded = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let code = status.code();
            if let Some(c) = code.filter(|&c| final_code(c)) {
                if let (None, Some(q)) = (&self.gdb, &self.qmp) {
                    if let Some(what) = close_left_gdbstub(q, &self.trap_file) {
                        note(SupervisorNote::ClosedGdbstub { pid, what });
                    }
                }
                return Ok(c);
            }
            let how = describe(status);
            let now = Instant::now();
            deaths.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
            deaths.push(now);
            if !stop.load(Ordering::Relaxed) && deaths.len() as u32 <= self.restarts {
                note(SupervisorNote::Restarted { pid, how });
                continue;
            }
            let record = TrapRecord::read(&self.trap_file);
            let journal = self.trap_file.with_file_name("journal");
            let rescue = match (&self.gdb, &self.qmp) {
                (Some(gdb), qmp) => rescue(gdb, qmp.as_ref(), record, Some(&journal)),
                (None, Some(qmp)) => rescue_via_qmp(qmp, record, Some(&journal)),
                (None, None) => Err(AccessError::Other("neither a gdbstub nor QMP to reach the guest".into())),
            };
            note(SupervisorNote::GaveUp { pid, how, rescue });
            return Ok(code.unwrap_or(5).max(1));
        }
    }
}

/// Cleans up after a watcher that died: removes its trap (QEMU kept it) and
/// resumes the guest when the stop is ours (the worker held it, or it sits in
/// `debug` at our trap, or it was running before our connection stopped it);
/// a guest paused by someone else stays paused. Returns what was done.
/// `journal`: where the worker journalled its repairs (see
/// [`crate::journal`]); a repair it left half done is undone first.
pub fn rescue(gdb: &Endpoint, qmp: Option<&Endpoint>, record: TrapRecord, journal: Option<&Path>) -> Result<String, AccessError> {
    let before = match qmp {
        Some(ep) => Some(Qmp::connect(ep)?.query_status()?),
        None => None,
    };
    // Connecting clears every vCPU's breakpoints (QEMU keeps a client's
    // when it goes), the dead watcher's trap included: see
    // `GdbGuest::connect`.
    let mut g = GdbGuest::connect(gdb.clone())?;
    // A worker killed mid-repair: put the guest back as it was at the trap
    // first, so that resuming it lets its panic proceed as without us.
    if let Some(Ok(Some(j))) = journal.map(crate::journal::Journal::read) {
        j.undo(&mut g).map_err(|e| AccessError::Other(e.to_string()))?;
        journal.map(crate::journal::clear);
    }
    let resume = record.held || matches!(before.as_deref(), None | Some("running") | Some("debug"));
    g.resume_on_drop = resume;
    g.leave(resume)?;
    let trap = record.trap.map_or("no trap was recorded".to_string(), |a| format!("trap at {a:#x} removed"));
    Ok(match (resume, before) {
        (true, _) => format!("{trap}; the guest runs on"),
        (false, Some(s)) => format!("{trap}; the guest stays {s}, as someone else left it"),
        (false, None) => format!("{trap}; the guest stays stopped"),
    })
}

/// [`rescue`] for a watch without `--gdb`: through the gdbstub QEMU has
/// open (found with QMP); one a watcher opened is then closed (`gdbserver
/// none`), the user's is left open. `journal` as for [`rescue`]. Returns what was done.
pub fn rescue_via_qmp(qmp: &Endpoint, record: TrapRecord, journal: Option<&Path>) -> Result<String, AccessError> {
    let found = crate::attach::current_gdbstub(&mut Qmp::connect(qmp)?)?;
    let Some(f) = found else {
        return Ok("QEMU has no gdbstub open: no trap can be left".into());
    };
    // The QMP connection above is closed: `rescue` makes its own.
    let what = rescue(&f.endpoint, Some(qmp), record, journal)?;
    if !f.by_watcher {
        return Ok(what);
    }
    crate::attach::close_watcher_gdbstub(&mut Qmp::connect(qmp)?)?;
    Ok(format!("{what}; the gdbstub the watcher opened ({}) is closed", f.endpoint))
}

/// After the last worker ended by itself: if it left the gdbstub it opened
/// through QMP open (it closes it when it leaves cleanly), remove any trap
/// and close it. `None` when there was nothing to do (or QEMU is gone).
fn close_left_gdbstub(qmp: &Endpoint, trap_file: &Path) -> Option<Result<String, AccessError>> {
    let mut q = Qmp::connect(qmp).ok()?;
    let found = crate::attach::current_gdbstub(&mut q).ok()??;
    if !found.by_watcher {
        return None;
    }
    drop(q);
    let record = TrapRecord::read(trap_file);
    Some(rescue_via_qmp(qmp, record, Some(&trap_file.with_file_name("journal"))))
}

/// The worker's side: keeps the [`TrapRecord`] file (named by
/// [`TRAP_FILE_ENV`]) up to date. A no-op outside a supervisor.
#[derive(Debug, Clone, Default)]
pub struct TrapRecorder {
    path: Option<PathBuf>,
    record: TrapRecord,
}

impl TrapRecorder {
    pub fn from_env() -> Self {
        Self { path: std::env::var_os(TRAP_FILE_ENV).map(PathBuf::from), record: TrapRecord::default() }
    }
    pub fn set_trap(&mut self, trap: Option<Gva>) {
        self.record.trap = trap;
        self.flush();
    }
    pub fn set_held(&mut self, held: bool) {
        if self.record.held != held {
            self.record.held = held;
            self.flush();
        }
    }
    fn flush(&self) {
        if let Some(p) = &self.path {
            if let Err(e) = self.record.write(p) {
                tracing::warn!("writing the trap record {}: {e}", p.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trap_record_round_trips_and_tolerates_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("trap");
        assert_eq!(TrapRecord::read(&p), TrapRecord::default());
        let r = TrapRecord { trap: Some(Gva(0xffff_ffff_8100_0000)), held: true };
        r.write(&p).unwrap();
        assert_eq!(TrapRecord::read(&p), r);
        std::fs::write(&p, "0xffff").unwrap();
        assert_eq!(TrapRecord::read(&p), TrapRecord { trap: Some(Gva(0xffff)), held: false });
        std::fs::write(&p, "zz 1").unwrap();
        assert_eq!(TrapRecord::read(&p), TrapRecord { trap: None, held: true });
    }
}
