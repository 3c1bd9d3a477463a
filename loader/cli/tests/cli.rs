//! The `repair-guest` binary as a user runs it, against real guests.

mod support;

use harness::{Guest, GuestConfig, Kernel};
use std::process::Stdio;
use support::{bin, image_file, start_watch, wait_armed, wait_exit};
use std::time::{Duration, Instant};


#[test]
fn watch_repairs_crashes_and_reports_each_as_json() {
    let mut guest = Guest::boot(&GuestConfig::new(Kernel::Debian).with_ram_file()).unwrap();
    let events = guest.dir().join("events.jsonl");
    let watcher = start_watch(&guest, &events, &["--max-repairs", "2"]);
    let mut pids = Vec::new();
    for _ in 0..2 {
        let c = guest.crash("sysrq-c").unwrap();
        assert_eq!(guest.wait_crash_exit(&c, Duration::from_secs(90)).unwrap(), 137);
        pids.push(c.pid);
    }
    let out = watcher.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let repaired: Vec<&serde_json::Value> = lines.iter().filter(|e| e["event"] == "repaired").collect();
    assert_eq!(repaired.len(), 2, "{lines:#?}");
    for (e, pid) in repaired.iter().zip(&pids) {
        assert_eq!(e["pid"], *pid as i64);
        assert_eq!(e["comm"], "sh");
        assert_eq!(e["action"], "kill");
        assert_eq!(e["message"], "sysrq triggered crash");
        assert_eq!(e["kind"], "sysrq-c crash");
        assert!(e["timings_ms"]["total"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(lines.iter().filter(|e| e["event"] == "crash").count(), 2);
    assert!(guest.verify_bystander().unwrap().ok);
}

#[test]
fn an_image_of_another_kernel_is_refused_with_a_clear_error() {
    let guest = Guest::boot(&GuestConfig::new(Kernel::Debian)).unwrap();
    let image = image_file(Kernel::Lkdtm, guest.dir());
    let out = bin().args(["diagnose", "--gdb", &guest.gdb_addr(), "--image"]).arg(&image).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "a refused image is exit status 3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not the image's build"), "{err}");
    assert!(err.contains("6.1.0-56-cloud-amd64"), "names the guest's kernel: {err}");
    assert!(err.contains("build-repair-image"), "says how to fix it: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_gets_a_message_not_a_backtrace() {
    let out = bin().args(["watch", "--gdb", "unix:/nonexistent/gdb.sock", "--image", "/nonexistent.img"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "bad input is exit status 2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent.img"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = bin().args(["watch", "--gdb", "nonsense", "--image", "/etc/hostname"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not a repair image") || err.contains("unix:PATH"), "{err}");
}

#[test]
fn watch_detaches_on_sigint_and_the_guest_runs_on() {
    let mut guest = Guest::boot(&GuestConfig::new(Kernel::Debian).with_ram_file()).unwrap();
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &[]);
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(watcher.id() as i32, libc::SIGINT) }, 0);
    assert!(wait_exit(&mut watcher, 30).success());
    assert!(std::fs::read_to_string(&events).unwrap().contains("\"detached\""));
    // No trap is left behind: the guest runs, and its next panic is its own.
    assert_eq!(guest.run("echo alive", Duration::from_secs(30)).unwrap().output, ["alive"]);
    guest.crash("sysrq-c").unwrap();
    let p = guest.wait_panic(Duration::from_secs(60)).unwrap();
    assert_eq!(p.message, "sysrq triggered crash");
}

#[test]
fn watch_ends_cleanly_when_the_guest_goes_away() {
    let guest = Guest::boot(&GuestConfig::new(Kernel::Debian).with_ram_file()).unwrap();
    // Outside the guest's directory, which goes with it.
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &[]);
    guest.shutdown().unwrap();
    assert_eq!(wait_exit(&mut watcher, 30).code(), Some(4), "the guest gone is exit status 4");
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(text.contains("the guest went away"), "{text}");
}

#[test]
fn diagnose_wait_crash_reports_like_the_guest_and_the_panic_completes() {
    let mut guest = Guest::boot(&GuestConfig::new(Kernel::Debian)).unwrap();
    let image = image_file(Kernel::Debian, guest.dir());
    let kit = harness::Kit::locate().unwrap();
    let diag = bin()
        .args(["diagnose", "--json", "--wait-crash", "120", "--gdb", &guest.gdb_addr(), "--image"])
        .arg(&image)
        .arg("--vmlinux")
        .arg(kit.vmlinux(Kernel::Debian).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut diag = diag;
    let stderr = wait_armed(&mut diag);
    let crash = guest.crash("sysrq-c").unwrap();
    let out = diag.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr.join().unwrap());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = guest.wait_panic(Duration::from_secs(60)).unwrap();
    assert_eq!(r["message"], p.message.as_str());
    assert_eq!(r["pid"], p.pid as i64);
    assert_eq!(p.pid, crash.pid);
    assert_eq!(r["comm"], p.comm.as_str());
    assert_eq!(r["verdict"], "kill");
    assert_eq!(r["backtrace"][1]["function"], "sysrq_handle_crash");
}

#[test]
fn repair_wait_crash_repairs_one_crash_and_leaves_no_trap() {
    let mut guest = Guest::boot(&GuestConfig::new(Kernel::Debian)).unwrap();
    let image = image_file(Kernel::Debian, guest.dir());
    let rep = bin()
        .args(["repair", "--wait-crash", "120", "--gdb", &guest.gdb_addr(), "--image"])
        .arg(&image)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut rep = rep;
    let stderr = wait_armed(&mut rep);
    let crash = guest.crash("sysrq-c").unwrap();
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(90)).unwrap(), 137);
    let out = rep.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr.join().unwrap());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"repaired\""));
    // The next crash is the guest's own.
    guest.crash("sysrq-c").unwrap();
    assert_eq!(guest.wait_panic(Duration::from_secs(60)).unwrap().message, "sysrq triggered crash");
}

