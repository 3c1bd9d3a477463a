//! The first law, on real guests: with the watcher attached, dying,
//! restarting or detaching, the guest is never worse off than without it.
//! Oracles: the guest's own console (its panic report), its processes'
//! exit statuses, and QEMU's run state through a second QMP monitor the
//! watcher does not use.

mod support;

use harness::{Guest, GuestConfig, Kernel};
use std::time::Duration;
use support::*;

const SIGKILL: i32 = libc::SIGKILL;

fn debian() -> GuestConfig {
    GuestConfig::new(Kernel::Debian).with_ram_file().with_second_qmp()
}

/// A crash with no trap of ours left: the guest's own panic runs to its
/// end, and QEMU is not left in `debug` (where only a debugger could free it).
fn assert_panic_completes_untrapped(guest: &mut Guest, q: &mut loader::qmp::Qmp) {
    guest.crash("sysrq-c").unwrap();
    let p = match guest.wait_panic(Duration::from_secs(60)) {
        Ok(p) => p,
        Err(e) => panic!("no panic report; QEMU's run state is {}: {e}", status(q)),
    };
    assert_eq!(p.message, "sysrq triggered crash");
    std::thread::sleep(Duration::from_secs(1));
    let st = status(q);
    assert_ne!(st, "debug", "the guest was left stopped at a trap nobody watches");
}

#[test]
fn a_killed_watcher_is_restarted_and_repairs_a_crash_that_waited_at_its_trap() {
    let mut guest = Guest::boot(&debian()).unwrap();
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &[]);
    let worker = worker_of(&watcher);
    kill(worker, SIGKILL);
    // At once: the crash most likely reaches the dead watcher's trap before
    // the new worker attaches, and waits there in `debug`.
    let crash = guest.crash("sysrq-c").unwrap();
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap(), 137);
    let text = wait_event(&events, "\"repaired\"", 1, Duration::from_secs(30), Some(&mut watcher));
    assert!(text.contains("restarting it"), "{text}");
    assert!(text.lines().filter(|l| l.contains("\"attached\"")).count() >= 2, "{text}");
    // And the restarted watcher goes on protecting the guest.
    let crash = guest.crash("sysrq-c").unwrap();
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap(), 137);
    assert_eq!(status(&mut qmp2(&guest)), "running");
    kill(watcher.id(), libc::SIGTERM);
    assert!(wait_exit(&mut watcher, 60).success());
    assert!(guest.verify_bystander().unwrap().ok);
}

#[test]
fn a_killed_watcher_without_restarts_leaves_no_trap_behind() {
    let mut guest = Guest::boot(&debian()).unwrap();
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &["--restarts", "0"]);
    kill(worker_of(&watcher), SIGKILL);
    let st = wait_exit(&mut watcher, 60);
    assert!(!st.success());
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(text.contains("is not restarted") && text.contains("removed"), "{text}");
    let mut q = qmp2(&guest);
    assert_eq!(status(&mut q), "running");
    assert_panic_completes_untrapped(&mut guest, &mut q);
}

#[test]
fn a_killed_supervisor_takes_its_worker_and_its_trap_with_it() {
    let mut guest = Guest::boot(&debian()).unwrap();
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &[]);
    let worker = worker_of(&watcher);
    kill(watcher.id(), SIGKILL);
    let _ = watcher.wait();
    // The worker gets SIGTERM (PR_SET_PDEATHSIG) and detaches cleanly.
    wait_event(&events, "\"detached\"", 1, Duration::from_secs(60), None);
    let start = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{worker}")).exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "the worker outlived its supervisor");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut q = qmp2(&guest);
    assert_eq!(status(&mut q), "running");
    assert_panic_completes_untrapped(&mut guest, &mut q);
}

/// An operator's `stop` through another monitor stays a stop; after their
/// `cont`, the watcher still repairs.
fn operator_pause_stays_a_pause(cfg: GuestConfig) {
    let mut guest = Guest::boot(&cfg).unwrap();
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &[]);
    let mut q = qmp2(&guest);
    q.stop().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(status(&mut q), "paused", "the watcher undid an operator's pause");
    let text = wait_event(&events, "\"paused\"", 1, Duration::from_secs(10), Some(&mut watcher));
    assert!(!text.contains("\"error\""), "{text}");
    q.cont().unwrap();
    wait_event(&events, "\"resumed\"", 1, Duration::from_secs(10), Some(&mut watcher));
    let crash = guest.crash("sysrq-c").unwrap();
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap(), 137);
    // Detaching while someone else holds the guest paused leaves it paused.
    q.stop().unwrap();
    wait_event(&events, "\"paused\"", 2, Duration::from_secs(10), Some(&mut watcher));
    kill(watcher.id(), libc::SIGINT);
    assert!(wait_exit(&mut watcher, 60).success());
    assert_eq!(status(&mut q), "paused", "detaching resumed an operator's pause");
    q.cont().unwrap();
    assert_panic_completes_untrapped(&mut guest, &mut q);
}

