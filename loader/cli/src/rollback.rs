//! `watch --checkpoint-every`: the options of checkpoints and rollback,
//! and the store they open in the guest's QEMU (`loader::checkpoint`).

use anyhow::{bail, Context, Result};
use loader::checkpoint::{Checkpoints, Prefer, Rollback};
use std::path::PathBuf;
use std::time::Duration;

/// Checkpoint and rollback options of `watch`.
#[derive(clap::Args, Debug, Clone)]
pub struct RollbackArgs {
    /// Keep a checkpoint of the whole VM (RAM, vCPUs, devices, qcow2
    /// disks), taken every SECS seconds with QEMU's snapshot-save, and
    /// roll the VM back to the newest one when a crash is declined (the
    /// offender, known from the diagnosis, is then made to die with a
    /// pending SIGKILL). A crash that comes back after a rollback is
    /// declined for good. The guest is paused for each checkpoint (about
    /// 0.2-1.5 s for 512 MiB under TCG, see the README). Needs --qmp;
    /// refused on a guest with a writable disk that is not qcow2.
    #[arg(long, value_name = "SECS", requires = "qmp")]
    pub checkpoint_every: Option<f64>,
    /// Where the checkpoints are kept (a qcow2 file QEMU opens; it holds
    /// up to two copies of guest RAM). Default: repair-guest-ckpt-<QEMU
    /// pid>.qcow2 in the temporary directory ($TMPDIR, else /tmp).
    #[arg(long, value_name = "FILE", requires = "checkpoint_every")]
    pub checkpoint_file: Option<PathBuf>,
    /// Which comes first for a crash: `kill` the offender in place (the
    /// repair kernel's verdict; rollback and quarantine only when it
    /// declines), or `rollback` without killing (for faults that do not
    /// recur, where the process that crashed is innocent; a kill if the
    /// crash comes back).
    #[arg(long, value_name = "kill|rollback", default_value = "kill", value_parser = parse_prefer, requires = "checkpoint_every")]
    pub prefer: Prefer,
}

fn parse_prefer(s: &str) -> Result<Prefer, String> {
    match s {
        "kill" => Ok(Prefer::Kill),
        "rollback" => Ok(Prefer::Rollback),
        _ => Err(format!("`{s}`: expected kill or rollback")),
    }
}

impl RollbackArgs {
    /// Opens the checkpoint store in the guest's QEMU, when asked for.
    pub fn open(&self, qmp: Option<&mut loader::qmp::Qmp>) -> Result<Option<Rollback>> {
        let Some(secs) = self.checkpoint_every else { return Ok(None) };
        if !(secs.is_finite() && secs >= 0.1) {
            bail!("--checkpoint-every {secs}: give an interval of at least 0.1 seconds");
        }
        let Some(q) = qmp else { bail!("--checkpoint-every needs --qmp: QEMU's snapshot jobs run there") };
        let file = match &self.checkpoint_file {
            Some(f) => f.clone(),
            None => {
                let id = q.peer_pid().map_or_else(|| std::process::id().to_string(), |p| p.to_string());
                std::env::temp_dir().join(format!("repair-guest-ckpt-{id}.qcow2"))
            }
        };
        let store = Checkpoints::open(q, &file).with_context(|| format!("opening the checkpoint store {}", file.display()))?;
        Ok(Some(Rollback::new(store, Duration::from_secs_f64(secs), self.prefer)))
    }
}
