//! PREEMPT_RT: Debian 13's `linux-image-6.12.N+deb13-rt-amd64`
//! (`scripts/kit-matrix`, `$kit/matrix/6.12-rt/`). Its spinlocks are
//! sleeping rt_mutex locks and bottom-half state lives in
//! `task_struct.softirq_disable_cnt`, not in `preempt_count`; the verdict
//! reads the member (present only on RT) and says in its reason what it
//! cannot rule out. Judged by the guest: exit statuses, its console, its
//! bystander, a new process.

mod support;

use harness::{Guest, GuestConfig, Kernel, Kit, Series};
use std::time::Duration;
use support::{start_watch, wait_event};

const KERNEL: Kernel = Kernel::Matrix(Series::V6_12Rt);
const LONG: Duration = Duration::from_secs(240);
const RT_NOTE: &str = "PREEMPT_RT: a held spinlock (an rt_mutex, not in preempt_count) cannot be ruled out";

fn boot(cfg: GuestConfig) -> Guest {
    let config = std::fs::read_to_string(Kit::locate().unwrap().config(KERNEL).unwrap())
        .unwrap_or_else(|e| panic!("{e}: run scripts/guest-kit (scripts/kit-matrix fetches the 6.12-rt kernel)"));
    assert!(config.lines().any(|l| l == "CONFIG_PREEMPT_RT=y"), "the 6.12-rt kit kernel is not PREEMPT_RT");
    // no_timer_check: on a loaded host TCG may miss the early-boot check
    // of the IO-APIC timer, and the kernel panics before init.
    let mut cfg = cfg.append("no_timer_check");
    cfg.boot_timeout = Duration::from_secs(300); // a loaded host
    Guest::boot(&cfg).unwrap_or_else(|e| panic!("{e}"))
}

/// A sysrq-c child is repaired, the reason says what RT hides from
/// `preempt_count`, and the guest carries on.
#[test]
fn a_sysrq_c_child_is_repaired_on_preempt_rt_and_the_reason_says_what_it_cannot_rule_out() {
    let mut guest = boot(GuestConfig::new(KERNEL).with_ram_file());
    let ev = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &ev, &[]);
    let c = guest.crash("sysrq-c").unwrap();
    let status = guest.wait_crash_exit(&c, LONG).unwrap_or_else(|e| panic!("{e}\n{}", guest.console_tail(40)));
    assert_eq!(status, 137);
    let text = wait_event(&ev, "\"repaired\"", 1, Duration::from_secs(60), Some(&mut watcher));
    let e: serde_json::Value = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|e| e["event"] == "repaired").unwrap();
    assert_eq!(e["pid"], c.pid as i64, "{e}");
    assert_eq!(e["message"], "sysrq triggered crash", "{e}");
    assert_eq!(e["action"], "kill", "{e}");
    let why = e["reason"].as_str().unwrap();
    assert!(why.starts_with(&format!("killing pid {} (", c.pid)), "{why}");
    assert!(why.contains(RT_NOTE), "{why}");
    assert!(!guest.console().contains("Kernel panic"), "{}", guest.console_tail(40));
    assert!(guest.verify_bystander().unwrap().ok);
    assert_eq!(guest.run("echo a new process", LONG).unwrap().status, 0);
    support::kill(watcher.id(), libc::SIGINT);
    assert!(support::wait_exit(&mut watcher, 60).success());
}

/// `diagnose --wait-crash` (read-only) on a sysrq-c child, then the panic
/// goes on as it would have: the diagnosis equals the guest's own report,
/// and its verdict carries the RT note.
#[test]
fn the_diagnosis_on_preempt_rt_is_the_guests_own_report() {
    let mut guest = boot(GuestConfig::new(KERNEL));
    let (diag, stderr) = support::spawn_diagnose(&guest, KERNEL, 240);
    let crash = guest.crash("sysrq-c").unwrap();
    let out = diag.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr.join().unwrap());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = guest.wait_panic(LONG).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.pid, crash.pid);
    assert_eq!(r["message"], p.message.as_str(), "{r}");
    assert_eq!(r["pid"], p.pid as i64, "{r}");
    assert_eq!(r["comm"], p.comm.as_str(), "{r}");
    assert_eq!(r["cpu"], p.cpu as i64, "{r}");
    assert_eq!(r["verdict"], "kill", "{r}");
    assert!(r.to_string().contains(RT_NOTE), "{r}");
    let functions: Vec<&str> = r["backtrace"].as_array().unwrap().iter().filter_map(|f| f["function"].as_str()).collect();
    assert!(functions.contains(&"sysrq_handle_crash"), "{functions:?}");
    assert!(p.call_trace.iter().any(|f| f == "sysrq_handle_crash"), "{:?}", p.call_trace);
}

