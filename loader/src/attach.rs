//! One way to attach: a guest description resolved, in one place, to a
//! backend, the guest's RAM map, its name, and the run state it was in
//! before we touched it.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use loader::attach::QemuGuest;
//! let spec = QemuGuest {
//!     gdb: Some("unix:/run/vm1-gdb.sock".parse()?),
//!     qmp: Some("unix:/run/vm1-qmp.sock".parse()?),
//!     ram_file: Some("/dev/shm/vm1-ram".into()),
//! };
//! let mut a = spec.connect()?;
//! let image = builder::RepairImage::read("vm1.img".as_ref())?;
//! let mut session = a.session(image, loader::flow::FlowConfig::default())?;
//! # let _ = &mut session; Ok(()) }
//! ```
//!
//! With QMP alone (`gdb: None`), the gdbstub is opened through QMP on a
//! private socket and closed when the [`Attached`] is dropped
//! ([`QmpGdbstub`]); guest RAM is read in QEMU's own process
//! ([`procmem`](crate::backend::procmem)) unless a RAM file is given.

use crate::access::{AccessError, Endpoint, GuestAccess};
use crate::flow::{FlowConfig, FlowError, Session};
use crate::gdb::GdbGuest;
use crate::qmp::Qmp;
use crate::ram::{RamFile, WithRam};
use crate::backend::procmem::{open_qemu_ram, QemuRam};
use std::path::{Path, PathBuf};

/// A QEMU guest: its gdbstub or its QMP monitor (at least one), and
/// optionally the file backing its RAM (`-object
/// memory-backend-file,...,share=on`).
#[derive(Clone, Debug)]
pub struct QemuGuest {
    /// The gdbstub (`-gdb unix:PATH,server=on,wait=off`). `None`: found or
    /// opened through QMP ([`QmpGdbstub::open`]).
    pub gdb: Option<Endpoint>,
    pub qmp: Option<Endpoint>,
    pub ram_file: Option<PathBuf>,
}

/// The control and memory paths to a QEMU guest.
#[derive(Debug)]
pub enum QemuBackend {
    /// Everything through the gdbstub.
    Gdb(GdbGuest),
    /// Control through the gdbstub, memory through the RAM file.
    GdbRam(WithRam<GdbGuest, RamFile>),
    /// Control through the gdbstub, memory in QEMU's process
    /// (`/proc/PID/mem`, or its shared RAM file through `/proc/PID/fd`),
    /// found through QMP when no RAM file is given.
    GdbProc(WithRam<GdbGuest, QemuRam>),
}

impl QemuBackend {
    /// The RAM file's map (guest-physical ranges and their offsets), when
    /// memory goes through a RAM file: for another mapping of the same file
    /// (the hang sampler's).
    pub fn ram_file_regions(&self) -> Option<Vec<crate::ram::RamRegion>> {
        match self {
            QemuBackend::GdbRam(g) => Some(g.mem.regions().to_vec()),
            _ => None,
        }
    }

    pub fn guest(&mut self) -> &mut dyn GuestAccess {
        match self {
            QemuBackend::Gdb(g) => g,
            QemuBackend::GdbRam(g) => g,
            QemuBackend::GdbProc(g) => g,
        }
    }

    /// The gdbstub connection under either path.
    pub fn gdb(&mut self) -> &mut GdbGuest {
        match self {
            QemuBackend::Gdb(g) => g,
            QemuBackend::GdbRam(g) => &mut g.inner,
            QemuBackend::GdbProc(g) => &mut g.inner,
        }
    }

    /// How guest memory is reached, for messages: `the gdbstub`, `the RAM
    /// file`, `/proc/PID/mem at 0x...`.
    pub fn memory_path(&self) -> String {
        match self {
            QemuBackend::Gdb(_) => "the gdbstub".into(),
            QemuBackend::GdbRam(_) => "the RAM file".into(),
            QemuBackend::GdbProc(g) => g.mem.describe(),
        }
    }

    /// Whether memory is read at memory speed (not through the gdbstub).
    pub fn fast_memory(&self) -> bool {
        !matches!(self, QemuBackend::Gdb(_))
    }
}

