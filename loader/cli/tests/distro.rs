//! A real distro guest: Debian 13 with systemd as pid 1 (the kit's
//! `distro/rootfs.cpio.gz`, `scripts/kit-distro`) on the Debian cloud kernel,
//! under `repair-guest watch`. One boot (25-75 s under TCG) serves every case,
//! in sequence:
//!
//! - a crash in a systemd service's main process (`crashy.service`,
//!   `Restart=on-failure`): the process is killed, systemd restarts it
//!   (`NRestarts` grows, the unit is active again), journald records the
//!   kill (`status=9/KILL`), `systemctl is-system-running` is what it was;
//! - a crash from a child of the command channel (the busybox guest's case):
//!   its parent sees 137;
//! - a crash in one thread of a multi-threaded process (`mtcount`): the
//!   repair ends that thread (`rewind_stack_and_make_dead` -> `do_exit`,
//!   which ends a thread, not its thread group); the other threads keep
//!   counting and the process lives on, one task fewer in /proc/PID/task;
//! - the bystander's records stay whole throughout.
//!
//! Oracles are the guest's own: systemctl, journalctl, /proc, the bystander's
//! checksums. Prints the boot time and each repair's trap-to-running time.

mod support;

use harness::{Guest, GuestConfig};
use std::time::{Duration, Instant};
use support::*;

/// `cmd`'s output lines in the guest; panics unless it exits 0.
fn sh(guest: &mut Guest, cmd: &str) -> Vec<String> {
    let r = guest.run(cmd, Duration::from_secs(120)).unwrap();
    assert_eq!(r.status, 0, "{cmd}: {:?}\nconsole tail:\n{}", r.output, guest.console_tail(30));
    r.output
}

/// `cmd`'s first output line (any exit status).
fn sh1(guest: &mut Guest, cmd: &str) -> String {
    let r = guest.run(cmd, Duration::from_secs(120)).unwrap();
    r.output.first().cloned().unwrap_or_default()
}

