//! The kernel matrix (`scripts/kit-matrix`): Debian's stock cloud kernel of
//! every supported series, 5.10, 6.1, 6.12 and 7.x, each with its own repair
//! image, judged by the guest itself (its console, its exit statuses, its
//! bystander). One test per series, so a failure names the kernel.

mod support;

use harness::{Guest, GuestConfig, Kernel, Series};
use std::time::Duration;
use support::{start_watch, wait_event};

/// A sysrq-c child repaired: the watcher's event names the process the
/// guest announced, the child dies of SIGKILL (137), the bystander's data is
/// whole, and a new process runs.
fn sysrq_c_repaired(series: Series) {
    let kernel = Kernel::Matrix(series);
    let mut guest = Guest::boot(&GuestConfig::new(kernel).with_ram_file())
        .unwrap_or_else(|e| panic!("{series}: {e}"));
    let events = guest.dir().join("events.jsonl");
    let mut watcher = start_watch(&guest, &events, &[]);
    let c = guest.crash("sysrq-c").unwrap();
    let status = guest.wait_crash_exit(&c, Duration::from_secs(120));
    let text = std::fs::read_to_string(&events).unwrap_or_default();
    assert_eq!(status.unwrap_or_else(|e| panic!("{series}: {e}\nevents:\n{text}")), 137, "{series}: {text}");
    let text = wait_event(&events, "\"repaired\"", 1, Duration::from_secs(30), Some(&mut watcher));
    let e: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["event"] == "repaired")
        .unwrap();
    assert_eq!(e["pid"], c.pid as i64, "{series}: {e}");
    assert_eq!(e["message"], "sysrq triggered crash", "{series}: {e}");
    assert!(guest.verify_bystander().unwrap().ok, "{series}");
    let out = guest.run("echo a new process", Duration::from_secs(60)).unwrap();
    assert_eq!(out.status, 0, "{series}");
    support::kill(watcher.id(), libc::SIGINT);
    assert!(support::wait_exit(&mut watcher, 30).success(), "{series}");
}

#[test]
fn v5_10_sysrq_c() {
    sysrq_c_repaired(Series::V5_10);
}

#[test]
fn v6_1_sysrq_c() {
    sysrq_c_repaired(Series::V6_1);
}

#[test]
fn v6_12_sysrq_c() {
    sysrq_c_repaired(Series::V6_12);
}

#[test]
fn v7_sysrq_c() {
    sysrq_c_repaired(Series::V7);
}