#[test]
fn an_operator_pause_stays_a_pause_on_qemu_7_2() {
    operator_pause_stays_a_pause(debian());
}

#[test]
fn an_operator_pause_stays_a_pause_on_qemu_10() {
    operator_pause_stays_a_pause(debian().with_qemu10().unwrap());
}

#[test]
fn refusals_and_errors_after_connecting_leave_the_guest_running() {
    let mut guest = Guest::boot(&debian()).unwrap();
    let mut q = qmp2(&guest);
    let wrong = image_file(Kernel::Lkdtm, guest.dir());
    let right = image_file(Kernel::Debian, guest.dir());
    let gdb = guest.gdb_addr();
    let cases: Vec<(Vec<&str>, &std::path::Path, i32)> = vec![
        (vec!["watch", "--restarts", "0"], &wrong, 3),
        (vec!["diagnose"], &wrong, 3),
        (vec!["repair"], &wrong, 3),
        (vec!["snapshot", "--output", "/nonexistent/dir/x.img"], &right, 2),
        // No crash to act on: the guest is not at panic.
        (vec!["diagnose"], &right, 0),
        (vec!["repair", "--wait-crash", "1"], &right, 1),
    ];
    for (args, image, code) in cases {
        let out = bin()
            .args(&args)
            .args(["--gdb", &gdb, "--qmp", &guest.qmp_addr(), "--image"])
            .arg(image)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(status(&mut q), "running", "{args:?} left the guest stopped: {err}");
    }
    // A guest the operator paused stays paused through a refusal too.
    q.stop().unwrap();
    let out = bin().args(["diagnose", "--gdb", &gdb, "--qmp", &guest.qmp_addr(), "--image"]).arg(&wrong).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(status(&mut q), "paused");
    q.cont().unwrap();
    assert_eq!(guest.run("echo alive", Duration::from_secs(60)).unwrap().output, ["alive"]);
}

#[test]
fn a_reset_guest_is_rearmed_with_its_new_slide_and_repaired() {
    let mut guest = Guest::boot(&debian().with_reboot()).unwrap();
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &[]);
    let first = std::fs::read_to_string(&events).unwrap();
    let from = guest.console_len();
    qmp2(&guest).execute("system_reset", None).unwrap();
    guest.wait_for_console_from(from, "GUEST-KIT READY", Duration::from_secs(180)).unwrap();
    let text = wait_event(&events, "\"rearmed\"", 1, Duration::from_secs(60), Some(&mut watcher));
    assert!(text.contains("\"reset\""), "{text}");
    let slide = |t: &str| -> Option<String> {
        t.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["event"] == "rearmed")
            .and_then(|e| e["slide"].as_str().map(str::to_string))
    };
    let new_slide = slide(&text).unwrap();
    assert!(!first.contains(&format!("KASLR slide {new_slide})")), "the reboot kept the slide: {first}\n{text}");
    let crash = guest.crash("sysrq-c").unwrap();
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap(), 137);
    kill(watcher.id(), libc::SIGTERM);
    assert!(wait_exit(&mut watcher, 60).success());
}

#[test]
fn two_vcpus_crashing_at_once_are_both_repaired() {
    let mut guest = Guest::boot(&debian()).unwrap();
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &[]);
    // Two children pinned to vCPU 0 and vCPU 1 spin until a file appears,
    // then both write 'c' to /proc/sysrq-trigger.
    let crasher = "while [ ! -e /tmp/go ]; do :; done; echo c > /proc/sysrq-trigger";
    let script = format!(
        "taskset 1 sh -c '{crasher}' & a=$!; taskset 2 sh -c '{crasher}' & b=$!; \
         sleep 2; touch /tmp/go; wait $a; echo A $?; wait $b; echo B $?"
    );
    let r = guest.run(&script, Duration::from_secs(180)).unwrap();
    // (The shell also reports "Killed" for the children it waited on.)
    let statuses: Vec<&String> = r.output.iter().filter(|l| l.starts_with("A ") || l.starts_with("B ")).collect();
    assert_eq!(statuses, ["A 137", "B 137"], "{r:?}");
    let text = wait_event(&events, "\"repaired\"", 2, Duration::from_secs(30), Some(&mut watcher));
    let cpus: std::collections::BTreeSet<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "repaired")
        .filter_map(|e| e["cpu"].as_u64())
        .collect();
    assert_eq!(cpus.len(), 2, "both vCPUs' crashes: {text}");
    assert_eq!(guest.run("echo alive", Duration::from_secs(60)).unwrap().output, ["alive"]);
    kill(watcher.id(), libc::SIGTERM);
    assert!(wait_exit(&mut watcher, 60).success());
}

