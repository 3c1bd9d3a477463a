//! What the `repair-guest` CLI tests share: the binary, a kit image, a
//! watcher started on a guest, and a second QMP monitor as an oracle of the
//! guest's run state.
#![allow(dead_code)]

use harness::{Guest, Kernel};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_repair-guest"))
}

/// The kit kernel's repair image, written into `dir`.
pub fn image_file(kernel: Kernel, dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join(format!("{}.img", kernel.dir_name().replace('/', "-")));
    repair_guest::kit::kit_image(kernel).unwrap().write(&path).unwrap();
    path
}

/// Starts `watch` on a guest (RAM file and QMP given, plus `extra`
/// arguments) and waits until it has armed its trap.
pub fn start_watch(guest: &Guest, events: &std::path::Path, extra: &[&str]) -> Child {
    let image = image_file(guest.kernel(), guest.dir());
    start_watch_with(guest, &image, events, extra)
}

pub fn start_watch_with(guest: &Guest, image: &std::path::Path, events: &std::path::Path, extra: &[&str]) -> Child {
    let mut watcher = bin()
        .args(["watch", "--gdb", &guest.gdb_addr(), "--qmp", &guest.qmp_addr()])
        .arg("--ram-file")
        .arg(guest.ram_file().unwrap())
        .arg("--image")
        .arg(image)
        .arg("--events")
        .arg(events)
        .args(extra)
        .stderr(std::fs::File::create(events.with_extension("stderr")).unwrap())
        .spawn()
        .unwrap();
    wait_event(events, "\"attached\"", 1, Duration::from_secs(60), Some(&mut watcher));
    watcher
}

/// Waits until the events file holds `n` lines containing `what`; returns
/// the file's text. Fails early if `watcher` exits.
pub fn wait_event(events: &std::path::Path, what: &str, n: usize, timeout: Duration, mut watcher: Option<&mut Child>) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(events).unwrap_or_default();
        if text.lines().filter(|l| l.contains(what)).count() >= n {
            return text;
        }
        assert!(start.elapsed() < timeout, "no {n} x {what} in the events within {timeout:?}:\n{text}");
        if let Some(w) = watcher.as_deref_mut() {
            if let Some(st) = w.try_wait().unwrap() {
                let err = std::fs::read_to_string(events.with_extension("stderr")).unwrap_or_default();
                panic!("watcher exited {st} before {what}: {err}\nevents:\n{text}");
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn wait_exit(child: &mut Child, secs: u64) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "watcher did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The supervisor's worker process (its only child).
pub fn worker_of(supervisor: &Child) -> u32 {
    let pid = supervisor.id();
    let start = Instant::now();
    loop {
        let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(k) = kids.split_whitespace().next() {
            return k.parse().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the supervisor {pid} has no worker");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn kill(pid: u32, sig: i32) {
    // SAFETY: sending a signal to a process of this test.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill {pid}");
}

/// The run state through the guest's second QMP monitor (an oracle we do
/// not share with the watcher).
pub fn status(qmp2: &mut loader::qmp::Qmp) -> String {
    qmp2.query_status().unwrap()
}

pub fn qmp2(guest: &Guest) -> loader::qmp::Qmp {
    let addr = guest.qmp2_addr().expect("the guest was booted with_second_qmp");
    loader::qmp::Qmp::connect(&addr.parse().unwrap()).unwrap()
}

/// Waits until the child's stderr says its trap is armed; the rest of
/// stderr is collected in the background and returned by the handle.
pub fn wait_armed(child: &mut Child) -> std::thread::JoinHandle<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("trap armed") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(300)).expect("the trap was never armed");
    h
}

/// A link-time symbol address from the kit kernel's System.map.
pub fn symbol(kernel: Kernel, name: &str) -> u64 {
    let kit = harness::Kit::locate().unwrap();
    kit.symbol(kernel, name)
        .unwrap_or_else(|e| panic!("{kernel:?}: System.map: {e}"))
        .unwrap_or_else(|| panic!("{name} is not in the System.map of {kernel:?}"))
}

/// The event lines of one kind, parsed.
pub fn lines_of(events: &std::path::Path, what: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(events)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(what))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `diagnose --json --wait-crash SECS` on `guest` with the kit kernel's
/// image and vmlinux, armed (its stderr's "trap armed" seen): the child and
/// the handle of the rest of its stderr.
pub fn spawn_diagnose(guest: &Guest, kernel: Kernel, wait_secs: u32) -> (Child, std::thread::JoinHandle<String>) {
    let image = image_file(kernel, guest.dir());
    let vmlinux = harness::Kit::locate().unwrap().vmlinux(kernel).unwrap();
    let mut diag = bin()
        .args(["diagnose", "--json", "--wait-crash", &wait_secs.to_string(), "--gdb", &guest.gdb_addr(), "--image"])
        .arg(&image)
        .arg("--vmlinux")
        .arg(&vmlinux)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = wait_armed(&mut diag);
    (diag, stderr)
}