/// A guest we are connected to.
#[derive(Debug)]
pub struct Attached {
    pub backend: QemuBackend,
    /// The QMP connection, kept for the watch (run states and events).
    pub qmp: Option<Qmp>,
    /// The run state before our gdbstub connection stopped the VM.
    pub found_status: Option<String>,
    /// QMP `query-name`, else the gdbstub's address.
    pub name: String,
    /// First guest-physical address past RAM, from QMP or the RAM file;
    /// `None` when neither is given (the flow then probes).
    pub ram_end: Option<u64>,
    /// The gdbstub found or opened through QMP (no `gdb` given); closed,
    /// if we opened it, when dropped: after `backend` (declared last), so
    /// our breakpoints are gone by then.
    pub gdbstub: Option<QmpGdbstub>,
}

impl QemuGuest {
    /// Connects QMP first (the run state before we touch the gdbstub, the
    /// name, the RAM size), then the gdbstub, which stops the VM. From then
    /// on, dropping the connection removes our breakpoints and resumes the
    /// guest if that stop was ours (see [`Attached::stop_is_ours`]).
    ///
    /// The RAM file is mapped with the layout QEMU reports over QMP
    /// ([`Qmp::ram_layout`]). Without QMP, it is assumed to be the `pc`
    /// machine's ([`RamFile::open_pc_file`]): a `q35` guest of 2.75 GiB or
    /// more (split at 2 GiB, not 3) then needs `--qmp`.
    pub fn connect(&self) -> Result<Attached, AccessError> {
        if self.gdb.is_none() && self.qmp.is_none() {
            return Err(AccessError::Other(
                "no way to reach the guest: give its gdbstub (--gdb ADDR; QEMU's -gdb unix:PATH,server=on,wait=off) \
                 or its QMP monitor (--qmp ADDR; -qmp unix:PATH,server=on,wait=off), through which the gdbstub \
                 is then opened"
                    .into(),
            ));
        }
        let mut qmp = match &self.qmp {
            Some(ep) => Some(Qmp::connect(ep)?),
            None => None,
        };
        let mut found_status = None;
        let mut name = None;
        let mut ram_end = None;
        if let Some(q) = &mut qmp {
            found_status = Some(q.query_status()?);
            name = q.execute("query-name", None).ok().and_then(|v| v["name"].as_str().map(str::to_string));
            ram_end = Some(q.ram_size()?);
        }
        let ram = match (&self.ram_file, &mut qmp) {
            // QEMU's own map of the RAM block (any machine, any size),
            // cross-checked against the file.
            (Some(p), Some(q)) => Some(RamFile::open_checked(p, q.ram_layout()?)?),
            // Without QMP, the `pc` machine's split is assumed.
            (Some(p), None) => Some(RamFile::open_pc_file(p)?),
            (None, _) => None,
        };
        // No RAM file: guest RAM in QEMU's own process, else the gdbstub.
        let mut proc_ram = None;
        if let (None, Some(q)) = (&ram, &mut qmp) {
            match open_qemu_ram(q) {
                Ok(r) => proc_ram = Some(r),
                Err(e) => tracing::warn!("guest RAM in QEMU's process: {e}; reading it through the gdbstub (slow)"),
            }
        }
        let (gdb_ep, mut gdbstub) = match (&self.gdb, &mut qmp, &self.qmp) {
            (Some(ep), _, _) => (ep.clone(), None),
            (None, Some(q), Some(qep)) => {
                let s = QmpGdbstub::open(q, qep)?;
                (s.endpoint().clone(), Some(s))
            }
            _ => unreachable!("checked above: gdb or qmp"),
        };
        let mut gdb = match GdbGuest::connect(gdb_ep.clone()) {
            Ok(g) => g,
            Err(e) => {
                if let (Some(s), Some(q)) = (&mut gdbstub, &mut qmp) {
                    let _ = s.close(Some(q));
                }
                return Err(e);
            }
        };
        gdb.resume_on_drop = stop_is_ours(found_status.as_deref());
        if let Some(r) = proc_ram {
            tracing::info!("guest RAM through {}", r.describe());
            ram_end = Some(crate::access::PhysAccess::ram_end(&r));
            let backend = QemuBackend::GdbProc(WithRam::new(gdb, r));
            let name = name.or_else(|| self.qmp.as_ref().map(|e| e.to_string())).unwrap_or_else(|| gdb_ep.to_string());
            return Ok(Attached { backend, qmp, found_status, name, ram_end, gdbstub });
        }
        let backend = match ram {
            Some(ram) => {
                // QEMU's RAM size counts only RAM; the map puts the part
                // above the PCI hole at 4 GiB.
                ram_end = Some(crate::access::PhysAccess::ram_end(&ram));
                QemuBackend::GdbRam(WithRam::new(gdb, ram))
            }
            None => QemuBackend::Gdb(gdb),
        };
        let name = name.or_else(|| gdbstub.as_ref().and(self.qmp.as_ref()).map(|e| e.to_string()));
        Ok(Attached { backend, qmp, found_status, name: name.unwrap_or_else(|| gdb_ep.to_string()), ram_end, gdbstub })
    }
}

