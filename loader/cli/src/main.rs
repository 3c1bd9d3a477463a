//! `repair-guest`: attach to a QEMU guest through its gdbstub (and QMP), and
//! repair its kernel crashes without a reboot. See `repair-guest --help`.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use loader::access::{Endpoint, GuestAccess};
use loader::attach::{Attached, QemuGuest};
use loader::flow::{FlowConfig, Mode, Session};
use loader::supervise::{Supervisor, SupervisorNote, TrapRecorder};
use loader::watch::{watch, Event, EventSink, WatchConfig, WatchEnd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Exit codes, one per class of failure (listed in `--help`).
mod exit {
    /// Bad input: arguments, a missing or unreadable file.
    pub const BAD_INPUT: i32 = 2;
    /// The image was refused: it is not for the guest's kernel build.
    pub const REFUSED: i32 = 3;
    /// The guest is gone or unreachable (QEMU exited, a socket is dead).
    pub const GUEST_GONE: i32 = 4;
    /// An internal error of ours (a bug: a panic).
    pub const INTERNAL: i32 = 5;
}

#[derive(Parser, Debug)]
#[command(
    name = "repair-guest",
    version,
    about = "Repairs crashed Linux guests without a reboot",
    long_about = "Repairs crashed Linux guests without a reboot.\n\n\
        It attaches to QEMU's gdbstub (start QEMU with `-gdb unix:PATH,server=on,wait=off` or `-s`), \
        traps the guest at the entry of panic(), injects the repair kernel of a repair image \
        (build-repair-image) into the crashed vCPU, and applies its verdict: kill the task that \
        crashed the kernel and resume, or decline with a reason and let the panic complete.\n\n\
        ADDR is unix:PATH or tcp:HOST:PORT.\n\n\
        The first law: with this tool attached, dying, restarting or detaching, a guest is never worse \
        off than without it. Every way out removes the trap and resumes the guest if the stop was ours; \
        a guest someone else paused stays paused.\n\n\
        Exit status: 0 done; 1 failed (the message says what, and in which state the guest was left); \
        2 bad input (arguments, files); 3 image refused (another kernel build); \
        4 guest gone or unreachable; 5 internal error (a bug)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("reach").args(["gdb", "qmp", "libvirt"]).required(true).multiple(true)))]
struct Attach {
    /// The guest's gdbstub: unix:PATH or tcp:HOST:PORT. Without it, --qmp is
    /// needed: the gdbstub is then opened through QMP on a private socket and
    /// closed when we leave, and guest RAM is read in QEMU's process
    /// (/proc/PID/mem) unless --ram-file is given.
    #[arg(long, value_name = "ADDR")]
    gdb: Option<String>,
    /// The repair image built for the guest's kernel (build-repair-image),
    /// or `auto`: built now from the running guest's own BTF and kallsyms
    /// (no vmlinux needed; the kernel needs CONFIG_DEBUG_INFO_BTF) and
    /// cached by build-id in ~/.cache/crash-repair/images.
    #[arg(long, value_name = "IMAGE|auto")]
    image: PathBuf,
    /// QEMU's QMP socket (unix:PATH or tcp:HOST:PORT): run states, events, the
    /// RAM size; alone (no --gdb), also the way to the gdbstub and to RAM.
    #[arg(long, value_name = "ADDR")]
    qmp: Option<String>,
    /// The file backing guest RAM (QEMU `-object memory-backend-file,mem-path=FILE,share=on`):
    /// memory is then read at memory speed instead of through the gdbstub.
    #[arg(long, value_name = "FILE")]
    ram_file: Option<PathBuf>,
    /// Guest-physical range the repair kernel borrows, BASE:SIZE (hex),
    /// saved and restored byte for byte around each run.
    #[arg(long, value_name = "BASE:SIZE", default_value = "0x10000:0x80000", conflicts_with = "reserve")]
    borrow: String,
    /// Instead of borrowing: a guest-physical range reserved for the repair
    /// kernel (boot the guest with `memmap=SIZE$BASE`), BASE:SIZE (hex).
    /// Staged once, never saved or restored; needed for --integrity.
    #[arg(long, value_name = "BASE:SIZE")]
    reserve: Option<String>,
    /// Kernel text repair: take the healthy snapshot of the guest's text and
    /// rodata (hashes and pristine pages) when attaching and stage it in the
    /// --reserve range; the repair kernel then checks every page and
    /// restores corrupted ones before deciding. Costs about 0.3 ms of repair
    /// time per page under TCG.
    #[arg(long, requires = "reserve")]
    integrity: bool,
    /// The guest's name in events; default: QMP `query-name`, else the
    /// gdbstub's address.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// A libvirt domain, reached through libvirt alone (no change to its
    /// XML): QMP through libvirt's monitor passthrough, run-state events
    /// from libvirt's own (virsh suspend stays a pause, virsh reset
    /// re-arms), the gdbstub opened at run time, RAM through QEMU's memfd
    /// or file when the domain's RAM is shared. Needs virsh.
    #[arg(long, value_name = "DOMAIN", conflicts_with_all = ["gdb", "qmp"])]
    libvirt: Option<String>,
    /// The libvirt connection URI for --libvirt (default: virsh's own,
    /// qemu:///system for root).
    #[arg(long, value_name = "URI", requires = "libvirt")]
    connect: Option<String>,
    /// QEMU's pid when known otherwise than from QMP (--libvirt).
    #[arg(skip)]
    qemu_pid: Option<u32>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stay attached and repair every crash; one JSON line per event.
    Watch {
        #[command(flatten)]
        attach: Attach,
        /// Where events go: a file, or - for standard output.
        #[arg(long, value_name = "FILE|-", default_value = "-")]
        events: String,
        /// Detach after this many repairs.
        #[arg(long, value_name = "N")]
        max_repairs: Option<u32>,
        /// Detect hangs from outside: sample each CPU's running task and
        /// context switches in guest RAM (no stop) and repair a task that
        /// spins in the kernel as a crash there would be. Needs --ram-file,
        /// and --qmp (QEMU's vCPU threads, so a host that starves QEMU is
        /// not taken for a hang; run states, so a paused guest is not).
        /// (With --libvirt: the domain's RAM must be shared, memfd or file.)
        #[arg(long)]
        hangs: bool,
        /// How long a CPU (or a task in uninterruptible sleep) may go
        /// without progress before it is reported as a hang.
        #[arg(long, value_name = "MS", default_value_t = 500)]
        hang_threshold_ms: u64,
        /// A hang is acted on only once certain: a CPU with IRQs off (no
        /// timer tick) for the threshold, or a task spinning in the same
        /// few kernel states for this long (default: the guest's own
        /// soft-lockup limit, 2 x watchdog_thresh, else 20 s), of vCPU time.
        #[arg(long, value_name = "MS")]
        hang_kill_after_ms: Option<u64>,
        /// Act on every hang as soon as it is detected (the old policy: may
        /// kill a long but healthy kernel loop).
        #[arg(long)]
        hang_kill_at_detection: bool,
        /// The watch runs in a worker process that this one supervises: a
        /// worker that dies (even by SIGKILL) is restarted within a second,
        /// at most N times a minute; past that (or with 0) the supervisor
        /// removes the trap and resumes the guest if the stop was ours.
        #[arg(long, value_name = "N", default_value_t = 5)]
        restarts: u32,
        /// Wait up to SECS for the guest's kernel to come up before
        /// attaching (and, with --libvirt, for the domain to run): for a
        /// watcher started with the guest (the libvirt hook, the daemon).
        #[arg(long, value_name = "SECS")]
        wait_boot: Option<u64>,
        /// Internal: this process is the supervised worker.
        #[arg(long, hide = true)]
        supervised: bool,
        #[command(flatten)]
        rollback: repair_guest::rollback::RollbackArgs,
    },
    /// Watch every opted-in guest of a host: libvirt domains (--libvirt)
    /// or QEMUs whose sockets are in a directory (--sockets), each in its
    /// own supervised watcher; picks up guests that start, drops those
    /// that go.
    Daemon(repair_guest::daemon::DaemonArgs),
    /// One-shot repair of a guest stopped at a crash (forensic mode).
    Repair {
        #[command(flatten)]
        attach: Attach,
        /// Instead of acting on the guest as it is, arm the trap at panic,
        /// let the guest run, and repair the next crash (up to SECS seconds).
        #[arg(long, value_name = "SECS")]
        wait_crash: Option<u64>,
    },
    /// Read-only report of a stopped guest: crash, offender, backtrace,
    /// log tail, task list. Changes nothing in the guest.
    Diagnose {
        #[command(flatten)]
        attach: Attach,
        /// The guest kernel's vmlinux, to name backtrace frames with
        /// function+offset and file:line. Without it, an image built from
        /// BTF (build-repair-image --kernel, --image auto) names them from
        /// the guest's own kallsyms (function+offset/size, no file:line).
        #[arg(long, value_name = "PATH")]
        vmlinux: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Arm the trap at panic, let the guest run, and diagnose the next
        /// crash (up to SECS seconds); the panic then completes as it would
        /// have without us.
        #[arg(long, value_name = "SECS")]
        wait_crash: Option<u64>,
    },
    /// Take the healthy snapshot of a running guest's kernel text and
    /// read-only data (after its boot-time patching) and write a copy of
    /// the image that carries their hashes (and, with --pristine, the
    /// pages themselves). `diagnose` then reports integrity against what
    /// this guest ran when healthy. The guest is paused while it is read.
    Snapshot {
        #[command(flatten)]
        attach: Attach,
        /// Where to write the image with the live snapshot.
        #[arg(long, value_name = "IMAGE")]
        output: PathBuf,
        /// Also carry the pristine pages (megabytes), not only their hashes.
        #[arg(long)]
        pristine: bool,
    },
    /// The demo: boot the guest kit's Debian guest, watch it, crash a
    /// process in it, repair it, show it carrying on.
    Demo {
        /// Crashes to make, one after another.
        #[arg(long, default_value_t = 3)]
        crashes: u32,
    },
    /// Replay a QEMU dump-guest-memory ELF dump taken at the trap in a fresh
    /// in-process KVM VM: run the repair kernel there, print its verdict and
    /// diagnosis (reported, not applied).
    Replay {
        /// The dump (QMP dump-guest-memory, ELF format).
        dump: PathBuf,
        /// The repair image built for the dumped guest's kernel.
        #[arg(long, value_name = "IMAGE")]
        image: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The crash catalogue: every LKDTM type on the kit's LKDTM kernel,
    /// watched; writes the Markdown table and JSON.
    Campaign(repair_guest::campaign::CampaignArgs),
    /// Warm restart of QEMU: move the running guest to a new QEMU process
    /// (the same binary, or --qemu for an update) with its RAM left in
    /// place, through QEMU 10's cpr-transfer migration. The guest pauses
    /// for about 0.1 s; a watcher follows it to the new QEMU. Needs QEMU
    /// 10.0+, RAM in memory-backend-file/memfd with share=on, and
    /// `-machine aux-ram-share=on`. Prints one JSON line.
    RestartVmm(repair_guest::restart::RestartArgs),
}

fn parse_hex(s: &str) -> Result<u64> {
    let t = s.trim();
    let v = if let Some(h) = t.strip_prefix("0x") { u64::from_str_radix(h, 16) } else { t.parse() };
    v.with_context(|| format!("{s:?} is not a number (use 0x... for hex)"))
}

/// The flow's configuration from the attach options.
impl Attach {
    /// The guest's address for messages: the gdbstub's, else QMP's.
    fn addr(&self) -> &str {
        self.libvirt.as_deref().or(self.gdb.as_deref()).or(self.qmp.as_deref()).unwrap_or("?")
    }

    fn gdb_endpoint(&self) -> Result<Option<Endpoint>> {
        self.gdb.as_deref().map(str::parse).transpose().with_context(|| format!("--gdb {:?}", self.gdb))
    }
}

fn flow_config(a: &Attach) -> Result<FlowConfig> {
    let mut cfg = FlowConfig { integrity: a.integrity, ..FlowConfig::default() };
    let (flag, range) = match &a.reserve {
        Some(r) => ("--reserve", r),
        None => ("--borrow", &a.borrow),
    };
    let (base, size) = range.split_once(':').with_context(|| format!("{flag} {range:?}: expected BASE:SIZE"))?;
    cfg.borrowed_base = loader::access::Gpa(parse_hex(base)?);
    cfg.borrowed_size = parse_hex(size)?;
    cfg.reserved = a.reserve.is_some();
    // Under a supervisor, each repair is journalled so that a worker killed
    // mid-repair is undone by the next one (or by the supervisor).
    cfg.journal = loader::supervise::journal_path();
    if std::env::var_os(ABORT_ONCE_ENV).is_some() {
        cfg.after_stage = Some(abort_once);
    }
    Ok(cfg)
}

/// Fault injection for the tests of the repair journal: when this names an
/// existing file, the process removes it and aborts right after staging the
/// repair kernel, as a watcher killed mid-repair would stop.
const ABORT_ONCE_ENV: &str = "REPAIR_GUEST_TEST_ABORT_ONCE";

fn abort_once() {
    if let Some(flag) = std::env::var_os(ABORT_ONCE_ENV) {
        if std::fs::remove_file(flag).is_ok() {
            std::process::abort();
        }
    }
}

fn load_image(path: &Path) -> Result<builder::RepairImage> {
    builder::RepairImage::read(path).with_context(|| format!("reading the repair image {}", path.display()))
}

/// Connects (QMP first, then the gdbstub: see `loader::attach`) and attaches
/// the repair flow. From the connection on, every way out (an error, a
/// panic) resumes the guest if the stop is ours: `GdbGuest`'s Drop.
fn attach(a: &Attach) -> Result<(Attached, Session)> {
    let auto = a.image.as_os_str() == "auto";
    let image = if auto { None } else { Some(load_image(&a.image)?) };
    let cfg = flow_config(a)?;
    let spec = QemuGuest {
        gdb: a.gdb_endpoint()?,
        qmp: a.qmp.as_deref().map(str::parse).transpose().with_context(|| format!("--qmp {:?}", a.qmp))?,
        ram_file: a.ram_file.clone(),
    };
    let mut attached = spec.connect().with_context(|| format!("connecting to the guest at {}", a.addr()))?;
    if a.ram_file.is_none() {
        eprintln!("repair-guest: guest memory through {}", attached.backend.memory_path());
    }
    let image = match image {
        Some(image) => image,
        None => auto_image(&mut attached)?,
    };
    let mut session = attached
        .session(image, cfg)
        .with_context(|| format!("attaching to the guest at {} with image {}", a.addr(), a.image.display()))?;
    if a.integrity {
        let g = attached.guest();
        let bar = indicatif::ProgressBar::new(0).with_message("healthy snapshot of kernel text and rodata");
        let stats = loader::snapshot::take_live_snapshot(g, &mut session, true, |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })?;
        bar.finish_and_clear();
        session.replan().context("staging the snapshot in the --reserve range")?;
        eprintln!("repair-guest: healthy snapshot of {} pages staged for text repair", stats.pages);
    }
    Ok((attached, session))
}

/// `--image auto`: the image of the running kernel, from the cache or
/// built from its memory (the guest is stopped: our gdbstub connection
/// stopped it, and every way out resumes it if that stop was ours).
fn auto_image(attached: &mut Attached) -> Result<builder::RepairImage> {
    let ram_end = match attached.ram_end {
        Some(e) => e,
        None => loader::guestmem::probe_ram_end(attached.guest())?,
    };
    let cache = loader::autoimage::cache_dir();
    let (image, stats) = loader::autoimage::image_from_guest(attached.guest(), ram_end, Some(&cache))
        .context("building the repair image from the running guest (--image auto)")?;
    match &stats.cached {
        Some(p) => eprintln!("repair-guest: image of {} (build-id {}) from the cache: {}", stats.release, stats.build_id, p.display()),
        None => eprintln!(
            "repair-guest: image of {} built from the guest's BTF and kallsyms ({} MiB read in {:.2} s, built in {:.2} s){}",
            stats.release,
            stats.read_bytes >> 20,
            stats.read_time.as_secs_f64(),
            stats.build_time.as_secs_f64(),
            stats.saved.as_ref().map(|p| format!(", cached as {}", p.display())).unwrap_or_default()
        ),
    }
    Ok(image)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        if let Err(e) = signal_flag(sig, stop.clone()) {
            eprintln!("repair-guest: error: {e:#}");
            std::process::exit(exit::INTERNAL);
        }
    }
    // A panic unwinds through the guest connection's Drop, which removes
    // our trap and resumes the guest if the stop was ours; then it is an
    // internal error.
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli, stop))) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("repair-guest: error: {e:#}");
            exit_code(&e)
        }
        Err(_) => {
            eprintln!(
                "repair-guest: internal error (a bug; the message is above). The trap was removed and the guest \
                 resumed if we had stopped it."
            );
            exit::INTERNAL
        }
    };
    std::process::exit(code);
}

