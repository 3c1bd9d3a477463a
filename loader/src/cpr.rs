//! Warm restart of QEMU: the guest moves to a new QEMU process (the same
//! binary or a newer one) with its RAM left in place, through QEMU 10's
//! CPR migration (`cpr-transfer`, `docs/devel/migration/CPR.rst`).
//!
//! How (QEMU 10.0):
//! - The old QEMU must keep guest RAM in shared memory
//!   (`memory-backend-file` or `-memfd` with `share=on`) and its other RAM
//!   (ROMs, video memory) too (`-machine aux-ram-share=on`): those file
//!   descriptors are what goes to the new QEMU, over a Unix socket
//!   (`SCM_RIGHTS`), the `cpr` channel.
//! - The new QEMU is started with the old one's command line (read from
//!   `/proc/PID/cmdline`, with its environment) and two `-incoming`
//!   channels: `main` for device state, `cpr` for the descriptors. It
//!   waits on the `cpr` channel before it creates its monitors and
//!   chardevs, which then take over the old one's socket paths.
//! - The old QEMU gets `migrate-set-parameters mode=cpr-transfer` and
//!   `migrate` with both channels: it stops the guest, hands over, and
//!   waits in `postmigrate`; the new one resumes the guest.
//!
//! What is not preserved (QEMU 10.0): connections to chardev sockets and
//! monitors (clients reconnect: the watcher does); vhost and VFIO devices
//! (refused by QEMU for this mode); a `file` chardev is reopened by the
//! new QEMU, so it is given `append=on` here lest the new QEMU truncate
//! what the old one wrote.
//!
//! The old QEMU is ended with SIGKILL once the new one runs: a `quit`
//! would unlink its Unix socket paths at exit, which the new QEMU listens
//! on by then.
//!
//! The first law: until the migration completes, the guest is the old
//! QEMU's; a migration that fails leaves it running there (QEMU resumes a
//! guest it stopped for a failed migration) and the new QEMU is killed.

use crate::access::{AccessError, Endpoint};
use crate::qmp::Qmp;
use serde_json::json;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CprError {
    #[error("QEMU {0}.{1} has no cpr-transfer migration (QEMU 10.0 or newer has it); restart the guest under a newer QEMU first")]
    TooOld(u64, u64),
    #[error(
        "guest RAM is not shared memory ({0}): start QEMU with `-object memory-backend-file,id=ram0,size=...,mem-path=...,share=on` \
         (or memory-backend-memfd,share=on) and `-machine memory-backend=ram0`"
    )]
    RamNotShared(String),
    #[error("QEMU was not started with `-machine aux-ram-share=on`: its ROM and video RAM could not be handed over")]
    NoAuxRamShare,
    #[error("cannot learn QEMU's pid from its QMP socket (a TCP monitor?): give a Unix-socket QMP")]
    NoPid,
    #[error("reading QEMU's command line from /proc/{pid}: {source}")]
    Proc {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the new QEMU ({program}): {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the new QEMU exited ({status}) before the handover; the guest runs on in the old one. Its stderr:\n{stderr}")]
    NewExited { status: String, stderr: String },
    #[error("the migration to the new QEMU {0}; the guest runs on in the old one")]
    Failed(String),
    #[error(transparent)]
    Qmp(#[from] AccessError),
}

/// A warm restart done.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Restarted {
    pub old_pid: u32,
    pub new_pid: u32,
    /// From `migrate` to the new QEMU reporting `running`: an upper bound
    /// of the time the guest's vCPUs did not run.
    pub downtime_ms: f64,
    /// QEMU's own figure (the old QEMU's `downtime`: stop to handover).
    pub qemu_downtime_ms: Option<f64>,
    /// The new QEMU's stderr.
    pub stderr: PathBuf,
}

/// The new QEMU's command line: the old one's, with `-S` and any
/// `-incoming` dropped, `file` chardevs appending, and the two channels.
pub fn new_command_line(old: &[OsString], main: &Path, cpr: &Path) -> Vec<OsString> {
    let mut out = Vec::with_capacity(old.len() + 4);
    let mut i = 0;
    while i < old.len() {
        let a = old[i].as_bytes();
        match a {
            b"-incoming" => i += 2,
            b"-S" => i += 1,
            b"-chardev" if i + 1 < old.len() => {
                let v = old[i + 1].as_bytes();
                let mut v = v.to_vec();
                if v.starts_with(b"file,") && !v.windows(7).any(|w| w == b"append=") {
                    v.extend_from_slice(b",append=on");
                }
                out.push(old[i].clone());
                out.push(OsString::from_vec(v));
                i += 2;
            }
            _ => {
                out.push(old[i].clone());
                i += 1;
            }
        }
    }
    for (kind, path) in [("main", main), ("cpr", cpr)] {
        out.push("-incoming".into());
        out.push(json!({"channel-type": kind, "addr": unix_addr(path)}).to_string().into());
    }
    out
}

fn unix_addr(path: &Path) -> serde_json::Value {
    json!({"transport": "socket", "type": "unix", "path": path.display().to_string()})
}

fn split_nul(bytes: &[u8]) -> Vec<OsString> {
    bytes.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| OsString::from_vec(s.to_vec())).collect()
}