/// Whether the stop a gdbstub connection makes is ours to undo, from the run
/// state before it: unless someone else had the guest paused already
/// (`debug` is a trap's: a watcher that died left the guest there).
pub fn stop_is_ours(status_before: Option<&str>) -> bool {
    matches!(status_before, None | Some("running") | Some("debug"))
}

impl Attached {
    /// See [`stop_is_ours`].
    pub fn stop_is_ours(&self) -> bool {
        stop_is_ours(self.found_status.as_deref())
    }

    pub fn guest(&mut self) -> &mut dyn GuestAccess {
        self.backend.guest()
    }

    /// Whether guest memory is read at memory speed (a RAM file, or QEMU's
    /// process), not through the gdbstub.
    pub fn fast_memory(&self) -> bool {
        self.backend.fast_memory()
    }

    /// Attaches the repair flow with `image` (KASLR found, build checked).
    pub fn session(&mut self, image: builder::RepairImage, mut cfg: FlowConfig) -> Result<Session, FlowError> {
        if cfg.ram_end.is_none() {
            cfg.ram_end = self.ram_end;
        }
        Session::attach(self.backend.guest(), image, cfg)
    }
}

/// The name of the private directory a watcher opens QEMU's gdbstub in
/// (`repair-guest-gdbstub-XXXXXX/gdb.sock`, in the temp directory): how a
/// gdbstub left open by a watcher that died is told from anyone else's.
const GDBSTUB_DIR_PREFIX: &str = "repair-guest-gdbstub-";
const GDBSTUB_SOCKET: &str = "gdb.sock";

/// The gdbstub QEMU has open, from HMP `info chardev` (the chardev QEMU
/// labels `gdb`: from `-gdb unix:...|tcp:...`, `-s`, or HMP `gdbserver`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenGdbstub {
    pub endpoint: Endpoint,
    /// A client is connected to it right now.
    pub connected: bool,
    /// Opened by a watcher through QMP (its private socket).
    pub by_watcher: bool,
}

/// Parses HMP `info chardev` for the `gdb` chardev. A gdbstub attached to a
/// chardev of the user's (`-gdb chardev:ID`) is not recognisable there.
pub fn parse_gdb_chardev(info_chardev: &str) -> Option<OpenGdbstub> {
    let line = info_chardev.lines().find_map(|l| l.trim().strip_prefix("gdb: filename="))?;
    let (connected, rest) = match line.strip_prefix("disconnected:") {
        Some(r) => (false, r),
        None => (true, line),
    };
    let addr = rest.split([',', ' ']).next()?;
    let endpoint = if let Some(p) = addr.strip_prefix("unix:") {
        Endpoint::Unix(p.into())
    } else {
        let hp = addr.strip_prefix("tcp:")?;
        let (host, port) = hp.rsplit_once(':')?;
        let host = match host.trim_matches(['[', ']']) {
            "" | "0.0.0.0" => "127.0.0.1".to_string(),
            "::" => "[::1]".to_string(),
            h if h.contains(':') => format!("[{h}]"),
            h => h.to_string(),
        };
        Endpoint::Tcp(format!("{host}:{port}"))
    };
    let by_watcher = match &endpoint {
        Endpoint::Unix(p) => is_watcher_socket(p),
        Endpoint::Tcp(_) => false,
    };
    Some(OpenGdbstub { endpoint, connected, by_watcher })
}