/// The exit code of an error: its class, from the causes in its chain.
fn exit_code(e: &anyhow::Error) -> i32 {
    use loader::access::AccessError;
    use loader::flow::FlowError;
    use loader::kaslr::KaslrError;
    for cause in e.chain() {
        if let Some(k) = cause.downcast_ref::<KaslrError>() {
            if matches!(k, KaslrError::BannerMismatch { .. }) {
                return exit::REFUSED;
            }
        }
        if let Some(FlowError::Kaslr(KaslrError::BannerMismatch { .. })) = cause.downcast_ref::<FlowError>() {
            return exit::REFUSED;
        }
        let access = cause
            .downcast_ref::<AccessError>()
            .or_else(|| match cause.downcast_ref::<FlowError>() {
                Some(FlowError::Access(a)) => Some(a),
                _ => None,
            });
        match access {
            Some(AccessError::GuestGone(_) | AccessError::Connect { .. }) => return exit::GUEST_GONE,
            Some(AccessError::BadAddress(_)) => return exit::BAD_INPUT,
            _ => {}
        }
        // What the guest's QEMU must be for checkpoints or a warm restart.
        if matches!(
            cause.downcast_ref::<loader::cpr::CprError>(),
            Some(loader::cpr::CprError::TooOld(..) | loader::cpr::CprError::RamNotShared(_) | loader::cpr::CprError::NoAuxRamShare | loader::cpr::CprError::NoPid)
        ) || matches!(
            cause.downcast_ref::<loader::checkpoint::CheckpointError>(),
            Some(loader::checkpoint::CheckpointError::Disk { .. } | loader::checkpoint::CheckpointError::NoQmp)
        ) {
            return exit::BAD_INPUT;
        }
        if cause.downcast_ref::<builder::ImageError>().is_some()
            || cause.downcast_ref::<loader::symbolize::SymbolizeError>().is_some()
            || cause.downcast_ref::<std::io::Error>().is_some()
        {
            return exit::BAD_INPUT;
        }
    }
    1
}

