//! libvirt guests: a domain reached through libvirt alone, with no change to
//! its XML.
//!
//! libvirt owns the domain's QMP monitor. Everything the watcher takes from
//! QMP comes through libvirt instead, served to it on a private Unix socket
//! that speaks QMP ([`QmpBridge`]), so the one attach and the one watch loop
//! work unchanged:
//! - commands go through libvirt's monitor passthrough (`virsh
//!   qemu-monitor-command DOMAIN JSON`): the run state (`query-status`, which
//!   tells our gdbstub's `debug` from an operator's `paused`), the name, the
//!   RAM size and map, and HMP `gdbserver` to open the gdbstub at run time;
//! - events are libvirt's own (`virsh event --domain DOMAIN --loop --all`),
//!   translated: a `lifecycle` Suspended is QMP `STOP`, Resumed is `RESUME`,
//!   `reboot` is `RESET`, Stopped is `SHUTDOWN` and the end of the monitor
//!   (the watcher then sees the guest gone). An operator's `virsh suspend`
//!   stays a pause, `virsh reset` re-arms, `virsh destroy` ends the watch.
//!
//! Guest RAM: QEMU's pid is in libvirt's pid file; RAM backed by a memfd or
//! a file (`<memoryBacking><source type='memfd'/><access
//! mode='shared'/></memoryBacking>`) is read through QEMU's own descriptor
//! (`/proc/PID/fd/N`, [`Domain::ram_file`]).
//!
//! Why `virsh` and not the `virt` crate: the C library's bindings need
//! libvirt's headers and library at build time, on every machine that builds
//! the workspace, for a handful of calls that are not on any hot path (one
//! per command; events arrive on a pipe). `virsh` is what every libvirt host
//! has, and its JSON passthrough is the same call.

use crate::access::{AccessError, Endpoint};
use crate::backend::procmem::{main_ram_block, parse_info_ramblock, parse_maps};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The XML namespace of our metadata element (`<watch image="..."/>`): a
/// domain that carries it opts in to the hook and the daemon.
pub const METADATA_URI: &str = "urn:crash-repair:libvirt:1";

/// How long one `virsh` call may take.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong talking to libvirt.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot run virsh: {0}; install libvirt's client (`apt-get install libvirt-clients`; scripts/kit-libvirt does)")]
    Spawn(#[source] std::io::Error),
    #[error("`virsh {args}` failed ({status}): {stderr}")]
    Virsh { args: String, status: String, stderr: String },
    #[error("`virsh {args}` gave no answer in {secs} s (is libvirtd up?)")]
    Timeout { args: String, secs: u64 },
    #[error("domain {0:?} is not running (virsh start it, or check its name with `virsh list --all`)")]
    NotRunning(String),
    #[error("libvirt answered `virsh {args}` with {reply:?}")]
    Protocol { args: String, reply: String },
    #[error("QEMU's pid for domain {domain:?}: {why}")]
    Pid { domain: String, why: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<LibvirtError> for AccessError {
    fn from(e: LibvirtError) -> Self {
        match e {
            LibvirtError::NotRunning(d) => AccessError::GuestGone(format!("libvirt domain {d:?} is not running")),
            other => AccessError::Other(other.to_string()),
        }
    }
}

/// Runs `virsh` with `args` on connection `uri`; its standard output.
pub fn virsh(uri: Option<&str>, args: &[&str]) -> Result<String, LibvirtError> {
    let mut cmd = Command::new("virsh");
    cmd.arg("-q");
    if let Some(u) = uri {
        cmd.args(["-c", u]);
    }
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let shown = args.join(" ");
    let mut child = cmd.spawn().map_err(LibvirtError::Spawn)?;
    // Both pipes drained on threads, so a large answer cannot block virsh.
    let mut out = child.stdout.take().map(drain);
    let mut err = child.stderr.take().map(drain);
    let deadline = Instant::now() + VIRSH_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LibvirtError::Timeout { args: shown, secs: VIRSH_TIMEOUT.as_secs() });
            }
            Err(e) => return Err(LibvirtError::Io { what: format!("waiting for virsh {shown}"), source: e }),
        }
    };
    let stdout = out.take().and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = err.take().and_then(|h| h.join().ok()).unwrap_or_default();
    if !status.success() {
        let stderr = stderr.trim().to_string();
        return Err(LibvirtError::Virsh { args: shown, status: status.to_string(), stderr });
    }
    Ok(stdout)
}

