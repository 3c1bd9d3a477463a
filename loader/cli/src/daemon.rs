//! `repair-guest daemon`: one service that watches every opted-in guest of
//! a host.
//!
//! Each guest gets its own supervised watcher (`repair-guest watch`, a
//! process of its own with its own worker, state and event stream), so one
//! guest's failure, or its watcher's, never touches another's. The daemon
//! finds guests as they start (libvirt's lifecycle events, and a periodic
//! scan), drops those that go, and starts a watcher again, after a pause,
//! if one ends while its guest still runs. Killed, it takes its watchers
//! with it the clean way: each gets SIGTERM (`PR_SET_PDEATHSIG`) and
//! detaches, removing its trap.
//!
//! Guests:
//! - `--libvirt`: the running domains of the connection that opt in, by our
//!   metadata element (`<watch image="..."/>` in namespace
//!   [`METADATA_URI`], which may name the image) or by `--domain NAME`;
//! - `--sockets DIR`: every QEMU with a QMP socket `DIR/NAME.qmp` (and, if
//!   present, its gdbstub `DIR/NAME.gdb` and RAM file `DIR/NAME.ram`).

use anyhow::{bail, Context, Result};
use loader::libvirt::{active_domains, metadata_attr, Domain, METADATA_URI};
use loader::watch::{Event, EventSink};
use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `repair-guest daemon` options.
#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("source").args(["libvirt", "sockets"]).required(true)))]
pub struct DaemonArgs {
    /// Watch libvirt domains that opt in: by the metadata element
    /// `<watch image="IMAGE" hangs="yes"/>` in namespace
    /// urn:crash-repair:libvirt:1 (virsh metadata DOMAIN
    /// urn:crash-repair:libvirt:1 --key crash-repair --set '<watch image="..."/>'),
    /// or by --domain.
    #[arg(long)]
    pub libvirt: bool,
    /// The libvirt connection URI (default: virsh's own).
    #[arg(long, value_name = "URI", requires = "libvirt")]
    pub connect: Option<String>,
    /// A domain opted in by name (repeatable), watched with --image.
    #[arg(long = "domain", value_name = "NAME", requires = "libvirt")]
    pub domains: Vec<String>,
    /// Watch every QEMU with a QMP socket DIR/NAME.qmp (gdbstub DIR/NAME.gdb
    /// and RAM file DIR/NAME.ram used when present).
    #[arg(long, value_name = "DIR")]
    pub sockets: Option<PathBuf>,
    /// The repair image for guests whose opt-in names none.
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    /// Where each guest's events (NAME.events, JSON lines) and its watcher's
    /// messages (NAME.log) go.
    #[arg(long, value_name = "DIR", default_value = "/var/log/crash-repair")]
    pub events_dir: PathBuf,
    /// Hang detection for every guest (`watch --hangs`; needs shared RAM).
    #[arg(long)]
    pub hangs: bool,
    /// How often to look for guests besides libvirt's events.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub scan_secs: u64,
    /// More options for every `watch` (repeatable), e.g. --watch-arg=--restarts=3.
    #[arg(long = "watch-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub watch_args: Vec<String>,
}

/// A guest found, and how to watch it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Found {
    /// `watch` options that reach it.
    reach: Vec<String>,
    image: PathBuf,
    hangs: bool,
}

/// A guest being watched.
struct Watched {
    child: Child,
    started: Instant,
}

/// A guest whose watcher ended while the guest ran on: started again at
/// `at`.
struct Retry {
    at: Instant,
}