/// The events destination: a file (appended to) or standard output.
fn event_sink(events: &str, name: Option<String>) -> Result<EventSink> {
    let mut sink = if events == "-" {
        EventSink::stdout()
    } else {
        EventSink::file(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(events)
                .with_context(|| format!("opening the events file {events}"))?,
        )
    };
    sink.guest = name;
    Ok(sink)
}

/// `watch` without `--supervised`: run the watch in a worker process and
/// supervise it (see `loader::supervise`).
fn supervise(a: &Attach, events: &str, restarts: u32, stop: &AtomicBool) -> Result<i32> {
    let gdb = a.gdb_endpoint()?;
    let qmp: Option<Endpoint> = a.qmp.as_deref().map(str::parse).transpose().context("--qmp")?;
    let mut sink = event_sink(events, Some(a.name.clone().unwrap_or_else(|| a.addr().to_string())))?;
    let exe = std::env::current_exe().context("finding our own executable to start the worker")?;
    let mut worker = std::process::Command::new(exe);
    worker.args(std::env::args_os().skip(1)).arg("--supervised");
    let dir = tempfile::Builder::new().prefix("repair-guest-").tempdir().context("making a scratch directory")?;
    let mut sup = Supervisor { worker, restarts, gdb, qmp, trap_file: dir.path().join("trap") };
    let code = sup.run(stop, |n| match n {
        SupervisorNote::Restarted { pid, how } => sink.emit(&Event {
            event: "error",
            message: Some(format!("the watcher (pid {pid}) died ({how}); restarting it")),
            ..Default::default()
        }),
        SupervisorNote::ClosedGdbstub { pid, what } => sink.emit(&Event {
            event: "detached",
            message: Some(match what {
                Ok(what) => format!("the watcher (pid {pid}) ended and left its gdbstub open: {what}"),
                Err(e) => format!("the watcher (pid {pid}) ended and left its gdbstub open; closing it failed: {e}"),
            }),
            ..Default::default()
        }),
        SupervisorNote::GaveUp { pid, how, rescue } => sink.emit(&Event {
            event: "detached",
            message: Some(match rescue {
                Ok(what) => format!("the watcher (pid {pid}) died ({how}) and is not restarted: {what}"),
                Err(e) => format!(
                    "the watcher (pid {pid}) died ({how}) and is not restarted; removing its trap failed: {e}"
                ),
            }),
            ..Default::default()
        }),
    })?;
    Ok(code)
}

