//! The shared harness of the real-guest tests: boots a kernel of the guest kit
//! (`scripts/guest-kit`) under QEMU with TCG, and drives the busybox init of
//! the kit's initramfs over a second serial port.
//!
//! ```no_run
//! use harness::{Guest, GuestConfig, Kernel};
//! use std::time::Duration;
//! let mut guest = Guest::boot(&GuestConfig::new(Kernel::Debian)).unwrap();
//! assert!(guest.verify_bystander().unwrap().ok);
//! let child = guest.crash("sysrq-c").unwrap();
//! let panic = guest.wait_panic(Duration::from_secs(60)).unwrap();
//! assert_eq!(panic.pid, child.pid);
//! ```
//!
//! Every QEMU is killed when its [`Guest`] drops (a test failing or
//! panicking included), and again by the kernel if the test process itself
//! dies (`PR_SET_PDEATHSIG`).

mod console;
mod kit;
pub mod libvirt;

pub use console::{last_cpu_line, parse_panic, PanicInfo};
pub use kit::{Kernel, Kit, Series};

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What went wrong with a guest, with the context a test failure needs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest kit incomplete: {0} is missing; run scripts/guest-kit (or set CRASH_REPAIR_KIT to a kit directory)")]
    KitMissing(PathBuf),
    #[error("cannot start QEMU ({qemu}): {source}; install it with `apt-get install qemu-system-x86` (scripts/guest-kit does)")]
    QemuSpawn {
        qemu: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited ({status}) before {waiting_for}; its stderr:\n{stderr}\nconsole tail:\n{tail}")]
    QemuExited {
        status: String,
        waiting_for: String,
        stderr: String,
        tail: String,
    },
    #[error("timed out after {secs:.1} s waiting for {waiting_for}; console tail:\n{tail}")]
    Timeout {
        secs: f64,
        waiting_for: String,
        tail: String,
    },
    #[error("guest command channel: {0}")]
    Channel(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Kernel command-line words every harness guest gets after `console=` and
/// `rdinit=` (QEMU, libvirt, the campaign's and the demo's guests alike):
/// - `panic=0`: a panic that completes halts the guest instead of rebooting it,
///   so the test sees what the kernel did.
/// - `no_timer_check`: the x86 kernel's own switch for virtual machines
///   (`__setup("no_timer_check")` in arch/x86/kernel/apic/io_apic.c, in every
///   kit vmlinux). Without it `check_timer()` busy-waits ten ticks with
///   `mdelay()` and requires jiffies to have advanced by more than four; under
///   TCG on a loaded host the guest's TSC-calibrated delay and its timer ticks
///   drift apart, the check fails on every route, and the kernel panics with
///   "IO-APIC + timer doesn't work!" before any test (or our tool) runs, as
///   the 6.12 LKDTM campaign saw on SPINLOCKUP. The routing QEMU emulates is
///   correct, so skipping the probe changes nothing else.
pub const BASE_APPEND: &[&str] = &["panic=0", "no_timer_check"];

/// How to boot a guest.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    pub kernel: Kernel,
    pub cpus: u32,
    pub mem_mib: u32,
    /// Extra kernel command-line words (`oops=panic`, `nokaslr`, ...).
    pub append: Vec<String>,
    /// Back guest RAM by a shared file the loader can map
    /// ([`Guest::ram_file`]), in /dev/shm when it exists.
    pub ram_file: bool,
    /// Extra QEMU arguments.
    pub qemu_args: Vec<String>,
    /// How long the boot to the init's ready marker may take.
    pub boot_timeout: Duration,
    /// The kit directory; `None` for [`Kit::locate`]'s default.
    pub kit_dir: Option<PathBuf>,
    /// The QEMU binary; `None` for `$QEMU`, else `qemu-system-x86_64` on the
    /// `PATH` (the system's). [`GuestConfig::with_qemu10`] picks the kit's.
    pub qemu: Option<PathBuf>,
    /// A second QMP monitor ([`Guest::qmp2_addr`]), for a test that talks
    /// QMP while another client holds the first.
    pub second_qmp: bool,
    /// A reset reboots the guest instead of ending QEMU (`-no-reboot`, the
    /// default, turns every reset, QMP `system_reset` included, into a
    /// shutdown).
    pub reboot: bool,
    /// Boot this image (`-kernel`: a bzImage, a multiboot ELF) with this
    /// initrd instead of `kernel` from the kit with the kit's initramfs;
    /// [`Guest::boot`] then returns as soon as QEMU listens, waiting for no
    /// marker. [`GuestConfig::with_image`].
    pub image: Option<(PathBuf, Option<PathBuf>)>,
    /// No kernel at all, and QEMU started stopped (`-S`): the vCPUs in the
    /// x86 reset state over zeroed RAM, for protocol tests that write their
    /// own code through the gdbstub. `kernel` and `image` are then unused and
    /// [`Guest::boot`] waits for no marker. [`GuestConfig::without_kernel`].
    pub no_kernel: bool,
    /// The gdbstub on TCP (127.0.0.1, a free port) instead of a Unix
    /// socket; [`Guest::gdb_addr`] says where.
    pub gdb_tcp: bool,
    /// No gdbstub at all (no `-gdb`): for a watcher that opens one through
    /// QMP. [`GuestConfig::without_gdb`].
    pub no_gdb: bool,
    /// Boot the kit's Debian 13 systemd root filesystem
    /// (`$kit/distro/rootfs.cpio.gz`, `scripts/kit-distro`) as the initramfs
    /// with `rdinit=/sbin/init` instead of the busybox one.
    /// [`GuestConfig::distro`].
    pub distro: bool,
    /// Host files put into the guest's initramfs at the given absolute
    /// paths (their directories must exist there, as `/bin` does), as an
    /// extra cpio archive after the kit's. [`GuestConfig::with_file`].
    pub files: Vec<(PathBuf, String)>,
}

impl GuestConfig {
    /// 2 vCPUs, 512 MiB, KASLR on (the kernels' default).
    pub fn new(kernel: Kernel) -> Self {
        Self {
            kernel,
            cpus: 2,
            mem_mib: 512,
            append: Vec::new(),
            ram_file: false,
            qemu_args: Vec::new(),
            boot_timeout: Duration::from_secs(120),
            kit_dir: None,
            qemu: None,
            second_qmp: false,
            reboot: false,
            image: None,
            no_kernel: false,
            gdb_tcp: false,
            no_gdb: false,
            distro: false,
            files: Vec::new(),
        }
    }

    /// Puts the host file `host` into the guest at `guest_path` (an
    /// executable such as a test's static program; mode 0755):
    /// [`GuestConfig::files`].
    pub fn with_file(mut self, host: impl Into<PathBuf>, guest_path: &str) -> Self {
        self.files.push((host.into(), guest_path.to_string()));
        self
    }

    /// The kit's Debian 13 guest: systemd as pid 1 from
    /// `$kit/distro/rootfs.cpio.gz` on the Debian cloud kernel (its block
    /// drivers are modules, hence an initramfs), 1 GiB, and up to 5 minutes
    /// to reach multi-user under TCG (25-75 s is usual). Its
    /// `guest-kit-channel` service serves the busybox init's commands, so
    /// every [`Guest`] call works; it adds `crashy.service` and `mtcount`
    /// (see `scripts/kit-distro`).
    pub fn distro() -> Self {
        let mut cfg = Self::new(Kernel::Debian);
        cfg.distro = true;
        cfg.mem_mib = 1024;
        cfg.boot_timeout = Duration::from_secs(300);
        cfg
    }

    /// Starts QEMU stopped (`-S`) with no kernel: [`GuestConfig::no_kernel`].
    pub fn without_kernel(mut self) -> Self {
        self.no_kernel = true;
        self
    }

    /// Starts QEMU without a gdbstub: [`GuestConfig::no_gdb`].
    pub fn without_gdb(mut self) -> Self {
        self.no_gdb = true;
        self
    }

    /// Puts the gdbstub on TCP: [`GuestConfig::gdb_tcp`].
    pub fn with_gdb_tcp(mut self) -> Self {
        self.gdb_tcp = true;
        self
    }

    /// Boots `kernel` (and `initrd`) rather than a kit kernel: a test's own
    /// image, such as a multiboot stub.
    pub fn with_image(mut self, kernel: impl Into<PathBuf>, initrd: Option<PathBuf>) -> Self {
        self.image = Some((kernel.into(), initrd));
        self
    }

    /// Boots under this QEMU binary instead of the default.
    pub fn with_qemu(mut self, qemu: impl Into<PathBuf>) -> Self {
        self.qemu = Some(qemu.into());
        self
    }

    /// Boots under the kit's QEMU 10 ([`qemu10_binary`], in this config's kit
    /// directory when it names one).
    pub fn with_qemu10(self) -> Result<Self> {
        let kit = match &self.kit_dir {
            Some(dir) => Kit { dir: dir.clone() },
            None => Kit::locate()?,
        };
        let qemu = qemu10_in(&kit)?;
        Ok(self.with_qemu(qemu))
    }

    /// Lets a reset reboot the guest (no `-no-reboot`).
    pub fn with_reboot(mut self) -> Self {
        self.reboot = true;
        self
    }

    /// Adds a second QMP monitor, at [`Guest::qmp2_addr`].
    pub fn with_second_qmp(mut self) -> Self {
        self.second_qmp = true;
        self
    }

    pub fn append(mut self, word: &str) -> Self {
        self.append.push(word.to_string());
        self
    }

    pub fn with_ram_file(mut self) -> Self {
        self.ram_file = true;
        self
    }
}

/// The result of a command run in the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    pub status: i32,
    pub output: Vec<String>,
}

