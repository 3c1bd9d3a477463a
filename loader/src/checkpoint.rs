//! Checkpoints of the whole VM, and rollback to them when a crash is
//! declined (`watch --checkpoint-every`).
//!
//! The engine is QEMU's own internal snapshot (`snapshot-save` /
//! `snapshot-load` jobs, QEMU 6.0+): RAM, every vCPU, every device, and
//! the guest's qcow2 disks at the same instant, stored in a qcow2 file the
//! watcher adds to the running QEMU (`blockdev-create`, `blockdev-add`; no
//! device sees it). Of QEMU's engines it is the one that loads back **into
//! the running QEMU**: its gdbstub, QMP, chardevs (a console, a serial
//! line) and our trap stay as they are. A migration stream (`mapped-ram`,
//! `background-snapshot`, `x-ignore-shared`) loads only into a new QEMU
//! started with `-incoming`, so each rollback would be a QEMU restart.
//!
//! Disks: a writable disk that is not qcow2 cannot be snapshotted with the
//! RAM; a rollback would leave the guest's RAM and its disk at different
//! points in time, so checkpoints are refused ([`CheckpointError::Disk`]).
//!
//! The guest is held stopped by the caller (the watcher) during a save and
//! a load: QEMU then leaves its run state alone (`save_snapshot` and
//! `load_snapshot` only restart a VM they found running).