fn is_watcher_socket(p: &Path) -> bool {
    p.file_name().is_some_and(|f| f == GDBSTUB_SOCKET)
        && p.parent().and_then(Path::file_name).is_some_and(|d| d.to_string_lossy().starts_with(GDBSTUB_DIR_PREFIX))
}

/// The gdbstub QEMU has open now, if any ([`parse_gdb_chardev`]).
pub fn current_gdbstub(qmp: &mut Qmp) -> Result<Option<OpenGdbstub>, AccessError> {
    Ok(parse_gdb_chardev(&qmp.hmp("info chardev")?))
}

/// QEMU's gdbstub, found or opened through QMP for a [`QemuGuest`] without
/// `gdb`:
/// - one QEMU has open already is used as it is: the user's (`-gdb
///   unix:...`, `-s`) is left open when we go; one a watcher opened (its
///   private socket) is taken over, and closed when we go: a watcher that
///   died (even by SIGKILL, with its supervisor) left it;
/// - otherwise HMP `gdbserver unix:PATH,server=on,wait=off` opens one on a
///   socket in a private directory (mode 0700), closed when we go (`gdbserver
///   none`, which also removes the socket).
///
/// Caveat: a gdbstub on a chardev of the user's (`-gdb chardev:ID`) is not
/// visible to QMP, and opening ours replaces it (QEMU has one gdbstub);
/// give `--gdb` for such a QEMU.
///
/// Closing does not remove breakpoints: drop the gdbstub connection first
/// ([`GdbGuest::leave`]); [`Attached`] drops its backend first.
#[derive(Debug)]
pub struct QmpGdbstub {
    qmp: Endpoint,
    endpoint: Endpoint,
    owned: bool,
    closed: bool,
}

impl QmpGdbstub {
    /// Finds or opens the gdbstub through `qmp` (connected to `qmp_ep`,
    /// kept to close it later).
    pub fn open(qmp: &mut Qmp, qmp_ep: &Endpoint) -> Result<Self, AccessError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let found = loop {
            let found = current_gdbstub(qmp)?;
            // A dead watcher's connection is seen closed by QEMU's main loop
            // a moment after it died.
            match &found {
                Some(f) if f.connected && f.by_watcher && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                _ => break found,
            }
        };
        if let Some(f) = found {
            if f.connected {
                return Err(AccessError::Other(format!(
                    "QEMU's gdbstub at {} has a client already (a debugger, or another watcher): only one at a time",
                    f.endpoint
                )));
            }
            tracing::info!(
                "using QEMU's open gdbstub at {} ({})",
                f.endpoint,
                if f.by_watcher { "left by a watcher: closed when we go" } else { "the user's: left open" }
            );
            return Ok(Self { qmp: qmp_ep.clone(), endpoint: f.endpoint, owned: f.by_watcher, closed: false });
        }
        let dir = private_dir()?;
        let sock = dir.join(GDBSTUB_SOCKET);
        let reply = qmp.hmp(&format!("gdbserver unix:{},server=on,wait=off", sock.display()))?;
        if !reply.contains("Waiting for gdb connection") || !sock.exists() {
            let _ = std::fs::remove_dir(&dir);
            return Err(AccessError::Other(format!(
                "QEMU did not open a gdbstub on {} (HMP gdbserver said {:?}); give --gdb ADDR (QEMU's -gdb)",
                sock.display(),
                reply.trim()
            )));
        }
        tracing::info!("opened QEMU's gdbstub at unix:{}", sock.display());
        Ok(Self { qmp: qmp_ep.clone(), endpoint: Endpoint::Unix(sock), owned: true, closed: false })
    }

    /// Where to connect.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Whether we close it when we go (we, or a watcher before us, opened
    /// it).
    pub fn owned(&self) -> bool {
        self.owned
    }

    /// Closes it if it is ours (`gdbserver none`), through `qmp` if given,
    /// else a new QMP connection (QMP serves one client at a time: drop any
    /// other first).
    pub fn close(&mut self, qmp: Option<&mut Qmp>) -> Result<(), AccessError> {
        if self.closed || !self.owned {
            return Ok(());
        }
        self.closed = true;
        match qmp {
            Some(q) => close_gdbstub_at(q, &self.endpoint),
            None => close_gdbstub_at(&mut Qmp::connect(&self.qmp)?, &self.endpoint),
        }
    }
}