pub fn run(args: &DaemonArgs, stop: &AtomicBool) -> Result<i32> {
    std::fs::create_dir_all(&args.events_dir)
        .with_context(|| format!("creating the events directory {}", args.events_dir.display()))?;
    if let Some(img) = &args.image {
        // `auto`: each watcher builds its guest's image from its memory.
        if !img.is_file() && img.as_os_str() != "auto" {
            bail!("--image {}: no such file (build one with build-repair-image, or give auto)", img.display());
        }
    }
    if let Some(dir) = &args.sockets {
        if !dir.is_dir() {
            bail!("--sockets {}: not a directory", dir.display());
        }
    }
    let exe = std::env::current_exe().context("finding our own executable for the watchers")?;
    let mut sink = EventSink::stdout();
    sink.guest = Some("daemon".into());
    let (tx, rx) = mpsc::channel::<()>();
    let _events = if args.libvirt { libvirt_events(args.connect.as_deref(), tx) } else { None };
    let mut watched: BTreeMap<String, Watched> = BTreeMap::new();
    let mut retry: BTreeMap<String, Retry> = BTreeMap::new();
    let mut complained: BTreeMap<String, String> = BTreeMap::new();
    let mut next_scan = Instant::now();
    sink.emit(&Event {
        event: "attached",
        message: Some(match &args.sockets {
            Some(d) => format!("daemon watching the QEMUs of {}", d.display()),
            None => format!("daemon watching the opted-in libvirt domains of {}", args.connect.as_deref().unwrap_or("the default connection")),
        }),
        ..Default::default()
    });
    while !stop.load(Ordering::Relaxed) {
        // Reap watchers that ended.
        let ended: Vec<String> = watched
            .iter_mut()
            .filter_map(|(n, w)| matches!(w.child.try_wait(), Ok(Some(_))).then(|| n.clone()))
            .collect();
        for name in ended {
            let Some(mut w) = watched.remove(&name) else { continue };
            let status = w.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            if guest_alive(args, &name) {
                let wait = if w.started.elapsed() < Duration::from_secs(60) { 30 } else { 5 };
                sink.emit(&Event {
                    event: "error",
                    guest: Some(name.clone()),
                    message: Some(format!(
                        "its watcher ended ({status}) while the guest runs; starting another in {wait} s (see {})",
                        args.events_dir.join(format!("{name}.log")).display()
                    )),
                    ..Default::default()
                });
                retry.insert(name, Retry { at: Instant::now() + Duration::from_secs(wait) });
            } else {
                sink.emit(&Event {
                    event: "detached",
                    guest: Some(name.clone()),
                    message: Some(format!("the guest is gone; its watcher ended ({status})")),
                    ..Default::default()
                });
            }
        }
        let woke = rx.try_iter().count() > 0;
        if woke || Instant::now() >= next_scan || retry.values().any(|r| Instant::now() >= r.at) {
            next_scan = Instant::now() + Duration::from_secs(args.scan_secs.max(1));
            match discover(args) {
                Ok(found) => {
                    for (name, f) in found {
                        if watched.contains_key(&name) || retry.get(&name).is_some_and(|r| Instant::now() < r.at) {
                            continue;
                        }
                        retry.remove(&name);
                        match f {
                            Ok(f) => match spawn_watch(&exe, args, &name, &f) {
                                Ok(child) => {
                                    complained.remove(&name);
                                    sink.emit(&Event {
                                        event: "attached",
                                        guest: Some(name.clone()),
                                        message: Some(format!(
                                            "watcher started (pid {}, image {}); events in {}",
                                            child.id(),
                                            f.image.display(),
                                            args.events_dir.join(format!("{name}.events")).display()
                                        )),
                                        ..Default::default()
                                    });
                                    watched.insert(name, Watched { child, started: Instant::now() });
                                }
                                Err(e) => tracing::warn!("starting the watcher of {name}: {e:#}"),
                            },
                            Err(why) => {
                                if complained.get(&name) != Some(&why) {
                                    sink.emit(&Event {
                                        event: "refused",
                                        guest: Some(name.clone()),
                                        message: Some(why.clone()),
                                        ..Default::default()
                                    });
                                    complained.insert(name, why);
                                }
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!("looking for guests: {e:#}"),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Stopping: every watcher detaches (SIGTERM), then we go.
    for w in watched.values() {
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // child, not yet reaped.
        unsafe { libc::kill(w.child.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (name, w) in watched.iter_mut() {
        while matches!(w.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        sink.emit(&Event { event: "detached", guest: Some(name.clone()), message: Some("daemon stopping".into()), ..Default::default() });
    }
    Ok(0)
}

/// Whether the guest named `name` still runs.
fn guest_alive(args: &DaemonArgs, name: &str) -> bool {
    match &args.sockets {
        Some(dir) => {
            let p = dir.join(format!("{name}.qmp"));
            p.exists() && !matches!(std::os::unix::net::UnixStream::connect(&p), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
        }
        None => Domain::new(name, args.connect.clone()).is_active().unwrap_or(true),
    }
}

/// The guests there are now, each with how to watch it or why not.
fn discover(args: &DaemonArgs) -> Result<Vec<(String, Result<Found, String>)>> {
    let mut out = Vec::new();
    if let Some(dir) = &args.sockets {
        for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?.flatten() {
            let p = e.path();
            let (Some(stem), Some("qmp")) = (p.file_stem().and_then(|s| s.to_str()), p.extension().and_then(|s| s.to_str())) else {
                continue;
            };
            if !std::fs::metadata(&p).is_ok_and(|m| m.file_type().is_socket()) || !guest_alive(args, stem) {
                continue;
            }
            let mut reach = vec!["--qmp".to_string(), format!("unix:{}", p.display())];
            let gdb = dir.join(format!("{stem}.gdb"));
            if gdb.exists() {
                reach.extend(["--gdb".to_string(), format!("unix:{}", gdb.display())]);
            }
            let ram = dir.join(format!("{stem}.ram"));
            if ram.is_file() {
                reach.extend(["--ram-file".to_string(), ram.display().to_string()]);
            }
            let f = match &args.image {
                Some(image) => Ok(Found { reach, image: image.clone(), hangs: args.hangs && ram.is_file() }),
                None => Err("no --image for this guest".to_string()),
            };
            out.push((stem.to_string(), f));
        }
        return Ok(out);
    }
    let uri = args.connect.as_deref();
    for name in active_domains(uri)? {
        let dom = Domain::new(&name, uri.map(str::to_string));
        let meta = match dom.metadata() {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("metadata of {name}: {e}");
                continue; // gone meanwhile, or not ours to read
            }
        };
        let by_name = args.domains.iter().any(|d| d == &name);
        if meta.is_none() && !by_name {
            continue;
        }
        let image = meta.as_deref().and_then(|m| metadata_attr(m, "image")).map(PathBuf::from).or_else(|| args.image.clone());
        let hangs = args.hangs || meta.as_deref().and_then(|m| metadata_attr(m, "hangs")).is_some_and(|h| h == "yes");
        let mut reach = vec!["--libvirt".to_string(), name.clone()];
        if let Some(u) = uri {
            reach.extend(["--connect".to_string(), u.to_string()]);
        }
        let f = match image {
            Some(image) if image.is_file() || image.as_os_str() == "auto" => Ok(Found { reach, image, hangs }),
            Some(image) => Err(format!("its repair image {} does not exist (build-repair-image)", image.display())),
            None => Err(format!("opted in without an image: set image=\"...\" in its {METADATA_URI} metadata, or give --image")),
        };
        out.push((name, f));
    }
    Ok(out)
}

/// Starts `repair-guest watch` for one guest, its output in the events
/// directory; it gets SIGTERM (and detaches) if the daemon dies.
fn spawn_watch(exe: &Path, args: &DaemonArgs, name: &str, f: &Found) -> Result<Child> {
    let log = args.events_dir.join(format!("{name}.log"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log).with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("watch")
        .args(&f.reach)
        .arg("--image")
        .arg(&f.image)
        .arg("--name")
        .arg(name)
        .arg("--events")
        .arg(args.events_dir.join(format!("{name}.events")))
        .args(["--wait-boot", "600"]);
    if f.hangs {
        cmd.arg("--hangs");
    }
    cmd.args(&args.watch_args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    // SAFETY: the closure only calls prctl, async-signal-safe, between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().context("starting repair-guest watch")
}

/// `virsh event --loop --all` for every domain: a wake-up on each line, so
/// a domain that starts is found at once. Restarted if it ends (libvirtd
/// restarting); the periodic scan covers the gap.
fn libvirt_events(uri: Option<&str>, tx: mpsc::Sender<()>) -> Option<std::thread::JoinHandle<()>> {
    let uri = uri.map(str::to_string);
    std::thread::Builder::new()
        .name("libvirt-events".into())
        .spawn(move || loop {
            let mut cmd = Command::new("virsh");
            cmd.arg("-q");
            if let Some(u) = &uri {
                cmd.args(["-c", u]);
            }
            cmd.args(["event", "--loop", "--all"]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
            // SAFETY: prctl only, between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            match cmd.spawn() {
                Ok(mut child) => {
                    if let Some(out) = child.stdout.take() {
                        use std::io::BufRead;
                        for line in std::io::BufReader::new(out).lines() {
                            if line.is_err() || tx.send(()).is_err() {
                                break;
                            }
                        }
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                }
                Err(e) => tracing::warn!("virsh event: {e}; new domains are found by the periodic scan"),
            }
            std::thread::sleep(Duration::from_secs(5));
        })
        .ok()
}