use crate::access::AccessError;
use crate::flow::Outcome;
use crate::qmp::Qmp;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The qcow2 node that holds the checkpoints, in QEMU.
pub const NODE: &str = "crash-repair-ckpt";
const FILE_NODE: &str = "crash-repair-ckpt-file";
/// Checkpoints kept: the newest and the one before (a crash during a save
/// rolls back to the one before).
const KEEP: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "the guest's disk {device} ({driver}, writable) cannot be snapshotted with its RAM: a rollback would \
         leave RAM and disk at different points in time. Give the guest qcow2 disks, make this one read-only, \
         or watch without --checkpoint-every"
    )]
    Disk { device: String, driver: String },
    #[error("checkpoints need QMP (--qmp): QEMU's snapshot jobs run there")]
    NoQmp,
    #[error("QEMU's {job} job {id} failed: {error}")]
    Job { job: &'static str, id: String, error: String },
    #[error("QEMU's {job} job {id} did not finish within {after:?}")]
    JobTimeout { job: &'static str, id: String, after: Duration },
    #[error("no checkpoint to roll back to")]
    NoCheckpoint,
    #[error(transparent)]
    Qmp(#[from] AccessError),
}

/// One checkpoint in the store.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub tag: String,
    /// When the guest was resumed after it: guest time from here on is
    /// what a rollback to it loses.
    pub resumed_at: Instant,
    /// How long the guest was held stopped for it.
    pub pause: Duration,
}

/// The checkpoints of one guest, in a qcow2 file attached to its QEMU.
#[derive(Debug)]
pub struct Checkpoints {
    pub file: PathBuf,
    /// The guest's own qcow2 disks, snapshotted with every checkpoint.
    disks: Vec<String>,
    taken: Vec<Checkpoint>,
    seq: u64,
    job_timeout: Duration,
}

impl Checkpoints {
    /// Checks the guest's disks, then creates `file` (replacing one left
    /// by an earlier watcher) as a qcow2 node of the guest's QEMU.
    pub fn open(qmp: &mut Qmp, file: &Path) -> Result<Self, CheckpointError> {
        let disks = snapshot_disks(&qmp.execute("query-block", None)?)?;
        let c = Checkpoints { file: file.to_path_buf(), disks, taken: Vec::new(), seq: 0, job_timeout: Duration::from_secs(600) };
        c.detach_nodes(qmp);
        let _ = std::fs::remove_file(file);
        let name = file.display().to_string();
        c.job(qmp, "blockdev-create", "create-file", json!({"options": {"driver": "file", "filename": name, "size": 0}}))?;
        qmp.execute("blockdev-add", Some(json!({"driver": "file", "node-name": FILE_NODE, "filename": name})))?;
        c.job(qmp, "blockdev-create", "create-qcow2", json!({"options": {"driver": "qcow2", "file": FILE_NODE, "size": 1 << 20}}))?;
        qmp.execute("blockdev-add", Some(json!({"driver": "qcow2", "node-name": NODE, "file": FILE_NODE})))?;
        Ok(c)
    }

    /// Removes our nodes from QEMU, if there (a watcher's restart finds
    /// those of the one before).
    fn detach_nodes(&self, qmp: &mut Qmp) {
        let _ = qmp.execute("blockdev-del", Some(json!({"node-name": NODE})));
        let _ = qmp.execute("blockdev-del", Some(json!({"node-name": FILE_NODE})));
    }

    /// Detaches the store from QEMU and deletes its file.
    pub fn close(self, qmp: &mut Qmp) {
        self.detach_nodes(qmp);
        let _ = std::fs::remove_file(&self.file);
    }

    fn devices(&self) -> Vec<String> {
        let mut d = vec![NODE.to_string()];
        d.extend(self.disks.iter().cloned());
        d
    }

    /// Saves a checkpoint of the stopped guest; drops the oldest beyond
    /// [`KEEP`]. `stopped_at` is when the caller stopped the guest.
    pub fn take(&mut self, qmp: &mut Qmp, stopped_at: Instant) -> Result<&Checkpoint, CheckpointError> {
        self.seq += 1;
        let tag = format!("ckpt-{}", self.seq);
        self.job(qmp, "snapshot-save", &format!("save-{}", self.seq), json!({"tag": tag, "vmstate": NODE, "devices": self.devices()}))?;
        while self.taken.len() >= KEEP {
            let old = self.taken.remove(0);
            if let Err(e) = self.job(qmp, "snapshot-delete", &format!("delete-{}", self.seq), json!({"tag": old.tag, "devices": self.devices()})) {
                tracing::warn!("deleting the old checkpoint {}: {e}", old.tag);
            }
        }
        let now = Instant::now();
        self.taken.push(Checkpoint { tag, resumed_at: now, pause: now - stopped_at });
        Ok(self.taken.last().expect("pushed"))
    }

    /// The newest checkpoint.
    pub fn latest(&self) -> Option<&Checkpoint> {
        self.taken.last()
    }

    /// Loads the newest checkpoint into the stopped guest; returns it.
    pub fn restore_latest(&mut self, qmp: &mut Qmp) -> Result<Checkpoint, CheckpointError> {
        let c = self.latest().cloned().ok_or(CheckpointError::NoCheckpoint)?;
        self.job(qmp, "snapshot-load", &format!("load-{}", self.seq), json!({"tag": c.tag, "vmstate": NODE, "devices": self.devices()}))?;
        Ok(c)
    }

    /// Runs a QMP job to its end and dismisses it. A snapshot job holds
    /// QEMU's main loop for the whole save or load (seconds for gigabytes on
    /// a loaded host): the monitor's replies wait as long.
    fn job(&self, qmp: &mut Qmp, job: &'static str, id: &str, args: Value) -> Result<(), CheckpointError> {
        let saved = qmp.timeout;
        qmp.timeout = qmp.timeout.max(self.job_timeout);
        let r = self.job_inner(qmp, job, id, args);
        qmp.timeout = saved;
        r
    }

    fn job_inner(&self, qmp: &mut Qmp, job: &'static str, id: &str, mut args: Value) -> Result<(), CheckpointError> {
        let id = format!("crash-repair-{id}");
        args["job-id"] = json!(id);
        qmp.execute(job, Some(args))?;
        let start = Instant::now();
        loop {
            let jobs = qmp.execute("query-jobs", None)?;
            let me = jobs.as_array().and_then(|a| a.iter().find(|j| j["id"] == json!(id))).cloned();
            match me {
                Some(j) if j["status"] == "concluded" => {
                    let _ = qmp.execute("job-dismiss", Some(json!({"id": id})));
                    return match j.get("error").and_then(|e| e.as_str()) {
                        Some(e) => Err(CheckpointError::Job { job, id, error: e.to_string() }),
                        None => Ok(()),
                    };
                }
                // Gone without concluding (auto-dismissed): done.
                None => return Ok(()),
                Some(_) => {}
            }
            if start.elapsed() > self.job_timeout {
                return Err(CheckpointError::JobTimeout { job, id, after: self.job_timeout });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The guest's disks to snapshot with its RAM, from QMP `query-block`:
/// every writable medium must be qcow2 (its node name is returned); a
/// writable medium of another format is refused.
pub fn snapshot_disks(query_block: &Value) -> Result<Vec<String>, CheckpointError> {
    let mut nodes = Vec::new();
    for dev in query_block.as_array().into_iter().flatten() {
        let Some(ins) = dev.get("inserted") else { continue };
        if ins["ro"].as_bool() == Some(true) {
            continue;
        }
        let driver = ins["drv"].as_str().unwrap_or("?").to_string();
        let device = dev["qdev"].as_str().or(dev["device"].as_str()).unwrap_or("?").to_string();
        if driver != "qcow2" {
            return Err(CheckpointError::Disk { device, driver });
        }
        match ins["node-name"].as_str() {
            Some(n) => nodes.push(n.to_string()),
            None => return Err(CheckpointError::Disk { device, driver: "qcow2 without a node name".into() }),
        }
    }
    Ok(nodes)
}

/// Which comes first for a crash: killing the offender in place (the
/// repair kernel's verdict) or rolling the VM back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Prefer {
    /// Kill first (the default): a kill loses one process and no guest
    /// time; a rollback loses up to an interval of every process's work and
    /// what the world outside already saw of it. Rollback (with quarantine
    /// of the offender) only for a crash the repair kernel declines.
    #[default]
    Kill,
    /// Roll back first, without killing: for faults that do not recur (a
    /// flipped bit in a kernel structure), where the process that crashed
    /// is innocent. A crash that recurs after it is then killed, or rolled
    /// back again with its offender quarantined.
    Rollback,
}

/// One rung of the ladder a crash climbs each time it recurs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The repair kernel's verdict (a kill, or its decline).
    Kill,
    /// Roll back, kill nothing.
    Rollback,
    /// Roll back, then quarantine the offender.
    RollbackQuarantine,
    /// Let the panic complete, as without us.
    Decline,
}

impl Prefer {
    pub fn ladder(self) -> &'static [Step] {
        match self {
            Prefer::Kill => &[Step::Kill, Step::RollbackQuarantine, Step::Decline],
            Prefer::Rollback => &[Step::Rollback, Step::Kill, Step::RollbackQuarantine, Step::Decline],
        }
    }
}

/// What to do with a crash, once the repair kernel has looked at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Keep the repair kernel's verdict (applied kill, or decline).
    Verdict,
    /// Run the repair kernel again, applying its verdict (a kill).
    Kill,
    /// Roll back; quarantine this pid after.
    Rollback { quarantine: Option<i32> },
    /// The crash came back after a rollback: declined for good.
    DeclineForGood(String),
}

/// What identifies a crash coming back: the offender and the panic's
/// message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Signature {
    pub pid: i32,
    pub message: String,
}