/// The bystander's data as the guest verified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verify {
    pub ok: bool,
    pub records: u64,
    pub detail: String,
}

/// A running guest. Dropping it kills QEMU.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    dir: tempfile::TempDir,
    ram_dir: Option<tempfile::TempDir>,
    console_path: PathBuf,
    stderr_path: PathBuf,
    cmd_writer: UnixStream,
    cmd_reader: BufReader<UnixStream>,
    /// Bytes of a command-channel line not yet complete.
    cmd_partial: Vec<u8>,
    next_id: u64,
    kernel: Kernel,
    /// The QEMU binary this guest runs under.
    qemu: String,
    second_qmp: bool,
    /// The gdbstub's TCP port, when booted [`GuestConfig::with_gdb_tcp`].
    gdb_port: Option<u16>,
    /// The QMP connection of [`Guest::qmp`], once used.
    qmp: Option<BufReader<UnixStream>>,
    /// The QEMU the guest moved to in a warm restart
    /// ([`Guest::follow_restart`]): watched and killed instead of `child`.
    successor: Option<u32>,
}

/// The QEMU binary; `QEMU` overrides.
fn qemu_binary() -> String {
    std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

/// A TCP port free on 127.0.0.1 just now (QEMU binds it right after).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where `scripts/kit-qemu10` puts its wrapper, inside the kit directory.
const QEMU10_IN_KIT: &str = "qemu10/bin/qemu-system-x86_64";

/// The kit's QEMU 10 (Debian bookworm-backports, unpacked beside the
/// system's 7.2 by `scripts/kit-qemu10`, which `scripts/guest-kit` runs): a
/// wrapper that boots the kit's guests as the system QEMU does.
pub fn qemu10_binary() -> Result<PathBuf> {
    qemu10_in(&Kit::locate()?)
}

fn qemu10_in(kit: &Kit) -> Result<PathBuf> {
    let p = kit.dir.join(QEMU10_IN_KIT);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::KitMissing(p))
    }
}