/// Polls `cmd` until `ok` accepts its first line.
fn poll(guest: &mut Guest, cmd: &str, secs: u64, ok: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let line = sh1(guest, cmd);
        if ok(&line) {
            return line;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "{cmd}: still {line:?} after {secs} s");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The `n`th `repaired` event (from 1), parsed.
fn repaired(events: &std::path::Path, n: usize, watcher: &mut std::process::Child) -> serde_json::Value {
    let text = wait_event(events, "\"repaired\"", n, Duration::from_secs(180), Some(watcher));
    let line = text.lines().filter(|l| l.contains("\"repaired\"")).nth(n - 1).unwrap();
    serde_json::from_str(line).unwrap()
}

fn total_ms(ev: &serde_json::Value) -> f64 {
    ev["timings_ms"]["total"].as_f64().unwrap()
}

/// /proc/PID/task of `pid`, as thread ids.
fn tasks(guest: &mut Guest, pid: u32) -> Vec<u32> {
    sh(guest, &format!("ls /proc/{pid}/task")).iter().flat_map(|l| l.split_whitespace()).map(|t| t.parse().unwrap()).collect()
}

/// mtcount's status line: (pid, crasher tid, [(counter tid, count)], round).
fn mtcount_status(guest: &mut Guest) -> (u32, u32, Vec<(u32, u64)>, u64) {
    let line = sh1(guest, "cat /run/mtcount.status");
    let w: Vec<&str> = line.split_whitespace().collect();
    assert!(w.len() >= 7 && w[0] == "pid" && w[2] == "crasher" && w[4] == "counters", "mtcount status {line:?}");
    let counters = w[5..w.len() - 2]
        .iter()
        .map(|c| {
            let (t, n) = c.split_once(':').unwrap();
            (t.parse().unwrap(), n.parse().unwrap())
        })
        .collect();
    (w[1].parse().unwrap(), w[3].parse().unwrap(), counters, w[w.len() - 1].parse().unwrap())
}

#[test]
fn distro_guest_service_thread_and_channel_crashes_repaired() {
    let t = Instant::now();
    let mut guest = Guest::boot(&GuestConfig::distro().with_ram_file()).unwrap();
    let boot_s = t.elapsed().as_secs_f64();
    let ready = guest.wait_for_console("GUEST-KIT READY", Duration::from_secs(1)).unwrap();
    assert!(ready.contains("init=systemd"), "{ready}");
    // Wait for the boot's jobs to finish: the state to compare against.
    let state_before = sh1(&mut guest, "systemctl is-system-running --wait");
    eprintln!("distro guest: multi-user in {boot_s:.1} s ({ready}); is-system-running: {state_before}");
    assert!(["running", "degraded"].contains(&state_before.as_str()), "{state_before}");
    let records_before = guest.ping(Duration::from_secs(30)).unwrap();
    assert!(records_before > 0, "the bystander writes no records");

    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &[]);
    let mut totals = Vec::new();

    // --- a crash in a systemd service's main process ---------------------
    poll(&mut guest, "systemctl is-active crashy", 60, |s| s == "active");
    let pid0: u32 = sh1(&mut guest, "systemctl show -p MainPID --value crashy").parse().unwrap();
    let restarts0: u32 = sh1(&mut guest, "systemctl show -p NRestarts --value crashy").parse().unwrap();
    let _ = guest.run("echo crash > /run/crashy/trigger", Duration::from_secs(120)).unwrap();
    let ev = repaired(&events, 1, &mut watcher);
    assert_eq!(ev["pid"].as_i64(), Some(pid0 as i64), "the repair killed crashy's main process: {ev}");
    assert_eq!(ev["comm"].as_str(), Some("crashy"), "{ev}");
    totals.push(total_ms(&ev));
    poll(&mut guest, "systemctl show -p NRestarts --value crashy", 60, |s| s.parse::<u32>().ok() == Some(restarts0 + 1));
    poll(&mut guest, "systemctl is-active crashy", 60, |s| s == "active");
    let pid1: u32 = sh1(&mut guest, "systemctl show -p MainPID --value crashy").parse().unwrap();
    assert_ne!(pid1, pid0, "crashy was restarted as a new process");
    let journal = sh(&mut guest, "journalctl -b -u crashy.service --no-pager -o cat").join("\n");
    assert!(journal.contains("code=killed, status=9/KILL"), "journald has no SIGKILL for crashy:\n{journal}");
    assert!(journal.contains("Failed with result 'signal'"), "{journal}");
    let state = sh1(&mut guest, "systemctl is-system-running --wait");
    assert_eq!(state, state_before, "is-system-running after the crashy repair");

    // --- a crash from a child of the command channel ----------------------
    let crash = guest.crash("sysrq-c").unwrap();
    let ev = repaired(&events, 2, &mut watcher);
    assert_eq!(ev["pid"].as_i64(), Some(crash.pid as i64), "{ev}");
    assert_eq!(guest.wait_crash_exit(&crash, Duration::from_secs(120)).unwrap(), 137);
    totals.push(total_ms(&ev));

    // --- a crash in one thread of a multi-threaded process ----------------
    poll(&mut guest, "systemctl is-active mtcount", 60, |s| s == "active");
    let (pid, crasher, counters, _) = mtcount_status(&mut guest);
    assert!(crasher != 0 && counters.iter().all(|&(t, _)| t != 0), "mtcount not fully started");
    let before = tasks(&mut guest, pid);
    assert_eq!(before.len(), 2 + counters.len(), "{before:?}");
    assert!(before.contains(&crasher));
    let _ = guest.run(&format!("kill -USR1 {pid}"), Duration::from_secs(120)).unwrap();
    let ev = repaired(&events, 3, &mut watcher);
    assert_eq!(ev["pid"].as_i64(), Some(crasher as i64), "the crashing thread is the one killed: {ev}");
    totals.push(total_ms(&ev));
    // What the guest shows: only the crashing thread ended.
    std::thread::sleep(Duration::from_secs(2));
    let after = tasks(&mut guest, pid);
    let state_line = sh1(&mut guest, &format!("grep State: /proc/{pid}/status"));
    eprintln!("mtcount pid {pid}: tasks {before:?} -> {after:?} ({state_line}); crasher {crasher}");
    assert!(!after.contains(&crasher), "the crashing thread {crasher} is gone");
    let mut expect: Vec<u32> = before.iter().copied().filter(|&t| t != crasher).collect();
    expect.sort_unstable();
    let mut got = after.clone();
    got.sort_unstable();
    assert_eq!(got, expect, "every other thread lives on");
    let (_, _, c1, r1) = mtcount_status(&mut guest);
    std::thread::sleep(Duration::from_secs(2));
    let (_, _, c2, r2) = mtcount_status(&mut guest);
    assert!(r2 > r1, "the main thread still reports ({r1} -> {r2})");
    for ((t, n1), (_, n2)) in c1.iter().zip(&c2) {
        assert!(n2 > n1, "counter thread {t} still counts ({n1} -> {n2})");
    }
    assert_eq!(sh1(&mut guest, "systemctl is-active mtcount"), "active", "the process (and its unit) lives on");
    let state = sh1(&mut guest, "systemctl is-system-running --wait");
    assert_eq!(state, state_before, "is-system-running after the thread repair");

    // --- the bystander -----------------------------------------------------
    let v = guest.verify_bystander().unwrap();
    assert!(v.ok, "bystander data: {v:?}");
    assert!(v.records > records_before, "the bystander kept writing: {records_before} -> {}", v.records);
    let journal = sh(&mut guest, "journalctl -b -k --no-pager -o cat | grep -c 'GUEST-KIT' || true");
    eprintln!("distro guest: trap-to-running (ms) crashy {:.1}, channel child {:.1}, mtcount thread {:.1}; bystander {} records; kernel-log GUEST-KIT lines {:?}",
        totals[0], totals[1], totals[2], v.records, journal);

    // SAFETY: signalling the watcher this test started.
    unsafe { libc::kill(watcher.id() as i32, libc::SIGINT) };
    wait_exit(&mut watcher, 60);
    guest.shutdown().unwrap();
}