#[test]
fn events_carry_time_guest_backtrace_and_log_tail() {
    let mut guest = Guest::boot(&debian()).unwrap();
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &["--name", "vm-under-test"]);
    let crash = guest.crash("sysrq-c").unwrap();
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap(), 137);
    let text = wait_event(&events, "\"repaired\"", 1, Duration::from_secs(30), Some(&mut watcher));
    let repaired: serde_json::Value =
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).find(|e: &serde_json::Value| e["event"] == "repaired").unwrap();
    assert_eq!(repaired["guest"], "vm-under-test");
    let time = repaired["time"].as_str().unwrap();
    assert!(time.len() == 24 && time.ends_with('Z') && time.starts_with("20"), "{time}");
    // The kernel's own log names the crash: sysrq's "Trigger a crash" line
    // is printed before panic() is called.
    let log = repaired["log_tail"].as_array().unwrap();
    assert!(log.iter().any(|l| l.as_str().unwrap().contains("Trigger a crash")), "{log:?}");
    // The backtrace starts in panic's caller chain; the guest's own report
    // (printed later, by the panic we let through below) is the oracle.
    let bt: Vec<String> = repaired["backtrace"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    assert!(bt.len() >= 3, "{bt:?}");
    kill(watcher.id(), libc::SIGTERM);
    assert!(wait_exit(&mut watcher, 60).success());
}

#[test]
fn a_crash_on_vcpu_1_while_vcpu_0_is_busy_in_the_kernel_is_repaired() {
    let mut guest = Guest::boot(&debian()).unwrap();
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &[]);
    // vCPU 0 copies zeroes in the kernel (read of /dev/zero, write to
    // /dev/null) without end; vCPU 1 crashes.
    let busy = guest.run("taskset 1 dd if=/dev/zero of=/dev/null bs=4M </dev/null >/dev/null 2>&1 & echo $!", Duration::from_secs(60)).unwrap();
    let dd: u32 = busy.output.last().unwrap().trim().parse().unwrap();
    let r = guest.run("taskset 2 sh -c 'echo c > /proc/sysrq-trigger'; echo status $?", Duration::from_secs(180)).unwrap();
    assert!(r.output.iter().any(|l| l == "status 137"), "{r:?}");
    let text = wait_event(&events, "\"repaired\"", 1, Duration::from_secs(30), Some(&mut watcher));
    let rep: serde_json::Value =
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).find(|e: &serde_json::Value| e["event"] == "repaired").unwrap();
    assert_eq!(rep["cpu"], 1, "{rep}");
    // The busy task on vCPU 0 was not touched.
    let alive = guest.run(&format!("kill -0 {dd} && echo alive; kill {dd}"), Duration::from_secs(60)).unwrap();
    assert_eq!(alive.output, ["alive"], "{alive:?}");
    kill(watcher.id(), libc::SIGTERM);
    assert!(wait_exit(&mut watcher, 60).success());
}

#[test]
fn a_watcher_killed_mid_repair_is_undone_and_the_crash_repaired_by_the_next() {
    let mut guest = Guest::boot(&debian()).unwrap();
    let events = guest.dir().join("events.jsonl");
    // The first worker aborts right after staging the repair kernel in the
    // guest (borrowed memory overwritten, the vCPU pointed at it).
    let flag = guest.dir().join("abort-once");
    std::fs::write(&flag, b"").unwrap();
    let image = image_file(Kernel::Debian, guest.dir());
    let mut watcher = bin()
        .args(["watch", "--gdb", &guest.gdb_addr(), "--qmp", &guest.qmp_addr()])
        .arg("--ram-file")
        .arg(guest.ram_file().unwrap())
        .arg("--image")
        .arg(&image)
        .arg("--events")
        .arg(&events)
        .env("REPAIR_GUEST_TEST_ABORT_ONCE", &flag)
        .stderr(std::fs::File::create(events.with_extension("stderr")).unwrap())
        .spawn()
        .unwrap();
    wait_event(&events, "\"attached\"", 1, Duration::from_secs(60), Some(&mut watcher));
    let crash = guest.crash("sysrq-c").unwrap();
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap(), 137);
    let text = wait_event(&events, "\"repaired\"", 1, Duration::from_secs(30), Some(&mut watcher));
    assert!(!flag.exists(), "the fault was never injected");
    assert!(text.contains("restarting it"), "{text}");
    assert!(text.contains("put back as it was at the trap"), "{text}");
    // The guest is whole: the bystander's data verifies and new work runs.
    assert!(guest.verify_bystander().unwrap().ok);
    assert_eq!(guest.run("echo alive", Duration::from_secs(60)).unwrap().output, ["alive"]);
    kill(watcher.id(), libc::SIGTERM);
    assert!(wait_exit(&mut watcher, 60).success());
}