impl Guest {
    /// Boots a kit kernel and waits for its init's ready marker (or boots
    /// [`GuestConfig::image`], or nothing with [`GuestConfig::no_kernel`],
    /// and waits for QEMU to listen).
    pub fn boot(cfg: &GuestConfig) -> Result<Guest> {
        let (kernel_image, initrd) = match &cfg.image {
            _ if cfg.no_kernel => (None, None),
            Some((kernel, initrd)) => (Some(kernel.clone()), initrd.clone()),
            None => {
                let kit = match &cfg.kit_dir {
                    Some(dir) => Kit { dir: dir.clone() },
                    None => Kit::locate()?,
                };
                // The kernel first: a missing kit names it before the rest.
                let kernel = kit.kernel(cfg.kernel)?.0;
                let initrd = if cfg.distro { kit.distro_initramfs()? } else { kit.initramfs()? };
                (Some(kernel), Some(initrd))
            }
        };
        let dir = tempfile::Builder::new().prefix("guest-").tempdir()?;
        let console_path = dir.path().join("console.log");
        let stderr_path = dir.path().join("qemu.stderr");
        let cmd_sock = dir.path().join("cmd.sock");
        let mut append = vec![
            "console=ttyS0,115200".to_string(),
            if cfg.distro { "rdinit=/sbin/init" } else { "rdinit=/init" }.to_string(),
        ];
        append.extend(BASE_APPEND.iter().map(|w| w.to_string()));
        append.extend(cfg.append.iter().cloned());

        let qemu = match &cfg.qemu {
            Some(q) => q.display().to_string(),
            None => qemu_binary(),
        };
        let mut cmd = Command::new(&qemu);
        cmd.args(["-accel", "tcg", "-nodefaults", "-display", "none"]);
        if !cfg.reboot {
            cmd.arg("-no-reboot");
        }
        cmd.args(["-smp", &cfg.cpus.to_string()]).args(["-m", &format!("{}M", cfg.mem_mib)]);
        match &kernel_image {
            Some(k) => {
                cmd.arg("-kernel").arg(k).args(["-append", &append.join(" ")]);
            }
            None => {
                cmd.arg("-S");
            }
        }
        let gdb_port = cfg.gdb_tcp.then(free_port).transpose()?;
        let gdb_chardev = match gdb_port {
            Some(port) => format!("socket,id=gdb0,host=127.0.0.1,port={port},server=on,wait=off"),
            None => format!("socket,id=gdb0,path={},server=on,wait=off", dir.path().join("gdb.sock").display()),
        };
        cmd.args(["-chardev", &format!("file,id=con0,path={}", console_path.display())])
            .args(["-serial", "chardev:con0"])
            .args([
                "-chardev",
                &format!("socket,id=cmd0,path={},server=on,wait=off", cmd_sock.display()),
            ])
            .args(["-serial", "chardev:cmd0"])
            .args(if cfg.no_gdb { vec![] } else { vec!["-chardev", &gdb_chardev, "-gdb", "chardev:gdb0"] })
            .args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", dir.path().join("qmp.sock").display()),
            ])
            .args(["-device", "pvpanic"]);
        let initrd = match initrd {
            Some(base) if !cfg.files.is_empty() => Some(initrd_with_files(&base, &cfg.files, dir.path())?),
            other => other,
        };
        if let Some(initrd) = &initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        if cfg.second_qmp {
            cmd.args([
                "-qmp",
                &format!("unix:{},server=on,wait=off", dir.path().join("qmp2.sock").display()),
            ]);
        }
        let mut ram_dir = None;
        if cfg.ram_file {
            let shm = Path::new("/dev/shm");
            let base = if shm.is_dir() { shm.to_path_buf() } else { dir.path().to_path_buf() };
            let rd = tempfile::Builder::new().prefix("guest-ram-").tempdir_in(base)?;
            cmd.args([
                "-object",
                &format!(
                    "memory-backend-file,id=ram0,size={}M,mem-path={},share=on",
                    cfg.mem_mib,
                    rd.path().join("ram").display()
                ),
            ])
            .args(["-machine", "memory-backend=ram0"]);
            ram_dir = Some(rd);
        }
        cmd.args(&cfg.qemu_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path)?);
        // SAFETY: the closure only calls prctl, which is async-signal-safe,
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| Error::QemuSpawn { qemu: qemu.clone(), source })?;

        // Connect the command channel as soon as QEMU listens; on any
        // failure, QEMU goes too.
        let connected = (|| {
            let start = Instant::now();
            let stream = loop {
                match UnixStream::connect(&cmd_sock) {
                    Ok(s) => break s,
                    Err(_) if start.elapsed() < Duration::from_secs(20) => {
                        if let Some(status) = child.try_wait()? {
                            return Err(Error::QemuExited {
                                status: status.to_string(),
                                waiting_for: "its command socket".into(),
                                stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
                                tail: String::new(),
                            });
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(Error::Channel(format!("connect {}: {e}", cmd_sock.display()))),
                }
            };
            let reader = BufReader::new(stream.try_clone()?);
            // The QMP sockets come after the command socket on the command
            // line, so QEMU may not have created them yet.
            let mut qmp_socks = vec![dir.path().join("qmp.sock")];
            if cfg.second_qmp {
                qmp_socks.push(dir.path().join("qmp2.sock"));
            }
            while !qmp_socks.iter().all(|p| p.exists()) {
                if let Some(status) = child.try_wait()? {
                    return Err(Error::QemuExited {
                        status: status.to_string(),
                        waiting_for: "its QMP sockets".into(),
                        stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
                        tail: String::new(),
                    });
                }
                if start.elapsed() > Duration::from_secs(20) {
                    return Err(Error::Channel(format!("QEMU created no {}", qmp_socks[0].display())));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok((stream, reader))
        })();
        let (stream, reader) = match connected {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let mut guest = Guest {
            child,
            dir,
            ram_dir,
            console_path,
            stderr_path,
            cmd_writer: stream,
            cmd_reader: reader,
            cmd_partial: Vec::new(),
            next_id: 1,
            kernel: cfg.kernel,
            qemu,
            second_qmp: cfg.second_qmp,
            gdb_port,
            qmp: None,
            successor: None,
        };
        if cfg.image.is_none() && !cfg.no_kernel {
            guest.wait_for_console("GUEST-KIT READY", cfg.boot_timeout)?;
        }
        Ok(guest)
    }

    /// Waits up to `timeout` for QEMU to exit by itself; its status, or
    /// `None` while it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if start.elapsed() > timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What QEMU wrote on its stderr so far.
    pub fn qemu_stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Runs one QMP command (`{"execute": ...}`) on the QMP socket and
    /// returns its `"return"` value (events are skipped). The first call
    /// connects and negotiates capabilities; a test that talks QMP through
    /// its own client uses [`Guest::qmp_addr`] instead.
    pub fn qmp(&mut self, command: &serde_json::Value) -> Result<serde_json::Value> {
        if self.qmp.is_none() {
            // Right after an image boot QEMU may not listen yet.
            let path = self.dir.path().join("qmp.sock");
            let start = Instant::now();
            let stream = loop {
                match UnixStream::connect(&path) {
                    Ok(s) => break s,
                    Err(_) if start.elapsed() < Duration::from_secs(5) => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => return Err(Error::Channel(format!("connect {}: {e}", path.display()))),
                }
            };
            stream.set_read_timeout(Some(Duration::from_secs(60)))?;
            let mut reader = BufReader::new(stream);
            let mut greeting = String::new();
            reader.read_line(&mut greeting)?;
            self.qmp = Some(reader);
            self.qmp(&serde_json::json!({"execute": "qmp_capabilities"}))?;
        }
        let reader = self.qmp.as_mut().expect("connected above");
        writeln!(reader.get_mut(), "{command}")?;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(Error::Channel(format!("QEMU closed QMP during {command}")));
            }
            let v: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| Error::Channel(format!("QMP sent {line:?}: {e}")))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(Error::Channel(format!("QMP {command}: {e}")));
            }
        }
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// `unix:PATH` of the gdbstub (`tcp:127.0.0.1:PORT` when booted
    /// [`GuestConfig::with_gdb_tcp`]).
    pub fn gdb_addr(&self) -> String {
        match self.gdb_port {
            Some(port) => format!("tcp:127.0.0.1:{port}"),
            None => format!("unix:{}", self.dir.path().join("gdb.sock").display()),
        }
    }

    /// `unix:PATH` of the QMP socket.
    pub fn qmp_addr(&self) -> String {
        format!("unix:{}", self.dir.path().join("qmp.sock").display())
    }

    /// `unix:PATH` of the second QMP socket, when booted
    /// [`GuestConfig::with_second_qmp`].
    pub fn qmp2_addr(&self) -> Option<String> {
        self.second_qmp
            .then(|| format!("unix:{}", self.dir.path().join("qmp2.sock").display()))
    }

    /// The QEMU binary the guest runs under.
    pub fn qemu(&self) -> &str {
        &self.qemu
    }

    /// The file backing guest RAM, when booted [`GuestConfig::with_ram_file`].
    pub fn ram_file(&self) -> Option<PathBuf> {
        self.ram_dir.as_ref().map(|d| d.path().join("ram"))
    }

    /// QEMU's process id (the successor's after a warm restart).
    pub fn qemu_pid(&self) -> u32 {
        self.successor.unwrap_or_else(|| self.child.id())
    }

    /// After a warm restart of QEMU (CPR, `repair-guest restart-vmm`): the
    /// guest now runs in QEMU `pid`, which listens at the same socket
    /// paths. Reaps the old QEMU, reconnects the command channel (bytes
    /// the guest sent during the handover are lost: send no command across
    /// it), and watches and finally kills `pid` instead.
    pub fn follow_restart(&mut self, pid: u32) -> Result<()> {
        self.successor = Some(pid);
        if self.wait_exit(Duration::from_secs(60))?.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.qmp = None;
        let path = self.dir.path().join("cmd.sock");
        let stream = UnixStream::connect(&path).map_err(|e| Error::Channel(format!("connect {}: {e}", path.display())))?;
        self.cmd_reader = BufReader::new(stream.try_clone()?);
        self.cmd_writer = stream;
        self.cmd_partial.clear();
        Ok(())
    }

    /// A scratch directory that lives as long as the guest.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the guest printed on its console so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console_path)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// The last `n` lines of the console.
    pub fn console_tail(&self, n: usize) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn check_alive(&mut self, waiting_for: &str) -> Result<()> {
        if let Some(pid) = self.successor {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie (field 3, after the parenthesised comm).
            let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()).unwrap_or("X");
            if state == "Z" || state == "X" {
                return Err(Error::QemuExited {
                    status: format!("pid {pid} gone"),
                    waiting_for: waiting_for.to_string(),
                    stderr: String::new(),
                    tail: self.console_tail(40),
                });
            }
            return Ok(());
        }
        if let Some(status) = self.child.try_wait()? {
            return Err(Error::QemuExited {
                status: status.to_string(),
                waiting_for: waiting_for.to_string(),
                stderr: std::fs::read_to_string(&self.stderr_path).unwrap_or_default(),
                tail: self.console_tail(40),
            });
        }
        Ok(())
    }

    /// Waits until a console line contains `pattern` (after `from` bytes of
    /// the console) and returns that line.
    pub fn wait_for_console_from(&mut self, from: usize, pattern: &str, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        loop {
            let text = self.console();
            if let Some(rest) = text.get(from..) {
                if let Some(line) = complete_lines(rest).find(|l| l.contains(pattern)) {
                    return Ok(line.to_string());
                }
            }
            self.check_alive(&format!("console line {pattern:?}"))?;
            if start.elapsed() > timeout {
                return Err(Error::Timeout {
                    secs: timeout.as_secs_f64(),
                    waiting_for: format!("console line {pattern:?}"),
                    tail: self.console_tail(40),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until a console line contains `pattern`; returns the line.
    pub fn wait_for_console(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        self.wait_for_console_from(0, pattern, timeout)
    }

    /// Current length of the console, to wait for lines after this point.
    pub fn console_len(&self) -> usize {
        self.console().len()
    }

    fn send(&mut self, verb: &str) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        writeln!(self.cmd_writer, "{id} {verb}")?;
        self.cmd_writer.flush()?;
        Ok(id)
    }

    /// Reads reply lines for `id` until `done` says a line ends the reply.
    fn read_reply(&mut self, id: u64, timeout: Duration, mut done: impl FnMut(&str) -> bool) -> Result<Vec<String>> {
        let start = Instant::now();
        let prefix = format!("{id} ");
        let mut lines = Vec::new();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(Error::Timeout {
                    secs: timeout.as_secs_f64(),
                    waiting_for: format!("reply to command {id} (got {lines:?})"),
                    tail: self.console_tail(40),
                });
            }
            self.cmd_reader
                .get_ref()
                .set_read_timeout(Some(left.min(Duration::from_millis(200))))?;
            // A read that times out mid-line keeps its bytes in `cmd_partial`.
            match self.cmd_reader.read_until(b'\n', &mut self.cmd_partial) {
                Ok(0) => {
                    self.check_alive("a command reply")?;
                    return Err(Error::Channel("command channel closed".into()));
                }
                Ok(_) if !self.cmd_partial.ends_with(b"\n") => {}
                Ok(_) => {
                    let raw = std::mem::take(&mut self.cmd_partial);
                    let line = String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']).to_string();
                    if let Some(body) = line.strip_prefix(&prefix) {
                        let body = body.to_string();
                        let end = done(&body);
                        lines.push(body);
                        if end {
                            return Ok(lines);
                        }
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    self.check_alive("a command reply")?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Runs `command` in the guest as a new process (`sh -c`); returns its
    /// exit status and output.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<RunResult> {
        let id = self.send(&format!("run {command}"))?;
        let lines = self.read_reply(id, timeout, |l| l.starts_with("exit "))?;
        let mut output = Vec::new();
        let mut status = None;
        for l in lines {
            if let Some(o) = l.strip_prefix("out ") {
                output.push(o.to_string());
            } else if let Some(s) = l.strip_prefix("exit ") {
                status = s.trim().parse().ok();
            }
        }
        let status = status.ok_or_else(|| Error::Channel("no exit status in reply".into()))?;
        Ok(RunResult { status, output })
    }

    /// Starts `command` as [`Guest::run`] does without waiting for it: the
    /// init is busy with it (in `wait`) until it ends. Returns the id to
    /// give [`Guest::run_wait`].
    pub fn run_start(&mut self, command: &str) -> Result<u64> {
        self.send(&format!("run {command}"))
    }

    /// Waits for a command started by [`Guest::run_start`] to end; its
    /// exit status (its output lines are dropped).
    pub fn run_wait(&mut self, id: u64, timeout: Duration) -> Result<i32> {
        let lines = self.read_reply(id, timeout, |l| l.starts_with("exit "))?;
        lines
            .last()
            .and_then(|l| l.strip_prefix("exit "))
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::Channel(format!("bad exit reply {lines:?}")))
    }

    /// Crashes the guest kernel from a new child process: `sysrq-c`, or an
    /// LKDTM type (`EXCEPTION`, `BUG`, ...). Returns the child's pid, which it
    /// announces before it crashes. Follow with [`Guest::wait_panic`] or, when
    /// a repair is expected, [`Guest::wait_crash_exit`].
    pub fn crash(&mut self, kind: &str) -> Result<CrashHandle> {
        let id = self.send(&format!("crash {kind}"))?;
        let pid = self.wait_crash_announcement(id)?;
        Ok(CrashHandle { id, pid })
    }

    /// Crashes the guest kernel from init itself (pid 1, `sysrq-c` written
    /// by the init's own shell): a crash no repair may make by killing.
    pub fn crash_init(&mut self) -> Result<CrashHandle> {
        let id = self.send("crash-init")?;
        let pid = self.wait_crash_announcement(id)?;
        Ok(CrashHandle { id, pid })
    }

    /// The crashing process's pid, from its announcement: the kernel-log
    /// line (on the console, written synchronously before the crash) or the
    /// command channel, whichever comes first. A guest trapped right after
    /// the announcement sends no more command-channel bytes.
    fn wait_crash_announcement(&mut self, id: u64) -> Result<u32> {
        let start = Instant::now();
        loop {
            if let Some(pid) = announced_pid(&self.console(), id) {
                return Ok(pid);
            }
            match self.read_reply(id, Duration::from_millis(100), |l| l.starts_with("crashing pid ")) {
                Ok(lines) => {
                    return lines
                        .last()
                        .and_then(|l| l.strip_prefix("crashing pid "))
                        .and_then(|p| p.trim().parse().ok())
                        .ok_or_else(|| Error::Channel(format!("bad crash reply {lines:?}")));
                }
                Err(Error::Timeout { .. }) if start.elapsed() < Duration::from_secs(30) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// After a repair: waits for the crashing child's exit status as its
    /// parent saw it (137 for SIGKILL).
    pub fn wait_crash_exit(&mut self, crash: &CrashHandle, timeout: Duration) -> Result<i32> {
        let lines = self.read_reply(crash.id, timeout, |l| l.starts_with("exit "))?;
        lines
            .last()
            .and_then(|l| l.strip_prefix("exit "))
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::Channel(format!("bad exit reply {lines:?}")))
    }

    /// Waits for the guest's own panic report to finish on the console and
    /// parses it.
    pub fn wait_panic(&mut self, timeout: Duration) -> Result<PanicInfo> {
        self.wait_for_console("---[ end Kernel panic", timeout)?;
        let text = self.console();
        parse_panic(&text).ok_or_else(|| Error::Channel(format!(
            "the console has an end-of-panic marker but no parsable report:\n{}",
            self.console_tail(60)
        )))
    }

    /// Liveness: the init answers and the bystander's record count.
    pub fn ping(&mut self, timeout: Duration) -> Result<u64> {
        let id = self.send("ping")?;
        let lines = self.read_reply(id, timeout, |l| l.starts_with("pong "))?;
        lines
            .last()
            .and_then(|l| l.strip_prefix("pong "))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| Error::Channel(format!("bad ping reply {lines:?}")))
    }

    /// Has the guest verify the bystander's file: consecutive record numbers
    /// from 1, every checksum right.
    pub fn verify_bystander(&mut self) -> Result<Verify> {
        let id = self.send("verify")?;
        let lines = self.read_reply(id, Duration::from_secs(60), |l| l.starts_with("verify "))?;
        let body = lines.last().and_then(|l| l.strip_prefix("verify ")).unwrap_or("");
        let mut it = body.splitn(3, ' ');
        let ok = it.next() == Some("ok");
        let records = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let detail = it.next().unwrap_or("").to_string();
        Ok(Verify { ok, records, detail })
    }

    /// Stops QEMU and waits for it.
    pub fn shutdown(mut self) -> Result<()> {
        self.kill();
        Ok(())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = self.successor.take() {
            // SAFETY: a signal to the QEMU this guest moved to.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The console's complete lines (without their line ends). QEMU writes the
/// serial console to the file byte by byte as the guest sends it, the guest
/// running between bytes: the last line may be half out, and on a loaded
/// host stay so for a while. `pid 1` read from a line that will say
/// `pid 123` is not a pid.
pub(crate) fn complete_lines(console: &str) -> impl Iterator<Item = &str> {
    console.split_inclusive('\n').filter(|l| l.ends_with('\n')).map(|l| l.trim_end_matches(['\r', '\n']))
}

/// The pid a crash child announced on the console for command `id`
/// (`GUEST-KIT crash <id> pid <pid>`), from complete lines only.
pub(crate) fn announced_pid(console: &str, id: u64) -> Option<u32> {
    let marker = format!("GUEST-KIT crash {id} pid ");
    complete_lines(console).find_map(|l| l.split(&marker).nth(1)).and_then(|p| p.trim().parse().ok())
}

/// A crash in flight: the command it came from and the crashing child's pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashHandle {
    pub id: u64,
    pub pid: u32,
}

/// `base` followed by a `newc` cpio archive of `files`, written in `dir`:
/// the kernel unpacks concatenated archives in turn, compressed or not.
fn initrd_with_files(base: &Path, files: &[(PathBuf, String)], dir: &Path) -> Result<PathBuf> {
    fn entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
        let name = name.trim_start_matches('/');
        let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let mut out = std::fs::read(base)?;
    // The kernel looks for the next archive's magic on a 4-byte boundary.
    out.resize(out.len().next_multiple_of(4), 0);
    for (i, (host, guest)) in files.iter().enumerate() {
        let data = std::fs::read(host)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", host.display())))?;
        entry(&mut out, 0x7000_0000 + i as u32, 0o100755, guest, &data);
    }
    entry(&mut out, 0, 0, "TRAILER!!!", &[]);
    let path = dir.join("initrd.cpio");
    std::fs::write(&path, out)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_half_written_announcement_is_not_read_as_a_pid() {
        let done = "[    3.1] GUEST-KIT READY kernel=6.1\r\n[   12.5] GUEST-KIT crash 7 pid 123\r\n";
        assert_eq!(announced_pid(done, 7), Some(123));
        assert_eq!(announced_pid(done, 17), None);
        // The same console read while the guest is between `1` and `23`.
        let half = "[    3.1] GUEST-KIT READY kernel=6.1\r\n[   12.5] GUEST-KIT crash 7 pid 1";
        assert_eq!(announced_pid(half, 7), None);
        assert_eq!(complete_lines(half).collect::<Vec<_>>(), ["[    3.1] GUEST-KIT READY kernel=6.1"]);
    }
}
