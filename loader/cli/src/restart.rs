//! `repair-guest restart-vmm`: replace a guest's QEMU process with a new
//! one, the guest's RAM left in place (QEMU 10's cpr-transfer, see
//! `loader::cpr`); and the watcher's wait for the new QEMU.

use anyhow::{Context, Result};
use loader::access::Endpoint;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Options of `restart-vmm`.
#[derive(clap::Args, Debug, Clone)]
pub struct RestartArgs {
    /// A QMP socket of the running QEMU (unix:PATH; the pid of QEMU is
    /// learnt from it). A watcher attached to the guest holds its own
    /// monitor: give QEMU a second `-qmp` for this.
    #[arg(long, value_name = "ADDR")]
    pub qmp: String,
    /// The QEMU binary to restart into (an update); default: the running
    /// one's. It must be QEMU 10.0 or newer, and accept the same options.
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// Where the handover's sockets and the new QEMU's stderr go; default:
    /// repair-guest-cpr-<old QEMU's pid> in the temporary directory.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Runs `restart-vmm`: one JSON line (`restarted`) on standard output.
pub fn run(args: &RestartArgs) -> Result<()> {
    let ep: Endpoint = args.qmp.parse().with_context(|| format!("--qmp {:?}", args.qmp))?;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("repair-guest-cpr-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = loader::cpr::restart(&ep, args.qemu.as_deref(), &dir)?;
    let mut line = serde_json::to_value(&r)?;
    line["event"] = "restarted".into();
    line["time"] = loader::watch::utc_now().into();
    println!("{line}");
    Ok(())
}

/// After the watched guest moved to a new QEMU: waits (up to 5 minutes,
/// or until asked to stop) for it to run at the QMP address, so that the
/// watcher attaches to the new QEMU once the guest runs there. Without
/// QMP, the attach itself retries the gdbstub.
pub fn await_new_qemu(qmp: Option<&str>, stop: &AtomicBool) -> Result<()> {
    let Some(addr) = qmp else {
        std::thread::sleep(Duration::from_secs(1));
        return Ok(());
    };
    let ep: Endpoint = addr.parse().with_context(|| format!("--qmp {addr:?}"))?;
    loader::cpr::await_running(&ep, None, Duration::from_secs(300), stop)?;
    Ok(())
}