impl Signature {
    pub fn of(o: &Outcome) -> Self {
        Signature { pid: o.out.pid, message: o.message().to_string() }
    }
}

/// The watcher's checkpoint schedule, its store, and its rollback policy.
#[derive(Debug)]
pub struct Rollback {
    pub store: Checkpoints,
    pub every: Duration,
    pub policy: Policy,
    next_at: Instant,
}

impl Rollback {
    pub fn new(store: Checkpoints, every: Duration, prefer: Prefer) -> Self {
        Rollback { store, every, policy: Policy::new(prefer), next_at: Instant::now() }
    }

    /// A checkpoint is due.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_at
    }

    /// After a checkpoint attempt (taken or failed): the next one.
    pub fn scheduled(&mut self, now: Instant, taken: bool) {
        self.next_at = now + self.every;
        if taken {
            self.policy.checkpoint_taken();
        }
    }

    /// Decides on a crash the repair kernel has looked at (`o`).
    pub fn decide(&mut self, o: &Outcome) -> Decision {
        // A kill, or a warning resumed (with its task's SIGKILL pending): the
        // repair kernel's own remedy, the ladder's first rung.
        let killable = o.action().resumes();
        self.policy.decide(Signature::of(o), killable, o.applied, self.store.latest().is_some())
    }

    /// Guest time a rollback to the newest checkpoint loses now.
    pub fn lost(&self) -> Option<Duration> {
        self.store.latest().map(|c| c.resumed_at.elapsed())
    }
}