fn run(mut cli: Cli, stop: Arc<AtomicBool>) -> Result<i32> {
    // --libvirt: the domain resolved to QMP (served from libvirt), its RAM
    // and QEMU's pid; kept for the whole run.
    let _libvirt = match &mut cli.command {
        Command::Watch { attach, hangs, wait_boot, .. } => {
            let wait = wait_boot.map(std::time::Duration::from_secs);
            let link = libvirt_link(attach, wait, &stop)?;
            if *hangs && (attach.ram_file.is_none() || attach.qmp.is_none()) {
                eprintln!("repair-guest: error: --hangs needs --ram-file and --qmp (with --libvirt: a domain with shared RAM)");
                return Ok(exit::BAD_INPUT);
            }
            link
        }
        Command::Repair { attach, .. } | Command::Diagnose { attach, .. } | Command::Snapshot { attach, .. } => {
            libvirt_link(attach, None, &stop)?
        }
        _ => None,
    };
    match cli.command {
        Command::Watch { attach: a, events, restarts, supervised: false, .. } => supervise(&a, &events, restarts, &stop),
        Command::Watch {
            attach: a,
            events,
            max_repairs,
            hangs,
            hang_threshold_ms,
            hang_kill_after_ms,
            hang_kill_at_detection,
            wait_boot,
            rollback,
            ..
        } => loop {
            let (mut attached, mut session) = attach_when_up(&a, wait_boot, &stop)?;
            let policy = HangPolicyArgs {
                threshold: std::time::Duration::from_millis(hang_threshold_ms),
                kill_after: hang_kill_after_ms.map(std::time::Duration::from_millis),
                at_detection: hang_kill_at_detection,
            };
            let hangs = if hangs { Some(hang_watch(&a, &session, &mut attached, policy)?) } else { None };
            let name = a.name.clone().unwrap_or_else(|| attached.name.clone());
            let mut sink = event_sink(&events, Some(name))?;
            if attached.qmp.is_none() {
                eprintln!(
                    "repair-guest: without --qmp, a pause made through another monitor is told from ours only by its \
                     signal, and a reset of the guest goes unseen"
                );
            }
            let rollback = rollback.open(attached.qmp.as_mut())?;
            let cfg = WatchConfig {
                max_repairs,
                found_paused: !attached.stop_is_ours(),
                rollback,
                qmp: attached.qmp.take(),
                hangs,
                crash_context: attached.fast_memory(),
                record: TrapRecorder::from_env(),
            };
            let end = watch(attached.guest(), &mut session, &mut sink, stop.clone(), cfg)?;
            tracing::info!(?end, "watch ended");
            if end != WatchEnd::Migrated {
                break Ok(if end == WatchEnd::GuestGone { exit::GUEST_GONE } else { 0 });
            }
            // The guest moved to a new QEMU (restart-vmm): follow it to the
            // same addresses once it runs there.
            drop(attached);
            repair_guest::restart::await_new_qemu(a.qmp.as_deref(), &stop)?;
        },
        Command::Repair { attach: a, wait_crash } => {
            let (mut attached, mut session) = attach(&a)?;
            // A repair acts on a crash and resumes: whoever paused the
            // guest at its panic asked for exactly that.
            attached.backend.gdb().resume_on_drop = true;
            let g = attached.guest();
            let vcpu = match wait_crash {
                Some(secs) => wait_for_crash(g, &mut session, secs, &stop)?,
                None => loader::report::crashed_vcpu(g, session.panic_addr()?)?,
            };
            let outcome = session.repair(g, vcpu, Mode::Repair)?;
            let mut sink = EventSink::stdout();
            sink.emit(&Event::crash(&outcome));
            session.disarm(g)?;
            g.resume().context("resuming the guest")?;
            sink.emit(&Event::verdict(&outcome, 0.0));
            Ok(0)
        }
        Command::Diagnose { attach: a, vmlinux, json, wait_crash } => {
            let (mut attached, mut session) = attach(&a)?;
            let sym = match &vmlinux {
                Some(p) => Some(loader::symbolize::Symbolizer::from_vmlinux(p)?),
                None => None,
            };
            let g = attached.guest();
            let vcpu = match wait_crash {
                Some(secs) => wait_for_crash(g, &mut session, secs, &stop)?,
                None => loader::report::crashed_vcpu(g, session.panic_addr()?)?,
            };
            let report = loader::report::diagnose(g, &session, vcpu, sym.as_ref(), 40)?;
            if wait_crash.is_some() {
                // Leave no trap behind; the panic takes its course.
                session.disarm(g)?;
                g.resume().context("resuming the guest")?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", repair_guest::render::render_text(&report));
                if vmlinux.is_none() && report.backtrace.iter().all(|f| f.function.is_none()) {
                    println!("(pass --vmlinux PATH to name the backtrace's frames)");
                } else if vmlinux.is_none() {
                    println!("(frames named from the guest's kallsyms; pass --vmlinux PATH for file:line)");
                }
            }
            // Leaving: the guest goes back to the run state we found it in
            // (GdbGuest's Drop).
            Ok(0)
        }
        Command::Snapshot { attach: a, output, pristine } => {
            let (mut attached, mut session) = attach(&a)?;
            let g = attached.guest();
            let bar = indicatif::ProgressBar::new(0).with_message("reading kernel text and rodata");
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} pages")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let stats = loader::snapshot::take_live_snapshot(g, &mut session, pristine, |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })?;
            bar.finish_and_clear();
            g.resume().context("resuming the guest")?;
            session.image.write(&output).with_context(|| format!("writing {}", output.display()))?;
            eprintln!(
                "snapshot of {} pages ({} unmapped) from the live guest written into {}",
                stats.pages,
                stats.unmapped,
                output.display()
            );
            Ok(0)
        }
        Command::Demo { crashes } => repair_guest::demo::run(crashes).map(|()| 0),
        Command::Replay { dump, image, json } => repair_guest::replay::run(&dump, &image, json).map(|()| 0),
        Command::Campaign(args) => repair_guest::campaign::cli(&args).map(|()| 0),
        Command::Daemon(args) => repair_guest::daemon::run(&args, &stop),
        Command::RestartVmm(args) => repair_guest::restart::run(&args).map(|()| 0),
    }
}

