//! libvirt guests, with a real libvirtd (`scripts/kit-libvirt`, run by
//! `scripts/setup`, installs and starts it; these tests fail, naming it,
//! when it is missing):
//! - `watch --libvirt DOMAIN`: a crash repaired, `virsh suspend` left
//!   suspended, `virsh resume` watched again, `virsh reset` re-armed and the
//!   next crash repaired, SIGTERM leaves no gdbstub and the domain running;
//! - the hook (`contrib/libvirt/qemu`, installed by kit-libvirt) arms a
//!   domain that opts in by metadata as it starts, and stops its watcher
//!   when it is destroyed;
//! - `repair-guest daemon --libvirt`: three domains, one destroyed midway,
//!   the other two still repaired.
//!
//! Oracles: libvirt's own view (`virsh domstate`), QEMU's run state and
//! chardevs through libvirt's monitor passthrough, and the guest's own
//! report of the crashing child's exit status (137: SIGKILL).
//!
//! The tests share libvirtd and the hook's configuration file, and boot up
//! to three TCG guests: they run one at a time.

mod support;

use harness::libvirt::{virsh, LibvirtConfig, LibvirtGuest};
use harness::Kernel;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

const HOOK_CONF: &str = "/etc/crash-repair/libvirt.conf";

/// Writes the hook's configuration: enabled or not, with this build's
/// program and `log_dir`.
fn hook_conf(enabled: bool, log_dir: &Path) {
    std::fs::create_dir_all("/etc/crash-repair").unwrap();
    std::fs::write(
        HOOK_CONF,
        format!(
            "# written by loader/cli/tests/libvirt.rs\nENABLED={}\nREPAIR_GUEST={}\nLOG_DIR={}\n",
            if enabled { "yes" } else { "no" },
            env!("CARGO_BIN_EXE_repair-guest"),
            log_dir.display()
        ),
    )
    .unwrap();
}

fn start_libvirt_watch(guest: &LibvirtGuest, image: &Path, events: &Path) -> Child {
    let mut w = bin()
        .args(["watch", "--libvirt", guest.name(), "--connect", "qemu:///system"])
        .arg("--image")
        .arg(image)
        .arg("--events")
        .arg(events)
        .stderr(std::fs::File::create(events.with_extension("stderr")).unwrap())
        .spawn()
        .unwrap();
    wait_event(events, "\"attached\"", 1, Duration::from_secs(120), Some(&mut w));
    w
}

fn crash_repaired(guest: &mut LibvirtGuest) {
    let (id, _pid) = guest.crash("sysrq-c").unwrap();
    let status = guest.wait_crash_exit(id, Duration::from_secs(120)).unwrap();
    assert_eq!(status, 137, "the crashing child was not killed; console:\n{}", guest.console_tail(40));
}

fn gdb_chardev(guest: &LibvirtGuest) -> Option<String> {
    let out = virsh(&["qemu-monitor-command", guest.name(), "--hmp", "info chardev"]).unwrap();
    out.lines().find(|l| l.starts_with("gdb:")).map(str::to_string)
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(secs), "{what} within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn watch_libvirt_repairs_keeps_a_suspend_and_rearms_after_reset() {
    let _one = serial();
    let mut guest = LibvirtGuest::boot(&LibvirtConfig::new(Kernel::Debian)).unwrap();
    let image = image_file(guest.kernel(), guest.dir());
    let events = guest.dir().join("events.jsonl");
    let mut w = start_libvirt_watch(&guest, &image, &events);
    let err = std::fs::read_to_string(events.with_extension("stderr")).unwrap_or_default();
    assert!(!err.contains("keeps its RAM private"), "the memfd RAM was not found: {err}");

    // A crash, repaired.
    crash_repaired(&mut guest);
    let text = wait_event(&events, "\"repaired\"", 1, Duration::from_secs(30), Some(&mut w));
    assert!(text.contains(&format!("\"guest\":\"{}\"", guest.name())), "events not named after the domain:\n{text}");

    // virsh suspend: reported, and left suspended.
    guest.virsh_on("suspend").unwrap();
    wait_event(&events, "\"paused\"", 1, Duration::from_secs(30), Some(&mut w));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(guest.state().unwrap(), "paused", "libvirt no longer sees the domain suspended");
    assert_eq!(guest.qemu_status().unwrap(), "paused");
    guest.virsh_on("resume").unwrap();
    wait_event(&events, "\"resumed\"", 1, Duration::from_secs(30), Some(&mut w));
    assert_eq!(guest.state().unwrap(), "running");

    // virsh reset: the trap lifted, set again on the new kernel, and the
    // next crash there repaired.
    guest.virsh_on("reset").unwrap();
    wait_event(&events, "\"reset\"", 1, Duration::from_secs(30), Some(&mut w));
    wait_for("the guest's init ready again after the reset", 180, || {
        guest.console().matches("GUEST-KIT READY").count() >= 2
    });
    wait_event(&events, "\"rearmed\"", 1, Duration::from_secs(120), Some(&mut w));
    crash_repaired(&mut guest);
    wait_event(&events, "\"repaired\"", 2, Duration::from_secs(30), Some(&mut w));
    let v = guest.verify_bystander().unwrap();
    assert!(v.ok, "bystander data after the repairs: {v:?}");

    // SIGTERM: detached, no gdbstub left, the domain running.
    kill(w.id(), libc::SIGTERM);
    let st = wait_exit(&mut w, 60);
    assert!(st.success(), "watcher exit {st}");
    wait_event(&events, "\"detached\"", 1, Duration::from_secs(5), None);
    assert_eq!(gdb_chardev(&guest), None, "a gdbstub was left open");
    assert_eq!(guest.state().unwrap(), "running");
    guest.ping(Duration::from_secs(30)).unwrap();
}