/// Which remedy each crash gets, climbing [`Prefer::ladder`] each time it
/// comes back.
#[derive(Debug)]
pub struct Policy {
    pub prefer: Prefer,
    /// The next rung of each crash seen.
    rungs: Vec<(Signature, usize)>,
    /// The crash of the last rollback, until a checkpoint is taken after
    /// it: any crash before then is taken for its recurrence, whatever its
    /// pid (an interrupt handler's bug hits whichever task runs).
    window: Option<Signature>,
}

impl Policy {
    pub fn new(prefer: Prefer) -> Self {
        Policy { prefer, rungs: Vec::new(), window: None }
    }

    /// A checkpoint was taken: the guest ran on from the last rollback.
    pub fn checkpoint_taken(&mut self) {
        self.window = None;
    }

    /// Whether the repair kernel should apply its verdict at once (false:
    /// run it read-only first, a rollback may come before a kill).
    pub fn kill_at_once(&self) -> bool {
        self.prefer == Prefer::Kill
    }

    fn rung_mut(&mut self, sig: &Signature) -> Option<&mut usize> {
        self.rungs.iter_mut().find(|(s, _)| s == sig).map(|(_, r)| r)
    }

    fn set_rung(&mut self, key: Signature, rung: usize) {
        match self.rung_mut(&key) {
            Some(r) => *r = rung,
            None => {
                // Bounded: a guest crashing with ever new signatures keeps
                // only the newest.
                if self.rungs.len() >= 64 {
                    self.rungs.remove(0);
                }
                self.rungs.push((key, rung));
            }
        }
    }