impl Drop for QmpGdbstub {
    fn drop(&mut self) {
        if let Err(e) = self.close(None) {
            tracing::warn!("closing QEMU's gdbstub at {}: {e}", self.endpoint);
        }
    }
}

/// `gdbserver none` if QEMU's gdbstub is still the one at `endpoint`; then
/// removes its private directory.
fn close_gdbstub_at(qmp: &mut Qmp, endpoint: &Endpoint) -> Result<(), AccessError> {
    if current_gdbstub(qmp)?.is_some_and(|f| &f.endpoint == endpoint) {
        qmp.hmp("gdbserver none")?;
    }
    if let Endpoint::Unix(p) = endpoint {
        if is_watcher_socket(p) {
            let _ = std::fs::remove_file(p);
            if let Some(d) = p.parent() {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
    Ok(())
}

/// Closes a gdbstub a watcher opened through QMP and left open (its
/// private socket), if QEMU has one; the user's is left alone. Returns its
/// address when one was closed. Remove its breakpoints first
/// ([`crate::supervise::rescue`]).
pub fn close_watcher_gdbstub(qmp: &mut Qmp) -> Result<Option<Endpoint>, AccessError> {
    match current_gdbstub(qmp)? {
        Some(f) if f.by_watcher => {
            close_gdbstub_at(qmp, &f.endpoint)?;
            Ok(Some(f.endpoint))
        }
        _ => Ok(None),
    }
}

/// A new directory only we can enter, in the temp directory.
fn private_dir() -> Result<PathBuf, AccessError> {
    use std::os::unix::ffi::OsStrExt;
    let template = std::env::temp_dir().join(format!("{GDBSTUB_DIR_PREFIX}XXXXXX"));
    let mut bytes = template.as_os_str().as_bytes().to_vec();
    bytes.push(0);
    // SAFETY: `bytes` is a NUL-terminated, writable template that mkdtemp
    // fills in place; it outlives the call.
    let r = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if r.is_null() {
        return Err(AccessError::Io { what: "a private directory for the gdbstub", source: std::io::Error::last_os_error() });
    }
    bytes.pop();
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_gdb_chardev_in_info_chardev() {
        let t = "gdb0: filename=disconnected:unix:/tmp/g0.sock,server=on\r\n#chr092: filename=gdb\r\n\
                 compat_monitor0: filename=unix:q.sock,server=on\r\n";
        assert_eq!(parse_gdb_chardev(t), None);
        let t = "#chr038: filename=gdb\r\ngdb: filename=disconnected:unix:/tmp/repair-guest-gdbstub-AbC123/gdb.sock,server=on\r\n";
        let f = parse_gdb_chardev(t).unwrap();
        assert_eq!(f.endpoint, Endpoint::Unix("/tmp/repair-guest-gdbstub-AbC123/gdb.sock".into()));
        assert!(!f.connected && f.by_watcher);
        let f = parse_gdb_chardev("gdb: filename=unix:/run/vm1-gdb.sock,server=on\r\n").unwrap();
        assert!(f.connected && !f.by_watcher);
        let f = parse_gdb_chardev("gdb: filename=disconnected:tcp:0.0.0.0:1234,server=on\r\n").unwrap();
        assert_eq!(f.endpoint, Endpoint::Tcp("127.0.0.1:1234".into()));
    }

    #[test]
    fn private_dirs_are_new_and_recognised() {
        let d = private_dir().unwrap();
        assert!(is_watcher_socket(&d.join(GDBSTUB_SOCKET)));
        assert!(!is_watcher_socket(Path::new("/tmp/other/gdb.sock")));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::remove_dir(&d).unwrap();
    }
}