#[test]
fn libvirt_hook_arms_a_domain_that_opts_in_and_stops_with_it() {
    let _one = serial();
    let hook = Path::new("/etc/libvirt/hooks/qemu");
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/libvirt/qemu");
    assert_eq!(
        std::fs::read(hook).ok(),
        Some(std::fs::read(&ours).unwrap()),
        "{} is not contrib/libvirt/qemu: run scripts/kit-libvirt",
        hook.display()
    );
    let logs = tempfile::tempdir().unwrap();
    hook_conf(true, logs.path());
    let image = image_file(Kernel::Debian, logs.path());
    let meta = format!(
        "<cr:watch xmlns:cr='urn:crash-repair:libvirt:1' image='{}'/>",
        image.display()
    );
    let mut guest = LibvirtGuest::boot(&LibvirtConfig::new(Kernel::Debian).with_metadata(meta)).unwrap();
    let events = logs.path().join(format!("{}.events", guest.name()));
    let pidfile = PathBuf::from(format!("/run/crash-repair/{}.pid", guest.name()));
    let log = logs.path().join(format!("{}.log", guest.name()));
    wait_for("the hook's pid file", 30, || pidfile.exists());
    let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(&events).unwrap_or_default().contains("\"attached\"") {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the hook's watcher did not attach; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    crash_repaired(&mut guest);
    wait_event(&events, "\"repaired\"", 1, Duration::from_secs(30), None);

    // Destroyed: the hook stops the watcher.
    guest.destroy().unwrap();
    wait_for("the watcher gone after virsh destroy", 60, || !Path::new(&format!("/proc/{pid}")).exists());
    assert!(!pidfile.exists(), "the hook left its pid file");
}

/// Starts `repair-guest daemon --libvirt` with these arguments.
fn start_daemon(dir: &Path, extra: &[&str]) -> Child {
    bin()
        .args(["daemon", "--libvirt", "--connect", "qemu:///system", "--scan-secs", "5", "--events-dir"])
        .arg(dir)
        .args(extra)
        .stdout(std::fs::File::create(dir.join("daemon.jsonl")).unwrap())
        .stderr(std::fs::File::create(dir.join("daemon.stderr")).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn daemon_watches_three_domains_and_drops_one_destroyed() {
    let _one = serial();
    // Kept if the test fails (each watcher's NAME.log says what it did).
    let kept = tempfile::Builder::new().prefix("libvirt-daemon-test-").tempdir().unwrap().keep();
    eprintln!("daemon test files in {}", kept.display());
    let logs = Keep(kept);
    // The daemon watches: the hook stays out of it.
    hook_conf(false, logs.path());
    let image = image_file(Kernel::Debian, logs.path());
    let meta = format!("<cr:watch xmlns:cr='urn:crash-repair:libvirt:1' image='{}'/>", image.display());
    // One opts in by metadata, two by name; all three boot at once.
    let cfgs = [
        LibvirtConfig::new(Kernel::Debian).with_metadata(meta),
        LibvirtConfig::new(Kernel::Debian),
        LibvirtConfig::new(Kernel::Debian),
    ];
    let mut guests: Vec<LibvirtGuest> = cfgs
        .iter()
        .map(|c| LibvirtGuest::boot(&LibvirtConfig { wait_ready: false, boot_timeout: Duration::from_secs(300), ..c.clone() }).unwrap())
        .collect();
    for g in &mut guests {
        g.wait_for_console("GUEST-KIT READY", Duration::from_secs(300)).unwrap();
    }
    let names: Vec<String> = guests.iter().map(|g| g.name().to_string()).collect();
    let mut daemon = start_daemon(
        logs.path(),
        &["--image", &image.display().to_string(), "--domain", &names[1], "--domain", &names[2]],
    );
    let events: Vec<PathBuf> = names.iter().map(|n| logs.path().join(format!("{n}.events"))).collect();
    for e in &events {
        wait_event(e, "\"attached\"", 1, Duration::from_secs(180), Some(&mut daemon));
    }
    // A domain that did not opt in is not watched.
    assert!(std::fs::read_dir(logs.path()).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "events")).count() == 3);

    // Guest 0 destroyed midway: its watcher ends, the daemon drops it.
    guests[0].destroy().unwrap();
    let d = logs.path().join("daemon.jsonl");
    wait_event(&d, &format!("\"guest\":\"{}\",\"message\":\"the guest is gone", names[0]), 1, Duration::from_secs(90), Some(&mut daemon));

    // The other two are still protected.
    for (g, e) in guests.iter_mut().zip(&events).skip(1) {
        crash_repaired(g);
        wait_event(e, "\"repaired\"", 1, Duration::from_secs(30), Some(&mut daemon));
        assert_eq!(g.state().unwrap(), "running");
    }
    let text = std::fs::read_to_string(&d).unwrap();
    assert!(!text.contains("\"error\""), "the daemon reported errors:\n{text}");

    // SIGTERM: every watcher detaches, no gdbstub left, domains running.
    kill(daemon.id(), libc::SIGTERM);
    let st = wait_exit(&mut daemon, 90);
    assert!(st.success(), "daemon exit {st}");
    for (g, e) in guests.iter().zip(&events).skip(1) {
        wait_event(e, "\"detached\"", 1, Duration::from_secs(10), None);
        assert_eq!(gdb_chardev(g), None, "{}: a gdbstub was left open", g.name());
        assert_eq!(g.state().unwrap(), "running");
    }
    std::fs::remove_dir_all(logs.path()).unwrap();
}

/// A directory kept unless the test removes it.
struct Keep(PathBuf);
impl Keep {
    fn path(&self) -> &Path {
        &self.0
    }
}
