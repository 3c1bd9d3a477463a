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


/// libvirt's account of the domain becomes `running`: it follows QEMU's
/// RESUME event (after our resume, a `virsh resume`) asynchronously, later
/// on a loaded host, so it is polled, for a bounded time.
fn assert_running(g: &LibvirtGuest) {
    let start = std::time::Instant::now();
    loop {
        let st = g.state().unwrap();
        if st == "running" {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{}: libvirt says {st:?}, not running, after 60 s", g.name());
        std::thread::sleep(Duration::from_millis(200));
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
    assert_running(&guest);

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
    assert_running(&guest);
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
fn start_daemon(dir: &Path, extra: &[&str]) -> Daemon {
    Daemon(
        bin()
            .args(["daemon", "--libvirt", "--connect", "qemu:///system", "--scan-secs", "5", "--events-dir"])
            .arg(dir)
            .args(extra)
            .stdout(std::fs::File::create(dir.join("daemon.jsonl")).unwrap())
            .stderr(std::fs::File::create(dir.join("daemon.stderr")).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// A daemon, stopped when the test ends whether it passed or not: one left
/// running (a failed test's) watches every opted-in domain of later tests
/// and runs, and its watcher holds their gdbstubs (every later run of the
/// three-domain test failed so, with "has a client already").
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            kill(self.0.id(), libc::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
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
        wait_event(e, "\"attached\"", 1, Duration::from_secs(180), Some(&mut *daemon));
    }
    // A domain that did not opt in is not watched.
    assert!(std::fs::read_dir(logs.path()).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "events")).count() == 3);

    // Guest 0 destroyed midway: its watcher ends, the daemon drops it.
    guests[0].destroy().unwrap();
    let d = logs.path().join("daemon.jsonl");
    wait_event(&d, &format!("\"guest\":\"{}\",\"message\":\"the guest is gone", names[0]), 1, Duration::from_secs(90), Some(&mut *daemon));

    // The other two are still protected.
    for (g, e) in guests.iter_mut().zip(&events).skip(1) {
        crash_repaired(g);
        wait_event(e, "\"repaired\"", 1, Duration::from_secs(30), Some(&mut *daemon));
        assert_running(g);
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
        assert_running(g);
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

/// CPU seconds (user + system) and RSS (KiB) of `pid` and all its
/// descendants, now.
fn tree_usage(pid: u32) -> (f64, u64, usize) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (mut cpu, mut rss, mut n) = (0.0, 0, 0);
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let Some(after) = stat.rsplit_once(") ").map(|(_, a)| a) else { continue };
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the comm.
        cpu += (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / hz;
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        rss += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        n += 1;
        for t in std::fs::read_dir(format!("/proc/{p}/task")).into_iter().flatten().flatten() {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            todo.extend(kids.split_whitespace().filter_map(|k| k.parse::<u32>().ok()));
        }
    }
    (cpu, rss, n)
}

/// One round of the guests' workload, in every guest at once: iterations
/// of a CPU loop, then of a write loop (64-byte lines to a file in tmpfs),
/// each for `secs` of guest time.
fn workload(guests: Vec<LibvirtGuest>, secs: u32) -> (Vec<LibvirtGuest>, Vec<Throughput>) {
    let cpu = format!("awk 'BEGIN{{t=systime()+{secs}; while(systime()<t) n++; print n}}'");
    let write = format!(
        "awk 'BEGIN{{f=\"/data/wl\"; t=systime()+{secs}; while(systime()<t){{print \"0123456789012345678901234567890123456789012345678901234567890123\" > f; n++; if(n%10000==0) close(f)}} print n}}'"
    );
    let handles: Vec<_> = guests
        .into_iter()
        .map(|mut g| {
            let (cpu, write) = (cpu.clone(), write.clone());
            std::thread::spawn(move || {
                let t = Duration::from_secs(u64::from(secs) * 6 + 120);
                let qemu = g.qemu_pid().unwrap();
                let q0 = tree_usage(qemu).0;
                let (s1, o1) = g.run(&cpu, t).unwrap();
                let q1 = tree_usage(qemu).0;
                let (s2, o2) = g.run(&write, t).unwrap();
                let q2 = tree_usage(qemu).0;
                assert_eq!((s1, s2), (0, 0), "workload failed: {o1:?} {o2:?}");
                let n = |o: &[String]| o.last().and_then(|l| l.trim().parse::<f64>().ok()).unwrap();
                let r = Throughput {
                    cpu: n(&o1) / f64::from(secs),
                    write: n(&o2) / f64::from(secs),
                    cpu_per_qemu_s: n(&o1) / (q1 - q0).max(0.01),
                    write_per_qemu_s: n(&o2) / (q2 - q1).max(0.01),
                };
                (g, r)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).unzip()
}

/// One guest's loops: iterations per second of guest time, and per
/// second of CPU time its QEMU got (what a shared, saturated host does not
/// blur: the guest's own speed, apart from how much CPU it was given).
#[derive(Clone, Copy, Debug)]
struct Throughput {
    cpu: f64,
    write: f64,
    cpu_per_qemu_s: f64,
    write_per_qemu_s: f64,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// `bench/libvirt/run`: 8 libvirt guests watched by one daemon with
/// --hangs; the watcher's CPU per guest and memory, and the guests' CPU-
/// and write-loop throughput with and without it, in the same run
/// (alternating: without, with, without, with).
#[test]
#[ignore = "a benchmark: bench/libvirt/run"]
fn cost_of_watching_eight_guests() {
    let _one = serial();
    let n: usize = std::env::var("BENCH_GUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let secs: u32 = std::env::var("BENCH_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let idle_secs: u64 = 60;
    let kept = tempfile::Builder::new().prefix("libvirt-bench-").tempdir().unwrap().keep();
    let logs = Keep(kept);
    hook_conf(false, logs.path());
    let image = image_file(Kernel::Debian, logs.path());
    let cfg = LibvirtConfig { cpus: 1, mem_mib: 384, wait_ready: false, prefix: "crb".into(), ..LibvirtConfig::new(Kernel::Debian) };
    let mut guests: Vec<LibvirtGuest> = (0..n).map(|_| LibvirtGuest::boot(&cfg).unwrap()).collect();
    for g in &mut guests {
        g.wait_for_console("GUEST-KIT READY", Duration::from_secs(900)).unwrap();
    }
    let names: Vec<String> = guests.iter().map(|g| g.name().to_string()).collect();
    let mut args = vec!["--image".to_string(), image.display().to_string(), "--hangs".into()];
    for nm in &names {
        args.extend(["--domain".to_string(), nm.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let start_all = |round: usize| {
        let mut d = start_daemon(logs.path(), &args);
        for nm in &names {
            let e = logs.path().join(format!("{nm}.events"));
            wait_event(&e, "\"attached\"", round, Duration::from_secs(600), Some(&mut *d));
        }
        d
    };
    let stop_daemon = |mut d: Daemon| {
        kill(d.id(), libc::SIGTERM);
        assert!(wait_exit(&mut d, 120).success());
    };

    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut busy_cpu = Vec::new();
    let mut idle = None;
    for round in 1..=2 {
        let (g, r) = workload(guests, secs);
        guests = g;
        without.extend(r);
        let d = start_all(round);
        std::thread::sleep(Duration::from_secs(5));
        if round == 1 {
            let (c0, _, _) = tree_usage(d.id());
            std::thread::sleep(Duration::from_secs(idle_secs));
            let (c1, rss, procs) = tree_usage(d.id());
            let (_, own_rss, _) = tree_usage_one(d.id());
            idle = Some(((c1 - c0) / idle_secs as f64, rss, procs, own_rss));
        }
        let (c0, _, _) = tree_usage(d.id());
        let t = Instant::now();
        let (g, r) = workload(guests, secs);
        guests = g;
        let (c1, _, _) = tree_usage(d.id());
        busy_cpu.push((c1 - c0) / t.elapsed().as_secs_f64());
        with.extend(r);
        // No hang was reported and nothing acted on: the workloads are
        // healthy.
        for nm in &names {
            let text = std::fs::read_to_string(logs.path().join(format!("{nm}.events"))).unwrap();
            assert!(!text.contains("\"hang\"") && !text.contains("\"repaired\""), "{nm}: a false hang:\n{text}");
        }
        stop_daemon(d);
    }
    let (idle_cores, rss, procs, own_rss) = idle.unwrap();
    let busy = mean(&busy_cpu);
    let m = |v: &[Throughput], f: fn(&Throughput) -> f64| mean(&v.iter().map(f).collect::<Vec<_>>());
    let cost = |w: f64, wo: f64| (wo - w) / wo * 100.0;
    println!("| what ({n} guests, 1 vCPU, TCG, 2 host cores) | with the daemon (--hangs) | without | goal |");
    println!("|---|---|---|---|");
    println!("| watcher CPU per guest, guests idle ({idle_secs} s) | {:.2}% of a core | 0 | < 1% |", idle_cores * 100.0 / n as f64);
    println!("| watcher CPU per guest, guests busy | {:.2}% of a core | 0 | < 1% |", busy * 100.0 / n as f64);
    println!(
        "| watcher memory (RSS summed over {procs} processes: daemon; per guest a supervisor, a worker, virsh event) | {} MiB, {:.1} MiB per guest; the daemon process {:.1} MiB | 0 | |",
        rss / 1024,
        rss as f64 / 1024.0 / n as f64,
        own_rss as f64 / 1024.0
    );
    for (what, f, g) in [
        ("CPU loop, iterations", (|t: &Throughput| t.cpu) as fn(&Throughput) -> f64, (|t: &Throughput| t.cpu_per_qemu_s) as fn(&Throughput) -> f64),
        ("write loop, lines", |t: &Throughput| t.write, |t: &Throughput| t.write_per_qemu_s),
    ] {
        let (w, wo) = (m(&with, f), m(&without, f));
        println!("| guest {what} per second ({} runs each) | {w:.0} | {wo:.0} | cost {:+.2}% (goal < 1%) |", with.len(), cost(w, wo));
        let (w, wo) = (m(&with, g), m(&without, g));
        println!("| guest {what} per CPU-second of its QEMU | {w:.0} | {wo:.0} | cost {:+.2}% (goal < 1%) |", cost(w, wo));
    }
    let list = |v: &[Throughput], f: fn(&Throughput) -> f64| v.iter().map(|t| f(t) as u64).collect::<Vec<_>>();
    println!("per run, CPU loop /s without: {:?}", list(&without, |t| t.cpu));
    println!("per run, CPU loop /s with:    {:?}", list(&with, |t| t.cpu));
    println!("per run, CPU loop /QEMU-s without: {:?}", list(&without, |t| t.cpu_per_qemu_s));
    println!("per run, CPU loop /QEMU-s with:    {:?}", list(&with, |t| t.cpu_per_qemu_s));
    println!("per run, write loop /s without: {:?}", list(&without, |t| t.write));
    println!("per run, write loop /s with:    {:?}", list(&with, |t| t.write));
    println!("per run, write loop /QEMU-s without: {:?}", list(&without, |t| t.write_per_qemu_s));
    println!("per run, write loop /QEMU-s with:    {:?}", list(&with, |t| t.write_per_qemu_s));
    drop(guests);
    std::fs::remove_dir_all(logs.path()).unwrap();
}

/// RSS (KiB) of `pid` alone.
fn tree_usage_one(pid: u32) -> (f64, u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    (0.0, rss, 1)
}

/// `daemon --sockets DIR`: QEMUs found by their sockets in a directory
/// (`NAME.qmp`, `NAME.gdb`, `NAME.ram`), one killed midway (dropped), the
/// other's crash repaired. Oracle: QEMU's run state and chardevs through a
/// second QMP monitor, the guest's own exit status of the crashing child.
#[test]
fn daemon_watches_a_socket_directory() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let socks = dir.path().join("sockets");
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&socks).unwrap();
    let mut cfg = harness::GuestConfig::new(Kernel::Debian).with_ram_file().with_second_qmp();
    // Two guests booting at once on a loaded host.
    cfg.boot_timeout = Duration::from_secs(600);
    let mut guests = vec![harness::Guest::boot(&cfg).unwrap(), harness::Guest::boot(&cfg).unwrap()];
    for (i, g) in guests.iter().enumerate() {
        let link = |what: &str, to: &Path| std::os::unix::fs::symlink(to, socks.join(format!("g{i}.{what}"))).unwrap();
        link("qmp", &g.dir().join("qmp.sock"));
        link("gdb", &g.dir().join("gdb.sock"));
        link("ram", &g.ram_file().unwrap());
    }
    let image = image_file(Kernel::Debian, dir.path());
    std::fs::create_dir_all(&logs).unwrap();
    let mut daemon = Daemon(
        bin()
            .args(["daemon", "--sockets"])
            .arg(&socks)
            .arg("--image")
            .arg(&image)
            .args(["--hangs", "--scan-secs", "2", "--events-dir"])
            .arg(&logs)
            .stdout(std::fs::File::create(logs.join("daemon.jsonl")).unwrap())
            .stderr(std::fs::File::create(logs.join("daemon.stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    for i in 0..2 {
        wait_event(&logs.join(format!("g{i}.events")), "\"attached\"", 1, Duration::from_secs(120), Some(&mut *daemon));
    }
    // g0's QEMU goes: dropped.
    guests.remove(0);
    wait_event(&logs.join("daemon.jsonl"), "\"guest\":\"g0\",\"message\":\"the guest is gone", 1, Duration::from_secs(60), Some(&mut *daemon));
    let g = &mut guests[0];
    let crash = g.crash("sysrq-c").unwrap();
    assert_eq!(g.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap(), 137);
    wait_event(&logs.join("g1.events"), "\"repaired\"", 1, Duration::from_secs(30), Some(&mut *daemon));
    kill(daemon.id(), libc::SIGTERM);
    assert!(wait_exit(&mut daemon, 90).success());
    wait_event(&logs.join("g1.events"), "\"detached\"", 1, Duration::from_secs(10), None);
    let mut q = qmp2(g);
    assert_eq!(status(&mut q), "running");
}

/// First law through libvirt: the worker killed (SIGKILL) with
/// `--restarts 0`, the supervisor removes the trap and closes the gdbstub
/// through libvirt; a crash after that takes its course as without us (the
/// guest's own panic report, and QEMU not left in `debug`).
#[test]
fn libvirt_worker_killed_leaves_no_trap() {
    let _one = serial();
    let mut guest = LibvirtGuest::boot(&LibvirtConfig::new(Kernel::Debian)).unwrap();
    let image = image_file(guest.kernel(), guest.dir());
    let events = guest.dir().join("events.jsonl");
    let mut w = bin()
        .args(["watch", "--libvirt", guest.name(), "--restarts", "0"])
        .arg("--image")
        .arg(&image)
        .arg("--events")
        .arg(&events)
        .stderr(std::fs::File::create(events.with_extension("stderr")).unwrap())
        .spawn()
        .unwrap();
    wait_event(&events, "\"attached\"", 1, Duration::from_secs(120), Some(&mut w));
    assert!(gdb_chardev(&guest).is_some(), "no gdbstub opened through libvirt");
    kill(worker_of(&w), libc::SIGKILL);
    let st = wait_exit(&mut w, 90);
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(text.contains("is not restarted:"), "supervisor did not give up cleanly: {st}\n{text}");
    assert_eq!(gdb_chardev(&guest), None, "the supervisor left the gdbstub open:\n{text}");
    assert_eq!(guest.qemu_status().unwrap(), "running");
    guest.run("echo c > /proc/sysrq-trigger &", Duration::from_secs(30)).ok();
    guest.wait_for_console("---[ end Kernel panic", Duration::from_secs(120)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(guest.qemu_status().unwrap(), "debug", "a trap was left: the panic stopped in the debugger");
}