/// `--libvirt`: links the domain and points the attach at it.
fn libvirt_link(a: &mut Attach, wait: Option<std::time::Duration>, stop: &AtomicBool) -> Result<Option<repair_guest::libvirt::Link>> {
    let Some(dom) = a.libvirt.clone() else { return Ok(None) };
    let link = repair_guest::libvirt::link(&dom, a.connect.as_deref(), wait, stop)?;
    a.qmp = Some(link.qmp_addr());
    if a.ram_file.is_none() {
        a.ram_file = link.ram_file.clone();
    }
    a.name.get_or_insert(dom);
    a.qemu_pid = Some(link.pid);
    Ok(Some(link))
}

/// [`attach`], tried again while the guest's kernel is not up yet, for up
/// to `wait_boot` seconds.
fn attach_when_up(a: &Attach, wait_boot: Option<u64>, stop: &AtomicBool) -> Result<(Attached, Session)> {
    let deadline = wait_boot.map(|s| std::time::Instant::now() + std::time::Duration::from_secs(s));
    loop {
        match attach(a) {
            Err(e)
                if deadline.is_some_and(|d| std::time::Instant::now() < d)
                    && !stop.load(Ordering::Relaxed)
                    && repair_guest::libvirt::kernel_not_up(&e) =>
            {
                tracing::info!("the guest's kernel is not up yet ({e:#}); trying again");
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

/// The hang options of `watch`.
#[derive(Debug, Clone, Copy)]
struct HangPolicyArgs {
    threshold: std::time::Duration,
    kill_after: Option<std::time::Duration>,
    at_detection: bool,
}

/// The hang sampler of `watch --hangs`, made for each kernel instance: its
/// own mapping of the RAM file, the kernel's page tables, the layout from
/// the image at the session's slide, and QEMU's vCPU threads (from QMP
/// `query-cpus-fast`) to count only time the vCPUs really ran.
fn hang_watch(a: &Attach, session: &Session, attached: &mut Attached, p: HangPolicyArgs) -> Result<loader::watch::HangWatch> {
    use repair_guest::hangs;
    let path = a.ram_file.clone().context("--hangs needs --ram-file")?;
    let qmp = attached.qmp.as_mut().context("--hangs needs --qmp")?;
    let pid = a.qemu_pid.or_else(|| qmp.peer_pid());
    let (vcpu_threads, _) = hangs::vcpu_threads(qmp, pid, session.nr_vcpus);
    if vcpu_threads.is_none() {
        eprintln!(
            "repair-guest: QEMU's vCPU threads are unknown (QMP over TCP, another host, or single-threaded TCG): \
             a host that starves QEMU may look like a hang"
        );
    }
    let ram_regions = attached.backend.ram_file_regions().context("--hangs needs --ram-file")?;
    let spec = hangs::SamplerSpec {
        ram_file: path,
        ram_regions,
        nr_vcpus: session.nr_vcpus,
        cfg: hangs::hang_config(p.threshold, p.kill_after, p.at_detection),
        vcpu_threads,
        layout: None,
    };
    Ok(hangs::hang_watch(spec, true, None))
}

/// Arms the trap, lets the guest run and waits for it to stop at `panic`;
/// returns the crashed vCPU, held at the entry of `panic`.
fn wait_for_crash(g: &mut dyn GuestAccess, session: &mut Session, secs: u64, stop: &AtomicBool) -> Result<loader::access::VcpuId> {
    session.arm(g)?;
    let panic = session.panic_addr()?;
    g.resume().context("resuming the guest")?;
    eprintln!("repair-guest: trap armed at panic ({panic:#x}); waiting up to {secs} s for a crash");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if stop.load(Ordering::Relaxed) {
            g.pause()?;
            session.disarm(g)?;
            g.resume()?;
            bail!("stopped by a signal before any crash; the guest runs on, untouched");
        }
        match g.wait_stop(Some(left.min(std::time::Duration::from_millis(200))))? {
            Some(ev) if ev.rip == panic => return Ok(ev.vcpu),
            Some(_) => g.resume()?,
            None if !left.is_zero() => {}
            None => {
                g.pause()?;
                session.disarm(g)?;
                g.resume()?;
                bail!("no crash within {secs} s; the guest runs on, untouched");
            }
        }
    }
}

/// Sets `flag` when `sig` arrives.
fn signal_flag(sig: libc::c_int, flag: Arc<AtomicBool>) -> Result<()> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn on_signal(_: libc::c_int) {
        if let Some(f) = FLAG.get() {
            f.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    // SAFETY: `on_signal` only performs an atomic store, which is
    // async-signal-safe; the handler stays valid for the program's life.
    let r = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    if r == libc::SIG_ERR {
        bail!("cannot install a handler for signal {sig}");
    }
    Ok(())
}