    /// Decides on a crash: `killable`, the repair kernel's verdict is a
    /// kill; `applied`, that kill was applied already; `have_checkpoint`,
    /// there is one to roll back to.
    pub fn decide(&mut self, sig: Signature, killable: bool, applied: bool, have_checkpoint: bool) -> Decision {
        // Inside the window, the crash is the rolled-back one's recurrence.
        let key = self.window.clone().unwrap_or_else(|| sig.clone());
        let start = self.rung_mut(&key).map_or(0, |r| *r);
        let recurring = self.window.is_some() || start > 0;
        let ladder = self.prefer.ladder();
        let mut rung = start;
        loop {
            match ladder.get(rung).copied().unwrap_or(Step::Decline) {
                Step::Kill if killable => {
                    // A kill ends this process; the same crash again is
                    // another process's, and starts on the same rung.
                    self.set_rung(key, rung);
                    return if applied { Decision::Verdict } else { Decision::Kill };
                }
                Step::Kill => rung += 1,
                Step::Rollback | Step::RollbackQuarantine if !have_checkpoint => rung += 1,
                step @ (Step::Rollback | Step::RollbackQuarantine) => {
                    self.set_rung(key.clone(), rung + 1);
                    self.window = Some(key);
                    let quarantine = (step == Step::RollbackQuarantine).then_some(sig.pid);
                    return Decision::Rollback { quarantine };
                }
                Step::Decline if recurring => {
                    self.set_rung(key, rung);
                    return Decision::DeclineForGood(format!(
                        "the crash came back after a rollback (pid {}: {}); declined for good, not looped on",
                        sig.pid, sig.message
                    ));
                }
                Step::Decline => return Decision::Verdict,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writable_raw_disk_is_refused_and_qcow2_disks_are_snapshotted() {
        let ok = json!([
            {"device": "", "qdev": "/machine/peripheral/d0", "inserted": {"ro": false, "drv": "qcow2", "node-name": "disk0"}},
            {"device": "cd", "inserted": {"ro": true, "drv": "raw", "node-name": "cd0"}},
            {"device": "floppy0"}
        ]);
        assert_eq!(snapshot_disks(&ok).unwrap(), vec!["disk0".to_string()]);
        let raw = json!([{"device": "", "qdev": "vd0", "inserted": {"ro": false, "drv": "raw", "node-name": "n"}}]);
        let e = snapshot_disks(&raw).unwrap_err().to_string();
        assert!(e.contains("vd0 (raw, writable)") && e.contains("qcow2"), "{e}");
        assert!(snapshot_disks(&json!([])).unwrap().is_empty());
    }

    #[test]
    fn ladders_start_with_the_preferred_remedy() {
        assert_eq!(Prefer::default(), Prefer::Kill);
        assert_eq!(Prefer::Kill.ladder()[0], Step::Kill);
        assert_eq!(Prefer::Rollback.ladder()[0], Step::Rollback);
        assert_eq!(*Prefer::Rollback.ladder().last().unwrap(), Step::Decline);
    }

    fn sig(pid: i32, m: &str) -> Signature {
        Signature { pid, message: m.into() }
    }

    #[test]
    fn kill_first_rolls_back_a_declined_crash_once_then_declines_it_for_good() {
        let mut p = Policy::new(Prefer::Kill);
        // Killable crashes are killed, again and again.
        assert_eq!(p.decide(sig(40, "sysrq"), true, true, true), Decision::Verdict);
        assert_eq!(p.decide(sig(41, "sysrq"), true, true, true), Decision::Verdict);
        // A declined one: rollback with quarantine, then for good.
        assert_eq!(p.decide(sig(50, "Fatal exception in interrupt"), false, false, true), Decision::Rollback { quarantine: Some(50) });
        assert!(matches!(p.decide(sig(50, "Fatal exception in interrupt"), false, false, true), Decision::DeclineForGood(_)));
        // Init: the same, its quarantine refused later by the quarantine.
        let mut p = Policy::new(Prefer::Kill);
        assert_eq!(p.decide(sig(1, "Fatal exception"), false, false, true), Decision::Rollback { quarantine: Some(1) });
        p.checkpoint_taken();
        assert!(matches!(p.decide(sig(1, "Fatal exception"), false, false, true), Decision::DeclineForGood(_)));
    }

    #[test]
    fn a_crash_in_the_window_after_a_rollback_is_its_recurrence_whatever_its_pid() {
        let mut p = Policy::new(Prefer::Kill);
        assert_eq!(p.decide(sig(50, "Fatal exception in interrupt"), false, false, true), Decision::Rollback { quarantine: Some(50) });
        assert!(matches!(p.decide(sig(77, "Fatal exception in interrupt"), false, false, true), Decision::DeclineForGood(_)));
        // After a checkpoint, another process's crash starts afresh.
        p.checkpoint_taken();
        assert_eq!(p.decide(sig(78, "Fatal exception in interrupt"), false, false, true), Decision::Rollback { quarantine: Some(78) });
    }

    #[test]
    fn rollback_first_rolls_back_then_kills_then_quarantines_then_declines() {
        let mut p = Policy::new(Prefer::Rollback);
        assert!(!p.kill_at_once());
        assert_eq!(p.decide(sig(60, "Fatal exception"), true, false, true), Decision::Rollback { quarantine: None });
        assert_eq!(p.decide(sig(60, "Fatal exception"), true, false, true), Decision::Kill);
        // Not killable the second time round: quarantine, then for good.
        let mut p = Policy::new(Prefer::Rollback);
        assert_eq!(p.decide(sig(61, "x"), false, false, true), Decision::Rollback { quarantine: None });
        assert_eq!(p.decide(sig(61, "x"), false, false, true), Decision::Rollback { quarantine: Some(61) });
        assert!(matches!(p.decide(sig(61, "x"), false, false, true), Decision::DeclineForGood(_)));
    }

    #[test]
    fn without_a_checkpoint_the_verdict_stands() {
        let mut p = Policy::new(Prefer::Rollback);
        assert_eq!(p.decide(sig(60, "x"), true, false, false), Decision::Kill);
        let mut p = Policy::new(Prefer::Kill);
        assert_eq!(p.decide(sig(60, "x"), false, false, false), Decision::Verdict);
    }
}