fn drain<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Whether a virsh failure says the domain is gone or not running.
fn says_not_running(e: &LibvirtError) -> bool {
    match e {
        LibvirtError::Virsh { stderr, .. } => {
            let s = stderr.to_ascii_lowercase();
            s.contains("not running") || s.contains("domain not found") || s.contains("failed to get domain")
                || s.contains("no domain with matching")
        }
        _ => false,
    }
}

/// A libvirt domain, by name, on a connection (`None`: virsh's default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub uri: Option<String>,
}

impl Domain {
    pub fn new(name: impl Into<String>, uri: Option<String>) -> Self {
        Self { name: name.into(), uri }
    }

    fn virsh(&self, args: &[&str]) -> Result<String, LibvirtError> {
        virsh(self.uri.as_deref(), args).map_err(|e| if says_not_running(&e) { LibvirtError::NotRunning(self.name.clone()) } else { e })
    }

    /// `virsh domstate`: `running`, `paused`, `shut off`, ...
    pub fn state(&self) -> Result<String, LibvirtError> {
        Ok(self.virsh(&["domstate", "--", &self.name])?.trim().to_string())
    }

    /// Whether the domain has a QEMU (running, paused, ...).
    pub fn is_active(&self) -> Result<bool, LibvirtError> {
        match self.state() {
            Ok(s) => Ok(s != "shut off" && s != "crashed"),
            Err(LibvirtError::NotRunning(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One QMP command through libvirt's monitor passthrough: QEMU's whole
    /// answer (`{"return": ...}` or `{"error": ...}`).
    pub fn qmp(&self, command: &Value) -> Result<Value, LibvirtError> {
        let text = command.to_string();
        let out = self.virsh(&["qemu-monitor-command", "--", &self.name, &text])?;
        serde_json::from_str(out.trim())
            .map_err(|_| LibvirtError::Protocol { args: format!("qemu-monitor-command {} {text}", self.name), reply: out })
    }

    /// An HMP command through the passthrough.
    pub fn hmp(&self, line: &str) -> Result<String, LibvirtError> {
        let r = self.qmp(&json!({"execute": "human-monitor-command", "arguments": {"command-line": line}}))?;
        r["return"].as_str().map(str::to_string).ok_or_else(|| LibvirtError::Protocol {
            args: format!("qemu-monitor-command {} --hmp {line}", self.name),
            reply: r.to_string(),
        })
    }

    /// QEMU's pid, from libvirt's pid file (`/run/libvirt/qemu/NAME.pid`
    /// for `qemu:///system`, `$XDG_RUNTIME_DIR/libvirt/qemu/run/NAME.pid`
    /// for a session), checked to be a live QEMU.
    pub fn qemu_pid(&self) -> Result<u32, LibvirtError> {
        let mut candidates = vec![PathBuf::from(format!("/run/libvirt/qemu/{}.pid", self.name))];
        if let Some(rt) = std::env::var_os("XDG_RUNTIME_DIR") {
            candidates.push(Path::new(&rt).join(format!("libvirt/qemu/run/{}.pid", self.name)));
        }
        let session = self.uri.as_deref().is_some_and(|u| u.ends_with("/session"));
        if session {
            candidates.reverse();
        }
        for p in &candidates {
            let Ok(text) = std::fs::read_to_string(p) else { continue };
            let pid: u32 = text.trim().parse().map_err(|_| LibvirtError::Pid {
                domain: self.name.clone(),
                why: format!("{} holds {:?}, not a pid", p.display(), text.trim()),
            })?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if !comm.starts_with("qemu") {
                return Err(LibvirtError::Pid {
                    domain: self.name.clone(),
                    why: format!("{} names pid {pid}, which is not a QEMU ({:?})", p.display(), comm.trim()),
                });
            }
            return Ok(pid);
        }
        Err(LibvirtError::Pid {
            domain: self.name.clone(),
            why: format!(
                "no pid file ({}); is the domain running on this host?",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// The file behind the guest's main RAM block as QEMU holds it open
    /// (`/proc/PID/fd/N`): a memfd (`<source type='memfd'/>`) or a file
    /// (`<source type='file'/>`, hugepages) mapped shared. `Ok(None)` for
    /// RAM QEMU keeps private (the default): then RAM is read through the
    /// gdbstub.
    pub fn ram_file(&self, pid: u32) -> Result<Option<PathBuf>, LibvirtError> {
        let size = self.qmp(&json!({"execute": "query-memory-size-summary"}))?;
        let ram_size = size["return"]["base-memory"].as_u64().unwrap_or(0);
        let blocks = parse_info_ramblock(&self.hmp("info ramblock")?);
        let Some(block) = main_ram_block(&blocks, ram_size) else { return Ok(None) };
        let len = block.used.div_ceil(4096) * 4096;
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(|source| LibvirtError::Io { what: format!("reading /proc/{pid}/maps (QEMU's)"), source })?;
        let found = parse_maps(&maps)
            .into_iter()
            .find(|m| m.len() == len && m.offset == 0 && m.inode != 0 && m.perms.starts_with("rw") && m.perms.ends_with('s'));
        let Some(m) = found else { return Ok(None) };
        use std::os::unix::fs::MetadataExt;
        let dir = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map_err(|source| LibvirtError::Io { what: format!("listing /proc/{pid}/fd (QEMU's)"), source })?;
        Ok(dir.flatten().map(|e| e.path()).find(|p| std::fs::metadata(p).is_ok_and(|md| md.ino() == m.inode && md.len() == block.used)))
    }

    /// Our metadata element in the domain's XML (`<watch .../>`), if it
    /// opted in.
    pub fn metadata(&self) -> Result<Option<String>, LibvirtError> {
        match self.virsh(&["metadata", "--", &self.name, METADATA_URI]) {
            Ok(x) if x.trim().is_empty() => Ok(None),
            Ok(x) => Ok(Some(x.trim().to_string())),
            // "metadata not found: Requested metadata element is not present"
            Err(LibvirtError::Virsh { stderr, .. }) if stderr.contains("not present") || stderr.contains("not found") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The names of the running (active) domains on `uri`.
pub fn active_domains(uri: Option<&str>) -> Result<Vec<String>, LibvirtError> {
    Ok(virsh(uri, &["list", "--name"])?.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
}

/// An attribute of our metadata element: `attr(r#"<watch image="/x"/>"#, "image")`.
pub fn metadata_attr(xml: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=");
    let at = xml.find(&key)? + key.len();
    let rest = &xml[at..];
    let q = rest.chars().next().filter(|c| *c == '"' || *c == '\'')?;
    let body = &rest[1..];
    let end = body.find(q)?;
    Some(body[..end].replace("&quot;", "\"").replace("&apos;", "'").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
}

/// One translated libvirt event, as a QMP event name and data.
fn translate(line: &str) -> Option<(&'static str, Value)> {
    // "event 'lifecycle' for domain 'NAME': Suspended Paused"
    // "event 'reboot' for domain 'NAME'"
    let rest = &line[line.find("event '")? + 7..];
    let (kind, rest) = rest.split_once('\'')?;
    let detail = rest.rsplit_once("': ").map(|(_, d)| d.trim()).unwrap_or("");
    match (kind, detail.split_whitespace().next().unwrap_or("")) {
        ("lifecycle", "Suspended") => Some(("STOP", json!({"libvirt": detail}))),
        ("lifecycle", "Resumed") => Some(("RESUME", json!({"libvirt": detail}))),
        ("lifecycle", "Stopped") => Some(("SHUTDOWN", json!({"guest": false, "reason": "host-qmp-quit", "libvirt": detail}))),
        ("lifecycle", "Shutdown") => Some(("SHUTDOWN", json!({"guest": true, "libvirt": detail}))),
        ("reboot", _) => Some(("RESET", json!({"guest": false, "reason": "libvirt reboot event"}))),
        _ => None,
    }
}

/// A QMP endpoint served on a private Unix socket, backed by libvirt (see
/// the module doc). Any number of clients, one after another or at once;
/// each gets every event from its connection on. When the domain stops,
/// every client's connection is closed (as QEMU's exit would) and no new
/// one is accepted. Dropping the bridge ends it.
#[derive(Debug)]
pub struct QmpBridge {
    endpoint: Endpoint,
    dir: PathBuf,
    shared: Arc<Shared>,
    accept: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    domain: Domain,
    greeting: Value,
    stop: AtomicBool,
    gone: AtomicBool,
    clients: Mutex<Vec<Arc<Mutex<UnixStream>>>>,
    events: Mutex<Option<Child>>,
}

impl QmpBridge {
    /// Serves `domain`'s QMP through libvirt. Fails if libvirt does not
    /// answer or the domain is not running.
    pub fn start(domain: Domain) -> Result<Self, LibvirtError> {
        let version = domain.qmp(&json!({"execute": "query-version"}))?;
        let greeting = json!({"QMP": {"version": version["return"].clone(), "capabilities": []}});
        let dir = private_dir()?;
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path)
            .map_err(|source| LibvirtError::Io { what: format!("binding {}", path.display()), source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| LibvirtError::Io { what: "a non-blocking listener".into(), source })?;
        let shared = Arc::new(Shared {
            domain,
            greeting,
            stop: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            clients: Mutex::new(Vec::new()),
            events: Mutex::new(None),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("libvirt-qmp".into())
            .spawn(move || accept_loop(&s, listener))
            .map_err(|source| LibvirtError::Io { what: "starting the QMP bridge".into(), source })?;
        Ok(Self { endpoint: Endpoint::Unix(path), dir, shared, accept: Some(accept) })
    }

    /// Where to connect ([`crate::qmp::Qmp::connect`]).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn domain(&self) -> &Domain {
        &self.shared.domain
    }
}

impl Drop for QmpBridge {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.close_all();
        if let Some(mut c) = self.shared.events.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Shared {
    fn close_all(&self) {
        for c in self.clients.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = c.lock().unwrap_or_else(|p| p.into_inner()).shutdown(std::net::Shutdown::Both);
        }
    }

    fn broadcast(&self, name: &str, data: Value) {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let line = format!(
            "{}\n",
            json!({"event": name, "data": data, "timestamp": {"seconds": d.as_secs(), "microseconds": d.subsec_micros()}})
        );
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.retain(|c| c.lock().unwrap_or_else(|p| p.into_inner()).write_all(line.as_bytes()).is_ok());
    }

    /// Starts `virsh event` for the domain, once (at the first client).
    fn ensure_events(self: &Arc<Self>) {
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if ev.is_some() {
            return;
        }
        let mut cmd = Command::new("virsh");
        cmd.arg("-q");
        if let Some(u) = &self.domain.uri {
            cmd.args(["-c", u]);
        }
        cmd.args(["event", "--domain", &self.domain.name, "--loop", "--all"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: the closure only calls prctl, async-signal-safe, between
        // fork and exec: virsh goes when we go, however we go.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(mut child) => {
                let out = child.stdout.take();
                *ev = Some(child);
                let s = self.clone();
                if let Some(out) = out {
                    std::thread::spawn(move || s.event_loop(out));
                }
            }
            Err(e) => tracing::warn!("virsh event: {e}; run-state changes of {} go unseen", self.domain.name),
        }
    }

    fn event_loop(&self, out: std::process::ChildStdout) {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let Some((name, data)) = translate(&line) else { continue };
            tracing::debug!("libvirt event {line:?} -> {name}");
            self.broadcast(name, data);
            if name == "SHUTDOWN" && line.contains("Stopped") {
                self.gone.store(true, Ordering::Relaxed);
                self.close_all();
            }
        }
        // virsh event ended: libvirtd restarted or went, or we are
        // stopping. A domain that went: clients see its end.
        if !self.stop.load(Ordering::Relaxed) && !self.domain.is_active().unwrap_or(true) {
            self.gone.store(true, Ordering::Relaxed);
            self.close_all();
        } else if !self.stop.load(Ordering::Relaxed) {
            tracing::warn!("virsh event for {} ended; run-state events resume with a new one", self.domain.name);
            // libvirtd restarting: try again in a while, not in a loop.
            std::thread::sleep(Duration::from_secs(1));
            if let Some(mut c) = self.events.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = c.wait();
            }
        }
    }
}

fn accept_loop(s: &Arc<Shared>, listener: UnixListener) {
    while !s.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) if !s.gone.load(Ordering::Relaxed) => {
                let s = s.clone();
                s.ensure_events();
                std::thread::spawn(move || {
                    if let Err(e) = serve(&s, conn) {
                        tracing::debug!("QMP bridge client: {e}");
                    }
                });
            }
            Ok((conn, _)) => drop(conn),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                tracing::warn!("QMP bridge accept: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        if s.events.lock().unwrap_or_else(|p| p.into_inner()).is_none()
            && !s.clients.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
            && !s.gone.load(Ordering::Relaxed)
        {
            s.ensure_events();
        }
    }
}

/// One client: the greeting, then commands answered in order.
fn serve(s: &Arc<Shared>, conn: UnixStream) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    let writer = Arc::new(Mutex::new(conn.try_clone()?));
    {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(w, "{}", s.greeting)?;
    }
    s.clients.lock().unwrap_or_else(|p| p.into_inner()).push(writer.clone());
    conn.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    loop {
        if s.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(()),
            Ok(_) if !line.ends_with(b"\n") => continue,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e),
        }
        let text = std::mem::take(&mut line);
        let Ok(req) = serde_json::from_slice::<Value>(&text) else {
            let e = json!({"error": {"class": "GenericError", "desc": "the bridge could not parse the command"}});
            writeln!(writer.lock().unwrap_or_else(|p| p.into_inner()), "{e}")?;
            continue;
        };
        let id = req.get("id").cloned();
        let mut reply = match req["execute"].as_str() {
            Some("qmp_capabilities") => json!({"return": {}}),
            Some(cmd) => {
                let mut c = json!({"execute": cmd});
                if let Some(a) = req.get("arguments") {
                    c["arguments"] = a.clone();
                }
                match s.domain.qmp(&c) {
                    Ok(r) => r,
                    Err(LibvirtError::NotRunning(_)) => {
                        // The domain went: end the connection as QEMU's exit would.
                        s.gone.store(true, Ordering::Relaxed);
                        s.close_all();
                        return Ok(());
                    }
                    Err(e) => json!({"error": {"class": "GenericError", "desc": format!("through libvirt: {e}")}}),
                }
            }
            None => json!({"error": {"class": "GenericError", "desc": "no \"execute\""}}),
        };
        if let Some(obj) = reply.as_object_mut() {
            obj.remove("id");
            if let Some(id) = id {
                obj.insert("id".into(), id);
            }
        }
        writeln!(writer.lock().unwrap_or_else(|p| p.into_inner()), "{reply}")?;
    }
}

/// A new directory only we can enter, in the temp directory.
fn private_dir() -> Result<PathBuf, LibvirtError> {
    use std::os::unix::fs::DirBuilderExt;
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    for _ in 0..100 {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        let p = std::env::temp_dir().join(format!("repair-guest-libvirt-{}-{n}-{nanos:x}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(LibvirtError::Io { what: format!("creating {}", p.display()), source }),
        }
    }
    Err(LibvirtError::Io { what: "a private directory".into(), source: std::io::ErrorKind::AlreadyExists.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_libvirt_events() {
        let t = |l: &str| translate(l).map(|(n, _)| n);
        assert_eq!(t("2026-11-30 07:07:43.820+0000: event 'lifecycle' for domain 'vm1': Suspended Paused"), Some("STOP"));
        assert_eq!(t("event 'lifecycle' for domain 'a b': Resumed Unpaused"), Some("RESUME"));
        assert_eq!(t("event 'reboot' for domain 'vm1'"), Some("RESET"));
        assert_eq!(t("event 'lifecycle' for domain 'vm1': Stopped Destroyed"), Some("SHUTDOWN"));
        assert_eq!(t("event 'lifecycle' for domain 'vm1': Started Booted"), None);
        assert_eq!(t("event 'rtc-change' for domain 'vm1': 0"), None);
        assert_eq!(t("garbage"), None);
    }

    #[test]
    fn reads_metadata_attributes() {
        let x = r#"<watch xmlns="urn:crash-repair:libvirt:1" image="/var/lib/x &amp; y.img" hangs='yes'/>"#;
        assert_eq!(metadata_attr(x, "image").as_deref(), Some("/var/lib/x & y.img"));
        assert_eq!(metadata_attr(x, "hangs").as_deref(), Some("yes"));
        assert_eq!(metadata_attr(x, "events"), None);
    }
}