#[test]
fn the_demo_repairs_a_crash_and_shows_the_guest_alive() {
    let out = bin().args(["demo", "--crashes", "2"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.matches("\"event\":\"repaired\"").count(), 2, "{text}");
    assert_eq!(text.matches("exited with status 137").count(), 2, "{text}");
    assert!(text.contains("data intact"), "{text}");
    assert!(text.contains("a new process says [\"a new process\""), "{text}");
}

/// Waits until the events file has a line with `needle`.
fn wait_event(events: &std::path::Path, needle: &str, secs: u64) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(events).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "no {needle} event in {secs} s:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn watch_hangs_repairs_a_spinning_task_and_declines_a_sleeping_one() {
    let mut guest = Guest::boot(&GuestConfig::new(Kernel::Lkdtm).with_ram_file()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    // LOOP is certain once it spins in the same kernel states for 3 s of
    // vCPU time (the default waits for the guest's own soft-lockup limit).
    let mut watcher = start_watch(&guest, &events, &["--hangs", "--hang-kill-after-ms", "3000"]);

    // LOOP spins in the kernel: detected from outside, the spinner killed.
    let spin = guest.crash("LOOP").unwrap();
    assert_eq!(guest.wait_crash_exit(&spin, Duration::from_secs(60)).unwrap(), 137);
    let text = wait_event(&events, "\"repaired\"", 30);
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let hang = lines.iter().find(|e| e["event"] == "hang").expect("a hang event");
    assert_eq!(hang["pid"], spin.pid as i64);
    assert!(hang["kind"].as_str().unwrap().starts_with("stuck CPU"), "{hang}");
    let rep = lines.iter().find(|e| e["event"] == "repaired").unwrap();
    assert_eq!(rep["pid"], spin.pid as i64);
    assert_eq!(rep["action"], "kill");
    assert!(guest.verify_bystander().unwrap().ok);

    // HUNG_TASK sleeps uninterruptibly: detected, reported as not
    // certain, and left alone (SIGKILL cannot wake it).
    let sleeper = guest.crash("HUNG_TASK").unwrap();
    let pid = format!("\"pid\":{}", sleeper.pid);
    let start = Instant::now();
    let hang = loop {
        let text = std::fs::read_to_string(&events).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("\"hang\"") && l.contains(&pid)) {
            break serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no hang event for the sleeper: {text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(hang["kind"], "blocked task", "{hang}");
    assert_eq!(hang["certain"], false, "{hang}");
    // The init waits on the sleeper, but the guest runs: the bystander
    // still reports progress.
    let from = guest.console_len();
    guest.wait_for_console_from(from, "bystander:", Duration::from_secs(60)).unwrap();

    let text = std::fs::read_to_string(&events).unwrap();
    assert!(
        !text.lines().any(|l| (l.contains("\"repaired\"") || l.contains("\"declined\"")) && l.contains(&pid)),
        "the sleeper was acted on: {text}"
    );

    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(watcher.id() as i32, libc::SIGINT) }, 0);
    assert!(wait_exit(&mut watcher, 30).success());
}
