//! Kit guests started by a real libvirt: a transient `type='qemu'` (TCG)
//! domain with direct kernel boot of a kit kernel and the kit's initramfs,
//! its console in a file and the init's command channel on a second serial
//! port (a Unix socket QEMU listens on), as [`crate::Guest`] has them.
//!
//! libvirt must be installed and running: `scripts/kit-libvirt` (run by
//! `scripts/setup`) does both, and configures QEMU to run as root so the
//! kit's files are readable where they are. A domain is destroyed when its
//! [`LibvirtGuest`] drops; domains left by a test process that died (named
//! `crt-PID-N`) are destroyed by the next boot.

use crate::{Error, Kernel, Kit, Result, Verify};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How to start a libvirt guest.
#[derive(Clone, Debug)]
pub struct LibvirtConfig {
    pub kernel: Kernel,
    pub cpus: u32,
    pub mem_mib: u32,
    /// Guest RAM in a shared memfd (`<memoryBacking><source type='memfd'/>
    /// <access mode='shared'/>`): the watcher reads it at memory speed.
    pub memfd: bool,
    /// Elements for the domain's `<metadata>` (our opt-in element).
    pub metadata: Option<String>,
    /// Extra kernel command-line words.
    pub append: Vec<String>,
    /// Wait for the init's ready marker in [`LibvirtGuest::boot`].
    pub wait_ready: bool,
    pub boot_timeout: Duration,
    /// Name prefix (the harness adds the test process's pid and a counter).
    pub prefix: String,
}

impl LibvirtConfig {
    /// 2 vCPUs, 512 MiB in a shared memfd, KASLR on.
    pub fn new(kernel: Kernel) -> Self {
        Self {
            kernel,
            cpus: 2,
            mem_mib: 512,
            memfd: true,
            metadata: None,
            append: Vec::new(),
            wait_ready: true,
            boot_timeout: Duration::from_secs(180),
            prefix: "crt".into(),
        }
    }

    pub fn with_metadata(mut self, xml: impl Into<String>) -> Self {
        self.metadata = Some(xml.into());
        self
    }
}

/// A running libvirt domain. Dropping it destroys the domain.
#[derive(Debug)]
pub struct LibvirtGuest {
    name: String,
    dir: tempfile::TempDir,
    console_path: PathBuf,
    cmd_writer: UnixStream,
    cmd_reader: BufReader<UnixStream>,
    cmd_partial: Vec<u8>,
    next_id: u64,
    kernel: Kernel,
    destroyed: bool,
}