/// Checks the running QEMU can be restarted warm: version, shared RAM.
pub fn check(qmp: &mut Qmp) -> Result<(), CprError> {
    let (major, minor, _) = qmp.version;
    if major < 10 {
        return Err(CprError::TooOld(major, minor));
    }
    let memdevs = qmp.execute("query-memdev", None)?;
    let list = memdevs.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return Err(CprError::RamNotShared("no memory backend object: plain -m RAM".into()));
    }
    if let Some(d) = list.iter().find(|d| d["share"] != json!(true)) {
        return Err(CprError::RamNotShared(format!("backend {} has share=off", d["id"].as_str().unwrap_or("?"))));
    }
    let aux = qmp.execute("qom-get", Some(json!({"path": "/machine", "property": "aux-ram-share"})));
    if !matches!(aux, Ok(serde_json::Value::Bool(true))) {
        return Err(CprError::NoAuxRamShare);
    }
    Ok(())
}

/// Moves the guest behind `qmp_addr` to a new QEMU process: `qemu` (else
/// the same binary) with the old one's arguments and environment. `dir`
/// holds the channels' sockets and the new QEMU's stderr.
pub fn restart(qmp_addr: &Endpoint, qemu: Option<&Path>, dir: &Path) -> Result<Restarted, CprError> {
    let mut old = Qmp::connect_timeout(qmp_addr, Duration::from_secs(30))?;
    check(&mut old)?;
    let old_pid = old.peer_pid().ok_or(CprError::NoPid)?;
    let proc_err = |source| CprError::Proc { pid: old_pid, source };
    let argv = split_nul(&std::fs::read(format!("/proc/{old_pid}/cmdline")).map_err(proc_err)?);
    let env: Vec<(OsString, OsString)> = split_nul(&std::fs::read(format!("/proc/{old_pid}/environ")).map_err(proc_err)?)
        .into_iter()
        .filter_map(|kv| {
            let b = kv.as_bytes();
            let eq = b.iter().position(|&c| c == b'=')?;
            Some((OsString::from_vec(b[..eq].to_vec()), OsString::from_vec(b[eq + 1..].to_vec())))
        })
        .collect();
    let Some((program, args)) = argv.split_first() else {
        return Err(proc_err(std::io::Error::other("empty command line")));
    };
    let program = qemu.map_or_else(|| PathBuf::from(program), Path::to_path_buf);
    let (main_sock, cpr_sock) = (dir.join("cpr-main.sock"), dir.join("cpr.sock"));
    let _ = std::fs::remove_file(&main_sock);
    let _ = std::fs::remove_file(&cpr_sock);
    let stderr = dir.join("qemu-new.stderr");
    let mut cmd = std::process::Command::new(&program);
    cmd.args(new_command_line(args, &main_sock, &cpr_sock))
        .env_clear()
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).map_err(|source| CprError::Spawn { program: program.display().to_string(), source })?);
    // SAFETY: setsid is async-signal-safe; the new QEMU outlives us, in a
    // session of its own, as the old one did.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| CprError::Spawn { program: program.display().to_string(), source })?;
    let abort = |child: &mut std::process::Child, e: CprError| {
        let _ = child.kill();
        let _ = child.wait();
        e
    };
    let exited = |child: &mut std::process::Child| -> Option<CprError> {
        let status = child.try_wait().ok().flatten()?;
        Some(CprError::NewExited { status: status.to_string(), stderr: std::fs::read_to_string(&stderr).unwrap_or_default() })
    };
    // The new QEMU listens on the cpr channel first of all.
    let start = Instant::now();
    while !cpr_sock.exists() {
        if let Some(e) = exited(&mut child) {
            return Err(e);
        }
        if start.elapsed() > Duration::from_secs(60) {
            let e = CprError::Failed("did not start: the new QEMU opened no cpr channel within 60 s".into());
            return Err(abort(&mut child, e));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let set = old
        .execute("migrate-set-parameters", Some(json!({"mode": "cpr-transfer"})))
        .and_then(|_| old.execute("migrate-set-capabilities", Some(json!({"capabilities": [{"capability": "events", "state": true}]}))));
    if let Err(e) = set {
        return Err(abort(&mut child, e.into()));
    }
    let t0 = Instant::now();
    let channels = json!([{"channel-type": "main", "addr": unix_addr(&main_sock)}, {"channel-type": "cpr", "addr": unix_addr(&cpr_sock)}]);
    if let Err(e) = old.execute("migrate", Some(json!({"channels": channels}))) {
        let _ = old.execute("migrate-set-parameters", Some(json!({"mode": "normal"})));
        return Err(abort(&mut child, e.into()));
    }
    // Until "completed", the guest is the old QEMU's.
    let info = loop {
        let m = old.execute("query-migrate", None)?;
        match m["status"].as_str() {
            Some("completed") => break m,
            Some(s @ ("failed" | "cancelled")) => {
                let why = m["error-desc"].as_str().map_or(s.to_string(), |d| format!("{s}: {d}"));
                let _ = old.execute("migrate-set-parameters", Some(json!({"mode": "normal"})));
                return Err(abort(&mut child, CprError::Failed(why)));
            }
            _ => {}
        }
        if t0.elapsed() > Duration::from_secs(300) {
            let _ = old.execute("migrate_cancel", None);
            return Err(abort(&mut child, CprError::Failed("did not complete within 300 s (cancelled)".into())));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // The new QEMU took over the old one's socket paths: reach it there.
    let new_pid = loop {
        if let Some(e) = exited(&mut child) {
            return Err(e);
        }
        if let Ok(mut q) = Qmp::connect_timeout(qmp_addr, Duration::from_secs(5)) {
            if q.peer_pid() != Some(old_pid) && q.query_status().is_ok_and(|s| s == "running") {
                break q.peer_pid().unwrap_or(child.id());
            }
        }
        if t0.elapsed() > Duration::from_secs(300) {
            return Err(CprError::Failed("completed, but the new QEMU did not report running within 300 s".into()));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let downtime_ms = t0.elapsed().as_secs_f64() * 1e3;
    // The old QEMU has nothing left to run (its disks were flushed and
    // released at completion). Not `quit`: at exit QEMU unlinks its Unix
    // socket paths, which are the new QEMU's now. Its monitors' clients (a
    // watcher) see it go.
    drop(old);
    // SAFETY: a signal to the old QEMU, which we checked is the peer of
    // its QMP socket and is in postmigrate.
    unsafe { libc::kill(old_pid as i32, libc::SIGKILL) };
    let _ = std::fs::remove_file(&main_sock);
    Ok(Restarted { old_pid, new_pid, downtime_ms, qemu_downtime_ms: info["downtime"].as_f64(), stderr })
}

/// After a migration completed: waits until a QEMU other than `old_pid`
/// answers at `qmp_addr` and runs the guest (not `inmigrate`).
pub fn await_running(qmp_addr: &Endpoint, old_pid: Option<u32>, timeout: Duration, stop: &std::sync::atomic::AtomicBool) -> Result<u32, AccessError> {
    let start = Instant::now();
    loop {
        if let Ok(mut q) = Qmp::connect_timeout(qmp_addr, Duration::from_secs(5)) {
            let pid = q.peer_pid();
            if pid != old_pid || pid.is_none() {
                if let Ok(s) = q.query_status() {
                    if s != "inmigrate" && s != "postmigrate" {
                        return Ok(pid.unwrap_or(0));
                    }
                }
            }
        }
        if start.elapsed() > timeout || stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(AccessError::GuestGone(format!("no new QEMU running at {qmp_addr:?} within {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_new_command_line_is_the_old_with_the_channels() {
        let old: Vec<OsString> = ["-S", "-incoming", "defer", "-chardev", "file,id=c,path=/x", "-chardev", "file,id=d,path=/y,append=on", "-m", "512M"]
            .iter()
            .map(OsString::from)
            .collect();
        let new = new_command_line(&old, Path::new("/d/m.sock"), Path::new("/d/c.sock"));
        let new: Vec<String> = new.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert_eq!(&new[..6], ["-chardev", "file,id=c,path=/x,append=on", "-chardev", "file,id=d,path=/y,append=on", "-m", "512M"]);
        assert_eq!(new[6], "-incoming");
        assert!(new[7].contains("\"main\"") && new[7].contains("/d/m.sock"), "{}", new[7]);
        assert!(new[9].contains("\"cpr\"") && new[9].contains("/d/c.sock"), "{}", new[9]);
        assert_eq!(new.len(), 10);
    }
}