/// `virsh -c qemu:///system ARGS`: its standard output, or an error with
/// its standard error.
pub fn virsh(args: &[&str]) -> Result<String> {
    let out = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output()
        .map_err(|e| Error::Channel(format!("cannot run virsh ({e}); run scripts/kit-libvirt (scripts/setup does)")))?;
    if !out.status.success() {
        return Err(Error::Channel(format!(
            "virsh {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails with the script to run unless libvirtd answers.
pub fn require_libvirt() -> Result<()> {
    virsh(&["version"]).map(|_| ()).map_err(|e| {
        Error::Channel(format!("libvirt is not available ({e}): run scripts/kit-libvirt (installs and starts libvirtd)"))
    })
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Destroys `crt-PID-N` domains whose test process is gone.
fn destroy_stale(prefix: &str) {
    let Ok(list) = virsh(&["list", "--name"]) else { return };
    for name in list.lines().map(str::trim) {
        let Some(rest) = name.strip_prefix(&format!("{prefix}-")) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = virsh(&["destroy", name]);
        }
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

impl LibvirtGuest {
    /// Starts the domain (`virsh create`) and, unless told not to, waits
    /// for the init's ready marker.
    pub fn boot(cfg: &LibvirtConfig) -> Result<Self> {
        require_libvirt()?;
        destroy_stale(&cfg.prefix);
        let kit = Kit::locate()?;
        let kernel = kit.kernel(cfg.kernel)?.0;
        let initrd = kit.initramfs()?;
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{}-{}-{n}", cfg.prefix, std::process::id());
        let dir = tempfile::Builder::new().prefix("libvirt-guest-").tempdir()?;
        let console_path = dir.path().join("console.log");
        let cmd_sock = dir.path().join("cmd.sock");
        let mut append = vec!["console=ttyS0,115200".to_string(), "rdinit=/init".into()];
        append.extend(crate::BASE_APPEND.iter().map(|w| w.to_string()));
        append.extend(cfg.append.iter().cloned());
        let memory_backing = if cfg.memfd {
            "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
        } else {
            ""
        };
        let metadata = cfg.metadata.as_deref().map(|m| format!("<metadata>{m}</metadata>")).unwrap_or_default();
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  {metadata}
  <memory unit='MiB'>{mem}</memory>
  <vcpu>{cpus}</vcpu>
  {memory_backing}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{cmd}'/><target port='1'/></serial>
    <panic model='isa'/>
  </devices>
</domain>
",
            mem = cfg.mem_mib,
            cpus = cfg.cpus,
            kernel = xml_escape(&kernel.display().to_string()),
            initrd = xml_escape(&initrd.display().to_string()),
            cmdline = xml_escape(&append.join(" ")),
            console = xml_escape(&console_path.display().to_string()),
            cmd = xml_escape(&cmd_sock.display().to_string()),
        );
        let xml_path = dir.path().join("domain.xml");
        std::fs::write(&xml_path, xml)?;
        virsh(&["create", &xml_path.display().to_string()])?;
        // From here on, a failure destroys the domain.
        let connect = (|| {
            let start = Instant::now();
            loop {
                match UnixStream::connect(&cmd_sock) {
                    Ok(s) => return Ok(s),
                    Err(_) if start.elapsed() < Duration::from_secs(30) => std::thread::sleep(Duration::from_millis(50)),
                    Err(e) => return Err(Error::Channel(format!("connect {}: {e}", cmd_sock.display()))),
                }
            }
        })();
        let stream = match connect {
            Ok(s) => s,
            Err(e) => {
                let _ = virsh(&["destroy", &name]);
                return Err(e);
            }
        };
        let reader = BufReader::new(stream.try_clone()?);
        let mut g = LibvirtGuest {
            name,
            dir,
            console_path,
            cmd_writer: stream,
            cmd_reader: reader,
            cmd_partial: Vec::new(),
            next_id: 1,
            kernel: cfg.kernel,
            destroyed: false,
        };
        if cfg.wait_ready {
            g.wait_for_console("GUEST-KIT READY", cfg.boot_timeout)?;
        }
        Ok(g)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// A scratch directory that lives as long as the guest.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// libvirt's view of the domain: `virsh domstate` (`running`,
    /// `paused`, `shut off`, or an error once a transient domain is gone).
    pub fn state(&self) -> Result<String> {
        Ok(virsh(&["domstate", &self.name])?.trim().to_string())
    }

    /// `virsh ARGS... NAME`.
    pub fn virsh_on(&self, verb: &str) -> Result<String> {
        virsh(&[verb, &self.name])
    }

    /// QEMU's own run state, through libvirt's monitor passthrough.
    pub fn qemu_status(&self) -> Result<String> {
        let out = virsh(&["qemu-monitor-command", &self.name, r#"{"execute":"query-status"}"#])?;
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).map_err(|e| Error::Channel(format!("query-status: {e}: {out}")))?;
        Ok(v["return"]["status"].as_str().unwrap_or("?").to_string())
    }

    /// QEMU's process id (libvirt's pid file).
    pub fn qemu_pid(&self) -> Result<u32> {
        let p = format!("/run/libvirt/qemu/{}.pid", self.name);
        std::fs::read_to_string(&p)?.trim().parse().map_err(|_| Error::Channel(format!("{p}: not a pid")))
    }

    /// Destroys the domain now (`virsh destroy`).
    pub fn destroy(&mut self) -> Result<()> {
        self.destroyed = true;
        virsh(&["destroy", &self.name]).map(|_| ())
    }

    pub fn console(&self) -> String {
        std::fs::read(&self.console_path).map(|b| String::from_utf8_lossy(&b).replace('\r', "")).unwrap_or_default()
    }

    pub fn console_tail(&self, n: usize) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until a console line contains `pattern`; returns the line.
    pub fn wait_for_console(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Some(l) = crate::complete_lines(&self.console()).find(|l| l.contains(pattern)) {
                return Ok(l.to_string());
            }
            if start.elapsed() > timeout {
                return Err(Error::Timeout {
                    secs: timeout.as_secs_f64(),
                    waiting_for: format!("console line {pattern:?} of domain {}", self.name),
                    tail: self.console_tail(40),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(&mut self, verb: &str) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        writeln!(self.cmd_writer, "{id} {verb}")?;
        self.cmd_writer.flush()?;
        Ok(id)
    }

    fn read_reply(&mut self, id: u64, timeout: Duration, mut done: impl FnMut(&str) -> bool) -> Result<Vec<String>> {
        let start = Instant::now();
        let prefix = format!("{id} ");
        let mut lines = Vec::new();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(Error::Timeout {
                    secs: timeout.as_secs_f64(),
                    waiting_for: format!("reply to command {id} of domain {} (got {lines:?})", self.name),
                    tail: self.console_tail(40),
                });
            }
            self.cmd_reader.get_ref().set_read_timeout(Some(left.min(Duration::from_millis(200))))?;
            match self.cmd_reader.read_until(b'\n', &mut self.cmd_partial) {
                Ok(0) => return Err(Error::Channel(format!("command channel of {} closed", self.name))),
                Ok(_) if !self.cmd_partial.ends_with(b"\n") => {}
                Ok(_) => {
                    let raw = std::mem::take(&mut self.cmd_partial);
                    let line = String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']).to_string();
                    if let Some(body) = line.strip_prefix(&prefix) {
                        let end = done(body);
                        lines.push(body.to_string());
                        if end {
                            return Ok(lines);
                        }
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Crashes the kernel from a new child (`sysrq-c` or an LKDTM type);
    /// returns the command id and the child's pid.
    pub fn crash(&mut self, kind: &str) -> Result<(u64, u32)> {
        let id = self.send(&format!("crash {kind}"))?;
        let start = Instant::now();
        loop {
            if let Some(pid) = crate::announced_pid(&self.console(), id) {
                return Ok((id, pid));
            }
            match self.read_reply(id, Duration::from_millis(100), |l| l.starts_with("crashing pid ")) {
                Ok(lines) => {
                    let pid = lines.last().and_then(|l| l.strip_prefix("crashing pid ")).and_then(|p| p.trim().parse().ok());
                    return pid.map(|p| (id, p)).ok_or_else(|| Error::Channel(format!("bad crash reply {lines:?}")));
                }
                Err(Error::Timeout { .. }) if start.elapsed() < Duration::from_secs(30) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The crashing child's exit status as its parent saw it (137: SIGKILL).
    pub fn wait_crash_exit(&mut self, id: u64, timeout: Duration) -> Result<i32> {
        let lines = self.read_reply(id, timeout, |l| l.starts_with("exit "))?;
        lines
            .last()
            .and_then(|l| l.strip_prefix("exit "))
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::Channel(format!("bad exit reply {lines:?}")))
    }

    /// Liveness: the bystander's record count.
    pub fn ping(&mut self, timeout: Duration) -> Result<u64> {
        let id = self.send("ping")?;
        let lines = self.read_reply(id, timeout, |l| l.starts_with("pong "))?;
        lines
            .last()
            .and_then(|l| l.strip_prefix("pong "))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| Error::Channel(format!("bad ping reply {lines:?}")))
    }

    /// Runs `command` in the guest; its exit status and output lines.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<(i32, Vec<String>)> {
        let id = self.send(&format!("run {command}"))?;
        let lines = self.read_reply(id, timeout, |l| l.starts_with("exit "))?;
        let mut out = Vec::new();
        let mut status = None;
        for l in lines {
            if let Some(o) = l.strip_prefix("out ") {
                out.push(o.to_string());
            } else if let Some(s) = l.strip_prefix("exit ") {
                status = s.trim().parse().ok();
            }
        }
        Ok((status.ok_or_else(|| Error::Channel("no exit status".into()))?, out))
    }

    /// The bystander's data as the guest verifies it.
    pub fn verify_bystander(&mut self) -> Result<Verify> {
        let id = self.send("verify")?;
        let lines = self.read_reply(id, Duration::from_secs(60), |l| l.starts_with("verify "))?;
        let body = lines.last().and_then(|l| l.strip_prefix("verify ")).unwrap_or("");
        let mut it = body.splitn(3, ' ');
        let ok = it.next() == Some("ok");
        let records = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        Ok(Verify { ok, records, detail: it.next().unwrap_or("").to_string() })
    }
}

impl Drop for LibvirtGuest {
    fn drop(&mut self) {
        if !self.destroyed {
            let _ = virsh(&["destroy", &self.name]);
        }
    }
}
